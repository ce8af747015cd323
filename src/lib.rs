//! jitbot: just-in-time group membership from chat, with leases that always end.
//!
//! The pure rules live in the `jitbot-core` crate. This crate holds the
//! engine that applies them and the adapters around it: the sled store, the
//! directories (LDAP, in-memory), the chat platforms (Slack, Discord, the web
//! console), the scheduler, the HTTP server and the CLI. See ARCHITECTURE.md.

pub mod chat;
pub mod clock;
pub mod config;
pub mod directory;
pub mod ports;
pub mod secret;
pub mod store;
pub mod engine;
pub mod metrics;
pub mod scheduler;
pub mod audit;
pub mod http;
pub mod app;
pub mod cli;
pub mod demo;
