//! The store under concurrent writers: every `update` commits and flushes,
//! none deadlocks, and the audit chain stays intact.

use chrono::Utc;
use jitbot::store::{AuditCheck, AuditDraft, Store, StoreError, TimerKind};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_flushed_updates_complete() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("db"), 16).unwrap();
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
