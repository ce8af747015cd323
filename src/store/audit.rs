//! The audit chain: append-only records in the `audit` tree, each carrying
//! the hash of the one before it, with the head (`seq:hash`) in `meta`.
//!
//! A record's hash is SHA-256 of its stored bytes, or HMAC-SHA256 under the
//! `[audit] key` for records written with one (the record says which, in its
//! version tag). Unkeyed, anyone with write access to the store can rewrite
//! history and recompute every hash; keyed, they cannot without the key.
//! Either way, an [`Anchor`] published outside the store (`jitbot audit
//! anchor`) pins the history up to it: `jitbot audit verify --anchor`.
//!
//! A keyed chain also keeps two MACs under the key in `meta`: the head's
//! (`audit_head_mac`, HMAC of `seq` and `hash`), so that cutting off the
//! newest records or emptying the chain shows, and "keyed since record N"
//! (`audit_keyed_since`), so that a keyed history rewritten as an unkeyed
//! one is never sealed as if it were a legacy chain keyed for the first
//! time. Only a chain that never carried either is sealed, once. Neither
//! binds anything outside the store: an older consistent state of the
//! `audit` tree with its meta (a backup, another store with the same key)
//! verifies intact, and only a published anchor catches it. A keyed store
//! opened without its key or with another one is refused before anything is
//! written ([`Store::check_audit_key`]).

use super::kv::{TreeId, View};
use super::records::{AuditEntry, StoredAudit};
use super::{encode, AuditDraft, Store, StoreError, AUDIT_HEAD};
use crate::secret::Secret;
use hmac::{Hmac, Mac};
use jitbot_core::Instant;
use sha2::{Digest, Sha256};
use sled::transaction::ConflictableTransactionError;
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

/// `meta` key of the head's MAC under the `[audit] key`.
pub(super) const HEAD_MAC: &[u8] = b"audit_head_mac";
/// `meta` key of `N:MAC`: records from `N` on are keyed.
pub(super) const KEYED_SINCE: &[u8] = b"audit_keyed_since";
/// The action of the record start-up appends when the chain does not verify.
const TAMPERED: &str = "audit.tampered";

/// HMAC-SHA256 under the key of a domain tag and its fields, hex.
fn mac(key: &Secret, domain: &[u8], fields: &[&[u8]]) -> Result<String, String> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key.expose().as_bytes())
        .map_err(|e| format!("the [audit] key cannot be used: {e}"))?;
    mac.update(domain);
    for f in fields {
        mac.update(&(f.len() as u64).to_be_bytes());
        mac.update(f);
    }
    Ok(hex::encode(mac.finalize().into_bytes()))
}

/// The MAC of a head: `HMAC(key, "head" ‖ seq ‖ hash)`.
fn head_mac(key: &Secret, head: &Anchor) -> Result<String, String> {
    mac(
        key,
        b"jitbot audit head\0",
        &[&head.seq.to_be_bytes(), head.hash.as_bytes()],
    )
}

/// The stored marker `N:MAC` saying records from `since` on are keyed.
fn keyed_since_marker(key: &Secret, since: u64) -> Result<String, String> {
    let m = mac(key, b"jitbot audit keyed since\0", &[&since.to_be_bytes()])?;
    Ok(format!("{since}:{m}"))
}

/// Reads the keyed-since marker: the record from which the chain is keyed,
/// or why it cannot be believed.
fn check_keyed_since(key: &Secret, stored: Option<&[u8]>) -> Result<u64, String> {
    let Some(bytes) = stored else {
        return Err(
            "an [audit] key is configured but the chain has no keyed-since marker: it was deleted, \
             so the chain may have been rewritten without the key"
                .into(),
        );
    };
    let since = std::str::from_utf8(bytes)
        .ok()
        .and_then(|t| t.split_once(':'))
        .and_then(|(n, _)| n.parse::<u64>().ok())
        .ok_or_else(|| "the keyed-since marker is unreadable: it was tampered with".to_string())?;
    let expected = keyed_since_marker(key, since)?;
    if expected.as_bytes() != bytes {
        return Err(format!(
            "the keyed-since marker (record {since}) does not verify under the [audit] key: \
             it was forged, or the key changed"
        ));
    }
    Ok(since)
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
pub(super) fn parse_head(stored: Option<&[u8]>) -> Result<Anchor, StoreError> {
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
    audit: &View<'_>,
    meta: &View<'_>,
    drafts: &[AuditDraft],
    now: Instant,
    key: Option<&Secret>,
) -> Result<(), ConflictableTransactionError<StoreError>> {
    if drafts.is_empty() {
        return Ok(());
    }
    let head = parse_head(meta.get(AUDIT_HEAD)?.as_deref()).map_err(ConflictableTransactionError::Abort)?;
    // Read here, inside the commit: with PostgreSQL another replica may
    // have keyed the chain (or keyed it under another key) since this one
    // started, and only the caught-up mirror under the writer lock says so.
    refuse_a_foreign_key(audit, meta, &head, key)?;
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
        audit.insert(seq.to_be_bytes(), bytes)?;
    }
    meta.insert(AUDIT_HEAD, format!("{seq}:{prev}").as_bytes())?;
    if let Some(key) = key {
        let head = Anchor { seq, hash: prev };
        let m = head_mac(key, &head).map_err(|e| ConflictableTransactionError::Abort(StoreError::Io(e)))?;
        meta.insert(HEAD_MAC, m.as_bytes())?;
    }
    Ok(())
}

/// Refuses to append to a chain this replica cannot extend: keyed (a
/// keyed-since marker, a head MAC or a keyed head record) while this
/// replica has no `[audit] key`, or keyed under another key (none of the
/// marker, the head MAC and the head record's link verifies under this
/// one, as [`Store::check_audit_key`] decides at start-up). With several
/// replicas on PostgreSQL the chain can be keyed after this replica
/// started: the first replica of a rolling restart that turns the key on
/// keys it. Unkeyed records after that point would break the chain for
/// good, so the replicas still on the old configuration fail closed
/// instead (their changes are not committed) until they are restarted
/// with the key.
fn refuse_a_foreign_key(
    audit: &View<'_>,
    meta: &View<'_>,
    head: &Anchor,
    key: Option<&Secret>,
) -> Result<(), ConflictableTransactionError<StoreError>> {
    let refused = |why: String| ConflictableTransactionError::Abort(StoreError::AuditKey(why));
    let marker = meta.get(KEYED_SINCE)?;
    let stored_mac = meta.get(HEAD_MAC)?;
    let head_record = match head.seq {
        0 => None,
        seq => audit
            .get(seq.to_be_bytes())?
            .filter(|v| serde_json::from_slice::<StoredAudit>(v).is_ok_and(|s| s.keyed())),
    };
    let Some(key) = key else {
        if marker.is_none() && stored_mac.is_none() && head_record.is_none() {
            return Ok(());
        }
        let since = marker
            .as_deref()
            .and_then(|m| std::str::from_utf8(m).ok())
            .and_then(|t| t.split_once(':'))
            .map(|(n, _)| format!(" since record {n}"))
            .unwrap_or_default();
        return Err(refused(format!(
            "the audit chain is keyed (HMAC){since}, by a jitbot replica that has an [audit] key, but this \
             replica has no [audit] key: an unkeyed record would break the chain for good, so this change was \
             not committed. Set the same [audit] key on every replica and restart this one; when turning the \
             key on, restart every replica with it (replicas still on the old configuration refuse every \
             change that writes an audit record, revocations included, until they are restarted)"
        )));
    };
    let mut checked = 0;
    let mut verified = 0;
    if let Some(m) = marker.as_deref() {
        checked += 1;
        verified += usize::from(check_keyed_since(key, Some(m)).is_ok());
    }
    if let Some(m) = stored_mac.as_deref() {
        checked += 1;
        verified += usize::from(head_mac(key, head).is_ok_and(|e| e.as_bytes() == m));
    }
    if let Some(bytes) = head_record.as_deref() {
        checked += 1;
        verified += usize::from(link(bytes, true, Some(key)).is_ok_and(|h| h == head.hash));
    }
    if checked > 0 && verified == 0 {
        return Err(refused(
            "the audit chain is keyed under another [audit] key than this replica's (neither its keyed-since \
             marker, nor its head MAC, nor its last record verifies under this one): another replica writes \
             with a different key, so this change was not committed. Give every replica the same [audit] key \
             and restart this one"
                .into(),
        ));
    }
    Ok(())
}

/// What start-up found when keying the chain ([`Store::seal_unkeyed_history`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sealing {
    /// No `[audit] key` is configured.
    Unkeyed,
    /// Keyed before, and it verifies under the key.
    Intact,
    /// Keyed for the first time: records from `since` on are keyed;
    /// `legacy` unkeyed records before it were sealed with an `audit.keyed`
    /// record (none for a new chain).
    FirstKeyed { since: u64, legacy: u64 },
    /// The chain does not verify under the key, so it was not sealed: the
    /// history was rewritten, cut off or emptied without the key. `recorded`
    /// says an `audit.tampered` record now says so in the chain itself.
    Tampered {
        seq: u64,
        problem: String,
        recorded: bool,
    },
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

    /// Keys the chain at start-up, once the `[audit] key` is set, and checks
    /// it. A chain that never carried a keyed record, a head MAC or a
    /// keyed-since marker is keyed for the first time: a legacy chain is
    /// sealed with an `audit.keyed` record, and the keyed-since marker and
    /// the head's MAC are written, in one commit. Any other chain must verify
    /// under the key; if it does not, nothing is sealed, an `audit.tampered`
    /// record (once) keeps the finding in the chain for `jitbot audit
    /// verify`, and the caller raises an alert.
    ///
    /// Before anything is written, [`Store::check_audit_key`] refuses a
    /// missing key for a keyed chain and a key that is not the chain's.
    pub async fn seal_unkeyed_history(&self, now: Instant) -> Result<Sealing, StoreError> {
        self.check_audit_key()?;
        let Some(key) = self.audit_key() else {
            return Ok(Sealing::Unkeyed);
        };
        let never_keyed = self.tree(TreeId::Meta).get(KEYED_SINCE)?.is_none()
            && self.tree(TreeId::Meta).get(HEAD_MAC)?.is_none()
            && !self.any_keyed_record()?;
        if never_keyed {
            if let Some(sealing) = self.key_first_time(now, key).await? {
                return Ok(sealing);
            }
            // Another replica keyed the chain since this one looked (two
            // replicas started with the key at once): check this key
            // against it, as at any start on a keyed chain.
            self.check_audit_key()?;
        }
        let (seq, problem) = match self.verify_audit()? {
            AuditCheck::Intact { .. } => return Ok(Sealing::Intact),
            AuditCheck::Broken { seq, problem } => (seq, problem),
        };
        // One finding in the chain is enough: `verify` reports the chain
        // broken at it from then on, whatever is appended after it.
        let already = self.recorded_tampering()?;
        let mut recorded = false;
        if !already {
            let written = self
                .update(now, |tx| {
                    tx.audit(AuditDraft {
                        actor: "jitbot".into(),
                        action: TAMPERED.into(),
                        detail: format!("at start-up the chain did not verify at record {seq}: {problem}"),
                        ..AuditDraft::default()
                    });
                    Ok::<(), StoreError>(())
                })
                .await;
            match written {
                Ok(()) => recorded = true,
                Err(e) => tracing::error!(error = %e, "cannot record the broken audit chain in it"),
            }
        }
        Ok(Sealing::Tampered {
            seq,
            problem,
            recorded,
        })
    }

    /// Why this replica cannot append to the audit chain as it stands, if
    /// it cannot: the chain is keyed (a keyed-since marker or a head MAC,
    /// written by a replica that has an `[audit] key`) and this one has no
    /// key. Cheap (two reads), so leadership asks it at every renewal: a
    /// replica that could not write the audit record of a revocation must
    /// not be the one that revokes.
    pub(super) fn cannot_append_audit(&self) -> Result<Option<String>, StoreError> {
        if self.audit_key().is_some() {
            return Ok(None);
        }
        let meta = &self.tree(TreeId::Meta);
        if meta.get(KEYED_SINCE)?.is_none() && meta.get(HEAD_MAC)?.is_none() {
            return Ok(None);
        }
        Ok(Some(
            "the audit chain is keyed (HMAC) by a replica with an [audit] key, and this replica has none: \
             it would fail every change that writes an audit record, revocations included, so it does not lead. \
             Set the same [audit] key on every replica and restart this one"
                .into(),
        ))
    }

    /// Refuses, writing nothing, a start that would poison a keyed chain:
    /// no `[audit] key` although the chain is keyed (it has a keyed-since
    /// marker, a head MAC or ends in a keyed record), or a key under which
    /// none of the marker, the head MAC and the last keyed record's link
    /// verifies (a key mismatch; rotation is not supported). When the key
    /// verifies some of them but not others, the chain was tampered with:
    /// that is for [`Store::seal_unkeyed_history`] to record, not refused.
    pub fn check_audit_key(&self) -> Result<(), StoreError> {
        let meta = &self.tree(TreeId::Meta);
        let marker = meta.get(KEYED_SINCE)?;
        let stored_mac = meta.get(HEAD_MAC)?;
        let head = meta.get(AUDIT_HEAD)?;
        let last_keyed = self.last_keyed_record()?;
        let Some(key) = self.audit_key() else {
            if marker.is_some() || stored_mac.is_some() || last_keyed.is_some() {
                return Err(StoreError::AuditKey(
                    "the store's audit chain is keyed (HMAC), but no [audit] key is configured: \
                     every record written now would break the chain for good, so jitbot does not start. \
                     Configure the key the chain was written with as [audit] key (or its env/file source)"
                        .into(),
                ));
            }
            return Ok(());
        };
        // Each piece present is checked; a piece that cannot be checked
        // (no head to MAC, a keyed record without a successor or head to
        // link to) counts neither way.
        let mut checked = 0;
        let mut verified = 0;
        if let Some(m) = marker.as_deref() {
            checked += 1;
            verified += usize::from(check_keyed_since(key, Some(m)).is_ok());
        }
        let head = parse_head(head.as_deref()).ok();
        if let (Some(m), Some(head)) = (stored_mac.as_deref(), head.as_ref()) {
            checked += 1;
            verified += usize::from(head_mac(key, head).is_ok_and(|e| e.as_bytes() == m));
        }
        if let Some((seq, bytes)) = last_keyed {
            let next = match self.tree(TreeId::Audit).get((seq + 1).to_be_bytes())? {
                Some(v) => serde_json::from_slice::<StoredAudit>(&v)
                    .ok()
                    .map(|s| s.into_entry().prev),
                None => head.as_ref().filter(|h| h.seq == seq).map(|h| h.hash.clone()),
            };
            if let Some(expected) = next {
                checked += 1;
                verified += usize::from(link(&bytes, true, Some(key)).is_ok_and(|h| h == expected));
            }
        }
        if checked > 0 && verified == 0 {
            return Err(StoreError::AuditKey(
                "the configured [audit] key differs from the key the store's audit chain was written with: \
                 neither its keyed-since marker, nor its head MAC, nor its last keyed record verifies under it. \
                 jitbot does not start, so nothing is written under the wrong key. Configure the original key \
                 (a typo, a stale env or file?); key rotation is not supported yet. If the key is right, \
                 someone replaced all three without it: compare the chain with your published anchors and backups"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The newest keyed record (`seq` and stored bytes), if any.
    fn last_keyed_record(&self) -> Result<Option<(u64, sled::IVec)>, StoreError> {
        for item in self.tree(TreeId::Audit).iter().rev() {
            let (k, v) = item?;
            if serde_json::from_slice::<StoredAudit>(&v).is_ok_and(|s| s.keyed()) {
                let seq = <[u8; 8]>::try_from(k.as_ref()).map(u64::from_be_bytes).ok();
                return Ok(seq.map(|seq| (seq, v)));
            }
        }
        Ok(None)
    }

    fn recorded_tampering(&self) -> Result<bool, StoreError> {
        for item in self.tree(TreeId::Audit).iter().rev() {
            let (_, v) = item?;
            if serde_json::from_slice::<StoredAudit>(&v)
                .is_ok_and(|s| s.keyed() && s.into_entry().action == TAMPERED)
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn any_keyed_record(&self) -> Result<bool, StoreError> {
        for item in self.tree(TreeId::Audit).iter() {
            let (_, v) = item?;
            if serde_json::from_slice::<StoredAudit>(&v).is_ok_and(|s| s.keyed()) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The first keying: the seal record (for a legacy chain), the marker
    /// and the head's MAC in one commit. `None` when, under the writer
    /// lock, the chain turns out keyed already (by another replica).
    async fn key_first_time(&self, now: Instant, key: &Secret) -> Result<Option<Sealing>, StoreError> {
        self.check_healthy()?;
        let seal = [AuditDraft {
            actor: "jitbot".into(),
            action: "audit.keyed".into(),
            detail: "the audit chain is HMAC-keyed from this record on".into(),
            ..AuditDraft::default()
        }];
        let abort = |e: String| ConflictableTransactionError::Abort(StoreError::Io(e));
        let legacy = self
            .writer()?
            .transact([TreeId::Audit, TreeId::Meta], |[audit, meta]| {
                if meta.get(KEYED_SINCE)?.is_some() || meta.get(HEAD_MAC)?.is_some() {
                    return Ok(None);
                }
                let head = parse_head(meta.get(AUDIT_HEAD)?.as_deref())
                    .map_err(ConflictableTransactionError::Abort)?;
                if head.seq > 0 {
                    append(audit, meta, &seal, now, Some(key))?;
                } else {
                    meta.insert(HEAD_MAC, head_mac(key, &head).map_err(abort)?.as_bytes())?;
                }
                let marker = keyed_since_marker(key, head.seq + 1).map_err(abort)?;
                meta.insert(KEYED_SINCE, marker.as_bytes())?;
                Ok(Some(head.seq))
            })?;
        let Some(legacy) = legacy else {
            return Ok(None);
        };
        self.flush_committed().await?;
        Ok(Some(Sealing::FirstKeyed {
            since: legacy + 1,
            legacy,
        }))
    }

    /// The chain's head: the anchor to publish.
    pub fn audit_head(&self) -> Result<Anchor, StoreError> {
        let _whole = self.reading();
        parse_head(self.tree(TreeId::Meta).get(AUDIT_HEAD)?.as_deref())
    }

    /// Checks the audit hash chain from the first record to the stored head.
    pub fn verify_audit(&self) -> Result<AuditCheck, StoreError> {
        self.verify_audit_against(None)
    }

    /// Checks the chain and, given an anchor published earlier, that record
    /// `anchor.seq` still hashes to `anchor.hash` (the history up to it was
    /// not rewritten) and that the chain continues intact from it.
    /// Holds the writer lock meanwhile, so that a commit cannot land between
    /// reading the records and the head (and its MAC) and pass for a break.
    pub fn verify_audit_against(&self, anchor: Option<&Anchor>) -> Result<AuditCheck, StoreError> {
        let _guard = self.writer()?;
        let keyed_since = self.tree(TreeId::Meta).get(KEYED_SINCE)?;
        let head_mac = self.tree(TreeId::Meta).get(HEAD_MAC)?;
        let keyed = match self.audit_key() {
            Some(key) => Keyed::With {
                key,
                keyed_since: keyed_since.as_deref(),
                head_mac: head_mac.as_deref(),
            },
            None => Keyed::Missing,
        };
        let head = self.tree(TreeId::Meta).get(AUDIT_HEAD)?;
        audit_chain(
            &self.audit_base()?,
            self.tree(TreeId::Audit)
                .iter()
                .map(|item| item.map_err(StoreError::from)),
            head.as_deref(),
            keyed,
            anchor,
        )
    }
}

/// How keyed (HMAC) records are checked.
#[derive(Clone, Copy)]
pub(super) enum Keyed<'a> {
    /// With the key: every link is checked, the keyed-since marker and the
    /// head's MAC (stored in `meta`) must verify, and every record from the
    /// marker's on must be keyed.
    With {
        key: &'a Secret,
        keyed_since: Option<&'a [u8]>,
        head_mac: Option<&'a [u8]>,
    },
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
    let keyed_since = match keyed {
        Keyed::With { key, keyed_since, .. } => match check_keyed_since(key, keyed_since) {
            Ok(since) => Some(since),
            Err(problem) => return broken(0, problem),
        },
        _ => None,
    };
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
        if !is_keyed && keyed_since.is_some_and(|since| seq >= since) {
            return broken(
                seq,
                format!(
                    "it is unkeyed, but the chain is keyed since record {}: written without the [audit] key, so not by jitbot",
                    keyed_since.unwrap_or_default()
                ),
            );
        }
        if is_keyed && matches!(keyed, Keyed::With { .. }) && entry.action == TAMPERED {
            return broken(
                seq,
                format!(
                    "jitbot found this chain tampered with when it started ({}): {}. \
                     Compare it with your published anchors and backups",
                    entry.at.to_rfc3339(),
                    entry.detail
                ),
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
            (true, Keyed::With { key, .. }) => match link(v, true, Some(key)) {
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
    if matches!(keyed, Keyed::With { .. }) && prev_seq > 0 && !last_keyed {
        return broken(
            prev_seq,
            "the last record is unkeyed although an [audit] key is configured: keyed records after it were removed"
                .into(),
        );
    }
    if let (
        Keyed::With {
            key,
            head_mac: stored,
            ..
        },
        Some(since),
    ) = (keyed, keyed_since)
    {
        if prev_seq + 1 < since {
            return broken(
                prev_seq + 1,
                format!(
                    "the chain was keyed at record {since} but ends at record {prev_seq}: records were removed"
                ),
            );
        }
        let Ok(head) = parse_head(head) else {
            return broken(prev_seq, "the chain head is unreadable".into());
        };
        let expected = match head_mac(key, &head) {
            Ok(m) => m,
            Err(problem) => return broken(prev_seq, problem),
        };
        match stored {
            None => {
                return broken(
                    prev_seq,
                    "the chain head carries no MAC under the [audit] key: the newest records were cut off, \
                     or the chain was emptied"
                        .into(),
                )
            }
            Some(m) if m != expected.as_bytes() => {
                return broken(
                    prev_seq,
                    format!(
                        "the chain head {head} does not match its MAC under the [audit] key: \
                         the newest records were cut off (or the chain was emptied)"
                    ),
                )
            }
            Some(_) => {}
        }
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
        let first = store
            .tree(TreeId::Audit)
            .get(1u64.to_be_bytes())
            .unwrap()
            .unwrap();
        for bad in [&b"garbage"[..], b"2:nothex", b"", b"\xff\xfe"] {
            store.tree(TreeId::Meta).insert(AUDIT_HEAD, bad).unwrap();
            let err = write(&store, 1).await.unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains("audit_head") && msg.contains("restore"), "{msg}");
        }
        // A head that went missing (or was reset) while records exist.
        store.tree(TreeId::Meta).remove(AUDIT_HEAD).unwrap();
        assert!(write(&store, 1).await.is_err());
        let behind = format!("1:{}", "0".repeat(64));
        store
            .tree(TreeId::Meta)
            .insert(AUDIT_HEAD, behind.as_bytes())
            .unwrap();
        assert!(write(&store, 1).await.is_err(), "a head behind the records");
        assert_eq!(
            store
                .tree(TreeId::Audit)
                .get(1u64.to_be_bytes())
                .unwrap()
                .unwrap(),
            first
        );
        assert_eq!(store.tree(TreeId::Audit).len(), 2, "nothing was written");
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
                .tree(TreeId::Audit)
                .get(5u64.to_be_bytes())
                .unwrap()
                .unwrap()
                .to_vec(),
        )
        .unwrap();
        assert!(text.contains("\"v\":\"1-hmac\""), "{text}");
        let third = String::from_utf8(
            store
                .tree(TreeId::Audit)
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
            .tree(TreeId::Audit)
            .iter()
            .map(|i| i.map(|(k, v)| (k.to_vec(), v.to_vec())).unwrap())
            .collect();
        let head = store
            .tree(TreeId::Meta)
            .get(AUDIT_HEAD)
            .unwrap()
            .map(|h| h.to_vec());
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
        for item in store.tree(TreeId::Audit).iter() {
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
                store.tree(TreeId::Audit).insert(&k, bytes.clone()).unwrap();
                prev = link(&bytes, key.is_some(), key.as_ref()).unwrap();
                continue;
            } else {
                v.to_vec()
            };
            prev = link(&bytes, keyed, store.audit_key()).unwrap();
        }
        let last = store.tree(TreeId::Audit).len();
        store
            .tree(TreeId::Meta)
            .insert(AUDIT_HEAD, format!("{last}:{prev}").as_bytes())
            .unwrap();
    }
}
