//! A fake Discord REST API on `127.0.0.1:0`: records every call under
//! `/api/v10/...` (method, path, JSON body) and answers in Discord's JSON
//! shapes (message objects with fresh ids, DM channel objects, registered
//! commands). It can answer a path with HTTP 429 a given number of times,
//! refuse DMs to a user as Discord does (403, code 50007),
//! and tells a bot where the gateway is (`GET /gateway/bot`) once a gateway
//! fake has said where it listens.

use super::net::Recorder;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::{Json, Router};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The application id the tests configure.
pub const APP_ID: &str = "1100000000000000001";
/// The bot's own user id, as author of the messages it posts.
pub const BOT_USER: &str = "1200000000000000001";

/// One recorded call.
#[derive(Clone, Debug)]
pub struct Call {
    pub method: String,
    /// The path after `/api/v10`, e.g. `/channels/42/messages`.
    pub path: String,
    pub body: Value,
    /// The `Authorization` header (`Bot <token>`), if any.
    pub authorization: Option<String>,
    /// Answered with HTTP 429: Discord did nothing.
    pub rate_limited: bool,
}

#[derive(Default)]
struct Inner {
    calls: Recorder<Call>,
    /// (path prefix, remaining 429 answers).
    limits: Mutex<Vec<(String, u32)>>,
    /// DM channels whose user does not accept DMs from the bot.
    closed_dms: Mutex<Vec<String>>,
    /// The `ws://` URL `GET /gateway` and `GET /gateway/bot` hand out.
    gateway: Mutex<Option<String>>,
    next_id: AtomicU64,
}

/// Handle on a running fake; cheap to clone.
#[derive(Clone)]
pub struct FakeDiscord {
    inner: Arc<Inner>,
    /// `http://127.0.0.1:<port>`: the `api_base` to give the adapter.
    pub base: String,
}

impl FakeDiscord {
    pub async fn start() -> FakeDiscord {
        let inner = Arc::new(Inner {
            next_id: AtomicU64::new(1_300_000_000_000_000_000),
            ..Inner::default()
        });
        let app = Router::new()
            .route("/api/v10/{*rest}", any(api))
            .with_state(inner.clone());
        let base = super::net::serve(app, "fake discord").await;
        FakeDiscord { inner, base }
    }

    /// Answers calls whose path starts with `prefix` with 429, `times` times.
    pub fn rate_limit(&self, prefix: &str, times: u32) {
        self.inner
            .limits
            .lock()
            .unwrap()
            .push((prefix.to_string(), times));
    }

    /// `user` does not accept DMs (privacy settings, no shared server):
    /// Discord still opens the DM channel, then refuses messages in it with
    /// 403 and code 50007.
    pub fn refuse_dms(&self, user: &str) {
        self.inner.closed_dms.lock().unwrap().push(dm_channel(user));
    }

    /// From now on `GET /gateway(/bot)` points bots at `url`.
    pub fn set_gateway_url(&self, url: &str) {
        *self.inner.gateway.lock().unwrap() = Some(url.to_string());
    }

    pub fn calls(&self) -> Vec<Call> {
        self.inner.calls.all()
    }

    /// Calls with this method whose path matches `path`, where `*` in
    /// `path` stands for one segment.
    pub fn calls_to(&self, method: &str, path: &str) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.method == method && matches(path, &c.path))
            .collect()
    }

    /// Waits until a call satisfies `pred`; `None` after `timeout`.
    pub async fn wait_for(&self, timeout: Duration, pred: impl Fn(&Call) -> bool) -> Option<Call> {
        self.inner.calls.find_within(timeout, pred).await
    }
}

/// The id of the DM channel with a user: stable, so tests can find it.
pub fn dm_channel(user: &str) -> String {
    format!("15{}", user.get(2..).unwrap_or_default())
}

fn matches(pattern: &str, path: &str) -> bool {
    let (p, s): (Vec<&str>, Vec<&str>) = (pattern.split('/').collect(), path.split('/').collect());
    p.len() == s.len() && p.iter().zip(&s).all(|(p, s)| *p == "*" || p == s)
}

/// A user object.
pub fn user(id: &str, name: &str, bot: bool) -> Value {
    json!({ "id": id, "username": name, "discriminator": "0", "global_name": null, "avatar": null, "bot": bot })
}

/// A message object as Discord returns it from create and edit.
pub fn message(id: &str, channel: &str, body: &Value) -> Value {
    json!({
        "id": id,
        "channel_id": channel,
        "author": user(BOT_USER, "jitbot", true),
        "content": body.get("content").cloned().unwrap_or(json!("")),
        "timestamp": "2026-03-01T09:00:00.000000+00:00",
        "edited_timestamp": null,
        "tts": false,
        "mention_everyone": false,
        "mentions": [],
        "mention_roles": [],
        "attachments": [],
        "embeds": body.get("embeds").cloned().unwrap_or(json!([])),
        "components": body.get("components").cloned().unwrap_or(json!([])),
        "pinned": false,
        "type": 0,
        "flags": 0
    })
}

async fn api(
    State(inner): State<Arc<Inner>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().trim_start_matches("/api/v10").to_string();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let rate_limited = {
        let mut limits = inner.limits.lock().unwrap();
        match limits
            .iter_mut()
            .find(|(p, n)| *n > 0 && path.starts_with(p.as_str()))
        {
            Some(limit) => {
                limit.1 -= 1;
                true
            }
            None => false,
        }
    };
    inner.calls.push(Call {
        method: method.to_string(),
        path: path.clone(),
        body: body.clone(),
        authorization: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        rate_limited,
    });
    if rate_limited {
        let body = json!({ "message": "You are being rate limited.", "retry_after": 1.0, "global": false, "code": 0 });
        return (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "1")], Json(body)).into_response();
    }
    let fresh = || inner.next_id.fetch_add(1, Ordering::SeqCst).to_string();
    let seg: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method.as_str(), seg.as_slice()) {
        ("POST", ["channels", channel, "messages"])
            if inner.closed_dms.lock().unwrap().iter().any(|c| c == channel) =>
        {
            let body = json!({ "message": "Cannot send messages to this user", "code": 50007 });
            (StatusCode::FORBIDDEN, Json(body)).into_response()
        }
        ("POST", ["channels", channel, "messages"]) => {
            Json(message(&fresh(), channel, &body)).into_response()
        }
        ("PATCH", ["channels", channel, "messages", id]) => Json(message(id, channel, &body)).into_response(),
        ("POST", ["users", "@me", "channels"]) => {
            let recipient = body["recipient_id"].as_str().unwrap_or("0").to_string();
            Json(json!({
                "id": dm_channel(&recipient),
                "type": 1,
                "last_message_id": null,
                "recipients": [user(&recipient, "someone", false)]
            }))
            .into_response()
        }
        ("PATCH", ["webhooks", _app, _token, "messages", "@original"]) => {
            Json(message(&fresh(), "1", &body)).into_response()
        }
        ("POST", ["interactions", _id, _token, "callback"]) => StatusCode::NO_CONTENT.into_response(),
        ("GET", ["gateway"]) | ("GET", ["gateway", "bot"]) => match inner.gateway.lock().unwrap().clone() {
            // Unauthenticated `/gateway` names Discord's public gateway, as
            // the real one does: only a bot that asks `/gateway/bot` at its
            // API base finds the fake.
            Some(_) if seg.len() == 1 => Json(json!({ "url": "wss://gateway.discord.gg" })).into_response(),
            Some(url) => Json(json!({
                "url": url,
                "shards": 1,
                "session_start_limit": { "total": 1000, "remaining": 999, "reset_after": 14_400_000, "max_concurrency": 1 }
            }))
            .into_response(),
            None => (StatusCode::NOT_FOUND, Json(json!({ "message": "no gateway in this fake", "code": 0 }))).into_response(),
        },
        ("PUT", ["applications", app, "commands"])
        | ("PUT", ["applications", app, "guilds", _, "commands"]) => {
            let guild = seg
                .get(3)
                .filter(|_| seg.len() == 5)
                .map(|g| json!(g))
                .unwrap_or(Value::Null);
            let registered: Vec<Value> = body
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(|c| {
                    json!({
                        "id": "1400000000000000001",
                        "application_id": app,
                        "guild_id": guild,
                        "version": "1400000000000000002",
                        "type": 1,
                        "name": c["name"],
                        "description": c["description"],
                        "options": c.get("options").cloned().unwrap_or(json!([])),
                        "default_member_permissions": null,
                        "nsfw": false
                    })
                })
                .collect();
            Json(Value::Array(registered)).into_response()
        }
        _ => (
            StatusCode::NOT_FOUND,
            Json(json!({ "message": "Unknown route in the fake", "code": 0 })),
        )
            .into_response(),
    }
}
