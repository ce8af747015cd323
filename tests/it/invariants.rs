//! Named regression tests for the ways a membership could outlive its lease
//! (issue "Leases that always end, by construction"). Each test names the
//! defect it guards; each failed on the engine before the executor and the
//! recorded memberships.

use crate::support::bot::{policy, seeded, Backend, TestBot, DB, WEB};
use crate::support::forward::{Forward, Hooks};
use crate::support::slapd::{self, Slapd, DB_ADMINS};
use async_trait::async_trait;
use chrono::Duration;
use jitbot::directory::ldap::LdapDirectory;
use jitbot::directory::memory::MemoryDirectory;
use jitbot::ports::{Added, Directory, DirectoryError, Membership};
use jitbot::store::{LeaseRecord, StoreError};
use jitbot_core::policy::Policy;
use jitbot_core::{GroupDn, Lease, LeaseId, LeaseState, RequestId, Span, UserId};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use tokio::sync::Notify;

crate::both_stores!(a_lease_on_a_group_dropped_from_the_config_is_still_revoked);
/// Defect 1: the lease revokes from what it recorded, not from the config.
async fn a_lease_on_a_group_dropped_from_the_config_is_still_revoked(backend: Backend) {
    let bot = backend.builder().build();
    let id = TestBot::request_id(&bot.ok("alice", "request db-admins 1h x").await);
    bot.ok("bob", &format!("approve {id}")).await;
    assert!(bot.is_member(DB, "alice"));

    let mut without = policy();
    without.groups.retain(|g| g.name.as_str() != "db-admins");
    let memory = bot.dir.clone();
    let bot = bot.restart(memory.clone(), without);
    bot.advance(Duration::hours(1));
    bot.run_due().await;
    assert_eq!(bot.lease().state, LeaseState::Ended);
    assert!(
        !memory.members(DB).contains("alice"),
        "removed although the group left the config"
    );
}

crate::both_stores!(a_lease_removes_from_the_dn_it_was_granted_in_after_the_dn_changes);
/// Defect 1: a changed `dn` does not send the removal to the new group.
async fn a_lease_removes_from_the_dn_it_was_granted_in_after_the_dn_changes(backend: Backend) {
    let bot = backend.builder().build();
    let id = TestBot::request_id(&bot.ok("alice", "request db-admins 1h x").await);
    bot.ok("bob", &format!("approve {id}")).await;

    let mut moved = policy();
    moved.groups[0].dn = GroupDn::new(WEB);
    let memory = bot.dir.clone();
    memory.add_group(WEB, ["dave", "alice"]); // alice's own standing membership there
    let bot = bot.restart(memory.clone(), moved);
    bot.advance(Duration::hours(1));
    bot.run_due().await;
    assert!(
        !memory.members(DB).contains("alice"),
        "removed from the DN written"
    );
    assert!(memory.members(WEB).contains("alice"), "the new DN is not touched");
}

/// A directory whose first membership check waits for the test, and whose
/// second one fails: the interleaving that used to end a lease under a
/// grant still in flight, which then added the member to an ended lease.
struct RacingChecks {
    inner: Arc<MemoryDirectory>,
    calls: AtomicU32,
    release: Notify,
}

#[async_trait]
impl Hooks for RacingChecks {
    fn inner(&self) -> &dyn Directory {
        &*self.inner
    }
    async fn has_membership(&self, m: &Membership) -> Result<bool, DirectoryError> {
        match self.calls.fetch_add(1, Ordering::SeqCst) {
            0 => self.release.notified().await,
            1 => return Err(DirectoryError::Unavailable("second check fails".into())),
            _ => {}
        }
        self.inner.has_membership(m).await
    }
}

crate::both_stores!(a_grant_run_twice_at_once_never_strands_a_membership);
/// Defect 2: the approving command and the scheduler's `Grant` timer never
/// work on one lease at once, and no step acts on a lease that moved on.
async fn a_grant_run_twice_at_once_never_strands_a_membership(backend: Backend) {
    let memory = seeded();
    let racing = Arc::new(Forward(RacingChecks {
        inner: memory.clone(),
        calls: AtomicU32::new(0),
        release: Notify::new(),
    }));
    let dir: Arc<dyn Directory> = racing.clone();
    let bot = backend.builder().wrap(|_| dir).build();
    let id = TestBot::request_id(&bot.ok("alice", "request db-admins 1h x").await);
    let approving = {
        let engine = bot.engine.clone();
        let text = format!("approve {id}");
        tokio::spawn(async move {
            let cmd = jitbot_core::Command::parse(&text).expect("parse");
            engine
                .execute(&jitbot::engine::Caller::new("bob", None), cmd)
                .await
        })
    };
    while racing.calls.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    // The scheduler fires the same grant while the first check hangs.
    let timers = bot
        .engine
        .store()
        .due_timers(bot.engine.now(), 10)
        .expect("timers");
    let firing = {
        let engine = bot.engine.clone();
        tokio::spawn(async move {
            for t in timers {
                engine.fire(t).await;
            }
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    racing.release.notify_one();
    approving.await.expect("approve");
    firing.await.expect("fire");
    bot.run_due().await;

    let lease = bot.lease();
    let member = memory.members(DB).contains("alice");
    assert!(
        lease.state == LeaseState::Active || !member,
        "a lease that is {:?} left alice in the group",
        lease.state
    );
    bot.advance(Duration::hours(1));
    bot.run_due().await;
    assert_eq!(bot.lease().state, LeaseState::Ended);
    assert!(!memory.members(DB).contains("alice"), "nothing left behind");
}

crate::both_stores!(a_second_request_while_one_is_pending_is_refused);
/// Defect 3: a second open request for the same group is refused, with a
/// pointer to the first.
async fn a_second_request_while_one_is_pending_is_refused(backend: Backend) {
    let bot = backend.builder().build();
    let first = TestBot::request_id(&bot.ok("alice", "request db-admins 1h x").await);
    let second = bot.say("alice", "request db-admins 2h y").await;
    assert!(!second.ok);
    assert!(second.text.contains(&first), "{}", second.text);
    // Case makes no second person.
    let third = bot.say("ALICE", "request db-admins 2h y").await;
    assert!(!third.ok, "{}", third.text);
}

crate::both_stores!(a_second_live_lease_of_one_user_and_group_is_refused_at_commit);
/// Defect 3: at commit, a second live lease of one (group, user) is refused
/// whatever path tries to write it.
async fn a_second_live_lease_of_one_user_and_group_is_refused_at_commit(backend: Backend) {
    let bot = backend.builder().build();
    let id = TestBot::request_id(&bot.ok("alice", "request db-admins 1h x").await);
    bot.ok("bob", &format!("approve {id}")).await;
    let store = bot.engine.store();
    let group = &policy().groups[0];
    let result = store
        .update(bot.engine.now(), |tx| {
            let lease = Lease::start(
                LeaseId::new("l-other"),
                RequestId::new("r-other"),
                group,
                UserId::new("Alice"),
                Span::from_hours(1),
                tx.now(),
            );
            tx.put_lease(LeaseRecord { lease, origin: None });
            Ok::<_, StoreError>(())
        })
        .await;
    assert!(matches!(result, Err(StoreError::Invariant(_))), "{result:?}");
    assert!(store.lease(&LeaseId::new("l-other")).unwrap().is_none());
}

crate::both_stores!(approving_a_grant_while_a_lease_is_active_extends_it);
/// Defect 3: approving a grant while the requester holds an active lease
/// (a request from before this rule, say) extends that lease instead.
async fn approving_a_grant_while_a_lease_is_active_extends_it(backend: Backend) {
    let bot = backend.builder().build();
    let first = TestBot::request_id(&bot.ok("alice", "request db-admins 1h x").await);
    // A second pending request, as an older jitbot could leave behind.
    let second = TestBot::request_id(&bot.ok("alice", "request web-admins 1h y").await);
    bot.engine
        .store()
        .update(bot.engine.now(), |tx| {
            let mut rec = tx.request(&RequestId::new(second.as_str()))?.expect("request");
            rec.request.group = jitbot_core::GroupName::new("db-admins");
            tx.put_request(rec);
            Ok::<_, StoreError>(())
        })
        .await
        .unwrap();
    bot.ok("bob", &format!("approve {first}")).await;
    let before = bot.lease().expires_at;
    bot.ok("bob", &format!("approve {second}")).await;
    let lease = bot.lease();
    assert_eq!(
        lease.expires_at,
        before + Duration::hours(1),
        "one lease, extended"
    );
    assert_eq!(bot.engine.store().live_leases().unwrap().len(), 1);
}

crate::both_stores!(zsp_checks_each_group_alone_and_remediates_write_ahead);
/// Defect 6: one group that cannot be read does not hide drift in others;
/// remediation goes through a durable lease, retried until it is done.
async fn zsp_checks_each_group_alone_and_remediates_write_ahead(backend: Backend) {
    let bot = backend
        .builder()
        .policy(|p| {
            p.groups[0].remediate = true;
            let mut broken = p.groups[1].clone();
            broken.name = jitbot_core::GroupName::new("gone");
            broken.dn = GroupDn::new("cn=gone,ou=groups,dc=example,dc=org");
            broken.zsp = true;
            p.groups.insert(0, broken);
        })
        .build();
    bot.dir
        .add_group("cn=nested,ou=groups,dc=example,dc=org", ["carol"]);
    bot.dir
        .add_group(DB, ["erin", "cn=nested,ou=groups,dc=example,dc=org"]);
    bot.dir.fail_next(0);
    let drift = bot
        .engine
        .check_zsp()
        .await
        .expect("the pass goes on past a missing group");
    let users: Vec<_> = drift
        .iter()
        .map(|d| (d.user.to_string(), d.via.is_some()))
        .collect();
    assert!(users.contains(&("erin".into(), false)), "{users:?}");
    assert!(
        users.contains(&("carol".into(), true)),
        "nested member reported: {users:?}"
    );
    assert!(
        bot.dir.members(DB).is_empty(),
        "direct values removed: {:?}",
        bot.dir.members(DB)
    );
    assert!(
        bot.dir
            .members("cn=nested,ou=groups,dc=example,dc=org")
            .contains("carol"),
        "only direct members are removed"
    );
    let actions = bot.audit_actions();
    assert!(actions.iter().any(|a| a == "zsp.check_failed"), "{actions:?}");

    // A removal that fails stays written and is retried.
    bot.dir.add_group(DB, ["dave"]);
    bot.dir.fail_next(1_000);
    let _ = bot.engine.check_zsp().await;
    bot.dir.fail_next(0);
    let pending: Vec<_> = bot
        .engine
        .store()
        .live_leases()
        .unwrap()
        .into_iter()
        .filter(|l| l.lease.state == LeaseState::Revoking)
        .collect();
    assert!(bot.dir.members(DB).contains("dave") || pending.is_empty());
    bot.advance(Duration::minutes(10));
    bot.run_due().await;
    let _ = bot.engine.check_zsp().await;
    bot.run_due().await;
    assert!(
        !bot.dir.members(DB).contains("dave"),
        "remediated once the directory is back"
    );
}

crate::both_stores!(a_deleted_user_is_removed_by_the_dn_written_at_grant);
/// Defect 7: a user deleted from the directory, named by another RDN than
/// the id attribute, is removed by the exact DN written at grant time.
async fn a_deleted_user_is_removed_by_the_dn_written_at_grant(backend: Backend) {
    let server = Slapd::start();
    let mut groups = slapd::group_configs();
    for g in &mut groups {
        if g.name == "db-admins" {
            g.requesters.users.push("evil,+\"\\<>;".into());
        }
    }
    let directory = LdapDirectory::new(&server.ldap_config(), &groups).expect("directory");
    let policy = Policy {
        groups: groups.iter().map(|g| g.to_policy()).collect(),
        admins: Default::default(),
    };
    let bot = backend
        .builder()
        .policy(|p| *p = policy)
        .directory(Arc::new(directory))
        .build();
    let weird = "cn=weird \\\"name\\\",ou=people,dc=example,dc=org";
    let id = TestBot::request_id(&bot.ok("evil,+\"\\<>;", "request db-admins 1h x").await);
    bot.ok("carol", &format!("approve {id}")).await;
    let written = bot.lease().membership.expect("recorded").value;
    assert!(
        server.values(DB_ADMINS, "member").await.contains(&written),
        "{written}"
    );

    let mut admin = server.admin().await;
    admin
        .delete(weird)
        .await
        .and_then(|r| r.success())
        .expect("delete the user");
    bot.advance(Duration::hours(1));
    bot.run_due().await;
    assert_eq!(bot.lease().state, LeaseState::Ended);
    let members = server.values(DB_ADMINS, "member").await;
    assert!(
        !members.contains(&written),
        "the dangling DN is gone: {members:?}"
    );
}

/// A directory whose adds never return: a crash just before the add.
struct HangingAdd(Arc<MemoryDirectory>);

#[async_trait]
impl Hooks for HangingAdd {
    fn inner(&self) -> &dyn Directory {
        &*self.0
    }
    async fn add_membership(&self, _: &Membership) -> Result<Added, DirectoryError> {
        std::future::pending().await
    }
}

crate::both_stores!(a_grant_finished_after_its_lease_expired_adds_nothing);
/// Defect 9: a grant whose lease ran out while jitbot was down adds nothing.
async fn a_grant_finished_after_its_lease_expired_adds_nothing(backend: Backend) {
    let memory = seeded();
    let hanging: Arc<dyn Directory> = Arc::new(Forward(HangingAdd(memory.clone())));
    let bot = backend.builder().wrap(|_| hanging).build();
    let id = TestBot::request_id(&bot.ok("alice", "request db-admins 1h x").await);
    let text = format!("approve {id}");
    let approve = bot.say("bob", &text);
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(200), approve)
            .await
            .is_err(),
        "the grant hangs at the add: jitbot dies there"
    );
    // jitbot stays down past the lease's end.
    let bot = bot.restart(memory.clone(), policy());
    bot.advance(Duration::hours(2));
    bot.run_due().await;
    assert_eq!(bot.lease().state, LeaseState::Ended);
    assert!(!memory.members(DB).contains("alice"));
    assert_eq!(memory.changes.load(Ordering::SeqCst), 0, "nothing was added");
    assert!(bot.audit_actions().iter().any(|a| a == "lease.grant_too_late"));
}

/// A directory that reports the member absent and then finds it present at
/// the add: somebody added it in between.
struct AddedMeanwhile(Arc<MemoryDirectory>);

#[async_trait]
impl Hooks for AddedMeanwhile {
    fn inner(&self) -> &dyn Directory {
        &*self.0
    }
    async fn has_membership(&self, m: &Membership) -> Result<bool, DirectoryError> {
        let was = self.0.has_membership(m).await?;
        // An operator adds it right after jitbot looked.
        self.0.add_membership(m).await?;
        Ok(was)
    }
}

crate::both_stores!(a_membership_added_by_someone_else_during_the_grant_is_never_removed);
/// Defect 10: "already a member" at jitbot's first add is someone else's
/// membership: recorded as standing, audited, never removed.
async fn a_membership_added_by_someone_else_during_the_grant_is_never_removed(backend: Backend) {
    let memory = seeded();
    let dir: Arc<dyn Directory> = Arc::new(Forward(AddedMeanwhile(memory.clone())));
    let bot = backend.builder().wrap(|_| dir).build();
    let id = TestBot::request_id(&bot.ok("alice", "request db-admins 1h x").await);
    bot.ok("bob", &format!("approve {id}")).await;
    assert_eq!(bot.lease().preexisting, Some(true));
    assert!(bot
        .audit_actions()
        .iter()
        .any(|a| a == "lease.added_by_someone_else"));
    bot.advance(Duration::hours(1));
    bot.run_due().await;
    assert_eq!(bot.lease().state, LeaseState::Ended);
    assert!(memory.members(DB).contains("alice"), "not jitbot's to remove");
}

crate::both_stores!(identities_that_differ_only_in_case_are_one_person);
/// Defect 11: account names compare as the directory compares them.
async fn identities_that_differ_only_in_case_are_one_person(backend: Backend) {
    let bot = backend
        .builder()
        .policy(|p| p.groups[0].approvals_required = 2)
        .build();
    let id = TestBot::request_id(&bot.ok("alice", "request db-admins 1h x").await);
    let own = bot.say("ALICE", &format!("approve {id}")).await;
    assert!(!own.ok, "no self-approval under another spelling: {}", own.text);
    bot.ok("bob", &format!("approve {id}")).await;
    let again = bot.ok("Bob", &format!("approve {id}")).await;
    assert!(again.contains("already"), "Bob and bob count once: {again}");
    bot.ok("carol", &format!("approve {id}")).await;
    assert_eq!(bot.lease().state, LeaseState::Active);
    // The directory spells the member differently: no drift.
    bot.dir.add_group(DB, ["Alice"]);
    let drift = bot.engine.check_zsp().await.unwrap();
    assert!(drift.is_empty(), "{drift:?}");
}

/// Defect 12: a failed flush stops all further store work (fail closed).
#[tokio::test]
async fn a_failed_flush_stops_the_store() {
    let bot = TestBot::new();
    bot.engine.store().fail_next_flush();
    let refused = bot.say("alice", "request db-admins 1h x").await;
    assert!(!refused.ok);
    assert!(refused.text.contains("restarted"), "{}", refused.text);
    let after = bot.say("alice", "request db-admins 1h x").await;
    assert!(!after.ok, "still closed: {}", after.text);
    assert!(bot.engine.store().due_timers(bot.engine.now(), 10).is_err());
}

crate::both_stores!(a_lowered_total_limit_binds_leases_already_running);
/// Defect 13: extensions of live leases obey today's total limit.
async fn a_lowered_total_limit_binds_leases_already_running(backend: Backend) {
    let bot = backend.builder().build();
    let id = TestBot::request_id(&bot.ok("alice", "request db-admins 1h x").await);
    bot.ok("bob", &format!("approve {id}")).await;
    let mut lowered = policy();
    lowered.groups[0].max_total_duration = Span::from_hours(2);
    let memory = bot.dir.clone();
    let bot = bot.restart(memory, lowered);
    let refused = bot.say("alice", "extend db-admins 3h").await;
    assert!(!refused.ok, "{}", refused.text);
    bot.ok("alice", "extend db-admins 1h").await;
}

/// A person adds the user right after jitbot's add was sent, and the add
/// then fails with `outcome`: the two cases the simulator's seed 302933
/// told apart.
struct AddFailsAfterAPersonAdds {
    memory: Arc<MemoryDirectory>,
    outcome: fn() -> DirectoryError,
}

#[async_trait]
impl Hooks for AddFailsAfterAPersonAdds {
    fn inner(&self) -> &dyn Directory {
        &*self.memory
    }
    async fn add_membership(&self, m: &Membership) -> Result<Added, DirectoryError> {
        self.memory.add_membership(m).await?;
        Err((self.outcome)())
    }
}

async fn grant_through(outcome: fn() -> DirectoryError) -> (TestBot, Arc<MemoryDirectory>) {
    let memory = seeded();
    let dir: Arc<dyn Directory> = Arc::new(Forward(AddFailsAfterAPersonAdds {
        memory: memory.clone(),
        outcome,
    }));
    let bot = TestBot::builder().wrap(|_| dir).build();
    let id = TestBot::request_id(&bot.ok("alice", "request db-admins 1h x").await);
    bot.ok("bob", &format!("approve {id}")).await;
    bot.run_due().await;
    (bot, memory)
}

/// Simulator seed 302933: jitbot's first add got no answer, and a person
/// had added the user meanwhile. Whose membership it is cannot be known;
/// the undo removes it (no privilege left behind) and the audit says that
/// it was ambiguous, so a person can put theirs back.
#[tokio::test]
async fn a_first_add_without_an_answer_is_undone_and_audited_as_ambiguous() {
    let (bot, memory) = grant_through(|| DirectoryError::Unavailable("timed out".into())).await;
    assert_eq!(bot.lease().state, LeaseState::Ended);
    assert!(!memory.members(DB).contains("alice"), "nothing left standing");
    assert!(
        bot.audit_actions().iter().any(|a| a == "lease.add_ambiguous"),
        "the removal of a membership that may be a person's is audited: {:?}",
        bot.audit_actions()
    );
}

/// The other side of seed 302933: a refused add landed nothing, so the
/// undo removes nothing, and the person's add stays.
#[tokio::test]
async fn a_refused_first_add_undoes_nothing_and_a_persons_add_stays() {
    let (bot, memory) = grant_through(|| DirectoryError::Refused("insufficient access".into())).await;
    assert_eq!(bot.lease().state, LeaseState::Ended);
    assert!(
        memory.members(DB).contains("alice"),
        "the person's membership is not jitbot's"
    );
    assert!(!bot.audit_actions().iter().any(|a| a == "lease.add_ambiguous"));
}

/// An add that gets no answer and reaches the directory later, when the
/// test says (`land`): a request held on the wire by a proxy or a
/// congested link, executed by the server whenever it arrives.
struct LateAdd {
    memory: Arc<MemoryDirectory>,
    on_the_wire: std::sync::Mutex<Vec<Membership>>,
    /// Removals still to fail (an outage after the read).
    failing_removals: AtomicU32,
}

impl LateAdd {
    /// The held adds reach the directory now.
    async fn land(&self) {
        let held = std::mem::take(&mut *self.on_the_wire.lock().unwrap());
        assert!(!held.is_empty(), "no add was on the wire");
        for m in held {
            self.memory.add_membership(&m).await.unwrap();
        }
    }
}

#[async_trait]
impl Hooks for LateAdd {
    fn inner(&self) -> &dyn Directory {
        &*self.memory
    }
    async fn add_membership(&self, m: &Membership) -> Result<Added, DirectoryError> {
        self.on_the_wire.lock().unwrap().push(m.clone());
        Err(DirectoryError::Unavailable(
            "the directory did not answer the add".into(),
        ))
    }
    async fn remove_membership(&self, m: &Membership) -> Result<(), DirectoryError> {
        let failing = self
            .failing_removals
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if failing.is_ok() {
            return Err(DirectoryError::Unavailable(
                "the directory did not answer the removal".into(),
            ));
        }
        self.memory.remove_membership(m).await
    }
}

/// The re-check's settle delay in these tests.
const SETTLE: u64 = 30;

/// alice's lease whose add got no answer, ended (its undo found nothing
/// to remove), with the add still on the wire.
async fn ended_with_an_add_on_the_wire() -> (TestBot, Arc<Forward<LateAdd>>, Arc<MemoryDirectory>) {
    let memory = seeded();
    let late = Arc::new(Forward(LateAdd {
        memory: memory.clone(),
        on_the_wire: Default::default(),
        failing_removals: AtomicU32::new(0),
    }));
    let dir: Arc<dyn Directory> = late.clone();
    let bot = TestBot::builder()
        .wrap(|_| dir)
        .settings(|s| s.recheck_after = Span::from_secs(SETTLE))
        .build();
    let id = TestBot::request_id(&bot.ok("alice", "request db-admins 1h x").await);
    bot.ok("bob", &format!("approve {id}")).await;
    bot.run_due().await;
    assert_eq!(bot.lease().state, LeaseState::Ended);
    assert!(bot.audit_actions().iter().any(|a| a == "lease.add_ambiguous"));
    assert!(
        !memory.members(DB).contains("alice"),
        "the add has not landed yet"
    );
    (bot, late, memory)
}

fn rechecks(bot: &TestBot) -> usize {
    jitbot::store::TimerKind::RECHECKS
        .iter()
        .map(|k| bot.engine.store().timers_of(*k).unwrap().len())
        .sum()
}

/// Issue 16 (brk16c finding 1), on sled: an add that got no answer lands
/// after its lease ended, when the undo had found nothing to remove. The
/// `Recheck` timer armed with the ambiguity looks again a settle delay
/// after the end, finds the membership, records the removal before making
/// it (`lease.late_add_found`), removes it and reads it back
/// (`lease.late_add_removed`), then drops the timer and alerts.
#[tokio::test]
async fn an_add_without_an_answer_that_lands_after_its_lease_ended_is_removed_by_the_recheck() {
    let (bot, late, memory) = ended_with_an_add_on_the_wire().await;
    assert_eq!(rechecks(&bot), 1, "the ambiguous add left a re-check armed");
    late.land().await;
    assert!(memory.members(DB).contains("alice"), "the late add landed");
    // Due a settle delay after the end, not before.
    bot.advance(Duration::seconds(SETTLE as i64 - 5));
    bot.run_due().await;
    assert!(memory.members(DB).contains("alice"));
    assert_eq!(rechecks(&bot), 1);
    bot.advance(Duration::seconds(10));
    bot.run_due().await;
    assert!(
        !memory.members(DB).contains("alice"),
        "the re-check removes the late add: {:?}",
        bot.audit_actions()
    );
    let actions = bot.audit_actions();
    let found = actions.iter().position(|a| a == "lease.late_add_found");
    let removed = actions.iter().position(|a| a == "lease.late_add_removed");
    assert!(
        found.is_some() && found < removed,
        "write-ahead, then done: {actions:?}"
    );
    assert_eq!(
        rechecks(&bot),
        0,
        "the re-check is dropped once the removal is read back"
    );
    let alerts = bot.engine.store().outbox(1000).unwrap();
    assert!(
        alerts
            .iter()
            .any(|(_, item, _)| format!("{item:?}").contains("after lease")),
        "the admins are told: {alerts:?}"
    );
}

/// The removal of a late add that fails is retried (the intent is on
/// record before the modify, and the timer stays) until it succeeds: a
/// settle delay later, when a removal that got no answer has landed or
/// died, not a retry's delay later.
#[tokio::test]
async fn a_failed_removal_of_a_late_add_is_retried_until_it_is_gone() {
    let (bot, late, memory) = ended_with_an_add_on_the_wire().await;
    late.land().await;
    late.failing_removals.store(1, Ordering::SeqCst);
    bot.advance(Duration::seconds(SETTLE as i64 + 1));
    bot.run_due().await;
    assert!(memory.members(DB).contains("alice"), "the first removal failed");
    assert!(bot.audit_actions().iter().any(|a| a == "lease.late_add_found"));
    assert!(!bot.audit_actions().iter().any(|a| a == "lease.late_add_removed"));
    assert_eq!(rechecks(&bot), 1, "and is retried");
    bot.advance(Duration::seconds(10));
    bot.run_due().await;
    assert!(memory.members(DB).contains("alice"), "not a retry's delay later");
    bot.advance(Duration::seconds(SETTLE as i64));
    bot.run_due().await;
    assert!(!memory.members(DB).contains("alice"));
    assert_eq!(rechecks(&bot), 0);
}

/// A late add whose removal keeps failing leaves a membership no lease
/// accounts for: `jitbot_revocation_overdue_seconds` counts it from when
/// the re-check found it (not from each retry's new look), so
/// `JitbotRevocationOverdue` pages; it is back to 0 once the removal is
/// read back. Review brk17b's last suspicion ("a late add whose removal
/// keeps failing pages no one").
#[tokio::test]
async fn a_late_add_whose_removal_keeps_failing_is_overdue_from_when_it_was_found() {
    let (bot, late, memory) = ended_with_an_add_on_the_wire().await;
    late.land().await;
    late.failing_removals.store(1_000, Ordering::SeqCst);
    let overdue = |bot: &TestBot| bot.engine.scrape_counts().unwrap().2;
    assert_eq!(overdue(&bot), std::time::Duration::ZERO, "nothing found yet");
    bot.advance(Duration::seconds(SETTLE as i64 + 1));
    bot.run_due().await;
    let found = bot
        .lease()
        .late_add_found_at
        .expect("the re-check found the late add");
    assert!(bot.audit_actions().iter().any(|a| a == "lease.late_add_found"));
    // Ten minutes of removals failing, a look every settle delay.
    for _ in 0..20 {
        bot.advance(Duration::seconds(SETTLE as i64));
        bot.run_due().await;
    }
    assert!(memory.members(DB).contains("alice"), "the removal keeps failing");
    assert_eq!(rechecks(&bot), 1, "and is retried");
    assert_eq!(
        bot.lease().late_add_found_at,
        Some(found),
        "a later look does not move the find"
    );
    let since = (bot.engine.now() - found).to_std().unwrap();
    assert!(since >= std::time::Duration::from_secs(600));
    assert_eq!(
        overdue(&bot),
        since,
        "the late add found {since:?} ago is still in the directory"
    );
    // The directory answers again: removed, read back, nothing overdue.
    late.failing_removals.store(0, Ordering::SeqCst);
    bot.advance(Duration::seconds(SETTLE as i64));
    bot.run_due().await;
    assert!(!memory.members(DB).contains("alice"));
    assert_eq!(rechecks(&bot), 0);
    assert_eq!(overdue(&bot), std::time::Duration::ZERO);
}

/// When nothing arrives late, the re-check looks once, says so in the
/// audit and is dropped; the membership stays absent.
#[tokio::test]
async fn a_recheck_that_finds_nothing_is_audited_and_dropped() {
    let (bot, _late, memory) = ended_with_an_add_on_the_wire().await;
    bot.advance(Duration::hours(2));
    bot.run_due().await;
    assert!(!memory.members(DB).contains("alice"));
    assert!(bot.audit_actions().iter().any(|a| a == "lease.rechecked"));
    assert!(!bot.audit_actions().iter().any(|a| a == "lease.late_add_found"));
    assert_eq!(rechecks(&bot), 0);
}

/// The late add lands, and before the re-check looks alice gets a new
/// lease, whose check takes the membership for standing (so it would never
/// remove it). The re-check cannot tell it from a person's add: the new
/// lease claims it (audited `lease.add_ambiguous`) and removes it at its
/// end, so no privilege is left behind.
#[tokio::test]
async fn a_late_add_a_new_lease_took_for_standing_is_claimed_by_that_lease() {
    let (bot, late, memory) = ended_with_an_add_on_the_wire().await;
    late.land().await;
    let id = TestBot::request_id(&bot.ok("alice", "request db-admins 1h x").await);
    bot.ok("bob", &format!("approve {id}")).await;
    bot.run_due().await;
    let leases = bot.engine.store().leases().unwrap();
    let new = leases
        .iter()
        .find(|l| l.lease.state == LeaseState::Active)
        .expect("alice's new lease is active");
    assert_eq!(
        new.lease.preexisting,
        Some(true),
        "it found the late add standing"
    );
    bot.advance(Duration::seconds(SETTLE as i64 + 1));
    bot.run_due().await;
    let claimed = bot.engine.store().lease(&new.lease.id).unwrap().unwrap();
    assert!(
        claimed.lease.owns_membership(),
        "the new lease claims the membership"
    );
    assert_eq!(rechecks(&bot), 0);
    bot.advance(Duration::hours(2));
    bot.run_due().await;
    assert!(
        !memory.members(DB).contains("alice"),
        "the late add is gone with the lease that claimed it: {:?}",
        bot.audit_actions()
    );
}

/// A directory whose add is answered only after two hours on `clock`:
/// the lease runs out while its only add is in flight, and the add is
/// answered (applied) all the same.
struct AnsweredAfterTheEnd {
    memory: Arc<MemoryDirectory>,
    clock: std::sync::OnceLock<jitbot::clock::ManualClock>,
}

#[async_trait]
impl Hooks for AnsweredAfterTheEnd {
    fn inner(&self) -> &dyn Directory {
        &*self.memory
    }
    async fn add_membership(&self, m: &Membership) -> Result<Added, DirectoryError> {
        if let Some(clock) = self.clock.get() {
            clock.advance(Duration::hours(2));
        }
        self.memory.add_membership(m).await
    }
}

/// Simulator seed 800144 (session 6, I1-standing): a grant whose only add
/// was answered after its lease had run out is revoked at once
/// (`lease.grant_too_late`). No add of jitbot's is left on its way, so no
/// re-check is armed, and a membership a person adds after the end stays.
/// (The re-check was armed for every grant finished too late, and removed
/// the person's membership a settle delay later.)
#[tokio::test]
async fn an_add_answered_after_its_lease_ran_out_arms_no_recheck_and_a_later_standing_membership_stays() {
    let memory = seeded();
    let slow = Arc::new(Forward(AnsweredAfterTheEnd {
        memory: memory.clone(),
        clock: std::sync::OnceLock::new(),
    }));
    let dir: Arc<dyn Directory> = slow.clone();
    let bot = TestBot::builder()
        .wrap(|_| dir)
        .settings(|s| s.recheck_after = Span::from_secs(SETTLE))
        .build();
    assert!(slow.clock.set(bot.clock.clone()).is_ok());
    let id = TestBot::request_id(&bot.ok("alice", "request db-admins 1h x").await);
    bot.say("bob", &format!("approve {id}")).await;
    bot.run_due().await;
    assert_eq!(bot.lease().state, LeaseState::Ended);
    assert!(bot.audit_actions().iter().any(|a| a == "lease.grant_too_late"));
    assert!(!memory.members(DB).contains("alice"), "the late grant was undone");
    assert_eq!(
        rechecks(&bot),
        0,
        "the only add was answered: nothing to look for again"
    );

    // A person adds alice after the lease ended.
    let mut members = memory.members(DB);
    members.insert("alice".to_string());
    memory.add_group(DB, members.iter().map(String::as_str));
    bot.advance(Duration::seconds(SETTLE as i64 + 1));
    bot.run_due().await;
    assert!(
        memory.members(DB).contains("alice"),
        "a membership a person added after the lease ended is theirs: jitbot removed it"
    );
}

/// Simulator seed 900550 (session 6, I2): a lease whose add got no answer
/// ended; the group's `dn` then changed, and a new lease of the same user
/// and group name was granted in the new directory group. The old add
/// landed in the old one, and the re-check left it to the new lease (same
/// group name), which writes elsewhere: left for good. A re-check now
/// leaves a late add only to a lease that writes in the same directory
/// group.
#[tokio::test]
async fn a_late_add_in_the_old_dn_is_removed_though_a_new_lease_holds_the_group_under_its_new_dn() {
    let (bot, late, memory) = ended_with_an_add_on_the_wire().await;
    // The config moves db-admins to another directory group; alice's new
    // lease is granted there.
    const MOVED: &str = "cn=db-ops,ou=groups,dc=example,dc=org";
    memory.add_group(MOVED, []);
    let mut moved = policy();
    moved.groups[0].dn = GroupDn::new(MOVED);
    let bot = bot.restart(memory.clone(), moved);
    let id = TestBot::request_id(&bot.ok("alice", "request db-admins 1h again").await);
    bot.ok("bob", &format!("approve {id}")).await;
    bot.run_due().await;
    assert!(
        memory.members(MOVED).contains("alice"),
        "the new lease is granted"
    );

    // The old add lands in the old group; the re-check falls due.
    late.land().await;
    assert!(memory.members(DB).contains("alice"));
    bot.advance(Duration::seconds(SETTLE as i64 + 1));
    bot.run_due().await;
    assert!(
        !memory.members(DB).contains("alice"),
        "the late add in the old directory group was left to the new lease, which writes in {MOVED}: {:?}",
        bot.audit_actions()
    );
    assert!(
        memory.members(MOVED).contains("alice"),
        "the new lease keeps its membership"
    );
}
