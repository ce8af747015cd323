//! Leadership among replicas on PostgreSQL: one row, `jitbot_leader`,
//! holds the leader's name, its fencing token (one more every new term)
//! and when its term expires by the database's clock. The leader renews
//! it; any replica takes it once it has expired. While this replica leads,
//! its store is fenced: every commit checks, in the same PostgreSQL
//! transaction, that the token still holds ([`StoreError::Deposed`]
//! otherwise). With sled there is one process and it always leads.

use super::kv::Backend;
use super::{Store, StoreError};
use std::sync::atomic::Ordering;
use std::time::Duration;

impl Store {
    /// Takes the leadership for `holder` (free or expired), or renews it
    /// (held by `holder`), for `ttl`; the fencing token of the term, or
    /// `None` while another replica leads. Blocks on the database. With
    /// sled, always leads (token 1).
    pub fn lead(&self, holder: &str, ttl: Duration) -> Result<Option<i64>, StoreError> {
        self.check_healthy()?;
        match &self.inner.backend {
            Backend::Sled => Ok(Some(1)),
            Backend::Postgres(replica) => {
                // The connection serves one thing at a time: wait for an
                // open transaction to end rather than fail the renewal.
                let _lock = self.inner.writer.lock().unwrap_or_else(|p| p.into_inner());
                replica.lead(holder, ttl)
            }
        }
    }

    /// Gives up the term `token` of `holder` (at shutdown), so another
    /// replica takes over without waiting for it to expire.
    pub fn resign(&self, holder: &str, token: i64) -> Result<(), StoreError> {
        match &self.inner.backend {
            Backend::Sled => Ok(()),
            Backend::Postgres(replica) => {
                let _lock = self.inner.writer.lock().unwrap_or_else(|p| p.into_inner());
                replica.resign(holder, token)
            }
        }
    }

    /// Fences every commit of this store with the leader's token (`None`:
    /// commits are not fenced, as on a follower).
    pub fn set_fence(&self, token: Option<i64>) {
        self.inner.fence.store(token.unwrap_or(0), Ordering::SeqCst);
    }

    /// The token commits are fenced with, if any.
    pub fn fence(&self) -> Option<i64> {
        match self.inner.fence.load(Ordering::SeqCst) {
            0 => None,
            token => Some(token),
        }
    }
}
