//! Backup and restore: every tree (the `seen` tree's unexpired payload ids
//! only) as JSON lines (`{"tree","key","value"}`,
//! bytes in hex) after a header line. A backup is a point-in-time copy,
//! taken through the admin API while jitbot runs; a restore checks that the
//! copy's trees agree with each other before it writes anything into an
//! empty store.

use super::check::{problems, Snapshot};
use super::kv::{Durability, TreeId};
use super::{Store, StoreError};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, Write};

const TREES: [&str; 11] = [
    "requests",
    "leases",
    "timers",
    "timer_ix",
    "live",
    "audit",
    "outbox",
    "outbox_due",
    "meta",
    "review",
    // Payload ids still inside their replay window: without them a restored
    // store would take again a click it already took (see `seen`).
    "seen",
];

#[derive(Serialize, Deserialize)]
struct Line {
    tree: String,
    key: String,
    value: String,
}

#[derive(Serialize, Deserialize)]
struct Header {
    jitbot_backup: u32,
}

impl Store {
    /// Reads every tree at one point in time.
    ///
    /// sled 0.34 has no snapshot, so this holds the writer lock that every
    /// change takes ([`Store::update`] and the outbox's writes): no commit
    /// interleaves with the read. Commits wait for the read (they never
    /// wait for the backup's output, which is written after the lock is
    /// released).
    pub(super) fn snapshot(&self) -> Result<Snapshot, StoreError> {
        // After a failed flush, memory may hold what the disk does not.
        self.check_healthy()?;
        let trees = TreeId::ALL.map(|t| self.tree(t));
        let mut raw = Vec::with_capacity(TREES.len());
        {
            let _guard = self.writer()?;
            for (name, tree) in TREES.into_iter().zip(trees) {
                // IVecs are reference-counted: copying them out happens after
                // the lock is released.
                let items = tree.iter().collect::<Result<Vec<_>, _>>()?;
                raw.push((name, items));
            }
        }
        let now = chrono::Utc::now();
        let mut snap = Snapshot::default();
        for (name, items) in raw {
            snap.trees.insert(
                name,
                items
                    .into_iter()
                    // Expired payload ids protect nothing any more.
                    .filter(|(_, v)| name != "seen" || super::seen::unexpired(v, now))
                    .map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .collect(),
            );
        }
        Ok(snap)
    }

    /// Problems in how the trees of the live store agree with each other
    /// (the checks a restore makes), read at one point in time; empty when
    /// there are none.
    pub fn check_consistency(&self) -> Result<Vec<String>, StoreError> {
        Ok(problems(&self.snapshot()?))
    }

    /// Writes a point-in-time copy of every tree; returns the records written.
    pub fn backup(&self, out: &mut impl Write) -> Result<u64, StoreError> {
        let io = |e: std::io::Error| StoreError::Io(e.to_string());
        let snap = self.snapshot()?;
        let found = problems(&snap);
        if !found.is_empty() {
            // Written anyway (it is what the store holds), but the restore
            // will refuse it: say so now, while someone is looking.
            tracing::error!(problems = %found.join("; "), "the store's trees disagree; this backup will not restore until that is fixed");
        }
        serde_json::to_writer(&mut *out, &Header { jitbot_backup: 1 })
            .map_err(|e| StoreError::Io(e.to_string()))?;
        out.write_all(b"\n").map_err(io)?;
        let mut count = 0;
        for name in TREES {
            let Some(tree) = snap.trees.get(name) else {
                continue;
            };
            for (k, v) in tree {
                let line = Line {
                    tree: name.to_string(),
                    key: hex::encode(k),
                    value: hex::encode(v),
                };
                serde_json::to_writer(&mut *out, &line).map_err(|e| StoreError::Io(e.to_string()))?;
                out.write_all(b"\n").map_err(io)?;
                count += 1;
            }
        }
        Ok(count)
    }

    /// Loads a backup into this store, which must be empty. The whole file
    /// is read and checked first (every Granting or Revoking lease has its
    /// timer, `timers` and `timer_ix` agree, `live` agrees with the leases,
    /// the audit chain verifies up to its head, the outbox queues agree with
    /// the outbox); an inconsistent file is refused with what is wrong, and
    /// nothing is written.
    pub async fn restore(&self, input: impl BufRead) -> Result<u64, StoreError> {
        // A first look, so a full store refuses before a long file is read;
        // the check that decides is made again under the writer lock below.
        self.refuse_a_non_empty_target()?;
        let bad = |line: usize, what: &str| StoreError::Corrupt {
            key: format!("backup line {line}"),
            error: what.to_string(),
        };
        let mut lines = input.lines();
        let header = lines
            .next()
            .ok_or_else(|| bad(1, "the file is empty"))?
            .map_err(|e| StoreError::Io(e.to_string()))?;
        match serde_json::from_str::<Header>(&header) {
            Ok(Header { jitbot_backup: 1 }) => {}
            _ => return Err(bad(1, "not a jitbot backup (version 1 header missing)")),
        }
        let mut snap = Snapshot::default();
        let mut count = 0;
        for (i, line) in lines.enumerate() {
            let line = line.map_err(|e| StoreError::Io(e.to_string()))?;
            if line.trim().is_empty() {
                continue;
            }
            let l: Line = serde_json::from_str(&line).map_err(|e| bad(i + 2, &e.to_string()))?;
            let Some(name) = TREES.into_iter().find(|t| *t == l.tree) else {
                return Err(bad(i + 2, &format!("unknown tree {}", l.tree)));
            };
            let key = hex::decode(&l.key).map_err(|e| bad(i + 2, &e.to_string()))?;
            let value = hex::decode(&l.value).map_err(|e| bad(i + 2, &e.to_string()))?;
            if snap.trees.entry(name).or_default().insert(key, value).is_some() {
                return Err(bad(i + 2, &format!("a second value for one key of tree {name}")));
            }
            count += 1;
        }
        // Payload ids whose replay window passed while the backup waited.
        let now = chrono::Utc::now();
        if let Some(seen) = snap.trees.get_mut("seen") {
            seen.retain(|_, v| super::seen::unexpired(v, now));
        }
        let found = problems(&snap);
        if !found.is_empty() {
            return Err(StoreError::Inconsistent {
                problems: found.join("; "),
            });
        }
        // One transaction: a restore that stops half-way leaves nothing.
        // Emptiness is decided under the writer lock: with PostgreSQL the
        // mirror is only current once `writer` has locked the head and
        // pulled what other replicas committed (a refusal drops the writer,
        // which rolls back).
        let writer = self.writer()?;
        self.refuse_a_non_empty_target()?;
        writer.transact(TreeId::ALL, |views| {
            for (view, name) in views.iter().zip(TREES) {
                for (k, v) in snap.tree(name) {
                    view.insert(k, v)?;
                }
            }
            Ok(())
        })?;
        self.flush().await?;
        Ok(count)
    }

    /// Refuses a target that holds requests, leases or audit records (a
    /// restore writes a whole store's history; merged with another it
    /// breaks the audit chain and mixes two stores' leases). Read from
    /// the local index: current only under the writer lock on PostgreSQL.
    fn refuse_a_non_empty_target(&self) -> Result<(), StoreError> {
        let trees = self.inner.trees();
        if [TreeId::Requests, TreeId::Leases, TreeId::Audit]
            .into_iter()
            .all(|t| trees.get(t).is_empty())
        {
            return Ok(());
        }
        Err(StoreError::Io(match self.inner.backend.durability() {
            Durability::LocalFlush => {
                "the target store is not empty; restore into a new --data directory".into()
            }
            Durability::AtCommit => {
                "the target PostgreSQL database already holds a jitbot store (requests, leases \
                 or audit records, possibly written by another replica); restore into a new, empty database \
                 ([store] url naming a database no jitbot has written to), never into one in use"
                    .into()
            }
        }))
    }
}
