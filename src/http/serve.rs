//! The accept loop: HTTP/1.1 with a connection cap, a per-address cap and
//! timeouts for the request head, the body and the whole request, so slow or
//! idle clients (slowloris) cannot hold every file descriptor. At the cap a
//! new connection replaces the oldest one still waiting for its request
//! headers (after 100 ms) or still reading its request body (after 1 s), so
//! a flood of idle sockets or of trickling bodies cannot make real requests
//! queue behind it for several timeouts.

use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use axum::response::IntoResponse;
use axum::Router;
use hyper::body::{Bytes, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tower::ServiceExt;

/// What one listener tolerates from its clients (the `[server]` keys of
/// the same names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once. At the cap a new connection replaces
    /// the oldest one that has not sent complete request headers, or that
    /// has been reading its request body for over a second; only when every
    /// connection is serving a request do new ones wait in the kernel's
    /// backlog.
    pub max_connections: usize,
    /// Connections from one IP address at once; more are closed on accept.
    pub max_connections_per_ip: usize,
    /// Longest wait for a request line and headers, idle keep-alive included.
    pub header_read_timeout: Duration,
    /// Longest wait for a whole request body once the headers are in.
    pub body_read_timeout: Duration,
    /// Longest time from the headers to the response.
    pub request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 512,
            max_connections_per_ip: 64,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// Resolves once `shutdown` is true (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    while !*shutdown.borrow() {
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

/// Where a connection is in its request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for a request's headers, since then: sheddable after
    /// [`SHED_GRACE`].
    Headers(std::time::Instant),
    /// Headers in, still reading the request body, since then: sheddable
    /// after [`BODY_SHED_GRACE`].
    Body(std::time::Instant),
    /// The whole request is in and being answered: never shed.
    Serving,
}

/// One open connection, as the accept loop sees it.
struct Conn {
    ip: IpAddr,
    phase: Phase,
    /// Told to close the connection when it is shed.
    shed: Arc<Notify>,
}

/// The connections a listener holds.
#[derive(Default)]
struct Conns {
    next_id: u64,
    open: HashMap<u64, Conn>,
    per_ip: HashMap<IpAddr, usize>,
}

impl Conns {
    /// The connection to shed first (waiting for its headers or reading
    /// its body, the one whose grace ends first), and when it may be shed.
    fn next_to_shed(&self) -> Option<(u64, std::time::Instant)> {
        self.open
            .iter()
            .filter_map(|(id, c)| match c.phase {
                Phase::Headers(since) => Some((since + SHED_GRACE, *id)),
                Phase::Body(since) => Some((since + BODY_SHED_GRACE, *id)),
                Phase::Serving => None,
            })
            .min()
            .map(|(at, id)| (id, at))
    }

    fn remove(&mut self, id: u64) -> Option<Conn> {
        let conn = self.open.remove(&id)?;
        if let Some(n) = self.per_ip.get_mut(&conn.ip) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&conn.ip);
            }
        }
        Some(conn)
    }
}

/// How long a connection may wait for its request headers before a new
/// connection at the cap may replace it: time for a client to send them
/// right after connecting, short enough that a flood of idle sockets delays
/// a real request by a fraction of a second per `max_connections` of them.
const SHED_GRACE: Duration = Duration::from_millis(100);

/// How long a connection may read its request body before a new connection
/// at the cap may replace it. The bodies jitbot takes are small chat
/// payloads (a few KB) that arrive with their headers or a round trip after;
/// a second is generous even across the internet, and short enough that
/// bodies trickled a byte at a time from a few addresses cannot hold every
/// connection past Slack's 3 s deadline. Only at the cap is anyone shed.
const BODY_SHED_GRACE: Duration = Duration::from_secs(1);

/// Whether the accept loop may take a connection.
enum Room {
    Now,
    /// At the cap; the next connection to shed can be shed after this.
    After(Duration),
    /// At the cap and every connection is answering a whole request.
    Busy,
}

/// The registry shared by the accept loop, the connections and their
/// requests.
#[derive(Default)]
struct Registry {
    conns: Mutex<Conns>,
    /// A connection closed or finished a request: the accept loop, waiting
    /// at the cap with every connection busy, looks again.
    changed: Notify,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Conns> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a new connection can be taken now: below the cap, or one to
    /// shed; else how long until one can be shed, if any.
    fn room(&self, max: usize) -> Room {
        let conns = self.lock();
        if conns.open.len() < max {
            return Room::Now;
        }
        match conns.next_to_shed() {
            None => Room::Busy,
            Some((_, at)) => match at.checked_duration_since(std::time::Instant::now()) {
                Some(left) if !left.is_zero() => Room::After(left),
                _ => Room::Now,
            },
        }
    }

    /// A request's headers are in: it reads its body (sheddable after
    /// [`BODY_SHED_GRACE`]) unless it has none.
    fn request_started(&self, id: u64, has_body: bool) {
        if let Some(c) = self.lock().open.get_mut(&id) {
            c.phase = match has_body {
                true => Phase::Body(std::time::Instant::now()),
                false => Phase::Serving,
            };
        }
    }

    /// The request's body was read (or given up by its handler): the
    /// connection is answering it and is no longer shed.
    fn body_read(&self, id: u64) {
        if let Some(c) = self.lock().open.get_mut(&id) {
            if matches!(c.phase, Phase::Body(_)) {
                c.phase = Phase::Serving;
            }
        }
    }

    /// The response is out: the connection waits for its next request.
    fn request_done(&self, id: u64) {
        if let Some(c) = self.lock().open.get_mut(&id) {
            c.phase = Phase::Headers(std::time::Instant::now());
        }
        self.changed.notify_one();
    }

    fn closed(&self, id: u64) {
        self.lock().remove(id);
        self.changed.notify_one();
    }
}

/// Removes a connection from the registry when its task ends, however.
struct Registered(Arc<Registry>, u64);

impl Drop for Registered {
    fn drop(&mut self) {
        self.0.closed(self.1);
    }
}

/// What to do with a connection just accepted.
enum Admission {
    /// Served, under this id, told to close through this.
    Serve(u64, Arc<Notify>),
    /// Closed at once: its address holds `max_connections_per_ip` already.
    PerIpCap,
    /// Closed at once: at the cap, and no connection can be shed (rare: one
    /// turned busy between the check and the accept).
    Full,
}

fn admit(registry: &Registry, ip: IpAddr, limits: &Limits) -> Admission {
    let mut conns = registry.lock();
    if conns.per_ip.get(&ip).copied().unwrap_or(0) >= limits.max_connections_per_ip.max(1) {
        return Admission::PerIpCap;
    }
    if conns.open.len() >= limits.max_connections.max(1) {
        let Some(victim) = conns
            .next_to_shed()
            .filter(|(_, at)| *at <= std::time::Instant::now())
            .map(|(id, _)| id)
        else {
            return Admission::Full;
        };
        if let Some(victim) = conns.remove(victim) {
            victim.shed.notify_one();
        }
    }
    let id = conns.next_id;
    conns.next_id += 1;
    let shed = Arc::new(Notify::new());
    conns.open.insert(
        id,
        Conn {
            ip,
            phase: Phase::Headers(std::time::Instant::now()),
            shed: shed.clone(),
        },
    );
    *conns.per_ip.entry(ip).or_insert(0) += 1;
    Admission::Serve(id, shed)
}

/// Serves `app` on an already-bound listener until `shutdown` turns true,
/// then lets in-flight requests finish (the caller bounds that wait).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let registry = Arc::new(Registry::default());
    let max = limits.max_connections.max(1);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let mut connections = JoinSet::new();
    'accept: loop {
        while connections.try_join_next().is_some() {}
        // At the cap, new connections wait in the backlog (rather than cost
        // a descriptor each) until an idle one can be shed or, when every
        // connection is serving a request, until one is done.
        loop {
            let wait = match registry.room(max) {
                Room::Now => break,
                Room::After(left) => left,
                Room::Busy => Duration::from_secs(3600),
            };
            tokio::select! {
                _ = registry.changed.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = stopped(&mut shutdown) => break 'accept,
            }
        }
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors or a connection reset before
                    // accept: wait a little rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => break,
        };
        let (id, shed) = match admit(&registry, peer.ip(), &limits) {
            Admission::Serve(id, shed) => (id, shed),
            Admission::PerIpCap => {
                tracing::debug!(peer = %peer.ip(), "closed a connection: server.max_connections_per_ip reached");
                continue;
            }
            Admission::Full => {
                tracing::debug!(peer = %peer.ip(), "closed a connection: server.max_connections reached, all busy");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let service = hyper::service::service_fn({
            let app = app.clone();
            let registry = registry.clone();
            move |req: Request<Incoming>| {
                let (app, registry) = (app.clone(), registry.clone());
                async move {
                    registry.request_started(id, !hyper::body::Body::is_end_stream(req.body()));
                    let done = BodyDone(registry.clone(), id);
                    let response = handle(app, limits, req, done).await;
                    registry.request_done(id);
                    response
                }
            }
        });
        let conn = http.serve_connection(TokioIo::new(stream), service);
        let mut shutdown = shutdown.clone();
        let registered = Registered(registry.clone(), id);
        connections.spawn(async move {
            let _registered = registered;
            let mut conn = std::pin::pin!(conn);
            let mut draining = false;
            loop {
                tokio::select! {
                    done = conn.as_mut() => {
                        if let Err(e) = done {
                            tracing::debug!(error = %e, "connection closed");
                        }
                        break;
                    }
                    _ = shed.notified(), if !draining => {
                        tracing::debug!("shed a connection still waiting for its headers or body: server.max_connections reached");
                        break;
                    }
                    _ = stopped(&mut shutdown), if !draining => {
                        draining = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
        });
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// One request: the body behind its read timeout, the whole under the
/// request timeout.
async fn handle(
    app: Router,
    limits: Limits,
    req: Request<Incoming>,
    done: BodyDone,
) -> Result<Response<Body>, Infallible> {
    let req = req.map(|body| Body::new(TimedBody::new(body, limits.body_read_timeout, done)));
    match tokio::time::timeout(limits.request_timeout, app.oneshot(req)).await {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(never)) => match never {},
        Err(_) => {
            tracing::warn!(
                limit = ?limits.request_timeout,
                "a request took longer than server.request_timeout; answered 503"
            );
            Ok((
                StatusCode::SERVICE_UNAVAILABLE,
                "the request took too long (server.request_timeout)\n",
            )
                .into_response())
        }
    }
}

/// Tells the registry, once, that a connection's request body was read (or
/// dropped unread): from then on the connection is not shed.
struct BodyDone(Arc<Registry>, u64);

impl Drop for BodyDone {
    fn drop(&mut self) {
        self.0.body_read(self.1);
    }
}

/// A request body that fails once its deadline passes.
struct TimedBody {
    inner: Incoming,
    deadline: Pin<Box<tokio::time::Sleep>>,
    limit: Duration,
    /// Dropped when the body ends, fails, or is dropped.
    done: Option<BodyDone>,
}

impl TimedBody {
    fn new(inner: Incoming, limit: Duration, done: BodyDone) -> Self {
        TimedBody {
            inner,
            deadline: Box::pin(tokio::time::sleep(limit)),
            limit,
            done: Some(done),
        }
    }
}

/// Why a body could not be read.
#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error("the request body did not arrive within {0:?} (server.body_read_timeout)")]
    TooSlow(Duration),
    #[error(transparent)]
    Read(#[from] hyper::Error),
}

impl hyper::body::Body for TimedBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            if !matches!(frame, Some(Ok(_))) || this.inner.is_end_stream() {
                this.done = None;
            }
            return Poll::Ready(frame.map(|f| f.map_err(BodyError::from)));
        }
        if this.deadline.as_mut().poll(cx).is_ready() {
            this.done = None;
            return Poll::Ready(Some(Err(BodyError::TooSlow(this.limit))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;

    #[tokio::test]
    async fn a_slow_handler_is_answered_503_at_the_request_timeout() {
        let app = Router::new()
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    "late"
                }),
            )
            .route("/fast", get(|| async { "ok" }));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = Limits {
            request_timeout: Duration::from_millis(300),
            ..Limits::default()
        };
        let (stop, stopped) = watch::channel(false);
        let server = tokio::spawn(serve(listener, app, limits, stopped));
        let http = reqwest::Client::new();
        let started = std::time::Instant::now();
        let slow = http.get(format!("http://{addr}/slow")).send().await.unwrap();
        assert_eq!(slow.status(), 503);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert!(slow.text().await.unwrap().contains("server.request_timeout"));
        let fast = http.get(format!("http://{addr}/fast")).send().await.unwrap();
        assert_eq!(fast.text().await.unwrap(), "ok");
        stop.send(true).unwrap();
        drop(http);
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the server stops when told")
            .unwrap()
            .unwrap();
    }
}
