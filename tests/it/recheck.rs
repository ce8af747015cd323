//! The re-check after an add that got no answer (`src/engine/recheck.rs`)
//! against the fourth review of issue 16 (brk16d): a late add that lands
//! while a new lease of the same user and group is being granted, an add
//! sent before a restart whose retry was answered, a new lease granted
//! while the re-check's removal is on its way (or recorded before a
//! restart), and a late add found while the live lease's removal may
//! already be made; and against the fifth review (brk16e): a re-check's
//! removal that gets no answer, or is sent before a restart, and a group
//! `dn` re-spelled in the config. The in-memory directory sits behind a
//! [`Wire`] the test controls: an add or a removal can be held on the
//! wire and land later, or hang unanswered; and it compares group DNs as
//! an LDAP server does.

use crate::support::bot::{seeded, TestBot, WEB};
use crate::support::forward::{Forward, Hooks};
use async_trait::async_trait;
use chrono::Duration;
use jitbot::directory::memory::MemoryDirectory;
use jitbot::engine::Caller;
use jitbot::ports::{Added, Directory, DirectoryError};
use jitbot::store::TimerKind;
use jitbot_core::{Command, GroupDn, LeaseState, Membership, Span};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

/// The in-memory directory behind a network path the test controls: an
/// add can get no answer and be held on the wire (`hold_adds`) until it
/// lands (`land`), so can a removal (`hold_removals`, `hang_removals`;
/// `land_removals`), and the next add or removal can be held at a gate
/// (`gate_adds`, `gate_removals`) until the test opens it (`open`).
struct Wire {
    memory: Arc<MemoryDirectory>,
    held: Mutex<Vec<Membership>>,
    held_removals: Mutex<Vec<Membership>>,
    hold_adds: AtomicU32,
    /// Removals still to get no answer: held on the wire, failing `Unavailable`.
    hold_removals: AtomicU32,
    /// Removals still to hang: sent (held on the wire) and never answered.
    hang_removals: AtomicU32,
    /// Adds still to hang: sent (held on the wire) and never answered.
    hang_adds: AtomicU32,
    gate_adds: AtomicBool,
    gate_removals: AtomicBool,
    /// The next removal is made, and its answer held at the gate.
    gate_removal_answers: AtomicBool,
    /// Calls that reached the gate.
    at_gate: AtomicU32,
    gate: tokio::sync::Semaphore,
    /// The member value the directory gives every user from now on (their
    /// entry moved), when set.
    moved: Mutex<Option<String>>,
    /// The identity (`entryUUID:…`) the directory records for every
    /// membership from now on, when set.
    identity: Mutex<Option<String>>,
}

impl Wire {
    fn new(memory: Arc<MemoryDirectory>) -> Arc<Forward<Wire>> {
        Arc::new(Forward(Wire {
            memory,
            held: Mutex::new(Vec::new()),
            held_removals: Mutex::new(Vec::new()),
            hold_adds: AtomicU32::new(0),
            hold_removals: AtomicU32::new(0),
            hang_removals: AtomicU32::new(0),
            hang_adds: AtomicU32::new(0),
            gate_adds: AtomicBool::new(false),
            gate_removals: AtomicBool::new(false),
            gate_removal_answers: AtomicBool::new(false),
            at_gate: AtomicU32::new(0),
            gate: tokio::sync::Semaphore::new(0),
            moved: Mutex::new(None),
            identity: Mutex::new(None),
        }))
    }

    /// The adds held on the wire reach the directory now.
    async fn land(&self) {
        let held = std::mem::take(&mut *self.held.lock().unwrap());
        assert!(!held.is_empty(), "no add was on the wire");
        for m in held {
            self.memory.add_membership(&m).await.unwrap();
        }
    }

    /// The removals held on the wire reach the directory now.
    async fn land_removals(&self) {
        let held = std::mem::take(&mut *self.held_removals.lock().unwrap());
        assert!(!held.is_empty(), "no removal was on the wire");
        for m in held {
            self.memory.remove_membership(&m).await.unwrap();
        }
    }

    /// Waits until a removal is on the wire.
    async fn wait_for_a_removal(&self) {
        let started = std::time::Instant::now();
        while self.held_removals.lock().unwrap().is_empty() {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(10),
                "no removal was sent within 10 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    async fn pass_gate(&self, armed: &AtomicBool) {
        if armed.swap(false, Ordering::SeqCst) {
            self.at_gate.fetch_add(1, Ordering::SeqCst);
            self.gate.acquire().await.expect("the gate").forget();
        }
    }

    /// Waits until `n` calls have reached the gate.
    async fn wait_at_gate(&self, n: u32) {
        let started = std::time::Instant::now();
        while self.at_gate.load(Ordering::SeqCst) < n {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(10),
                "no call reached the gate within 10 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    fn open(&self) {
        self.gate.add_permits(1);
    }
}

/// `m` with its group DN spelled as the in-memory directory holds it,
/// when it names the same entry as the directory compares DNs (LDAP
/// servers ignore case and the spaces around separators, so
/// `cn=web-admins, ou=groups, …` is the entry `cn=web-admins,ou=groups,…`).
fn as_the_server_reads(m: &Membership) -> Membership {
    let spelled = |dn: &str| {
        dn.split(',')
            .map(|rdn| rdn.trim().to_ascii_lowercase())
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut m = m.clone();
    if spelled(m.group.as_str()) == spelled(WEB) {
        m.group = GroupDn::new(WEB);
    }
    m
}

fn take_one(n: &AtomicU32) -> bool {
    n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

#[async_trait]
impl Hooks for Wire {
    fn inner(&self) -> &dyn Directory {
        &*self.memory
    }
    async fn membership_of(
        &self,
        g: &GroupDn,
        u: &jitbot_core::UserId,
    ) -> Result<Membership, DirectoryError> {
        let mut m = self.memory.membership_of(g, u).await?;
        if let Some(value) = self.moved.lock().unwrap().clone() {
            m.value = value;
        }
        if let Some(identity) = self.identity.lock().unwrap().clone() {
            m.identity = Some(identity);
        }
        Ok(m)
    }
    async fn has_membership(&self, m: &Membership) -> Result<bool, DirectoryError> {
        self.memory.has_membership(&as_the_server_reads(m)).await
    }
    async fn add_membership(&self, m: &Membership) -> Result<Added, DirectoryError> {
        let m = &as_the_server_reads(m);
        let hold = self
            .hold_adds
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if hold.is_ok() {
            self.held.lock().unwrap().push(m.clone());
            return Err(DirectoryError::Unavailable(
                "the directory did not answer the add".into(),
            ));
        }
        let hang = self
            .hang_adds
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if hang.is_ok() {
            self.held.lock().unwrap().push(m.clone());
            self.at_gate.fetch_add(1, Ordering::SeqCst);
            return std::future::pending().await;
        }
        self.pass_gate(&self.gate_adds).await;
        self.memory.add_membership(m).await
    }
    async fn remove_membership(&self, m: &Membership) -> Result<(), DirectoryError> {
        let m = &as_the_server_reads(m);
        if take_one(&self.hold_removals) {
            self.held_removals.lock().unwrap().push(m.clone());
            return Err(DirectoryError::Unavailable(
                "the directory did not answer the removal".into(),
            ));
        }
        if take_one(&self.hang_removals) {
            self.held_removals.lock().unwrap().push(m.clone());
            return std::future::pending().await;
        }
        self.pass_gate(&self.gate_removals).await;
        let removed = self.memory.remove_membership(m).await;
        self.pass_gate(&self.gate_removal_answers).await;
        removed
    }
}

/// The re-check's settle delay in these tests.
const SETTLE: i64 = 30;

/// A sled bot on a [`Wire`] directory, with its memory.
fn wired_bot() -> (TestBot, Arc<Forward<Wire>>, Arc<MemoryDirectory>) {
    let memory = seeded();
    let wire = Wire::new(memory.clone());
    let dir: Arc<dyn Directory> = wire.clone();
    let bot = TestBot::builder()
        .wrap(|_| dir)
        .settings(|s| s.recheck_after = Span::from_secs(SETTLE as u64))
        .build();
    (bot, wire, memory)
}

/// alice's web-admins lease (web-admins is no ZSP group: no drift monitor
/// looks at it) whose add got no answer and is held on the wire; the
/// lease ended (its undo found nothing), its re-check armed.
async fn an_add_on_the_wire(bot: &TestBot, wire: &Wire, memory: &MemoryDirectory) {
    wire.hold_adds.store(1, Ordering::SeqCst);
    let id = TestBot::request_id(&bot.ok("alice", "request web-admins 1h first").await);
    bot.ok("bob", &format!("approve {id}")).await;
    bot.run_due().await;
    assert_eq!(bot.lease().state, LeaseState::Ended);
    assert!(bot.audit_actions().iter().any(|a| a == "lease.add_ambiguous"));
    assert_eq!(rechecks(bot), 1, "the ambiguous add armed a re-check");
    assert!(!memory.members(WEB).contains("alice"), "not landed yet");
}

/// Pending re-checks, of either kind (`RecheckRemoval` once a late add
/// was found and its removal recorded).
fn rechecks(bot: &TestBot) -> usize {
    TimerKind::RECHECKS
        .iter()
        .map(|k| bot.engine.store().timers_of(*k).unwrap().len())
        .sum()
}

/// Whether the re-check has recorded a removal that may be on its way.
fn removing(bot: &TestBot) -> bool {
    !bot.engine
        .store()
        .timers_of(TimerKind::RecheckRemoval)
        .unwrap()
        .is_empty()
}

/// Fires the due re-check timers only (as the scheduler's pass would,
/// while other work of the same moment is still under way).
async fn fire_rechecks(bot: &TestBot) {
    let due = bot.engine.store().due_timers(bot.engine.now(), 1000).unwrap();
    let mut fired = 0;
    for t in due.into_iter().filter(|t| TimerKind::RECHECKS.contains(&t.kind)) {
        bot.engine.fire(t).await;
        fired += 1;
    }
    assert_eq!(fired, 1, "one re-check was due");
}

/// Fires the due `Recheck` timer on a task of its own (the test holds its
/// removal at the gate).
fn fire_the_recheck_on_a_task(bot: &TestBot) -> tokio::task::JoinHandle<()> {
    let engine = bot.engine.clone();
    let due = bot
        .engine
        .store()
        .due_timers(bot.engine.now(), 1000)
        .unwrap()
        .into_iter()
        .find(|t| TimerKind::RECHECKS.contains(&t.kind))
        .expect("the re-check is due");
    tokio::spawn(async move { engine.fire(due).await })
}

/// Approves request `id` as bob on a task of its own (the approval
/// drives the grant, which the test holds at the gate).
fn approve_on_a_task(bot: &TestBot, id: &str) -> tokio::task::JoinHandle<jitbot::engine::Reply> {
    let engine = bot.engine.clone();
    let cmd = Command::parse(&format!("approve {id}")).unwrap();
    tokio::spawn(async move { engine.execute(&Caller::new("bob", None), cmd).await })
}

/// Review brk16d, finding 1: alice's first lease's add got no answer
/// (held on the wire) and the lease ended. Her new lease L2 checks the
/// group (absent) and sends its add; the first add lands and the first
/// lease's re-check falls due while L2's add is unanswered. The re-check
/// once left the membership to L2 and dropped itself; L2's add was then
/// answered "already there", L2 took it for a person's, and nobody removed
/// it. The re-check now waits until L2's grant has settled (it takes the
/// membership's turn after L2's add is answered), then finds L2 holding it
/// as standing and makes L2 claim it, so L2's end removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_add_landing_between_a_new_leases_check_and_its_add_is_claimed_by_that_lease() {
    let (bot, wire, memory) = wired_bot();
    an_add_on_the_wire(&bot, &wire, &memory).await;

    // L2: the check finds nothing; the add waits on its way.
    wire.gate_adds.store(true, Ordering::SeqCst);
    let id = TestBot::request_id(&bot.ok("alice", "request web-admins 1h again").await);
    let approving = approve_on_a_task(&bot, &id);
    wire.wait_at_gate(1).await;
    // The first lease's add lands; its re-check falls due and waits for
    // the membership's turn while L2's add is unanswered.
    wire.land().await;
    assert!(memory.members(WEB).contains("alice"));
    bot.advance(Duration::seconds(SETTLE + 1));
    let rechecking = fire_the_recheck_on_a_task(&bot);
    // L2's add arrives: "already there".
    wire.open();
    let reply = approving.await.unwrap();
    assert!(reply.ok, "the approval: {}", reply.text);
    rechecking.await.unwrap();
    assert!(memory.members(WEB).contains("alice"));

    // L2 runs out.
    bot.advance(Duration::hours(2));
    bot.run_due().await;
    let leases = bot.engine.store().leases().unwrap();
    assert!(
        leases.iter().all(|l| l.lease.state == LeaseState::Ended),
        "both leases ended: {leases:?}"
    );
    assert!(
        !memory.members(WEB).contains("alice"),
        "both of alice's leases ended, yet she is still in web-admins, and nothing will remove her: \
         re-checks left {}, L2 preexisting {:?}; audit: {:?}",
        rechecks(&bot),
        leases.iter().map(|l| l.lease.preexisting).collect::<Vec<_>>(),
        bot.audit_actions()
    );
}

/// Review brk16d, finding 2: jitbot stops while alice's add is sent and
/// unanswered; after the restart the grant's retry is answered "added"
/// (the first add is still on the wire). That retry is ambiguous about the
/// earlier add, so it arms the re-check: when the first add lands after
/// the lease ended, the re-check removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_add_sent_before_a_restart_that_lands_after_the_lease_ended_is_rechecked() {
    let (bot, wire, memory) = wired_bot();
    wire.hang_adds.store(1, Ordering::SeqCst);
    let id = TestBot::request_id(&bot.ok("alice", "request web-admins 1h work").await);
    let approving = approve_on_a_task(&bot, &id);
    wire.wait_at_gate(1).await;
    // jitbot stops with the add sent and unanswered.
    approving.abort();
    assert!(approving.await.is_err(), "the approval was stopped mid-add");
    let lease = bot.lease();
    assert_eq!(lease.state, LeaseState::Granting);
    assert_eq!(
        lease.preexisting,
        Some(false),
        "the add was on record before it was sent"
    );
    let directory: Arc<dyn Directory> = wire.clone();
    let bot = bot.restart(directory, crate::support::bot::policy());

    // The restart's Grant timer adds again; the directory answers.
    bot.advance(Duration::seconds(5));
    bot.run_due().await;
    assert_eq!(bot.lease().state, LeaseState::Active);
    assert!(memory.members(WEB).contains("alice"));
    // The lease runs out and is removed.
    bot.advance(Duration::hours(2));
    bot.run_due().await;
    assert_eq!(bot.lease().state, LeaseState::Ended);
    assert!(!memory.members(WEB).contains("alice"));
    // The first add, sent before the restart, lands now.
    wire.land().await;
    bot.advance(Duration::hours(1));
    bot.run_due().await;
    assert!(
        !memory.members(WEB).contains("alice"),
        "alice's lease ended an hour ago, yet the add sent before the restart landed and she is in \
         web-admins for good: no re-check was armed (re-checks {}); audit: {:?}",
        rechecks(&bot),
        bot.audit_actions()
    );
}

/// Review brk16d, finding 3: the first lease's add landed late; its
/// re-check falls due, finds the membership and no live lease, records
/// `lease.late_add_found` and sends the removal. While the removal is on
/// its way, alice's new request is approved. Her new lease L2's check
/// once found the membership (the late add, not yet removed) and took it
/// for standing, so L2 added nothing and went active ("You have
/// `web-admins` until …"); then the re-check's removal landed: alice held
/// an active lease and was not in the group, and L2, taking it for
/// standing, never added it back. The re-check acts for a lease that left
/// the slot, so the slot rule cannot keep the two apart: the re-check's
/// removal and a grant's check and add of the same membership now take
/// turns, and L2 checks after the removal, finds nothing and adds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_lease_granted_while_a_recheck_removes_a_late_add_keeps_its_membership() {
    let (bot, wire, memory) = wired_bot();
    an_add_on_the_wire(&bot, &wire, &memory).await;
    wire.land().await;

    // The re-check's removal waits on its way.
    wire.gate_removals.store(true, Ordering::SeqCst);
    bot.advance(Duration::seconds(SETTLE + 1));
    let rechecking = fire_the_recheck_on_a_task(&bot);
    wire.wait_at_gate(1).await;
    assert!(bot.audit_actions().iter().any(|a| a == "lease.late_add_found"));

    // alice's new lease is approved meanwhile. Its grant is given a second
    // to run ahead of the removal (before the fix it did: it found the late
    // add, took it for standing and went active).
    let id = TestBot::request_id(&bot.ok("alice", "request web-admins 1h again").await);
    let mut approving = approve_on_a_task(&bot, &id);
    let early = tokio::time::timeout(std::time::Duration::from_secs(1), &mut approving).await;
    // The removal lands.
    wire.open();
    rechecking.await.unwrap();
    let reply = match early {
        Ok(reply) => reply.unwrap(),
        Err(_) => approving.await.unwrap(),
    };
    assert!(reply.ok, "the approval: {}", reply.text);
    bot.run_due().await;

    let live = bot.engine.store().live_leases().unwrap();
    assert_eq!(live.len(), 1, "alice's new lease: {live:?}");
    assert_eq!(live[0].lease.state, LeaseState::Active);
    assert!(
        memory.members(WEB).contains("alice"),
        "alice's new lease {} is active (she was told she has web-admins until {}), yet she is not \
         in web-admins: the first lease's re-check removed it after the new lease took it for standing; \
         audit: {:?}",
        live[0].lease.id,
        live[0].lease.expires_at,
        bot.audit_actions()
    );
    assert_eq!(
        live[0].lease.preexisting,
        Some(false),
        "the new lease added the membership itself, after the removal"
    );
    // The new lease ends and removes what it added; nothing is left over.
    bot.advance(Duration::hours(2));
    bot.run_due().await;
    assert!(!memory.members(WEB).contains("alice"));
    assert_eq!(rechecks(&bot), 0);
}

/// The crash between finding 3's two steps: the re-check records
/// `lease.late_add_found` and jitbot stops before the modify is sent.
/// After the restart, alice's new lease L2 is approved before the
/// re-check's retry. Its check once found the late add and took it for
/// standing (then claimed it at the retry). The record of the removal is
/// now a durable claim on the membership (a `RecheckRemoval` timer): L2
/// waits; the retried re-check removes the late add; L2 then finds
/// nothing and adds its own, and its end removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_add_whose_removal_was_recorded_before_a_restart_is_removed_before_the_next_lease_adds() {
    let (bot, wire, memory) = wired_bot();
    an_add_on_the_wire(&bot, &wire, &memory).await;
    wire.land().await;

    // The re-check records the removal; jitbot stops before the modify.
    wire.gate_removals.store(true, Ordering::SeqCst);
    bot.advance(Duration::seconds(SETTLE + 1));
    let rechecking = fire_the_recheck_on_a_task(&bot);
    wire.wait_at_gate(1).await;
    assert!(bot.audit_actions().iter().any(|a| a == "lease.late_add_found"));
    rechecking.abort();
    assert!(
        rechecking.await.is_err(),
        "the re-check was stopped before its modify"
    );
    let directory: Arc<dyn Directory> = wire.clone();
    let bot = bot.restart(directory, crate::support::bot::policy());
    assert!(memory.members(WEB).contains("alice"), "no removal was made");
    assert_eq!(rechecks(&bot), 1, "the re-check is kept for its retry");
    assert!(removing(&bot), "the removal is on record");

    // alice's new lease is approved before the re-check's retry is due:
    // it waits for the re-check.
    let id = TestBot::request_id(&bot.ok("alice", "request web-admins 1h again").await);
    bot.ok("bob", &format!("approve {id}")).await;
    let l2 = bot.engine.store().live_leases().unwrap()[0].lease.clone();
    assert_eq!(
        l2.state,
        LeaseState::Granting,
        "L2 waits for the re-check; audit: {:?}",
        bot.audit_actions()
    );
    assert_eq!(l2.preexisting, None, "L2 has not taken the late add");

    // The re-check's retry removes the late add; L2 then adds its own.
    bot.advance(Duration::seconds(SETTLE + 1));
    bot.run_due().await;
    bot.advance(Duration::seconds(10));
    bot.run_due().await;
    assert_eq!(rechecks(&bot), 0, "the re-check is done");
    assert!(bot.audit_actions().iter().any(|a| a == "lease.late_add_removed"));
    let l2 = bot.engine.store().lease(&l2.id).unwrap().unwrap().lease;
    assert_eq!(l2.state, LeaseState::Active, "audit: {:?}", bot.audit_actions());
    assert_eq!(l2.preexisting, Some(false), "L2 added the membership itself");
    assert!(
        memory.members(WEB).contains("alice"),
        "alice has it while L2 lasts"
    );

    // L2 ends and removes it.
    bot.advance(Duration::hours(2));
    bot.run_due().await;
    assert!(
        !memory.members(WEB).contains("alice"),
        "both of alice's leases ended, yet she is in web-admins; audit: {:?}",
        bot.audit_actions()
    );
}

/// Review brk16d, finding 4: the first lease's add is on the wire;
/// alice's second lease L2 is granted (its own add, answered) and she
/// releases it. L2's removal is made by the directory, and while its
/// answer is on the way back the first add lands and the first lease's
/// re-check falls due: it finds the membership and L2 live (revoking) and
/// owning it. It once dropped itself there ("held by live lease L2; left
/// to that lease"), but L2's removal had already been made: L2 ended
/// "membership removed", and the late add stayed with nobody to remove
/// it. A holder whose removal may be behind it is no heir: the re-check
/// waits until L2 has ended, looks again, finds no live lease and removes
/// the late add.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_add_is_not_left_to_a_lease_whose_removal_may_already_be_made() {
    let (bot, wire, memory) = wired_bot();
    an_add_on_the_wire(&bot, &wire, &memory).await;
    let id = TestBot::request_id(&bot.ok("alice", "request web-admins 1h again").await);
    bot.ok("bob", &format!("approve {id}")).await;
    bot.run_due().await;
    assert!(memory.members(WEB).contains("alice"), "L2 granted");
    let l2 = bot.engine.store().live_leases().unwrap()[0].lease.id.to_string();

    // alice releases L2; the directory removes the value, and the answer
    // is on its way back.
    wire.gate_removal_answers.store(true, Ordering::SeqCst);
    let releasing = {
        let engine = bot.engine.clone();
        let cmd = Command::parse(&format!("release {l2}")).unwrap();
        tokio::spawn(async move { engine.execute(&Caller::new("alice", None), cmd).await })
    };
    wire.wait_at_gate(1).await;
    assert!(!memory.members(WEB).contains("alice"), "L2's removal is made");
    // The first lease's add lands; its re-check falls due and runs.
    wire.land().await;
    bot.advance(Duration::seconds(SETTLE + 1));
    fire_rechecks(&bot).await;
    // L2's removal is answered: L2 ends.
    wire.open();
    let reply = releasing.await.unwrap();
    assert!(reply.ok, "the release: {}", reply.text);
    bot.advance(Duration::hours(2));
    bot.run_due().await;
    let leases = bot.engine.store().leases().unwrap();
    assert!(leases.iter().all(|l| l.lease.state == LeaseState::Ended));
    assert!(
        !memory.members(WEB).contains("alice"),
        "both of alice's leases ended, yet the first lease's late add stays in web-admins with nothing to \
         remove it (re-checks left {}); audit: {:?}",
        rechecks(&bot),
        bot.audit_actions()
    );
    assert_eq!(rechecks(&bot), 0);
    assert!(bot.audit_actions().iter().any(|a| a == "lease.late_add_removed"));
}

/// alice's first lease's add got no answer and landed after the lease
/// ended.
async fn a_late_add_landed(bot: &TestBot, wire: &Wire, memory: &MemoryDirectory) {
    an_add_on_the_wire(bot, wire, memory).await;
    wire.land().await;
    assert!(memory.members(WEB).contains("alice"), "the late add landed");
}

/// The re-check's retry falls due and runs (a settle delay on), then the
/// waiting grant's retry.
async fn the_recheck_then_the_grant_run(bot: &TestBot) {
    bot.advance(Duration::seconds(SETTLE + 1));
    bot.run_due().await;
    bot.advance(Duration::seconds(10));
    bot.run_due().await;
}

/// After a new lease's grant: it waited for the re-check, which is done,
/// then added its own membership; alice has it while the lease lasts,
/// and nothing is left once it ends.
async fn the_new_lease_added_its_own(bot: &TestBot, memory: &MemoryDirectory, l2: &jitbot_core::LeaseId) {
    let l2 = bot.engine.store().lease(l2).unwrap().unwrap().lease;
    assert_eq!(rechecks(bot), 0, "the re-check is done");
    assert_eq!(
        l2.state,
        LeaseState::Active,
        "alice's new lease; audit: {:?}",
        bot.audit_actions()
    );
    assert!(
        memory.members(WEB).contains("alice"),
        "alice's new lease {} is active (she was told she has web-admins until {}), yet she is not \
         in web-admins (preexisting {:?}); audit: {:?}",
        l2.id,
        l2.expires_at,
        l2.preexisting,
        bot.audit_actions()
    );
    assert_eq!(
        l2.preexisting,
        Some(false),
        "the new lease added the membership itself"
    );
    bot.advance(Duration::hours(2));
    bot.run_due().await;
    assert!(
        !memory.members(WEB).contains("alice"),
        "nothing is left once every lease has ended"
    );
    assert_eq!(rechecks(bot), 0);
}

/// Review brk16e, finding 1. The membership lock kept a grant's check
/// apart from the re-check's removal only while the removal was answered.
/// A removal that gets no answer (a timed-out modify: the same ambiguity
/// as the add that armed the re-check) ends the re-check's pass with an
/// error, releases the membership's turn and leaves the timer for a
/// retry, while the modify may still land. alice's new lease L2 was
/// granted in that gap: its check found the late add, took it for
/// standing and went active ("you have web-admins until …"); the removal
/// landed; the re-check's retry found the membership absent and was done.
/// alice held an active lease and was not in the group, and L2 never
/// added it back. Now L2 waits while the re-check's removal is on record
/// (its retry comes a settle delay later, when the removal has landed or
/// died), then adds its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_lease_waits_for_a_recheck_removal_that_got_no_answer_then_adds_its_own() {
    let (bot, wire, memory) = wired_bot();
    a_late_add_landed(&bot, &wire, &memory).await;

    // The re-check's removal gets no answer; it is on the wire.
    wire.hold_removals.store(1, Ordering::SeqCst);
    bot.advance(Duration::seconds(SETTLE + 1));
    fire_rechecks(&bot).await;
    assert!(bot.audit_actions().iter().any(|a| a == "lease.late_add_found"));
    assert_eq!(rechecks(&bot), 1, "the re-check is kept for its retry");
    assert!(removing(&bot), "the removal is on record");
    assert!(
        memory.members(WEB).contains("alice"),
        "the removal has not landed yet"
    );

    // alice asks again and bob approves before the retry is due: the
    // grant waits for the re-check.
    let id = TestBot::request_id(&bot.ok("alice", "request web-admins 1h again").await);
    let reply = bot.ok("bob", &format!("approve {id}")).await;
    let live = bot.engine.store().live_leases().unwrap();
    assert_eq!(live.len(), 1, "alice's new lease: {live:?}; approval: {reply}");
    let l2 = live[0].lease.clone();
    assert_eq!(
        l2.state,
        LeaseState::Granting,
        "L2 waits; audit: {:?}",
        bot.audit_actions()
    );

    // The removal lands; the re-check's retry, then L2's grant, run.
    wire.land_removals().await;
    the_recheck_then_the_grant_run(&bot).await;
    the_new_lease_added_its_own(&bot, &memory, &l2.id).await;
}

/// Review brk16e, finding 2. The membership lock is in-process: the
/// re-check sends its removal, and jitbot stops (crash, OOM kill, deploy;
/// with replicas, the leader's term ends) while the modify is on the
/// wire. After the restart alice's new lease L2 was granted before the
/// re-check's retry: its check found the late add and took it for
/// standing; the retry made L2 claim it; then the removal sent before the
/// restart landed: alice held an active lease owning a membership that
/// was gone. Now the removal's record is durable (`RecheckRemoval`): L2
/// waits for the re-check, which looks again a settle delay after the
/// removal was sent, finds it landed, and is done; L2 adds its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_lease_after_a_restart_waits_for_a_recheck_removal_sent_before_it_then_adds_its_own() {
    let (bot, wire, memory) = wired_bot();
    a_late_add_landed(&bot, &wire, &memory).await;

    // The re-check sends its removal, which hangs on the wire; jitbot stops.
    wire.hang_removals.store(1, Ordering::SeqCst);
    bot.advance(Duration::seconds(SETTLE + 1));
    let rechecking = fire_the_recheck_on_a_task(&bot);
    wire.wait_for_a_removal().await;
    rechecking.abort();
    assert!(rechecking.await.is_err(), "jitbot stopped during the removal");
    let directory: Arc<dyn Directory> = wire.clone();
    let bot = bot.restart(directory, crate::support::bot::policy());
    assert!(
        memory.members(WEB).contains("alice"),
        "the removal has not landed yet"
    );
    assert!(removing(&bot), "the removal is on record");

    // alice's new lease is approved at once after the restart: it waits.
    let id = TestBot::request_id(&bot.ok("alice", "request web-admins 1h again").await);
    bot.ok("bob", &format!("approve {id}")).await;
    let l2 = bot.engine.store().live_leases().unwrap()[0].lease.clone();
    assert_eq!(
        l2.state,
        LeaseState::Granting,
        "L2 waits; audit: {:?}",
        bot.audit_actions()
    );

    // A retry's worth later nothing has moved; then the removal sent
    // before the restart lands, and the re-check and L2's grant run.
    bot.advance(Duration::seconds(10));
    bot.run_due().await;
    assert!(
        removing(&bot),
        "the re-check waits for the removal to land or die"
    );
    wire.land_removals().await;
    the_recheck_then_the_grant_run(&bot).await;
    the_new_lease_added_its_own(&bot, &memory, &l2.id).await;
}

/// Review brk16e, finding 3. The re-check told "the same directory group"
/// by comparing the DN strings (ASCII case ignored), and the membership
/// lock was keyed the same way; the directory compares DNs as DNs. An
/// operator who re-spells a group's `dn` (spaces after the commas, as
/// LDAP tools print them; the same entry) made every lease granted after
/// it "another group" to a re-check of a lease granted before it. L1's
/// add got no answer and landed late; the config's `dn` of web-admins is
/// re-spelled and jitbot restarted; alice's new lease L2 finds the
/// membership (standing) and goes active; L1's re-check then found no
/// live lease "of the same group" and removed it. Now groups are compared
/// by their normalised DN: L2 is the heir, claims the membership, keeps
/// it while it lasts and removes it at its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_respelled_group_dn_is_the_same_group_to_the_recheck_and_the_live_lease_keeps_its_membership() {
    let (bot, wire, memory) = wired_bot();
    a_late_add_landed(&bot, &wire, &memory).await;

    // The operator re-spells web-admins' DN (the same entry) and restarts.
    let respelled = "cn=web-admins, ou=groups, dc=example, dc=org";
    let mut policy = crate::support::bot::policy();
    for g in policy.groups.iter_mut() {
        if g.dn.as_str() == WEB {
            g.dn = GroupDn::new(respelled);
        }
    }
    let directory: Arc<dyn Directory> = wire.clone();
    let bot = bot.restart(directory, policy);

    // alice's new lease is granted before the re-check is due.
    let id = TestBot::request_id(&bot.ok("alice", "request web-admins 1h again").await);
    bot.ok("bob", &format!("approve {id}")).await;
    let l2 = bot.engine.store().live_leases().unwrap()[0].lease.clone();
    assert_eq!(l2.state, LeaseState::Active);
    assert!(memory.members(WEB).contains("alice"));

    // L1's re-check falls due.
    bot.advance(Duration::seconds(SETTLE + 1));
    bot.run_due().await;
    assert_eq!(rechecks(&bot), 0, "the re-check is done");

    let l2 = bot.engine.store().lease(&l2.id).unwrap().unwrap().lease;
    assert_eq!(l2.state, LeaseState::Active);
    assert!(
        memory.members(WEB).contains("alice"),
        "alice's new lease {} is active in `{}` (the same directory entry as `{}`, spelled with spaces), \
         yet the first lease's re-check removed her from web-admins, taking L2 for a lease of another \
         directory group; audit: {:?}",
        l2.id,
        respelled,
        WEB,
        bot.audit_actions()
    );
    assert_eq!(l2.preexisting, Some(false), "L2 claims the membership it found");
    assert!(!bot.audit_actions().iter().any(|a| a == "lease.late_add_found"));

    // L2 ends and removes it.
    bot.advance(Duration::hours(2));
    bot.run_due().await;
    assert!(
        !memory.members(WEB).contains("alice"),
        "nothing is left once every lease has ended"
    );
}

/// Review brk16e (a suspicion, proven here): the re-check left a late add
/// to a live lease of the same user and group that writes another value.
/// alice's first lease's add got no answer and landed late, as her old
/// member value; then her entry moved (a DN-valued `member` without
/// referential integrity) and her new lease L2 added the new value. L2
/// owns its own value and removes only that one at its end; the late add
/// of the old value is nobody's, and the re-check removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_add_of_the_users_old_member_value_is_removed_though_a_new_lease_holds_the_new_one() {
    let (bot, wire, memory) = wired_bot();
    a_late_add_landed(&bot, &wire, &memory).await;
    *wire.moved.lock().unwrap() = Some("alice-moved".into());
    let id = TestBot::request_id(&bot.ok("alice", "request web-admins 1h again").await);
    bot.ok("bob", &format!("approve {id}")).await;
    bot.run_due().await;
    let l2 = bot.engine.store().live_leases().unwrap()[0].lease.clone();
    assert_eq!(l2.state, LeaseState::Active);
    assert!(
        memory.members(WEB).contains("alice-moved"),
        "L2 added the new value"
    );

    bot.advance(Duration::seconds(SETTLE + 1));
    bot.run_due().await;
    assert!(
        !memory.members(WEB).contains("alice"),
        "the late add of alice's old member value stays though no lease writes it (L2 writes the new \
         one); audit: {:?}",
        bot.audit_actions()
    );
    assert!(memory.members(WEB).contains("alice-moved"), "L2 keeps its own");
    assert!(bot.audit_actions().iter().any(|a| a == "lease.late_add_removed"));
    assert_eq!(rechecks(&bot), 0);

    bot.advance(Duration::hours(2));
    bot.run_due().await;
    let members = memory.members(WEB);
    assert!(
        !members.contains("alice") && !members.contains("alice-moved"),
        "nothing is left once every lease has ended: {members:?}"
    );
}

/// Review brk16f, finding 1. The group's config key renamed
/// (`web-admins` → `webadmins`), its `dn` unchanged: the same directory
/// group. L1's add got no answer and landed late; the operator renames the
/// group and restarts; alice's new lease L2 (in `webadmins`) finds the
/// membership, takes it for standing and goes active. L1's re-check looked
/// for a live lease by the old group *name* only, found none, and removed
/// L2's membership. It now looks under every configured name of the same
/// directory group: L2 claims the late add, and removes it at its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_renamed_in_the_config_keeps_its_live_leases_membership_through_a_recheck() {
    let (bot, wire, memory) = wired_bot();
    a_late_add_landed(&bot, &wire, &memory).await;

    // The operator renames web-admins (same dn) and restarts.
    let mut policy = crate::support::bot::policy();
    for g in policy.groups.iter_mut() {
        if g.dn.as_str() == WEB {
            g.name = jitbot_core::GroupName::new("webadmins");
        }
    }
    let directory: Arc<dyn Directory> = wire.clone();
    let bot = bot.restart(directory, policy);

    // alice's new lease is granted before the re-check is due.
    let id = TestBot::request_id(&bot.ok("alice", "request webadmins 1h again").await);
    bot.ok("bob", &format!("approve {id}")).await;
    let live = bot.engine.store().live_leases().unwrap();
    assert_eq!(live.len(), 1, "alice's new lease: {live:?}");
    let l2 = live[0].lease.clone();
    assert_eq!(l2.state, LeaseState::Active, "audit: {:?}", bot.audit_actions());

    // L1's re-check falls due.
    bot.advance(Duration::seconds(SETTLE + 1));
    bot.run_due().await;
    let l2 = bot.engine.store().lease(&l2.id).unwrap().unwrap().lease;
    assert_eq!(l2.state, LeaseState::Active);
    assert!(
        memory.members(WEB).contains("alice"),
        "alice's new lease {} in `webadmins` is active, yet the first lease's re-check removed her from \
         {WEB}; preexisting {:?}; audit: {:?}",
        l2.id,
        l2.preexisting,
        bot.audit_actions()
    );
    assert_eq!(l2.preexisting, Some(false), "L2 claimed the late add");
    assert_eq!(rechecks(&bot), 0);
    bot.advance(Duration::hours(2));
    bot.run_due().await;
    assert!(
        !memory.members(WEB).contains("alice"),
        "nothing is left once every lease has ended"
    );
}

/// Review brk16f, finding 2. Plain OpenLDAP with `entryUUID` identities
/// and no referential integrity: L1's add of alice's member value landed
/// late; then alice's entry moved (a new DN, the same `entryUUID`) and her
/// new lease L2 added the new value. The old value stays in the group as
/// written (the directory's `current_value` of L1's membership is still
/// the old DN), so two values are two members: L2 is no heir to the old
/// one, and the re-check removes it. (The same identity made L2 its heir,
/// and the old value stayed for good — a member for whoever is created at
/// the old DN.) On Active Directory, which links the object, the late add
/// of the old DN reads as the new one: `current_value` says so, and the
/// membership goes to L2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_add_of_a_moved_users_old_value_is_removed_though_both_leases_record_one_identity() {
    let (bot, wire, memory) = wired_bot();
    let uuid = "entryUUID:1b4e28ba-2fa1-11d2-883f-0016d3cca427";
    *wire.identity.lock().unwrap() = Some(uuid.into());
    a_late_add_landed(&bot, &wire, &memory).await;
    let m1 = bot.lease().membership.expect("L1 recorded its membership");
    assert_eq!(m1.identity.as_deref(), Some(uuid));

    *wire.moved.lock().unwrap() = Some("alice-moved".into());
    let id = TestBot::request_id(&bot.ok("alice", "request web-admins 1h again").await);
    bot.ok("bob", &format!("approve {id}")).await;
    bot.run_due().await;
    let l2 = bot.engine.store().live_leases().unwrap()[0].lease.clone();
    assert_eq!(l2.state, LeaseState::Active);
    assert!(
        memory.members(WEB).contains("alice-moved"),
        "L2 added the new value"
    );

    bot.advance(Duration::seconds(SETTLE + 1));
    bot.run_due().await;
    bot.advance(Duration::hours(2));
    bot.run_due().await;
    assert_eq!(
        bot.engine.store().live_leases().unwrap().len(),
        0,
        "every lease has ended"
    );
    assert_eq!(rechecks(&bot), 0, "the re-check is done");
    let members = memory.members(WEB);
    assert!(
        !members.contains("alice") && !members.contains("alice-moved"),
        "every lease has ended, yet {members:?} are in {WEB}; audit: {:?}",
        bot.audit_actions()
    );
}
