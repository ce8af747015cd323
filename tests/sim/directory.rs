//! The simulator's directory: a thin forwarder to [`MemoryDirectory`] that
//! parks every call until the simulator releases it with an outcome, so that
//! several engine operations are in flight at once and the seed picks the
//! interleaving.

use async_trait::async_trait;
use jitbot::directory::memory::MemoryDirectory;
use jitbot::ports::{Added, Directory, DirectoryError, GroupMember, Membership};
use jitbot_core::{GroupDn, UserId};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// What a released call does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Forwarded to the directory; its answer comes back.
    Ok,
    /// Not forwarded: the server could not be reached.
    Unavailable,
    /// Forwarded, but the answer was lost (a timeout after the server
    /// applied the change): the caller sees `Unavailable`.
    AppliedButLost,
    /// Not forwarded: the server refused (rc 65 on the last member, rights).
    Refused,
    /// An add held on the wire: the caller sees `Unavailable` now, and the
    /// add reaches the directory later, before the simulated clock moves
    /// on (`World::land`), so within any settle delay. Other calls: as
    /// `Unavailable`.
    Late,
}

/// A call waiting for the simulator.
pub struct Parked {
    pub what: String,
    release: oneshot::Sender<Outcome>,
}

impl Parked {
    pub fn release(self, outcome: Outcome) {
        // The call's task may have been aborted (a crash): nothing to wake.
        let _ = self.release.send(outcome);
    }
}

/// Shared between the wrapper and the simulator.
#[derive(Default)]
pub struct Gate {
    pub parked: Mutex<Vec<Parked>>,
}

impl Gate {
    pub fn parked_len(&self) -> usize {
        self.parked.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
    pub fn take(&self, pick: usize) -> Option<Parked> {
        let mut parked = self.parked.lock().unwrap_or_else(|p| p.into_inner());
        if parked.is_empty() {
            return None;
        }
        let i = pick % parked.len();
        Some(parked.remove(i))
    }
    pub fn describe(&self) -> Vec<String> {
        let parked = self.parked.lock().unwrap_or_else(|p| p.into_inner());
        parked.iter().map(|p| p.what.clone()).collect()
    }
}

pub struct SimDirectory {
    pub inner: Arc<MemoryDirectory>,
    pub gate: Arc<Gate>,
    /// Adds released `Late`, still on the wire (they survive a crash).
    pub on_the_wire: Arc<Mutex<Vec<Membership>>>,
}

impl SimDirectory {
    /// Parks until released; `Err` when the outcome fails the call before it
    /// reaches the directory.
    async fn park(&self, what: String) -> Result<Outcome, DirectoryError> {
        let (tx, rx) = oneshot::channel();
        self.gate
            .parked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Parked {
                what: what.clone(),
                release: tx,
            });
        match rx.await {
            Ok(Outcome::Unavailable) | Err(_) => {
                Err(DirectoryError::Unavailable(format!("sim: {what} unreachable")))
            }
            Ok(Outcome::Refused) => Err(DirectoryError::Refused(format!("sim: {what} refused"))),
            Ok(outcome) => Ok(outcome),
        }
    }

    fn lost<T>(outcome: Outcome, result: Result<T, DirectoryError>) -> Result<T, DirectoryError> {
        match (outcome, result) {
            (Outcome::AppliedButLost, Ok(_)) => Err(DirectoryError::Unavailable("sim: answer lost".into())),
            (Outcome::Late, _) => Err(DirectoryError::Unavailable("sim: no answer".into())),
            (_, result) => result,
        }
    }
}

#[async_trait]
impl Directory for SimDirectory {
    async fn find_user(&self, attribute: &str, value: &str) -> Result<Option<UserId>, DirectoryError> {
        let o = self.park(format!("find_user {attribute}={value}")).await?;
        Self::lost(o, self.inner.find_user(attribute, value).await)
    }
    async fn membership_of(&self, group: &GroupDn, user: &UserId) -> Result<Membership, DirectoryError> {
        let o = self.park(format!("membership_of {user} {group}")).await?;
        Self::lost(o, self.inner.membership_of(group, user).await)
    }
    async fn has_membership(&self, m: &Membership) -> Result<bool, DirectoryError> {
        let o = self
            .park(format!("has_membership {} {}", m.value, m.group))
            .await?;
        Self::lost(o, self.inner.has_membership(m).await)
    }
    async fn add_membership(&self, m: &Membership) -> Result<Added, DirectoryError> {
        let o = self
            .park(format!("add_membership {} {}", m.value, m.group))
            .await?;
        if o == Outcome::Late {
            self.on_the_wire
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(m.clone());
            return Err(DirectoryError::Unavailable("sim: add held on the wire".into()));
        }
        Self::lost(o, self.inner.add_membership(m).await)
    }
    async fn remove_membership(&self, m: &Membership) -> Result<(), DirectoryError> {
        let o = self
            .park(format!("remove_membership {} {}", m.value, m.group))
            .await?;
        Self::lost(o, self.inner.remove_membership(m).await)
    }
    async fn members(&self, group: &GroupDn) -> Result<Vec<GroupMember>, DirectoryError> {
        let o = self.park(format!("members {group}")).await?;
        Self::lost(o, Directory::members(self.inner.as_ref(), group).await)
    }
    async fn groups_of(
        &self,
        user: &UserId,
        among: &BTreeSet<GroupDn>,
    ) -> Result<BTreeSet<GroupDn>, DirectoryError> {
        let o = self.park(format!("groups_of {user}")).await?;
        Self::lost(o, self.inner.groups_of(user, among).await)
    }
    async fn ping(&self) -> Result<(), DirectoryError> {
        self.inner.ping().await
    }
}
