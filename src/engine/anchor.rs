//! Audit anchors: the chain's head (`seq:hash`) published outside the store,
//! to the alert channel and the log, on demand (`jitbot audit anchor`) and on
//! a schedule (`[audit] anchor_every`). Anyone holding a published anchor
//! can later check that history up to it was not rewritten
//! (`jitbot audit verify --anchor SEQ:HASH`).

use super::{toned, Engine, EngineError};
use crate::messages::{Audience, Tone};
use crate::store::{Anchor, Sealing};
use std::time::Duration;
use tokio::sync::watch;

impl Engine {
    /// Publishes the current head and returns it. Publishing writes no audit
    /// record, so the anchor stays the head until the next real event.
    pub async fn publish_audit_anchor(&self) -> Result<Anchor, EngineError> {
        let store = &self.inner.store;
        let head = store.audit_head()?;
        // Outside the store first: an anchor announced but not recorded
        // would be one start-up cannot check.
        store.record_published_anchor(&head)?;
        tracing::info!(anchor = %head, "audit anchor: keep it outside jitbot's store");
        let text = format!(
            "Audit anchor `{head}` (record {} of jitbot's audit chain). Keep this message: \
             `jitbot audit verify --anchor {head}` later proves the history up to it was not rewritten.",
            head.seq
        );
        store
            .update(self.now(), |tx| {
                tx.outbox(toned(Tone::Anchor, Audience::Alert, text, Vec::new()));
                Ok::<(), EngineError>(())
            })
            .await?;
        self.outbox_changed().notify_one();
        Ok(head)
    }
}

impl Engine {
    /// Reports what start-up found when keying the audit chain: in the log
    /// and, when it needs a person, to the alert channel. A chain that does
    /// not verify under the key (it was not sealed) is an alert at every
    /// start until it is dealt with; so is the first keying of a chain that
    /// already held unkeyed records, since that is also what a keyed history
    /// rewritten without the key, its marker deleted, would look like.
    pub async fn report_audit_keying(&self, sealing: &Sealing) -> Result<(), EngineError> {
        let (tone, text) = match sealing {
            Sealing::Unkeyed | Sealing::Intact => return Ok(()),
            Sealing::FirstKeyed { legacy: 0, .. } => {
                tracing::info!("audit chain: keyed with [audit] key from its first record");
                return Ok(());
            }
            Sealing::FirstKeyed { since, legacy } => {
                tracing::warn!(
                    since,
                    legacy,
                    "audit chain: keyed for the first time; its {legacy} unkeyed records were sealed with an \
                     `audit.keyed` record ({since}). Expected once, when [audit] key is first set; otherwise \
                     someone rewrote a keyed chain and deleted its marker: run `jitbot audit verify --anchor` \
                     with your last published anchor"
                );
                (
                    Tone::Locked,
                    format!(
                    "The audit chain was keyed for the first time: its {legacy} unkeyed records were sealed \
                     at record {since}. If [audit] key was set before, this is not expected: check the chain \
                     with `jitbot audit verify --anchor` and your last published anchor."
                ),
                )
            }
            Sealing::Tampered {
                seq,
                problem,
                recorded,
            } => {
                tracing::error!(
                    seq,
                    recorded,
                    "audit chain does not verify under [audit] key at record {seq}: {problem}. \
                     It was NOT sealed; compare it with your published anchors and backups"
                );
                (Tone::Alarm, format!(
                    "jitbot's audit chain does not verify under its key at record {seq}: \
                     {problem}. Someone with write access to the store may have rewritten, cut off or emptied \
                     it. jitbot did not seal it{}; compare it with your published anchors \
                     (`jitbot audit verify --anchor`) and backups.",
                    if *recorded {
                        " and recorded the finding in the chain"
                    } else {
                        ""
                    }
                ))
            }
        };
        self.inner
            .store
            .update(self.now(), |tx| {
                tx.outbox(toned(tone, Audience::Alert, text, Vec::new()));
                Ok::<(), EngineError>(())
            })
            .await?;
        self.outbox_changed().notify_one();
        Ok(())
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
