//! Backup and restore: every tree as JSON lines (`{"tree","key","value"}`,
//! bytes in hex) after a header line. Taken through the admin API while
//! jitbot runs; restored offline into an empty store.

use super::{Store, StoreError};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, Write};

const TREES: [&str; 9] = [
    "requests", "leases", "timers", "timer_ix", "live", "audit", "outbox", "meta", "review",
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
    /// Writes a consistent-enough copy of every tree (each tree is read in
    /// one pass; take backups when jitbot is quiet for a point-in-time copy).
    pub fn backup(&self, out: &mut impl Write) -> Result<u64, StoreError> {
        let io = |e: std::io::Error| StoreError::Io(e.to_string());
        serde_json::to_writer(&mut *out, &Header { jitbot_backup: 1 })
            .map_err(|e| StoreError::Io(e.to_string()))?;
        out.write_all(b"\n").map_err(io)?;
        let mut count = 0;
        for name in TREES {
            let tree = self.inner.db.open_tree(name)?;
            for item in tree.iter() {
                let (k, v) = item?;
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

    /// Loads a backup into this store, which must be empty.
    pub async fn restore(&self, input: impl BufRead) -> Result<u64, StoreError> {
        if !self.inner.requests.is_empty() || !self.inner.leases.is_empty() || !self.inner.audit.is_empty() {
            return Err(StoreError::Io(
                "the target store is not empty; restore into a new --data directory".into(),
            ));
        }
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
        let mut count = 0;
        for (i, line) in lines.enumerate() {
            let line = line.map_err(|e| StoreError::Io(e.to_string()))?;
            if line.trim().is_empty() {
                continue;
            }
            let l: Line = serde_json::from_str(&line).map_err(|e| bad(i + 2, &e.to_string()))?;
            if !TREES.contains(&l.tree.as_str()) {
                return Err(bad(i + 2, &format!("unknown tree {}", l.tree)));
            }
            let key = hex::decode(&l.key).map_err(|e| bad(i + 2, &e.to_string()))?;
            let value = hex::decode(&l.value).map_err(|e| bad(i + 2, &e.to_string()))?;
            self.inner.db.open_tree(&l.tree)?.insert(key, value)?;
            count += 1;
        }
        self.flush().await?;
        Ok(count)
    }
}
