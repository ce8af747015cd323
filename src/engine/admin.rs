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

    /// Live leases whose group left the configuration or whose `dn`
    /// changed, worded for the operator. They are revoked as recorded (from
    /// the DN they were granted in); this says so at start-up and in
    /// `check-config`.
    pub fn leases_outside_config(&self) -> Result<Vec<String>, EngineError> {
        Ok(leases_outside_config(
            &self.inner.policy,
            &self.inner.store.live_leases()?,
        ))
    }
}

/// See [`Engine::leases_outside_config`].
pub fn leases_outside_config(
    policy: &jitbot_core::policy::Policy,
    live: &[crate::store::LeaseRecord],
) -> Vec<String> {
    let mut out = Vec::new();
    for rec in live {
        let l = &rec.lease;
        let written = l
            .membership
            .as_ref()
            .map_or_else(|| "its group's DN".to_string(), |m| m.group.to_string());
        match policy.group(&l.group) {
            Err(_) => out.push(format!(
                "lease {} ({} on `{}`, {}) is for a group no longer in the config; it will still be removed from {written} when it ends",
                l.id,
                l.user,
                l.group,
                l.state.describe()
            )),
            Ok(p) => {
                if let Some(m) = &l.membership {
                    if !m.group.as_str().eq_ignore_ascii_case(p.dn.as_str()) {
                        out.push(format!(
                            "lease {} ({} on `{}`) was granted in {}, but the config now says {}; it will be removed from {} when it ends",
                            l.id, l.user, l.group, m.group, p.dn, m.group
                        ));
                    }
                }
            }
        }
    }
    out
}
