//! Write-combining: slapd (back-mdb) rewrites the whole group entry on every
//! modify, so concurrent membership changes to one group are sent together.
//!
//! On a group of ten thousand members each modify costs milliseconds and the
//! modifies of one group run one after the other: revoking thousands of leases
//! at once, one value per modify, is slow. So a change to a group that arrives
//! while a modify of that group is in flight waits in a queue; when the modify
//! finishes, the first caller queued takes everything queued (up to
//! [`MAX_BATCH`] values, [`AD_MAX_BATCH`] on Active Directory) and sends it as
//! one multi-value modify. A change to an
//! idle group goes straight away: nothing ever waits for a timer.
//!
//! A multi-value modify succeeds or fails as a whole: 16 (noSuchAttribute)
//! when one value to delete is absent, 20 (attributeOrValueExists) when one
//! value to add is present, 65 (objectClassViolation) when it would empty a
//! groupOfNames. On any refusal the batch falls back to the one-value path,
//! which handles each of those, so correctness never rests on the batch.

use super::conn::rc;
use super::{dn, LdapDirectory};
use crate::config::MembershipKind;
use crate::ports::DirectoryError;
use jitbot_core::{GroupDn, UserId};
use ldap3::{ldap_escape, Mod};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tokio::sync::oneshot;

/// The most values one modify carries on OpenLDAP and other servers. slapd
/// rewrites the whole entry per modify, so one modify of 2,000 values costs
/// little more than one of 256 (the mass-expiry bench: tens of ms for all
/// 2,000 against 9 modifies of ~222 taking 8–32 ms each); its only limit is
/// the request size (`sockbuf_max_incoming_auth`, 4 MiB by default: some
/// 20,000 values of a DN this long).
pub const MAX_BATCH: usize = 2048;

/// The most values one modify carries on Active Directory: kept at the
/// size checked there, well below `MaxValRange` (1,500 values per read),
/// as a read-back of a batch names every value in one filter.
pub const AD_MAX_BATCH: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Change {
    Add,
    Remove,
}

/// Whether a change found the group already as wanted (an add whose value
/// was present, a remove whose value was absent).
pub type Already = bool;

/// One caller's change to a group.
#[derive(Clone)]
pub struct Item {
    /// Who the value stands for, for messages and logs.
    pub user: UserId,
    /// The value as the group holds it: what the read-back looks for.
    pub value: String,
    /// The value as written; differs from `value` only for AD TTL adds.
    pub written: String,
}

/// A change and a group's normalized DN: one queue each.
type Key = (Change, String);
type Queues = Arc<Mutex<HashMap<Key, VecDeque<Waiting>>>>;

/// A caller waiting behind the modify in flight.
struct Waiting {
    item: Item,
    reply: oneshot::Sender<Turn>,
    /// When it queued: its wait for a batch is measured from here.
    since: std::time::Instant,
}

/// What a waiting caller is told.
enum Turn {
    /// The modify in flight is done: send the queue's changes.
    Lead(Leader),
    /// A leader sent this caller's change; here is how it went.
    Done(Result<Already, DirectoryError>),
}

/// The groups with a modify in flight (a key is present while one is), and
/// the callers queued behind each.
#[derive(Default)]
pub struct Combiner {
    queues: Queues,
}

fn lock(queues: &Queues) -> MutexGuard<'_, HashMap<Key, VecDeque<Waiting>>> {
    // The lock is never held across a panic-prone call; a poisoned map is
    // still consistent.
    queues.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The right to send a group's next modify. Dropping it (done, or the caller
/// was cancelled) hands it to the next queued caller, or marks the group idle.
struct Leader {
    queues: Option<Queues>,
    key: Key,
}

impl Leader {
    fn disarm(mut self) {
        self.queues = None;
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        let Some(queues) = self.queues.take() else {
            return;
        };
        loop {
            let next = {
                let mut map = lock(&queues);
                match map.get_mut(&self.key).and_then(VecDeque::pop_front) {
                    Some(next) => next,
                    None => {
                        map.remove(&self.key);
                        return;
                    }
                }
            };
            // Sent outside the lock: a refused baton is disarmed here, and
            // one dropped unread by a cancelled caller hands itself on.
            let baton = Leader {
                queues: Some(queues.clone()),
                key: self.key.clone(),
            };
            match next.reply.send(Turn::Lead(baton)) {
                Ok(()) => return,
                Err(Turn::Lead(baton)) => baton.disarm(),
                Err(Turn::Done(_)) => return,
            }
        }
    }
}

impl Combiner {
    /// Leads at once on an idle group; otherwise queues `item` and returns
    /// where the answer will come.
    fn join(&self, key: &Key, item: &Item) -> Result<Leader, oneshot::Receiver<Turn>> {
        let mut map = lock(&self.queues);
        match map.get_mut(key) {
            None => {
                map.insert(key.clone(), VecDeque::new());
                Ok(Leader {
                    queues: Some(self.queues.clone()),
                    key: key.clone(),
                })
            }
            Some(queue) => {
                let (reply, answer) = oneshot::channel();
                queue.push_back(Waiting {
                    item: item.clone(),
                    reply,
                    since: std::time::Instant::now(),
                });
                Err(answer)
            }
        }
    }

    /// Up to `max - 1` queued callers, for the leader to send with its own.
    fn take(&self, key: &Key, max: usize) -> Vec<Waiting> {
        let mut map = lock(&self.queues);
        match map.get_mut(key) {
            Some(queue) => {
                let n = queue.len().min(max.max(1) - 1);
                queue.drain(..n).collect()
            }
            None => Vec::new(),
        }
    }
}

impl LdapDirectory {
    /// Applies one caller's change, combined with the changes other callers
    /// make to the same group meanwhile. The result is this caller's own.
    pub(super) async fn combined(
        &self,
        change: Change,
        group: &GroupDn,
        kind: MembershipKind,
        item: Item,
    ) -> Result<Already, DirectoryError> {
        let key = (change, dn::normalize(group.as_str()));
        let arrived = std::time::Instant::now();
        // Set when a leader that held our change was cancelled: its modify
        // may have reached the server, so "already there" is no news.
        let mut maybe_sent = false;
        let leader = loop {
            match self.combiner.join(&key, &item) {
                Ok(leader) => break leader,
                Err(answer) => match answer.await {
                    Ok(Turn::Done(result)) => return result,
                    Ok(Turn::Lead(leader)) => break leader,
                    // The leader holding our change was cancelled before it
                    // answered: queue again (every change is idempotent).
                    Err(_) => {
                        maybe_sent = true;
                        continue;
                    }
                },
            }
        };
        let others = self.combiner.take(&key, self.max_batch());
        if change == Change::Remove {
            crate::metrics::stage("batch_wait", arrived.elapsed());
            for waiting in &others {
                crate::metrics::stage("batch_wait", waiting.since.elapsed());
            }
        }
        let items: Vec<&Item> = std::iter::once(&item)
            .chain(others.iter().map(|w| &w.item))
            .collect();
        if items.len() > 1 {
            tracing::debug!(group = %group, change = ?change, values = items.len(), "combined membership modify");
        }
        let mut results = self.apply(change, group, kind, &items, leader).await.into_iter();
        let own = results.next();
        for (waiting, result) in others.into_iter().zip(results) {
            // A caller that went away needs no answer.
            let _ = waiting.reply.send(Turn::Done(result));
        }
        own.unwrap_or_else(|| Err(DirectoryError::Refused("combined modify gave no result".into())))
            .map(|already| already && !maybe_sent)
    }

    /// The most values one modify of this directory carries.
    fn max_batch(&self) -> usize {
        if self.active_directory {
            AD_MAX_BATCH
        } else {
            MAX_BATCH
        }
    }

    /// Sends `items` as one modify and reads them back; one result per item,
    /// in order. The group's next modify may start once this one is done
    /// (`leader` is dropped then), while this batch is being read back.
    async fn apply(
        &self,
        change: Change,
        group: &GroupDn,
        kind: MembershipKind,
        items: &[&Item],
        leader: Leader,
    ) -> Vec<Result<Already, DirectoryError>> {
        let attr = super::attribute(kind);
        let label = match change {
            Change::Add => "add",
            Change::Remove => "remove",
        };
        crate::metrics::directory_batch(label, items.len());
        if let [one] = items {
            return vec![self.apply_one(change, group, kind, one, false).await];
        }
        let values: HashSet<String> = items.iter().map(|i| i.written.clone()).collect();
        let modification = match change {
            Change::Add => Mod::Add(attr.to_string(), values),
            Change::Remove => Mod::Delete(attr.to_string(), values),
        };
        let every = |e: DirectoryError| items.iter().map(|_| Err(e.clone())).collect();
        let modifying = std::time::Instant::now();
        let sent = self.modify_tracked(group.as_str(), vec![modification]).await;
        if change == Change::Remove {
            for _ in items {
                crate::metrics::stage("directory_modify", modifying.elapsed());
            }
        }
        let (result, resent) = match sent {
            Ok(sent) => sent,
            // Unreachable or timed out: each change alone would fail the same
            // way, and trying them one by one would wait once per value.
            Err(e) => return every(e),
        };
        // 32 is a missing group, or (on AD) one value naming no entry: the
        // values one at a time say which.
        if result.rc == rc::NO_SUCH_OBJECT {
            match self.group_exists(group).await {
                Ok(true) => {}
                Ok(false) => return every(DirectoryError::NoSuchGroup(group.to_string())),
                Err(e) => return every(e),
            }
        }
        match result.rc {
            rc::SUCCESS => {}
            code => {
                tracing::debug!(group = %group, change = ?change, values = items.len(), code, "combined modify refused; one value at a time");
                let mut results = Vec::with_capacity(items.len());
                // A batch sent twice may have landed the first time, so
                // "already there" below is then no news of someone else.
                for item in items {
                    results.push(self.apply_one(change, group, kind, item, resent).await);
                }
                return results;
            }
        }
        drop(leader);
        let reading = std::time::Instant::now();
        let read = self.read_back(change, group, attr, items).await;
        if change == Change::Remove {
            for _ in items {
                crate::metrics::stage("read_back", reading.elapsed());
            }
        }
        let done = match read {
            Ok(done) => done,
            Err(e) => return every(e),
        };
        let mut results = Vec::with_capacity(items.len());
        for item in items {
            let result = if done {
                Ok(false)
            } else {
                self.check_one(change, group, attr, item).await.map(|()| false)
            };
            if result.is_ok() {
                log_done(change, group, &item.user);
            }
            results.push(result);
        }
        results
    }

    async fn apply_one(
        &self,
        change: Change,
        group: &GroupDn,
        kind: MembershipKind,
        item: &Item,
        resent: bool,
    ) -> Result<Already, DirectoryError> {
        let attr = super::attribute(kind);
        let already = match change {
            Change::Add => {
                self.add_one(group, &item.user, attr, &item.value, &item.written)
                    .await?
                    && !resent
            }
            Change::Remove => {
                self.remove_one(group, &item.user, kind, attr, &item.value)
                    .await?;
                false
            }
        };
        log_done(change, group, &item.user);
        Ok(already)
    }

    /// One base search for the whole batch: whether every value was added
    /// (all present) or removed (none present).
    async fn read_back(
        &self,
        change: Change,
        group: &GroupDn,
        attr: &str,
        items: &[&Item],
    ) -> Result<bool, DirectoryError> {
        let terms: String = items
            .iter()
            .map(|i| format!("({attr}={})", ldap_escape(&i.value)))
            .collect();
        match change {
            Change::Add => self.matches(group, &format!("(&{terms})")).await,
            Change::Remove => Ok(!self.matches(group, &format!("(|{terms})")).await?),
        }
    }

    /// After a read-back that did not confirm the whole batch: this value's own check.
    async fn check_one(
        &self,
        change: Change,
        group: &GroupDn,
        attr: &str,
        item: &Item,
    ) -> Result<(), DirectoryError> {
        let present = self.has_value(group, attr, &item.value).await?;
        match (change, present) {
            (Change::Add, true) | (Change::Remove, false) => Ok(()),
            (Change::Add, false) => Err(super::not_added(group, &item.user)),
            (Change::Remove, true) => Err(super::not_removed(group, &item.user)),
        }
    }
}

fn log_done(change: Change, group: &GroupDn, user: &UserId) {
    match change {
        Change::Add => tracing::info!(group = %group, user = %user, "directory membership added"),
        Change::Remove => tracing::info!(group = %group, user = %user, "directory membership removed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item() -> Item {
        Item {
            user: UserId::new("alice"),
            value: "uid=alice".into(),
            written: "uid=alice".into(),
        }
    }

    fn key() -> Key {
        (Change::Remove, "cn=g".into())
    }

    fn idle(combiner: &Combiner) -> bool {
        lock(&combiner.queues).is_empty()
    }

    #[test]
    fn the_first_caller_leads_at_once_and_the_group_goes_idle_after() {
        let combiner = Combiner::default();
        let leader = combiner.join(&key(), &item()).ok().expect("leads");
        assert!(combiner.take(&key(), MAX_BATCH).is_empty());
        drop(leader);
        assert!(idle(&combiner));
        // Another change kind on the same group has its own queue.
        let remove = combiner.join(&key(), &item()).ok().expect("leads");
        let add = combiner.join(&(Change::Add, "cn=g".into()), &item());
        assert!(add.is_ok());
        drop(remove);
    }

    #[test]
    fn the_lead_passes_over_cancelled_callers() {
        let combiner = Combiner::default();
        let leader = combiner.join(&key(), &item()).ok().expect("leads");
        let gone = combiner.join(&key(), &item()).err().expect("queued");
        let mut next = combiner.join(&key(), &item()).err().expect("queued");
        drop(gone);
        drop(leader);
        let Ok(Turn::Lead(leader)) = next.try_recv() else {
            panic!("the next live caller leads");
        };
        drop(leader);
        assert!(idle(&combiner));
    }

    #[test]
    fn a_lead_dropped_unread_passes_on() {
        let combiner = Combiner::default();
        let leader = combiner.join(&key(), &item()).ok().expect("leads");
        let first = combiner.join(&key(), &item()).err().expect("queued");
        let mut second = combiner.join(&key(), &item()).err().expect("queued");
        drop(leader);
        // `first` is told to lead but is cancelled before it reads that.
        drop(first);
        let Ok(Turn::Lead(leader)) = second.try_recv() else {
            panic!("the lead reached the second caller");
        };
        let mut queued: Vec<_> = (0..MAX_BATCH + 5)
            .map(|_| combiner.join(&key(), &item()).err().expect("queued"))
            .collect();
        assert_eq!(
            combiner.take(&key(), MAX_BATCH).len(),
            MAX_BATCH - 1,
            "batches are capped"
        );
        drop(leader);
        assert!(matches!(queued[MAX_BATCH - 1].try_recv(), Ok(Turn::Lead(_))));
        // A leader that took callers and was cancelled drops their senders:
        // they see it and queue again.
        assert!(queued[0].try_recv().is_err());
    }
}
