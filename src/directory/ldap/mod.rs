//! The LDAP directory: the production implementation of the [`Directory`]
//! port over ldap3 (OpenLDAP, and Active Directory where noted).
//!
//! Every value that comes from outside is escaped: `ldap_escape` in filters,
//! `dn_escape` in DNs. Every change is read back before it is reported done.
//! The bind password is read once and never logged nor put in an error.

mod batch;
mod check;
mod conn;
pub(crate) mod dn;
mod identity;
mod members;
mod nested;

pub use dn::{ad_ttl_value, is_ad_protected_group};

use crate::config::{GroupConfig, LdapConfig, MembershipKind};
use crate::ports::{Added, Directory, DirectoryError, GroupMember, MemberKind, Membership};
use async_trait::async_trait;
use batch::{Change, Combiner, Item};
use conn::{describe, rc, Supervisor};
use jitbot_core::{GroupDn, UserId};
use ldap3::adapters::PagedResults;
use ldap3::controls::RawControl;
use ldap3::{ldap_escape, LdapResult, Mod, Scope, SearchEntry};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::OnceCell;

/// Entries per page of a paged search: under Active Directory's default
/// `MaxPageSize` (1,000), past which AD stops returning entries.
const PAGE_SIZE: i32 = 500;

/// Group membership in an LDAP directory, over one supervised connection.
pub struct LdapDirectory {
    conn: Supervisor,
    user_base: String,
    id_attr: String,
    nested_depth: u32,
    active_directory: bool,
    placeholder: Option<String>,
    /// Configured groups by normalized DN; others are read as `member` groups.
    groups: HashMap<String, GroupSpec>,
    naming_contexts: OnceCell<Vec<String>>,
    /// Whether the DC takes `<TTL=...>` member values (`ad_ttl`), once asked.
    ttl_works: OnceCell<bool>,
    /// Membership changes queued behind a group's modify in flight.
    combiner: Combiner,
    /// Modify operations sent, for tests and benchmarks.
    modifies: AtomicU64,
}

#[derive(Clone, Copy)]
struct GroupSpec {
    kind: MembershipKind,
    /// Seconds for Active Directory's `<TTL=...>` membership, when enabled.
    ad_ttl: Option<u64>,
}

impl LdapDirectory {
    /// Reads the bind password and prepares the connection; nothing is
    /// contacted until the first operation.
    ///
    /// With `ad_ttl = true` a group's AD membership is written with a TTL of
    /// its longest possible lease (`max_total_duration`, else `max_duration`),
    /// so AD ends it even if jitbot never does.
    pub fn new(config: &LdapConfig, groups: &[GroupConfig]) -> Result<Self, DirectoryError> {
        let password = config
            .password
            .resolve()
            .map_err(|e| DirectoryError::Refused(format!("ldap.password: {e}")))?;
        if !valid_attribute(&config.user_id_attribute) {
            return Err(DirectoryError::Refused(format!(
                "ldap.user_id_attribute `{}` is not an attribute name",
                config.user_id_attribute
            )));
        }
        let groups = groups
            .iter()
            .map(|g| {
                let ttl = g.max_total_duration.unwrap_or(g.max_duration).to_std().as_secs();
                let spec = GroupSpec {
                    kind: g.membership,
                    ad_ttl: g.ad_ttl.then_some(ttl),
                };
                (dn::normalize(&g.dn), spec)
            })
            .collect();
        Ok(LdapDirectory {
            conn: Supervisor::new(config, password)?,
            user_base: config.user_base.clone(),
            id_attr: config.user_id_attribute.clone(),
            nested_depth: config.nested_depth,
            active_directory: config.active_directory,
            placeholder: config.placeholder_dn.clone(),
            groups,
            naming_contexts: OnceCell::new(),
            ttl_works: OnceCell::new(),
            combiner: Combiner::default(),
            modifies: AtomicU64::new(0),
        })
    }

    /// How many modify operations this directory has sent (a combined
    /// change counts once).
    pub fn modify_count(&self) -> u64 {
        self.modifies.load(Ordering::Relaxed)
    }

    fn spec(&self, group: &GroupDn) -> GroupSpec {
        self.groups
            .get(&dn::normalize(group.as_str()))
            .copied()
            .unwrap_or(GroupSpec {
                kind: MembershipKind::Member,
                ad_ttl: None,
            })
    }

    async fn search(
        &self,
        base: &str,
        scope: Scope,
        filter: &str,
        attrs: &[&str],
    ) -> Result<(Vec<SearchEntry>, LdapResult), DirectoryError> {
        let result = self
            .conn
            .run(|mut ldap| async move { ldap.search(base, scope, filter, attrs).await })
            .await?;
        let entries = result
            .0
            .into_iter()
            .filter(|e| !e.is_ref() && !e.is_intermediate())
            .map(SearchEntry::construct)
            .collect();
        Ok((entries, result.1))
    }

    /// A base-or-subtree search sent with these request controls.
    async fn search_with(
        &self,
        controls: Vec<RawControl>,
        base: &str,
        scope: Scope,
        filter: &str,
        attrs: &[&str],
    ) -> Result<(Vec<SearchEntry>, LdapResult), DirectoryError> {
        let result = self
            .conn
            .run(|mut ldap| {
                let controls = controls.clone();
                async move {
                    ldap.with_controls(controls)
                        .search(base, scope, filter, attrs)
                        .await
                }
            })
            .await?;
        let entries = result
            .0
            .into_iter()
            .filter(|e| !e.is_ref() && !e.is_intermediate())
            .map(SearchEntry::construct)
            .collect();
        Ok((entries, result.1))
    }

    /// A search whose answer may exceed the server's page size, read page by
    /// page with the paged-results control.
    async fn search_paged(
        &self,
        base: &str,
        scope: Scope,
        filter: &str,
        attrs: &[&str],
    ) -> Result<(Vec<SearchEntry>, LdapResult), DirectoryError> {
        self.conn
            .run(|mut ldap| async move {
                let pages = PagedResults::<&str, &[&str]>::new(PAGE_SIZE);
                let mut stream = ldap
                    .streaming_search_with(pages, base, scope, filter, attrs)
                    .await?;
                let mut entries = Vec::new();
                while let Some(entry) = stream.next().await? {
                    if !entry.is_ref() && !entry.is_intermediate() {
                        entries.push(SearchEntry::construct(entry));
                    }
                }
                Ok((entries, stream.finish().await))
            })
            .await
    }

    async fn modify(&self, dn: &str, mods: Vec<Mod<String>>) -> Result<LdapResult, DirectoryError> {
        Ok(self.modify_tracked(dn, mods).await?.0)
    }

    /// A modify, and whether it was sent twice (after a lost connection).
    async fn modify_tracked(
        &self,
        dn: &str,
        mods: Vec<Mod<String>>,
    ) -> Result<(LdapResult, bool), DirectoryError> {
        self.modifies.fetch_add(1, Ordering::Relaxed);
        self.conn
            .run_tracked(|mut ldap| {
                let mods = mods.clone();
                async move { ldap.modify(dn, mods).await }
            })
            .await
    }

    /// Turns a result that is neither success nor one the caller handles
    /// into an error worded for the operator.
    fn refusal(&self, result: &LdapResult, what: &str) -> DirectoryError {
        match result.rc {
            rc::INSUFFICIENT_ACCESS => DirectoryError::Refused(format!(
                "insufficient access: {} may not {what}",
                self.conn.bind_dn()
            )),
            rc::BUSY | rc::UNAVAILABLE | rc::TIME_LIMIT => {
                DirectoryError::Unavailable(format!("{what}: {}", describe(result)))
            }
            _ => DirectoryError::Refused(format!("{what}: {}", describe(result))),
        }
    }

    /// The DN of the entry under `user_base` whose id attribute is `user`.
    async fn user_dn(&self, user: &UserId) -> Result<String, DirectoryError> {
        Ok(self.user_entry(user, &["1.1"]).await?.dn)
    }

    /// The entry under `user_base` whose id attribute is `user`, with `attrs`.
    async fn user_entry(&self, user: &UserId, attrs: &[&str]) -> Result<SearchEntry, DirectoryError> {
        let id = user.as_str();
        if id.is_empty() || id.contains('\0') {
            return Err(DirectoryError::NoSuchUser(user.to_string()));
        }
        let filter = format!("(&(objectClass=*)({}={}))", self.id_attr, ldap_escape(id));
        let (mut entries, result) = self
            .search(&self.user_base, Scope::Subtree, &filter, attrs)
            .await?;
        self.check_user_base(&result)?;
        match entries.len() {
            0 => Err(DirectoryError::NoSuchUser(user.to_string())),
            1 => Ok(entries.remove(0)),
            _ => Err(DirectoryError::Ambiguous(format!("{}={id}", self.id_attr))),
        }
    }

    /// Whether `group` exists (a base search).
    async fn group_exists(&self, group: &GroupDn) -> Result<bool, DirectoryError> {
        let (_, result) = self
            .search(group.as_str(), Scope::Base, "(objectClass=*)", &["1.1"])
            .await?;
        match result.rc {
            rc::SUCCESS => Ok(true),
            rc::NO_SUCH_OBJECT => Ok(false),
            _ => Err(self.refusal(&result, &format!("read {group}"))),
        }
    }

    /// A modify of `group` answered 32 (noSuchObject): the group is missing,
    /// or (the group being there) the member value names no entry — a DN
    /// gone stale since it was looked up (AD checks DN values).
    async fn no_such_object(&self, group: &GroupDn, value: &str) -> DirectoryError {
        match self.group_exists(group).await {
            Ok(false) => DirectoryError::NoSuchGroup(group.to_string()),
            Ok(true) => stale_value(group, value),
            Err(e) => e,
        }
    }

    fn check_user_base(&self, result: &LdapResult) -> Result<(), DirectoryError> {
        match result.rc {
            rc::SUCCESS => Ok(()),
            rc::NO_SUCH_OBJECT => Err(DirectoryError::Refused(format!(
                "ldap.user_base {} does not exist",
                self.user_base
            ))),
            _ => Err(self.refusal(result, &format!("search {}", self.user_base))),
        }
    }

    /// Whether `group` holds `value` in `attr` (the server compares, with the
    /// attribute's own matching rule).
    async fn has_value(&self, group: &GroupDn, attr: &str, value: &str) -> Result<bool, DirectoryError> {
        self.matches(group, &format!("({attr}={})", ldap_escape(value)))
            .await
    }

    /// Whether `group` matches `filter` (a base search).
    async fn matches(&self, group: &GroupDn, filter: &str) -> Result<bool, DirectoryError> {
        let (entries, result) = self.search(group.as_str(), Scope::Base, filter, &["1.1"]).await?;
        match result.rc {
            rc::SUCCESS => Ok(!entries.is_empty()),
            rc::NO_SUCH_OBJECT => Err(DirectoryError::NoSuchGroup(group.to_string())),
            _ => Err(self.refusal(&result, &format!("read {group}"))),
        }
    }
}

/// The one-value paths: each change in its own modify, each read back.
impl LdapDirectory {
    async fn add_one(
        &self,
        group: &GroupDn,
        user: &UserId,
        attr: &str,
        value: &str,
        written: &str,
    ) -> Result<bool, DirectoryError> {
        let add = Mod::Add(attr.to_string(), HashSet::from([written.to_string()]));
        let (result, resent) = self.modify_tracked(group.as_str(), vec![add]).await?;
        let already = match result.rc {
            rc::SUCCESS => false,
            // Present already: news only if this add was sent once.
            // AD says 68 (entryAlreadyExists) where OpenLDAP says 20.
            rc::ATTRIBUTE_EXISTS | rc::ENTRY_ALREADY_EXISTS => !resent,
            rc::NO_SUCH_OBJECT => return Err(self.no_such_object(group, value).await),
            _ => return Err(self.refusal(&result, &format!("add {user} to {group}"))),
        };
        if !self.has_value(group, attr, value).await? {
            return Err(not_added(group, user));
        }
        Ok(already)
    }

    async fn remove_one(
        &self,
        group: &GroupDn,
        user: &UserId,
        kind: MembershipKind,
        attr: &str,
        value: &str,
    ) -> Result<(), DirectoryError> {
        let delete = Mod::Delete(attr.to_string(), HashSet::from([value.to_string()]));
        let modifying = std::time::Instant::now();
        let result = self.modify(group.as_str(), vec![delete]).await?;
        crate::metrics::stage("directory_modify", modifying.elapsed());
        match result.rc {
            rc::SUCCESS | rc::NO_SUCH_ATTRIBUTE => {}
            // AD's "not a member" (where OpenLDAP says 16); the read-back decides.
            rc::UNWILLING_TO_PERFORM if self.active_directory => {}
            // The group is there and the value names no entry: it cannot be
            // a member (AD's values are links); the read-back decides.
            rc::NO_SUCH_OBJECT if self.active_directory && self.group_exists(group).await? => {}
            rc::NO_SUCH_OBJECT => return Err(DirectoryError::NoSuchGroup(group.to_string())),
            rc::OBJECT_CLASS_VIOLATION if kind != MembershipKind::MemberUid => {
                self.remove_last(group, user, attr, value).await?;
            }
            _ => return Err(self.refusal(&result, &format!("remove {user} from {group}"))),
        }
        let reading = std::time::Instant::now();
        let still_there = self.has_value(group, attr, value).await?;
        crate::metrics::stage("read_back", reading.elapsed());
        if still_there {
            return Err(not_removed(group, user));
        }
        Ok(())
    }
}

fn not_added(group: &GroupDn, user: &UserId) -> DirectoryError {
    DirectoryError::Refused(format!(
        "added {user} to {group}, but reading the group back does not show the membership (the add may \
         have landed: if the service account may write but not read `member` of the group, grant it read \
         access too)"
    ))
}

fn primary_group_member(group: &GroupDn, user_dn: &str) -> DirectoryError {
    DirectoryError::Refused(format!(
        "{user_dn} is still in {group} through its primary group (its primaryGroupID is the group's RID; \
         Active Directory then keeps no `member` value to remove): set the user's primary group back (for \
         example to Domain Users), then the lease ends on the next try"
    ))
}

fn stale_value(group: &GroupDn, value: &str) -> DirectoryError {
    DirectoryError::Refused(format!(
        "group {group} exists, but the member value {value} names no entry in the directory: the user was \
         renamed, moved or deleted since jitbot looked them up; ask for the access again"
    ))
}

fn not_removed(group: &GroupDn, user: &UserId) -> DirectoryError {
    DirectoryError::Refused(format!(
        "removed {user} from {group}, but reading the group back still shows the membership"
    ))
}

#[async_trait]
impl Directory for LdapDirectory {
    async fn find_user(&self, attribute: &str, value: &str) -> Result<Option<UserId>, DirectoryError> {
        if value.is_empty() || value.contains('\0') {
            return Ok(None);
        }
        if !valid_attribute(attribute) {
            return Err(DirectoryError::Refused(format!(
                "`{attribute}` is not an attribute name"
            )));
        }
        let filter = format!("(&(objectClass=*)({attribute}={}))", ldap_escape(value));
        let (entries, result) = self
            .search(&self.user_base, Scope::Subtree, &filter, &[self.id_attr.as_str()])
            .await?;
        self.check_user_base(&result)?;
        let ambiguous = || DirectoryError::Ambiguous(format!("{attribute}={value}"));
        match entries.as_slice() {
            [] => Ok(None),
            [one] => match values(one, &self.id_attr) {
                [] => Ok(None),
                [id] => Ok(Some(UserId::new(id))),
                _ => Err(ambiguous()),
            },
            _ => Err(ambiguous()),
        }
    }

    async fn membership_of(&self, group: &GroupDn, user: &UserId) -> Result<Membership, DirectoryError> {
        let kind = self.spec(group).kind;
        // The user must exist, whatever the kind holds.
        let entry = self.user_entry(user, &[self.identity_attribute()]).await?;
        let (value, identity) = match kind {
            MembershipKind::MemberUid => (user.to_string(), None),
            _ => (entry.dn.clone(), self.identity_of(&entry)),
        };
        Ok(Membership {
            group: group.clone(),
            attribute: attribute(kind).to_string(),
            value,
            identity,
        })
    }

    async fn has_membership(&self, m: &Membership) -> Result<bool, DirectoryError> {
        if m.attribute.eq_ignore_ascii_case(members::PRIMARY_GROUP) {
            return self.has_primary_group(m).await;
        }
        let kind = valid_member_attribute(&m.attribute)?;
        let resolved = self.resolve(m, kind).await?;
        match resolved.value {
            // Found among the group's own values by the recorded GUID.
            Some(_) if resolved.guid.is_some() => Ok(true),
            Some(value) => self.has_value(&m.group, attribute(kind), &value).await,
            // AD: a member through their primary group has no value.
            None => self.in_primary_group(m).await.map(|dn| dn.is_some()),
        }
    }

    /// Adds the recorded user's value: with a recorded identity, the DN of
    /// the entry that has it *now* (the recorded DN may name another entry
    /// by the time a grant is retried), checked again after the add.
    async fn add_membership(&self, m: &Membership) -> Result<Added, DirectoryError> {
        let kind = valid_member_attribute(&m.attribute)?;
        let value = self.value_to_add(m, kind).await?;
        let written = match self.spec(&m.group).ad_ttl {
            Some(ttl) if kind == MembershipKind::Member && self.ttl_accepted(&m.group).await => {
                ad_ttl_value(&value, ttl)
            }
            _ => value.clone(),
        };
        let item = Item {
            user: UserId::new(value.as_str()),
            value: value.clone(),
            written,
        };
        let already = self.combined(Change::Add, &m.group, kind, item).await?;
        self.check_added_identity(m, kind, &value).await?;
        Ok(if already {
            Added::AlreadyPresent
        } else {
            Added::Added
        })
    }

    async fn remove_membership(&self, m: &Membership) -> Result<(), DirectoryError> {
        self.revoke_membership(m).await.map(|_| ())
    }

    async fn current_value(&self, m: &Membership) -> Result<Option<String>, DirectoryError> {
        if m.attribute.eq_ignore_ascii_case(members::PRIMARY_GROUP) {
            return Ok(Some(m.value.clone()));
        }
        let kind = valid_member_attribute(&m.attribute)?;
        Ok(self.resolve(m, kind).await?.value)
    }

    /// Removes the value the group holds for the recorded user *today*
    /// (renamed or moved users resolved by their recorded identity), and
    /// says how when that differs from the recorded value.
    async fn revoke_membership(&self, m: &Membership) -> Result<Option<String>, DirectoryError> {
        let kind = valid_member_attribute(&m.attribute)?;
        let resolved = self.resolve(m, kind).await?;
        let Some(value) = resolved.value else {
            if let Some(dn) = self.in_primary_group(m).await? {
                return Err(primary_group_member(&m.group, &dn));
            }
            return Ok(resolved.note);
        };
        let item = Item {
            user: UserId::new(value.as_str()),
            value: value.clone(),
            written: value.clone(),
        };
        self.combined(Change::Remove, &m.group, kind, item).await?;
        if let Some(guid) = &resolved.guid {
            self.check_removed_guid(&m.group, guid, &value).await?;
        }
        Ok(resolved.note)
    }

    async fn members(&self, group: &GroupDn) -> Result<Vec<GroupMember>, DirectoryError> {
        let kind = self.spec(group).kind;
        let attr = attribute(kind);
        let found = self.member_values(group, attr).await?;
        // AD: the users among many members named by one paged search.
        let known = if self.active_directory && kind == MembershipKind::Member && !found.is_empty() {
            self.member_ids_by_dn(group).await?
        } else {
            HashMap::new()
        };
        let placeholder = self.placeholder.as_deref().map(dn::normalize);
        let mut out = Vec::with_capacity(found.len());
        for value in found {
            let member_kind = if kind == MembershipKind::MemberUid {
                MemberKind::User(UserId::new(value.as_str()))
            } else if placeholder.as_deref() == Some(dn::normalize(&value).as_str()) {
                continue;
            } else if let Some(user) = known.get(&dn::normalize(&value)) {
                MemberKind::User(user.clone())
            } else if let Some(user) = self.id_of_dn(&value).await? {
                MemberKind::User(user)
            } else {
                match self.nested_users(&value).await? {
                    Some(reaches) => MemberKind::NestedGroup { reaches },
                    None => MemberKind::Unknown,
                }
            };
            out.push(GroupMember {
                membership: Membership {
                    group: group.clone(),
                    attribute: attr.to_string(),
                    value,
                    identity: None,
                },
                kind: member_kind,
            });
        }
        // AD: users whose primary group this is are members `member` omits.
        if self.active_directory && kind == MembershipKind::Member {
            for (dn, id) in self.primary_members(group).await? {
                // Never `Unknown`: that is a value ZSP remediation would
                // try to delete, and there is none.
                let member_kind = MemberKind::PrimaryGroup(id.unwrap_or_else(|| UserId::new(dn.as_str())));
                out.push(GroupMember {
                    membership: Membership {
                        group: group.clone(),
                        attribute: members::PRIMARY_GROUP.to_string(),
                        value: dn,
                        identity: None,
                    },
                    kind: member_kind,
                });
            }
        }
        Ok(out)
    }

    async fn groups_of(
        &self,
        user: &UserId,
        among: &BTreeSet<GroupDn>,
    ) -> Result<BTreeSet<GroupDn>, DirectoryError> {
        if among.is_empty() {
            return Ok(BTreeSet::new());
        }
        let user_dn = match self.user_dn(user).await {
            Ok(dn) => dn,
            Err(DirectoryError::NoSuchUser(_)) => return Ok(BTreeSet::new()),
            Err(e) => return Err(e),
        };
        let mut found = BTreeSet::new();
        if self.active_directory {
            for group in among {
                if self.in_chain(group, &user_dn, user).await? {
                    found.insert(group.clone());
                }
            }
        } else {
            let reached = self.walk_up(&user_dn, user).await?;
            found.extend(
                among
                    .iter()
                    .filter(|g| reached.contains(&dn::normalize(g.as_str())))
                    .cloned(),
            );
        }
        Ok(found)
    }

    async fn user_attributes(
        &self,
        user: &UserId,
        attributes: &[String],
    ) -> Result<BTreeMap<String, String>, DirectoryError> {
        if let Some(bad) = attributes.iter().find(|a| !valid_attribute(a)) {
            return Err(DirectoryError::Refused(format!(
                "`{bad}` is not an attribute name"
            )));
        }
        let id = user.as_str();
        if attributes.is_empty() || id.is_empty() || id.contains('\0') {
            return Ok(BTreeMap::new());
        }
        let filter = format!("(&(objectClass=*)({}={}))", self.id_attr, ldap_escape(id));
        let wanted: Vec<&str> = attributes.iter().map(String::as_str).collect();
        let (entries, result) = self
            .search(&self.user_base, Scope::Subtree, &filter, &wanted)
            .await?;
        self.check_user_base(&result)?;
        match entries.as_slice() {
            [] => Err(DirectoryError::NoSuchUser(user.to_string())),
            [one] => Ok(attributes
                .iter()
                .filter_map(|a| values(one, a).first().map(|v| (a.clone(), v.clone())))
                .collect()),
            _ => Err(DirectoryError::Ambiguous(format!("{}={id}", self.id_attr))),
        }
    }

    async fn ping(&self) -> Result<(), DirectoryError> {
        let (_, result) = self.search("", Scope::Base, "(objectClass=*)", &["1.1"]).await?;
        if result.rc == rc::SUCCESS {
            return Ok(());
        }
        let (_, result) = self
            .search(&self.user_base, Scope::Base, "(objectClass=*)", &["1.1"])
            .await?;
        self.check_user_base(&result)
    }
}

/// The membership kind a recorded attribute names; anything else is refused
/// (a recorded value never turns into a write to another attribute).
fn valid_member_attribute(name: &str) -> Result<MembershipKind, DirectoryError> {
    [
        MembershipKind::Member,
        MembershipKind::UniqueMember,
        MembershipKind::MemberUid,
    ]
    .into_iter()
    .find(|k| attribute(*k).eq_ignore_ascii_case(name))
    .ok_or_else(|| DirectoryError::Refused(format!("`{name}` is not a membership attribute")))
}

/// The attribute a group of this kind lists its members in.
fn attribute(kind: MembershipKind) -> &'static str {
    match kind {
        MembershipKind::Member => "member",
        MembershipKind::UniqueMember => "uniqueMember",
        MembershipKind::MemberUid => "memberUid",
    }
}

/// An entry's values of `attr`, whatever case the server spelled it in.
fn values<'e>(entry: &'e SearchEntry, attr: &str) -> &'e [String] {
    entry
        .attrs
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(attr))
        .map(|(_, v)| v.as_slice())
        .unwrap_or(&[])
}

fn single(values: &[String]) -> Option<String> {
    match values {
        [one] => Some(one.clone()),
        _ => None,
    }
}

/// An attribute description is a name or OID, with options: nothing that
/// could change a filter's structure.
fn valid_attribute(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b';')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attribute_names_cannot_inject() {
        assert!(valid_attribute("mail"));
        assert!(valid_attribute("sAMAccountName"));
        assert!(valid_attribute("1.2.840.113556.1.4.221"));
        for bad in ["", "mail)(uid=*", "a=b", "mail*", "cn\0"] {
            assert!(!valid_attribute(bad), "{bad:?}");
        }
    }
}
