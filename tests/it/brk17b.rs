//! Review brk17b (issue 17): failing tests for breaks found in retention,
//! the audit archive and the operator assets (Prometheus alerts, Grafana
//! dashboard). Each test names the guarantee it breaks; the findings and
//! suggested fixes are in the review notes (brk17b-findings.md). Every test
//! here fails on main `e98f5dc`, by design, until its finding is fixed.

use crate::support::bot::TestBot;
use chrono::{Duration, TimeZone, Utc};
use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use jitbot::config::Config;
use jitbot::store::retention::RetentionSettings;
use jitbot::store::{AuditCheck, AuditDraft, Store, StoreError};
use jitbot_core::{Instant, LeaseState, Span};
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

/// Finding 3. The alert `JitbotRevocationOverdue` ("A membership outlived
/// its lease by …"; "A lease ended more than 2 minutes ago and its
/// membership is not gone yet") reads `jitbot_revocation_overdue_seconds`,
/// which `Engine::scrape_counts` measures from a revoking lease's
/// `expires_at`. A lease released (or revoked by an admin, or by `/jit
/// revoke` when someone leaves) keeps its planned `expires_at`; it ended at
/// `ended_at`. Its removal failing for 30 minutes shows as 0 overdue, so
/// the alert never fires until the planned end — here an hour later, and up
/// to the group's maximum duration.
#[tokio::test]
async fn brk17b_a_released_lease_whose_removal_keeps_failing_is_never_overdue() {
    let bot = TestBot::new();
    let id = TestBot::request_id(&bot.ok("alice", "request db-admins 4h incident").await);
    bot.ok("bob", &format!("approve {id}")).await;
    bot.run_due().await;
    assert_eq!(bot.lease().state, LeaseState::Active);
    bot.advance(Duration::minutes(5));
    // The directory refuses every change from now on.
    bot.dir.fail_next(1_000_000);
    let reply = bot.say("alice", "release db-admins").await;
    assert_eq!(
        bot.lease().state,
        LeaseState::Revoking,
        "the release started the revocation: {}",
        reply.text
    );
    let ended = bot.lease().ended_at.expect("ended_at set by the release");
    for _ in 0..30 {
        bot.advance(Duration::minutes(1));
        bot.run_due().await;
    }
    assert_eq!(
        bot.lease().state,
        LeaseState::Revoking,
        "the removal keeps failing"
    );
    assert!(
        bot.is_member(crate::support::bot::DB, "alice"),
        "the membership is still there"
    );
    let behind = (bot.engine.now() - ended).to_std().unwrap();
    let (_, _, overdue) = bot.engine.scrape_counts().unwrap();
    assert!(
        overdue >= behind - std::time::Duration::from_secs(1),
        "the lease ended {behind:?} ago (released) and its membership is still there, but \
         jitbot_revocation_overdue_seconds says {overdue:?}: JitbotRevocationOverdue (> 120 s) \
         never fires for a released or revoked lease until its planned expiry"
    );
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

/// Runs promtool; a machine without it fails here, loudly.
fn promtool(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("promtool")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run promtool ({e}): install Debian's `prometheus` package \
                 (scripts/test installs it when missing)"
            )
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn alerts_yml() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/alerts.yml")
}

/// The value of the unlabelled series `name` in a Prometheus exposition.
fn gauge(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{exposition}"))
}

/// Finding 5. `JitbotOutboxBacklogGrowing` ("Chat notices pile up ... the
/// number keeps growing") fires on `jitbot_outbox_backlog` rising, and
/// `jitbot_outbox_backlog` ("Notices waiting in the outbox") is the length
/// of `Store::outbox(OUTBOX_GAUGE_CAP)`: at most 10,000. A chat platform
/// down for long enough that more than 10,000 notices wait makes the gauge
/// flat at 10,000 while the backlog keeps growing, so the alert resolves
/// exactly when things get worse, and the dashboard's backlog stat and
/// graph stop at 10,000. Here jitbot's own `/metrics` is scraped (in
/// process) at six points 5 minutes apart while the backlog grows from
/// 10,500 to 13,000, and the scraped values go through promtool against
/// deploy/prometheus/alerts.yml.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brk17b_the_outbox_backlog_alert_resolves_while_the_backlog_grows_past_10000() {
    use jitbot::http::{self, HttpState, Limits};
    use jitbot::store::OutboxItem;
    use jitbot_core::RequestId;
    let bot = TestBot::new();
    let store = bot.engine.store().clone();
    let now = bot.engine.now();
    store.outbox_fan_out(now, 100_000, |_| Vec::new()).unwrap();
    assert!(store.outbox(10).unwrap().is_empty());
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
    let mut queued = 0u64;
    let mut scraped = Vec::new();
    for step in 0..6u64 {
        // Slack is down: card updates pile up, 10,500 first, then 500 more
        // every 5 minutes.
        let add = if step == 0 { 10_500 } else { 500 };
        for chunk in 0..add / 500 {
            store
                .update(now, |tx| {
                    for i in 0..500 {
                        tx.outbox(OutboxItem::UpdateApproval {
                            request: RequestId::new(format!("r-backlog-{step}-{chunk}-{i}")),
                        });
                    }
                    Ok::<(), StoreError>(())
                })
                .await
                .unwrap();
        }
        queued += add;
        let text = reqwest::get(format!("{base}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        scraped.push((queued, gauge(&text, "jitbot_outbox_backlog")));
    }
    let values: Vec<String> = scraped.iter().map(|(_, v)| format!("{v}")).collect();
    let last = scraped.last().unwrap().1;
    let tmp = tempfile::tempdir().unwrap();
    let test = tmp.path().join("backlog.test.yml");
    std::fs::write(
        &test,
        format!(
            r#"rule_files:
  - {rules}
evaluation_interval: 1m
tests:
  - interval: 5m
    input_series:
      - series: 'jitbot_outbox_backlog{{instance="bot:8080"}}'
        values: '{values}'
    alert_rule_test:
      - eval_time: 25m
        alertname: JitbotOutboxBacklogGrowing
        exp_alerts:
          - exp_labels:
              severity: warning
              instance: bot:8080
            exp_annotations:
              summary: "Chat notices pile up on bot:8080"
              description: "{last} notices wait in the outbox and the number keeps growing: the chat platform refuses or throttles jitbot. Check jitbot_chat_api_errors_total and the bot token."
"#,
            rules = alerts_yml().display(),
            values = values.join(" "),
        ),
    )
    .unwrap();
    let (fired, out) = promtool(&["test", "rules", test.to_str().unwrap()]);
    assert!(
        fired,
        "the outbox backlog grew from 10,500 to 13,000 over 25 minutes (queued, scraped: {scraped:?}) \
         and JitbotOutboxBacklogGrowing does not fire on what jitbot exports:\n{out}"
    );
    for (queued, gauge) in scraped {
        assert_eq!(
            gauge, queued as f64,
            "jitbot_outbox_backlog says {gauge} while {queued} notices wait"
        );
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

/// Finding 7. deploy/kubernetes/jitbot-postgres.yaml runs two replicas,
/// and every replica's `/metrics` reports the store-wide gauges
/// (`jitbot_active_leases`, `jitbot_pending_requests`,
/// `jitbot_outbox_backlog`) read from its own mirror of the one database.
/// The dashboard adds them up over instances (`sum(jitbot_active_leases{…})`),
/// so with two replicas its "Active leases" and "Pending requests" panels
/// show twice the real number. Two real `jitbot run` replicas on one
/// database holding one active lease and one pending request are scraped,
/// and each such dashboard query is evaluated by promtool on what they
/// export.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brk17b_the_dashboard_counts_each_lease_once_per_replica() {
    use crate::support::postgres::{cluster, replica_sections, PASSWORD};
    use crate::support::process::Jitbot;
    let bot = TestBot::builder().postgres().build();
    // The replicas run on the wall clock: the history is made at today's date.
    bot.advance(Utc::now() - bot.engine.now());
    let id = TestBot::request_id(&bot.ok("alice", "request db-admins 4h on call").await);
    bot.ok("bob", &format!("approve {id}")).await;
    bot.run_due().await;
    assert_eq!(bot.lease().state, LeaseState::Active);
    bot.ok("erin", "request db-admins 1h later").await;
    let (active, pending, _) = bot.engine.scrape_counts().unwrap();
    assert_eq!((active, pending), (1, 1), "one active lease, one pending request");

    let db = bot.pg.clone().expect("a PostgreSQL bot");
    let url = cluster().url(&db.name);
    let head = replica_sections(&url);
    let config = format!(
        r#"{head}
[directory]
kind = "memory"

[memory]
groups = {{ "{dn}" = ["alice"] }}

[[group]]
name = "db-admins"
dn = "{dn}"
requesters = {{ users = ["alice", "erin"] }}
approvers = {{ users = ["bob"] }}
default_duration = "1h"
max_duration = "4h"
"#,
        dn = crate::support::bot::DB
    );
    let env = [("JITBOT_TEST_PGPW", PASSWORD)];
    let a = Jitbot::start(&config, &env).await;
    let b = Jitbot::start(&config, &env).await;
    let scrape = |bot: &Jitbot| {
        let url = format!("{}/metrics", bot.admin_base);
        async move { reqwest::get(url).await.ok()?.text().await.ok() }
    };
    let mut scraped = Vec::new();
    for (name, replica) in [("a", &a), ("b", &b)] {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let text = loop {
            if let Some(text) = scrape(replica).await {
                if gauge(&text, "jitbot_active_leases") == 1.0
                    && gauge(&text, "jitbot_pending_requests") == 1.0
                {
                    break text;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "replica {name} never showed the lease and the request; log:\n{}",
                replica.log_text()
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        };
        scraped.push((name, text));
    }
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/jitbot.json"))
            .unwrap(),
    )
    .unwrap();
    fn exprs(panel: &serde_json::Value, out: &mut Vec<(String, String)>) {
        for t in panel["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                out.push((panel["title"].as_str().unwrap_or("").to_string(), e.to_string()));
            }
        }
        for p in panel["panels"].as_array().into_iter().flatten() {
            exprs(p, out);
        }
    }
    let mut all = Vec::new();
    exprs(&dashboard, &mut all);
    let mut series = String::new();
    for (name, text) in &scraped {
        for metric in ["jitbot_active_leases", "jitbot_pending_requests"] {
            series.push_str(&format!(
                "      - series: '{metric}{{instance=\"{name}:9090\",job=\"jitbot\"}}'\n        values: '{}x10'\n",
                gauge(text, metric)
            ));
        }
    }
    let mut cases = String::new();
    let mut checked = Vec::new();
    for (title, expr) in &all {
        let truth = if expr.contains("jitbot_active_leases") {
            active
        } else if expr.contains("jitbot_pending_requests") {
            pending
        } else {
            continue;
        };
        let expr = expr.replace("$instance", ".*");
        cases.push_str(&format!(
            "      - expr: '{expr}'\n        eval_time: 5m\n        exp_samples:\n          - labels: '{{}}'\n            value: {truth}\n"
        ));
        checked.push(format!("{title}: {expr}"));
    }
    assert!(
        checked.len() >= 2,
        "the dashboard shows active leases and pending requests: {all:?}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let test = tmp.path().join("replicas.test.yml");
    std::fs::write(
        &test,
        format!(
            "rule_files: []\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    input_series:\n{series}    promql_expr_test:\n{cases}"
        ),
    )
    .unwrap();
    let (right, out) = promtool(&["test", "rules", test.to_str().unwrap()]);
    assert!(
        right,
        "one active lease and one pending request, two replicas: the dashboard's queries\n{}\n\
         evaluated on what the replicas export do not show 1:\n{out}",
        checked.join("\n")
    );
}
