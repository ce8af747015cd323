//! HTTP mode: `POST /slack/commands` and `POST /slack/interactions`. Every
//! request is checked (size, signature, timestamp) before anything is
//! parsed, acknowledged at once, and its work handed to [`SlackHandler`].

use super::handle::{decode_command, Rejected, SlackHandler};
use super::signature::verify_signature;
use super::{SlackAdapter, PLATFORM};
use crate::clock::Clock;
use crate::engine::Engine;
use crate::secret::Secret;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use std::collections::HashMap;
use std::sync::Arc;

/// Largest accepted body. Slack's payloads are a few KiB; anything larger
/// is refused with 413 before it is read further.
pub const BODY_LIMIT: usize = 64 * 1024;

struct HttpState {
    handler: Arc<SlackHandler>,
    signing_secret: Secret,
    clock: Arc<dyn Clock>,
}

/// The Slack endpoints, to be merged into jitbot's HTTP server.
pub fn routes(
    engine: Engine,
    adapter: Arc<SlackAdapter>,
    signing_secret: Secret,
    clock: Arc<dyn Clock>,
) -> Router {
    let state = Arc::new(HttpState {
        handler: SlackHandler::new(engine, adapter),
        signing_secret,
        clock,
    });
    Router::new()
        .route("/slack/commands", post(commands))
        .route("/slack/interactions", post(interactions))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

impl HttpState {
    /// Refused (401) unless Slack signed this body recently.
    fn verify(&self, headers: &HeaderMap, body: &[u8]) -> Result<(), Refused> {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let now = self.clock.now().timestamp();
        let checked = verify_signature(
            self.signing_secret.expose(),
            header("x-slack-request-timestamp"),
            header("x-slack-signature"),
            body,
            now,
        );
        checked.map_err(|e| {
            // The reason only: never the secret, the signature or the body.
            tracing::warn!(reason = %e, "refused a Slack request with a bad signature");
            crate::metrics::refused_signature(PLATFORM);
            Refused
        })
    }
}

/// A request that failed verification; answered 401 and never processed.
struct Refused;

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        (StatusCode::UNAUTHORIZED, "invalid signature").into_response()
    }
}

fn form(body: &[u8]) -> HashMap<String, String> {
    url::form_urlencoded::parse(body).into_owned().collect()
}

fn note_retry(headers: &HeaderMap) {
    if let Some(n) = headers.get("x-slack-retry-num").and_then(|v| v.to_str().ok()) {
        let reason = headers
            .get("x-slack-retry-reason")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        tracing::info!(retry = n, reason, "Slack is retrying a request");
    }
}

fn bad_request(why: &str) -> Response {
    (StatusCode::BAD_REQUEST, why.to_string()).into_response()
}

async fn commands(State(state): State<Arc<HttpState>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(refused) = state.verify(&headers, &body) {
        return refused.into_response();
    }
    note_retry(&headers);
    let Some(command) = decode_command(&body) else {
        return bad_request("missing slash command fields");
    };
    match state.handler.command(command).await {
        // An empty 200 acknowledges without a visible message; the answer follows.
        Ok(_) => StatusCode::OK.into_response(),
        Err(e) => refused(e),
    }
}

async fn interactions(State(state): State<Arc<HttpState>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(refused) = state.verify(&headers, &body) {
        return refused.into_response();
    }
    note_retry(&headers);
    let Some(payload) = form(&body).remove("payload") else {
        return bad_request("missing payload");
    };
    let Ok(json) = serde_json::from_str::<serde_json::Value>(&payload) else {
        return bad_request("payload is not JSON");
    };
    match state.handler.interaction(json).await {
        // An empty 200 also closes a submitted modal.
        Ok(_) => StatusCode::OK.into_response(),
        Err(e) => refused(e),
    }
}

/// 403 for a payload from another workspace or app (already logged and
/// counted), 400 for one jitbot cannot read.
fn refused(e: Rejected) -> Response {
    match e {
        Rejected::Foreign(_) => (StatusCode::FORBIDDEN, e.to_string()).into_response(),
        other => {
            tracing::warn!(error = %other, "refused a Slack interaction");
            bad_request(&other.to_string())
        }
    }
}
