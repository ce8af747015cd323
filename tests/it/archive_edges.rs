//! Edges of the archive and of start-up, from review brk17d (issue 17's
//! third review of retention): nothing outside the store (an anchor file
//! or an archive file that is a FIFO) holds up `jitbot run`; a deposed
//! leader's late copy reaching past later files still verifies; the
//! PostgreSQL archive rule refuses the mirror's own places and nothing
//! else. Each test failed on 8d5bb98.

use chrono::Duration;
use jitbot::store::retention::RetentionSettings;
use jitbot::store::{AuditCheck, Store, StoreError};
use jitbot_core::Span;
use std::path::Path;

use crate::archive_copies::{audit_at, t0};

/// A store of 40 records, 1..=39 a minute apart from `t0` and record 40 a
/// month later, with records 1..=39 archived into `tmp/audit-archive` and
/// removed from the store. The store is dropped (its lock released).
async fn archived_store(tmp: &Path) -> RetentionSettings {
    let store = Store::open(&tmp.join("db"), 16).unwrap();
    for i in 0..39 {
        audit_at(&store, t0() + Duration::minutes(i), format!("record {}", i + 1)).await;
    }
    audit_at(&store, t0() + Duration::days(31), "record 40".into()).await;
    let s = RetentionSettings {
        batch: 7,
        ..RetentionSettings::new(Span::parse_long("30d").unwrap(), tmp.join("audit-archive"))
    };
    let pruned = store
        .prune(t0() + Duration::days(31) + Duration::hours(2), &s)
        .await
        .unwrap();
    assert_eq!(pruned.audit, 39, "the pass archives all but the last record");
    assert_eq!(
        store.verify_audit_with_archive(&s.archive_dir, None).unwrap(),
        AuditCheck::Intact { records: 40 },
        "the trail is intact before the attack"
    );
    s
}

fn mkfifo(path: &Path) {
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("run mkfifo (coreutils)");
    assert!(status.success(), "mkfifo {} failed", path.display());
}

/// Runs `jitbot run` on the store in `tmp/db` (memory directory) with
/// `extra` appended to `[store]` and an `[audit]` section naming `anchors`,
/// until `/healthz` answers, it exits, or 60 s pass. Returns the outcome
/// and its log.
pub(crate) async fn run_until_healthy(
    tmp: &Path,
    store_extra: &str,
    anchors: &Path,
) -> (Result<(), String>, String) {
    let db = tmp.join("db");
    let mut tries = 0;
    while let Err(StoreError::Locked { .. }) = Store::open(&db, 16).map(drop) {
        tries += 1;
        assert!(tries < 100, "the store stays locked");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (port, admin_port) = (free(), free());
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin_port}"
admin_token = {{ env = "JITBOT_TEST_ADMIN_TOKEN" }}
shutdown_grace = "2s"

[store]
path = "{}"
cache_mb = 16
{store_extra}

[audit]
anchor_file = "{}"

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
        db.display(),
        anchors.display()
    );
    let path = tmp.join("jitbot.toml");
    std::fs::write(&path, config).unwrap();
    let log = tmp.join("jitbot.log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_jitbot"))
        .args(["run", "--config"])
        .arg(&path)
        .env("JITBOT_LOG", "info")
        .env("JITBOT_TEST_ADMIN_TOKEN", "archive-edges-admin-token")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn jitbot");
    let http = reqwest::Client::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let outcome = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Err(format!("jitbot run exited ({status})"));
        }
        if let Ok(r) = http.get(format!("http://127.0.0.1:{port}/healthz")).send().await {
            if r.status().is_success() {
                break Ok(());
            }
        }
        if std::time::Instant::now() > deadline {
            break Err("jitbot run did not come up in 60 s".into());
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let _ = child.kill();
    let _ = child.wait();
    (outcome, std::fs::read_to_string(&log).unwrap_or_default())
}

/// `[audit] anchor_file` names a FIFO (anyone who can write its directory
/// can put one there, or a mistaken config names one): `jitbot run` starts
/// and serves; the anchor check runs in the background and refuses the
/// special file. (Review brk17d finding 1: start-up read it and waited for
/// a writer that never came, so jitbot never served and never revoked.)
#[tokio::test]
async fn an_anchor_file_that_is_a_fifo_does_not_keep_jitbot_run_from_starting() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("db"), 16).unwrap();
    audit_at(&store, t0(), "record 1".into()).await;
    drop(store);
    let anchors = tmp.path().join("anchors");
    // Control: without the FIFO the same store and config come up.
    let (control, log) = run_until_healthy(tmp.path(), "", &anchors).await;
    assert!(control.is_ok(), "control: {control:?}; log:\n{log}");
    std::fs::remove_file(&anchors).ok();
    mkfifo(&anchors);
    let (outcome, log) = run_until_healthy(tmp.path(), "", &anchors).await;
    if let Err(what) = outcome {
        panic!(
            "{what}: audit.anchor_file {} is a FIFO, and start-up waits forever reading it. Whatever is \
             in the anchor file, jitbot must start (report it as tampering, as for an unreadable file). \
             Its log:\n{log}",
            anchors.display()
        );
    }
}

/// A FIFO in the archive directory under an archive file's name (the
/// archive share is often writable by more people than the store), with an
/// anchor file and retention on: `jitbot run` starts and serves. (Review
/// brk17d finding 2: start-up's archive check opened it and waited
/// forever.) The FIFO still stalls the background check and retention
/// passes, not start-up or revocations.
#[tokio::test]
async fn a_fifo_named_as_an_archive_file_does_not_keep_jitbot_run_from_starting() {
    let tmp = tempfile::tempdir().unwrap();
    let s = archived_store(tmp.path()).await;
    let anchors = tmp.path().join("anchors");
    {
        let store = crate::support::reopen_store(tmp.path().join("db"));
        store.set_anchor_file(anchors.clone());
        store
            .record_published_anchor(&store.audit_head().unwrap())
            .unwrap();
    }
    let extra = format!("retain = \"30d\"\narchive_dir = \"{}\"", s.archive_dir.display());
    // Control: without the FIFO the same store, archive and config come up.
    let (control, log) = run_until_healthy(tmp.path(), &extra, &anchors).await;
    assert!(control.is_ok(), "control: {control:?}; log:\n{log}");
    let fifo = s.archive_dir.join("audit-40-41.jsonl.gz");
    mkfifo(&fifo);
    let (outcome, log) = run_until_healthy(tmp.path(), &extra, &anchors).await;
    if let Err(what) = outcome {
        panic!(
            "{what}: {} is a FIFO named as an archive file, and start-up's archive check waits forever \
             opening it. Whatever is in the archive, jitbot must start (report it as tampering). Its \
             log:\n{log}",
            fifo.display()
        );
    }
}

/// A deposed leader's late file that reaches past a later file's range.
///
/// - 40 records, 1..=39 a minute apart from `t0`, record 40 a month later.
/// - Leader A (its clock ahead of B's, or its cutoff otherwise later)
///   reads records 1..=39 for a pass and stalls in `write_file` (the
///   archive is a network share, A's host is partitioned and loses its
///   term). Here: `archive_then_stop` into a staging directory.
/// - Leader B runs two passes meanwhile: `audit-1-4`, then `audit-5-10`,
///   each removed from the store. The trail is intact (checked).
/// - A's write finishes: `audit-1-39` is renamed into the archive.
///
/// The archive lists as (1,4), (1,39), (5,10): the file sorted last is not
/// the one reaching furthest. Every shared record is a byte-identical copy
/// and the trail is whole, so verify must say intact — the case the newest
/// fix ("overlapping files are read as exact copies") is for. But
/// `verify_audit_with_archive` takes `files.last().last` (10) as where the
/// archive ends, so the store's records 11..=39, which the archive also
/// holds, are fed to the chain a second time after record 39 (and
/// `overlap`'s `partition_point` assumes the files' last records ascend).
#[tokio::test]
async fn a_late_copy_reaching_past_a_later_file_still_verifies_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("db"), 16).unwrap();
    for i in 0..39 {
        audit_at(&store, t0() + Duration::minutes(i), format!("record {}", i + 1)).await;
    }
    audit_at(&store, t0() + Duration::days(31), "record 40".into()).await;
    let settings = |dir: std::path::PathBuf| RetentionSettings {
        batch: 7,
        ..RetentionSettings::new(Span::parse_long("30d").unwrap(), dir)
    };
    let s = settings(tmp.path().join("audit-archive"));
    let staging = settings(tmp.path().join("leader-a-staging"));
    let month = Duration::days(30);
    let a_file = store
        .archive_then_stop(
            t0() + month + Duration::minutes(38) + Duration::seconds(30),
            &staging,
        )
        .unwrap()
        .expect("leader A's file");
    assert_eq!((a_file.first, a_file.last), (1, 39), "leader A's range");
    // B's passes, each a file written and its records removed (the two
    // steps of `archive_audit`; a whole pass would wait for a full chunk).
    for (cut, range) in [(3, (1, 4)), (9, (5, 10))] {
        let file = store
            .archive_then_stop(t0() + month + Duration::minutes(cut) + Duration::seconds(30), &s)
            .unwrap()
            .expect("leader B's file");
        assert_eq!(
            (file.first, file.last),
            range,
            "leader B's pass up to minute {cut}"
        );
        let removed = store.reconcile_archive(&s).await.unwrap();
        assert_eq!(
            removed,
            range.1 - range.0 + 1,
            "leader B removes what it archived"
        );
    }
    assert_eq!(
        store.verify_audit_with_archive(&s.archive_dir, None).unwrap(),
        AuditCheck::Intact { records: 40 },
        "the trail is intact before A's late rename"
    );
    let late = s.archive_dir.join(a_file.path.file_name().unwrap());
    std::fs::rename(&a_file.path, &late).unwrap();
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
        "{} (byte-identical copies of records 1..=39, renamed in late beside audit-1-4 and audit-5-10, \
         the store still holding 11..=40) must not make the intact trail fail:\n  verify --archive: \
         {verified:?}\n  export: {:?}",
        late.display(),
        exported.map(|seqs| seqs.len())
    );
}

/// A PostgreSQL config with retention: `store.path` and `archive_dir` as
/// given.
pub(crate) fn postgres_config(path: &str, archive_dir: &str) -> String {
    format!(
        r#"
[store]
kind = "postgres"
url = "postgres://jitbot@db:5432/jitbot"
password = {{ env = "PGPW" }}
path = "{path}"
retain = "400d"
archive_dir = "{archive_dir}"

[directory]
kind = "memory"

[memory]

[[group]]
name = "db-admins"
dn = "cn=db-admins,ou=groups,dc=example,dc=org"
requesters = {{ users = ["alice"] }}
approvers = {{ users = ["bob"] }}
default_duration = "1h"
max_duration = "4h"
"#
    )
}

/// The rule "on PostgreSQL the archive may not sit in the directory
/// holding the mirror" takes the mirror's *parent* as the replica's own
/// state, whatever it is. A mirror one level under a mount root —
/// `/mnt/jitbot-mirror`, `/srv/jitbot-mirror` — makes every sibling mount
/// refused, the error's own suggestion (`/mnt/jitbot-audit`) included,
/// though each is a separate (shared) volume and nothing there is the
/// mirror's directory.
#[test]
fn postgres_accepts_a_shared_archive_mount_beside_a_mirror_under_mnt() {
    for (mirror, shared) in [
        ("/mnt/jitbot-mirror", "/mnt/jitbot-audit"),
        ("/srv/jitbot-mirror", "/srv/jitbot-audit"),
    ] {
        if let Err(e) = jitbot::config::Config::parse(&postgres_config(mirror, shared), "jitbot.toml") {
            panic!(
                "kind = \"postgres\", store.path = {mirror:?}, archive_dir = {shared:?} (a shared volume of \
                 its own, outside the mirror's directory) is refused: {e:#}. Only the mirror's own directory \
                 (and a parent that is a state directory, not /mnt or /srv) is the replica's"
            );
        }
    }
}

/// Relative paths: `store.path = "mirror"` and `archive_dir =
/// "audit-archive"` sit side by side in the same working directory (the
/// pod's or the unit's own), which is exactly the layout the rule is for.
/// `Path::parent` of a one-part relative path is empty, so the rule
/// compares with "mirror" alone and accepts it.
#[test]
fn postgres_refuses_a_relative_archive_dir_beside_the_mirror() {
    let config = postgres_config("mirror", "audit-archive");
    if let Ok(c) = jitbot::config::Config::parse(&config, "jitbot.toml") {
        panic!(
            "kind = \"postgres\", store.path = \"mirror\", archive_dir = \"audit-archive\" is accepted \
             (as {} beside {}): both are in the same working directory, one replica's own, so archived \
             records would leave PostgreSQL for one replica's disk",
            c.store.archive_dir().display(),
            c.store.path.display()
        );
    }
}
