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

string_id!(
    /// A directory account name (for example the `uid` on OpenLDAP or the
    /// `sAMAccountName` on Active Directory). Chat identities are mapped to it
    /// by the adapters before anything reaches the core.
    UserId
);
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
