//! Fuzzes message intake: `sendmail::intake::read_message` on an arbitrary stdin, then
//! `intake::build` (header reader, -t extraction, header completion) on what it read.
//!
//! Invariants: never panics; what is read has CRLF line endings only, no NUL, ends in
//! CRLF, is within the limit and without `-i` never holds a lone-dot line; a built
//! submission has Date, Message-ID and From once each, no Bcc, valid recipients, and
//! its incoming file reads back to the same envelope and message.
#![no_main]

use std::ffi::OsString;
use std::time::{Duration, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use relay365::message::address::Address;
use relay365::message::header;
use relay365::sendmail::intake::{self, Caller, IntakeSettings};
use relay365::sendmail::options;
use relay365::spool::QueueId;
use relay365::spool::envelope::Envelope;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let ignore_dots = flags & 1 != 0;
    let extract = flags & 2 != 0;
    let with_sender = flags & 4 != 0;
    // A small limit sometimes, so the size check is exercised too.
    let max: u64 = if flags & 8 != 0 {
        u64::from(flags >> 4) * 16
    } else {
        1 << 20
    };
    let raw = match intake::read_message(rest, ignore_dots, max) {
        Ok(raw) => raw,
        Err(_) => return,
    };
    assert!(raw.len() as u64 <= max);
    assert!(!raw.contains(&0), "NUL kept");
    assert!(raw.is_empty() || raw.ends_with(b"\r\n"));
    for (i, &b) in raw.iter().enumerate() {
        if b == b'\n' {
            assert!(i > 0 && raw[i - 1] == b'\r', "bare LF kept at {i}");
        }
    }
    if !ignore_dots {
        assert!(!raw.starts_with(b".\r\n") && !raw.windows(5).any(|w| w == b"\r\n.\r\n"));
    }

    let mut args: Vec<OsString> = Vec::new();
    if extract {
        args.push("-t".into());
    }
    if with_sender {
        args.push("-f".into());
        args.push("app@example.org".into());
    }
    args.push("-F".into());
    args.push("Fuzz \"Name\"".into());
    args.push("root".into());
    let Ok(opts) = options::parse("sendmail", &args) else {
        panic!("fixed argv refused")
    };
    let settings = IntakeSettings {
        domain: "example.com",
        max_message_size: max,
        received: None,
    };
    let caller = Caller {
        uid: 1000,
        login: "www-data".into(),
        full_name: Some("Web Server".into()),
    };
    let now = UNIX_EPOCH + Duration::from_secs(1_795_734_105);
    let id = QueueId::generate(now);
    let Ok(sub) = intake::build(&opts, &settings, &caller, &raw, now, &id) else {
        return;
    };
    let msg = header::parse(&sub.message).expect("built message re-parses");
    for name in ["Date", "Message-ID", "From"] {
        let n = msg.headers.iter().filter(|h| h.is(name)).count();
        assert!(n >= 1, "{name} missing");
    }
    assert!(!msg.has("Bcc") && !msg.has("Resent-Bcc") && !msg.has("Return-Path"));
    assert!(!sub.envelope.recipients.is_empty());
    for r in &sub.envelope.recipients {
        let a = Address::parse(r.as_str()).expect("recipient is a valid address");
        assert!(a.is_qualified(), "unqualified recipient {r}");
    }
    let file = sub.envelope.to_file_bytes(&sub.message);
    let (env, body) = Envelope::from_file_bytes(&file).expect("own incoming file reads back");
    assert_eq!(env, sub.envelope);
    assert_eq!(body, &sub.message[..]);
});
