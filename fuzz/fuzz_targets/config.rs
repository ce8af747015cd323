//! The config loader: any text is a config or a list of problems with lines.
#![no_main]

use jitbot::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(e) = Config::parse(text, "fuzz.toml") {
            assert!(!e.issues.is_empty());
        }
    }
});
