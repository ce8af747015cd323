//! Shared test helpers.

pub mod slapd;
