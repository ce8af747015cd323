//! The audit chain: append-only records in the `audit` tree, each carrying
//! the hash of the one before it, with the head (`seq:hash`) in `meta`.
//!
//! A record's hash is SHA-256 of its stored bytes, or HMAC-SHA256 under the
//! `[audit] key` for records written with one (the record says which, in its
//! version tag). Unkeyed, anyone with write access to the store can rewrite
//! history and recompute every hash; keyed, they cannot without the key.
//! Either way, an [`Anchor`] published outside the store (`jitbot audit
//! anchor`) pins the history up to it: `jitbot audit verify --anchor`.

use super::records::{AuditEntry, StoredAudit};
use super::{encode, AuditDraft, Store, StoreError, AUDIT_HEAD};
use crate::secret::Secret;
use hmac::{Hmac, Mac};
use jitbot_core::Instant;
use sha2::{Digest, Sha256};
use sled::transaction::{ConflictableTransactionError, TransactionalTree};
use std::fmt;
use std::str::FromStr;

/// A point of the chain: record `seq` hashes to `hash`. The head is the
/// anchor of the last record; `0:` is the empty chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Anchor {
    pub seq: u64,
    pub hash: String,
}

impl Anchor {
    /// The empty chain, before record 1.
    pub const GENESIS: Anchor = Anchor {
        seq: 0,
        hash: String::new(),
    };
}

impl fmt::Display for Anchor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.seq, self.hash)
    }
}

impl FromStr for Anchor {
    type Err = String;
    fn from_str(s: &str) -> Result<Anchor, String> {
        let bad = || {
            format!(
                "`{}` is not an anchor; write SEQ:HASH as `jitbot audit anchor` prints it",
                s.chars().take(100).collect::<String>()
            )
        };
        let (seq, hash) = s.trim().split_once(':').ok_or_else(bad)?;
        let seq: u64 = seq.parse().map_err(|_| bad())?;
        let hex_ok = hash.len() == 64 && hash.chars().all(|c| c.is_ascii_hexdigit());
        if !(hex_ok || (seq == 0 && hash.is_empty())) {
            return Err(bad());
        }
        Ok(Anchor {
            seq,
            hash: hash.to_ascii_lowercase(),
        })
    }
}

/// Outcome of checking the audit chain.
#[derive(Debug, PartialEq, Eq)]
pub enum AuditCheck {
    Intact {
        records: u64,
    },
    /// The first record whose stored bytes no longer match the chain.
    Broken {
        seq: u64,
        problem: String,
    },
}

/// The hash that links the next record to `bytes` (a stored record).
fn link(bytes: &[u8], keyed: bool, key: Option<&Secret>) -> Result<String, String> {
    if !keyed {
        return Ok(hex::encode(Sha256::digest(bytes)));
    }
    let key = key.ok_or_else(|| {
        "it is keyed (HMAC-SHA256) and this process has no [audit] key to check it; verify where the key is configured"
            .to_string()
    })?;
    let mut mac = Hmac::<Sha256>::new_from_slice(key.expose().as_bytes())
        .map_err(|e| format!("the [audit] key cannot be used: {e}"))?;
    mac.update(bytes);
    Ok(hex::encode(mac.finalize().into_bytes()))
}

fn corrupt_head(why: String) -> StoreError {
    StoreError::Corrupt {
        key: "meta/audit_head".into(),
        error: format!(
            "{why}; refusing to write audit records (they would overwrite history). \
             Stop jitbot, run `jitbot audit verify`, and restore the store from a backup"
        ),
    }
}

/// Parses the stored head; a missing head is the empty chain.
fn parse_head(stored: Option<&[u8]>) -> Result<Anchor, StoreError> {
    match stored {
        None => Ok(Anchor {
            seq: 0,
            hash: String::new(),
        }),
        Some(bytes) => {
            let text = std::str::from_utf8(bytes).map_err(|_| corrupt_head("the head is not text".into()))?;
            text.parse::<Anchor>().map_err(|_| {
                corrupt_head(format!(
                    "the head `{}` is unreadable",
                    text.chars().take(80).collect::<String>()
                ))
            })
        }
    }
}

/// Appends `drafts` to the chain inside a commit. Fails the whole commit,
/// never resets the sequence, when the head is unreadable or missing while
/// records exist.
pub(super) fn append(
    audit: &TransactionalTree,
    meta: &TransactionalTree,
    drafts: &[AuditDraft],
    now: Instant,
    key: Option<&Secret>,
) -> Result<(), ConflictableTransactionError<StoreError>> {
    if drafts.is_empty() {
        return Ok(());
    }
    let head = parse_head(meta.get(AUDIT_HEAD)?.as_deref()).map_err(ConflictableTransactionError::Abort)?;
    // A head behind the records (reset, or restored from elsewhere) would
    // make this commit overwrite them.
    if audit.get((head.seq + 1).to_be_bytes())?.is_some() {
        return Err(ConflictableTransactionError::Abort(corrupt_head(format!(
            "the head says {} records but record {} exists",
            head.seq,
            head.seq + 1
        ))));
    }
    let (mut seq, mut prev) = (head.seq, head.hash);
    for draft in drafts {
        seq += 1;
        let entry = AuditEntry {
            seq,
            at: now,
            actor: draft.actor.clone(),
            action: draft.action.clone(),
            request: draft.request.clone(),
            lease: draft.lease.clone(),
            group: draft.group.clone(),
            user: draft.user.clone(),
            detail: draft.detail.clone(),
            prev: prev.clone(),
        };
        let stored = match key {
            Some(_) => StoredAudit::Keyed(entry),
            None => StoredAudit::V1(entry),
        };
        let bytes = encode(&stored);
        prev = link(&bytes, key.is_some(), key)
            .map_err(|e| ConflictableTransactionError::Abort(StoreError::Io(e)))?;
        audit.insert(&seq.to_be_bytes(), bytes)?;
    }
    meta.insert(AUDIT_HEAD, format!("{seq}:{prev}").as_bytes())?;
    Ok(())
}

impl StoredAudit {
    pub(super) fn into_entry(self) -> AuditEntry {
        match self {
            StoredAudit::V1(e) | StoredAudit::Keyed(e) => e,
        }
    }
    fn keyed(&self) -> bool {
        matches!(self, StoredAudit::Keyed(_))
    }
}

impl Store {
    /// Keys the chain from now on: every later record is HMAC-linked. Set
    /// once, before the first commit; a second call is ignored.
    pub fn set_audit_key(&self, key: Secret) {
        let _ = self.inner.audit_key.set(key);
    }

    fn audit_key(&self) -> Option<&Secret> {
        self.inner.audit_key.get()
    }

    /// Appends an `audit.keyed` record when a key is configured but the last
    /// record is unkeyed, so that from here on an unkeyed last record means
    /// the keyed history was cut off or rewritten. Returns whether it did:
    /// expected once, when the key is first configured; at any later start it
    /// means someone rewrote the chain without the key (only an anchor
    /// published before can then tell which records are genuine).
    pub async fn seal_unkeyed_history(&self, now: Instant) -> Result<bool, StoreError> {
        if self.audit_key().is_none() {
            return Ok(false);
        }
        let last = match self.inner.audit.last()? {
            None => return Ok(false),
            Some((k, v)) => super::decode::<StoredAudit>(&k, &v)?,
        };
        if last.keyed() {
            return Ok(false);
        }
        self.update(now, |tx| {
            tx.audit(AuditDraft {
                actor: "jitbot".into(),
                action: "audit.keyed".into(),
                detail: "the audit chain is HMAC-keyed from this record on".into(),
                ..AuditDraft::default()
            });
            Ok::<(), StoreError>(())
        })
        .await?;
        Ok(true)
    }

    /// The chain's head: the anchor to publish.
    pub fn audit_head(&self) -> Result<Anchor, StoreError> {
        parse_head(self.inner.meta.get(AUDIT_HEAD)?.as_deref())
    }

    /// Checks the audit hash chain from the first record to the stored head.
    pub fn verify_audit(&self) -> Result<AuditCheck, StoreError> {
        self.verify_audit_against(None)
    }

    /// Checks the chain and, given an anchor published earlier, that record
    /// `anchor.seq` still hashes to `anchor.hash` (the history up to it was
    /// not rewritten) and that the chain continues intact from it.
    pub fn verify_audit_against(&self, anchor: Option<&Anchor>) -> Result<AuditCheck, StoreError> {
        let keyed = match self.audit_key() {
            Some(key) => Keyed::With(key),
            None => Keyed::Missing,
        };
        let head = self.inner.meta.get(AUDIT_HEAD)?;
        audit_chain(
            &self.audit_base()?,
            self.inner.audit.iter().map(|item| item.map_err(StoreError::from)),
            head.as_deref(),
            keyed,
            anchor,
        )
    }
}

/// How keyed (HMAC) records are checked.
#[derive(Clone, Copy)]
pub(super) enum Keyed<'a> {
    /// With the key: every link is checked, and a configured key means the
    /// last record must be keyed.
    With(&'a Secret),
    /// Without the key, keyed records cannot be checked: said so.
    Missing,
    /// A backup checked offline, without the key: keyed links are taken as
    /// written; the sequence, the unkeyed links and the order are checked.
    Trusted,
}

/// Checks a chain of audit records (`seq` key → stored bytes, in order)
/// against the recorded head and, when given, a published anchor: the live
/// store's and a backup's.
///
/// `start` is where the records begin: [`Anchor::GENESIS`], or the last
/// record archived by retention (`archive.rs`), to which the first record
/// must link.
pub(super) fn audit_chain<K: AsRef<[u8]>, V: AsRef<[u8]>>(
    start: &Anchor,
    records: impl Iterator<Item = Result<(K, V), StoreError>>,
    head: Option<&[u8]>,
    keyed: Keyed<'_>,
    anchor: Option<&Anchor>,
) -> Result<AuditCheck, StoreError> {
    let broken = |seq: u64, problem: String| Ok(AuditCheck::Broken { seq, problem });
    if let Some(a) = anchor.filter(|a| a.seq < start.seq) {
        return broken(
            a.seq,
            format!(
                "the anchor {a} is older than the store's first record ({}): it is in the audit archive; \
                 check it with `jitbot audit verify --archive DIR --anchor {a}`",
                start.seq + 1
            ),
        );
    }
    // `None` after a keyed record checked as `Trusted`: its hash is unknown.
    let mut prev_hash = Some(start.hash.clone());
    let mut prev_seq = start.seq;
    let mut seen_keyed = false;
    let mut last_keyed = false;
    let mut anchor_found = anchor.is_some_and(|a| *a == *start);
    for item in records {
        let (k, v) = item?;
        let (k, v) = (k.as_ref(), v.as_ref());
        let Ok(seq_bytes) = <[u8; 8]>::try_from(k) else {
            return broken(
                prev_seq + 1,
                format!("a record has a malformed key ({} bytes)", k.len()),
            );
        };
        let seq = u64::from_be_bytes(seq_bytes);
        let stored = match serde_json::from_slice::<StoredAudit>(v) {
            Ok(s) => s,
            Err(e) => return broken(seq, format!("record is unreadable: {e}")),
        };
        let is_keyed = stored.keyed();
        let entry = stored.into_entry();
        if entry.seq != seq || seq != prev_seq + 1 {
            return broken(seq, format!("sequence jumps from {prev_seq} to {seq}"));
        }
        if prev_hash.as_ref().is_some_and(|h| *h != entry.prev) {
            // This record's link does not match its predecessor's bytes:
            // the predecessor was altered (or this link was).
            return broken(
                prev_seq.max(1),
                "its contents no longer match the hash recorded after it".into(),
            );
        }
        if seen_keyed && !is_keyed {
            return broken(
                seq,
                "it is unkeyed after keyed records: written without the [audit] key, so not by jitbot".into(),
            );
        }
        prev_hash = match (is_keyed, keyed) {
            (true, Keyed::Trusted) => None,
            (true, Keyed::With(key)) => match link(v, true, Some(key)) {
                Ok(h) => Some(h),
                Err(problem) => return broken(seq, problem),
            },
            (true, Keyed::Missing) => match link(v, true, None) {
                Ok(h) => Some(h),
                Err(problem) => return broken(seq, problem),
            },
            (false, _) => match link(v, false, None) {
                Ok(h) => Some(h),
                Err(problem) => return broken(seq, problem),
            },
        };
        if let Some(a) = anchor.filter(|a| a.seq == seq) {
            if let Some(hash) = prev_hash.as_ref().filter(|h| **h != a.hash) {
                return broken(
                    seq,
                    format!(
                        "it does not match the published anchor {a} (it hashes to {hash}): the history up to it was rewritten"
                    ),
                );
            }
            anchor_found = true;
        }
        seen_keyed |= is_keyed;
        last_keyed = is_keyed;
        prev_seq = seq;
    }
    let head_ok = match (head, &prev_hash) {
        (None, _) => prev_seq == 0,
        (Some(h), Some(hash)) => h == format!("{prev_seq}:{hash}").as_bytes(),
        // A trusted keyed tail: only the head's sequence can be checked.
        (Some(h), None) => parse_head(Some(h)).is_ok_and(|a| a.seq == prev_seq),
    };
    if !head_ok {
        return broken(
            prev_seq,
            "the last record does not match the recorded chain head".into(),
        );
    }
    if let Some(a) = anchor.filter(|_| !anchor_found) {
        return broken(
            a.seq,
            format!("it is missing, but the published anchor {a} says it existed: records were removed"),
        );
    }
    if matches!(keyed, Keyed::With(_)) && prev_seq > 0 && !last_keyed {
        return broken(
            prev_seq,
            "the last record is unkeyed although an [audit] key is configured: keyed records after it were removed"
                .into(),
        );
    }
    Ok(AuditCheck::Intact { records: prev_seq })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};

    fn now() -> Instant {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
    }

    async fn write(store: &Store, n: usize) -> Result<(), StoreError> {
        store
            .update(now(), |tx| {
                for i in 0..n {
                    tx.audit(AuditDraft {
                        actor: "alice".into(),
                        action: "request.opened".into(),
                        detail: format!("record {i}"),
                        ..AuditDraft::default()
                    });
                }
                Ok::<(), StoreError>(())
            })
            .await
    }

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8).unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn a_corrupt_or_missing_head_fails_the_commit_and_keeps_record_one() {
        let (_dir, store) = open();
        write(&store, 2).await.unwrap();
        let first = store.inner.audit.get(1u64.to_be_bytes()).unwrap().unwrap();
        for bad in [&b"garbage"[..], b"2:nothex", b"", b"\xff\xfe"] {
            store.inner.meta.insert(AUDIT_HEAD, bad).unwrap();
            let err = write(&store, 1).await.unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains("audit_head") && msg.contains("restore"), "{msg}");
        }
        // A head that went missing (or was reset) while records exist.
        store.inner.meta.remove(AUDIT_HEAD).unwrap();
        assert!(write(&store, 1).await.is_err());
        let behind = format!("1:{}", "0".repeat(64));
        store.inner.meta.insert(AUDIT_HEAD, behind.as_bytes()).unwrap();
        assert!(write(&store, 1).await.is_err(), "a head behind the records");
        assert_eq!(store.inner.audit.get(1u64.to_be_bytes()).unwrap().unwrap(), first);
        assert_eq!(store.inner.audit.len(), 2, "nothing was written");
    }

    #[tokio::test]
    async fn an_anchor_pins_the_history_before_it() {
        let (_dir, store) = open();
        write(&store, 3).await.unwrap();
        let anchor = store.audit_head().unwrap();
        assert_eq!(anchor.seq, 3);
        assert_eq!(anchor.to_string().parse::<Anchor>().unwrap(), anchor);
        write(&store, 2).await.unwrap();
        assert_eq!(
            store.verify_audit_against(Some(&anchor)).unwrap(),
            AuditCheck::Intact { records: 5 }
        );
        // Someone with store access rewrites record 2 and recomputes every
        // later hash and the head: the unkeyed chain alone looks intact...
        rewrite_from(&store, 2, None);
        assert_eq!(store.verify_audit().unwrap(), AuditCheck::Intact { records: 5 });
        // ...but not against the anchor published before.
        match store.verify_audit_against(Some(&anchor)).unwrap() {
            AuditCheck::Broken { seq: 3, problem } => assert!(problem.contains("anchor"), "{problem}"),
            other => panic!("{other:?}"),
        }
        // An anchor beyond the records: the tail was cut off.
        let later = Anchor {
            seq: 9,
            hash: "a".repeat(64),
        };
        assert!(matches!(
            store.verify_audit_against(Some(&later)).unwrap(),
            AuditCheck::Broken { seq: 9, .. }
        ));
        assert!("3:xyz".parse::<Anchor>().is_err());
        assert!("three:".parse::<Anchor>().is_err());
    }

    #[tokio::test]
    async fn a_keyed_chain_cannot_be_rewritten_without_the_key() {
        let (_dir, store) = open();
        write(&store, 2).await.unwrap();
        store.set_audit_key(Secret::new("audit-key-0123456789abcdef"));
        store.seal_unkeyed_history(now()).await.unwrap();
        write(&store, 2).await.unwrap();
        assert_eq!(store.verify_audit().unwrap(), AuditCheck::Intact { records: 5 });
        let text = String::from_utf8(
            store
                .inner
                .audit
                .get(5u64.to_be_bytes())
                .unwrap()
                .unwrap()
                .to_vec(),
        )
        .unwrap();
        assert!(text.contains("\"v\":\"1-hmac\""), "{text}");
        let third = String::from_utf8(
            store
                .inner
                .audit
                .get(3u64.to_be_bytes())
                .unwrap()
                .unwrap()
                .to_vec(),
        )
        .unwrap();
        assert!(third.contains("audit.keyed"), "{third}");

        // Rewriting with plain SHA-256 (no key) is caught at the first
        // unkeyed record after keyed ones, or at the end.
        rewrite_from(&store, 4, None);
        match store.verify_audit().unwrap() {
            AuditCheck::Broken { seq, problem } => {
                assert!(seq >= 4 && problem.contains("unkeyed"), "{seq} {problem}")
            }
            other => panic!("{other:?}"),
        }
        // A guessed key does not help either.
        let (_dir2, other) = open();
        write(&other, 1).await.unwrap();
        other.set_audit_key(Secret::new("audit-key-0123456789abcdef"));
        other.seal_unkeyed_history(now()).await.unwrap();
        write(&other, 1).await.unwrap();
        rewrite_from(&other, 3, Some("a-guessed-key-000000000000"));
        assert!(matches!(other.verify_audit().unwrap(), AuditCheck::Broken { .. }));

        // Without the key, keyed records cannot be checked at all.
        let dir = _dir;
        drop(store);
        let reopened = Store::open(dir.path(), 8).unwrap();
        match reopened.verify_audit().unwrap() {
            AuditCheck::Broken { problem, .. } => assert!(problem.contains("[audit] key"), "{problem}"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_backup_of_a_keyed_chain_is_checked_without_the_key() {
        let (_dir, store) = open();
        write(&store, 1).await.unwrap();
        store.set_audit_key(Secret::new("audit-key-0123456789abcdef"));
        store.seal_unkeyed_history(now()).await.unwrap();
        write(&store, 2).await.unwrap();
        let records: Vec<(Vec<u8>, Vec<u8>)> = store
            .inner
            .audit
            .iter()
            .map(|i| i.map(|(k, v)| (k.to_vec(), v.to_vec())).unwrap())
            .collect();
        let head = store.inner.meta.get(AUDIT_HEAD).unwrap().map(|h| h.to_vec());
        let check = |records: &[(Vec<u8>, Vec<u8>)], head: Option<&[u8]>| {
            audit_chain(
                &Anchor::GENESIS,
                records.iter().cloned().map(Ok),
                head,
                Keyed::Trusted,
                None,
            )
            .unwrap()
        };
        assert_eq!(
            check(&records, head.as_deref()),
            AuditCheck::Intact { records: 4 }
        );
        // The structure is still checked: a missing record, a wrong head.
        let mut gap = records.clone();
        gap.remove(2);
        assert!(matches!(check(&gap, head.as_deref()), AuditCheck::Broken { .. }));
        assert!(matches!(check(&records, Some(b"9:")), AuditCheck::Broken { .. }));
        // And so are the unkeyed links before the key.
        let mut altered = records.clone();
        altered[0].1 = String::from_utf8(altered[0].1.clone())
            .unwrap()
            .replace("record 0", "record X")
            .into_bytes();
        assert!(matches!(
            check(&altered, head.as_deref()),
            AuditCheck::Broken { seq: 1, .. }
        ));
    }

    /// What an attacker with write access to the store would do: change
    /// record `from`'s detail, then re-link every later record and the head
    /// with plain SHA-256 (or HMAC under a key they guess).
    fn rewrite_from(store: &Store, from: u64, key: Option<&str>) {
        let key = key.map(Secret::new);
        let mut prev = String::new();
        for item in store.inner.audit.iter() {
            let (k, v) = item.unwrap();
            let seq = u64::from_be_bytes(k.as_ref().try_into().unwrap());
            let stored: StoredAudit = serde_json::from_slice(&v).unwrap();
            let keyed = stored.keyed();
            let mut entry = stored.into_entry();
            let bytes = if seq >= from {
                if seq == from {
                    entry.detail = "nothing to see".into();
                }
                entry.prev = prev.clone();
                let rewritten = match &key {
                    Some(_) => StoredAudit::Keyed(entry),
                    None => StoredAudit::V1(entry),
                };
                let bytes = encode(&rewritten);
                store.inner.audit.insert(&k, bytes.clone()).unwrap();
                prev = link(&bytes, key.is_some(), key.as_ref()).unwrap();
                continue;
            } else {
                v.to_vec()
            };
            prev = link(&bytes, keyed, store.audit_key()).unwrap();
        }
        let last = store.inner.audit.len();
        store
            .inner
            .meta
            .insert(AUDIT_HEAD, format!("{last}:{prev}").as_bytes())
            .unwrap();
    }
}
