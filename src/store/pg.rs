//! The PostgreSQL backend: PostgreSQL holds the truth, and each replica
//! keeps its sled store as a mirror of it, brought up to date under the
//! writer lock before every transaction, so reads stay local and
//! synchronous and every invariant check reads the current state.
//!
//! Tables (`MIGRATIONS`): `jitbot_kv(tree, key, value, version)` holds every
//! tree's keys (`value` NULL: a deletion, kept so other replicas see it,
//! until garbage-collected below `jitbot_head.gc_version`), and
//! `jitbot_head`'s one row the version of the last commit: `SELECT … FOR
//! UPDATE` on it is the store-wide writer lock across replicas.
//!
//! [`Replica`] is the store's [`Backend`](super::kv::Backend) here. A
//! transaction (`Backend::begin`, then `Commit::commit` of `Open`): lock
//! the head, pull what other replicas committed since the mirror's version
//! into the mirror, run the sled transaction with its writes captured and
//! aborted (`kv.rs`), write them to PostgreSQL under the next version,
//! COMMIT, and only then apply them to the mirror with the new version. A failed or
//! unknown COMMIT leaves the mirror untouched and fails the caller, so
//! nothing acts on a change PostgreSQL does not hold; the next transaction
//! pulls whatever did land.
//!
//! The blocking `postgres` client runs on a thread of its own, fed by a
//! channel: the store's writers are synchronous functions called from
//! async code, and a client on the tokio runtime would need a nested
//! `block_on` there. A caller waits for the database on its own thread, as
//! it waits for the writer lock.

use super::kv::{
    Backend, Bookkeeping, Change, Commit, Durability, Election, Staged, TreeId, Trees, GENERATION,
};
use super::{Store, StoreError};
use crate::secret::Secret;
use std::any::Any;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

/// The schema, one migration per version, applied in order by [`migrate`].
const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        "CREATE TABLE jitbot_kv (
        tree text NOT NULL,
        key bytea NOT NULL,
        value bytea NULL,
        version bigint NOT NULL,
        PRIMARY KEY (tree, key)
    );
    CREATE INDEX jitbot_kv_version ON jitbot_kv (version);
    CREATE TABLE jitbot_head (
        id int PRIMARY KEY CHECK (id = 1),
        version bigint NOT NULL,
        gc_version bigint NOT NULL,
        db_id text NOT NULL
    );
    INSERT INTO jitbot_head (id, version, gc_version, db_id)
        VALUES (1, 0, 0, md5(random()::text || clock_timestamp()::text));",
    ),
    (
        2,
        "CREATE TABLE jitbot_leader (
        id int PRIMARY KEY CHECK (id = 1),
        holder text NOT NULL,
        token bigint NOT NULL,
        expires_at timestamptz NOT NULL
    );",
    ),
    (
        3,
        "CREATE TABLE jitbot_commits (
        version bigint PRIMARY KEY,
        commit_id text NOT NULL
    );
    INSERT INTO jitbot_commits (version, commit_id)
        SELECT version, md5(random()::text || clock_timestamp()::text) FROM jitbot_head;",
    ),
];

/// The schema version this build needs.
pub const SCHEMA_VERSION: i32 = 3;

/// When deletions are garbage-collected: every `every` versions, those
/// older than `keep` versions go; a mirror further behind reloads
/// everything.
#[derive(Clone, Copy, Debug)]
struct Gc {
    keep: i64,
    every: i64,
}

const GC: Gc = Gc {
    keep: 100_000,
    every: 1_000,
};

/// Advisory lock key that serializes migrations (ASCII "jitbotmg").
const MIGRATION_LOCK: i64 = 0x6a69_7462_6f74_6d67;

/// Keys of the mirror's own `mirror` tree (never replicated).
const MIRROR_VERSION: &[u8] = b"version";
const MIRROR_DB: &[u8] = b"db_id";
const MIRROR_COMMIT: &[u8] = b"commit_id";
/// Written when a directory first becomes a mirror and never removed (a
/// reload or a catch-up removes only the position): a directory with data
/// and this mark is a mirror, whatever state a crash left it in.
const MIRROR_KIND: &[u8] = b"kind";
const MIRROR_KIND_POSTGRES: &[u8] = b"postgres";

/// How long a session may sit idle inside a transaction before PostgreSQL
/// ends it. A jitbot transaction never waits for anything outside the
/// process between its statements (it runs the caller's closure on the
/// sled mirror; a full mirror reload happens before the lock is taken),
/// so a longer idle means a stalled replica (SIGSTOP, a VM pause, a swap
/// storm) holding `jitbot_head`'s lock: it must be cut off well within
/// the 10 s in which another replica has to revoke what is due.
const IDLE_IN_TRANSACTION: &str = "5s";

/// How long a writer waits for `jitbot_head`'s lock per try: longer than
/// [`IDLE_IN_TRANSACTION`], so a stalled replica is cut off before a
/// waiting writer gives up.
const LOCK_TIMEOUT: &str = "10s";

/// A catch-up with more changes than this is applied to the mirror
/// outside the head's lock, before the transaction locks it again.
const BIG_PULL: usize = 1_000;

/// A reload or big catch-up reaches the mirror in chunks of this many
/// rows (a portal in the database's snapshot, handed over a channel that
/// holds one chunk), so its memory is bounded, not the database's size.
const PULL_CHUNK: usize = 10_000;

/// How many catch-ups a writer makes outside the head's lock before it
/// streams one under it (others kept committing many changes meanwhile).
const OUTSIDE_TRIES: usize = 2;

/// How long a read-only snapshot that streams rows may sit idle between
/// chunks (the mirror applying one, or clearing its trees for a reload):
/// it holds no lock a writer waits for, only the snapshot.
const STREAM_IDLE: &str = "60s";

/// How a pull reads: rows per chunk, and the most changes applied under
/// the head's lock.
#[derive(Clone, Copy, Debug)]
struct PullSize {
    chunk: usize,
    big: usize,
}

/// How many times a writer tries for `jitbot_head`'s lock before it fails
/// its caller.
const LOCK_TRIES: usize = 3;

/// The longest a statement runs before PostgreSQL cancels it (and so
/// answers it, with an error).
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a round trip on the commit and pull session may be under way
/// and still count as answering: the server answers every statement
/// within [`STATEMENT_TIMEOUT`] (a lock wait within [`LOCK_TIMEOUT`],
/// busy or not), so one under way longer got lost; plus a little for the
/// answer to come back. A slow database (a commit waiting for a
/// synchronous standby, a checkpoint on a slow disk) is answering: giving
/// the term to another replica would not make it faster, since every
/// replica commits to the same database. A link that stopped carrying
/// data is cut sooner, by [`TCP_USER_TIMEOUT`].
const ANSWER_WAIT: Duration = Duration::from_secs(STATEMENT_TIMEOUT.as_secs() + 2);

/// How long data sent to PostgreSQL may go unacknowledged before the
/// connection is closed (`TCP_USER_TIMEOUT`; the url's `tcp_user_timeout`
/// wins): a link that went dark (a dropped route, a NAT that forgot the
/// connection) fails the round trip within this, so a leader whose session
/// cannot reach the database gives its term up in time for another
/// replica to revoke what is due within the 10 s failover goal.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(4);

/// What this replica heard from PostgreSQL on its commit and pull session
/// ([`Store::commits_unanswered`]), kept by the connection thread. Any
/// round trip that came back counts as an answer, an error the server
/// sent (a busy lock, a failed statement) too; one that did not (the
/// session ended and no new one was let in, the link gone) is a failure.
#[derive(Default)]
struct Heard(std::sync::Mutex<Hearing>);

#[derive(Clone, Copy, Default)]
struct Hearing {
    /// When the first round trip since the last answer was sent.
    unanswered_since: Option<std::time::Instant>,
    /// Whether a round trip since the last answer failed to come back.
    failed: bool,
    /// When the round trip now under way was sent.
    in_flight: Option<std::time::Instant>,
}

impl Heard {
    fn with(&self, f: impl FnOnce(&mut Hearing)) {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// A round trip is sent.
    fn asking(&self) {
        let now = std::time::Instant::now();
        self.with(|h| {
            h.in_flight = Some(now);
            h.unanswered_since.get_or_insert(now);
        });
    }

    /// A round trip came back.
    fn answered(&self) {
        self.with(|h| *h = Hearing::default());
    }

    /// A round trip ended: it came back, or it failed without an answer.
    fn settled(&self, came_back: bool) {
        if came_back {
            self.answered();
        } else {
            self.with(|h| {
                h.in_flight = None;
                h.failed = true;
            });
        }
    }

    /// How long the session has gone without answering, counted from the
    /// first round trip sent since its last answer: `None` while it
    /// answers (every round trip since came back, or the one under way
    /// has not waited longer than a lock may take).
    fn silence(&self) -> Option<Duration> {
        let h = *self.0.lock().unwrap_or_else(|p| p.into_inner());
        let overdue = h.in_flight.is_some_and(|at| at.elapsed() > ANSWER_WAIT);
        match h.unanswered_since {
            Some(since) if h.failed || overdue => Some(since.elapsed()),
            _ => None,
        }
    }
}

/// Whether the session is still there after a round trip: it came back
/// (an error the server sent included), rather than the link breaking.
fn came_back(client: &postgres::Client) -> bool {
    !client.is_closed()
}

/// How to reach PostgreSQL (`[store] kind = "postgres"`).
#[derive(Clone, Debug)]
pub struct PgSettings {
    /// `postgres://user@host:port/dbname?…` (libpq URL or key=value form).
    pub url: String,
    /// The password, when not in the URL.
    pub password: Option<Secret>,
    /// Apply missing migrations when connecting (else refuse to start).
    pub migrate: bool,
    /// With `sslmode=verify-full` in the url: the CA that signed the
    /// server's certificate (`[store] ca_file`).
    pub ca_file: Option<std::path::PathBuf>,
    /// How this replica's mirror is written when it is created (`[store]
    /// compression`; a mirror that exists keeps its own).
    pub mirror_compression: super::Compression,
}

impl PgSettings {
    fn config(&self) -> Result<postgres::Config, StoreError> {
        let mut config = super::pg_tls::driver_config(&self.url, self.ca_file.as_deref())?;
        if let Some(password) = &self.password {
            config.password(password.expose());
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        config.application_name("jitbot");
        config.keepalives(true);
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(TCP_USER_TIMEOUT);
        }
        Ok(config)
    }

    fn connect(&self) -> Result<postgres::Client, StoreError> {
        let config = self.config()?;
        let connected = match super::pg_tls::transport(&self.url, self.ca_file.as_deref())? {
            super::pg_tls::Transport::Plain => config.connect(postgres::NoTls),
            super::pg_tls::Transport::Verified(tls) => config.connect(tls),
        };
        let mut client = connected.map_err(|e| {
            let tls = match &self.ca_file {
                Some(ca) => format!(
                    "; with sslmode=verify-full, also that [store] ca_file ({}) holds the CA that signed the \
                     server's certificate and that the certificate names the url's host",
                    ca.display()
                ),
                None => String::new(),
            };
            StoreError::Io(format!(
                "cannot connect to PostgreSQL at [store] url ({}); check the URL, the password and that the \
                 server accepts connections from here{tls}",
                describe(&e)
            ))
        })?;
        // A replica that hangs while holding the head's lock must not stop
        // every other replica: the server ends such a transaction.
        client
            .batch_execute(&format!(
                "SET statement_timeout = '{}s'; SET lock_timeout = '{LOCK_TIMEOUT}'; \
                 SET idle_in_transaction_session_timeout = '{IDLE_IN_TRANSACTION}'",
                STATEMENT_TIMEOUT.as_secs()
            ))
            .map_err(|e| pg_error("setting the session's timeouts", &e))?;
        Ok(client)
    }
}

/// The error and, when PostgreSQL sent one, its message.
fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{e}: {}", db.message()),
        None => match std::error::Error::source(e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        },
    }
}

fn pg_error(what: &str, e: &postgres::Error) -> StoreError {
    StoreError::Io(format!(
        "PostgreSQL {what} failed ({}); nothing was acted on. If the database is down, jitbot retries on \
         the next change; check the server",
        describe(e)
    ))
}

/// Applies the missing migrations (under an advisory lock, so replicas
/// starting together apply each once); returns how many were applied.
/// Refuses a database whose schema is newer than this build.
pub fn migrate(settings: &PgSettings) -> Result<usize, StoreError> {
    let settings = settings.clone();
    on_own_thread(move || {
        let mut client = settings.connect()?;
        migrate_with(&mut client)
    })
}

/// Runs `f` on a new thread: the blocking client must not run on a tokio
/// runtime thread.
fn on_own_thread<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    std::thread::Builder::new()
        .name("jitbot-pg".into())
        .spawn(f)
        .map_err(|e| StoreError::Io(format!("cannot start the PostgreSQL thread: {e}")))?
        .join()
        .map_err(|_| StoreError::Io("the PostgreSQL thread panicked; report this bug".into()))?
}

fn migrate_with(client: &mut postgres::Client) -> Result<usize, StoreError> {
    let mut tx = client.transaction().map_err(|e| pg_error("BEGIN", &e))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .map_err(|e| pg_error("taking the migration lock", &e))?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS jitbot_schema (
            version int PRIMARY KEY,
            applied_at timestamptz NOT NULL DEFAULT now()
        )",
    )
    .map_err(|e| pg_error("creating jitbot_schema", &e))?;
    let current: i32 = tx
        .query_one("SELECT coalesce(max(version), 0) FROM jitbot_schema", &[])
        .map_err(|e| pg_error("reading the schema version", &e))?
        .get(0);
    if current > SCHEMA_VERSION {
        return Err(newer_schema(current));
    }
    let mut applied = 0;
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        tx.batch_execute(sql)
            .map_err(|e| pg_error(&format!("migration {version}"), &e))?;
        tx.execute("INSERT INTO jitbot_schema (version) VALUES ($1)", &[version])
            .map_err(|e| pg_error("recording a migration", &e))?;
        applied += 1;
    }
    tx.commit()
        .map_err(|e| pg_error("COMMIT of the migrations", &e))?;
    Ok(applied)
}

/// The refusal of a database a newer jitbot migrated: neither `jitbot
/// migrate` nor `[store] migrate` can help (migrations only go forward),
/// so it says what can.
fn newer_schema(found: i32) -> StoreError {
    StoreError::Io(format!(
        "the database's jitbot schema is version {found}, newer than this jitbot's ({SCHEMA_VERSION}): a newer \
         jitbot release has migrated it. Run that release (or a later one) on every replica — replicas of \
         mixed versions cannot share one database — or restore the database from before the upgrade"
    ))
}

fn schema_version(client: &mut postgres::Client) -> Result<i32, StoreError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('jitbot_schema') IS NOT NULL", &[])
        .map_err(|e| pg_error("reading the schema version", &e))?
        .get(0);
    if !exists {
        return Ok(0);
    }
    let row = client
        .query_one("SELECT coalesce(max(version), 0) FROM jitbot_schema", &[])
        .map_err(|e| pg_error("reading the schema version", &e))?;
    Ok(row.get(0))
}

/// The head row: the last committed version, the deletion horizon, and
/// the database's identity (a mirror of another database reloads).
#[derive(Clone, Debug)]
struct Head {
    version: i64,
    gc_version: i64,
    db_id: String,
    /// The identity of the commit that made `version` (`jitbot_commits`),
    /// when the database has a record of it.
    commit_id: Option<String>,
}

/// Where a mirror is: the version and database it last caught up with,
/// and the identity of that version's commit (none in a mirror made
/// before schema 3).
#[derive(Clone, Debug)]
struct Position {
    version: i64,
    db_id: String,
    commit_id: Option<String>,
}

/// What a mirror must do to catch up.
enum Pulled {
    /// Apply these changes; the mirror is then at `head`.
    Changes(Vec<Change>),
    /// More changes than may be applied under the head's lock, or a
    /// reload: nothing was read; catch up outside the lock first.
    Behind,
    /// The rows follow on the job's row channel, in chunks ([`Chunk`]):
    /// with `reload`, every key that has a value, to replace the mirror
    /// with (and with `lost`, why the mirror held history the database
    /// no longer has); else the changes since the mirror's version.
    Streamed { reload: bool, lost: Option<String> },
}

/// One message of a streamed pull.
enum Chunk {
    Rows(Vec<Change>),
    /// Every row was sent.
    End,
    Failed(StoreError),
}

/// The receiving end of a streamed pull: it holds one chunk, so the
/// database thread reads the next while the mirror applies one.
type Rows = mpsc::SyncSender<Chunk>;

/// What the database thread streams after answering.
enum Stream {
    /// Every key that has a value.
    Everything,
    /// The changes committed after this version.
    Since(i64),
}

/// The answer to a `Begin`.
enum Began {
    /// The head is locked and this is what the mirror must do to catch up.
    Locked(Head, Pulled),
    /// Another session held the head's lock past `lock_timeout`; the
    /// transaction was rolled back (the message says so to a person).
    Busy(String),
}

type Reply<T> = mpsc::SyncSender<Result<T, StoreError>>;

enum Job {
    /// BEGIN, lock the head, and catch up from the mirror at `since`
    /// (of database `db`); then wait for `Commit` or `Rollback`.
    Begin {
        since: Option<Position>,
        size: PullSize,
        /// Stream a big pull under the lock rather than answer `Behind`.
        stream_big: bool,
        rows: Rows,
        reply: Reply<Began>,
    },
    /// Write `changes` as version head + 1 and COMMIT; answers the new
    /// version and its commit's identity.
    Commit {
        changes: Vec<Change>,
        gc: Gc,
        /// The leader's holder and fencing token this replica commits
        /// under, if any.
        fence: Option<super::leader::Fence>,
        reply: Reply<(i64, String)>,
    },
    /// Take or renew the leadership for `holder` for `ttl` seconds.
    Lead {
        holder: String,
        ttl: f64,
        reply: Reply<Option<i64>>,
    },
    /// Give the leadership up (at shutdown), if still held with `token`.
    Resign {
        holder: String,
        token: i64,
        reply: Reply<()>,
    },
    Rollback,
    /// Catch up without locking (a read-only snapshot).
    Refresh {
        since: Option<Position>,
        size: PullSize,
        rows: Rows,
        reply: Reply<(Head, Pulled)>,
    },
}

/// This replica's link to the database: a channel to the thread that owns
/// the connection.
pub(crate) struct Replica {
    jobs: mpsc::Sender<Job>,
    /// Leadership's own connection (`Lead`, `Resign`): a renewal never
    /// waits behind this replica's writer or its open transaction.
    leadership: mpsc::Sender<Job>,
    /// The deletion horizon's settings (a test hook makes them small).
    gc: std::sync::Mutex<Gc>,
    /// Test hook: the next COMMIT fails (a real failing statement first).
    fail_next_commit: AtomicBool,
    /// Test hook: the next commit reaches PostgreSQL but not the mirror,
    /// as if the process died in between.
    lose_next_apply: AtomicBool,
    /// Rows per chunk of a streamed pull (a test hook makes it small).
    chunk: AtomicUsize,
    /// Test hook: a streamed pull stops after applying this many chunks,
    /// as if the process died there (0: never).
    die_after_chunks: AtomicUsize,
    /// What the commit and pull session last heard from the database.
    heard: Arc<Heard>,
}

/// An open PostgreSQL transaction holding the head's row lock.
pub(super) struct Open<'s> {
    replica: &'s Replica,
    store: &'s Store,
    done: bool,
}

impl Replica {
    /// Starts the connection thread; connects (and migrates when asked)
    /// before returning, so a bad URL or password fails the start.
    pub(super) fn start(settings: &PgSettings) -> Result<Replica, StoreError> {
        let (jobs, inbox) = mpsc::channel();
        let heard = Arc::new(Heard::default());
        let heard_by_thread = heard.clone();
        let (ready, started) = mpsc::sync_channel(1);
        let settings_for_leadership = settings.clone();
        let settings = settings.clone();
        std::thread::Builder::new()
            .name("jitbot-pg".into())
            .spawn(move || {
                let client = settings.connect().and_then(|mut client| {
                    if settings.migrate {
                        migrate_with(&mut client)?;
                    }
                    match schema_version(&mut client)? {
                        SCHEMA_VERSION => Ok(client),
                        found if found > SCHEMA_VERSION => Err(newer_schema(found)),
                        found => Err(StoreError::Io(format!(
                            "the database's jitbot schema is version {found}, this jitbot needs {SCHEMA_VERSION}; \
                             run `jitbot migrate` (or leave [store] migrate on)"
                        ))),
                    }
                });
                match client {
                    Ok(client) => {
                        let _ = ready.send(Ok(()));
                        serve(client, settings, inbox, &heard_by_thread);
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                    }
                }
            })
            .map_err(|e| StoreError::Io(format!("cannot start the PostgreSQL thread: {e}")))?;
        started
            .recv()
            .map_err(|_| StoreError::Io("the PostgreSQL thread stopped while connecting".into()))??;
        let leadership = serve_leadership(settings_for_leadership)?;
        Ok(Replica {
            jobs,
            leadership,
            gc: std::sync::Mutex::new(GC),
            fail_next_commit: AtomicBool::new(false),
            lose_next_apply: AtomicBool::new(false),
            chunk: AtomicUsize::new(PULL_CHUNK),
            die_after_chunks: AtomicUsize::new(0),
            heard,
        })
    }

    fn pull_size(&self) -> PullSize {
        let chunk = self.chunk.load(Ordering::SeqCst).max(1);
        PullSize {
            chunk,
            big: BIG_PULL.min(chunk),
        }
    }

    /// Brings the mirror up to date from a read-only snapshot, streaming
    /// whatever is big. Called with the store's writer lock held.
    fn catch_up_outside(&self, store: &Store) -> Result<bool, StoreError> {
        let since = mirror_position(store)?;
        let size = self.pull_size();
        let (rows, chunks) = mpsc::sync_channel(1);
        let (head, pulled) = self.ask(|reply| Job::Refresh {
            since,
            size,
            rows,
            reply,
        })?;
        catch_up(store, &head, pulled, &chunks, self)
    }

    fn ask<T>(&self, job: impl FnOnce(Reply<T>) -> Job) -> Result<T, StoreError> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.jobs
            .send(job(reply))
            .map_err(|_| StoreError::Io("the PostgreSQL thread has stopped; restart jitbot".into()))?;
        answer
            .recv()
            .map_err(|_| StoreError::Io("the PostgreSQL thread has stopped; restart jitbot".into()))?
    }

    fn ask_leadership<T>(&self, job: impl FnOnce(Reply<T>) -> Job) -> Result<T, StoreError> {
        let stopped =
            || StoreError::Io("the PostgreSQL leadership thread has stopped; restart jitbot".into());
        let (reply, answer) = mpsc::sync_channel(1);
        self.leadership.send(job(reply)).map_err(|_| stopped())?;
        answer.recv().map_err(|_| stopped())?
    }
}

impl Backend for Replica {
    /// BEGIN and lock the head, then bring the mirror up to date. Called
    /// with the store's writer lock held. A mirror that must reload
    /// everything, or apply more than [`BIG_PULL`] changes, does so without
    /// holding the head's lock (a long catch-up would stop every other
    /// replica's writes, and outlast the idle timeout), then locks again to
    /// pull what landed meanwhile. A lock held elsewhere past `lock_timeout` is
    /// tried for again, [`LOCK_TRIES`] times in all.
    fn begin<'s>(&'s self, store: &'s Store) -> Result<Box<dyn Commit + 's>, StoreError> {
        let mut busy_tries = 0;
        let mut outside = 0;
        loop {
            let since = mirror_position(store)?;
            let size = self.pull_size();
            let stream_big = outside >= OUTSIDE_TRIES;
            let (rows, chunks) = mpsc::sync_channel(1);
            let began = self.ask(|reply| Job::Begin {
                since,
                size,
                stream_big,
                rows,
                reply,
            })?;
            let (head, pulled) = match began {
                Began::Locked(head, pulled) => (head, pulled),
                Began::Busy(why) => {
                    busy_tries += 1;
                    if busy_tries >= LOCK_TRIES {
                        return Err(StoreError::Io(why));
                    }
                    tracing::warn!(error = %why, "waiting again for the store's lock in PostgreSQL");
                    continue;
                }
            };
            // From here on, dropping `open` rolls the transaction back.
            let open = Open {
                replica: self,
                store,
                done: false,
            };
            if let Pulled::Behind = pulled {
                outside += 1;
                drop(open);
                self.catch_up_outside(store)?;
                continue;
            }
            catch_up(store, &head, pulled, &chunks, self)?;
            return Ok(Box::new(open));
        }
    }

    /// Brings the mirror up to date without taking the database's lock.
    /// Called with the store's writer lock held.
    fn refresh(&self, store: &Store) -> Result<bool, StoreError> {
        self.catch_up_outside(store)
    }

    fn durability(&self) -> Durability {
        // PostgreSQL committed it durably; the mirror is rebuilt from
        // there, so it need not reach the disk first.
        Durability::AtCommit
    }

    fn election(&self) -> Option<&dyn Election> {
        Some(self)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Election for Replica {
    /// Takes or renews the leadership on leadership's own connection.
    fn lead(&self, holder: &str, ttl: Duration) -> Result<Option<i64>, StoreError> {
        self.ask_leadership(|reply| Job::Lead {
            holder: holder.to_string(),
            ttl: ttl.as_secs_f64(),
            reply,
        })
    }

    /// Gives the term up on leadership's own connection.
    fn resign(&self, holder: &str, token: i64) -> Result<(), StoreError> {
        self.ask_leadership(|reply| Job::Resign {
            holder: holder.to_string(),
            token,
            reply,
        })
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.replica.jobs.send(Job::Rollback);
        }
    }
}

impl Commit for Open<'_> {
    /// Writes `log` to PostgreSQL as the next version and commits; then
    /// applies it to the mirror. With nothing written, just ends the
    /// transaction.
    fn commit(mut self: Box<Self>, log: Vec<Change>) -> Result<(), StoreError> {
        if log.is_empty() {
            self.done = true;
            let _ = self.replica.jobs.send(Job::Rollback);
            return Ok(());
        }
        // Before `done`: a store fenced without a holder rolls back.
        let fence = self.store.commit_fence()?;
        self.done = true;
        // The last write of each key is the one that counts.
        let mut last: BTreeMap<(&'static str, Vec<u8>), Change> = BTreeMap::new();
        for change in log {
            last.insert((change.tree.name(), change.key.clone()), change);
        }
        let changes: Vec<Change> = last.into_values().collect();
        if self.replica.fail_next_commit.swap(false, Ordering::SeqCst) {
            let _ = self.replica.ask(|reply| Job::Commit {
                gc: GC,
                fence: None,
                changes: vec![Change {
                    tree: TreeId::Meta,
                    key: FAIL_KEY.to_vec(),
                    value: None,
                }],
                reply,
            })?;
        }
        let gc = *self.replica.gc.lock().unwrap_or_else(|p| p.into_inner());
        let (version, commit_id) = self.replica.ask(|reply| Job::Commit {
            gc,
            fence,
            changes: changes.clone(),
            reply,
        })?;
        if self.replica.lose_next_apply.swap(false, Ordering::SeqCst) {
            return Err(StoreError::Io(
                "test hook: committed to PostgreSQL, and the mirror was not updated".into(),
            ));
        }
        if let Err(e) = apply(self.store, &changes, version, None, Some(&commit_id)) {
            // The database holds the change and the mirror may not: fail
            // closed; the restart catches up from the database.
            let why = format!("the local mirror could not take a committed change ({e})");
            let _ = self.store.inner.failed.set(why.clone());
            return Err(StoreError::Failed(why));
        }
        Ok(())
    }
}

/// A key whose write makes the commit fail inside PostgreSQL (test hook).
const FAIL_KEY: &[u8] = b"\0jitbot-test-fail-commit";

/// The mirror's position, or `None` when it must reload.
fn mirror_position(store: &Store) -> Result<Option<Position>, StoreError> {
    let mirror = &store.inner.mirror;
    let version = mirror.get(MIRROR_VERSION)?;
    let db = mirror.get(MIRROR_DB)?;
    let commit = mirror.get(MIRROR_COMMIT)?;
    Ok(match (version, db) {
        (Some(v), Some(db)) if v.len() == 8 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&v);
            Some(Position {
                version: i64::from_be_bytes(b),
                db_id: String::from_utf8_lossy(&db).into_owned(),
                commit_id: commit.map(|c| String::from_utf8_lossy(&c).into_owned()),
            })
        }
        _ => None,
    })
}

/// Brings the mirror to `head`; whether anything changed. A streamed
/// pull's rows come from `chunks`.
fn catch_up(
    store: &Store,
    head: &Head,
    pulled: Pulled,
    chunks: &mpsc::Receiver<Chunk>,
    replica: &Replica,
) -> Result<bool, StoreError> {
    // A generation a reload replaced while a reader held it goes once
    // the reader is done.
    store.drop_retired();
    match pulled {
        Pulled::Changes(changes) => {
            if changes.is_empty()
                && mirror_position(store)?
                    .is_some_and(|p| p.version == head.version && p.commit_id == head.commit_id)
            {
                return Ok(false);
            }
            apply(store, &changes, head.version, None, head.commit_id.as_deref())?;
            Ok(!changes.is_empty())
        }
        Pulled::Behind => Err(StoreError::Io(
            "PostgreSQL answered a catch-up with nothing to apply; report this bug".into(),
        )),
        Pulled::Streamed { reload: false, .. } => {
            let mut feed = Feed {
                chunks,
                replica,
                applied: 0,
            };
            apply_streamed(store, head, &mut feed)
        }
        Pulled::Streamed { reload: true, lost } => {
            if let Some(lost) = lost {
                tracing::error!(
                    what = %lost,
                    "the database lost commits this replica saw (a failover to a standby that was behind, or \
                     a restore of an older copy); reloading this replica's mirror from the database. Whatever \
                     those commits did (grants, approvals, audit records) is gone from the store: check the \
                     directory's memberships and the audit log against what users were told"
                );
            }
            let mut feed = Feed {
                chunks,
                replica,
                applied: 0,
            };
            reload(store, head, &mut feed).map(|()| true)
        }
    }
}

/// The chunks of a streamed pull, as the mirror takes them.
struct Feed<'a> {
    chunks: &'a mpsc::Receiver<Chunk>,
    replica: &'a Replica,
    /// Chunks applied so far.
    applied: usize,
}

impl Feed<'_> {
    /// The next chunk, or `None` after the last.
    fn next(&mut self) -> Result<Option<Vec<Change>>, StoreError> {
        let die_after = self.replica.die_after_chunks.load(Ordering::SeqCst);
        if die_after > 0 && self.applied >= die_after {
            self.replica.die_after_chunks.store(0, Ordering::SeqCst);
            return Err(StoreError::Io(format!(
                "test hook: the catch-up stopped after {} chunks, as if the process died",
                self.applied
            )));
        }
        match self.chunks.recv() {
            Ok(Chunk::Rows(rows)) => Ok(Some(rows)),
            Ok(Chunk::End) => Ok(None),
            Ok(Chunk::Failed(e)) => Err(e),
            Err(_) => Err(StoreError::Io(
                "the PostgreSQL thread stopped in the middle of a catch-up; nothing was acted on, try again"
                    .into(),
            )),
        }
    }
}

/// Applies streamed changes. One chunk goes in with the new version in
/// one sled transaction, as a small pull does. More than one cannot (a
/// sled transaction pins its epoch for all its writes), and the stream
/// is the latest value of each key, in no order: no part of it is a state
/// any commit left. So every chunk is staged first ([`Staged`], on disk,
/// one row at a time), while readers go on reading the mirror as it was;
/// a stream that breaks leaves the mirror untouched at its old position.
/// Once all have come, the reader gate is closed and the staged rows are
/// applied in place, the mirror's version going first, so a crash
/// half-way reloads (a mirror holding part of the changes at its old
/// version would keep them even if the database later lost those
/// commits). Readers wait for that local apply, never for the database.
fn apply_streamed(store: &Store, head: &Head, feed: &mut Feed<'_>) -> Result<bool, StoreError> {
    let Some(first) = feed.next()? else {
        apply(store, &[], head.version, None, head.commit_id.as_deref())?;
        return Ok(false);
    };
    feed.applied += 1;
    let Some(second) = feed.next()? else {
        apply(store, &first, head.version, None, head.commit_id.as_deref())?;
        return Ok(!first.is_empty());
    };
    let staged = Staged::new(store)?;
    staged.put(&first)?;
    drop(first);
    let mut next = Some(second);
    while let Some(chunk) = next {
        staged.put(&chunk)?;
        feed.applied += 1;
        drop(chunk);
        next = feed.next()?;
    }
    forget_position(store)?;
    let readers_wait = store.applying()?;
    let started = std::time::Instant::now();
    let applied = staged
        .apply()
        .and_then(|rows| apply(store, &[], head.version, None, head.commit_id.as_deref()).map(|()| rows));
    let rows = match applied {
        Ok(rows) => rows,
        Err(e) => {
            // Half applied, and the local store failing: fail closed; the
            // restart reloads (the mirror has no position).
            let why = format!("the local mirror could not take a catch-up from PostgreSQL ({e})");
            let _ = store.inner.failed.set(why.clone());
            return Err(StoreError::Failed(why));
        }
    };
    drop(readers_wait);
    tracing::info!(
        rows,
        readers_waited_ms = started.elapsed().as_millis(),
        "applied a big catch-up from PostgreSQL to the mirror; reads waited for it"
    );
    Ok(true)
}

/// Removes the mirror's version (keeping which database it mirrors, so it
/// is still known as a mirror), on disk before anything else changes: a
/// crash from here on leaves a mirror without a version, which reloads.
fn forget_position(store: &Store) -> Result<(), StoreError> {
    store.inner.mirror.remove(MIRROR_VERSION)?;
    store.inner.mirror.remove(MIRROR_COMMIT)?;
    store.inner.db.flush()?;
    Ok(())
}

/// Applies `changes` to the mirror and sets its version (and commit
/// identity: none removes it), in one sled transaction.
fn apply(
    store: &Store,
    changes: &[Change],
    version: i64,
    db: Option<&str>,
    commit: Option<&str>,
) -> Result<(), StoreError> {
    let version = version.to_be_bytes();
    let mut position: Vec<Bookkeeping<'_>> = vec![
        (MIRROR_VERSION, Some(&version)),
        (MIRROR_COMMIT, commit.map(str::as_bytes)),
    ];
    if let Some(db) = db {
        position.push((MIRROR_DB, Some(db.as_bytes())));
    }
    super::kv::apply(store, changes, &position)
}

/// Replaces the whole mirror with the database's contents, chunk by
/// chunk, into the next generation of the trees (`kv::Trees`) while
/// readers go on reading the current one; the new generation becomes
/// current at once when complete, so no reader sees the store emptied or
/// half-loaded. The mirror's version goes first, so a crash half-way
/// reloads again (the mirror's kind mark stays, so the mirror is not taken
/// for a sled store at the next start, and the half-loaded generation is
/// dropped there). The generation in use is marked with the new position,
/// in one sled transaction, flushed, before it is installed.
fn reload(store: &Store, head: &Head, feed: &mut Feed<'_>) -> Result<(), StoreError> {
    store.inner.mirror.remove(MIRROR_VERSION)?;
    store.inner.mirror.remove(MIRROR_COMMIT)?;
    store.inner.mirror.insert(MIRROR_DB, head.db_id.as_bytes())?;
    store.inner.db.flush()?;
    let current = store.inner.trees();
    // An empty mirror (a new replica) has nothing to hide from readers:
    // it loads in place. Otherwise into the next generation, after
    // dropping what a reload that failed earlier in this process left of
    // it (nobody reads it).
    let in_place = TreeId::ALL.iter().all(|t| current.get(*t).is_empty());
    let loading = if in_place {
        current
    } else {
        let next = current.generation() + 1;
        drop(current);
        Trees::drop_generation(&store.inner.db, next)?;
        Arc::new(Trees::open(&store.inner.db, next)?)
    };
    while let Some(rows) = feed.next()? {
        // One insert per row, not one `apply_batch` per tree: sled pins
        // its epoch for a whole batch, so the old versions of every node
        // the batch rewrote stay allocated until well after it (a new
        // replica peaked at 12.9 GiB with 1,000,000 leases); an insert
        // pins and unpins, and sled frees them as it goes (BENCHMARKS.md,
        // "A new replica's memory"). Nothing needs a chunk atomic: the
        // generation is not read, and has no position, until all are in.
        for row in rows {
            if let Some(v) = row.value {
                loading.get(row.tree).insert(row.key, v)?;
            }
        }
        feed.applied += 1;
    }
    let generation = loading.generation().to_be_bytes();
    let version = head.version.to_be_bytes();
    super::kv::apply(
        store,
        &[],
        &[
            (GENERATION, Some(&generation)),
            (MIRROR_VERSION, Some(&version)),
            (MIRROR_COMMIT, head.commit_id.as_deref().map(str::as_bytes)),
            (MIRROR_DB, Some(head.db_id.as_bytes())),
        ],
    )?;
    store.inner.db.flush()?;
    if !in_place {
        store.install(loading);
    }
    Ok(())
}

/// Whether a sled directory holds data but is no mirror: pointing the
/// PostgreSQL backend at an existing sled store would throw its data away.
/// A mirror is known by its kind mark ([`mark_mirror`]), or, made before
/// the mark existed, by the database it mirrors; a mirror without a
/// position (a crash during a reload or a big catch-up) is still a mirror,
/// and reloads.
pub(super) fn holds_sled_store(store: &Store) -> Result<bool, StoreError> {
    if is_mirror(store)? {
        return Ok(false);
    }
    for t in TreeId::ALL {
        if !store.tree(t).is_empty() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Whether a sled directory is a mirror of PostgreSQL: its kind mark
/// ([`mark_mirror`]), or, made before the mark existed, the database it
/// mirrors.
pub(super) fn is_mirror(store: &Store) -> Result<bool, StoreError> {
    Ok(store.inner.mirror.get(MIRROR_KIND)?.is_some() || store.inner.mirror.get(MIRROR_DB)?.is_some())
}

/// Marks the directory as a mirror of PostgreSQL, on disk, before anything
/// is written to it (called once [`holds_sled_store`] said it is no sled
/// store); the mark is never removed.
pub(super) fn mark_mirror(store: &Store) -> Result<(), StoreError> {
    if store.inner.mirror.get(MIRROR_KIND)?.as_deref() != Some(MIRROR_KIND_POSTGRES) {
        store.inner.mirror.insert(MIRROR_KIND, MIRROR_KIND_POSTGRES)?;
        store.inner.db.flush()?;
    }
    Ok(())
}

/// One key of a mirror (`Store::mirror_rows`): tree name, key, value.
#[doc(hidden)]
pub type MirrorRow = (&'static str, Vec<u8>, Vec<u8>);

impl Store {
    /// This store's link to PostgreSQL, when it is a replica.
    fn replica(&self) -> Option<&Replica> {
        self.inner.backend.as_any().downcast_ref::<Replica>()
    }

    /// Test hook: the next PostgreSQL COMMIT fails (a failing statement is
    /// sent in the transaction, so PostgreSQL rolls it back).
    #[doc(hidden)]
    pub fn fail_next_pg_commit(&self) {
        if let Some(r) = self.replica() {
            r.fail_next_commit.store(true, Ordering::SeqCst);
        }
    }

    /// Test hook: the next commit lands in PostgreSQL but not in this
    /// replica's mirror, as if the process were killed in between.
    #[doc(hidden)]
    pub fn lose_next_mirror_apply(&self) {
        if let Some(r) = self.replica() {
            r.lose_next_apply.store(true, Ordering::SeqCst);
        }
    }

    /// Test hook: this replica's catch-ups read `rows` rows per chunk
    /// (instead of 10,000), and apply at most that many changes under
    /// the head's lock (instead of 1,000).
    #[doc(hidden)]
    pub fn set_pg_pull_chunk(&self, rows: usize) {
        if let Some(r) = self.replica() {
            r.chunk.store(rows.max(1), Ordering::SeqCst);
        }
    }

    /// Test hook: the next streamed catch-up stops after applying
    /// `chunks` chunks and fails, leaving the mirror as if the process
    /// had been killed there.
    #[doc(hidden)]
    pub fn die_in_pg_pull_after(&self, chunks: usize) {
        if let Some(r) = self.replica() {
            r.die_after_chunks.store(chunks, Ordering::SeqCst);
        }
    }

    /// Test hook: every key of every tree of this replica's mirror, as
    /// (tree, key, value), by tree name and key.
    #[doc(hidden)]
    pub fn mirror_rows(&self) -> Result<Vec<MirrorRow>, StoreError> {
        let mut rows = Vec::new();
        for t in TreeId::ALL {
            for kv in self.tree(t).iter() {
                let (k, v) = kv?;
                rows.push((t.name(), k.to_vec(), v.to_vec()));
            }
        }
        rows.sort();
        Ok(rows)
    }

    /// Test hook: this replica collects deletions older than `keep`
    /// versions every `every` versions (instead of 100,000 and 1,000).
    #[doc(hidden)]
    pub fn set_pg_gc(&self, keep: i64, every: i64) {
        if let Some(r) = self.replica() {
            *r.gc.lock().unwrap_or_else(|p| p.into_inner()) = Gc {
                keep,
                every: every.max(1),
            };
        }
    }

    /// Brings this replica's mirror up to date with what other replicas
    /// committed (with PostgreSQL; nothing to do on sled). Every write
    /// does this first; call it periodically so reads between writes stay
    /// fresh. Returns whether anything changed.
    pub fn refresh(&self) -> Result<bool, StoreError> {
        self.check_healthy()?;
        let _lock = self.inner.writer.lock().unwrap_or_else(|p| p.into_inner());
        self.inner.backend.refresh(self)
    }

    /// How long this replica's commit and pull session (every commit and
    /// every refresh goes through it) has gone without an answer from
    /// PostgreSQL: since the first round trip after its last answer, once
    /// one failed without an answer (the server ended the session and
    /// refuses a new one, the link went dark) or has waited longer than
    /// the server takes to answer any statement ([`ANSWER_WAIT`]). `None`
    /// while it answers, and on sled. A writer waiting for another
    /// replica's lock, or for a slow commit, is answering.
    pub fn commits_unanswered(&self) -> Option<Duration> {
        self.replica().and_then(|r| r.heard.silence())
    }

    /// Whether this store is a replica of PostgreSQL.
    pub fn is_postgres(&self) -> bool {
        self.replica().is_some()
    }
}

/// Refreshes `store`'s mirror every `every` until shutdown (the refresh
/// waits for the database on tokio's blocking pool), calling `changed`
/// when it pulled something, so the scheduler and the outbox worker look
/// at other replicas' new timers and notices at once.
pub async fn refresh_every(
    store: Store,
    every: Duration,
    changed: impl Fn() + Send + 'static,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
        let s = store.clone();
        match tokio::task::spawn_blocking(move || s.refresh()).await {
            Ok(Ok(true)) => changed(),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot pull other replicas' changes from PostgreSQL; retrying")
            }
            Err(e) => tracing::warn!(error = %e, "the mirror refresh task failed; retrying"),
        }
    }
}

// ---- the connection thread ----

struct Conn {
    client: Option<postgres::Client>,
    settings: PgSettings,
}

impl Conn {
    fn client(&mut self) -> Result<&mut postgres::Client, StoreError> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = Some(self.settings.connect()?);
        }
        self.client
            .as_mut()
            .ok_or_else(|| StoreError::Io("no PostgreSQL connection".into()))
    }

    /// Runs `job` on the connection; when it fails and the connection
    /// turns out closed, reconnects and runs it once more. The blocking
    /// client learns that the server ended its session (a restart, a
    /// failover, a pooler recycling it) only by failing a statement, and
    /// the database may well be up again. `job` must fail only where it
    /// can run again: before it answered anyone, and before anything
    /// could have been committed, or with a statement that does the same
    /// when run twice.
    fn once_more<T>(
        &mut self,
        mut job: impl FnMut(&mut postgres::Client) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let failed = match job(self.client()?) {
            Err(e) if self.client.as_ref().is_some_and(|c| c.is_closed()) => e,
            done => return done,
        };
        tracing::info!(error = %failed, "PostgreSQL ended this replica's session; connecting again");
        self.client = None;
        job(self.client()?)
    }
}

impl Conn {
    /// Whether the session is there (after a round trip: whether it came
    /// back).
    fn open(&self) -> bool {
        self.client.as_ref().is_some_and(came_back)
    }
}

/// Serves the commit and pull session's jobs, noting in `heard` whether
/// each round trip came back.
fn serve(client: postgres::Client, settings: PgSettings, inbox: mpsc::Receiver<Job>, heard: &Heard) {
    let mut conn = Conn {
        client: Some(client),
        settings,
    };
    heard.answered();
    while let Ok(job) = inbox.recv() {
        if !matches!(job, Job::Rollback | Job::Commit { .. }) {
            heard.asking();
        }
        match job {
            Job::Begin {
                since,
                size,
                stream_big,
                rows,
                reply,
            } => {
                let locked = conn.once_more(|client| {
                    in_transaction(
                        client,
                        since.clone(),
                        size,
                        stream_big,
                        &rows,
                        &reply,
                        &inbox,
                        heard,
                    )
                });
                heard.settled(conn.open());
                if let Err(e) = locked {
                    let _ = reply.send(Err(e));
                }
            }
            Job::Refresh {
                since,
                size,
                rows,
                reply,
            } => {
                let read =
                    conn.once_more(|client| snapshot(client, since.clone(), size, &rows, &reply, heard));
                heard.settled(conn.open());
                if let Err(e) = read {
                    let _ = reply.send(Err(e));
                }
            }
            // A rollback or commit without a transaction: the caller gave
            // up on a `Begin` that failed.
            Job::Rollback => {}
            Job::Commit { reply, .. } => {
                let _ = reply.send(Err(StoreError::Io("no PostgreSQL transaction is open".into())));
            }
            Job::Lead { holder, ttl, reply } => {
                let _ = reply.send(conn.once_more(|c| lead(c, &holder, ttl)));
                heard.settled(conn.open());
            }
            Job::Resign { holder, token, reply } => {
                let _ = reply.send(conn.once_more(|c| resign(c, &holder, token)));
                heard.settled(conn.open());
            }
        }
    }
}

/// Starts leadership's connection thread: it connects on its first job
/// (and again after a lost connection) and serves only `Lead` and
/// `Resign`, so a renewal never queues behind this replica's writes.
fn serve_leadership(settings: PgSettings) -> Result<mpsc::Sender<Job>, StoreError> {
    let (jobs, inbox) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("jitbot-pg-lead".into())
        .spawn(move || {
            let mut conn = Conn {
                client: None,
                settings,
            };
            while let Ok(job) = inbox.recv() {
                match job {
                    // Both statements may run twice: a second renewal by
                    // the same holder keeps its token, a second resign
                    // finds the term expired already.
                    Job::Lead { holder, ttl, reply } => {
                        let _ = reply.send(conn.once_more(|c| lead(c, &holder, ttl)));
                    }
                    Job::Resign { holder, token, reply } => {
                        let _ = reply.send(conn.once_more(|c| resign(c, &holder, token)));
                    }
                    Job::Begin { reply, .. } => {
                        let _ = reply.send(Err(busy()));
                    }
                    Job::Refresh { reply, .. } => {
                        let _ = reply.send(Err(busy()));
                    }
                    Job::Commit { reply, .. } => {
                        let _ = reply.send(Err(busy()));
                    }
                    Job::Rollback => {}
                }
            }
        })
        .map_err(|e| StoreError::Io(format!("cannot start the PostgreSQL leadership thread: {e}")))?;
    Ok(jobs)
}

/// Expires the term `token` of `holder`, if it still holds it.
fn resign(client: &mut postgres::Client, holder: &str, token: i64) -> Result<(), StoreError> {
    client
        .execute(
            // Expired, not deleted: the next term's token must still be
            // larger than this one's.
            "UPDATE jitbot_leader SET expires_at = clock_timestamp() \
             WHERE id = 1 AND holder = $1 AND token = $2",
            &[&holder, &token],
        )
        .map(|_| ())
        .map_err(|e| pg_error("resigning the leadership", &e))
}

fn busy() -> StoreError {
    StoreError::Io("a PostgreSQL transaction is already open on this replica; report this bug".into())
}

/// Runs one locked transaction: the head lock and catch-up, then whatever
/// the writer sends until it commits or rolls back. An error is returned,
/// not sent, when it came before `reply` was answered: BEGIN, the head's
/// lock or the catch-up failed, and nothing was written.
#[allow(clippy::too_many_arguments)]
fn in_transaction(
    client: &mut postgres::Client,
    since: Option<Position>,
    size: PullSize,
    stream_big: bool,
    rows: &Rows,
    reply: &Reply<Began>,
    inbox: &mpsc::Receiver<Job>,
    heard: &Heard,
) -> Result<(), StoreError> {
    let mut tx = client.transaction().map_err(|e| pg_error("BEGIN", &e))?;
    let head = match read_head(&mut tx, "FOR UPDATE").and_then(|mut head| {
        let pulled = pull(&mut tx, &mut head, since, size, stream_big)?;
        Ok((head, pulled))
    }) {
        Ok((head, (pulled, stream))) => {
            heard.answered();
            if reply.send(Ok(Began::Locked(head.clone(), pulled))).is_err() {
                return Ok(());
            }
            if let Some(stream) = stream {
                if send_rows(&mut tx, stream, size, rows, heard).is_err() {
                    return Ok(());
                }
            }
            head
        }
        Err(HeadError::Busy(why)) => {
            // The server answered: the lock is another replica's.
            heard.answered();
            let _ = reply.send(Ok(Began::Busy(why)));
            return Ok(());
        }
        Err(HeadError::Store(e)) => return Err(e),
    };
    loop {
        match inbox.recv() {
            Ok(Job::Commit {
                changes,
                gc,
                fence,
                reply,
            }) => {
                heard.asking();
                let written = write(tx, &head, &changes, gc, fence);
                heard.settled(came_back(client));
                let _ = reply.send(written);
                return Ok(());
            }
            Ok(Job::Rollback) | Err(_) => return Ok(()),
            Ok(Job::Begin { reply, .. }) => {
                let _ = reply.send(Err(busy()));
            }
            Ok(Job::Refresh { reply, .. }) => {
                let _ = reply.send(Err(busy()));
            }
            Ok(Job::Lead { reply, .. }) => {
                let _ = reply.send(Err(busy()));
            }
            Ok(Job::Resign { reply, .. }) => {
                let _ = reply.send(Err(busy()));
            }
        }
    }
}

/// Why the head could not be read.
enum HeadError {
    /// Its lock was held elsewhere past `lock_timeout`.
    Busy(String),
    Store(StoreError),
}

impl From<StoreError> for HeadError {
    fn from(e: StoreError) -> HeadError {
        HeadError::Store(e)
    }
}

impl From<HeadError> for StoreError {
    fn from(e: HeadError) -> StoreError {
        match e {
            HeadError::Busy(why) => StoreError::Io(why),
            HeadError::Store(e) => e,
        }
    }
}

/// Reads the head row (with `lock`, e.g. `FOR UPDATE`); its commit
/// identity is filled in by [`pull`].
fn read_head(tx: &mut postgres::Transaction<'_>, lock: &str) -> Result<Head, HeadError> {
    let row = tx
        .query_one(
            &format!("SELECT version, gc_version, db_id FROM jitbot_head WHERE id = 1 {lock}"),
            &[],
        )
        .map_err(|e| {
            if e.code() == Some(&postgres::error::SqlState::LOCK_NOT_AVAILABLE) {
                HeadError::Busy(format!(
                    "another jitbot replica held the store's lock (jitbot_head) for over {LOCK_TIMEOUT}; nothing \
                     was acted on, try again. A replica stalled inside a transaction is cut off after \
                     {IDLE_IN_TRANSACTION}: if this keeps happening, look in pg_stat_activity for the session \
                     holding it"
                ))
            } else {
                HeadError::Store(pg_error("reading jitbot_head", &e))
            }
        })?;
    Ok(Head {
        version: row.get(0),
        gc_version: row.get(1),
        db_id: row.get(2),
        commit_id: None,
    })
}

/// The recorded identity of each of `versions`' commits, when the
/// database has one.
fn commit_ids(
    tx: &mut postgres::Transaction<'_>,
    versions: &[i64],
) -> Result<BTreeMap<i64, String>, StoreError> {
    let rows = tx
        .query(
            "SELECT version, commit_id FROM jitbot_commits WHERE version = ANY($1)",
            &[&versions],
        )
        .map_err(|e| pg_error("reading jitbot_commits", &e))?;
    Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// What the mirror at `since` must do to reach `head` (whose commit
/// identity this fills in), and what to stream after answering. The
/// mirror's history must be the database's: a head behind the mirror, or
/// a different commit recorded for the mirror's version, means the
/// database lost commits the mirror holds (a failover to a standby that
/// was behind), and the mirror reloads. At most `size.big` changes are
/// read here; more, or a reload, are streamed, or (without `stream_big`)
/// answered with [`Pulled::Behind`].
fn pull(
    tx: &mut postgres::Transaction<'_>,
    head: &mut Head,
    since: Option<Position>,
    size: PullSize,
    stream_big: bool,
) -> Result<(Pulled, Option<Stream>), StoreError> {
    let mut versions = vec![head.version];
    if let Some(p) = &since {
        versions.push(p.version);
    }
    let ids = commit_ids(tx, &versions)?;
    head.commit_id = ids.get(&head.version).cloned();
    let mut lost = None;
    let from = match since {
        Some(p) if p.db_id == head.db_id && p.version > head.version => {
            lost = Some(format!(
                "this replica's mirror is at version {}, the database's head at {}",
                p.version, head.version
            ));
            None
        }
        Some(p) if p.db_id == head.db_id && p.version >= head.gc_version => {
            match (&p.commit_id, ids.get(&p.version)) {
                // A mirror from before commits had identities.
                (None, _) => Some(p.version),
                (Some(mine), Some(theirs)) if mine == theirs => Some(p.version),
                (Some(mine), theirs) => {
                    lost = Some(format!(
                        "this replica's mirror holds commit {mine} as version {}, the database {}",
                        p.version,
                        theirs.map_or("has no record of that version".to_string(), |t| format!(
                            "holds {t}"
                        )),
                    ));
                    None
                }
            }
        }
        _ => None,
    };
    let Some(from) = from else {
        if !stream_big {
            return Ok((Pulled::Behind, None));
        }
        return Ok((Pulled::Streamed { reload: true, lost }, Some(Stream::Everything)));
    };
    if from == head.version {
        return Ok((Pulled::Changes(Vec::new()), None));
    }
    let limit = i64::try_from(size.big).unwrap_or(i64::MAX).saturating_add(1);
    let rows = tx
        .query(
            "SELECT tree, key, value FROM jitbot_kv WHERE version > $1 ORDER BY version LIMIT $2",
            &[&from, &limit],
        )
        .map_err(|e| pg_error("reading changes from other replicas", &e))?;
    if rows.len() <= size.big {
        return Ok((Pulled::Changes(changes_of(rows)?), None));
    }
    if !stream_big {
        return Ok((Pulled::Behind, None));
    }
    Ok((
        Pulled::Streamed {
            reload: false,
            lost: None,
        },
        Some(Stream::Since(from)),
    ))
}

/// Streams `stream`'s rows to `rows` in chunks of `size.chunk` through a
/// portal in `tx` (one snapshot, however long it takes), then
/// [`Chunk::End`]; a failure is sent as [`Chunk::Failed`]. An error here
/// means the transaction is unusable (or nobody reads the rows any more).
fn send_rows(
    tx: &mut postgres::Transaction<'_>,
    stream: Stream,
    size: PullSize,
    rows: &Rows,
    heard: &Heard,
) -> Result<(), ()> {
    let gone = |_| ();
    let read = |tx: &mut postgres::Transaction<'_>| -> Result<postgres::Portal, StoreError> {
        match stream {
            Stream::Everything => tx.bind(
                "SELECT tree, key, value FROM jitbot_kv WHERE value IS NOT NULL",
                &[],
            ),
            Stream::Since(from) => tx.bind(
                "SELECT tree, key, value FROM jitbot_kv WHERE version > $1",
                &[&from],
            ),
        }
        .map_err(|e| pg_error("reading the store", &e))
    };
    let portal = match read(tx) {
        Ok(portal) => portal,
        Err(e) => return rows.send(Chunk::Failed(e)).map_err(gone).and(Err(())),
    };
    let max = i32::try_from(size.chunk).unwrap_or(i32::MAX);
    loop {
        heard.asking();
        let read = tx.query_portal(&portal, max);
        heard.settled(read.as_ref().map_or_else(|e| !e.is_closed(), |_| true));
        let chunk = read
            .map_err(|e| pg_error("reading the store", &e))
            .and_then(changes_of);
        match chunk {
            Ok(chunk) if chunk.is_empty() => return rows.send(Chunk::End).map_err(gone),
            Ok(chunk) => {
                let last = chunk.len() < size.chunk;
                rows.send(Chunk::Rows(chunk)).map_err(gone)?;
                if last {
                    return rows.send(Chunk::End).map_err(gone);
                }
            }
            Err(e) => return rows.send(Chunk::Failed(e)).map_err(gone).and(Err(())),
        }
    }
}

fn changes_of(rows: Vec<postgres::Row>) -> Result<Vec<Change>, StoreError> {
    rows.into_iter()
        .map(|row| {
            let tree: String = row.get(0);
            let tree = TreeId::from_name(&tree).ok_or_else(|| StoreError::Corrupt {
                key: format!("jitbot_kv tree {tree}"),
                error: "not a tree this jitbot knows; is a newer jitbot writing to this database?".into(),
            })?;
            Ok(Change {
                tree,
                key: row.get(1),
                value: row.get(2),
            })
        })
        .collect()
}

/// Catches up from a read-only snapshot: answers `reply`, then streams
/// what is big to `rows` from the same snapshot. An error is returned, not
/// sent, when it came before `reply` was answered (the transaction is
/// read-only: it may run again).
fn snapshot(
    client: &mut postgres::Client,
    since: Option<Position>,
    size: PullSize,
    rows: &Rows,
    reply: &Reply<(Head, Pulled)>,
    heard: &Heard,
) -> Result<(), StoreError> {
    let mut tx = client
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .map_err(|e| pg_error("BEGIN", &e))?;
    let mut head = read_head(&mut tx, "")?;
    match pull(&mut tx, &mut head, since, size, true)? {
        (pulled, None) => {
            tx.commit().map_err(|e| pg_error("COMMIT", &e))?;
            let _ = reply.send(Ok((head, pulled)));
        }
        (pulled, Some(stream)) => {
            // Applying a chunk, or clearing the mirror for a reload, may
            // keep this snapshot idle for longer than a writer may be.
            tx.batch_execute(&format!(
                "SET LOCAL idle_in_transaction_session_timeout = '{STREAM_IDLE}'"
            ))
            .map_err(|e| pg_error("setting the snapshot's timeout", &e))?;
            if reply.send(Ok((head, pulled))).is_err() {
                return Ok(());
            }
            heard.answered();
            if send_rows(&mut tx, stream, size, rows, heard).is_ok() {
                let _ = tx.commit();
            }
        }
    }
    Ok(())
}

/// Takes the leadership when it is free or expired, or renews it when
/// `holder` has it; the token grows with every new term. The database's
/// clock decides expiry, so the replicas' clocks need not agree.
fn lead(client: &mut postgres::Client, holder: &str, ttl: f64) -> Result<Option<i64>, StoreError> {
    let rows = client
        .query(
            "INSERT INTO jitbot_leader AS l (id, holder, token, expires_at) \
             VALUES (1, $1, 1, clock_timestamp() + make_interval(secs => $2)) \
             ON CONFLICT (id) DO UPDATE SET \
               token = CASE WHEN l.holder = excluded.holder AND l.expires_at > clock_timestamp() \
                       THEN l.token ELSE l.token + 1 END, \
               holder = excluded.holder, \
               expires_at = excluded.expires_at \
             WHERE l.expires_at <= clock_timestamp() OR l.holder = excluded.holder \
             RETURNING token",
            &[&holder, &ttl],
        )
        .map_err(|e| pg_error("taking the leadership", &e))?;
    Ok(rows.first().map(|r| r.get(0)))
}

fn write(
    mut tx: postgres::Transaction<'_>,
    head: &Head,
    changes: &[Change],
    gc_at: Gc,
    fence: Option<super::leader::Fence>,
) -> Result<(i64, String), StoreError> {
    if let Some(fence) = fence {
        // FOR SHARE: a takeover (an UPDATE of this row) waits for this
        // COMMIT, so no change of a deposed leader lands in a later term.
        // The holder too: a database that lost the row issues a token
        // again, to another replica.
        let held = tx
            .query(
                "SELECT token FROM jitbot_leader WHERE id = 1 AND token = $1 AND holder = $2 \
                 AND expires_at > clock_timestamp() FOR SHARE",
                &[&fence.token, &fence.holder],
            )
            .map_err(|e| pg_error("checking the leadership", &e))?;
        if held.is_empty() {
            return Err(StoreError::Deposed);
        }
    }
    let version = head.version + 1;
    let trees: Vec<&str> = changes.iter().map(|c| c.tree.name()).collect();
    let keys: Vec<&[u8]> = changes.iter().map(|c| c.key.as_slice()).collect();
    let values: Vec<Option<&[u8]>> = changes.iter().map(|c| c.value.as_deref()).collect();
    if changes.iter().any(|c| c.key == FAIL_KEY) {
        tx.execute("SELECT 1 / 0", &[])
            .map_err(|e| pg_error("COMMIT (test hook)", &e))?;
    }
    let mut gc = head.gc_version;
    if version % gc_at.every == 0 && version > gc_at.keep {
        gc = version - gc_at.keep;
        tx.execute(
            "DELETE FROM jitbot_kv WHERE value IS NULL AND version <= $1",
            &[&gc],
        )
        .map_err(|e| pg_error("collecting old deletions", &e))?;
        // A mirror at `gc` or above is checked against its commit's record.
        tx.execute("DELETE FROM jitbot_commits WHERE version < $1", &[&gc])
            .map_err(|e| pg_error("collecting old commit records", &e))?;
    }
    // One round trip: the keys, the commit's new identity (replacing the
    // record of a commit the database lost, if it kept one) and the head.
    // The collection above touches only versions at or below `gc`, far
    // below this one.
    let row = tx
        .query_one(
            "WITH kv AS ( \
               INSERT INTO jitbot_kv (tree, key, value, version) \
               SELECT t, k, v, $4 FROM unnest($1::text[], $2::bytea[], $3::bytea[]) AS u(t, k, v) \
               ON CONFLICT (tree, key) DO UPDATE SET value = excluded.value, version = excluded.version \
             ), head AS ( \
               UPDATE jitbot_head SET version = $4, gc_version = $5 WHERE id = 1 \
             ) \
             INSERT INTO jitbot_commits (version, commit_id) \
             VALUES ($4, md5(random()::text || clock_timestamp()::text)) \
             ON CONFLICT (version) DO UPDATE SET commit_id = excluded.commit_id \
             RETURNING commit_id",
            &[&trees, &keys, &values, &version, &gc],
        )
        .map_err(|e| pg_error("writing the change", &e))?;
    let commit_id: String = row.get(0);
    tx.commit().map_err(|e| pg_error("COMMIT", &e))?;
    Ok((version, commit_id))
}

/// Records a new random identity for the commit of `version` (replacing
/// the record of a commit the database lost, if it kept one).
fn record_commit(tx: &mut postgres::Transaction<'_>, version: i64) -> Result<String, StoreError> {
    let row = tx
        .query_one(
            "INSERT INTO jitbot_commits (version, commit_id) \
             VALUES ($1, md5(random()::text || clock_timestamp()::text)) \
             ON CONFLICT (version) DO UPDATE SET commit_id = excluded.commit_id \
             RETURNING commit_id",
            &[&version],
        )
        .map_err(|e| pg_error("recording the commit", &e))?;
    Ok(row.get(0))
}

/// Copies every tree of `from` (a sled store) into the empty database at
/// `to`, as version 1; returns the keys copied per tree.
pub(super) fn copy_into(
    rows: Vec<Change>,
    settings: &PgSettings,
) -> Result<BTreeMap<&'static str, u64>, StoreError> {
    let settings = settings.clone();
    on_own_thread(move || {
        let mut client = settings.connect()?;
        migrate_with(&mut client)?;
        let mut tx = client.transaction().map_err(|e| pg_error("BEGIN", &e))?;
        let head = read_head(&mut tx, "FOR UPDATE")?;
        let any: i64 = tx
            .query_one("SELECT count(*) FROM jitbot_kv", &[])
            .map_err(|e| pg_error("counting rows", &e))?
            .get(0);
        if head.version != 0 || any != 0 {
            return Err(StoreError::Io(
                "the target database already holds a jitbot store; copy into a new, empty database".into(),
            ));
        }
        let mut counts = BTreeMap::new();
        for chunk in rows.chunks(5_000) {
            for c in chunk {
                *counts.entry(c.tree.name()).or_insert(0) += 1;
            }
            let trees: Vec<&str> = chunk.iter().map(|c| c.tree.name()).collect();
            let keys: Vec<&[u8]> = chunk.iter().map(|c| c.key.as_slice()).collect();
            let values: Vec<Option<&[u8]>> = chunk.iter().map(|c| c.value.as_deref()).collect();
            tx.execute(
                "INSERT INTO jitbot_kv (tree, key, value, version) \
                 SELECT t, k, v, 1 FROM unnest($1::text[], $2::bytea[], $3::bytea[]) AS u(t, k, v)",
                &[&trees, &keys, &values],
            )
            .map_err(|e| pg_error("copying rows", &e))?;
        }
        tx.execute("UPDATE jitbot_head SET version = 1 WHERE id = 1", &[])
            .map_err(|e| pg_error("advancing jitbot_head", &e))?;
        record_commit(&mut tx, 1)?;
        let stored = tx
            .query(
                "SELECT tree, count(*) FROM jitbot_kv WHERE value IS NOT NULL GROUP BY tree",
                &[],
            )
            .map_err(|e| pg_error("counting the copy", &e))?;
        for row in stored {
            let tree: String = row.get(0);
            let n: i64 = row.get(1);
            let want = counts.get(tree.as_str()).copied().unwrap_or(0);
            if u64::try_from(n).ok() != Some(want) {
                return Err(StoreError::Io(format!(
                    "the copy of tree {tree} holds {n} keys, the source {want}; nothing was committed"
                )));
            }
        }
        tx.commit().map_err(|e| pg_error("COMMIT of the copy", &e))?;
        Ok(counts)
    })
}

#[cfg(test)]
mod tests {
    use super::Heard;

    #[test]
    fn sockets_to_postgres_carry_a_tcp_user_timeout_unless_the_url_sets_one() {
        let settings = |url: &str| super::PgSettings {
            url: url.into(),
            password: None,
            migrate: false,
            ca_file: None,
            mirror_compression: Default::default(),
        };
        let config = settings("postgres://jitbot@db:5432/jitbot").config().unwrap();
        assert_eq!(config.get_tcp_user_timeout(), Some(&super::TCP_USER_TIMEOUT));
        let config = settings("postgres://jitbot@db:5432/jitbot?tcp_user_timeout=9")
            .config()
            .unwrap();
        assert_eq!(
            config.get_tcp_user_timeout(),
            Some(&std::time::Duration::from_secs(9))
        );
    }

    #[test]
    fn a_session_answers_until_a_round_trip_fails_without_an_answer() {
        let heard = Heard::default();
        assert_eq!(heard.silence(), None, "nothing asked yet");
        heard.asking();
        assert_eq!(
            heard.silence(),
            None,
            "a round trip under way, well within a lock's wait"
        );
        heard.settled(true);
        assert_eq!(heard.silence(), None, "it came back");
        heard.asking();
        heard.settled(false);
        let first = heard.silence().expect("a round trip failed without an answer");
        heard.asking();
        heard.settled(false);
        let second = heard.silence().expect("and the next one too");
        assert!(second >= first, "counted from the first unanswered round trip");
        heard.asking();
        assert!(
            heard.silence().is_some(),
            "a retry under way does not hide the failure"
        );
        heard.answered();
        assert_eq!(heard.silence(), None, "answered again");
    }
}
