//! jitbot's benchmark harness: prints distributions and ratios measured in
//! one run against a real slapd on loopback. Run with
//!
//! ```sh
//! cargo bench --bench jitbot                 # every scenario, default sizes
//! cargo bench --bench jitbot -- store grant  # some scenarios
//! JITBOT_BENCH_RESTART_LEASES=1000000 cargo bench --bench jitbot -- restart
//! ```
//!
//! Figures go to stdout; BENCHMARKS.md records a run.

#[path = "../tests/support/fake_slack.rs"]
#[allow(dead_code)]
mod fake_slack;
#[path = "../tests/support/slapd.rs"]
#[allow(dead_code)]
mod slapd;

use chrono::{Duration, Utc};
use jitbot::chat::fanout::LogNotifier;
use jitbot::clock::SystemClock;
use jitbot::directory::ldap::LdapDirectory;
use jitbot::engine::{Caller, Engine, EngineSettings};
use jitbot::ports::Directory;
use jitbot::store::{LeaseRecord, Store, TimerKind};
use jitbot_core::policy::{GroupPolicy, Policy};
use jitbot_core::{Command, Lease, LeaseId, LeaseState, RequestId, Span, UserId};
use ldap3::Mod;
use slapd::Slapd;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// p50, p99 and max of samples in milliseconds.
fn summary(mut ms: Vec<f64>) -> String {
    if ms.is_empty() {
        return "no samples".into();
    }
    ms.sort_by(|a, b| a.total_cmp(b));
    let pick = |q: f64| ms[((ms.len() as f64 - 1.0) * q).round() as usize];
    format!(
        "n={} p50={:.2}ms p99={:.2}ms max={:.2}ms",
        ms.len(),
        pick(0.5),
        pick(0.99),
        ms[ms.len() - 1]
    )
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn policy(max: Span) -> Policy {
    let mut g = GroupPolicy::new("db-admins", slapd::DB_ADMINS);
    for i in 0..env_usize("JITBOT_BENCH_GRANTS", 300) {
        g.requesters.users.insert(UserId::new(format!("u{i:06}")));
    }
    g.approvers.users.insert(UserId::new("carol"));
    g.max_duration = max;
    g.max_total_duration = max;
    g.reason_required = false;
    g.approval_timeout = Span::from_hours(24);
    Policy {
        groups: vec![g],
        admins: Default::default(),
    }
}

/// Adds `n` people `u00000`.. to the directory (as root).
async fn add_people(server: &Slapd, n: usize) {
    add_people_from(server, 0, n).await;
}

fn engine_on(path: &std::path::Path, dir: Arc<dyn Directory>, max: Span) -> Engine {
    let store = Store::open(path, 64).expect("store");
    Engine::new(
        policy(max),
        store,
        dir,
        Arc::new(SystemClock),
        EngineSettings::default(),
    )
}

fn directory(server: &Slapd) -> Arc<dyn Directory> {
    Arc::new(LdapDirectory::new(&server.ldap_config(), &slapd::group_configs()).expect("ldap"))
}

/// Durable transitions per second: concurrent `Store::update`s, each flushed.
async fn bench_store() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("db"), 64).unwrap();
    let n = env_usize("JITBOT_BENCH_STORE_OPS", 5000);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..8 {
        let store = store.clone();
        tasks.spawn(async move {
            for i in (w..n).step_by(8) {
                store
                    .update(Utc::now(), |tx| {
                        let id = format!("t-{i}");
                        tx.set_timer(TimerKind::Warn, &id, Utc::now());
                        tx.audit(jitbot::store::AuditDraft {
                            actor: "bench".into(),
                            action: "bench.transition".into(),
                            ..Default::default()
                        });
                        Ok::<(), jitbot::store::StoreError>(())
                    })
                    .await
                    .unwrap();
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let secs = started.elapsed().as_secs_f64();
    println!(
        "store: {n} durable transitions (each committed across trees and flushed) in {secs:.2}s = {:.0}/s",
        n as f64 / secs
    );
}

/// Approval click → directory modify → lease durable → chat update queued.
async fn bench_grant(server: &Slapd) {
    let n = env_usize("JITBOT_BENCH_GRANTS", 300);
    add_people(server, n).await;
    let tmp = tempfile::tempdir().unwrap();
    let engine = engine_on(&tmp.path().join("db"), directory(server), Span::from_hours(4));
    let mut samples = Vec::new();
    for i in 0..n {
        let user = format!("u{i:06}");
        let caller = Caller::new(&user, None);
        let reply = engine
            .execute(&caller, Command::parse("request db-admins 1h bench").unwrap())
            .await;
        let id = reply.text.split_whitespace().nth(1).unwrap().to_string();
        let started = Instant::now();
        let reply = engine
            .execute(
                &Caller::new("carol", None),
                Command::Approve {
                    request: id,
                    duration: None,
                },
            )
            .await;
        jitbot::chat::outbox::drain(&engine, &LogNotifier).await;
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
        assert!(reply.ok, "{}", reply.text);
    }
    println!(
        "grant latency (approve → LDAP add + read-back → lease durable → notices delivered): {}",
        summary(samples)
    );
}

/// Writes `n` active leases (bulk, 10k per commit) expiring at `expiry(i)`.
async fn seed_leases(store: &Store, n: usize, expiry: impl Fn(usize) -> chrono::DateTime<Utc>) {
    let p = policy(Span::from_hours(24 * 365));
    let group = &p.groups[0];
    let now = Utc::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(10_000) {
        store
            .update(now, |tx| {
                for &i in chunk {
                    let mut lease = Lease::start(
                        LeaseId::new(format!("l-{i}")),
                        RequestId::new(format!("r-{i}")),
                        group,
                        UserId::new(format!("u{i:06}")),
                        Span::from_hours(1),
                        now,
                    );
                    lease.expires_at = expiry(i);
                    let membership = jitbot_core::Membership {
                        group: group.dn.clone(),
                        attribute: "member".into(),
                        value: format!("uid=u{i:06},{}", slapd::PEOPLE),
                        identity: None,
                    };
                    lease.record_preexisting(false, membership);
                    lease.state = LeaseState::Active;
                    tx.set_timer(TimerKind::Expire, lease.id.as_str(), lease.expires_at);
                    tx.put_lease(LeaseRecord { lease, origin: None });
                }
                Ok::<(), jitbot::store::StoreError>(())
            })
            .await
            .unwrap();
    }
}

/// Adds the leases' memberships directly, as the grants would have.
async fn add_members(server: &Slapd, from: usize, to: usize) {
    let mut ldap = server.admin().await;
    for i in from..to {
        let dn = format!("uid=u{i:06},{}", slapd::PEOPLE);
        ldap.modify(
            slapd::DB_ADMINS,
            vec![Mod::Add("member", HashSet::from([dn.as_str()]))],
        )
        .await
        .unwrap()
        .success()
        .unwrap();
    }
}

/// Lags (ms) from each lease's expiry to its `lease.ended` audit record.
fn lags(engine: &Engine) -> Vec<f64> {
    let expiry: std::collections::HashMap<String, chrono::DateTime<Utc>> = engine
        .store()
        .leases()
        .unwrap()
        .into_iter()
        .map(|l| (l.lease.id.to_string(), l.lease.expires_at))
        .collect();
    engine
        .store()
        .audit(0)
        .filter_map(|e| e.ok())
        .filter(|e| e.action == "lease.ended")
        .filter_map(|e| Some((e.at - *expiry.get(e.lease.as_ref()?)?).num_microseconds()? as f64 / 1000.0))
        .collect()
}

/// Runs the scheduler until no timer is due and `until` has passed.
async fn run_scheduler_until_done(
    engine: &Engine,
    until: chrono::DateTime<Utc>,
    concurrency: usize,
    limit_secs: u64,
) -> f64 {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let settings = jitbot::scheduler::SchedulerSettings {
        max_wait: std::time::Duration::from_secs(1),
        concurrency,
    };
    let started = Instant::now();
    let task = tokio::spawn(jitbot::scheduler::run(engine.clone(), settings, rx));
    loop {
        // Cheap: the first key of the timer index.
        let now = Utc::now();
        let idle = engine.store().due_timers(now, 1).unwrap().is_empty();
        if (idle && now > until) || started.elapsed().as_secs() > limit_secs {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    tx.send(true).unwrap();
    task.await.unwrap();
    secs
}

/// 10,000 leases expiring within one minute, revoked by the scheduler.
async fn bench_revocation(server: &Slapd, people_added: usize) {
    let n = env_usize("JITBOT_BENCH_REVOCATIONS", 10_000);
    if n > people_added {
        add_people_from(server, people_added, n).await;
    }
    add_members(server, 0, n).await;
    let tmp = tempfile::tempdir().unwrap();
    let engine = engine_on(&tmp.path().join("db"), directory(server), Span::from_hours(4));
    let start = Utc::now() + Duration::seconds(3);
    seed_leases(engine.store(), n, |i| {
        start + Duration::milliseconds((i as i64 * 60_000) / n as i64)
    })
    .await;
    run_scheduler_until_done(&engine, start + Duration::seconds(60), 32, 600).await;
    println!(
        "revocation lag ({n} leases expiring within 60 s, LDAP remove + read-back each): {}",
        summary(lags(&engine))
    );
}

/// Adds people `u<from>`..`u<to>` to the directory (as root).
async fn add_people_from(server: &Slapd, from: usize, to: usize) {
    let mut ldap = server.admin().await;
    for i in from..to {
        let uid = format!("u{i:06}");
        let dn = format!("uid={uid},{}", slapd::PEOPLE);
        let attrs = vec![
            ("objectClass", HashSet::from(["inetOrgPerson"])),
            ("uid", HashSet::from([uid.as_str()])),
            ("cn", HashSet::from([uid.as_str()])),
            ("sn", HashSet::from(["bench"])),
        ];
        ldap.add(&dn, attrs).await.unwrap().success().unwrap();
    }
}

/// N leases due in the same second, drained by jitbot, against a plain
/// ldap3 loop doing the same removals on the same slapd.
async fn bench_mass(server: &Slapd) {
    let n = env_usize("JITBOT_BENCH_MASS", 2000);
    // Baseline: the same removals with one plain ldap3 connection, sequential.
    add_members(server, 0, n).await;
    let mut ldap = server.admin().await;
    let started = Instant::now();
    for i in 0..n {
        let dn = format!("uid=u{i:06},{}", slapd::PEOPLE);
        ldap.modify(
            slapd::DB_ADMINS,
            vec![Mod::Delete("member", HashSet::from([dn.as_str()]))],
        )
        .await
        .unwrap()
        .success()
        .unwrap();
    }
    let plain = started.elapsed().as_secs_f64();
    add_members(server, 0, n).await;
    let tmp = tempfile::tempdir().unwrap();
    let engine = engine_on(&tmp.path().join("db"), directory(server), Span::from_hours(4));
    let due = Utc::now();
    seed_leases(engine.store(), n, |_| due).await;
    let secs = run_scheduler_until_done(&engine, due, 32, 600).await;
    println!(
        "mass expiry: {n} leases due at once: jitbot {secs:.2}s ({:.0}/s, each durable before and after, with read-back) vs plain ldap3 loop {plain:.2}s ({:.0}/s): ratio {:.2}",
        n as f64 / secs,
        n as f64 / plain,
        plain / secs
    );
}

/// Restart with many leases in the store: time to open and schedule,
/// time to revoke the overdue ones, memory per scheduled lease.
async fn bench_restart(server: &Slapd) {
    let n = env_usize("JITBOT_BENCH_RESTART_LEASES", 100_000);
    let overdue = env_usize("JITBOT_BENCH_RESTART_OVERDUE", 1000).min(n);
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("db");
    {
        let store = Store::open(&path, 64).unwrap();
        let now = Utc::now();
        let seeding = Instant::now();
        seed_leases(&store, n, |i| {
            if i < overdue {
                now - Duration::seconds(10)
            } else {
                now + Duration::days(1) + Duration::seconds(i as i64)
            }
        })
        .await;
        println!(
            "restart: seeded {n} leases in {:.1}s",
            seeding.elapsed().as_secs_f64()
        );
    }
    // A fresh process opens the store and starts scheduling: its time and
    // memory are what a restarted jitbot pays.
    let probe = std::process::Command::new(std::env::current_exe().unwrap())
        .arg("restart-probe")
        .arg(&path)
        .output()
        .unwrap();
    let probe = String::from_utf8_lossy(&probe.stdout).to_string();
    let field = |name: &str| -> f64 {
        probe
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("probe said {probe:?}"))
    };
    let (open_secs, rss) = (field("open_secs"), field("rss_kib"));
    add_members(server, 0, overdue).await;
    let engine = engine_on(&path, directory(server), Span::from_hours(24 * 365));
    let secs = run_scheduler_until_done(&engine, Utc::now(), 32, 600).await;
    println!(
        "restart: {n} leases in the store: a fresh process opens it and has its next timer in {open_secs:.3}s (the schedule is the store's timer index; nothing is loaded into memory); RSS {:.0} MiB = {:.0} bytes per scheduled lease (sled cache 64 MiB); {overdue} overdue leases revoked in {secs:.2}s ({:.0}/s)",
        rss / 1024.0,
        rss * 1024.0 / n as f64,
        overdue as f64 / secs
    );
}

/// Acknowledgement latency of signed Slack slash commands over HTTP at fixed
/// (open-loop) rates; the work behind each ack runs meanwhile.
async fn bench_ack(server: &Slapd) {
    use jitbot::chat::slack::{routes, signature::sign, SlackAdapter};
    use jitbot::config::{SlackConfig, SlackMode};
    use jitbot::secret::{Secret, SecretSource};
    let slack = fake_slack::FakeSlack::start().await;
    slack.add_user("UALICE", "alice@example.org");
    let config = SlackConfig {
        mode: SlackMode::Http,
        bot_token: SecretSource::env("UNUSED"),
        signing_secret: None,
        app_token: None,
        team_id: "T1".into(),
        app_id: None,
        enterprise_id: None,
        api_url: slack.api_url(),
        user_attribute: "mail".into(),
        default_channel: "CJIT".into(),
        alert_channel: None,
        channels: Default::default(),
    };
    let adapter = Arc::new(SlackAdapter::with_token(&config, Secret::new("xoxb-bench")).unwrap());
    let tmp = tempfile::tempdir().unwrap();
    let engine = engine_on(&tmp.path().join("db"), directory(server), Span::from_hours(4));
    let app = routes(
        engine,
        adapter,
        Secret::new("bench-secret"),
        Arc::new(SystemClock),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/slack/commands", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let http = reqwest::Client::new();
    let secs = env_usize("JITBOT_BENCH_ACK_SECS", 3) as u64;
    let mut n = 0u64;
    for rate in [100u64, 500, 1000] {
        let mut tasks = tokio::task::JoinSet::new();
        let mut tick = tokio::time::interval(std::time::Duration::from_micros(1_000_000 / rate));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        for _ in 0..rate * secs {
            tick.tick().await;
            n += 1;
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            form.append_pair("team_id", "T1")
                .append_pair("channel_id", "CJIT")
                .append_pair("user_id", "UALICE")
                .append_pair("command", "/jit")
                .append_pair("text", "list")
                .append_pair("response_url", &slack.response_url(n as u32))
                .append_pair("trigger_id", &format!("bench.{n}"));
            let body = form.finish();
            let ts = Utc::now().timestamp();
            let sig = sign("bench-secret", ts, body.as_bytes());
            let req = http
                .post(&base)
                .header("content-type", "application/x-www-form-urlencoded")
                .header("x-slack-request-timestamp", ts.to_string())
                .header("x-slack-signature", sig)
                .body(body);
            tasks.spawn(async move {
                let started = Instant::now();
                let status = req.send().await.map(|r| r.status().as_u16()).unwrap_or(0);
                (status, started.elapsed().as_secs_f64() * 1000.0)
            });
        }
        let mut samples = Vec::new();
        let mut failed = 0;
        while let Some(r) = tasks.join_next().await {
            let (status, ms) = r.unwrap();
            if status == 200 {
                samples.push(ms);
            } else {
                failed += 1;
            }
        }
        println!(
            "slack ack at {rate}/s for {secs}s: {} ({failed} not acknowledged with 200)",
            summary(samples)
        );
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// The child side of the restart benchmark: open, find the next timer, report.
fn restart_probe(path: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let started = Instant::now();
        let store = Store::open(std::path::Path::new(path), 64).unwrap();
        let next = store.next_due().unwrap();
        let batch = store.due_timers(Utc::now(), 32).unwrap();
        let secs = started.elapsed().as_secs_f64();
        assert!(next.is_some() && !batch.is_empty());
        println!("open_secs={secs} rss_kib={}", rss_kib());
    });
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("restart-probe") {
        return restart_probe(&argv[2]);
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(run());
}

async fn run() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let want = |name: &str| args.is_empty() || args.iter().any(|a| a == name || a == "all");
    println!(
        "jitbot benchmarks on {} cores, slapd on loopback",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    if want("store") {
        bench_store().await;
    }
    let needs_ldap = ["ack", "grant", "revocation", "mass", "restart"]
        .iter()
        .any(|s| want(s));
    if !needs_ldap {
        return;
    }
    if want("ack") {
        let server = Slapd::start();
        bench_ack(&server).await;
    }
    if want("grant") {
        let server = Slapd::start();
        bench_grant(&server).await;
    }
    if want("mass") {
        let server = Slapd::start();
        add_people(&server, env_usize("JITBOT_BENCH_MASS", 2000)).await;
        bench_mass(&server).await;
    }
    if want("revocation") {
        let server = Slapd::start();
        bench_revocation(&server, 0).await;
    }
    if want("restart") {
        let server = Slapd::start();
        let overdue = env_usize("JITBOT_BENCH_RESTART_OVERDUE", 1000);
        add_people(&server, overdue).await;
        bench_restart(&server).await;
    }
}
