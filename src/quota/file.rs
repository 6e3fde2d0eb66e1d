//! The ledger file: its format, reading it into memory (only the bytes appended since
//! the last look), torn last lines, appending a record, and compaction.
//!
//! Trusted input: the file is written only by relay365 processes running as the
//! daemon's user in its private state directory. It is still parsed strictly, because a
//! damaged ledger must stop sending rather than under-count: anything but a torn last
//! line is [`QuotaError::Corrupt`] or [`QuotaError::Version`].
//!
//! # Ledger file format (version 1)
//! ```text
//! relay365-ledger 1
//! 1700000000000 1
//! 1700000002113 500
//! ```
//! The first line is the header with the format version. Each further line is one
//! transaction: its start in milliseconds since the Unix epoch (rounded up) and its
//! recipient count (at least 1), separated by one space and ended by `\n`. Stamps are
//! non-decreasing: a writer stamps `max(now, last stamp)`, and a reader moves an older
//! stamp up to its predecessor's, which only ever over-counts.
//!
//! # Torn last line
//! A crash or `kill -9` in the middle of an append leaves a last line without `\n`.
//! Ignoring it is safe: the record is written and synced *before* the transaction
//! starts, and the writer only reports [`Reservation::Go`](super::Reservation::Go) after
//! the sync, so a torn record means that send never began. The next process to take the
//! lock cuts the torn bytes off before appending (otherwise they would glue onto the
//! next record). After a crash the ledger may over-count (a synced record whose send
//! never happened), never under-count.
//!
//! # Compaction
//! When entries older than the longest window (at least 24 hours, so a configuration
//! change can't forget a day) make up most of the file (and there are at least
//! [`COMPACT_MIN_DEAD`] of them), the lock holder writes the live entries to
//! `<ledger>.tmp`, fsyncs it, renames it over the ledger and fsyncs the directory, as the
//! last step of its operation. The others notice the new inode on their next lock.
//! Compaction is an optimisation: if it fails, the ledger stays valid and merely longer.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::window::{Entry, clamp_future, drop_expired, retention_ms};
use super::{Ledger, QuotaError};
use crate::config::limits::{Limits, all_digits};
use crate::spool::durable;

/// The first line of a ledger file.
pub(super) const LEDGER_HEADER: &str = "relay365-ledger 1";
/// The longest record line without its `\n`: 20 digits of u64, a space, 10 of u32.
const MAX_LINE: usize = 31;
/// Dead (out-of-window) records needed before a compaction is worth a rewrite.
pub const COMPACT_MIN_DEAD: u64 = 4096;

pub(super) fn io_err<'a>(
    path: &'a Path,
    action: &'static str,
) -> impl FnOnce(io::Error) -> QuotaError + 'a {
    move |source| QuotaError::Io {
        path: path.to_path_buf(),
        action,
        source,
    }
}

pub(super) fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

pub(super) fn open_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.read(true)
        .append(true)
        .mode(0o600)
        // SECURITY: never follow a symlink planted in place of a state file.
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits());
    o
}

pub(super) fn sync_dir(path: &Path) -> Result<(), QuotaError> {
    durable::sync_dir(path).map_err(io_err(path, "sync its directory"))
}

/// Creates `tmp` afresh with `bytes`, synced, and renames it over `path`
/// ([`durable::replace_unsynced`]). Returns the open file (now named `path`), opened
/// for the ledger's appends.
pub(super) fn replace_file(path: &Path, tmp: &Path, bytes: &[u8]) -> Result<File, QuotaError> {
    durable::replace_unsynced(path, tmp, bytes, &open_options())
        .map_err(io_err(path, "replace (through a synced temporary file)"))
}

pub(super) fn file_id(m: &fs::Metadata) -> (u64, u64) {
    (m.dev(), m.ino())
}

/// `MILLISECONDS RECIPIENTS`, nothing else.
fn parse_record(line: &[u8]) -> Result<(u64, u32), String> {
    let bad = || "expected `MILLISECONDS RECIPIENTS`".to_owned();
    let text = std::str::from_utf8(line).map_err(|_| bad())?;
    let (ms, rcpts) = text.split_once(' ').ok_or_else(bad)?;
    if !all_digits(ms) || !all_digits(rcpts) {
        return Err(bad());
    }
    let ms = ms
        .parse::<u64>()
        .map_err(|_| "time out of range".to_owned())?;
    let rcpts = rcpts
        .parse::<u32>()
        .map_err(|_| "recipient count out of range".to_owned())?;
    if rcpts == 0 {
        return Err("a record with 0 recipients".to_owned());
    }
    Ok((ms, rcpts))
}

/// Whether an unterminated last line can be what a crash mid-append leaves: part of a
/// record, possibly followed by the zeros a filesystem shows for unwritten blocks.
fn is_torn(tail: &[u8]) -> bool {
    tail.iter()
        .all(|&b| b.is_ascii_digit() || b == b' ' || b == 0)
        && tail.iter().filter(|&&b| b != 0).count() <= MAX_LINE
}

impl Ledger {
    pub(super) fn reopen(&mut self) -> Result<(), QuotaError> {
        let file = open_options()
            .open(&self.path)
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => QuotaError::Vanished {
                    path: self.path.clone(),
                },
                _ => io_err(&self.path, "open")(e),
            })?;
        let meta = file.metadata().map_err(io_err(&self.path, "stat"))?;
        self.file = file;
        self.id = file_id(&meta);
        self.loaded = false;
        Ok(())
    }

    /// Reads what other processes appended since our last look.
    pub(super) fn refresh(&mut self) -> Result<(), QuotaError> {
        if !self.loaded {
            return self.reload();
        }
        let len = self
            .file
            .metadata()
            .map_err(io_err(&self.path, "stat"))?
            .len();
        if len < self.consumed {
            // Only a hand edit shrinks it below what we read: start over.
            return self.reload();
        }
        if len == self.consumed {
            return Ok(());
        }
        let buf = self.read_range(self.consumed, len)?;
        self.ingest(&buf)
    }

    fn read_range(&self, from: u64, to: u64) -> Result<Vec<u8>, QuotaError> {
        let size = usize::try_from(to - from).map_err(|_| QuotaError::Corrupt {
            path: self.path.clone(),
            line: self.lines + 2,
            reason: "the file is impossibly large".to_owned(),
        })?;
        let mut buf = vec![0; size];
        self.file
            .read_exact_at(&mut buf, from)
            .map_err(io_err(&self.path, "read"))?;
        Ok(buf)
    }

    /// Reads the whole file into memory afresh.
    pub(super) fn reload(&mut self) -> Result<(), QuotaError> {
        self.entries.clear();
        self.total = 0;
        self.lines = 0;
        self.dead = 0;
        self.consumed = 0;
        self.loaded = false;
        let len = self
            .file
            .metadata()
            .map_err(io_err(&self.path, "stat"))?
            .len();
        let buf = self.read_range(0, len)?;
        let header_end = buf.iter().position(|&b| b == b'\n');
        let Some(header_end) = header_end else {
            // Empty, or a crash while the header was being written.
            if !LEDGER_HEADER.as_bytes().starts_with(&buf) {
                return Err(self.bad_header(&buf));
            }
            self.truncate_to(0)?;
            let header = format!("{LEDGER_HEADER}\n");
            self.file
                .write_all(header.as_bytes())
                .and_then(|()| self.file.sync_data())
                .map_err(io_err(&self.path, "write the header"))?;
            self.consumed = u64::try_from(header.len()).unwrap_or(u64::MAX);
            self.loaded = true;
            return Ok(());
        };
        if &buf[..header_end] != LEDGER_HEADER.as_bytes() {
            return Err(self.bad_header(&buf[..header_end]));
        }
        self.consumed = u64::try_from(header_end + 1).unwrap_or(u64::MAX);
        self.ingest(&buf[header_end + 1..])?;
        self.loaded = true;
        Ok(())
    }

    fn bad_header(&self, found: &[u8]) -> QuotaError {
        let found = String::from_utf8_lossy(&found[..found.len().min(64)]).into_owned();
        QuotaError::Version {
            path: self.path.clone(),
            found,
        }
    }

    /// Parses complete lines from `buf` (the bytes at `consumed`), then cuts off a torn
    /// last line.
    fn ingest(&mut self, buf: &[u8]) -> Result<(), QuotaError> {
        let mut rest = buf;
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            let (ms, rcpts) = parse_record(&rest[..nl]).map_err(|reason| QuotaError::Corrupt {
                path: self.path.clone(),
                line: self.lines + 2,
                reason,
            })?;
            self.push(ms, rcpts);
            self.lines += 1;
            self.consumed += u64::try_from(nl + 1).unwrap_or(u64::MAX);
            rest = &rest[nl + 1..];
        }
        if rest.is_empty() {
            return Ok(());
        }
        if !is_torn(rest) {
            return Err(QuotaError::Corrupt {
                path: self.path.clone(),
                line: self.lines + 2,
                reason: "the last line is unterminated and is not part of a record".to_owned(),
            });
        }
        // A crash mid-append: that send never began (see "Torn last line" above).
        // Cut it off so the next record starts on a line of its own.
        self.truncate_to(self.consumed)
    }

    fn truncate_to(&mut self, len: u64) -> Result<(), QuotaError> {
        self.file
            .set_len(len)
            .and_then(|()| self.file.sync_data())
            .map_err(io_err(&self.path, "cut off a torn last line of"))
    }

    fn push(&mut self, ms: u64, rcpts: u32) {
        // Keep stamps non-decreasing; moving one later only over-counts.
        let ms = self.entries.back().map_or(ms, |e| e.ms.max(ms));
        self.total += u64::from(rcpts);
        self.entries.push_back(Entry {
            ms,
            rcpts,
            cum: self.total,
        });
    }

    /// Appends one record and syncs it; only then may the send begin.
    pub(super) fn append(&mut self, stamp_ms: u64, rcpts: u32) -> Result<(), QuotaError> {
        self.append_synced(stamp_ms, rcpts, true)
    }

    /// Appends one record, synced to disk when `sync` (always, when a limit depends on it).
    pub(super) fn append_synced(
        &mut self,
        stamp_ms: u64,
        rcpts: u32,
        sync: bool,
    ) -> Result<(), QuotaError> {
        let ms = self.entries.back().map_or(stamp_ms, |e| e.ms.max(stamp_ms));
        let line = format!("{ms} {rcpts}\n");
        let written = self
            .file
            .write_all(line.as_bytes())
            .and_then(|()| if sync { self.file.sync_data() } else { Ok(()) });
        if let Err(e) = written {
            // Remove a partial line now rather than leave it to the next locker; if this
            // fails too, the next locker cuts it (and it never counted: we return Err).
            let _ = self.file.set_len(self.consumed);
            return Err(io_err(&self.path, "record a send in")(e));
        }
        self.consumed += u64::try_from(line.len()).unwrap_or(u64::MAX);
        self.lines += 1;
        self.push(ms, rcpts);
        Ok(())
    }

    /// Drops from memory the records that left every window of `limits` (they count as
    /// dead in the file until a compaction) and moves stamps from a clock that went back.
    pub(super) fn prune(&mut self, now_ms: u64, limits: &Limits) -> Result<(), QuotaError> {
        let retention = retention_ms(limits);
        if retention > self.retention_ms {
            // Longer windows than before: records we dropped from memory may matter.
            self.reload()?;
        }
        self.retention_ms = retention;
        self.dead += drop_expired(&mut self.entries, now_ms, retention);
        // The clock went back: see "Clock steps" in window.rs. The file must follow.
        if clamp_future(&mut self.entries, now_ms) {
            self.must_compact = true;
        }
        Ok(())
    }

    /// Rewrites the file with the live records when dead ones dominate. Runs as the
    /// last step under the lock: once the new file is in place, others can lock it.
    pub(super) fn maybe_compact(&mut self) {
        let live = u64::try_from(self.entries.len()).unwrap_or(u64::MAX);
        let worth = self.dead >= self.compact_min_dead && self.dead > live;
        if !(worth || self.must_compact) {
            return;
        }
        if let Err(e) = self.compact() {
            self.warning = Some(e.to_string());
        }
    }

    fn compact(&mut self) -> Result<(), QuotaError> {
        let mut text = String::with_capacity(20 + self.entries.len() * 20);
        text.push_str(LEDGER_HEADER);
        text.push('\n');
        for e in &self.entries {
            text.push_str(&format!("{} {}\n", e.ms, e.rcpts));
        }
        let file = replace_file(
            &self.path,
            &with_suffix(&self.path, ".tmp"),
            text.as_bytes(),
        )?;
        let meta = file.metadata().map_err(io_err(&self.path, "stat"))?;
        // The path names the new file now; our lock on the old one ends when `locked`
        // drops its guard, just after.
        self.file = file;
        self.id = file_id(&meta);
        self.consumed = u64::try_from(text.len()).unwrap_or(u64::MAX);
        self.lines = u64::try_from(self.entries.len()).unwrap_or(u64::MAX);
        self.dead = 0;
        self.must_compact = false;
        sync_dir(&self.path)
    }
}

#[cfg(test)]
mod tests {
    use std::fs::{self, OpenOptions};
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;

    use super::super::tests::*;
    use super::super::{Ledger, QuotaError, Reservation};
    use super::{LEDGER_HEADER, with_suffix};

    #[test]
    fn torn_last_line_is_ignored_and_cut() {
        let dir = tempfile::tempdir().unwrap();
        let l = limits("off", "10/1h");
        for torn in [
            &b"17000"[..],
            b"1700000000000 ",
            b"\0\0\0\0\0\0\0\0",
            b"17\0\0",
        ] {
            let path = dir.path().join("torn.ledger");
            let mut text = format!("{LEDGER_HEADER}\n{T0} 1\n{} 2\n", T0 + 1).into_bytes();
            text.extend_from_slice(torn);
            fs::write(&path, &text).unwrap();
            let mut ledger = Ledger::open(&path).unwrap();
            assert_eq!(
                ledger.usage(at(T0 + 2), &l).unwrap().recipients_in_window,
                3
            );
            assert_eq!(ledger.reserve(at(T0 + 3), 4, &l).unwrap(), Reservation::Go);
            assert_eq!(records(&path), [(T0, 1), (T0 + 1, 2), (T0 + 3, 4)]);
            fs::remove_file(&path).unwrap();
        }
        // A header torn at creation is rewritten.
        let path = dir.path().join("header.ledger");
        fs::write(&path, "relay365-led").unwrap();
        let mut ledger = Ledger::open(&path).unwrap();
        assert_eq!(ledger.reserve(at(T0), 1, &l).unwrap(), Reservation::Go);
        assert_eq!(records(&path), [(T0, 1)]);
    }

    #[test]
    fn torn_line_left_by_another_process_is_cut_before_appending() {
        let (_dir, path, mut ledger) = setup();
        let l = limits("off", "10/1h");
        assert_eq!(ledger.reserve(at(T0), 1, &l).unwrap(), Reservation::Go);
        // Another process died mid-append.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"170000").unwrap();
        assert_eq!(ledger.reserve(at(T0 + 1), 2, &l).unwrap(), Reservation::Go);
        assert_eq!(records(&path), [(T0, 1), (T0 + 1, 2)]);
    }

    #[test]
    fn corruption_is_a_typed_error_and_reset_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.ledger");
        fs::write(&path, format!("{LEDGER_HEADER}\n{T0} 1\ngarbage\n{T0} 2\n")).unwrap();
        let e = Ledger::open(&path).unwrap_err();
        assert!(matches!(e, QuotaError::Corrupt { line: 3, .. }), "{e}");
        let text = e.to_string();
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains("--reset-ledger"), "{text}");

        for (body, line) in [
            (format!("{LEDGER_HEADER}\n{T0} 0\n"), 2),
            (format!("{LEDGER_HEADER}\n{T0}  1\n"), 2),
            (format!("{LEDGER_HEADER}\n{T0} 1\r\n"), 2),
            (format!("{LEDGER_HEADER}\n{T0} 1\nhello"), 3),
            (format!("{LEDGER_HEADER}\n{T0} 1\n{}", "9".repeat(40)), 3),
        ] {
            fs::write(&path, body).unwrap();
            let e = Ledger::open(&path).unwrap_err();
            assert!(
                matches!(e, QuotaError::Corrupt { line: l, .. } if l == line),
                "{e}"
            );
        }
        for header in ["relay365-ledger 2\n", "something else\n1 1\n", "hello"] {
            fs::write(&path, header).unwrap();
            let e = Ledger::open(&path).unwrap_err();
            assert!(matches!(e, QuotaError::Version { .. }), "{header:?}: {e}");
        }

        // Garbage appended while open is caught on the next operation, every time.
        let good = dir.path().join("good.ledger");
        let mut ledger = Ledger::open(&good).unwrap();
        let l = limits("off", "10000/24h");
        assert_eq!(ledger.reserve(at(T0), 1, &l).unwrap(), Reservation::Go);
        let mut f = OpenOptions::new().append(true).open(&good).unwrap();
        f.write_all(b"oops\n").unwrap();
        for _ in 0..2 {
            assert!(matches!(
                ledger.reserve(at(T0), 1, &l),
                Err(QuotaError::Corrupt { line: 3, .. })
            ));
        }

        // The fix: keep the damaged file, count the whole window as used.
        let kept = Ledger::reset(&good, at(T0 + 10), &l).unwrap().unwrap();
        assert!(fs::read_to_string(&kept).unwrap().contains("oops"));
        // The open handle follows the new file.
        assert_eq!(
            ledger.reserve(at(T0 + 10), 1, &l).unwrap(),
            Reservation::WaitUntil(at(T0 + 10 + 86_486_401))
        );
        let mut fresh = Ledger::open(&good).unwrap();
        assert_eq!(
            fresh.usage(at(T0 + 10), &l).unwrap().recipients_in_window,
            10_000
        );
        let missing = dir.path().join("new.ledger");
        assert_eq!(Ledger::reset(&missing, at(T0), &l).unwrap(), None);
        assert_eq!(records(&missing), [(T0, 10_000)]);
    }

    #[test]
    fn compaction_keeps_in_window_entries_and_others_follow() {
        let (_dir, path, mut a) = setup();
        let mut b = Ledger::open(&path).unwrap();
        a.set_compact_min_dead(10);
        let l = limits("off", "10000/24h");
        for i in 0..50 {
            assert_eq!(a.reserve(at(T0 + i), 1, &l).unwrap(), Reservation::Go);
        }
        for i in 0..5 {
            assert_eq!(
                b.reserve(at(T0 + 2 * HOUR + i), 7, &l).unwrap(),
                Reservation::Go
            );
        }
        let before = fs::metadata(&path).unwrap().ino();
        // A day later the first 50 are dead and dominate: A rewrites the file.
        let now = T0 + 25 * HOUR;
        assert_eq!(a.reserve(at(now), 3, &l).unwrap(), Reservation::Go);
        assert_ne!(fs::metadata(&path).unwrap().ino(), before);
        let recs = records(&path);
        assert_eq!(recs.len(), 6);
        assert_eq!(recs[0], (T0 + 2 * HOUR, 7));
        assert_eq!(recs[5], (now, 3));
        assert!(!with_suffix(&path, ".tmp").exists());
        // B notices the new file and sees the same window.
        let ub = b.usage(at(now), &l).unwrap();
        assert_eq!(ub.recipients_in_window, 38);
        assert_eq!(b.reserve(at(now + 1), 2, &l).unwrap(), Reservation::Go);
        assert_eq!(a.usage(at(now + 1), &l).unwrap().recipients_in_window, 40);
        assert_eq!(records(&path).len(), 7);
        assert_eq!(a.take_warning(), None);
        let mut c = Ledger::open(&path).unwrap();
        assert_eq!(c.usage(at(now + 1), &l).unwrap().recipients_in_window, 40);
    }

    #[test]
    fn compaction_stays_cheap_over_a_long_drain() {
        let (_dir, path, mut ledger) = setup();
        ledger.set_compact_min_dead(100);
        let l = limits("30/1m", "off");
        // Five days at 1 message per 20 minutes: the file never holds much more than
        // a day (72 records) plus the dead allowance.
        let mut now = T0;
        let mut longest = 0;
        for _ in 0..360 {
            assert_eq!(ledger.reserve(at(now), 1, &l).unwrap(), Reservation::Go);
            longest = longest.max(records(&path).len());
            now += 20 * MIN;
        }
        assert!(longest <= 200, "{longest}");
        assert!(records(&path).len() >= 72);
    }
}
