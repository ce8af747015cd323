//! The platform-neutral message model, beside the ports: where a person
//! talked to jitbot ([`ChatRef`]), a posted message ([`MessageRef`]) and
//! which copy of a card it is ([`CardCopy`]), who a notice is for
//! ([`Audience`]), the notice itself ([`Notice`]) and the approval card
//! ([`ApprovalCard`]). The engine builds them, the store keeps them, and
//! each chat adapter renders them in its own format (Block Kit, Discord
//! components, HTML); nothing here knows a platform.

use jitbot_core::command::Action;
use jitbot_core::{GroupName, RequestId, UserId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Where a person talked to jitbot from, so that answers and DMs find them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatRef {
    /// `slack`, `discord` or `web`.
    pub platform: String,
    /// The platform's user id.
    pub user: String,
    /// The channel the command came from, if any.
    pub channel: Option<String>,
}

/// A posted message that jitbot may edit later.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageRef {
    pub platform: String,
    pub channel: String,
    /// Slack's `ts`, Discord's message id, the console's message number.
    pub id: String,
    /// Which copy of an approval card this is (unknown for messages
    /// recorded before copies said so).
    #[serde(default, skip_serializing_if = "CardCopy::is_unknown")]
    pub copy: CardCopy,
}

impl MessageRef {
    /// The same posted message (whatever its role says).
    pub fn same_message(&self, other: &MessageRef) -> bool {
        self.platform == other.platform && self.channel == other.channel && self.id == other.id
    }
}

/// What one copy of an approval card is, stored with it so that a retry
/// knows which copies exist without asking the platform, and updates keep
/// what the copy listed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CardCopy {
    /// Recorded before copies said what they are (or not a card copy).
    #[default]
    Unknown,
    /// The copy in the group's channel, with the approvers it lists.
    Channel {
        /// Approvers no DM can reach.
        #[serde(default)]
        unreachable: Vec<UserId>,
        /// Approvers whose DM copy is still to be sent (rate limit, outage).
        #[serde(default)]
        pending: Vec<UserId>,
        /// Approver groups whose members could not be listed yet.
        #[serde(default)]
        unlisted: Vec<String>,
    },
    /// The copy in a DM channel, for these approvers (usually one; more
    /// when several directory people are one chat account).
    Dm { approvers: Vec<UserId> },
}

impl CardCopy {
    pub fn is_unknown(&self) -> bool {
        *self == CardCopy::Unknown
    }
}

/// Who a notice is for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Audience {
    /// A person, by directory id, reached where they last talked to jitbot.
    User { user: UserId, chat: Option<ChatRef> },
    /// The channel configured for a group (falls back to the default channel).
    Group(GroupName),
    /// The security alert channel.
    Alert,
}

/// A one-off message, possibly with buttons.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    pub to: Audience,
    /// Plain words, no platform markup or emoji: the platform adds its
    /// decoration for the [`Tone`].
    pub text: String,
    #[serde(default, with = "action_ids")]
    pub buttons: Vec<Action>,
    /// What kind of news this is (absent in notices queued before tones).
    #[serde(default, skip_serializing_if = "Tone::is_plain")]
    pub tone: Tone,
}

/// What kind of news a notice is, so that each platform marks it its own
/// way (`chat::render` chooses: Slack an emoji, others nothing) while the
/// engine words only the text.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tone {
    /// Nothing to mark.
    #[default]
    Plain,
    /// Needs a person now: break-glass, ZSP drift, an audit chain that
    /// does not verify.
    Alarm,
    /// Something jitbot cannot finish on its own: a removal that keeps
    /// failing, a group it cannot check.
    Warning,
    /// Access was given.
    Granted,
    /// Access ended, or the audit chain was locked with its key.
    Locked,
    /// An audit anchor to keep outside jitbot.
    Anchor,
}

impl Tone {
    pub fn is_plain(&self) -> bool {
        *self == Tone::Plain
    }
}

/// Everything an approval message shows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalCard {
    pub request: RequestId,
    pub group: GroupName,
    pub requester: UserId,
    pub duration: String,
    pub reason: String,
    /// True for an extension of an existing lease.
    pub extension: bool,
    /// Approvals so far and how many are needed.
    pub approvals: Vec<UserId>,
    pub needed: u32,
    /// `pending`, `approved`, `denied`, ... with who decided and when, once decided.
    pub status: String,
    /// Approve and Deny buttons are shown only while this is true.
    pub open: bool,
    /// Where the card goes when it is first posted.
    #[serde(default)]
    pub recipients: Recipients,
}

/// A person jitbot may have to find on a chat platform: their directory id
/// and the directory attributes the platforms look them up by (Slack the
/// mail attribute, Discord `discord.user_attribute`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contact {
    pub user: UserId,
    /// Attribute name (as configured) → value; absent when the directory has none.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

/// Who gets an approval card: the group's channel, approvers by DM, or both.
/// Updates go to wherever the first post went (the stored message refs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipients {
    /// Post in the group's channel. When false, the card still goes to the
    /// channel if no DM could be sent.
    pub channel: bool,
    /// The eligible approvers to DM (after nested-group expansion, never the
    /// requester).
    #[serde(default)]
    pub dm: Vec<Contact>,
    /// Approvers the platform could not reach by DM; the channel card lists
    /// them. Filled in by the adapter that tried.
    #[serde(default)]
    pub unreachable: Vec<UserId>,
    /// Approvers whose DM copy could not be sent yet (rate limit, outage);
    /// the channel card lists them until it is. Filled in by the adapter.
    #[serde(default)]
    pub pending: Vec<UserId>,
    /// Approver groups whose members could not be listed (a directory
    /// failure): the post is retried, and the channel card names them.
    #[serde(default)]
    pub unlisted: Vec<String>,
}

impl Default for Recipients {
    /// The group's channel only.
    fn default() -> Self {
        Recipients {
            channel: true,
            dm: Vec::new(),
            unreachable: Vec::new(),
            pending: Vec::new(),
            unlisted: Vec::new(),
        }
    }
}

impl ApprovalCard {
    pub fn buttons(&self) -> Vec<Action> {
        if self.open {
            vec![
                Action::Approve(self.request.to_string()),
                Action::Deny(self.request.to_string()),
            ]
        } else {
            Vec::new()
        }
    }
}

mod action_ids {
    use jitbot_core::command::Action;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(actions: &[Action], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(actions.iter().map(Action::id))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Action>, D::Error> {
        let ids = Vec::<String>::deserialize(d)?;
        ids.iter()
            .map(|id| Action::parse(id).map_err(serde::de::Error::custom))
            .collect()
    }
}
