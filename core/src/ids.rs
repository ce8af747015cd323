//! Newtypes for the identifiers that flow through jitbot.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn new(value: impl Into<String>) -> Self {
                Self(value.into())
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

/// A directory account name (for example the `uid` on OpenLDAP or the
/// `sAMAccountName` on Active Directory). Chat identities are mapped to it
/// by the adapters before anything reaches the core.
///
/// Directories compare account names without regard to ASCII case (`uid`
/// and `sAMAccountName` both match case-insensitively), so `UserId` does too:
/// `Alice` from a Discord map and `alice` from Slack are one person, who can
/// neither approve their own request nor count twice towards N of M. The
/// spelling is kept as given, for display and for writing.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UserId(String);

impl UserId {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The spelling every comparison uses (ASCII lower case).
    pub fn folded(&self) -> String {
        self.0.to_ascii_lowercase()
    }
}

impl PartialEq for UserId {
    fn eq(&self, other: &Self) -> bool {
        self.0.eq_ignore_ascii_case(&other.0)
    }
}

impl Eq for UserId {}

impl PartialOrd for UserId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for UserId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let a = self.0.bytes().map(|b| b.to_ascii_lowercase());
        a.cmp(other.0.bytes().map(|b| b.to_ascii_lowercase()))
    }
}

impl std::hash::Hash for UserId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        for b in self.0.bytes() {
            state.write_u8(b.to_ascii_lowercase());
        }
        state.write_u8(0xff);
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
string_id!(
    /// The short name of a managed group as people type it in chat (`db-admins`).
    GroupName
);
string_id!(
    /// The distinguished name of a directory group.
    GroupDn
);
string_id!(
    /// The identifier of an access request (short, typeable in chat).
    RequestId
);
string_id!(
    /// The identifier of a lease: a granted, time-bounded membership.
    LeaseId
);

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeSet, HashSet};

    #[test]
    fn user_ids_compare_as_directories_do() {
        assert_eq!(UserId::new("Alice"), UserId::new("alice"));
        assert_ne!(UserId::new("alice"), UserId::new("alicia"));
        let set: BTreeSet<UserId> = [UserId::new("Alice"), UserId::new("ALICE")].into();
        assert_eq!(set.len(), 1);
        let hashed: HashSet<UserId> = [UserId::new("Bob"), UserId::new("bob")].into();
        assert_eq!(hashed.len(), 1);
        assert_eq!(UserId::new("Alice").to_string(), "Alice", "the spelling is kept");
    }
}
