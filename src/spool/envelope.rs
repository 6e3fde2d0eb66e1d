//! The envelope written at the head of every incoming file, version 1.
//!
//! An incoming file is:
//! ```text
//! RELAY365 1\n
//! {"id":"...","sender":"a@b","recipients":["c@d"],"uid":1000,"arrival_us":...,"size":N,...}\n
//! <the message: N bytes, CRLF line endings>
//! ```
//! The JSON object's fields are those of [`Envelope`]; unknown fields are refused so
//! that a newer writer is noticed, and the version line lets a reader refuse a format
//! it does not know before parsing anything else. `sender` is empty for the null
//! sender. `uid` is informational: the daemon takes the caller from the file's owner.
//!
//! The reader trusts nothing: any local user could in principle plant bytes here.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::message::address::{Address, Sender};
use crate::spool::QueueId;

/// The first line of every incoming file.
pub const MAGIC: &[u8] = b"RELAY365 1\n";
/// An envelope line longer than this is refused (500 recipients of 320 bytes fit).
/// The writer checks the same bound ([`Envelope::check_line`]) so that `sendmail` never
/// accepts what the pickup would quarantine.
pub const MAX_ENVELOPE_LINE: usize = 4 << 20;

/// The largest incoming file the pickup reads for a `max_message_size` of `max_message`:
/// magic, the longest envelope line, its newline, the message.
pub fn max_file_len(max_message: u64) -> u64 {
    max_message
        .saturating_add(MAX_ENVELOPE_LINE as u64)
        .saturating_add(64)
}

/// `BODY=` (`-B`): passed on when the server offers 8BITMIME.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BodyType {
    #[serde(rename = "7BIT")]
    SevenBit,
    #[serde(rename = "8BITMIME")]
    EightBitMime,
}

impl BodyType {
    /// `7BIT` or `8BITMIME`, in any case.
    pub fn parse(s: &str) -> Option<BodyType> {
        match s.to_ascii_uppercase().as_str() {
            "7BIT" => Some(BodyType::SevenBit),
            "8BITMIME" => Some(BodyType::EightBitMime),
            _ => None,
        }
    }

    /// The parameter's value as SMTP writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            BodyType::SevenBit => "7BIT",
            BodyType::EightBitMime => "8BITMIME",
        }
    }
}

/// `RET=` (`-R`, RFC 3461): what a bounce returns of the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ret {
    Full,
    Hdrs,
}

impl Ret {
    /// `full` or `hdrs`, in any case.
    pub fn parse(s: &str) -> Option<Ret> {
        match s.to_ascii_lowercase().as_str() {
            "full" => Some(Ret::Full),
            "hdrs" => Some(Ret::Hdrs),
            _ => None,
        }
    }

    /// The parameter's value as SMTP writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Ret::Full => "FULL",
            Ret::Hdrs => "HDRS",
        }
    }
}

/// `NOTIFY=` (`-N`, RFC 3461): `never`, or when to report. Parsed once, here, for the
/// command line, the `-bs` dialogue and the files; written in one canonical form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Notify {
    Never,
    /// At least one of the three is set.
    On {
        success: bool,
        failure: bool,
        delay: bool,
    },
}

impl Notify {
    /// `never`, or a comma-separated list of `success`, `failure`, `delay` (any case,
    /// repeats allowed); `None` for anything else, `never` mixed with others included.
    pub fn parse(s: &str) -> Option<Notify> {
        let lower = s.to_ascii_lowercase();
        if lower == "never" {
            return Some(Notify::Never);
        }
        let (mut success, mut failure, mut delay) = (false, false, false);
        for word in lower.split(',').map(str::trim) {
            match word {
                "success" => success = true,
                "failure" => failure = true,
                "delay" => delay = true,
                _ => return None,
            }
        }
        Some(Notify::On {
            success,
            failure,
            delay,
        })
    }

    /// Whether a failure is to be reported (RFC 3461: the default when absent).
    pub fn on_failure(this: Option<Notify>) -> bool {
        match this {
            None => true,
            Some(Notify::Never) => false,
            Some(Notify::On { failure, .. }) => failure,
        }
    }
}

impl fmt::Display for Notify {
    /// Lower case, canonical order: `never`, or e.g. `success,failure,delay`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Notify::Never => f.write_str("never"),
            Notify::On {
                success,
                failure,
                delay,
            } => {
                let words = [(success, "success"), (failure, "failure"), (delay, "delay")];
                let on: Vec<&str> = words.iter().filter(|w| w.0).map(|w| w.1).collect();
                f.write_str(&on.join(","))
            }
        }
    }
}

/// Written canonically; read back through [`Notify::parse`].
impl Serialize for Notify {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Notify {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Notify, D::Error> {
        let s = String::deserialize(d)?;
        Notify::parse(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("{s:?} is not a NOTIFY list")))
    }
}

/// `ENVID=` (`-V`, RFC 3461): 1 to 100 printable ASCII characters, no spaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvId(String);

impl EnvId {
    pub fn parse(s: &str) -> Option<EnvId> {
        let ok = !s.is_empty() && s.len() <= 100 && s.bytes().all(|b| (33..=126).contains(&b));
        ok.then(|| EnvId(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Serialize for EnvId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for EnvId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<EnvId, D::Error> {
        let s = String::deserialize(d)?;
        EnvId::parse(&s)
            .ok_or_else(|| serde::de::Error::custom("an ENVID is 1-100 printable characters"))
    }
}

impl fmt::Display for EnvId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The message-level DSN parameters (RFC 3461) and the body type, as the caller asked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dsn {
    pub notify: Option<Notify>,
    pub ret: Option<Ret>,
    pub envid: Option<EnvId>,
    pub body: Option<BodyType>,
}

/// Everything about a message that is not the message, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub id: QueueId,
    pub sender: Sender,
    pub recipients: Vec<Address>,
    pub uid: u32,
    /// Arrival time, microseconds since the epoch.
    pub arrival_us: u64,
    /// Length of the message that follows.
    pub size: u64,
    pub dsn: Dsn,
    /// `-odq`: wait for the next queue run instead of going out at once.
    pub queue_only: bool,
    /// The network client that submitted it to the listener (`None` for local callers).
    pub client: Option<std::net::IpAddr>,
    /// The user that client authenticated as, if any.
    pub sasl_username: Option<String>,
    /// The account that user is mapped to (`relay365 listener-user add --account`);
    /// the daemon honours it only for a listener submission.
    pub account: Option<String>,
}

/// The JSON line as written: plain strings, read and then validated into an [`Envelope`].
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    id: String,
    /// Empty for the null sender.
    sender: String,
    recipients: Vec<String>,
    uid: u32,
    arrival_us: u64,
    size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    notify: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ret: Option<Ret>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    envid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    body: Option<BodyType>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    queue_only: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    client: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sasl_username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    account: Option<String>,
}

/// Why bytes are not an incoming file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("not a relay365 incoming file (bad first line)")]
    Magic,
    #[error("envelope line missing or longer than {MAX_ENVELOPE_LINE} bytes")]
    Line,
    #[error("envelope is not valid: {0}")]
    Json(String),
    #[error(
        "envelope says {declared} message bytes but {actual} follow (truncated or padded file)"
    )]
    Size { declared: u64, actual: u64 },
    #[error("envelope field {field}: {reason}")]
    Field { field: &'static str, reason: String },
    #[error(
        "the envelope would be {bytes} bytes, more than the {} MiB a queue entry may hold",
        MAX_ENVELOPE_LINE >> 20
    )]
    TooLong { bytes: usize },
}

impl Envelope {
    /// The file's bytes: magic, JSON line, message. The caller checks [`Self::check_line`]
    /// first; a longer line is written but the reader refuses it.
    pub fn to_file_bytes(&self, message: &[u8]) -> Vec<u8> {
        let json = self.json();
        let mut out = Vec::with_capacity(MAGIC.len() + json.len() + 1 + message.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&json);
        out.push(b'\n');
        out.extend_from_slice(message);
        out
    }

    /// Whether [`Self::from_file_bytes`] will take the envelope line this envelope is
    /// written as: the one bound the writer and the reader share.
    pub fn check_line(&self) -> Result<(), EnvelopeError> {
        let bytes = self.json().len();
        // The reader looks for the newline within the first MAX_ENVELOPE_LINE bytes.
        if bytes >= MAX_ENVELOPE_LINE {
            return Err(EnvelopeError::TooLong { bytes: bytes + 1 });
        }
        Ok(())
    }

    /// The JSON line, without its newline.
    fn json(&self) -> Vec<u8> {
        let line = Line {
            id: self.id.to_string(),
            sender: self.sender.as_str().to_string(),
            recipients: self.recipients.iter().map(|a| a.to_string()).collect(),
            uid: self.uid,
            arrival_us: self.arrival_us,
            size: self.size,
            notify: self.dsn.notify.map(|n| n.to_string()),
            ret: self.dsn.ret,
            envid: self.dsn.envid.as_ref().map(EnvId::to_string),
            body: self.dsn.body,
            queue_only: self.queue_only,
            client: self.client.map(|c| c.to_string()),
            sasl_username: self.sasl_username.clone(),
            account: self.account.clone(),
        };
        // Serialising plain strings and integers cannot fail.
        serde_json::to_vec(&line).unwrap_or_default()
    }

    /// Parses and validates an incoming file, returning the envelope and the message.
    pub fn from_file_bytes(bytes: &[u8]) -> Result<(Envelope, &[u8]), EnvelopeError> {
        let rest = bytes.strip_prefix(MAGIC).ok_or(EnvelopeError::Magic)?;
        let nl = rest
            .iter()
            .take(MAX_ENVELOPE_LINE)
            .position(|&b| b == b'\n')
            .ok_or(EnvelopeError::Line)?;
        let env = Self::parse_line(&rest[..nl])?;
        let message = &rest[nl + 1..];
        if message.len() as u64 != env.size {
            return Err(EnvelopeError::Size {
                declared: env.size,
                actual: message.len() as u64,
            });
        }
        Ok((env, message))
    }

    /// Parses and validates just the JSON line (for listings that skip the message).
    pub fn parse_line(line: &[u8]) -> Result<Envelope, EnvelopeError> {
        let line: Line =
            serde_json::from_slice(line).map_err(|e| EnvelopeError::Json(e.to_string()))?;
        Self::validate(line)
    }

    /// SECURITY: every field the daemon will act on is validated here, whoever wrote it.
    fn validate(l: Line) -> Result<Envelope, EnvelopeError> {
        let field = |field, reason: String| EnvelopeError::Field { field, reason };
        let id = QueueId::parse(&l.id).map_err(|e| field("id", e.to_string()))?;
        let sender = Sender::parse(&l.sender).map_err(|e| field("sender", e.to_string()))?;
        if l.recipients.is_empty() {
            return Err(field("recipients", "no recipients".into()));
        }
        let recipients = l
            .recipients
            .iter()
            .map(|r| Address::parse(r).map_err(|e| field("recipients", e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        let envid = match &l.envid {
            Some(e) => Some(
                EnvId::parse(e)
                    .ok_or_else(|| field("envid", "not 1-100 printable characters".into()))?,
            ),
            None => None,
        };
        let notify = match &l.notify {
            Some(n) => Some(
                Notify::parse(n)
                    .ok_or_else(|| field("notify", format!("{n:?} is not a NOTIFY list")))?,
            ),
            None => None,
        };
        let client = match &l.client {
            Some(c) => Some(
                c.parse::<std::net::IpAddr>()
                    .map_err(|_| field("client", format!("{c:?} is not an IP address")))?,
            ),
            None => None,
        };
        if let Some(u) = &l.sasl_username {
            // SECURITY: the name is logged and written into headers: printable, bounded.
            if u.is_empty() || u.len() > 64 || u.chars().any(|c| c.is_control() || c == ' ') {
                return Err(field(
                    "sasl_username",
                    "not 1-64 printable characters without spaces".into(),
                ));
            }
        }
        if let Some(a) = &l.account {
            // SECURITY: an account name becomes a file name under state/.
            let ok = !a.is_empty()
                && a.len() <= 64
                && a.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !ok || l.client.is_none() {
                return Err(field(
                    "account",
                    "an account name (letters, digits, - and _) for a listener submission only"
                        .into(),
                ));
            }
        }
        Ok(Envelope {
            id,
            sender,
            recipients,
            uid: l.uid,
            arrival_us: l.arrival_us,
            size: l.size,
            dsn: Dsn {
                notify,
                ret: l.ret,
                envid,
                body: l.body,
            },
            queue_only: l.queue_only,
            client,
            sasl_username: l.sasl_username,
            account: l.account,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(size: u64) -> Envelope {
        Envelope {
            id: QueueId::parse("000000000000100000100000").unwrap(),
            sender: Sender::parse("a@b.c").unwrap(),
            recipients: vec![Address::parse("d@e.f").unwrap()],
            uid: 1000,
            arrival_us: 1,
            size,
            dsn: Dsn {
                notify: Notify::parse("failure,delay"),
                ret: Some(Ret::Hdrs),
                envid: None,
                body: Some(BodyType::EightBitMime),
            },
            queue_only: false,
            client: None,
            sasl_username: None,
            account: None,
        }
    }

    #[test]
    fn a_network_client_round_trips_and_bad_values_are_refused() {
        let mut e = sample(2);
        e.client = Some("192.0.2.7".parse().unwrap());
        e.sasl_username = Some("scanner".into());
        e.account = Some("app".into());
        let bytes = e.to_file_bytes(b"x\n");
        assert_eq!(Envelope::from_file_bytes(&bytes).unwrap().0, e);
        let text = String::from_utf8(bytes).unwrap();
        for (from, to) in [
            ("\"192.0.2.7\"", "\"printer\""),
            ("\"scanner\"", "\"a b\""),
            ("\"scanner\"", "\"\""),
        ] {
            let bad = text.replacen(from, to, 1);
            assert!(
                matches!(
                    Envelope::from_file_bytes(bad.as_bytes()),
                    Err(EnvelopeError::Field { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn notify_is_parsed_once_and_written_canonically() {
        let n = |s| Notify::parse(s).map(|n| n.to_string());
        assert_eq!(n("Success,DELAY,success").as_deref(), Some("success,delay"));
        assert_eq!(n("delay,failure").as_deref(), Some("failure,delay"));
        assert_eq!(n("NEVER").as_deref(), Some("never"));
        assert_eq!(n("never,delay"), None);
        assert_eq!(n(""), None);
        assert_eq!(n("failure,"), None);
        assert!(Notify::on_failure(None));
        assert!(!Notify::on_failure(Notify::parse("never")));
        assert!(!Notify::on_failure(Notify::parse("delay")));
        assert!(Notify::on_failure(Notify::parse("failure")));
    }

    #[test]
    fn envid_ret_and_body_parse() {
        assert!(EnvId::parse("QQ+2B1").is_some());
        assert!(EnvId::parse("").is_none());
        assert!(EnvId::parse("a b").is_none());
        assert!(EnvId::parse(&"x".repeat(101)).is_none());
        assert_eq!(Ret::parse("HDRS"), Some(Ret::Hdrs));
        assert_eq!(Ret::parse("x"), None);
        assert_eq!(BodyType::parse("8bitmime"), Some(BodyType::EightBitMime));
        assert_eq!(BodyType::SevenBit.as_str(), "7BIT");
    }

    #[test]
    fn round_trip() {
        let msg = b"Subject: x\r\n\r\nbody\r\n";
        let bytes = sample(msg.len() as u64).to_file_bytes(msg);
        let (env, m) = Envelope::from_file_bytes(&bytes).unwrap();
        assert_eq!(env, sample(msg.len() as u64));
        assert_eq!(m, msg);
    }

    #[test]
    fn the_writers_line_bound_is_exactly_the_readers() {
        // Recipients up to just below the bound, then a last one whose length walks the
        // line across it one byte at a time: check_line and the reader must agree on
        // every length, and both outcomes must occur.
        let mut env = sample(0);
        env.recipients.clear();
        let filler = Address::parse("f@e.org").unwrap();
        // Each filler adds `"f@e.org",` (10 bytes): fill to about 20 bytes short.
        env.recipients = vec![filler; (MAX_ENVELOPE_LINE - 20 - env.json().len()) / 10];
        // The line with a last recipient of local part length m is base + m.
        let probe = |m: usize| {
            let mut e = env.clone();
            e.recipients
                .push(Address::parse(&format!("{}@x.example", "q".repeat(m))).unwrap());
            e
        };
        let base = probe(1).json().len() - 1;
        let (mut accepted, mut refused) = (0, 0);
        for line in [
            MAX_ENVELOPE_LINE - 2,
            MAX_ENVELOPE_LINE - 1,
            MAX_ENVELOPE_LINE,
            MAX_ENVELOPE_LINE + 1,
        ] {
            let m = line - base;
            assert!((1..=64).contains(&m), "{m}");
            let e = probe(m);
            assert_eq!(e.json().len(), line);
            let bytes = e.to_file_bytes(b"");
            let read = Envelope::from_file_bytes(&bytes);
            match e.check_line() {
                Ok(()) => {
                    accepted += 1;
                    assert_eq!(read.map(|(r, _)| r), Ok(e.clone()), "{line}");
                    assert!(bytes.len() as u64 <= max_file_len(0));
                }
                Err(EnvelopeError::TooLong { bytes }) => {
                    refused += 1;
                    assert_eq!(bytes, line + 1);
                    assert_eq!(read.map(|_| ()), Err(EnvelopeError::Line), "{line}");
                }
                Err(other) => panic!("{other}"),
            }
        }
        assert!(accepted > 0 && refused > 0, "{accepted} {refused}");
    }

    #[test]
    fn truncation_and_tampering_are_detected() {
        let msg = b"Subject: x\r\n\r\nbody\r\n";
        let bytes = sample(msg.len() as u64).to_file_bytes(msg);
        assert!(matches!(
            Envelope::from_file_bytes(&bytes[..bytes.len() - 1]),
            Err(EnvelopeError::Size { .. })
        ));
        assert_eq!(
            Envelope::from_file_bytes(b"garbage"),
            Err(EnvelopeError::Magic)
        );
        assert_eq!(
            Envelope::from_file_bytes(b"RELAY365 1\n{"),
            Err(EnvelopeError::Line)
        );
        let evil = String::from_utf8(bytes.clone())
            .unwrap()
            .replace("d@e.f", "d@e.f\\r\\nDATA");
        assert!(matches!(
            Envelope::from_file_bytes(evil.as_bytes()),
            Err(EnvelopeError::Field {
                field: "recipients",
                ..
            })
        ));
        let evil = String::from_utf8(bytes)
            .unwrap()
            .replace("\"uid\"", "\"extra\":1,\"uid\"");
        assert!(matches!(
            Envelope::from_file_bytes(evil.as_bytes()),
            Err(EnvelopeError::Json(_))
        ));
    }
}
