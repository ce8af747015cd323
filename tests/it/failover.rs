//! Failover through the real binaries (`support::failover`): two `jitbot
//! run` replicas on one PostgreSQL against slapd, a lease ending every
//! second, the leader SIGKILLed at three random (seeded) points and
//! started again each time.

use crate::support::failover::{self, Plan};
use std::time::Duration;

/// Each failover revokes what was due within 20 s of the kill (the design
/// bound is about 10 s: a 6 s term, a try every 2 s, the old leader's 2 s
/// call bound; a loaded machine adds to it), and afterwards every lease
/// has ended exactly once and no leased membership is left in slapd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_three_times_loses_no_lease_and_revokes_each_once() {
    let plan = Plan::new(3);
    println!("failover seed {} (JITBOT_FAILOVER_SEED)", plan.seed);
    let report = failover::run(&plan).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(
        report.broken.is_empty(),
        "invariants broken:\n{}",
        report.broken.join("\n")
    );
    assert_eq!(report.samples.len(), 3);
    assert!(report.leases >= 10, "leases kept flowing: {}", report.leases);
    for (i, s) in report.samples.iter().enumerate() {
        assert!(
            s.revoked <= Duration::from_secs(20),
            "failover {}: what was due was revoked {:?} after the kill (bound 20 s): {:?}",
            i + 1,
            s.revoked,
            report.samples
        );
    }
}
