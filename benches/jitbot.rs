//! jitbot's benchmark harness: prints distributions and ratios measured in
//! one run against a real slapd on loopback. Run with
//!
//! ```sh
//! cargo bench --bench jitbot                 # every scenario, default sizes
//! cargo bench --bench jitbot -- store grant  # some scenarios
//! JITBOT_BENCH_RESTART_LEASES=1000000 cargo bench --bench jitbot -- restart
//! JITBOT_BENCH_DAY_SECS=120 JITBOT_BENCH_DAY_REQUESTS=1000 cargo bench --bench jitbot -- day
//! JITBOT_BENCH_BACKEND=postgres JITBOT_PG_FSYNC=on cargo bench --bench jitbot -- store grant
//! JITBOT_BENCH_MASS_ROUNDS=3 JITBOT_BENCH_COMPRESSION=off cargo bench --bench jitbot -- mass revocation
//! ```
//!
//! `store`, `grant`, `revocation` and `restart` run on sled, or with
//! `JITBOT_BENCH_BACKEND=postgres` on a replica of a new database in the
//! test harness's PostgreSQL 15
//! (`tests/support/postgres.rs`, on loopback; `JITBOT_PG_FSYNC=on` makes
//! its commits reach the disk, as sled's flushes do).
//!
//! Figures go to stdout; BENCHMARKS.md records a run.

#[path = "../tests/support/fake_slack.rs"]
#[allow(dead_code)]
mod fake_slack;
#[path = "../tests/support/net.rs"]
#[allow(dead_code)]
mod net;
#[path = "../tests/support/postgres.rs"]
#[allow(dead_code)]
mod postgres;
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

/// p50 and p99 of samples (any unit), nearest rank.
fn quantiles(mut v: Vec<f64>) -> (f64, f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let pick = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    (pick(0.5), pick(0.99), v[v.len() - 1])
}

/// Prints each revocation stage as jitbot records it for Prometheus
/// (`jitbot_revocation_stage_seconds{stage}`), from the samples the metrics
/// module kept since `capture_samples`; returns them.
fn print_stages(label: &str) -> std::collections::HashMap<&'static str, Vec<f64>> {
    let samples = jitbot::metrics::take_samples();
    let ms = |name: &str| -> Vec<f64> {
        samples
            .get(name)
            .map(|v| v.iter().map(|s| s * 1000.0).collect())
            .unwrap_or_default()
    };
    println!("{label}: stages (jitbot_revocation_stage_seconds, per revocation):");
    for stage in jitbot::metrics::REVOCATION_STAGES {
        println!("  {stage:<17} {}", summary(ms(stage)));
    }
    println!("  {:<17} {}", "lag (durable)", summary(ms("lag")));
    let sizes = samples.get("batch_values").cloned().unwrap_or_default();
    let (p50, p99, max) = quantiles(sizes.clone());
    println!(
        "  values per remove modify: {} modifies, mean {:.1}, p50 {p50:.0}, p99 {p99:.0}, max {max:.0}",
        sizes.len(),
        sizes.iter().sum::<f64>() / sizes.len().max(1) as f64
    );
    samples
}

/// The mean number of values per combined remove, rounded up.
fn mean_batch(samples: &std::collections::HashMap<&'static str, Vec<f64>>) -> usize {
    let sizes = samples.get("batch_values").cloned().unwrap_or_default();
    let total: f64 = sizes.iter().sum();
    ((total / sizes.len().max(1) as f64).ceil() as usize).max(1)
}

/// The physical limit: a plain ldap3 connection removes members
/// `from..to` from the bench group, `batch` values per modify, with no store
/// and no read-back. Returns the seconds it took and each modify's latency
/// in milliseconds.
async fn raw_removals(server: &Slapd, from: usize, to: usize, batch: usize) -> (f64, Vec<f64>) {
    let mut ldap = server.admin().await;
    let dns: Vec<String> = (from..to)
        .map(|i| format!("uid=u{i:06},{}", slapd::PEOPLE))
        .collect();
    let started = Instant::now();
    let mut each = Vec::new();
    for chunk in dns.chunks(batch.max(1)) {
        let values: HashSet<&str> = chunk.iter().map(String::as_str).collect();
        let one = Instant::now();
        ldap.modify(slapd::DB_ADMINS, vec![Mod::Delete("member", values)])
            .await
            .unwrap()
            .success()
            .unwrap();
        each.push(one.elapsed().as_secs_f64() * 1000.0);
    }
    (started.elapsed().as_secs_f64(), each)
}

/// The physical limit of a revocation that is read back, as jitbot's are:
/// a plain ldap3 connection removes members `0..n` at `batch` values per
/// modify, and after each modify makes the one base search jitbot's
/// read-back makes (a filter naming every value of the batch), with no
/// store. Returns the seconds spent in modifies and in read-backs. Their
/// ratio bounds what any implementation that reads back can reach against
/// the raw limit, which reads nothing back: modify / (modify + read-back).
async fn raw_drain_read_back(server: &Slapd, n: usize, batch: usize) -> (f64, f64) {
    add_members(server, 0, n).await;
    let mut ldap = server.admin().await;
    let dns: Vec<String> = (0..n).map(|i| format!("uid=u{i:06},{}", slapd::PEOPLE)).collect();
    let (mut modify, mut read_back) = (0.0, 0.0);
    for chunk in dns.chunks(batch.max(1)) {
        let values: HashSet<&str> = chunk.iter().map(String::as_str).collect();
        let one = Instant::now();
        ldap.modify(slapd::DB_ADMINS, vec![Mod::Delete("member", values)])
            .await
            .unwrap()
            .success()
            .unwrap();
        modify += one.elapsed().as_secs_f64();
        let terms: String = chunk.iter().map(|dn| format!("(member={dn})")).collect();
        let one = Instant::now();
        let (found, _) = ldap
            .search(
                slapd::DB_ADMINS,
                ldap3::Scope::Base,
                &format!("(|{terms})"),
                vec!["1.1"],
            )
            .await
            .unwrap()
            .success()
            .unwrap();
        read_back += one.elapsed().as_secs_f64();
        assert!(found.is_empty(), "the removed members read back as gone");
    }
    (modify, read_back)
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

/// Whether `JITBOT_BENCH_BACKEND=postgres` asks for PostgreSQL.
fn on_postgres() -> bool {
    std::env::var("JITBOT_BENCH_BACKEND").is_ok_and(|b| b == "postgres")
}

/// The store the benchmark runs on: sled at `path`, or a replica (its
/// mirror at `path`) of a new PostgreSQL database.
fn open_store(path: &std::path::Path) -> Store {
    if on_postgres() {
        let db = postgres::Database::create();
        Store::open_postgres(path, 64, &db.settings()).expect("PostgreSQL store")
    } else {
        Store::open(path, 64).expect("store")
    }
}

fn engine_on(path: &std::path::Path, dir: Arc<dyn Directory>, max: Span) -> Engine {
    let store = open_store(path);
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
    let store = open_store(&tmp.path().join("db"));
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

/// Writes `n` active leases (bulk, 2,000 per commit: a PostgreSQL
/// transaction must not sit idle past the session's 5 s
/// `idle_in_transaction_session_timeout` while a loaded machine builds a
/// bigger one) expiring at `expiry(i)`.
async fn seed_leases(store: &Store, n: usize, expiry: impl Fn(usize) -> chrono::DateTime<Utc>) {
    let p = policy(Span::from_hours(24 * 365));
    let group = &p.groups[0];
    let now = Utc::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(2_000) {
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

/// Adds the leases' memberships directly, as the grants would have (500
/// values per modify: seeding, not measured).
async fn add_members(server: &Slapd, from: usize, to: usize) {
    let mut ldap = server.admin().await;
    let dns: Vec<String> = (from..to)
        .map(|i| format!("uid=u{i:06},{}", slapd::PEOPLE))
        .collect();
    for chunk in dns.chunks(500) {
        let values: HashSet<&str> = chunk.iter().map(String::as_str).collect();
        ldap.modify(slapd::DB_ADMINS, vec![Mod::Add("member", values)])
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
async fn run_scheduler_until_done(engine: &Engine, until: chrono::DateTime<Utc>, limit_secs: u64) -> f64 {
    let (tx, rx) = tokio::sync::watch::channel(false);
    // jitbot's defaults, but for the cap on one wait.
    let settings = jitbot::scheduler::SchedulerSettings {
        max_wait: std::time::Duration::from_secs(1),
        ..Default::default()
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

/// 10,000 leases expiring within one minute from a 10,000-member group,
/// revoked by the scheduler; then the physical limit for the same group.
async fn bench_revocation(server: &Slapd, people_added: usize) {
    let n = env_usize("JITBOT_BENCH_REVOCATIONS", 10_000);
    if n > people_added {
        add_people_from(server, people_added, n).await;
    }
    add_members(server, 0, n).await;
    let tmp = tempfile::tempdir().unwrap();
    uncompressed_if_asked(&tmp.path().join("db"));
    let engine = engine_on(&tmp.path().join("db"), directory(server), Span::from_hours(4));
    let start = Utc::now() + Duration::seconds(3);
    seed_leases(engine.store(), n, |i| {
        start + Duration::milliseconds((i as i64 * 60_000) / n as i64)
    })
    .await;
    jitbot::metrics::take_samples();
    jitbot::metrics::capture_samples();
    run_scheduler_until_done(&engine, start + Duration::seconds(60), 600).await;
    println!(
        "revocation lag ({n} leases expiring within 60 s, each durable before and after, LDAP remove + read-back): {}",
        summary(lags(&engine))
    );
    let samples = print_stages("revocation");
    let batch = mean_batch(&samples);
    assert!(
        server.values(slapd::DB_ADMINS, "member").await.len() <= 1,
        "every leased membership is gone"
    );
    // The physical limit for the same group and members: one value per
    // modify, then batches of the size jitbot formed.
    add_members(server, 0, n).await;
    let (_, single) = raw_removals(server, 0, n, 1).await;
    add_members(server, 0, n).await;
    let (_, batched) = raw_removals(server, 0, n, batch).await;
    println!(
        "revocation physical limit (plain ldap3, no store, no read-back, group of {n} shrinking to 0): one value per modify {} · {batch} values per modify {}",
        summary(single),
        summary(batched)
    );
}

/// With `JITBOT_BENCH_COMPRESSION=off` (`mass` and `revocation`), creates
/// the store at `path` as `[store] compression = "off"` does; `Store::open`
/// keeps opening it as it was created. It shows how much of a figure is
/// sled's zstd compression of every write.
fn uncompressed_if_asked(path: &std::path::Path) {
    if std::env::var("JITBOT_BENCH_COMPRESSION").is_ok_and(|c| c == "off") {
        drop(Store::open_with(path, 8, jitbot::store::Compression::Off).unwrap());
    }
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

/// The median of some figures.
fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// jitbot drains `n` leases of a fresh store, all due now, through its
/// scheduler (default settings). Returns the seconds from the scheduler's
/// start until the last end is durable (no due timer left, polled every
/// millisecond, and the scheduler's work in flight finished) and the
/// revocation samples.
async fn mass_drain(server: &Slapd, n: usize) -> (f64, std::collections::HashMap<&'static str, Vec<f64>>) {
    add_members(server, 0, n).await;
    let tmp = tempfile::tempdir().unwrap();
    uncompressed_if_asked(&tmp.path().join("db"));
    let engine = engine_on(&tmp.path().join("db"), directory(server), Span::from_hours(4));
    let due = Utc::now();
    seed_leases(engine.store(), n, |_| due).await;
    jitbot::metrics::take_samples();
    jitbot::metrics::capture_samples();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let settings = jitbot::scheduler::SchedulerSettings {
        max_wait: std::time::Duration::from_secs(1),
        ..Default::default()
    };
    let started = Utc::now();
    let clock = Instant::now();
    let task = tokio::spawn(jitbot::scheduler::run(engine.clone(), settings, rx));
    let deadline = Instant::now() + std::time::Duration::from_secs(600);
    while !engine.store().due_timers(Utc::now(), 1).unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the mass drain did not finish in 600 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    tx.send(true).unwrap();
    // The scheduler stops once its work in flight is done: every end
    // committed and flushed.
    task.await.unwrap();
    let durable = clock.elapsed().as_secs_f64();
    let last = engine
        .store()
        .audit(0)
        .filter_map(|e| e.ok())
        .filter(|e| e.action == "lease.ended")
        .map(|e| e.at)
        .max()
        .expect("leases ended");
    let ended = engine
        .store()
        .leases()
        .unwrap()
        .iter()
        .filter(|l| l.lease.state == LeaseState::Ended)
        .count();
    assert_eq!(ended, n, "every lease ended");
    assert!(
        server.values(slapd::DB_ADMINS, "member").await.len() <= 1,
        "every leased membership is gone"
    );
    // The audit time of an end is the start of its commit: the last one
    // says when the last end commit began, not when it was durable.
    let last_begun = (last - started).num_microseconds().unwrap() as f64 / 1e6;
    println!(
        "mass drain: last end durable after {durable:.3}s (the last end commit began at {last_begun:.3}s)"
    );
    (durable, jitbot::metrics::take_samples())
}

/// The batched raw limit for `n` removals at `batch` values per modify:
/// the members are put back, then removed by a plain ldap3 loop.
async fn raw_drain(server: &Slapd, n: usize, batch: usize) -> f64 {
    add_members(server, 0, n).await;
    raw_removals(server, 0, n, batch).await.0
}

/// N leases due at once, drained by jitbot, against the physical limit: a
/// plain ldap3 connection doing the same removals on the same slapd with
/// no store and no read-back, in batches of the size jitbot formed and of
/// every other size up to all N in one modify; the fastest is the batched
/// raw limit. Rounds (`JITBOT_BENCH_MASS_ROUNDS`, default 5) interleave
/// jitbot and the raw loops, so a change in the machine's load hits both;
/// the medians are reported.
async fn bench_mass(server: &Slapd) {
    let n = env_usize("JITBOT_BENCH_MASS", 2000);
    let rounds = env_usize("JITBOT_BENCH_MASS_ROUNDS", 5).max(1);
    // 256: the largest combined modify before session 6; `n`: all in one
    // (jitbot's own cap, `REVOCATION_BATCH`, is above the default `n`).
    let sizes = [16, 64, 256, n];
    let mut jitbot_secs = Vec::new();
    let mut mean_secs = Vec::new();
    let mut best_secs = Vec::new();
    let mut best_at = Vec::new();
    let mut ceilings = Vec::new();
    for round in 0..rounds {
        // Alternate who goes first, so neither always meets a cold slapd.
        let mut raw = Vec::new();
        if round % 2 == 1 {
            for &size in &sizes {
                raw.push((size, raw_drain(server, n, size).await));
            }
        }
        let (secs, samples) = mass_drain(server, n).await;
        let batch = mean_batch(&samples);
        raw.push((batch, raw_drain(server, n, batch).await));
        if round % 2 == 0 {
            for &size in &sizes {
                raw.push((size, raw_drain(server, n, size).await));
            }
        }
        let at_mean = raw.iter().find(|(b, _)| *b == batch).map_or(0.0, |r| r.1);
        let (best_batch, best) = raw
            .iter()
            .copied()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap_or((batch, at_mean));
        let (modify, read_back) = raw_drain_read_back(server, n, best_batch).await;
        ceilings.push(modify / (modify + read_back));
        let stages = |name: &str| {
            let (p50, p99, _) = quantiles(samples.get(name).cloned().unwrap_or_default());
            format!("{:.1}/{:.1}", p50 * 1000.0, p99 * 1000.0)
        };
        let sizes_seen = samples.get("batch_values").cloned().unwrap_or_default();
        println!(
            "mass round {}: jitbot {secs:.3}s ({:.0}/s; {} modifies, mean {:.1} values; ms p50/p99: commit before {}, batch wait {}, modify {}, read-back {}, commit after {}) · raw {} · ratio to raw at jitbot's mean batch ({batch}) {:.2}, to the best ({best_batch} per modify) {:.2}",
            round + 1,
            n as f64 / secs,
            sizes_seen.len(),
            sizes_seen.iter().sum::<f64>() / sizes_seen.len().max(1) as f64,
            stages("commit_before"),
            stages("batch_wait"),
            stages("directory_modify"),
            stages("read_back"),
            stages("commit_after"),
            raw.iter()
                .map(|(b, s)| format!("{b}/modify {s:.3}s"))
                .collect::<Vec<_>>()
                .join(", "),
            at_mean / secs,
            best / secs,
        );
        println!(
            "mass round {}: raw with jitbot's read-back, no store, {best_batch}/modify: modifies {:.3}s + read-backs {:.3}s · ceiling of the ratio for any drain that reads back {:.2}",
            round + 1,
            modify,
            read_back,
            modify / (modify + read_back),
        );
        jitbot_secs.push(secs);
        mean_secs.push(at_mean);
        best_secs.push(best);
        best_at.push(best_batch as f64);
    }
    let (plain, _) = {
        add_members(server, 0, n).await;
        raw_removals(server, 0, n, 1).await
    };
    let ratios: Vec<f64> = best_secs.iter().zip(&jitbot_secs).map(|(b, j)| b / j).collect();
    let jitbot = median(jitbot_secs.clone());
    println!(
        "mass expiry: {n} leases due at once, median of {rounds} interleaved rounds: jitbot {jitbot:.3}s ({:.0}/s, each durable before and after, with read-back) · batched raw limit {:.3}s (best batch size, median {:.0} per modify) · raw at jitbot's mean batch {:.3}s · ratio jitbot/batched raw limit {:.2} (median of the rounds' ratios {:.2}; goal ≥ 0.8) · plain ldap3 one value per modify {plain:.2}s, jitbot/one-by-one {:.2}",
        n as f64 / jitbot,
        median(best_secs.clone()),
        median(best_at),
        median(mean_secs),
        median(best_secs) / jitbot,
        median(ratios),
        plain / jitbot
    );
    println!(
        "mass expiry: ceiling of the ratio for a drain that reads back as jitbot does, with no store at all (raw modifies / (raw modifies + raw read-backs), best batch size): median {:.2}",
        median(ceilings)
    );
}

/// Restart with many leases in the store: time to open and schedule,
/// time to revoke the overdue ones, memory per scheduled lease. With
/// `JITBOT_BENCH_BACKEND=postgres` the leases go into a new database
/// through a replica whose mirror is the store directory: the restarted
/// process is that replica again (its mirror on disk, it pulls what
/// changed), and a second probe is a new replica with no mirror yet (a
/// new pod), which loads everything from PostgreSQL.
async fn bench_restart(server: &Slapd) {
    let n = env_usize("JITBOT_BENCH_RESTART_LEASES", 100_000);
    let overdue = env_usize("JITBOT_BENCH_RESTART_OVERDUE", 1000).min(n);
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("db");
    let db = on_postgres().then(postgres::Database::create);
    let open = |path: &std::path::Path| match &db {
        Some(db) => Store::open_postgres(path, 64, &db.settings()).expect("PostgreSQL store"),
        None => Store::open(path, 64).unwrap(),
    };
    {
        let store = open(&path);
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
    // A fresh process opens the store, makes `jitbot run`'s start-up
    // checks and starts scheduling: its time and memory are what a
    // restarted jitbot pays.
    let probe = |path: &std::path::Path| -> Probe {
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.arg("restart-probe").arg(path);
        if let Some(db) = &db {
            cmd.arg(db.settings().url);
        }
        let out = cmd.output().unwrap();
        let probe = String::from_utf8_lossy(&out.stdout).to_string();
        let field = |name: &str| -> f64 {
            probe
                .split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("probe said {probe:?} {}", String::from_utf8_lossy(&out.stderr)))
        };
        Probe {
            open_secs: field("open_secs"),
            open_rss: field("rss_open_kib"),
            start_secs: field("start_secs"),
            rss: field("rss_kib"),
        }
    };
    // The first start after the leases were written marks what start-up
    // need not read again (`meta/legacy_adopted`, `meta/group_dn`); a
    // restart after it is what a jitbot pays from then on.
    let first = probe(&path);
    let again = probe(&path);
    let (open_secs, rss) = (again.start_secs, again.rss);
    for (which, p) in [("first start after seeding", &first), ("restart", &again)] {
        println!(
            "restart: {n} leases, {which}: store opened in {:.3}s (RSS {:.0} MiB), start-up checks done and next timer in {:.3}s; RSS {:.0} MiB = {:.0} bytes per scheduled lease (sled cache 64 MiB)",
            p.open_secs,
            p.open_rss / 1024.0,
            p.start_secs,
            p.rss / 1024.0,
            p.rss * 1024.0 / n as f64,
        );
    }
    if db.is_some() {
        let fresh = probe(&tmp.path().join("fresh"));
        println!(
            "restart (PostgreSQL): a new replica with no mirror loads {n} leases and has its next timer in {:.3}s; RSS {:.0} MiB = {:.0} bytes per scheduled lease (sled cache 64 MiB)",
            fresh.start_secs,
            fresh.rss / 1024.0,
            fresh.rss * 1024.0 / n as f64,
        );
    }
    add_members(server, 0, overdue).await;
    let engine = Engine::new(
        policy(Span::from_hours(24 * 365)),
        open(&path),
        directory(server),
        Arc::new(SystemClock),
        EngineSettings::default(),
    );
    let secs = run_scheduler_until_done(&engine, Utc::now(), 600).await;
    println!(
        "restart: {n} leases in the store: a fresh process opens it, makes the start-up checks and has its next timer in {open_secs:.3}s (the schedule is the store's timer index; nothing is loaded into memory); RSS {:.0} MiB = {:.0} bytes per scheduled lease (sled cache 64 MiB); {overdue} overdue leases revoked in {secs:.2}s ({:.0}/s)",
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

/// What one restart probe measured.
struct Probe {
    open_secs: f64,
    /// KiB after opening the store, before the start-up checks.
    open_rss: f64,
    /// From the start until the checks are done and the next timer found.
    start_secs: f64,
    /// KiB at that point.
    rss: f64,
}

/// The child side of the restart benchmark: open, make `jitbot run`'s
/// start-up checks (`app::start_up_checks`), find the next timer, report.
/// With a PostgreSQL URL, `path` is a replica's mirror.
fn restart_probe(path: &str, pg_url: Option<&str>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let started = Instant::now();
        let path = std::path::Path::new(path);
        let store = match pg_url {
            Some(url) => {
                let settings = jitbot::store::PgSettings {
                    url: url.to_string(),
                    password: Some(jitbot::secret::Secret::new(postgres::PASSWORD)),
                    migrate: false,
                    ca_file: None,
                    mirror_compression: Default::default(),
                };
                Store::open_postgres(path, 64, &settings).unwrap()
            }
            None => Store::open(path, 64).unwrap(),
        };
        let open_secs = started.elapsed().as_secs_f64();
        let rss_open = rss_kib();
        // The seeded leases record their memberships, so the checks ask no
        // directory: an in-memory one stands in for slapd.
        let engine = Engine::new(
            policy(Span::from_hours(24 * 365)),
            store.clone(),
            Arc::new(jitbot::directory::memory::MemoryDirectory::new()),
            Arc::new(SystemClock),
            EngineSettings::default(),
        );
        jitbot::app::start_up_checks(&engine).await.unwrap();
        let next = store.next_due().unwrap();
        let batch = store.due_timers(Utc::now(), 32).unwrap();
        let secs = started.elapsed().as_secs_f64();
        assert!(next.is_some() && !batch.is_empty());
        println!(
            "open_secs={open_secs} rss_open_kib={rss_open} start_secs={secs} rss_kib={}",
            rss_kib()
        );
    });
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("restart-probe") {
        return restart_probe(&argv[2], argv.get(3).map(String::as_str));
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
        "jitbot benchmarks on {} cores, slapd on loopback, store on {}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        if on_postgres() {
            "PostgreSQL 15 (loopback)"
        } else {
            "sled"
        }
    );
    if want("store") {
        bench_store().await;
    }
    let needs_ldap = ["ack", "grant", "revocation", "mass", "day", "restart"]
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
    if want("day") {
        bench_day().await;
    }
    if want("restart") {
        let server = Slapd::start();
        let overdue = env_usize("JITBOT_BENCH_RESTART_OVERDUE", 1000);
        add_people(&server, overdue).await;
        bench_restart(&server).await;
    }
}

/// The day scenario's groups: (name, DN); both hold `member` DNs.
const DAY_GROUPS: [(&str, &str); 2] = [("db-admins", slapd::DB_ADMINS), ("web-admins", slapd::WEB_ADMINS)];

/// Everybody may ask for either day group; carol approves.
fn day_policy(people: usize) -> Policy {
    let groups = DAY_GROUPS
        .iter()
        .map(|(name, dn)| {
            let mut g = GroupPolicy::new(name, dn);
            for i in 0..people {
                g.requesters.users.insert(UserId::new(format!("u{i:06}")));
            }
            g.approvers.users.insert(UserId::new("carol"));
            g.max_duration = Span::from_hours(4);
            g.max_total_duration = Span::from_hours(8);
            g.reason_required = false;
            g.approval_timeout = Span::from_hours(24);
            g
        })
        .collect();
    Policy {
        groups,
        admins: Default::default(),
    }
}

/// Adds people `u000000`.. with a `mail` (Slack finds them by it).
async fn add_people_with_mail(server: &Slapd, n: usize) {
    let mut ldap = server.admin().await;
    for i in 0..n {
        let uid = format!("u{i:06}");
        let mail = format!("{uid}@example.org");
        let dn = format!("uid={uid},{}", slapd::PEOPLE);
        let attrs = vec![
            ("objectClass", HashSet::from(["inetOrgPerson"])),
            ("uid", HashSet::from([uid.as_str()])),
            ("cn", HashSet::from([uid.as_str()])),
            ("sn", HashSet::from(["bench"])),
            ("mail", HashSet::from([mail.as_str()])),
        ];
        ldap.add(&dn, attrs).await.unwrap().success().unwrap();
    }
}

/// Sends signed Slack slash commands to the in-process app and keeps the
/// acknowledgement latency of each kind of command.
#[derive(Clone)]
struct SlackClient {
    http: reqwest::Client,
    url: String,
    slack: fake_slack::FakeSlack,
    next: Arc<std::sync::atomic::AtomicU32>,
    acks: Arc<std::sync::Mutex<std::collections::BTreeMap<&'static str, Vec<f64>>>>,
    /// (response_url number, what was sent), for the end-of-day check that
    /// every command was answered.
    sent: Arc<std::sync::Mutex<Vec<(u32, String)>>>,
}

impl SlackClient {
    async fn command(&self, kind: &'static str, user: &str, text: &str) {
        use jitbot::chat::slack::signature::sign;
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let body = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("team_id", "T1")
            .append_pair("channel_id", "CJIT")
            .append_pair("user_id", user)
            .append_pair("command", "/jit")
            .append_pair("text", text)
            .append_pair("response_url", &self.slack.response_url(n))
            .append_pair("trigger_id", &format!("day.{n}"))
            .finish();
        let ts = Utc::now().timestamp();
        let sig = sign("bench-secret", ts, body.as_bytes());
        let started = Instant::now();
        let status = self
            .http
            .post(&self.url)
            .header("content-type", "application/x-www-form-urlencoded")
            .header("x-slack-request-timestamp", ts.to_string())
            .header("x-slack-signature", sig)
            .body(body)
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0);
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        assert_eq!(status, 200, "day: `/jit {text}` from {user} was not acknowledged");
        self.acks.lock().unwrap().entry(kind).or_default().push(ms);
        self.sent
            .lock()
            .unwrap()
            .push((n, format!("{user}: /jit {text}")));
    }
}

/// Seconds from `from` to `to` as milliseconds.
fn ms_between(from: chrono::DateTime<Utc>, to: chrono::DateTime<Utc>) -> f64 {
    (to - from).num_microseconds().unwrap_or(0) as f64 / 1000.0
}

/// A 10,000-person company's working day compressed into minutes: signed
/// Slack slash commands against the in-process app (fake Slack Web API),
/// approvals after random delays, 10 % denials, extensions, early releases,
/// expiries, and slapd stopped and restarted in the middle. At the end
/// every request must have been answered, every lease ended, and slapd
/// (read on its own connection) must hold exactly the members it started
/// with: no lost and no orphaned lease. Fails loudly otherwise.
async fn bench_day() {
    use jitbot::chat::slack::{routes, SlackAdapter};
    use jitbot::config::{SlackConfig, SlackMode};
    use jitbot::secret::{Secret, SecretSource};
    use rand::{Rng, SeedableRng};
    let people = env_usize("JITBOT_BENCH_DAY_PEOPLE", 10_000);
    let requests = env_usize("JITBOT_BENCH_DAY_REQUESTS", 5_000).min(people);
    let day = env_usize("JITBOT_BENCH_DAY_SECS", 360) as f64;
    let outage = env_usize("JITBOT_BENCH_DAY_OUTAGE_SECS", 5) as u64;
    // Leases last 5–20 % of the day: most end by expiry before it is over.
    let (shortest, longest) = ((day * 0.05).max(5.0), (day * 0.2).max(10.0));
    let mut server = Slapd::start();
    let seeding = Instant::now();
    add_people_with_mail(&server, people).await;
    let mut before = Vec::new();
    for (_, dn) in DAY_GROUPS {
        before.push(server.values(dn, "member").await);
    }
    let slack = fake_slack::FakeSlack::start().await;
    slack.add_user("UCAROL", "carol@example.org");
    for i in 0..people {
        slack.add_user(&format!("U{i:06}"), &format!("u{i:06}@example.org"));
    }
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
    let store = Store::open(&tmp.path().join("db"), 64).unwrap();
    let settings = EngineSettings {
        retry_base: Span::from_secs(1),
        retry_max: Span::from_secs(10),
        ..Default::default()
    };
    let engine = Engine::new(
        day_policy(people),
        store,
        directory(&server),
        Arc::new(SystemClock),
        settings,
    );
    let app = routes(
        engine.clone(),
        adapter,
        Secret::new("bench-secret"),
        Arc::new(SystemClock),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/slack/commands", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let scheduler = tokio::spawn(jitbot::scheduler::run(
        engine.clone(),
        jitbot::scheduler::SchedulerSettings {
            max_wait: std::time::Duration::from_secs(1),
            ..Default::default()
        },
        stopped.clone(),
    ));
    let outbox = tokio::spawn(jitbot::chat::outbox::run(
        engine.clone(),
        Arc::new(LogNotifier),
        stopped,
    ));
    let client = SlackClient {
        http: reqwest::Client::new(),
        url,
        slack: slack.clone(),
        next: Arc::new(std::sync::atomic::AtomicU32::new(1)),
        acks: Default::default(),
        sent: Default::default(),
    };
    println!(
        "day: {people} people, {requests} requests over {day:.0}s, leases of {shortest:.0}–{longest:.0}s, slapd down for {outage}s mid-day (seeded in {:.1}s)",
        seeding.elapsed().as_secs_f64()
    );
    jitbot::metrics::take_samples();
    jitbot::metrics::capture_samples();
    let began = Instant::now();
    let seed = env_usize("JITBOT_BENCH_SEED", 17) as u64;

    // People ask over the first 70 % of the day, at random moments.
    let requester = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut at: Vec<f64> = (0..requests).map(|_| rng.gen_range(0.0..day * 0.7)).collect();
            at.sort_by(|a, b| a.total_cmp(b));
            let mut tasks = tokio::task::JoinSet::new();
            for (i, at) in at.into_iter().enumerate() {
                let wait = at - began.elapsed().as_secs_f64();
                if wait > 0.0 {
                    tokio::time::sleep(std::time::Duration::from_secs_f64(wait)).await;
                }
                let group = DAY_GROUPS[rng.gen_range(0..DAY_GROUPS.len())].0;
                let secs = rng.gen_range(shortest..longest).round() as u64;
                let client = client.clone();
                tasks.spawn(async move {
                    client
                        .command(
                            "request",
                            &format!("U{i:06}"),
                            &format!("request {group} {secs}s day"),
                        )
                        .await
                });
            }
            while let Some(done) = tasks.join_next().await {
                done.unwrap();
            }
        })
    };
    // Carol decides each pending request after a random delay; 10 % denied.
    // A decision that did not land (the directory was down when her command
    // came) is sent again a few seconds later, as a person would.
    let approver = {
        let (client, engine) = (client.clone(), engine.clone());
        tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed + 1);
            // Request → (denied, when to try again if it is still pending).
            let mut decided: std::collections::HashMap<String, (bool, f64)> = Default::default();
            let mut tasks = tokio::task::JoinSet::new();
            loop {
                let now = began.elapsed().as_secs_f64();
                let pending = engine.store().pending_requests().unwrap();
                if (now > day && pending.is_empty()) || now > day * 2.0 + 120.0 {
                    break;
                }
                for rec in pending {
                    let id = rec.request.id.to_string();
                    let delay = match decided.get(&id) {
                        Some((_, retry)) if *retry > now => continue,
                        Some(_) => 0.0,
                        None => rng.gen_range(0.2..(day * 0.02).max(1.0)),
                    };
                    let deny = match decided.get(&id) {
                        Some((deny, _)) => *deny,
                        None => rng.gen_bool(0.1),
                    };
                    decided.insert(id.clone(), (deny, now + delay + 3.0));
                    let client = client.clone();
                    tasks.spawn(async move {
                        tokio::time::sleep(std::time::Duration::from_secs_f64(delay)).await;
                        if deny {
                            client
                                .command("deny", "UCAROL", &format!("deny {id} not today"))
                                .await
                        } else {
                            client
                                .command("approve", "UCAROL", &format!("approve {id}"))
                                .await
                        }
                    });
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            while let Some(done) = tasks.join_next().await {
                done.unwrap();
            }
            let denied = decided.values().filter(|(deny, _)| *deny).count();
            (decided.len(), denied)
        })
    };
    // Holders: 10 % extend their lease, 20 % release it early.
    let holders = {
        let (client, engine) = (client.clone(), engine.clone());
        tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed + 2);
            let mut seen = HashSet::new();
            let mut tasks = tokio::task::JoinSet::new();
            while began.elapsed().as_secs_f64() < day {
                for rec in engine.store().live_leases().unwrap() {
                    if rec.lease.state != LeaseState::Active || !seen.insert(rec.lease.id.to_string()) {
                        continue;
                    }
                    let left = (rec.lease.expires_at - Utc::now()).num_milliseconds() as f64 / 1000.0;
                    let roll: f64 = rng.gen();
                    if roll >= 0.3 || left < 2.0 {
                        continue;
                    }
                    let user = rec.lease.user.as_str().replace('u', "U");
                    let (kind, text) = if roll < 0.1 {
                        (
                            "extend",
                            format!("extend {} {}s", rec.lease.id, shortest.round() as u64),
                        )
                    } else {
                        ("release", format!("release {}", rec.lease.id))
                    };
                    let delay = rng.gen_range(0.1..0.8) * left;
                    let client = client.clone();
                    tasks.spawn(async move {
                        tokio::time::sleep(std::time::Duration::from_secs_f64(delay)).await;
                        client.command(kind, &user, &text).await
                    });
                }
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            }
            while let Some(done) = tasks.join_next().await {
                done.unwrap();
            }
        })
    };
    // Mid-day, the directory goes away and comes back.
    tokio::time::sleep(std::time::Duration::from_secs_f64(day / 2.0)).await;
    let down_at = Utc::now();
    tokio::task::block_in_place(|| server.stop());
    tokio::time::sleep(std::time::Duration::from_secs(outage)).await;
    tokio::task::block_in_place(|| server.restart());
    let up_at = Utc::now();
    println!("day: slapd stopped at {:.0}s for {outage}s, restarted", day / 2.0);
    requester.await.unwrap();
    let (decided, denied) = approver.await.unwrap();
    holders.await.unwrap();
    // The last leases run out after the day; wait for jitbot to settle.
    let settle = Instant::now();
    loop {
        let live = engine.store().live_leases().unwrap().len();
        let pending = engine.store().pending_requests().unwrap().len();
        let outbox_done = engine.store().outbox(1).map(|o| o.is_empty()).unwrap_or(false);
        if live == 0 && pending == 0 && outbox_done {
            break;
        }
        assert!(
            settle.elapsed().as_secs_f64() < longest * 2.0 + 120.0,
            "day: jitbot did not settle: {live} live leases, {pending} pending requests"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let wall = began.elapsed().as_secs_f64();
    let _ = stop.send(true);
    scheduler.await.unwrap();
    outbox.await.unwrap();
    let samples = print_stages("day");

    // No orphaned membership: slapd, on its own connection, holds exactly
    // the members it started with.
    for ((name, dn), start) in DAY_GROUPS.iter().zip(&before) {
        let now = server.values(dn, "member").await;
        assert_eq!(
            &now, start,
            "day: ORPHANED memberships in {name}: slapd's members differ from the start"
        );
    }
    // No lost command: every one was answered through its response_url.
    let answered: HashSet<String> = slack
        .calls()
        .into_iter()
        .filter(|c| c.method.starts_with("response/"))
        .map(|c| c.method)
        .collect();
    let sent = client.sent.lock().unwrap().clone();
    let unanswered: Vec<&String> = sent
        .iter()
        .filter(|(n, _)| !answered.contains(&format!("response/{n}")))
        .map(|(_, what)| what)
        .collect();
    assert!(
        unanswered.is_empty(),
        "day: LOST commands, never answered: {unanswered:?}"
    );
    // No lost lease: every approved request has a lease, and every lease ended.
    let leases = engine.store().leases().unwrap();
    let not_ended: Vec<String> = leases
        .iter()
        .filter(|l| l.lease.state != LeaseState::Ended)
        .map(|l| format!("{} ({:?})", l.lease.id, l.lease.state))
        .collect();
    assert!(
        not_ended.is_empty(),
        "day: leases that never ended: {not_ended:?}"
    );
    let reqs = engine.store().requests().unwrap();
    let approved_without_lease = reqs
        .iter()
        .filter(|r| r.request.state == jitbot_core::RequestState::Approved && r.lease.is_none())
        .count();
    assert_eq!(
        approved_without_lease, 0,
        "day: LOST leases: approved requests without a lease"
    );

    // Stages from the audit trail (commit times).
    let audit: Vec<_> = engine.store().audit(0).filter_map(|e| e.ok()).collect();
    let first = |action: &str| -> std::collections::HashMap<String, chrono::DateTime<Utc>> {
        let mut m = std::collections::HashMap::new();
        for e in audit.iter().filter(|e| e.action == action) {
            if let Some(l) = &e.lease {
                m.entry(l.clone()).or_insert(e.at);
            }
        }
        m
    };
    let (granting, granted, ended) = (
        first("lease.granting"),
        first("lease.granted"),
        first("lease.ended"),
    );
    let grant: Vec<f64> = granting
        .iter()
        .filter_map(|(l, at)| Some(ms_between(*at, *granted.get(l)?)))
        .collect();
    let released: Vec<f64> = audit
        .iter()
        .filter(|e| e.action == "lease.revoking" && e.actor != "jitbot")
        .filter_map(|e| Some(ms_between(e.at, *ended.get(e.lease.as_ref()?)?)))
        .collect();
    let mut reasons = std::collections::BTreeMap::new();
    for l in &leases {
        let why = l
            .lease
            .end_reason
            .as_ref()
            .map(|r| r.describe())
            .unwrap_or_default();
        let why = why.split([':', '(']).next().unwrap_or("").trim().to_string();
        *reasons.entry(why).or_insert(0usize) += 1;
    }
    println!(
        "day: {} commands in {wall:.0}s; {} requests stored, {decided} decided by carol ({denied} denied); {} leases: {:?}",
        sent.len(),
        reqs.len(),
        leases.len(),
        reasons
    );
    for (kind, ms) in client.acks.lock().unwrap().iter() {
        println!("  ack of /jit {kind:<8} {}", summary(ms.clone()));
    }
    println!(
        "  approval → lease granted (LDAP add + read-back, durable) {}",
        summary(grant)
    );
    println!(
        "  release → lease ended (LDAP remove + read-back, durable) {}",
        summary(released)
    );
    let lag: Vec<f64> = samples
        .get("lag")
        .map(|v| v.iter().map(|s| s * 1000.0).collect())
        .unwrap_or_default();
    println!("  expiry → lease ended (durable) {}", summary(lag));
    // The same lag from the audit trail (`lease.ended` committed), split: leases due while slapd
    // was down (or within one retry cap after it came back) cannot end
    // before it is back, so they are the outage's figure, not jitbot's.
    let storm_end = up_at + Duration::seconds(10);
    let (mut calm, mut storm) = (Vec::new(), Vec::new());
    for l in &leases {
        let (Some(jitbot_core::EndReason::Expired), Some(at)) =
            (&l.lease.end_reason, ended.get(&l.lease.id.to_string()))
        else {
            continue;
        };
        let ms = ms_between(l.lease.expires_at, *at);
        if l.lease.expires_at >= down_at && l.lease.expires_at <= storm_end {
            storm.push(ms);
        } else {
            calm.push(ms);
        }
    }
    println!(
        "  expiry → ended (audit times), due outside the outage {}",
        summary(calm)
    );
    println!(
        "  expiry → ended (audit times), due during the outage or 10 s after {}",
        summary(storm)
    );
    println!(
        "day: zero lost or orphaned leases: every command answered, every lease ended, slapd's groups as they started (checked on a separate connection)"
    );
}
