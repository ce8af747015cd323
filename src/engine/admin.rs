//! Operations for the admin API: the admin token is the authority, so these
//! skip the chat permission checks but are audited under the given name.

use super::audit::{about_lease, about_request, AuditAction};
use super::{Engine, EngineError, ENGINE_ACTOR};
use crate::store::leader::Window;
use crate::store::{OutboxItem, TimerKind};
use jitbot_core::{EndReason, LeaseId, LeaseState, Refusal, RequestId, UserId};

impl Engine {
    /// Ends an active lease now, on an admin's word.
    pub async fn revoke_as_admin(&self, id: &str, reason: &str, by: &str) -> Result<String, EngineError> {
        let now = self.now();
        self.inner
            .store
            .update(now, |tx| {
                let mut rec = tx
                    .lease(&LeaseId::new(id))?
                    .ok_or_else(|| EngineError::NotFound(format!("there is no lease {id}")))?;
                if rec.lease.state != LeaseState::Active {
                    return Err(Refusal::LeaseNotActive {
                        state: rec.lease.state.describe().to_string(),
                    }
                    .into());
                }
                let end = EndReason::Revoked {
                    by: UserId::new(by),
                    reason: reason.to_string(),
                };
                rec.lease.begin_revoke(end.clone(), now)?;
                self.revoking(tx, &rec, by, &end.describe());
                tx.put_lease(rec);
                Ok::<_, EngineError>(())
            })
            .await?;
        self.changed();
        let lease = LeaseId::new(id);
        self.drive(&lease).await?;
        // Say what is true: on a follower the leader removes the
        // membership, and a removal that failed is retried.
        let ended = self
            .inner
            .store
            .lease(&lease)?
            .is_none_or(|rec| rec.lease.state == LeaseState::Ended);
        Ok(if ended {
            format!("lease {id} revoked: the membership is removed")
        } else if self.inner.store.directory_window() == Window::Closed {
            format!(
                "lease {id}: revocation committed; this replica does not lead, so the leader removes the membership                  (within seconds, or after a failover); `GET /admin/leases` shows the lease as ended once it has"
            )
        } else {
            format!(
                "lease {id}: revocation committed, but removing the membership failed for now; jitbot retries until                  it is removed (the lease shows as revoking meanwhile; see `GET /admin/leases` and the log)"
            )
        })
    }

    /// Cancels a pending request on an admin's word.
    pub async fn cancel_as_admin(&self, id: &RequestId) -> Result<String, EngineError> {
        let now = self.now();
        self.inner
            .store
            .update(now, |tx| {
                let mut rec = tx
                    .request(id)?
                    .ok_or_else(|| EngineError::NotFound(format!("there is no request {id}")))?;
                rec.request.cancel(&UserId::new("admin-api"), now)?;
                tx.clear_timer(TimerKind::RequestTimeout, id.as_str());
                tx.audit(about_request(
                    "admin-api",
                    AuditAction::RequestCancelled,
                    &rec.request,
                ));
                tx.outbox(OutboxItem::UpdateApproval { request: id.clone() });
                tx.put_request(rec);
                Ok::<_, EngineError>(())
            })
            .await?;
        self.changed();
        Ok(format!("request {id} cancelled"))
    }

    /// Active leases and pending requests, for the gauges. Reads only the
    /// live and pending indexes, never the whole history.
    /// What a metrics scrape shows, read from the indexes (never every live
    /// lease record): active leases (those holding a slot in `live`, less
    /// the few being granted or revoked, found through their `Grant` and
    /// `Revoke` timers), pending requests (one decision-window timer each),
    /// and how long the most overdue lease is past its end — an active
    /// lease whose `Expire` timer is due, or one still being granted or
    /// revoked, or an ended one whose late add (an add that got no answer,
    /// landed after the end) is being removed. A revoking lease is overdue
    /// from when its revocation became due: its `ended_at` (a release, an
    /// admin's or offboarding's revoke end it before its planned
    /// `expires_at`), or its planned end when that came first; a late add
    /// from when the re-check found it.
    pub fn scrape_counts(&self) -> Result<(usize, usize, std::time::Duration), EngineError> {
        let store = &self.inner.store;
        let now = self.now();
        let mut oldest: Option<jitbot_core::Instant> = None;
        let mut settling = 0;
        for (kind, state) in [
            (TimerKind::Revoke, LeaseState::Revoking),
            (TimerKind::Grant, LeaseState::Granting),
        ] {
            for t in store.timers_of(kind)? {
                let id = LeaseId::new(t.id);
                let Some(rec) = store.lease(&id)? else { continue };
                if rec.lease.state != state {
                    continue;
                }
                let end = rec
                    .lease
                    .ended_at
                    .map_or(rec.lease.expires_at, |ended| ended.min(rec.lease.expires_at));
                oldest = Some(oldest.map_or(end, |o| o.min(end)));
                if store.live_lease(&rec.lease.group, &rec.lease.user)? == Some(id) {
                    settling += 1;
                }
            }
        }
        // A late add found after its lease ended whose removal has not
        // been read back yet (normally none): overdue from when it was
        // found.
        for t in store.timers_of(TimerKind::RecheckRemoval)? {
            let Some(rec) = store.lease(&LeaseId::new(t.id))? else {
                continue;
            };
            if let (LeaseState::Ended, Some(found)) = (rec.lease.state, rec.lease.late_add_found_at) {
                oldest = Some(oldest.map_or(found, |o| o.min(found)));
            }
        }
        let active = store.live_count()?.saturating_sub(settling);
        let pending = store.count_timers(TimerKind::RequestTimeout)?;
        // The first due `Expire` timer of a lease still active (a timer can
        // outlive its lease's end until it fires and finds nothing to do).
        for t in store.due_timers(now, OVERDUE_SCAN)? {
            if t.kind != TimerKind::Expire {
                continue;
            }
            let active_still = store
                .lease(&LeaseId::new(t.id.as_str()))?
                .is_some_and(|r| r.lease.state == LeaseState::Active);
            if active_still {
                oldest = Some(oldest.map_or(t.due, |o| o.min(t.due)));
                break;
            }
        }
        let overdue = oldest.and_then(|o| (now - o).to_std().ok()).unwrap_or_default();
        Ok((active, pending, overdue))
    }

    pub fn counts(&self) -> Result<(usize, usize), EngineError> {
        let active = self
            .inner
            .store
            .live_leases()?
            .iter()
            .filter(|l| l.lease.state == LeaseState::Active)
            .count();
        let pending = self.inner.store.pending_requests()?.len();
        Ok((active, pending))
    }

    /// Start-up step: live leases written before jitbot recorded the
    /// membership a grant writes get it recorded now, from the
    /// configuration they were granted under (an upgrade starts on the same
    /// config), so that a later `dn` change cannot misdirect their removal.
    /// A lease whose group or user cannot be resolved is left as it was and
    /// named in the log; its removal then falls back to today's config.
    ///
    /// The pass runs until a store has been adopted once: when it leaves
    /// nothing unresolved, it marks the store (`meta/legacy_adopted`), and
    /// later starts read no lease. A lease it could not resolve (the
    /// directory down, its group gone from the config) keeps the pass
    /// pending for the next start. It reads the live leases one at a time
    /// and keeps only the legacy ones.
    pub async fn adopt_legacy_leases(&self) -> Result<usize, EngineError> {
        let store = &self.inner.store;
        if store.legacy_adopted()? {
            return Ok(0);
        }
        let mut legacy = Vec::new();
        store.visit_live_leases(|rec| {
            if rec.lease.membership.is_none() && rec.lease.owns_membership() {
                legacy.push((rec.lease.id, rec.lease.group, rec.lease.user));
            }
        })?;
        let mut adopted = 0;
        let mut unresolved = 0;
        for (id, group, user) in legacy {
            let resolved = match self.inner.policy.group(&group) {
                Ok(policy) => self.inner.directory.membership_of(&policy.dn, &user).await,
                Err(e) => Err(crate::ports::DirectoryError::Refused(e.to_string())),
            };
            let m = match resolved {
                Ok(m) => m,
                Err(e) => {
                    unresolved += 1;
                    tracing::warn!(lease = %id, error = %e, "cannot record the membership of a lease from an older jitbot; it will be removed as today's config says (the next start tries again)");
                    continue;
                }
            };
            let live = [LeaseState::Granting, LeaseState::Active, LeaseState::Revoking];
            let done = self
                .transition(&id, &live, |tx, r| {
                    if r.lease.membership.is_none() {
                        tx.audit(
                            about_lease(ENGINE_ACTOR, AuditAction::LeaseMembershipRecorded, &r.lease)
                                .detail(format!("{} in {} (lease from an older jitbot)", m.value, m.group)),
                        );
                        r.lease.membership = Some(m.clone());
                    }
                    Ok(())
                })
                .await?;
            adopted += usize::from(done.is_some());
        }
        if unresolved == 0 {
            store.mark_legacy_adopted()?;
        }
        Ok(adopted)
    }

    /// Live leases whose group left the configuration or whose `dn`
    /// changed, worded for the operator. They are revoked as recorded (from
    /// the DN they were granted in); this says so at start-up and in
    /// `check-config`.
    ///
    /// Start-up's own check: besides the notes, it records for each group
    /// of the config whether all of its live leases are recorded under its
    /// DN (see [`leases_outside_config`]), so that the next start reads
    /// only the leases of groups whose DN changed since.
    pub fn leases_outside_config(&self) -> Result<Vec<String>, EngineError> {
        let store = &self.inner.store;
        let found = outside_config(&self.inner.policy, store)?;
        for (group, dn) in &found.checked {
            store.set_group_dn_checked(group, dn.as_deref())?;
        }
        Ok(found.notes)
    }
}

/// See [`Engine::leases_outside_config`]; this one (`check-config`'s)
/// records nothing.
///
/// It reads no lease of a group whose DN is the one under which all of
/// the group's live leases were found recorded at the last start: the
/// config does not change while jitbot runs, so every lease granted since
/// was recorded under it too. It reads every live lease of a group that
/// left the config, and of a group whose DN changed or had leases under
/// another DN at the last start.
pub fn leases_outside_config(
    policy: &jitbot_core::policy::Policy,
    store: &crate::store::Store,
) -> Result<Vec<String>, crate::store::StoreError> {
    Ok(outside_config(policy, store)?.notes)
}

/// What [`leases_outside_config`] found.
struct OutsideConfig {
    /// The notes for the operator, in the `live` index's order.
    notes: Vec<String>,
    /// For each group of the config that was checked: its DN when every
    /// live lease of it is recorded there (or it has none), `None` when
    /// some lease is not.
    checked: Vec<(jitbot_core::GroupName, Option<String>)>,
}

fn outside_config(
    policy: &jitbot_core::policy::Policy,
    store: &crate::store::Store,
) -> Result<OutsideConfig, crate::store::StoreError> {
    let mut notes = Vec::new();
    let mut checked = Vec::new();
    let live_groups = store.live_groups()?;
    for group in &live_groups {
        let p = match policy.group(group) {
            Ok(p) => p,
            Err(_) => {
                store.visit_live_leases_in(group, |rec| {
                    let l = &rec.lease;
                    let written = l
                        .membership
                        .as_ref()
                        .map_or_else(|| "its group's DN".to_string(), |m| m.group.to_string());
                    notes.push(format!(
                        "lease {} ({} on `{}`, {}) is for a group no longer in the config; it will still be removed from {written} when it ends",
                        l.id,
                        l.user,
                        l.group,
                        l.state.describe()
                    ));
                })?;
                continue;
            }
        };
        let dn = p.dn.as_str();
        if store
            .group_dn_checked(group)?
            .is_some_and(|was| was.eq_ignore_ascii_case(dn))
        {
            continue;
        }
        let before = notes.len();
        store.visit_live_leases_in(group, |rec| {
            let l = &rec.lease;
            if let Some(m) = &l.membership {
                if !m.group.as_str().eq_ignore_ascii_case(dn) {
                    notes.push(format!(
                        "lease {} ({} on `{}`) was granted in {}, but the config now says {}; it will be removed from {} when it ends",
                        l.id, l.user, l.group, m.group, p.dn, m.group
                    ));
                }
            }
        })?;
        checked.push((group.clone(), (notes.len() == before).then(|| dn.to_string())));
    }
    // A group without live leases: every lease it gets is granted under
    // today's DN.
    for p in &policy.groups {
        if !live_groups.contains(&p.name) {
            checked.push((p.name.clone(), Some(p.dn.as_str().to_string())));
        }
    }
    Ok(OutsideConfig { notes, checked })
}

/// How many due timers a scrape looks through for an overdue `Expire`.
const OVERDUE_SCAN: usize = 10_000;
