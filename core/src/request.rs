//! The access request state machine: pending until enough distinct approvers
//! approve (→ approved), someone denies (→ denied), the requester cancels
//! (→ cancelled) or the approval window closes (→ timed out).

use crate::policy::{Actor, GroupPolicy};
use crate::{GroupName, Instant, LeaseId, Refusal, RequestId, Span, UserId};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestKind {
    /// A new lease.
    Grant,
    /// More time on an existing lease.
    Extend { lease: LeaseId },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestState {
    Pending,
    Approved,
    Denied,
    Cancelled,
    TimedOut,
}

impl RequestState {
    pub fn is_final(self) -> bool {
        self != RequestState::Pending
    }
    pub fn describe(self) -> &'static str {
        match self {
            RequestState::Pending => "pending",
            RequestState::Approved => "approved",
            RequestState::Denied => "denied",
            RequestState::Cancelled => "cancelled",
            RequestState::TimedOut => "expired before a decision",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub by: UserId,
    pub at: Instant,
    /// For an approval: the shorter duration the approver chose. For a deny: unused.
    pub duration: Option<Span>,
    pub reason: Option<String>,
}

/// A self-approval under a group's break-glass rule, awaiting review.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakGlass {
    pub reason: String,
    pub acknowledged: Option<Decision>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessRequest {
    pub id: RequestId,
    pub kind: RequestKind,
    pub group: GroupName,
    pub requester: UserId,
    pub duration: Span,
    pub reason: String,
    pub created_at: Instant,
    /// After this instant the request can no longer be approved.
    pub decide_by: Instant,
    pub state: RequestState,
    pub approvals: Vec<Decision>,
    pub denials: Vec<Decision>,
    pub cancelled_by: Option<UserId>,
    pub auto_approved: bool,
    pub break_glass: Option<BreakGlass>,
    /// When the request reached its final state.
    pub decided_at: Option<Instant>,
}

/// What an approval did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApprovalOutcome {
    /// Counted; more approvals are needed.
    Recorded { have: u32, need: u32 },
    /// This approver had already approved; nothing changed.
    AlreadyCounted { have: u32, need: u32 },
    /// The request is approved for this duration, starting now.
    Approved { duration: Span },
}

impl AccessRequest {
    /// Opens a request after checking the policy. When the requester needs no
    /// approval, the request comes back already approved.
    pub fn open(
        id: RequestId,
        policy: &GroupPolicy,
        actor: &Actor,
        kind: RequestKind,
        duration: Option<Span>,
        reason: &str,
        now: Instant,
    ) -> Result<AccessRequest, Refusal> {
        if !policy.may_request(actor) {
            return Err(Refusal::NotAllowedToRequest {
                group: policy.name.clone(),
            });
        }
        let duration = policy.duration_for(duration)?;
        let reason = reason.trim();
        if policy.reason_required && reason.is_empty() {
            return Err(Refusal::ReasonRequired {
                group: policy.name.clone(),
            });
        }
        let auto = !policy.needs_approval(actor);
        Ok(AccessRequest {
            id,
            kind,
            group: policy.name.clone(),
            requester: actor.user.clone(),
            duration,
            reason: reason.to_string(),
            created_at: now,
            decide_by: policy.approval_timeout.after(now),
            state: if auto {
                RequestState::Approved
            } else {
                RequestState::Pending
            },
            approvals: Vec::new(),
            denials: Vec::new(),
            cancelled_by: None,
            auto_approved: auto,
            break_glass: None,
            decided_at: auto.then_some(now),
        })
    }

    fn ensure_open(&self, now: Instant) -> Result<(), Refusal> {
        if self.state != RequestState::Pending {
            return Err(Refusal::NotPending {
                state: self.state.describe().to_string(),
            });
        }
        if now >= self.decide_by {
            return Err(Refusal::DecisionWindowClosed);
        }
        Ok(())
    }

    fn have(&self) -> u32 {
        u32::try_from(self.approvals.len()).unwrap_or(u32::MAX)
    }

    /// Records an approval. `shorten` lets the approver grant less time than
    /// was asked. The lease clock starts when the last needed approval lands.
    pub fn approve(
        &mut self,
        policy: &GroupPolicy,
        approver: &Actor,
        shorten: Option<Span>,
        now: Instant,
    ) -> Result<ApprovalOutcome, Refusal> {
        self.ensure_open(now)?;
        if approver.user == self.requester {
            return Err(Refusal::SelfApproval);
        }
        if !policy.may_approve(approver) {
            return Err(Refusal::NotAnApprover {
                group: policy.name.clone(),
            });
        }
        if let Some(shorter) = shorten {
            if shorter >= self.duration {
                return Err(Refusal::NotShorter {
                    requested: self.duration,
                });
            }
        }
        let need = policy.approvals_required.max(1);
        if self.approvals.iter().any(|a| a.by == approver.user) {
            return Ok(ApprovalOutcome::AlreadyCounted {
                have: self.have(),
                need,
            });
        }
        self.approvals.push(Decision {
            by: approver.user.clone(),
            at: now,
            duration: shorten,
            reason: None,
        });
        if let Some(shorter) = shorten {
            self.duration = self.duration.min(shorter);
        }
        if self.have() >= need {
            self.state = RequestState::Approved;
            self.decided_at = Some(now);
            return Ok(ApprovalOutcome::Approved {
                duration: self.duration,
            });
        }
        Ok(ApprovalOutcome::Recorded {
            have: self.have(),
            need,
        })
    }

    /// Records a deny. Returns true when it ended the request.
    pub fn deny(
        &mut self,
        policy: &GroupPolicy,
        approver: &Actor,
        reason: &str,
        now: Instant,
    ) -> Result<bool, Refusal> {
        self.ensure_open(now)?;
        if approver.user == self.requester {
            // The requester withdraws with `cancel`, not by denying.
            return Err(Refusal::SelfApproval);
        }
        if !policy.may_approve(approver) {
            return Err(Refusal::NotAnApprover {
                group: policy.name.clone(),
            });
        }
        self.denials.push(Decision {
            by: approver.user.clone(),
            at: now,
            duration: None,
            reason: Some(reason.trim().to_string()),
        });
        if policy.deny_ends_request {
            self.state = RequestState::Denied;
            self.decided_at = Some(now);
            return Ok(true);
        }
        Ok(false)
    }

    /// The requester (or an admin, checked by the caller) withdraws the request.
    pub fn cancel(&mut self, by: &UserId, now: Instant) -> Result<(), Refusal> {
        if self.state != RequestState::Pending {
            return Err(Refusal::NotPending {
                state: self.state.describe().to_string(),
            });
        }
        self.state = RequestState::Cancelled;
        self.cancelled_by = Some(by.clone());
        self.decided_at = Some(now);
        Ok(())
    }

    /// Closes a request whose approval window has passed. Returns false (and
    /// changes nothing) when it is not yet due or already decided.
    pub fn time_out(&mut self, now: Instant) -> bool {
        if self.state == RequestState::Pending && now >= self.decide_by {
            self.state = RequestState::TimedOut;
            self.decided_at = Some(now);
            return true;
        }
        false
    }

    /// Break-glass: the requester approves their own request with a reason,
    /// where the group allows it. The request is then marked for review.
    pub fn break_glass(
        &mut self,
        policy: &GroupPolicy,
        actor: &Actor,
        reason: &str,
        now: Instant,
    ) -> Result<Span, Refusal> {
        self.ensure_open(now)?;
        if !policy.break_glass {
            return Err(Refusal::BreakGlassNotAllowed {
                group: policy.name.clone(),
            });
        }
        if actor.user != self.requester {
            return Err(Refusal::NotYourLease {
                group: policy.name.clone(),
            });
        }
        if reason.trim().is_empty() {
            return Err(Refusal::BreakGlassReasonRequired);
        }
        self.break_glass = Some(BreakGlass {
            reason: reason.trim().to_string(),
            acknowledged: None,
        });
        self.state = RequestState::Approved;
        self.decided_at = Some(now);
        Ok(self.duration)
    }

    /// An approver reviews a break-glass self-approval after the fact.
    pub fn acknowledge(
        &mut self,
        policy: &GroupPolicy,
        approver: &Actor,
        now: Instant,
    ) -> Result<(), Refusal> {
        let Some(bg) = self.break_glass.as_mut() else {
            return Err(Refusal::NothingToAcknowledge);
        };
        if approver.user == self.requester {
            return Err(Refusal::SelfApproval);
        }
        if !policy.may_approve(approver) {
            return Err(Refusal::NotAnApprover {
                group: policy.name.clone(),
            });
        }
        if bg.acknowledged.is_none() {
            bg.acknowledged = Some(Decision {
                by: approver.user.clone(),
                at: now,
                duration: None,
                reason: None,
            });
        }
        Ok(())
    }

    pub fn awaits_review(&self) -> bool {
        matches!(&self.break_glass, Some(bg) if bg.acknowledged.is_none())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GroupDn;
    use chrono::{Duration, TimeZone, Utc};

    fn t0() -> Instant {
        Utc.with_ymd_and_hms(2026, 1, 1, 9, 0, 0).unwrap()
    }

    fn policy() -> GroupPolicy {
        let mut p = GroupPolicy::new("db-admins", "cn=db-admins,ou=groups,dc=example,dc=org");
        p.requesters.users.insert(UserId::new("alice"));
        p.requesters.users.insert(UserId::new("bob"));
        p.approvers.users.insert(UserId::new("bob"));
        p.approvers.users.insert(UserId::new("carol"));
        p.approvers
            .groups
            .insert(GroupDn::new("cn=sec,dc=example,dc=org"));
        p
    }

    fn open(p: &GroupPolicy) -> AccessRequest {
        AccessRequest::open(
            RequestId::new("r1"),
            p,
            &Actor::user("alice"),
            RequestKind::Grant,
            Some(Span::from_hours(2)),
            "fixing replication",
            t0(),
        )
        .unwrap()
    }

    #[test]
    fn open_refusals() {
        let p = policy();
        let cases: Vec<(&str, Option<Span>, &str, Refusal)> = vec![
            (
                "mallory",
                None,
                "x",
                Refusal::NotAllowedToRequest {
                    group: p.name.clone(),
                },
            ),
            (
                "alice",
                Some(Span::from_hours(9)),
                "x",
                Refusal::DurationOverMax {
                    group: p.name.clone(),
                    requested: Span::from_hours(9),
                    max: Span::from_hours(8),
                },
            ),
            (
                "alice",
                None,
                "   ",
                Refusal::ReasonRequired {
                    group: p.name.clone(),
                },
            ),
        ];
        for (who, dur, reason, want) in cases {
            let got = AccessRequest::open(
                RequestId::new("r"),
                &p,
                &Actor::user(who),
                RequestKind::Grant,
                dur,
                reason,
                t0(),
            );
            assert_eq!(got.unwrap_err(), want, "{who} {dur:?} {reason:?}");
        }
    }

    #[test]
    fn default_duration_and_optional_reason() {
        let mut p = policy();
        p.reason_required = false;
        let r = AccessRequest::open(
            RequestId::new("r"),
            &p,
            &Actor::user("alice"),
            RequestKind::Grant,
            None,
            "",
            t0(),
        )
        .unwrap();
        assert_eq!(r.duration, Span::from_hours(1));
        assert_eq!(r.state, RequestState::Pending);
        assert_eq!(r.decide_by, t0() + Duration::hours(1));
    }

    #[test]
    fn one_approval_approves() {
        let p = policy();
        let mut r = open(&p);
        let out = r.approve(&p, &Actor::user("bob"), None, t0()).unwrap();
        assert_eq!(
            out,
            ApprovalOutcome::Approved {
                duration: Span::from_hours(2)
            }
        );
        assert_eq!(r.state, RequestState::Approved);
        assert_eq!(r.decided_at, Some(t0()));
    }

    #[test]
    fn approver_through_directory_group() {
        let p = policy();
        let mut r = open(&p);
        let mut dave = Actor::user("dave");
        assert_eq!(
            r.approve(&p, &dave, None, t0()),
            Err(Refusal::NotAnApprover {
                group: p.name.clone()
            })
        );
        dave.groups.insert(GroupDn::new("cn=sec,dc=example,dc=org"));
        assert!(r.approve(&p, &dave, None, t0()).is_ok());
    }

    #[test]
    fn approval_refusals() {
        let p = policy();
        let mut r = open(&p);
        assert_eq!(
            r.approve(&p, &Actor::user("alice"), None, t0()),
            Err(Refusal::SelfApproval)
        );
        assert_eq!(
            r.approve(&p, &Actor::user("mallory"), None, t0()),
            Err(Refusal::NotAnApprover {
                group: p.name.clone()
            })
        );
        assert_eq!(
            r.approve(&p, &Actor::user("bob"), Some(Span::from_hours(3)), t0()),
            Err(Refusal::NotShorter {
                requested: Span::from_hours(2)
            })
        );
        assert_eq!(r.state, RequestState::Pending, "refusals change nothing");
        assert!(r.approvals.is_empty());
    }

    #[test]
    fn n_of_m_counts_each_approver_once() {
        let mut p = policy();
        p.approvals_required = 2;
        let mut r = open(&p);
        let bob = Actor::user("bob");
        assert_eq!(
            r.approve(&p, &bob, None, t0()).unwrap(),
            ApprovalOutcome::Recorded { have: 1, need: 2 }
        );
        assert_eq!(
            r.approve(&p, &bob, None, t0()).unwrap(),
            ApprovalOutcome::AlreadyCounted { have: 1, need: 2 }
        );
        assert_eq!(r.state, RequestState::Pending);
        assert!(matches!(
            r.approve(&p, &Actor::user("carol"), None, t0()).unwrap(),
            ApprovalOutcome::Approved { .. }
        ));
    }

    #[test]
    fn approver_may_shorten() {
        let p = policy();
        let mut r = open(&p);
        let out = r
            .approve(&p, &Actor::user("bob"), Some(Span::from_mins(30)), t0())
            .unwrap();
        assert_eq!(
            out,
            ApprovalOutcome::Approved {
                duration: Span::from_mins(30)
            }
        );
    }

    #[test]
    fn approval_after_denial_is_refused() {
        let p = policy();
        let mut r = open(&p);
        assert!(r.deny(&p, &Actor::user("carol"), "not now", t0()).unwrap());
        assert_eq!(r.state, RequestState::Denied);
        assert_eq!(
            r.approve(&p, &Actor::user("bob"), None, t0()),
            Err(Refusal::NotPending {
                state: "denied".into()
            })
        );
    }

    #[test]
    fn deny_that_does_not_end_the_request() {
        let mut p = policy();
        p.deny_ends_request = false;
        let mut r = open(&p);
        assert!(!r.deny(&p, &Actor::user("carol"), "hmm", t0()).unwrap());
        assert_eq!(r.state, RequestState::Pending);
        assert!(r.approve(&p, &Actor::user("bob"), None, t0()).is_ok());
    }

    #[test]
    fn window_closes() {
        let p = policy();
        let mut r = open(&p);
        let late = t0() + Duration::hours(1);
        assert!(!r.time_out(late - Duration::seconds(1)));
        assert_eq!(
            r.approve(&p, &Actor::user("bob"), None, late),
            Err(Refusal::DecisionWindowClosed)
        );
        assert!(r.time_out(late));
        assert_eq!(r.state, RequestState::TimedOut);
        assert!(!r.time_out(late), "timing out twice changes nothing");
    }

    #[test]
    fn cancel_only_while_pending() {
        let p = policy();
        let mut r = open(&p);
        r.cancel(&UserId::new("alice"), t0()).unwrap();
        assert_eq!(r.state, RequestState::Cancelled);
        assert!(r.cancel(&UserId::new("alice"), t0()).is_err());
    }

    #[test]
    fn auto_approval_by_group_or_requester_set() {
        let mut p = policy();
        p.auto_approve_for.users.insert(UserId::new("bob"));
        let r = AccessRequest::open(
            RequestId::new("r"),
            &p,
            &Actor::user("bob"),
            RequestKind::Grant,
            None,
            "oncall",
            t0(),
        )
        .unwrap();
        assert_eq!(r.state, RequestState::Approved);
        assert!(r.auto_approved);
        assert_eq!(
            open(&p).state,
            RequestState::Pending,
            "alice still needs approval"
        );
        p.auto_approve = true;
        assert!(open(&p).auto_approved);
    }

    #[test]
    fn break_glass_rules_and_review() {
        let mut p = policy();
        let mut r = open(&p);
        assert_eq!(
            r.break_glass(&p, &Actor::user("alice"), "prod down", t0()),
            Err(Refusal::BreakGlassNotAllowed {
                group: p.name.clone()
            })
        );
        p.break_glass = true;
        assert_eq!(
            r.break_glass(&p, &Actor::user("alice"), " ", t0()),
            Err(Refusal::BreakGlassReasonRequired)
        );
        assert_eq!(
            r.break_glass(&p, &Actor::user("bob"), "x", t0()),
            Err(Refusal::NotYourLease {
                group: p.name.clone()
            })
        );
        r.break_glass(&p, &Actor::user("alice"), "prod down", t0())
            .unwrap();
        assert_eq!(r.state, RequestState::Approved);
        assert!(r.awaits_review());
        assert_eq!(
            r.acknowledge(&p, &Actor::user("alice"), t0()),
            Err(Refusal::SelfApproval)
        );
        r.acknowledge(&p, &Actor::user("carol"), t0()).unwrap();
        assert!(!r.awaits_review());
    }
}
