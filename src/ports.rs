//! Ports: the small traits the engine talks through. The LDAP backend, the
//! in-memory directory, Slack, Discord and the web console implement them.

use async_trait::async_trait;
use jitbot_core::{GroupDn, UserId};
use std::collections::BTreeSet;
use thiserror::Error;

pub use crate::chat::view::{ApprovalCard, Audience, ChatRef, MessageRef, Notice};

/// Why a directory operation failed, worded for an operator.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DirectoryError {
    /// The directory could not be reached or timed out; worth retrying.
    #[error("directory unavailable: {0}")]
    Unavailable(String),
    #[error("group {0} does not exist in the directory; check its `dn` in the config")]
    NoSuchGroup(String),
    #[error("user {0} was not found in the directory")]
    NoSuchUser(String),
    #[error("{0} matches more than one directory entry; jitbot never guesses")]
    Ambiguous(String),
    /// The server refused the operation (rights, schema, bad credentials).
    #[error("directory refused: {0}")]
    Refused(String),
}

impl DirectoryError {
    /// Transient failures are retried; the others need a person.
    pub fn is_transient(&self) -> bool {
        matches!(self, DirectoryError::Unavailable(_))
    }
}

/// Group membership in the directory. Add and remove are idempotent: adding a
/// present member or removing an absent one succeeds.
#[async_trait]
pub trait Directory: Send + Sync + 'static {
    /// The user whose `attribute` equals `value` exactly; `None` when nobody
    /// matches, [`DirectoryError::Ambiguous`] when several do.
    async fn find_user(&self, attribute: &str, value: &str) -> Result<Option<UserId>, DirectoryError>;
    /// Whether `user` is a direct member of `group`.
    async fn is_member(&self, group: &GroupDn, user: &UserId) -> Result<bool, DirectoryError>;
    async fn add_member(&self, group: &GroupDn, user: &UserId) -> Result<(), DirectoryError>;
    async fn remove_member(&self, group: &GroupDn, user: &UserId) -> Result<(), DirectoryError>;
    /// The group's members as user ids (placeholders excluded).
    async fn list_members(&self, group: &GroupDn) -> Result<Vec<UserId>, DirectoryError>;
    /// Of `among`, the groups `user` belongs to directly or through nesting.
    async fn groups_of(
        &self,
        user: &UserId,
        among: &BTreeSet<GroupDn>,
    ) -> Result<BTreeSet<GroupDn>, DirectoryError>;
    /// Cheap reachability probe for readiness.
    async fn ping(&self) -> Result<(), DirectoryError>;
}

/// Why a chat call failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ChatError {
    /// Rate limited: try again after this many seconds.
    #[error("rate limited; retry after {0}s")]
    RateLimited(u64),
    #[error("chat platform unavailable: {0}")]
    Unavailable(String),
    /// The platform refused the call for good (bad channel, missing scope).
    #[error("chat platform refused: {0}")]
    Refused(String),
}

/// Outgoing chat messages. Every platform adapter implements it; a fan-out
/// sends to all configured platforms.
#[async_trait]
pub trait Notifier: Send + Sync + 'static {
    /// Posts an approval card where approvers will see it; returns where it
    /// went so that it can be updated in place later (even after a restart).
    async fn post_approval(&self, card: &ApprovalCard) -> Result<Vec<MessageRef>, ChatError>;
    /// Rewrites a posted approval card (new approvals, decision, buttons removed).
    async fn update_approval(&self, at: &MessageRef, card: &ApprovalCard) -> Result<(), ChatError>;
    /// Sends a notice to a person, a group's channel or the alert channel.
    async fn send(&self, notice: &Notice) -> Result<(), ChatError>;
    /// Whether the platform answers with jitbot's credentials (for `/readyz`).
    async fn ready(&self) -> Result<(), ChatError> {
        Ok(())
    }
    /// The platforms behind this notifier, by name (`slack`, `discord`,
    /// `web`), for a caller that delivers to each on its own: the outbox
    /// keeps attempts and due times per platform. A notifier for one
    /// platform returns none and is used as a whole.
    fn platforms(&self) -> Vec<(String, std::sync::Arc<dyn Notifier>)> {
        Vec::new()
    }
}
