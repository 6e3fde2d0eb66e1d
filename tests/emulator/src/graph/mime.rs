//! The MIME Graph makes and reads in the emulator: Graph's date format, address lists
//! and OData query strings, the message Exchange builds from a JSON draft, and the NDR
//! it drops into the sender's inbox.
//!
//! Input: the client's messages and query strings, untrusted; every function is total.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use super::DraftState;
use crate::clock::Civil;

/// `2026-12-03T18:00:00Z`: Graph's `receivedDateTime` (seconds).
pub fn iso_seconds(t: SystemTime) -> String {
    let c = Civil::from_system(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        c.year, c.month, c.day, c.hour, c.minute, c.second
    )
}

/// Parses `YYYY-MM-DDThh:mm:ss[.fff]Z`.
pub(super) fn parse_iso(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> { s.get(r)?.parse().ok() };
    if b.len() < 20 || b[4] != b'-' || b[10] != b'T' {
        return None;
    }
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    // Howard Hinnant's days_from_civil.
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    Some(UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?))
}

/// The addresses of an address-list header value: the `<...>` parts, else the
/// comma-separated tokens.
pub(super) fn addresses(value: &str) -> Vec<String> {
    let mut v = Vec::new();
    if value.contains('<') {
        let mut rest = value;
        while let Some(a) = rest.find('<') {
            let Some(b) = rest[a..].find('>') else { break };
            v.push(rest[a + 1..a + b].trim().to_owned());
            rest = &rest[a + b + 1..];
        }
    } else {
        v.extend(
            value
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty() && !s.ends_with(';'))
                .map(str::to_owned),
        );
    }
    v
}

pub(super) fn query_map(q: &str) -> HashMap<String, String> {
    let mut m = HashMap::new();
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        m.insert(decode(k), decode(v));
    }
    m
}

pub(super) fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut o = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'%', Some(v)) => {
                o.push(v);
                i += 3;
            }
            (b'+', _) => {
                o.push(b' ');
                i += 1;
            }
            (c, _) => {
                o.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&o).into_owned()
}

pub(super) fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~$".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

pub(super) fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub(super) fn strip_header(mime: &[u8], name: &str) -> Vec<u8> {
    let end = mime
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(mime.len(), |p| p + 2);
    let mut out = Vec::with_capacity(mime.len());
    let mut skipping = false;
    for line in mime[..end].split_inclusive(|&b| b == b'\n') {
        let folded = line.first().is_some_and(|&b| b == b' ' || b == b'\t');
        if !folded {
            skipping = line.iter().position(|&b| b == b':').is_some_and(|c| {
                String::from_utf8_lossy(&line[..c])
                    .trim()
                    .eq_ignore_ascii_case(name)
            });
        }
        if !skipping {
            out.extend_from_slice(line);
        }
    }
    out.extend_from_slice(&mime[end..]);
    out
}

/// The MIME Exchange makes of a JSON message or a draft (enough for tests).
pub(super) fn draft_mime(mailbox: &str, d: &DraftState) -> Vec<u8> {
    let j = &d.json;
    let list = |k: &str| {
        j[k].as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|r| r["emailAddress"]["address"].as_str())
                    .map(|a| format!("<{a}>"))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    };
    let mut m = format!("From: <{mailbox}>\r\n");
    for (h, k) in [
        ("To", "toRecipients"),
        ("Cc", "ccRecipients"),
        ("Bcc", "bccRecipients"),
    ] {
        let v = list(k);
        if !v.is_empty() {
            m.push_str(&format!("{h}: {v}\r\n"));
        }
    }
    m.push_str(&format!(
        "Subject: {}\r\n",
        j["subject"].as_str().unwrap_or("")
    ));
    if let Some(id) = j["internetMessageId"].as_str() {
        m.push_str(&format!("Message-ID: {id}\r\n"));
    }
    if let Some(hs) = j["internetMessageHeaders"].as_array() {
        for h in hs {
            m.push_str(&format!(
                "{}: {}\r\n",
                h["name"].as_str().unwrap_or("X-Unknown"),
                h["value"].as_str().unwrap_or("")
            ));
        }
    }
    let html = j["body"]["contentType"].as_str() == Some("HTML");
    let ctype = if html { "text/html" } else { "text/plain" };
    let content = j["body"]["content"].as_str().unwrap_or("");
    m.push_str("MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"_emu_\"\r\n\r\n");
    m.push_str(&format!("--_emu_\r\nContent-Type: {ctype}; charset=\"utf-8\"\r\nContent-Transfer-Encoding: base64\r\n\r\n{}\r\n", STANDARD.encode(content)));
    for (name, ct, bytes) in &d.attachments {
        m.push_str(&format!(
            "--_emu_\r\nContent-Type: {ct}; name=\"{name}\"\r\nContent-Disposition: attachment; filename=\"{name}\"; size={}\r\nContent-Transfer-Encoding: base64\r\n\r\n{}\r\n",
            bytes.len(),
            STANDARD.encode(bytes)
        ));
    }
    m.push_str("--_emu_--\r\n");
    m.into_bytes()
}

/// An NDR as Exchange Online writes one: from the tenant's Microsoft Outlook system
/// mailbox to the sender, `multipart/report; report-type=delivery-status` with a human
/// part, the `message/delivery-status` part and the original headers.
pub(super) fn ndr_mime(
    mailbox: &str,
    server: &str,
    original: &[u8],
    rcpt: &str,
    status: &str,
    diag: &str,
) -> Vec<u8> {
    let head_end = original
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(original.len(), |p| p + 2);
    let headers = String::from_utf8_lossy(&strip_header(&original[..head_end], "Bcc")).into_owned();
    let subject = crate::headers::header_value(original, "Subject").unwrap_or_default();
    let domain = mailbox.rsplit_once('@').map_or("contoso.com", |(_, d)| d);
    let b = format!("_ndr_{:x}", crate::replies::random_u64());
    format!(
        "From: Microsoft Outlook <MicrosoftExchange329e71ec88ae4615bbc36ab6ce41109e@{domain}>\r\n\
To: <{mailbox}>\r\n\
Date: {date}\r\n\
Subject: Undeliverable: {subject}\r\n\
Message-ID: <{id}@{server}>\r\n\
Auto-Submitted: auto-replied\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/report; report-type=delivery-status; boundary=\"{b}\"\r\n\
\r\n\
--{b}\r\n\
Content-Type: text/plain; charset=\"us-ascii\"\r\n\
\r\n\
Delivery has failed to these recipients or groups:\r\n\
\r\n\
{rcpt}\r\n\
The email couldn't be delivered.\r\n\
\r\n\
Diagnostic information for administrators:\r\n\
Remote server returned '{diag}'\r\n\
\r\n\
--{b}\r\n\
Content-Type: message/delivery-status\r\n\
\r\n\
Reporting-MTA: dns;{server}\r\n\
Received-From-MTA: dns;{server}\r\n\
Arrival-Date: {date}\r\n\
\r\n\
Final-Recipient: rfc822;{rcpt}\r\n\
Action: failed\r\n\
Status: {status}\r\n\
Diagnostic-Code: smtp;{diag}\r\n\
\r\n\
--{b}\r\n\
Content-Type: text/rfc822-headers\r\n\
\r\n\
{headers}\r\n\
--{b}--\r\n",
        date = Civil::now().rfc2822(),
        id = crate::token::uuid(),
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn iso_dates_round_trip_and_headers_strip() {
        let t = UNIX_EPOCH + Duration::from_secs(1_796_000_000);
        assert_eq!(parse_iso(&iso_seconds(t)), Some(t));
        assert_eq!(
            strip_header(
                b"To: a@b\r\nBcc: x@y,\r\n z@w\r\nSubject: s\r\n\r\nBcc: body\r\n",
                "Bcc"
            ),
            b"To: a@b\r\nSubject: s\r\n\r\nBcc: body\r\n"
        );
        assert_eq!(addresses("\"A, B\" <a@x>, <b@y>"), ["a@x", "b@y"]);
        assert_eq!(addresses("a@x, b@y"), ["a@x", "b@y"]);
    }
}
