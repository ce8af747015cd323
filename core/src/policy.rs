//! Policy: per group, who may request, who approves, for how long, and how.

use crate::{GroupDn, GroupName, Refusal, Span, UserId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// A set of people named directly or through directory groups.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principals {
    pub users: BTreeSet<UserId>,
    pub groups: BTreeSet<GroupDn>,
}

impl Principals {
    pub fn includes(&self, actor: &Actor) -> bool {
        self.users.contains(&actor.user) || self.groups.iter().any(|g| actor.groups.contains(g))
    }
    pub fn is_empty(&self) -> bool {
        self.users.is_empty() && self.groups.is_empty()
    }
}

/// Someone acting in jitbot: their directory account and the directory groups
/// they belong to (directly or nested), as resolved by the engine before it
/// calls the core. Only groups that some policy mentions need be listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Actor {
    pub user: UserId,
    pub groups: BTreeSet<GroupDn>,
}

impl Actor {
    pub fn user(user: impl Into<String>) -> Self {
        Actor {
            user: UserId::new(user),
            groups: BTreeSet::new(),
        }
    }
}

/// Where a group's approval cards go.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CardDelivery {
    /// The group's channel only (the default).
    #[default]
    Channel,
    /// A DM to each eligible approver; the channel only when no DM could be sent.
    Dm,
    /// The channel and a DM to each eligible approver.
    Both,
}

impl CardDelivery {
    /// Whether approvers get the card by DM.
    pub fn dms(self) -> bool {
        matches!(self, CardDelivery::Dm | CardDelivery::Both)
    }
}

/// The rules for one managed group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupPolicy {
    pub name: GroupName,
    pub dn: GroupDn,
    pub description: String,
    pub requesters: Principals,
    pub approvers: Principals,
    /// Distinct approvals needed before the grant (N of M).
    pub approvals_required: u32,
    pub default_duration: Span,
    /// Longest single grant.
    pub max_duration: Span,
    /// Longest total time a lease may last, extensions included.
    pub max_total_duration: Span,
    pub reason_required: bool,
    /// Zero standing privilege: the group must have no members at rest.
    pub zsp: bool,
    /// Remove members found in a ZSP group without a lease.
    pub remediate: bool,
    /// How long a request may wait for a decision before it expires.
    pub approval_timeout: Span,
    /// Everyone allowed to request gets it without approval.
    pub auto_approve: bool,
    /// Requesters in these sets get it without approval.
    pub auto_approve_for: Principals,
    /// The requester may approve their own request with a reason.
    pub break_glass: bool,
    /// A single deny ends the request; otherwise denies are recorded and the
    /// request waits for approvals or its timeout.
    pub deny_ends_request: bool,
    /// Extensions go through approval like a new request.
    pub extension_requires_approval: bool,
    /// How long before expiry the holder is warned.
    pub expiry_warning: Option<Span>,
    /// Where approval cards go: the channel, approvers' DMs, or both.
    pub approval_cards: CardDelivery,
}

impl GroupPolicy {
    /// A policy with safe defaults, for tests and the demo: one approval,
    /// 1h default, 8h max, reason required.
    pub fn new(name: &str, dn: &str) -> Self {
        GroupPolicy {
            name: GroupName::new(name),
            dn: GroupDn::new(dn),
            description: String::new(),
            requesters: Principals::default(),
            approvers: Principals::default(),
            approvals_required: 1,
            default_duration: Span::from_hours(1),
            max_duration: Span::from_hours(8),
            max_total_duration: Span::from_hours(24),
            reason_required: true,
            zsp: false,
            remediate: false,
            approval_timeout: Span::from_hours(1),
            auto_approve: false,
            auto_approve_for: Principals::default(),
            break_glass: false,
            deny_ends_request: true,
            extension_requires_approval: false,
            expiry_warning: None,
            approval_cards: CardDelivery::Channel,
        }
    }

    pub fn may_request(&self, actor: &Actor) -> bool {
        self.requesters.includes(actor)
    }

    pub fn may_approve(&self, actor: &Actor) -> bool {
        self.approvers.includes(actor)
    }

    pub fn needs_approval(&self, actor: &Actor) -> bool {
        !(self.auto_approve || self.auto_approve_for.includes(actor))
    }

    /// The duration a request gets: the one asked for, or the default;
    /// refused when over the maximum.
    pub fn duration_for(&self, requested: Option<Span>) -> Result<Span, Refusal> {
        let span = requested.unwrap_or(self.default_duration);
        if span > self.max_duration {
            return Err(Refusal::DurationOverMax {
                group: self.name.clone(),
                requested: span,
                max: self.max_duration,
            });
        }
        Ok(span)
    }
}

/// The whole policy: every managed group plus the admins, who may revoke any
/// lease and cancel any request.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    pub groups: Vec<GroupPolicy>,
    pub admins: Principals,
}

impl Policy {
    pub fn group(&self, name: &GroupName) -> Result<&GroupPolicy, Refusal> {
        self.groups
            .iter()
            .find(|g| &g.name == name)
            .ok_or_else(|| Refusal::UnknownGroup { group: name.clone() })
    }

    /// Every directory group some rule mentions: the engine resolves the
    /// actor's membership in exactly these.
    pub fn mentioned_groups(&self) -> BTreeSet<GroupDn> {
        let mut all = self.admins.groups.clone();
        for g in &self.groups {
            for p in [&g.requesters, &g.approvers, &g.auto_approve_for] {
                all.extend(p.groups.iter().cloned());
            }
        }
        all
    }
}
