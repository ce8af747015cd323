//! `[audit] anchor_file`: the anchors jitbot published, appended to a file
//! kept outside the store, so that start-up and `jitbot audit verify` can
//! check the chain against the last one without anyone pasting it: a
//! rollback of the `audit` tree with its meta (which the head MAC cannot
//! see) then shows as records removed or rewritten.

use super::{Anchor, Store, StoreError};
use std::io::Write;
use std::path::PathBuf;

impl Store {
    /// Appends every anchor published from now on to `path`. Set once, at
    /// start-up; a second call is ignored.
    pub fn set_anchor_file(&self, path: PathBuf) {
        let _ = self.inner.anchor_file.set(path);
    }

    /// Appends `anchor` to the anchor file, if one is configured, and syncs it.
    pub fn record_published_anchor(&self, anchor: &Anchor) -> Result<(), StoreError> {
        let Some(path) = self.inner.anchor_file.get() else {
            return Ok(());
        };
        let io = |e: std::io::Error| {
            StoreError::Io(format!(
                "cannot append the anchor to audit.anchor_file {}: {e}",
                path.display()
            ))
        };
        not_special(path)?;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io)?;
        writeln!(file, "{anchor}").map_err(io)?;
        file.sync_all().map_err(io)
    }

    /// The last anchor in the anchor file: `None` without a file or before
    /// the first anchor. A line that is not an anchor is an error naming it.
    pub fn last_published_anchor(&self) -> Result<Option<Anchor>, StoreError> {
        let Some(path) = self.inner.anchor_file.get() else {
            return Ok(None);
        };
        not_special(path)?;
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(StoreError::Io(format!(
                    "cannot read audit.anchor_file {}: {e}",
                    path.display()
                )))
            }
        };
        let Some(last) = text.lines().rev().find(|l| !l.trim().is_empty()) else {
            return Ok(None);
        };
        last.parse().map(Some).map_err(|e| StoreError::Corrupt {
            key: format!("audit.anchor_file {}", path.display()),
            error: e,
        })
    }
}

/// Refuses an anchor file that exists and is not a regular file: opening a
/// FIFO would block start-up (or the anchor task) for good.
fn not_special(path: &std::path::Path) -> Result<(), StoreError> {
    match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => Err(StoreError::Io(format!(
            "audit.anchor_file {} is not a regular file; point it at the file jitbot appends its anchors to",
            path.display()
        ))),
        _ => Ok(()),
    }
}
