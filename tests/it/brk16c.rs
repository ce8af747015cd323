//! Issue 16's third review (brk16c): where the PostgreSQL / replicas
//! guarantees still break. Each `brk16c_*` test fails on the code it was
//! written against (`main` at ee7d0d8), against the real servers
//! (PostgreSQL 15 from `support::postgres`, the real `jitbot run` binary),
//! with a message naming the invariant that broke. Findings and suggested
//! fixes: `/work/notes/brk16c-findings.md`.

use crate::support::postgres::{cluster, Database};
use chrono::Utc;
use jitbot::store::{AuditDraft, Store, StoreError, TimerKind};
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
