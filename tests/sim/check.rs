//! The invariants, checked against the directory and the store after every
//! step (I3, which needs the work run out, is checked by `Op::Quiesce` and
//! at the end of every run).

use super::world::{dns_of, Violation, World, MANAGED};
use jitbot::store::AuditCheck;
use jitbot_core::LeaseState;
use std::collections::{BTreeMap, BTreeSet};

fn violation(invariant: &'static str, detail: String) -> Violation {
    Violation { invariant, detail }
}

/// Checks every invariant but I3; the audit chain (I4, a full pass over the
/// audit trail) only when `audit` is set: the trail is append-only, so a
/// break found a few steps late is still found.
pub fn check(world: &mut World, audit: bool) -> Vec<Violation> {
    let mut found = Vec::new();
    let store = world.engine().store().clone();
    // I4: the audit chain verifies.
    if audit {
        match store.verify_audit() {
            Ok(AuditCheck::Intact { .. }) => {}
            Ok(broken) => found.push(violation("I4", format!("audit chain: {broken:?}"))),
            Err(e) => found.push(violation("I4", format!("audit chain unreadable: {e}"))),
        }
        // I3-late, the other half of I3: no grant is finished after its
        // lease's end.
        for entry in store.audit(0).flatten().filter(|e| e.action == "lease.granted") {
            let Some(id) = entry.lease.as_deref() else {
                continue;
            };
            let lease = store.lease(&jitbot_core::LeaseId::new(id)).ok().flatten();
            if let Some(l) = lease.filter(|l| entry.at > l.lease.expires_at) {
                found.push(violation(
                    "I3-late",
                    format!(
                        "lease {id} ({} on {}) was granted at {} although it ended at {}",
                        l.lease.user, l.lease.group, entry.at, l.lease.expires_at
                    ),
                ));
            }
        }
    }
    let leases = match store.leases() {
        Ok(l) => l,
        Err(e) => {
            found.push(violation("store", format!("leases unreadable: {e}")));
            return found;
        }
    };
    // I5: at most one non-ended lease per (group, user).
    let mut live: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for l in leases.iter().filter(|l| l.lease.state != LeaseState::Ended) {
        live.entry((l.lease.group.to_string(), l.lease.user.to_string()))
            .or_default()
            .push(format!("{} ({:?})", l.lease.id, l.lease.state));
    }
    if let Some(((group, user), ids)) = live.iter().find(|(_, ids)| ids.len() > 1) {
        found.push(violation(
            "I5",
            format!("{user} holds {} live leases on {group}: {ids:?}", ids.len()),
        ));
    }
    let rechecking: BTreeSet<String> = jitbot::store::TimerKind::RECHECKS
        .iter()
        .flat_map(|k| store.timers_of(*k).unwrap_or_default())
        .map(|t| t.id)
        .collect();
    for dn in MANAGED {
        let members = world.dir.members(dn);
        let standing = world.standing.get(dn).cloned().unwrap_or_default();
        // A standing membership (put there by a person) is never removed by jitbot.
        // The one exception: the ZSP monitor's remediation (a lease that
        // ends with `Drift`) removes members of a group that sets `remediate`.
        let remediated: Vec<String> = standing
            .iter()
            .filter(|u| !members.contains(*u))
            .filter(|u| {
                leases.iter().any(|l| {
                    l.lease.user.as_str() == u.as_str()
                        && l.lease.end_reason == Some(jitbot_core::EndReason::Drift)
                        && l.lease
                            .membership
                            .as_ref()
                            .is_some_and(|m| m.group.as_str() == dn)
                })
            })
            .cloned()
            .collect();
        if let Some(set) = world.standing.get_mut(dn) {
            for u in &remediated {
                set.remove(u);
            }
        }
        let standing = world.standing.get(dn).cloned().unwrap_or_default();
        // A documented exception: an add that got no answer (or, after a
        // crash, an "already there" answer to jitbot's retried add) cannot
        // be told from someone else's add; jitbot claims it (audited
        // `lease.add_ambiguous`) and removes it.
        let ambiguous = |user: &str| {
            let claimed: Vec<String> = store
                .audit(0)
                .filter_map(Result::ok)
                .filter(|e| e.action == "lease.add_ambiguous")
                .filter_map(|e| e.user)
                .collect();
            claimed.iter().any(|u| u.eq_ignore_ascii_case(user))
        };
        if let Some(gone) = standing
            .iter()
            .find(|u| !members.contains(*u) && !ambiguous(u.as_str()))
        {
            found.push(violation(
                "I1-standing",
                format!("{gone}'s standing membership of {dn} (added by a person, not jitbot) is gone"),
            ));
        }
        for m in members.iter().filter(|m| !standing.contains(*m)) {
            // The lease's recorded membership says where it writes; before
            // it is recorded, any DN its group name has had.
            let on_dn = |l: &&jitbot::store::LeaseRecord| {
                l.lease.user.as_str() == m
                    && match &l.lease.membership {
                        Some(written) => written.group.as_str() == dn,
                        None => dns_of(l.lease.group.as_str()).contains(&dn),
                    }
            };
            if leases
                .iter()
                .filter(on_dn)
                .any(|l| l.lease.state != LeaseState::Ended)
            {
                continue;
            }
            // An ended lease whose add got no answer is finished only when
            // its re-check has looked (an add arriving late, `Outcome::Late`).
            if leases
                .iter()
                .filter(on_dn)
                .any(|l| rechecking.contains(l.lease.id.as_str()))
            {
                continue;
            }
            // I2: an ended lease left no membership it added.
            if let Some(l) = leases.iter().filter(on_dn).find(|l| l.lease.owns_membership()) {
                found.push(violation(
                    "I2",
                    format!(
                        "{m} is still a member of {dn}, added for lease {} which has ended ({:?}); nothing will remove it",
                        l.lease.id, l.lease.end_reason
                    ),
                ));
                continue;
            }
            // I1: every member is standing or holds a live lease.
            found.push(violation(
                "I1",
                format!("{m} is a member of {dn} with no live lease and no standing membership (orphaned privilege)"),
            ));
        }
    }
    // I6: every notice committed is delivered or still pending.
    world.observe_outbox();
    let pending: std::collections::BTreeSet<u64> = store
        .outbox(10_000)
        .unwrap_or_default()
        .into_iter()
        .map(|(id, _, _)| id)
        .collect();
    let gone: Vec<u64> = world
        .outbox_seen
        .keys()
        .filter(|id| !pending.contains(id))
        .copied()
        .collect();
    for id in gone {
        let Some(notice) = world.outbox_seen.remove(&id) else {
            continue;
        };
        let mut sent = world.chat.sent.lock().unwrap_or_else(|p| p.into_inner());
        match sent.iter().position(|n| *n == notice) {
            Some(i) => {
                sent.remove(i);
            }
            None => found.push(violation(
                "I6",
                format!(
                    "notice {id} to {:?} left the outbox undelivered: {:?}",
                    notice.to, notice.text
                ),
            )),
        }
    }
    found
}
