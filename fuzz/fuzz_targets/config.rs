//! Fuzzes the config loader (`config::Config::from_toml`): relay365.toml is written by
//! the administrator, but a typo must give an error naming the key, never a crash.
//!
//! Invariants: never panics; an accepted config has an absolute spool directory and a
//! non-empty domain.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use relay365::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(c) = Config::from_toml(Path::new("/etc/relay365/relay365.toml"), text) else {
        return;
    };
    assert!(c.spool_dir.is_absolute());
    assert!(!c.domain.is_empty());
    let _ = format!("{c:?}");
});
