//! The one integration test binary: one module per area.

#[path = "../support/mod.rs"]
mod support;

mod ad;
mod archive_copies;
mod archive_edges;
mod backup;
mod console;
mod contract;
mod deploy;
mod discord;
mod failover;
mod faults;
mod gateway;
mod hardening;
mod invariant_breaks;
mod invariants;
mod ldap;
mod ldap_flow;
mod lifecycle;
mod observability;
mod ops;
mod outbox;
mod pg;
mod recheck;
mod replicas;
mod retention;
mod safeguards;
#[path = "../sim/mod.rs"]
mod sim;
mod slack;
mod slack_dm_delivery;
mod socket_mode;
mod startup;
mod store;
