//! The HTTP server: two listeners. The public one serves the chat adapters'
//! routes and a bare `/healthz` and `/readyz`; the admin one (loopback by
//! default) serves the admin API, the dashboard, `/metrics` and the detailed
//! `/readyz`. Both serve with [`Limits`] against slow or idle clients.

pub mod admin;
mod serve;

pub use serve::{serve, Limits};

use crate::engine::Engine;
use crate::secret::Secret;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// How long the public `/readyz` answer is reused: a flood of probes costs
/// one directory ping and one chat API call per period, not one per request.
pub const PUBLIC_READY_CACHE: Duration = Duration::from_secs(5);

/// What the built-in routes need.
#[derive(Clone)]
pub struct HttpState {
    pub engine: Engine,
    /// Bearer token of the admin API; `None` turns the admin API off.
    pub admin_token: Option<Secret>,
    pub metrics: Option<PrometheusHandle>,
    /// The chat platforms, for readiness.
    pub chat: Option<Arc<dyn crate::ports::Notifier>>,
    /// The public `/readyz` verdict and when it was taken.
    pub public_ready: Arc<Mutex<Option<(Instant, bool)>>>,
    /// When `/metrics` last pinged the directory.
    pub pinged: Arc<Mutex<Option<Instant>>>,
}

impl HttpState {
    /// State with an empty readiness cache.
    pub fn new(
        engine: Engine,
        admin_token: Option<Secret>,
        metrics: Option<PrometheusHandle>,
        chat: Option<Arc<dyn crate::ports::Notifier>>,
    ) -> Self {
        HttpState {
            engine,
            admin_token,
            metrics,
            chat,
            public_ready: Arc::default(),
            pinged: Arc::default(),
        }
    }
}

/// The public listener's routes: `/healthz`, a bare `/readyz`, and the chat
/// adapters' routes. Nothing here reveals state or configuration.
pub fn public_router(state: HttpState, chat: Vec<Router>) -> Router {
    let mut app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(public_ready))
        .with_state(state);
    for r in chat {
        app = app.merge(r);
    }
    app
}

/// The admin listener's routes: `/healthz`, the detailed `/readyz`,
/// `/metrics`, the admin API, and `extra` (the dashboard).
pub fn admin_router(state: HttpState, extra: Vec<Router>) -> Router {
    let mut app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .nest("/admin", admin::routes())
        .with_state(state);
    for r in extra {
        app = app.merge(r);
    }
    app
}

/// Ready when the store answers, the directory answers and every chat
/// platform accepts jitbot's credentials; the error says which did not.
async fn check_ready(state: &HttpState) -> Result<(), String> {
    store_up(state.engine.store())?;
    directory_up(&state.engine).await?;
    if let Some(chat) = &state.chat {
        if let Err(e) = chat.ready().await {
            return Err(format!("chat: {e}"));
        }
    }
    Ok(())
}

/// Whether the store answers. A replica on PostgreSQL that the database
/// stopped answering can commit nothing, so it must not take traffic. It
/// talks to the database on two sessions, and both must answer: the one
/// every commit and every refresh (each second) goes through
/// (`Store::commits_unanswered`: a round trip failed without an answer
/// since the last one came back, or one has hung longer than a lock may
/// take), and the leadership's, asked every few seconds on a connection of
/// its own (`Store::database_answers`).
fn store_up(store: &crate::store::Store) -> Result<(), String> {
    if let Some(silent) = store.commits_unanswered() {
        return Err(format!(
            "store unavailable: PostgreSQL has not answered this replica's commits and pulls for {:.1} s (its \
             session ended and no new one is let in, or it hangs; see the log)",
            silent.as_secs_f64()
        ));
    }
    if store.database_answers() == Some(false) {
        return Err(
            "store unavailable: PostgreSQL does not answer this replica (its leadership statements fail; see the log)"
                .into(),
        );
    }
    store
        .next_due()
        .map(|_| ())
        .map_err(|e| format!("store unavailable: {e}"))
}

/// The detailed readiness, for operators on the admin listener.
async fn ready(State(state): State<HttpState>) -> impl IntoResponse {
    // With replicas, which one this is: only the leader runs the scheduler.
    let store = state.engine.store();
    let role = match (store.is_postgres(), store.fence()) {
        (false, _) => "",
        (true, Some(_)) => " (leader)",
        (true, None) => " (follower)",
    };
    match check_ready(&state).await {
        Ok(()) => (StatusCode::OK, format!("ready{role}\n")),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
    }
}

/// Readiness for probes on the public listener: ok or not, no detail,
/// checked at most once per [`PUBLIC_READY_CACHE`]. The lock makes
/// concurrent probes wait for one check instead of each running one.
async fn public_ready(State(state): State<HttpState>) -> impl IntoResponse {
    let mut cached = state.public_ready.lock().await;
    let ok = match *cached {
        Some((at, ok)) if at.elapsed() < PUBLIC_READY_CACHE => ok,
        _ => {
            let result = check_ready(&state).await;
            if let Err(e) = &result {
                tracing::warn!(error = %e, "not ready (details on the admin listener's /readyz)");
            }
            *cached = Some((Instant::now(), result.is_ok()));
            result.is_ok()
        }
    };
    if ok {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// Sets the gauges only a read of the store can tell, from its indexes
/// (never every live lease record) and the outbox's first entries.
fn refresh_gauges(engine: &Engine) {
    if let Ok((active, pending, overdue)) = engine.scrape_counts() {
        crate::metrics::set_gauges(active, pending);
        crate::metrics::set_overdue_revocation(overdue);
    }
    if let Ok((backlog, head)) = engine.store().outbox_backlog(crate::metrics::OUTBOX_BACKLOG_CAP) {
        crate::metrics::observe_outbox(backlog, head);
    }
}

/// Pings the directory and records the answer in `jitbot_directory_up`.
async fn directory_up(engine: &Engine) -> Result<(), String> {
    let answer = tokio::time::timeout(DIRECTORY_PING_TIMEOUT, engine.directory().ping()).await;
    let result = match answer {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "the directory did not answer a ping within {}s",
            DIRECTORY_PING_TIMEOUT.as_secs()
        )),
    };
    crate::metrics::set_directory_up(result.is_ok());
    result
}

/// A scrape must not hang on a directory that stopped answering.
const DIRECTORY_PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a directory ping's answer is reused by `/metrics`: several
/// Prometheus servers, or a flood of scrapes, cost one ping per period.
const SCRAPE_PING_CACHE: Duration = Duration::from_secs(5);

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    // Store reads (a count of the outbox's keys among them) on the
    // blocking pool: on a runtime worker they would stall every task
    // queued there, a revocation's included, for as long as they take.
    let engine = state.engine.clone();
    if let Err(e) = tokio::task::spawn_blocking(move || refresh_gauges(&engine)).await {
        tracing::warn!(error = %e, "reading the store's gauges for a scrape failed");
    }
    {
        let mut pinged = state.pinged.lock().await;
        if !pinged.is_some_and(|at| at.elapsed() < SCRAPE_PING_CACHE) {
            // The error is already in the gauge; the detailed /readyz says it in words.
            let _ = directory_up(&state.engine).await;
            *pinged = Some(Instant::now());
        }
    }
    match &state.metrics {
        Some(handle) => (StatusCode::OK, handle.render()),
        None => (StatusCode::NOT_FOUND, "metrics are not enabled\n".to_string()),
    }
}
