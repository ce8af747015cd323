//! What `jitbot run`'s start-up remembers between starts, in `meta`, so
//! that a restart with 1,000,000 live leases does not read every one of
//! them: whether the adoption of leases from an older release is done
//! (`legacy_adopted`), and each group's DN under which all of its live
//! leases were last found recorded (`group_dn\0<group>`).
//!
//! Both are written only while the store holds lease records: a store
//! `jitbot restore` may still fill (no requests, leases or audit records)
//! never carries one, since a restore keeps the target's `meta` keys the
//! backup does not have, and a backup from an older release must be
//! adopted and checked in full.

use super::kv::TreeId;
use super::{LeaseRecord, Store, StoreError};
use jitbot_core::{GroupName, LeaseId};

/// `meta` key written once no live lease lacks the membership a grant
/// records (see `Engine::adopt_legacy_leases`).
const LEGACY_ADOPTED: &[u8] = b"legacy_adopted";
/// `meta` key prefix of a group's checked DN (followed by the group name).
const GROUP_DN: &[u8] = b"group_dn\0";

fn group_dn_key(group: &GroupName) -> Vec<u8> {
    let mut k = GROUP_DN.to_vec();
    k.extend_from_slice(group.as_str().as_bytes());
    k
}

impl Store {
    /// Whether the adoption of leases from an older release has been done
    /// for this store (and so never needs to run again).
    pub fn legacy_adopted(&self) -> Result<bool, StoreError> {
        Ok(self.tree(TreeId::Meta).get(LEGACY_ADOPTED)?.is_some())
    }

    /// Records that no live lease is left to adopt. Does nothing on a
    /// store without lease records (see the module's documentation).
    pub fn mark_legacy_adopted(&self) -> Result<(), StoreError> {
        if self.tree(TreeId::Leases).is_empty() {
            return Ok(());
        }
        self.writer()?.transact([TreeId::Meta], |[meta]| {
            meta.insert(LEGACY_ADOPTED, b"1")?;
            Ok(())
        })
    }

    /// The DN under which every live lease of `group` was last found
    /// recorded, if it was (a start-up wrote it with
    /// [`Store::set_group_dn_checked`]).
    pub fn group_dn_checked(&self, group: &GroupName) -> Result<Option<String>, StoreError> {
        Ok(self
            .tree(TreeId::Meta)
            .get(group_dn_key(group))?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Records (`Some`) that every live lease of `group` is recorded under
    /// `dn`, or forgets (`None`) that it was, when some lease is not.
    /// Writes nothing when the record is already so. On a store without
    /// lease records (see the module's documentation; retention can empty
    /// a store that had markers) a new `dn` is not recorded, and an older
    /// one is forgotten: a marker naming the DN of before a change would
    /// otherwise let the start-up after the change is rolled back skip the
    /// leases granted under the changed DN.
    pub fn set_group_dn_checked(&self, group: &GroupName, dn: Option<&str>) -> Result<(), StoreError> {
        let key = group_dn_key(group);
        let now = self.tree(TreeId::Meta).get(&key)?;
        if now.as_deref() == dn.map(str::as_bytes) {
            return Ok(());
        }
        let dn = dn.filter(|_| !self.tree(TreeId::Leases).is_empty());
        if now.is_none() && dn.is_none() {
            return Ok(());
        }
        self.writer()?.transact([TreeId::Meta], |[meta]| {
            match dn {
                Some(dn) => meta.insert(&key, dn.as_bytes())?,
                None => meta.remove(&key)?,
            }
            Ok(())
        })
    }

    /// The groups that hold a live slot, from the `live` index's keys: one
    /// seek per group, no lease read.
    pub fn live_groups(&self) -> Result<Vec<GroupName>, StoreError> {
        let live = self.tree(TreeId::Live);
        let mut out = Vec::new();
        let mut from: Vec<u8> = Vec::new();
        while let Some((k, _)) = live.range(from.as_slice()..).next().transpose()? {
            let Some(end) = k.iter().position(|b| *b == 0) else {
                // Not a slot key; step past it.
                from = k.to_vec();
                from.push(0);
                continue;
            };
            out.push(GroupName::new(String::from_utf8_lossy(&k[..end]).into_owned()));
            // Every slot of this group is `group\0user`: the next group's
            // keys start after `group\x01`.
            from = k[..end].to_vec();
            from.push(1);
        }
        Ok(out)
    }

    /// Calls `f` with each lease that has not ended, one at a time, from
    /// the `live` index: unlike [`Store::live_leases`], memory does not
    /// grow with the number of leases.
    pub fn visit_live_leases(&self, f: impl FnMut(LeaseRecord)) -> Result<(), StoreError> {
        self.visit_slots(self.tree(TreeId::Live).iter(), f)
    }

    /// [`Store::visit_live_leases`] for the leases of one group.
    pub fn visit_live_leases_in(
        &self,
        group: &GroupName,
        f: impl FnMut(LeaseRecord),
    ) -> Result<(), StoreError> {
        let mut prefix = group.as_str().as_bytes().to_vec();
        prefix.push(0);
        self.visit_slots(self.tree(TreeId::Live).scan_prefix(prefix), f)
    }

    fn visit_slots(&self, slots: sled::Iter, mut f: impl FnMut(LeaseRecord)) -> Result<(), StoreError> {
        for item in slots.values() {
            let id = item?;
            if let Some(rec) = self.lease(&LeaseId::new(String::from_utf8_lossy(&id).into_owned()))? {
                f(rec);
            }
        }
        Ok(())
    }
}
