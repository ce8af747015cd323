//! The lease state machine: granting → active → revoking → ended.
//!
//! A lease is the time-bounded membership that an approved request produces.
//! `preexisting` records, before jitbot touches the directory, whether the
//! user was already a member: jitbot only ever removes what it added.

use crate::policy::GroupPolicy;
use crate::{GroupDn, GroupName, Instant, LeaseId, Refusal, RequestId, Span, UserId};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaseState {
    /// Durably recorded; the directory change may or may not have happened.
    Granting,
    /// The membership is in place until `expires_at`.
    Active,
    /// The membership is being removed; retried until it is gone.
    Revoking,
    /// Over; the membership jitbot added is gone.
    Ended,
}

impl LeaseState {
    pub fn describe(self) -> &'static str {
        match self {
            LeaseState::Granting => "being granted",
            LeaseState::Active => "active",
            LeaseState::Revoking => "being revoked",
            LeaseState::Ended => "ended",
        }
    }
    /// Whether the user may hold the membership in this state.
    pub fn is_live(self) -> bool {
        matches!(self, LeaseState::Granting | LeaseState::Active)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EndReason {
    /// The lease ran out.
    Expired,
    /// The holder checked in early.
    Released,
    /// An approver or admin took it away.
    Revoked { by: UserId, reason: String },
    /// The directory refused the grant; any partial change is undone.
    GrantFailed { error: String },
    /// Not a grant at all: a member of a zero-standing-privilege group
    /// without a lease, being removed by the ZSP monitor.
    Drift,
}

impl EndReason {
    pub fn describe(&self) -> String {
        match self {
            EndReason::Expired => "expired".into(),
            EndReason::Released => "released early".into(),
            EndReason::Revoked { by, reason } => format!("revoked by {by}: {reason}"),
            EndReason::GrantFailed { error } => format!("grant failed: {error}"),
            EndReason::Drift => "standing membership of a zero-standing-privilege group removed".into(),
        }
    }
}

/// Exactly what a grant writes into the directory: the group's DN, the
/// membership attribute and the value. Recorded on the lease *before* the
/// write, so that revocation removes this value from this group and nothing
/// else, whatever the configuration or the directory says later (a group
/// dropped from the config, a changed `dn`, a user renamed or deleted).
///
/// A DN value can change under the lease: Active Directory (and OpenLDAP
/// with the refint overlay) rewrites `member` when the user is renamed or
/// moved. So the user entry's stable identity is recorded too, and the
/// directory resolves it to the user's current DN at removal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    pub group: GroupDn,
    /// `member`, `uniqueMember` or `memberUid`.
    pub attribute: String,
    /// The user's DN, or their id for `memberUid`.
    pub value: String,
    /// The user entry's stable identity, as `attribute:value` in the
    /// directory's own terms (`objectGUID:<hex>` on Active Directory,
    /// `entryUUID:<uuid>` on OpenLDAP); `None` for `memberUid`, for a
    /// directory without one, and in leases recorded before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub id: LeaseId,
    pub request: RequestId,
    pub group: GroupName,
    pub user: UserId,
    /// When approval landed: the lease clock starts here.
    pub starts_at: Instant,
    pub expires_at: Instant,
    /// Extensions may not push `expires_at` past this.
    pub latest_end: Instant,
    pub state: LeaseState,
    /// `None` until checked; `Some(true)` when the user was a member before
    /// jitbot, in which case jitbot neither adds nor removes anything.
    pub preexisting: Option<bool>,
    /// What the grant writes (and so what revocation removes); set together
    /// with `preexisting`, before the directory is touched.
    pub membership: Option<Membership>,
    pub end_reason: Option<EndReason>,
    pub ended_at: Option<Instant>,
    /// Failed revocation attempts so far.
    pub revoke_attempts: u32,
    pub last_error: Option<String>,
    /// An alert went out for repeated revocation failures.
    pub alerted: bool,
    /// The expiry warning went out.
    pub warned: bool,
    /// When the re-check after an add that got no answer first found that
    /// add in the directory after this lease had ended (a late add), and
    /// started removing it; kept while that removal is retried, so its
    /// delay shows as overdue from then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub late_add_found_at: Option<Instant>,
}

impl Lease {
    /// A new lease for an approved request, starting `now`.
    pub fn start(
        id: LeaseId,
        request: RequestId,
        policy: &GroupPolicy,
        user: UserId,
        duration: Span,
        now: Instant,
    ) -> Lease {
        Lease {
            id,
            request,
            group: policy.name.clone(),
            user,
            starts_at: now,
            expires_at: duration.after(now),
            latest_end: policy.max_total_duration.max(duration).after(now),
            state: LeaseState::Granting,
            preexisting: None,
            membership: None,
            end_reason: None,
            ended_at: None,
            revoke_attempts: 0,
            last_error: None,
            alerted: false,
            warned: false,
            late_add_found_at: None,
        }
    }

    fn not_in(&self, expected: LeaseState) -> Result<(), Refusal> {
        if self.state != expected {
            return Err(Refusal::LeaseNotActive {
                state: self.state.describe().to_string(),
            });
        }
        Ok(())
    }

    /// A lease that only removes: a member of a zero-standing-privilege
    /// group found without a lease. It starts `Revoking`, owns exactly the
    /// value found, and goes through the same retried removal as any lease.
    pub fn remediation(
        id: LeaseId,
        group: GroupName,
        user: UserId,
        membership: Membership,
        now: Instant,
    ) -> Lease {
        Lease {
            id,
            request: RequestId::new("zsp-monitor"),
            group,
            user,
            starts_at: now,
            expires_at: now,
            latest_end: now,
            state: LeaseState::Revoking,
            preexisting: Some(false),
            membership: Some(membership),
            end_reason: Some(EndReason::Drift),
            ended_at: Some(now),
            revoke_attempts: 0,
            last_error: None,
            alerted: false,
            warned: false,
            late_add_found_at: None,
        }
    }

    /// Records what the directory said before any change, and what the
    /// grant will write. The first observation sticks.
    pub fn record_preexisting(&mut self, was_member: bool, membership: Membership) {
        if self.preexisting.is_none() {
            self.preexisting = Some(was_member);
        }
        if self.membership.is_none() {
            self.membership = Some(membership);
        }
    }

    /// The grant stopped before jitbot ever sent its add: nothing of this
    /// lease is in the directory, so its end removes nothing (a membership
    /// that appears meanwhile is someone else's).
    pub fn never_added(&mut self) {
        self.preexisting = None;
    }

    /// jitbot's first add found the value already there (LDAP result 20):
    /// someone else added it between the check and the add. It is theirs,
    /// so jitbot never claims it and never removes it.
    pub fn added_by_someone_else(&mut self) {
        self.preexisting = Some(true);
    }

    /// Whether jitbot added (or may have been about to add) the membership,
    /// and so must remove it at the end.
    pub fn owns_membership(&self) -> bool {
        self.preexisting == Some(false)
    }

    /// The directory now holds the membership.
    pub fn activate(&mut self) -> Result<(), Refusal> {
        self.not_in(LeaseState::Granting)?;
        self.state = LeaseState::Active;
        Ok(())
    }

    /// Starts the end of a live lease. Idempotent for a lease already revoking.
    pub fn begin_revoke(&mut self, reason: EndReason, now: Instant) -> Result<(), Refusal> {
        match self.state {
            LeaseState::Granting | LeaseState::Active => {
                self.state = LeaseState::Revoking;
                self.end_reason = Some(reason);
                self.ended_at = Some(now);
                Ok(())
            }
            LeaseState::Revoking => Ok(()),
            LeaseState::Ended => Err(Refusal::LeaseNotActive {
                state: self.state.describe().to_string(),
            }),
        }
    }

    /// A removal attempt failed; returns the attempt count.
    pub fn revoke_failed(&mut self, error: &str) -> u32 {
        self.revoke_attempts = self.revoke_attempts.saturating_add(1);
        self.last_error = Some(error.to_string());
        self.revoke_attempts
    }

    /// The membership is gone (or was never jitbot's to remove).
    pub fn finish(&mut self) -> Result<(), Refusal> {
        self.not_in(LeaseState::Revoking)?;
        self.state = LeaseState::Ended;
        self.last_error = None;
        Ok(())
    }

    pub fn is_due(&self, now: Instant) -> bool {
        self.state == LeaseState::Active && now >= self.expires_at
    }

    /// Time left, zero once due.
    pub fn remaining(&self, now: Instant) -> chrono::Duration {
        (self.expires_at - now).max(chrono::Duration::zero())
    }

    /// Adds time, bounded by the group's maximum total duration as the
    /// policy says *today* (a lowered limit binds live leases too) and by
    /// the bound fixed when the lease started.
    pub fn extend(&mut self, by: Span, policy: &GroupPolicy, now: Instant) -> Result<Instant, Refusal> {
        self.not_in(LeaseState::Active)?;
        if now >= self.expires_at {
            return Err(Refusal::LeaseNotActive {
                state: "expired".into(),
            });
        }
        if by > policy.max_duration {
            return Err(Refusal::DurationOverMax {
                group: policy.name.clone(),
                requested: by,
                max: policy.max_duration,
            });
        }
        let new_end = by.after(self.expires_at);
        let today = policy.max_total_duration.after(self.starts_at);
        if new_end > self.latest_end.min(today) {
            return Err(Refusal::OverTotalDuration {
                group: policy.name.clone(),
                max_total: policy.max_total_duration,
            });
        }
        self.expires_at = new_end;
        self.warned = false;
        Ok(new_end)
    }

    /// When the expiry warning is due, if the group has one and it has not gone out.
    pub fn warning_at(&self, policy: &GroupPolicy) -> Option<Instant> {
        let lead = policy.expiry_warning?;
        (!self.warned && self.state == LeaseState::Active).then(|| lead.before(self.expires_at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration, TimeZone, Utc};

    fn t0() -> Instant {
        Utc.with_ymd_and_hms(2026, 1, 1, 9, 0, 0).unwrap()
    }

    fn policy() -> GroupPolicy {
        let mut p = GroupPolicy::new("db-admins", "cn=db-admins,dc=example,dc=org");
        p.max_duration = Span::from_hours(4);
        p.max_total_duration = Span::from_hours(6);
        p.expiry_warning = Some(Span::from_mins(10));
        p
    }

    fn membership() -> Membership {
        Membership {
            group: GroupDn::new("cn=db-admins,dc=example,dc=org"),
            attribute: "member".into(),
            value: "uid=alice,dc=example,dc=org".into(),
            identity: None,
        }
    }

    fn lease() -> Lease {
        Lease::start(
            LeaseId::new("l1"),
            RequestId::new("r1"),
            &policy(),
            UserId::new("alice"),
            Span::from_hours(2),
            t0(),
        )
    }

    #[test]
    fn full_lifecycle() {
        let mut l = lease();
        assert_eq!(l.state, LeaseState::Granting);
        assert_eq!(l.expires_at, t0() + Duration::hours(2));
        l.record_preexisting(false, membership());
        assert!(l.owns_membership());
        l.activate().unwrap();
        assert!(!l.is_due(t0() + Duration::minutes(119)));
        assert!(l.is_due(t0() + Duration::hours(2)));
        l.begin_revoke(EndReason::Expired, t0() + Duration::hours(2))
            .unwrap();
        assert_eq!(l.state, LeaseState::Revoking);
        assert_eq!(l.revoke_failed("directory down"), 1);
        assert_eq!(l.revoke_failed("directory down"), 2);
        l.finish().unwrap();
        assert_eq!(l.state, LeaseState::Ended);
        assert_eq!(l.end_reason, Some(EndReason::Expired));
        assert_eq!(l.last_error, None);
    }

    #[test]
    fn illegal_transitions_are_refused() {
        let mut l = lease();
        assert!(l.finish().is_err(), "granting cannot end without revoking");
        l.activate().unwrap();
        assert!(l.activate().is_err());
        l.begin_revoke(EndReason::Released, t0()).unwrap();
        l.begin_revoke(EndReason::Expired, t0()).unwrap();
        assert_eq!(l.end_reason, Some(EndReason::Released), "first reason wins");
        assert!(l.extend(Span::from_hours(1), &policy(), t0()).is_err());
        l.finish().unwrap();
        assert!(l.begin_revoke(EndReason::Expired, t0()).is_err());
    }

    #[test]
    fn standing_membership_is_never_owned() {
        let mut l = lease();
        assert!(!l.owns_membership(), "unknown means jitbot never added it");
        l.record_preexisting(true, membership());
        l.record_preexisting(false, membership());
        assert_eq!(l.preexisting, Some(true), "the first observation sticks");
        assert!(!l.owns_membership());
    }

    #[test]
    fn extension_is_bounded_by_total() {
        let p = policy();
        let mut l = lease();
        l.activate().unwrap();
        assert_eq!(
            l.extend(Span::from_hours(3), &p, t0()).unwrap(),
            t0() + Duration::hours(5)
        );
        assert_eq!(
            l.extend(Span::from_hours(2), &p, t0()),
            Err(Refusal::OverTotalDuration {
                group: p.name.clone(),
                max_total: Span::from_hours(6)
            })
        );
        assert!(matches!(
            l.extend(Span::from_hours(5), &p, t0()),
            Err(Refusal::DurationOverMax { .. })
        ));
        assert!(l
            .extend(Span::from_hours(1), &p, t0() + Duration::hours(6))
            .is_err());
    }

    #[test]
    fn a_lowered_total_limit_binds_live_leases() {
        let mut p = policy();
        let mut l = lease();
        l.activate().unwrap();
        p.max_total_duration = Span::from_hours(3);
        assert_eq!(
            l.extend(Span::from_hours(2), &p, t0()),
            Err(Refusal::OverTotalDuration {
                group: p.name.clone(),
                max_total: Span::from_hours(3)
            })
        );
        assert_eq!(
            l.extend(Span::from_hours(1), &p, t0()).unwrap(),
            t0() + Duration::hours(3)
        );
    }

    #[test]
    fn an_add_someone_else_made_is_never_claimed() {
        let mut l = lease();
        l.record_preexisting(false, membership());
        assert!(l.owns_membership());
        l.added_by_someone_else();
        assert!(!l.owns_membership());
        assert_eq!(
            l.membership,
            Some(membership()),
            "what was written is still known"
        );
    }

    #[test]
    fn warning_time() {
        let p = policy();
        let mut l = lease();
        assert_eq!(l.warning_at(&p), None, "not while granting");
        l.activate().unwrap();
        assert_eq!(l.warning_at(&p), Some(t0() + Duration::minutes(110)));
        l.warned = true;
        assert_eq!(l.warning_at(&p), None);
    }
}
