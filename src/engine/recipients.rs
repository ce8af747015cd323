//! Who an approval card and a person's notices reach: the eligible approvers
//! of a group (nested groups expanded, never the requester) and the
//! directory attributes the chat platforms find people by.

use super::Engine;
use crate::messages::{ApprovalCard, Contact};
use crate::ports::MemberKind;
use crate::store::RequestRecord;
use jitbot_core::policy::{CardDelivery, GroupPolicy};
use jitbot_core::{GroupDn, GroupName, UserId};
use std::collections::BTreeSet;

impl Engine {
    /// The approval card of a request as it is first posted: [`Engine::card`]
    /// plus where it goes. With `approval_cards = "dm"` or `"both"`, every
    /// eligible approver is listed with the `attributes` the platforms need
    /// to find them. An approver group the directory cannot list now is
    /// named in [`crate::messages::Recipients::unlisted`]: the post then fails
    /// for later once the others have their copies, so its members are not
    /// dropped.
    pub async fn card_to_post(&self, rec: &RequestRecord, attributes: &[String]) -> ApprovalCard {
        let mut card = self.card(rec);
        let Ok(policy) = self.group(&rec.request.group) else {
            return card;
        };
        if !card.open || !policy.approval_cards.dms() {
            return card;
        }
        card.recipients.channel = policy.approval_cards == CardDelivery::Both;
        let (users, unlisted) = self.approvers_listed(policy, &rec.request.requester).await;
        for user in users {
            card.recipients.dm.push(self.contact(&user, attributes).await);
        }
        card.recipients.unlisted = unlisted.iter().map(|g| g.to_string()).collect();
        card
    }

    /// Whether `group`'s approval cards go by DM only (`approval_cards = "dm"`).
    pub fn cards_by_dm_only(&self, group: &GroupName) -> bool {
        self.group(group)
            .is_ok_and(|p| p.approval_cards == CardDelivery::Dm)
    }

    /// Everyone who may approve in `policy`, except `requester`: the named
    /// approvers and the users reached through the approver groups, however
    /// deeply nested; sorted, each once.
    /// Approver groups the directory cannot list now are left out (logged).
    pub async fn eligible_approvers(&self, policy: &GroupPolicy, requester: &UserId) -> Vec<UserId> {
        self.approvers_listed(policy, requester).await.0
    }

    /// [`Engine::eligible_approvers`], and the approver groups the directory
    /// could not list.
    async fn approvers_listed(
        &self,
        policy: &GroupPolicy,
        requester: &UserId,
    ) -> (Vec<UserId>, Vec<GroupDn>) {
        let mut unlisted = Vec::new();
        let mut users: BTreeSet<UserId> = policy.approvers.users.clone();
        for group in &policy.approvers.groups {
            match self.inner.directory.members(group).await {
                Ok(members) => {
                    for m in members {
                        match m.kind {
                            MemberKind::User(u) => {
                                users.insert(u);
                            }
                            MemberKind::NestedGroup { reaches } => users.extend(reaches),
                            // As AD's in-chain rule, which approval uses, does not count them.
                            MemberKind::PrimaryGroup(_) | MemberKind::Unknown => {}
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(
                        group = %policy.name,
                        approvers = %group,
                        error = %e,
                        "cannot list an approver group; its members get their DM of the approval card when the directory answers"
                    );
                    unlisted.push(group.clone());
                }
            }
        }
        users.remove(requester);
        (users.into_iter().collect(), unlisted)
    }

    /// `user` with the values of `attributes` the directory holds for them.
    /// A lookup failure gives a contact without attributes (logged), whom a
    /// platform can then reach only where they talked to jitbot.
    pub async fn contact(&self, user: &UserId, attributes: &[String]) -> Contact {
        let attributes = if attributes.is_empty() {
            Default::default()
        } else {
            match self.inner.directory.user_attributes(user, attributes).await {
                Ok(found) => found,
                Err(e) => {
                    tracing::warn!(%user, error = %e, "cannot read the directory attributes chat platforms find this person by");
                    Default::default()
                }
            }
        };
        Contact {
            user: user.clone(),
            attributes,
        }
    }
}
