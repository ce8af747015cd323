//! The HTTP server: health, readiness, metrics and the admin API here; chat
//! adapters and the console mount their own routes next to them.

pub mod admin;

use crate::engine::Engine;
use crate::secret::Secret;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// What the built-in routes need.
#[derive(Clone)]
pub struct HttpState {
    pub engine: Engine,
    /// Bearer token of the admin API; `None` turns the admin API off.
    pub admin_token: Option<Secret>,
    pub metrics: Option<PrometheusHandle>,
    /// The chat platforms, for readiness.
    pub chat: Option<std::sync::Arc<dyn crate::ports::Notifier>>,
}

/// The built-in routes merged with the adapters' routes.
pub fn router(state: HttpState, adapters: Vec<Router>) -> Router {
    let mut app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .nest("/admin", admin::routes())
        .with_state(state);
    for r in adapters {
        app = app.merge(r);
    }
    app
}

/// Ready when the store answers, the directory answers and every chat
/// platform accepts jitbot's credentials.
async fn ready(State(state): State<HttpState>) -> impl IntoResponse {
    if state.engine.store().next_due().is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n".to_string());
    }
    if let Err(e) = directory_up(&state.engine).await {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n"));
    }
    if let Some(chat) = &state.chat {
        if let Err(e) = chat.ready().await {
            return (StatusCode::SERVICE_UNAVAILABLE, format!("chat: {e}\n"));
        }
    }
    (StatusCode::OK, "ready\n".to_string())
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
/// The outbox gauge reads at most this many entries per scrape.
const OUTBOX_GAUGE_CAP: usize = 10_000;

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    let (active, pending) = state.engine.counts().unwrap_or((0, 0));
    crate::metrics::set_gauges(active, pending);
    if let Ok(outbox) = state.engine.store().outbox(OUTBOX_GAUGE_CAP) {
        crate::metrics::observe_outbox(outbox.len(), outbox.first().map(|(id, _, _)| *id));
    }
    if let Ok(live) = state.engine.store().live_leases() {
        let now = state.engine.now();
        let overdue = live
            .iter()
            .filter_map(|l| (now - l.lease.expires_at).to_std().ok())
            .max()
            .unwrap_or_default();
        crate::metrics::set_overdue_revocation(overdue);
    }
    // The error is already in the gauge; /readyz says it in words.
    let _ = directory_up(&state.engine).await;
    match &state.metrics {
        Some(handle) => (StatusCode::OK, handle.render()),
        None => (StatusCode::NOT_FOUND, "metrics are not enabled\n".to_string()),
    }
}

/// Serves on an already-bound listener until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            while !*shutdown.borrow() {
                if shutdown.changed().await.is_err() {
                    break;
                }
            }
        })
        .await
}
