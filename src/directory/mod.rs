//! Directory adapters: LDAP for production, in-memory for tests and the demo.

pub mod ldap;
pub mod memory;
