//! Replay protection: the `seen` tree remembers platform payload ids
//! (`slack:act:…`, `discord:…`) until the signature window in which the
//! payload could be replayed has passed, across restarts.
//!
//! These writes bypass [`Store::update`] on purpose: they are not domain
//! records, carry no audit and need no cross-tree atomicity; a sled
//! compare-and-swap on one key is the whole transaction. They are flushed
//! (group-committed with everything else) before the caller acts.

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
        self.check_healthy()?;
        let tree = &self.inner.seen;
        let value = until.timestamp().to_be_bytes();
        loop {
            let current = tree.get(key)?;
            if current.as_deref().is_some_and(|v| expiry(v) > now.timestamp()) {
                return Ok(false);
            }
            match tree.compare_and_swap(key, current, Some(&value[..]))? {
                Ok(()) => break,
                // Someone else wrote this key meanwhile: look again.
                Err(_) => continue,
            }
        }
        if self.inner.seen_count.fetch_add(1, Ordering::Relaxed) % PRUNE_EVERY == PRUNE_EVERY - 1 {
            self.prune_seen(now)?;
        }
        self.inner.committed.fetch_add(1, Ordering::SeqCst);
        self.flush_committed().await?;
        Ok(true)
    }

    /// Removes ids whose replay window has passed; returns how many.
    pub fn prune_seen(&self, now: Instant) -> Result<usize, StoreError> {
        let mut removed = 0;
        for item in self.inner.seen.iter() {
            let (key, value) = item?;
            if expiry(&value) <= now.timestamp() {
                // Only if unchanged: a fresh sighting of the same id stays.
                if self
                    .inner
                    .seen
                    .compare_and_swap(&key, Some(&value), None::<&[u8]>)?
                    .is_ok()
                {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// How many payload ids are remembered (for tests and diagnostics).
    pub fn seen_len(&self) -> usize {
        self.inner.seen.len()
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
