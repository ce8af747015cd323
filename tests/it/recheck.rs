//! The re-check after an add that got no answer (`src/engine/recheck.rs`)
//! against the fourth review of issue 16 (brk16d): a late add that lands
//! while a new lease of the same user and group is being granted, an add
//! sent before a restart whose retry was answered, a new lease granted
//! while the re-check's removal is on its way (or recorded before a
//! restart), and a late add found while the live lease's removal may
//! already be made. The in-memory
//! directory sits behind a [`Wire`] the test controls: an add can be held
//! on the wire and land later, or hang unanswered.

use crate::support::bot::{seeded, TestBot, WEB};
use crate::support::forward::{Forward, Hooks};
use async_trait::async_trait;
use chrono::Duration;
use jitbot::directory::memory::MemoryDirectory;
use jitbot::engine::Caller;
use jitbot::ports::{Added, Directory, DirectoryError};
use jitbot::store::TimerKind;
use jitbot_core::{Command, LeaseState, Membership, Span};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

/// The in-memory directory behind a network path the test controls: an
/// add can get no answer and be held on the wire (`hold_adds`) until it
/// lands (`land`), and the next add or removal can be held at a gate
/// (`gate_adds`, `gate_removals`) until the test opens it (`open`).
struct Wire {
    memory: Arc<MemoryDirectory>,
    held: Mutex<Vec<Membership>>,
    hold_adds: AtomicU32,
    /// Adds still to hang: sent (held on the wire) and never answered.
    hang_adds: AtomicU32,
    gate_adds: AtomicBool,
    gate_removals: AtomicBool,
    /// The next removal is made, and its answer held at the gate.
    gate_removal_answers: AtomicBool,
    /// Calls that reached the gate.
    at_gate: AtomicU32,
    gate: tokio::sync::Semaphore,
}

impl Wire {
    fn new(memory: Arc<MemoryDirectory>) -> Arc<Forward<Wire>> {
        Arc::new(Forward(Wire {
            memory,
            held: Mutex::new(Vec::new()),
            hold_adds: AtomicU32::new(0),
            hang_adds: AtomicU32::new(0),
            gate_adds: AtomicBool::new(false),
            gate_removals: AtomicBool::new(false),
            gate_removal_answers: AtomicBool::new(false),
            at_gate: AtomicU32::new(0),
            gate: tokio::sync::Semaphore::new(0),
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

#[async_trait]
impl Hooks for Wire {
    fn inner(&self) -> &dyn Directory {
        &*self.memory
    }
    async fn add_membership(&self, m: &Membership) -> Result<Added, DirectoryError> {
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

fn rechecks(bot: &TestBot) -> usize {
    bot.engine.store().timers_of(TimerKind::Recheck).unwrap().len()
}

/// Fires the due `Recheck` timers only (as the scheduler's pass would,
/// while other work of the same moment is still under way).
async fn fire_rechecks(bot: &TestBot) {
    let due = bot.engine.store().due_timers(bot.engine.now(), 1000).unwrap();
    let mut fired = 0;
    for t in due.into_iter().filter(|t| t.kind == TimerKind::Recheck) {
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
        .find(|t| t.kind == TimerKind::Recheck)
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
/// After the restart, alice's new lease L2 is granted before the
/// re-check's retry: its check finds the late add and takes it for
/// standing. The retried re-check then finds L2 holding the membership as
/// standing and makes it claim it (`lease.add_ambiguous`): alice keeps
/// web-admins while L2 lasts, and L2's end removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_add_whose_removal_was_recorded_before_a_restart_is_claimed_by_the_next_lease() {
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

    // alice's new lease is granted before the re-check's retry is due.
    let id = TestBot::request_id(&bot.ok("alice", "request web-admins 1h again").await);
    bot.ok("bob", &format!("approve {id}")).await;
    let l2 = bot.engine.store().live_leases().unwrap()[0].lease.clone();
    assert_eq!(l2.state, LeaseState::Active);
    assert_eq!(l2.preexisting, Some(true), "L2 took the late add for standing");

    // The re-check's retry: L2 claims the membership.
    bot.advance(Duration::seconds(10));
    bot.run_due().await;
    assert_eq!(rechecks(&bot), 0, "the re-check is done");
    let l2 = bot.engine.store().lease(&l2.id).unwrap().unwrap().lease;
    assert_eq!(l2.state, LeaseState::Active);
    assert_eq!(
        l2.preexisting,
        Some(false),
        "L2 claims the membership; audit: {:?}",
        bot.audit_actions()
    );
    assert!(
        memory.members(WEB).contains("alice"),
        "alice keeps it while L2 lasts"
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
