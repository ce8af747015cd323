//! `jitbot check-config` against the directory: the groups exist, have the
//! configured shape, and the service account may change their membership.

use super::conn::{describe, rc};
use super::{ad_ttl_value, attribute, dn, values, LdapDirectory};
use crate::config::{GroupConfig, MembershipKind};
use crate::ports::{Directory, DirectoryError};
use jitbot_core::GroupDn;
use ldap3::{Mod, Scope};
use std::collections::HashSet;

/// The `memberUid` value used to test write access to posix groups.
const PROBE_UID: &str = "jitbot-write-check";
/// Seconds of the TTL membership the `ad_ttl` probe writes (and deletes in
/// the same modify): short, should a DC ever keep it.
const PROBE_TTL: u64 = 60;

impl LdapDirectory {
    /// Binds and checks every group; returns the problems in plain words
    /// (lines starting with `warning:` do not stop jitbot). Empty means fine.
    ///
    /// The write check is a real but harmless modify: one operation that
    /// adds a value to the membership attribute and deletes it again (or
    /// deletes and re-adds it when already present), so the group ends as it
    /// began while the server checks the service account's write right. The
    /// value is the placeholder DN (else the bind DN) for DN groups and
    /// `jitbot-write-check` for posix groups. When it was not there, it is
    /// then added, read back and removed (two more modifies: the account
    /// must be able to read what it writes). Tried against Samba's AD DC.
    /// On AD the group's `allowedAttributesEffective` must list the
    /// attribute too: the probe's own DN passes with "Add/Remove self as
    /// member" alone.
    pub async fn check_groups(&self, groups: &[GroupConfig]) -> Vec<String> {
        if let Err(e) = self.ping().await {
            return vec![format!("cannot use the directory: {e}")];
        }
        let mut problems = Vec::new();
        for g in groups {
            let label = format!("group {} ({})", g.name, g.dn);
            match self.check_shape(g).await {
                Ok(None) => {}
                Ok(Some(problem)) => {
                    problems.push(format!("{label}: {problem}"));
                    continue;
                }
                Err(e) => {
                    problems.push(format!("{label}: {e}"));
                    continue;
                }
            }
            if let Some(problem) = self.check_write(g).await {
                problems.push(format!("{label}: {problem}"));
            } else if let Some(warning) = self.check_ttl(g).await {
                problems.push(format!("warning: {label}: {warning}"));
            }
            problems.extend(
                self.warnings(g)
                    .into_iter()
                    .map(|w| format!("warning: {label}: {w}")),
            );
        }
        problems
    }

    /// The group exists and its object classes hold the configured kind.
    async fn check_shape(&self, g: &GroupConfig) -> Result<Option<String>, crate::ports::DirectoryError> {
        let (entries, result) = self
            .search(&g.dn, Scope::Base, "(objectClass=*)", &["objectClass"])
            .await?;
        match result.rc {
            rc::SUCCESS => {}
            rc::NO_SUCH_OBJECT => return Ok(Some("does not exist in the directory; check its `dn`".into())),
            _ => return Ok(Some(format!("cannot be read: {}", describe(&result)))),
        }
        let classes = entries
            .first()
            .map(|e| values(e, "objectClass").to_vec())
            .unwrap_or_default();
        let expected: &[&str] = match g.membership {
            MembershipKind::Member => &["groupOfNames", "group"],
            MembershipKind::UniqueMember => &["groupOfUniqueNames"],
            MembershipKind::MemberUid => &["posixGroup"],
        };
        let fits = classes
            .iter()
            .any(|c| expected.iter().any(|e| e.eq_ignore_ascii_case(c)));
        Ok((!fits).then(|| {
            format!(
                "membership = \"{}\" expects object class {} but the entry has {}; set `membership` to match",
                attribute(g.membership),
                expected.join(" or "),
                classes.join(", ")
            )
        }))
    }

    /// The DN written by the write checks: the placeholder, else the bind DN.
    fn probe_dn(&self) -> String {
        self.placeholder
            .clone()
            .unwrap_or_else(|| self.conn.bind_dn().to_string())
    }

    async fn check_write(&self, g: &GroupConfig) -> Option<String> {
        let attr = attribute(g.membership);
        if self.active_directory {
            match self.may_write_any(&g.dn, attr).await {
                Ok(true) => {}
                Ok(false) => {
                    return Some(format!(
                        "{} may not modify `{attr}` (the DC does not list it in the group's \
                         allowedAttributesEffective: \"Add/Remove self as member\" is not enough); grant it \
                         \"Write Members\" on the group",
                        self.conn.bind_dn()
                    ))
                }
                Err(e) => return Some(e.to_string()),
            }
        }
        let probe = match g.membership {
            MembershipKind::MemberUid => PROBE_UID.to_string(),
            _ => self.probe_dn(),
        };
        let present = match self.has_value(&GroupDn::new(&g.dn), attr, &probe).await {
            Ok(p) => p,
            Err(e) => return Some(e.to_string()),
        };
        let add = Mod::Add(attr.to_string(), HashSet::from([probe.clone()]));
        let delete = Mod::Delete(attr.to_string(), HashSet::from([probe.clone()]));
        let mods = if present {
            vec![delete, add]
        } else {
            vec![add, delete]
        };
        match self.modify(&g.dn, mods).await {
            Ok(result) if result.rc == rc::SUCCESS && present => None,
            // Written and taken out again in one modify: whether the
            // account may also *read* the attribute (every change is read
            // back) is told by a value it knows is there — the probe, for
            // the moment between two modifies.
            Ok(result) if result.rc == rc::SUCCESS => self.check_read(g, attr, &probe).await,
            Ok(result) if result.rc == rc::INSUFFICIENT_ACCESS => Some(format!(
                "{} may not modify `{attr}`; grant it write access to the group",
                self.conn.bind_dn()
            )),
            Ok(result) => Some(format!("test modify of `{attr}` failed: {}", describe(&result))),
            Err(e) => Some(e.to_string()),
        }
    }

    /// Adds the probe, reads it back, and takes it out again: a group whose
    /// `attr` the account may write but not read fails every grant's
    /// read-back. The probe is the placeholder (else the bind DN), which
    /// holds no person's rights; it stays in the group only for the read.
    async fn check_read(&self, g: &GroupConfig, attr: &str, probe: &str) -> Option<String> {
        let group = GroupDn::new(&g.dn);
        let add = Mod::Add(attr.to_string(), HashSet::from([probe.to_string()]));
        match self.modify(&g.dn, vec![add]).await {
            Ok(result) if result.rc == rc::SUCCESS => {}
            Ok(result) => return Some(format!("test add of `{attr}` failed: {}", describe(&result))),
            Err(e) => return Some(e.to_string()),
        }
        let seen = self.has_value(&group, attr, probe).await;
        let delete = Mod::Delete(attr.to_string(), HashSet::from([probe.to_string()]));
        let removed = match self.modify(&g.dn, vec![delete]).await {
            Ok(result) if result.rc == rc::SUCCESS || result.rc == rc::NO_SUCH_ATTRIBUTE => None,
            Ok(result) => Some(describe(&result)),
            Err(e) => Some(e.to_string()),
        };
        if let Some(why) = removed {
            return Some(format!(
                "the write test left {probe} in `{attr}` (removing it failed: {why}); remove it by hand"
            ));
        }
        match seen {
            Ok(true) => None,
            Ok(false) => Some(format!(
                "{} may write but not read `{attr}` (a value it added was not there when read back), so \
                 every grant would fail its read-back; grant it read access to `{attr}` of the group (on \
                 Active Directory: Read Property on member)",
                self.conn.bind_dn()
            )),
            Err(e) => Some(format!("reading back `{attr}`: {e}")),
        }
    }

    /// Active Directory: whether the bound account may write `attr` of the
    /// group for any value. The probe below writes the account's own DN,
    /// which AD's validated write "Add/Remove self as member" allows on its
    /// own; the DC's `allowedAttributesEffective` (computed for the bound
    /// account) lists `member` only with the full write right.
    async fn may_write_any(&self, group: &str, attr: &str) -> Result<bool, DirectoryError> {
        let (entries, result) = self
            .search(
                group,
                Scope::Base,
                "(objectClass=*)",
                &["allowedAttributesEffective"],
            )
            .await?;
        if result.rc != rc::SUCCESS {
            return Err(self.refusal(&result, &format!("read {group}")));
        }
        Ok(entries.first().is_some_and(|e| {
            values(e, "allowedAttributesEffective")
                .iter()
                .any(|a| a.eq_ignore_ascii_case(attr))
        }))
    }

    /// `ad_ttl` on Active Directory: whether the DC takes TTL membership.
    async fn check_ttl(&self, g: &GroupConfig) -> Option<String> {
        if !(g.ad_ttl && self.active_directory && g.membership == MembershipKind::Member) {
            return None;
        }
        match self.ttl_refusal(&GroupDn::new(&g.dn)).await {
            Ok(None) => None,
            Ok(Some(why)) => Some(format!(
                "the DC refuses TTL membership (ad_ttl: a `<TTL=seconds,DN>` member value was refused: {why}); \
                 jitbot falls back to its own revocation, which ends every lease anyway. TTL membership needs \
                 Windows Server 2016 forest functional level with the Privileged Access Management feature \
                 enabled (Samba has none); or set ad_ttl = false"
            )),
            Err(e) => Some(format!("could not test TTL membership (ad_ttl): {e}")),
        }
    }

    /// Whether the DC takes AD's TTL membership: `None` when it does, else
    /// why not. One harmless modify adds the probe DN with a short TTL and
    /// deletes it again (Samba answers 34, invalidDNSyntax). Untested
    /// against a Windows DC.
    pub(super) async fn ttl_refusal(&self, group: &GroupDn) -> Result<Option<String>, DirectoryError> {
        let probe = self.probe_dn();
        if self.has_value(group, "member", &probe).await? {
            return Ok(Some(format!(
                "{probe} is a member of the group, so the test could not run"
            )));
        }
        let mods = vec![
            Mod::Add(
                "member".to_string(),
                HashSet::from([ad_ttl_value(&probe, PROBE_TTL)]),
            ),
            Mod::Delete("member".to_string(), HashSet::from([probe])),
        ];
        let result = self.modify(group.as_str(), mods).await?;
        Ok(match result.rc {
            rc::SUCCESS => None,
            rc::NO_SUCH_OBJECT => return Err(DirectoryError::NoSuchGroup(group.to_string())),
            _ => Some(describe(&result)),
        })
    }

    /// Whether `add_member` writes TTL membership: asked of the DC once, on
    /// the first `ad_ttl` add. A DC that refuses gets plain values, which
    /// jitbot's own revocation removes as it does everywhere else; a probe
    /// that fails (DC unreachable) is tried again on the next add.
    pub(super) async fn ttl_accepted(&self, group: &GroupDn) -> bool {
        let probed = self
            .ttl_works
            .get_or_try_init(|| async {
                let refusal = self.ttl_refusal(group).await?;
                if let Some(why) = &refusal {
                    tracing::warn!(group = %group, why = %why, "the directory refuses TTL membership (ad_ttl); writing plain members, which jitbot's own revocation removes");
                }
                Ok::<_, DirectoryError>(refusal.is_none())
            })
            .await;
        probed.copied().unwrap_or(false)
    }

    fn warnings(&self, g: &GroupConfig) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.active_directory && dn::is_ad_protected_group(&g.dn) {
            warnings.push(
                "is protected by AdminSDHolder: Active Directory resets its permissions about every hour, \
                 so rights delegated on the group itself are lost; give the service account rights on \
                 AdminSDHolder or manage an unprotected group"
                    .to_string(),
            );
        }
        if g.ad_ttl && !self.active_directory {
            warnings.push("ad_ttl only works on Active Directory (ldap.active_directory = true)".into());
        }
        if g.ad_ttl && g.membership != MembershipKind::Member {
            warnings.push("ad_ttl only applies to membership = \"member\"".into());
        }
        let needs_placeholder = !self.active_directory && g.membership != MembershipKind::MemberUid;
        if needs_placeholder && self.placeholder.is_none() {
            warnings.push(
                "OpenLDAP refuses to remove the last member of this kind of group; set ldap.placeholder_dn"
                    .into(),
            );
        }
        warnings
    }
}
