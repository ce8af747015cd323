//! The re-check after an add that got no answer: a lease whose add may
//! still be on its way to the directory (`lease.add_ambiguous`) keeps a
//! durable `Recheck` timer, due a settle delay after the lease has ended,
//! that looks for the membership once more and removes it if it arrived
//! late.
//!
//! Why: a call's bound (and, with replicas, the act-until window and the
//! new leader's takeover wait) is kept by the client only. An LDAP request
//! already written to the socket is not taken back when its future is
//! dropped (ldap3 sends no Abandon; a proxy or a congested link can hold
//! the bytes), and the server executes it whenever it arrives — possibly
//! after the lease's removal found nothing and the lease ended. The
//! timer is staged in the commit that records the ambiguity, so a crash
//! or a change of leader keeps it; the commit that ends the lease moves it
//! to [`EngineSettings::recheck_after`](super::EngineSettings) after that
//! end. When it fires (on the leader, through the scheduler), the removal
//! is write-ahead like any revocation: `lease.late_add_found` is committed,
//! with the `Recheck` timer replaced by a `RecheckRemoval` one due a settle
//! delay later, before the modify; that timer is dropped only once the
//! removal is read back (`lease.late_add_removed`) or the membership is
//! read absent. A removal that gets no answer, or that a stopped process
//! (or a deposed leader) sent, may land any time until then, so the next
//! look waits a settle delay, not a retry.
//!
//! The lease re-checked has left its slot, so the slot rule does not keep
//! the re-check apart from a new lease of the same user and group: the
//! two take turns under the membership's lock (`LeaseLocks::membership`),
//! and the membership goes to a live lease only once that lease is
//! `Active` (a revoking one may have made its removal already). The lock
//! lasts only while the removal is answered and the process runs: the
//! durable claim is the `RecheckRemoval` timer, and a grant of the same
//! user and directory group waits while one is pending
//! ([`Engine::recheck_removal_pending`]). Directory groups are the same
//! when their normalised DNs are ([`same_group`]).

use super::audit::{about_lease, AuditAction};
use super::{notice, Engine, EngineError, ENGINE_ACTOR};
use crate::messages::Audience;
use crate::store::leader::Window;
use crate::store::{LeaseRecord, TimerKind, Tx};
use jitbot_core::{GroupDn, GroupName, Instant, LeaseId, LeaseState, UserId};

/// What one re-check found and did, for its audit record.
enum Found {
    /// The membership is not there: nothing arrived late.
    Absent,
    /// The membership is there, but a live lease of the same user and
    /// group holds it now: that lease decides (removes what it owns).
    HeldBy(LeaseId),
    /// The membership is there, and the live lease of the same user and
    /// group took it for standing: it may be this lease's add arriving
    /// late, so that lease now claims it and removes it at its end.
    ClaimedBy(LeaseId),
}

/// What the live lease of the same user and group does with the membership.
enum Heir {
    /// Its grant has not settled, or its removal may already be made:
    /// the re-check looks again later.
    NotYet,
    /// Active and owning the membership: it removes it at its end.
    Owns,
    /// Active and holding it as standing: it claims it now.
    Claims,
}

impl Engine {
    fn settle(&self) -> chrono::Duration {
        self.inner.settings.recheck_after.to_chrono()
    }

    /// The pending re-check timer of lease `id` (either kind) and its due.
    fn recheck_due(&self, id: &LeaseId) -> Result<Option<(TimerKind, Instant)>, EngineError> {
        for kind in TimerKind::RECHECKS {
            let found = self
                .inner
                .store
                .timers_of(kind)?
                .into_iter()
                .find(|t| t.id == id.as_str());
            if let Some(t) = found {
                return Ok(Some((kind, t.due)));
            }
        }
        Ok(None)
    }

    /// The ended lease, and its re-check's due, whose re-check has found a
    /// late add of `user`'s membership of directory group `dn` and may
    /// have a removal of it on its way (a `RecheckRemoval` timer: durable,
    /// so it holds across a lost answer, a restart and a change of
    /// leader). A grant of that membership waits until it is gone: it
    /// would take the late add for standing, then lose it to the removal.
    /// Normally there is none, and the scan is of an empty list.
    pub(super) fn recheck_removal_pending(
        &self,
        dn: &GroupDn,
        user: &UserId,
    ) -> Result<Option<(LeaseId, Instant)>, EngineError> {
        for t in self.inner.store.timers_of(TimerKind::RecheckRemoval)? {
            let id = LeaseId::new(t.id.as_str());
            let Some(rec) = self.inner.store.lease(&id)? else {
                continue;
            };
            let same = rec.lease.user.folded() == user.folded()
                && rec
                    .lease
                    .membership
                    .as_ref()
                    .is_some_and(|m| same_group(&m.group, dn));
            if same && rec.lease.state == LeaseState::Ended {
                return Ok(Some((id, t.due)));
            }
        }
        Ok(None)
    }

    /// When timer work of `kind` failed: the timer to set, and when. A
    /// re-check is retried under the kind it has now (its pass may have
    /// replaced a `Recheck` by a `RecheckRemoval`, or finished it: then
    /// nothing), and a `RecheckRemoval` keeps its due (a removal may still
    /// be on its way), a retry from now at the earliest. Any other timer
    /// is retried `retry_base` from now.
    pub(super) fn retry_of(
        &self,
        kind: TimerKind,
        id: &str,
    ) -> Result<Option<(TimerKind, Instant)>, EngineError> {
        let retry = self.now() + self.inner.settings.retry_base.to_chrono();
        if !TimerKind::RECHECKS.contains(&kind) {
            return Ok(Some((kind, retry)));
        }
        Ok(self
            .recheck_due(&LeaseId::new(id))?
            .map(|(now_kind, due)| match now_kind {
                TimerKind::RecheckRemoval => (now_kind, due.max(retry)),
                _ => (now_kind, retry),
            }))
    }

    /// Stages the re-check of lease `rec`, whose add got no answer and may
    /// still land: called in the commit that records the ambiguity. Due no
    /// earlier than a settle delay after the lease's end; the commit that
    /// ends it moves it to a settle delay after that ([`Engine::recheck_from_end`]).
    pub(super) fn arm_recheck(&self, tx: &mut Tx<'_>, rec: &LeaseRecord) {
        if !rec.lease.owns_membership() {
            return;
        }
        let due = rec.lease.expires_at.max(tx.now()) + self.settle();
        tx.set_timer(TimerKind::Recheck, rec.lease.id.as_str(), due);
    }

    /// In the commit that ends lease `id`: a re-check armed for it becomes
    /// due a settle delay from now, when an add still on its way has
    /// arrived or died.
    pub(super) fn recheck_from_end(&self, tx: &mut Tx<'_>, id: &LeaseId) -> Result<(), EngineError> {
        if tx.has_timer(TimerKind::Recheck, id.as_str())? {
            let due = tx.now() + self.settle();
            tx.set_timer(TimerKind::Recheck, id.as_str(), due);
        }
        Ok(())
    }

    /// The group names whose live leases may hold a membership of directory
    /// group `dn`: the re-checked lease's own, and every configured group
    /// naming the same entry (a group renamed in the config, its `dn`
    /// kept, writes in the same directory group under a new name).
    fn groups_writing_in(&self, own: &GroupName, dn: &GroupDn) -> Vec<GroupName> {
        let mut groups = vec![own.clone()];
        for g in &self.inner.policy.groups {
            if same_group(&g.dn, dn) && !groups.contains(&g.name) {
                groups.push(g.name.clone());
            }
        }
        groups
    }

    /// Runs a due `Recheck` timer of lease `id`. An error leaves the timer
    /// to [`Engine::fire`]'s retry: it is never dropped before the
    /// membership has been read absent, or removed and read back.
    pub(super) async fn recheck(&self, id: &str) -> Result<(), EngineError> {
        let id = LeaseId::new(id);
        if self.inner.store.directory_window() == Window::Closed {
            tracing::debug!(lease = %id, "not leading: the leader re-checks this lease");
            if self.inner.store.fence().is_some() {
                // A leader whose term is ending: the due timer must not spin.
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            return Ok(());
        }
        // The timer as it is now: the end's commit may have moved it out
        // since the scheduler read it (or another pass dropped it).
        let Some((kind, due)) = self.recheck_due(&id)? else {
            return Ok(());
        };
        if due > self.now() {
            return Ok(());
        }
        // After `lease.late_add_found` a grant of the same membership
        // waits for this re-check (`recheck_removal_pending`): one that
        // has not checked the directory yet is no heir to wait for.
        let removing = kind == TimerKind::RecheckRemoval;
        let Some(rec) = self.inner.store.lease(&id)? else {
            return self.recheck_done(&id, None).await;
        };
        if rec.lease.state != LeaseState::Ended {
            // Not over yet (the end's commit moves the timer): look again
            // a settle delay after its end at the earliest.
            let settle = self.settle();
            let live = [LeaseState::Granting, LeaseState::Active, LeaseState::Revoking];
            self.transition(&id, &live, |tx, rec| {
                let due = rec.lease.expires_at.max(tx.now()) + settle;
                tx.set_timer(TimerKind::Recheck, id.as_str(), due);
                Ok(())
            })
            .await?;
            return Ok(());
        }
        let Some(m) = rec
            .lease
            .membership
            .clone()
            .filter(|_| rec.lease.owns_membership())
        else {
            // Nothing of jitbot's to look for.
            return self.recheck_done(&id, None).await;
        };
        // The membership's turn, from the look through the commit of the
        // removal's read-back: a new lease's grant checks it before the
        // removal is sent, or after it is read back, never while it is
        // on its way (it would take the late add for standing, then lose
        // it to the removal).
        let _turn = self.inner.lease_locks.membership(&m.group, &rec.lease.user).await;
        let dir = &self.inner.directory;
        let present = self.directory_result(self.bounded("re-check", dir.has_membership(&m)).await)?;
        if !present {
            return self.recheck_done(&id, Some(Found::Absent)).await;
        }
        // The value the membership stands for in the group today: a
        // holder writing that value holds it.
        let today = self.directory_result(self.bounded("re-check", dir.current_value(&m)).await)?;
        let groups = self.groups_writing_in(&rec.lease.group, &m.group);
        for group in &groups {
            if let Some(holder) = self.inner.store.live_lease(group, &rec.lease.user)? {
                if self
                    .inner
                    .store
                    .lease(&holder)?
                    .is_some_and(|h| is_heir(&h, &m, today.as_deref(), removing))
                {
                    return self.leave_to(&id, &holder).await;
                }
            }
        }
        // Write-ahead: the removal is on record, and retried if it fails
        // or this process stops, before the modify is sent.
        let settle = self.settle();
        let found = self
            .transition(&id, &[LeaseState::Ended], |tx, rec| {
                for group in &groups {
                    if let Some(holder) = tx.live_lease(group, &rec.lease.user)? {
                        if tx
                            .lease(&holder)?
                            .is_some_and(|h| is_heir(&h, &m, today.as_deref(), removing))
                        {
                            // A new lease took the slot meanwhile: the next
                            // pass (due now) leaves the membership to it.
                            return Ok(false);
                        }
                    }
                }
                // The claim on the membership, durable: until it is cleared
                // no grant of the same user and group takes the membership,
                // and the next look comes when a removal still on its way
                // (unanswered, or sent by a process that stopped) has
                // landed or died.
                tx.clear_timer(TimerKind::Recheck, id.as_str());
                tx.set_timer(TimerKind::RecheckRemoval, id.as_str(), tx.now() + settle);
                // The first find: a removal that keeps failing is overdue
                // from here (`jitbot_revocation_overdue_seconds`).
                rec.lease.late_add_found_at.get_or_insert(tx.now());
                tx.audit(
                    about_lease(ENGINE_ACTOR, AuditAction::LeaseLateAddFound, &rec.lease).detail(
                        "the membership is in the directory after the lease ended: jitbot's add that got no \
                         answer arrived late (or somebody added it); removing it",
                    ),
                );
                Ok(true)
            })
            .await?;
        if found != Some(true) {
            return Ok(());
        }
        tracing::warn!(lease = %id, group = %rec.lease.group, user = %rec.lease.user,
            "membership found after its lease ended (a late add); removing it");
        let removal = self.directory_result(self.bounded("removal", dir.revoke_membership(&m)).await);
        if removal.is_err() {
            // Retried like any failed revocation, and counted as one
            // (`JitbotRevocationFailing`).
            crate::metrics::revoke_retry();
        }
        let note = removal?.map(|n| format!(" ({n})")).unwrap_or_default();
        self.transition(&id, &[LeaseState::Ended], |tx, rec| {
            tx.clear_timer(TimerKind::Recheck, id.as_str());
            tx.clear_timer(TimerKind::RecheckRemoval, id.as_str());
            tx.audit(
                about_lease(ENGINE_ACTOR, AuditAction::LeaseLateAddRemoved, &rec.lease)
                    .detail(format!("membership removed after the lease ended{note}")),
            );
            tx.outbox(notice(
                Audience::Alert,
                format!(
                    "jitbot removed {} from `{}` after lease {} had ended: an add that got no answer \
                     reached the directory late. Nothing to do; check the directory's network path if \
                     this repeats.",
                    rec.lease.user, rec.lease.group, rec.lease.id
                ),
                vec![],
            ));
            Ok(())
        })
        .await?;
        self.changed();
        Ok(())
    }

    /// The membership is there and live lease `holder` of the same user and
    /// group holds the slot. An active holder that owns it removes it at
    /// its end; an active holder that found it standing may have found
    /// this lease's late add, so it claims it (audited `lease.add_ambiguous`,
    /// as any membership whose owner cannot be told). A holder that has
    /// not settled its grant yet is waited for, and so is a revoking one:
    /// its removal may already be made, so it is no heir; once it has
    /// ended, the next look finds no live lease and removes the late add.
    /// An `Active` holder at this commit removes later: its `Active` →
    /// `Revoking` commit comes first, and the removal reads the lease
    /// after it.
    async fn leave_to(&self, id: &LeaseId, holder: &LeaseId) -> Result<(), EngineError> {
        let settle = self.settle();
        let live = [LeaseState::Granting, LeaseState::Active, LeaseState::Revoking];
        let ours = id.clone();
        let heir = self
            .transition(holder, &live, |tx, rec| {
                let settled = rec.lease.state == LeaseState::Active;
                Ok(match rec.lease.preexisting {
                    Some(false) if settled => Heir::Owns,
                    Some(true) if settled => {
                        rec.lease.preexisting = Some(false);
                        tx.audit(
                            about_lease(ENGINE_ACTOR, AuditAction::LeaseAddAmbiguous, &rec.lease).detail(
                                format!(
                                    "the membership this lease found standing may be lease {ours}'s add \
                                     that arrived after it ended; jitbot claims it and removes it when this \
                                     lease ends"
                                ),
                            ),
                        );
                        Heir::Claims
                    }
                    // Not checked yet, its add not answered yet ("already
                    // there" would make the membership standing to it), or
                    // its removal possibly made: look again later.
                    _ => {
                        let kind = if tx.has_timer(TimerKind::RecheckRemoval, ours.as_str())? {
                            TimerKind::RecheckRemoval
                        } else {
                            TimerKind::Recheck
                        };
                        tx.set_timer(kind, ours.as_str(), tx.now() + settle);
                        Heir::NotYet
                    }
                })
            })
            .await?;
        match heir {
            // It left the live states meanwhile: look again.
            None => Ok(()),
            // Not settled yet: the timer moved out above.
            Some(Heir::NotYet) => Ok(()),
            Some(Heir::Owns) => self.recheck_done(id, Some(Found::HeldBy(holder.clone()))).await,
            Some(Heir::Claims) => {
                self.recheck_done(id, Some(Found::ClaimedBy(holder.clone())))
                    .await
            }
        }
    }

    /// A directory answer, with the outage bookkeeping every step does.
    fn directory_result<T>(&self, r: Result<T, crate::ports::DirectoryError>) -> Result<T, EngineError> {
        r.map_err(|e| {
            if e.is_transient() {
                self.directory_failed();
            }
            EngineError::Directory(e)
        })
    }

    /// Drops the re-check of `id`, with its audit record when it looked.
    async fn recheck_done(&self, id: &LeaseId, found: Option<Found>) -> Result<(), EngineError> {
        let settle = self.inner.settings.recheck_after;
        self.inner
            .store
            .update(self.now(), |tx| {
                tx.clear_timer(TimerKind::Recheck, id.as_str());
                tx.clear_timer(TimerKind::RecheckRemoval, id.as_str());
                let (Some(found), Some(rec)) = (found, tx.lease(id)?) else {
                    return Ok::<_, EngineError>(());
                };
                let detail = match found {
                    Found::Absent => {
                        format!("membership absent {settle} after the lease ended: no late add arrived")
                    }
                    Found::HeldBy(holder) => format!(
                        "membership present, held by live lease {holder} of the same user and group; \
                         left to that lease"
                    ),
                    Found::ClaimedBy(holder) => format!(
                        "membership present, taken for standing by live lease {holder}, which now claims \
                         it and removes it at its end"
                    ),
                };
                tx.audit(about_lease(ENGINE_ACTOR, AuditAction::LeaseRechecked, &rec.lease).detail(detail));
                Ok(())
            })
            .await
    }
}

/// Whether live lease `holder` (of the same user and group) speaks for
/// membership `m`: it writes the same value of the same attribute in the
/// same directory group — the value recorded, or the one `m` stands for
/// in the group `today` (the user's current DN where the directory
/// rewrote it: Active Directory links the object, and a late add of the
/// old DN reads as the new one, which the holder removes) — or has not
/// recorded what it writes yet (its check is still to come). After a `dn`
/// change the directory group is not the same: the new lease holds the
/// new one, and the late add in the old one is nobody's. Likewise a late
/// add of a moved user's old DN that the directory kept as written (plain
/// OpenLDAP): the new lease adds and removes the new DN, and the old one
/// is nobody's.
fn holds_the_same_group(holder: &LeaseRecord, m: &jitbot_core::Membership, today: Option<&str>) -> bool {
    use crate::directory::ldap::dn::normalize;
    holder.lease.membership.as_ref().is_none_or(|h| {
        let value = normalize(&h.value);
        same_group(&h.group, &m.group)
            && h.attribute.eq_ignore_ascii_case(&m.attribute)
            && (value == normalize(&m.value) || today.is_some_and(|t| value == normalize(t)))
    })
}

/// Whether live lease `holder` is the one the membership goes to. While
/// the re-check's removal may be on its way (`removing`), a grant that has
/// not checked the directory yet waits for the re-check to finish, and
/// then adds its own: it is no heir.
fn is_heir(holder: &LeaseRecord, m: &jitbot_core::Membership, today: Option<&str>, removing: bool) -> bool {
    let waits = removing && holder.lease.state == LeaseState::Granting && holder.lease.preexisting.is_none();
    holds_the_same_group(holder, m, today) && !waits
}

/// Whether two group DNs name the same directory entry, as the directory
/// compares them (case and the spaces around separators ignored): a `dn`
/// re-spelled in the config is the same group.
pub(super) fn same_group(a: &GroupDn, b: &GroupDn) -> bool {
    group_key(a) == group_key(b)
}

/// A group DN in one spelling per directory entry, for comparing and keying.
pub(super) fn group_key(dn: &GroupDn) -> String {
    crate::directory::ldap::dn::normalize(dn.as_str())
}
