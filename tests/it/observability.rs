//! The operator assets in `deploy/`: the Prometheus alerting rules pass
//! `promtool check rules` and their unit tests, every dashboard query is valid
//! PromQL, and every metric the dashboard and the rules name is one a running
//! jitbot exports (on sled and on PostgreSQL); the leader gauge names one
//! leader among replicas (PostgreSQL only: sled has no replicas).

use crate::support::bot::Backend;
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

/// Runs promtool; a machine without it fails here, loudly.
fn promtool(args: &[&str]) -> String {
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
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
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
