//! The operator assets in `deploy/`: the Prometheus alerting rules pass
//! `promtool check rules` and their unit tests, every dashboard query is valid
//! PromQL, and every metric the dashboard and the rules name is one a running
//! jitbot exports (on sled and on PostgreSQL); the leader gauge names one
//! leader among replicas (PostgreSQL only: sled has no replicas). The
//! gauges say what the alerts read them for: a released lease whose
//! removal fails is overdue from its release, the outbox backlog keeps
//! counting past 10,000 (to a cap the alert covers), a failed retention
//! pass is counted; and with replicas, the dashboard and the alerts show
//! store-wide figures once, not once per replica (review brk17b, findings
//! 3, 5, 6 and 7).

use crate::support::bot::{Backend, TestBot};
use crate::support::fake_slack::FakeSlack;
use crate::support::process::Jitbot;
use jitbot::chat::slack::signature::sign;
use serde_json::json;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const SIGNING: &str = "obs-signing-secret";
const DB_ADMINS: &str = "cn=db-admins,ou=groups,dc=example,dc=org";

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(path)
}

/// Runs promtool: whether it succeeded, and what it said. A machine
/// without it fails here, loudly.
fn promtool_outcome(args: &[&str]) -> (bool, String) {
    let out = Command::new("promtool").args(args).output().unwrap_or_else(|e| {
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

/// Runs promtool, which must succeed.
fn promtool(args: &[&str]) -> String {
    let (ok, text) = promtool_outcome(args);
    assert!(ok, "promtool {args:?} failed:\n{text}");
    text
}

/// Every `jitbot_…` metric name written in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("jitbot_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// Alert names defined in the rules file (`- alert: Name`).
fn alerts_defined(rules: &str) -> Vec<String> {
    rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(|n| n.trim().to_string())
        .collect()
}

/// Every `expr` of the dashboard's panels.
fn dashboard_exprs(dashboard: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            out.push(target["expr"].as_str().expect("expr").to_string());
        }
    }
    out
}

fn dashboard() -> serde_json::Value {
    let text = std::fs::read_to_string(deploy("grafana/jitbot.json")).expect("read jitbot.json");
    serde_json::from_str(&text).expect("jitbot.json is JSON")
}

// Once, not per store: the rules files alone, no jitbot.
#[test]
fn alerting_rules_pass_promtool_check_and_their_unit_tests() {
    let rules = deploy("prometheus/alerts.yml");
    let tests = deploy("prometheus/alerts.test.yml");
    let checked = promtool(&["check", "rules", rules.to_str().unwrap()]);
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool(&["test", "rules", tests.to_str().unwrap()]);
    assert!(tested.contains("SUCCESS"), "{tested}");

    // Each alert has unit tests, firing and not firing.
    let rules_text = std::fs::read_to_string(&rules).unwrap();
    let tests_text = std::fs::read_to_string(&tests).unwrap();
    let alerts = alerts_defined(&rules_text);
    for required in [
        "JitbotDown",
        "JitbotRevocationFailing",
        "JitbotRevocationOverdue",
        "JitbotZspDrift",
        "JitbotOutboxBacklogGrowing",
        "JitbotOutboxStuck",
        "JitbotRefusedSignaturesSpike",
        "JitbotDirectoryUnavailable",
        "JitbotNoLeader",
        "JitbotRetentionFailing",
    ] {
        assert!(
            alerts.iter().any(|a| a == required),
            "alerts.yml lacks {required}"
        );
    }
    for alert in &alerts {
        let cases = tests_text.matches(&format!("alertname: {alert}\n")).count();
        assert!(
            cases >= 2,
            "{alert} has {cases} promtool cases in alerts.test.yml; give it one where it fires and one where it does not"
        );
    }
}

// Once, not per store: the dashboard file alone, no jitbot.
#[test]
fn every_dashboard_query_is_valid_promql() {
    let exprs = dashboard_exprs(&dashboard());
    assert!(exprs.len() >= 15, "only {} queries in the dashboard", exprs.len());
    // promtool has no offline query parser, but it parses recording rules:
    // one rule per query, with Grafana's variables filled in.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in exprs.iter().enumerate() {
        let expr = expr.replace("$__rate_interval", "5m").replace("$instance", ".*");
        assert!(!expr.contains('$'), "unknown Grafana variable in {expr}");
        rules.push_str(&format!(
            "      - record: dashboard:query{i}\n        expr: {}\n",
            serde_json::to_string(&expr).unwrap()
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dashboard-rules.yml");
    std::fs::write(&path, rules).unwrap();
    let checked = promtool(&["check", "rules", path.to_str().unwrap()]);
    assert!(
        checked.contains(&format!("SUCCESS: {} rules found", exprs.len())),
        "{checked}"
    );
}

fn config(slack: &FakeSlack) -> String {
    format!(
        r#"
[server]
listen = "{{listen}}"
admin_token = {{admin}}
shutdown_grace = "2s"

[store]
path = "{{store}}"
cache_mb = 16

[scheduler]
max_wait = "1s"
retry_base = "1s"

[directory]
kind = "memory"

[memory]
groups = {{ "{DB_ADMINS}" = [] }}

[[memory.user]]
id = "alice"
attributes = {{ mail = "alice@example.org" }}
[[memory.user]]
id = "carol"
attributes = {{ mail = "carol@example.org" }}

[slack]
mode = "http"
bot_token = {{ env = "OBS_BOT_TOKEN" }}
signing_secret = {{ env = "OBS_SIGNING" }}
team_id = "T1"
api_url = "{api}"
default_channel = "CJIT"

[[group]]
name = "db-admins"
dn = "{DB_ADMINS}"
zsp = true
requesters = {{ users = ["alice"] }}
approvers = {{ users = ["carol"] }}
default_duration = "2s"
max_duration = "1h"
reason_required = false
"#,
        api = slack.api_url(),
    )
}

fn form(pairs: &[(&str, &str)]) -> String {
    let mut s = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    s.finish()
}

async fn post_signed(http: &reqwest::Client, bot: &Jitbot, path: &str, body: String, secret: &str) -> u16 {
    let ts = chrono::Utc::now().timestamp();
    http.post(format!("{}{path}", bot.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-slack-request-timestamp", ts.to_string())
        .header("x-slack-signature", sign(secret, ts, body.as_bytes()))
        .body(body)
        .send()
        .await
        .expect("post to jitbot")
        .status()
        .as_u16()
}

/// Sample names and values of a Prometheus text exposition.
fn samples(exposition: &str) -> Vec<(String, f64)> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let name_end = l.find(['{', ' ']).unwrap_or(l.len());
            let value = l.rsplit(' ').next()?.parse().ok()?;
            Some((l[..name_end].to_string(), value))
        })
        .collect()
}

fn value(exposition: &str, series: &str) -> f64 {
    exposition
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{series} missing from /metrics:\n{exposition}"))
}

crate::both_stores!(
    every_metric_the_dashboard_and_alerts_use_is_exported,
    flavor = "multi_thread",
    worker_threads = 2
);
async fn every_metric_the_dashboard_and_alerts_use_is_exported(backend: Backend) {
    let slack = FakeSlack::start().await;
    slack.add_user("UALICE", "alice@example.org");
    slack.add_user("UCAROL", "carol@example.org");
    let store = backend.run_store();
    let bot = Jitbot::start(
        &store.config(&config(&slack)),
        &store.with_env(&[("OBS_BOT_TOKEN", "xoxb-obs"), ("OBS_SIGNING", SIGNING)]),
    )
    .await;
    let http = reqwest::Client::new();

    // A request, its approval, and the lease running out; and one forged request.
    let request = form(&[
        ("team_id", "T1"),
        ("channel_id", "CJIT"),
        ("user_id", "UALICE"),
        ("user_name", "alice"),
        ("command", "/jit"),
        ("text", "request db-admins 2s metrics drill"),
        ("response_url", &slack.response_url(1)),
        ("trigger_id", "trigger.1"),
    ]);
    assert_eq!(
        post_signed(&http, &bot, "/slack/commands", request, SIGNING).await,
        200
    );
    let forged = form(&[
        ("user_id", "UALICE"),
        ("command", "/jit"),
        ("text", "request db-admins"),
    ]);
    assert_eq!(
        post_signed(&http, &bot, "/slack/commands", forged, "not-the-secret").await,
        401
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let id = loop {
        let pending: Vec<_> = bot
            .admin("requests")
            .await
            .into_iter()
            .filter(|r| r["state"] == "pending")
            .collect();
        if let Some(r) = pending.first() {
            break r["id"].as_str().expect("request id").to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no pending request; log:\n{}",
            bot.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if matches!(backend, Backend::Postgres) {
        // On PostgreSQL the grant waits for the leader's scheduler, which
        // starts once the replica's new term has waited out the last
        // leader's calls (a third of a term): a 2 s lease approved before
        // then would run out before its grant.
        crate::support::net::eventually(Duration::from_secs(20), "the replica leads", || {
            bot.log_text().contains("this replica leads").then_some(())
        })
        .await;
    }
    let payload = json!({
        "type": "block_actions",
        "team": {"id": "T1"},
        "api_app_id": "A1",
        "user": {"id": "UCAROL", "username": "carol", "team_id": "T1"},
        "trigger_id": "trigger.2",
        "channel": {"id": "CJIT"},
        "container": {"type": "message", "message_ts": "1.1", "channel_id": "CJIT"},
        "response_url": slack.response_url(2),
        "actions": [{"type": "button", "action_id": format!("jit:approve:{id}"), "action_ts": "2.0"}]
    });
    let approve = form(&[("payload", &payload.to_string())]);
    assert_eq!(
        post_signed(&http, &bot, "/slack/interactions", approve, SIGNING).await,
        200
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let leases = bot.admin("leases").await;
        if !leases.is_empty() && leases.iter().all(|l| l["state"] == "ended") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the lease never ended: {leases:#?}\nlog:\n{}",
            bot.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let exposition = http
        .get(format!("{}/metrics", bot.admin_base))
        .send()
        .await
        .expect("scrape")
        .text()
        .await
        .expect("metrics text");
    let exported: BTreeSet<String> = samples(&exposition).into_iter().map(|(n, _)| n).collect();

    // The flow moved the counters it should have.
    assert_eq!(
        value(&exposition, r#"jitbot_requests_total{outcome="accepted"}"#),
        1.0
    );
    assert_eq!(
        value(&exposition, r#"jitbot_approvals_total{outcome="accepted"}"#),
        1.0
    );
    assert_eq!(value(&exposition, "jitbot_grants_total"), 1.0);
    assert_eq!(value(&exposition, "jitbot_revocations_total"), 1.0);
    assert_eq!(
        value(
            &exposition,
            r#"jitbot_refused_signatures_total{platform="slack"}"#
        ),
        1.0
    );
    assert_eq!(value(&exposition, "jitbot_revocation_lag_seconds_count"), 1.0);
    assert!(
        value(
            &exposition,
            r#"jitbot_revocation_stage_seconds_count{stage="timer_lateness"}"#
        ) >= 1.0
    );
    assert_eq!(value(&exposition, "jitbot_directory_up"), 1.0);
    // One process: always the leader; on sled it never changes, on
    // PostgreSQL it took the term once.
    let (role, changes) = match backend {
        Backend::Sled => (r#"jitbot_leader{store="sled"}"#, 0.0),
        Backend::Postgres => (r#"jitbot_leader{store="postgres"}"#, 1.0),
    };
    assert_eq!(value(&exposition, role), 1.0);
    assert_eq!(value(&exposition, "jitbot_leader_changes_total"), changes);
    assert_eq!(value(&exposition, "jitbot_active_leases"), 0.0);
    assert_eq!(value(&exposition, "jitbot_revocation_overdue_seconds"), 0.0);
    // Metrics no event has touched are there too, at zero.
    assert_eq!(value(&exposition, "jitbot_revocation_failures_total"), 0.0);
    assert_eq!(value(&exposition, "jitbot_zsp_drift_total"), 0.0);
    assert_eq!(value(&exposition, "jitbot_retention_failures_total"), 0.0);
    assert_eq!(
        value(
            &exposition,
            r#"jitbot_refused_signatures_total{platform="discord"}"#
        ),
        0.0
    );
    for stage in jitbot::metrics::REVOCATION_STAGES {
        let series = format!(r#"jitbot_revocation_stage_seconds_count{{stage="{stage}"}}"#);
        assert!(value(&exposition, &series) >= 0.0);
    }

    let dashboard_text = std::fs::read_to_string(deploy("grafana/jitbot.json")).unwrap();
    let rules_text = std::fs::read_to_string(deploy("prometheus/alerts.yml")).unwrap();
    for (asset, text) in [
        ("grafana/jitbot.json", &dashboard_text),
        ("prometheus/alerts.yml", &rules_text),
    ] {
        let used = metric_names(text);
        assert!(used.len() >= 8, "{asset} names only {used:?}");
        let unknown: Vec<_> = used.difference(&exported).collect();
        assert!(
            unknown.is_empty(),
            "deploy/{asset} uses metrics jitbot does not export: {unknown:?}\nexported: {exported:?}"
        );
    }
}

/// `GET /metrics` on the admin listener.
async fn scrape(bot: &Jitbot) -> String {
    reqwest::get(format!("{}/metrics", bot.admin_base))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("metrics text")
}

// PostgreSQL only: replicas and a leader's term exist only there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_gauge_names_one_replica_and_follows_a_failover() {
    use crate::support::net::eventually;
    use crate::support::postgres::{cluster, Database, PASSWORD};
    let db = Database::create();
    let url = cluster().url(&db.name);
    let head = crate::support::postgres::replica_sections(&url);
    let config = format!(
        r#"{head}
[directory]
kind = "memory"

[memory]
groups = {{ "{DB_ADMINS}" = [] }}

[[group]]
name = "db-admins"
dn = "{DB_ADMINS}"
requesters = {{ users = ["alice"] }}
approvers = {{ users = ["carol"] }}
default_duration = "1h"
max_duration = "4h"
"#
    );
    let env = [("JITBOT_TEST_PGPW", PASSWORD)];
    let leader = r#"jitbot_leader{store="postgres"}"#;
    let a = Jitbot::start(&config, &env).await;
    eventually(Duration::from_secs(10), "replica a leads", || {
        a.log_text().contains("this replica leads").then_some(())
    })
    .await;
    let b = Jitbot::start(&config, &env).await;
    // b has had a renewal period (2 s) to try for the term, and must not hold it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (on_a, on_b) = (scrape(&a).await, scrape(&b).await);
    assert_eq!(value(&on_a, leader), 1.0, "{on_a}");
    assert_eq!(value(&on_a, "jitbot_leader_changes_total"), 1.0);
    assert_eq!(value(&on_b, leader), 0.0, "{on_b}");
    assert_eq!(value(&on_b, "jitbot_leader_changes_total"), 0.0);
    assert!(
        !on_b.contains(r#"jitbot_leader{store="sled"}"#),
        "a replica on PostgreSQL reports a sled role:\n{on_b}"
    );

    drop(a); // SIGKILL: b takes the term once it expires.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let on_b = scrape(&b).await;
        if value(&on_b, leader) == 1.0 {
            assert_eq!(value(&on_b, "jitbot_leader_changes_total"), 1.0);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replica b never reported itself leader after the leader was killed:\n{on_b}\nlog:\n{}",
            b.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The store-wide gauges: every replica reads them from the one shared
/// store, so added up over replicas they count each lease twice.
const STORE_WIDE: [&str; 5] = [
    "jitbot_active_leases",
    "jitbot_pending_requests",
    "jitbot_outbox_backlog",
    "jitbot_outbox_oldest_seconds",
    "jitbot_revocation_overdue_seconds",
];

/// A released lease (or one an admin revoked, or offboarding) ended at
/// its release, hours before its planned expiry. Its removal failing for
/// 30 minutes is 30 minutes overdue, so `JitbotRevocationOverdue` (> 2
/// minutes) pages, rather than staying silent until the planned end.
#[tokio::test]
async fn a_released_lease_whose_removal_keeps_failing_counts_as_overdue_from_its_release() {
    use chrono::Duration as D;
    use jitbot_core::LeaseState;
    let bot = TestBot::new();
    let id = TestBot::request_id(&bot.ok("alice", "request db-admins 4h incident").await);
    bot.ok("bob", &format!("approve {id}")).await;
    bot.run_due().await;
    assert_eq!(bot.lease().state, LeaseState::Active);
    bot.advance(D::minutes(5));
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
    assert!(
        bot.lease().expires_at > ended + D::hours(3),
        "planned end hours away"
    );
    for _ in 0..30 {
        bot.advance(D::minutes(1));
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
    assert_eq!(
        overdue, behind,
        "the lease ended {behind:?} ago (released) and its membership is still there: \
         jitbot_revocation_overdue_seconds must count from the release, and says {overdue:?}"
    );
}

/// Finding 5: `jitbot_outbox_backlog` counts past 10,000, so
/// `JitbotOutboxBacklogGrowing` fires on what jitbot's own `/metrics`
/// (scraped in process at six points 5 minutes apart, through promtool
/// against deploy/prometheus/alerts.yml) shows while a backlog grows from
/// 10,500 to 13,000. Then the backlog grows to 100,000 and a scrape's time
/// is printed (keys counted, no entry decoded), beside what decoding every
/// entry would take.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_backlog_gauge_counts_past_10000_and_its_alert_fires_while_it_grows() {
    use jitbot::http::{self, HttpState, Limits};
    use jitbot::store::{OutboxItem, StoreError};
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
    let queue = |tag: String, n: u64| {
        let store = store.clone();
        async move {
            store
                .update(now, |tx| {
                    for i in 0..n {
                        tx.outbox(OutboxItem::UpdateApproval {
                            request: RequestId::new(format!("r-backlog-{tag}-{i}")),
                        });
                    }
                    Ok::<(), StoreError>(())
                })
                .await
                .unwrap();
        }
    };
    let mut queued = 0u64;
    let mut scraped = Vec::new();
    for step in 0..6u64 {
        // Slack is down: card updates pile up, 10,500 first, then 500 more
        // every 5 minutes.
        let add = if step == 0 { 10_500 } else { 500 };
        for chunk in 0..add / 500 {
            queue(format!("{step}-{chunk}"), 500).await;
        }
        queued += add;
        let text = reqwest::get(format!("{base}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        scraped.push((queued, value(&text, "jitbot_outbox_backlog")));
    }
    for (queued, gauge) in &scraped {
        assert_eq!(
            *gauge, *queued as f64,
            "jitbot_outbox_backlog says {gauge} while {queued} notices wait (all scrapes: {scraped:?})"
        );
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
      - series: 'jitbot_outbox_backlog{{job="jitbot",instance="bot:8080"}}'
        values: '{values}'
    alert_rule_test:
      - eval_time: 25m
        alertname: JitbotOutboxBacklogGrowing
        exp_alerts:
          - exp_labels:
              severity: warning
              job: jitbot
            exp_annotations:
              summary: "Chat notices pile up in the outbox (jitbot)"
              description: "{last} notices wait in the outbox and the number keeps growing (or has reached the gauge's cap of 1000000): the chat platform refuses or throttles jitbot. Check jitbot_chat_api_errors_total and the bot token."
"#,
            rules = deploy("prometheus/alerts.yml").display(),
            values = values.join(" "),
        ),
    )
    .unwrap();
    let (fired, out) = promtool_outcome(&["test", "rules", test.to_str().unwrap()]);
    assert!(
        fired,
        "the outbox backlog grew from 10,500 to 13,000 over 25 minutes (queued, scraped: {scraped:?}) \
         and JitbotOutboxBacklogGrowing does not fire on what jitbot exports:\n{out}"
    );

    // 100,000 waiting: a scrape counts them all, cheaply.
    while queued < 100_000 {
        let n = (100_000 - queued).min(5_000);
        queue(format!("bulk-{queued}"), n).await;
        queued += n;
    }
    let started = Instant::now();
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let scrape = started.elapsed();
    assert_eq!(value(&text, "jitbot_outbox_backlog"), 100_000.0);
    let started = Instant::now();
    let (counted, _) = store.outbox_backlog(jitbot::metrics::OUTBOX_BACKLOG_CAP).unwrap();
    let counting = started.elapsed();
    assert_eq!(counted, 100_000);
    let started = Instant::now();
    let decoded = store.outbox(200_000).unwrap().len();
    let decoding = started.elapsed();
    assert_eq!(decoded, 100_000);
    eprintln!(
        "with 100,000 queued notices: a /metrics scrape took {scrape:?}, of which counting the \
         outbox's keys about {counting:?}; reading and decoding every entry instead takes {decoding:?}"
    );
}

// Once, not per store: the deploy files alone, no jitbot.
/// Every replica exports the store-wide gauges, so the dashboard combines
/// them with `max` (never `sum`), and their alerts take the max over
/// replicas (`max without (instance, pod)`), firing once.
#[test]
fn store_wide_gauges_are_combined_with_max_over_replicas() {
    for expr in dashboard_exprs(&dashboard()) {
        for gauge in STORE_WIDE {
            if metric_names(&expr).contains(gauge) {
                assert!(
                    !expr.contains("sum(") && !expr.contains("sum by"),
                    "the dashboard adds up {gauge}, a store-wide gauge every replica reports, over \
                     replicas: {expr}; use max(...)"
                );
                assert!(
                    expr.starts_with("max("),
                    "the dashboard shows {gauge} per replica or otherwise than the max: {expr}"
                );
            }
        }
    }
    let rules = std::fs::read_to_string(deploy("prometheus/alerts.yml")).unwrap();
    let mut checked = 0;
    // Each rule, from its `- alert:` line to the next.
    for rule in rules.split("- alert:").skip(1) {
        let name = rule.lines().next().unwrap_or("?").trim();
        let expr = rule.split("annotations:").next().unwrap_or(rule);
        let names = metric_names(expr);
        for gauge in STORE_WIDE.iter().filter(|g| names.contains(**g)) {
            checked += 1;
            let bare = expr.matches(gauge).count();
            let combined = expr
                .matches(&format!("max without (instance, pod) ({gauge}"))
                .count()
                + expr
                    .matches(&format!("max without (instance, pod) (delta({gauge}"))
                    .count();
            assert_eq!(
                bare, combined,
                "alert {name} reads {gauge}, a store-wide gauge every replica reports, per replica: \
                 it fires once per replica; take `max without (instance, pod)`:\n{expr}"
            );
        }
    }
    assert!(
        checked >= 3,
        "the overdue and outbox alerts read store-wide gauges"
    );
}

/// Finding 7: two real `jitbot run` replicas on one database holding one
/// active lease and one pending request each report both; the dashboard's
/// queries, evaluated by promtool on what they export, show 1 of each,
/// not 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_replicas_the_dashboard_counts_each_lease_and_request_once() {
    use crate::support::postgres::{cluster, replica_sections, PASSWORD};
    use jitbot_core::LeaseState;
    let bot = TestBot::builder().postgres().build();
    // The replicas run on the wall clock: the history is made at today's date.
    bot.advance(chrono::Utc::now() - bot.engine.now());
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
    let mut scraped = Vec::new();
    for (name, replica) in [("a", &a), ("b", &b)] {
        let deadline = Instant::now() + Duration::from_secs(20);
        let text = loop {
            let text = scrape(replica).await;
            if value(&text, "jitbot_active_leases") == 1.0 && value(&text, "jitbot_pending_requests") == 1.0 {
                break text;
            }
            assert!(
                Instant::now() < deadline,
                "replica {name} never showed the lease and the request; log:\n{}",
                replica.log_text()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        scraped.push((name, text));
    }
    let mut series = String::new();
    for (name, text) in &scraped {
        for metric in ["jitbot_active_leases", "jitbot_pending_requests"] {
            series.push_str(&format!(
                "      - series: '{metric}{{instance=\"{name}:9090\",job=\"jitbot\"}}'\n        values: '{}x10'\n",
                value(text, metric)
            ));
        }
    }
    let mut cases = String::new();
    let mut checked = Vec::new();
    for expr in dashboard_exprs(&dashboard()) {
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
        checked.push(expr);
    }
    assert!(
        checked.len() >= 2,
        "the dashboard shows active leases and pending requests: {checked:?}"
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
    let (right, out) = promtool_outcome(&["test", "rules", test.to_str().unwrap()]);
    assert!(
        right,
        "one active lease and one pending request, two replicas: the dashboard's queries\n{}\n\
         evaluated on what the replicas export do not show 1:\n{out}",
        checked.join("\n")
    );
}

/// A retention pass that fails (here its `archive_dir` lies under a
/// regular file, so it can be neither read nor created) is counted in
/// `jitbot_retention_failures_total`, once per failed pass, by the
/// background loop: `JitbotRetentionFailing` reads it. Before, a failing
/// pass made only a log line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_retention_pass_is_counted_for_its_alert() {
    use jitbot::store::retention::{self, RetentionSettings};
    use jitbot_core::Span;
    let handle = jitbot::metrics::install().expect("the process's metrics recorder");
    let failures = || value(&handle.render(), "jitbot_retention_failures_total");
    let bot = TestBot::new();
    // Audit records old enough to archive.
    let id = TestBot::request_id(&bot.ok("alice", "request db-admins 1h old work").await);
    bot.ok("bob", &format!("approve {id}")).await;
    bot.run_due().await;
    bot.advance(chrono::Duration::days(30));
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let settings = RetentionSettings {
        every: Duration::from_millis(100),
        ..RetentionSettings::new(Span::parse_long("1d").unwrap(), file.join("audit-archive"))
    };
    let before = failures();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let passes = tokio::spawn(retention::run(
        bot.engine.store().clone(),
        std::sync::Arc::new(bot.clock.clone()),
        settings,
        stopped,
    ));
    crate::support::net::eventually(
        Duration::from_secs(10),
        "two failed retention passes counted in jitbot_retention_failures_total",
        || (failures() >= before + 2.0).then_some(()),
    )
    .await;
    stop.send(true).unwrap();
    passes.await.unwrap();
    assert!(
        handle
            .render()
            .contains("# HELP jitbot_retention_failures_total Retention passes"),
        "the counter has its help text"
    );
}
