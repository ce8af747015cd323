//! A fake Slack Web API on `127.0.0.1:0`: records every call (method and
//! JSON, form or query body) and answers in Slack's JSON shapes. It also
//! serves `/response/<n>` to stand in for `response_url`, can answer a
//! method (in one channel, or any) with HTTP 429 and `Retry-After` a given
//! number of times, and lets another fake answer a method (Socket Mode's
//! `apps.connections.open`). Built on `net.rs` (`serve`, `Recorder`,
//! `within`) like the other fakes; benches/jitbot.rs includes both files.

use super::net::{serve, Recorder};
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One recorded call.
#[derive(Clone, Debug)]
pub struct Call {
    /// `chat.postMessage`, ..., or `response/<n>` for a response_url post.
    pub method: String,
    pub body: Value,
    pub authorization: Option<String>,
    /// Answered with HTTP 429 (`ratelimited`): Slack did nothing.
    pub rate_limited: bool,
}

#[derive(Default)]
struct Inner {
    calls: Recorder<Call>,
    /// Slack user id → email, for `users.info` and `users.lookupByEmail`.
    emails: Mutex<HashMap<String, String>>,
    /// (method, channel or any) → (remaining 429 answers, Retry-After seconds).
    limits: Mutex<HashMap<LimitKey, (u32, u64)>>,
    /// Method → who answers it instead of the built-in answers.
    answers: Mutex<HashMap<String, Answerer>>,
    ts: AtomicU64,
}

/// A rate limit's method, and its channel (`None`: any).
type LimitKey = (String, Option<String>);

/// Answers a method with Slack's JSON, given the recorded call.
type Answerer = Arc<dyn Fn(&Call) -> Value + Send + Sync>;

/// Handle on a running fake; cheap to clone.
#[derive(Clone)]
pub struct FakeSlack {
    inner: Arc<Inner>,
    /// `http://127.0.0.1:<port>`
    pub base: String,
}

impl FakeSlack {
    pub async fn start() -> FakeSlack {
        let inner = Arc::new(Inner::default());
        let app = Router::new()
            .route("/api/{method}", any(api))
            .route("/response/{n}", post(response))
            .with_state(inner.clone());
        let base = serve(app, "fake slack").await;
        FakeSlack { inner, base }
    }

    /// The Web API base URL to give jitbot (`api_url`).
    pub fn api_url(&self) -> String {
        format!("{}/api/", self.base)
    }

    /// A fresh response_url.
    pub fn response_url(&self, n: u32) -> String {
        format!("{}/response/{n}", self.base)
    }

    pub fn add_user(&self, slack_id: &str, email: &str) {
        self.inner
            .emails
            .lock()
            .unwrap()
            .insert(slack_id.to_string(), email.to_string());
    }

    /// The next `times` calls of `method` get 429 with `Retry-After: secs`.
    pub fn rate_limit(&self, method: &str, times: u32, secs: u64) {
        self.inner
            .limits
            .lock()
            .unwrap()
            .insert((method.to_string(), None), (times, secs));
    }

    /// [`FakeSlack::rate_limit`] for calls in `channel` only (Slack limits
    /// `chat.postMessage` per channel).
    pub fn rate_limit_in(&self, method: &str, channel: &str, times: u32, secs: u64) {
        self.inner
            .limits
            .lock()
            .unwrap()
            .insert((method.to_string(), Some(channel.to_string())), (times, secs));
    }

    /// From now on `answer` answers `method` (recorded as any other call).
    pub fn answer_with(&self, method: &str, answer: impl Fn(&Call) -> Value + Send + Sync + 'static) {
        self.inner
            .answers
            .lock()
            .unwrap()
            .insert(method.to_string(), Arc::new(answer));
    }

    pub fn calls(&self) -> Vec<Call> {
        self.inner.calls.all()
    }

    pub fn calls_to(&self, method: &str) -> Vec<Call> {
        self.calls().into_iter().filter(|c| c.method == method).collect()
    }

    /// Waits up to `timeout` for a call matching `pred`, returning it.
    pub async fn wait_for(&self, timeout: Duration, pred: impl Fn(&Call) -> bool) -> Option<Call> {
        self.inner.calls.find_within(timeout, pred).await
    }
}

/// Whether a 429 is set for this call (and counts it down).
fn limited(inner: &Inner, method: &str, body: &Value) -> Option<u64> {
    let channel = body.get("channel").and_then(Value::as_str).map(str::to_string);
    let mut limits = inner.limits.lock().unwrap();
    for key in [(method.to_string(), channel), (method.to_string(), None)] {
        if let Some((left, secs)) = limits.get_mut(&key) {
            if *left > 0 {
                *left -= 1;
                return Some(*secs);
            }
        }
    }
    None
}

fn parse_body(headers: &HeaderMap, body: &[u8], query: HashMap<String, String>) -> Value {
    let json_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if json_type {
        return serde_json::from_slice(body).unwrap_or(Value::Null);
    }
    let mut map: serde_json::Map<String, Value> =
        query.into_iter().map(|(k, v)| (k, Value::String(v))).collect();
    for (k, v) in url::form_urlencoded::parse(body) {
        map.insert(k.into_owned(), Value::String(v.into_owned()));
    }
    Value::Object(map)
}

async fn api(
    State(inner): State<Arc<Inner>>,
    Path(method): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body = parse_body(&headers, &body, query);
    let answerer = inner.answers.lock().unwrap().get(&method).cloned();
    let limit = match answerer {
        Some(_) => None,
        None => limited(&inner, &method, &body),
    };
    let call = Call {
        method: method.clone(),
        body: body.clone(),
        authorization: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        rate_limited: limit.is_some(),
    };
    inner.calls.push(call.clone());
    if let Some(answer) = answerer {
        return Json(answer(&call)).into_response();
    }
    if let Some(secs) = limit {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", secs.to_string())],
            Json(json!({"ok": false, "error": "ratelimited"})),
        )
            .into_response();
    }
    let s = |k: &str| {
        body.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let answer = match method.as_str() {
        "chat.postMessage" => {
            let n = inner.ts.fetch_add(1, Ordering::SeqCst) + 1;
            let ts = format!("1700000000.{n:06}");
            json!({"ok": true, "channel": s("channel"), "ts": ts,
                   "message": {"type": "message", "ts": ts, "text": s("text"), "bot_id": "B1"}})
        }
        "chat.update" => json!({"ok": true, "channel": s("channel"), "ts": s("ts"), "text": s("text"),
                                "message": {"text": s("text")}}),
        "chat.postEphemeral" => json!({"ok": true, "message_ts": "1700000000.999999"}),
        "views.open" => {
            let mut view = body.get("view").cloned().unwrap_or(json!({}));
            if let Some(v) = view.as_object_mut() {
                v.insert("id".into(), json!("V1"));
                v.insert("team_id".into(), json!("T1"));
                v.insert("hash".into(), json!("1.abc"));
            }
            json!({"ok": true, "view": view})
        }
        "users.info" => {
            let user = s("user");
            match inner.emails.lock().unwrap().get(&user) {
                Some(email) => json!({"ok": true, "user": {"id": user, "team_id": "T1", "name": user,
                                                         "profile": {"email": email}}}),
                None => json!({"ok": false, "error": "user_not_found"}),
            }
        }
        // Slack answers with the user object, or `users_not_found`; the
        // email goes in the query (slack-morphism sends a GET).
        "users.lookupByEmail" => {
            let email = s("email");
            let found = inner
                .emails
                .lock()
                .unwrap()
                .iter()
                .find(|(_, e)| e.eq_ignore_ascii_case(&email))
                .map(|(id, e)| (id.clone(), e.clone()));
            match found {
                Some((id, email)) => json!({"ok": true, "user": {"id": id, "team_id": "T1", "name": id,
                                                                "deleted": false, "is_bot": false,
                                                                "profile": {"email": email}}}),
                None => json!({"ok": false, "error": "users_not_found"}),
            }
        }
        "conversations.open" => {
            let user = body
                .get("users")
                .and_then(|u| match u {
                    Value::Array(a) => a.first().and_then(Value::as_str).map(str::to_string),
                    Value::String(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            json!({"ok": true, "channel": {"id": format!("D{user}")}})
        }
        _ => json!({"ok": false, "error": "unknown_method"}),
    };
    Json(answer).into_response()
}

async fn response(
    State(inner): State<Arc<Inner>>,
    Path(n): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    inner.calls.push(Call {
        method: format!("response/{n}"),
        body: parse_body(&headers, &body, HashMap::new()),
        authorization: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        rate_limited: false,
    });
    (StatusCode::OK, "ok").into_response()
}
