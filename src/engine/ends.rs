//! Ending leases together: the `Revoking` → `Ended` commits of revocations
//! that finish at about the same time go into one store commit.
//!
//! In a mass expiry every lease used to pay for a store commit of its own
//! after its membership was removed (a sled transaction across ten trees,
//! on the same cores the directory needs). Here a revocation queues its
//! end and waits for its turn to commit; whoever gets the turn commits
//! everything queued by then, fenced per lease through
//! [`Engine::transition_each`], and answers each waiting revocation. A
//! lone revocation is a batch of one. Every end is still durable (flushed)
//! before its revocation returns, as with one commit each.

use super::{Engine, EngineError};
use crate::store::StoreError;
use jitbot_core::{Instant, LeaseId, LeaseState};
use std::sync::Mutex;
use tokio::sync::oneshot;

/// `None`: the lease had left `Revoking` (nothing committed for it);
/// `Some(expired_at)`: ended, with its expiry instant if it expired.
type Ended = Option<Option<Instant>>;

struct Waiting {
    id: LeaseId,
    note: String,
    reply: oneshot::Sender<Result<Ended, StoreError>>,
}

/// Ends waiting for a commit, and the turn to commit them.
#[derive(Default)]
pub(super) struct Ends {
    queue: Mutex<Vec<Waiting>>,
    turn: tokio::sync::Mutex<()>,
}

impl Engine {
    /// Commits the end of lease `id` (its membership gone; `note` says how
    /// the value was found, for the audit), together with the ends queued
    /// by other revocations meanwhile. Returns once it is durable.
    pub(super) async fn end_together(&self, id: &LeaseId, note: String) -> Result<Ended, EngineError> {
        let ends = &self.inner.ends;
        let (reply, answer) = oneshot::channel();
        lock(&ends.queue).push(Waiting {
            id: id.clone(),
            note,
            reply,
        });
        {
            let _turn = ends.turn.lock().await;
            // Everything queued by now, ours included unless the previous
            // turn already took it.
            let batch = std::mem::take(&mut *lock(&ends.queue));
            if !batch.is_empty() {
                let jobs: Vec<(LeaseId, String)> =
                    batch.iter().map(|w| (w.id.clone(), w.note.clone())).collect();
                let committed = self
                    .transition_each(&jobs, &[LeaseState::Revoking], |tx, rec, note| {
                        self.end_change(tx, rec, note)
                    })
                    .await;
                if batch.len() > 1 {
                    tracing::debug!(leases = batch.len(), "ended leases in one commit");
                }
                match committed {
                    Ok(outcomes) => {
                        for (w, outcome) in batch.into_iter().zip(outcomes) {
                            let _ = w.reply.send(Ok(outcome));
                        }
                    }
                    Err(e) => {
                        // A store that failed closed stays failed for every
                        // waiting revocation; anything else is retried.
                        let error = match e {
                            EngineError::Store(StoreError::Failed(why)) => StoreError::Failed(why),
                            e => StoreError::Io(e.to_string()),
                        };
                        for w in batch {
                            let _ = w.reply.send(Err(match &error {
                                StoreError::Failed(why) => StoreError::Failed(why.clone()),
                                e => StoreError::Io(e.to_string()),
                            }));
                        }
                    }
                }
            }
        }
        match answer.await {
            Ok(Ok(ended)) => Ok(ended),
            // The lease stays revoking with its `Revoke` timer: retried.
            Ok(Err(e)) => Err(EngineError::Store(e)),
            Err(_) => Err(EngineError::Store(StoreError::Io(
                "the commit ending this lease was interrupted".into(),
            ))),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
