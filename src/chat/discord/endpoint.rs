//! HTTP mode: `POST /discord/interactions`. Every request is checked (size,
//! Ed25519 signature, timestamp) before anything is parsed, then handed to
//! the shared [`DiscordHandler`].

use super::handle::DiscordHandler;
use super::interaction::Incoming;
use super::{DiscordAdapter, PLATFORM};
use crate::clock::Clock;
use crate::engine::Engine;
use anyhow::Context as _;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serenity::interactions_endpoint::Verifier;
use std::sync::Arc;

/// Largest accepted body. A button click carries the whole message it was
/// on, so this is more generous than Slack's; anything larger gets 413.
pub const BODY_LIMIT: usize = 256 * 1024;
/// Largest accepted distance between the signed timestamp and our clock.
/// Discord documents no window; without one a captured request could be
/// replayed forever.
pub const MAX_SKEW_SECS: i64 = 300;

struct EndpointState {
    handler: Arc<DiscordHandler>,
    verifier: Verifier,
    clock: Arc<dyn Clock>,
}

/// Parses the application's public key (64 hex digits).
pub fn verifier(public_key_hex: &str) -> anyhow::Result<Verifier> {
    let bytes: [u8; 32] = hex::decode(public_key_hex.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .context("discord.public_key must be 64 hex digits (the application's public key)")?;
    Verifier::try_new(bytes)
        .map_err(|e| anyhow::anyhow!("discord.public_key is not a valid Ed25519 key: {e}"))
}

/// The interactions endpoint, to be merged into jitbot's HTTP server.
pub fn routes(
    engine: Engine,
    adapter: Arc<DiscordAdapter>,
    public_key_hex: &str,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<Router> {
    let state = Arc::new(EndpointState {
        handler: DiscordHandler::new(engine, adapter),
        verifier: verifier(public_key_hex)?,
        clock,
    });
    Ok(Router::new()
        .route("/discord/interactions", post(interactions))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state))
}

/// Why a request was refused with 401; logged, never the signature or body.
enum Refusal {
    MissingHeaders,
    BadSignature,
    BadTimestamp,
    Stale(i64),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::MissingHeaders => f.write_str("signature headers missing"),
            Refusal::BadSignature => f.write_str("signature does not verify"),
            Refusal::BadTimestamp => f.write_str("timestamp is not a number"),
            Refusal::Stale(skew) => write!(f, "timestamp is {skew}s away from our clock"),
        }
    }
}

impl EndpointState {
    fn verify(&self, headers: &HeaderMap, body: &[u8]) -> Result<(), Response> {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let checked = (|| {
            let (Some(signature), Some(timestamp)) =
                (header("x-signature-ed25519"), header("x-signature-timestamp"))
            else {
                return Err(Refusal::MissingHeaders);
            };
            self.verifier
                .verify(signature, timestamp, body)
                .map_err(|()| Refusal::BadSignature)?;
            let ts: i64 = timestamp.parse().map_err(|_| Refusal::BadTimestamp)?;
            let skew = self.clock.now().timestamp() - ts;
            if skew.abs() > MAX_SKEW_SECS {
                return Err(Refusal::Stale(skew));
            }
            Ok(())
        })();
        checked.map_err(|why| {
            tracing::warn!(reason = %why, "refused a Discord interaction");
            crate::metrics::refused_signature(PLATFORM);
            (StatusCode::UNAUTHORIZED, "invalid request signature").into_response()
        })
    }
}

async fn interactions(State(state): State<Arc<EndpointState>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(refused) = state.verify(&headers, &body) {
        return refused;
    }
    let outcome = match Incoming::from_json(&body) {
        Ok(incoming) => state.handler.handle(incoming).await,
        Err(e) => Err(e),
    };
    match outcome {
        Ok(outcome) => {
            if let Some(later) = outcome.later {
                tokio::spawn(later);
            }
            Json(outcome.response).into_response()
        }
        Err(e) => {
            tracing::warn!(error = %e, "refused a Discord interaction");
            (StatusCode::BAD_REQUEST, e.to_string()).into_response()
        }
    }
}
