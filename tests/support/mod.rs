//! Shared test helpers.

pub mod slapd;
pub mod bot;
pub mod fake_slack;
pub mod browser;
pub mod fake_discord;
