//! Slack's two request bodies: slash-command forms and interaction payloads.
#![no_main]

use jitbot::chat::slack::{decode_command, decode_interaction};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode_command(data);
    if let Ok(json) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = decode_interaction(json);
    }
});
