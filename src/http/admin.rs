//! The admin API, behind a bearer token: what `jitbot leases|requests|audit`
//! call while `jitbot run` holds the store (sled allows one process).

use super::HttpState;
use crate::store::AuditEntry;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use jitbot_core::{LeaseId, RequestId};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/leases", get(leases))
        .route("/leases/{id}", get(lease))
        .route("/leases/{id}/revoke", post(revoke))
        .route("/requests", get(requests))
        .route("/requests/{id}/cancel", post(cancel))
        .route("/audit", get(audit))
        .route("/audit/verify", get(verify))
        .route("/audit/anchor", post(anchor))
        .route("/zsp", post(zsp))
        .route("/backup", get(backup))
}

/// Whether the request carries `Authorization: Bearer <token>`, compared in
/// constant time. Never true for an empty configured token: two empty slices
/// compare equal, and a missing header would then pass.
pub fn bearer_matches(headers: &axum::http::HeaderMap, token: &crate::secret::Secret) -> bool {
    if token.expose().trim().is_empty() {
        return false;
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    given.as_bytes().ct_eq(token.expose().as_bytes()).into()
}

/// Proof that the request carried the admin token; every handler takes it.
pub struct Admin;

impl FromRequestParts<HttpState> for Admin {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &HttpState) -> Result<Self, Self::Rejection> {
        let Some(token) = state.admin_token.as_ref() else {
            return Err((
                StatusCode::NOT_FOUND,
                "the admin API is off: set server.admin_token\n",
            )
                .into_response());
        };
        if bearer_matches(&parts.headers, token) {
            Ok(Admin)
        } else {
            tracing::warn!("admin API: refused a request with a missing or wrong token");
            Err((
                StatusCode::UNAUTHORIZED,
                "missing or wrong admin token (Authorization: Bearer ...)\n",
            )
                .into_response())
        }
    }
}

fn fail(e: impl std::fmt::Display) -> Response {
    (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response()
}

/// A lease as the admin API shows it.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct LeaseView {
    pub id: String,
    pub group: String,
    pub user: String,
    pub state: String,
    pub starts_at: String,
    pub expires_at: String,
    pub end_reason: Option<String>,
    pub added_by_jitbot: Option<bool>,
    pub revoke_attempts: u32,
    pub last_error: Option<String>,
}

impl From<&crate::store::LeaseRecord> for LeaseView {
    fn from(rec: &crate::store::LeaseRecord) -> Self {
        let l = &rec.lease;
        LeaseView {
            id: l.id.to_string(),
            group: l.group.to_string(),
            user: l.user.to_string(),
            state: l.state.describe().to_string(),
            starts_at: l.starts_at.to_rfc3339(),
            expires_at: l.expires_at.to_rfc3339(),
            end_reason: l.end_reason.as_ref().map(|r| r.describe()),
            added_by_jitbot: l.preexisting.map(|p| !p),
            revoke_attempts: l.revoke_attempts,
            last_error: l.last_error.clone(),
        }
    }
}

#[derive(Deserialize)]
struct LeaseFilter {
    #[serde(default)]
    all: bool,
}

async fn leases(_: Admin, State(s): State<HttpState>, Query(f): Query<LeaseFilter>) -> Response {
    let leases = if f.all {
        s.engine.store().leases()
    } else {
        s.engine.store().live_leases()
    };
    match leases {
        Ok(all) => Json(
            all.iter()
                .filter(|r| f.all || r.lease.state != jitbot_core::LeaseState::Ended)
                .map(LeaseView::from)
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => fail(e),
    }
}

async fn lease(_: Admin, State(s): State<HttpState>, Path(id): Path<String>) -> Response {
    match s.engine.store().lease(&LeaseId::new(id.as_str())) {
        Ok(Some(rec)) => Json(LeaseView::from(&rec)).into_response(),
        Ok(None) => (StatusCode::NOT_FOUND, format!("no lease {id}\n")).into_response(),
        Err(e) => fail(e),
    }
}

#[derive(Deserialize, Serialize)]
pub struct RevokeBody {
    pub reason: String,
    #[serde(default)]
    pub by: Option<String>,
}

async fn revoke(
    _: Admin,
    State(s): State<HttpState>,
    Path(id): Path<String>,
    Json(body): Json<RevokeBody>,
) -> Response {
    if body.reason.trim().is_empty() {
        return (StatusCode::BAD_REQUEST, "a reason is required\n").into_response();
    }
    let by = body.by.unwrap_or_else(|| "admin-api".into());
    match s.engine.revoke_as_admin(&id, &body.reason, &by).await {
        Ok(text) => (StatusCode::OK, format!("{text}\n")).into_response(),
        Err(e) => (StatusCode::CONFLICT, format!("{e}\n")).into_response(),
    }
}

/// A request as the admin API shows it.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct RequestView {
    pub id: String,
    pub group: String,
    pub requester: String,
    pub duration: String,
    pub reason: String,
    pub state: String,
    pub approvals: Vec<String>,
    pub break_glass_unreviewed: bool,
    pub created_at: String,
    /// `grant` or `extend`.
    pub kind: String,
    /// The lease this request produced, or the one it extends.
    pub lease: Option<String>,
}

#[derive(Deserialize)]
struct RequestFilter {
    #[serde(default)]
    all: bool,
}

async fn requests(_: Admin, State(s): State<HttpState>, Query(f): Query<RequestFilter>) -> Response {
    let store = s.engine.store();
    let requests = if f.all {
        store.requests()
    } else {
        // Only the pending and review indexes, never the whole history.
        store.pending_requests().and_then(|mut open| {
            open.extend(store.requests_awaiting_review()?);
            Ok(open)
        })
    };
    match requests {
        Ok(all) => Json(
            all.iter()
                .filter(|r| f.all || !r.request.state.is_final() || r.request.awaits_review())
                .map(|rec| {
                    let r = &rec.request;
                    RequestView {
                        id: r.id.to_string(),
                        group: r.group.to_string(),
                        requester: r.requester.to_string(),
                        duration: r.duration.to_string(),
                        reason: r.reason.clone(),
                        state: r.state.describe().to_string(),
                        approvals: r.approvals.iter().map(|a| a.by.to_string()).collect(),
                        break_glass_unreviewed: r.awaits_review(),
                        created_at: r.created_at.to_rfc3339(),
                        kind: match &r.kind {
                            jitbot_core::RequestKind::Grant => "grant".into(),
                            jitbot_core::RequestKind::Extend { .. } => "extend".into(),
                        },
                        lease: rec
                            .lease
                            .as_ref()
                            .map(ToString::to_string)
                            .or_else(|| match &r.kind {
                                jitbot_core::RequestKind::Extend { lease } => Some(lease.to_string()),
                                jitbot_core::RequestKind::Grant => None,
                            }),
                    }
                })
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => fail(e),
    }
}

async fn cancel(_: Admin, State(s): State<HttpState>, Path(id): Path<String>) -> Response {
    match s.engine.cancel_as_admin(&RequestId::new(id.as_str())).await {
        Ok(text) => (StatusCode::OK, format!("{text}\n")).into_response(),
        Err(e) => (StatusCode::CONFLICT, format!("{e}\n")).into_response(),
    }
}

#[derive(Deserialize)]
struct AuditQuery {
    /// RFC 3339 instant; records before it are skipped.
    since: Option<String>,
    #[serde(default)]
    format: Option<String>,
    /// The audit archive directory to read first (as this jitbot sees it);
    /// by default its `[store] archive_dir` when retention is on.
    archive: Option<String>,
}

async fn audit(_: Admin, State(s): State<HttpState>, Query(q): Query<AuditQuery>) -> Response {
    let since = match q.since.as_deref().map(chrono::DateTime::parse_from_rfc3339) {
        None => None,
        Some(Ok(t)) => Some(t.with_timezone(&chrono::Utc)),
        Some(Err(_)) => {
            return (
                StatusCode::BAD_REQUEST,
                "since must be RFC 3339, e.g. 2026-01-31T00:00:00Z\n",
            )
                .into_response()
        }
    };
    let store = s.engine.store();
    let archive = q
        .archive
        .as_deref()
        .map(std::path::Path::new)
        .or(store.archive_dir());
    let rows: Vec<AuditEntry> = match store.audit_with_archive(archive) {
        Ok(all) => all
            .into_iter()
            .filter(|e| since.is_none_or(|t| e.at >= t))
            .collect(),
        Err(e) => return fail(e),
    };
    let body = match q.format.as_deref().unwrap_or("jsonl") {
        "jsonl" => rows
            .iter()
            .map(|r| serde_json::to_string(r).unwrap_or_default() + "\n")
            .collect::<String>(),
        "csv" => crate::audit::to_csv(&rows),
        other => {
            return (
                StatusCode::BAD_REQUEST,
                format!("unknown format {other}: use jsonl or csv\n"),
            )
                .into_response()
        }
    };
    (StatusCode::OK, body).into_response()
}

#[derive(Deserialize)]
struct VerifyQuery {
    /// `SEQ:HASH`, as `jitbot audit anchor` printed it.
    anchor: Option<String>,
    /// An audit archive directory (as this jitbot sees it) to check with
    /// the store, from record 1.
    archive: Option<String>,
}

async fn verify(_: Admin, State(s): State<HttpState>, Query(q): Query<VerifyQuery>) -> Response {
    let anchor = match q
        .anchor
        .as_deref()
        .map(str::parse::<crate::store::Anchor>)
        .transpose()
    {
        Ok(a) => a,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    // Without one given, the last anchor jitbot recorded in audit.anchor_file.
    let anchor = match anchor {
        Some(a) => Some(a),
        None => match s.engine.store().last_published_anchor() {
            Ok(a) => a,
            Err(e) => return fail(e),
        },
    };
    let store = s.engine.store();
    let checked = match q.archive.as_deref() {
        Some(dir) => store.verify_audit_with_archive(std::path::Path::new(dir), anchor.as_ref()),
        None => store.verify_audit_against(anchor.as_ref()),
    };
    match checked {
        Ok(crate::store::AuditCheck::Intact { records }) => {
            let pinned = anchor
                .map(|a| format!("; it matches anchor {a}"))
                .unwrap_or_default();
            let from = match (&q.archive, store.audit_base()) {
                (Some(dir), _) => format!(" (archive {dir} and the store)"),
                (None, Ok(base)) if base.seq > 0 => format!(
                    " (from record {}: earlier ones are archived; add --archive DIR to check them)",
                    base.seq + 1
                ),
                _ => String::new(),
            };
            (
                StatusCode::OK,
                format!("audit chain intact: {records} records{from}{pinned}\n"),
            )
                .into_response()
        }
        Ok(crate::store::AuditCheck::Broken { seq, problem }) => (
            StatusCode::CONFLICT,
            format!("audit chain broken at record {seq}: {problem}\n"),
        )
            .into_response(),
        Err(e) => fail(e),
    }
}

async fn anchor(_: Admin, State(s): State<HttpState>) -> Response {
    match s.engine.publish_audit_anchor().await {
        Ok(anchor) => (StatusCode::OK, format!("{anchor}\n")).into_response(),
        Err(e) => fail(e),
    }
}

async fn zsp(_: Admin, State(s): State<HttpState>) -> Response {
    match s.engine.check_zsp().await {
        Ok(drift) => Json(
            drift
                .iter()
                .map(|d| serde_json::json!({"group": d.group.as_str(), "user": d.user.as_str(), "remediated": d.remediated}))
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => fail(e),
    }
}

async fn backup(_: Admin, State(s): State<HttpState>) -> Response {
    let mut out = Vec::new();
    match s.engine.store().backup(&mut out) {
        Ok(_) => (StatusCode::OK, out).into_response(),
        Err(e) => fail(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;
    use axum::http::{HeaderMap, HeaderValue};

    fn with_auth(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn an_empty_token_matches_nothing() {
        let empty = Secret::new("");
        assert!(!bearer_matches(&HeaderMap::new(), &empty));
        assert!(!bearer_matches(&with_auth("Bearer "), &empty));
        assert!(!bearer_matches(&with_auth("Bearer  "), &Secret::new(" ")));
        let token = Secret::new("0123456789abcdef0123");
        assert!(bearer_matches(&with_auth("Bearer 0123456789abcdef0123"), &token));
        assert!(!bearer_matches(&with_auth("Bearer 0123456789abcdef012"), &token));
        assert!(!bearer_matches(&HeaderMap::new(), &token));
    }
}
