//! The audit vocabulary: every action the engine records, and builders that
//! fill a record's subject fields from the lease or request it is about, so
//! that no transition writes an audit line field by field.

use crate::store::AuditDraft;
use jitbot_core::{AccessRequest, Lease};

/// What happened. The string forms are the stable names in the audit log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuditAction {
    RequestOpened,
    RequestAutoApproved,
    RequestBreakGlass,
    RequestApproval,
    RequestDenied,
    RequestDissent,
    RequestCancelled,
    RequestTimedOut,
    RequestBreakGlassReviewed,
    LeaseGranting,
    LeaseStandingMembership,
    LeaseAddedBySomeoneElse,
    LeaseAddAmbiguous,
    LeaseGranted,
    LeaseGrantFailed,
    LeaseGrantRetry,
    LeaseGrantTooLate,
    LeaseExtended,
    LeaseRevoking,
    LeaseRevokeFailed,
    LeaseEnded,
    LeaseMembershipMissing,
    LeaseMembershipRecorded,
    LeaseRechecked,
    LeaseLateAddFound,
    LeaseLateAddRemoved,
    ZspDrift,
    ZspRemediating,
    ZspCheckFailed,
}

impl AuditAction {
    pub fn as_str(self) -> &'static str {
        use AuditAction::*;
        match self {
            RequestOpened => "request.opened",
            RequestAutoApproved => "request.auto_approved",
            RequestBreakGlass => "request.break_glass",
            RequestApproval => "request.approval",
            RequestDenied => "request.denied",
            RequestDissent => "request.dissent",
            RequestCancelled => "request.cancelled",
            RequestTimedOut => "request.timed_out",
            RequestBreakGlassReviewed => "request.break_glass_reviewed",
            LeaseGranting => "lease.granting",
            LeaseStandingMembership => "lease.standing_membership",
            LeaseAddedBySomeoneElse => "lease.added_by_someone_else",
            LeaseAddAmbiguous => "lease.add_ambiguous",
            LeaseGranted => "lease.granted",
            LeaseGrantFailed => "lease.grant_failed",
            LeaseGrantRetry => "lease.grant_retry",
            LeaseGrantTooLate => "lease.grant_too_late",
            LeaseExtended => "lease.extended",
            LeaseRevoking => "lease.revoking",
            LeaseRevokeFailed => "lease.revoke_failed",
            LeaseEnded => "lease.ended",
            LeaseMembershipMissing => "lease.membership_missing",
            LeaseMembershipRecorded => "lease.membership_recorded",
            LeaseRechecked => "lease.rechecked",
            LeaseLateAddFound => "lease.late_add_found",
            LeaseLateAddRemoved => "lease.late_add_removed",
            ZspDrift => "zsp.drift",
            ZspRemediating => "zsp.remediating",
            ZspCheckFailed => "zsp.check_failed",
        }
    }
}

/// A record about `lease`: its id, group and holder filled in.
#[must_use]
pub fn about_lease(actor: &str, action: AuditAction, lease: &Lease) -> AuditDraft {
    AuditDraft {
        actor: actor.to_string(),
        action: action.as_str().to_string(),
        request: None,
        lease: Some(lease.id.to_string()),
        group: Some(lease.group.to_string()),
        user: Some(lease.user.to_string()),
        detail: String::new(),
    }
}

/// A record about `request`: its id, group and requester filled in.
#[must_use]
pub fn about_request(actor: &str, action: AuditAction, request: &AccessRequest) -> AuditDraft {
    AuditDraft {
        actor: actor.to_string(),
        action: action.as_str().to_string(),
        request: Some(request.id.to_string()),
        lease: None,
        group: Some(request.group.to_string()),
        user: Some(request.requester.to_string()),
        detail: String::new(),
    }
}

/// A record with no lease or request (ZSP findings).
#[must_use]
pub fn about(actor: &str, action: AuditAction) -> AuditDraft {
    AuditDraft {
        actor: actor.to_string(),
        action: action.as_str().to_string(),
        ..AuditDraft::default()
    }
}
