//! The accept loop: HTTP/1.1 with a connection cap and timeouts for the
//! request head, the body and the whole request, so slow or idle clients
//! (slowloris) cannot hold every file descriptor.

use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use axum::response::IntoResponse;
use axum::Router;
use hyper::body::{Bytes, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tower::ServiceExt;

/// What one listener tolerates from its clients (the `[server]` keys of
/// the same names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; further ones wait in the kernel's backlog.
    pub max_connections: usize,
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

/// Serves `app` on an already-bound listener until `shutdown` turns true,
/// then lets in-flight requests finish (the caller bounds that wait).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        // A permit first: at the cap, new connections wait in the backlog
        // rather than costing a descriptor each.
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            _ = stopped(&mut shutdown) => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
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
        let _ = stream.set_nodelay(true);
        let service = hyper::service::service_fn({
            let app = app.clone();
            move |req: Request<Incoming>| handle(app.clone(), limits, req)
        });
        let conn = http.serve_connection(TokioIo::new(stream), service);
        let mut shutdown = shutdown.clone();
        connections.spawn(async move {
            let _permit = permit;
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
async fn handle(app: Router, limits: Limits, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let req = req.map(|body| Body::new(TimedBody::new(body, limits.body_read_timeout)));
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

/// A request body that fails once its deadline passes.
struct TimedBody {
    inner: Incoming,
    deadline: Pin<Box<tokio::time::Sleep>>,
    limit: Duration,
}

impl TimedBody {
    fn new(inner: Incoming, limit: Duration) -> Self {
        TimedBody {
            inner,
            deadline: Box::pin(tokio::time::sleep(limit)),
            limit,
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
            return Poll::Ready(frame.map(|f| f.map_err(BodyError::from)));
        }
        if this.deadline.as_mut().poll(cx).is_ready() {
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
