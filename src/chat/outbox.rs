//! The outbox worker: delivers the notices the engine wrote durably with
//! each transition. Delivery is in order, retried with backoff, and never
//! holds up a grant or a revocation: those were committed before the notice
//! was queued.

use crate::engine::Engine;
use crate::ports::{ChatError, Notifier};
use crate::store::OutboxItem;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Attempts before a notice is given up (and logged as lost).
const MAX_ATTEMPTS: u32 = 8;

pub async fn run(engine: Engine, notifier: Arc<dyn Notifier>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let delay = drain(&engine, notifier.as_ref()).await;
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = engine.outbox_changed().notified() => {}
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    // One last pass so announcements of final revocations go out.
                    drain(&engine, notifier.as_ref()).await;
                    return;
                }
            }
        }
    }
}

/// Delivers what it can; returns how long to wait before the next pass.
pub async fn drain(engine: &Engine, notifier: &dyn Notifier) -> Duration {
    let idle = Duration::from_secs(30);
    let items = match engine.store().outbox(256) {
        Ok(items) => items,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the outbox");
            return Duration::from_secs(5);
        }
    };
    for (id, item, attempts) in items {
        match deliver(engine, notifier, &item).await {
            Ok(()) => {
                if let Err(e) = engine.store().outbox_done(id) {
                    tracing::error!(error = %e, "cannot clear delivered notice");
                }
            }
            Err(ChatError::RateLimited(secs)) => {
                tracing::warn!(secs, "chat rate limit; pausing notices");
                return Duration::from_secs(secs.clamp(1, 300));
            }
            Err(e) => {
                let attempts = attempts + 1;
                if attempts >= MAX_ATTEMPTS {
                    tracing::error!(error = %e, ?item, "notice could not be delivered; giving up on it");
                    let _ = engine.store().outbox_done(id);
                } else {
                    tracing::warn!(error = %e, attempts, "notice delivery failed; will retry");
                    let _ = engine.store().outbox_retry(id, &item, attempts);
                    // Keep order: later notices wait for this one.
                    return Duration::from_secs(u64::from(attempts).pow(2).min(60));
                }
            }
        }
    }
    if engine.store().outbox(1).map(|o| o.is_empty()).unwrap_or(true) {
        idle
    } else {
        Duration::ZERO
    }
}

async fn deliver(engine: &Engine, notifier: &dyn Notifier, item: &OutboxItem) -> Result<(), ChatError> {
    let store_err = |e: crate::store::StoreError| ChatError::Unavailable(e.to_string());
    match item {
        OutboxItem::Send { notice } => notifier.send(notice).await,
        OutboxItem::PostApproval { request } => {
            let Some(rec) = engine.store().request(request).map_err(store_err)? else {
                return Ok(());
            };
            if !rec.messages.is_empty() {
                // Already posted before a restart: update instead of posting twice.
                let card = engine.card(&rec);
                for m in &rec.messages {
                    notifier.update_approval(m, &card).await?;
                }
                return Ok(());
            }
            let card = engine.card(&rec);
            let messages = notifier.post_approval(&card).await?;
            engine
                .store()
                .set_messages(request, messages, engine.now())
                .await
                .map_err(store_err)
        }
        OutboxItem::UpdateApproval { request } => {
            let Some(rec) = engine.store().request(request).map_err(store_err)? else {
                return Ok(());
            };
            let card = engine.card(&rec);
            for m in &rec.messages {
                notifier.update_approval(m, &card).await?;
            }
            Ok(())
        }
    }
}
