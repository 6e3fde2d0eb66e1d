//! Fuzzes the aliases file parser (`aliases::Aliases::parse`) and the resolver
//! (`aliases::resolve`) on every name the text mentions.
//!
//! Invariants: never panics; a resolution is bounded (at most MAX_EXPANSION recipients
//! plus the admin address) and names no recipient with a control character.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use relay365::aliases::{self, Aliases, Domains, MAX_EXPANSION};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(a) = Aliases::parse(text, Path::new("/etc/aliases")) else {
        return;
    };
    let domains = Domains {
        qualify: "example.org".into(),
        local: vec!["web1.example.org".into()],
    };
    let names = text
        .lines()
        .filter_map(|l| l.split_once(':').map(|(n, _)| n.trim()))
        .chain(["root", "postmaster", "nobody@web1.example.org"])
        .take(50);
    for name in names {
        if let Ok(res) = aliases::resolve(name, &a, Some("admin@example.com"), &domains) {
            assert!(
                res.recipients.len() <= MAX_EXPANSION + 1,
                "{}",
                res.recipients.len()
            );
            // A remote address comes back as given; only what aliases produced is checked.
            for r in res.recipients.iter().filter(|r| r.as_str() != name.trim()) {
                assert!(
                    !r.chars().any(|c| c.is_control()),
                    "{name:?} resolves to {r:?}"
                );
            }
        }
    }
});
