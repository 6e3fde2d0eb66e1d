//! Header completion as Postfix's cleanup does it, and `-t` recipient extraction.
//!
//! Adds Date, Message-ID and From when missing (never duplicates), qualifies bare
//! names in address fields, removes Bcc, Resent-Bcc and any Return-Path the client wrote. Input: a parsed message from an
//! untrusted caller; every address taken from it is validated.

use std::time::{SystemTime, UNIX_EPOCH};

use super::address::{self, Address, AddressError};
use super::header::{Header, Message};

/// What header completion needs to know about the submission.
#[derive(Debug, Clone)]
pub struct Completion<'a> {
    pub now: SystemTime,
    /// Makes the generated Message-ID unique.
    pub queue_id: &'a str,
    /// The Message-ID domain.
    pub domain: &'a str,
    /// The address for a generated From.
    pub from: &'a Address,
    /// The display name for a generated From (from -F or the passwd entry).
    pub full_name: Option<&'a str>,
}

/// Completes the header block in place.
pub fn complete(msg: &mut Message, c: &Completion) {
    // The envelope keeps the recipients; the headers must not reveal Bcc ones.
    msg.remove("Bcc");
    msg.remove("Resent-Bcc");
    // Return-Path is the receiving side's to write, from the envelope.
    msg.remove("Return-Path");
    // Postfix's cleanup: `To: root` names root@domain, as the envelope does.
    super::qualify::qualify_headers(&mut msg.headers, c.domain);
    if !msg.has("From") {
        let value = match c.full_name.map(str::trim).filter(|n| !n.is_empty()) {
            Some(name) => format!("{} <{}>", display_name(name), c.from),
            None => c.from.to_string(),
        };
        msg.headers.push(Header::new("From", &value));
    }
    if !msg.has("Date") {
        msg.headers.push(Header::new("Date", &rfc5322_date(c.now)));
    }
    if !msg.has("Message-ID") {
        let stamp = compact_timestamp(c.now);
        let id = format!("<{stamp}.{}@{}>", c.queue_id, c.domain);
        msg.headers.push(Header::new("Message-ID", &id));
    }
}

/// The recipients a `-t` submission names: Resent-To/Cc/Bcc when the message has any
/// of them (a resent message), else To, Cc and Bcc.
pub fn header_recipients(msg: &Message) -> Result<Vec<Address>, AddressError> {
    const PLAIN: [&str; 3] = ["To", "Cc", "Bcc"];
    const RESENT: [&str; 3] = ["Resent-To", "Resent-Cc", "Resent-Bcc"];
    let names = if RESENT.iter().any(|n| msg.has(n)) {
        RESENT
    } else {
        PLAIN
    };
    let mut out = Vec::new();
    for h in msg.headers.iter().filter(|h| names.iter().any(|n| h.is(n))) {
        out.extend(address::parse_list(h.raw())?);
    }
    Ok(out)
}

/// The longest UTF-8 text in one encoded word: 42 bytes are 56 characters of base64,
/// so a word is 68 characters (RFC 2047 allows 75) and `From: ` plus one word stays
/// within the 76 characters RFC 2047 allows a line holding encoded words.
const ENCODED_WORD_TEXT: usize = 42;

/// A display name as a quoted string, or, when it is not ASCII, RFC 2047 encoded words
/// (each at most 75 characters, split between characters, never inside one), folded
/// onto lines of their own.
pub fn display_name(name: &str) -> String {
    if name.is_ascii() {
        let escaped: String = name
            .chars()
            .filter(|c| !c.is_control())
            .flat_map(|c| match c {
                '"' | '\\' => vec!['\\', c],
                c => vec![c],
            })
            .collect();
        format!("\"{escaped}\"")
    } else {
        use base64::Engine as _;
        let mut words = Vec::new();
        let mut chunk = String::new();
        for c in name.chars().filter(|c| !c.is_control()) {
            if chunk.len() + c.len_utf8() > ENCODED_WORD_TEXT {
                words.push(std::mem::take(&mut chunk));
            }
            chunk.push(c);
        }
        if !chunk.is_empty() || words.is_empty() {
            words.push(chunk);
        }
        words
            .iter()
            .map(|w| {
                let b64 = base64::engine::general_purpose::STANDARD.encode(w.as_bytes());
                format!("=?UTF-8?B?{b64}?=")
            })
            .collect::<Vec<_>>()
            .join("\r\n ")
    }
}

pub use super::date::civil_from_days;

struct Civil {
    year: i64,
    month: u32,
    day: u32,
    weekday: usize,
    hour: u64,
    min: u64,
    sec: u64,
}

fn civil(t: SystemTime) -> Civil {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    Civil {
        year,
        month,
        day,
        // 1970-01-01 was a Thursday.
        weekday: ((days + 4) % 7) as usize,
        hour: rem / 3600,
        min: rem % 3600 / 60,
        sec: rem % 60,
    }
}

const DAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// An RFC 5322 date in UTC, e.g. `Thu, 26 Nov 2026 23:01:45 +0000`.
///
/// UTC on purpose: the setgid front end must not let a caller's `TZ` make the C
/// library open a file of the caller's choosing.
pub fn rfc5322_date(t: SystemTime) -> String {
    let c = civil(t);
    format!(
        "{}, {} {} {} {:02}:{:02}:{:02} +0000",
        DAYS[c.weekday],
        c.day,
        MONTHS[(c.month - 1) as usize],
        c.year,
        c.hour,
        c.min,
        c.sec
    )
}

/// `mailq`'s arrival time, e.g. `Thu Nov 26 23:01:45`.
pub fn short_date(t: SystemTime) -> String {
    let c = civil(t);
    format!(
        "{} {} {:2} {:02}:{:02}:{:02}",
        DAYS[c.weekday],
        MONTHS[(c.month - 1) as usize],
        c.day,
        c.hour,
        c.min,
        c.sec
    )
}

/// `YYYYMMDDhhmmss`, for Message-IDs.
pub fn compact_timestamp(t: SystemTime) -> String {
    let c = civil(t);
    format!(
        "{:04}{:02}{:02}{:02}{:02}{:02}",
        c.year, c.month, c.day, c.hour, c.min, c.sec
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::header::parse;
    use std::time::Duration;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn civil_days() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }

    #[test]
    fn dates() {
        assert_eq!(rfc5322_date(at(0)), "Thu, 1 Jan 1970 00:00:00 +0000");
        // 2026-11-26 23:01:45 UTC
        assert_eq!(
            rfc5322_date(at(1_795_734_105)),
            "Thu, 26 Nov 2026 23:01:45 +0000"
        );
        assert_eq!(
            rfc5322_date(at(951_782_400)),
            "Tue, 29 Feb 2000 00:00:00 +0000"
        );
        assert_eq!(short_date(at(1_795_734_105)), "Thu Nov 26 23:01:45");
    }

    fn completion(from: &Address) -> Completion<'_> {
        Completion {
            now: at(1_795_734_105),
            queue_id: "ABC",
            domain: "example.com",
            from,
            full_name: Some("Cron Daemon"),
        }
    }

    #[test]
    fn adds_missing_headers_once() {
        let from = Address::parse("root@example.com").unwrap();
        let mut m =
            parse(b"Subject: x\r\nBcc: secret@x\r\nReturn-Path: <evil@x>\r\n\r\nb\r\n").unwrap();
        complete(&mut m, &completion(&from));
        let text = String::from_utf8(m.to_bytes()).unwrap();
        assert!(
            text.contains("From: \"Cron Daemon\" <root@example.com>\r\n"),
            "{text}"
        );
        assert!(
            text.contains("Date: Thu, 26 Nov 2026 23:01:45 +0000\r\n"),
            "{text}"
        );
        assert!(
            text.contains("Message-ID: <20261126230145.ABC@example.com>\r\n"),
            "{text}"
        );
        assert!(
            !text.contains("secret") && !text.contains("Return-Path"),
            "{text}"
        );
        let again = m.clone();
        complete(&mut m, &completion(&from));
        assert_eq!(m, again, "completion must be idempotent");
    }

    #[test]
    fn keeps_existing_headers() {
        let from = Address::parse("root@example.com").unwrap();
        let src =
            b"From: me@x\r\ndate: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-Id: <1@x>\r\n\r\n";
        let mut m = parse(src).unwrap();
        complete(&mut m, &completion(&from));
        assert_eq!(m.to_bytes(), src.to_vec());
    }

    #[test]
    fn display_names_are_quoted_or_encoded() {
        assert_eq!(display_name("A \"B\""), "\"A \\\"B\\\"\"");
        assert_eq!(display_name("Jörg"), "=?UTF-8?B?SsO2cmc=?=");
    }

    #[test]
    fn recipients_from_headers_and_resent() {
        let m = parse(b"To: a@x\r\nCc: b@x, c\r\nBcc: d@x\r\n\r\n").unwrap();
        let r: Vec<String> = header_recipients(&m)
            .unwrap()
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(r, ["a@x", "b@x", "c", "d@x"]);
        let m = parse(b"To: a@x\r\nResent-To: r@x\r\nResent-Bcc: s@x\r\n\r\n").unwrap();
        let r: Vec<String> = header_recipients(&m)
            .unwrap()
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(r, ["r@x", "s@x"]);
    }
}
