//! `jitbot store copy`: moves a sled store into an empty PostgreSQL
//! database, then checks the copy through a fresh replica: the same keys
//! in every tree, trees that agree with each other, and the same audit
//! chain check as the source.

use super::kv::{Change, TreeId};
use super::{AuditCheck, PgSettings, Store, StoreError};
use std::collections::BTreeMap;
use std::path::Path;

/// What [`Store::copy_to_postgres`] copied and found.
#[derive(Debug)]
pub struct CopyReport {
    /// Keys copied, per tree.
    pub counts: BTreeMap<&'static str, u64>,
    /// The audit chain, checked on the copy (the same as on the source).
    pub audit: AuditCheck,
}

impl Store {
    /// Copies the sled store at `from` (jitbot stopped) into the empty
    /// database `to`, and verifies the copy (counts per tree, the trees'
    /// consistency, the audit chain) through a replica in a temporary
    /// directory. `audit_key` is the `[audit] key`, when the chain is keyed.
    pub fn copy_to_postgres(
        from: &Path,
        to: &PgSettings,
        audit_key: Option<crate::secret::Secret>,
    ) -> Result<CopyReport, StoreError> {
        if !from.exists() {
            return Err(StoreError::Io(format!(
                "{} does not exist; give --from the [store] path of the sled store",
                from.display()
            )));
        }
        let source = Store::open(from, 64)?;
        if let Some(key) = &audit_key {
            source.set_audit_key(key.clone());
        }
        let snap = source.snapshot()?;
        let problems = super::check::problems(&snap);
        if !problems.is_empty() {
            return Err(StoreError::Inconsistent {
                problems: problems.join("; "),
            });
        }
        let source_audit = source.verify_audit()?;
        let mut rows = Vec::new();
        for tree in TreeId::ALL {
            for (k, v) in snap.tree(tree.name()) {
                rows.push(Change {
                    tree,
                    key: k.clone(),
                    value: Some(v.clone()),
                });
            }
        }
        let counts = super::pg::copy_into(rows, to)?;
        let dir = tempfile::tempdir()
            .map_err(|e| StoreError::Io(format!("cannot make a temporary directory: {e}")))?;
        let copy = Store::open_postgres(&dir.path().join("mirror"), 64, to)?;
        if let Some(key) = audit_key {
            copy.set_audit_key(key);
        }
        let copied = copy.snapshot()?;
        for tree in TreeId::ALL {
            let (want, got) = (snap.tree(tree.name()), copied.tree(tree.name()));
            // The open may add the schema marker; nothing else may differ.
            let differs = want.len() != got.len() && tree != TreeId::Meta
                || want.iter().any(|(k, v)| got.get(k) != Some(v));
            if differs {
                return Err(StoreError::Io(format!(
                    "the copy's tree {} ({} keys) differs from the source's ({} keys); drop the database and copy again",
                    tree.name(),
                    got.len(),
                    want.len()
                )));
            }
        }
        let audit = copy.verify_audit()?;
        if audit != source_audit {
            return Err(StoreError::Io(format!(
                "the copy's audit chain checks as {audit:?}, the source's as {source_audit:?}; drop the database and copy again"
            )));
        }
        Ok(CopyReport { counts, audit })
    }
}
