//! Handler work a chat adapter has already acknowledged (a Socket Mode ack,
//! an HTTP 200, a deferred Discord answer) and so still owes the person:
//! every such task is counted, and a graceful stop waits for the count to
//! reach zero (bounded by `server.shutdown_grace`) before the process exits.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// The acknowledged work still running in this process.
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
/// Woken each time a task of [`IN_FLIGHT`] ends.
static ENDED: Notify = Notify::const_new();

/// Counts one task until it ends (or is dropped by the runtime).
struct Counted;

impl Counted {
    fn new() -> Counted {
        IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
        Counted
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
        ENDED.notify_waiters();
    }
}

/// Runs acknowledged handler work in a task a graceful stop waits for.
pub fn spawn<F>(work: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let counted = Counted::new();
    tokio::spawn(async move {
        let _counted = counted;
        work.await
    })
}

/// How many acknowledged tasks are still running.
pub fn in_flight() -> usize {
    IN_FLIGHT.load(Ordering::SeqCst)
}

/// Waits until no acknowledged work is running. Callers bound it with the
/// shutdown grace.
pub async fn finished() {
    loop {
        let ended = ENDED.notified();
        tokio::pin!(ended);
        // Registered before the count is read, so no wake-up is missed.
        ended.as_mut().enable();
        if in_flight() == 0 {
            return;
        }
        ended.await;
    }
}
