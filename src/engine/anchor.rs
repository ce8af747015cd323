//! Audit anchors: the chain's head (`seq:hash`) published outside the store,
//! to the alert channel and the log, on demand (`jitbot audit anchor`) and on
//! a schedule (`[audit] anchor_every`). Anyone holding a published anchor
//! can later check that history up to it was not rewritten
//! (`jitbot audit verify --anchor SEQ:HASH`).

use super::{notice, Engine, EngineError};
use crate::ports::Audience;
use crate::store::Anchor;
use std::time::Duration;
use tokio::sync::watch;

impl Engine {
    /// Publishes the current head and returns it. Publishing writes no audit
    /// record, so the anchor stays the head until the next real event.
    pub async fn publish_audit_anchor(&self) -> Result<Anchor, EngineError> {
        let store = &self.inner.store;
        let head = store.audit_head()?;
        tracing::info!(anchor = %head, "audit anchor: keep it outside jitbot's store");
        let text = format!(
            ":anchor: Audit anchor `{head}` (record {} of jitbot's audit chain). Keep this message: \
             `jitbot audit verify --anchor {head}` later proves the history up to it was not rewritten.",
            head.seq
        );
        store
            .update(self.now(), |tx| {
                tx.outbox(notice(Audience::Alert, text, Vec::new()));
                Ok::<(), EngineError>(())
            })
            .await?;
        self.outbox_changed().notify_one();
        Ok(head)
    }
}

/// Publishes an anchor at start and then every `every`, until `shutdown`.
pub async fn run_anchors(engine: Engine, every: Duration, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Err(e) = engine.publish_audit_anchor().await {
                    tracing::error!(error = %e, "cannot publish the audit anchor; it is retried at the next interval");
                }
            }
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
    }
}
