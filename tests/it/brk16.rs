//! Breaks of issue 16 (PostgreSQL replicas) as merged: each test states a
//! guarantee of the issue or of ARCHITECTURE.md and fails on `main` for the
//! reason its doc gives. All run on the real test PostgreSQL; replicas are
//! engines on their own sled mirrors of one database, sharing the
//! directory (as every replica shares the real LDAP server).

use crate::support::bot::{open_store, policy, TestBot, WEB};
use async_trait::async_trait;
use chrono::Duration;
use jitbot::directory::memory::MemoryDirectory;
use jitbot::engine::{Caller, Engine};
use jitbot::ports::{Added, Directory, DirectoryError, GroupMember};
use jitbot::store::TimerKind;
use jitbot_core::{Command, GroupDn, LeaseState, Membership, UserId};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::Notify;

/// The in-memory directory with gates around `add_membership`: a test
/// holds one replica's add before it reaches the directory, or right after
/// it landed, and opens it again later (an LDAP server that is slow to
/// answer one replica).
struct Gate {
    inner: Arc<MemoryDirectory>,
    hold_before_add: AtomicBool,
    hold_after_add: AtomicBool,
    reached: Notify,
    release: Notify,
}

impl Gate {
    fn new(inner: Arc<MemoryDirectory>) -> Arc<Gate> {
        Arc::new(Gate {
            inner,
            hold_before_add: AtomicBool::new(false),
            hold_after_add: AtomicBool::new(false),
            reached: Notify::new(),
            release: Notify::new(),
        })
    }

    async fn hold(&self) {
        self.reached.notify_one();
        self.release.notified().await;
    }
}

#[async_trait]
impl Directory for Gate {
    async fn find_user(&self, a: &str, v: &str) -> Result<Option<UserId>, DirectoryError> {
        self.inner.find_user(a, v).await
    }
    async fn membership_of(&self, g: &GroupDn, u: &UserId) -> Result<Membership, DirectoryError> {
        self.inner.membership_of(g, u).await
    }
    async fn has_membership(&self, m: &Membership) -> Result<bool, DirectoryError> {
        self.inner.has_membership(m).await
    }
    async fn add_membership(&self, m: &Membership) -> Result<Added, DirectoryError> {
        if self.hold_before_add.swap(false, Ordering::SeqCst) {
            self.hold().await;
        }
        let added = self.inner.add_membership(m).await;
        if self.hold_after_add.swap(false, Ordering::SeqCst) {
            self.hold().await;
        }
        added
    }
    async fn remove_membership(&self, m: &Membership) -> Result<(), DirectoryError> {
        self.inner.remove_membership(m).await
    }
    async fn members(&self, g: &GroupDn) -> Result<Vec<GroupMember>, DirectoryError> {
        Directory::members(&*self.inner, g).await
    }
    async fn groups_of(
        &self,
        u: &UserId,
        among: &BTreeSet<GroupDn>,
    ) -> Result<BTreeSet<GroupDn>, DirectoryError> {
        self.inner.groups_of(u, among).await
    }
    async fn ping(&self) -> Result<(), DirectoryError> {
        Ok(())
    }
}

/// Replica a (a `TestBot` on a new database, directory behind `gate_a`)
/// and replica b (its own mirror of the same database, directory behind
/// `gate_b`), both over one in-memory directory and one clock.
struct Pair {
    a: TestBot,
    b: Engine,
    memory: Arc<MemoryDirectory>,
    gate_a: Arc<Gate>,
    gate_b: Arc<Gate>,
    _tmp: tempfile::TempDir,
}

fn pair() -> Pair {
    let memory = crate::support::bot::seeded();
    let gate_a = Gate::new(memory.clone());
    let gate_b = Gate::new(memory.clone());
    let dir_a: Arc<dyn Directory> = gate_a.clone();
    let a = TestBot::builder().postgres().wrap(|_| dir_a).build();
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open_store(&tmp.path().join("b"), a.pg.as_deref()).expect("open replica b");
    let b = Engine::new(
        policy(),
        store,
        gate_b.clone(),
        Arc::new(a.clock.clone()),
        a.engine.settings().clone(),
    );
    Pair {
        a,
        b,
        memory,
        gate_a,
        gate_b,
        _tmp: tmp,
    }
}

async fn say(engine: &Engine, user: &str, text: &str) -> jitbot::engine::Reply {
    let cmd = Command::parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    engine.execute(&Caller::new(user, None), cmd).await
}

/// What a replica's scheduler does once its mirror refresh woke it: every
/// timer due now, fired until none is left.
async fn run_due(engine: &Engine) {
    engine.store().refresh().expect("refresh");
    for _ in 0..100 {
        let due = engine.store().due_timers(engine.now(), 1000).expect("timers");
        if due.is_empty() {
            return;
        }
        for t in due {
            engine.fire(t).await;
        }
    }
    panic!("timers keep firing");
}

fn is_member(memory: &MemoryDirectory, group: &str, user: &str) -> bool {
    memory.members(group).contains(user)
}

/// Issue 16: "every replica commits commands" while "only the leader runs
/// the scheduler", and ARCHITECTURE.md: "One executor per lease ... only
/// `engine/executor.rs` touches the directory for a lease, through
/// `Engine::drive`, which holds the lease's lock". That lock is a tokio
/// mutex inside one process. An approval on a follower commits the lease
/// as granting with its `Grant` timer due *now* and drives the grant
/// itself; the leader's mirror refresh (every second) wakes its scheduler,
/// which fires that due timer and drives the same grant at the same time.
/// When the follower's add is slower than the leader's (an LDAP server
/// answering one connection late), the follower's add is answered
/// "already there" — by the leader's add — and, being jitbot's *first*
/// add on that replica, is read as "someone else added the user": the
/// lease is marked as not owning its membership. At expiry jitbot leaves
/// the membership in place ("left as it was before jitbot"): a lease that
/// ended with its privilege still held, forever, on a non-ZSP group.
#[tokio::test]
async fn brk16_a_grant_driven_by_two_replicas_at_once_leaves_the_membership_behind() {
    let p = pair();
    let id = TestBot::request_id(&p.a.ok("alice", "request web-admins 1h x").await);

    // bob approves on replica b; b's add is slow to reach the directory.
    p.gate_b.hold_before_add.store(true, Ordering::SeqCst);
    let approving = {
        let b = p.b.clone();
        let id = id.clone();
        tokio::spawn(async move { say(&b, "bob", &format!("approve {id}")).await })
    };
    p.gate_b.reached.notified().await;

    // Meanwhile replica a (the leader) refreshes, sees the due Grant timer
    // and drives the grant: its add lands, its answer is slow to come back.
    p.gate_a.hold_after_add.store(true, Ordering::SeqCst);
    p.a.engine.store().refresh().expect("refresh a");
    let grant_timers: Vec<_> =
        p.a.engine
            .store()
            .due_timers(p.a.engine.now(), 100)
            .expect("timers")
            .into_iter()
            .filter(|t| t.kind == TimerKind::Grant)
            .collect();
    assert_eq!(
        grant_timers.len(),
        1,
        "b committed the granting lease with its Grant timer due now"
    );
    let leader = {
        let a = p.a.engine.clone();
        tokio::spawn(async move {
            for t in grant_timers {
                a.fire(t).await;
            }
        })
    };
    p.gate_a.reached.notified().await;
    assert!(is_member(&p.memory, WEB, "alice"), "a's add landed");

    // b's add now reaches the directory, then a's answer comes back.
    p.gate_b.release.notify_one();
    let reply = approving.await.expect("approve task");
    assert!(reply.ok, "{}", reply.text);
    p.gate_a.release.notify_one();
    leader.await.expect("leader task");

    // The lease runs out; the leader expires it.
    p.a.advance(Duration::hours(2));
    run_due(&p.a.engine).await;
    let lease = p.a.lease();
    let audit = p.a.audit_actions();
    assert_eq!(lease.state, LeaseState::Ended, "{audit:?}");
    assert!(
        !is_member(&p.memory, WEB, "alice"),
        "lease {} ended but alice still holds web-admins: two replicas drove one grant at once and b took \
         a's add for someone else's (preexisting = {:?}); audit: {audit:?}",
        lease.id,
        lease.preexisting,
    );
}

/// Issue 16: "a deposed leader must not commit a transition after it lost
/// leadership ...; directory side effects stay safe because they are
/// write-ahead and idempotent". The fence stops the deposed leader's
/// *commits*, but not the directory write it started while it still led:
/// its add, sent before the term ended and answered late, lands after the
/// new leader has found the lease past its end and ended it (removing
/// nothing, since nothing was there yet). The old leader's next commit is
/// refused (`Deposed`), and nobody ever looks at that membership again:
/// the lease is ended and alice keeps web-admins.
#[tokio::test]
async fn brk16_a_deposed_leaders_late_add_lands_after_the_new_leader_ended_the_lease() {
    let p = pair();
    let term = std::time::Duration::from_secs(30);
    let token = p.a.engine.store().lead("a", term).unwrap().expect("a leads");
    p.a.engine.store().set_fence(Some(token));
    let id = TestBot::request_id(&p.a.ok("alice", "request web-admins 1h x").await);

    // bob approves on the leader; its add to the directory is slow.
    p.gate_a.hold_before_add.store(true, Ordering::SeqCst);
    let approving = {
        let a = p.a.engine.clone();
        let id = id.clone();
        tokio::spawn(async move { say(&a, "bob", &format!("approve {id}")).await })
    };
    p.gate_a.reached.notified().await;

    // a's term runs out (a paused, or its renewals did not get through);
    // b takes over. By the time b's scheduler looks, the lease is past its
    // end: b ends it, removing nothing (nothing is there yet).
    let db = p.a.pg.clone().expect("postgres");
    db.run("UPDATE jitbot_leader SET expires_at = clock_timestamp() - interval '1 second'");
    let next = p.b.store().lead("b", term).unwrap().expect("b takes over");
    assert!(next > token);
    p.b.store().set_fence(Some(next));
    p.a.advance(Duration::hours(2));
    run_due(&p.b).await;
    let ended = p.b.store().leases().unwrap();
    assert_eq!(ended.len(), 1);
    assert_eq!(ended[0].lease.state, LeaseState::Ended, "b ended the lease");
    assert!(!is_member(&p.memory, WEB, "alice"));

    // a's add, sent while it led, is answered now.
    p.gate_a.release.notify_one();
    let _ = approving.await.expect("approve task");
    // Every replica does whatever is left to do.
    run_due(&p.b).await;
    p.a.engine.store().set_fence(None);
    run_due(&p.a.engine).await;

    let leases = p.b.store().leases().unwrap();
    assert!(
        leases.iter().all(|l| l.lease.state == LeaseState::Ended),
        "{leases:?}"
    );
    assert!(
        !is_member(&p.memory, WEB, "alice"),
        "every lease of alice has ended, yet she holds web-admins: the deposed leader's add landed after \
         the new leader ended the lease, and nothing removes it"
    );
}

/// Issue 16: "Exactly one is the leader at a time", and ARCHITECTURE.md:
/// "The leader stops its work two thirds of a term after its last
/// renewal, before the term can expire". The renewal (`Store::lead`)
/// first takes the replica's own writer lock, and a writer of the leader
/// (here a backup; the scheduler's expiry or a command do the same) that
/// waits for `jitbot_head`'s row lock — held by another replica stalled
/// in its transaction — keeps it for up to `lock_timeout` (30 s). The
/// renewal waits behind it, the two-thirds deadline is only checked when
/// a renewal *fails*, so the leader neither renews nor stops: its term
/// runs out, the other replica takes over, and both run the scheduler,
/// the outbox worker and the ZSP monitor, and both say "ready (leader)".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brk16_a_leader_whose_renewal_waits_for_its_own_writer_never_steps_down() {
    use crate::support::process::{Jitbot, ADMIN_TOKEN};
    let db = crate::support::postgres::Database::create();
    let url = crate::support::postgres::cluster().url(&db.name);
    let config = format!(
        r#"
[server]
listen = "{{listen}}"
admin_token = {{admin}}
shutdown_grace = "2s"

[store]
kind = "postgres"
url = "{url}"
password = {{ env = "JITBOT_TEST_PGPW" }}
path = "{{store}}"
cache_mb = 16

[scheduler]
max_wait = "1s"
retry_base = "1s"

[directory]
kind = "memory"

[memory]
groups = {{ "cn=db-admins,ou=groups,dc=example,dc=org" = ["alice"] }}

[[group]]
name = "db-admins"
dn = "cn=db-admins,ou=groups,dc=example,dc=org"
requesters = {{ users = ["alice"] }}
approvers = {{ users = ["bob"] }}
default_duration = "1h"
max_duration = "4h"
"#
    );
    let env = [("JITBOT_TEST_PGPW", crate::support::postgres::PASSWORD)];
    let a = Jitbot::start(&config, &env).await;
    crate::support::net::eventually(std::time::Duration::from_secs(10), "replica a leads", || {
        a.log_text().contains("this replica leads").then_some(())
    })
    .await;
    let b = Jitbot::start(&config, &env).await;
    let readyz = |bot: &Jitbot| {
        let url = format!("{}/readyz", bot.admin_base);
        async move { reqwest::get(url).await.unwrap().text().await.unwrap() }
    };
    assert_eq!(readyz(&b).await, "ready (follower)\n");

    // Another replica stalls holding the store-wide lock (a session of its
    // own, with jitbot's session settings).
    let (release, released) = std::sync::mpsc::channel::<()>();
    let (held_tx, held) = std::sync::mpsc::channel::<()>();
    let stall_url = url.clone();
    let stalled = std::thread::spawn(move || {
        let mut config: postgres::Config = stall_url.parse().unwrap();
        config.password(crate::support::postgres::PASSWORD);
        let mut client = config.connect(postgres::NoTls).unwrap();
        client
            .batch_execute("SET lock_timeout = '30s'; SET idle_in_transaction_session_timeout = '60s'")
            .unwrap();
        let mut tx = client.transaction().unwrap();
        tx.query("SELECT version FROM jitbot_head WHERE id = 1 FOR UPDATE", &[])
            .unwrap();
        held_tx.send(()).unwrap();
        let _ = released.recv_timeout(std::time::Duration::from_secs(50));
        let _ = tx.rollback();
    });
    held.recv_timeout(std::time::Duration::from_secs(10))
        .expect("the lock is held");

    // A writer on the leader now waits for that lock.
    let backup_url = format!("{}/admin/backup", a.admin_base);
    let backup = tokio::spawn(async move {
        let _ = reqwest::Client::new()
            .get(backup_url)
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await;
    });

    // Sample both replicas' roles until b has taken over (or 15 s).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let mut both = None;
    while std::time::Instant::now() < deadline {
        let (ra, rb) = (readyz(&a).await, readyz(&b).await);
        if ra == "ready (leader)\n" && rb == "ready (leader)\n" {
            both = Some(a.log_text());
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let b_led = b.log_text().contains("this replica leads");
    let _ = release.send(());
    let _ = stalled.join();
    let _ = backup.await;
    assert!(
        b_led,
        "b never took over; the break needs that:\n{}",
        b.log_text()
    );
    if let Some(a_log) = both {
        panic!(
            "two leaders at once: b took over a's expired term while a still runs the leader's work and both \
             say \"ready (leader)\"; a's renewal waits behind its own writer lock. a's leadership log:\n{}",
            a_log
                .lines()
                .filter(|l| l.contains("leader") || l.contains("leads"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}
