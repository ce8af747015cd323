//! Interleavings, upgrades and snapshots that broke the lease invariants of
//! `ARCHITECTURE.md` on the executor rewrite (issue 12 follow-up). Each test
//! is named for the defect it found.

use crate::support::bot::{policy, TestBot, DB};
use crate::support::forward::{Forward, Hooks};
use async_trait::async_trait;
use chrono::Duration;
use jitbot::directory::memory::MemoryDirectory;
use jitbot::engine::{Caller, Engine};
use jitbot::ports::{Added, Audience, Directory, DirectoryError, GroupMember, Membership};
use jitbot::store::{OutboxItem, Store, StoreError};
use jitbot_core::{Command, GroupDn, LeaseState, UserId};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::Notify;

/// Opens the store at `path`, waiting for a flush of a dropped engine that
/// still holds the database.
fn reopen(path: &std::path::Path) -> Store {
    for _ in 0..100 {
        match Store::open(path, 16) {
            Err(StoreError::Locked { .. }) => std::thread::sleep(std::time::Duration::from_millis(20)),
            other => return other.expect("reopen store"),
        }
    }
    panic!("the store stayed locked");
}

async fn say(engine: &Engine, user: &str, text: &str) -> jitbot::engine::Reply {
    let cmd = Command::parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    engine.execute(&Caller::new(user, None), cmd).await
}

async fn run_due(engine: &Engine) {
    for _ in 0..100 {
        let due = engine.store().due_timers(engine.now(), 1000).expect("timers");
        if due.is_empty() {
            return;
        }
        for t in due {
            engine.fire(t).await;
        }
    }
}

/// The alert notices still in the outbox.
fn alerts(engine: &Engine) -> Vec<String> {
    engine
        .store()
        .outbox(10_000)
        .expect("outbox")
        .into_iter()
        .filter_map(|(_, item, _)| match item {
            OutboxItem::Send { notice } if notice.to == Audience::Alert => Some(notice.text),
            _ => None,
        })
        .collect()
}

/// The `live` slot used to be keyed by the user id as spelled; it is now
/// folded to lower case, and nothing migrates the slots a store written by
/// the previous release holds. A lease of `Alice` from before the upgrade
/// is then invisible to `live_lease`: she gets a second live lease on the
/// same group (recorded as standing, since the first one's membership is
/// there), and the first lease can never move to `Revoking` again because
/// `put_lease` finds its folded slot held by the second one. The first
/// lease never ends and its membership stays.
#[tokio::test]
async fn live_slots_written_before_case_folding_still_hold_their_lease() {
    let bot = TestBot::new();
    let id = TestBot::request_id(&bot.ok("Alice", "request db-admins 1h x").await);
    bot.ok("bob", &format!("approve {id}")).await;
    assert!(bot.is_member(DB, "alice"));

    // The store as the previous release wrote it: the slot keyed `Alice`.
    let TestBot {
        engine,
        dir,
        clock,
        path,
        ..
    } = bot;
    let settings = engine.settings().clone();
    drop(engine);
    drop(reopen(&path));
    {
        let db = crate::support::open_raw_sled(&path);
        let live = db.open_tree("live").expect("live tree");
        let folded = b"db-admins\0alice";
        let lease = live.remove(folded).expect("remove").expect("the folded slot");
        live.insert(b"db-admins\0Alice", lease).expect("insert");
        // A store of the previous release has never been folded.
        let meta = db.open_tree("meta").expect("meta tree");
        meta.remove(b"live_folded")
            .expect("remove")
            .expect("a folded store says so");
        db.flush().expect("flush");
    }
    let engine = Engine::new(
        policy(),
        reopen(&path),
        dir.clone(),
        Arc::new(clock.clone()),
        settings,
    );

    // Asking again must extend (or be refused), never open a second lease.
    let again = say(&engine, "Alice", "request db-admins 1h y").await;
    if again.ok {
        if let Some(r) = again.text.split_whitespace().find(|w| w.starts_with("r-")) {
            let r = r.trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
            say(&engine, "bob", &format!("approve {r}")).await;
        }
    }
    let live: Vec<_> = engine
        .store()
        .leases()
        .unwrap()
        .into_iter()
        .filter(|l| l.lease.state != LeaseState::Ended)
        .map(|l| l.lease.id.to_string())
        .collect();
    assert!(live.len() <= 1, "two live leases of Alice on db-admins: {live:?}");

    clock.advance(Duration::hours(3));
    run_due(&engine).await;
    let states: Vec<_> = engine
        .store()
        .leases()
        .unwrap()
        .into_iter()
        .map(|l| (l.lease.id.to_string(), l.lease.state))
        .collect();
    assert!(
        states.iter().all(|(_, s)| *s == LeaseState::Ended),
        "every lease ends: {states:?}"
    );
    assert!(!dir.members(DB).contains("alice"), "nothing left behind");
}

/// The in-memory directory with two gates a test opens: one after
/// `members` has read the group, one before `has_membership` reads it.
struct Gated {
    inner: Arc<MemoryDirectory>,
    hold_members: AtomicBool,
    hold_checks: AtomicBool,
    reached: Notify,
    release: Notify,
}

impl Gated {
    fn new(inner: Arc<MemoryDirectory>) -> Arc<Forward<Gated>> {
        Arc::new(Forward(Gated {
            inner,
            hold_members: AtomicBool::new(false),
            hold_checks: AtomicBool::new(false),
            reached: Notify::new(),
            release: Notify::new(),
        }))
    }

    async fn hold(&self) {
        self.reached.notify_one();
        self.release.notified().await;
    }
}

#[async_trait]
impl Hooks for Gated {
    fn inner(&self) -> &dyn Directory {
        &*self.inner
    }
    async fn has_membership(&self, m: &Membership) -> Result<bool, DirectoryError> {
        if self.hold_checks.swap(false, Ordering::SeqCst) {
            self.hold().await;
        }
        self.inner.has_membership(m).await
    }
    async fn members(&self, g: &GroupDn) -> Result<Vec<GroupMember>, DirectoryError> {
        let read = Directory::members(&*self.inner, g).await;
        if self.hold_members.swap(false, Ordering::SeqCst) {
            self.hold().await;
        }
        read
    }
}

/// A bot over a gated directory, with alice holding an active lease on
/// the ZSP group `db-admins` (remediation on).
async fn alice_holds_db_admins() -> (TestBot, Arc<Forward<Gated>>, Arc<MemoryDirectory>) {
    let memory = crate::support::bot::seeded();
    let gated = Gated::new(memory.clone());
    let dir: Arc<dyn Directory> = gated.clone();
    let bot = TestBot::builder()
        .policy(|p| p.groups[0].remediate = true)
        .wrap(|_| dir)
        .build();
    let id = TestBot::request_id(&bot.ok("alice", "request db-admins 1h x").await);
    bot.ok("bob", &format!("approve {id}")).await;
    assert_eq!(bot.lease().state, LeaseState::Active);
    assert!(memory.members(DB).contains("alice"));
    (bot, gated, memory)
}

/// `check_group` reads the group's members, then the live leases. A lease
/// that ends in between (released, expired, revoked: its membership already
/// removed) leaves its holder in the stale member list and out of the lease
/// set: the monitor alerts ZSP drift that never existed, writes a
/// remediation lease for it (which holds the user's slot meanwhile) and
/// then alerts "ZSP drift remediated: jitbot removed alice".
#[tokio::test]
async fn a_lease_ending_during_a_zsp_pass_is_not_reported_as_drift() {
    let (bot, gated, memory) = alice_holds_db_admins().await;
    gated.hold_members.store(true, Ordering::SeqCst);
    let pass = {
        let engine = bot.engine.clone();
        tokio::spawn(async move { engine.check_zsp().await })
    };
    gated.reached.notified().await;
    bot.ok("alice", "release db-admins").await;
    assert!(!memory.members(DB).contains("alice"));
    gated.release.notify_one();
    let drift = pass.await.expect("pass").expect("check");
    bot.run_due().await;

    assert!(drift.is_empty(), "no drift happened: {drift:?}");
    let leases = bot.engine.store().leases().unwrap();
    assert_eq!(leases.len(), 1, "no remediation lease: {leases:?}");
    let false_alerts: Vec<_> = alerts(&bot.engine)
        .into_iter()
        .filter(|t| t.contains("drift"))
        .collect();
    assert!(false_alerts.is_empty(), "{false_alerts:?}");
}

/// `check_granted_memberships` takes the live leases, then asks the
/// directory about each. A lease revoked in between (its membership
/// rightly removed) is alerted as "holds lease … but is not a member;
/// someone changed it outside jitbot": a false alert, because the alert is
/// not fenced on the lease still being active.
#[tokio::test]
async fn a_lease_ending_during_a_zsp_pass_is_not_alerted_as_missing() {
    let (bot, gated, _memory) = alice_holds_db_admins().await;
    gated.hold_checks.store(true, Ordering::SeqCst);
    let pass = {
        let engine = bot.engine.clone();
        tokio::spawn(async move { engine.check_zsp().await })
    };
    gated.reached.notified().await;
    bot.ok("alice", "release db-admins").await;
    gated.release.notify_one();
    pass.await.expect("pass").expect("check");

    let false_alerts: Vec<_> = alerts(&bot.engine)
        .into_iter()
        .filter(|t| t.contains("not a member"))
        .collect();
    assert!(false_alerts.is_empty(), "{false_alerts:?}");
}

/// Two configured groups may name one directory group (the same DN, or one
/// spelled in another case or spacing). Their leases then share one
/// membership under two slots: alice's lease on the second is recorded as
/// standing (it sees the first one's membership) while the first one's end
/// removes it; and the ZSP monitor of one counts the other's lease holder
/// as drift and removes her membership while her lease is active.
#[test]
fn two_groups_naming_one_directory_group_are_refused() {
    let text = r#"
[store]
path = "/tmp/x"

[directory]
kind = "memory"

[memory]

[[group]]
name = "db-admins"
dn = "cn=db-admins,ou=groups,dc=example,dc=org"
requesters = { users = ["alice"] }
approvers = { users = ["bob"] }
default_duration = "1h"
max_duration = "4h"
zsp = true
remediate = true

[[group]]
name = "db-oncall"
dn = "CN=DB-Admins, ou=groups,dc=example,dc=org"
requesters = { users = ["alice"] }
approvers = { users = ["bob"] }
default_duration = "1h"
max_duration = "4h"
"#;
    let err = match jitbot::config::Config::parse(text, "t.toml") {
        Ok(_) => panic!("two groups with one DN were accepted"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("group[db-oncall].dn"), "{err}");
}

/// A request for a group the user holds becomes an extension request of
/// that lease. When the lease ends first, the extension request stays
/// pending: approving it is refused ("not active") and rolls back, and it
/// counts as the user's one pending request, so asking for the group again
/// is refused until somebody cancels it or it times out (up to the whole
/// approval window) — the user is locked out of a group they may request.
#[tokio::test]
async fn an_extension_request_outliving_its_lease_does_not_lock_the_user_out() {
    let bot = TestBot::new();
    let id = TestBot::request_id(&bot.ok("alice", "request db-admins 1h x").await);
    bot.ok("bob", &format!("approve {id}")).await;
    bot.advance(Duration::minutes(50));
    let ext = bot.ok("alice", "request db-admins 1h more").await;
    assert!(ext.contains("extension"), "{ext}");
    bot.advance(Duration::minutes(11));
    bot.run_due().await;
    assert_eq!(
        bot.engine.store().live_leases().unwrap().len(),
        0,
        "the lease ended"
    );
    let again = bot.say("alice", "request db-admins 1h again").await;
    assert!(again.ok, "locked out by a stale extension: {}", again.text);
}

/// A TCP proxy in front of slapd that can hold what the client sends (the
/// server then sees it late, as from a slow network), for ordering tests.
struct HoldingProxy {
    port: u16,
    held: tokio::sync::watch::Sender<bool>,
    /// Client writes the proxy has read (sent on or held).
    reads: Arc<std::sync::atomic::AtomicUsize>,
}

impl HoldingProxy {
    async fn start(upstream: u16) -> HoldingProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (held, watch) = tokio::sync::watch::channel(false);
        let reads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = reads.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = tokio::net::TcpStream::connect(("127.0.0.1", upstream))
                    .await
                    .expect("connect slapd");
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let mut hold = watch.clone();
                let counter = counter.clone();
                let (chunks, mut queued) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
                tokio::spawn(async move {
                    use tokio::io::AsyncReadExt;
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        counter.fetch_add(1, Ordering::SeqCst);
                        if chunks.send(buf[..n].to_vec()).is_err() {
                            return;
                        }
                    }
                });
                tokio::spawn(async move {
                    use tokio::io::AsyncWriteExt;
                    while let Some(chunk) = queued.recv().await {
                        // Sent on only once nothing is held.
                        if hold.wait_for(|h| !*h).await.is_err() {
                            return;
                        }
                        if sw.write_all(&chunk).await.is_err() {
                            return;
                        }
                        // slapd runs the operations of one connection
                        // concurrently: let each finish before the next.
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                });
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut sr, &mut cw).await;
                });
            }
        });
        HoldingProxy { port, held, reads }
    }

    /// Waits until the client has written `n` times in all.
    async fn wait_reads(&self, n: usize) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.reads.load(Ordering::SeqCst) < n {
            assert!(
                std::time::Instant::now() < deadline,
                "the client never sent write {n}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
}

/// `combined` re-queues a change whose leader was cancelled before it
/// answered ("every change is idempotent"), and sends it again as a first
/// send. But the cancelled leader's modify had already gone out: the
/// server applies it, then answers the second send with 20
/// (attributeOrValueExists), which `add_one` reports as
/// `Added::AlreadyPresent` because *this* modify was sent once. The grant
/// then records jitbot's own membership as someone else's
/// (`added_by_someone_else`) and never removes it. A leader is cancelled
/// whenever the future driving it is dropped: an admin API call
/// (`revoke_as_admin`, `/zsp/check`) or a web console command whose HTTP
/// client hung up, or a shutdown.
#[tokio::test]
async fn an_add_sent_by_a_cancelled_batch_leader_is_not_taken_for_someone_elses() {
    let slapd = crate::support::slapd::Slapd::start();
    let proxy = HoldingProxy::start(slapd.port()).await;
    let mut config = slapd.ldap_config();
    config.url = format!("ldap://127.0.0.1:{}", proxy.port);
    let dir = Arc::new(
        jitbot::directory::ldap::LdapDirectory::new(&config, &crate::support::slapd::group_configs())
            .expect("LdapDirectory::new"),
    );
    dir.ping().await.expect("connected");
    let group = GroupDn::new(crate::support::slapd::DB_ADMINS);
    let membership = |uid: &str| Membership {
        group: group.clone(),
        attribute: "member".into(),
        value: format!("uid={uid},{}", crate::support::slapd::PEOPLE),
        identity: None,
    };
    let add = |uid: &str| {
        let (dir, m) = (dir.clone(), membership(uid));
        tokio::spawn(async move { dir.add_membership(&m).await })
    };
    let settle = || tokio::time::sleep(std::time::Duration::from_millis(150));

    proxy.held.send_replace(true);
    let sent = proxy.reads.load(Ordering::SeqCst);
    let first = add("alice"); // leads; its modify waits in the proxy
    proxy.wait_reads(sent + 1).await;
    let second = add("bob"); // queued
    settle().await;
    let third = add("carol"); // queued
    settle().await;
    first.abort(); // bob's caller leads and sends bob and carol together
    proxy.wait_reads(sent + 2).await;
    second.abort(); // cancelled before it answers carol's caller
    proxy.wait_reads(sent + 3).await;
    proxy.held.send_replace(false); // the server now sees all three modifies
    let carol = third.await.expect("join").expect("add carol");

    assert_eq!(
        slapd
            .values(crate::support::slapd::DB_ADMINS, "member")
            .await
            .len(),
        4,
        "placeholder, alice, bob and carol"
    );
    assert_eq!(
        carol,
        Added::Added,
        "carol's value was written by jitbot's own (combined) modify, not by someone else"
    );
}

/// A lease written by the previous release records no `Membership`. Its
/// revocation falls back to today's config (`to_remove`): after the
/// group's `dn` changes, jitbot removes the user from the *new* DN (where
/// she may be a standing member: a membership jitbot never added) and
/// leaves the one it added in the old DN for good. Start-up and
/// `check-config` cannot name such a lease either (nothing to compare).
/// The upgrade start, with the config unchanged, is the last moment the
/// value can be known: record it then.
#[tokio::test]
async fn a_lease_from_before_recorded_memberships_survives_a_dn_change() {
    let bot = TestBot::new();
    bot.dir.add_group(DB, ["alice"]); // added by the previous release
    let group = policy().groups[0].clone();
    bot.engine
        .store()
        .update(bot.engine.now(), |tx| {
            let mut lease = jitbot_core::Lease::start(
                jitbot_core::LeaseId::new("l-old"),
                jitbot_core::RequestId::new("r-old"),
                &group,
                UserId::new("alice"),
                jitbot_core::Span::from_hours(1),
                tx.now(),
            );
            lease.preexisting = Some(false);
            lease.activate().expect("activate");
            tx.set_timer(jitbot::store::TimerKind::Expire, "l-old", lease.expires_at);
            tx.put_lease(jitbot::store::LeaseRecord { lease, origin: None });
            Ok::<_, StoreError>(())
        })
        .await
        .expect("legacy lease");
    let memory = bot.dir.clone();
    // The upgrade: the new release starts on the same config.
    let bot = bot.restart(memory.clone(), policy());
    // What `jitbot run` does at start, before the scheduler runs.
    assert_eq!(bot.engine.adopt_legacy_leases().await.expect("adopt"), 1);
    // Later the group moves; alice is a standing member of the new DN.
    memory.add_group(crate::support::bot::WEB, ["dave", "alice"]);
    let mut moved = policy();
    moved.groups[0].dn = GroupDn::new(crate::support::bot::WEB);
    let bot = bot.restart(memory.clone(), moved);
    bot.advance(Duration::hours(1));
    bot.run_due().await;

    assert!(
        memory.members(crate::support::bot::WEB).contains("alice"),
        "a standing membership jitbot never added was removed"
    );
    assert!(
        !memory.members(DB).contains("alice"),
        "the membership the lease added outlives it"
    );
}

/// `SteadyClock` keeps counting from before a backward wall-clock step, but
/// only in memory: a restart while the wall clock is still behind anchors
/// the new clock at the wall clock again, and every revocation is delayed
/// by the size of the step (defect 8, through a restart). The store knows
/// the latest time it committed; the clock must not start before it.
#[tokio::test]
async fn a_restart_after_a_backward_clock_step_does_not_delay_revocations() {
    use chrono::TimeZone;
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("db");
    let wall = jitbot::clock::ManualClock::new(chrono::Utc.with_ymd_and_hms(2026, 3, 1, 9, 0, 0).unwrap());
    let mono = Arc::new(std::sync::Mutex::new(std::time::Duration::ZERO));
    let steady = || {
        let (w, m) = (wall.clone(), mono.clone());
        Arc::new(jitbot::clock::SteadyClock::with_sources(
            move || jitbot::clock::Clock::now(&w),
            move || *m.lock().unwrap(),
        ))
    };
    let memory = crate::support::bot::seeded();
    let settings = jitbot::engine::EngineSettings {
        retry_base: jitbot_core::Span::from_secs(5),
        retry_max: jitbot_core::Span::from_mins(5),
        alert_after: 3,
        ..jitbot::engine::EngineSettings::default()
    };
    let engine = Engine::new(
        policy(),
        reopen(&path),
        memory.clone(),
        steady(),
        settings.clone(),
    );
    let reply = say(&engine, "alice", "request db-admins 1h x").await;
    let id = TestBot::request_id(&reply.text);
    assert!(say(&engine, "bob", &format!("approve {id}")).await.ok);
    assert!(memory.members(DB).contains("alice"));

    // The wall clock steps back an hour; jitbot restarts meanwhile.
    wall.advance(Duration::hours(-1));
    drop(engine);
    let engine = Engine::new(policy(), reopen(&path), memory.clone(), steady(), settings);

    // One real hour later the lease is due.
    wall.advance(Duration::hours(1));
    *mono.lock().unwrap() += std::time::Duration::from_secs(3600);
    run_due(&engine).await;
    assert!(
        !memory.members(DB).contains("alice"),
        "revocation delayed by the size of the step (engine now {})",
        engine.now()
    );
}
