//! The storage port under the store: ordered byte trees and one atomic
//! multi-tree commit, [`Writer::transact`], which every write in `store/`
//! goes through, over a [`Backend`] that decides where a change becomes
//! durable.
//!
//! Reads are always from the local sled index: on sled it is the store
//! itself, with PostgreSQL (`pg.rs`) this replica's mirror of the
//! database. A transaction runs on that index with its writes recorded
//! (tree, key, value or deletion) and the sled transaction aborted; the
//! [`Commit`] the backend opened then commits the captured log where the
//! truth is (PostgreSQL: the database first) and applies it to the local
//! index ([`apply`]). On [`SledBackend`] the local index is the truth, so
//! the transaction simply commits where it ran (`commits_in_place`).
//!
//! The trees are read through [`Store::tree`], in their current
//! generation ([`Trees`]): a mirror reload fills the next one and swaps
//! it in whole, so readers never see it half-done. A big catch-up is
//! staged ([`Staged`]) and then applied in place behind the reader gate
//! ([`Store::reading`], [`Store::applying`]), so readers never see it
//! half-done either.

use super::{Store, StoreError};
use sled::transaction::{
    ConflictableTransactionError, TransactionError, TransactionalTree, UnabortableTransactionError,
};
use sled::{IVec, Transactional};
use std::any::Any;
use std::cell::{Cell, RefCell};
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

/// A transaction closure's error: sled's conflict, or a store error that
/// aborts the whole change.
pub(super) type Abort = ConflictableTransactionError<StoreError>;

/// The trees of the store, by name (the names are part of the stored
/// format: sled tree names and PostgreSQL's `jitbot_kv.tree`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum TreeId {
    Requests,
    Leases,
    Timers,
    TimerIx,
    Live,
    Audit,
    Outbox,
    OutboxDue,
    Meta,
    Review,
    Seen,
}

impl TreeId {
    /// Every tree, in the order backups list them.
    pub(super) const ALL: [TreeId; 11] = [
        TreeId::Requests,
        TreeId::Leases,
        TreeId::Timers,
        TreeId::TimerIx,
        TreeId::Live,
        TreeId::Audit,
        TreeId::Outbox,
        TreeId::OutboxDue,
        TreeId::Meta,
        TreeId::Review,
        TreeId::Seen,
    ];

    pub(super) fn name(self) -> &'static str {
        match self {
            TreeId::Requests => "requests",
            TreeId::Leases => "leases",
            TreeId::Timers => "timers",
            TreeId::TimerIx => "timer_ix",
            TreeId::Live => "live",
            TreeId::Audit => "audit",
            TreeId::Outbox => "outbox",
            TreeId::OutboxDue => "outbox_due",
            TreeId::Meta => "meta",
            TreeId::Review => "review",
            TreeId::Seen => "seen",
        }
    }

    pub(super) fn from_name(name: &str) -> Option<TreeId> {
        TreeId::ALL.into_iter().find(|t| t.name() == name)
    }

    /// The sled tree holding this tree in `generation` (see [`Trees`]):
    /// the plain name in generation 0, `<name>@<generation>` after.
    fn stored_name(self, generation: u64) -> String {
        match generation {
            0 => self.name().to_string(),
            g => format!("{}@{g}", self.name()),
        }
    }

    /// Which tree and generation a sled tree name holds, if it is one.
    pub(super) fn parse_stored_name(stored: &[u8]) -> Option<(TreeId, u64)> {
        let stored = std::str::from_utf8(stored).ok()?;
        match stored.split_once('@') {
            None => Some((TreeId::from_name(stored)?, 0)),
            Some((name, g)) => Some((TreeId::from_name(name)?, g.parse().ok()?)),
        }
    }

    pub(super) fn index(self) -> usize {
        TreeId::ALL.iter().position(|t| *t == self).unwrap_or(0)
    }
}

/// Key of the `mirror` tree naming the generation of the trees in use
/// (none: generation 0). Written, and flushed, only once that generation
/// is complete.
pub(super) const GENERATION: &[u8] = b"generation";

/// One generation of the store's trees, read through [`Store::tree`]. A
/// sled store has one for good (generation 0, the plain names). A mirror
/// of PostgreSQL loads a reload into the next generation while readers
/// go on reading the current one, then swaps it in whole
/// ([`Store::install`]): no reader sees a store emptied or half-loaded.
pub(super) struct Trees {
    generation: u64,
    trees: Vec<sled::Tree>,
}

impl Trees {
    /// Opens (creating them if missing) the trees of `generation`.
    pub(super) fn open(db: &sled::Db, generation: u64) -> Result<Trees, StoreError> {
        let trees = TreeId::ALL
            .iter()
            .map(|t| db.open_tree(t.stored_name(generation)))
            .collect::<Result<_, _>>()?;
        Ok(Trees { generation, trees })
    }

    /// Opens the generation `mirror` names as current, after dropping the
    /// trees of any other: an older generation a crash kept from being
    /// dropped, or a newer one a crash left half-loaded (the reload that
    /// made it starts again, as the mirror has no position).
    pub(super) fn open_current(db: &sled::Db, mirror: &sled::Tree) -> Result<Trees, StoreError> {
        let generation = match mirror.get(GENERATION)? {
            Some(g) if g.len() == 8 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&g);
                u64::from_be_bytes(b)
            }
            _ => 0,
        };
        for stored in db.tree_names() {
            if TreeId::parse_stored_name(&stored).is_some_and(|(_, g)| g != generation) {
                db.drop_tree(&stored)?;
            }
        }
        // What a catch-up staged before a crash: it starts again.
        db.drop_tree(STAGED)?;
        Trees::open(db, generation)
    }

    pub(super) fn generation(&self) -> u64 {
        self.generation
    }

    pub(super) fn get(&self, id: TreeId) -> &sled::Tree {
        &self.trees[id.index()]
    }

    /// Removes the trees of `generation` from `db`, those it has (nobody
    /// may read them).
    pub(super) fn drop_generation(db: &sled::Db, generation: u64) -> Result<(), StoreError> {
        for t in TreeId::ALL {
            db.drop_tree(t.stored_name(generation))?;
        }
        Ok(())
    }
}

/// The sled tree a big catch-up stages its rows in ([`Staged`]); never
/// read by anything else, dropped once applied and at every open.
const STAGED: &str = "mirror_staged";

/// A big catch-up's changes, held on disk (the `mirror_staged` tree, one
/// insert per row, so memory stays bounded) until every chunk has come,
/// then applied to the current generation in place behind the reader
/// gate. Staging first means a stream that breaks leaves the mirror as it
/// was, whole, at its old position; and the readers wait only for the
/// local apply, never for the database. Dropping it drops the tree.
pub(super) struct Staged<'s> {
    store: &'s Store,
    rows: sled::Tree,
}

impl<'s> Staged<'s> {
    /// An empty staging tree (whatever an earlier catch-up of this process
    /// left there is dropped first).
    pub(super) fn new(store: &'s Store) -> Result<Staged<'s>, StoreError> {
        store.inner.db.drop_tree(STAGED)?;
        let rows = store.inner.db.open_tree(STAGED)?;
        Ok(Staged { store, rows })
    }

    /// Stages `changes`, one row at a time (a later change of a key
    /// replaces an earlier one).
    pub(super) fn put(&self, changes: &[Change]) -> Result<(), StoreError> {
        for c in changes {
            let mut key = Vec::with_capacity(c.key.len() + 1);
            key.push(c.tree.index() as u8);
            key.extend_from_slice(&c.key);
            let value = match &c.value {
                Some(v) => {
                    let mut staged = Vec::with_capacity(v.len() + 1);
                    staged.push(1);
                    staged.extend_from_slice(v);
                    staged
                }
                None => vec![0],
            };
            self.rows.insert(key, value)?;
        }
        Ok(())
    }

    /// Applies every staged row to the current generation, row by row (a
    /// sled transaction or batch would pin sled's epoch for all of them:
    /// see `pg.rs`'s `reload`). Called with the writer lock held and the
    /// reader gate closed ([`Store::applying`]).
    pub(super) fn apply(&self) -> Result<usize, StoreError> {
        let trees = self.store.inner.trees();
        let mut applied = 0;
        for row in self.rows.iter() {
            let (key, value) = row?;
            let Some((tree, key)) = key
                .split_first()
                .and_then(|(t, k)| Some((*TreeId::ALL.get(usize::from(*t))?, k)))
            else {
                return Err(StoreError::Io(
                    "a staged catch-up holds a row of no known tree; report this bug".into(),
                ));
            };
            match value.split_first() {
                Some((1, v)) => trees.get(tree).insert(key, v)?,
                _ => trees.get(tree).remove(key)?,
            };
            applied += 1;
        }
        Ok(applied)
    }
}

impl Drop for Staged<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.store.inner.db.drop_tree(STAGED) {
            tracing::warn!(error = %e, "cannot drop a staged catch-up of the mirror; it is dropped at the next one");
        }
    }
}

thread_local! {
    /// How many reader-gate guards ([`Reading`]) this thread holds: a read
    /// inside a read does not wait at the gate again (a writer waiting
    /// there would make it wait for itself).
    static READING: Cell<usize> = const { Cell::new(0) };
}

/// A read call's hold on the reader gate ([`Store::reading`]).
pub(super) struct Reading<'s> {
    _gate: Option<RwLockReadGuard<'s, ()>>,
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        READING.with(|n| n.set(n.get().saturating_sub(1)));
    }
}

/// One tree of the generation that was current when it was taken; it
/// keeps that generation from being dropped while it is held (an
/// iterator over it must be used while its `TreeRef` lives).
pub(super) struct TreeRef {
    trees: Arc<Trees>,
    id: TreeId,
}

impl std::ops::Deref for TreeRef {
    type Target = sled::Tree;

    fn deref(&self) -> &sled::Tree {
        self.trees.get(self.id)
    }
}

/// One write of a transaction: `value` `None` removes the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Change {
    pub tree: TreeId,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

/// A tree inside [`Writer::transact`]: reads see the transaction's own
/// writes; every write is recorded.
pub(super) struct View<'t> {
    tree: &'t TransactionalTree,
    id: TreeId,
    log: &'t RefCell<Vec<Change>>,
}

impl View<'_> {
    pub(super) fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<IVec>, UnabortableTransactionError> {
        self.tree.get(key)
    }

    pub(super) fn insert(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
    ) -> Result<(), UnabortableTransactionError> {
        let (key, value) = (key.as_ref(), value.as_ref());
        self.tree.insert(key, value)?;
        self.log.borrow_mut().push(Change {
            tree: self.id,
            key: key.to_vec(),
            value: Some(value.to_vec()),
        });
        Ok(())
    }

    pub(super) fn remove(&self, key: impl AsRef<[u8]>) -> Result<(), UnabortableTransactionError> {
        let key = key.as_ref();
        self.tree.remove(key)?;
        self.log.borrow_mut().push(Change {
            tree: self.id,
            key: key.to_vec(),
            value: None,
        });
        Ok(())
    }
}

/// The storage port: what differs between keeping the store in sled
/// alone and keeping its truth elsewhere with sled as the local index.
/// Everything above it (the trees, the invariants, the reads) is the same
/// code on every backend.
pub(super) trait Backend: Send + Sync + 'static {
    /// Called with the writer lock held, before the transaction reads
    /// anything: brings the local index up to the truth and opens the
    /// commit (which, dropped without committing, rolls back).
    fn begin<'s>(&'s self, store: &'s Store) -> Result<Box<dyn Commit + 's>, StoreError>;

    /// Brings the local index up to the truth without writing (called with
    /// the writer lock held); whether anything changed.
    fn refresh(&self, store: &Store) -> Result<bool, StoreError>;

    /// When a committed change is durable.
    fn durability(&self) -> Durability;

    /// Leadership among the processes sharing this store's truth, or
    /// `None` when only this process opens it (it always leads).
    fn election(&self) -> Option<&dyn Election>;

    /// For the backend's own test hooks.
    fn as_any(&self) -> &dyn Any;

    /// Whether the local index is where the truth is, so the sled
    /// transaction [`Writer::transact`] runs on it is the commit itself
    /// (instead of being captured, aborted and applied a second time).
    fn commits_in_place(&self) -> bool {
        false
    }
}

/// One open commit of a [`Backend`], taken under the writer lock.
pub(super) trait Commit {
    /// Commits `log`, the writes of a transaction run on the local index
    /// (in order; a key may be written more than once), where the store's
    /// truth is, and applies it to the local index. Nothing is applied
    /// when it fails.
    fn commit(self: Box<Self>, log: Vec<Change>) -> Result<(), StoreError>;
}

/// When a commit is durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Durability {
    /// Once the local sled files are flushed (the store's group commit).
    LocalFlush,
    /// When [`Commit::commit`] returns: the local index need not reach the
    /// disk first, it is rebuilt from the truth.
    AtCommit,
}

/// Leadership among replicas (`leader.rs`): a term with a fencing token.
pub(super) trait Election {
    /// Takes the leadership for `holder` (free or expired) or renews it
    /// (held by `holder`) for `ttl`: the term's token, or `None` while
    /// another replica leads.
    fn lead(&self, holder: &str, ttl: Duration) -> Result<Option<i64>, StoreError>;

    /// Gives up the term `token` of `holder`, if it still holds it.
    fn resign(&self, holder: &str, token: i64) -> Result<(), StoreError>;
}

/// The default backend: sled is the store itself, so a commit applies the
/// log to it and is durable once flushed.
pub(super) struct SledBackend;

impl Backend for SledBackend {
    fn begin<'s>(&'s self, store: &'s Store) -> Result<Box<dyn Commit + 's>, StoreError> {
        Ok(Box::new(SledCommit { store }))
    }

    fn refresh(&self, _store: &Store) -> Result<bool, StoreError> {
        // Nobody else writes a sled store: it is always current.
        Ok(false)
    }

    fn durability(&self) -> Durability {
        Durability::LocalFlush
    }

    fn election(&self) -> Option<&dyn Election> {
        // sled lets one process open the store: it always leads.
        None
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn commits_in_place(&self) -> bool {
        // sled is the store: its transaction commits, once, where it ran.
        true
    }
}

struct SledCommit<'s> {
    store: &'s Store,
}

impl Commit for SledCommit<'_> {
    fn commit(self: Box<Self>, log: Vec<Change>) -> Result<(), StoreError> {
        apply(self.store, &log, &[])
    }
}

/// A write to the local index's own `mirror` tree (`pg.rs`'s position),
/// made in the same sled transaction as the changes it accounts for:
/// `None` removes the key.
pub(super) type Bookkeeping<'a> = (&'a [u8], Option<&'a [u8]>);

/// Applies `changes` to the local index, and `bookkeeping` to its `mirror`
/// tree, in one sled transaction over the trees they touch.
pub(super) fn apply(
    store: &Store,
    changes: &[Change],
    bookkeeping: &[Bookkeeping<'_>],
) -> Result<(), StoreError> {
    if changes.is_empty() && bookkeeping.is_empty() {
        return Ok(());
    }
    let mut touched: Vec<TreeId> = Vec::new();
    for c in changes {
        if !touched.contains(&c.tree) {
            touched.push(c.tree);
        }
    }
    let generation = store.inner.trees();
    let mut trees: Vec<&sled::Tree> = touched.iter().map(|t| generation.get(*t)).collect();
    if !bookkeeping.is_empty() {
        trees.push(&store.inner.mirror);
    }
    let applied = trees.as_slice().transaction(|views| {
        for c in changes {
            let at = touched.iter().position(|t| *t == c.tree).unwrap_or(0);
            match &c.value {
                Some(v) => views[at].insert(c.key.as_slice(), v.as_slice())?,
                None => views[at].remove(c.key.as_slice())?,
            };
        }
        for (key, value) in bookkeeping {
            let mirror = &views[touched.len()];
            match value {
                Some(v) => mirror.insert(*key, *v)?,
                None => mirror.remove(*key)?,
            };
        }
        Ok::<(), ConflictableTransactionError<StoreError>>(())
    });
    applied.map_err(tx_error)
}

/// The store's writer lock, held: nothing else in this process changes the
/// store meanwhile. The backend's commit has been opened: with PostgreSQL
/// that holds the database's store-wide row lock and has brought the
/// mirror up to date, so every read made under it sees the current state
/// of every replica's commits.
pub(super) struct Writer<'s> {
    store: &'s Store,
    /// The open commit (rolled back if dropped). Declared before the lock,
    /// so it is dropped first: a PostgreSQL rollback reaches the connection
    /// before another writer's BEGIN can.
    commit: Box<dyn Commit + 's>,
    _lock: MutexGuard<'s, ()>,
}

fn tx_error(e: TransactionError<StoreError>) -> StoreError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => StoreError::Io(e.to_string()),
    }
}

/// How a sled transaction run on the local index ends: aborted on
/// purpose, carrying what the closure returned and wrote.
enum Ending<T> {
    Failed(StoreError),
    Captured(T, Vec<Change>),
}

impl Store {
    /// Takes the writer lock (see [`Writer`]).
    pub(super) fn writer(&self) -> Result<Writer<'_>, StoreError> {
        self.check_healthy()?;
        let lock = self.inner.writer.lock().unwrap_or_else(|p| p.into_inner());
        let commit = self.inner.backend.begin(self)?;
        Ok(Writer {
            store: self,
            commit,
            _lock: lock,
        })
    }

    /// One tree of the current generation.
    pub(super) fn tree(&self, id: TreeId) -> TreeRef {
        self.inner.tree(id)
    }

    /// Holds the reader gate open for one read call of a reader outside
    /// the writer lock (the admin API, `/jit list`, the dashboard, the
    /// gauges, the outbox worker): while a big catch-up is applied in
    /// place ([`Store::applying`]) the call waits for it, so it sees the
    /// mirror before or after it, never half-way. Taken per call, and per
    /// item of a lazy iterator, never across one: a slow consumer must not
    /// hold up every writer. A read inside a read takes nothing more.
    pub(super) fn reading(&self) -> Reading<'_> {
        let nested = READING.with(|n| {
            let held = n.get();
            n.set(held + 1);
            held > 0
        });
        let gate = if nested {
            None
        } else {
            Some(self.inner.gate.read().unwrap_or_else(|p| p.into_inner()))
        };
        Reading { _gate: gate }
    }

    /// Closes the reader gate while a big catch-up is applied in place
    /// (`pg.rs`): read calls wait until the guard is dropped. Called with
    /// the writer lock held; refused inside a read call of this thread,
    /// which it would wait for forever.
    pub(super) fn applying(&self) -> Result<RwLockWriteGuard<'_, ()>, StoreError> {
        if READING.with(Cell::get) > 0 {
            return Err(StoreError::Io(
                "a catch-up of the mirror was started inside a read of it; nothing was applied, report this bug"
                    .into(),
            ));
        }
        Ok(self.inner.gate.write().unwrap_or_else(|p| p.into_inner()))
    }

    /// Makes `next` the current generation: readers from now on read it;
    /// the one it replaces is dropped once no reader holds it
    /// ([`Store::drop_retired`]). Called with the writer lock held, after
    /// `next` was marked current on disk.
    pub(super) fn install(&self, next: Arc<Trees>) {
        let old = {
            let mut current = self.inner.trees.write().unwrap_or_else(|p| p.into_inner());
            std::mem::replace(&mut *current, next)
        };
        self.inner
            .retired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(old);
        self.drop_retired();
    }

    /// Drops the trees of replaced generations no reader holds any more
    /// (the others at a later call, or at the next open).
    pub(super) fn drop_retired(&self) {
        let mut retired = self.inner.retired.lock().unwrap_or_else(|p| p.into_inner());
        retired.retain(|old| {
            // Only `retired` holds it: no reader can take it again.
            if Arc::strong_count(old) > 1 {
                return true;
            }
            if let Err(e) = Trees::drop_generation(&self.inner.db, old.generation()) {
                tracing::warn!(error = %e, generation = old.generation(),
                    "cannot drop a replaced generation of the mirror's trees; it is dropped at the next start");
            }
            false
        });
    }
}

impl super::Inner {
    /// The current generation of the trees.
    pub(super) fn trees(&self) -> Arc<Trees> {
        self.trees.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// One tree of the current generation.
    pub(super) fn tree(&self, id: TreeId) -> TreeRef {
        TreeRef {
            trees: self.trees(),
            id,
        }
    }
}

impl Writer<'_> {
    /// Runs `f` over `trees` as one atomic change and commits it through
    /// the backend (see the module's documentation). `f` may run more than
    /// once (sled retries on a conflict); its error aborts everything.
    /// Counts as a commit for the group-commit flush.
    pub(super) fn transact<const N: usize, T>(
        self,
        trees: [TreeId; N],
        f: impl Fn(&[View<'_>; N]) -> Result<T, Abort>,
    ) -> Result<T, StoreError> {
        let Writer {
            store,
            commit,
            _lock: lock,
        } = self;
        let generation = store.inner.trees();
        let sled_trees: Vec<&sled::Tree> = trees.iter().map(|t| generation.get(*t)).collect();
        let in_place = store.inner.backend.commits_in_place();
        let ended = sled_trees.as_slice().transaction::<_, T>(|views| {
            let log = RefCell::new(Vec::new());
            let views: [View<'_>; N] = std::array::from_fn(|i| View {
                tree: &views[i],
                id: trees[i],
                log: &log,
            });
            let ending = match f(&views) {
                // sled is the truth (`SledBackend`): this transaction is
                // the commit, and nothing is applied twice.
                Ok(value) if in_place => return Ok(value),
                Ok(value) => Ending::Captured(value, log.into_inner()),
                Err(ConflictableTransactionError::Abort(e)) => Ending::Failed(e),
                Err(ConflictableTransactionError::Conflict) => {
                    return Err(ConflictableTransactionError::Conflict)
                }
                Err(ConflictableTransactionError::Storage(e)) => {
                    Ending::Failed(StoreError::Io(e.to_string()))
                }
            };
            // Otherwise never let this transaction commit: the backend
            // commits the log.
            Err(ConflictableTransactionError::Abort(ending))
        });
        let captured = match ended {
            Err(TransactionError::Abort(Ending::Captured(value, log))) => Ok((value, Some(log))),
            Err(TransactionError::Abort(Ending::Failed(e))) => Err(e),
            Err(TransactionError::Storage(e)) => Err(StoreError::Io(e.to_string())),
            Ok(value) if in_place => Ok((value, None)),
            Ok(_) => unreachable_commit(),
        };
        // A failed capture drops `commit` unused here: it rolls back while
        // the lock is still held.
        let committed = captured.and_then(|(value, log)| match log {
            Some(log) => commit.commit(log).map(|()| value),
            // Committed in place: the backend's commit has nothing to do.
            None => Ok(value),
        });
        if committed.is_ok() {
            store.inner.committed.fetch_add(1, Ordering::SeqCst);
        }
        drop(lock);
        committed
    }
}

/// The closure above never returns `Ok`, so sled never commits it.
fn unreachable_commit<T>() -> Result<T, StoreError> {
    Err(StoreError::Io(
        "the local index committed a transaction before its backend did; report this bug".into(),
    ))
}
