//! Failover time distribution through the real binaries: a real slapd and
//! PostgreSQL 15, two `jitbot run` replicas on one database, a lease ending
//! every second, and the leader SIGKILLed at random (seeded) points, the
//! killed replica started again each time (`tests/support/failover.rs`).
//! Run with
//!
//! ```sh
//! cargo bench --bench failover                          # 10 kills
//! JITBOT_BENCH_KILLS=30 JITBOT_FAILOVER_SEED=7 cargo bench --bench failover
//! ```
//!
//! Prints every sample and p50/p90/max of the time from each kill until
//! the survivor has revoked what was due; exits non-zero when an invariant
//! broke (a lease lost or ended twice, a membership left, the audit chain
//! broken) or a failover never came.

#[path = "../tests/support/failover.rs"]
mod failover;
#[path = "../tests/support/postgres.rs"]
#[allow(dead_code)]
mod postgres;
#[path = "../tests/support/process.rs"]
#[allow(dead_code)]
mod process;
#[path = "../tests/support/slapd.rs"]
#[allow(dead_code)]
mod slapd;

use std::time::Duration;

/// The goal after a kill, with jitbot's default leadership settings.
const GOAL: Duration = Duration::from_secs(10);

/// Nearest-rank quantile `q` of `samples`, in seconds.
fn quantile(samples: &[Duration], q: f64) -> f64 {
    let mut s: Vec<f64> = samples.iter().map(Duration::as_secs_f64).collect();
    if s.is_empty() {
        return 0.0;
    }
    s.sort_by(|a, b| a.total_cmp(b));
    s[((s.len() as f64 - 1.0) * q).round() as usize]
}

fn line(what: &str, samples: &[Duration]) -> String {
    let each: Vec<String> = samples
        .iter()
        .map(|d| format!("{:.2}", d.as_secs_f64()))
        .collect();
    format!(
        "{what}: n={} p50={:.2}s p90={:.2}s max={:.2}s · every sample (s): {}",
        samples.len(),
        quantile(samples, 0.5),
        quantile(samples, 0.9),
        quantile(samples, 1.0),
        each.join(" ")
    )
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn main() {
    let kills = std::env::var("JITBOT_BENCH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let plan = failover::Plan::new(kills);
    println!(
        "failover: {kills} kills of the leader (seed {}), 2 replicas on PostgreSQL 15, slapd, a lease ending every second; load average {}",
        plan.seed,
        load_average()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let report = match runtime.block_on(failover::run(&plan)) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("failover: the run could not go on: {e}");
            std::process::exit(1);
        }
    };
    let revoked: Vec<Duration> = report.samples.iter().map(|s| s.revoked).collect();
    let leads: Vec<Duration> = report.samples.iter().map(|s| s.leads).collect();
    println!("{}", line("kill → survivor has revoked what was due", &revoked));
    println!("{}", line("kill → survivor's /readyz says leader", &leads));
    let over = revoked.iter().filter(|d| **d > GOAL).count();
    println!(
        "failover: {} leases created, every one ended once, none left in slapd: {}; {over} of {} failovers over the {}s goal; load average at the end {}",
        report.leases,
        if report.broken.is_empty() { "yes" } else { "NO" },
        revoked.len(),
        GOAL.as_secs(),
        load_average()
    );
    if !report.broken.is_empty() {
        eprintln!("failover: invariants broken:\n{}", report.broken.join("\n"));
        std::process::exit(1);
    }
}
