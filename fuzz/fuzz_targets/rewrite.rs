//! Fuzzes the delivery-time From rewrite (`message::rewrite::apply`) on an arbitrary
//! queued message, with each From policy.
//!
//! Invariants: never panics; `preserve` returns the message unchanged; when the message
//! has a header block, the result still parses, keeps the body, and its From (if it
//! was changed) carries the mailbox address.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay365::message::rewrite::FromPolicy;
use relay365::message::{header, rewrite};

const MAILBOX: &str = "app@contoso.com";

fuzz_target!(|data: &[u8]| {
    assert_eq!(
        rewrite::apply(data, MAILBOX, FromPolicy::Preserve, "web1"),
        data
    );
    for policy in [FromPolicy::Rewrite, FromPolicy::ReplyTo] {
        let out = rewrite::apply(data, MAILBOX, policy, "web1");
        let Ok(before) = header::parse(data) else {
            assert_eq!(out, data, "an unparsable message must pass unchanged");
            continue;
        };
        if out == data {
            continue;
        }
        let after = header::parse(&out).expect("rewritten message parses");
        assert_eq!(after.body, before.body, "body changed");
        let from = after.get("From").expect("a From after rewrite");
        let trim = |r: &[u8]| r.strip_suffix(b"\r\n").unwrap_or(r).to_vec();
        if before
            .get("From")
            .is_some_and(|b| trim(b.raw()) == trim(from.raw()))
        {
            // Kept: the address parser found it already is the mailbox (the CRLF differs
            // only for input without a final line ending, which intake never writes).
            continue;
        }
        let raw = String::from_utf8_lossy(from.raw()).to_ascii_lowercase();
        assert!(raw.contains(MAILBOX), "From {raw:?} lacks the mailbox");
    }
});
