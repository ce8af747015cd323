//! Reading and removing members: member DNs back to user ids, Active
//! Directory's ranged retrieval of large groups, and the placeholder that
//! keeps OpenLDAP groups from becoming empty.

use super::conn::rc;
use super::{dn, single, values, LdapDirectory};
use crate::ports::DirectoryError;
use jitbot_core::{GroupDn, UserId};
use ldap3::controls::RawControl;
use ldap3::{ldap_escape, Mod, Scope};
use std::collections::{HashMap, HashSet};

/// Values one ranged read asks for: AD's default `MaxValRange`. A DC with a
/// lower limit answers with fewer, and the next read starts where it stopped.
const RANGE_STEP: usize = 1500;

/// The attribute of an AD user naming their primary group by RID: a
/// membership `member` does not show. Recorded as a [`Membership`]'s
/// attribute it is only ever read, never written.
pub(super) const PRIMARY_GROUP: &str = "primaryGroupID";

impl LdapDirectory {
    /// Every value of `attr` in `group` (a base search). Active Directory
    /// answers a plain read of `member` with at most `MaxValRange` values
    /// (1,500 by default), so there it is read in ranges.
    pub(super) async fn member_values(
        &self,
        group: &GroupDn,
        attr: &str,
    ) -> Result<Vec<String>, DirectoryError> {
        if self.active_directory && attr.eq_ignore_ascii_case("member") {
            return self.ranged_values(group, attr, Vec::new()).await;
        }
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
                let found: Vec<String> = if self.active_directory {
                    // AD sends a large group's `member` in ranges only.
                    self.member_values(&GroupDn::new(group.as_str()), "member")
                        .await?
                } else {
                    values(entry, "member")
                        .iter()
                        .chain(values(entry, "uniqueMember"))
                        .cloned()
                        .collect()
                };
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

    /// Every value of `attr` on `group` through ranged retrieval:
    /// `attr;range=0-1499`, then from one past the end the server reports,
    /// until it reports `*` (the last values).
    /// `controls` go with every read (the extended-DN control, say).
    pub(super) async fn ranged_values(
        &self,
        group: &GroupDn,
        attr: &str,
        controls: Vec<RawControl>,
    ) -> Result<Vec<String>, DirectoryError> {
        let mut all = Vec::new();
        let mut start = 0usize;
        loop {
            let want = format!("{attr};range={start}-{}", start + RANGE_STEP - 1);
            let (entries, result) = self
                .search_with(
                    controls.clone(),
                    group.as_str(),
                    Scope::Base,
                    "(objectClass=*)",
                    &[want.as_str()],
                )
                .await?;
            match result.rc {
                rc::SUCCESS => {}
                rc::NO_SUCH_OBJECT => return Err(DirectoryError::NoSuchGroup(group.to_string())),
                _ => return Err(self.refusal(&result, &format!("read {group}"))),
            }
            let Some(entry) = entries.first() else {
                return Ok(all);
            };
            match ranged(&entry.attrs, attr) {
                Range::Whole(values) => {
                    all.extend(values);
                    return Ok(all);
                }
                Range::Last(values) => {
                    all.extend(values);
                    return Ok(all);
                }
                Range::Part(values, end) if end >= start => {
                    all.extend(values);
                    start = end + 1;
                }
                Range::Part(_, end) => {
                    return Err(DirectoryError::Refused(format!(
                        "read {group}: asked for {want}, the server answered a range ending at {end}"
                    )))
                }
            }
        }
    }

    /// AD: direct members of `group` under `user_base` by normalized DN, from
    /// one paged search on `memberOf` (a group can have more members than
    /// the server returns per page) rather than one read per member.
    pub(super) async fn member_ids_by_dn(
        &self,
        group: &GroupDn,
    ) -> Result<HashMap<String, UserId>, DirectoryError> {
        let filter = format!("(memberOf={})", ldap_escape(group.as_str()));
        let (entries, result) = self
            .search_paged(&self.user_base, Scope::Subtree, &filter, &[self.id_attr.as_str()])
            .await?;
        self.check_user_base(&result)?;
        Ok(entries
            .iter()
            .filter_map(|e| {
                let id = single(values(e, &self.id_attr))?;
                Some((dn::normalize(&e.dn), UserId::new(id)))
            })
            .collect())
    }

    /// Active Directory: the group's RID, the last sub-authority of its
    /// `objectSid` (what users' `primaryGroupID` holds).
    pub(super) async fn group_rid(&self, group: &GroupDn) -> Result<Option<u32>, DirectoryError> {
        let (entries, result) = self
            .search(group.as_str(), Scope::Base, "(objectClass=*)", &["objectSid"])
            .await?;
        match result.rc {
            rc::SUCCESS => {}
            rc::NO_SUCH_OBJECT => return Err(DirectoryError::NoSuchGroup(group.to_string())),
            _ => return Err(self.refusal(&result, &format!("read {group}"))),
        }
        let sid = entries.first().and_then(|e| {
            e.bin_attrs
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case("objectSid"))
                .and_then(|(_, v)| v.first().cloned())
                .or_else(|| values(e, "objectSid").first().map(|s| s.as_bytes().to_vec()))
        });
        Ok(sid.as_deref().and_then(rid_of_sid))
    }

    /// Active Directory: the users whose primary group is `group` (found by
    /// `primaryGroupID`, in one paged search of the group's domain), each
    /// as a [`MemberKind::PrimaryGroup`](crate::ports::MemberKind) member.
    pub(super) async fn primary_members(
        &self,
        group: &GroupDn,
    ) -> Result<Vec<(String, Option<UserId>)>, DirectoryError> {
        let Some(rid) = self.group_rid(group).await? else {
            return Ok(Vec::new());
        };
        let base = super::nested::dc_suffix(group.as_str());
        let filter = format!("({PRIMARY_GROUP}={rid})");
        let (entries, result) = self
            .search_paged(&base, Scope::Subtree, &filter, &[self.id_attr.as_str()])
            .await?;
        if result.rc != rc::SUCCESS {
            return Err(self.refusal(&result, &format!("search {base} for {filter}")));
        }
        Ok(entries
            .into_iter()
            .map(|e| {
                let id = single(values(&e, &self.id_attr)).map(UserId::new);
                (e.dn, id)
            })
            .collect())
    }

    /// Whether the user entry `m.value` still has `m.group` as its primary group.
    pub(super) async fn has_primary_group(
        &self,
        m: &crate::ports::Membership,
    ) -> Result<bool, DirectoryError> {
        let Some(rid) = self.group_rid(&m.group).await? else {
            return Ok(false);
        };
        let filter = format!("({PRIMARY_GROUP}={rid})");
        let (entries, result) = self.search(&m.value, Scope::Base, &filter, &["1.1"]).await?;
        match result.rc {
            rc::SUCCESS => Ok(!entries.is_empty()),
            rc::NO_SUCH_OBJECT => Ok(false),
            _ => Err(self.refusal(&result, &format!("read {}", m.value))),
        }
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

/// One answer to a ranged read of an attribute.
#[derive(Debug, PartialEq, Eq)]
enum Range {
    /// The server ignored the range and sent every value (or none).
    Whole(Vec<String>),
    /// `attr;range=N-*`: these are the last values.
    Last(Vec<String>),
    /// `attr;range=N-M`: more values follow from `M + 1`.
    Part(Vec<String>, usize),
}

/// Reads the answer to `attr;range=...` from an entry's attributes: the
/// server names the range it sent in the attribute description.
fn ranged(attrs: &HashMap<String, Vec<String>>, attr: &str) -> Range {
    for (name, vals) in attrs {
        let Some((base, options)) = name.split_once(';') else {
            continue;
        };
        if !base.eq_ignore_ascii_case(attr) {
            continue;
        }
        let range = options.split(';').find_map(|o| {
            o.get(..6)
                .filter(|p| p.eq_ignore_ascii_case("range="))
                .map(|_| &o[6..])
        });
        let Some(end) = range.and_then(|r| r.split_once('-')).map(|(_, end)| end) else {
            continue;
        };
        return match end.parse::<usize>() {
            Ok(end) => Range::Part(vals.clone(), end),
            // `*`, or anything that is no number: nothing more to ask for.
            Err(_) => Range::Last(vals.clone()),
        };
    }
    Range::Whole(values_of(attrs, attr))
}

fn values_of(attrs: &HashMap<String, Vec<String>>, attr: &str) -> Vec<String> {
    attrs
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(attr))
        .map(|(_, v)| v.clone())
        .unwrap_or_default()
}

/// The RID of a binary SID: its last sub-authority (little-endian).
fn rid_of_sid(sid: &[u8]) -> Option<u32> {
    let count = usize::from(*sid.get(1)?);
    if count == 0 || sid.len() < 8 + 4 * count {
        return None;
    }
    let last = &sid[8 + 4 * (count - 1)..8 + 4 * count];
    Some(u32::from_le_bytes([last[0], last[1], last[2], last[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(pairs: &[(&str, &[&str])]) -> HashMap<String, Vec<String>> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect()))
            .collect()
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn ranged_answers() {
        let cases: Vec<(HashMap<String, Vec<String>>, Range)> = vec![
            (
                attrs(&[("member;range=0-1499", &["a", "b"])]),
                Range::Part(strings(&["a", "b"]), 1499),
            ),
            (
                attrs(&[("Member;Range=1500-*", &["c"])]),
                Range::Last(strings(&["c"])),
            ),
            (attrs(&[("member", &["a"])]), Range::Whole(strings(&["a"]))),
            (attrs(&[]), Range::Whole(vec![])),
            (attrs(&[("memberOf;range=0-*", &["x"])]), Range::Whole(vec![])),
            (
                attrs(&[("member;range=0-999", &["a"]), ("cn", &["g"])]),
                Range::Part(strings(&["a"]), 999),
            ),
            (
                attrs(&[("member;x-tag;range=10-19", &["a"])]),
                Range::Part(strings(&["a"]), 19),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(ranged(&input, "member"), want, "{input:?}");
        }
    }

    #[test]
    fn a_sid_gives_its_last_sub_authority() {
        // S-1-5-21-1-2-3-1105
        let mut sid = vec![1u8, 5, 0, 0, 0, 0, 0, 5];
        for sub in [21u32, 1, 2, 3, 1105] {
            sid.extend_from_slice(&sub.to_le_bytes());
        }
        assert_eq!(rid_of_sid(&sid), Some(1105));
        assert_eq!(rid_of_sid(&sid[..20]), None);
        assert_eq!(rid_of_sid(&[1, 0, 0, 0, 0, 0, 0, 5]), None);
        assert_eq!(rid_of_sid(&[]), None);
    }
}
