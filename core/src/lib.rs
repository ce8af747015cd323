//! jitbot's pure core: domain types, policy, the request and lease state
//! machines and the chat command model.
//!
//! Nothing in this crate performs I/O or reads a clock: every function that
//! depends on time takes `now` as an argument. The compiler holds that line,
//! because this crate depends on no runtime, store, directory or chat crate.

#![forbid(unsafe_code)]

pub mod backoff;
pub mod command;
pub mod ids;
pub mod lease;
pub mod policy;
pub mod refusal;
pub mod request;
pub mod span;

pub use command::{Command, ParseError};
pub use ids::{GroupDn, GroupName, LeaseId, RequestId, UserId};
pub use lease::{EndReason, Lease, LeaseState, Membership};
pub use policy::{Actor, GroupPolicy, Principals};
pub use refusal::Refusal;
pub use request::{AccessRequest, ApprovalOutcome, RequestKind, RequestState};
pub use span::Span;

/// Instants are UTC wall-clock times; the caller supplies "now".
pub type Instant = chrono::DateTime<chrono::Utc>;
