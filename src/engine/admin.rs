//! Operations for the admin API: the admin token is the authority, so these
//! skip the chat permission checks but are audited under the given name.

use super::audit::{about_request, AuditAction};
use super::{Engine, EngineError};
use crate::store::{OutboxItem, TimerKind};
use jitbot_core::{EndReason, LeaseId, LeaseState, Refusal, RequestId, UserId};

impl Engine {
    /// Ends an active lease now, on an admin's word.
    pub async fn revoke_as_admin(&self, id: &str, reason: &str, by: &str) -> Result<String, EngineError> {
        let now = self.now();
        self.inner
            .store
            .update(now, |tx| {
                let mut rec = tx
                    .lease(&LeaseId::new(id))?
                    .ok_or_else(|| EngineError::NotFound(format!("there is no lease {id}")))?;
                if rec.lease.state != LeaseState::Active {
                    return Err(Refusal::LeaseNotActive {
                        state: rec.lease.state.describe().to_string(),
                    }
                    .into());
                }
                let end = EndReason::Revoked {
                    by: UserId::new(by),
                    reason: reason.to_string(),
                };
                rec.lease.begin_revoke(end.clone(), now)?;
                self.revoking(tx, &rec, by, &end.describe());
                tx.put_lease(rec);
                Ok::<_, EngineError>(())
            })
            .await?;
        self.changed();
        self.drive(&LeaseId::new(id)).await?;
        Ok(format!("lease {id} revoked"))
    }

    /// Cancels a pending request on an admin's word.
    pub async fn cancel_as_admin(&self, id: &RequestId) -> Result<String, EngineError> {
        let now = self.now();
        self.inner
            .store
            .update(now, |tx| {
                let mut rec = tx
                    .request(id)?
                    .ok_or_else(|| EngineError::NotFound(format!("there is no request {id}")))?;
                rec.request.cancel(&UserId::new("admin-api"), now)?;
                tx.clear_timer(TimerKind::RequestTimeout, id.as_str());
                tx.audit(about_request(
                    "admin-api",
                    AuditAction::RequestCancelled,
                    &rec.request,
                ));
                tx.outbox(OutboxItem::UpdateApproval { request: id.clone() });
                tx.put_request(rec);
                Ok::<_, EngineError>(())
            })
            .await?;
        self.changed();
        Ok(format!("request {id} cancelled"))
    }

    /// Active leases and pending requests, for the gauges. Reads only the
    /// live and pending indexes, never the whole history.
    pub fn counts(&self) -> Result<(usize, usize), EngineError> {
        let active = self
            .inner
            .store
            .live_leases()?
            .iter()
            .filter(|l| l.lease.state == LeaseState::Active)
            .count();
        let pending = self.inner.store.pending_requests()?.len();
        Ok((active, pending))
    }
}
