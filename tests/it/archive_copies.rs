//! The audit archive's copies and the operator's guard rails, from review
//! brk17c (issue 17's second review of retention): a deposed leader's late
//! copy of archived records is read as the copy it is and stops nothing;
//! `audit export` refuses an archived record the store contradicts; a
//! `/metrics` scrape never stalls the runtime counting the outbox; on
//! PostgreSQL the archive may not sit beside one replica's mirror.

use chrono::{Duration, TimeZone, Utc};
use jitbot::store::retention::RetentionSettings;
use jitbot::store::{AuditCheck, AuditDraft, Store, StoreError};
use jitbot_core::{Instant, Span};
use std::path::{Path, PathBuf};

pub(crate) fn t0() -> Instant {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
}

/// One audit record at `at`, in a commit of its own.
pub(crate) async fn audit_at(store: &Store, at: Instant, detail: String) {
    store
        .update(at, |tx| {
            tx.audit(AuditDraft {
                actor: "alice".into(),
                action: "request.opened".into(),
                detail,
                ..AuditDraft::default()
            });
            Ok::<(), StoreError>(())
        })
        .await
        .unwrap();
}

fn settings(dir: PathBuf) -> RetentionSettings {
    RetentionSettings {
        batch: 7,
        ..RetentionSettings::new(Span::parse_long("30d").unwrap(), dir)
    }
}

/// The archive a PostgreSQL failover can leave, built on one sled store:
///
/// - 40 audit records: 1..=39 a minute apart from `t0`, record 40 a month later.
/// - Leader A's pass (cutoff `t0` + 20 min) reads records 1..=20 and writes
///   them as `audit-1-20`; its `write_file` then stalls before the rename
///   (the archive is a network share and A's host is partitioned, which
///   also costs A its PostgreSQL term). Here that file is written to a
///   staging directory, as far as A got.
/// - Leader B's pass, later, archives records 1..=39 as `audit-1-39` and
///   removes them from the store. The trail is intact (checked).
/// - A's write finishes: the rename puts `audit-1-20` into the archive
///   (`write_file` finds no file of that name, so it renames). A's removal
///   then fails (it no longer leads); the store is untouched.
///
/// `audit-1-20` holds byte-identical copies of records 1..=20: nothing is
/// missing, repeated with other bytes, altered or reordered.
async fn archive_with_a_deposed_leaders_late_file(tmp: &Path) -> (Store, RetentionSettings, PathBuf) {
    let store = Store::open(&tmp.join("db"), 16).unwrap();
    for i in 0..39 {
        audit_at(&store, t0() + Duration::minutes(i), format!("record {}", i + 1)).await;
    }
    audit_at(&store, t0() + Duration::days(31), "record 40".into()).await;
    let s = settings(tmp.join("audit-archive"));
    let staging = settings(tmp.join("leader-a-staging"));
    let a_now = t0() + Duration::days(30) + Duration::minutes(20);
    let a_file = store
        .archive_then_stop(a_now, &staging)
        .unwrap()
        .expect("leader A's file");
    assert_eq!((a_file.first, a_file.last), (1, 20), "leader A's range");
    let pruned = store
        .prune(t0() + Duration::days(31) + Duration::hours(2), &s)
        .await
        .unwrap();
    assert_eq!(pruned.audit, 39, "leader B archives all but the last record");
    assert_eq!(
        store.verify_audit_with_archive(&s.archive_dir, None).unwrap(),
        AuditCheck::Intact { records: 40 },
        "the trail is intact before A's late rename"
    );
    let late = s.archive_dir.join(a_file.path.file_name().unwrap());
    std::fs::rename(&a_file.path, &late).unwrap();
    (store, s, late)
}

/// A deposed leader's late archive file — an exact copy of records the new
/// leader archived too, in a file of another range — is read as a copy:
/// `audit verify --archive` says intact and `audit export` gives each
/// record once (review brk17c finding 1: the overlap rule refused it).
#[tokio::test]
async fn a_deposed_leaders_late_copy_of_archived_records_is_read_as_a_copy_by_verify_and_export() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, s, late) = archive_with_a_deposed_leaders_late_file(tmp.path()).await;
    let verified = store.verify_audit_with_archive(&s.archive_dir, None);
    let exported = store
        .audit_with_archive(Some(&s.archive_dir))
        .map(|all| all.iter().map(|e| e.seq).collect::<Vec<_>>());
    let intact = matches!(verified, Ok(AuditCheck::Intact { records: 40 }));
    let whole = exported
        .as_ref()
        .is_ok_and(|seqs| *seqs == (1..=40).collect::<Vec<_>>());
    assert!(
        intact && whole,
        "{} (a byte-identical copy of records 1..=20 that a deposed leader's pass renamed in late) \
         must not make the intact trail fail:\n  verify --archive: {verified:?}\n  export: {:?}",
        late.display(),
        exported.map(|seqs| seqs.len())
    );
}

/// With `[audit] anchor_file` and retention on, start-up checks the chain
/// through the archive; the deposed leader's late copy does not stop
/// `jitbot run` (review brk17c finding 1: any archive error ended it, so
/// no replica would have started, and nothing would have been revoked).
#[tokio::test]
async fn a_deposed_leaders_late_archive_copy_does_not_stop_jitbot_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, s, _late) = archive_with_a_deposed_leaders_late_file(tmp.path()).await;
    if let (Err(what), log) = start_with_an_anchor_file(tmp.path(), store, &s).await {
        panic!(
            "{what}: an intact archive (plus a byte-identical copy of records 1..=20 a deposed leader \
             renamed in late) must not stop jitbot from starting and revoking. Its log:\n{log}"
        );
    }
}

/// The new leader's file with record 14 altered (by someone who can write
/// the archive directory), so it contradicts the deposed leader's copy:
/// the archive cannot be read through. Start-up reports that as tampering,
/// and jitbot starts and serves anyway — a damaged file outside the store
/// must not keep the revocations from running (it used to end `jitbot
/// run`, from the same review's finding 1).
#[tokio::test]
async fn a_contradicted_archive_copy_is_reported_at_start_up_and_jitbot_run_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, s, late) = archive_with_a_deposed_leaders_late_file(tmp.path()).await;
    let theirs = std::fs::read_dir(&s.archive_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| *p != late)
        .expect("the new leader's file");
    let mut lines = crate::retention::read_lines(&theirs);
    assert!(lines[13].contains("\"record 14\""), "{}", lines[13]);
    lines[13] = lines[13].replace("record 14", "record 41");
    crate::retention::write_lines(&theirs, &lines);
    assert!(
        store.verify_audit_with_archive(&s.archive_dir, None).is_err(),
        "the archive cannot be read through"
    );
    let (outcome, log) = start_with_an_anchor_file(tmp.path(), store, &s).await;
    if let Err(what) = outcome {
        panic!("{what}: a damaged archive file must not stop jitbot from starting. Its log:\n{log}");
    }
    let name = theirs.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        log.contains("cannot be checked") && log.contains(&name),
        "start-up reports the damaged file: {log}"
    );
}

/// Publishes the store's head to an anchor file, then runs `jitbot run`
/// with retention on that archive until `/healthz` answers (or it exits,
/// or 60 s pass). Returns the outcome and its log.
async fn start_with_an_anchor_file(
    tmp: &Path,
    store: Store,
    s: &RetentionSettings,
) -> (Result<(), String>, String) {
    let anchors = tmp.join("anchors");
    store.set_anchor_file(anchors.clone());
    store
        .record_published_anchor(&store.audit_head().unwrap())
        .unwrap();
    drop(store);
    let retention = format!("retain = \"30d\"\narchive_dir = \"{}\"", s.archive_dir.display());
    crate::archive_edges::run_until_healthy(tmp, &retention, &anchors).await
}

/// After a pass stopped between the archive write and the removal, the
/// store and the archive both hold records 1..=34; record 14 altered in
/// the file (by someone who can write the archive, not the store) makes
/// `audit export` refuse, naming the record, instead of handing out the
/// altered copy (review brk17c finding 2).
#[tokio::test]
async fn audit_export_refuses_an_archived_record_the_store_contradicts() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("db"), 16).unwrap();
    for i in 0..35 {
        audit_at(&store, t0() + Duration::minutes(i), format!("record {}", i + 1)).await;
    }
    let s = settings(tmp.path().join("audit-archive"));
    let file = store
        .archive_then_stop(t0() + Duration::days(40), &s)
        .unwrap()
        .expect("a file");
    assert_eq!((file.first, file.last), (1, 34));
    let mut lines = crate::retention::read_lines(&file.path);
    assert!(lines[13].contains("\"record 14\""), "{}", lines[13]);
    lines[13] = lines[13].replace("\"record 14\"", "\"record 14: bob approved his own request\"");
    crate::retention::write_lines(&file.path, &lines);
    let verified = store.verify_audit_with_archive(&s.archive_dir, None);
    assert!(
        !matches!(verified, Ok(AuditCheck::Intact { .. })),
        "verify names the altered copy: {verified:?}"
    );
    let exported = store.audit_with_archive(Some(&s.archive_dir));
    if let Ok(all) = &exported {
        let fourteen = all.iter().find(|e| e.seq == 14).expect("record 14 exported");
        let store_copy = store.audit(14).next().expect("record 14 in the store").unwrap();
        assert_eq!(
            fourteen.detail, store_copy.detail,
            "audit export returned record 14 altered in the archive file ({:?}) although the store \
             still holds it as {:?}: export must refuse (or use the store's copy), as verify does",
            fourteen.detail, store_copy.detail
        );
    }
}

/// A `/metrics` scrape counts the outbox (up to 1,000,000 keys) off the
/// runtime: with 200,000 queued notices — exactly when the gauge matters —
/// a ticker on the same runtime stalls for well under the count's own time
/// (review brk17c finding 3: the count ran in the async handler and every
/// task queued on that thread, a revocation's commit included, waited).
#[tokio::test]
async fn a_metrics_scrape_with_a_large_outbox_backlog_does_not_stall_the_runtime() {
    use crate::support::bot::TestBot;
    use jitbot::http::{self, HttpState, Limits};
    use jitbot::store::OutboxItem;
    use jitbot_core::RequestId;
    const QUEUED: u64 = 200_000;
    let bot = TestBot::new();
    let store = bot.engine.store().clone();
    let now = bot.engine.now();
    store.outbox_fan_out(now, 100_000, |_| Vec::new()).unwrap();
    let mut queued = 0;
    while queued < QUEUED {
        let n = (QUEUED - queued).min(5_000);
        store
            .update(now, |tx| {
                for i in 0..n {
                    tx.outbox(OutboxItem::UpdateApproval {
                        request: RequestId::new(format!("r-brk17c-{queued}-{i}")),
                    });
                }
                Ok::<(), StoreError>(())
            })
            .await
            .unwrap();
        queued += n;
    }
    let state = HttpState::new(bot.engine.clone(), None, jitbot::metrics::install(), None);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(http::serve(
        listener,
        http::admin_router(state, Vec::new()),
        Limits::default(),
        stopped,
    ));
    // Warm: the first scrape also pings the directory and fills caches.
    reqwest::get(format!("{base}/metrics")).await.unwrap();
    // The count alone, as warm as the scrape's will be.
    let started = std::time::Instant::now();
    let (counted, _) = store.outbox_backlog(jitbot::metrics::OUTBOX_BACKLOG_CAP).unwrap();
    let counting = started.elapsed();
    assert_eq!(counted, QUEUED as usize);
    // A task of the same runtime that wants to run every 2 ms.
    let stall = std::sync::Arc::new(std::sync::Mutex::new(std::time::Duration::ZERO));
    let (done, mut finished) = tokio::sync::watch::channel(false);
    let ticker = {
        let stall = stall.clone();
        tokio::spawn(async move {
            let mut last = std::time::Instant::now();
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_millis(2)) => {}
                    _ = finished.changed() => return,
                }
                let gap = last.elapsed();
                let mut worst = stall.lock().unwrap();
                *worst = (*worst).max(gap);
                last = std::time::Instant::now();
            }
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    done.send(true).unwrap();
    ticker.await.unwrap();
    // (The gauge's value is not checked: the metrics recorder is process-wide and
    // another test may scrape at the same moment.)
    assert!(text.contains("jitbot_outbox_backlog"), "{text}");
    let stalled = *stall.lock().unwrap();
    // A quarter of the count (the count off the runtime) or 50 ms (a count
    // that costs nothing), whichever is more.
    let bound = (counting / 4).max(std::time::Duration::from_millis(50));
    assert!(
        stalled < bound,
        "a /metrics scrape with {QUEUED} queued notices held the runtime thread for {stalled:?} \
         (counting the outbox's keys takes {counting:?}; up to 1,000,000 keys are counted per scrape): \
         every task on that thread — a revocation's commit, the scheduler — waited that long"
    );
}

/// On PostgreSQL, the `archive_dir` the example once suggested,
/// `/var/lib/jitbot/audit-archive`, beside `store.path`
/// (`/var/lib/jitbot/mirror`, each pod's emptyDir in
/// deploy/kubernetes/jitbot-postgres.yaml), is refused (review brk17c
/// finding 4).
#[test]
fn postgres_refuses_an_archive_dir_beside_the_mirror() {
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/jitbot.example.toml")).unwrap();
    let suggested = example
        .lines()
        .find_map(|l| l.strip_prefix("# archive_dir = "))
        .expect("the example suggests an archive_dir")
        .trim()
        .to_string();
    let manifest = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/kubernetes/jitbot-postgres.yaml"
    ))
    .unwrap();
    assert!(
        manifest.contains("path = \"/var/lib/jitbot/mirror\"")
            && manifest.contains("mountPath: /var/lib/jitbot }")
            && manifest.contains("emptyDir"),
        "the manifest keeps the mirror on the /var/lib/jitbot emptyDir"
    );
    let config = crate::archive_edges::postgres_config("/var/lib/jitbot/mirror", suggested.trim_matches('"'));
    if let Ok(c) = jitbot::config::Config::parse(&config, "jitbot.toml") {
        panic!(
            "kind = \"postgres\" with retain and archive_dir = {suggested} (the example's value) is \
             accepted: that is {}, the very default beside the mirror that must be refused, on the \
             manifest's per-pod emptyDir; archived audit records would leave PostgreSQL for one pod's \
             scratch disk",
            c.store.archive_dir().display()
        );
    }
}
