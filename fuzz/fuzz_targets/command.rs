//! The chat command parser and button ids: any text either parses or is
//! refused with a message; it never panics.
#![no_main]

use jitbot_core::command::{Action, Command};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(e) = Command::parse(text) {
            assert!(!e.to_string().is_empty());
        }
        if let Ok(action) = Action::parse(text) {
            assert_eq!(Action::parse(&action.id()), Ok(action));
        }
    }
});
