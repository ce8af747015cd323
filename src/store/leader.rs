//! Leadership among replicas on PostgreSQL: one row, `jitbot_leader`,
//! holds the leader's name (the holder, unique per process), its fencing
//! token (one more every new term) and when its term expires by the
//! database's clock. The leader renews it; any replica takes it once it
//! has expired. While this replica leads, its store is fenced: every
//! commit checks, in the same PostgreSQL transaction, that this holder
//! still holds the term with that token ([`StoreError::Deposed`]
//! otherwise). The token alone is not enough: a database that lost the
//! row (a failover to a standby that was behind) issues the same tokens
//! again, to another holder. With sled there is one process and it always
//! leads.
//!
//! Directory side effects are bounded by the term too ([`Window`]): a
//! replica that takes part in leadership drives leases only while it leads,
//! from `CALL_SHARE` of a term after taking it over (the old leader's last
//! calls have ended or been abandoned by then) until the step-down point,
//! two thirds of a term after its last renewal began, and no directory
//! call of it outlives that point.
//!
//! A replica that cannot commit does not lead: when its commit and pull
//! session has had no answer for two thirds of a term
//! (`Store::commits_unanswered`), it declines the term and gives up the
//! one it holds, until that session answers again.

use super::{Store, StoreError};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A directory call of a leader may take at most this share of a term
/// (`ttl / CALL_SHARE`): it is issued only while at least that much of the
/// window is left, and abandoned when it overruns.
const CALL_SHARE: u32 = 3;

/// This replica's standing for directory work (`Store::directory_window`).
#[derive(Default)]
pub(super) struct Leadership {
    /// Whether this replica takes part in leadership at all (it asked for
    /// it once). A store that never did (sled, or a lone PostgreSQL store
    /// in tests and tools) drives every lease without a bound.
    joined: AtomicBool,
    term: Mutex<Option<Term>>,
    /// The name this replica asks for the leadership as (`Store::lead`):
    /// the fence's holder.
    holder: Mutex<Option<String>>,
    /// When this replica last asked the database for the leadership, with
    /// the term asked for, and whether it answered ([`Store::database_answers`]).
    contact: Mutex<Option<Contact>>,
    /// Whether this replica declines the leadership because its commits do
    /// not reach the database ([`Store::lead`]): said once, and once again
    /// when they do.
    declined: AtomicBool,
}

#[derive(Clone, Copy)]
struct Contact {
    at: Instant,
    ttl: Duration,
    answered: bool,
}

/// What a leader's commit is checked against, in its own transaction:
/// `holder` still holds the term `token`, and it has not expired.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Fence {
    pub(super) holder: String,
    pub(super) token: i64,
}

/// The term this replica last took or renewed.
#[derive(Clone, Copy)]
struct Term {
    token: i64,
    /// Directory work starts here: a new term waits out the longest call
    /// the previous leader may still have had under way.
    act_from: Instant,
    /// The step-down point: every directory call has ended by then.
    act_until: Instant,
    /// The longest a single directory call may take.
    call: Duration,
}

/// Whether, and for how long, this replica may call the directory for a
/// lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Window {
    /// No leadership here (sled, or a store that never asked to lead):
    /// every call may take as long as it takes.
    Unbounded,
    /// This replica does not lead, or its term is about to end, or it has
    /// just taken over and waits out the old leader's calls: it calls the
    /// directory for no lease; the leader's scheduler does the work.
    Closed,
    /// This replica leads: a call may take at most this long.
    Open(Duration),
}

impl Store {
    /// Takes the leadership for `holder` (free or expired), or renews it
    /// (held by `holder`), for `ttl`; the fencing token of the term, or
    /// `None` while another replica leads. Blocks on the database. With
    /// sled, always leads (token 1).
    ///
    /// On PostgreSQL this runs on a connection of its own, never behind
    /// this replica's writer, and from the first call on this store's
    /// directory work follows the term ([`Store::directory_window`]).
    pub fn lead(&self, holder: &str, ttl: Duration) -> Result<Option<i64>, StoreError> {
        self.check_healthy()?;
        match self.inner.backend.election() {
            // The only process on this store: it always leads.
            None => Ok(Some(1)),
            Some(election) => {
                let leadership = &self.inner.leadership;
                leadership.joined.store(true, Ordering::SeqCst);
                *leadership.holder.lock().unwrap_or_else(|p| p.into_inner()) = Some(holder.to_string());
                if let Some(silent) = self.commits_unanswered().filter(|s| *s > ttl * 2 / 3) {
                    return self.decline(holder, ttl, silent);
                }
                if leadership.declined.swap(false, Ordering::SeqCst) {
                    tracing::info!(
                        "this replica's commit session answers PostgreSQL again; it may lead again"
                    );
                }
                if let Some(why) = self.cannot_append_audit()? {
                    tracing::error!(error = %why, "this replica does not lead");
                    let held = leadership
                        .term
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .map(|t| t.token);
                    if let Some(token) = held {
                        self.resign(holder, token)?;
                    }
                    return Ok(None);
                }
                let started = Instant::now();
                let asked = election.lead(holder, ttl);
                *leadership.contact.lock().unwrap_or_else(|p| p.into_inner()) = Some(Contact {
                    at: started,
                    ttl,
                    answered: asked.is_ok(),
                });
                let token = asked?;
                let mut term = leadership.term.lock().unwrap_or_else(|p| p.into_inner());
                *term = token.map(|token| {
                    let call = ttl / CALL_SHARE;
                    let act_from = match *term {
                        Some(t) if t.token == token => t.act_from,
                        // A term this replica did not hold, even token 1:
                        // a database that lost the row (a failover to a
                        // standby that was behind) issues token 1 again,
                        // while the leader it forgot may still be calling.
                        // The old term has expired by now (that is how this
                        // one began), and every call of the old leader ended
                        // by its step-down point, before that; the extra
                        // call's length covers one abandoned in transit.
                        _ => Instant::now() + call,
                    };
                    Term {
                        token,
                        act_from,
                        act_until: started + ttl * 2 / 3,
                        call,
                    }
                });
                Ok(token)
            }
        }
    }

    /// Declines the leadership (and gives up the term it holds) because
    /// this replica's commit and pull session has not answered for
    /// `silent`, over two thirds of a term: a leader that cannot commit
    /// revokes nothing, and renewing its term would keep a replica that
    /// can from taking over. It may lead again once its commits reach the
    /// database.
    fn decline(&self, holder: &str, ttl: Duration, silent: Duration) -> Result<Option<i64>, StoreError> {
        let leadership = &self.inner.leadership;
        let held = leadership
            .term
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|t| t.token);
        if !leadership.declined.swap(true, Ordering::SeqCst) || held.is_some() {
            tracing::error!(
                silent_secs = silent.as_secs_f64(),
                term_secs = ttl.as_secs_f64(),
                leads = held.is_some(),
                "this replica's commits and pulls have had no answer from PostgreSQL for over two thirds of a \
                 term (the server ended its session and refuses a new one, or the link hangs), while its \
                 leadership statements may still pass: it gives up the leadership, so that a replica that can \
                 commit takes over, and leads again once its commits reach the database. Check the server's \
                 connection limits (max_connections, ALLOW_CONNECTIONS) and its log"
            );
        }
        if let Some(token) = held {
            self.resign(holder, token)?;
        }
        Ok(None)
    }

    /// Whether the database answered this replica's last leadership
    /// statement (asked every few seconds, on a connection of its own, so
    /// a writer waiting for another replica's lock does not hold it up),
    /// and within a term. `None`: this store takes no part in leadership
    /// (sled, or a tool's store), or has not asked yet.
    pub fn database_answers(&self) -> Option<bool> {
        let contact = *self
            .inner
            .leadership
            .contact
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        contact.map(|c| c.answered && c.at.elapsed() <= c.ttl)
    }

    /// Whether, and how long, this replica may call the directory for a
    /// lease now: see [`Window`]. A leader must also have fenced its store
    /// with the term's token ([`Store::set_fence`]).
    pub fn directory_window(&self) -> Window {
        let leadership = &self.inner.leadership;
        if !leadership.joined.load(Ordering::SeqCst) {
            return Window::Unbounded;
        }
        let term = *leadership.term.lock().unwrap_or_else(|p| p.into_inner());
        let Some(term) = term else {
            return Window::Closed;
        };
        let now = Instant::now();
        let left = term.act_until.saturating_duration_since(now);
        if self.fence() != Some(term.token) || now < term.act_from || left < term.call {
            return Window::Closed;
        }
        Window::Open(term.call)
    }

    /// When this replica, having just taken a term, may start its
    /// directory work (`None`: it does not lead).
    pub fn acts_from(&self) -> Option<Instant> {
        let term = self
            .inner
            .leadership
            .term
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        term.map(|t| t.act_from)
    }

    /// The step-down point of the term this replica leads by now, its store
    /// fenced with the term's token: the leader's work on the chat
    /// platforms (the outbox) acts only before it, as its directory calls
    /// end before it. `None`: no such term (a follower, a replica that
    /// stepped down, or a store that never asked to lead: see
    /// [`Store::directory_window`] for that case).
    pub fn acts_until(&self) -> Option<Instant> {
        let term = *self
            .inner
            .leadership
            .term
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        term.filter(|t| self.fence() == Some(t.token))
            .map(|t| t.act_until)
    }

    /// Forgets this replica's term (it stepped down or lost it): from now
    /// on it calls the directory for no lease until it leads again.
    pub fn step_down(&self) {
        *self
            .inner
            .leadership
            .term
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Gives up the term `token` of `holder` (at shutdown), so another
    /// replica takes over without waiting for it to expire.
    pub fn resign(&self, holder: &str, token: i64) -> Result<(), StoreError> {
        match self.inner.backend.election() {
            None => Ok(()),
            Some(election) => {
                self.step_down();
                election.resign(holder, token)
            }
        }
    }

    /// Fences every commit of this store with the leader's token (`None`:
    /// commits are not fenced, as on a follower): a commit lands only while
    /// the holder this store asked to lead as ([`Store::lead`]) holds the
    /// term with that token. A store that never asked to lead cannot
    /// commit fenced ([`StoreError::Deposed`]).
    pub fn set_fence(&self, token: Option<i64>) {
        self.inner.fence.store(token.unwrap_or(0), Ordering::SeqCst);
    }

    /// The token commits are fenced with, if any.
    pub fn fence(&self) -> Option<i64> {
        match self.inner.fence.load(Ordering::SeqCst) {
            0 => None,
            token => Some(token),
        }
    }

    /// What a commit is fenced with now: the token and the holder this
    /// store leads as (`None`: not fenced).
    pub(super) fn commit_fence(&self) -> Result<Option<Fence>, StoreError> {
        let Some(token) = self.fence() else {
            return Ok(None);
        };
        let holder = self
            .inner
            .leadership
            .holder
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        // Fenced without having asked to lead: it holds no term.
        let holder = holder.ok_or(StoreError::Deposed)?;
        Ok(Some(Fence { holder, token }))
    }
}
