//! A directory that passes every call on to another one, for tests that
//! change one or two calls (hold an add on the wire, fail a check, add a
//! member meanwhile): implement [`Hooks`] with only the calls that differ
//! and wrap the value in [`Forward`], which is the [`Directory`].

use async_trait::async_trait;
use jitbot::ports::{Added, Directory, DirectoryError, GroupMember};
use jitbot_core::{GroupDn, Membership, UserId};
use std::collections::{BTreeMap, BTreeSet};

/// The calls of [`Directory`], each passed on to [`Hooks::inner`] unless
/// the implementation says otherwise.
#[async_trait]
pub trait Hooks: Send + Sync + 'static {
    /// Where every call not overridden goes.
    fn inner(&self) -> &dyn Directory;

    async fn find_user(&self, attribute: &str, value: &str) -> Result<Option<UserId>, DirectoryError> {
        self.inner().find_user(attribute, value).await
    }
    async fn membership_of(&self, group: &GroupDn, user: &UserId) -> Result<Membership, DirectoryError> {
        self.inner().membership_of(group, user).await
    }
    async fn has_membership(&self, m: &Membership) -> Result<bool, DirectoryError> {
        self.inner().has_membership(m).await
    }
    async fn add_membership(&self, m: &Membership) -> Result<Added, DirectoryError> {
        self.inner().add_membership(m).await
    }
    async fn remove_membership(&self, m: &Membership) -> Result<(), DirectoryError> {
        self.inner().remove_membership(m).await
    }
    async fn current_value(&self, m: &Membership) -> Result<Option<String>, DirectoryError> {
        self.inner().current_value(m).await
    }
    async fn members(&self, group: &GroupDn) -> Result<Vec<GroupMember>, DirectoryError> {
        self.inner().members(group).await
    }
    async fn groups_of(
        &self,
        user: &UserId,
        among: &BTreeSet<GroupDn>,
    ) -> Result<BTreeSet<GroupDn>, DirectoryError> {
        self.inner().groups_of(user, among).await
    }
    async fn ping(&self) -> Result<(), DirectoryError> {
        self.inner().ping().await
    }
    async fn user_attributes(
        &self,
        user: &UserId,
        attributes: &[String],
    ) -> Result<BTreeMap<String, String>, DirectoryError> {
        self.inner().user_attributes(user, attributes).await
    }
}

/// The [`Directory`] made of [`Hooks`] `H` (whose fields the test reads
/// through `Deref`).
pub struct Forward<H>(pub H);

impl<H> std::ops::Deref for Forward<H> {
    type Target = H;
    fn deref(&self) -> &H {
        &self.0
    }
}

#[async_trait]
impl<H: Hooks> Directory for Forward<H> {
    async fn find_user(&self, attribute: &str, value: &str) -> Result<Option<UserId>, DirectoryError> {
        self.0.find_user(attribute, value).await
    }
    async fn membership_of(&self, group: &GroupDn, user: &UserId) -> Result<Membership, DirectoryError> {
        self.0.membership_of(group, user).await
    }
    async fn has_membership(&self, m: &Membership) -> Result<bool, DirectoryError> {
        self.0.has_membership(m).await
    }
    async fn add_membership(&self, m: &Membership) -> Result<Added, DirectoryError> {
        self.0.add_membership(m).await
    }
    async fn remove_membership(&self, m: &Membership) -> Result<(), DirectoryError> {
        self.0.remove_membership(m).await
    }
    async fn current_value(&self, m: &Membership) -> Result<Option<String>, DirectoryError> {
        self.0.current_value(m).await
    }
    async fn members(&self, group: &GroupDn) -> Result<Vec<GroupMember>, DirectoryError> {
        self.0.members(group).await
    }
    async fn groups_of(
        &self,
        user: &UserId,
        among: &BTreeSet<GroupDn>,
    ) -> Result<BTreeSet<GroupDn>, DirectoryError> {
        self.0.groups_of(user, among).await
    }
    async fn ping(&self) -> Result<(), DirectoryError> {
        self.0.ping().await
    }
    async fn user_attributes(
        &self,
        user: &UserId,
        attributes: &[String],
    ) -> Result<BTreeMap<String, String>, DirectoryError> {
        self.0.user_attributes(user, attributes).await
    }
}
