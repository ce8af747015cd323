//! The lease executor: the one place that changes the directory for a lease.
//!
//! Two rules make a membership end by construction:
//! - **One executor per lease.** [`Engine::drive`] takes the lease's lock, so
//!   a grant finished by the approving command and the same grant fired by
//!   the scheduler's `Grant` timer run one after the other, never together;
//!   the second finds the lease `Active` and does nothing.
//! - **Every step is fenced.** [`Engine::transition`] commits a change only
//!   if the lease is still in the state the step started from; a step that
//!   lost a race commits nothing and does not touch the directory again.
//!
//! The grant records *what it will write* ([`Membership`]: group DN,
//! attribute, value, the user entry's stable identity) and whether the user
//! already held it, durably, before the add. Revocation removes exactly that
//! membership from exactly that group and never consults today's
//! configuration, so a group dropped from the config, a changed `dn` or a
//! renamed user cannot strand a membership (the directory finds a renamed
//! user's current DN from the recorded identity, and says so in the audit).

use super::audit::{about_lease, AuditAction};
use super::{notice, toned, Engine, EngineError, ENGINE_ACTOR};
use crate::messages::{Audience, Tone};
use crate::ports::{Added, DirectoryError};
use crate::store::leader::Window;
use crate::store::{LeaseRecord, TimerKind, Tx};
use jitbot_core::backoff::retry_delay;
use jitbot_core::command::Action;
use jitbot_core::{EndReason, GroupDn, LeaseId, LeaseState, Membership, Span, UserId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Where one grant step left a `Granting` lease.
#[derive(Debug, PartialEq, Eq)]
enum GrantStep {
    /// Active, revoking, or moved on by another step.
    Moved,
    /// Still granting: the directory could not be asked; its `Grant` timer
    /// tries again later.
    Waiting,
}

/// Why a grant's pass stopped before its add, to be tried again later.
enum Hold {
    /// The directory could not be asked (down, or timed out).
    Directory(DirectoryError),
    /// Lease `lease`'s re-check, due at `due`, may have a removal of this
    /// membership on its way.
    Recheck {
        lease: LeaseId,
        due: jitbot_core::Instant,
    },
}

/// Locks taken around directory work: one per lease (held while a lease's
/// directory work runs, [`Engine::drive`]) and one per membership (a user
/// in a directory group), which keeps the re-check's removal of a late add
/// and a grant's check and add of the same membership from overlapping
/// (see `recheck.rs`). The re-check acts for a lease that has left its
/// slot, so the slot rule cannot keep it apart from a new lease's grant.
/// In-process: with replicas only the leader calls the directory.
#[derive(Default)]
pub(super) struct LeaseLocks {
    leases: Named,
    memberships: Named,
}

impl LeaseLocks {
    /// Waits for lease `id`'s turn.
    async fn lease(&self, id: &LeaseId) -> Turn<'_> {
        self.leases.turn(id.to_string()).await
    }

    /// Waits for the turn of `user`'s membership of directory group `dn`
    /// (compared as the directory compares them: case and the spaces
    /// around separators ignored).
    pub(super) async fn membership(&self, dn: &GroupDn, user: &UserId) -> Turn<'_> {
        let key = format!("{}\n{}", super::recheck::group_key(dn), user.folded());
        self.memberships.turn(key).await
    }
}

/// Locks by name, made on first use and forgotten when nobody holds or
/// waits for them.
#[derive(Default)]
struct Named {
    map: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Named {
    async fn turn(&self, key: String) -> Turn<'_> {
        let lock = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(key.clone()).or_default().clone()
        };
        Turn {
            guard: Some(lock.lock_owned().await),
            named: self,
            key,
        }
    }
}

/// A held lock of [`Named`]: released when dropped (also when the task
/// holding it is cancelled), and forgotten when nobody else waits for it.
pub(super) struct Turn<'a> {
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
    named: &'a Named,
    key: String,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        // Every clone is made under the map's mutex, so the count cannot
        // rise between the release and the check.
        let mut map = self.named.map.lock().unwrap_or_else(|p| p.into_inner());
        self.guard.take();
        if map.get(&self.key).is_some_and(|l| Arc::strong_count(l) == 1) {
            map.remove(&self.key);
        }
    }
}

/// The state fence of every lease transition, inside a store transaction:
/// stages `change` only if lease `id` is in one of the states `from`, then
/// writes the lease back. `None` (nothing staged) when it is not, or gone.
pub(super) fn fenced<T>(
    tx: &mut Tx<'_>,
    id: &LeaseId,
    from: &[LeaseState],
    change: impl FnOnce(&mut Tx<'_>, &mut LeaseRecord) -> Result<T, EngineError>,
) -> Result<Option<T>, EngineError> {
    let Some(mut rec) = tx.lease(id)? else {
        return Ok(None);
    };
    if !from.contains(&rec.lease.state) {
        return Ok(None);
    }
    let value = change(tx, &mut rec)?;
    tx.put_lease(rec);
    Ok(Some(value))
}

impl Engine {
    /// Commits `change` to lease `id` only if its state is one of `from`;
    /// otherwise commits nothing and returns `None`. `change` stages the new
    /// lease through the record it is handed: the helper writes it back, so
    /// no step can forget to.
    pub(super) async fn transition<T>(
        &self,
        id: &LeaseId,
        from: &[LeaseState],
        change: impl FnOnce(&mut Tx<'_>, &mut LeaseRecord) -> Result<T, EngineError>,
    ) -> Result<Option<T>, EngineError> {
        self.inner
            .store
            .update(self.now(), |tx| fenced(tx, id, from, change))
            .await
    }

    /// [`Engine::transition`] for many leases in one store commit: each
    /// lease's `change` is staged only if its state is one of `from` (its
    /// entry is `None` otherwise) and the helper writes each lease back.
    /// An error from any `change` aborts the whole commit.
    pub(super) async fn transition_each<J, T>(
        &self,
        jobs: &[(LeaseId, J)],
        from: &[LeaseState],
        change: impl Fn(&mut Tx<'_>, &mut LeaseRecord, &J) -> Result<T, EngineError>,
    ) -> Result<Vec<Option<T>>, EngineError> {
        self.inner
            .store
            .update(self.now(), |tx| {
                jobs.iter()
                    .map(|(id, job)| fenced(tx, id, from, |tx, rec| change(tx, rec, job)))
                    .collect()
            })
            .await
    }

    /// Takes lease `id` as far as the directory lets it: finishes a
    /// `Granting` lease, removes the membership of a `Revoking` one. Safe to
    /// call any number of times from anywhere (commands, timers, start-up).
    ///
    /// With replicas, only the leader drives: elsewhere this does nothing,
    /// and the lease's due timer brings it to the leader's scheduler (a
    /// per-lease lock in one process cannot keep two replicas apart).
    pub(crate) async fn drive(&self, id: &LeaseId) -> Result<(), EngineError> {
        if self.inner.store.directory_window() == Window::Closed {
            tracing::debug!(lease = %id, "not leading: the leader drives this lease");
            if self.inner.store.fence().is_some() {
                // A leader whose term is ending: its scheduler stops soon;
                // until then the due timer must not spin.
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            return Ok(());
        }
        let _turn = self.inner.lease_locks.lease(id).await;
        self.drive_locked(id).await
    }

    async fn drive_locked(&self, id: &LeaseId) -> Result<(), EngineError> {
        // Each pass either ends in a settled state or moves the lease on
        // (granting → active or revoking; revoking → ended or retry later).
        for _ in 0..4 {
            let Some(rec) = self.inner.store.lease(id)? else {
                return self.clear_work_timers(id).await;
            };
            match rec.lease.state {
                LeaseState::Granting => {
                    if self.grant_step(rec).await? == GrantStep::Waiting {
                        // Its `Grant` timer tries again after the backoff.
                        return Ok(());
                    }
                }
                LeaseState::Revoking => return self.revoke_step(rec).await,
                LeaseState::Active | LeaseState::Ended => return self.clear_work_timers(id).await,
            }
        }
        Ok(())
    }

    /// Runs one directory call of a lease within this replica's window: a
    /// leader's call that would outlive its step-down point is abandoned
    /// (dropped, closing its request) and fails as unanswered.
    pub(super) async fn bounded<T>(
        &self,
        op: &str,
        call: impl std::future::Future<Output = Result<T, DirectoryError>>,
    ) -> Result<T, DirectoryError> {
        match self.inner.store.directory_window() {
            Window::Unbounded => call.await,
            Window::Closed => Err(DirectoryError::Unavailable(format!(
                "this replica's leadership term is ending; the {op} is left to the next leader"
            ))),
            Window::Open(limit) => tokio::time::timeout(limit, crate::ports::given_up_on_closes(call))
                .await
                .unwrap_or_else(|_| {
                    Err(DirectoryError::Unavailable(format!(
                        "the directory did not answer the {op} within {limit:?}; abandoned before this \
                     replica's leadership term could end"
                    )))
                }),
        }
    }

    /// Drops `Grant` and `Revoke` timers of a lease that needs no more
    /// directory work (fenced: only while it is active or ended).
    async fn clear_work_timers(&self, id: &LeaseId) -> Result<(), EngineError> {
        self.inner
            .store
            .update(self.now(), |tx| {
                let settled = match tx.lease(id)? {
                    None => true,
                    Some(rec) => matches!(rec.lease.state, LeaseState::Active | LeaseState::Ended),
                };
                if settled {
                    tx.clear_timer(TimerKind::Grant, id.as_str());
                    tx.clear_timer(TimerKind::Revoke, id.as_str());
                }
                Ok::<_, EngineError>(())
            })
            .await
    }

    /// One step of a `Granting` lease. Leaves it `Active`, or `Revoking`
    /// (failed, or too late), or unchanged when another step won a race, or
    /// waiting for the directory ([`GrantStep::Waiting`]).
    async fn grant_step(&self, rec: LeaseRecord) -> Result<GrantStep, EngineError> {
        let id = rec.lease.id.clone();
        match self.try_grant(rec).await? {
            Err(Hold::Directory(e)) => self.grant_retry(&id, &e).await,
            Err(Hold::Recheck { lease, due }) => self.grant_waits_for_recheck(&id, &lease, due).await,
            Ok(()) => Ok(GrantStep::Moved),
        }
    }

    /// Another lease's re-check has found a late add of this grant's
    /// membership and may have its removal on the way: nothing was
    /// checked or added, the lease stays `Granting` and its `Grant` timer
    /// tries again a retry after that re-check is due (then the membership
    /// is absent and the grant adds its own). Audited and told once.
    async fn grant_waits_for_recheck(
        &self,
        id: &LeaseId,
        other: &LeaseId,
        due: jitbot_core::Instant,
    ) -> Result<GrantStep, EngineError> {
        let retry = self.inner.settings.retry_base.to_chrono();
        let why = format!("waiting for lease {other}'s re-check to remove a late add of this membership");
        let first = self
            .transition(id, &[LeaseState::Granting], |tx, rec| {
                let next = (due.max(tx.now()) + retry).min(rec.lease.expires_at);
                tx.set_timer(TimerKind::Grant, id.as_str(), next);
                let first = rec.lease.last_error.as_deref() != Some(why.as_str());
                if first {
                    rec.lease.last_error = Some(why.clone());
                    tx.audit(
                        about_lease(ENGINE_ACTOR, AuditAction::LeaseGrantRetry, &rec.lease).detail(format!(
                            "{why}: an earlier lease's add that got no answer arrived after it ended, and \
                             jitbot's removal of it may still be on its way; nothing was added; the grant \
                             goes on once it is done"
                        )),
                    );
                }
                Ok(first)
            })
            .await?;
        if first == Some(true) {
            tracing::warn!(lease = %id, other = %other, "grant waits for a re-check's removal of a late add");
            self.changed();
        }
        Ok(GrantStep::Waiting)
    }

    /// The grant itself. A transient directory error met before the add is
    /// sent comes back as `Ok(Err(_))`: nothing was written, so the grant
    /// can simply be tried again.
    async fn try_grant(&self, rec: LeaseRecord) -> Result<Result<(), Hold>, EngineError> {
        let id = rec.lease.id.clone();
        let granting = [LeaseState::Granting];
        // A grant finished after its lease has run out (jitbot was down, or
        // the directory was slow) would hand out privilege nobody may hold
        // any more. Checked here, before the add, and again when activating.
        if self.now() >= rec.lease.expires_at {
            // An earlier pass that recorded the membership may have sent
            // an add that got no answer.
            let in_flight = rec.lease.preexisting.is_some();
            return self.too_late(&id, false, in_flight).await.map(Ok);
        }
        let dir = &self.inner.directory;
        // Only the add that follows jitbot's own membership check can tell
        // that "already there" means somebody else.
        let first_add = rec.lease.preexisting.is_none();
        // The membership's turn, from the check through the commit of the
        // add's answer: a re-check removing a late add of the same
        // membership (an ended lease's) finishes first, or starts after.
        let _turn;
        let membership = match (rec.lease.preexisting, rec.lease.membership.clone()) {
            (Some(_), Some(m)) => {
                _turn = self.inner.lease_locks.membership(&m.group, &rec.lease.user).await;
                m
            }
            _ => {
                // The only moment today's configuration is read for a lease:
                // which group DN, and which value stands for the user.
                let policy = match self.group(&rec.lease.group) {
                    Ok(p) => p.clone(),
                    Err(e) => return self.grant_failed(&id, &e.to_string()).await.map(Ok),
                };
                let m = match self
                    .bounded("lookup", dir.membership_of(&policy.dn, &rec.lease.user))
                    .await
                {
                    Ok(m) => m,
                    Err(e) if e.is_transient() => return Ok(Err(Hold::Directory(e))),
                    Err(e) => return self.grant_failed(&id, &e.to_string()).await.map(Ok),
                };
                _turn = self.inner.lease_locks.membership(&m.group, &rec.lease.user).await;
                // Under the turn: a re-check that found a late add commits
                // its claim (durable, unlike the turn) before its removal.
                if let Some((lease, due)) = self.recheck_removal_pending(&m.group, &rec.lease.user)? {
                    return Ok(Err(Hold::Recheck { lease, due }));
                }
                let was_member = match self.bounded("check", dir.has_membership(&m)).await {
                    Ok(was) => was,
                    Err(e) if e.is_transient() => return Ok(Err(Hold::Directory(e))),
                    Err(e) => return self.grant_failed(&id, &e.to_string()).await.map(Ok),
                };
                self.directory_answered().await;
                let recorded = self
                    .transition(&id, &granting, |tx, rec| {
                        rec.lease.record_preexisting(was_member, m.clone());
                        if was_member {
                            tx.audit(
                                about_lease(ENGINE_ACTOR, AuditAction::LeaseStandingMembership, &rec.lease)
                                    .detail("already a member before jitbot; jitbot will not remove it"),
                            );
                        }
                        Ok(rec.lease.owns_membership())
                    })
                    .await?;
                match recorded {
                    None => return Ok(Ok(())),
                    Some(false) => return self.activate(&id, false).await.map(Ok),
                    Some(true) => {}
                }
                m
            }
        };
        if rec.lease.preexisting == Some(true) {
            return self.activate(&id, false).await.map(Ok);
        }
        if self.now() >= rec.lease.expires_at {
            // After jitbot's own check in this pass, no add was ever sent;
            // otherwise an earlier pass's may still be on its way.
            return self.too_late(&id, first_add, !first_add).await.map(Ok);
        }
        if self.inner.store.directory_window() == Window::Closed {
            // Nothing sent: the Grant timer brings it to the next leader.
            return Ok(Ok(()));
        }
        let started = std::time::Instant::now();
        let added = self.bounded("add", dir.add_membership(&membership)).await;
        crate::metrics::directory_op("add", started.elapsed());
        match &added {
            Err(e) if e.is_transient() => self.directory_failed(),
            Err(_) => {}
            Ok(_) => self.directory_answered().await,
        }
        match added {
            Ok(Added::Added) if first_add => {}
            // A retry after a crash or a deposed leader: this add is
            // answered, but the earlier one may still be on its way and
            // land after the lease ended.
            Ok(Added::Added) => {
                self.transition(&id, &granting, |tx, rec| {
                    tx.audit(
                        about_lease(ENGINE_ACTOR, AuditAction::LeaseAddAmbiguous, &rec.lease).detail(
                            "an add sent before this retry got no answer and may still be on its way; jitbot \
                             looks for the membership again after the lease has ended",
                        ),
                    );
                    self.arm_recheck(tx, rec);
                    Ok(())
                })
                .await?;
            }
            // Only jitbot's first add can tell: after a crash the earlier
            // attempt may have landed, and then "already there" is ours.
            Ok(Added::AlreadyPresent) if first_add => {
                self.transition(&id, &granting, |tx, rec| {
                    rec.lease.added_by_someone_else();
                    tx.audit(
                        about_lease(ENGINE_ACTOR, AuditAction::LeaseAddedBySomeoneElse, &rec.lease).detail(
                            "the membership appeared between jitbot's check and its add; jitbot will not remove it",
                        ),
                    );
                    Ok(())
                })
                .await?;
            }
            // A retry after a crash: jitbot's own earlier add may have
            // landed, or somebody added the user meanwhile. There is no way
            // to tell, and leaving privilege behind is the worse mistake, so
            // jitbot claims it (and removes it at the end), and says so.
            Ok(Added::AlreadyPresent) => {
                self.transition(&id, &granting, |tx, rec| {
                    tx.audit(
                        about_lease(ENGINE_ACTOR, AuditAction::LeaseAddAmbiguous, &rec.lease).detail(
                            "after a restart the membership was already there; jitbot cannot tell its own \
                             earlier add from someone else's, so it will remove it when the lease ends",
                        ),
                    );
                    self.arm_recheck(tx, rec);
                    Ok(())
                })
                .await?;
            }
            Err(e) => {
                if first_add && !e.is_transient() {
                    // The server answered no to jitbot's only add: nothing
                    // of this lease landed, so the undo removes nothing (a
                    // person may add the user later; that is theirs).
                    self.transition(&id, &granting, |_, rec| {
                        rec.lease.never_added();
                        Ok(())
                    })
                    .await?;
                } else {
                    // No answer (or a retry after a crash): jitbot's add may
                    // have landed, and somebody may have added the user
                    // meanwhile. There is no telling whose the membership
                    // is, and leaving privilege behind is the worse mistake,
                    // so the undo removes it if it is there, and says so.
                    let detail = if first_add {
                        "the add got no answer; jitbot cannot tell whether it landed or whether somebody else \
                         added the user meanwhile, so the undo removes the membership if it is there"
                    } else {
                        "a retried add after a restart failed; jitbot cannot tell whether its earlier add \
                         landed, so the undo removes the membership if it is there"
                    };
                    self.transition(&id, &granting, |tx, rec| {
                        tx.audit(
                            about_lease(ENGINE_ACTOR, AuditAction::LeaseAddAmbiguous, &rec.lease)
                                .detail(detail),
                        );
                        self.arm_recheck(tx, rec);
                        Ok(())
                    })
                    .await?;
                }
                return self.grant_failed(&id, &e.to_string()).await.map(Ok);
            }
        }
        // This pass's add was answered; an earlier pass's (after a crash,
        // or a deposed leader's) may still be on its way.
        self.activate(&id, !first_add).await.map(Ok)
    }

    /// The directory could not be asked before the add (it is down or
    /// timed out): nothing was written, so the lease stays `Granting` and
    /// its `Grant` timer tries again after a backoff, audited each time.
    /// The backoff is as long as the grant has been failing so far (from
    /// `retry_base` up to `retry_max`: doubling, with nothing more stored).
    /// Only when the next try would come after the lease's end does the
    /// grant give up, telling the requester and the group why.
    async fn grant_retry(&self, id: &LeaseId, error: &DirectoryError) -> Result<GrantStep, EngineError> {
        self.directory_failed();
        let settings = self.inner.settings.clone();
        let now = self.now();
        let Some(rec) = self.inner.store.lease(id)? else {
            return Ok(GrantStep::Moved);
        };
        let failing_for = (now - rec.lease.starts_at).to_std().unwrap_or_default();
        let delay = failing_for
            .max(settings.retry_base.to_std())
            .min(settings.retry_max.to_std());
        let next = now + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX);
        if next >= rec.lease.expires_at {
            let text = format!(
                "{error}. jitbot kept retrying since the approval, but the directory did not answer \
                 before the approved time ran out, so nothing was added. Request again once the \
                 directory is back"
            );
            return self.grant_failed(id, &text).await.map(|()| GrantStep::Moved);
        }
        let shown = Span::from_secs(delay.as_secs().max(1));
        let retrying = self
            .transition(id, &[LeaseState::Granting], |tx, rec| {
                let first = rec.lease.last_error.is_none();
                rec.lease.last_error = Some(error.to_string());
                tx.set_timer(TimerKind::Grant, id.as_str(), next);
                tx.audit(
                    about_lease(ENGINE_ACTOR, AuditAction::LeaseGrantRetry, &rec.lease)
                        .detail(format!("{error}; nothing was added; next try in {shown}")),
                );
                if first {
                    tx.outbox(notice(
                        Audience::User {
                            user: rec.lease.user.clone(),
                            chat: rec.origin.clone(),
                        },
                        format!(
                            "Your access to `{}` is approved, but jitbot cannot reach the directory right \
                             now ({error}). It keeps trying until {} and tells you when you have it; \
                             nothing for you to do.",
                            rec.lease.group,
                            rec.lease.expires_at.format("%H:%M UTC")
                        ),
                        vec![],
                    ));
                }
                Ok(())
            })
            .await?;
        if retrying.is_some() {
            tracing::warn!(lease = %id, error = %error, retry_in = %shown, "grant waits for the directory");
            self.changed();
        }
        Ok(GrantStep::Waiting)
    }

    /// `Granting` → `Revoking` for a lease that ran out before its grant
    /// finished: whatever jitbot may have added is removed, nothing more.
    /// `in_flight`: an earlier pass (a process that stopped, a deposed
    /// leader) may have sent an add whose answer nobody read, still on its
    /// way: it is ambiguous, and re-checked after the end. An add this pass
    /// sent and saw answered is not.
    async fn too_late(&self, id: &LeaseId, add_never_sent: bool, in_flight: bool) -> Result<(), EngineError> {
        self.transition(id, &[LeaseState::Granting], |tx, rec| {
            let now = tx.now();
            if add_never_sent {
                rec.lease.never_added();
            } else if in_flight && rec.lease.owns_membership() {
                tx.audit(
                    about_lease(ENGINE_ACTOR, AuditAction::LeaseAddAmbiguous, &rec.lease).detail(
                        "an earlier attempt's add may still be on its way; jitbot removes the membership and \
                         looks for it again after the lease has ended",
                    ),
                );
                self.arm_recheck(tx, rec);
            }
            rec.lease.begin_revoke(EndReason::Expired, now)?;
            tx.clear_timer(TimerKind::Grant, id.as_str());
            tx.set_timer(TimerKind::Revoke, id.as_str(), now);
            tx.audit(
                about_lease(ENGINE_ACTOR, AuditAction::LeaseGrantTooLate, &rec.lease)
                    .detail("the lease ran out before the grant finished; what was added is removed"),
            );
            Ok(())
        })
        .await?;
        self.changed();
        Ok(())
    }

    /// `Granting` → `Active`: the membership is in place (or was never
    /// jitbot's to add). Arms the expiry and warning timers. A lease that ran
    /// out meanwhile is not activated: it goes to revoking instead.
    /// `in_flight`: as for [`Engine::too_late`].
    async fn activate(&self, id: &LeaseId, in_flight: bool) -> Result<(), EngineError> {
        if let Some(rec) = self.inner.store.lease(id)? {
            if rec.lease.state == LeaseState::Granting && self.now() >= rec.lease.expires_at {
                return self.too_late(id, false, in_flight).await;
            }
        }
        let done = self
            .transition(id, &[LeaseState::Granting], |tx, rec| {
                if tx.now() >= rec.lease.expires_at {
                    // Raced past the end since the check above: leave it
                    // granting; the next drive pass ends it.
                    return Ok(false);
                }
                rec.lease.activate()?;
                // A grant that waited for the directory carries its error
                // until now; an active lease has none.
                rec.lease.last_error = None;
                tx.clear_timer(TimerKind::Grant, id.as_str());
                self.arm_lease_timers(tx, rec);
                tx.audit(
                    about_lease(ENGINE_ACTOR, AuditAction::LeaseGranted, &rec.lease)
                        .request(&rec.lease.request)
                        .detail(format!("until {}", rec.lease.expires_at.to_rfc3339())),
                );
                let until = rec.lease.expires_at.format("%H:%M:%S UTC");
                tx.outbox(toned(
                    Tone::Granted,
                    Audience::Group(rec.lease.group.clone()),
                    format!(
                        "{} now has `{}` until {until} (lease {id}).",
                        rec.lease.user, rec.lease.group
                    ),
                    vec![],
                ));
                tx.outbox(notice(
                    Audience::User {
                        user: rec.lease.user.clone(),
                        chat: rec.origin.clone(),
                    },
                    format!(
                        "You have `{}` until {until}. Release it early with `/jit release {id}`.",
                        rec.lease.group
                    ),
                    vec![Action::Release(id.to_string()), Action::Extend(id.to_string())],
                ));
                Ok(true)
            })
            .await?;
        if done == Some(true) {
            crate::metrics::granted();
            self.changed();
        }
        Ok(())
    }

    /// The directory refused or failed the grant: `Granting` → `Revoking`,
    /// so the revoke step removes whatever jitbot may have added.
    async fn grant_failed(&self, id: &LeaseId, error: &str) -> Result<(), EngineError> {
        tracing::warn!(lease = %id, error, "grant failed; undoing");
        self.transition(id, &[LeaseState::Granting], |tx, rec| {
            let now = tx.now();
            rec.lease.begin_revoke(
                EndReason::GrantFailed {
                    error: error.to_string(),
                },
                now,
            )?;
            tx.clear_timer(TimerKind::Grant, id.as_str());
            tx.set_timer(TimerKind::Revoke, id.as_str(), now);
            tx.audit(about_lease(ENGINE_ACTOR, AuditAction::LeaseGrantFailed, &rec.lease).detail(error));
            let text = format!(
                "Granting `{}` to {} failed: {error}",
                rec.lease.group, rec.lease.user
            );
            let holder = Audience::User {
                user: rec.lease.user.clone(),
                chat: rec.origin.clone(),
            };
            tx.outbox(notice(holder, text.clone(), vec![]));
            tx.outbox(notice(Audience::Group(rec.lease.group.clone()), text, vec![]));
            Ok(())
        })
        .await?;
        self.changed();
        Ok(())
    }

    /// What a `Revoking` lease must remove: the recorded value, or, for a
    /// lease recorded before values were kept, the value today's
    /// configuration gives (an error if the group is gone: retried and
    /// alerted, never dropped).
    async fn to_remove(&self, rec: &LeaseRecord) -> Result<Option<Membership>, DirectoryError> {
        if !rec.lease.owns_membership() {
            return Ok(None);
        }
        if let Some(m) = &rec.lease.membership {
            return Ok(Some(m.clone()));
        }
        let policy = self.group(&rec.lease.group).map_err(|_| {
            DirectoryError::Refused(format!(
                "lease {} predates recorded memberships and group `{}` is no longer configured; \
                 put the group back in the config or remove {} from it by hand",
                rec.lease.id, rec.lease.group, rec.lease.user
            ))
        })?;
        self.bounded(
            "lookup",
            self.inner.directory.membership_of(&policy.dn, &rec.lease.user),
        )
        .await
        .map(Some)
    }

    /// One step of a `Revoking` lease: remove the value jitbot added, then
    /// `Revoking` → `Ended`. On failure the lease stays `Revoking` and its
    /// timer moves out by the backoff; after `alert_after` failures an
    /// alert goes out. It is never dropped.
    async fn revoke_step(&self, rec: LeaseRecord) -> Result<(), EngineError> {
        let id = rec.lease.id.clone();
        let removed = match self.to_remove(&rec).await {
            Ok(None) => Ok(None),
            Ok(Some(m)) => {
                let started = std::time::Instant::now();
                let removed = self
                    .bounded("remove", self.inner.directory.revoke_membership(&m))
                    .await;
                // The wait for a batch, the modify and the read-back, which
                // the LDAP backend also records as stages of their own.
                crate::metrics::directory_op("remove", started.elapsed());
                removed
            }
            Err(e) => Err(e),
        };
        // How the value was found, when it was not the one recorded.
        let note = match removed {
            Ok(note) => note.map(|n| format!(" ({n})")).unwrap_or_default(),
            Err(e) => {
                if e.is_transient() {
                    self.directory_failed();
                }
                return self.revoke_failed(&id, &e.to_string()).await;
            }
        };

        let committing = std::time::Instant::now();
        // Committed together with the ends of other revocations finishing
        // now (one store commit for all of them: see `ends.rs`).
        let ended = self.end_together(&id, note).await?;
        if let Some(expired_at) = ended {
            crate::metrics::stage("commit_after", committing.elapsed());
            // Measured once the end is durable: that is when it counts.
            if let Some(expired_at) = expired_at {
                let lag = (self.now() - expired_at).to_std().unwrap_or_default();
                crate::metrics::revocation_lag(lag);
            }
            crate::metrics::revoked();
            self.changed();
        }
        if rec.lease.owns_membership() {
            // The directory answered: revocations and grants that failed
            // meanwhile need not wait out their backoff.
            self.directory_answered().await;
        }
        Ok(())
    }

    /// `Revoking` → `Ended` for a lease whose membership is gone (or was
    /// never jitbot's): the audit record, the notices, an alert resolved.
    /// Staged by [`Engine::end_together`] through
    /// [`Engine::transition_each`]. Returns the expiry instant of a lease
    /// that ended by expiring (for the lag metric).
    pub(super) fn end_change(
        &self,
        tx: &mut Tx<'_>,
        rec: &mut LeaseRecord,
        note: &str,
    ) -> Result<Option<jitbot_core::Instant>, EngineError> {
        let id = rec.lease.id.clone();
        rec.lease.finish()?;
        tx.clear_timer(TimerKind::Revoke, id.as_str());
        self.recheck_from_end(tx, &id)?;
        let reason = rec.lease.end_reason.clone().unwrap_or(EndReason::Expired);
        let expired_at = matches!(reason, EndReason::Expired).then_some(rec.lease.expires_at);
        tx.audit(
            about_lease(ENGINE_ACTOR, AuditAction::LeaseEnded, &rec.lease).detail(format!(
                "{}; membership {}{note}",
                reason.describe(),
                if rec.lease.owns_membership() {
                    "removed"
                } else {
                    "left as it was before jitbot"
                }
            )),
        );
        match reason {
            EndReason::GrantFailed { .. } => {}
            EndReason::Drift => {
                tx.outbox(notice(
                    Audience::Alert,
                    format!(
                        "ZSP drift remediated: jitbot removed {} from `{}`.",
                        rec.lease.user, rec.lease.group
                    ),
                    vec![],
                ));
            }
            _ => {
                let text = format!(
                    "{}'s access to `{}` ended ({}).",
                    rec.lease.user,
                    rec.lease.group,
                    reason.describe()
                );
                tx.outbox(toned(
                    Tone::Locked,
                    Audience::Group(rec.lease.group.clone()),
                    text.clone(),
                    vec![],
                ));
                let holder = Audience::User {
                    user: rec.lease.user.clone(),
                    chat: rec.origin.clone(),
                };
                tx.outbox(toned(Tone::Locked, holder, text, vec![]));
            }
        }
        if rec.lease.alerted {
            let text = format!(
                "Resolved: {}'s membership of `{}` is removed after {} failed attempts.",
                rec.lease.user, rec.lease.group, rec.lease.revoke_attempts
            );
            tx.outbox(notice(Audience::Alert, text, vec![]));
        }
        Ok(expired_at)
    }

    async fn revoke_failed(&self, id: &LeaseId, error: &str) -> Result<(), EngineError> {
        let settings = self.inner.settings.clone();
        let jitter: f64 = self.jitter() * 0.5 + 0.5;
        let attempt = self
            .transition(id, &[LeaseState::Revoking], |tx, rec| {
                let attempt = rec.lease.revoke_failed(error);
                let delay = retry_delay(attempt, settings.retry_base, settings.retry_max, jitter);
                tx.set_timer(TimerKind::Revoke, id.as_str(), tx.now() + delay.to_chrono());
                tx.audit(
                    about_lease(ENGINE_ACTOR, AuditAction::LeaseRevokeFailed, &rec.lease)
                        .detail(format!("attempt {attempt}: {error}; next try in {delay}")),
                );
                if attempt >= settings.alert_after && !rec.lease.alerted {
                    rec.lease.alerted = true;
                    tx.outbox(toned(
                        Tone::Warning,
                        Audience::Alert,
                        format!(
                            "jitbot cannot remove {} from `{}` ({attempt} attempts: {error}). It keeps retrying; check the directory.",
                            rec.lease.user, rec.lease.group
                        ),
                        vec![],
                    ));
                }
                Ok(attempt)
            })
            .await?;
        if let Some(attempt) = attempt {
            crate::metrics::revoke_retry();
            tracing::warn!(lease = %id, attempt, error, "revocation failed; will retry");
            self.changed();
        }
        Ok(())
    }
}
