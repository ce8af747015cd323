//! Review brk17b (issue 17): failing tests for breaks found in retention,
//! the audit archive and the operator assets (Prometheus alerts, Grafana
//! dashboard). Each test names the guarantee it breaks; the findings and
//! suggested fixes are in the review notes (brk17b-findings.md). Every test
//! here fails on main `e98f5dc`, by design, until its finding is fixed.

use chrono::{Duration, TimeZone, Utc};
use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use jitbot::config::Config;
use jitbot::store::retention::RetentionSettings;
use jitbot::store::{AuditCheck, AuditDraft, Store, StoreError};
use jitbot_core::{Instant, Span};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

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

fn read_lines(path: &Path) -> Vec<String> {
    let mut text = String::new();
    MultiGzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_string(&mut text)
        .unwrap();
    text.lines().map(str::to_string).collect()
}

fn write_lines(path: &Path, lines: &[String]) {
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

/// Finding 1. "`jitbot audit verify --archive DIR` ... detects a missing,
/// altered, reordered or duplicated archive file/record." An archive file
/// holding, right after a record, a second, altered copy of it (record 14
/// says "record 41" in its copy) verifies intact: the reader skips any
/// record whose sequence number was already read without comparing it.
/// `audit export` skips it as silently; whichever copy comes first wins.
#[tokio::test]
async fn brk17b_a_forged_second_copy_of_an_archived_record_verifies_intact() {
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

/// Finding 1, the same with a whole extra file: `audit-12-19.jsonl.gz`, a
/// forged copy of records 12..=19 (each altered), beside the genuine files.
/// The reader reads it after the genuine file holding 11..=20 and skips
/// every record in it: verify says intact.
#[tokio::test]
async fn brk17b_a_forged_duplicate_archive_file_verifies_intact() {
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

/// Finding 2. "Hostile or broken config (... missing archive dir) gets a
/// clear error at config check, not silent data loss"; "on PostgreSQL
/// replicas ... the archive directory is shared". With `kind =
/// "postgres"`, `retain` set and no `archive_dir`, the archive defaults to
/// `audit-archive` beside `store.path` — the replica's own mirror
/// directory, local to each replica (an `emptyDir` in
/// deploy/kubernetes/jitbot-postgres.yaml). Archived records leave
/// PostgreSQL for one pod's scratch disk: lost when the pod goes, and after
/// a failover the new leader's archive is empty, so its passes fail
/// ("archive files are missing") and `audit export` there cannot read the
/// trail. The config is accepted without a word.
#[test]
fn brk17b_postgres_retain_without_a_shared_archive_dir_is_accepted() {
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
    match Config::parse(config, "jitbot.toml") {
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

/// Finding 4. "`audit export` reads both with nothing lost." An archive
/// file missing from the middle of the archive (lost in a copy, deleted
/// by a cleanup job, not yet restored from tape) makes `audit export`
/// leave its records out and export the rest as if it were the whole
/// trail: the archive part is read with no check that each record follows
/// the one before (the store part has that check, and fails, naming the
/// missing records). `verify --archive` does see the gap; an export does
/// not run it.
#[tokio::test]
async fn brk17b_audit_export_silently_skips_a_missing_archive_file() {
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

/// Finding 4, at the start: the archive's first file missing, `audit
/// export` starts at its second file's first record and says nothing.
#[tokio::test]
async fn brk17b_audit_export_silently_starts_after_a_missing_first_archive_file() {
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

/// Finding 4, inside a file: a record deleted from the middle of an
/// archive file (the file keeps its first and last record, so its name
/// still matches) is left out of `audit export` without a word. Someone
/// who can write the archive hides a record from every export; only
/// `verify --archive`, run on its own, sees the jump.
#[tokio::test]
async fn brk17b_audit_export_silently_drops_a_record_deleted_inside_an_archive_file() {
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

/// Finding 6. "Hostile or broken config (... missing archive dir) gets a
/// clear error at config check." `jitbot check-config` (directory checks
/// and all) says OK for an `archive_dir` jitbot can never create or write
/// — here a path under a regular file; in production the usual case is
/// the shipped systemd unit (`ProtectSystem=strict`, only the state
/// directory writable) with `archive_dir` on another path, or a share that
/// is not mounted. `jitbot run` then starts and serves; every retention
/// pass fails with a warning in the log and nothing else (no metric, no
/// alert), so old audit records are never archived and the store grows.
#[test]
fn brk17b_check_config_passes_an_archive_dir_that_cannot_be_written() {
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
