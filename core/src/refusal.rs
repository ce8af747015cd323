//! `Refusal`: every reason the core turns a command down, worded for the
//! person who typed it, with what to do next.

use crate::{GroupName, Span};
use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Refusal {
    #[error("there is no group called `{group}`; `/jit groups` lists the ones you may request")]
    UnknownGroup { group: GroupName },
    #[error("you may not request `{group}`; ask its owners to add you to its requesters")]
    NotAllowedToRequest { group: GroupName },
    #[error("you are not an approver for `{group}`")]
    NotAnApprover { group: GroupName },
    #[error("you cannot approve your own request; another approver must decide it")]
    SelfApproval,
    #[error("{requested} is longer than the {max} that `{group}` allows; ask for {max} or less")]
    DurationOverMax {
        group: GroupName,
        requested: Span,
        max: Span,
    },
    #[error("`{group}` needs a reason: add a few words saying why you need it")]
    ReasonRequired { group: GroupName },
    #[error("this request is already {state}; nothing was changed")]
    NotPending { state: String },
    #[error("this request expired before it was decided; ask again with `/jit request`")]
    DecisionWindowClosed,
    #[error("this lease is {state}, not active; nothing was changed")]
    LeaseNotActive { state: String },
    #[error("only the requester, an approver of `{group}` or an admin may do that")]
    NotYourLease { group: GroupName },
    #[error("extending would take the lease past the {max_total} total that `{group}` allows")]
    OverTotalDuration { group: GroupName, max_total: Span },
    #[error("`{group}` does not allow break-glass; wait for an approver")]
    BreakGlassNotAllowed { group: GroupName },
    #[error("break-glass needs a reason; it is shown to every approver")]
    BreakGlassReasonRequired,
    #[error("you already have {count} requests waiting for a decision ({requests}), the most jitbot takes from one person; withdraw one with `/jit cancel <request>` (`/jit list` shows them) or wait for an approver")]
    TooManyPending { count: usize, requests: String },
    #[error("you already have request {request} pending for `{group}`")]
    AlreadyPending { group: GroupName, request: String },
    #[error("shortening must give a duration shorter than the {requested} requested")]
    NotShorter { requested: Span },
    #[error("this request needs no acknowledgement")]
    NothingToAcknowledge,
    #[error("you are not an admin")]
    NotAnAdmin,
}
