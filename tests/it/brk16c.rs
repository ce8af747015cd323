//! Issue 16's third review (brk16c): where the PostgreSQL / replicas
//! guarantees still break. Each `brk16c_*` test fails on the code it was
//! written against (`main` at ee7d0d8), against the real servers
//! (PostgreSQL 15 from `support::postgres`, the real `jitbot run` binary),
//! with a message naming the invariant that broke. Findings and suggested
//! fixes: `/work/notes/brk16c-findings.md`.

use crate::support::postgres::{cluster, memory_replica_config, Database, PASSWORD};
use crate::support::process::Jitbot;
use chrono::Utc;
use jitbot::store::{AuditDraft, Store, StoreError, TimerKind};
use std::path::Path;
use std::time::Duration;

/// Commits one timer and one audit record.
async fn write(store: &Store, timer: &str) -> Result<(), StoreError> {
    store
        .update(Utc::now(), |tx| {
            tx.set_timer(TimerKind::Warn, timer, Utc::now());
            tx.audit(AuditDraft {
                actor: "test".into(),
                action: "test.write".into(),
                ..Default::default()
            });
            Ok::<(), StoreError>(())
        })
        .await
}

/// Opens `path` as a sled store the way every sled entry point does
/// (`Store::open`), waiting (up to 10 s) for a store just dropped to let
/// go of the directory's lock.
fn open_as_sled(path: &Path) -> Result<Store, StoreError> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match Store::open(path, 16) {
            Err(StoreError::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            opened => return opened,
        }
    }
}

/// A replica's mirror on `db` at `path`, with two commits in it, closed
/// again (as when its pod is stopped and the volume kept).
async fn a_closed_mirror(db: &Database, path: &Path) {
    let store = Store::open_postgres(path, 16, &db.settings()).expect("open a replica");
    write(&store, "before").await.unwrap();
    write(&store, "also-before").await.unwrap();
    store.flush().await.unwrap();
}

/// `Store::open`, the sled backend's open, is what `jitbot run` uses with
/// `[store] kind = "sled"` (a config rolled back, or a replica's config
/// with its `kind` line lost), and what `jitbot restore`, `backup`,
/// `audit verify` and `store copy --from` open. `open_postgres` refuses a
/// sled store (`holds_sled_store`), and since brk16b a mirror carries a
/// permanent kind mark (`mirror/kind = postgres`) — but nothing on the
/// sled side reads that mark. A replica's mirror opens as a sled store:
/// that process then commits alone, to a stale copy, unfenced, and (in
/// `jitbot run`) leads by itself (sled: `election()` is `None`, token 1),
/// driving the directory beside the real leader on PostgreSQL. Its writes
/// never reach the database, and the next open as a replica overwrites or
/// reloads them.
#[tokio::test]
async fn brk16c_a_replicas_mirror_opens_as_a_sled_store() {
    let db = Database::create();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("mirror");
    a_closed_mirror(&db, &path).await;
    let opened = open_as_sled(&path);
    let Ok(store) = opened else {
        let e = opened.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            e.contains("PostgreSQL") || e.contains("mirror"),
            "refused, but without saying it is a mirror of PostgreSQL or what to do: {e}"
        );
        return;
    };
    let split = write(&store, "split-brain").await;
    let head = db.value("SELECT version::text FROM jitbot_head");
    panic!(
        "Store::open (sled: `jitbot run` with [store] kind = \"sled\", restore, store copy --from) opened a \
         PostgreSQL replica's mirror at {} as a sled store and committed to it ({split:?}) while the database \
         stayed at version {head}: that process would lead alone, unfenced, on a stale copy, beside the \
         replicas' leader. A directory marked `mirror/kind = postgres` must be refused by the sled open too, \
         saying to set [store] kind = \"postgres\" (or to give a sled store's path)",
        path.display()
    );
}

/// `jitbot store copy --from <dir> --to <url>` is documented for a stopped
/// sled store. Given a replica's mirror (the `[store] path` of a replica
/// on another database, e.g. when moving a replicated installation to a
/// new PostgreSQL), it copies that mirror — a possibly stale copy of a
/// database other replicas keep writing — into the new database, verifies
/// the copy against the mirror it read, and reports success. The source
/// being written is exactly what the copy must refuse: its counts and
/// audit chain "verify" against a snapshot that is not the store.
#[tokio::test]
async fn brk16c_store_copy_copies_a_replicas_mirror_as_if_it_were_the_store() {
    let live = Database::create();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("mirror");
    a_closed_mirror(&live, &path).await;
    // Another replica keeps writing to the live database meanwhile.
    let other = Store::open_postgres(&tmp.path().join("other"), 16, &live.settings()).unwrap();
    write(&other, "after-the-mirror-closed").await.unwrap();
    let target = Database::create();
    let settings = target.settings();
    let from = path.clone();
    let copied = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match Store::copy_to_postgres(&from, &settings, None) {
                Err(StoreError::Locked { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                done => return done,
            }
        }
    })
    .await
    .unwrap();
    match copied {
        Err(e) => assert!(
            e.to_string().contains("PostgreSQL") || e.to_string().contains("mirror"),
            "refused, but without saying the source is a replica's mirror: {e}"
        ),
        Ok(report) => panic!(
            "`jitbot store copy --from {}` copied a PostgreSQL replica's mirror into a new database and \
             verified it ({report:?}): the live database holds {} timers, the copy {}; a mirror is not a \
             stopped sled store, and the copy must refuse it",
            path.display(),
            live.value("SELECT count(*)::text FROM jitbot_kv WHERE tree = 'timers' AND value IS NOT NULL"),
            target.value("SELECT count(*)::text FROM jitbot_kv WHERE tree = 'timers' AND value IS NOT NULL"),
        ),
    }
}

/// The fence is `SELECT token FROM jitbot_leader WHERE token = $1 AND
/// expires_at > now()`: the token alone, not whose it is. pg.rs plans
/// for a database that loses commits (a failover to an asynchronous
/// standby that was behind: commit identities, mirror reloads). Lose the
/// takeover: a's term expired (a hung), b took over with token 2 and
/// leads; the standby promoted still has a's expired row with token 1.
/// The next replica to ask — a, back — gets "a new term", token 2 again.
/// Now a leads term 2, and b, deposed, still holds token 2 as its fence:
/// its commits pass the check ("a deposed leader must not commit a
/// transition after it lost leadership"), and its directory window stays
/// open until its own next renewal.
#[tokio::test]
async fn brk16c_a_token_reissued_after_the_database_lost_a_takeover_lets_the_deposed_leader_commit() {
    let db = Database::create();
    let tmp = tempfile::tempdir().unwrap();
    let a = Store::open_postgres(&tmp.path().join("a"), 16, &db.settings()).unwrap();
    let b = Store::open_postgres(&tmp.path().join("b"), 16, &db.settings()).unwrap();
    let term = Duration::from_secs(30);
    let first = a.lead("a", term).unwrap().expect("a leads");
    a.set_fence(Some(first));
    write(&a, "a-leads").await.unwrap();

    // a hangs; its term runs out; b takes over and leads.
    db.run("UPDATE jitbot_leader SET expires_at = clock_timestamp() - interval '1 second'");
    a.step_down();
    a.set_fence(None);
    let second = b.lead("b", term).unwrap().expect("b takes the expired term");
    assert!(second > first);
    b.set_fence(Some(second));
    write(&b, "b-leads").await.unwrap();

    // The primary is lost; the standby promoted had not received b's
    // takeover: its jitbot_leader row is a's, expired.
    db.run(&format!(
        "UPDATE jitbot_leader SET holder = 'a', token = {first}, \
         expires_at = clock_timestamp() - interval '1 second'"
    ));
    let third = a.lead("a", term).unwrap().expect("a takes the (expired) term");
    a.set_fence(Some(third));
    assert_eq!(
        b.lead("b", term).unwrap(),
        None,
        "a holds the term now: b is deposed"
    );
    // b's leadership loop has not renewed yet: its fence is still its token.
    let head = db.value("SELECT version::text FROM jitbot_head");
    let deposed = write(&b, "deposed-b-commits").await;
    assert!(
        matches!(deposed, Err(StoreError::Deposed)),
        "b was deposed (a holds the term, token {third}; b's fence is {second}) yet its commit was {deposed:?}: \
         the database went from version {head} to {}. After the database lost b's takeover, the next term \
         re-used token {second}, and the fence checks only the token: check the holder too (or a token that \
         can never be issued twice)",
        db.value("SELECT version::text FROM jitbot_head")
    );
}

/// `/readyz` is documented as "ready when the store answers"; with
/// PostgreSQL it asks the local mirror (`next_due`), never the database.
/// A replica that cannot reach PostgreSQL at all — every command, grant
/// and revocation it takes fails — keeps answering "ready (follower)",
/// so a load balancer / Kubernetes keeps sending it Slack and Discord
/// traffic (and a PodDisruptionBudget counts it as available) while it
/// can do nothing. Here the database refuses the replica's connections
/// (ALLOW_CONNECTIONS false, its sessions ended).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brk16c_a_replica_that_cannot_reach_postgres_says_it_is_ready() {
    let db = Database::create();
    let url = cluster().url(&db.name);
    let env = [("JITBOT_TEST_PGPW", PASSWORD)];
    let bot = Jitbot::start(&memory_replica_config(&url, ""), &env).await;
    crate::support::net::eventually(Duration::from_secs(15), "the replica leads", || {
        bot.log_text().contains("this replica leads").then_some(())
    })
    .await;
    cluster()
        .admin(&format!(
            "ALTER DATABASE {0} ALLOW_CONNECTIONS false; \
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{0}'",
            db.name
        ))
        .expect("cut the replica off");
    // It notices: its leadership renewals fail and it steps down.
    crate::support::net::eventually(
        Duration::from_secs(15),
        "the replica fails to reach PostgreSQL",
        || bot.log_text().contains("cannot reach PostgreSQL").then_some(()),
    )
    .await;
    let http = reqwest::Client::new();
    let mut answers = Vec::new();
    for _ in 0..6 {
        let resp = http
            .get(format!("{}/readyz", bot.admin_base))
            .send()
            .await
            .expect("admin /readyz answers");
        answers.push((resp.status().as_u16(), resp.text().await.unwrap_or_default()));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let _ = cluster().admin(&format!("ALTER DATABASE {} ALLOW_CONNECTIONS true", db.name));
    assert!(
        answers.iter().all(|(status, _)| *status == 503),
        "a replica that cannot reach PostgreSQL (its leadership renewals fail: \"cannot reach PostgreSQL\"; \
         every command it takes fails) must not answer /readyz with ready; it answered {answers:?}. \
         check_ready asks the local mirror (next_due), never the database"
    );
}

/// A PostgreSQL restart (or a failover, or a proxy such as PgBouncer
/// recycling its server connections) ends every session; here the
/// server's side of each jitbot session is ended the way a restart does
/// (`pg_terminate_backend`: FATAL 57P01), and the database is up again at
/// once. The replica's connection thread only notices a closed connection
/// when it next uses it (`Conn::client` checks `is_closed`, which the
/// blocking client learns by failing a statement), so the first
/// transaction after the restart fails — a command, an approval or a
/// revocation's commit, refused with "PostgreSQL BEGIN failed" although
/// the database is up — and so does the first leadership renewal. Nothing
/// was sent that could have committed: BEGIN on a dead connection can be
/// retried on a new one.
#[tokio::test]
async fn brk16c_the_first_commit_after_postgres_restarts_fails_though_the_database_is_up() {
    let db = Database::create();
    let tmp = tempfile::tempdir().unwrap();
    let a = Store::open_postgres(&tmp.path().join("a"), 16, &db.settings()).unwrap();
    let term = Duration::from_secs(30);
    let token = a.lead("a", term).unwrap().expect("a leads");
    a.set_fence(Some(token));
    write(&a, "before-the-restart").await.unwrap();
    cluster()
        .admin(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = '{}' AND application_name = 'jitbot'",
            db.name
        ))
        .expect("end the replica's sessions");
    // The server is up again at once (a restart from the clients' side).
    std::thread::sleep(Duration::from_millis(200));
    let renewed = a.lead("a", term);
    let committed = write(&a, "after-the-restart").await;
    assert!(
        committed.is_ok() && matches!(renewed, Ok(Some(t)) if t == token),
        "PostgreSQL restarted and is up, yet the replica's first commit after it was {committed:?} and its \
         first leadership renewal {renewed:?}: a connection closed by the server is found only by failing \
         the caller's statement. A BEGIN (or a renewal) that fails because the connection was closed \
         before anything was sent must be retried once on a new connection"
    );
}

/// The admin API and `jitbot` admin CLI work "against any replica". On a
/// follower, `revoke_as_admin` commits the lease's move to `Revoking` and
/// calls `drive`, which on a follower does nothing (the leader drives);
/// it then answers "lease … revoked" — while the membership is untouched,
/// and stays so until a leader's scheduler picks the `Revoke` timer up:
/// about a second with a live leader, up to a failover (≈ 10 s) when the
/// leader is gone, indefinitely when no replica can lead. An admin
/// revoking a compromised account in an incident reads "revoked" and moves
/// on. Here the leader (a) is gone (it stopped renewing; its term has not
/// expired yet) and the admin asks the follower (b).
#[tokio::test]
async fn brk16c_an_admin_revoke_on_a_follower_says_revoked_while_the_membership_stays() {
    use crate::support::bot::{open_store, policy, TestBot, WEB};
    use jitbot::engine::Engine;
    use std::sync::Arc;
    let bot = TestBot::builder().postgres().build();
    let tmp = tempfile::tempdir().unwrap();
    let b = Engine::new(
        policy(),
        open_store(&tmp.path().join("b"), bot.pg.as_deref()).expect("open replica b"),
        bot.dir.clone(),
        Arc::new(bot.clock.clone()),
        bot.engine.settings().clone(),
    );
    let term = Duration::from_secs(30);
    let token = bot.engine.store().lead("a", term).unwrap().expect("a leads");
    bot.engine.store().set_fence(Some(token));
    assert_eq!(b.store().lead("b", term).unwrap(), None, "b follows");
    let id = TestBot::request_id(&bot.ok("alice", "request web-admins 1h x").await);
    bot.ok("bob", &format!("approve {id}")).await;
    assert!(bot.is_member(WEB, "alice"), "a granted the lease");
    let lease = bot.lease().id;

    // a is gone from here on; the admin asks b.
    let said = b
        .revoke_as_admin(lease.as_str(), "compromised account", "admin-api")
        .await
        .expect("the follower takes the revoke");
    let still = bot.is_member(WEB, "alice");
    assert!(
        !(said.contains("revoked") && still),
        "the follower answered {said:?} to an admin revoke, and alice still holds web-admins: nothing \
         removed it (a follower's drive does nothing; the leader's scheduler would, and the leader is \
         gone). Say what is true (\"revocation committed; the leader removes the membership\"), or wait for \
         the leader to end the lease before answering"
    );
}
