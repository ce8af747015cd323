//! Small helpers the fakes share: serve a router on a free loopback port,
//! wait for a condition, and record what a fake saw.

use axum::Router;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Serves `app` on `127.0.0.1:0`; returns `http://127.0.0.1:<port>`.
pub async fn serve(app: Router, what: &str) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind {what}: {e}"));
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}")
}

/// Polls `f` every 20 ms until it returns `Some`, for at most `timeout`;
/// panics with `what` (say what was awaited) when it never does.
pub async fn eventually<T>(timeout: Duration, what: &str, f: impl FnMut() -> Option<T>) -> T {
    match within(timeout, f).await {
        Some(v) => v,
        None => panic!("waited {timeout:?} for {what}"),
    }
}

/// Polls `f` every 20 ms until it returns `Some`, for at most `timeout`;
/// `None` when it never does (for a test that expects nothing to come).
pub async fn within<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Everything a fake saw, in order; cheap to clone, shared across tasks.
pub struct Recorder<T>(Arc<Mutex<Vec<T>>>);

impl<T> Clone for Recorder<T> {
    fn clone(&self) -> Self {
        Recorder(self.0.clone())
    }
}

impl<T> Default for Recorder<T> {
    fn default() -> Self {
        Recorder(Arc::default())
    }
}

impl<T: Clone> Recorder<T> {
    pub fn push(&self, item: T) {
        self.0.lock().unwrap().push(item);
    }

    pub fn all(&self) -> Vec<T> {
        self.0.lock().unwrap().clone()
    }

    pub fn matching(&self, pred: impl Fn(&T) -> bool) -> Vec<T> {
        self.all().into_iter().filter(|t| pred(t)).collect()
    }

    /// Waits up to `timeout` for an item matching `pred`.
    pub async fn wait_for(&self, timeout: Duration, what: &str, pred: impl Fn(&T) -> bool) -> T {
        eventually(timeout, what, || self.all().into_iter().find(|t| pred(t))).await
    }

    /// The first item matching `pred` within `timeout`, or `None`.
    pub async fn find_within(&self, timeout: Duration, pred: impl Fn(&T) -> bool) -> Option<T> {
        within(timeout, || self.all().into_iter().find(|t| pred(t))).await
    }
}
