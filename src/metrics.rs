//! Prometheus metrics through the `metrics` facade. Names are listed here,
//! once, so the set jitbot exports is easy to review.

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the global recorder once; later calls return the same handle.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
                    &[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0],
                )
                .ok()?
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full("jitbot_directory_batch_values".into()),
                    &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0],
                )
                .ok()?
                .install_recorder()
                .ok()
                .inspect(|_| register_all())
        })
        .clone()
}

/// Requests, approvals and denials by outcome (`accepted` or `refused`).
pub fn command(kind: &'static str, outcome: &'static str) {
    let name = match kind {
        "request" => "jitbot_requests_total",
        "approval" => "jitbot_approvals_total",
        _ => "jitbot_denials_total",
    };
    counter!(name, "outcome" => outcome).increment(1);
}
pub fn granted() {
    counter!("jitbot_grants_total").increment(1);
}
pub fn revoked() {
    counter!("jitbot_revocations_total").increment(1);
}
pub fn revoke_retry() {
    counter!("jitbot_revocation_failures_total").increment(1);
}
/// Time from a lease's expiry to its membership being gone.
pub fn revocation_lag(lag: Duration) {
    histogram!("jitbot_revocation_lag_seconds").record(lag.as_secs_f64());
    capture("lag", lag.as_secs_f64());
}
pub fn directory_op(op: &'static str, took: Duration) {
    histogram!("jitbot_directory_operation_seconds", "op" => op).record(took.as_secs_f64());
}
pub fn zsp_drift() {
    counter!("jitbot_zsp_drift_total").increment(1);
}
pub fn refused_signature(platform: &'static str) {
    counter!("jitbot_refused_signatures_total", "platform" => platform).increment(1);
}
/// Signed payloads refused because they come from another workspace, app or
/// org, or from an external (Slack Connect) user; `reason` says which.
pub fn refused_payload(platform: &'static str, reason: &'static str) {
    counter!("jitbot_refused_payloads_total", "platform" => platform, "reason" => reason).increment(1);
}
pub fn chat_error(platform: &'static str) {
    counter!("jitbot_chat_api_errors_total", "platform" => platform).increment(1);
}
pub fn set_gauges(active: usize, pending: usize) {
    gauge!("jitbot_active_leases").set(active as f64);
    gauge!("jitbot_pending_requests").set(pending as f64);
}

/// The wall clock went back (the steady clock ignored the step).
pub fn clock_stepped_back() {
    counter!("jitbot_clock_steps_back_total").increment(1);
}

/// The stages of a revocation, in order, as `stage` label values of
/// `jitbot_revocation_stage_seconds`: from the timer being due to the
/// scheduler picking it up, the store commit before the directory change,
/// the wait for a place in a combined modify of the group, the LDAP modify,
/// the read-back, and the store commit after it (durable, flush included).
pub const REVOCATION_STAGES: [&str; 6] = [
    "timer_lateness",
    "commit_before",
    "batch_wait",
    "directory_modify",
    "read_back",
    "commit_after",
];

/// How long one stage of a revocation took (see [`REVOCATION_STAGES`]).
pub fn stage(name: &'static str, took: Duration) {
    histogram!("jitbot_revocation_stage_seconds", "stage" => name).record(took.as_secs_f64());
    capture(name, took.as_secs_f64());
}

/// How many values one combined membership modify carried (`change`:
/// `add` or `remove`).
pub fn directory_batch(change: &'static str, values: usize) {
    histogram!("jitbot_directory_batch_values", "change" => change).record(values as f64);
    if change == "remove" {
        capture("batch_values", values as f64);
    }
}

/// Raw samples of the revocation stages, for the benchmark, which needs exact
/// percentiles rather than the exporter's buckets: off (one atomic load per
/// sample) until [`capture_samples`] turns it on.
static CAPTURING: AtomicBool = AtomicBool::new(false);
type Samples = HashMap<&'static str, Vec<f64>>;
static CAPTURED: Mutex<Option<Samples>> = Mutex::new(None);

fn capture(name: &'static str, value: f64) {
    if !CAPTURING.load(Ordering::Relaxed) {
        return;
    }
    let mut captured = CAPTURED.lock().unwrap_or_else(|p| p.into_inner());
    captured
        .get_or_insert_with(HashMap::new)
        .entry(name)
        .or_default()
        .push(value);
}

/// Benchmark hook: from now on, keep every sample of the revocation stages,
/// of `lag` (expiry → ended, durable) and of `batch_values` (values per
/// combined remove), in seconds (or values), until [`take_samples`].
#[doc(hidden)]
pub fn capture_samples() {
    CAPTURING.store(true, Ordering::SeqCst);
}

/// Benchmark hook: the samples kept since the last call, by name.
#[doc(hidden)]
pub fn take_samples() -> HashMap<&'static str, Vec<f64>> {
    CAPTURED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .unwrap_or_default()
}

/// Outbox entries are not timestamped, so the age of the oldest is measured
/// from when this process first saw it at the head: (its id, first seen).
static OUTBOX_HEAD: Mutex<Option<(u64, std::time::Instant)>> = Mutex::new(None);

/// The most outbox entries a scrape counts (keys only, no entry decoded),
/// so a scrape stays bounded with any backlog: `jitbot_outbox_backlog` at
/// this value means at least this many, and `JitbotOutboxBacklogGrowing`
/// fires on it (deploy/prometheus/alerts.yml).
pub const OUTBOX_BACKLOG_CAP: usize = 1_000_000;

/// Notices waiting in the outbox (`backlog`) and the id of the oldest
/// (`head`), as read at a scrape. Sets `jitbot_outbox_backlog` and
/// `jitbot_outbox_oldest_seconds`: how long that head has been waiting as far
/// as this process has seen (0 when the outbox is empty).
pub fn observe_outbox(backlog: usize, head: Option<u64>) {
    let waited = {
        let mut seen = OUTBOX_HEAD
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        head_wait(&mut seen, head, std::time::Instant::now())
    };
    gauge!("jitbot_outbox_backlog").set(backlog as f64);
    gauge!("jitbot_outbox_oldest_seconds").set(waited.as_secs_f64());
}

/// How long `head` has been the outbox's head, given what was `seen` before;
/// a new head (or an empty outbox) starts the count again.
fn head_wait(
    seen: &mut Option<(u64, std::time::Instant)>,
    head: Option<u64>,
    now: std::time::Instant,
) -> Duration {
    match (head, *seen) {
        (Some(id), Some((seen_id, since))) if id == seen_id => now.saturating_duration_since(since),
        (Some(id), _) => {
            *seen = Some((id, now));
            Duration::ZERO
        }
        (None, _) => {
            *seen = None;
            Duration::ZERO
        }
    }
}

/// How long the most overdue revocation has been due (0 when none is): a
/// lease past its end — its expiry, or the release or revoke that ended
/// it — whose membership is not gone yet, or a late add being removed.
pub fn set_overdue_revocation(overdue: Duration) {
    gauge!("jitbot_revocation_overdue_seconds").set(overdue.as_secs_f64());
}

/// This replica's role, as `jitbot_leader{store}`: 1 while it leads (runs
/// the scheduler, the outbox worker and the ZSP monitor), 0 while it
/// follows. With sled (`store="sled"`) the one process always leads.
pub fn set_leader(store: &'static str, leads: bool) {
    gauge!("jitbot_leader", "store" => store).set(if leads { 1.0 } else { 0.0 });
}

/// This replica took the leader's term (`jitbot_leader_changes_total`):
/// summed over the replicas, how often the leadership changed hands.
pub fn leadership_taken() {
    counter!("jitbot_leader_changes_total").increment(1);
}

/// Whether the directory answered jitbot's last ping (1) or not (0).
pub fn set_directory_up(up: bool) {
    gauge!("jitbot_directory_up").set(if up { 1.0 } else { 0.0 });
}

/// Registers every metric with its help text and a zero value, so that
/// `/metrics` lists the whole set from start-up: a dashboard or an alert on
/// a counter that has not moved yet (failures, drift, refused signatures)
/// then reads 0 rather than "no data".
fn register_all() {
    describe_counter!("jitbot_requests_total", "Access requests, by outcome.");
    describe_counter!("jitbot_approvals_total", "Approvals, by outcome.");
    describe_counter!("jitbot_denials_total", "Denials, by outcome.");
    for name in [
        "jitbot_requests_total",
        "jitbot_approvals_total",
        "jitbot_denials_total",
    ] {
        for outcome in ["accepted", "refused"] {
            counter!(name, "outcome" => outcome).increment(0);
        }
    }
    describe_counter!("jitbot_grants_total", "Memberships granted.");
    describe_counter!("jitbot_revocations_total", "Memberships revoked.");
    describe_counter!(
        "jitbot_revocation_failures_total",
        "Revocation attempts that failed and will be retried."
    );
    describe_counter!(
        "jitbot_zsp_drift_total",
        "Members found in zero-standing-privilege groups."
    );
    describe_counter!(
        "jitbot_clock_steps_back_total",
        "Backward steps of the wall clock ignored by the steady clock."
    );
    for name in [
        "jitbot_grants_total",
        "jitbot_revocations_total",
        "jitbot_revocation_failures_total",
        "jitbot_zsp_drift_total",
        "jitbot_clock_steps_back_total",
    ] {
        counter!(name).increment(0);
    }
    describe_counter!(
        "jitbot_refused_signatures_total",
        "Chat requests refused for a bad or stale signature, by platform."
    );
    describe_counter!(
        "jitbot_chat_api_errors_total",
        "Failed chat platform API calls, by platform."
    );
    for platform in ["slack", "discord"] {
        counter!("jitbot_refused_signatures_total", "platform" => platform).increment(0);
        counter!("jitbot_chat_api_errors_total", "platform" => platform).increment(0);
    }
    describe_histogram!(
        "jitbot_revocation_lag_seconds",
        Unit::Seconds,
        "Time from a lease's expiry to its membership being gone."
    );
    // Looking a histogram up registers it: it renders with zero samples.
    let _ = histogram!("jitbot_revocation_lag_seconds");
    describe_histogram!(
        "jitbot_revocation_stage_seconds",
        Unit::Seconds,
        "Time spent in each stage of a revocation."
    );
    for name in REVOCATION_STAGES {
        let _ = histogram!("jitbot_revocation_stage_seconds", "stage" => name);
    }
    describe_histogram!(
        "jitbot_directory_operation_seconds",
        Unit::Seconds,
        "Directory changes (add, remove), read-back included."
    );
    for op in ["add", "remove"] {
        let _ = histogram!("jitbot_directory_operation_seconds", "op" => op);
    }
    describe_histogram!(
        "jitbot_directory_batch_values",
        "Values carried by one combined membership modify, by change (add, remove)."
    );
    for change in ["add", "remove"] {
        let _ = histogram!("jitbot_directory_batch_values", "change" => change);
    }
    describe_gauge!("jitbot_active_leases", "Leases whose membership is in force.");
    describe_gauge!("jitbot_pending_requests", "Requests waiting for approval.");
    describe_gauge!(
        "jitbot_outbox_backlog",
        format!(
            "Notices waiting in the outbox, counted up to {OUTBOX_BACKLOG_CAP} (the cap): at the cap, at least that many."
        )
    );
    describe_gauge!(
        "jitbot_outbox_oldest_seconds",
        Unit::Seconds,
        "How long the oldest notice has been waiting in the outbox, as seen since start-up."
    );
    describe_gauge!(
        "jitbot_revocation_overdue_seconds",
        Unit::Seconds,
        "How long the most overdue revocation has been due: a lease past its end (expiry, release or revoke) whose membership is not gone yet, or a late add being removed."
    );
    describe_gauge!(
        "jitbot_directory_up",
        "1 when the directory answered the last ping."
    );
    // `jitbot_leader` is set by `app::start`, which knows the store's kind.
    describe_gauge!(
        "jitbot_leader",
        "1 while this replica leads (runs the scheduler, the outbox and the ZSP monitor), 0 while it follows; by store kind."
    );
    describe_counter!(
        "jitbot_leader_changes_total",
        "Times this replica took the leader's term; summed over replicas, the leader changes."
    );
    counter!("jitbot_leader_changes_total").increment(0);
    describe_counter!(
        "jitbot_refused_payloads_total",
        "Signed Slack payloads refused: another workspace, app or org, or an external user."
    );
    for reason in ["workspace", "app", "enterprise", "external_user"] {
        counter!("jitbot_refused_payloads_total", "platform" => "slack", "reason" => reason).increment(0);
    }
    describe_counter!(
        "jitbot_store_pruned_total",
        "Ended leases and finished requests pruned by [store] retain, by kind."
    );
    for kind in ["lease", "request"] {
        counter!("jitbot_store_pruned_total", "kind" => kind).increment(0);
    }
    describe_counter!(
        "jitbot_audit_archived_total",
        "Audit records moved from the store to the audit archive by [store] retain."
    );
    counter!("jitbot_audit_archived_total").increment(0);
    describe_counter!(
        "jitbot_retention_failures_total",
        "Retention passes ([store] retain) that failed; the next runs at the next interval."
    );
    counter!("jitbot_retention_failures_total").increment(0);
    set_gauges(0, 0);
    observe_outbox(0, None);
    set_overdue_revocation(Duration::ZERO);
}

/// Records removed from the store by retention (`kind`: `lease`, `request`).
pub fn store_pruned(kind: &'static str, n: u64) {
    counter!("jitbot_store_pruned_total", "kind" => kind).increment(n);
}
/// Audit records moved from the store to the archive by retention.
pub fn audit_archived(n: u64) {
    counter!("jitbot_audit_archived_total").increment(n);
}
/// A retention pass failed (`JitbotRetentionFailing` fires when they keep
/// failing): nothing more is archived or pruned until one succeeds.
pub fn retention_failed() {
    counter!("jitbot_retention_failures_total").increment(1);
}

/// A notice, card or card update that failed on one platform (`kind`:
/// `alert`, `notice`, `card`, `card_update`); it is retried.
pub fn outbox_failure(platform: &str, kind: &'static str) {
    counter!("jitbot_outbox_failures_total", "platform" => platform.to_string(), "kind" => kind).increment(1);
}
/// A notice given up on one platform after its last attempt (never an alert).
pub fn outbox_dropped(platform: &str, kind: &'static str) {
    counter!("jitbot_outbox_dropped_total", "platform" => platform.to_string(), "kind" => kind).increment(1);
}
/// A card posted again after a post whose outcome was never recorded: the
/// platform may show it twice.
pub fn outbox_possible_duplicate(platform: &str) {
    counter!("jitbot_outbox_possible_duplicates_total", "platform" => platform.to_string()).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_outbox_age_counts_while_the_same_notice_stays_at_the_head() {
        let t0 = std::time::Instant::now();
        let at = |secs| t0 + Duration::from_secs(secs);
        let mut seen = None;
        assert_eq!(head_wait(&mut seen, Some(7), at(0)), Duration::ZERO);
        assert_eq!(head_wait(&mut seen, Some(7), at(30)), Duration::from_secs(30));
        assert_eq!(head_wait(&mut seen, Some(7), at(90)), Duration::from_secs(90));
        // Delivered: the next notice starts from zero.
        assert_eq!(head_wait(&mut seen, Some(8), at(95)), Duration::ZERO);
        assert_eq!(head_wait(&mut seen, Some(8), at(100)), Duration::from_secs(5));
        // An empty outbox resets the count, even for an id seen before.
        assert_eq!(head_wait(&mut seen, None, at(110)), Duration::ZERO);
        assert_eq!(seen, None);
        assert_eq!(head_wait(&mut seen, Some(8), at(120)), Duration::ZERO);
    }
}
