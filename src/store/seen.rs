//! Replay protection: the `seen` tree remembers platform payload ids
//! (`slack:act:…`, `discord:…`) until the signature window in which the
//! payload could be replayed has passed, across restarts.
//!
//! These writes bypass [`Store::update`] on purpose: they are not domain
//! records and carry no audit; a transaction on the one `seen` tree,
//! under the writer lock like every write (so with PostgreSQL every replica
//! sees the id), is the whole change. They are flushed (group-committed
//! with everything else) before the caller acts.

use super::kv::TreeId;
use super::{Store, StoreError};
use jitbot_core::{Instant, Span};
use std::sync::atomic::Ordering;

/// How long a payload id is kept. Both platforms accept a signed timestamp
/// up to 300 s either side of our clock, so a payload first seen now can be
/// replayed until at most 600 s from now.
pub const REPLAY_WINDOW: Span = Span::from_secs(600);

/// Expired ids are swept once every this many sightings.
const PRUNE_EVERY: u64 = 256;

fn expiry(value: &[u8]) -> i64 {
    value
        .try_into()
        .map(i64::from_be_bytes)
        // An unreadable value is kept until the next sweep rewrites it.
        .unwrap_or(i64::MAX)
}

/// True while a stored expiry (`seen` value) is still ahead of `now`: the
/// id must be kept (and backed up, and restored).
pub(super) fn unexpired(value: &[u8], now: Instant) -> bool {
    expiry(value) > now.timestamp()
}

impl Store {
    /// True the first time `key` is seen (it is then remembered until
    /// `until`); false for a repeat within that time. The record is on disk
    /// before this returns true, so a payload replayed after a restart is
    /// still refused.
    pub async fn first_sighting(&self, key: &str, until: Instant, now: Instant) -> Result<bool, StoreError> {
        let value = until.timestamp().to_be_bytes();
        let first = self.waiting_for_backend(|| {
            self.writer()?.transact([TreeId::Seen], |[seen]| {
                let current = seen.get(key)?;
                if current.as_deref().is_some_and(|v| expiry(v) > now.timestamp()) {
                    return Ok(false);
                }
                seen.insert(key, value)?;
                Ok(true)
            })
        })?;
        if !first {
            return Ok(false);
        }
        if self.inner.seen_count.fetch_add(1, Ordering::Relaxed) % PRUNE_EVERY == PRUNE_EVERY - 1 {
            self.prune_seen(now)?;
        }
        self.flush_committed().await?;
        Ok(true)
    }

    /// Removes ids whose replay window has passed; returns how many.
    pub fn prune_seen(&self, now: Instant) -> Result<usize, StoreError> {
        // Under the writer lock: with PostgreSQL, the mirror is current.
        let writer = self.writer()?;
        let mut expired = Vec::new();
        for item in self.tree(TreeId::Seen).iter() {
            let (key, value) = item?;
            if expiry(&value) <= now.timestamp() {
                expired.push(key);
            }
        }
        if expired.is_empty() {
            return Ok(0);
        }
        writer.transact([TreeId::Seen], |[seen]| {
            let mut removed = 0;
            for key in &expired {
                // Only if still expired: a fresh sighting of the same id stays.
                if seen.get(key)?.is_some_and(|v| expiry(&v) <= now.timestamp()) {
                    seen.remove(key)?;
                    removed += 1;
                }
            }
            Ok(removed)
        })
    }

    /// How many payload ids are remembered (for tests and diagnostics).
    pub fn seen_len(&self) -> usize {
        self.tree(TreeId::Seen).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};

    #[tokio::test]
    async fn a_repeat_is_refused_until_it_expires_and_expired_ids_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8).unwrap();
        let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let until = REPLAY_WINDOW.after(t0);
        assert!(store.first_sighting("slack:act:1", until, t0).await.unwrap());
        assert!(!store.first_sighting("slack:act:1", until, t0).await.unwrap());
        let later = Span::from_secs(599).after(t0);
        assert!(!store
            .first_sighting("slack:act:1", REPLAY_WINDOW.after(later), later)
            .await
            .unwrap());
        assert!(store.first_sighting("slack:act:2", until, t0).await.unwrap());
        let after = REPLAY_WINDOW.after(t0);
        assert_eq!(store.prune_seen(after).unwrap(), 2);
        assert_eq!(store.seen_len(), 0);
        assert!(store
            .first_sighting("slack:act:1", REPLAY_WINDOW.after(after), after)
            .await
            .unwrap());
    }

    #[tokio::test]
    async fn sightings_survive_reopening_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        {
            let store = Store::open(dir.path(), 8).unwrap();
            assert!(store
                .first_sighting("discord:42", REPLAY_WINDOW.after(t0), t0)
                .await
                .unwrap());
        }
        let store = Store::open(dir.path(), 8).unwrap();
        assert!(!store
            .first_sighting("discord:42", REPLAY_WINDOW.after(t0), t0)
            .await
            .unwrap());
    }
}
