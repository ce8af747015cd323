//! The one integration test binary: one module per area.

#[path = "../support/mod.rs"]
mod support;

mod console;
mod discord;
mod faults;
mod gateway;
mod hardening;
mod invariants;
mod ldap;
mod ldap_flow;
mod lifecycle;
mod ops;
mod safeguards;
mod slack;
mod socket_mode;
mod store;
