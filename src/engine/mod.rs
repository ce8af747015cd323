//! The engine: applies commands and timers to the store, then performs the
//! side effects (directory changes) that the durable records call for.
//!
//! Write-ahead rule: every method first commits and flushes the transition
//! (with its audit lines, its outbox notices and the timer that will finish
//! or undo it), then touches the directory, then commits the result. A crash
//! anywhere leaves a timer in the store that takes the work forward on the
//! next start: `Grant` redoes an unfinished grant, `Revoke` an unfinished
//! revocation, `Expire` a lease that ended while jitbot was down.

mod admin;
pub mod anchor;
pub(crate) mod audit;
mod ends;
mod executor;
mod floods;
mod leases;
mod outage;
mod queries;
mod recheck;
mod recipients;
mod requests;
mod zsp;

pub use admin::leases_outside_config;
pub use ends::REVOCATION_BATCH;
pub use zsp::Drift;

use crate::clock::Clock;
use crate::messages::{Audience, ChatRef, Notice, Tone};
use crate::ports::{Directory, DirectoryError};
use crate::store::{OutboxItem, Store, StoreError, Timer, TimerKind};
use jitbot_core::command::{Action, Command};
use jitbot_core::policy::{Actor, GroupPolicy, Policy};
use jitbot_core::{GroupName, Instant, Refusal, Span, UserId};
use std::sync::Arc;
use thiserror::Error;
use tokio::sync::Notify;

/// Retry and alert settings for directory work.
#[derive(Clone, Debug)]
pub struct EngineSettings {
    pub retry_base: Span,
    pub retry_max: Span,
    /// Failed revocation attempts before an alert goes out.
    pub alert_after: u32,
    /// Requests one person may have waiting for a decision at once.
    pub max_pending_per_user: usize,
    /// How long after a lease whose add got no answer has ended jitbot
    /// looks for that add once more (`engine/recheck.rs`): long enough for
    /// a request still on the wire to have arrived or died.
    pub recheck_after: Span,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            retry_base: Span::from_secs(5),
            retry_max: Span::from_mins(5),
            alert_after: 5,
            max_pending_per_user: 5,
            recheck_after: Span::from_secs(30),
        }
    }
}

/// Who sent a command: their directory account and where they wrote from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub user: UserId,
    pub chat: Option<ChatRef>,
}

impl Caller {
    pub fn new(user: &str, chat: Option<ChatRef>) -> Self {
        Caller {
            user: UserId::new(user),
            chat,
        }
    }
}

/// The answer to the person who sent a command (shown only to them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub ok: bool,
    pub text: String,
}

impl Reply {
    pub fn ok(text: impl Into<String>) -> Self {
        Reply {
            ok: true,
            text: text.into(),
        }
    }
    pub fn refused(text: impl Into<String>) -> Self {
        Reply {
            ok: false,
            text: text.into(),
        }
    }
}

/// Everything that can stop a command, worded for the person.
#[derive(Debug, Error)]
pub enum EngineError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("{0}")]
    NotFound(String),
    #[error("{}", directory_trouble(.0, "nothing was changed"))]
    Directory(#[from] DirectoryError),
    #[error("jitbot's store failed ({0}); nothing was changed, tell your jitbot admins")]
    Store(#[from] StoreError),
}

/// A directory failure worded for the person whose command it stopped:
/// what happened, that `outcome` (nothing was done), and what to do — wait
/// out an outage, or ask the admins about anything retrying will not fix.
pub(crate) fn directory_trouble(error: &DirectoryError, outcome: &str) -> String {
    if error.is_transient() {
        format!(
            "jitbot cannot reach the directory that holds accounts and groups right now ({error}), \
             so {outcome}. Try again in a minute or two; if it keeps failing, tell your jitbot admins \
             the directory is down."
        )
    } else {
        format!("{error}; {outcome}. Tell your jitbot admins: trying again will not help.")
    }
}

/// The engine handle; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    policy: Policy,
    store: Store,
    directory: Arc<dyn Directory>,
    clock: Arc<dyn Clock>,
    settings: EngineSettings,
    /// Wakes the scheduler when a timer is set earlier than it expects.
    timers_changed: Notify,
    /// Wakes the outbox worker when there is something to deliver.
    outbox_changed: Notify,
    zsp_seen: std::sync::Mutex<std::collections::BTreeSet<(String, String)>>,
    /// One executor per lease at a time (see `executor.rs`).
    lease_locks: executor::LeaseLocks,
    /// Directory failures outstanding, and the probe (see `outage.rs`).
    outage: outage::Outage,
    /// Lease ends waiting to be committed together (see `ends.rs`).
    ends: ends::Ends,
    /// Where retry jitter comes from when not random (the simulator's seed).
    jitter: std::sync::OnceLock<Box<dyn Fn() -> f64 + Send + Sync>>,
}

pub(crate) const ENGINE_ACTOR: &str = "jitbot";

/// An outbox entry that sends `text` (and buttons) to `to` once committed.
pub(crate) fn notice(to: Audience, text: impl Into<String>, buttons: Vec<Action>) -> OutboxItem {
    toned(Tone::Plain, to, text, buttons)
}

/// [`notice`] of a given [`Tone`], which each platform marks its own way.
pub(crate) fn toned(tone: Tone, to: Audience, text: impl Into<String>, buttons: Vec<Action>) -> OutboxItem {
    OutboxItem::Send {
        notice: Notice {
            to,
            text: text.into(),
            buttons,
            tone,
        },
    }
}

impl Engine {
    pub fn new(
        policy: Policy,
        store: Store,
        directory: Arc<dyn Directory>,
        clock: Arc<dyn Clock>,
        settings: EngineSettings,
    ) -> Engine {
        let floor = store.last_audit_time().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the time of the latest commit");
            None
        });
        let clock: Arc<dyn Clock> = Arc::new(crate::clock::NotBefore::new(clock, floor));
        Engine {
            inner: Arc::new(Inner {
                policy,
                store,
                directory,
                clock,
                settings,
                timers_changed: Notify::new(),
                outbox_changed: Notify::new(),
                zsp_seen: Default::default(),
                lease_locks: Default::default(),
                outage: Default::default(),
                ends: Default::default(),
                jitter: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Takes retry jitter (a number in `0..1`) from `source` instead of the
    /// thread's random generator, so that a seeded simulation replays
    /// exactly. Only the first call on an engine counts.
    pub fn with_jitter(self, source: impl Fn() -> f64 + Send + Sync + 'static) -> Engine {
        let _ = self.inner.jitter.set(Box::new(source));
        self
    }

    /// A number in `0..1` for spreading retries out.
    pub(crate) fn jitter(&self) -> f64 {
        match self.inner.jitter.get() {
            Some(source) => source(),
            None => rand::random::<f64>(),
        }
    }

    pub fn now(&self) -> Instant {
        self.inner.clock.now()
    }
    pub fn store(&self) -> &Store {
        &self.inner.store
    }
    pub fn policy(&self) -> &Policy {
        &self.inner.policy
    }
    pub fn directory(&self) -> &Arc<dyn Directory> {
        &self.inner.directory
    }
    pub fn settings(&self) -> &EngineSettings {
        &self.inner.settings
    }
    /// Notified whenever timers may have moved earlier.
    pub fn timers_changed(&self) -> &Notify {
        &self.inner.timers_changed
    }
    /// Notified whenever the outbox has new work.
    pub fn outbox_changed(&self) -> &Notify {
        &self.inner.outbox_changed
    }

    fn changed(&self) {
        self.inner.timers_changed.notify_one();
        self.inner.outbox_changed.notify_one();
    }

    fn group(&self, name: &GroupName) -> Result<&GroupPolicy, Refusal> {
        self.inner.policy.group(name)
    }

    /// Maps a chat identity to a directory account through `attribute`.
    pub async fn identify(&self, attribute: &str, value: &str) -> Result<UserId, Reply> {
        match self.inner.directory.find_user(attribute, value).await {
            Ok(Some(user)) => Ok(user),
            Ok(None) => Err(Reply::refused(format!(
                "jitbot cannot find your directory account (no entry has {attribute} = {value}); ask your jitbot admins to link it"
            ))),
            Err(e) => Err(Reply::refused(format!(
                "jitbot cannot identify you right now: {}",
                directory_trouble(&e, "nothing was done")
            ))),
        }
    }

    /// The caller as the core sees them: their account and the directory
    /// groups (of those any rule mentions) they belong to.
    async fn actor(&self, user: &UserId) -> Result<Actor, EngineError> {
        let mentioned = self.inner.policy.mentioned_groups();
        let groups = if mentioned.is_empty() {
            Default::default()
        } else {
            self.inner.directory.groups_of(user, &mentioned).await?
        };
        Ok(Actor {
            user: user.clone(),
            groups,
        })
    }

    fn is_admin(&self, actor: &Actor) -> bool {
        self.inner.policy.admins.includes(actor)
    }

    /// Applies a command and answers the caller. Never panics on bad input:
    /// every refusal comes back as a [`Reply`] saying what to do.
    pub async fn execute(&self, caller: &Caller, command: Command) -> Reply {
        let kind = match &command {
            Command::Request { .. } | Command::BreakGlass { .. } => Some("request"),
            Command::Approve { .. } => Some("approval"),
            Command::Deny { .. } => Some("denial"),
            _ => None,
        };
        let reply = self.apply(caller, command).await;
        if let Some(kind) = kind {
            crate::metrics::command(kind, if reply.ok { "accepted" } else { "refused" });
        }
        reply
    }

    async fn apply(&self, caller: &Caller, command: Command) -> Reply {
        let result = match command {
            Command::Help => Ok(Reply::ok(jitbot_core::command::HELP)),
            Command::Request {
                group,
                duration,
                reason,
            } => self.request(caller, &group, duration, &reason, false).await,
            Command::BreakGlass {
                group,
                duration,
                reason,
            } => self.request(caller, &group, duration, &reason, true).await,
            Command::Approve { request, duration } => self.approve(caller, &request, duration).await,
            Command::Deny { request, reason } => self.deny(caller, &request, &reason).await,
            Command::Cancel { request } => self.cancel(caller, &request).await,
            Command::Acknowledge { request } => self.acknowledge(caller, &request).await,
            Command::Release { target } => self.release(caller, &target, None).await,
            Command::Revoke { lease, reason } => self.release(caller, &lease, Some(reason)).await,
            Command::Extend { target, duration } => self.extend(caller, &target, duration).await,
            Command::List => self.list(caller).await,
            Command::Groups => self.groups(caller).await,
            Command::Pending => self.pending(caller).await,
        };
        result.unwrap_or_else(|e| Reply::refused(e.to_string()))
    }

    /// The command a button stands for. Deny has none: it needs a reason, so
    /// the adapter asks for one and then sends [`Command::Deny`].
    pub fn command_for(&self, action: &Action) -> Option<Command> {
        Some(match action {
            Action::Approve(r) => Command::Approve {
                request: r.clone(),
                duration: None,
            },
            Action::Deny(_) => return None,
            Action::Release(l) => Command::Release { target: l.clone() },
            Action::Acknowledge(r) => Command::Acknowledge { request: r.clone() },
            Action::Extend(l) => {
                let duration = self
                    .inner
                    .store
                    .lease(&jitbot_core::LeaseId::new(l.as_str()))
                    .ok()
                    .flatten()
                    .and_then(|rec| self.group(&rec.lease.group).ok().map(|p| p.default_duration))
                    .unwrap_or(Span::from_hours(1));
                Command::Extend {
                    target: l.clone(),
                    duration,
                }
            }
        })
    }

    /// Runs one due timer. Always clears or moves it, so it never fires twice
    /// for the same work. (`Expire` and `Revoke` go through
    /// [`Engine::fire_revocations`], the path the scheduler takes for many.)
    pub async fn fire(&self, timer: Timer) {
        match timer.kind {
            TimerKind::Expire | TimerKind::Revoke => self.fire_revocations(vec![timer]).await,
            _ => self.fire_other(timer).await,
        }
    }

    /// A timer on its own: a grant to finish, a request timing out, a
    /// warning. (Revocations come through [`Engine::fire_revocations`]; an
    /// `Expire` here only starts revoking, and the `Revoke` timer that
    /// commits, due at once, removes the membership.)
    async fn fire_other(&self, timer: Timer) {
        let outcome = match timer.kind {
            TimerKind::Grant | TimerKind::Revoke => {
                self.drive(&jitbot_core::LeaseId::new(timer.id.as_str())).await
            }
            TimerKind::Expire => self
                .begin_expiries(std::slice::from_ref(&timer.id))
                .await
                .map(|_| ()),
            TimerKind::RequestTimeout => self.time_out(&timer.id).await,
            TimerKind::Warn => self.warn(&timer.id).await,
            TimerKind::Recheck | TimerKind::RecheckRemoval => self.recheck(&timer.id).await,
        };
        if let Err(e) = outcome {
            self.retry_timer(timer.kind, &timer.id, &e).await;
        }
    }

    /// Timer work failed: its timer moves `retry_base` out (the work is
    /// retried then, never dropped); a re-check whose removal may be on its
    /// way keeps its later due.
    async fn retry_timer(&self, kind: TimerKind, id: &str, error: &EngineError) {
        tracing::error!(kind = ?kind, id = %id, error = %error, "timer work failed; retrying later");
        let retry = self.retry_of(kind, id).unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot read the timer to retry; retrying it as it fired");
            Some((kind, self.now() + self.inner.settings.retry_base.to_chrono()))
        });
        let Some((kind, retry)) = retry else {
            // A re-check that finished meanwhile: nothing to retry.
            return;
        };
        let moved = self
            .inner
            .store
            .update(self.now(), |tx| {
                tx.set_timer(kind, id, retry);
                Ok::<(), StoreError>(())
            })
            .await;
        if let Err(e) = moved {
            tracing::error!(error = %e, "cannot reschedule timer");
        }
    }
}
