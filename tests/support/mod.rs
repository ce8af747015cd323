//! Shared test helpers.

pub mod bot;
pub mod browser;
pub mod fake_discord;
pub mod fake_gateway;
pub mod fake_slack;
pub mod fake_socket_mode;
pub mod net;
pub mod postgres;
pub mod process;
pub mod samba;
pub mod slapd;
