//! Retention (`[store] retain`): old ended leases and finished requests are
//! pruned, never live, pending or unreviewed ones; old audit records move to
//! gzip archive files whose chain `audit verify --archive` checks with the
//! store's; a crash between the archive write and the removal loses and
//! duplicates nothing; the real binary prunes with `retain` in its config.

use crate::support::bot::TestBot;
use crate::support::net::eventually;
use crate::support::process::{Jitbot, ADMIN_TOKEN};
use chrono::{Duration, TimeZone, Utc};
use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use jitbot::secret::Secret;
use jitbot::store::retention::RetentionSettings;
use jitbot::store::{Anchor, AuditCheck, AuditDraft, OutboxItem, Store, StoreError};
use jitbot_core::{Instant, LeaseState, RequestId, Span};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

fn settings(dir: &Path) -> RetentionSettings {
    RetentionSettings::new(Span::parse_long("30d").unwrap(), dir.join("audit-archive"))
}

/// Delivers nothing and forgets every queued notice, as a delivered outbox would.
fn drain_outbox(store: &Store, now: Instant) {
    store.outbox_fan_out(now, 100_000, |_| Vec::new()).unwrap();
    assert!(store.outbox(10).unwrap().is_empty());
}

fn request_ids(store: &Store) -> Vec<String> {
    let mut ids: Vec<String> = store
        .requests()
        .unwrap()
        .into_iter()
        .map(|r| r.request.id.to_string())
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn old_ended_leases_and_finished_requests_are_pruned_and_live_ones_kept() {
    let bot = TestBot::builder()
        .policy(|p| p.groups[1].break_glass = true)
        .build();
    let store = bot.engine.store().clone();
    // Day 0: a whole lifecycle (request, approval, grant, expiry), a denied
    // request, and a break-glass grant nobody has reviewed yet.
    let done = TestBot::request_id(&bot.ok("alice", "request db-admins 1h old work").await);
    bot.ok("bob", &format!("approve {done}")).await;
    let denied = TestBot::request_id(&bot.ok("erin", "request db-admins 1h nope").await);
    bot.ok("bob", &format!("deny {denied} not today")).await;
    bot.ok("alice", "breakglass web-admins 1h prod down").await;
    let unreviewed = store.requests_awaiting_review().unwrap()[0]
        .request
        .id
        .to_string();
    bot.advance(Duration::hours(2));
    bot.run_due().await;
    assert!(store
        .leases()
        .unwrap()
        .iter()
        .all(|l| l.lease.state == LeaseState::Ended));
    // 400 days later: a live lease and a pending request.
    bot.advance(Duration::days(400));
    let live = TestBot::request_id(&bot.ok("dave", "request db-admins 1h today").await);
    bot.ok("bob", &format!("approve {live}")).await;
    let pending = TestBot::request_id(&bot.ok("erin", "request db-admins 1h later").await);
    let now = bot.engine.now();
    drain_outbox(&store, now);
    // A card update still to deliver names the old denied request.
    store
        .update(now, |tx| {
            tx.outbox(OutboxItem::UpdateApproval {
                request: RequestId::new(&denied),
            });
            Ok::<(), StoreError>(())
        })
        .await
        .unwrap();
    let live_lease = store.live_leases().unwrap()[0].lease.id.to_string();
    let head = store.audit_head().unwrap();

    let s = settings(bot.path.parent().unwrap());
    let pruned = store.prune(now, &s).await.unwrap();
    assert_eq!(pruned.requests, 1, "{pruned:?}");
    assert_eq!(pruned.leases, 1, "only the old lifecycle's lease: {pruned:?}");
    let mut kept = vec![denied.clone(), unreviewed.clone(), live.clone(), pending.clone()];
    kept.sort();
    assert_eq!(request_ids(&store), kept, "{done} pruned, the rest kept");
    let leases: Vec<String> = store
        .leases()
        .unwrap()
        .iter()
        .map(|l| l.lease.id.to_string())
        .collect();
    assert_eq!(
        leases.len(),
        2,
        "the break-glass lease (in review) and the live one: {leases:?}"
    );
    assert!(leases.contains(&live_lease));
    assert!(store
        .pending_requests()
        .unwrap()
        .iter()
        .any(|r| r.request.id.as_str() == pending));

    // The notice delivered: the denied request goes at the next pass; the
    // review acknowledged: the break-glass request and its lease go too.
    drain_outbox(&store, now);
    bot.ok("bob", &format!("ack {unreviewed}")).await;
    drain_outbox(&store, bot.engine.now());
    let again = store.prune(bot.engine.now(), &s).await.unwrap();
    assert_eq!((again.requests, again.leases), (2, 1), "{again:?}");
    let mut kept = vec![live.clone(), pending.clone()];
    kept.sort();
    assert_eq!(request_ids(&store), kept);
    // The engine still works on what is left.
    bot.ok("bob", &format!("approve {pending}")).await;

    // Day-0 audit records went to the archive; the store's chain verifies
    // from there on, and with the archive from record 1.
    assert!(pruned.audit > 0, "{pruned:?}");
    let base = store.audit_base().unwrap();
    assert_eq!(base.seq, pruned.audit);
    assert!(matches!(store.verify_audit().unwrap(), AuditCheck::Intact { .. }));
    let total = store.audit_head().unwrap().seq;
    assert_eq!(
        store
            .verify_audit_with_archive(&s.archive_dir, Some(&head))
            .unwrap(),
        AuditCheck::Intact { records: total }
    );
    let all = store.audit_with_archive(Some(&s.archive_dir)).unwrap();
    assert_eq!(
        all.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=total).collect::<Vec<_>>()
    );
    // An anchor from before the archived records now needs the archive.
    match store.verify_audit_against(Some(&head)).unwrap() {
        AuditCheck::Intact { .. } => {}
        other => panic!("the head anchor is still in the store: {other:?}"),
    }
    let early = Anchor {
        seq: 1,
        hash: all[1].prev.clone(),
    };
    match store.verify_audit_against(Some(&early)).unwrap() {
        AuditCheck::Broken { problem, .. } => assert!(problem.contains("--archive"), "{problem}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        store
            .verify_audit_with_archive(&s.archive_dir, Some(&early))
            .unwrap(),
        AuditCheck::Intact { records: total }
    );
}

fn t0() -> Instant {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
}

/// `n` audit records, one commit each, a minute apart from `t0`.
async fn write_audit(store: &Store, n: u64) {
    for i in 0..n {
        store
            .update(t0() + Duration::minutes(i as i64), |tx| {
                tx.audit(AuditDraft {
                    actor: "alice".into(),
                    action: "request.opened".into(),
                    detail: format!("record {}", i + 1),
                    ..AuditDraft::default()
                });
                Ok::<(), StoreError>(())
            })
            .await
            .unwrap();
    }
}

pub(crate) fn read_lines(path: &Path) -> Vec<String> {
    let mut text = String::new();
    MultiGzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_string(&mut text)
        .unwrap();
    text.lines().map(str::to_string).collect()
}

pub(crate) fn write_lines(path: &Path, lines: &[String]) {
    let mut gz = GzEncoder::new(
        std::fs::File::create(path).unwrap(),
        flate2::Compression::default(),
    );
    for l in lines {
        gz.write_all(l.as_bytes()).unwrap();
        gz.write_all(b"\n").unwrap();
    }
    gz.finish().unwrap();
}

fn archive_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

fn broken(check: AuditCheck) -> (u64, String) {
    match check {
        AuditCheck::Broken { seq, problem } => (seq, problem),
        other => panic!("expected a broken chain, got {other:?}"),
    }
}

/// The attacker, with the store closed: rewrites the stored audit record
/// `seq` in the store's files with `forge`; returns the record it held.
fn rewrite_audit_record(db: &Path, seq: u64, forge: impl FnOnce(String) -> String) -> String {
    let raw = crate::support::open_raw_sled(db);
    let audit = raw.open_tree("audit").unwrap();
    let key = seq.to_be_bytes();
    let held = audit.get(key).unwrap().expect("the record is in the store");
    let held = String::from_utf8(held.to_vec()).unwrap();
    audit.insert(key, forge(held.clone()).as_bytes()).unwrap();
    raw.flush().unwrap();
    held
}

#[tokio::test]
async fn archive_and_store_verify_end_to_end_and_tampering_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("db");
    let store = Store::open(&db, 16).unwrap();
    write_audit(&store, 35).await;
    let s = RetentionSettings {
        batch: 4,
        archive_chunk: 10,
        ..settings(tmp.path())
    };
    let pruned = store.prune(t0() + Duration::days(100), &s).await.unwrap();
    assert_eq!(pruned.audit, 34, "all but the store's last record");
    let files = archive_files(&s.archive_dir);
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 4, "{names:?}");
    assert_eq!(
        names[0],
        "audit-00000000000000000001-00000000000000000010.jsonl.gz"
    );
    assert_eq!(store.audit_base().unwrap().seq, 34);
    assert_eq!(store.audit(0).count(), 1);
    // Each archived line is the stored record byte for byte: it links to the next.
    let first = read_lines(&files[0]);
    assert_eq!(first.len(), 10);
    assert!(first[0].starts_with("{\"v\":\"1\""), "{}", first[0]);
    assert_eq!(store.verify_audit().unwrap(), AuditCheck::Intact { records: 35 });
    assert_eq!(
        store.verify_audit_with_archive(&s.archive_dir, None).unwrap(),
        AuditCheck::Intact { records: 35 }
    );
    let exported = store.audit_with_archive(Some(&s.archive_dir)).unwrap();
    assert_eq!(exported.len(), 35);
    assert_eq!(exported[11].detail, "record 12");
    // Nothing more to archive: a second pass changes nothing.
    assert_eq!(
        store.prune(t0() + Duration::days(100), &s).await.unwrap().audit,
        0
    );

    // A record altered inside an archive file.
    let original = read_lines(&files[1]);
    let mut altered = original.clone();
    altered[3] = altered[3].replace("record 14", "record 41");
    write_lines(&files[1], &altered);
    let (seq, problem) = broken(store.verify_audit_with_archive(&s.archive_dir, None).unwrap());
    assert_eq!(seq, 14, "{problem}");
    assert!(problem.contains(&names[1]), "{problem}");
    // Two records swapped.
    let mut swapped = original.clone();
    swapped.swap(4, 5);
    write_lines(&files[1], &swapped);
    let (seq, problem) = broken(store.verify_audit_with_archive(&s.archive_dir, None).unwrap());
    assert_eq!(seq, 16, "{problem}");
    assert!(
        problem.contains("sequence") && problem.contains(&names[1]),
        "{problem}"
    );
    // The file's last record cut off.
    write_lines(&files[1], &original[..9]);
    let err = store
        .verify_audit_with_archive(&s.archive_dir, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&names[1]) && err.contains("records 11 to 19"),
        "{err}"
    );
    // Not gzip any more.
    std::fs::write(&files[1], b"not gzip").unwrap();
    let err = store
        .verify_audit_with_archive(&s.archive_dir, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains(&names[1]) && err.contains("damaged"), "{err}");
    write_lines(&files[1], &original);
    assert_eq!(
        store.verify_audit_with_archive(&s.archive_dir, None).unwrap(),
        AuditCheck::Intact { records: 35 }
    );

    // A whole file missing, in the middle or at the start.
    for gone in [2, 0] {
        let saved = std::fs::read(&files[gone]).unwrap();
        std::fs::remove_file(&files[gone]).unwrap();
        let (seq, problem) = broken(store.verify_audit_with_archive(&s.archive_dir, None).unwrap());
        assert_eq!(seq, gone as u64 * 10 + 11, "{problem}");
        assert!(problem.contains("archive file is missing"), "{problem}");
        std::fs::write(&files[gone], saved).unwrap();
    }
    // The store's own record altered: named as the store's.
    drop(store);
    let held = rewrite_audit_record(&db, 35, |r| r.replace("record 35", "record 53"));
    let store = crate::support::reopen_store(&db);
    let (seq, problem) = broken(store.verify_audit_with_archive(&s.archive_dir, None).unwrap());
    assert_eq!(seq, 35, "{problem}");
    assert!(problem.contains("the store"), "{problem}");
    drop(store);
    rewrite_audit_record(&db, 35, |_| held);
    let store = crate::support::reopen_store(&db);
    assert_eq!(
        store.verify_audit_with_archive(&s.archive_dir, None).unwrap(),
        AuditCheck::Intact { records: 35 }
    );
    // A missing archive file stops the next pass rather than widening the gap.
    std::fs::remove_file(&files[3]).unwrap();
    write_audit(&store, 1).await;
    let err = store
        .prune(t0() + Duration::days(100), &s)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("archive files are missing"), "{err}");
}

#[tokio::test]
async fn a_crash_between_the_archive_write_and_the_removal_loses_and_duplicates_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("db");
    let key = "audit-key-0123456789abcdef-retention";
    let store = Store::open(&path, 16).unwrap();
    store.set_audit_key(Secret::new(key));
    store.seal_unkeyed_history(t0()).await.unwrap();
    write_audit(&store, 12 - store.audit_head().unwrap().seq).await;
    assert_eq!(store.audit_head().unwrap().seq, 12);
    let s = RetentionSettings {
        batch: 5,
        ..settings(tmp.path())
    };
    let now = t0() + Duration::days(60);
    let file = store.archive_then_stop(now, &s).unwrap().expect("a file");
    assert_eq!((file.first, file.last), (1, 11));
    // A temporary file of an interrupted later write, too.
    std::fs::write(s.archive_dir.join(".audit-x.jsonl.gz.tmp"), b"half").unwrap();
    drop(store);
    let store = Store::open(&path, 16).unwrap();
    store.set_audit_key(Secret::new(key));
    // Before the pass finishes the move: both copies agree, nothing counted twice.
    assert_eq!(
        store.verify_audit_with_archive(&s.archive_dir, None).unwrap(),
        AuditCheck::Intact { records: 12 }
    );
    assert_eq!(store.audit_with_archive(Some(&s.archive_dir)).unwrap().len(), 12);
    // The next pass finishes it.
    let pruned = store.prune(now, &s).await.unwrap();
    assert_eq!(pruned.audit, 11);
    assert_eq!(store.audit_base().unwrap().seq, 11);
    assert_eq!(store.audit(0).count(), 1);
    assert_eq!(
        archive_files(&s.archive_dir).len(),
        1,
        "the leftover is gone, no second file"
    );
    assert_eq!(
        store.verify_audit_with_archive(&s.archive_dir, None).unwrap(),
        AuditCheck::Intact { records: 12 }
    );
    assert_eq!(store.verify_audit().unwrap(), AuditCheck::Intact { records: 12 });
    let seqs: Vec<u64> = store
        .audit_with_archive(Some(&s.archive_dir))
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, (1..=12).collect::<Vec<_>>());
    // The chain goes on from the store.
    write_audit(&store, 1).await;
    assert_eq!(store.verify_audit().unwrap(), AuditCheck::Intact { records: 13 });

    // A store record that differs from its archived copy is never removed.
    let store2_dir = tempfile::tempdir().unwrap();
    let other_db = store2_dir.path().join("db");
    let other = Store::open(&other_db, 16).unwrap();
    write_audit(&other, 12).await;
    let s2 = settings(store2_dir.path());
    other.archive_then_stop(now, &s2).unwrap().expect("a file");
    drop(other);
    rewrite_audit_record(&other_db, 5, |r| r.replace("record 5", "record 6"));
    let other = crate::support::reopen_store(&other_db);
    let (seq, problem) = match other.verify_audit_with_archive(&s2.archive_dir, None) {
        Err(e) => (5, e.to_string()),
        Ok(check) => broken(check),
    };
    assert_eq!(seq, 5);
    assert!(problem.contains("differ"), "{problem}");
    let err = other.prune(now, &s2).await.unwrap_err().to_string();
    assert!(err.contains("not the record archived"), "{err}");
    assert_eq!(other.audit(0).count(), 12, "nothing removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jitbot_run_with_retain_prunes_and_exports_archive_and_store() {
    // History from March 2026 (the test bot's clock), months before today.
    let bot = TestBot::new();
    let id = TestBot::request_id(&bot.ok("alice", "request db-admins 1h old work").await);
    bot.ok("bob", &format!("approve {id}")).await;
    bot.advance(Duration::hours(2));
    bot.run_due().await;
    let store = bot.engine.store().clone();
    drain_outbox(&store, bot.engine.now());
    let records = store.audit_head().unwrap().seq;
    assert!(records >= 4, "{records}");
    let path = bot.path.clone();
    drop(store);
    drop(bot.engine);
    // A flush still finishing on the blocking pool holds the database briefly.
    let mut tries = 0;
    while let Err(StoreError::Locked { .. }) = Store::open(&path, 16).map(drop) {
        tries += 1;
        assert!(tries < 100, "the test bot's store stays locked");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let archive = path.parent().unwrap().join("audit-archive");
    let config = format!(
        r#"
[server]
listen = "{{listen}}"
admin_token = {{admin}}
shutdown_grace = "2s"

[store]
path = "{}"
cache_mb = 16
retain = "30d"

[directory]
kind = "memory"

[memory]
groups = {{ "cn=db-admins,ou=groups,dc=example,dc=org" = [] }}

[[group]]
name = "db-admins"
dn = "cn=db-admins,ou=groups,dc=example,dc=org"
requesters = {{ users = ["alice"] }}
approvers = {{ users = ["bob"] }}
default_duration = "1h"
max_duration = "4h"
"#,
        path.display()
    );
    let jitbot = Jitbot::start(&config, &[]).await;
    let http = reqwest::Client::new();
    let get = |what: String| {
        let http = http.clone();
        let url = format!("{}{what}", jitbot.admin_base);
        async move {
            http.get(url)
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await
                .expect("admin API")
                .text()
                .await
                .expect("body")
        }
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let metrics = get("/metrics".into()).await;
        if metrics.contains("jitbot_store_pruned_total{kind=\"lease\"} 1")
            && metrics.contains("jitbot_store_pruned_total{kind=\"request\"} 1")
            && !metrics.contains("jitbot_audit_archived_total 0")
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "jitbot did not prune; metrics:\n{metrics}\nlog:\n{}",
            jitbot.log_text()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(jitbot.admin("leases").await.is_empty());
    assert!(jitbot.admin("requests").await.is_empty());
    let first = eventually(std::time::Duration::from_secs(5), "the archive file", || {
        std::fs::read_dir(&archive).ok().and_then(|mut d| d.next())
    })
    .await
    .expect("archive directory entry");
    assert!(first.file_name().to_string_lossy().starts_with("audit-"));
    // `audit export` reads the archive and the store; `verify --archive` checks both.
    let export = get("/admin/audit?format=jsonl".into()).await;
    let seqs: Vec<u64> = export
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    let head = seqs.len() as u64;
    assert!(head >= records, "{export}");
    assert_eq!(seqs, (1..=head).collect::<Vec<_>>(), "{export}");
    let dir: String =
        url::form_urlencoded::byte_serialize(archive.display().to_string().as_bytes()).collect();
    let verified = get(format!("/admin/audit/verify?archive={dir}")).await;
    assert!(
        verified.contains(&format!("audit chain intact: {head} records")),
        "{verified}"
    );
    let alone = get("/admin/audit/verify".into()).await;
    assert!(alone.contains("earlier ones are archived"), "{alone}");
}

/// `n` more audit records, one commit each, a minute apart from a day after `t0`.
async fn write_more_audit(store: &Store, n: u64) {
    for i in 0..n {
        store
            .update(t0() + Duration::days(1) + Duration::minutes(i as i64), |tx| {
                tx.audit(AuditDraft {
                    actor: "alice".into(),
                    action: "request.opened".into(),
                    detail: format!("later record {}", i + 1),
                    ..AuditDraft::default()
                });
                Ok::<(), StoreError>(())
            })
            .await
            .unwrap();
    }
}

/// A store whose records 1..=19 are archived (files 1-10 and 11-19) and
/// 20..=35 are still in the store; the first archive file is replaced by a
/// FIFO, so a reader of the archive stops on it until the test feeds it.
/// Returns the store, the settings, the FIFO's path and the file's bytes.
async fn archive_with_a_slow_first_file(tmp: &Path) -> (Store, RetentionSettings, PathBuf, Vec<u8>) {
    let store = Store::open(&tmp.join("db"), 16).unwrap();
    write_audit(&store, 20).await;
    let s = RetentionSettings {
        batch: 4,
        archive_chunk: 10,
        ..settings(tmp)
    };
    let now = t0() + Duration::days(100);
    assert_eq!(store.prune(now, &s).await.unwrap().audit, 19);
    write_more_audit(&store, 15).await;
    assert_eq!(store.audit_head().unwrap().seq, 35);
    let files = archive_files(&s.archive_dir);
    assert_eq!(files.len(), 2, "{files:?}");
    let bytes = std::fs::read(&files[0]).unwrap();
    std::fs::remove_file(&files[0]).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(&files[0])
        .status()
        .expect("mkfifo (coreutils) runs");
    assert!(made.success());
    (store, s, files[0].clone(), bytes)
}

/// Feeds the FIFO the archive file's bytes (blocks until a reader opens it).
fn feed_fifo(fifo: &Path, bytes: &[u8]) {
    let mut w = std::fs::OpenOptions::new().write(true).open(fifo).unwrap();
    w.write_all(bytes).unwrap();
}

// Shows: `audit export` (`audit_with_archive`) racing a retention pass silently drops the
// records the pass moved from the store to a new archive file after export listed the files
// (21..34 are in neither part it reads). Fix: after reading the store, re-list the archive
// and read any file past the last one read (or read the store under a snapshot taken with
// the file list, e.g. hold off removals while an export/verify runs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_export_racing_a_retention_pass_loses_no_records() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, s, fifo, bytes) = archive_with_a_slow_first_file(tmp.path()).await;
    let exporter = {
        let store = store.clone();
        let dir = s.archive_dir.clone();
        std::thread::spawn(move || store.audit_with_archive(Some(&dir)))
    };
    // The export has listed the files and waits on the first one.
    std::thread::sleep(std::time::Duration::from_millis(300));
    // Meanwhile a pass archives 20..=34 (a file 20-29 and one 30-34).
    let pruned = store.prune(t0() + Duration::days(100), &s).await.unwrap();
    assert_eq!(pruned.audit, 15);
    feed_fifo(&fifo, &bytes);
    let exported = exporter.join().unwrap().unwrap();
    let seqs: Vec<u64> = exported.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=35).collect::<Vec<_>>(),
        "the export lost records a racing pass archived"
    );
}

// Shows: `audit verify --archive` racing a retention pass reports a broken chain ("sequence
// jumps ... an archive file is missing") on an intact archive + store: it lists the files
// before the pass writes a new one and reads the store after the pass removed its records.
// Fix: re-list the archive when the store's records start past the last file read (or take
// the file list and the store view as one moment, under the writer lock / a removal guard).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_racing_a_retention_pass_reads_the_files_that_appear() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, s, fifo, bytes) = archive_with_a_slow_first_file(tmp.path()).await;
    let verifier = {
        let store = store.clone();
        let dir = s.archive_dir.clone();
        std::thread::spawn(move || store.verify_audit_with_archive(&dir, None))
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    let pruned = store.prune(t0() + Duration::days(100), &s).await.unwrap();
    assert_eq!(pruned.audit, 15);
    feed_fifo(&fifo, &bytes);
    let checked = verifier.join().unwrap().unwrap();
    assert_eq!(
        checked,
        AuditCheck::Intact { records: 35 },
        "an intact archive + store reported broken while a pass ran"
    );
}

// Shows: restoring last night's backup (taken before a pass archived more than one file) next
// to the same archive makes `verify --archive` fail with a false "in the store and in the
// archive ... differ" (`overlap` reads only the last file), and the next pass's reconcile would
// remove only the last file's records, leaving 1..=10 below the new base. Fix: in `overlap` and
// `reconcile_archive`, take every file past the store's base (from `base.seq + 1`, checking
// bytes), not just the last one.
#[tokio::test]
async fn a_backup_from_before_archiving_several_files_restores_next_to_the_archive() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("db"), 16).unwrap();
    write_audit(&store, 35).await;
    let mut backup = Vec::new();
    store.backup(&mut backup).unwrap();
    let s = RetentionSettings {
        batch: 4,
        archive_chunk: 10,
        ..settings(tmp.path())
    };
    let now = t0() + Duration::days(100);
    assert_eq!(store.prune(now, &s).await.unwrap().audit, 34);
    assert_eq!(archive_files(&s.archive_dir).len(), 4);
    drop(store);
    // The disk is lost; the backup is restored into a new store, same archive_dir.
    let restored = Store::open(&tmp.path().join("db2"), 16).unwrap();
    restored.restore(backup.as_slice()).await.unwrap();
    assert_eq!(
        restored.verify_audit_with_archive(&s.archive_dir, None).unwrap(),
        AuditCheck::Intact { records: 35 },
        "right after the restore"
    );
    let pass = restored.prune(now, &s).await;
    assert!(pass.is_ok(), "the first pass after the restore: {pass:?}");
    assert!(restored.check_consistency().unwrap().is_empty());
    assert_eq!(
        restored.verify_audit().unwrap(),
        AuditCheck::Intact { records: 35 }
    );
    assert_eq!(
        restored.verify_audit_with_archive(&s.archive_dir, None).unwrap(),
        AuditCheck::Intact { records: 35 }
    );
    let seqs: Vec<u64> = restored
        .audit_with_archive(Some(&s.archive_dir))
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, (1..=35).collect::<Vec<_>>());
}

// Shows: with `retain` removed from the config (retention off, so no archive_dir is set),
// `audit export` silently starts at the store's base: the archived records vanish from the
// export with no word. Fix: when `audit_base` > 0 and no archive is given, refuse (or say
// "records 1..N are archived; pass --archive DIR") instead of exporting a silent suffix.
#[tokio::test]
async fn audit_export_without_an_archive_refuses_when_records_are_archived() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("db");
    let store = Store::open(&path, 16).unwrap();
    write_audit(&store, 12).await;
    let s = settings(tmp.path());
    assert_eq!(
        store.prune(t0() + Duration::days(100), &s).await.unwrap().audit,
        11
    );
    drop(store);
    // Restarted without `retain`: nothing calls set_archive_dir.
    let store = Store::open(&path, 16).unwrap();
    assert!(store.archive_dir().is_none());
    match store.audit_with_archive(store.archive_dir()) {
        Err(e) => assert!(e.to_string().contains("archive"), "{e}"),
        Ok(rows) => assert_eq!(
            rows.first().map(|e| e.seq),
            Some(1),
            "export silently began at record {:?} of 12",
            rows.first().map(|e| e.seq)
        ),
    }
}

// Shows: after `archive_dir` is changed (files left in the old place), `audit export` reads the
// new, empty directory and the store and returns records 12.. as if they were the whole
// trail, with no error — while the pass itself refuses ("archive files are missing").
// Fix: in `audit_with_archive`, check the archive ends at `audit_base` (as `reconcile_archive`
// does) and fail naming the gap.
#[tokio::test]
async fn audit_export_from_a_changed_archive_dir_names_the_missing_records() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("db"), 16).unwrap();
    write_audit(&store, 12).await;
    let s = settings(tmp.path());
    assert_eq!(
        store.prune(t0() + Duration::days(100), &s).await.unwrap().audit,
        11
    );
    let moved = tmp.path().join("new-archive");
    std::fs::create_dir_all(&moved).unwrap();
    let pass = store
        .prune(
            t0() + Duration::days(100),
            &RetentionSettings::new(s.retain, moved.clone()),
        )
        .await;
    assert!(pass.is_err(), "the pass notices the missing files");
    match store.audit_with_archive(Some(&moved)) {
        Err(e) => assert!(e.to_string().contains("missing"), "{e}"),
        Ok(rows) => assert_eq!(
            rows.first().map(|e| e.seq),
            Some(1),
            "export silently began at record {:?} of 12",
            rows.first().map(|e| e.seq)
        ),
    }
}

/// With a backlog of 60,000 undelivered notices (Slack down), a commit made
/// during a retention pass — a revocation's — waits for no outbox scan: the
/// pass reads the outbox once, on the blocking pool and outside the writer
/// lock, and under the lock only the entries added since. One runtime
/// thread, as a revocation's task shares a worker with the pass: a scan on
/// it stalls every commit for the whole scan (seconds in a debug build).
/// The bound is the worst commit of as long a stretch without a pass plus
/// half a scan of the backlog (at least 100 ms), so the disk's own sync
/// tail on a shared machine is not counted against the pass, while a
/// commit that waited for a scan is. (Review brk17.)
#[tokio::test(flavor = "current_thread")]
async fn a_commit_during_a_pass_waits_for_no_outbox_scan() {
    let bot = TestBot::new();
    let store = bot.engine.store().clone();
    // Old finished requests: the pass has something to remove, in a few batches.
    for i in 0..3 {
        let id = TestBot::request_id(&bot.ok("erin", &format!("request db-admins 1h old {i}")).await);
        bot.ok("bob", &format!("deny {id} no")).await;
    }
    bot.advance(Duration::days(400));
    let now = bot.engine.now();
    drain_outbox(&store, now);
    // A backlog of 60,000 card updates that could not be delivered.
    for chunk in 0..60 {
        store
            .update(now, |tx| {
                for i in 0..1000 {
                    tx.outbox(OutboxItem::UpdateApproval {
                        request: RequestId::new(format!("r-backlog-{chunk}-{i}")),
                    });
                }
                Ok::<(), StoreError>(())
            })
            .await
            .unwrap();
    }
    let commit = |store: Store| async move {
        let started = std::time::Instant::now();
        store
            .update(now, |tx| {
                tx.audit(AuditDraft {
                    actor: "jitbot".into(),
                    action: "lease.revoked".into(),
                    detail: "a revocation's commit".into(),
                    ..AuditDraft::default()
                });
                Ok::<(), StoreError>(())
            })
            .await
            .unwrap();
        started.elapsed()
    };
    // Commits alone, for about as long as a pass takes.
    let mut baseline = std::time::Duration::ZERO;
    let quiet = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while std::time::Instant::now() < quiet {
        baseline = baseline.max(commit(store.clone()).await);
    }
    let s = RetentionSettings {
        batch: 1,
        ..RetentionSettings::new(
            Span::parse_long("30d").unwrap(),
            bot.path.parent().unwrap().join("arch"),
        )
    };
    let pass = {
        let store = store.clone();
        tokio::spawn(async move { store.prune(now, &s).await })
    };
    let mut worst = std::time::Duration::ZERO;
    while !pass.is_finished() {
        worst = worst.max(commit(store.clone()).await);
    }
    let pruned = pass.await.unwrap().unwrap();
    assert!(pruned.requests >= 3, "{pruned:?}");
    // What a commit waits if a scan of the backlog is made under the
    // writer lock or on this thread (the defect): the scan itself, timed
    // now, on a machine as loaded as it was during the pass. Half of it,
    // and at least 100 ms, is the margin for the disk's own sync tail.
    let scan = {
        let started = std::time::Instant::now();
        assert!(store.outbox(usize::MAX).unwrap().len() >= 60_000);
        started.elapsed()
    };
    let margin = (scan / 2).max(std::time::Duration::from_millis(100));
    assert!(
        worst < baseline + margin,
        "a commit waited {worst:?} behind the pass (commits alone: {baseline:?}; a scan of the backlog takes {scan:?})"
    );
}

/// Review brk16d, finding 5: a replica's mirror that reloaded once keeps
/// its trees in generation 1 (`leases@1`, …). Retention found which tree
/// it prunes from the sled tree's name and knew only the plain names, so
/// every pass failed ("report this bug"), on every restart too, and the
/// store grew without bound. It now knows every generation's names.
#[tokio::test]
async fn retention_prunes_on_a_replica_whose_mirror_reloaded() {
    let bot = TestBot::builder().postgres().build();
    let store = bot.engine.store().clone();
    let id = TestBot::request_id(&bot.ok("alice", "request db-admins 1h old work").await);
    bot.ok("bob", &format!("approve {id}")).await;
    bot.run_due().await;
    bot.advance(Duration::hours(2));
    bot.run_due().await;
    assert_eq!(bot.lease().state, LeaseState::Ended);
    bot.advance(Duration::days(40));
    let now = bot.engine.now();
    store.outbox_fan_out(now, 100_000, |_| Vec::new()).unwrap();

    // The mirror reloads (as after a failover to a standby that lost its
    // last commit): the head's commit identity no longer matches.
    let db = bot.pg.clone().expect("a PostgreSQL bot");
    db.run("UPDATE jitbot_commits SET commit_id = 'lost' WHERE version = (SELECT version FROM jitbot_head)");
    assert!(
        store.refresh().expect("the reload"),
        "the refresh reloaded the mirror"
    );
    assert_eq!(bot.lease().state, LeaseState::Ended, "the reload kept the lease");

    let tmp = tempfile::tempdir().unwrap();
    let settings = RetentionSettings::new(Span::parse_long("30d").unwrap(), tmp.path().join("archive"));
    let pruned = store
        .prune(now, &settings)
        .await
        .unwrap_or_else(|e| panic!("retention on a replica whose mirror reloaded once failed: {e}"));
    assert_eq!(
        pruned.leases, 1,
        "the 40-day-old ended lease is pruned: {pruned:?}"
    );
}

/// A store of 35 audit records, 1..=34 archived in files of at most 10.
async fn archived_store(tmp: &Path) -> (Store, RetentionSettings) {
    let store = Store::open(&tmp.join("db"), 16).unwrap();
    write_audit(&store, 35).await;
    let s = RetentionSettings {
        batch: 4,
        archive_chunk: 10,
        ..RetentionSettings::new(Span::parse_long("30d").unwrap(), tmp.join("audit-archive"))
    };
    let pruned = store.prune(t0() + Duration::days(100), &s).await.unwrap();
    assert_eq!(pruned.audit, 34, "all but the store's last record");
    assert_eq!(
        store.verify_audit_with_archive(&s.archive_dir, None).unwrap(),
        AuditCheck::Intact { records: 35 }
    );
    (store, s)
}

/// An archive file holding, right after a record, a second, altered copy
/// of it (record 14 says "record 41" in its copy) is named by `audit verify
/// --archive`: jitbot writes each record once, in order, so a repeat is an
/// alteration (review brk17b finding 1: the reader skipped it unread and
/// the check said intact).
#[tokio::test]
async fn a_forged_second_copy_of_an_archived_record_is_named_by_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, s) = archived_store(tmp.path()).await;
    let files = archive_files(&s.archive_dir);
    let file = files[1].clone();
    let mut lines = read_lines(&file);
    assert!(lines[3].contains("\"record 14\""), "{}", lines[3]);
    let forged = lines[3].replace("record 14", "record 41");
    lines.insert(4, forged);
    write_lines(&file, &lines);
    let name = file.file_name().unwrap().to_string_lossy().into_owned();
    match store.verify_audit_with_archive(&s.archive_dir, None) {
        Err(e) => assert!(e.to_string().contains(&name), "{e}"),
        Ok(AuditCheck::Broken { problem, .. }) => assert!(problem.contains(&name), "{problem}"),
        Ok(check) => panic!(
            "{name} holds a second, altered copy of audit record 14 (\"record 41\"), and \
             `audit verify --archive` says {check:?}: a duplicated, altered archive record goes undetected"
        ),
    }
}

/// An extra archive file, `audit-12-19.jsonl.gz`, of altered copies of
/// records already archived, is named by `audit verify --archive`: files
/// whose ranges overlap hold a copy or a forgery (review brk17b finding 1).
#[tokio::test]
async fn a_forged_duplicate_archive_file_is_named_by_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, s) = archived_store(tmp.path()).await;
    let files = archive_files(&s.archive_dir);
    let genuine = read_lines(&files[1]);
    assert!(genuine.len() >= 4, "{genuine:?}");
    let seq = |l: &str| -> u64 {
        serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
            .as_u64()
            .unwrap_or_else(|| panic!("no seq in {l}"))
    };
    // All but the genuine file's first and last record, each altered.
    let forged: Vec<String> = genuine[1..genuine.len() - 1]
        .iter()
        .map(|l| l.replace("request.opened", "request.cancelled"))
        .collect();
    let name = format!(
        "audit-{}-{}.jsonl.gz",
        seq(&forged[0]),
        seq(&forged[forged.len() - 1])
    );
    write_lines(&s.archive_dir.join(&name), &forged);
    match store.verify_audit_with_archive(&s.archive_dir, None) {
        Err(e) => assert!(e.to_string().contains(&name), "{e}"),
        Ok(AuditCheck::Broken { problem, .. }) => assert!(problem.contains(&name), "{problem}"),
        Ok(check) => panic!(
            "the archive holds a second file, {name}, with altered copies of records already archived, \
             and `audit verify --archive` says {check:?}: a duplicated, altered archive file goes undetected"
        ),
    }
}

/// With `kind = "postgres"` and `retain`, `archive_dir` must be set: the
/// default, beside `store.path`, is one replica's own mirror directory,
/// where archived records would leave the database for one pod's disk and
/// every other replica's export and verify could not read them (review
/// brk17b finding 2: the config was accepted without a word).
#[test]
fn postgres_retain_needs_an_archive_dir_the_replicas_share() {
    let config = r#"
[store]
kind = "postgres"
url = "postgres://jitbot@db:5432/jitbot"
password = { env = "PGPW" }
path = "/var/lib/jitbot/mirror"
retain = "400d"

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
"#;
    match jitbot::config::Config::parse(config, "jitbot.toml") {
        Err(e) => {
            let text = e.to_string();
            assert!(text.contains("store.archive_dir"), "{text}");
        }
        Ok(c) => panic!(
            "kind = \"postgres\" with retain and no archive_dir is accepted: the archive goes to {} \
             beside this replica's mirror, on its own disk, not a directory the replicas share; \
             archived audit records leave PostgreSQL for one replica's local disk",
            c.store.archive_dir().display()
        ),
    }
}

/// The sequence numbers `audit export` (`Store::audit_with_archive`, behind
/// `GET /admin/audit` and `jitbot audit export`) returns, or its error.
fn exported(store: &Store, dir: &Path) -> Result<Vec<u64>, String> {
    store
        .audit_with_archive(Some(dir))
        .map(|all| all.iter().map(|e| e.seq).collect())
        .map_err(|e| e.to_string())
}

/// `audit export` refuses, naming the missing records, when an archive
/// file is missing from the middle of the archive, rather than export the
/// rest as if it were the whole trail (review brk17b finding 4).
#[tokio::test]
async fn audit_export_refuses_when_an_archive_file_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, s) = archived_store(tmp.path()).await;
    let files = archive_files(&s.archive_dir);
    assert!(files.len() >= 3, "{files:?}");
    let gone = files[1].file_name().unwrap().to_string_lossy().into_owned();
    std::fs::remove_file(&files[1]).unwrap();
    match exported(&store, &s.archive_dir) {
        Err(e) => assert!(e.contains("missing"), "{e}"),
        Ok(seqs) => assert_eq!(
            seqs,
            (1..=35).collect::<Vec<_>>(),
            "with {gone} missing from the archive, `audit export` returned {} of 35 records without a word",
            seqs.len()
        ),
    }
}

/// The same when the archive's first file is missing: the export does not
/// silently start at the second file's first record (review brk17b
/// finding 4).
#[tokio::test]
async fn audit_export_refuses_when_the_first_archive_file_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, s) = archived_store(tmp.path()).await;
    let files = archive_files(&s.archive_dir);
    let gone = files[0].file_name().unwrap().to_string_lossy().into_owned();
    std::fs::remove_file(&files[0]).unwrap();
    match exported(&store, &s.archive_dir) {
        Err(e) => assert!(e.contains("missing"), "{e}"),
        Ok(seqs) => assert_eq!(
            seqs.first(),
            Some(&1),
            "with {gone} missing from the archive, `audit export` began at record {:?} without a word",
            seqs.first()
        ),
    }
}

/// A record deleted from the middle of an archive file (which keeps its
/// first and last record, so its name still matches) makes `audit export`
/// refuse, naming the record: someone who can write the archive cannot
/// hide a record from an export (review brk17b finding 4).
#[tokio::test]
async fn audit_export_refuses_when_a_record_was_deleted_inside_an_archive_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, s) = archived_store(tmp.path()).await;
    let files = archive_files(&s.archive_dir);
    let mut lines = read_lines(&files[1]);
    assert!(lines[3].contains("\"record 14\""), "{}", lines[3]);
    lines.remove(3);
    write_lines(&files[1], &lines);
    assert!(
        matches!(
            store.verify_audit_with_archive(&s.archive_dir, None),
            Ok(AuditCheck::Broken { seq: 15, .. })
        ),
        "verify sees the jump from 13 to 15"
    );
    match exported(&store, &s.archive_dir) {
        Err(e) => assert!(e.contains("14"), "{e}"),
        Ok(seqs) => assert!(
            seqs.contains(&14),
            "record 14 was deleted from {} and `audit export` returned the other {} records without a word",
            files[1].display(),
            seqs.len()
        ),
    }
}

/// `jitbot check-config` refuses an `archive_dir` jitbot cannot create or
/// write (here a path under a regular file; in production the shipped
/// systemd unit's `ProtectSystem=strict` with the archive outside the state
/// directory, or a share that is not mounted), naming `store.archive_dir`
/// (review brk17b finding 6: it said OK, and every pass then failed).
#[test]
fn check_config_refuses_an_archive_dir_that_cannot_be_written() {
    let tmp = tempfile::tempdir().unwrap();
    let blocker = tmp.path().join("not-a-directory");
    std::fs::write(&blocker, b"a file where the archive directory's parent should be").unwrap();
    let archive = blocker.join("audit-archive");
    let config = format!(
        r#"
[store]
path = "{store}"
retain = "400d"
archive_dir = "{archive}"

[directory]
kind = "memory"

[memory]
groups = {{ "cn=db-admins,ou=groups,dc=example,dc=org" = [] }}

[[group]]
name = "db-admins"
dn = "cn=db-admins,ou=groups,dc=example,dc=org"
requesters = {{ users = ["alice"] }}
approvers = {{ users = ["bob"] }}
default_duration = "1h"
max_duration = "4h"
"#,
        store = tmp.path().join("db").display(),
        archive = archive.display(),
    );
    let path = tmp.path().join("jitbot.toml");
    std::fs::write(&path, config).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_jitbot"))
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .expect("run jitbot check-config");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::fs::create_dir_all(&archive).is_err(),
        "the archive directory cannot be made"
    );
    assert!(
        !out.status.success() && text.contains("archive_dir"),
        "`jitbot check-config` accepts store.archive_dir = {}, which cannot be created or written \
         (exit {:?}):\n{text}",
        archive.display(),
        out.status.code()
    );
}
