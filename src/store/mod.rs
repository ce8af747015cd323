//! The durable store on sled: the single source of truth.
//!
//! Trees: `requests`, `leases`, `timers` (ordered by due time: what the
//! scheduler works from), `timer_ix` (which key each timer has now), `live`
//! (group + user → the live lease, so a user never holds two), `audit`
//! (append-only, hash-chained: see [`audit`]), `outbox` and `outbox_due`
//! (notifications still to deliver, and each destination's queue of them:
//! see `outbox.rs`), `seen` (payload ids recently taken, against replays:
//! see [`seen`]).
//!
//! Every change goes through [`Store::update`]: the closure reads and stages
//! writes under a single writer lock (a compare-and-swap on the whole store),
//! the writes commit atomically across trees, and the database is flushed
//! before `update` returns, so the caller's side effect always follows a
//! durable record of it.

pub mod anchor_file;
mod archive;
pub mod audit;
mod backup;
mod check;
mod copy;
mod kv;
pub mod leader;
mod outbox;
pub mod pg;
pub(crate) mod pg_tls;
mod records;
pub mod retention;
pub mod seen;
mod startup;
mod timers;

pub use archive::{check_writable as check_archive_dir, ArchiveFile};
pub use audit::{Anchor, AuditCheck, Sealing};
pub use copy::CopyReport;
pub use outbox::OutboxJob;
pub use pg::PgSettings;
pub use records::{AuditEntry, LeaseRecord, OutboxItem, RequestRecord};
pub use timers::{Timer, TimerKind};

use jitbot_core::{GroupName, Instant, LeaseId, LeaseState, RequestId, UserId};
use kv::{Backend, Durability, SledBackend, TreeId, Writer};
use records::{StoredAudit, StoredLease, StoredRequest};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("the store at {path} is in use by another process (is `jitbot run` already running?)")]
    Locked { path: String },
    #[error("store I/O failed: {0}")]
    Io(String),
    #[error("stored record {key} is unreadable: {error}")]
    Corrupt { key: String, error: String },
    /// A backup whose trees do not agree with each other; nothing was restored.
    #[error("the backup is inconsistent, so nothing was restored: {problems}. Take a new backup from the running jitbot (`jitbot backup`) and restore that one")]
    Inconsistent { problems: String },
    /// A flush to disk failed earlier: what is in memory may not be on
    /// disk, so the store refuses everything until jitbot restarts and
    /// recovers from what the disk holds.
    #[error(
        "the store failed to write to disk ({0}); jitbot stops and must be restarted to recover from disk"
    )]
    Failed(String),
    /// A change would break a store invariant; it was not committed.
    #[error("refused to commit: {0}")]
    Invariant(String),
    /// This replica committed as the leader (a fenced store) and another
    /// replica has taken over: the change was not committed.
    #[error(
        "this replica is no longer the leader (another replica took over), so the change was not committed; \
         the leader does this work now"
    )]
    Deposed,
    /// The `[audit] key` is missing, or is not the key the store's audit
    /// chain was written with: jitbot refuses to start (and writes nothing),
    /// since every record written now would break the chain for good.
    #[error("{0}")]
    AuditKey(String),
    /// The directory is a PostgreSQL replica's local mirror, opened as a
    /// sled store.
    #[error(
        "{path} is the local mirror of a PostgreSQL replica, not a sled store: jitbot's data is in that PostgreSQL \
         database. To run this replica, set [store] kind = \"postgres\" with its url; to back up or move the data, \
         use the database (pg_dump), not this directory"
    )]
    Mirror { path: String },
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Io(e.to_string())
    }
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: sled::Db,
    /// The trees of [`TreeId`] (`outbox_due`: each destination's outbox
    /// queue in due order, see `outbox.rs`; `review`: requests approved
    /// by break-glass and not yet acknowledged; `seen`: chat payload ids
    /// recently taken), in their current generation (`kv::Trees`): read
    /// them through `Store::tree`.
    trees: std::sync::RwLock<Arc<kv::Trees>>,
    /// Generations a mirror reload replaced, until no reader holds them.
    retired: Mutex<Vec<Arc<kv::Trees>>>,
    /// The reader gate: read calls hold it for reading (`Store::reading`),
    /// a big catch-up applied in place for writing (`kv.rs`).
    gate: std::sync::RwLock<()>,
    /// The mirror's own bookkeeping with PostgreSQL (`pg.rs`); never
    /// replicated, backed up or copied.
    mirror: sled::Tree,
    /// Where commits become durable: sled itself ([`SledBackend`]), or
    /// PostgreSQL first (`pg::Replica`). Reads stay on the sled trees above.
    backend: Box<dyn Backend>,
    /// The leader's fencing token every commit is checked against, while
    /// this replica leads (0: none; see `leader.rs`).
    fence: std::sync::atomic::AtomicI64,
    /// This replica's term as the directory sees it (`leader.rs`).
    leadership: leader::Leadership,
    seen_count: std::sync::atomic::AtomicU64,
    /// The `[audit] key`, when the chain is keyed.
    audit_key: std::sync::OnceLock<crate::secret::Secret>,
    /// The audit archive directory, when retention is on (`archive.rs`).
    archive_dir: std::sync::OnceLock<std::path::PathBuf>,
    /// `[audit] anchor_file`: where published anchors are appended.
    anchor_file: std::sync::OnceLock<std::path::PathBuf>,
    writer: Mutex<()>,
    /// Group commit: commits made so far, and how many of them are on disk.
    committed: std::sync::atomic::AtomicU64,
    flushed: std::sync::atomic::AtomicU64,
    flusher: tokio::sync::Mutex<()>,
    /// Set when a flush failed: fail closed from then on.
    failed: std::sync::OnceLock<String>,
    /// Test hook: the next flush fails as a full disk would.
    fail_next_flush: std::sync::atomic::AtomicBool,
    /// Flush on the calling thread (see [`Store::flush_inline`]).
    inline_flush: std::sync::atomic::AtomicBool,
    /// How sled writes this store's pages: fixed when it was created.
    compression: Compression,
}

/// `[store] compression`: how sled writes the store's pages, chosen when
/// the store is created (sled refuses to open a store with another
/// setting, so an existing store keeps its own).
///
/// The trade-off, measured in BENCHMARKS.md: `zstd` stores a lifecycle
/// in about a quarter of the disk (1,101 against 4,617 bytes) and costs
/// every write some 45 µs of compression (6 µs without): a mass expiry of
/// 2,000 leases drains 2.7× slower, while a steady stream of expiries
/// (10,000 over a minute) sees about the same lag either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// zstd page compression: the smallest store.
    #[default]
    Zstd,
    /// No compression: the fastest writes (mass expiries).
    Off,
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Compression::Zstd => "zstd",
            Compression::Off => "off",
        })
    }
}

const AUDIT_HEAD: &[u8] = b"audit_head";
const SCHEMA: &[u8] = b"schema";
/// `meta` key written once `live` holds only folded slots
/// ([`fold_live_slots`]): releases since write no others.
const LIVE_FOLDED: &[u8] = b"live_folded";
const NEXT_ID: &[u8] = b"next_id";
const NEXT_OUTBOX: &[u8] = b"next_outbox";

fn live_key(group: &GroupName, user: &UserId) -> Vec<u8> {
    let mut k = group.as_str().as_bytes().to_vec();
    k.push(0);
    // Directories compare account names case-insensitively, and so does
    // the slot: `Alice` and `alice` share one.
    k.extend_from_slice(user.folded().as_bytes());
    k
}

/// Re-keys `live` slots written before account names were folded
/// (`db-admins\0Alice`) to the folded spelling that [`live_key`] gives, so
/// that a lease from an older release still holds its slot: otherwise its
/// holder could get a second lease, and the first could never be written
/// again (its slot taken) and so never end. Idempotent. It reads every
/// live slot (with 1,000,000 live leases: seconds, and about 100 MiB of
/// RSS that stays), so it runs until a store has been folded once
/// ([`LIVE_FOLDED`]), not on every open. Two legacy slots that fold to one
/// are both kept and logged: a person must look at them.
fn fold_live_slots(store: &Store) -> Result<(), StoreError> {
    let legacy: Vec<(sled::IVec, sled::IVec)> = store
        .tree(TreeId::Live)
        .iter()
        .filter_map(|item| match item {
            Ok((k, v)) if k.iter().any(u8::is_ascii_uppercase) => Some(Ok((k, v))),
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        })
        .collect::<Result<_, _>>()?;
    if legacy.is_empty() {
        return Ok(());
    }
    store.writer()?.transact([TreeId::Live], |[live]| {
        for (key, lease) in &legacy {
            let Some(split) = key.iter().position(|b| *b == 0) else {
                continue;
            };
            let mut folded = key[..=split].to_vec();
            folded.extend(key[split + 1..].iter().map(u8::to_ascii_lowercase));
            if folded == key.as_ref() {
                continue;
            }
            match live.get(&folded)? {
                Some(other) if other != *lease => {
                    tracing::error!(
                        slot = %String::from_utf8_lossy(&folded).replace('\0', " "),
                        lease = %String::from_utf8_lossy(lease),
                        other = %String::from_utf8_lossy(&other),
                        "two live leases of one user and group from an older jitbot (ids spelled in different case); \
                         revoke one of them with the admin API"
                    );
                    continue;
                }
                Some(_) => {}
                None => {
                    live.insert(&folded, lease)?;
                }
            }
            live.remove(key)?;
        }
        Ok(())
    })
}

fn decode<T: serde::de::DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        error: e.to_string(),
    })
}

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Serializing these plain structs to JSON cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

/// Audit record before it gets its sequence number and chain hash.
#[derive(Clone, Debug, Default)]
pub struct AuditDraft {
    pub actor: String,
    pub action: String,
    pub request: Option<String>,
    pub lease: Option<String>,
    pub group: Option<String>,
    pub user: Option<String>,
    pub detail: String,
}

impl AuditDraft {
    #[must_use]
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self
    }
    #[must_use]
    pub fn request(mut self, id: impl ToString) -> Self {
        self.request = Some(id.to_string());
        self
    }
    #[must_use]
    pub fn lease(mut self, id: impl ToString) -> Self {
        self.lease = Some(id.to_string());
        self
    }
    #[must_use]
    pub fn group(mut self, group: impl ToString) -> Self {
        self.group = Some(group.to_string());
        self
    }
    #[must_use]
    pub fn user(mut self, user: impl ToString) -> Self {
        self.user = Some(user.to_string());
        self
    }
}

/// The staged writes of one [`Store::update`], with read-your-writes.
pub struct Tx<'a> {
    store: &'a Inner,
    now: Instant,
    requests: BTreeMap<String, Option<RequestRecord>>,
    leases: BTreeMap<String, Option<LeaseRecord>>,
    timers: Vec<(TimerKind, String, Option<Instant>)>,
    live: Vec<(Vec<u8>, Option<LeaseId>)>,
    audit: Vec<AuditDraft>,
    outbox: Vec<OutboxItem>,
    /// The next id to hand out, once read from `meta`; written back on commit.
    next_id: Option<u64>,
    /// A staged change that breaks an invariant; the commit refuses it.
    violation: Option<String>,
}

/// Reads a big-endian counter from `meta`.
fn counter(meta: &sled::Tree, key: &[u8]) -> Result<u64, StoreError> {
    Ok(match meta.get(key)? {
        Some(v) if v.len() == 8 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&v);
            u64::from_be_bytes(b)
        }
        _ => 1,
    })
}

impl<'a> Tx<'a> {
    pub fn request(&self, id: &RequestId) -> Result<Option<RequestRecord>, StoreError> {
        if let Some(staged) = self.requests.get(id.as_str()) {
            return Ok(staged.clone());
        }
        read_request(&self.store.tree(TreeId::Requests), id)
    }

    pub fn lease(&self, id: &LeaseId) -> Result<Option<LeaseRecord>, StoreError> {
        if let Some(staged) = self.leases.get(id.as_str()) {
            return Ok(staged.clone());
        }
        read_lease(&self.store.tree(TreeId::Leases), id)
    }

    /// The lease `user` holds on `group` that has not ended, if any.
    pub fn live_lease(&self, group: &GroupName, user: &UserId) -> Result<Option<LeaseId>, StoreError> {
        let key = live_key(group, user);
        if let Some((_, staged)) = self.live.iter().rev().find(|(k, _)| *k == key) {
            return Ok(staged.clone());
        }
        Ok(self
            .store
            .tree(TreeId::Live)
            .get(&key)?
            .map(|v| LeaseId::new(String::from_utf8_lossy(&v).into_owned())))
    }

    /// The pending request `user` has for `group`, if any (from the pending
    /// index: requests with a decision-window timer).
    pub fn pending_request_of(
        &self,
        group: &GroupName,
        user: &UserId,
    ) -> Result<Option<RequestId>, StoreError> {
        for item in self
            .store
            .tree(TreeId::TimerIx)
            .scan_prefix([TimerKind::RequestTimeout as u8])
        {
            let (k, _) = item?;
            let id = RequestId::new(String::from_utf8_lossy(&k[1..]).into_owned());
            if let Some(rec) = self.request(&id)? {
                let r = &rec.request;
                if r.state == jitbot_core::RequestState::Pending && r.group == *group && r.requester == *user
                {
                    return Ok(Some(id));
                }
            }
        }
        Ok(None)
    }

    pub fn put_request(&mut self, rec: RequestRecord) {
        self.requests.insert(rec.request.id.to_string(), Some(rec));
    }

    /// Stages a lease. A lease that has not ended takes its (group, user)
    /// slot; if another lease that has not ended holds the slot, the whole
    /// change is refused at commit: one lease per (group, user) is enforced
    /// here, where every lease is written, not by each caller.
    pub fn put_lease(&mut self, rec: LeaseRecord) {
        let l = &rec.lease;
        let key = live_key(&l.group, &l.user);
        // A lease occupies its (group, user) slot until it has fully ended, so a
        // new lease never starts while an old one's removal is still pending.
        let mut slot = (l.state != LeaseState::Ended).then(|| l.id.clone());
        if l.state != LeaseState::Ended {
            match self.live_lease(&l.group, &l.user) {
                Ok(Some(holder)) if holder != l.id => {
                    if l.state == LeaseState::Revoking {
                        // Found after the fact (old data, a restore): a
                        // lease on its way out may always go on ending; it
                        // just does not take the slot from the holder.
                        slot = Some(holder);
                    } else {
                        self.violation.get_or_insert(format!(
                            "lease {} would be a second live lease of {} on `{}` (lease {holder} holds it)",
                            l.id, l.user, l.group
                        ));
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    self.violation.get_or_insert(e.to_string());
                }
            }
        }
        self.live.push((key, slot));
        self.leases.insert(l.id.to_string(), Some(rec));
    }

    /// Sets (or moves) the timer of this kind for `id`.
    pub fn set_timer(&mut self, kind: TimerKind, id: &str, due: Instant) {
        self.timers.push((kind, id.to_string(), Some(due)));
    }

    pub fn clear_timer(&mut self, kind: TimerKind, id: &str) {
        self.timers.push((kind, id.to_string(), None));
    }

    /// Whether `id` has a timer of this kind, counting what this
    /// transaction staged.
    pub fn has_timer(&self, kind: TimerKind, id: &str) -> Result<bool, StoreError> {
        if let Some((_, _, due)) = self.timers.iter().rev().find(|(k, i, _)| *k == kind && i == id) {
            return Ok(due.is_some());
        }
        Ok(self
            .store
            .tree(TreeId::TimerIx)
            .contains_key(timers::index_key(kind, id))?)
    }

    pub fn audit(&mut self, draft: AuditDraft) {
        self.audit.push(draft);
    }

    pub fn outbox(&mut self, item: OutboxItem) {
        self.outbox.push(item);
    }

    /// A fresh id with a prefix (`r-17`, `l-4`), unique for this database.
    ///
    /// The counter lives in the store and is committed with the records that
    /// use it, so an id is never handed out twice, even across crashes
    /// (sled's own `generate_id` can repeat ids after a kill).
    pub fn new_id(&mut self, prefix: &str) -> Result<String, StoreError> {
        let next = match self.next_id {
            Some(n) => n,
            None => counter(&self.store.tree(TreeId::Meta), NEXT_ID)?,
        };
        self.next_id = Some(next + 1);
        Ok(format!("{prefix}-{next}"))
    }

    pub fn now(&self) -> Instant {
        self.now
    }
}

fn read_request(tree: &sled::Tree, id: &RequestId) -> Result<Option<RequestRecord>, StoreError> {
    match tree.get(id.as_str())? {
        None => Ok(None),
        Some(bytes) => {
            let stored: StoredRequest = decode(id.as_str().as_bytes(), &bytes)?;
            RequestRecord::try_from(stored)
                .map(Some)
                .map_err(|error| StoreError::Corrupt {
                    key: id.to_string(),
                    error,
                })
        }
    }
}

fn read_lease(tree: &sled::Tree, id: &LeaseId) -> Result<Option<LeaseRecord>, StoreError> {
    match tree.get(id.as_str())? {
        None => Ok(None),
        Some(bytes) => {
            let stored: StoredLease = decode(id.as_str().as_bytes(), &bytes)?;
            LeaseRecord::try_from(stored)
                .map(Some)
                .map_err(|error| StoreError::Corrupt {
                    key: id.to_string(),
                    error,
                })
        }
    }
}

impl Store {
    /// Opens (or creates, zstd-compressed) the store. `cache_mb` bounds
    /// sled's page cache.
    pub fn open(path: &Path, cache_mb: u64) -> Result<Store, StoreError> {
        Store::open_with(path, cache_mb, Compression::Zstd)
    }

    /// Opens the store, or creates it with `compression`; a store that
    /// exists keeps the compression it was created with
    /// ([`Store::compression`] says which).
    pub fn open_with(path: &Path, cache_mb: u64, compression: Compression) -> Result<Store, StoreError> {
        let store = Store::open_sled(path, cache_mb, compression, Box::new(SledBackend))?;
        if pg::is_mirror(&store)? {
            // Committing to a copy of the database would lead alone,
            // unfenced, on stale data (or copy stale data elsewhere).
            return Err(StoreError::Mirror {
                path: path.display().to_string(),
            });
        }
        store.upgrade()?;
        Ok(store)
    }

    /// Opens a replica of the store in PostgreSQL: `path` holds this
    /// replica's mirror (created, or caught up, from the database). Applies
    /// migrations first when `settings.migrate` is on.
    pub fn open_postgres(path: &Path, cache_mb: u64, settings: &PgSettings) -> Result<Store, StoreError> {
        let replica = pg::Replica::start(settings)?;
        let store = Store::open_sled(path, cache_mb, settings.mirror_compression, Box::new(replica))?;
        if pg::holds_sled_store(&store)? {
            return Err(StoreError::Io(format!(
                "{} holds a sled store, not a mirror of PostgreSQL; move its data with \
                 `jitbot store copy --from {} --to <postgres url>` and give [store] path a new, empty directory",
                path.display(),
                path.display()
            )));
        }
        pg::mark_mirror(&store)?;
        store.refresh()?;
        store.upgrade()?;
        Ok(store)
    }

    fn open_sled(
        path: &Path,
        cache_mb: u64,
        compression: Compression,
        backend: Box<dyn Backend>,
    ) -> Result<Store, StoreError> {
        // zstd level of sled's page compression: sled's default.
        const COMPRESSION_LEVEL: i32 = 5;
        let config = |compression: Compression| {
            sled::Config::new()
                .path(path)
                .cache_capacity(cache_mb.max(1) * 1024 * 1024)
                .flush_every_ms(Some(500))
                .use_compression(compression == Compression::Zstd)
                .compression_factor(COMPRESSION_LEVEL)
        };
        // A new store is created with `compression`. sled fixes the setting
        // when it creates a store and refuses to open it with another one,
        // so a store that exists keeps opening as it was written.
        let other = match compression {
            Compression::Zstd => Compression::Off,
            Compression::Off => Compression::Zstd,
        };
        let mut opened = compression;
        let db = match config(compression).open() {
            Err(sled::Error::Unsupported(why)) if why.contains("use_compression") => {
                opened = other;
                config(other).open()
            }
            other => other,
        }
        .map_err(|e| match e {
            sled::Error::Io(ref io) if io.kind() == std::io::ErrorKind::WouldBlock => StoreError::Locked {
                path: path.display().to_string(),
            },
            sled::Error::Io(ref io) if io.to_string().contains("lock") => StoreError::Locked {
                path: path.display().to_string(),
            },
            other => StoreError::Io(format!("cannot open {}: {other}", path.display())),
        })?;
        let mirror = db.open_tree("mirror")?;
        let inner = Inner {
            trees: std::sync::RwLock::new(Arc::new(kv::Trees::open_current(&db, &mirror)?)),
            retired: Mutex::new(Vec::new()),
            gate: std::sync::RwLock::new(()),
            mirror,
            backend,
            fence: Default::default(),
            leadership: Default::default(),
            seen_count: Default::default(),
            audit_key: Default::default(),
            archive_dir: Default::default(),
            anchor_file: Default::default(),
            writer: Mutex::new(()),
            committed: Default::default(),
            flushed: Default::default(),
            flusher: tokio::sync::Mutex::new(()),
            failed: std::sync::OnceLock::new(),
            fail_next_flush: Default::default(),
            inline_flush: Default::default(),
            compression: opened,
            db,
        };
        Ok(Store {
            inner: Arc::new(inner),
        })
    }

    /// How sled writes this store's pages (fixed when it was created).
    pub fn compression(&self) -> Compression {
        self.inner.compression
    }

    /// The open-time upgrades of older stored formats, each a transaction.
    fn upgrade(&self) -> Result<(), StoreError> {
        if self.tree(TreeId::Meta).get(SCHEMA)?.is_none() {
            self.writer()?.transact([TreeId::Meta], |[meta]| {
                if meta.get(SCHEMA)?.is_none() {
                    meta.insert(SCHEMA, b"1")?;
                }
                Ok(())
            })?;
        }
        outbox::upgrade_v1(self)?;
        outbox::upgrade_due_keys(self)?;
        if self.tree(TreeId::Meta).get(LIVE_FOLDED)?.is_none() {
            fold_live_slots(self)?;
            self.writer()?.transact([TreeId::Meta], |[meta]| {
                meta.insert(LIVE_FOLDED, b"1")?;
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Runs `f` under the writer lock, commits what it staged atomically and
    /// flushes to disk. `f`'s error aborts the whole change.
    pub async fn update<T, E>(
        &self,
        now: Instant,
        f: impl FnOnce(&mut Tx<'_>) -> Result<T, E>,
    ) -> Result<T, E>
    where
        E: From<StoreError>,
    {
        self.check_healthy()?;
        let value = self.waiting_for_backend(|| {
            let writer = self.writer()?;
            let mut tx = Tx {
                store: &self.inner,
                now,
                requests: BTreeMap::new(),
                leases: BTreeMap::new(),
                timers: Vec::new(),
                live: Vec::new(),
                audit: Vec::new(),
                outbox: Vec::new(),
                next_id: None,
                violation: None,
            };
            let value = f(&mut tx)?;
            if let Some(violation) = tx.violation.take() {
                return Err(StoreError::Invariant(violation).into());
            }
            self.commit(writer, tx)?;
            Ok::<T, E>(value)
        })?;
        self.flush_committed().await?;
        Ok(value)
    }

    /// Runs `f`, a synchronous step that may wait for PostgreSQL (the
    /// writer lock's catch-up, a commit's round trips), without holding up
    /// the async tasks queued on this tokio worker: on a multi-threaded
    /// runtime tokio hands them to another thread meanwhile
    /// (`block_in_place`). With sled, and outside a multi-threaded runtime
    /// (tests, the leadership thread's blocking calls), `f` just runs.
    fn waiting_for_backend<T>(&self, f: impl FnOnce() -> T) -> T {
        use tokio::runtime::{Handle, RuntimeFlavor};
        let multi_thread =
            Handle::try_current().is_ok_and(|h| h.runtime_flavor() == RuntimeFlavor::MultiThread);
        if multi_thread && self.inner.backend.durability() == Durability::AtCommit {
            tokio::task::block_in_place(f)
        } else {
            f()
        }
    }

    fn commit(&self, writer: Writer<'_>, tx: Tx<'_>) -> Result<(), StoreError> {
        // Outbox keys come from a counter committed with the entries (the
        // writer lock makes reading it here safe).
        let first_outbox = counter(&self.tree(TreeId::Meta), NEXT_OUTBOX)?;
        let outbox_ids: Vec<u64> = (0..tx.outbox.len() as u64).map(|i| first_outbox + i).collect();
        let trees = [
            TreeId::Requests,
            TreeId::Leases,
            TreeId::Timers,
            TreeId::TimerIx,
            TreeId::Live,
            TreeId::Audit,
            TreeId::Outbox,
            TreeId::Meta,
            TreeId::Review,
            TreeId::OutboxDue,
        ];
        writer.transact(
            trees,
            |[requests, leases, timers, timer_ix, live, audit, outbox, meta, review, outbox_due]| {
                for (id, rec) in &tx.requests {
                    if let Some(rec) = rec {
                        requests.insert(id.as_bytes(), encode(&StoredRequest::from(rec)))?;
                        if rec.request.awaits_review() {
                            review.insert(id.as_bytes(), b"")?;
                        } else {
                            review.remove(id.as_bytes())?;
                        }
                    }
                }
                for (id, rec) in &tx.leases {
                    if let Some(rec) = rec {
                        leases.insert(id.as_bytes(), encode(&StoredLease::from(rec)))?;
                    }
                }
                for (kind, id, due) in &tx.timers {
                    let ix = timers::index_key(*kind, id);
                    if let Some(old) = timer_ix.get(&ix)? {
                        timers.remove(old)?;
                        timer_ix.remove(&ix)?;
                    }
                    if let Some(due) = due {
                        let key = timers::timer_key(*due, *kind, id);
                        timers.insert(&key, b"")?;
                        timer_ix.insert(&ix, &key)?;
                    }
                }
                for (key, lease) in &tx.live {
                    match lease {
                        Some(id) => {
                            live.insert(key, id.as_str().as_bytes())?;
                        }
                        None => {
                            // Only clear the slot if it still points at a lease
                            // staged as no longer live in this change.
                            if let Some(current) = live.get(key)? {
                                let current = String::from_utf8_lossy(&current).into_owned();
                                if tx.leases.get(&current).is_some_and(|l| {
                                    l.as_ref().is_some_and(|l| l.lease.state == LeaseState::Ended)
                                }) {
                                    live.remove(key)?;
                                }
                            }
                        }
                    }
                }
                audit::append(audit, meta, &tx.audit, tx.now, self.inner.audit_key.get())?;
                if let Some(next) = tx.next_id {
                    meta.insert(NEXT_ID, next.to_be_bytes())?;
                }
                if !tx.outbox.is_empty() {
                    meta.insert(NEXT_OUTBOX, (first_outbox + tx.outbox.len() as u64).to_be_bytes())?;
                }
                for (item, id) in tx.outbox.iter().zip(&outbox_ids) {
                    outbox::stage_new(outbox, outbox_due, *id, item, tx.now)?;
                }
                Ok(())
            },
        )
    }

    /// Flushes on the calling thread from now on, instead of on tokio's
    /// blocking pool: for the deterministic simulation, where the one
    /// runtime thread must be the only thing that moves. It blocks that
    /// thread for each flush, so it is not for a running jitbot.
    pub fn flush_inline(&self) {
        self.inner
            .inline_flush
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Waits until everything written so far is on disk.
    pub async fn flush(&self) -> Result<(), StoreError> {
        if self.inner.inline_flush.load(std::sync::atomic::Ordering::SeqCst) {
            self.inner.db.flush()?;
            return Ok(());
        }
        let db = self.inner.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| StoreError::Io(format!("flush task failed: {e}")))??;
        Ok(())
    }

    /// Waits until every commit made so far is on disk.
    ///
    /// Group commit: one flush covers every commit made before it started,
    /// so concurrent writers wait for one disk sync instead of one each.
    /// sled 0.34's `flush_async` can deadlock when many run at once, so the
    /// blocking flush runs on tokio's blocking pool instead.
    async fn flush_committed(&self) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering;
        if self.inner.backend.durability() == Durability::AtCommit {
            // Durable where the truth is; the local index is rebuilt from
            // there, so it need not reach the disk first.
            return self.check_healthy();
        }
        let mine = self.inner.committed.load(Ordering::SeqCst);
        if self.inner.flushed.load(Ordering::SeqCst) >= mine && mine > 0 {
            return Ok(());
        }
        let _turn = self.inner.flusher.lock().await;
        if self.inner.flushed.load(Ordering::SeqCst) >= mine && mine > 0 {
            return Ok(());
        }
        let target = self.inner.committed.load(Ordering::SeqCst);
        self.check_healthy()?;
        let flushed = if self.inner.fail_next_flush.swap(false, Ordering::SeqCst) {
            Err(StoreError::Io("injected flush failure".into()))
        } else {
            self.flush().await
        };
        if let Err(e) = flushed {
            // Like a database: a commit that may not be on disk must not be
            // acted on. Nothing reads or writes the store any more.
            let why = e.to_string();
            let _ = self.inner.failed.set(why.clone());
            tracing::error!(error = %why, "store flush failed; refusing all further work: restart jitbot to recover from disk");
            return Err(StoreError::Failed(why));
        }
        self.inner.flushed.fetch_max(target, Ordering::SeqCst);
        Ok(())
    }

    /// Errors once a flush has failed (see [`StoreError::Failed`]).
    pub fn check_healthy(&self) -> Result<(), StoreError> {
        match self.inner.failed.get() {
            Some(why) => Err(StoreError::Failed(why.clone())),
            None => Ok(()),
        }
    }

    /// Test hook: makes the next flush fail.
    #[doc(hidden)]
    pub fn fail_next_flush(&self) {
        self.inner
            .fail_next_flush
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn request(&self, id: &RequestId) -> Result<Option<RequestRecord>, StoreError> {
        let _whole = self.reading();
        self.check_healthy()?;
        read_request(&self.tree(TreeId::Requests), id)
    }

    pub fn lease(&self, id: &LeaseId) -> Result<Option<LeaseRecord>, StoreError> {
        let _whole = self.reading();
        self.check_healthy()?;
        read_lease(&self.tree(TreeId::Leases), id)
    }

    pub fn requests(&self) -> Result<Vec<RequestRecord>, StoreError> {
        let _whole = self.reading();
        let mut out = Vec::new();
        for item in self.tree(TreeId::Requests).iter() {
            let (k, v) = item?;
            let stored: StoredRequest = decode(&k, &v)?;
            out.push(
                RequestRecord::try_from(stored).map_err(|error| StoreError::Corrupt {
                    key: String::from_utf8_lossy(&k).into_owned(),
                    error,
                })?,
            );
        }
        Ok(out)
    }

    pub fn leases(&self) -> Result<Vec<LeaseRecord>, StoreError> {
        let _whole = self.reading();
        let mut out = Vec::new();
        for item in self.tree(TreeId::Leases).iter() {
            let (k, v) = item?;
            let stored: StoredLease = decode(&k, &v)?;
            out.push(
                LeaseRecord::try_from(stored).map_err(|error| StoreError::Corrupt {
                    key: String::from_utf8_lossy(&k).into_owned(),
                    error,
                })?,
            );
        }
        Ok(out)
    }

    /// Leases of one group that have not ended (granting, active or revoking).
    pub fn live_leases_in(&self, group: &GroupName) -> Result<Vec<(UserId, LeaseId)>, StoreError> {
        let _whole = self.reading();
        let mut prefix = group.as_str().as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        for item in self.tree(TreeId::Live).scan_prefix(&prefix) {
            let (k, v) = item?;
            let user = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            out.push((
                UserId::new(user),
                LeaseId::new(String::from_utf8_lossy(&v).into_owned()),
            ));
        }
        Ok(out)
    }

    /// Every lease that has not ended, from the `live` index (no full scan).
    pub fn live_leases(&self) -> Result<Vec<LeaseRecord>, StoreError> {
        let _whole = self.reading();
        let mut out = Vec::new();
        for item in self.tree(TreeId::Live).iter() {
            let (_, v) = item?;
            if let Some(rec) = self.lease(&LeaseId::new(String::from_utf8_lossy(&v).into_owned()))? {
                out.push(rec);
            }
        }
        Ok(out)
    }

    /// Pending requests: exactly those with a decision-window timer.
    pub fn pending_requests(&self) -> Result<Vec<RequestRecord>, StoreError> {
        let _whole = self.reading();
        self.requests_by_ids(
            self.tree(TreeId::TimerIx)
                .scan_prefix([TimerKind::RequestTimeout as u8]),
            1,
        )
    }

    /// Break-glass requests that no approver has acknowledged yet.
    pub fn requests_awaiting_review(&self) -> Result<Vec<RequestRecord>, StoreError> {
        let _whole = self.reading();
        self.requests_by_ids(self.tree(TreeId::Review).iter(), 0)
    }

    fn requests_by_ids(&self, keys: sled::Iter, skip: usize) -> Result<Vec<RequestRecord>, StoreError> {
        let mut out = Vec::new();
        for item in keys {
            let (k, _) = item?;
            let id = String::from_utf8_lossy(&k[skip..]).into_owned();
            if let Some(rec) = self.request(&RequestId::new(id))? {
                out.push(rec);
            }
        }
        Ok(out)
    }

    pub fn live_lease(&self, group: &GroupName, user: &UserId) -> Result<Option<LeaseId>, StoreError> {
        let _whole = self.reading();
        Ok(self
            .tree(TreeId::Live)
            .get(live_key(group, user))?
            .map(|v| LeaseId::new(String::from_utf8_lossy(&v).into_owned())))
    }

    /// Timers due at or before `now`, earliest first, at most `limit`.
    pub fn due_timers(&self, now: Instant, limit: usize) -> Result<Vec<Timer>, StoreError> {
        let _whole = self.reading();
        self.check_healthy()?;
        // Keys hold a due time rounded *up* to the ms, so a key's ms at or
        // before `now` rounded *down* is due; one in `now`'s own ms may not be.
        let floor = u64::try_from(now.timestamp_millis()).unwrap_or(0);
        let mut end = floor.to_be_bytes().to_vec();
        end.push(TimerKind::MAX as u8);
        end.extend_from_slice("\u{10FFFF}".as_bytes());
        let mut out = Vec::new();
        for item in self.tree(TreeId::Timers).range(..=end).take(limit) {
            let (k, _) = item?;
            if let Some(t) = timers::parse_key(&k) {
                out.push(t);
            }
        }
        Ok(out)
    }

    /// Timers in due order starting after `after` (for skipping ones in flight).
    pub fn timers_from(&self, limit: usize) -> Result<Vec<Timer>, StoreError> {
        let _whole = self.reading();
        self.check_healthy()?;
        let mut out = Vec::new();
        for item in self.tree(TreeId::Timers).iter().take(limit) {
            let (k, _) = item?;
            if let Some(t) = timers::parse_key(&k) {
                out.push(t);
            }
        }
        Ok(out)
    }

    /// Every timer of one kind, from the `timer_ix` index (no scan of the
    /// schedule): the revocations and grants waiting out a backoff are few.
    pub fn timers_of(&self, kind: TimerKind) -> Result<Vec<Timer>, StoreError> {
        let _whole = self.reading();
        self.check_healthy()?;
        let mut out = Vec::new();
        for item in self.tree(TreeId::TimerIx).scan_prefix([kind as u8]) {
            let (_, key) = item?;
            if let Some(t) = timers::parse_key(&key) {
                out.push(t);
            }
        }
        Ok(out)
    }

    /// How many timers of one kind there are, from the `timer_ix` keys
    /// alone (no record is read): the gauges' count of pending requests
    /// (`RequestTimeout`).
    pub fn count_timers(&self, kind: TimerKind) -> Result<usize, StoreError> {
        let _whole = self.reading();
        self.check_healthy()?;
        let mut n = 0;
        for item in self.tree(TreeId::TimerIx).scan_prefix([kind as u8]).keys() {
            item?;
            n += 1;
        }
        Ok(n)
    }

    /// How many leases hold a (group, user) slot: those not ended, from
    /// the `live` index's keys alone.
    pub fn live_count(&self) -> Result<usize, StoreError> {
        let _whole = self.reading();
        self.check_healthy()?;
        let mut n = 0;
        for item in self.tree(TreeId::Live).iter().keys() {
            item?;
            n += 1;
        }
        Ok(n)
    }

    pub fn timer_count(&self) -> usize {
        let _whole = self.reading();
        self.tree(TreeId::Timers).len()
    }

    /// The earliest timer's due time.
    pub fn next_due(&self) -> Result<Option<Instant>, StoreError> {
        let _whole = self.reading();
        Ok(match self.tree(TreeId::Timers).first()? {
            Some((k, _)) => timers::parse_key(&k).map(|t| t.due),
            None => None,
        })
    }

    /// Records the messages an approval card was posted as.
    pub async fn set_messages(
        &self,
        id: &RequestId,
        messages: Vec<crate::messages::MessageRef>,
        now: Instant,
    ) -> Result<(), StoreError> {
        self.update(now, |tx| {
            if let Some(mut rec) = tx.request(id)? {
                rec.messages = messages;
                tx.put_request(rec);
            }
            Ok::<(), StoreError>(())
        })
        .await
    }

    /// When the latest audit record was committed: no transition is older,
    /// so a restarted clock must not start before it.
    pub fn last_audit_time(&self) -> Result<Option<Instant>, StoreError> {
        let _whole = self.reading();
        match self.tree(TreeId::Audit).last()? {
            Some((k, v)) => {
                let stored: StoredAudit = decode(&k, &v)?;
                Ok(Some(stored.into_entry().at))
            }
            None => Ok(None),
        }
    }

    /// Audit records with `seq >= from`, in order.
    pub fn audit(&self, from: u64) -> impl Iterator<Item = Result<AuditEntry, StoreError>> + '_ {
        let tree = self.tree(TreeId::Audit);
        let mut records = tree.range(from.to_be_bytes()..);
        std::iter::from_fn(move || {
            // The iterator holds its generation of the trees (see `TreeRef`),
            // and the reader gate one record at a time (`Store::reading`).
            let _generation = &tree;
            let _whole = self.reading();
            let item = records.next()?;
            Some(item.map_err(StoreError::from).and_then(|(k, v)| {
                let stored: StoredAudit = decode(&k, &v)?;
                Ok(stored.into_entry())
            }))
        })
    }
}
