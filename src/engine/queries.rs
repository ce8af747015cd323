//! Read-only answers: list, groups, pending, and the approval card view.

use super::{Caller, Engine, EngineError, Reply};
use crate::messages::ApprovalCard;
use crate::store::RequestRecord;
use jitbot_core::request::{RequestKind, RequestState};
use jitbot_core::LeaseState;

impl Engine {
    pub(super) async fn list(&self, caller: &Caller) -> Result<Reply, EngineError> {
        let now = self.now();
        let mut lines = Vec::new();
        for rec in self.inner.store.live_leases()? {
            let l = &rec.lease;
            if l.user == caller.user && l.state != LeaseState::Ended {
                let left = l.remaining(now);
                lines.push(format!(
                    "lease {} on `{}`: {}, {}m{}s left",
                    l.id,
                    l.group,
                    l.state.describe(),
                    left.num_minutes(),
                    left.num_seconds() % 60
                ));
            }
        }
        for rec in self.inner.store.pending_requests()? {
            let r = &rec.request;
            if r.requester == caller.user && r.state == RequestState::Pending {
                lines.push(format!(
                    "request {} for `{}` ({}): waiting, {} of {} approvals",
                    r.id,
                    r.group,
                    r.duration,
                    r.approvals.len(),
                    self.group(&r.group).map(|p| p.approvals_required).unwrap_or(1)
                ));
            }
        }
        if lines.is_empty() {
            return Ok(Reply::ok("You hold no leases and have no pending requests."));
        }
        Ok(Reply::ok(lines.join("\n")))
    }

    pub(super) async fn groups(&self, caller: &Caller) -> Result<Reply, EngineError> {
        let actor = self.actor(&caller.user).await?;
        let lines: Vec<String> = self
            .inner
            .policy
            .groups
            .iter()
            .filter(|g| g.may_request(&actor))
            .map(|g| {
                format!(
                    "`{}` up to {} (default {}){}{} {}",
                    g.name,
                    g.max_duration,
                    g.default_duration,
                    if g.needs_approval(&actor) {
                        ""
                    } else {
                        ", no approval needed"
                    },
                    if g.zsp { ", zero standing privilege" } else { "" },
                    g.description
                )
                .trim_end()
                .to_string()
            })
            .collect();
        if lines.is_empty() {
            return Ok(Reply::ok("There is no group you may request."));
        }
        Ok(Reply::ok(lines.join("\n")))
    }

    pub(super) async fn pending(&self, caller: &Caller) -> Result<Reply, EngineError> {
        let actor = self.actor(&caller.user).await?;
        let mut lines = Vec::new();
        let store = &self.inner.store;
        for rec in store
            .pending_requests()?
            .into_iter()
            .chain(store.requests_awaiting_review()?)
        {
            let r = &rec.request;
            let Ok(policy) = self.group(&r.group) else {
                continue;
            };
            if !(policy.may_approve(&actor) || self.is_admin(&actor)) || r.requester == caller.user {
                continue;
            }
            if r.state == RequestState::Pending {
                lines.push(format!(
                    "{}: {} wants `{}` for {}: {} ({} of {} approvals) — `/jit approve {}`",
                    r.id,
                    r.requester,
                    r.group,
                    r.duration,
                    r.reason,
                    r.approvals.len(),
                    policy.approvals_required,
                    r.id
                ));
            } else if r.awaits_review() {
                lines.push(format!(
                    "{}: BREAK-GLASS by {} on `{}` awaits review — `/jit ack {}`",
                    r.id, r.requester, r.group, r.id
                ));
            }
        }
        if lines.is_empty() {
            return Ok(Reply::ok("Nothing is waiting for you."));
        }
        Ok(Reply::ok(lines.join("\n")))
    }

    /// The approval card of a request as it stands now, for updates of the
    /// copies already posted ([`Engine::card_to_post`] for a first post).
    pub fn card(&self, rec: &RequestRecord) -> ApprovalCard {
        let r = &rec.request;
        let needed = self.group(&r.group).map(|p| p.approvals_required).unwrap_or(1);
        let decided = |verb: &str, by: Option<&jitbot_core::UserId>| {
            let at = r
                .decided_at
                .map(|t| t.format(" at %H:%M:%S UTC").to_string())
                .unwrap_or_default();
            match by {
                Some(by) => format!("{verb} by {by}{at}"),
                None => format!("{verb}{at}"),
            }
        };
        let status = match r.state {
            RequestState::Pending => format!("pending: {} of {needed} approvals", r.approvals.len()),
            RequestState::Approved if r.break_glass.is_some() => decided("break-glass self-approved", None),
            RequestState::Approved if r.auto_approved => decided("auto-approved", None),
            RequestState::Approved => {
                let names: Vec<String> = r.approvals.iter().map(|a| a.by.to_string()).collect();
                decided(&format!("approved by {}", names.join(", ")), None)
            }
            RequestState::Denied => {
                let d = r.denials.last();
                let reason = d.and_then(|d| d.reason.clone()).unwrap_or_default();
                format!("{}: {reason}", decided("denied", d.map(|d| &d.by)))
            }
            RequestState::Cancelled => decided("cancelled", r.cancelled_by.as_ref()),
            RequestState::TimedOut => decided("expired without a decision", None),
        };
        ApprovalCard {
            request: r.id.clone(),
            group: r.group.clone(),
            requester: r.requester.clone(),
            duration: r.duration.to_string(),
            reason: r.reason.clone(),
            extension: matches!(r.kind, RequestKind::Extend { .. }),
            approvals: r.approvals.iter().map(|a| a.by.clone()).collect(),
            needed,
            status,
            open: r.state == RequestState::Pending,
            recipients: Default::default(),
        }
    }
}
