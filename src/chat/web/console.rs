//! The console's HTTP side: the page, the message feed it polls, and the
//! command and button endpoints that hand the engine `(caller, command)`.

use super::{dashboard, DashboardAccess, WebConsole, CHANNEL, PLATFORM};
use crate::chat::inbound::{self, Click};
use crate::engine::{Caller, Engine, Reply};
use crate::ports::ChatRef;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use jitbot_core::command::{Action, Command};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

const PAGE: &str = include_str!("console.html");

#[derive(Clone)]
struct ConsoleState {
    engine: Engine,
    console: Arc<WebConsole>,
    users: Arc<Vec<String>>,
}

/// The console page and its API, plus the dashboard without a token.
/// Anyone who can reach these routes can act as any of `users`: mount them
/// for the demo only.
pub fn routes(engine: Engine, console: Arc<WebConsole>, users: Vec<String>) -> Router {
    let state = ConsoleState {
        engine: engine.clone(),
        console,
        users: Arc::new(users),
    };
    Router::new()
        .route("/", get(page))
        .route("/api/users", get(list_users))
        .route("/api/messages", get(messages))
        .route("/api/command", post(command))
        .route("/api/action", post(action))
        .with_state(state)
        .merge(dashboard::dashboard_routes(engine, DashboardAccess::Demo))
}

async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        PAGE,
    )
}

/// A demo user and what the policy lets them do, for the "who are you" picker.
#[derive(Serialize)]
struct UserView {
    id: String,
    requests: Vec<String>,
    approves: Vec<String>,
}

async fn list_users(State(s): State<ConsoleState>) -> Json<Vec<UserView>> {
    let policy = s.engine.policy();
    let users = s
        .users
        .iter()
        .map(|id| {
            let user = jitbot_core::UserId::new(id.as_str());
            let names = |pick: &dyn Fn(&jitbot_core::policy::GroupPolicy) -> bool| {
                policy
                    .groups
                    .iter()
                    .filter(|g| pick(g))
                    .map(|g| g.name.to_string())
                    .collect()
            };
            UserView {
                id: id.clone(),
                requests: names(&|g| g.requesters.users.contains(&user)),
                approves: names(&|g| g.approvers.users.contains(&user)),
            }
        })
        .collect();
    Json(users)
}

#[derive(Deserialize)]
struct Since {
    #[serde(default)]
    after: u64,
    user: Option<String>,
}

async fn messages(State(s): State<ConsoleState>, Query(q): Query<Since>) -> Response {
    let changes = s.console.changes(q.after, q.user.as_deref());
    ([(header::CACHE_CONTROL, "no-store")], Json(changes)).into_response()
}

/// What the page sends for a typed command.
#[derive(Deserialize)]
struct CommandBody {
    user: String,
    text: String,
}

/// What the page sends for a button click.
#[derive(Deserialize)]
struct ActionBody {
    user: String,
    action: String,
    reason: Option<String>,
}

/// The reply, shown only to whoever sent the command.
#[derive(Serialize)]
struct ReplyView {
    ok: bool,
    text: String,
}

impl From<Reply> for ReplyView {
    fn from(r: Reply) -> Self {
        ReplyView {
            ok: r.ok,
            text: r.text,
        }
    }
}

impl ConsoleState {
    fn caller(&self, user: &str) -> Result<Caller, Response> {
        if !self.users.iter().any(|u| u == user) {
            let msg = format!(
                "unknown demo user `{user}`; pick one of: {}",
                self.users.join(", ")
            );
            return Err((
                StatusCode::BAD_REQUEST,
                Json(ReplyView::from(Reply::refused(msg))),
            )
                .into_response());
        }
        Ok(Caller::new(
            user,
            Some(ChatRef {
                platform: PLATFORM.into(),
                user: user.into(),
                channel: Some(CHANNEL.into()),
            }),
        ))
    }
}

async fn command(State(s): State<ConsoleState>, Json(body): Json<CommandBody>) -> Response {
    let caller = match s.caller(&body.user) {
        Ok(c) => c,
        Err(r) => return r,
    };
    // The page may send `/jit request ...` or just `request ...`.
    let text = body.text.trim();
    let text = text.strip_prefix("/jit").unwrap_or(text);
    let reply = match Command::parse(text) {
        Ok(cmd) => s.engine.execute(&caller, cmd).await,
        Err(e) => Reply::refused(e.to_string()),
    };
    Json(ReplyView::from(reply)).into_response()
}

async fn action(State(s): State<ConsoleState>, Json(body): Json<ActionBody>) -> Response {
    let caller = match s.caller(&body.user) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let action = match Action::parse(&body.action) {
        Ok(a) => a,
        Err(e) => return Json(ReplyView::from(Reply::refused(e.to_string()))).into_response(),
    };
    let command = match inbound::click(&s.engine, &action) {
        Click::Run(command) => command,
        // The page asks for the reason before it sends a Deny.
        Click::AskDenyReason { request } => {
            match inbound::deny(&request, body.reason.as_deref().unwrap_or_default()) {
                Ok(command) => command,
                Err(text) => return Json(ReplyView::from(Reply::refused(text))).into_response(),
            }
        }
        Click::Answer(text) => return Json(ReplyView::from(Reply::refused(text))).into_response(),
    };
    Json(ReplyView::from(s.engine.execute(&caller, command).await)).into_response()
}
