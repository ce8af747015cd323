//! An in-memory directory: a real implementation of the [`Directory`] port,
//! used by the service tests and by `jitbot demo`. Not the production path.
//!
//! Groups hold user ids; a member that is itself a group's DN makes a nested
//! group. [`MemoryDirectory::fail_next`] makes the next operations fail as
//! an unreachable server would, for outage tests.

use crate::config::MemoryDirectoryConfig;
use crate::ports::{Added, Directory, DirectoryError, GroupMember, MemberKind, Membership};
use async_trait::async_trait;
use jitbot_core::{GroupDn, UserId};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

#[derive(Default)]
pub struct MemoryDirectory {
    state: Mutex<State>,
    failures: AtomicU32,
    /// Count of add and remove operations that changed something.
    pub changes: AtomicU64,
}

#[derive(Default)]
struct State {
    users: BTreeMap<String, BTreeMap<String, String>>,
    groups: BTreeMap<String, BTreeSet<String>>,
}

impl MemoryDirectory {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn from_config(config: &MemoryDirectoryConfig) -> Self {
        let dir = Self::new();
        for u in &config.users {
            dir.add_user(&u.id, u.attributes.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        }
        for (dn, members) in &config.groups {
            dir.add_group(dn, members.iter().map(String::as_str));
        }
        dir
    }

    pub fn add_user<'a>(&self, id: &str, attributes: impl IntoIterator<Item = (&'a str, &'a str)>) {
        let mut s = self.lock();
        let attrs = attributes
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
            .collect();
        s.users.insert(id.to_string(), attrs);
    }

    pub fn add_group<'a>(&self, dn: &str, members: impl IntoIterator<Item = &'a str>) {
        let mut s = self.lock();
        s.groups
            .insert(dn.to_string(), members.into_iter().map(str::to_string).collect());
    }

    /// The next `n` operations fail with [`DirectoryError::Unavailable`].
    pub fn fail_next(&self, n: u32) {
        self.failures.store(n, Ordering::SeqCst);
    }

    /// Direct members, for assertions.
    pub fn members(&self, dn: &str) -> BTreeSet<String> {
        self.lock().groups.get(dn).cloned().unwrap_or_default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn maybe_fail(&self) -> Result<(), DirectoryError> {
        let took = self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        match took {
            Ok(_) => Err(DirectoryError::Unavailable(
                "in-memory directory: injected outage".into(),
            )),
            Err(_) => Ok(()),
        }
    }
}

#[async_trait]
impl Directory for MemoryDirectory {
    async fn find_user(&self, attribute: &str, value: &str) -> Result<Option<UserId>, DirectoryError> {
        self.maybe_fail()?;
        let s = self.lock();
        let attribute = attribute.to_ascii_lowercase();
        let hits: Vec<&String> = s
            .users
            .iter()
            .filter(|(id, attrs)| {
                (attribute == "uid" && id.as_str() == value)
                    || attrs.get(&attribute).is_some_and(|v| v == value)
            })
            .map(|(id, _)| id)
            .collect();
        match hits.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some(UserId::new(one.as_str()))),
            _ => Err(DirectoryError::Ambiguous(format!("{attribute}={value}"))),
        }
    }

    async fn membership_of(&self, group: &GroupDn, user: &UserId) -> Result<Membership, DirectoryError> {
        self.maybe_fail()?;
        let s = self.lock();
        let id = s
            .users
            .keys()
            .find(|id| id.eq_ignore_ascii_case(user.as_str()))
            .ok_or_else(|| DirectoryError::NoSuchUser(user.to_string()))?;
        Ok(Membership {
            group: group.clone(),
            attribute: "member".into(),
            value: id.clone(),
            identity: None,
        })
    }

    async fn has_membership(&self, m: &Membership) -> Result<bool, DirectoryError> {
        self.maybe_fail()?;
        let s = self.lock();
        Ok(find(members_of(&s, &m.group)?, &m.value).is_some())
    }

    async fn add_membership(&self, m: &Membership) -> Result<Added, DirectoryError> {
        self.maybe_fail()?;
        let mut s = self.lock();
        let members = members_of_mut(&mut s, &m.group)?;
        if find(members, &m.value).is_some() {
            return Ok(Added::AlreadyPresent);
        }
        members.insert(m.value.clone());
        self.changes.fetch_add(1, Ordering::SeqCst);
        Ok(Added::Added)
    }

    async fn remove_membership(&self, m: &Membership) -> Result<(), DirectoryError> {
        self.maybe_fail()?;
        let mut s = self.lock();
        let members = members_of_mut(&mut s, &m.group)?;
        if let Some(present) = find(members, &m.value).cloned() {
            members.remove(&present);
            self.changes.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    async fn members(&self, group: &GroupDn) -> Result<Vec<GroupMember>, DirectoryError> {
        self.maybe_fail()?;
        let s = self.lock();
        let members = members_of(&s, group)?;
        Ok(members
            .iter()
            .map(|value| {
                let kind = if s.groups.contains_key(value) {
                    MemberKind::NestedGroup {
                        reaches: reached_users(&s, value),
                    }
                } else if let Some(id) = s.users.keys().find(|id| id.eq_ignore_ascii_case(value)) {
                    MemberKind::User(UserId::new(id.as_str()))
                } else {
                    MemberKind::Unknown
                };
                GroupMember {
                    membership: Membership {
                        group: group.clone(),
                        attribute: "member".into(),
                        value: value.clone(),
                        identity: None,
                    },
                    kind,
                }
            })
            .collect())
    }

    async fn groups_of(
        &self,
        user: &UserId,
        among: &BTreeSet<GroupDn>,
    ) -> Result<BTreeSet<GroupDn>, DirectoryError> {
        self.maybe_fail()?;
        let s = self.lock();
        // Walk outward from the user: a group containing the user or a group
        // already reached is reached too. Bounded by the number of groups.
        let mut reached: BTreeSet<String> = BTreeSet::new();
        for _ in 0..=s.groups.len() {
            let before = reached.len();
            for (dn, members) in &s.groups {
                if members
                    .iter()
                    .any(|m| m.eq_ignore_ascii_case(user.as_str()) || reached.contains(m))
                {
                    reached.insert(dn.clone());
                }
            }
            if reached.len() == before {
                break;
            }
        }
        Ok(among
            .iter()
            .filter(|g| reached.contains(g.as_str()))
            .cloned()
            .collect())
    }

    async fn ping(&self) -> Result<(), DirectoryError> {
        self.maybe_fail()
    }

    async fn user_attributes(
        &self,
        user: &UserId,
        attributes: &[String],
    ) -> Result<BTreeMap<String, String>, DirectoryError> {
        self.maybe_fail()?;
        let s = self.lock();
        let entry = s
            .users
            .iter()
            .find(|(id, _)| id.eq_ignore_ascii_case(user.as_str()))
            .map(|(_, attrs)| attrs)
            .ok_or_else(|| DirectoryError::NoSuchUser(user.to_string()))?;
        Ok(attributes
            .iter()
            .filter_map(|a| entry.get(&a.to_ascii_lowercase()).map(|v| (a.clone(), v.clone())))
            .collect())
    }
}

fn members_of<'s>(s: &'s State, group: &GroupDn) -> Result<&'s BTreeSet<String>, DirectoryError> {
    s.groups
        .get(group.as_str())
        .ok_or_else(|| DirectoryError::NoSuchGroup(group.to_string()))
}

fn members_of_mut<'s>(s: &'s mut State, group: &GroupDn) -> Result<&'s mut BTreeSet<String>, DirectoryError> {
    s.groups
        .get_mut(group.as_str())
        .ok_or_else(|| DirectoryError::NoSuchGroup(group.to_string()))
}

/// The member equal to `value` as a directory compares account names.
fn find<'m>(members: &'m BTreeSet<String>, value: &str) -> Option<&'m String> {
    members.iter().find(|m| m.eq_ignore_ascii_case(value))
}

/// Users reached through the nested group `dn`, however deep.
fn reached_users(s: &State, dn: &str) -> Vec<UserId> {
    let mut users = BTreeSet::new();
    let mut seen = BTreeSet::new();
    let mut todo = vec![dn.to_string()];
    while let Some(group) = todo.pop() {
        if !seen.insert(group.clone()) {
            continue;
        }
        for m in s.groups.get(&group).into_iter().flatten() {
            if s.groups.contains_key(m) {
                todo.push(m.clone());
            } else {
                users.insert(UserId::new(m.as_str()));
            }
        }
    }
    users.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn membership_and_nesting() {
        let d = MemoryDirectory::new();
        d.add_user("alice", [("mail", "alice@example.org")]);
        d.add_user("bob", [("mail", "bob@example.org")]);
        d.add_group("cn=sec", ["alice"]);
        d.add_group("cn=approvers", ["cn=sec"]);
        d.add_group("cn=db", ["bob"]);
        let g = GroupDn::new("cn=db");
        let alice = UserId::new("alice");
        assert_eq!(
            d.find_user("mail", "alice@example.org").await.unwrap(),
            Some(alice.clone())
        );
        assert_eq!(d.find_user("mail", "*").await.unwrap(), None);
        d.add_member(&g, &alice).await.unwrap();
        d.add_member(&g, &alice).await.unwrap();
        assert!(d.is_member(&g, &alice).await.unwrap());
        d.remove_member(&g, &alice).await.unwrap();
        d.remove_member(&g, &alice).await.unwrap();
        assert_eq!(d.changes.load(Ordering::SeqCst), 2, "idempotent add and remove");
        let among: BTreeSet<GroupDn> = [GroupDn::new("cn=approvers"), GroupDn::new("cn=db")].into();
        assert_eq!(
            d.groups_of(&alice, &among).await.unwrap(),
            [GroupDn::new("cn=approvers")].into()
        );
        let attrs = d
            .user_attributes(&alice, &["Mail".to_string(), "discordId".to_string()])
            .await
            .unwrap();
        assert_eq!(
            attrs,
            [("Mail".to_string(), "alice@example.org".to_string())].into()
        );
        assert!(matches!(
            d.user_attributes(&UserId::new("nobody"), &[]).await,
            Err(DirectoryError::NoSuchUser(_))
        ));
        d.fail_next(1);
        assert!(d.ping().await.is_err());
        assert!(d.ping().await.is_ok());
        assert!(matches!(
            d.add_member(&GroupDn::new("cn=nope"), &alice).await,
            Err(DirectoryError::NoSuchGroup(_))
        ));
    }
}
