//! Fuzzes the SMTP reply parser (`transport::reply::Reply::parse`) and the
//! classifier on the server-controlled bytes of a reply.
//!
//! Invariants: never panics; an accepted reply has a code 200..=599 and a bounded text
//! without control characters (it goes into logs and DSN headers); every stage gets a
//! verdict.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay365::transport::classify::{self, Stage};
use relay365::transport::reply::{MAX_REPLY_TEXT, Reply};

const STAGES: [Stage; 9] = [
    Stage::Connect,
    Stage::Greeting,
    Stage::Ehlo,
    Stage::StartTls,
    Stage::Auth,
    Stage::Mail,
    Stage::Rcpt,
    Stage::Data,
    Stage::AfterDot,
];

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(r) = Reply::parse(raw) else {
        return;
    };
    assert!((200..=599).contains(&r.code), "{}", r.code);
    assert!(r.text.len() <= MAX_REPLY_TEXT + 3, "{}", r.text.len());
    assert!(!r.text.chars().any(char::is_control), "{:?}", r.text);
    let shown = r.to_string();
    assert!(!shown.contains('\r') && !shown.contains('\n'), "{shown:?}");
    let status = r.dsn_status();
    assert!(!status.chars().any(char::is_control));
    let diag = r.diagnostic_code();
    assert!(!diag.contains('\r') && !diag.contains('\n'), "{diag:?}");
    for stage in STAGES {
        let _ = classify::classify(&r, stage);
    }
});
