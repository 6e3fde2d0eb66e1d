//! The spool: its path table, the envelope format of the incoming maildir (written
//! by `sendmail`'s deposit), the daemon's queue, and queue ids.
pub mod counters;
pub mod durable;
pub mod envelope;
pub mod flock;
pub mod init;
pub mod listing;
pub mod paths;
pub mod queue;
pub mod trigger;

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

/// A queue id: 24 upper-case hex digits — 13 for the arrival time in microseconds,
/// 6 for the writer's pid, 5 random — so ids are unique across processes and hosts
/// that share a spool, sort by arrival, and are safe as file names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QueueId(String);

/// Why a string is not a queue id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a relay365 queue id (24 hex digits)")]
pub struct BadQueueId(pub String);

impl QueueId {
    /// A fresh id for a message arriving now.
    pub fn generate(now: SystemTime) -> QueueId {
        let us = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros()) as u64;
        let pid = std::process::id() & 0xFF_FFFF;
        let mut r = [0u8; 4];
        // A failed random source still leaves time and pid, which are unique per process
        // at microsecond resolution; the random part only guards shared spools.
        let _ = getrandom::fill(&mut r);
        let rand = u32::from_le_bytes(r) & 0xF_FFFF;
        QueueId(format!(
            "{:013X}{pid:06X}{rand:05X}",
            us & 0x1F_FFFF_FFFF_FFFF
        ))
    }

    /// Validates an id read from a file name or a command line.
    pub fn parse(s: &str) -> Result<QueueId, BadQueueId> {
        // SECURITY: only hex digits, so an id can never name a path outside the spool.
        if s.len() == 24
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
        {
            Ok(QueueId(s.to_string()))
        } else {
            Err(BadQueueId(s.chars().take(40).collect()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Written as its 24 digits; read back through [`QueueId::parse`].
impl serde::Serialize for QueueId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for QueueId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<QueueId, D::Error> {
        let s = String::deserialize(d)?;
        QueueId::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_valid_unique_and_sort_by_time() {
        let a = QueueId::generate(UNIX_EPOCH + std::time::Duration::from_secs(1_000));
        let b = QueueId::generate(UNIX_EPOCH + std::time::Duration::from_secs(2_000));
        assert_eq!(QueueId::parse(a.as_str()), Ok(a.clone()));
        assert!(a < b);
        let now = SystemTime::now();
        assert_ne!(QueueId::generate(now), QueueId::generate(now));
    }

    #[test]
    fn bad_ids_are_refused() {
        for s in [
            "",
            "../../etc/passwd",
            "0123456789abcdef01234567",
            "0123456789ABCDEF0123456",
        ] {
            assert!(QueueId::parse(s).is_err(), "{s}");
        }
    }
}
