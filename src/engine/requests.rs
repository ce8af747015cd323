//! Requests: open, approve, deny, cancel, break-glass, acknowledge, time out.

use super::audit::{about_lease, about_request, AuditAction};
use super::{notice, toned, Caller, Engine, EngineError, Reply, ENGINE_ACTOR};
use crate::messages::{Audience, Tone};
use crate::store::{LeaseRecord, OutboxItem, RequestRecord, TimerKind, Tx};
use jitbot_core::command::Action;
use jitbot_core::request::{ApprovalOutcome, RequestKind, RequestState};
use jitbot_core::{AccessRequest, GroupName, Lease, LeaseId, LeaseState, Refusal, RequestId, Span};

/// What a committed request change asks the caller to do next.
enum Next {
    Nothing,
    Grant(LeaseId),
}

impl Engine {
    pub(super) async fn request(
        &self,
        caller: &Caller,
        group: &GroupName,
        duration: Option<Span>,
        reason: &str,
        break_glass: bool,
    ) -> Result<Reply, EngineError> {
        let policy = self.group(group)?.clone();
        let actor = self.actor(&caller.user).await?;
        let now = self.now();
        let (reply, next) = self
            .inner
            .store
            .update(now, |tx| {
                // A request for a group the user already holds becomes an extension.
                let kind = match tx.live_lease(group, &caller.user)? {
                    None => RequestKind::Grant,
                    Some(lease) => {
                        let rec = tx.lease(&lease)?.ok_or_else(|| EngineError::NotFound(lease.to_string()))?;
                        if rec.lease.state != LeaseState::Active {
                            return Err(Refusal::LeaseNotActive {
                                state: rec.lease.state.describe().to_string(),
                            }
                            .into());
                        }
                        RequestKind::Extend { lease }
                    }
                };
                // One open request per (group, user): a second one would
                // race the first to a second lease.
                if let Some(open) = tx.pending_request_of(group, &caller.user)? {
                    if !self.close_stale_extension(tx, &open)? {
                        return Err(Refusal::AlreadyPending {
                        group: group.clone(),
                            request: open.to_string(),
                        }
                        .into());
                    }
                }
                let id = RequestId::new(tx.new_id("r")?);
                let mut request =
                    AccessRequest::open(id.clone(), &policy, &actor, kind.clone(), duration, reason, now)?;
                if break_glass {
                    request.break_glass(&policy, &actor, reason, now)?;
                }
                self.within_pending_cap(&request)?;
                tx.audit(
                    about_request(caller.user.as_str(), AuditAction::RequestOpened, &request).detail(format!(
                        "{} for {}: {}",
                        if matches!(kind, RequestKind::Extend { .. }) { "extension" } else { "grant" },
                        request.duration,
                        request.reason
                    )),
                );
                let mut rec = RequestRecord {
                    request,
                    origin: caller.chat.clone(),
                    messages: Vec::new(),
                    lease: None,
                };
                if rec.request.state == RequestState::Approved {
                    let how = if break_glass {
                        AuditAction::RequestBreakGlass
                    } else {
                        AuditAction::RequestAutoApproved
                    };
                    tx.audit(
                        about_request(caller.user.as_str(), how, &rec.request).detail(rec.request.reason.clone()),
                    );
                    if break_glass {
                        let text = format!(
                            "BREAK-GLASS: {} approved their own access to `{}` for {}: {}. An approver must review it with `/jit ack {}`.",
                            caller.user, group, rec.request.duration, rec.request.reason, id
                        );
                        let ack = vec![Action::Acknowledge(id.to_string())];
                        tx.outbox(toned(Tone::Alarm, Audience::Alert, text.clone(), ack.clone()));
                        tx.outbox(toned(Tone::Alarm, Audience::Group(group.clone()), text, ack));
                    }
                    let next = self.approved(tx, &mut rec, caller)?;
                    let text = match (&next, &rec.request.kind) {
                        (Next::Grant(lease), _) => format!(
                            "Granted without approval: {} on `{}` for {} (lease {lease}).",
                            caller.user, group, rec.request.duration
                        ),
                        (Next::Nothing, _) => format!("Extended `{}` by {}.", group, rec.request.duration),
                    };
                    tx.put_request(rec);
                    return Ok((Reply::ok(text), next));
                }
                tx.set_timer(TimerKind::RequestTimeout, id.as_str(), rec.request.decide_by);
                tx.outbox(OutboxItem::PostApproval { request: id.clone() });
                let what = match &rec.request.kind {
                    RequestKind::Grant => "Request",
                    RequestKind::Extend { .. } => "You already hold this group, so this is an extension request",
                };
                let text = format!(
                    "{what} {id} for `{group}` ({}) is waiting for {} approval(s); it expires if nobody decides by {}.",
                    rec.request.duration,
                    policy.approvals_required,
                    rec.request.decide_by.format("%H:%M UTC")
                );
                tx.put_request(rec);
                Ok::<_, EngineError>((Reply::ok(text), Next::Nothing))
            })
            .await?;
        self.changed();
        self.follow(next).await;
        Ok(reply)
    }

    /// Turns an approved request into a new lease (state `Granting`, with a
    /// `Grant` timer due now so that a crash before the directory change is
    /// finished on restart) or into more time on the lease it extends.
    ///
    /// One lease per (group, user) is decided here, in the same commit: a
    /// grant approved while the requester already holds an active lease
    /// becomes an extension of it (with the same caps); while that lease is
    /// being granted or revoked the approval is refused, to be given again
    /// once it has settled.
    fn approved(
        &self,
        tx: &mut Tx<'_>,
        rec: &mut RequestRecord,
        caller: &Caller,
    ) -> Result<Next, EngineError> {
        let now = tx.now();
        let req = &rec.request;
        let policy = self.group(&req.group)?;
        tx.clear_timer(TimerKind::RequestTimeout, req.id.as_str());
        let extends = match &req.kind {
            RequestKind::Extend { lease } => Some(lease.clone()),
            RequestKind::Grant => match tx.live_lease(&req.group, &req.requester)? {
                None => None,
                Some(live) => {
                    let state = tx.lease(&live)?.map(|l| l.lease.state);
                    if state != Some(LeaseState::Active) {
                        return Err(Refusal::LeaseNotActive {
                            state: format!(
                                "{}'s lease {live} on `{}` is {}",
                                req.requester,
                                req.group,
                                state.map_or("missing", |s| s.describe())
                            ),
                        }
                        .into());
                    }
                    Some(live)
                }
            },
        };
        let Some(lease) = extends else {
            let lease_id = LeaseId::new(tx.new_id("l")?);
            let lease = Lease::start(
                lease_id.clone(),
                req.id.clone(),
                policy,
                req.requester.clone(),
                req.duration,
                now,
            );
            tx.audit(
                about_lease(ENGINE_ACTOR, AuditAction::LeaseGranting, &lease)
                    .request(&req.id)
                    .detail(format!("until {}", lease.expires_at.to_rfc3339())),
            );
            tx.set_timer(TimerKind::Grant, lease_id.as_str(), now);
            tx.put_lease(LeaseRecord {
                lease,
                origin: rec.origin.clone().or_else(|| caller.chat.clone()),
            });
            rec.lease = Some(lease_id.clone());
            return Ok(Next::Grant(lease_id));
        };
        let mut lrec = tx
            .lease(&lease)?
            .ok_or_else(|| EngineError::NotFound(lease.to_string()))?;
        if lrec.lease.state != LeaseState::Active {
            return Err(Refusal::LeaseNotActive {
                state: lrec.lease.state.describe().to_string(),
            }
            .into());
        }
        let until = lrec.lease.extend(req.duration, policy, now)?;
        self.arm_lease_timers(tx, &lrec);
        tx.audit(
            about_lease(ENGINE_ACTOR, AuditAction::LeaseExtended, &lrec.lease)
                .request(&req.id)
                .detail(format!("by {} until {}", req.duration, until.to_rfc3339())),
        );
        let text = format!(
            "{}'s access to `{}` was extended by {} (until {}).",
            req.requester,
            req.group,
            req.duration,
            until.format("%H:%M UTC")
        );
        tx.outbox(notice(Audience::Group(req.group.clone()), text, vec![]));
        tx.put_lease(lrec);
        rec.lease = Some(lease);
        Ok(Next::Nothing)
    }

    /// Closes pending extension request `id` when the lease it extends is
    /// no longer active: it can never be approved, and it must not hold the
    /// user's one pending request. False when it is still a live request.
    fn close_stale_extension(&self, tx: &mut Tx<'_>, id: &RequestId) -> Result<bool, EngineError> {
        let Some(mut rec) = tx.request(id)? else {
            return Ok(false);
        };
        let RequestKind::Extend { lease } = rec.request.kind.clone() else {
            return Ok(false);
        };
        if tx
            .lease(&lease)?
            .is_some_and(|l| l.lease.state == LeaseState::Active)
        {
            return Ok(false);
        }
        let requester = rec.request.requester.clone();
        rec.request.cancel(&requester, tx.now())?;
        tx.clear_timer(TimerKind::RequestTimeout, id.as_str());
        tx.audit(
            about_request(ENGINE_ACTOR, AuditAction::RequestCancelled, &rec.request)
                .detail(format!("lease {lease} it extends is no longer active")),
        );
        tx.outbox(OutboxItem::UpdateApproval { request: id.clone() });
        tx.put_request(rec);
        Ok(true)
    }

    async fn follow(&self, next: Next) {
        if let Next::Grant(lease) = next {
            if let Err(e) = self.drive(&lease).await {
                tracing::error!(lease = %lease, error = %e, "grant did not finish; its timer will retry");
            }
        }
    }

    fn load_request(&self, tx: &Tx<'_>, id: &str) -> Result<RequestRecord, EngineError> {
        tx.request(&RequestId::new(id))?.ok_or_else(|| {
            EngineError::NotFound(format!(
                "there is no request {id}; `/jit pending` lists open ones"
            ))
        })
    }

    pub(super) async fn approve(
        &self,
        caller: &Caller,
        id: &str,
        shorten: Option<Span>,
    ) -> Result<Reply, EngineError> {
        let actor = self.actor(&caller.user).await?;
        let now = self.now();
        let (reply, next) = self
            .inner
            .store
            .update(now, |tx| {
                let mut rec = self.load_request(tx, id)?;
                let policy = self.group(&rec.request.group)?;
                let outcome = rec.request.approve(policy, &actor, shorten, now)?;
                let mut audit =
                    about_request(caller.user.as_str(), AuditAction::RequestApproval, &rec.request);
                let (reply, next) = match outcome {
                    ApprovalOutcome::AlreadyCounted { have, need } => {
                        return Ok((
                            Reply::ok(format!("You already approved {id} ({have} of {need}).")),
                            Next::Nothing,
                        ));
                    }
                    ApprovalOutcome::Recorded { have, need } => {
                        audit.detail = format!("{have} of {need}");
                        (
                            Reply::ok(format!("Approval recorded for {id}: {have} of {need}.")),
                            Next::Nothing,
                        )
                    }
                    ApprovalOutcome::Approved { duration } => {
                        audit.detail = format!("approved for {duration}");
                        let requester = rec.request.requester.clone();
                        tx.outbox(notice(
                            Audience::User {
                                user: requester,
                                chat: rec.origin.clone(),
                            },
                            format!(
                                "{} approved your request {id} for `{}` ({duration}).",
                                caller.user, rec.request.group
                            ),
                            vec![],
                        ));
                        let next = self.approved(tx, &mut rec, caller)?;
                        (
                            Reply::ok(format!(
                                "Approved {id}: {} gets `{}` for {duration}.",
                                rec.request.requester, rec.request.group
                            )),
                            next,
                        )
                    }
                };
                tx.audit(audit);
                tx.outbox(OutboxItem::UpdateApproval {
                    request: rec.request.id.clone(),
                });
                tx.put_request(rec);
                Ok::<_, EngineError>((reply, next))
            })
            .await?;
        self.changed();
        self.follow(next).await;
        Ok(reply)
    }

    pub(super) async fn deny(&self, caller: &Caller, id: &str, reason: &str) -> Result<Reply, EngineError> {
        let actor = self.actor(&caller.user).await?;
        let now = self.now();
        let reply = self
            .inner
            .store
            .update(now, |tx| {
                let mut rec = self.load_request(tx, id)?;
                let policy = self.group(&rec.request.group)?;
                let ended = rec.request.deny(policy, &actor, reason, now)?;
                let action = if ended {
                    AuditAction::RequestDenied
                } else {
                    AuditAction::RequestDissent
                };
                tx.audit(about_request(caller.user.as_str(), action, &rec.request).detail(reason));
                if ended {
                    tx.clear_timer(TimerKind::RequestTimeout, id);
                    tx.outbox(notice(
                        Audience::User {
                            user: rec.request.requester.clone(),
                            chat: rec.origin.clone(),
                        },
                        format!(
                            "{} denied your request {id} for `{}`: {reason}",
                            caller.user, rec.request.group
                        ),
                        vec![],
                    ));
                }
                tx.outbox(OutboxItem::UpdateApproval {
                    request: rec.request.id.clone(),
                });
                tx.put_request(rec);
                Ok::<_, EngineError>(Reply::ok(if ended {
                    format!("Denied {id}.")
                } else {
                    format!("Your objection to {id} is recorded.")
                }))
            })
            .await?;
        self.changed();
        Ok(reply)
    }

    pub(super) async fn cancel(&self, caller: &Caller, id: &str) -> Result<Reply, EngineError> {
        let actor = self.actor(&caller.user).await?;
        let now = self.now();
        let reply = self
            .inner
            .store
            .update(now, |tx| {
                let mut rec = self.load_request(tx, id)?;
                if rec.request.requester != caller.user && !self.is_admin(&actor) {
                    return Err(Refusal::NotYourLease {
                        group: rec.request.group.clone(),
                    }
                    .into());
                }
                rec.request.cancel(&caller.user, now)?;
                tx.clear_timer(TimerKind::RequestTimeout, id);
                tx.audit(about_request(
                    caller.user.as_str(),
                    AuditAction::RequestCancelled,
                    &rec.request,
                ));
                tx.outbox(OutboxItem::UpdateApproval {
                    request: rec.request.id.clone(),
                });
                tx.put_request(rec);
                Ok::<_, EngineError>(Reply::ok(format!("Cancelled {id}.")))
            })
            .await?;
        self.changed();
        Ok(reply)
    }

    pub(super) async fn acknowledge(&self, caller: &Caller, id: &str) -> Result<Reply, EngineError> {
        let actor = self.actor(&caller.user).await?;
        let now = self.now();
        let reply = self
            .inner
            .store
            .update(now, |tx| {
                let mut rec = self.load_request(tx, id)?;
                let policy = self.group(&rec.request.group)?;
                rec.request.acknowledge(policy, &actor, now)?;
                tx.audit(about_request(
                    caller.user.as_str(),
                    AuditAction::RequestBreakGlassReviewed,
                    &rec.request,
                ));
                tx.put_request(rec);
                Ok::<_, EngineError>(Reply::ok(format!("Break-glass grant {id} acknowledged.")))
            })
            .await?;
        Ok(reply)
    }

    /// A request's approval window closed without a decision.
    pub(super) async fn time_out(&self, id: &str) -> Result<(), EngineError> {
        let now = self.now();
        self.inner
            .store
            .update(now, |tx| {
                tx.clear_timer(TimerKind::RequestTimeout, id);
                let Some(mut rec) = tx.request(&RequestId::new(id))? else {
                    return Ok(());
                };
                if !rec.request.time_out(now) {
                    if rec.request.state == RequestState::Pending {
                        // Not due yet (the clock moved back): check again later.
                        tx.set_timer(TimerKind::RequestTimeout, id, rec.request.decide_by);
                    }
                    return Ok(());
                }
                tx.audit(about_request(ENGINE_ACTOR, AuditAction::RequestTimedOut, &rec.request));
                tx.outbox(OutboxItem::UpdateApproval { request: rec.request.id.clone() });
                tx.outbox(notice(Audience::User { user: rec.request.requester.clone(), chat: rec.origin.clone() }, format!("Your request {id} for `{}` expired before anyone decided it. Ask again if you still need it.", rec.request.group), vec![]));
                tx.put_request(rec);
                Ok::<_, EngineError>(())
            })
            .await?;
        self.changed();
        Ok(())
    }
}
