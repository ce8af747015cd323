//! Discord interaction bodies as the HTTP endpoint receives them.
#![no_main]

use jitbot::chat::discord::Incoming;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Incoming::from_json(data);
});
