//! The sent log: `state/<account>.sent`, one JSON line per transaction that went out
//! from an account that harvests bounces, so that a late NDR (which arrives after the
//! message left the queue) can be matched to its queue ID through the Message-ID the
//! message carried, and its DSN addressed to the original sender with the original
//! DSN parameters. Lines older than [`KEEP`] are dropped when the harvester compacts
//! the file; Exchange sends NDRs within hours, at most a couple of days.
//!
//! Trust: the daemon's own file in its state directory (0600); a line that does not
//! parse is skipped, so a torn last line after a crash costs one record, never the log.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::message::address::Sender;
use crate::spool::durable;
use crate::spool::envelope::{EnvId, Notify, Ret};
use crate::spool::queue::micros;

/// How long a record is kept.
pub const KEEP: Duration = Duration::from_secs(7 * 86_400);
/// Largest sent log read (a busy account's week is far below this).
const MAX_LOG: u64 = 256 * 1024 * 1024;

/// One transaction that went out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SentRecord {
    pub message_id: String,
    pub queue_id: String,
    pub sender: Sender,
    pub notify: Option<Notify>,
    pub ret: Option<Ret>,
    pub envid: Option<EnvId>,
    pub arrival_us: u64,
    pub sent_us: u64,
    pub is_bounce: bool,
    /// (recipient, the address the caller gave before alias expansion).
    pub rcpts: Vec<(String, Option<String>)>,
}

/// Appends `record` (one write of one line, so concurrent workers never interleave).
pub fn append(path: &Path, record: &SentRecord) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(record).map_err(std::io::Error::other)?;
    line.push(b'\n');
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        // SECURITY: never follow a symlink planted in the state directory.
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path)?;
    f.write_all(&line)
}

/// Every record, oldest first; a missing file is an empty log.
pub fn read(path: &Path) -> std::io::Result<Vec<SentRecord>> {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for line in BufReader::new(std::io::Read::take(f, MAX_LOG)).split(b'\n') {
        if let Ok(r) = serde_json::from_slice::<SentRecord>(&line?) {
            out.push(r);
        }
    }
    Ok(out)
}

/// The latest record for `message_id` (compared without case, as mail systems do).
pub fn find<'a>(records: &'a [SentRecord], message_id: &str) -> Option<&'a SentRecord> {
    let id = message_id.trim();
    records
        .iter()
        .rev()
        .find(|r| r.message_id.trim().eq_ignore_ascii_case(id))
}

/// Drops records older than [`KEEP`], durably.
pub fn compact(path: &Path, now: SystemTime) -> std::io::Result<()> {
    let records = read(path)?;
    let cutoff = micros(now.checked_sub(KEEP).unwrap_or(SystemTime::UNIX_EPOCH));
    if records.iter().all(|r| r.sent_us >= cutoff) {
        return Ok(());
    }
    let mut bytes = Vec::new();
    for r in records.iter().filter(|r| r.sent_us >= cutoff) {
        bytes.extend(serde_json::to_vec(r).map_err(std::io::Error::other)?);
        bytes.push(b'\n');
    }
    durable::replace(
        path,
        &path.with_extension("sent.tmp"),
        &bytes,
        &durable::options(0o600),
    )
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(mid: &str, sent_us: u64) -> SentRecord {
        SentRecord {
            message_id: mid.into(),
            queue_id: "Q1".into(),
            sender: Sender::parse("shop@example.com").unwrap(),
            notify: None,
            ret: None,
            envid: None,
            arrival_us: sent_us,
            sent_us,
            is_bounce: false,
            rcpts: vec![("a@example.org".into(), None)],
        }
    }

    #[test]
    fn records_append_match_by_message_id_and_age_out() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("app.sent");
        let now = SystemTime::now();
        append(
            &p,
            &record("<old@x>", micros(now - KEEP - Duration::from_secs(1))),
        )
        .unwrap();
        append(&p, &record("<new@x>", micros(now))).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .unwrap()
            .write_all(b"{torn")
            .unwrap();
        let all = read(&p).unwrap();
        assert_eq!(all.len(), 2);
        assert!(find(&all, " <NEW@x> ").is_some());
        compact(&p, now).unwrap();
        let all = read(&p).unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].message_id, "<new@x>");
    }
}
