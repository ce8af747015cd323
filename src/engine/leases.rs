//! Leases: grant, expire, revoke (with retries), release, extend, warn.

use super::{notice, Caller, Engine, EngineError, Reply, ENGINE_ACTOR};
use crate::ports::Audience;
use crate::store::{LeaseRecord, OutboxItem, RequestRecord, TimerKind, Tx};
use jitbot_core::backoff::retry_delay;
use jitbot_core::command::Action;
use jitbot_core::policy::GroupPolicy;
use jitbot_core::request::RequestKind;
use jitbot_core::{AccessRequest, EndReason, GroupName, LeaseId, LeaseState, Refusal, RequestId, Span};

impl Engine {
    /// Sets the `Expire` and `Warn` timers of an active lease.
    pub(super) fn arm_lease_timers(&self, tx: &mut Tx<'_>, rec: &LeaseRecord, policy: &GroupPolicy) {
        let id = rec.lease.id.as_str();
        tx.set_timer(TimerKind::Expire, id, rec.lease.expires_at);
        match rec.lease.warning_at(policy) {
            Some(at) => tx.set_timer(TimerKind::Warn, id, at),
            None => tx.clear_timer(TimerKind::Warn, id),
        }
    }

    fn load_lease(&self, tx: &Tx<'_>, id: &str) -> Result<LeaseRecord, EngineError> {
        tx.lease(&LeaseId::new(id))?
            .ok_or_else(|| EngineError::NotFound(format!("there is no lease {id}; `/jit list` shows yours")))
    }

    /// Puts the membership in place for a `Granting` lease. Safe to run again
    /// after a crash at any point: the membership check is recorded before the
    /// add, and the add is idempotent.
    pub(crate) async fn grant(&self, id: &str) -> Result<(), EngineError> {
        let lease_id = LeaseId::new(id);
        let Some(rec) = self.inner.store.lease(&lease_id)? else {
            return self.drop_timer(TimerKind::Grant, id).await;
        };
        if rec.lease.state != LeaseState::Granting {
            return self.drop_timer(TimerKind::Grant, id).await;
        }
        let policy = self.group(&rec.lease.group)?.clone();
        let dir = &self.inner.directory;
        if rec.lease.preexisting.is_none() {
            match dir.is_member(&policy.dn, &rec.lease.user).await {
                Ok(was_member) => {
                    self.inner
                        .store
                        .update(self.now(), |tx| {
                            let mut rec = self.load_lease(tx, id)?;
                            rec.lease.record_preexisting(was_member);
                            if was_member {
                                let mut audit = Engine::audit(ENGINE_ACTOR, "lease.standing_membership");
                                audit.lease = Some(id.to_string());
                                audit.group = Some(rec.lease.group.to_string());
                                audit.user = Some(rec.lease.user.to_string());
                                audit.detail =
                                    "already a member before jitbot; jitbot will not remove it".into();
                                tx.audit(audit);
                            }
                            tx.put_lease(rec);
                            Ok::<_, EngineError>(())
                        })
                        .await?;
                }
                Err(e) => return self.grant_failed(id, &e.to_string()).await,
            }
        }
        let Some(rec) = self.inner.store.lease(&lease_id)? else {
            return Ok(());
        };
        if rec.lease.owns_membership() {
            let started = std::time::Instant::now();
            let added = dir.add_member(&policy.dn, &rec.lease.user).await;
            crate::metrics::directory_op("add", started.elapsed());
            if let Err(e) = added {
                return self.grant_failed(id, &e.to_string()).await;
            }
        }
        self.inner
            .store
            .update(self.now(), |tx| {
                let mut rec = self.load_lease(tx, id)?;
                rec.lease.activate()?;
                tx.clear_timer(TimerKind::Grant, id);
                self.arm_lease_timers(tx, &rec, &policy);
                let mut audit = Engine::audit(ENGINE_ACTOR, "lease.granted");
                audit.lease = Some(id.to_string());
                audit.request = Some(rec.lease.request.to_string());
                audit.group = Some(rec.lease.group.to_string());
                audit.user = Some(rec.lease.user.to_string());
                audit.detail = format!("until {}", rec.lease.expires_at.to_rfc3339());
                tx.audit(audit);
                let until = rec.lease.expires_at.format("%H:%M:%S UTC");
                tx.outbox(notice(
                    Audience::Group(rec.lease.group.clone()),
                    format!(
                        ":key: {} now has `{}` until {until} (lease {id}).",
                        rec.lease.user, rec.lease.group
                    ),
                    vec![],
                ));
                tx.outbox(notice(
                    Audience::User {
                        user: rec.lease.user.clone(),
                        chat: rec.origin.clone(),
                    },
                    format!(
                        "You have `{}` until {until}. Release it early with `/jit release {id}`.",
                        rec.lease.group
                    ),
                    vec![Action::Release(id.to_string()), Action::Extend(id.to_string())],
                ));
                crate::metrics::granted();
                tx.put_lease(rec);
                Ok::<_, EngineError>(())
            })
            .await?;
        self.changed();
        Ok(())
    }

    /// The directory refused or failed the grant: undo through the revoke
    /// path, which removes only what jitbot may have added.
    async fn grant_failed(&self, id: &str, error: &str) -> Result<(), EngineError> {
        tracing::warn!(lease = id, error, "grant failed; undoing");
        self.inner
            .store
            .update(self.now(), |tx| {
                let mut rec = self.load_lease(tx, id)?;
                let now = tx.now();
                rec.lease.begin_revoke(
                    EndReason::GrantFailed {
                        error: error.to_string(),
                    },
                    now,
                )?;
                tx.clear_timer(TimerKind::Grant, id);
                tx.set_timer(TimerKind::Revoke, id, now);
                let mut audit = Engine::audit(ENGINE_ACTOR, "lease.grant_failed");
                audit.lease = Some(id.to_string());
                audit.group = Some(rec.lease.group.to_string());
                audit.user = Some(rec.lease.user.to_string());
                audit.detail = error.to_string();
                tx.audit(audit);
                let text = format!(
                    "Granting `{}` to {} failed: {error}",
                    rec.lease.group, rec.lease.user
                );
                let holder = Audience::User {
                    user: rec.lease.user.clone(),
                    chat: rec.origin.clone(),
                };
                tx.outbox(notice(holder, text.clone(), vec![]));
                tx.outbox(notice(Audience::Group(rec.lease.group.clone()), text, vec![]));
                tx.put_lease(rec);
                Ok::<_, EngineError>(())
            })
            .await?;
        self.changed();
        self.revoke(id).await
    }

    async fn drop_timer(&self, kind: TimerKind, id: &str) -> Result<(), EngineError> {
        self.inner
            .store
            .update(self.now(), |tx| {
                tx.clear_timer(kind, id);
                Ok::<_, EngineError>(())
            })
            .await
    }

    /// An `Expire` timer fired: start revoking if the lease really is due.
    pub(crate) async fn expire(&self, id: &str) -> Result<(), EngineError> {
        let revoke = self
            .inner
            .store
            .update(self.now(), |tx| {
                tx.clear_timer(TimerKind::Expire, id);
                let Some(mut rec) = tx.lease(&LeaseId::new(id))? else {
                    return Ok(false);
                };
                let now = tx.now();
                if rec.lease.state != LeaseState::Active {
                    return Ok(false);
                }
                if !rec.lease.is_due(now) {
                    // Extended, or the clock moved back: wait for the real end.
                    tx.set_timer(TimerKind::Expire, id, rec.lease.expires_at);
                    return Ok(false);
                }
                rec.lease.begin_revoke(EndReason::Expired, now)?;
                self.revoking(tx, &rec, ENGINE_ACTOR, "expired");
                tx.put_lease(rec);
                Ok::<_, EngineError>(true)
            })
            .await?;
        if revoke {
            self.revoke(id).await?;
        }
        Ok(())
    }

    /// Stages the move to `Revoking`: the `Revoke` timer is due now and stays
    /// until the membership is gone.
    pub(super) fn revoking(&self, tx: &mut Tx<'_>, rec: &LeaseRecord, actor: &str, why: &str) {
        let id = rec.lease.id.as_str();
        tx.clear_timer(TimerKind::Expire, id);
        tx.clear_timer(TimerKind::Warn, id);
        tx.set_timer(TimerKind::Revoke, id, tx.now());
        let mut audit = Engine::audit(actor, "lease.revoking");
        audit.lease = Some(id.to_string());
        audit.group = Some(rec.lease.group.to_string());
        audit.user = Some(rec.lease.user.to_string());
        audit.detail = why.to_string();
        tx.audit(audit);
    }

    /// Removes the membership of a `Revoking` lease. On failure the lease
    /// stays `Revoking` and its timer moves out by the backoff; after
    /// `alert_after` failures an alert goes out. It is never dropped.
    pub(crate) async fn revoke(&self, id: &str) -> Result<(), EngineError> {
        let Some(rec) = self.inner.store.lease(&LeaseId::new(id))? else {
            return self.drop_timer(TimerKind::Revoke, id).await;
        };
        if rec.lease.state != LeaseState::Revoking {
            return self.drop_timer(TimerKind::Revoke, id).await;
        }
        let policy = self.group(&rec.lease.group)?.clone();
        if rec.lease.owns_membership() {
            let started = std::time::Instant::now();
            let removed = self
                .inner
                .directory
                .remove_member(&policy.dn, &rec.lease.user)
                .await;
            crate::metrics::directory_op("remove", started.elapsed());
            if let Err(e) = removed {
                return self.revoke_failed(id, &e.to_string()).await;
            }
        }
        self.inner
            .store
            .update(self.now(), |tx| {
                let mut rec = self.load_lease(tx, id)?;
                if rec.lease.state != LeaseState::Revoking {
                    tx.clear_timer(TimerKind::Revoke, id);
                    return Ok(());
                }
                rec.lease.finish()?;
                tx.clear_timer(TimerKind::Revoke, id);
                let reason = rec.lease.end_reason.clone().unwrap_or(EndReason::Expired);
                let now = tx.now();
                if matches!(reason, EndReason::Expired) {
                    crate::metrics::revocation_lag((now - rec.lease.expires_at).to_std().unwrap_or_default());
                }
                crate::metrics::revoked();
                let mut audit = Engine::audit(ENGINE_ACTOR, "lease.ended");
                audit.lease = Some(id.to_string());
                audit.group = Some(rec.lease.group.to_string());
                audit.user = Some(rec.lease.user.to_string());
                audit.detail = format!(
                    "{}; membership {}",
                    reason.describe(),
                    if rec.lease.owns_membership() {
                        "removed"
                    } else {
                        "left as it was before jitbot"
                    }
                );
                tx.audit(audit);
                if !matches!(reason, EndReason::GrantFailed { .. }) {
                    let text = format!(
                        ":lock: {}'s access to `{}` ended ({}).",
                        rec.lease.user,
                        rec.lease.group,
                        reason.describe()
                    );
                    tx.outbox(notice(
                        Audience::Group(rec.lease.group.clone()),
                        text.clone(),
                        vec![],
                    ));
                    let holder = Audience::User {
                        user: rec.lease.user.clone(),
                        chat: rec.origin.clone(),
                    };
                    tx.outbox(notice(holder, text, vec![]));
                }
                if rec.lease.alerted {
                    let text = format!(
                        "Resolved: {}'s membership of `{}` is removed after {} failed attempts.",
                        rec.lease.user, rec.lease.group, rec.lease.revoke_attempts
                    );
                    tx.outbox(notice(Audience::Alert, text, vec![]));
                }
                tx.put_lease(rec);
                Ok::<_, EngineError>(())
            })
            .await?;
        self.changed();
        Ok(())
    }

    async fn revoke_failed(&self, id: &str, error: &str) -> Result<(), EngineError> {
        let settings = self.inner.settings.clone();
        let jitter: f64 = self.jitter() * 0.5 + 0.5;
        let attempt = self
            .inner
            .store
            .update(self.now(), |tx| {
                let mut rec = self.load_lease(tx, id)?;
                let attempt = rec.lease.revoke_failed(error);
                let delay = retry_delay(attempt, settings.retry_base, settings.retry_max, jitter);
                tx.set_timer(TimerKind::Revoke, id, tx.now() + delay.to_chrono());
                let mut audit = Engine::audit(ENGINE_ACTOR, "lease.revoke_failed");
                audit.lease = Some(id.to_string());
                audit.group = Some(rec.lease.group.to_string());
                audit.user = Some(rec.lease.user.to_string());
                audit.detail = format!("attempt {attempt}: {error}; next try in {delay}");
                tx.audit(audit);
                if attempt >= settings.alert_after && !rec.lease.alerted {
                    rec.lease.alerted = true;
                    tx.outbox(notice(Audience::Alert, format!(
                                ":warning: jitbot cannot remove {} from `{}` ({attempt} attempts: {error}). It keeps retrying; check the directory.",
                                rec.lease.user, rec.lease.group
                            ), vec![]));
                }
                tx.put_lease(rec);
                Ok::<_, EngineError>(attempt)
            })
            .await?;
        crate::metrics::revoke_retry();
        tracing::warn!(lease = id, attempt, error, "revocation failed; will retry");
        self.changed();
        Ok(())
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
        self.revoke(id.as_str()).await?;
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
                    // Check now that the extension would fit, so nobody approves an impossible one.
                    rec.lease.clone().extend(by, policy, now)?;
                    tx.set_timer(TimerKind::RequestTimeout, req_id.as_str(), request.decide_by);
                    tx.outbox(OutboxItem::PostApproval {
                        request: req_id.clone(),
                    });
                    let mut audit = Engine::audit(caller.user.as_str(), "request.opened");
                    audit.request = Some(req_id.to_string());
                    audit.lease = Some(lease_id.to_string());
                    audit.group = Some(rec.lease.group.to_string());
                    audit.detail = format!("extension by {by}");
                    tx.audit(audit);
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
                self.arm_lease_timers(tx, &rec, policy);
                let mut audit = Engine::audit(caller.user.as_str(), "lease.extended");
                audit.lease = Some(lease_id.to_string());
                audit.group = Some(rec.lease.group.to_string());
                audit.user = Some(rec.lease.user.to_string());
                audit.detail = format!("by {by} until {}", until.to_rfc3339());
                tx.audit(audit);
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
