//! A user entry's stable identity — `objectGUID` on Active Directory,
//! `entryUUID` on OpenLDAP — recorded with a lease's membership and
//! resolved to the user's *current* DN when the membership is checked or
//! removed.
//!
//! A DN does not stay put: a user renamed or moved keeps their entry (and
//! its GUID/UUID) under a new DN. Active Directory rewrites the group's
//! `member` value to the new DN by itself (a linked attribute), as does
//! OpenLDAP with the refint overlay; plain OpenLDAP keeps the old value.
//! So the value to remove is found from the identity, never assumed to be
//! the one recorded at grant.

use super::conn::rc;
use super::{dn, LdapDirectory};
use crate::config::MembershipKind;
use crate::ports::{DirectoryError, Membership};
use jitbot_core::GroupDn;
use ldap3::controls::RawControl;
use ldap3::{ldap_escape, Scope, SearchEntry};
use std::fmt::Write as _;

const GUID: &str = "objectGUID";
const UUID: &str = "entryUUID";

/// Active Directory's LDAP_SERVER_EXTENDED_DN control. Sent without a
/// value, the DC prefixes every DN it returns with the linked entry's
/// `<GUID=hex>` (and `<SID=hex>`), hex in the byte order of `objectGUID`,
/// whether or not the bound account may read that entry.
const EXTENDED_DN: &str = "1.2.840.113556.1.4.529";

/// The value a membership check or removal works on, and what is worth
/// telling the audit about how it was found.
pub(super) struct Resolved {
    /// `None`: the group holds nothing for this membership any more.
    pub value: Option<String>,
    pub note: Option<String>,
    /// Active Directory: the recorded `objectGUID` (hex) that `value` was
    /// found by among the group's own `member` values (read with the
    /// extended-DN control), so the removal is checked against it too.
    pub guid: Option<String>,
}

impl LdapDirectory {
    /// The attribute holding a user entry's stable identity here.
    pub(super) fn identity_attribute(&self) -> &'static str {
        if self.active_directory {
            GUID
        } else {
            UUID
        }
    }

    /// The entry's identity as recorded on a membership (`objectGUID:<hex>`
    /// or `entryUUID:<uuid>`); `None` when the server sent none.
    pub(super) fn identity_of(&self, entry: &SearchEntry) -> Option<String> {
        if self.active_directory {
            // Binary: ldap3 keeps it in `bin_attrs`, or in `attrs` when the
            // bytes happen to be valid UTF-8.
            let bytes: Vec<u8> = entry
                .bin_attrs
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case(GUID))
                .and_then(|(_, v)| v.first().cloned())
                .or_else(|| super::values(entry, GUID).first().map(|s| s.as_bytes().to_vec()))?;
            if bytes.len() != 16 {
                return None;
            }
            let hex = bytes.iter().fold(String::with_capacity(32), |mut s, b| {
                let _ = write!(s, "{b:02x}");
                s
            });
            Some(format!("{GUID}:{hex}"))
        } else {
            super::single(super::values(entry, UUID)).map(|u| format!("{UUID}:{u}"))
        }
    }

    /// The DN of the entry with this recorded identity now; `None` when no
    /// entry has it (deleted). Active Directory is asked for the entry by
    /// GUID itself (`<GUID=…>` as the base of a base search: one lookup,
    /// wherever in the forest's partitions this DC holds it); OpenLDAP by
    /// `entryUUID` under each naming context.
    pub(super) async fn current_dn(&self, identity: &str) -> Result<Option<String>, DirectoryError> {
        let filter = identity_filter(identity)?;
        let searches: Vec<(String, Scope, String)> = match identity.split_once(':') {
            Some((GUID, hex)) if self.active_directory => {
                vec![(
                    format!("<GUID={hex}>"),
                    Scope::Base,
                    "(objectClass=*)".to_string(),
                )]
            }
            _ => self
                .naming_contexts()
                .await?
                .iter()
                .map(|base| (base.clone(), Scope::Subtree, filter.clone()))
                .collect(),
        };
        let mut found = Vec::new();
        for (base, scope, filter) in &searches {
            let (entries, result) = self.search(base, *scope, filter, &["1.1"]).await?;
            match result.rc {
                // A partition this server does not hold answers with a
                // referral: the entry is not there.
                rc::SUCCESS | rc::NO_SUCH_OBJECT | rc::REFERRAL => {}
                _ => return Err(self.refusal(&result, &format!("search {base} for {identity}"))),
            }
            found.extend(entries.into_iter().map(|e| e.dn));
        }
        match found.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some(one.clone())),
            _ => Err(DirectoryError::Ambiguous(identity.to_string())),
        }
    }

    /// Whether the entry at `dn` is the one with this identity.
    async fn still_at(&self, dn: &str, identity: &str) -> Result<bool, DirectoryError> {
        let filter = identity_filter(identity)?;
        let (entries, result) = self.search(dn, Scope::Base, &filter, &["1.1"]).await?;
        match result.rc {
            rc::SUCCESS => Ok(!entries.is_empty()),
            rc::NO_SUCH_OBJECT => Ok(false),
            _ => Err(self.refusal(&result, &format!("read {dn}"))),
        }
    }

    /// The value of `m` as the group holds it today. Without an identity
    /// (`memberUid`, old leases, a server without one) that is the recorded
    /// value. Otherwise the user's current DN when they were renamed or
    /// moved and the directory rewrote the value (always on Active
    /// Directory; OpenLDAP keeps the recorded value unless refint is on).
    /// A user deleted entirely: AD dropped the value with the entry, so
    /// there is nothing left (`value` is `None`, and a value under the old
    /// DN now would be another entry's); plain OpenLDAP kept it, and it is
    /// removed as recorded.
    pub(super) async fn resolve(
        &self,
        m: &Membership,
        kind: MembershipKind,
    ) -> Result<Resolved, DirectoryError> {
        let recorded = || Resolved {
            value: Some(m.value.clone()),
            note: None,
            guid: None,
        };
        let Some(identity) = m.identity.as_deref() else {
            return Ok(recorded());
        };
        if kind == MembershipKind::MemberUid {
            return Ok(recorded());
        }
        if let (true, Some((GUID, hex))) = (self.active_directory, identity.split_once(':')) {
            identity_filter(identity)?;
            return self.resolve_by_guid(m, &hex.to_ascii_lowercase()).await;
        }
        let attr = super::attribute(kind);
        // The usual case, in one base search: the user is where they were.
        if self.still_at(&m.value, identity).await? {
            return Ok(recorded());
        }
        match self.current_dn(identity).await? {
            Some(now) if dn::normalize(&now) == dn::normalize(&m.value) => Ok(recorded()),
            Some(now) => {
                // Plain OpenLDAP kept the value jitbot wrote: that is what
                // the lease added, and what goes — but only while the
                // recorded DN names no entry. When it names another entry
                // (someone created at the old DN), a value under it is that
                // entry's, and the lease's value followed the user (refint).
                if !self.active_directory
                    && !self.entry_exists(&m.value).await?
                    && self.has_value(&m.group, attr, &m.value).await?
                {
                    return Ok(Resolved {
                        value: Some(m.value.clone()),
                        note: Some(format!(
                            "the user's entry is now {now}; the value jitbot wrote ({}) was still in the group",
                            m.value
                        )),
                        guid: None,
                    });
                }
                tracing::info!(group = %m.group, recorded = %m.value, now = %now, "the user was renamed or moved during the lease; working on their current DN");
                Ok(Resolved {
                    note: Some(format!(
                        "the user was renamed or moved during the lease ({} is now {now}); the membership \
                         was removed under the new DN",
                        m.value
                    )),
                    value: Some(now),
                    guid: None,
                })
            }
            // AD's values are links: the deleted entry's went with it, and a
            // value under that DN now is another entry's, not the lease's.
            None if self.active_directory => Ok(Resolved {
                value: None,
                note: Some(format!(
                    "the user's entry ({}) no longer exists and the directory dropped its membership with it",
                    m.value
                )),
                guid: None,
            }),
            None => {
                let gone = !self.has_value(&m.group, attr, &m.value).await?;
                Ok(Resolved {
                    value: Some(m.value.clone()),
                    note: gone.then(|| {
                        format!(
                            "the user's entry ({}) no longer exists and the directory dropped its membership \
                             value with it",
                            m.value
                        )
                    }),
                    guid: None,
                })
            }
        }
    }

    /// The value an add writes for `m`: the recorded one, unless the
    /// recorded identity's entry is now elsewhere (renamed or moved) —
    /// then its current DN; refused when no entry has the identity.
    pub(super) async fn value_to_add(
        &self,
        m: &Membership,
        kind: MembershipKind,
    ) -> Result<String, DirectoryError> {
        let Some(identity) = m.identity.as_deref() else {
            return Ok(m.value.clone());
        };
        if kind == MembershipKind::MemberUid || self.still_at(&m.value, identity).await? {
            return Ok(m.value.clone());
        }
        match self.current_dn(identity).await? {
            Some(now) => {
                tracing::info!(group = %m.group, recorded = %m.value, now = %now, "the user was renamed or moved since the lease recorded them; adding their current DN");
                Ok(now)
            }
            None => Err(DirectoryError::Refused(format!(
                "the user recorded for this lease ({}, {identity}) no longer exists under that identity: the \
                 entry was deleted, or is one the service account may not read; nothing was added — ask for \
                 the access again",
                m.value
            ))),
        }
    }

    /// After an add: the entry at the value written is still the recorded
    /// identity (a rename between the lookup and the add would otherwise
    /// grant whoever took the DN).
    pub(super) async fn check_added_identity(
        &self,
        m: &Membership,
        kind: MembershipKind,
        value: &str,
    ) -> Result<(), DirectoryError> {
        let Some(identity) = m.identity.as_deref() else {
            return Ok(());
        };
        if kind == MembershipKind::MemberUid || self.still_at(value, identity).await? {
            return Ok(());
        }
        Err(DirectoryError::Refused(format!(
            "added {value} to {}, but that entry is no longer the lease's user ({identity}): the user was \
             renamed or moved during the add; the undo removes the lease's membership, check the group",
            m.group
        )))
    }

    /// Active Directory, after a removal: no `member` value carries the
    /// lease's GUID any more (read with the extended-DN control, so a user
    /// the service account cannot read is seen too).
    pub(super) async fn check_removed_guid(
        &self,
        group: &GroupDn,
        guid: &str,
        value: &str,
    ) -> Result<(), DirectoryError> {
        if !self.member_guids(group).await?.iter().any(|(g, _)| g == guid) {
            return Ok(());
        }
        Err(DirectoryError::Refused(format!(
            "removed {value} from {group}, but the group still holds a member value with the user's identity \
             ({GUID}:{guid}); the service account may lack rights on the user's entry (for example in an OU \
             it may not read): remove the membership by hand or grant the account read access there"
        )))
    }

    /// Active Directory: the DN of the lease's user when `m.group` is their
    /// primary group (a membership with no `member` value); `None`
    /// elsewhere, or when the user cannot be found by identity.
    pub(super) async fn in_primary_group(&self, m: &Membership) -> Result<Option<String>, DirectoryError> {
        if !self.active_directory || !m.attribute.eq_ignore_ascii_case("member") {
            return Ok(None);
        }
        let dn = match m.identity.as_deref() {
            Some(identity) => match self.current_dn(identity).await? {
                Some(dn) => dn,
                None => return Ok(None),
            },
            None => m.value.clone(),
        };
        let probe = Membership {
            value: dn.clone(),
            ..m.clone()
        };
        Ok(self.has_primary_group(&probe).await?.then_some(dn))
    }

    /// Whether any entry is named `dn` (a base search).
    async fn entry_exists(&self, dn: &str) -> Result<bool, DirectoryError> {
        let (entries, result) = self.search(dn, Scope::Base, "(objectClass=*)", &["1.1"]).await?;
        match result.rc {
            rc::SUCCESS => Ok(!entries.is_empty()),
            rc::NO_SUCH_OBJECT => Ok(false),
            _ => Err(self.refusal(&result, &format!("read {dn}"))),
        }
    }

    /// Active Directory: every `member` value of `group` as `(guid, dn)`,
    /// the linked entry's `objectGUID` in lowercase hex, read with the
    /// extended-DN control (critical: a server without it refuses the read,
    /// and jitbot claims nothing). A value the DC sends without a GUID is an
    /// error too: which value is the lease's could not be told.
    pub(super) async fn member_guids(
        &self,
        group: &GroupDn,
    ) -> Result<Vec<(String, String)>, DirectoryError> {
        let control = RawControl {
            ctype: EXTENDED_DN.to_string(),
            crit: true,
            val: None,
        };
        let values = self.ranged_values(group, "member", vec![control]).await?;
        values
            .iter()
            .map(|v| {
                extended_dn(v).ok_or_else(|| {
                    DirectoryError::Refused(format!(
                        "read `member` of {group} with the extended-DN control ({EXTENDED_DN}): the DC sent \
                         `{v}` without a <GUID=…>, so jitbot cannot tell which value is the lease's and \
                         changes nothing; ldap.active_directory = true needs a DC that supports the control"
                    ))
                })
            })
            .collect()
    }

    /// Active Directory: the lease's value found among the group's own
    /// `member` values by the recorded GUID — wherever the user was moved,
    /// and whether or not the service account may read the user's entry.
    /// The membership is gone only when no value carries the GUID.
    async fn resolve_by_guid(&self, m: &Membership, guid: &str) -> Result<Resolved, DirectoryError> {
        let values = self.member_guids(&m.group).await?;
        if let Some((_, now)) = values.iter().find(|(g, _)| g == guid) {
            if dn::normalize(now) == dn::normalize(&m.value) {
                return Ok(Resolved {
                    value: Some(m.value.clone()),
                    note: None,
                    guid: Some(guid.to_string()),
                });
            }
            tracing::info!(group = %m.group, recorded = %m.value, now = %now, "the user was renamed or moved during the lease; working on their current DN");
            return Ok(Resolved {
                note: Some(format!(
                    "the user was renamed or moved during the lease ({} is now {now}); the membership was \
                     removed under the new DN",
                    m.value
                )),
                value: Some(now.clone()),
                guid: Some(guid.to_string()),
            });
        }
        // No value is the lease's. A value under the recorded DN that links
        // to another entry is that entry's, never removed for this lease;
        // it also means the lease record and the directory disagree (a new
        // entry at the old DN, or a record altered in the store): say so.
        if let Some((other, _)) = values
            .iter()
            .find(|(_, v)| dn::normalize(v) == dn::normalize(&m.value))
        {
            tracing::warn!(
                group = %m.group,
                recorded_dn = %m.value,
                recorded_identity = %format!("{GUID}:{guid}"),
                value_identity = %format!("{GUID}:{other}"),
                "the group holds the recorded DN for a different entry and nothing for the lease's identity; \
                 leaving that value alone (check the lease record in the store and the audit)"
            );
            return Ok(Resolved {
                value: None,
                note: Some(format!(
                    "no member value carries the lease's identity ({GUID}:{guid}); the value {} in the group \
                     is another entry's ({GUID}:{other}) and was left in place — if nobody renamed the user and \
                     reused the DN, check the lease record in the store",
                    m.value
                )),
                guid: None,
            });
        }
        let identity = format!("{GUID}:{guid}");
        let note = match self.current_dn(&identity).await? {
            Some(now) => format!(
                "no member value of the group carries the user's identity ({identity}); the user ({now}) was \
                 taken out of the group by someone else"
            ),
            None => format!(
                "the user's entry ({}, {identity}) no longer exists (or the service account may not read it) \
                 and no member value of the group carries its identity: the directory dropped its \
                 membership with it",
                m.value
            ),
        };
        Ok(Resolved {
            value: None,
            note: Some(note),
            guid: None,
        })
    }
}

/// Splits an extended DN in hex form (`<GUID=hex>;<SID=hex>;dn`) into the
/// GUID (lowercase hex) and the DN; `None` without a well-formed GUID.
fn extended_dn(value: &str) -> Option<(String, String)> {
    let mut rest = value;
    let mut guid = None;
    while let Some(after) = rest.strip_prefix('<') {
        let (component, tail) = after.split_once('>')?;
        if let Some((name, v)) = component.split_once('=') {
            if name.eq_ignore_ascii_case("GUID") {
                guid = Some(v.to_ascii_lowercase());
            }
        }
        rest = tail.strip_prefix(';').unwrap_or(tail);
    }
    let guid = guid.filter(|g| g.len() == 32 && g.bytes().all(|b| b.is_ascii_hexdigit()))?;
    Some((guid, rest.to_string()))
}

/// A search filter for a recorded identity; anything but the two known
/// forms is refused (a recorded string never shapes a filter).
fn identity_filter(identity: &str) -> Result<String, DirectoryError> {
    let bad = || DirectoryError::Refused(format!("`{identity}` is not a recorded user identity"));
    let (attr, value) = identity.split_once(':').ok_or_else(bad)?;
    match attr {
        GUID => {
            if value.len() != 32 || !value.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            let escaped = value
                .as_bytes()
                .chunks(2)
                .fold(String::with_capacity(48), |mut s, pair| {
                    s.push('\\');
                    s.push(char::from(pair[0]));
                    s.push(char::from(pair[1]));
                    s
                });
            Ok(format!("({GUID}={escaped})"))
        }
        UUID => {
            if value.is_empty() || !value.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
                return Err(bad());
            }
            Ok(format!("({UUID}={})", ldap_escape(value)))
        }
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extended_dns_give_the_guid_and_the_dn() {
        let guid = "00112233445566778899aabbccddeeff";
        assert_eq!(
            extended_dn(&format!("<GUID={}>;<SID=010500>;CN=A,DC=x", guid.to_uppercase())),
            Some((guid.to_string(), "CN=A,DC=x".to_string()))
        );
        assert_eq!(
            extended_dn(&format!("<GUID={guid}>;CN=G,DC=x")),
            Some((guid.to_string(), "CN=G,DC=x".to_string()))
        );
        for bad in [
            "CN=A,DC=x",
            "<SID=0105>;CN=A",
            "<GUID=0011>;CN=A",
            "<GUID=00112233",
        ] {
            assert_eq!(extended_dn(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn identities_become_exact_filters_and_nothing_else_does() {
        assert_eq!(
            identity_filter("objectGUID:00112233445566778899aabbccddeeff").unwrap(),
            r"(objectGUID=\00\11\22\33\44\55\66\77\88\99\aa\bb\cc\dd\ee\ff)"
        );
        assert_eq!(
            identity_filter("entryUUID:1b4e28ba-2fa1-11d2-883f-0016d3cca427").unwrap(),
            "(entryUUID=1b4e28ba-2fa1-11d2-883f-0016d3cca427)"
        );
        for bad in [
            "",
            "objectGUID:0011",
            "objectGUID:zz112233445566778899aabbccddeeff",
            "entryUUID:*",
            "entryUUID:x)(uid=*",
            "uid:alice",
            "objectGUID",
        ] {
            assert!(identity_filter(bad).is_err(), "{bad:?}");
        }
    }
}
