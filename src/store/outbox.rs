//! The outbox: notices and approval cards written with each transition and
//! delivered afterwards, to each destination (chat platform) on its own.
//!
//! Trees: `outbox` (entry id → the item and, per destination still to reach,
//! its failed attempts, next attempt and whether a card post may be in
//! flight) and `outbox_due` (`destination 0x00 [priority] [due ms] [entry id]`
//! → empty: each destination's queue, urgent entries first, then in due
//! order, so alerts never wait behind user cards on a rate-limited platform).
//! Keys written before priorities (`destination 0x00 [due ms] [entry id]`)
//! are re-keyed when the store opens and still read. The engine's commit queues a new
//! entry under the empty destination; the worker fans it out to the
//! destinations configured now. Every write here takes the store's writer
//! lock, like [`Store::update`], so a backup never sees half of one.

use super::kv::{Abort, TreeId, View};
use super::records::{DestV2, OutboxV2, StoredOutbox, StoredRequest};
use super::{decode, encode, OutboxItem, RequestRecord, Store, StoreError};
use crate::messages::{Audience, MessageRef};
use jitbot_core::{Instant, RequestId};
use sled::transaction::ConflictableTransactionError;
use std::collections::{BTreeMap, BTreeSet};

/// One entry's delivery to one destination, as the worker sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct OutboxJob {
    pub id: u64,
    pub item: OutboxItem,
    pub queued_at: Instant,
    /// Failed attempts on this destination so far.
    pub attempts: u32,
    /// A post of this card was started and its outcome was never recorded:
    /// posting again may show the card twice.
    pub interrupted_post: bool,
    pub next_attempt: Instant,
}

fn millis(at: Instant) -> u64 {
    u64::try_from(at.timestamp_millis()).unwrap_or(0)
}

/// How soon an entry goes out on its destination, lowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Priority {
    /// Security alerts (break-glass, drift, stuck revocations, anchors):
    /// drained before anything user traffic can queue.
    Urgent = 0,
    /// Approval cards, card updates and notices to people and groups.
    Normal = 1,
}

const PRIORITIES: [Priority; 2] = [Priority::Urgent, Priority::Normal];

impl Priority {
    /// The priority of an item: alerts are urgent.
    pub(super) fn of(item: &OutboxItem) -> Priority {
        match item {
            OutboxItem::Send { notice } if notice.to == Audience::Alert => Priority::Urgent,
            _ => Priority::Normal,
        }
    }
}

/// The key of an entry in a destination's queue (`""` = not fanned out yet).
pub(super) fn due_key(dest: &str, priority: Priority, due: Instant, id: u64) -> Vec<u8> {
    let mut k = prefix(dest);
    k.push(priority as u8);
    k.extend_from_slice(&millis(due).to_be_bytes());
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// The key the same entry had before priorities (read, never written).
fn legacy_due_key(dest: &str, due: Instant, id: u64) -> Vec<u8> {
    let mut k = prefix(dest);
    k.extend_from_slice(&millis(due).to_be_bytes());
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// Both keys an entry may be queued under: today's and the legacy one.
pub(super) fn due_keys(dest: &str, item: &OutboxItem, due: Instant, id: u64) -> [Vec<u8>; 2] {
    [
        due_key(dest, Priority::of(item), due, id),
        legacy_due_key(dest, due, id),
    ]
}

/// `(destination, due, entry id)` of a queue key, today's or legacy.
pub(super) fn parse_due_key(key: &[u8]) -> Option<(String, Instant, u64)> {
    let nul = key.iter().position(|b| *b == 0)?;
    let rest = match &key[nul + 1..] {
        [p, rest @ ..] if rest.len() == 16 && *p <= Priority::Normal as u8 => rest,
        rest if rest.len() == 16 => rest,
        _ => return None,
    };
    let mut ms = [0u8; 8];
    ms.copy_from_slice(&rest[..8]);
    let mut id = [0u8; 8];
    id.copy_from_slice(&rest[8..]);
    let due = chrono::DateTime::from_timestamp_millis(i64::try_from(u64::from_be_bytes(ms)).ok()?)?;
    let dest = String::from_utf8(key[..nul].to_vec()).ok()?;
    Some((dest, due, u64::from_be_bytes(id)))
}

/// Whether `key` is in the legacy (pre-priority) format.
fn is_legacy(key: &[u8]) -> bool {
    key.iter()
        .position(|b| *b == 0)
        .is_some_and(|nul| key.len() - nul - 1 == 16)
}

fn prefix(dest: &str) -> Vec<u8> {
    let mut p = dest.as_bytes().to_vec();
    p.push(0);
    p
}

pub(super) fn entry_id(key: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = key.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

/// An entry in today's format (V1 entries are upgraded when the store opens).
pub(super) fn upgrade(stored: StoredOutbox) -> OutboxV2 {
    match stored {
        StoredOutbox::V1 { item, .. } => OutboxV2 {
            item,
            queued_at: chrono::DateTime::UNIX_EPOCH,
            fanned_out: false,
            dests: BTreeMap::new(),
        },
        StoredOutbox::V2(v) => v,
    }
}

/// Stages a new entry inside the engine's commit: queued, not fanned out.
pub(super) fn stage_new(
    outbox: &View<'_>,
    due: &View<'_>,
    id: u64,
    item: &OutboxItem,
    now: Instant,
) -> Result<(), Abort> {
    let entry = OutboxV2 {
        item: item.clone(),
        queued_at: now,
        fanned_out: false,
        dests: BTreeMap::new(),
    };
    outbox.insert(id.to_be_bytes(), encode(&StoredOutbox::V2(entry)))?;
    due.insert(due_key("", Priority::of(item), now, id), b"")?;
    Ok(())
}

fn read_entry(outbox: &View<'_>, id: u64) -> Result<Option<OutboxV2>, Abort> {
    match outbox.get(id.to_be_bytes())? {
        None => Ok(None),
        Some(bytes) => decode::<StoredOutbox>(&id.to_be_bytes(), &bytes)
            .map(|s| Some(upgrade(s)))
            .map_err(ConflictableTransactionError::Abort),
    }
}

/// Writes an entry back, or removes it once no destination is left.
fn write_entry(outbox: &View<'_>, id: u64, entry: OutboxV2) -> Result<(), Abort> {
    if entry.fanned_out && entry.dests.is_empty() {
        outbox.remove(id.to_be_bytes())?;
    } else {
        outbox.insert(id.to_be_bytes(), encode(&StoredOutbox::V2(entry)))?;
    }
    Ok(())
}

impl Store {
    /// Runs `f` as one atomic change of `requests`, `outbox` and
    /// `outbox_due`, under the writer lock; flushed only when asked.
    async fn outbox_write<T>(
        &self,
        flush: bool,
        f: impl Fn(&View<'_>, &View<'_>, &View<'_>) -> Result<T, Abort>,
    ) -> Result<T, StoreError> {
        let value = self.waiting_for_backend(|| self.outbox_write_now(f))?;
        if flush {
            self.flush_committed().await?;
        }
        Ok(value)
    }

    fn outbox_write_now<T>(
        &self,
        f: impl Fn(&View<'_>, &View<'_>, &View<'_>) -> Result<T, Abort>,
    ) -> Result<T, StoreError> {
        self.writer()?.transact(
            [TreeId::Requests, TreeId::Outbox, TreeId::OutboxDue],
            |[requests, outbox, due]| f(requests, outbox, due),
        )
    }

    /// Outbox entries in order, with the most attempts any destination has
    /// made on them.
    pub fn outbox(&self, limit: usize) -> Result<Vec<(u64, OutboxItem, u32)>, StoreError> {
        let _whole = self.reading();
        let mut out = Vec::new();
        for item in self.tree(TreeId::Outbox).iter().take(limit) {
            let (k, v) = item?;
            let entry = upgrade(decode(&k, &v)?);
            let attempts = entry.dests.values().map(|d| d.attempts).max().unwrap_or(0);
            if let Some(id) = entry_id(&k) {
                out.push((id, entry.item, attempts));
            }
        }
        Ok(out)
    }

    /// How many entries the outbox holds, up to `cap`, and the id of the
    /// first (the oldest): what a metrics scrape shows. Counted from the
    /// keys alone, no entry decoded, so a scrape stays cheap with a large
    /// backlog; a count of `cap` means at least that many.
    pub fn outbox_backlog(&self, cap: usize) -> Result<(usize, Option<u64>), StoreError> {
        let _whole = self.reading();
        let mut count = 0;
        let mut head = None;
        for key in self.tree(TreeId::Outbox).iter().keys().take(cap) {
            let key = key?;
            if head.is_none() {
                head = entry_id(&key);
            }
            count += 1;
        }
        Ok((count, head))
    }

    /// Decides the destinations of up to `limit` new entries (`targets`
    /// names them; none means the entry is done) and queues each there, due
    /// `now`. Returns how many entries were fanned out.
    pub fn outbox_fan_out(
        &self,
        now: Instant,
        limit: usize,
        targets: impl Fn(&OutboxItem) -> Vec<String>,
    ) -> Result<usize, StoreError> {
        self.check_healthy()?;
        let mut plan = Vec::new();
        for item in self.tree(TreeId::OutboxDue).scan_prefix(prefix("")).take(limit) {
            let (k, _) = item?;
            let Some((_, _, id)) = parse_due_key(&k) else {
                continue;
            };
            let Some(bytes) = self.tree(TreeId::Outbox).get(id.to_be_bytes())? else {
                plan.push((k.to_vec(), id, Vec::new()));
                continue;
            };
            let entry = upgrade(decode(&id.to_be_bytes(), &bytes)?);
            let dests: BTreeSet<String> = targets(&entry.item)
                .into_iter()
                .filter(|d| !d.is_empty() && !d.contains('\0'))
                .collect();
            plan.push((k.to_vec(), id, dests.into_iter().collect()));
        }
        if plan.is_empty() {
            return Ok(0);
        }
        self.outbox_write_now(|_, outbox, due| {
            for (key, id, dests) in &plan {
                due.remove(key.as_slice())?;
                let Some(mut entry) = read_entry(outbox, *id)? else {
                    continue;
                };
                if entry.fanned_out {
                    continue;
                }
                entry.fanned_out = true;
                let priority = Priority::of(&entry.item);
                for d in dests {
                    entry.dests.insert(
                        d.clone(),
                        DestV2 {
                            attempts: 0,
                            next_attempt: now,
                            posting: false,
                            last_error: None,
                        },
                    );
                    due.insert(due_key(d, priority, now, *id), b"")?;
                }
                write_entry(outbox, *id, entry)?;
            }
            Ok(())
        })?;
        Ok(plan.len())
    }

    /// Up to `limit` entries due on `dest` at `now`: urgent ones first,
    /// then earliest first.
    pub fn outbox_due(&self, dest: &str, now: Instant, limit: usize) -> Result<Vec<OutboxJob>, StoreError> {
        let _whole = self.reading();
        self.check_healthy()?;
        let mut out = Vec::new();
        for priority in PRIORITIES {
            let start = {
                let mut p = prefix(dest);
                p.push(priority as u8);
                p
            };
            let end = due_key(dest, priority, now, u64::MAX);
            for item in self.tree(TreeId::OutboxDue).range(start..=end) {
                if out.len() >= limit {
                    return Ok(out);
                }
                let (k, _) = item?;
                let Some((_, _, id)) = parse_due_key(&k) else {
                    continue;
                };
                let Some(bytes) = self.tree(TreeId::Outbox).get(id.to_be_bytes())? else {
                    continue;
                };
                let entry = upgrade(decode(&id.to_be_bytes(), &bytes)?);
                if let Some(d) = entry.dests.get(dest) {
                    out.push(OutboxJob {
                        id,
                        item: entry.item.clone(),
                        queued_at: entry.queued_at,
                        attempts: d.attempts,
                        interrupted_post: d.posting,
                        next_attempt: d.next_attempt,
                    });
                }
            }
        }
        Ok(out)
    }

    /// When the earliest entry queued on `dest` is due (`""`: entries not
    /// fanned out yet), whatever its priority.
    pub fn outbox_next_due(&self, dest: &str) -> Result<Option<Instant>, StoreError> {
        let _whole = self.reading();
        let mut next: Option<Instant> = None;
        for priority in PRIORITIES {
            let mut p = prefix(dest);
            p.push(priority as u8);
            if let Some(item) = self.tree(TreeId::OutboxDue).scan_prefix(p).next() {
                let (k, _) = item?;
                if let Some((_, due, _)) = parse_due_key(&k) {
                    next = Some(next.map_or(due, |n| n.min(due)));
                }
            }
        }
        Ok(next)
    }

    /// Destinations that have entries queued (not counting new entries).
    pub fn outbox_destinations(&self) -> Result<BTreeSet<String>, StoreError> {
        let _whole = self.reading();
        let mut out = BTreeSet::new();
        for item in self.tree(TreeId::OutboxDue).iter() {
            let (k, _) = item?;
            if let Some((dest, _, _)) = parse_due_key(&k) {
                if !dest.is_empty() {
                    out.insert(dest);
                }
            }
        }
        Ok(out)
    }

    /// Drops every delivery queued on `dest` (a platform no longer
    /// configured); returns the items it held, for the log.
    pub fn outbox_drop_destination(&self, dest: &str) -> Result<Vec<OutboxItem>, StoreError> {
        let mut keys = Vec::new();
        for item in self.tree(TreeId::OutboxDue).scan_prefix(prefix(dest)) {
            let (k, _) = item?;
            if let Some((_, _, id)) = parse_due_key(&k) {
                keys.push((k.to_vec(), id));
            }
        }
        self.outbox_write_now(|_, outbox, due| {
            let mut dropped = Vec::new();
            for (key, id) in &keys {
                due.remove(key.as_slice())?;
                if let Some(mut entry) = read_entry(outbox, *id)? {
                    if entry.dests.remove(dest).is_some() {
                        dropped.push(entry.item.clone());
                        write_entry(outbox, *id, entry)?;
                    }
                }
            }
            Ok(dropped)
        })
    }

    /// Entry `id` is done on `dest`: delivered, or given up on.
    pub fn outbox_finish(&self, id: u64, dest: &str) -> Result<(), StoreError> {
        self.outbox_write_now(|_, outbox, due| finish(outbox, due, id, dest))
    }

    /// Records a failed attempt of entry `id` on `dest` and when to try
    /// again; `may_have_posted` keeps the mark of a card post whose outcome
    /// is unknown. Returns the attempts made so far.
    pub fn outbox_failed(
        &self,
        id: u64,
        dest: &str,
        next_attempt: Instant,
        error: &str,
        may_have_posted: bool,
    ) -> Result<u32, StoreError> {
        self.outbox_write_now(|_, outbox, due| {
            let Some(mut entry) = read_entry(outbox, id)? else {
                return Ok(0);
            };
            let priority = Priority::of(&entry.item);
            let Some(d) = entry.dests.get_mut(dest) else {
                return Ok(0);
            };
            due.remove(due_key(dest, priority, d.next_attempt, id))?;
            d.attempts += 1;
            d.next_attempt = next_attempt;
            d.posting = d.posting && may_have_posted;
            d.last_error = Some(error.to_string());
            let attempts = d.attempts;
            due.insert(due_key(dest, priority, next_attempt, id), b"")?;
            write_entry(outbox, id, entry)?;
            Ok(attempts)
        })
    }

    /// Marks, durably, that the card of entry `id` is about to be posted on
    /// `dest`, so that a restart before [`Store::outbox_posted`] knows a
    /// copy may already be there.
    pub async fn outbox_start_post(&self, id: u64, dest: &str) -> Result<(), StoreError> {
        self.outbox_write(true, |_, outbox, _| {
            let Some(mut entry) = read_entry(outbox, id)? else {
                return Ok(());
            };
            if let Some(d) = entry.dests.get_mut(dest) {
                d.posting = true;
                write_entry(outbox, id, entry)?;
            }
            Ok(())
        })
        .await
    }

    /// Records where the card of `request` was posted on `dest` and marks
    /// entry `id` done there, in one durable change.
    pub async fn outbox_posted(
        &self,
        id: u64,
        dest: &str,
        request: &RequestId,
        messages: Vec<MessageRef>,
    ) -> Result<(), StoreError> {
        self.outbox_write(true, |requests, outbox, due| {
            if let Some(bytes) = requests.get(request.as_str())? {
                let stored: StoredRequest = decode(request.as_str().as_bytes(), &bytes)
                    .map_err(ConflictableTransactionError::Abort)?;
                let mut rec = RequestRecord::try_from(stored).map_err(|error| {
                    ConflictableTransactionError::Abort(StoreError::Corrupt {
                        key: request.to_string(),
                        error,
                    })
                })?;
                for m in &messages {
                    if !rec.messages.contains(m) {
                        rec.messages.push(m.clone());
                    }
                }
                requests.insert(request.as_str().as_bytes(), encode(&StoredRequest::from(&rec)))?;
            }
            finish(outbox, due, id, dest)
        })
        .await
    }
}

fn finish(outbox: &View<'_>, due: &View<'_>, id: u64, dest: &str) -> Result<(), Abort> {
    let Some(mut entry) = read_entry(outbox, id)? else {
        return Ok(());
    };
    let priority = Priority::of(&entry.item);
    if let Some(d) = entry.dests.remove(dest) {
        due.remove(due_key(dest, priority, d.next_attempt, id))?;
        write_entry(outbox, id, entry)?;
    }
    Ok(())
}

/// Upgrades entries stored before per-destination delivery: each is queued
/// again as new (it may reach a platform that already had it once).
pub(super) fn upgrade_v1(store: &Store) -> Result<usize, StoreError> {
    let mut old = Vec::new();
    for item in store.tree(TreeId::Outbox).iter() {
        let (k, v) = item?;
        if let StoredOutbox::V1 { .. } = decode::<StoredOutbox>(&k, &v)? {
            if let Some(id) = entry_id(&k) {
                old.push((id, upgrade(decode(&k, &v)?)));
            }
        }
    }
    for (id, entry) in &old {
        store
            .writer()?
            .transact([TreeId::Outbox, TreeId::OutboxDue], |[outbox, due]| {
                outbox.insert(id.to_be_bytes(), encode(&StoredOutbox::V2(entry.clone())))?;
                due.insert(due_key("", Priority::of(&entry.item), entry.queued_at, *id), b"")?;
                Ok(())
            })?;
    }
    Ok(old.len())
}

/// Re-keys queue entries written before priorities (`destination 0x00 [due
/// ms] [entry id]`) under today's key, each in one transaction, so a restart
/// on an older store loses nothing and alerts already queued move ahead of
/// user traffic. Returns how many were re-keyed.
pub(super) fn upgrade_due_keys(store: &Store) -> Result<usize, StoreError> {
    let mut old = Vec::new();
    for item in store.tree(TreeId::OutboxDue).iter() {
        let (k, _) = item?;
        if !is_legacy(&k) {
            continue;
        }
        if let Some((dest, at, id)) = parse_due_key(&k) {
            let priority = match store.tree(TreeId::Outbox).get(id.to_be_bytes())? {
                Some(bytes) => Priority::of(&upgrade(decode(&id.to_be_bytes(), &bytes)?).item),
                None => Priority::Normal,
            };
            old.push((k.to_vec(), due_key(&dest, priority, at, id)));
        }
    }
    for (from, to) in &old {
        store.writer()?.transact([TreeId::OutboxDue], |[due]| {
            due.remove(from)?;
            due.insert(to, b"")?;
            Ok(())
        })?;
    }
    Ok(old.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn queue_keys_round_trip_and_sort_by_destination_then_priority_then_due() {
        let t = chrono::Utc.with_ymd_and_hms(2026, 3, 1, 9, 0, 0).unwrap();
        let later = t + chrono::Duration::seconds(1);
        let n = Priority::Normal;
        let k = due_key("slack", n, t, 7);
        assert_eq!(parse_due_key(&k), Some(("slack".to_string(), t, 7)));
        assert_eq!(parse_due_key(&due_key("", n, t, 1)), Some((String::new(), t, 1)));
        assert!(
            due_key("slack", n, t, 9) < due_key("slack", n, later, 1),
            "due order"
        );
        assert!(
            due_key("slack", Priority::Urgent, later, 9) < due_key("slack", n, t, 1),
            "urgent before normal, whatever their due times"
        );
        assert!(
            due_key("", n, later, 1) < due_key("discord", Priority::Urgent, t, 1),
            "new entries first"
        );
        assert!(
            due_key("slack", n, later, 1) < due_key("slackx", Priority::Urgent, t, 1),
            "no prefix overlap"
        );
        assert_eq!(parse_due_key(b"slack"), None);
        // Keys written before priorities still parse.
        let legacy = legacy_due_key("slack", t, 7);
        assert!(is_legacy(&legacy) && !is_legacy(&k));
        assert_eq!(parse_due_key(&legacy), Some(("slack".to_string(), t, 7)));
    }
}
