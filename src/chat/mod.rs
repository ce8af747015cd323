//! Chat adapters and the platform-neutral message model they render.

pub mod view;
