//! The store under concurrent writers, on sled and on PostgreSQL: every
//! `update` commits and flushes, none deadlocks, and the audit chain stays
//! intact.

use crate::support::bot::Backend;
use chrono::Utc;
use jitbot::store::{AuditCheck, AuditDraft, StoreError, TimerKind};

crate::both_stores!(
    many_concurrent_flushed_updates_complete,
    flavor = "multi_thread",
    worker_threads = 2
);
async fn many_concurrent_flushed_updates_complete(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let store = backend.open(&tmp.path().join("db"));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200 {
        let store = store.clone();
        tasks.spawn(async move {
            store
                .update(Utc::now(), |tx| {
                    tx.set_timer(TimerKind::Warn, &format!("x-{i}"), Utc::now());
                    tx.audit(AuditDraft {
                        actor: "test".into(),
                        action: "test.write".into(),
                        ..Default::default()
                    });
                    Ok::<(), StoreError>(())
                })
                .await
        });
    }
    let all = async {
        while let Some(r) = tasks.join_next().await {
            r.unwrap().unwrap();
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(60), all)
        .await
        .expect("concurrent flushed updates must not deadlock");
    assert_eq!(store.timer_count(), 200);
    assert_eq!(store.verify_audit().unwrap(), AuditCheck::Intact { records: 200 });
}

crate::both_stores!(due_timers_never_hands_out_a_timer_before_its_instant);
// Shows: `due_timers(now)` rounds `now` up to the ms as it does timer keys, so a timer due
// later in the same millisecond is handed out early (the test bot, the simulator and the
// bench drive timers with it; `expire` then re-arms the same key and `run_due` spins).
// Fix: bound the range by `now` rounded *down* (keys whose ms ≤ floor(now)), not up.
async fn due_timers_never_hands_out_a_timer_before_its_instant(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let store = backend.open(&tmp.path().join("db"));
    let ms = chrono::DateTime::from_timestamp_millis(1_780_000_000_123).unwrap();
    let due = ms + chrono::Duration::microseconds(700);
    store
        .update(ms, |tx| {
            tx.set_timer(TimerKind::Expire, "l-1", due);
            Ok::<(), StoreError>(())
        })
        .await
        .unwrap();
    let now = ms + chrono::Duration::microseconds(200);
    let early: Vec<_> = store
        .due_timers(now, 10)
        .unwrap()
        .into_iter()
        .filter(|t| t.id == "l-1")
        .collect();
    assert!(
        early.is_empty(),
        "at {now} the timer due {due} was handed out: {early:?}"
    );
}

/// Opens the store at `path`, waiting for a flush of a dropped store that
/// still holds the database.
fn reopen(path: &std::path::Path) -> jitbot::store::Store {
    for _ in 0..100 {
        match jitbot::store::Store::open(path, 16) {
            Err(StoreError::Locked { .. }) => std::thread::sleep(std::time::Duration::from_millis(20)),
            other => return other.expect("reopen store"),
        }
    }
    panic!("the store stayed locked");
}

/// What sled's `conf` file in a store says about compression.
fn compressed(path: &std::path::Path) -> bool {
    let conf = std::fs::read(path.join("conf")).expect("sled writes conf when it creates a store");
    let conf = String::from_utf8_lossy(&conf);
    assert!(conf.contains("use_compression:"), "{conf}");
    conf.contains("use_compression: true")
}

#[tokio::test]
async fn a_store_created_before_compression_keeps_opening_uncompressed_and_new_ones_are_compressed() {
    use jitbot_core::{LeaseId, RequestId};
    let tmp = tempfile::tempdir().unwrap();
    let old = tmp.path().join("old");
    {
        // A store as earlier releases created it (sled's defaults: no
        // compression), holding a lease record as they stored it.
        let db = sled::Config::new().path(&old).open().unwrap();
        db.open_tree("leases")
            .unwrap()
            .insert(
                "l-1",
                r#"{"v":"1","id":"l-1","request":"r-1","group":"db","user":"alice","starts_at":"2026-01-01T00:00:00Z","expires_at":"2026-01-01T01:00:00Z","latest_end":"2026-01-01T04:00:00Z","state":"ended","preexisting":false,"membership":null,"end":{"kind":"expired"},"ended_at":"2026-01-01T01:00:00Z","revoke_attempts":0,"last_error":null,"alerted":false,"warned":false,"origin":null}"#,
            )
            .unwrap();
        db.flush().unwrap();
    }
    assert!(!compressed(&old));
    let audit = |store: &jitbot::store::Store| {
        let store = store.clone();
        async move {
            store
                .update(Utc::now(), |tx| {
                    tx.audit(AuditDraft {
                        actor: "test".into(),
                        action: "test.write".into(),
                        ..Default::default()
                    });
                    Ok::<(), StoreError>(())
                })
                .await
                .unwrap()
        }
    };
    for round in 1..=2 {
        let store = reopen(&old);
        let lease = store.lease(&LeaseId::new("l-1")).unwrap().expect("the old lease");
        assert_eq!(lease.lease.request, RequestId::new("r-1"));
        audit(&store).await;
        assert_eq!(
            store.verify_audit().unwrap(),
            AuditCheck::Intact { records: round }
        );
        store.flush().await.unwrap();
    }
    assert!(!compressed(&old), "an old store stays as it was written");

    let new = tmp.path().join("new");
    for round in 1..=2 {
        let store = reopen(&new);
        audit(&store).await;
        assert_eq!(
            store.verify_audit().unwrap(),
            AuditCheck::Intact { records: round }
        );
        store.flush().await.unwrap();
    }
    assert!(compressed(&new), "a new store is compressed");
}

/// `[store] compression` is chosen when a store is created: a store keeps
/// the compression it was created with whatever a later open asks for
/// (sled refuses to open a store with another setting), and says which.
#[test]
fn a_store_keeps_the_compression_it_was_created_with() {
    use jitbot::store::{Compression, Store};
    let tmp = tempfile::tempdir().unwrap();
    for (created, asked_later) in [
        (Compression::Off, Compression::Zstd),
        (Compression::Zstd, Compression::Off),
    ] {
        let path = tmp.path().join(created.to_string());
        let store = Store::open_with(&path, 8, created).unwrap();
        assert_eq!(store.compression(), created);
        drop(store);
        let store = Store::open_with(&path, 8, asked_later).unwrap();
        assert_eq!(store.compression(), created, "reopened asking for {asked_later}");
    }
    let default = Store::open(&tmp.path().join("default"), 8).unwrap();
    assert_eq!(default.compression(), Compression::Zstd);
}
