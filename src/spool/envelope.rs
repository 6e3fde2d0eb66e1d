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

use serde::{Deserialize, Serialize};

use crate::message::address::{Address, Sender};
use crate::sendmail::options::{BodyType, Ret};
use crate::spool::QueueId;

/// The first line of every incoming file.
pub const MAGIC: &[u8] = b"RELAY365 1\n";
/// An envelope line longer than this is refused (500 recipients of 320 bytes fit).
pub const MAX_ENVELOPE_LINE: usize = 4 << 20;

/// Everything about a message that is not the message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    pub id: String,
    /// Empty for the null sender.
    pub sender: String,
    pub recipients: Vec<String>,
    pub uid: u32,
    /// Arrival time, microseconds since the epoch.
    pub arrival_us: u64,
    /// Length of the message that follows.
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ret: Option<Ret>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<BodyType>,
    /// `-odq`: wait for the next queue run instead of going out at once.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub queue_only: bool,
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
}

impl Envelope {
    /// The file's bytes: magic, JSON line, message.
    pub fn to_file_bytes(&self, message: &[u8]) -> Vec<u8> {
        // Serialising plain strings and integers cannot fail.
        let json = serde_json::to_vec(self).unwrap_or_default();
        let mut out = Vec::with_capacity(MAGIC.len() + json.len() + 1 + message.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&json);
        out.push(b'\n');
        out.extend_from_slice(message);
        out
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
        let env: Envelope =
            serde_json::from_slice(line).map_err(|e| EnvelopeError::Json(e.to_string()))?;
        env.validate()?;
        Ok(env)
    }

    /// SECURITY: every field the daemon will act on is re-validated here, whoever wrote it.
    fn validate(&self) -> Result<(), EnvelopeError> {
        let field = |field, reason: String| EnvelopeError::Field { field, reason };
        QueueId::parse(&self.id).map_err(|e| field("id", e.to_string()))?;
        Sender::parse(&self.sender).map_err(|e| field("sender", e.to_string()))?;
        if self.recipients.is_empty() {
            return Err(field("recipients", "no recipients".into()));
        }
        for r in &self.recipients {
            Address::parse(r).map_err(|e| field("recipients", e.to_string()))?;
        }
        if let Some(e) = &self.envid {
            if e.is_empty() || e.len() > 100 || !e.bytes().all(|b| (33..=126).contains(&b)) {
                return Err(field("envid", "not 1-100 printable characters".into()));
            }
        }
        if let Some(n) = &self.notify {
            let ok = n == "never"
                || n.split(',')
                    .all(|w| matches!(w, "success" | "failure" | "delay"));
            if !ok {
                return Err(field("notify", format!("{n:?} is not a NOTIFY list")));
            }
        }
        Ok(())
    }

    /// The sender as a typed value (validated on parse).
    pub fn sender(&self) -> Sender {
        Sender::parse(&self.sender).unwrap_or(Sender::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(size: u64) -> Envelope {
        Envelope {
            id: "0000000000001000001000001".chars().take(24).collect(),
            sender: "a@b.c".into(),
            recipients: vec!["d@e.f".into()],
            uid: 1000,
            arrival_us: 1,
            size,
            notify: Some("failure,delay".into()),
            ret: Some(Ret::Hdrs),
            envid: None,
            body: Some(BodyType::EightBitMime),
            queue_only: false,
        }
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
