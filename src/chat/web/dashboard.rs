//! The dashboard: active leases with their time left, pending requests, the
//! state of each zero-standing-privilege group, and the audit log. Read-only.
//! In production it sits behind the admin token; the demo serves it open.

use crate::engine::Engine;
use crate::http::admin::LeaseView;
use crate::secret::Secret;
use crate::store::AuditEntry;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use jitbot_core::request::RequestState;
use jitbot_core::LeaseState;
use serde::Serialize;
use std::collections::{BTreeSet, VecDeque};

const PAGE: &str = include_str!("dashboard.html");
/// Audit lines shown, newest first.
const AUDIT_LINES: usize = 200;

/// Who may read the dashboard's data.
#[derive(Clone, Debug)]
pub enum DashboardAccess {
    /// Only requests with `Authorization: Bearer <token>` (the page asks for it).
    Token(Secret),
    /// Everyone: for `jitbot demo` on a local port only.
    Demo,
}

#[derive(Clone)]
struct DashState {
    engine: Engine,
    access: DashboardAccess,
}

/// `GET /dashboard` (the page, which holds no data) and `GET /api/dashboard`
/// (the data, guarded by `access`). Mount it only when configured.
pub fn dashboard_routes(engine: Engine, access: DashboardAccess) -> Router {
    Router::new()
        .route("/dashboard", get(page))
        .route("/api/dashboard", get(data))
        .with_state(DashState { engine, access })
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

/// Proof that the caller may read the dashboard.
struct Allowed;

impl FromRequestParts<DashState> for Allowed {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &DashState) -> Result<Self, Self::Rejection> {
        let DashboardAccess::Token(token) = &state.access else {
            return Ok(Allowed);
        };
        if crate::http::admin::bearer_matches(&parts.headers, token) {
            Ok(Allowed)
        } else {
            Err((StatusCode::UNAUTHORIZED, "missing or wrong admin token\n").into_response())
        }
    }
}

/// Everything the dashboard shows.
#[derive(Serialize)]
pub struct DashboardView {
    /// `demo` when served without a token, else `admin`.
    pub mode: &'static str,
    pub now: String,
    pub leases: Vec<LiveLease>,
    pub pending: Vec<PendingRequest>,
    pub zsp: Vec<ZspGroup>,
    pub audit: Vec<AuditEntry>,
}

/// A lease that has not ended, with its time left by jitbot's clock (the
/// page counts down from there, so a skewed browser clock does not matter).
#[derive(Serialize)]
pub struct LiveLease {
    #[serde(flatten)]
    pub lease: LeaseView,
    pub remaining_secs: i64,
}

#[derive(Serialize)]
pub struct PendingRequest {
    pub id: String,
    pub group: String,
    pub requester: String,
    pub duration: String,
    pub reason: String,
    pub approvals: Vec<String>,
    pub needed: u32,
    pub decide_by: String,
}

/// A zero-standing-privilege group: its members against its live leases.
#[derive(Serialize)]
pub struct ZspGroup {
    pub group: String,
    pub dn: String,
    pub members: Vec<String>,
    pub leased: Vec<String>,
    /// Members without a lease: drift.
    pub unleased: Vec<String>,
    /// Set when the directory could not be read.
    pub error: Option<String>,
}

async fn data(_: Allowed, State(s): State<DashState>) -> Response {
    match view(&s.engine, matches!(s.access, DashboardAccess::Demo)).await {
        Ok(v) => ([(header::CACHE_CONTROL, "no-store")], Json(v)).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

async fn view(engine: &Engine, demo: bool) -> Result<DashboardView, crate::store::StoreError> {
    let now = engine.now();
    let leases = engine
        .store()
        .live_leases()?
        .iter()
        .filter(|r| r.lease.state != LeaseState::Ended)
        .map(|r| LiveLease {
            lease: LeaseView::from(r),
            remaining_secs: r.lease.remaining(now).num_seconds().max(0),
        })
        .collect();
    let pending = engine
        .store()
        .pending_requests()?
        .into_iter()
        .filter(|r| r.request.state == RequestState::Pending)
        .map(|rec| {
            let r = rec.request;
            PendingRequest {
                needed: engine
                    .policy()
                    .group(&r.group)
                    .map(|p| p.approvals_required)
                    .unwrap_or(1),
                id: r.id.to_string(),
                group: r.group.to_string(),
                requester: r.requester.to_string(),
                duration: r.duration.to_string(),
                reason: r.reason,
                approvals: r.approvals.iter().map(|a| a.by.to_string()).collect(),
                decide_by: r.decide_by.to_rfc3339(),
            }
        })
        .collect();
    let mut zsp = Vec::new();
    for g in engine.policy().groups.iter().filter(|g| g.zsp) {
        let leased: BTreeSet<String> = engine
            .store()
            .live_leases_in(&g.name)?
            .into_iter()
            .map(|(user, _)| user.to_string())
            .collect();
        let (members, error) = match engine.directory().list_members(&g.dn).await {
            Ok(m) => (m.into_iter().map(|u| u.to_string()).collect::<Vec<_>>(), None),
            Err(e) => (Vec::new(), Some(e.to_string())),
        };
        zsp.push(ZspGroup {
            group: g.name.to_string(),
            dn: g.dn.to_string(),
            unleased: members.iter().filter(|m| !leased.contains(*m)).cloned().collect(),
            members,
            leased: leased.into_iter().collect(),
            error,
        });
    }
    // Only the tail is shown; keep no more than that in memory while reading.
    let mut tail: VecDeque<AuditEntry> = VecDeque::with_capacity(AUDIT_LINES + 1);
    for entry in engine.store().audit(0) {
        tail.push_front(entry?);
        tail.truncate(AUDIT_LINES);
    }
    let audit: Vec<AuditEntry> = tail.into();
    Ok(DashboardView {
        mode: if demo { "demo" } else { "admin" },
        now: now.to_rfc3339(),
        leases,
        pending,
        zsp,
        audit,
    })
}
