//! Reading and removing members: member DNs back to user ids, and the
//! placeholder that keeps OpenLDAP groups from becoming empty.

use super::conn::rc;
use super::{dn, single, values, LdapDirectory};
use crate::ports::DirectoryError;
use jitbot_core::{GroupDn, UserId};
use ldap3::{Mod, Scope};
use std::collections::HashSet;

impl LdapDirectory {
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
