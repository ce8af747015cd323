//! Nested group membership: Active Directory's in-chain matching rule, or
//! on OpenLDAP a bounded walk up `member` / `uniqueMember` values.

use super::conn::rc;
use super::{dn, values, LdapDirectory};
use crate::ports::DirectoryError;
use jitbot_core::{GroupDn, UserId};
use ldap3::{ldap_escape, Scope};
use std::collections::HashSet;

/// Active Directory's LDAP_MATCHING_RULE_IN_CHAIN: transitive membership.
const IN_CHAIN: &str = "1.2.840.113556.1.4.1941";
/// How many DNs one nested-group search asks about at once.
const DNS_PER_SEARCH: usize = 32;

impl LdapDirectory {
    /// The directory's naming contexts, read once from the root DSE; the
    /// suffix of `user_base` when the root DSE does not list them.
    pub(super) async fn naming_contexts(&self) -> Result<&[String], DirectoryError> {
        let contexts = self
            .naming_contexts
            .get_or_try_init(|| async {
                let (entries, _) = self
                    .search("", Scope::Base, "(objectClass=*)", &["namingContexts"])
                    .await?;
                let mut found: Vec<String> = entries
                    .first()
                    .map(|e| values(e, "namingContexts").to_vec())
                    .unwrap_or_default();
                if found.is_empty() {
                    found.push(dc_suffix(&self.user_base));
                }
                Ok::<_, DirectoryError>(found)
            })
            .await?;
        Ok(contexts)
    }

    /// OpenLDAP: the groups reached from `user_dn` by walking `member` /
    /// `uniqueMember` upward (and `memberUid` at the first step), as
    /// normalized DNs.
    pub(super) async fn walk_up(
        &self,
        user_dn: &str,
        user: &UserId,
    ) -> Result<HashSet<String>, DirectoryError> {
        let bases = self.naming_contexts().await?.to_vec();
        let mut reached = HashSet::new();
        let mut frontier = vec![user_dn.to_string()];
        for level in 0..=self.nested_depth {
            let mut next = Vec::new();
            for chunk in frontier.chunks(DNS_PER_SEARCH) {
                let mut filter = String::from("(|");
                for d in chunk {
                    let d = ldap_escape(d.as_str());
                    filter.push_str(&format!("(member={d})(uniqueMember={d})"));
                }
                if level == 0 {
                    filter.push_str(&format!("(memberUid={})", ldap_escape(user.as_str())));
                }
                filter.push(')');
                for base in &bases {
                    let (entries, result) = self.search(base, Scope::Subtree, &filter, &["1.1"]).await?;
                    if result.rc != rc::SUCCESS && result.rc != rc::NO_SUCH_OBJECT {
                        return Err(self.refusal(&result, &format!("search groups under {base}")));
                    }
                    for e in entries {
                        if reached.insert(dn::normalize(&e.dn)) {
                            next.push(e.dn);
                        }
                    }
                }
            }
            if next.is_empty() {
                break;
            }
            frontier = next;
        }
        Ok(reached)
    }

    /// Active Directory: whether `user_dn` is in `group`, transitively.
    pub(super) async fn in_chain(
        &self,
        group: &GroupDn,
        user_dn: &str,
        user: &UserId,
    ) -> Result<bool, DirectoryError> {
        let filter = format!(
            "(|(member:{IN_CHAIN}:={})(memberUid={}))",
            ldap_escape(user_dn),
            ldap_escape(user.as_str())
        );
        let (entries, result) = self
            .search(group.as_str(), Scope::Base, &filter, &["1.1"])
            .await?;
        match result.rc {
            rc::SUCCESS => Ok(!entries.is_empty()),
            rc::NO_SUCH_OBJECT => {
                tracing::warn!(group = %group, "group used for approvers or requesters does not exist");
                Ok(false)
            }
            _ => Err(self.refusal(&result, &format!("read {group}"))),
        }
    }
}

/// The trailing `dc=` RDNs of `dn` (the usual suffix), or `dn` itself.
pub(super) fn dc_suffix(dn: &str) -> String {
    let rdns: Vec<&str> = dn.split(',').collect();
    let start = rdns
        .iter()
        .rposition(|r| !r.trim().to_ascii_lowercase().starts_with("dc="))
        .map_or(0, |i| i + 1);
    if start >= rdns.len() {
        dn.to_string()
    } else {
        rdns[start..].join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffix_of_user_base() {
        assert_eq!(dc_suffix("ou=people,dc=example,dc=org"), "dc=example,dc=org");
        assert_eq!(dc_suffix("ou=people,o=corp"), "ou=people,o=corp");
        assert_eq!(dc_suffix("dc=x"), "dc=x");
    }
}
