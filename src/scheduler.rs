//! The scheduler: one actor that runs due timers from the store's timer
//! index. It holds no timers of its own — the store is the truth — so a
//! restart simply picks up where the last run stopped, overdue work first.
//!
//! Each wait is capped (`max_wait`) and the wall clock is re-read on every
//! wake, so a suspended machine or a clock jump makes it late by at most the
//! cap. Work runs concurrently up to `concurrency` timers at a time.
//!
//! While a directory failure is outstanding it probes the directory every
//! second (or `max_wait`, if shorter): the first answer wakes the
//! revocations waiting out a backoff (see `engine/outage.rs`).
//!
//! At most one timer per lease (or request) runs at a time: an `Expire`
//! commits the lease as revoking with a `Revoke` timer due at once and then
//! removes the membership itself, so starting that `Revoke` timer meanwhile
//! would only queue behind the lease's lock and commit a second time.
//!
//! Due `Expire` and `Revoke` timers found in one pass go together, up to
//! [`REVOCATION_BATCH`], to one [`Engine::fire_revocations`], which takes
//! one of the `concurrency` slots: a mass expiry is then one commit to start
//! each batch and few combined modifies, not a commit and a modify slot per
//! lease (see `engine/ends.rs`).

use crate::engine::{Engine, REVOCATION_BATCH};
use crate::store::{Timer, TimerKind};
use std::collections::{HashMap, HashSet};

/// What a timer works on: a lease, or a request (`RequestTimeout`). Ids of
/// the two kinds are kept apart.
type Subject = (bool, String);

fn subject(kind: TimerKind, id: &str) -> Subject {
    (kind == TimerKind::RequestTimeout, id.to_string())
}
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinSet;

#[derive(Clone, Debug)]
pub struct SchedulerSettings {
    pub max_wait: Duration,
    pub concurrency: usize,
}

impl Default for SchedulerSettings {
    fn default() -> Self {
        SchedulerSettings {
            max_wait: Duration::from_secs(60),
            concurrency: 32,
        }
    }
}

/// How often the directory is probed while failures are outstanding.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// Runs until `shutdown` turns true, then lets in-flight work finish.
pub async fn run(engine: Engine, settings: SchedulerSettings, mut shutdown: watch::Receiver<bool>) {
    let mut in_flight: HashSet<Subject> = HashSet::new();
    let mut tasks: JoinSet<()> = JoinSet::new();
    // Task id → its timers, so that even a panicking task frees its slot.
    let mut running: HashMap<tokio::task::Id, Vec<Subject>> = HashMap::new();
    let batch = settings.concurrency.max(1);
    let mut last_probe = std::time::Instant::now();
    tracing::info!(timers = engine.store().timer_count(), "scheduler started");
    loop {
        if *shutdown.borrow() {
            break;
        }
        let now = engine.now();
        // Start due work, skipping timers already being worked on.
        let mut next_due: Option<jitbot_core::Instant> = None;
        // Due revocations found in this pass: one task, one slot.
        let mut revocations: Vec<Timer> = Vec::new();
        // A subject in flight has at most one timer of each kind, so this
        // many due keys always include `batch` timers and a batch of
        // revocations of other subjects. Only due keys are read: a pass
        // costs what is due, not `REVOCATION_BATCH` keys of the schedule.
        let scan = in_flight.len() * (TimerKind::MAX as usize) + batch + REVOCATION_BATCH;
        if tasks.len() < batch {
            match engine.store().due_timers(now, scan) {
                Ok(timers) => {
                    let read = timers.len();
                    for Timer { due, kind, id } in timers {
                        let key = subject(kind, &id);
                        if in_flight.contains(&key) {
                            continue;
                        }
                        let slots_used = tasks.len() + usize::from(!revocations.is_empty());
                        let revocation = matches!(kind, TimerKind::Expire | TimerKind::Revoke);
                        let joins = revocation
                            && revocations.len() < REVOCATION_BATCH
                            && (!revocations.is_empty() || slots_used < batch);
                        if joins {
                            in_flight.insert(key);
                            revocations.push(Timer { due, kind, id });
                            continue;
                        }
                        if slots_used >= batch || revocation {
                            // No slot (or the batch is full): the next pass.
                            next_due = Some(next_due.map_or(due, |n| n.min(due)));
                            continue;
                        }
                        in_flight.insert(key.clone());
                        let engine = engine.clone();
                        let handle = tasks.spawn(async move { engine.fire(Timer { due, kind, id }).await });
                        running.insert(handle.id(), vec![key]);
                    }
                    if read < scan && next_due.is_none() {
                        // Every due timer was seen: sleep until the first
                        // one after them (a timer set meanwhile wakes us).
                        match engine.store().timers_from(read + 1) {
                            Ok(timers) => next_due = timers.into_iter().map(|t| t.due).find(|due| *due > now),
                            Err(e) => tracing::error!(error = %e, "cannot read timers; retrying"),
                        }
                    }
                }
                Err(e) => tracing::error!(error = %e, "cannot read timers; retrying"),
            }
        }
        if !revocations.is_empty() {
            let keys = revocations.iter().map(|t| subject(t.kind, &t.id)).collect();
            let engine = engine.clone();
            let handle = tasks.spawn(async move { engine.fire_revocations(revocations).await });
            running.insert(handle.id(), keys);
        }
        let mut wait = match next_due {
            Some(due) if tasks.len() < batch => (due - engine.now()).to_std().unwrap_or(Duration::ZERO),
            _ => settings.max_wait,
        }
        .min(settings.max_wait);
        if engine.directory_failing() {
            // Revocations are waiting out a backoff for the directory: ask
            // it whether it is back, so they run as soon as it is.
            let probe_every = settings.max_wait.min(PROBE_EVERY);
            if last_probe.elapsed() >= probe_every {
                last_probe = std::time::Instant::now();
                let engine = engine.clone();
                tokio::spawn(async move { engine.probe_directory().await });
            }
            wait = wait.min(probe_every);
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = engine.timers_changed().notified() => {}
            Some(done) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                let mut finished = vec![done];
                while let Some(more) = tasks.try_join_next_with_id() {
                    finished.push(more);
                }
                for result in finished {
                    let id = match result {
                        Ok((id, ())) => id,
                        Err(e) => {
                            tracing::error!(error = %e, "timer task failed; its timer stays and is retried");
                            e.id()
                        }
                    };
                    for key in running.remove(&id).unwrap_or_default() {
                        in_flight.remove(&key);
                    }
                }
            }
            _ = shutdown.changed() => {}
        }
    }
    tracing::info!(
        in_flight = tasks.len(),
        "scheduler stopping; finishing directory work in flight"
    );
    while tasks.join_next().await.is_some() {}
}
