//! Prometheus metrics through the `metrics` facade. Names are listed here,
//! once, so the set jitbot exports is easy to review.

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
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
                .install_recorder()
                .ok()
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
