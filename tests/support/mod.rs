//! Shared test helpers.

pub mod bot;
pub mod browser;
pub mod fake_discord;
pub mod fake_slack;
pub mod samba;
pub mod slapd;
