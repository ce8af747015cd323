//! The outbox worker: delivers the notices and approval cards the engine
//! wrote durably with each transition, to each destination (chat platform)
//! on its own. Each entry has, per destination, a stored attempt count and
//! due time: an engine wake-up only looks for due work, so it never bypasses
//! a backoff; a destination that fails or is rate limited (even forever)
//! delays nobody else; alerts are retried until delivered. Delivery never
//! holds up a grant or a revocation: those were committed before the notice
//! was queued. With replicas only the leader delivers, and only within its
//! term ([`Tenure`]).

use crate::engine::Engine;
use crate::ports::{Audience, ChatError, CopyLog, MessageRef, Notifier, PostError};
use crate::store::leader::Window;
use crate::store::{OutboxItem, OutboxJob, RequestRecord, Store, StoreError};
use jitbot_core::backoff::retry_delay;
use jitbot_core::request::RequestState;
use jitbot_core::{Instant, RequestId};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};

/// Refusals after which an ordinary notice or card update is given up on
/// one destination (and logged as lost): only a platform's permanent "no"
/// (a deleted channel, a missing scope) ends delivery. An outage or a rate
/// limit is waited out however long it lasts, for every item. Alerts, and
/// cards of requests still pending, are never given up.
pub const MAX_ATTEMPTS: u32 = 8;
/// The longest a worker sleeps before looking at its queue again.
const MAX_WAIT: Duration = Duration::from_secs(30);
/// Entries taken per pass.
const BATCH: usize = 64;
/// The name of the one destination of a notifier with no [`Notifier::platforms`].
const SINGLE: &str = "chat";
/// The longest pause a platform's rate limit imposes.
const MAX_PAUSE: u64 = 3600;

/// One destination, borrowed for a pass.
#[derive(Clone, Copy)]
struct Dest<'a> {
    name: &'a str,
    notifier: &'a dyn Notifier,
    /// Only the card messages of this platform are its to update (false for
    /// a single notifier, which owns them all).
    own_messages_only: bool,
}

impl Dest<'_> {
    fn owns(&self, m: &MessageRef) -> bool {
        !self.own_messages_only || m.platform == self.name
    }
}

/// The destinations of `notifier` by name, with whether each owns only its
/// own messages.
fn destinations(notifier: &Arc<dyn Notifier>) -> Vec<(String, Arc<dyn Notifier>, bool)> {
    let platforms = notifier.platforms();
    if platforms.is_empty() {
        vec![(SINGLE.to_string(), notifier.clone(), false)]
    } else {
        platforms.into_iter().map(|(name, n)| (name, n, true)).collect()
    }
}

/// Which destinations an item goes to: a notice for a person goes only to
/// the platform they talked to jitbot on; everything else goes everywhere
/// (a card update finds its messages on each).
fn targets(item: &OutboxItem, dests: &[(String, bool)]) -> Vec<String> {
    dests
        .iter()
        .filter(|(name, own_only)| match item {
            OutboxItem::Send { notice } => match &notice.to {
                Audience::User { chat: Some(chat), .. } if *own_only => chat.platform == *name,
                _ => true,
            },
            _ => true,
        })
        .map(|(name, _)| name.clone())
        .collect()
}

/// Queues new entries on their destinations.
fn fan_out(engine: &Engine, dests: &[(String, bool)]) {
    loop {
        match engine
            .store()
            .outbox_fan_out(engine.now(), 256, |item| targets(item, dests))
        {
            Ok(n) if n > 0 => continue,
            Ok(_) => return,
            Err(e) => {
                tracing::error!(error = %e, "cannot queue new notices; will try again");
                return;
            }
        }
    }
}

/// Drops deliveries queued on platforms no longer configured.
fn forget_unconfigured(engine: &Engine, dests: &[(String, bool)]) {
    let queued = match engine.store().outbox_destinations() {
        Ok(q) => q,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the outbox");
            return;
        }
    };
    for gone in queued.iter().filter(|q| !dests.iter().any(|(d, _)| d == *q)) {
        match engine.store().outbox_drop_destination(gone) {
            Ok(items) => tracing::warn!(
                platform = %gone,
                count = items.len(),
                ?items,
                "notices queued for a platform that is no longer configured were dropped"
            ),
            Err(e) => {
                tracing::error!(platform = %gone, error = %e, "cannot drop notices of an unconfigured platform")
            }
        }
    }
}

/// Runs until shutdown: one task fans new entries out, one task per
/// destination delivers its queue.
pub async fn run(engine: Engine, notifier: Arc<dyn Notifier>, shutdown: watch::Receiver<bool>) {
    run_for_term(engine, notifier, shutdown.clone(), shutdown).await
}

/// [`run`] on a leader: until `stop` turns true (its term ended, or
/// shutdown). Only at `shutdown` does each destination make a last pass,
/// and only within the term; a stop for a lost term leaves the queue to the
/// next leader at once.
pub async fn run_for_term(
    engine: Engine,
    notifier: Arc<dyn Notifier>,
    mut stop: watch::Receiver<bool>,
    shutdown: watch::Receiver<bool>,
) {
    let dests = destinations(&notifier);
    let names: Vec<(String, bool)> = dests.iter().map(|(n, _, own)| (n.clone(), *own)).collect();
    forget_unconfigured(&engine, &names);
    let (stop_workers, stopped) = watch::channel(false);
    let mut workers = tokio::task::JoinSet::new();
    let mut wakes = Vec::new();
    for (name, n, own) in dests {
        let wake = Arc::new(Notify::new());
        wakes.push(wake.clone());
        let signals = Signals {
            stop: stopped.clone(),
            shutdown: shutdown.clone(),
        };
        workers.spawn(deliver_loop(engine.clone(), name, n, own, wake, signals));
    }
    loop {
        fan_out(&engine, &names);
        for w in &wakes {
            w.notify_one();
        }
        tokio::select! {
            _ = tokio::time::sleep(MAX_WAIT) => {}
            _ = engine.outbox_changed().notified() => {}
            r = stop.changed() => {
                if r.is_err() || *stop.borrow() {
                    if *shutdown.borrow() {
                        // Queue what the last transitions wrote; each
                        // destination then makes one last pass, so
                        // announcements of final revocations go out.
                        fan_out(&engine, &names);
                    }
                    let _ = stop_workers.send(true);
                    while workers.join_next().await.is_some() {}
                    return;
                }
            }
        }
    }
}

/// What ends a destination's worker: `stop` (the term or the process
/// ended), and whether that is `shutdown` (a last pass is owed).
struct Signals {
    stop: watch::Receiver<bool>,
    shutdown: watch::Receiver<bool>,
}

/// The window in which this replica may post: always without leadership
/// (sled, or a store that never asked to lead); with replicas, only before
/// its term's step-down point ([`Store::acts_until`]), the bound its
/// directory calls keep too. Checked before every post, so a leader paused
/// past its term (a VM pause, a stall) and resumed posts nothing the next
/// leader may have delivered, but the one post in flight when it paused.
/// The last step-down point seen is kept: at shutdown the leadership loop
/// forgets the term before the worker's last pass, which may still post
/// until then (no other replica acts before it).
struct Tenure {
    until: Mutex<Option<std::time::Instant>>,
}

impl Tenure {
    fn new(store: &Store) -> Tenure {
        let tenure = Tenure {
            until: Mutex::new(None),
        };
        tenure.open(store);
        tenure
    }

    /// Whether this replica may post now.
    fn open(&self, store: &Store) -> bool {
        if store.directory_window() == Window::Unbounded {
            return true;
        }
        let mut until = self.until.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(now_until) = store.acts_until() {
            *until = Some(now_until);
        }
        until.is_some_and(|u| std::time::Instant::now() < u)
    }

    /// [`Tenure::open`] as a delivery error, for the checks inside one
    /// delivery (before each post or update of a card's copies).
    fn check(&self, store: &Store) -> Result<(), ChatError> {
        if self.open(store) {
            return Ok(());
        }
        Err(ChatError::Unavailable(
            "this replica's term as leader ended; the next leader delivers the rest".into(),
        ))
    }
}

/// Wall-clock time that never runs behind the monotonic clock. Due times are
/// stored in wall-clock (they survive a restart), but a backward step of
/// the wall clock must not stall deliveries, and waits are measured on the
/// monotonic clock.
struct Floor {
    wall: Instant,
    at: tokio::time::Instant,
}

impl Floor {
    fn new(wall: Instant) -> Floor {
        Floor {
            wall,
            at: tokio::time::Instant::now(),
        }
    }

    fn now(&mut self, wall: Instant) -> Instant {
        let elapsed = chrono::Duration::from_std(self.at.elapsed()).unwrap_or_default();
        let now = wall.max(self.wall + elapsed);
        self.wall = now;
        self.at = tokio::time::Instant::now();
        now
    }
}

async fn deliver_loop(
    engine: Engine,
    name: String,
    notifier: Arc<dyn Notifier>,
    own_messages_only: bool,
    wake: Arc<Notify>,
    signals: Signals,
) {
    let Signals { mut stop, shutdown } = signals;
    let dest = Dest {
        name: &name,
        notifier: notifier.as_ref(),
        own_messages_only,
    };
    let tenure = Tenure::new(engine.store());
    let mut clock = Floor::new(engine.now());
    // A rate limit pauses the whole destination, whatever wakes it.
    let mut resume_at = tokio::time::Instant::now();
    loop {
        let wait = if tokio::time::Instant::now() >= resume_at {
            let pass = deliver_due(&engine, dest, &tenure, clock.now(engine.now())).await;
            if let Some(pause) = pass.pause {
                resume_at = tokio::time::Instant::now() + pause;
            }
            pass.wait()
        } else {
            resume_at - tokio::time::Instant::now()
        };
        tokio::select! {
            _ = tokio::time::sleep(wait.min(MAX_WAIT)) => {}
            _ = wake.notified() => {}
            r = stop.changed() => {
                if r.is_err() || *stop.borrow() {
                    // A lost term leaves the queue to the next leader; at
                    // shutdown, a last pass within the term.
                    if *shutdown.borrow() && tokio::time::Instant::now() >= resume_at {
                        deliver_due(&engine, dest, &tenure, clock.now(engine.now())).await;
                    }
                    return;
                }
            }
        }
    }
}

/// What one pass over a destination's queue found.
#[derive(Debug, Default)]
struct Pass {
    /// Until the next entry is due; `None` when the queue is empty.
    next_due: Option<Duration>,
    /// The platform asked for a pause (rate limit).
    pause: Option<Duration>,
}

impl Pass {
    fn wait(&self) -> Duration {
        match (self.pause, self.next_due) {
            (Some(p), Some(d)) => p.max(d),
            (Some(p), None) => p,
            (None, Some(d)) => d,
            (None, None) => MAX_WAIT,
        }
    }
}

/// One pass: delivers (in due order) what is due on every destination of
/// `notifier` at the engine's time, one destination after the other, and
/// returns how long until something is due again (30 s when nothing is
/// queued). The worker ([`run`])
/// runs destinations concurrently instead; this is for tests, benchmarks
/// and one-off drains.
pub async fn drain(engine: &Engine, notifier: &dyn Notifier) -> Duration {
    let platforms = notifier.platforms();
    let dests: Vec<Dest<'_>> = if platforms.is_empty() {
        vec![Dest {
            name: SINGLE,
            notifier,
            own_messages_only: false,
        }]
    } else {
        platforms
            .iter()
            .map(|(name, n)| Dest {
                name,
                notifier: n.as_ref(),
                own_messages_only: true,
            })
            .collect()
    };
    let names: Vec<(String, bool)> = dests
        .iter()
        .map(|d| (d.name.to_string(), d.own_messages_only))
        .collect();
    fan_out(engine, &names);
    let tenure = Tenure::new(engine.store());
    let mut wait = None::<Duration>;
    for dest in dests {
        let pass = deliver_due(engine, dest, &tenure, engine.now()).await;
        if pass.pause.is_some() || pass.next_due.is_some() {
            let this = pass.wait();
            wait = Some(wait.map_or(this, |w| w.min(this)));
        }
    }
    wait.unwrap_or(MAX_WAIT)
}

/// Delivers what is due on `dest` at `now`, while `tenure` is open.
async fn deliver_due(engine: &Engine, dest: Dest<'_>, tenure: &Tenure, now: Instant) -> Pass {
    let store = engine.store();
    // The term ended: the rest of the batch (read from this replica's
    // mirror, perhaps before a pause) is the next leader's, and so is the
    // outcome of a delivery cut short by the end of the term.
    let ended = || {
        tracing::info!(
            platform = dest.name,
            "this replica's term as leader ended; it delivers no more notices"
        );
        Pass {
            next_due: Some(Duration::from_secs(1)),
            pause: None,
        }
    };
    let jobs = match store.outbox_due(dest.name, now, BATCH) {
        Ok(jobs) => jobs,
        Err(e) => {
            tracing::error!(platform = dest.name, error = %e, "cannot read the outbox; will try again");
            return Pass {
                next_due: Some(Duration::from_secs(5)),
                pause: None,
            };
        }
    };
    let full = jobs.len() == BATCH;
    for job in jobs {
        if !tenure.open(store) {
            return ended();
        }
        let Err(e) = deliver(engine, dest, tenure, &job).await else {
            if let Err(e) = store.outbox_finish(job.id, dest.name) {
                tracing::error!(platform = dest.name, error = %e, "cannot mark a delivered notice; it may be sent again");
            }
            continue;
        };
        if !tenure.open(store) {
            return ended();
        }
        if let Some(pause) = failed(engine, dest, &job, &e.error, e.deferred, now).await {
            // The platform asked for a pause: the rest of its queue waits.
            return Pass {
                next_due: None,
                pause: Some(pause),
            };
        }
    }
    if full {
        return Pass {
            next_due: Some(Duration::ZERO),
            pause: None,
        };
    }
    let next_due = match store.outbox_next_due(dest.name) {
        Ok(next) => next.map(|due| (due - now).to_std().unwrap_or(Duration::ZERO)),
        Err(e) => {
            tracing::error!(platform = dest.name, error = %e, "cannot read the outbox; will try again");
            Some(Duration::from_secs(5))
        }
    };
    Pass {
        next_due,
        pause: None,
    }
}

/// What an item is, for logs and metrics.
fn kind(item: &OutboxItem) -> &'static str {
    match item {
        OutboxItem::Send { notice } if notice.to == Audience::Alert => "alert",
        OutboxItem::Send { .. } => "notice",
        OutboxItem::PostApproval { .. } => "card",
        OutboxItem::UpdateApproval { .. } => "card_update",
    }
}

/// Whether an item is retried until delivered: alerts, and the card of a
/// request still waiting for approvers (without it nobody can approve).
fn never_give_up(engine: &Engine, item: &OutboxItem) -> bool {
    match item {
        OutboxItem::Send { notice } => notice.to == Audience::Alert,
        OutboxItem::PostApproval { request } => engine
            .store()
            .request(request)
            .ok()
            .flatten()
            .is_some_and(|rec| rec.request.state == RequestState::Pending),
        OutboxItem::UpdateApproval { .. } => false,
    }
}

/// Records a failed attempt: retried after a backoff (or the platform's
/// pause), or given up if the item allows it. Returns the pause a rate
/// limit asked for, unless only this item's copies were `deferred` (a DM
/// channel rate limited): then only this item waits for it.
async fn failed(
    engine: &Engine,
    dest: Dest<'_>,
    job: &OutboxJob,
    error: &ChatError,
    deferred: bool,
    now: Instant,
) -> Option<Duration> {
    let what = kind(&job.item);
    let attempts = job.attempts + 1;
    crate::metrics::outbox_failure(dest.name, what);
    let pause = match error {
        ChatError::RateLimited(secs) => Some(Duration::from_secs((*secs).clamp(1, MAX_PAUSE))),
        _ => None,
    };
    let (pause, own_pause) = if deferred { (None, pause) } else { (pause, pause) };
    let permanent = matches!(error, ChatError::Refused(_));
    if permanent && attempts >= MAX_ATTEMPTS && !never_give_up(engine, &job.item) {
        tracing::error!(
            platform = dest.name,
            kind = what,
            attempts,
            error = %error,
            item = ?job.item,
            "notice could not be delivered; giving up on it"
        );
        crate::metrics::outbox_dropped(dest.name, what);
        if let Err(e) = engine.store().outbox_finish(job.id, dest.name) {
            tracing::error!(platform = dest.name, error = %e, "cannot drop an undeliverable notice");
        }
        return pause;
    }
    let delay = match own_pause {
        Some(pause) => pause,
        None => {
            let settings = engine.settings();
            let jitter: f64 = rand::random::<f64>() * 0.5 + 0.5;
            let delay = retry_delay(attempts, settings.retry_base, settings.retry_max, jitter);
            Duration::from_secs(delay.as_secs())
        }
    };
    let next = now + chrono::Duration::from_std(delay).unwrap_or_default();
    // A call that failed without an answer may still have posted the card.
    let may_have_posted = matches!(error, ChatError::Unavailable(_));
    if let Err(e) = engine
        .store()
        .outbox_failed(job.id, dest.name, next, &error.to_string(), may_have_posted)
    {
        tracing::error!(platform = dest.name, error = %e, "cannot record a failed delivery");
    }
    if what == "alert" {
        tracing::error!(
            platform = dest.name,
            attempts,
            error = %error,
            retry_in = ?delay,
            "security alert not delivered yet; retrying until it is"
        );
    } else {
        tracing::warn!(platform = dest.name, kind = what, attempts, error = %error, retry_in = ?delay, "delivery failed; will retry");
    }
    pause
}

/// Delivers one job to `dest`, checking `tenure` before each post or update.
async fn deliver(engine: &Engine, dest: Dest<'_>, tenure: &Tenure, job: &OutboxJob) -> Result<(), PostError> {
    let store_err = |e: StoreError| ChatError::Unavailable(e.to_string());
    let store = engine.store();
    match &job.item {
        OutboxItem::Send { notice } => Ok(match &notice.to {
            Audience::User { user, chat } => {
                // Where they talked to jitbot is enough; elsewhere the
                // platform looks them up by what the directory says.
                let attributes = match chat {
                    Some(chat) if chat.platform == dest.name => Vec::new(),
                    _ => dest.notifier.contact_attributes(),
                };
                let contact = engine.contact(user, &attributes).await;
                tenure.check(store)?;
                dest.notifier.send_to(notice, &contact).await
            }
            _ => {
                tenure.check(store)?;
                dest.notifier.send(notice).await
            }
        }?),
        OutboxItem::PostApproval { request } => {
            let Some(rec) = request_of(engine, request).await? else {
                return Ok(());
            };
            let posted: Vec<MessageRef> = rec.messages.iter().filter(|m| dest.owns(m)).cloned().collect();
            if posted.is_empty()
                && rec.request.state != RequestState::Pending
                && engine.cards_by_dm_only(&rec.request.group)
            {
                // Decided before any copy went out: nobody needs the card,
                // and the group keeps cards out of its channel.
                tracing::info!(platform = dest.name, request = %request, "request decided before its approval card was posted; not posting it");
                return Ok(());
            }
            if job.interrupted_post {
                // Slack has no idempotency key for posts and looking the card
                // up would need history scopes jitbot does not ask for: post
                // again and say so. The older copy's buttons still act on the
                // same request; only its status text goes stale. Every copy
                // whose post was answered is recorded, so at most the one
                // post in flight shows twice.
                tracing::warn!(
                    platform = dest.name,
                    request = %request,
                    "the outcome of an earlier post of this approval card was never recorded (jitbot stopped, or the call failed without an answer); posting it again, so it may show twice"
                );
                crate::metrics::outbox_possible_duplicate(dest.name);
            }
            // Directory lookups first: the post mark covers only the post.
            let card = engine
                .card_to_post(&rec, &dest.notifier.contact_attributes())
                .await;
            tenure.check(store)?;
            engine
                .store()
                .outbox_start_post(job.id, dest.name)
                .await
                .map_err(store_err)?;
            // Copies earlier attempts recorded are left out, and brought up
            // to date after the missing ones are posted; each new copy is
            // recorded as soon as it is posted.
            let log = RecordCopies {
                engine,
                request,
                tenure,
            };
            dest.notifier.post_missing_copies(&card, &posted, &log).await?;
            if !posted.is_empty() {
                // As recorded now (the channel copy may list others).
                if let Some(rec) = engine.store().request(request).map_err(store_err)? {
                    let fresh: Vec<&MessageRef> = rec
                        .messages
                        .iter()
                        .filter(|m| posted.iter().any(|p| p.same_message(m)))
                        .collect();
                    update_every_copy(engine, dest, tenure, request, fresh, &engine.card(&rec)).await?;
                }
            }
            engine
                .store()
                .outbox_posted(job.id, dest.name, request, Vec::new())
                .await
                .map_err(store_err)?;
            Ok(())
        }
        OutboxItem::UpdateApproval { request } => {
            let Some(rec) = request_of(engine, request).await? else {
                return Ok(());
            };
            let card = engine.card(&rec);
            let copies: Vec<&MessageRef> = rec.messages.iter().filter(|m| dest.owns(m)).collect();
            Ok(update_every_copy(engine, dest, tenure, request, copies, &card).await?)
        }
    }
}

/// The request a card is about. A request the local index does not hold is
/// looked for again under the writer lock: with PostgreSQL the index is a
/// mirror, empty for a while as it reloads, and finishing the job on that
/// read would drop the card. `None` only when the store, current under
/// the lock, has no such request (retention removed it).
async fn request_of(engine: &Engine, request: &RequestId) -> Result<Option<RequestRecord>, ChatError> {
    let store_err = |e: StoreError| ChatError::Unavailable(e.to_string());
    if let Some(rec) = engine.store().request(request).map_err(store_err)? {
        return Ok(Some(rec));
    }
    engine
        .store()
        .update(engine.now(), |tx| tx.request(request))
        .await
        .map_err(store_err)
}

/// Records the copies of one request's card, each in its own durable
/// change, as the platform posts them: a crash part way posts again at
/// most the copy in flight. Once the term has ended, it stops the posting
/// after recording the copy just posted.
struct RecordCopies<'a> {
    engine: &'a Engine,
    request: &'a RequestId,
    tenure: &'a Tenure,
}

#[async_trait::async_trait]
impl CopyLog for RecordCopies<'_> {
    async fn record(&self, copy: &MessageRef) -> Result<(), ChatError> {
        let request = self.request;
        self.engine
            .store()
            .update(self.engine.now(), |tx| {
                if let Some(mut rec) = tx.request(request)? {
                    match rec.messages.iter_mut().find(|m| m.same_message(copy)) {
                        Some(m) => *m = copy.clone(),
                        None => rec.messages.push(copy.clone()),
                    }
                    tx.put_request(rec);
                }
                Ok::<(), StoreError>(())
            })
            .await
            .map_err(|e| {
                ChatError::Unavailable(format!("cannot record a posted copy of the approval card: {e}"))
            })?;
        self.tenure.check(self.engine.store())
    }
}

/// Rewrites every copy of a card on one platform. One copy that fails does
/// not keep the others from the decision: each copy is tried; a copy the
/// platform refuses for good (deleted, read-only DM) is skipped and logged;
/// the first temporary failure is returned so the whole update is retried.
/// Each copy updated is recorded with what it now shows, so the retry skips
/// it: a rate limit stops the pass at once, and the retry resumes at the
/// first copy not yet showing this state instead of spending the budget on
/// copies already up to date.
async fn update_every_copy(
    engine: &Engine,
    dest: Dest<'_>,
    tenure: &Tenure,
    request: &RequestId,
    copies: Vec<&MessageRef>,
    card: &crate::ports::ApprovalCard,
) -> Result<(), ChatError> {
    let mut retry = None;
    for m in copies {
        let shows = fingerprint(card, m);
        if m.shows.as_deref() == Some(shows.as_str()) {
            continue;
        }
        tenure.check(engine.store())?;
        match dest.notifier.update_approval(m, card).await {
            Ok(()) => record_shown(engine, request, m, shows).await?,
            Err(ChatError::Refused(why)) => {
                tracing::warn!(platform = dest.name, channel = %m.channel, message = %m.id, error = %why, "a copy of an approval card cannot be updated; the other copies are");
            }
            Err(e @ ChatError::RateLimited(_)) => return Err(e),
            Err(e) => {
                retry.get_or_insert(e);
            }
        }
    }
    retry.map_or(Ok(()), Err)
}

/// What copy `m` of `card` shows, as a short stable fingerprint (SHA-256 of
/// the card and the copy's role, which together decide what it renders).
fn fingerprint(card: &crate::ports::ApprovalCard, m: &MessageRef) -> String {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    hash.update(serde_json::to_vec(card).unwrap_or_default());
    hash.update(serde_json::to_vec(&m.copy).unwrap_or_default());
    hex::encode(&hash.finalize()[..16])
}

/// Durably records that copy `m` of `request`'s card now shows `shows`.
async fn record_shown(
    engine: &Engine,
    request: &RequestId,
    m: &MessageRef,
    shows: String,
) -> Result<(), ChatError> {
    engine
        .store()
        .update(engine.now(), |tx| {
            if let Some(mut rec) = tx.request(request)? {
                if let Some(copy) = rec.messages.iter_mut().find(|c| c.same_message(m)) {
                    copy.shows = Some(shows.clone());
                    tx.put_request(rec);
                }
            }
            Ok::<(), StoreError>(())
        })
        .await
        .map_err(|e| {
            ChatError::Unavailable(format!("cannot record an updated copy of the approval card: {e}"))
        })
}
