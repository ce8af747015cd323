//! The ZSP monitor: every value in a zero-standing-privilege group that no
//! live lease accounts for is drift — a user, a nested group (and each user
//! it reaches), or a DN jitbot cannot name. Drift is alerted once per
//! appearance and audited; where the group sets `remediate`, each *direct*
//! value is removed through a remediation lease: written durably (state
//! `Revoking`, with its `Revoke` timer) before the removal, and retried and
//! alerted like any revocation. Users reached only through nesting are
//! reported, and removed by removing the nested group.
//!
//! Each group is checked on its own: one missing or unreadable group is
//! reported and the others are still checked.

use super::audit::{about, about_lease, AuditAction};
use super::{notice, toned, Engine, EngineError, ENGINE_ACTOR};
use crate::messages::{Audience, Tone};
use crate::ports::{GroupMember, MemberKind};
use crate::store::{LeaseRecord, TimerKind};
use jitbot_core::policy::GroupPolicy;
use jitbot_core::{GroupName, Lease, LeaseId, LeaseState, UserId};
use std::collections::BTreeSet;

/// A member found in a ZSP group without a lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Drift {
    pub group: GroupName,
    /// The user, or for a nested group or an unknown DN, the value itself.
    pub user: UserId,
    /// Set when the user is a member only through this nested group.
    pub via: Option<String>,
    /// A remediation lease was written for it (the removal follows).
    pub remediated: bool,
}

impl Engine {
    /// Checks every ZSP group once, each on its own.
    pub async fn check_zsp(&self) -> Result<Vec<Drift>, EngineError> {
        let mut found = Vec::new();
        let mut seen_now = BTreeSet::new();
        let mut remediations = Vec::new();
        let groups: Vec<GroupPolicy> = self
            .inner
            .policy
            .groups
            .iter()
            .filter(|g| g.zsp)
            .cloned()
            .collect();
        for policy in &groups {
            match self.check_group(policy, &mut seen_now, &mut remediations).await {
                Ok(drift) => found.extend(drift),
                Err(e) => self.check_failed(policy, &e, &mut seen_now).await?,
            }
        }
        self.check_granted_memberships(&mut seen_now).await?;
        *self.inner.zsp_seen.lock().unwrap_or_else(|p| p.into_inner()) = seen_now;
        self.changed();
        for id in remediations {
            self.drive(&id).await?;
        }
        Ok(found)
    }

    async fn check_group(
        &self,
        policy: &GroupPolicy,
        seen_now: &mut BTreeSet<(String, String)>,
        remediations: &mut Vec<LeaseId>,
    ) -> Result<Vec<Drift>, EngineError> {
        let members = self.inner.directory.members(&policy.dn).await?;
        let leased: BTreeSet<UserId> = self
            .inner
            .store
            .live_leases_in(&policy.name)?
            .into_iter()
            .map(|(user, _)| user)
            .collect();
        let mut found = Vec::new();
        for member in members {
            let (who, reached) = match &member.kind {
                MemberKind::User(user) | MemberKind::PrimaryGroup(user) => (user.clone(), vec![]),
                MemberKind::NestedGroup { reaches } => {
                    (UserId::new(member.membership.value.as_str()), reaches.clone())
                }
                MemberKind::Unknown => (UserId::new(member.membership.value.as_str()), vec![]),
            };
            if leased.contains(&who) {
                continue;
            }
            // The member list is older than the lease set: a lease that
            // ended in between left its holder in the list with the
            // membership already removed. Ask again, then look for a lease
            // that started since (its slot is taken before its add).
            if !self.inner.directory.has_membership(&member.membership).await? {
                continue;
            }
            if self.inner.store.live_lease(&policy.name, &who)?.is_some() {
                continue;
            }
            // The reads above are of the local index, which a replica's
            // mirror reload empties for a while: drift is only what the
            // store, current under the writer lock, confirms.
            if !self.confirmed_unleased(policy, &who).await? {
                continue;
            }
            // A primary group is no member value: nothing jitbot can remove.
            let removable = !matches!(member.kind, MemberKind::PrimaryGroup(_));
            let remediated =
                policy.remediate && removable && self.remediate(policy, &who, &member, remediations).await?;
            self.report(policy, &who, None, &member, remediated, seen_now)
                .await?;
            found.push(Drift {
                group: policy.name.clone(),
                user: who.clone(),
                via: None,
                remediated,
            });
            for user in reached {
                self.report(
                    policy,
                    &user,
                    Some(&member.membership.value),
                    &member,
                    remediated,
                    seen_now,
                )
                .await?;
                found.push(Drift {
                    group: policy.name.clone(),
                    user,
                    via: Some(member.membership.value.clone()),
                    remediated: false,
                });
            }
        }
        Ok(found)
    }

    /// Whether `who` still has no live lease in `policy`'s group, read under
    /// the writer lock (with PostgreSQL: on the mirror caught up with every
    /// replica, never in the middle of its reload).
    async fn confirmed_unleased(&self, policy: &GroupPolicy, who: &UserId) -> Result<bool, EngineError> {
        self.inner
            .store
            .update(self.now(), |tx| {
                Ok::<_, EngineError>(tx.live_lease(&policy.name, who)?.is_none())
            })
            .await
    }

    /// Writes a remediation lease for a direct value (the removal runs
    /// after the whole pass, through the executor). False when a lease for
    /// the same (group, user) appeared meanwhile.
    async fn remediate(
        &self,
        policy: &GroupPolicy,
        who: &UserId,
        member: &GroupMember,
        remediations: &mut Vec<LeaseId>,
    ) -> Result<bool, EngineError> {
        let id = self
            .inner
            .store
            .update(self.now(), |tx| {
                if tx.live_lease(&policy.name, who)?.is_some() {
                    return Ok(None);
                }
                let id = LeaseId::new(tx.new_id("z")?);
                let lease = Lease::remediation(
                    id.clone(),
                    policy.name.clone(),
                    who.clone(),
                    member.membership.clone(),
                    tx.now(),
                );
                tx.set_timer(TimerKind::Revoke, id.as_str(), tx.now());
                tx.audit(
                    about_lease(ENGINE_ACTOR, AuditAction::ZspRemediating, &lease).detail(format!(
                        "removing {} from {}",
                        member.membership.value, member.membership.group
                    )),
                );
                tx.put_lease(LeaseRecord { lease, origin: None });
                Ok::<_, EngineError>(Some(id))
            })
            .await?;
        Ok(match id {
            Some(id) => {
                remediations.push(id);
                true
            }
            None => false,
        })
    }

    /// Alerts and audits a drift once per appearance.
    async fn report(
        &self,
        policy: &GroupPolicy,
        who: &UserId,
        via: Option<&str>,
        member: &GroupMember,
        remediated: bool,
        seen_now: &mut BTreeSet<(String, String)>,
    ) -> Result<(), EngineError> {
        crate::metrics::zsp_drift();
        let key = (policy.name.to_string(), who.folded());
        let new = !self.zsp_seen().contains(&key);
        seen_now.insert(key);
        if !new {
            return Ok(());
        }
        let what = match (&member.kind, via) {
            (_, Some(group)) => format!(
                "{who} is a member of `{}` through the nested group {group}",
                policy.name
            ),
            (MemberKind::NestedGroup { .. }, None) => {
                format!("the group {who} is nested in `{}`", policy.name)
            }
            (MemberKind::Unknown, None) => {
                format!("{who} (no user jitbot knows) is a member of `{}`", policy.name)
            }
            (MemberKind::User(_), None) => format!("{who} is a member of `{}`", policy.name),
            (MemberKind::PrimaryGroup(_), None) => format!(
                "{who} is a member of `{}` as their primary group (primaryGroupID), which the group's \
                 `member` does not list",
                policy.name
            ),
        };
        let action = if matches!(member.kind, MemberKind::PrimaryGroup(_)) {
            "; jitbot cannot remove a primary group membership: set the user's primary group back to \
             another group (for example Domain Users) in Active Directory."
        } else if remediated && via.is_none() {
            "; jitbot is removing it."
        } else if via.is_some() {
            "; removing the nested group removes it."
        } else {
            "; set remediate = true to have jitbot remove such members."
        };
        self.inner
            .store
            .update(self.now(), |tx| {
                tx.audit(
                    about(ENGINE_ACTOR, AuditAction::ZspDrift)
                        .group(&policy.name)
                        .user(who)
                        .detail(format!("{what} without a jitbot lease")),
                );
                tx.outbox(toned(
                    Tone::Alarm,
                    Audience::Alert,
                    format!("ZSP drift: {what} without a jitbot lease{action}"),
                    vec![],
                ));
                Ok::<_, EngineError>(())
            })
            .await
    }

    /// A group that could not be checked is itself worth an alert (once).
    async fn check_failed(
        &self,
        policy: &GroupPolicy,
        error: &EngineError,
        seen_now: &mut BTreeSet<(String, String)>,
    ) -> Result<(), EngineError> {
        tracing::error!(group = %policy.name, error = %error, "ZSP check of this group failed; other groups are still checked");
        let key = (format!("error:{}", policy.name), String::new());
        let new = !self.zsp_seen().contains(&key);
        seen_now.insert(key);
        if new {
            self.inner
                .store
                .update(self.now(), |tx| {
                    tx.audit(
                        about(ENGINE_ACTOR, AuditAction::ZspCheckFailed)
                            .group(&policy.name)
                            .detail(error.to_string()),
                    );
                    tx.outbox(toned(
                        Tone::Warning,
                        Audience::Alert,
                        format!(
                            "jitbot cannot check zero-standing-privilege group `{}`: {error}",
                            policy.name
                        ),
                        vec![],
                    ));
                    Ok::<_, EngineError>(())
                })
                .await?;
        }
        Ok(())
    }

    /// A membership jitbot granted must be present while its lease is
    /// active. A missing one is alerted (someone removed it by hand, or the
    /// directory lost it); jitbot does not silently re-add it.
    async fn check_granted_memberships(
        &self,
        seen_now: &mut BTreeSet<(String, String)>,
    ) -> Result<(), EngineError> {
        for rec in self.inner.store.live_leases()? {
            let lease = &rec.lease;
            if lease.state != LeaseState::Active || !lease.owns_membership() {
                continue;
            }
            let Some(membership) = &lease.membership else {
                continue;
            };
            match self.inner.directory.has_membership(membership).await {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(lease = %lease.id, error = %e, "cannot check a granted membership");
                    continue;
                }
            }
            let key = (format!("missing:{}", lease.group), lease.user.folded());
            let new = !self.zsp_seen().contains(&key);
            if new {
                // Fenced: a lease revoked since the list was read rightly
                // lost its membership; only a lease still active is news.
                let alerted = self
                    .inner
                    .store
                    .update(self.now(), |tx| {
                        if tx.lease(&lease.id)?.map(|r| r.lease.state) != Some(LeaseState::Active) {
                            return Ok(false);
                        }
                        tx.audit(
                            about_lease(ENGINE_ACTOR, AuditAction::LeaseMembershipMissing, lease)
                                .detail("active lease but the directory has no such membership"),
                        );
                        tx.outbox(notice(
                            Audience::Alert,
                            format!(
                                "{} holds lease {} on `{}` but is not a member in the directory; someone changed it outside jitbot.",
                                lease.user, lease.id, lease.group
                            ),
                            vec![],
                        ));
                        Ok::<_, EngineError>(true)
                    })
                    .await?;
                if !alerted {
                    continue;
                }
            }
            seen_now.insert(key);
        }
        Ok(())
    }

    fn zsp_seen(&self) -> BTreeSet<(String, String)> {
        self.inner
            .zsp_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
