//! Leases as people and timers see them: expire, release, revoke, extend,
//! warn. The directory work itself is the executor's (`executor.rs`).

use super::audit::{about_lease, about_request, AuditAction};
use super::executor::fenced;
use super::{notice, Caller, Engine, EngineError, Reply, ENGINE_ACTOR};
use crate::messages::Audience;
use crate::store::{LeaseRecord, OutboxItem, RequestRecord, TimerKind, Tx};
use jitbot_core::command::Action;
use jitbot_core::request::RequestKind;
use jitbot_core::{AccessRequest, EndReason, GroupName, LeaseId, LeaseState, Refusal, RequestId, Span};

impl Engine {
    /// Sets the `Expire` and `Warn` timers of an active lease (no warning
    /// when its group has left the configuration: it still expires).
    pub(super) fn arm_lease_timers(&self, tx: &mut Tx<'_>, rec: &LeaseRecord) {
        let id = rec.lease.id.as_str();
        tx.set_timer(TimerKind::Expire, id, rec.lease.expires_at);
        match self
            .group(&rec.lease.group)
            .ok()
            .and_then(|p| rec.lease.warning_at(p))
        {
            Some(at) => tx.set_timer(TimerKind::Warn, id, at),
            None => tx.clear_timer(TimerKind::Warn, id),
        }
    }

    fn load_lease(&self, tx: &Tx<'_>, id: &str) -> Result<LeaseRecord, EngineError> {
        tx.lease(&LeaseId::new(id))?
            .ok_or_else(|| EngineError::NotFound(format!("there is no lease {id}; `/jit list` shows yours")))
    }

    /// `Expire` timers fired for `ids`: those leases that really are due
    /// start revoking, all in one store commit (durable when this returns),
    /// each fenced like any transition: only an `Active` lease moves. A
    /// lease extended meanwhile (or seen before its end after the clock
    /// moved back) gets its `Expire` timer at its real end. Returns the
    /// leases that started revoking: their memberships are for the caller
    /// to remove.
    pub(super) async fn begin_expiries(&self, ids: &[String]) -> Result<Vec<LeaseId>, EngineError> {
        self.inner
            .store
            .update(self.now(), |tx| {
                let mut begun = Vec::new();
                for id in ids {
                    tx.clear_timer(TimerKind::Expire, id);
                    let lease = LeaseId::new(id.as_str());
                    let moved = fenced(tx, &lease, &[LeaseState::Active], |tx, rec| {
                        let now = tx.now();
                        if !rec.lease.is_due(now) {
                            tx.set_timer(TimerKind::Expire, id, rec.lease.expires_at);
                            return Ok(false);
                        }
                        rec.lease.begin_revoke(EndReason::Expired, now)?;
                        self.revoking(tx, rec, ENGINE_ACTOR, "expired");
                        Ok(true)
                    })?;
                    if moved == Some(true) {
                        begun.push(lease);
                    }
                }
                Ok::<_, EngineError>(begun)
            })
            .await
    }

    /// Stages the move to `Revoking`: the `Revoke` timer is due now and stays
    /// until the membership is gone.
    pub(super) fn revoking(&self, tx: &mut Tx<'_>, rec: &LeaseRecord, actor: &str, why: &str) {
        let id = rec.lease.id.as_str();
        tx.clear_timer(TimerKind::Expire, id);
        tx.clear_timer(TimerKind::Warn, id);
        tx.set_timer(TimerKind::Revoke, id, tx.now());
        tx.audit(about_lease(actor, AuditAction::LeaseRevoking, &rec.lease).detail(why));
    }

    /// The lease `target` (an id, or a group the caller holds) for this caller.
    fn find_lease(&self, tx: &Tx<'_>, caller: &Caller, target: &str) -> Result<LeaseRecord, EngineError> {
        if let Some(rec) = tx.lease(&LeaseId::new(target))? {
            return Ok(rec);
        }
        let group = GroupName::new(target);
        if self.group(&group).is_ok() {
            if let Some(id) = tx.live_lease(&group, &caller.user)? {
                return self.load_lease(tx, id.as_str());
            }
            return Err(EngineError::NotFound(format!("you hold no lease on `{target}`")));
        }
        Err(EngineError::NotFound(format!(
            "`{target}` is neither a lease id nor a group; `/jit list` shows your leases"
        )))
    }

    /// Early release by the holder (`reason` None), or revocation by an
    /// approver or admin (`reason` given).
    pub(super) async fn release(
        &self,
        caller: &Caller,
        target: &str,
        reason: Option<String>,
    ) -> Result<Reply, EngineError> {
        let actor = self.actor(&caller.user).await?;
        let (id, reply) = self
            .inner
            .store
            .update(self.now(), |tx| {
                let mut rec = self.find_lease(tx, caller, target)?;
                let policy = self.group(&rec.lease.group)?;
                let holder = rec.lease.user == caller.user;
                let end = match &reason {
                    None if holder => EndReason::Released,
                    None => {
                        return Err(Refusal::NotYourLease {
                            group: rec.lease.group.clone(),
                        }
                        .into())
                    }
                    Some(reason) => {
                        if !(policy.may_approve(&actor) || self.is_admin(&actor)) {
                            return Err(Refusal::NotAnApprover {
                                group: rec.lease.group.clone(),
                            }
                            .into());
                        }
                        EndReason::Revoked {
                            by: caller.user.clone(),
                            reason: reason.clone(),
                        }
                    }
                };
                if rec.lease.state != LeaseState::Active {
                    return Err(Refusal::LeaseNotActive {
                        state: rec.lease.state.describe().to_string(),
                    }
                    .into());
                }
                let now = tx.now();
                rec.lease.begin_revoke(end.clone(), now)?;
                self.revoking(tx, &rec, caller.user.as_str(), &end.describe());
                let id = rec.lease.id.clone();
                let reply = Reply::ok(format!(
                    "Removing {} from `{}` now (lease {id}).",
                    rec.lease.user, rec.lease.group
                ));
                tx.put_lease(rec);
                Ok::<_, EngineError>((id, reply))
            })
            .await?;
        self.changed();
        self.drive(&id).await?;
        Ok(reply)
    }

    /// Adds time to the caller's lease, or opens an extension request where
    /// the group wants extensions approved.
    pub(super) async fn extend(&self, caller: &Caller, target: &str, by: Span) -> Result<Reply, EngineError> {
        let actor = self.actor(&caller.user).await?;
        let now = self.now();
        let reply = self
            .inner
            .store
            .update(now, |tx| {
                let mut rec = self.find_lease(tx, caller, target)?;
                let policy = self.group(&rec.lease.group)?;
                if rec.lease.user != caller.user {
                    return Err(Refusal::NotYourLease {
                        group: rec.lease.group.clone(),
                    }
                    .into());
                }
                let lease_id = rec.lease.id.clone();
                if policy.extension_requires_approval {
                    let req_id = RequestId::new(tx.new_id("r")?);
                    let request = AccessRequest::open(
                        req_id.clone(),
                        policy,
                        &actor,
                        RequestKind::Extend {
                            lease: lease_id.clone(),
                        },
                        Some(by),
                        "extension",
                        now,
                    )?;
                    // One open request per (group, user), and the cap on
                    // pending requests per person, hold for extensions too.
                    if let Some(open) = tx.pending_request_of(&rec.lease.group, &caller.user)? {
                        return Err(Refusal::AlreadyPending {
                            group: rec.lease.group.clone(),
                            request: open.to_string(),
                        }
                        .into());
                    }
                    self.within_pending_cap(&request)?;
                    // Check now that the extension would fit, so nobody approves an impossible one.
                    rec.lease.clone().extend(by, policy, now)?;
                    tx.set_timer(TimerKind::RequestTimeout, req_id.as_str(), request.decide_by);
                    tx.outbox(OutboxItem::PostApproval {
                        request: req_id.clone(),
                    });
                    tx.audit(
                        about_request(caller.user.as_str(), AuditAction::RequestOpened, &request)
                            .lease(&lease_id)
                            .detail(format!("extension by {by}")),
                    );
                    tx.put_request(RequestRecord {
                        request,
                        origin: caller.chat.clone(),
                        messages: vec![],
                        lease: Some(lease_id),
                    });
                    return Ok(Reply::ok(format!(
                        "Extension request {req_id} is waiting for approval."
                    )));
                }
                let until = rec.lease.extend(by, policy, now)?;
                self.arm_lease_timers(tx, &rec);
                tx.audit(
                    about_lease(caller.user.as_str(), AuditAction::LeaseExtended, &rec.lease)
                        .detail(format!("by {by} until {}", until.to_rfc3339())),
                );
                tx.outbox(notice(
                    Audience::Group(rec.lease.group.clone()),
                    format!(
                        "{} extended `{}` by {by} (until {}).",
                        rec.lease.user,
                        rec.lease.group,
                        until.format("%H:%M UTC")
                    ),
                    vec![],
                ));
                tx.put_lease(rec);
                Ok::<_, EngineError>(Reply::ok(format!(
                    "Extended until {}.",
                    until.format("%H:%M:%S UTC")
                )))
            })
            .await?;
        self.changed();
        Ok(reply)
    }

    /// Tells the holder their lease ends soon, with Extend and Release buttons.
    pub(crate) async fn warn(&self, id: &str) -> Result<(), EngineError> {
        self.inner
            .store
            .update(self.now(), |tx| {
                tx.clear_timer(TimerKind::Warn, id);
                let Some(mut rec) = tx.lease(&LeaseId::new(id))? else {
                    return Ok(());
                };
                if rec.lease.state != LeaseState::Active || rec.lease.warned {
                    return Ok(());
                }
                rec.lease.warned = true;
                let left = Span::from_secs(rec.lease.remaining(tx.now()).num_seconds().max(0) as u64);
                tx.outbox(notice(
                    Audience::User {
                        user: rec.lease.user.clone(),
                        chat: rec.origin.clone(),
                    },
                    format!(
                        "Your access to `{}` ends in {left} (lease {id}).",
                        rec.lease.group
                    ),
                    vec![Action::Extend(id.to_string()), Action::Release(id.to_string())],
                ));
                tx.put_lease(rec);
                Ok::<_, EngineError>(())
            })
            .await?;
        self.changed();
        Ok(())
    }
}
