//! Freeze files: a server verdict that stops an account until a moment, kept beside
//! the ledger so that the daemon and `relay365 flush` both honour it.
//!
//! Trusted input: the file is written only by relay365 processes running as the
//! daemon's user in its private state directory; it is still parsed strictly and
//! bounded in size, and a file that does not parse is an error, never a silent thaw.
//!
//! # Freezes
//! Server verdicts win over the ledger. [`Ledger::freeze`](super::Ledger::freeze) writes
//! `<account>.freeze` beside the ledger (the ledger path with the extension `freeze`)
//! atomically:
//! ```text
//! relay365-freeze 1
//! 1700086400000
//! 554 5.2.0 SubmissionQuotaExceededException
//! ```
//! (header, end in milliseconds since the epoch, reason on one line). A freeze only ever
//! extends: a shorter verdict never cuts a longer one short;
//! [`Ledger::thaw`](super::Ledger::thaw) ends it.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::Path;
use std::time::SystemTime;

use super::QuotaError;
use super::file::{io_err, replace_file, sync_dir, with_suffix};
use super::window::{floor_ms, from_ms};
use crate::config::limits::all_digits;

/// The first line of a freeze file.
const FREEZE_HEADER: &str = "relay365-freeze 1";
/// The longest freeze file accepted; ours are under 400 bytes.
const MAX_FREEZE_FILE: u64 = 4096;
/// The longest freeze reason kept, in characters.
const MAX_REASON: usize = 300;

/// A server verdict that stops the account until `until`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Freeze {
    pub until: SystemTime,
    pub reason: String,
}

/// What [`Ledger::check_freeze`](super::Ledger::check_freeze) found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FreezeCheck {
    /// No freeze file.
    Free,
    /// A freeze in force.
    Frozen(Freeze),
    /// A freeze that was over; this call removed it.
    Ended(Freeze),
}

/// Removes a freeze file, durably (a freeze that came back after a crash would stop
/// the account again). Absent is fine.
pub(super) fn remove_freeze(path: &Path) -> Result<(), QuotaError> {
    match fs::remove_file(path) {
        Ok(()) => sync_dir(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path, "remove")(e)),
    }
}

/// The freeze on file, over or not; `None` if there is no file.
pub(super) fn read_freeze(path: &Path) -> Result<Option<Freeze>, QuotaError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path, "open")(e)),
    };
    let mut text = String::new();
    file.take(MAX_FREEZE_FILE + 1)
        .read_to_string(&mut text)
        .map_err(|e| QuotaError::FreezeCorrupt {
            path: path.to_path_buf(),
            reason: format!("unreadable: {e}"),
        })?;
    let corrupt = |reason: &str| QuotaError::FreezeCorrupt {
        path: path.to_path_buf(),
        reason: reason.to_owned(),
    };
    if u64::try_from(text.len()).unwrap_or(u64::MAX) > MAX_FREEZE_FILE {
        return Err(corrupt("the file is too large"));
    }
    let mut lines = text.split('\n');
    if lines.next() != Some(FREEZE_HEADER) {
        return Err(corrupt("the first line is not `relay365-freeze 1`"));
    }
    let until = lines
        .next()
        .filter(|s| all_digits(s))
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| corrupt("the second line is not a time in milliseconds"))?;
    let reason = lines.next().unwrap_or_default().to_owned();
    Ok(Some(Freeze {
        until: from_ms(until),
        reason,
    }))
}

/// Replaces the freeze file with `freeze` atomically and durably (through
/// `<freeze>.tmp`). The caller holds the ledger's lock and has decided that `freeze`
/// extends whatever was there.
pub(super) fn write_freeze(path: &Path, freeze: &Freeze) -> Result<(), QuotaError> {
    let text = format!(
        "{FREEZE_HEADER}\n{}\n{}\n",
        floor_ms(freeze.until),
        freeze.reason
    );
    let tmp = with_suffix(path, ".tmp");
    replace_file(path, &tmp, text.as_bytes())?;
    sync_dir(path)
}

/// One line, no control characters, bounded: it ends up in mailq and syslog.
pub(super) fn clean_reason(reason: &str) -> String {
    let bounded: String = reason.chars().take(MAX_REASON).collect();
    crate::message::text::one_line(&bounded).trim().to_owned()
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::super::tests::*;
    use super::super::{Grant, Ledger, QuotaError, Reservation};
    use super::FreezeCheck;
    use crate::config::limits::Limits;

    #[test]
    fn freezes_persist_extend_expire_and_thaw() {
        let (_dir, path, mut a) = setup();
        let mut b = Ledger::open(&path).unwrap();
        let l = Limits::default();
        let until = at(T0 + HOUR);
        let f = a
            .freeze(until, "554 5.2.0 SubmissionQuotaExceededException\r\nx")
            .unwrap();
        assert_eq!(f.reason, "554 5.2.0 SubmissionQuotaExceededException  x");
        assert!(a.freeze_path().ends_with("acct.freeze"));
        assert_eq!(b.frozen(at(T0)).unwrap().unwrap().until, until);
        assert_eq!(
            b.reserve(at(T0), 1, &l).unwrap(),
            Reservation::WaitUntil(until)
        );
        assert_eq!(b.room(at(T0), &l).unwrap(), 0);
        assert_eq!(
            b.reserve_some(at(T0), 9, &l).unwrap(),
            Grant::WaitUntil(until)
        );
        let u = b.usage(at(T0), &l).unwrap();
        assert!(
            u.reason()
                .unwrap()
                .starts_with("quota: frozen until 23:13:20 UTC: 554 5.2.0"),
            "{:?}",
            u.reason()
        );
        // A shorter verdict does not cut it short; a longer one extends it.
        assert_eq!(b.freeze(at(T0 + MIN), "432 4.3.2").unwrap().until, until);
        assert_eq!(b.frozen(at(T0)).unwrap().unwrap().until, until);
        // Survives reopening; ends by itself.
        drop(a);
        let mut a = Ledger::open(&path).unwrap();
        assert_eq!(a.frozen(at(T0 + HOUR - 1)).unwrap().unwrap().until, until);
        assert_eq!(a.frozen(at(T0 + HOUR)).unwrap(), None);
        assert_eq!(a.reserve(at(T0 + HOUR), 1, &l).unwrap(), Reservation::Go);
        let later = at(T0 + 3 * HOUR);
        assert_eq!(a.freeze(later, "550 5.2.251").unwrap().until, later);
        assert_eq!(b.frozen(at(T0 + HOUR)).unwrap().unwrap().until, later);
        b.thaw().unwrap();
        b.thaw().unwrap();
        assert_eq!(a.frozen(at(T0 + HOUR)).unwrap(), None);
        assert_eq!(a.reserve(at(T0 + HOUR), 1, &l).unwrap(), Reservation::Go);

        fs::write(a.freeze_path(), "junk").unwrap();
        let e = a.reserve(at(T0 + HOUR), 1, &l).unwrap_err();
        assert!(matches!(e, QuotaError::FreezeCorrupt { .. }), "{e}");
        assert!(e.to_string().contains("--thaw"));
    }

    #[test]
    fn a_freeze_that_is_over_is_reported_ended_once() {
        let (_dir, path, mut a) = setup();
        let mut b = Ledger::open(&path).unwrap();
        assert_eq!(a.check_freeze(at(T0)).unwrap(), FreezeCheck::Free);
        let f = a.freeze(at(T0 + HOUR), "554 5.2.0 quota").unwrap();
        assert_eq!(
            b.check_freeze(at(T0)).unwrap(),
            FreezeCheck::Frozen(f.clone())
        );
        assert_eq!(
            b.check_freeze(at(T0 + HOUR - 1)).unwrap(),
            FreezeCheck::Frozen(f.clone())
        );
        // The first to look after the end removes it and says so; the other sees none.
        assert_eq!(
            b.check_freeze(at(T0 + HOUR)).unwrap(),
            FreezeCheck::Ended(f)
        );
        assert!(!a.freeze_path().exists());
        assert_eq!(a.check_freeze(at(T0 + HOUR)).unwrap(), FreezeCheck::Free);
        // A freeze file that cannot be read is an error, not a silent thaw.
        fs::write(a.freeze_path(), "junk").unwrap();
        assert!(matches!(
            a.check_freeze(at(T0 + HOUR)),
            Err(QuotaError::FreezeCorrupt { .. })
        ));
        assert!(a.freeze_path().exists());
    }
}
