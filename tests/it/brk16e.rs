//! Issue 16, fifth review (brk16e): where the re-check's membership lock
//! and the replicas' guarantees still break. Every test here fails on
//! `main` at 84315a8 with an assertion that says what went wrong; the
//! findings are written up in `/work/notes/brk16e-findings.md`. The
//! in-memory directory sits behind a [`Wire`] the test controls: an add
//! or a removal can get no answer and be held on the wire until it lands.
//! The leadership tests run on the real PostgreSQL of `support::postgres`.

use crate::support::bot::{seeded, TestBot, WEB};
use crate::support::forward::{Forward, Hooks};
use async_trait::async_trait;
use chrono::Duration;
use jitbot::directory::memory::MemoryDirectory;
use jitbot::ports::{Added, Directory, DirectoryError};
use jitbot::store::TimerKind;
use jitbot_core::{GroupDn, LeaseState, Membership, Span};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

/// The in-memory directory behind a network path the test controls: the
/// next `hold_adds` adds and `hold_removals` removals get no answer (an
/// `Unavailable` error, as a timed-out modify) and are held on the wire
/// until they land (`land_adds`, `land_removals`).
struct Wire {
    memory: Arc<MemoryDirectory>,
    held_adds: Mutex<Vec<Membership>>,
    held_removals: Mutex<Vec<Membership>>,
    hold_adds: AtomicU32,
    hold_removals: AtomicU32,
    /// Removals still to hang: sent (held on the wire) and never answered.
    hang_removals: AtomicU32,
}

impl Wire {
    fn new(memory: Arc<MemoryDirectory>) -> Arc<Forward<Wire>> {
        Arc::new(Forward(Wire {
            memory,
            held_adds: Mutex::new(Vec::new()),
            held_removals: Mutex::new(Vec::new()),
            hold_adds: AtomicU32::new(0),
            hold_removals: AtomicU32::new(0),
            hang_removals: AtomicU32::new(0),
        }))
    }

    /// The adds held on the wire reach the directory now.
    async fn land_adds(&self) {
        let held = std::mem::take(&mut *self.held_adds.lock().unwrap());
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
    async fn has_membership(&self, m: &Membership) -> Result<bool, DirectoryError> {
        self.memory.has_membership(&as_the_server_reads(m)).await
    }
    async fn add_membership(&self, m: &Membership) -> Result<Added, DirectoryError> {
        let m = &as_the_server_reads(m);
        if take_one(&self.hold_adds) {
            self.held_adds.lock().unwrap().push(m.clone());
            return Err(DirectoryError::Unavailable(
                "the directory did not answer the add".into(),
            ));
        }
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
        self.memory.remove_membership(m).await
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

fn rechecks(bot: &TestBot) -> usize {
    bot.engine.store().timers_of(TimerKind::Recheck).unwrap().len()
}

/// Fires the due `Recheck` timers only.
async fn fire_rechecks(bot: &TestBot) {
    let due = bot.engine.store().due_timers(bot.engine.now(), 1000).unwrap();
    let mut fired = 0;
    for t in due.into_iter().filter(|t| t.kind == TimerKind::Recheck) {
        bot.engine.fire(t).await;
        fired += 1;
    }
    assert_eq!(fired, 1, "one re-check was due");
}

/// alice's web-admins lease L1 (no ZSP group: no drift monitor looks at
/// it): its add gets no answer and is held on the wire, the undo finds
/// nothing, L1 ends with its re-check armed. Then the add lands.
async fn a_late_add_landed(bot: &TestBot, wire: &Wire, memory: &MemoryDirectory) {
    wire.hold_adds.store(1, Ordering::SeqCst);
    let id = TestBot::request_id(&bot.ok("alice", "request web-admins 1h first").await);
    bot.ok("bob", &format!("approve {id}")).await;
    bot.run_due().await;
    assert_eq!(bot.lease().state, LeaseState::Ended);
    assert_eq!(rechecks(bot), 1, "the ambiguous add armed a re-check");
    assert!(!memory.members(WEB).contains("alice"), "not landed yet");
    wire.land_adds().await;
    assert!(memory.members(WEB).contains("alice"), "the late add landed");
}

/// The membership lock keeps a grant's check apart from the re-check's
/// removal only while the removal is answered. A removal that gets no
/// answer (a timed-out modify: the same ambiguity as the add that armed
/// the re-check) ends the re-check's pass with an error, releases the
/// membership's turn and leaves the timer for a retry, while the modify
/// may still land. alice's new lease L2 is granted in that gap: its check
/// finds the late add, takes it for standing and goes active ("you have
/// web-admins until …"); the removal lands; the re-check's retry finds
/// the membership absent and is done. alice holds an active lease and is
/// not in the group, and L2 never adds it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brk16e_a_recheck_removal_without_answer_strips_a_new_leases_membership() {
    let (bot, wire, memory) = wired_bot();
    a_late_add_landed(&bot, &wire, &memory).await;

    // The re-check's removal gets no answer; it is on the wire.
    wire.hold_removals.store(1, Ordering::SeqCst);
    bot.advance(Duration::seconds(SETTLE + 1));
    fire_rechecks(&bot).await;
    assert!(bot.audit_actions().iter().any(|a| a == "lease.late_add_found"));
    assert_eq!(rechecks(&bot), 1, "the re-check is kept for its retry");
    assert!(
        memory.members(WEB).contains("alice"),
        "the removal has not landed yet"
    );

    // alice asks again and bob approves before the retry is due.
    let id = TestBot::request_id(&bot.ok("alice", "request web-admins 1h again").await);
    let reply = bot.ok("bob", &format!("approve {id}")).await;
    let live = bot.engine.store().live_leases().unwrap();
    assert_eq!(live.len(), 1, "alice's new lease: {live:?}; approval: {reply}");
    let l2 = live[0].lease.clone();

    // The removal lands; the re-check's retry runs.
    wire.land_removals().await;
    bot.advance(Duration::seconds(SETTLE + 1));
    bot.run_due().await;

    let l2 = bot.engine.store().lease(&l2.id).unwrap().unwrap().lease;
    if l2.state == LeaseState::Active {
        assert!(
            memory.members(WEB).contains("alice"),
            "alice's new lease {} is active (she was told she has web-admins until {}), yet she is not \
             in web-admins: it took the late add for standing (preexisting {:?}) while the first \
             lease's re-check's removal was on the wire, and the removal landed after; audit: {:?}",
            l2.id,
            l2.expires_at,
            l2.preexisting,
            bot.audit_actions()
        );
    }
    // Whatever happened, nothing is left once every lease has ended.
    bot.advance(Duration::hours(2));
    bot.run_due().await;
    assert!(!memory.members(WEB).contains("alice"));
}

/// The membership lock is in-process, and the removal's write-ahead record
/// (`lease.late_add_found`) does not keep a new grant away from the
/// membership: the re-check sends its removal, and jitbot stops (crash,
/// OOM kill, deploy; with replicas, the leader's term ends) while the
/// modify is on the wire. After the restart alice's new lease L2 is
/// granted before the re-check's retry: its check finds the late add and
/// takes it for standing. The retry makes L2 claim it. Then the removal
/// sent before the restart lands: alice holds an active lease that now
/// owns a membership that is gone, and nothing adds it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brk16e_a_recheck_removal_sent_before_a_restart_strips_the_next_leases_membership() {
    let (bot, wire, memory) = wired_bot();
    a_late_add_landed(&bot, &wire, &memory).await;

    // The re-check sends its removal, which hangs on the wire; jitbot stops.
    wire.hang_removals.store(1, Ordering::SeqCst);
    bot.advance(Duration::seconds(SETTLE + 1));
    let engine = bot.engine.clone();
    let due = bot
        .engine
        .store()
        .due_timers(bot.engine.now(), 1000)
        .unwrap()
        .into_iter()
        .find(|t| t.kind == TimerKind::Recheck)
        .expect("the re-check is due");
    let rechecking = tokio::spawn(async move { engine.fire(due).await });
    let started = std::time::Instant::now();
    while wire.held_removals.lock().unwrap().is_empty() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "the re-check sent no removal within 10 s; audit: {:?}",
            bot.audit_actions()
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    rechecking.abort();
    assert!(rechecking.await.is_err(), "jitbot stopped during the removal");
    let directory: Arc<dyn Directory> = wire.clone();
    let bot = bot.restart(directory, crate::support::bot::policy());
    assert!(
        memory.members(WEB).contains("alice"),
        "the removal has not landed yet"
    );

    // alice's new lease is granted at once after the restart.
    let id = TestBot::request_id(&bot.ok("alice", "request web-admins 1h again").await);
    bot.ok("bob", &format!("approve {id}")).await;
    let l2 = bot.engine.store().live_leases().unwrap()[0].lease.clone();

    // The re-check's retry runs, then the removal sent before the restart lands.
    bot.advance(Duration::seconds(10));
    bot.run_due().await;
    wire.land_removals().await;
    bot.advance(Duration::seconds(SETTLE + 1));
    bot.run_due().await;

    let l2 = bot.engine.store().lease(&l2.id).unwrap().unwrap().lease;
    if l2.state == LeaseState::Active {
        assert!(
            memory.members(WEB).contains("alice"),
            "alice's new lease {} is active (she was told she has web-admins until {}, preexisting {:?}), \
             yet she is not in web-admins: the first lease's re-check's removal, sent before the restart, \
             landed after L2 had taken the membership; audit: {:?}",
            l2.id,
            l2.expires_at,
            l2.preexisting,
            bot.audit_actions()
        );
    }
    bot.advance(Duration::hours(2));
    bot.run_due().await;
    assert!(!memory.members(WEB).contains("alice"));
}

/// The re-check tells "the same directory group" by comparing the DN
/// strings (ASCII case ignored, `holds_the_same_group`), and the
/// membership lock is keyed the same way; the directory compares DNs as
/// DNs. An operator who re-spells a group's `dn` (spaces after the commas,
/// as LDAP tools print them; the same entry) makes every lease granted
/// after it "another group" to a re-check of a lease granted before it.
/// L1's add got no answer and landed late; the config's `dn` of
/// web-admins is re-spelled and jitbot restarted; alice's new lease L2
/// finds the membership (standing) and goes active; L1's re-check then
/// finds the membership present and no live lease "of the same group",
/// and removes it: alice holds an active lease and is not in the group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brk16e_a_respelled_group_dn_makes_the_recheck_remove_a_live_leases_membership() {
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
}

/// A slow but working database: `commits_unanswered` counts a round trip
/// of the commit session under way for more than `LOCK_WAIT` (12 s) as no
/// answer, although the session sets `statement_timeout = 30s` and the
/// server is answering it. A leader whose commit takes 14 s (here a
/// trigger sleeps; in production synchronous replication to a slow
/// standby, a checkpoint on a slow disk, a big retention or mass-expiry
/// commit) declines its next renewal and gives up its term (two thirds
/// of the 6 s default term after its "silence" began), and `/readyz`
/// says the store is unavailable — though the commit is answered, and
/// succeeds, well inside the statement timeout. The next leader's
/// commits go through the same slow database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brk16e_a_leader_whose_commit_is_slow_but_answered_gives_up_its_term() {
    use crate::support::postgres::Database;
    use jitbot::store::{AuditDraft, Store};
    let db = Database::create();
    let tmp = tempfile::tempdir().unwrap();
    let a = Store::open_postgres(&tmp.path().join("a"), 16, &db.settings()).unwrap();
    let term = jitbot::app::LEADER_TTL;
    let token = a.lead("a", term).unwrap().expect("a takes the term");

    // The next statement writing jitbot_kv takes 14 s (once).
    db.run(
        "CREATE TABLE brk16e_slow (once boolean); INSERT INTO brk16e_slow VALUES (true); \
         CREATE FUNCTION brk16e_slow() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$ \
         BEGIN IF EXISTS (SELECT 1 FROM brk16e_slow) THEN DELETE FROM brk16e_slow; \
         PERFORM pg_sleep(14); END IF; RETURN NULL; END $$; \
         CREATE TRIGGER brk16e_slow BEFORE INSERT OR UPDATE ON jitbot_kv \
         FOR EACH STATEMENT EXECUTE FUNCTION brk16e_slow();",
    );

    let writer = a.clone();
    let started = std::time::Instant::now();
    let committing = tokio::spawn(async move {
        writer
            .update(chrono::Utc::now(), |tx| {
                tx.set_timer(TimerKind::Warn, "slow", chrono::Utc::now());
                tx.audit(AuditDraft {
                    actor: "test".into(),
                    action: "test.slow_commit".into(),
                    ..Default::default()
                });
                Ok::<(), jitbot::store::StoreError>(())
            })
            .await
    });
    // The leader renews every third of a term, as `app.rs` does.
    let mut renewals = Vec::new();
    while !committing.is_finished() {
        tokio::time::sleep(term / 3).await;
        let renewed = tokio::task::block_in_place(|| a.lead("a", term));
        renewals.push((
            started.elapsed().as_secs_f64().round(),
            format!("{renewed:?}"),
            a.commits_unanswered().map(|d| d.as_secs_f64().round()),
        ));
        assert!(
            started.elapsed() < std::time::Duration::from_secs(40),
            "the commit did not end within 40 s"
        );
    }
    let committed = committing.await.unwrap();
    let took = started.elapsed();
    assert!(
        committed.is_ok(),
        "the slow commit itself failed after {took:?}: {committed:?}"
    );
    let expected = format!("Ok(Some({token}))");
    assert!(
        renewals.iter().all(|(_, r, _)| *r == expected),
        "a commit answered and successful after {took:?} (the session's statement_timeout is 30 s) made \
         the leader give up its term: renewals (seconds, lead(), commits_unanswered) = {renewals:?}"
    );
}

/// The other side of the same rule: a leader whose commit session alone
/// stops answering (the link black-holed, the leadership's connection
/// fine) keeps its term until that round trip has been under way for
/// `LOCK_WAIT` (12 s), then resigns at its next renewal; the follower
/// takes the term and acts a third of a term later. Meanwhile the leader
/// can commit nothing, so nothing is revoked: the failover goal is 10 s.
/// Here a's commit hangs (a trigger sleeps 25 s once; b's commits are not
/// slowed) and b asks for the term every half second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brk16e_a_leader_whose_commit_session_hangs_is_replaced_after_the_failover_goal() {
    use crate::support::postgres::Database;
    use jitbot::store::{AuditDraft, Store};
    let db = Database::create();
    let tmp = tempfile::tempdir().unwrap();
    let a = Store::open_postgres(&tmp.path().join("a"), 16, &db.settings()).unwrap();
    let b = Store::open_postgres(&tmp.path().join("b"), 16, &db.settings()).unwrap();
    let term = jitbot::app::LEADER_TTL;
    a.lead("a", term).unwrap().expect("a takes the term");
    assert_eq!(b.lead("b", term).unwrap(), None, "a leads");

    db.run(
        "CREATE TABLE brk16e_hang (once boolean); INSERT INTO brk16e_hang VALUES (true); \
         CREATE FUNCTION brk16e_hang() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$ \
         BEGIN IF EXISTS (SELECT 1 FROM brk16e_hang) THEN DELETE FROM brk16e_hang; \
         PERFORM pg_sleep(25); END IF; RETURN NULL; END $$; \
         CREATE TRIGGER brk16e_hang BEFORE INSERT OR UPDATE ON jitbot_kv \
         FOR EACH STATEMENT EXECUTE FUNCTION brk16e_hang();",
    );

    let writer = a.clone();
    let started = std::time::Instant::now();
    let committing = tokio::spawn(async move {
        writer
            .update(chrono::Utc::now(), |tx| {
                tx.set_timer(TimerKind::Warn, "hung", chrono::Utc::now());
                tx.audit(AuditDraft {
                    actor: "test".into(),
                    action: "test.hung_commit".into(),
                    ..Default::default()
                });
                Ok::<(), jitbot::store::StoreError>(())
            })
            .await
    });
    // a renews every third of a term, as `app.rs` does; b asks often.
    let mut next_renewal = std::time::Duration::ZERO;
    let mut b_leads = None;
    while b_leads.is_none() && started.elapsed() < std::time::Duration::from_secs(24) {
        if started.elapsed() >= next_renewal {
            let _ = tokio::task::block_in_place(|| a.lead("a", term));
            next_renewal += term / 3;
        }
        if let Some(token) = tokio::task::block_in_place(|| b.lead("b", term)).unwrap() {
            b_leads = Some((token, started.elapsed()));
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    // b acts a third of a term after it took the term (`Store::acts_from`).
    let acts = b_leads.map(|(_, at)| at + term / 3);
    let _ = committing.await;
    let goal = std::time::Duration::from_secs(10);
    assert!(
        acts.is_some_and(|at| at <= goal),
        "a's commit session stopped answering at 0 s and a could commit nothing from then on, yet b could \
         act (revoke) only at {acts:?} (b took the term at {:?}); the failover goal is {goal:?}",
        b_leads.map(|(_, at)| at)
    );
}
