//! The ZSP monitor: members of zero-standing-privilege groups without a live
//! lease are drift. Reported to the alert channel, removed where the group
//! sets `remediate`, audited either way.

use super::{notice, Engine, EngineError, ENGINE_ACTOR};
use crate::ports::Audience;
use jitbot_core::{GroupName, UserId};
use std::collections::BTreeSet;

/// A member found in a ZSP group without a lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Drift {
    pub group: GroupName,
    pub user: UserId,
    pub remediated: bool,
}

impl Engine {
    /// Checks every ZSP group once. New drift is alerted once per
    /// appearance; remediated members are removed right away.
    pub async fn check_zsp(&self) -> Result<Vec<Drift>, EngineError> {
        let mut found = Vec::new();
        let mut seen_now = BTreeSet::new();
        for policy in self.inner.policy.groups.iter().filter(|g| g.zsp) {
            let members = self.inner.directory.list_members(&policy.dn).await?;
            let leased: BTreeSet<UserId> = self
                .inner
                .store
                .live_leases_in(&policy.name)?
                .into_iter()
                .map(|(user, _)| user)
                .collect();
            for user in members.into_iter().filter(|u| !leased.contains(u)) {
                let remediated = policy.remediate
                    && self
                        .inner
                        .directory
                        .remove_member(&policy.dn, &user)
                        .await
                        .is_ok();
                let key = (policy.name.to_string(), user.to_string());
                let new = !self.zsp_seen().contains(&key);
                seen_now.insert(key);
                crate::metrics::zsp_drift();
                if new || remediated {
                    self.inner
                        .store
                        .update(self.now(), |tx| {
                            let mut audit = Engine::audit(ENGINE_ACTOR, if remediated { "zsp.remediated" } else { "zsp.drift" });
                            audit.group = Some(policy.name.to_string());
                            audit.user = Some(user.to_string());
                            audit.detail = "member of a zero-standing-privilege group without a lease".into();
                            tx.audit(audit);
                            tx.outbox(notice(Audience::Alert, format!(
                                        ":rotating_light: ZSP drift: {user} is a member of `{}` without a jitbot lease{}",
                                        policy.name,
                                        if remediated { "; jitbot removed them." } else { "; set remediate = true to have jitbot remove such members." }
                                    ), vec![]));
                            Ok::<_, EngineError>(())
                        })
                        .await?;
                }
                found.push(Drift {
                    group: policy.name.clone(),
                    user,
                    remediated,
                });
            }
        }
        self.check_granted_memberships(&mut seen_now).await?;
        *self.inner.zsp_seen.lock().unwrap_or_else(|p| p.into_inner()) = seen_now;
        self.changed();
        Ok(found)
    }

    /// Standard groups: a membership jitbot granted must be present while its
    /// lease is active. A missing one is alerted (someone removed it by hand,
    /// or the directory lost it); jitbot does not silently re-add it.
    async fn check_granted_memberships(
        &self,
        seen_now: &mut BTreeSet<(String, String)>,
    ) -> Result<(), EngineError> {
        for rec in self.inner.store.live_leases()? {
            let lease = &rec.lease;
            if lease.state != jitbot_core::LeaseState::Active || !lease.owns_membership() {
                continue;
            }
            let Ok(policy) = self.group(&lease.group) else {
                continue;
            };
            if self.inner.directory.is_member(&policy.dn, &lease.user).await? {
                continue;
            }
            let key = (format!("missing:{}", lease.group), lease.user.to_string());
            let new = !self.zsp_seen().contains(&key);
            seen_now.insert(key);
            if new {
                self.inner
                    .store
                    .update(self.now(), |tx| {
                        let mut audit = Engine::audit(ENGINE_ACTOR, "lease.membership_missing");
                        audit.lease = Some(lease.id.to_string());
                        audit.group = Some(lease.group.to_string());
                        audit.user = Some(lease.user.to_string());
                        audit.detail = "active lease but the directory has no such membership".into();
                        tx.audit(audit);
                        tx.outbox(notice(Audience::Alert, format!(
                                    "{} holds lease {} on `{}` but is not a member in the directory; someone changed it outside jitbot.",
                                    lease.user, lease.id, lease.group
                                ), vec![]));
                        Ok::<_, EngineError>(())
                    })
                    .await?;
            }
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
