//! Fuzzes the header block reader (`message::header::parse`) on arbitrary bytes, as
//! any local program can pipe into `sendmail`.
//!
//! Invariants: it never panics; a parsed message writes back the bytes it read
//! (the reader keeps every byte the caller wrote, apart from a leading mbox `From `
//! line, a missing separator line, or an all-body message's added empty header
//! block); parsing what it writes gives the same message; every header name is
//! printable ASCII without a colon.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay365::message::header;

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = header::parse(data) else {
        return;
    };
    for h in &msg.headers {
        let name = h.name().as_bytes();
        assert!(!name.is_empty(), "empty header name in {:?}", h.raw());
        assert!(
            name.iter().all(|&b| (33..=126).contains(&b) && b != b':'),
            "bad header name {name:?}"
        );
        assert!(h.raw().starts_with(name));
    }
    // What the reader may drop: a first line that is an mbox envelope line, that is one
    // starting `From ` that is not a header line (`From : x` is, in obsolete syntax).
    let first_end = data.windows(2).position(|w| w == b"\r\n");
    let first = &data[..first_end.unwrap_or(data.len())];
    let is_header_line = first.iter().position(|&b| b == b':').is_some_and(|colon| {
        let name = &first[..colon];
        let name_len = name.len()
            - name
                .iter()
                .rev()
                .take_while(|&&b| b == b' ' || b == b'\t')
                .count();
        name_len > 0 && name[..name_len].iter().all(|&b| (33..=126).contains(&b))
    });
    let kept = if data.starts_with(b"From ") && !is_header_line {
        first_end.map_or(&data[data.len()..], |i| &data[i + 2..])
    } else {
        data
    };
    let out = msg.to_bytes();
    let mut all_headers = kept.to_vec();
    all_headers.extend_from_slice(b"\r\n");
    let mut all_body = b"\r\n".to_vec();
    all_body.extend_from_slice(kept);
    assert!(
        out == kept || out == all_headers || out == all_body,
        "to_bytes changed the message:\n in: {kept:?}\nout: {out:?}"
    );
    // Written output is what intake stores; reading it again must give the same message
    // (a last line without CRLF only happens on input intake never produces).
    if msg.headers.iter().all(|h| h.raw().ends_with(b"\r\n")) {
        let again = header::parse(&out).expect("re-parse of written message");
        assert_eq!(again, msg, "re-parse differs for {out:?}");
    }
});
