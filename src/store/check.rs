//! Cross-tree consistency of a point-in-time copy of the store: what a
//! restore checks before it writes anything, and what a backup checks of
//! the copy it took.

use super::archive::{parse_base, AUDIT_BASE};
use super::audit::{audit_chain, Keyed};
use super::outbox::{due_keys, entry_id, parse_due_key, upgrade};
use super::records::{StoredLease, StoredOutbox, StoredRequest};
use super::timers::{index_key, parse_key, TimerKind};
use super::{live_key, AuditCheck, LeaseRecord, RequestRecord, StoreError};
use super::{AUDIT_HEAD, NEXT_ID, NEXT_OUTBOX};
use jitbot_core::LeaseState;
use std::collections::BTreeMap;

/// Every tree of a store, read in one go.
#[derive(Default)]
pub(super) struct Snapshot {
    pub(super) trees: BTreeMap<&'static str, BTreeMap<Vec<u8>, Vec<u8>>>,
}

impl Snapshot {
    pub(super) fn tree(&self, name: &str) -> &BTreeMap<Vec<u8>, Vec<u8>> {
        static EMPTY: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        self.trees.get(name).unwrap_or(&EMPTY)
    }
}

/// How many problems are spelled out; the rest are counted.
const SHOWN: usize = 10;

#[derive(Default)]
struct Problems {
    shown: Vec<String>,
    more: usize,
}

impl Problems {
    fn add(&mut self, problem: String) {
        if self.shown.len() < SHOWN {
            self.shown.push(problem);
        } else {
            self.more += 1;
        }
    }
}

/// The problems of `snap` worded for an operator, at most [`SHOWN`] of them
/// followed by a count of the rest; empty when the trees agree.
pub(super) fn problems(snap: &Snapshot) -> Vec<String> {
    let mut p = Problems::default();
    let requests = requests(snap, &mut p);
    let leases = leases(snap, &mut p);
    timers(snap, &leases, &mut p);
    live(snap, &leases, &mut p);
    audit(snap, &mut p);
    for id in snap.tree("review").keys() {
        let id = String::from_utf8_lossy(id);
        if !requests.contains_key(id.as_ref()) {
            p.add(format!(
                "the break-glass review list names request {id}, which does not exist"
            ));
        }
    }
    counters(snap, &requests, &leases, &mut p);
    outbox(snap, &mut p);
    let mut out = p.shown;
    if p.more > 0 {
        out.push(format!("and {} more problems", p.more));
    }
    out
}

fn requests(snap: &Snapshot, p: &mut Problems) -> BTreeMap<String, RequestRecord> {
    let mut out = BTreeMap::new();
    for (k, v) in snap.tree("requests") {
        let key = String::from_utf8_lossy(k).into_owned();
        match serde_json::from_slice::<StoredRequest>(v)
            .map_err(|e| e.to_string())
            .and_then(RequestRecord::try_from)
        {
            Ok(rec) if rec.request.id.as_str() == key => {
                out.insert(key, rec);
            }
            Ok(rec) => p.add(format!(
                "request {key} is stored under the id of request {}",
                rec.request.id
            )),
            Err(e) => p.add(format!("request {key} is unreadable: {e}")),
        }
    }
    out
}

fn leases(snap: &Snapshot, p: &mut Problems) -> BTreeMap<String, LeaseRecord> {
    let mut out = BTreeMap::new();
    for (k, v) in snap.tree("leases") {
        let key = String::from_utf8_lossy(k).into_owned();
        match serde_json::from_slice::<StoredLease>(v)
            .map_err(|e| e.to_string())
            .and_then(LeaseRecord::try_from)
        {
            Ok(rec) if rec.lease.id.as_str() == key => {
                out.insert(key, rec);
            }
            Ok(rec) => p.add(format!(
                "lease {key} is stored under the id of lease {}",
                rec.lease.id
            )),
            Err(e) => p.add(format!("lease {key} is unreadable: {e}")),
        }
    }
    out
}

fn timers(snap: &Snapshot, leases: &BTreeMap<String, LeaseRecord>, p: &mut Problems) {
    let timers = snap.tree("timers");
    let index = snap.tree("timer_ix");
    for key in timers.keys() {
        let Some(t) = parse_key(key) else {
            p.add(format!(
                "the timers tree holds a malformed key {}",
                hex::encode(key)
            ));
            continue;
        };
        if index.get(&index_key(t.kind, &t.id)) != Some(key) {
            p.add(format!(
                "the {:?} timer of {} (due {}) is not the one timer_ix points to: it would fire on its own",
                t.kind, t.id, t.due
            ));
        }
    }
    for (ix, key) in index {
        match parse_key(key) {
            Some(t) if index_key(t.kind, &t.id) == *ix => {
                if !timers.contains_key(key) {
                    p.add(format!(
                        "timer_ix points the {:?} timer of {} at {}, which is not in the timers tree",
                        t.kind, t.id, t.due
                    ));
                }
            }
            _ => p.add(format!(
                "timer_ix entry {} points at a timer key of another kind or id",
                hex::encode(ix)
            )),
        }
    }
    for (id, rec) in leases {
        let needed = match rec.lease.state {
            LeaseState::Granting => TimerKind::Grant,
            LeaseState::Revoking => TimerKind::Revoke,
            _ => continue,
        };
        if !index.contains_key(&index_key(needed, id)) {
            p.add(format!(
                "lease {id} is {:?} but has no {needed:?} timer, so nothing would ever finish it",
                rec.lease.state
            ));
        }
    }
}

fn live(snap: &Snapshot, leases: &BTreeMap<String, LeaseRecord>, p: &mut Problems) {
    let live = snap.tree("live");
    for (k, v) in live {
        let slot = String::from_utf8_lossy(k).replace('\0', "/");
        let id = String::from_utf8_lossy(v).into_owned();
        match leases.get(&id) {
            None => p.add(format!(
                "the live index points {slot} at lease {id}, which does not exist"
            )),
            Some(rec) if rec.lease.state == LeaseState::Ended => p.add(format!(
                "the live index points {slot} at lease {id}, which has ended"
            )),
            Some(rec) if live_key(&rec.lease.group, &rec.lease.user) != *k => p.add(format!(
                "the live index points {slot} at lease {id}, which is for {}/{}",
                rec.lease.group, rec.lease.user
            )),
            Some(_) => {}
        }
    }
    for (id, rec) in leases {
        let l = &rec.lease;
        if l.state != LeaseState::Ended
            && live.get(&live_key(&l.group, &l.user)) != Some(&id.as_bytes().to_vec())
        {
            p.add(format!(
                "lease {id} ({} for {}) has not ended but the live index does not point to it",
                l.group, l.user
            ));
        }
    }
}

fn audit(snap: &Snapshot, p: &mut Problems) {
    let head = snap.tree("meta").get(AUDIT_HEAD).map(Vec::as_slice);
    let records = snap.tree("audit").iter().map(Ok::<_, StoreError>);
    // Records archived by retention are not in the copy: the chain starts
    // after the last of them.
    let base = match parse_base(snap.tree("meta").get(AUDIT_BASE).map(Vec::as_slice)) {
        Ok(base) => base,
        Err(e) => return p.add(format!("the audit trail cannot be read: {e}")),
    };
    // A backup is checked without the `[audit] key`: keyed links are taken
    // as written here; `jitbot audit verify` checks them once restored.
    match audit_chain(&base, records, head, Keyed::Trusted, None) {
        Ok(AuditCheck::Intact { .. }) => {}
        Ok(AuditCheck::Broken { seq, problem }) => p.add(format!(
            "the audit chain does not verify at record {seq}: {problem}"
        )),
        Err(e) => p.add(format!("the audit trail cannot be read: {e}")),
    }
}

fn counter(snap: &Snapshot, key: &[u8]) -> u64 {
    match snap.tree("meta").get(key) {
        Some(v) => <[u8; 8]>::try_from(v.as_slice())
            .map(u64::from_be_bytes)
            .unwrap_or(0),
        None => 1,
    }
}

fn counters(
    snap: &Snapshot,
    requests: &BTreeMap<String, RequestRecord>,
    leases: &BTreeMap<String, LeaseRecord>,
    p: &mut Problems,
) {
    let next_id = counter(snap, NEXT_ID);
    let used = requests
        .keys()
        .chain(leases.keys())
        .filter_map(|id| id.rsplit_once('-').and_then(|(_, n)| n.parse::<u64>().ok()))
        .max();
    if let Some(max) = used.filter(|max| *max >= next_id) {
        p.add(format!(
            "the id counter is at {next_id} but id {max} is already used: new requests would overwrite old ones"
        ));
    }
    let next_outbox = counter(snap, NEXT_OUTBOX);
    let used = snap.tree("outbox").keys().filter_map(|k| entry_id(k)).max();
    if let Some(max) = used.filter(|max| *max >= next_outbox) {
        p.add(format!(
            "the outbox counter is at {next_outbox} but entry {max} exists: new notices would overwrite it"
        ));
    }
}

fn outbox(snap: &Snapshot, p: &mut Problems) {
    let queue = snap.tree("outbox_due");
    let mut entries = BTreeMap::new();
    for (k, v) in snap.tree("outbox") {
        let Some(id) = entry_id(k) else {
            p.add(format!("the outbox holds a malformed key {}", hex::encode(k)));
            continue;
        };
        let stored = match serde_json::from_slice::<StoredOutbox>(v) {
            Ok(s) => s,
            Err(e) => {
                p.add(format!("outbox entry {id} is unreadable: {e}"));
                continue;
            }
        };
        // Entries from before per-destination delivery carry no queue keys;
        // opening the store queues them.
        if let StoredOutbox::V1 { .. } = stored {
            continue;
        }
        let entry = upgrade(stored);
        let queued = |dest: &str, due| {
            due_keys(dest, &entry.item, due, id)
                .iter()
                .any(|k| queue.contains_key(k))
        };
        if !entry.fanned_out && !queued("", entry.queued_at) {
            p.add(format!(
                "outbox entry {id} is new but not queued: it would never be delivered"
            ));
        }
        for (dest, d) in &entry.dests {
            if !queued(dest, d.next_attempt) {
                p.add(format!(
                    "outbox entry {id} is not queued on {dest}: it would never be delivered there"
                ));
            }
        }
        entries.insert(id, entry);
    }
    for key in queue.keys() {
        let Some((dest, due, id)) = parse_due_key(key) else {
            p.add(format!(
                "the outbox queue holds a malformed key {}",
                hex::encode(key)
            ));
            continue;
        };
        let agrees = entries.get(&id).is_some_and(|e| {
            if dest.is_empty() {
                !e.fanned_out && due_keys("", &e.item, e.queued_at, id).contains(key)
            } else {
                e.dests
                    .get(&dest)
                    .is_some_and(|d| due_keys(&dest, &e.item, d.next_attempt, id).contains(key))
            }
        });
        if !agrees {
            let on = if dest.is_empty() {
                "new entries"
            } else {
                dest.as_str()
            };
            p.add(format!(
                "the outbox queue of {on} holds entry {id} (due {due}), which the outbox does not hold there"
            ));
        }
    }
}
