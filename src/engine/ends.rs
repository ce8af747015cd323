//! Revocations together: the `Active` → `Revoking` commits of leases that
//! expire together go into one store commit, their memberships are removed
//! concurrently (so the directory combines them into few modifies), and the
//! `Revoking` → `Ended` commits of revocations that finish at about the
//! same time go into one store commit.
//!
//! In a mass expiry every lease used to pay for two store commits of its
//! own (a sled transaction across ten trees, on the same cores the
//! directory needs), and with one scheduler slot per lease only a few
//! removals were waiting to be combined at a time. Now the scheduler hands
//! every due `Expire` and `Revoke` timer it finds (up to
//! [`REVOCATION_BATCH`]) to [`Engine::fire_revocations`] as one piece of
//! work: one commit starts all the expiries, each lease fenced through
//! `fenced` (the check behind [`Engine::transition`]) and durable before
//! any modify; then every lease is driven at once. Each end is queued and
//! committed by whoever gets the turn, with everything queued by then,
//! fenced per lease through [`Engine::transition_each`]. A lone timer is a
//! batch of one. Every end is still durable (flushed) before its
//! revocation returns, as with one commit each.

use super::{Engine, EngineError};
use crate::store::{StoreError, Timer, TimerKind};
use jitbot_core::{Instant, LeaseId, LeaseState};
use std::collections::HashSet;
use std::sync::Mutex;
use tokio::sync::oneshot;

/// The most `Expire` and `Revoke` timers the scheduler hands to one
/// [`Engine::fire_revocations`]. Small enough that the commit starting
/// them holds the writer lock briefly (at 2,048, a compressed sled store
/// held it 0.6–1.4 s on a loaded machine, and grants and replay checks
/// waited behind it); the directory's combiner still merges the removals
/// of consecutive batches into modifies of up to its own cap (`MAX_BATCH`,
/// 2,048 on OpenLDAP).
pub const REVOCATION_BATCH: usize = 256;

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
    /// Runs due `Expire` and `Revoke` timers (of any leases) together: one
    /// store commit moves every expired lease among them from `Active` to
    /// `Revoking`, then every lease's membership is removed at once, each
    /// through [`Engine::drive`] under its own lock. Work that fails moves
    /// its timer `retry_base` out, as [`Engine::fire`] does.
    pub async fn fire_revocations(&self, timers: Vec<Timer>) {
        let mut seen = HashSet::new();
        let mut expiring = Vec::new();
        let mut revoking = Vec::new();
        for timer in timers {
            if !matches!(timer.kind, TimerKind::Expire | TimerKind::Revoke) {
                // Not a revocation: runs on its own, as ever.
                self.fire_other(timer).await;
                continue;
            }
            let late = (self.now() - timer.due).to_std().unwrap_or_default();
            crate::metrics::stage("timer_lateness", late);
            match timer.kind {
                TimerKind::Expire => expiring.push(timer.id),
                _ => revoking.push(LeaseId::new(timer.id.as_str())),
            }
        }
        expiring.sort();
        expiring.dedup();
        if !expiring.is_empty() {
            let committing = std::time::Instant::now();
            match self.begin_expiries(&expiring).await {
                Ok(begun) => {
                    let took = committing.elapsed();
                    for _ in &begun {
                        crate::metrics::stage("commit_before", took);
                    }
                    if !begun.is_empty() {
                        self.changed();
                    }
                    revoking.extend(begun);
                }
                Err(e) => {
                    for id in &expiring {
                        self.retry_timer(TimerKind::Expire, id, &e).await;
                    }
                }
            }
        }
        // One lease is driven once, whichever of its timers came.
        revoking.retain(|id| seen.insert(id.clone()));
        if let [id] = revoking.as_slice() {
            if let Err(e) = self.drive(id).await {
                self.retry_timer(TimerKind::Revoke, id.as_str(), &e).await;
            }
            return;
        }
        let mut all = tokio::task::JoinSet::new();
        for id in revoking {
            let engine = self.clone();
            all.spawn(async move {
                if let Err(e) = engine.drive(&id).await {
                    engine.retry_timer(TimerKind::Revoke, id.as_str(), &e).await;
                }
            });
        }
        while let Some(done) = all.join_next().await {
            if let Err(e) = done {
                tracing::error!(error = %e, "revocation task failed; its Revoke timer stays and is retried");
            }
        }
    }

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
