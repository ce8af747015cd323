//! The platform-neutral message model, re-exported for the chat adapters:
//! it lives in [`crate::messages`], beside the ports, so that the store and
//! the engine depend on no chat code.

pub use crate::messages::*;
