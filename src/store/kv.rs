//! The storage under the store: ordered byte trees and one atomic
//! multi-tree commit, [`Writer::transact`], which every write in `store/`
//! goes through. Its views record each write (tree, key, value or
//! deletion), so a backend other than sled can commit the same change:
//! with [`Backend::Sled`] the sled transaction simply commits; with
//! PostgreSQL (`pg.rs`) it is aborted, its log committed to PostgreSQL
//! first and only then applied to the local sled mirror.

use super::{Store, StoreError};
use sled::transaction::{
    ConflictableTransactionError, TransactionError, TransactionalTree, UnabortableTransactionError,
};
use sled::{IVec, Transactional};
use std::cell::RefCell;
use std::sync::atomic::Ordering;
use std::sync::MutexGuard;

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

/// Which storage commits a transaction.
pub(super) enum Backend {
    /// sled is the store itself.
    Sled,
    /// PostgreSQL is the truth; sled is this replica's mirror of it.
    Postgres(super::pg::Replica),
}

/// The store's writer lock, held: nothing else in this process changes the
/// store meanwhile. With PostgreSQL it also holds the database's store-wide
/// row lock, and the mirror has been brought up to date, so every read made
/// under it sees the current state of every replica's commits.
pub(super) struct Writer<'s> {
    store: &'s Store,
    /// The open PostgreSQL transaction (rolled back if dropped). Declared
    /// before the lock, so it is dropped first: the rollback reaches the
    /// connection before another writer's BEGIN can.
    pg: Option<super::pg::Open<'s>>,
    _lock: MutexGuard<'s, ()>,
}

fn tx_error(e: TransactionError<StoreError>) -> StoreError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => StoreError::Io(e.to_string()),
    }
}

/// How a sled transaction run for PostgreSQL ends: aborted on purpose,
/// carrying what the closure returned and wrote.
enum Ending<T> {
    Failed(StoreError),
    Captured(T, Vec<Change>),
}

impl Store {
    /// Takes the writer lock (see [`Writer`]).
    pub(super) fn writer(&self) -> Result<Writer<'_>, StoreError> {
        self.check_healthy()?;
        let lock = self.inner.writer.lock().unwrap_or_else(|p| p.into_inner());
        let pg = match &self.inner.backend {
            Backend::Sled => None,
            Backend::Postgres(replica) => Some(replica.begin(self)?),
        };
        Ok(Writer {
            store: self,
            pg,
            _lock: lock,
        })
    }

    pub(super) fn tree(&self, id: TreeId) -> &sled::Tree {
        let s = &*self.inner;
        match id {
            TreeId::Requests => &s.requests,
            TreeId::Leases => &s.leases,
            TreeId::Timers => &s.timers,
            TreeId::TimerIx => &s.timer_ix,
            TreeId::Live => &s.live,
            TreeId::Audit => &s.audit,
            TreeId::Outbox => &s.outbox,
            TreeId::OutboxDue => &s.outbox_due,
            TreeId::Meta => &s.meta,
            TreeId::Review => &s.review,
            TreeId::Seen => &s.seen,
        }
    }
}

impl Writer<'_> {
    /// Runs `f` over `trees` as one atomic change and commits it: to sled,
    /// or to PostgreSQL and then the mirror. `f` may run more than once
    /// (sled retries on a conflict); its error aborts everything. Counts
    /// as a commit for the group-commit flush.
    pub(super) fn transact<const N: usize, T>(
        self,
        trees: [TreeId; N],
        f: impl Fn(&[View<'_>; N]) -> Result<T, Abort>,
    ) -> Result<T, StoreError> {
        let store = self.store;
        let sled_trees: Vec<&sled::Tree> = trees.iter().map(|t| store.tree(*t)).collect();
        let run = |views: &Vec<TransactionalTree>, log: &RefCell<Vec<Change>>| {
            let views: [View<'_>; N] = std::array::from_fn(|i| View {
                tree: &views[i],
                id: trees[i],
                log,
            });
            f(&views)
        };
        let value = match self.pg {
            None => {
                let value = sled_trees.as_slice().transaction(|views| {
                    let log = RefCell::new(Vec::new());
                    run(views, &log)
                });
                value.map_err(tx_error)?
            }
            Some(open) => {
                let ended = sled_trees.as_slice().transaction::<_, ()>(|views| {
                    let log = RefCell::new(Vec::new());
                    let ending = match run(views, &log) {
                        Ok(value) => Ending::Captured(value, log.into_inner()),
                        Err(ConflictableTransactionError::Abort(e)) => Ending::Failed(e),
                        Err(ConflictableTransactionError::Conflict) => {
                            return Err(ConflictableTransactionError::Conflict)
                        }
                        Err(ConflictableTransactionError::Storage(e)) => {
                            Ending::Failed(StoreError::Io(e.to_string()))
                        }
                    };
                    // Never let sled commit: PostgreSQL commits first.
                    Err(ConflictableTransactionError::Abort(ending))
                });
                let (value, log) = match ended {
                    Err(TransactionError::Abort(Ending::Captured(value, log))) => (value, log),
                    Err(TransactionError::Abort(Ending::Failed(e))) => return Err(e),
                    Err(TransactionError::Storage(e)) => return Err(StoreError::Io(e.to_string())),
                    Ok(()) => unreachable_commit()?,
                };
                open.commit(log)?;
                value
            }
        };
        store.inner.committed.fetch_add(1, Ordering::SeqCst);
        Ok(value)
    }
}

/// The closure above never returns `Ok`, so sled never commits it.
fn unreachable_commit<T>() -> Result<T, StoreError> {
    Err(StoreError::Io(
        "the mirror committed a transaction meant for PostgreSQL first; report this bug".into(),
    ))
}
