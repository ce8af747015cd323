//! Store growth and retention: what complete lifecycles cost on disk, how
//! long the store takes to open afterwards, and what `[store] retain` wins
//! back, with the revocation latency while a retention pass runs.
//!
//! ```sh
//! cargo bench --bench store_growth
//! JITBOT_BENCH_LIFECYCLES=1000000 cargo bench --bench store_growth
//! JITBOT_BENCH_PRUNE_BATCH=500 cargo bench --bench store_growth  # records per prune commit
//! ```
//!
//! Each lifecycle goes through the engine (in-memory directory, manual
//! clock, a real sled store): request, approval, grant, expiry and
//! revocation, with their audit records and notices; notices are then
//! taken out of the outbox as delivered. Figures go to stdout; BENCHMARKS.md
//! records a run.

use chrono::{Duration, TimeZone, Utc};
use jitbot::clock::ManualClock;
use jitbot::directory::memory::MemoryDirectory;
use jitbot::engine::{Caller, Engine, EngineSettings};
use jitbot::store::retention::RetentionSettings;
use jitbot::store::{Store, StoreError, TimerKind};
use jitbot_core::policy::{GroupPolicy, Policy};
use jitbot_core::{Command, Span, UserId};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

const DN: &str = "cn=db-admins,ou=groups,dc=example,dc=org";
/// Lifecycles run concurrently, each by its own requester.
const WAVE: usize = 200;
/// Time between expiries fired while latency is measured.
const PACE: std::time::Duration = std::time::Duration::from_millis(2);

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
        / 1024.0
}

/// Bytes of the files under `dir`: (apparent length, blocks allocated).
fn disk(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut out = (0, 0);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let Ok(m) = e.metadata() else { continue };
        if m.is_dir() {
            let (a, b) = disk(&e.path());
            out = (out.0 + a, out.1 + b);
        } else {
            out = (out.0 + m.len(), out.1 + m.blocks() * 512);
        }
    }
    out
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
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

fn policy() -> Policy {
    let mut g = GroupPolicy::new("db-admins", DN);
    for i in 0..WAVE {
        g.requesters.users.insert(UserId::new(format!("u{i:04}")));
    }
    g.approvers.users.insert(UserId::new("carol"));
    g.max_duration = Span::from_hours(4);
    g.max_total_duration = Span::from_hours(4);
    g.reason_required = false;
    Policy {
        groups: vec![g],
        admins: Default::default(),
    }
}

fn directory() -> Arc<MemoryDirectory> {
    let dir = MemoryDirectory::new();
    for i in 0..WAVE {
        let id = format!("u{i:04}");
        let mail = format!("{id}@example.org");
        dir.add_user(&id, [("mail", mail.as_str())]);
    }
    dir.add_user("carol", [("mail", "carol@example.org")]);
    dir.add_group(DN, []);
    Arc::new(dir)
}

fn open(path: &Path) -> Store {
    // A flush still finishing on the blocking pool holds the database for a
    // moment after the last handle is gone.
    for _ in 0..500 {
        match Store::open(path, 64) {
            Err(StoreError::Locked { .. }) => std::thread::sleep(std::time::Duration::from_millis(10)),
            other => return other.expect("open store"),
        }
    }
    panic!("the store stays locked");
}

/// Requests and approvals of one wave, concurrently: WAVE active leases.
async fn grant_wave(engine: &Engine) {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..WAVE {
        let engine = engine.clone();
        tasks.spawn(async move {
            let user = format!("u{i:04}");
            let cmd = Command::parse("request db-admins 1h growth bench").expect("command");
            let reply = engine.execute(&Caller::new(&user, None), cmd).await;
            assert!(reply.ok, "{}", reply.text);
            let id = reply
                .text
                .split_whitespace()
                .find(|w| w.starts_with("r-"))
                .expect("request id")
                .trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
                .to_string();
            let cmd = Command::parse(&format!("approve {id}")).expect("command");
            let reply = engine.execute(&Caller::new("carol", None), cmd).await;
            assert!(reply.ok, "{}", reply.text);
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("lifecycle task");
    }
}

/// Fires every due timer (expiry, revocation, warnings) until none is left;
/// returns how long each expiry took, in ms.
async fn fire_due(engine: &Engine, pace: Option<std::time::Duration>) -> Vec<f64> {
    let mut took = Vec::new();
    loop {
        let due = engine.store().due_timers(engine.now(), 10_000).expect("timers");
        if due.is_empty() {
            return took;
        }
        let mut tasks = tokio::task::JoinSet::new();
        for t in due {
            let engine = engine.clone();
            let expiry = t.kind == TimerKind::Expire;
            tasks.spawn(async move {
                let started = Instant::now();
                engine.fire(t).await;
                expiry.then(|| started.elapsed().as_secs_f64() * 1000.0)
            });
            if let Some(pace) = pace {
                tokio::time::sleep(pace).await;
            }
        }
        while let Some(r) = tasks.join_next().await {
            took.extend(r.expect("timer task"));
        }
    }
}

/// The outbox's notices and card posts, taken out as delivered.
fn deliver_outbox(engine: &Engine) {
    engine
        .store()
        .outbox_fan_out(engine.now(), usize::MAX, |_| Vec::new())
        .expect("outbox");
}

/// The child side of the start-up figure: a fresh process opens the store
/// and reads what `jitbot run` reads first (live leases, the next timer).
fn open_probe(path: &str) {
    let started = Instant::now();
    let store = Store::open(Path::new(path), 64).expect("open store");
    let live = store.live_leases().expect("live").len();
    let next = store.next_due().expect("next timer");
    println!(
        "open_ms={:.0} live={live} next_timer={} rss_mib={:.0}",
        started.elapsed().as_secs_f64() * 1000.0,
        next.is_some(),
        rss_mib()
    );
}

/// Runs [`open_probe`] in a child process, after the store is closed here.
fn probe(path: &Path) -> String {
    let out = std::process::Command::new(std::env::current_exe().expect("bench binary"))
        .arg("open-probe")
        .arg(path)
        .output()
        .expect("run the open probe");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("open-probe") {
        return open_probe(&argv[2]);
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(run());
}

async fn run() {
    let n = env_usize("JITBOT_BENCH_LIFECYCLES", 100_000).div_ceil(WAVE) * WAVE;
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("db");
    let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap());
    let dir = directory();
    let new_engine = |store: Store| {
        Engine::new(
            policy(),
            store,
            dir.clone(),
            Arc::new(clock.clone()),
            EngineSettings::default(),
        )
    };
    println!(
        "store growth on {} cores: {n} lifecycles (request, approval, grant, expiry, revocation; audit and notices), {WAVE} at a time",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );

    // 1. Growth.
    let engine = new_engine(open(&path));
    let started = Instant::now();
    let mut baseline = Vec::new();
    for wave in 0..n / WAVE {
        grant_wave(&engine).await;
        clock.advance(Duration::hours(2));
        // The last wave's expiries are paced as they are below while a
        // retention pass runs: the figure to compare with.
        let pace = (wave + 1 == n / WAVE).then_some(PACE);
        baseline = fire_due(&engine, pace).await;
        deliver_outbox(&engine);
    }
    let secs = started.elapsed().as_secs_f64();
    engine.store().flush().await.expect("flush");
    let audit = engine.store().audit_head().expect("head").seq;
    let (len, blocks) = disk(&path);
    println!(
        "write: {n} lifecycles in {secs:.1}s = {:.0}/s; {audit} audit records ({:.1} per lifecycle)",
        n as f64 / secs,
        audit as f64 / n as f64
    );
    println!(
        "disk before pruning: {:.1} MiB apparent, {:.1} MiB allocated = {:.0} / {:.0} bytes per lifecycle; RSS {:.0} MiB",
        mib(len),
        mib(blocks),
        len as f64 / n as f64,
        blocks as f64 / n as f64,
        rss_mib()
    );
    drop(engine);

    // 2. Opening the store afterwards, and sled's own compaction.
    let started = Instant::now();
    let store = open(&path);
    let opened = started.elapsed();
    let started = Instant::now();
    let live = store.live_leases().expect("live").len();
    let timers = store.timers_from(usize::MAX).expect("timers").len();
    println!(
        "Store::open afterwards: {:.0} ms; live-lease and timer scan (what start-up reads) {:.0} ms ({live} live, {timers} timers); RSS {:.0} MiB",
        opened.as_secs_f64() * 1000.0,
        started.elapsed().as_secs_f64() * 1000.0,
        rss_mib()
    );
    drop(store);
    std::thread::sleep(std::time::Duration::from_millis(200));
    println!(
        "a fresh process opening it (what `jitbot run` does first): {}",
        probe(&path)
    );
    let compacted = tmp.path().join("compacted");
    {
        // sled 0.34 has no compaction call: its export/import rewrites every
        // tree into a fresh database, the most compact layout it produces.
        let db = loop {
            match sled::Config::new()
                .path(&path)
                .cache_capacity(64 << 20)
                .use_compression(true)
                .open()
            {
                Ok(db) => break db,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        };
        let fresh = sled::Config::new()
            .path(&compacted)
            .cache_capacity(64 << 20)
            .use_compression(true)
            .open()
            .expect("fresh db");
        let mut logical = Vec::new();
        for name in db.tree_names() {
            let tree = db.open_tree(&name).expect("tree");
            let bytes: usize = tree
                .iter()
                .map(|kv| kv.map(|(k, v)| k.len() + v.len()).unwrap_or(0))
                .sum();
            if bytes > 0 {
                logical.push(format!(
                    "{} {:.0}",
                    String::from_utf8_lossy(&name),
                    bytes as f64 / n as f64
                ));
            }
        }
        println!(
            "logical bytes (keys + values) per lifecycle, by tree: {}",
            logical.join(", ")
        );
        fresh.import(db.export());
        fresh.flush().expect("flush");
    }
    let (len, blocks) = disk(&compacted);
    println!(
        "after sled export/import (compacted copy): {:.1} MiB apparent, {:.1} MiB allocated = {:.0} / {:.0} bytes per lifecycle",
        mib(len),
        mib(blocks),
        len as f64 / n as f64,
        blocks as f64 / n as f64
    );

    // 3. Retention: every lifecycle above is older than `retain`; a fresh
    // wave of leases expires while the pass runs.
    let engine = new_engine(open(&path));
    grant_wave(&engine).await;
    clock.advance(Duration::days(40));
    let settings = RetentionSettings {
        batch: env_usize("JITBOT_BENCH_PRUNE_BATCH", 100),
        ..RetentionSettings::new(Span::parse_long("30d").expect("span"), tmp.path().join("archive"))
    };
    let batch = settings.batch;
    let store = engine.store().clone();
    let now = engine.now();
    let pass = tokio::spawn(async move {
        let started = Instant::now();
        let pruned = store.prune(now, &settings).await.expect("prune");
        (pruned, started.elapsed())
    });
    // Leases keep coming and expiring while the pass runs: each round
    // grants a wave and fires its expiries, paced, until the pass is done.
    let mut during = Vec::new();
    let mut rounds = 0;
    while !pass.is_finished() {
        if rounds > 0 {
            grant_wave(&engine).await;
        }
        clock.advance(Duration::hours(2));
        during.extend(fire_due(&engine, Some(PACE)).await);
        deliver_outbox(&engine);
        rounds += 1;
    }
    let (pruned, took) = pass.await.expect("pass");
    let removed = pruned.leases + pruned.requests + pruned.audit;
    println!(
        "prune (batches of {batch}): {} leases, {} requests, {} audit records archived in {:.1}s = {:.0} records/s",
        pruned.leases,
        pruned.requests,
        pruned.audit,
        took.as_secs_f64(),
        removed as f64 / took.as_secs_f64()
    );
    println!(
        "expiry latency (timer fired → lease ended, durable), one every {PACE:?}: without pruning {}; while pruning ({rounds} waves of {WAVE} granted and expired during the pass) {}",
        summary(baseline),
        summary(during)
    );
    deliver_outbox(&engine);
    engine.store().flush().await.expect("flush");
    let (len, _) = disk(&path);
    let (archive, _) = disk(&tmp.path().join("archive"));
    println!(
        "disk after pruning: store {:.1} MiB apparent (sled frees segments lazily), archive {:.1} MiB ({:.0} bytes per lifecycle)",
        mib(len),
        mib(archive),
        archive as f64 / n as f64
    );
    // Steady load with retention on: later writes reuse the space the
    // pruned records held.
    let more = (n / 10).div_ceil(WAVE) * WAVE;
    for _ in 0..more / WAVE {
        grant_wave(&engine).await;
        clock.advance(Duration::hours(2));
        fire_due(&engine, None).await;
        deliver_outbox(&engine);
    }
    engine.store().flush().await.expect("flush");
    let (after_more, _) = disk(&path);
    println!(
        "then {more} more lifecycles: store {:.1} MiB apparent ({:+.1} MiB, {:.0} bytes per new lifecycle)",
        mib(after_more),
        mib(after_more) - mib(len),
        (after_more as f64 - len as f64) / more as f64
    );
    drop(engine);
    std::thread::sleep(std::time::Duration::from_millis(200));
    let fresh = probe(&path);
    let (len, blocks) = disk(&path);
    println!(
        "after reopening: store {:.1} MiB apparent, {:.1} MiB allocated; a fresh process opening it: {fresh}",
        mib(len),
        mib(blocks),
    );
}
