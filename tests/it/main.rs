//! The one integration test binary: one module per area.

#[path = "../support/mod.rs"]
mod support;

mod ldap;
mod lifecycle;
mod slack;
mod console;
mod ldap_flow;
mod discord;
mod ops;
