//! Ports: the small traits the engine talks through. The LDAP backend, the
//! in-memory directory, Slack, Discord and the web console implement them.

use async_trait::async_trait;
pub use jitbot_core::Membership;
use jitbot_core::{GroupDn, UserId};
use std::collections::{BTreeMap, BTreeSet};
use thiserror::Error;

pub use crate::messages::{
    ApprovalCard, Audience, CardCopy, ChatRef, Contact, MessageRef, Notice, Recipients,
};

tokio::task_local! {
    /// Set while a directory call runs under a bound its caller enforces
    /// by dropping it ([`given_up_on_closes`]).
    static GIVEN_UP_CLOSES: ();
}

/// Runs `call` so that, if it is dropped before it finishes (its caller's
/// bound ran out), the directory closes the connection its request went
/// out on instead of reusing it: the kernel then stops trying to deliver
/// the request. Other drops (a command whose client hung up, a shutdown)
/// leave the shared connection to the calls still on it.
pub async fn given_up_on_closes<T>(call: impl std::future::Future<Output = T>) -> T {
    GIVEN_UP_CLOSES.scope((), call).await
}

/// Whether the current call runs under [`given_up_on_closes`].
pub fn closes_when_given_up() -> bool {
    GIVEN_UP_CLOSES.try_with(|_| ()).is_ok()
}

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

/// What adding a membership found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Added {
    /// The directory did not hold the value; now it does.
    Added,
    /// The directory already held the value when this add arrived (LDAP
    /// result 20): somebody else put it there. Only ever reported when the
    /// add was sent once, so it cannot be jitbot's own earlier attempt.
    AlreadyPresent,
}

/// One value of a group's membership attribute, as the ZSP monitor sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupMember {
    /// The value exactly as the group holds it: removing it undoes it.
    pub membership: Membership,
    pub kind: MemberKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberKind {
    /// A user jitbot can name.
    User(UserId),
    /// A group nested in this one, and the users it reaches.
    NestedGroup { reaches: Vec<UserId> },
    /// Active Directory: a user whose *primary group* this is
    /// (`primaryGroupID`). `member` does not list them and no member value
    /// can be removed: the user's primary group must be changed.
    PrimaryGroup(UserId),
    /// A value that is no user under the user base nor a group (a DN
    /// outside `user_base`, or a dangling one).
    Unknown,
}

/// Group membership in the directory.
///
/// The engine works on [`Membership`] values: it asks once which value
/// stands for a user in a group ([`Directory::membership_of`]), records it
/// on the lease, and from then on adds, checks and removes exactly that
/// value. Add and remove are idempotent: adding a present value or removing
/// an absent one succeeds.
#[async_trait]
pub trait Directory: Send + Sync + 'static {
    /// The user whose `attribute` equals `value` exactly; `None` when nobody
    /// matches, [`DirectoryError::Ambiguous`] when several do.
    async fn find_user(&self, attribute: &str, value: &str) -> Result<Option<UserId>, DirectoryError>;
    /// The value that stands for `user` in `group` (their DN, or their id
    /// for `memberUid`). [`DirectoryError::NoSuchUser`] when there is none.
    async fn membership_of(&self, group: &GroupDn, user: &UserId) -> Result<Membership, DirectoryError>;
    /// Whether the group holds exactly this value.
    async fn has_membership(&self, membership: &Membership) -> Result<bool, DirectoryError>;
    async fn add_membership(&self, membership: &Membership) -> Result<Added, DirectoryError>;
    async fn remove_membership(&self, membership: &Membership) -> Result<(), DirectoryError>;
    /// The value `membership` stands for in its group today: the recorded
    /// one, or the user's current DN where the directory rewrote it (a
    /// renamed or moved user; Active Directory always), as a removal would
    /// find it. `None` when nothing stands for it any more.
    async fn current_value(&self, membership: &Membership) -> Result<Option<String>, DirectoryError> {
        Ok(Some(membership.value.clone()))
    }
    /// [`Directory::remove_membership`], and a note for the audit when the
    /// value removed was not the one recorded (the user renamed, moved or
    /// deleted during the lease). The default removes and has nothing to say.
    async fn revoke_membership(&self, membership: &Membership) -> Result<Option<String>, DirectoryError> {
        self.remove_membership(membership).await.map(|()| None)
    }
    /// Every value of the group's membership attribute (placeholders excluded).
    async fn members(&self, group: &GroupDn) -> Result<Vec<GroupMember>, DirectoryError>;
    /// Of `among`, the groups `user` belongs to directly or through nesting.
    async fn groups_of(
        &self,
        user: &UserId,
        among: &BTreeSet<GroupDn>,
    ) -> Result<BTreeSet<GroupDn>, DirectoryError>;
    /// Cheap reachability probe for readiness.
    async fn ping(&self) -> Result<(), DirectoryError>;

    /// The values of `attributes` on `user`'s entry (one value each, the
    /// first the directory returns; an attribute the entry lacks is left out), so chat platforms can find
    /// the person (Slack by mail, Discord by a user id attribute). A
    /// directory that cannot tell returns none: the person is then reached
    /// only where they talked to jitbot.
    async fn user_attributes(
        &self,
        user: &UserId,
        attributes: &[String],
    ) -> Result<BTreeMap<String, String>, DirectoryError> {
        let _ = (user, attributes);
        Ok(BTreeMap::new())
    }

    /// Whether `user` is a direct member of `group` (tests, tools).
    async fn is_member(&self, group: &GroupDn, user: &UserId) -> Result<bool, DirectoryError> {
        match self.membership_of(group, user).await {
            Ok(m) => self.has_membership(&m).await,
            Err(DirectoryError::NoSuchUser(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }
    /// Adds `user` to `group` (tests, tools: the engine records the value first).
    async fn add_member(&self, group: &GroupDn, user: &UserId) -> Result<(), DirectoryError> {
        let m = self.membership_of(group, user).await?;
        self.add_membership(&m).await.map(|_| ())
    }
    /// Removes `user` from `group` (tests, tools: the engine removes the recorded value).
    /// A user the directory does not know has no value to remove: nothing
    /// is guessed (the engine removes the value recorded at grant time).
    async fn remove_member(&self, group: &GroupDn, user: &UserId) -> Result<(), DirectoryError> {
        match self.membership_of(group, user).await {
            Ok(m) => self.remove_membership(&m).await,
            Err(DirectoryError::NoSuchUser(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
    /// The group's direct user members, sorted (tests, tools).
    async fn list_members(&self, group: &GroupDn) -> Result<Vec<UserId>, DirectoryError> {
        let users: BTreeSet<UserId> = self
            .members(group)
            .await?
            .into_iter()
            .filter_map(|m| match m.kind {
                MemberKind::User(u) => Some(u),
                _ => None,
            })
            .collect();
        Ok(users.into_iter().collect())
    }
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

/// A post of an approval card that did not post every copy. The copies
/// that did go out were already handed to the [`CopyLog`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{error}")]
pub struct PostError {
    #[source]
    pub error: ChatError,
    /// Only some approvers' copies were put off (their DM rate limited or
    /// failing, an approver group not listed): the post is retried after the
    /// error's pause, but the platform's other deliveries are not paused.
    pub deferred: bool,
}

impl From<ChatError> for PostError {
    fn from(error: ChatError) -> Self {
        PostError {
            error,
            deferred: false,
        }
    }
}

/// Where a post of an approval card records each copy the moment it is
/// made (or its role changes), before the next call to the platform, so
/// that a crash or a failure part way never posts it again and every
/// decision reaches it.
#[async_trait]
pub trait CopyLog: Send + Sync {
    /// Records `copy`, replacing the record of the same message if any.
    async fn record(&self, copy: &MessageRef) -> Result<(), ChatError>;
}

/// Outgoing chat messages. Every platform adapter implements it; a fan-out
/// sends to all configured platforms.
#[async_trait]
pub trait Notifier: Send + Sync + 'static {
    /// Posts an approval card where approvers will see it; returns where it
    /// went so that it can be updated in place later (even after a restart).
    async fn post_approval(&self, card: &ApprovalCard) -> Result<Vec<MessageRef>, ChatError>;
    /// Posts the copies of an approval card that are not among `posted`
    /// (those earlier attempts recorded), handing each to `log` as soon as
    /// it is posted. By default, [`Notifier::post_approval`] when nothing
    /// was posted, else nothing.
    async fn post_missing_copies(
        &self,
        card: &ApprovalCard,
        posted: &[MessageRef],
        log: &dyn CopyLog,
    ) -> Result<(), PostError> {
        if posted.is_empty() {
            for m in self.post_approval(card).await? {
                log.record(&m).await?;
            }
        }
        Ok(())
    }
    /// Rewrites a posted approval card (new approvals, decision, buttons removed).
    async fn update_approval(&self, at: &MessageRef, card: &ApprovalCard) -> Result<(), ChatError>;
    /// Sends a notice to a person, a group's channel or the alert channel.
    async fn send(&self, notice: &Notice) -> Result<(), ChatError>;
    /// Sends a notice for a person ([`Audience::User`]) with what the
    /// directory says about them, so a platform can find them by DM even
    /// if they never talked to jitbot there. By default, [`Notifier::send`].
    async fn send_to(&self, notice: &Notice, contact: &Contact) -> Result<(), ChatError> {
        let _ = contact;
        self.send(notice).await
    }
    /// The directory attributes this platform finds people by (for
    /// [`Contact::attributes`]); none by default.
    fn contact_attributes(&self) -> Vec<String> {
        Vec::new()
    }
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
