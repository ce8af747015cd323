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
use ldap3::{ldap_escape, Scope, SearchEntry};
use std::fmt::Write as _;

const GUID: &str = "objectGUID";
const UUID: &str = "entryUUID";

/// The value a membership check or removal works on, and what is worth
/// telling the audit about how it was found.
pub(super) struct Resolved {
    /// `None`: the group holds nothing for this membership any more.
    pub value: Option<String>,
    pub note: Option<String>,
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
        };
        let Some(identity) = m.identity.as_deref() else {
            return Ok(recorded());
        };
        if kind == MembershipKind::MemberUid {
            return Ok(recorded());
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
                // the lease added, and what goes.
                if !self.active_directory && self.has_value(&m.group, attr, &m.value).await? {
                    return Ok(Resolved {
                        value: Some(m.value.clone()),
                        note: Some(format!(
                            "the user's entry is now {now}; the value jitbot wrote ({}) was still in the group",
                            m.value
                        )),
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
                })
            }
        }
    }
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
