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
use ed25519_dalek::{Signature, VerifyingKey};
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
    verifier: StrictVerifier,
    clock: Arc<dyn Clock>,
}

/// Checks Discord's Ed25519 signatures with `verify_strict`, which refuses
/// small-order keys and signature points that ordinary verification lets
/// a forger use.
pub struct StrictVerifier(VerifyingKey);

impl StrictVerifier {
    /// Whether `signature_hex` signs `timestamp || body`.
    pub fn verify(&self, signature_hex: &str, timestamp: &str, body: &[u8]) -> Result<(), ()> {
        let signature: [u8; 64] = hex::decode(signature_hex)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or(())?;
        let mut message = Vec::with_capacity(timestamp.len() + body.len());
        message.extend_from_slice(timestamp.as_bytes());
        message.extend_from_slice(body);
        self.0
            .verify_strict(&message, &Signature::from_bytes(&signature))
            .map_err(|_| ())
    }
}

/// Parses the application's public key (64 hex digits), refusing weak keys.
pub fn verifier(public_key_hex: &str) -> anyhow::Result<StrictVerifier> {
    let bytes = crate::config::discord_public_key(public_key_hex)
        .map_err(|why| anyhow::anyhow!("discord.public_key {why}"))?;
    VerifyingKey::from_bytes(&bytes)
        .map(StrictVerifier)
        .context("discord.public_key is not a valid Ed25519 key")
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
                crate::chat::work::spawn(later);
            }
            Json(outcome.response).into_response()
        }
        Err(e) => {
            tracing::warn!(error = %e, "refused a Discord interaction");
            (StatusCode::BAD_REQUEST, e.to_string()).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::Verifier as _;

    #[test]
    fn the_all_zero_key_is_refused_with_a_clear_error() {
        let err = verifier(&"0".repeat(64)).err().expect("refused").to_string();
        assert!(
            err.contains("discord.public_key") && err.contains("weak"),
            "{err}"
        );
        let err = verifier("<paste the public key>")
            .err()
            .expect("refused")
            .to_string();
        assert!(
            err.contains("64 hex digits") && err.contains("Developer Portal"),
            "{err}"
        );
    }

    #[test]
    fn a_forged_signature_with_a_small_order_key_is_refused() {
        // The identity point: a small-order key for which R = identity, s = 0
        // "signs" every message under ordinary (cofactored-lenient) checks.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let key = VerifyingKey::from_bytes(&identity).unwrap();
        let mut forged = [0u8; 64];
        forged[0] = 1;
        let body = br#"{"type":3,"data":{"custom_id":"jit:approve:r1"}}"#;
        let message = [b"1700000000".as_slice(), body].concat();
        assert!(
            key.verify(&message, &Signature::from_bytes(&forged)).is_ok(),
            "the forgery works against lenient verification, so this test can fail"
        );
        let err = verifier(&hex::encode(identity)).err().expect("weak key refused");
        assert!(err.to_string().contains("weak"), "{err}");
        // Even past the start-up check, strict verification refuses it.
        assert!(StrictVerifier(key)
            .verify(&hex::encode(forged), "1700000000", body)
            .is_err());
    }

    #[test]
    fn a_real_signature_verifies() {
        use ed25519_dalek::{Signer, SigningKey};
        let signing = SigningKey::from_bytes(&[7u8; 32]);
        let v = verifier(&hex::encode(signing.verifying_key().to_bytes())).unwrap();
        let signature = signing.sign(b"1700000000{}");
        assert!(v
            .verify(&hex::encode(signature.to_bytes()), "1700000000", b"{}")
            .is_ok());
        assert!(v
            .verify(&hex::encode(signature.to_bytes()), "1700000001", b"{}")
            .is_err());
        assert!(v.verify("zz", "1700000000", b"{}").is_err());
    }
}
