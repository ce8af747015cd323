//! Directory outages: noticing that the directory is back, and waking the
//! revocations and grants that were waiting out a backoff meanwhile.
//!
//! A revocation (or a grant's pre-add check) that fails while the directory
//! is down waits `retry_base` doubling up to `retry_max` before its next
//! try. Without this module, a 5-second outage could keep a membership in
//! place for minutes after the directory returned. Here, the first directory
//! answer after a transient failure (a grant, a revocation, or the
//! scheduler's probe while failures are outstanding) moves every `Revoke`
//! timer of a revoking lease and every `Grant` timer of a granting lease
//! forward to now, fenced on the lease's state, in one commit.

use super::{Engine, EngineError};
use crate::store::TimerKind;
use jitbot_core::{LeaseId, LeaseState};
use std::sync::atomic::{AtomicBool, Ordering};

/// What the engine remembers about the directory between operations.
#[derive(Default)]
pub(super) struct Outage {
    /// A transient directory failure happened since the last answer.
    failing: AtomicBool,
    /// A probe is in flight (at most one at a time).
    probing: AtomicBool,
}

impl Engine {
    /// Records a transient directory failure: work is now waiting for it.
    pub(super) fn directory_failed(&self) {
        self.inner.outage.failing.store(true, Ordering::SeqCst);
    }

    /// Whether a transient directory failure is outstanding (the scheduler
    /// then probes the directory until it answers).
    pub fn directory_failing(&self) -> bool {
        self.inner.outage.failing.load(Ordering::SeqCst)
    }

    /// The directory answered: if it had been failing, wakes the work that
    /// is waiting for it.
    pub(super) async fn directory_answered(&self) {
        if self.inner.outage.failing.swap(false, Ordering::SeqCst) {
            match self.wake_waiting().await {
                Ok(woken) => {
                    tracing::info!(
                        woken,
                        "the directory answers again; waiting revocations and grants run now"
                    )
                }
                Err(e) => {
                    // Nothing is lost: the timers still fire after their backoff.
                    tracing::warn!(error = %e, "cannot pull waiting revocations forward");
                }
            }
        }
    }

    /// Asks the directory whether it is back, when failures are
    /// outstanding; on an answer, wakes the waiting work. At most one probe
    /// runs at a time; the scheduler calls this while
    /// [`Engine::directory_failing`].
    pub async fn probe_directory(&self) {
        if !self.directory_failing() || self.inner.outage.probing.swap(true, Ordering::SeqCst) {
            return;
        }
        let answered = self.inner.directory.ping().await.is_ok();
        self.inner.outage.probing.store(false, Ordering::SeqCst);
        if answered {
            self.directory_answered().await;
        }
    }

    /// Moves the `Revoke` timers of revoking leases and the `Grant` timers
    /// of granting leases that are due later to now. Returns how many moved.
    async fn wake_waiting(&self) -> Result<usize, EngineError> {
        let now = self.now();
        let store = &self.inner.store;
        let mut waiting = Vec::new();
        for (kind, state) in [
            (TimerKind::Revoke, LeaseState::Revoking),
            (TimerKind::Grant, LeaseState::Granting),
        ] {
            waiting.extend(
                store
                    .timers_of(kind)?
                    .into_iter()
                    .filter(|t| t.due > now)
                    .map(|t| (kind, state, t.id)),
            );
        }
        if waiting.is_empty() {
            return Ok(0);
        }
        let woken = store
            .update(now, |tx| {
                let mut woken = 0;
                for (kind, state, id) in &waiting {
                    // Fenced: a lease that moved on keeps whatever timers
                    // its new state has.
                    if tx.lease(&LeaseId::new(id.as_str()))?.map(|r| r.lease.state) == Some(*state) {
                        tx.set_timer(*kind, id, now);
                        woken += 1;
                    }
                }
                Ok::<_, EngineError>(woken)
            })
            .await?;
        self.changed();
        Ok(woken)
    }
}
