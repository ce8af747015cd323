//! jitbot: just-in-time group membership from chat, with leases that always end.
//!
//! The pure rules live in the `jitbot-core` crate. This crate holds the
//! engine that applies them and the adapters around it: the sled store, the
//! directories (LDAP, in-memory), the chat platforms (Slack, Discord, the web
//! console), the scheduler, the HTTP server and the CLI. See ARCHITECTURE.md.

#![forbid(unsafe_code)]

pub mod app;
pub mod audit;
pub mod chat;
pub mod cli;
pub mod clock;
pub mod config;
pub mod demo;
pub mod directory;
pub mod engine;
pub mod http;
pub mod messages;
pub mod metrics;
pub mod ports;
pub mod scheduler;
pub mod secret;
pub mod store;
