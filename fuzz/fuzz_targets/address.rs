//! Fuzzes address parsing: `Address::parse`, `Sender::parse`, `parse_argument` (the
//! command line) and `parse_list` (a header's raw bytes, through mailparse).
//!
//! Invariants: never panics; no accepted address holds a control character (CR/LF
//! would inject SMTP commands), a blank or bracket outside quotes, or more than 320
//! characters; accepted addresses parse again to themselves.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay365::message::address::{self, Address, Sender};

fn check(a: &Address) {
    let s = a.as_str();
    assert!(!s.is_empty());
    assert!(!s.chars().any(char::is_control), "control char in {s:?}");
    assert!(s.chars().count() <= 320);
    assert_eq!(Address::parse(s).as_ref(), Ok(a), "not idempotent: {s:?}");
}

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(a) = Address::parse(s) {
            check(&a);
            assert_eq!(a.as_str(), s);
        }
        if let Ok(Sender::Address(a)) = Sender::parse(s) {
            check(&a);
        }
        if let Ok(list) = address::parse_argument(s) {
            assert!(!list.is_empty());
            list.iter().for_each(check);
        }
    }
    // A header as the reader hands it over: name, colon, value, CRLF.
    let mut raw = b"To: ".to_vec();
    raw.extend_from_slice(data);
    raw.extend_from_slice(b"\r\n");
    for bytes in [data, &raw[..]] {
        if let Ok(list) = address::parse_list(bytes) {
            list.iter().for_each(check);
        }
    }
});
