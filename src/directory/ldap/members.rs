//! Reading and removing members: member DNs back to user ids, and the
//! placeholder that keeps OpenLDAP groups from becoming empty.

use super::conn::rc;
use super::{dn, single, values, LdapDirectory};
use crate::ports::DirectoryError;
use jitbot_core::{GroupDn, UserId};
use ldap3::{Mod, Scope};
use std::collections::HashSet;

impl LdapDirectory {
    /// Every value of `attr` in `group` (a base search).
    pub(super) async fn member_values(
        &self,
        group: &GroupDn,
        attr: &str,
    ) -> Result<Vec<String>, DirectoryError> {
        let (entries, result) = self
            .search(group.as_str(), Scope::Base, "(objectClass=*)", &[attr])
            .await?;
        match result.rc {
            rc::SUCCESS => {}
            rc::NO_SUCH_OBJECT => return Err(DirectoryError::NoSuchGroup(group.to_string())),
            _ => return Err(self.refusal(&result, &format!("read {group}"))),
        }
        Ok(entries
            .first()
            .map(|e| values(e, attr).to_vec())
            .unwrap_or_default())
    }

    /// When `dn` is a group: the users it reaches through `member` /
    /// `uniqueMember`, however deep (bounded by `nested_depth`, at least
    /// 8 levels). `None` when `dn` is no group.
    pub(super) async fn nested_users(&self, dn: &str) -> Result<Option<Vec<UserId>>, DirectoryError> {
        let mut users = std::collections::BTreeSet::new();
        let mut seen = HashSet::new();
        let mut level = vec![dn.to_string()];
        let depth = self.nested_depth.max(8);
        let mut is_group = false;
        for _ in 0..depth {
            let mut next = Vec::new();
            for group in level.drain(..) {
                if !seen.insert(dn::normalize(&group)) {
                    continue;
                }
                let (entries, result) = self
                    .search(
                        &group,
                        Scope::Base,
                        "(objectClass=*)",
                        &["member", "uniqueMember"],
                    )
                    .await?;
                if result.rc != rc::SUCCESS {
                    continue;
                }
                let Some(entry) = entries.first() else { continue };
                let found: Vec<String> = values(entry, "member")
                    .iter()
                    .chain(values(entry, "uniqueMember"))
                    .cloned()
                    .collect();
                let has_attr = entry
                    .attrs
                    .keys()
                    .any(|a| a.eq_ignore_ascii_case("member") || a.eq_ignore_ascii_case("uniqueMember"));
                if group == dn {
                    is_group = has_attr || self.is_group_entry(dn).await?;
                    if !is_group {
                        return Ok(None);
                    }
                }
                for member in found {
                    match self.id_of_dn(&member).await? {
                        Some(user) => {
                            users.insert(user);
                        }
                        None => next.push(member),
                    }
                }
            }
            if next.is_empty() {
                break;
            }
            level = next;
        }
        Ok(is_group.then(|| users.into_iter().collect()))
    }

    /// Whether `dn` is a group entry (an empty AD group has no `member`).
    async fn is_group_entry(&self, dn: &str) -> Result<bool, DirectoryError> {
        let filter = "(|(objectClass=group)(objectClass=groupOfNames)(objectClass=groupOfUniqueNames)(objectClass=posixGroup))";
        let (entries, result) = self.search(dn, Scope::Base, filter, &["1.1"]).await?;
        Ok(result.rc == rc::SUCCESS && !entries.is_empty())
    }
    /// The user id behind a member DN: from the RDN when it is the id
    /// attribute, else from the entry. `None` for entries that are not users
    /// under `user_base` (nested groups, the placeholder, dangling DNs).
    pub(super) async fn id_of_dn(&self, member: &str) -> Result<Option<UserId>, DirectoryError> {
        if !dn::is_under(member, &self.user_base) {
            return Ok(None);
        }
        if let Some((attr, value)) = dn::first_rdn(member) {
            if attr.eq_ignore_ascii_case(&self.id_attr) {
                return Ok(Some(UserId::new(value)));
            }
        }
        let (entries, result) = self
            .search(member, Scope::Base, "(objectClass=*)", &[self.id_attr.as_str()])
            .await?;
        match result.rc {
            rc::SUCCESS => {}
            rc::NO_SUCH_OBJECT => return Ok(None),
            _ => return Err(self.refusal(&result, &format!("read {member}"))),
        }
        Ok(entries
            .first()
            .and_then(|e| single(values(e, &self.id_attr)))
            .map(UserId::new))
    }

    /// OpenLDAP refuses to empty a groupOfNames (result 65): put the
    /// placeholder in and take the member out in one modify, so that a
    /// revocation is never blocked by the schema.
    pub(super) async fn remove_last(
        &self,
        group: &GroupDn,
        user: &UserId,
        attr: &str,
        value: &str,
    ) -> Result<(), DirectoryError> {
        let placeholder = match &self.placeholder {
            Some(p) if dn::normalize(p) != dn::normalize(value) => p,
            _ => {
                return Err(DirectoryError::Refused(format!(
                    "{user} is the last member of {group} and the directory refuses an empty group; \
                     set ldap.placeholder_dn (for example the service account's DN) so that jitbot can keep one"
                )))
            }
        };
        let mods = vec![
            Mod::Add(attr.to_string(), HashSet::from([placeholder.clone()])),
            Mod::Delete(attr.to_string(), HashSet::from([value.to_string()])),
        ];
        let result = self.modify(group.as_str(), mods).await?;
        match result.rc {
            rc::SUCCESS | rc::NO_SUCH_ATTRIBUTE => Ok(()),
            // The placeholder arrived meanwhile: the plain delete works now.
            rc::ATTRIBUTE_EXISTS => {
                let delete = Mod::Delete(attr.to_string(), HashSet::from([value.to_string()]));
                let result = self.modify(group.as_str(), vec![delete]).await?;
                match result.rc {
                    rc::SUCCESS | rc::NO_SUCH_ATTRIBUTE => Ok(()),
                    _ => Err(self.refusal(&result, &format!("remove {user} from {group}"))),
                }
            }
            rc::NO_SUCH_OBJECT => Err(DirectoryError::NoSuchGroup(group.to_string())),
            _ => Err(self.refusal(&result, &format!("remove {user} from {group}"))),
        }
    }
}
