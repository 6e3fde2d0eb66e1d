//! Quota governor: keeps every submission of a mailbox inside Exchange Online's
//! per-mailbox limits (30 messages a minute, 10,000 recipients per rolling 24 hours,
//! 500 recipients a message) while sending at the full allowed rate.
//!
//! Trusted input: the [`Limits`] come from the validated configuration; the ledger and
//! freeze files are written only by relay365 processes running as the daemon's user in
//! its private state directory. They are still parsed strictly, because a damaged
//! ledger must stop sending rather than under-count. Nothing here reads the network.
//!
//! # Model
//! Every transaction is recorded in a per-account **ledger** *before* it starts, and a
//! transaction may start only if, at every instant, the sends still counted in each
//! sliding window (including this one) stay within that window's count. The recipient
//! window is reduced by [`Limits::reserve`] to leave room for other senders of the mailbox.
//!
//! The parts, each documented in its file:
//! - `window.rs`: the window boundary and its guard against stamp jitter, clock steps,
//!   and the arithmetic as pure functions (when a transaction fits, the room now);
//! - `file.rs`: the ledger file format, reading and appending, torn last lines and
//!   compaction;
//! - `freeze.rs`: freeze files, the server's verdicts that stop an account;
//! - `store.rs`: the seam the daemon calls, [`Store`]: this host's ledger file, or the
//!   fleet's ledger shared through Redis (`redis/`: the same windows in a server-side
//!   script, room in turn, shared freezes, and the local share while Redis is down);
//! - this file: the [`Ledger`] API, its locking, and the answers and errors.
//!
//! # Concurrency and durability
//! The daemon and `relay365 flush` share the file through an exclusive `flock` on it.
//! Each operation: lock, check that the path still names the open file (otherwise
//! another process compacted it: reopen and re-read), read only the bytes appended
//! since the last look, decide, append one line with a single `write(2)` on an
//! `O_APPEND` descriptor, `fdatasync`, unlock. Appends only: the cost of a reservation
//! is a few system calls plus `O(log n)` arithmetic on the in-memory window. A torn
//! last line (a crash mid-append) is safe to ignore and is cut off; see `file.rs`.
//!
//! **Corruption.** A complete line in the middle that does not parse, or a foreign or
//! newer header, makes every operation fail with [`QuotaError::Corrupt`] /
//! [`QuotaError::Version`], naming the file and the line: guessing could under-count, and
//! under-counting costs a 24-hour block. The fix is [`Ledger::reset`] (meant to be wired
//! to `relay365 quota --reset-ledger`): it keeps the damaged file beside the ledger as
//! `<ledger>.corrupt-<ms>` and starts a new ledger that counts the whole recipient window
//! as used, so the account waits one window instead of risking the block. Deleting the
//! ledger instead forgets the window's sends; relay365 refuses to go on with a ledger
//! that vanishes while it is open.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use thiserror::Error;

use crate::config::limits::{Limits, LimitsError, Rate};

mod file;
mod freeze;
pub mod redis;
mod store;
mod window;

pub use file::COMPACT_MIN_DEAD;
pub use freeze::{Freeze, FreezeCheck};
pub use store::Store;
pub use window::MAX_FUTURE;

use file::{LEDGER_HEADER, file_id, io_err, open_options, replace_file, sync_dir, with_suffix};
use freeze::{clean_reason, read_freeze, remove_freeze, write_freeze};
use window::{Entry, ceil_ms, floor_ms, from_ms};

/// The longest lead [`Ledger::reserve_some_ahead`] puts on a stamp.
pub const MAX_LEAD: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------
// Errors and results

/// Why the quota governor could not answer. Every variant means "do not send now".
#[derive(Debug, Error)]
pub enum QuotaError {
    #[error(
        "quota ledger {}: cannot {action}: {source}; check that the state directory exists, is writable by the relay365 user and the disk is not full",
        .path.display()
    )]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "quota ledger {}: line {line} is corrupt ({reason}); relay365 will not guess how much of the quota was used. Repair the line, or run `relay365 quota --reset-ledger` (it keeps the damaged file beside the ledger and counts the whole recipient window as used)",
        .path.display()
    )]
    Corrupt {
        path: PathBuf,
        line: u64,
        reason: String,
    },
    #[error(
        "quota ledger {}: header {found:?} is not {header:?}; the file was written by another program or a newer relay365. Use that relay365 version, or run `relay365 quota --reset-ledger`",
        .path.display(),
        header = LEDGER_HEADER
    )]
    Version { path: PathBuf, found: String },
    #[error(
        "quota ledger {}: the file vanished while in use, so the sends it recorded are forgotten; run `relay365 quota --reset-ledger` to start a ledger that counts the window as used, then restart relay365",
        .path.display()
    )]
    Vanished { path: PathBuf },
    #[error(
        "quota freeze {}: {reason}; if the freeze it held is over, remove it with `relay365 quota --thaw`",
        .path.display()
    )]
    FreezeCorrupt { path: PathBuf, reason: String },
    #[error(
        "quota ledger {}: the name must not end in .freeze or .tmp; name it <account>.ledger",
        .path.display()
    )]
    BadPath { path: PathBuf },
    #[error(
        "{rcpts} recipients in one transaction exceed max_recipients = {max}; split the message into batches of at most {max}"
    )]
    TooManyRecipients { rcpts: u32, max: u32 },
    #[error(
        "{rcpts} recipients can never fit in recipient_rate = {rate} less reserve = {reserve}; split the message (Ledger::room tells how many fit)"
    )]
    NeverFits {
        rcpts: u32,
        rate: Rate,
        reserve: u32,
    },
    #[error(
        "a transaction needs at least one recipient; drop messages without recipients before asking the quota"
    )]
    NoRecipients,
    #[error("quota limits: {0}")]
    Limits(#[from] LimitsError),
    #[error("{0}")]
    Store(String),
}

/// The answer to [`Ledger::reserve`].
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    /// Recorded and synced: start the transaction now.
    Go,
    /// Not recorded: the earliest moment every window and any freeze allow it.
    WaitUntil(SystemTime),
}

/// The answer to [`Ledger::reserve_some`].
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// Recorded: send this many (at least 1) of the recipients now; the rest wait.
    Go(u32),
    /// Not even one recipient may go before this moment. Nothing recorded.
    WaitUntil(SystemTime),
}

/// The state of an account's windows, for `relay365 quota` and mailq.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    /// The moment this describes.
    pub now: SystemTime,
    pub message_rate: Rate,
    pub recipient_rate: Rate,
    pub reserve: u32,
    /// Transactions counting in the message window (0 when the rate is off).
    pub messages_in_window: u64,
    /// Recipients counting in the recipient window (0 when the rate is off).
    pub recipients_in_window: u64,
    /// Transactions that may still start in the window; `None` = no limit.
    pub messages_left: Option<u64>,
    /// Recipients that may still go in the window, reserve excluded; `None` = no limit.
    pub recipients_left: Option<u64>,
    /// When the next transaction may start, if not now.
    pub next_message_room: Option<SystemTime>,
    /// When the next recipient may go, if not now.
    pub next_recipient_room: Option<SystemTime>,
    /// A server verdict in force.
    pub frozen: Option<Freeze>,
}

impl Usage {
    /// Why nothing can go now, as shown by mailq, such as
    /// `quota: 10000/10000 recipients in 24h, room at 14:02:11 UTC`; `None` if a
    /// transaction with one recipient could start now.
    pub fn reason(&self) -> Option<String> {
        if let Some(freeze) = &self.frozen {
            return Some(format!(
                "quota: frozen until {}: {}",
                format_moment(freeze.until, self.now),
                freeze.reason
            ));
        }
        if let Some(at) = self.next_recipient_room {
            let reserved = if self.reserve > 0 {
                format!(" ({} reserved)", self.reserve)
            } else {
                String::new()
            };
            return Some(format!(
                "quota: {}/{} recipients in {}{reserved}, room at {}",
                self.recipients_in_window,
                self.recipient_rate.count,
                self.recipient_rate.window_text(),
                format_moment(at, self.now)
            ));
        }
        if let Some(at) = self.next_message_room {
            return Some(format!(
                "quota: {}/{} messages in {}, room at {}",
                self.messages_in_window,
                self.message_rate.count,
                self.message_rate.window_text(),
                format_moment(at, self.now)
            ));
        }
        None
    }
}

/// `14:02:11 UTC`, or `2025-11-24 14:02:11 UTC` when `t` is on another UTC day than
/// `now`. UTC because the daemon has no time zone database and logs are compared
/// across hosts.
pub fn format_moment(t: SystemTime, now: SystemTime) -> String {
    let secs = |t: SystemTime| {
        t.duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
    };
    let (s, n) = (secs(t), secs(now));
    let (day, tod) = (s.div_euclid(86_400), s.rem_euclid(86_400));
    let clock = format!("{:02}:{:02}:{:02}", tod / 3600, tod / 60 % 60, tod % 60);
    if day == n.div_euclid(86_400) {
        format!("{clock} UTC")
    } else {
        let (y, m, d) = crate::message::complete::civil_from_days(day);
        format!("{y:04}-{m:02}-{d:02} {clock} UTC")
    }
}

// ---------------------------------------------------------------------------------------
// Ledger

/// One account's persistent send ledger, held open between reservations.
#[derive(Debug)]
pub struct Ledger {
    path: PathBuf,
    freeze_path: PathBuf,
    file: File,
    /// (device, inode) of `file`: compaction by another process replaces the path.
    id: (u64, u64),
    /// Whether `entries` reflects the file up to `consumed`.
    loaded: bool,
    /// Bytes of complete lines (header included) already read.
    consumed: u64,
    /// Record lines in the file.
    lines: u64,
    /// Record lines in the file that have left memory as out of every window.
    dead: u64,
    /// In-memory records no older than `retention_ms`, stamps non-decreasing.
    entries: VecDeque<Entry>,
    /// `cum` of the last entry.
    total: u64,
    /// How long records are kept in memory; `u64::MAX` until limits are known.
    retention_ms: u64,
    /// Set when a stamp was rewritten in memory and the file must follow.
    must_compact: bool,
    compact_min_dead: u64,
    /// The last compaction failure, for the caller to log.
    warning: Option<String>,
}

impl Ledger {
    /// Opens (creating if missing) the ledger at `path`, typically
    /// `<spool>/state/<account>.ledger`; the freeze file is `<account>.freeze` beside
    /// it. Reads the whole file, so corruption is reported here, at startup.
    pub fn open(path: &Path) -> Result<Ledger, QuotaError> {
        let freeze_path = path.with_extension("freeze");
        let ext = path.extension().and_then(|e| e.to_str());
        if freeze_path == path || matches!(ext, Some("freeze" | "tmp")) {
            return Err(QuotaError::BadPath {
                path: path.to_path_buf(),
            });
        }
        let file = open_options()
            .create(true)
            .open(path)
            .map_err(io_err(path, "open"))?;
        let meta = file.metadata().map_err(io_err(path, "stat"))?;
        let mut ledger = Ledger {
            path: path.to_path_buf(),
            freeze_path,
            file,
            id: file_id(&meta),
            loaded: false,
            consumed: 0,
            lines: 0,
            dead: 0,
            entries: VecDeque::new(),
            total: 0,
            retention_ms: u64::MAX,
            must_compact: false,
            compact_min_dead: COMPACT_MIN_DEAD,
            warning: None,
        };
        let created = meta.len() == 0;
        ledger.locked(None, |_| Ok(()))?;
        if created {
            sync_dir(path)?;
        }
        Ok(ledger)
    }

    /// The ledger file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The freeze file beside it.
    pub fn freeze_path(&self) -> &Path {
        &self.freeze_path
    }

    /// The last compaction failure, if any, for the caller to log. The ledger stays
    /// correct without compaction; it only grows.
    pub fn take_warning(&mut self) -> Option<String> {
        self.warning.take()
    }

    /// Records a transaction of `rcpts` recipients if every window and any freeze
    /// allow it at `now` (`Go`: start the transaction now), or tells the exact earliest
    /// moment they will (nothing recorded).
    pub fn reserve(
        &mut self,
        now: SystemTime,
        rcpts: u32,
        limits: &Limits,
    ) -> Result<Reservation, QuotaError> {
        limits.validate()?;
        if rcpts == 0 {
            return Err(QuotaError::NoRecipients);
        }
        if rcpts > limits.max_recipients {
            return Err(QuotaError::TooManyRecipients {
                rcpts,
                max: limits.max_recipients,
            });
        }
        if limits.recipient_rate.is_limited() && u64::from(rcpts) > limits.capacity() {
            return Err(QuotaError::NeverFits {
                rcpts,
                rate: limits.recipient_rate,
                reserve: limits.reserve,
            });
        }
        let now_ms = floor_ms(now);
        self.locked(Some((now_ms, limits)), |l| {
            let at = l.earliest(now_ms, rcpts, limits)?;
            if at > now_ms {
                return Ok(Reservation::WaitUntil(from_ms(at)));
            }
            l.append(ceil_ms(now), rcpts)?;
            Ok(Reservation::Go)
        })
    }

    /// Like [`Ledger::reserve`] for a message of `wanted` recipients that may be split:
    /// records and grants as many as fit now (at most `max_recipients`), or tells when
    /// the first one will fit.
    pub fn reserve_some(
        &mut self,
        now: SystemTime,
        wanted: u32,
        limits: &Limits,
    ) -> Result<Grant, QuotaError> {
        self.reserve_some_ahead(now, Duration::ZERO, wanted, limits)
    }

    /// Like [`Ledger::reserve_some`], but stamps the record `lead` after `now` (at most
    /// [`MAX_LEAD`]). The server stamps a transaction when it accepts it, which is up to
    /// the whole transaction after the reservation; the entry must count until a
    /// window after *that*, or the next send a window later can land inside the
    /// server's window of this one. A stamp ahead of `now` already counts from `now`
    /// on, so the lead only makes the entry count longer, never shorter.
    pub fn reserve_some_ahead(
        &mut self,
        now: SystemTime,
        lead: Duration,
        wanted: u32,
        limits: &Limits,
    ) -> Result<Grant, QuotaError> {
        limits.validate()?;
        if wanted == 0 {
            return Err(QuotaError::NoRecipients);
        }
        let now_ms = floor_ms(now);
        self.locked(Some((now_ms, limits)), |l| {
            let room = l.room_now(now_ms, limits)?;
            if room == 0 {
                let at = l.earliest(now_ms, 1, limits)?;
                // room 0 means some window or a freeze is in the way, so `at` is later.
                return Ok(Grant::WaitUntil(from_ms(at.max(now_ms.saturating_add(1)))));
            }
            let n = wanted.min(room);
            // With both rates off nothing waits on the record, so it need not be on disk
            // before the send: it only feeds `relay365 quota`, and an fdatasync under
            // the lock would serialise every worker of the account on the disk.
            let gating = limits.message_rate.is_limited() || limits.recipient_rate.is_limited();
            l.append_synced(ceil_ms(now + lead.min(MAX_LEAD)), n, gating)?;
            Ok(Grant::Go(n))
        })
    }

    /// Recipients one transaction could carry right now: 0 if a freeze or the message
    /// window is in the way, else what the recipient window has left after the reserve,
    /// at most `max_recipients`. `reserve(now, n)` with `1 <= n <= room` returns `Go`
    /// unless another process takes the room first.
    pub fn room(&mut self, now: SystemTime, limits: &Limits) -> Result<u32, QuotaError> {
        limits.validate()?;
        let now_ms = floor_ms(now);
        self.locked(Some((now_ms, limits)), |l| l.room_now(now_ms, limits))
    }

    /// The windows as they stand at `now`.
    pub fn usage(&mut self, now: SystemTime, limits: &Limits) -> Result<Usage, QuotaError> {
        limits.validate()?;
        let now_ms = floor_ms(now);
        self.locked(Some((now_ms, limits)), |l| {
            let (messages_in_window, messages_left, next_message_room) =
                if limits.message_rate.is_limited() {
                    let n = window::in_window(&l.entries, now_ms, &limits.message_rate);
                    let n = u64::try_from(n).unwrap_or(u64::MAX);
                    let at = window::message_free_at(&l.entries, now_ms, &limits.message_rate);
                    let left = u64::from(limits.message_rate.count).saturating_sub(n);
                    (n, Some(left), (at > now_ms).then(|| from_ms(at)))
                } else {
                    (0, None, None)
                };
            let (recipients_in_window, recipients_left, next_recipient_room) =
                if limits.recipient_rate.is_limited() {
                    let first = window::first_in_window(&l.entries, now_ms, &limits.recipient_rate);
                    let sum = window::sum_from(&l.entries, first);
                    let at = window::recipients_free_at(&l.entries, now_ms, 1, limits);
                    let left = limits.capacity().saturating_sub(sum);
                    (sum, Some(left), (at > now_ms).then(|| from_ms(at)))
                } else {
                    (0, None, None)
                };
            let frozen = read_freeze(&l.freeze_path)?.filter(|f| floor_ms(f.until) > now_ms);
            Ok(Usage {
                now: from_ms(now_ms),
                message_rate: limits.message_rate,
                recipient_rate: limits.recipient_rate,
                reserve: limits.reserve,
                messages_in_window,
                recipients_in_window,
                messages_left,
                recipients_left,
                next_message_room,
                next_recipient_room,
                frozen,
            })
        })
    }

    /// Counts a transaction that went out without a reservation (no limits checked).
    pub fn record_external(&mut self, now: SystemTime, rcpts: u32) -> Result<(), QuotaError> {
        if rcpts == 0 {
            return Ok(());
        }
        self.locked(None, |l| l.append(ceil_ms(now), rcpts))
    }

    /// When the server's daily recipient quota will have room again after it refused
    /// us (`SubmissionQuotaExceededException`). If the ledger itself holds at least the
    /// full count in the window, the server's room can't come back before enough of
    /// those leave, and the ledger tells that moment; otherwise the server counted sends
    /// the ledger never saw (another client, a lower tenant limit) and only a whole
    /// window from now is safe. Freeze the account until then.
    pub fn quota_reply_until(
        &mut self,
        now: SystemTime,
        limits: &Limits,
    ) -> Result<SystemTime, QuotaError> {
        limits.validate()?;
        let now_ms = floor_ms(now);
        let rate = if limits.recipient_rate.is_limited() {
            limits.recipient_rate
        } else {
            Limits::default().recipient_rate
        };
        self.locked(Some((now_ms, limits)), |l| {
            let first = window::first_in_window(&l.entries, now_ms, &rate);
            let sum = window::sum_from(&l.entries, first);
            let full = u64::from(rate.count);
            let at = if limits.recipient_rate.is_limited() && sum >= full {
                window::drop_until(&l.entries, first, sum - full + 1, rate.hold_ms())
            } else {
                now_ms.saturating_add(rate.hold_ms())
            };
            Ok(from_ms(at.max(now_ms)))
        })
    }

    /// Stops the account until `until` (both the daemon and `relay365 flush` honour
    /// it). An existing longer freeze is kept. Returns the freeze now in force.
    pub fn freeze(&mut self, until: SystemTime, reason: &str) -> Result<Freeze, QuotaError> {
        let wanted = Freeze {
            until: from_ms(ceil_ms(until)),
            reason: clean_reason(reason),
        };
        self.locked(None, |l| {
            if let Some(old) = read_freeze(&l.freeze_path)?
                && old.until >= wanted.until
            {
                return Ok(old);
            }
            write_freeze(&l.freeze_path, &wanted)?;
            Ok(wanted)
        })
    }

    /// The freeze in force at `now`, if any.
    pub fn frozen(&self, now: SystemTime) -> Result<Option<Freeze>, QuotaError> {
        Ok(read_freeze(&self.freeze_path)?.filter(|f| floor_ms(f.until) > floor_ms(now)))
    }

    /// Like [`Ledger::frozen`], and a freeze that is over is removed and reported as
    /// [`FreezeCheck::Ended`], so the log can say when the account resumes. The removal
    /// happens under the lock after a second look: of a daemon and a flush, only one
    /// sees the end. Costs nothing more than `frozen` while there is no freeze file.
    pub fn check_freeze(&mut self, now: SystemTime) -> Result<FreezeCheck, QuotaError> {
        let now_ms = floor_ms(now);
        let over = |f: &Freeze| floor_ms(f.until) <= now_ms;
        match read_freeze(&self.freeze_path)? {
            None => Ok(FreezeCheck::Free),
            Some(f) if !over(&f) => Ok(FreezeCheck::Frozen(f)),
            Some(_) => self.locked(None, |l| match read_freeze(&l.freeze_path)? {
                None => Ok(FreezeCheck::Free),
                Some(f) if !over(&f) => Ok(FreezeCheck::Frozen(f)),
                Some(f) => {
                    remove_freeze(&l.freeze_path)?;
                    Ok(FreezeCheck::Ended(f))
                }
            }),
        }
    }

    /// Ends any freeze (an admin's release).
    pub fn thaw(&mut self) -> Result<(), QuotaError> {
        self.locked(None, |l| remove_freeze(&l.freeze_path))
    }

    /// Replaces a damaged (or any) ledger with one that counts the whole recipient
    /// window as used from `now`, keeping the old file as `<ledger>.corrupt-<ms>`
    /// (returned). Processes holding the old file notice the new one on their next
    /// operation. The fix named by [`QuotaError::Corrupt`].
    pub fn reset(
        path: &Path,
        now: SystemTime,
        limits: &Limits,
    ) -> Result<Option<PathBuf>, QuotaError> {
        limits.validate()?;
        // Hold the current file's lock so no one appends to it while it is replaced;
        // if it was compacted meanwhile, lock the file that replaced it.
        let old = loop {
            let f = match open_options().open(path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => break None,
                Err(e) => return Err(io_err(path, "open")(e)),
            };
            let f = crate::spool::flock::exclusive(f).map_err(io_err(path, "lock"))?;
            let locked = f.metadata().map_err(io_err(path, "stat"))?;
            match fs::symlink_metadata(path) {
                Ok(m) if file_id(&m) == file_id(&locked) => break Some(f),
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => break None,
                Err(e) => return Err(io_err(path, "stat")(e)),
            }
        };
        let now_ms = ceil_ms(now);
        let aside = with_suffix(path, &format!(".corrupt-{now_ms}"));
        let kept = if old.is_some() {
            fs::hard_link(path, &aside).map_err(io_err(&aside, "keep the old ledger as"))?;
            Some(aside)
        } else {
            None
        };
        let mut text = format!("{LEDGER_HEADER}\n");
        if limits.recipient_rate.is_limited() {
            text.push_str(&format!("{now_ms} {}\n", limits.recipient_rate.count));
        }
        replace_file(path, &with_suffix(path, ".tmp"), text.as_bytes())?;
        sync_dir(path)?;
        // Dropping `old` releases its lock and closes it.
        drop(old);
        Ok(kept)
    }

    /// The records still kept for `limits` at `now` as (stamp in ms, recipients), oldest
    /// first: what a fleet host pushes into the shared store once it is back (see
    /// `redis.rs`).
    pub(crate) fn recent(
        &mut self,
        now: SystemTime,
        limits: &Limits,
    ) -> Result<Vec<(u64, u32)>, QuotaError> {
        limits.validate()?;
        let now_ms = floor_ms(now);
        self.locked(Some((now_ms, limits)), |l| {
            Ok(l.entries.iter().map(|e| (e.ms, e.rcpts)).collect())
        })
    }

    // -- locking ------------------------------------------------------------------------

    /// Runs `op` under the exclusive lock on an up-to-date view of the file. With
    /// `maintain`, also prunes and compacts for those limits.
    fn locked<T>(
        &mut self,
        maintain: Option<(u64, &Limits)>,
        op: impl FnOnce(&mut Ledger) -> Result<T, QuotaError>,
    ) -> Result<T, QuotaError> {
        // The lock is taken through a duplicate of `self.file`'s descriptor, which
        // shares its open file description and so its lock; dropping `held` unlocks.
        let held = loop {
            let dup = self
                .file
                .try_clone()
                .map_err(io_err(&self.path, "duplicate the descriptor of"))?;
            let held = crate::spool::flock::exclusive(dup).map_err(io_err(&self.path, "lock"))?;
            match fs::symlink_metadata(&self.path) {
                Ok(m) if file_id(&m) == self.id => break held,
                Ok(_) => {
                    // Another process compacted or reset it: follow the path.
                    drop(held);
                    self.reopen()?;
                }
                Err(e) => {
                    drop(held);
                    return Err(if e.kind() == io::ErrorKind::NotFound {
                        QuotaError::Vanished {
                            path: self.path.clone(),
                        }
                    } else {
                        io_err(&self.path, "stat")(e)
                    });
                }
            }
        };
        let result = self.refresh().and_then(|()| {
            if let Some((now_ms, limits)) = maintain {
                self.prune(now_ms, limits)?;
            }
            op(self)
        });
        if result.is_ok() && maintain.is_some() {
            self.maybe_compact();
        }
        // Unlocks (closing `self.file` would release the lock too).
        drop(held);
        result
    }

    // -- window arithmetic on the records, with the freeze on file ----------------------

    /// The end of the freeze on file (over or not), in milliseconds.
    fn freeze_until_ms(&self) -> Result<Option<u64>, QuotaError> {
        Ok(read_freeze(&self.freeze_path)?.map(|f| floor_ms(f.until)))
    }

    /// The earliest moment a transaction of `rcpts` fits every window and no freeze holds.
    fn earliest(&self, now_ms: u64, rcpts: u32, limits: &Limits) -> Result<u64, QuotaError> {
        let freeze = self.freeze_until_ms()?;
        Ok(window::earliest(
            &self.entries,
            now_ms,
            rcpts,
            limits,
            freeze,
        ))
    }

    /// Recipients one transaction could carry at `now_ms` (see [`Ledger::room`]).
    fn room_now(&self, now_ms: u64, limits: &Limits) -> Result<u32, QuotaError> {
        let freeze = self.freeze_until_ms()?;
        Ok(window::room_now(&self.entries, now_ms, limits, freeze))
    }

    #[cfg(test)]
    fn set_compact_min_dead(&mut self, n: u64) {
        self.compact_min_dead = n;
    }
}

#[cfg(test)]
pub(super) mod tests {
    //! The ledger's API end to end on a fake clock; the helpers serve the tests of
    //! `file.rs` and `freeze.rs` too.
    use super::*;
    use crate::config::limits::tests::invalid_limits;
    pub(super) use crate::config::limits::tests::rate;

    /// 2023-11-14 22:13:20 UTC.
    pub(super) const T0: u64 = 1_700_000_000_000;
    pub(super) const MIN: u64 = 60_000;
    pub(super) const HOUR: u64 = 3_600_000;
    pub(super) const DAY: u64 = 86_400_000;

    pub(super) fn at(ms: u64) -> SystemTime {
        from_ms(ms)
    }

    pub(super) fn limits(message: &str, recipient: &str) -> Limits {
        Limits {
            message_rate: rate(message),
            recipient_rate: rate(recipient),
            ..Limits::default()
        }
    }

    pub(super) fn setup() -> (tempfile::TempDir, PathBuf, Ledger) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acct.ledger");
        let ledger = Ledger::open(&path).unwrap();
        (dir, path, ledger)
    }

    /// The records as the file holds them, parsed independently of the ledger.
    pub(super) fn records(path: &Path) -> Vec<(u64, u32)> {
        let text = fs::read_to_string(path).unwrap();
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some(LEDGER_HEADER));
        lines
            .map(|l| {
                let (a, b) = l.split_once(' ').unwrap();
                (a.parse().unwrap(), b.parse().unwrap())
            })
            .collect()
    }

    /// The most any window `(t - window, t]` holds, counting transactions or recipients.
    pub(super) fn max_in_window(recs: &[(u64, u32)], window: u64, by_rcpts: bool) -> u64 {
        let w = |r: &(u64, u32)| if by_rcpts { u64::from(r.1) } else { 1 };
        let (mut best, mut sum, mut i, mut j) = (0, 0, 0, 0);
        while j < recs.len() {
            let t = recs[j].0;
            while j < recs.len() && recs[j].0 == t {
                sum += w(&recs[j]);
                j += 1;
            }
            while recs[i].0 + window <= t {
                sum -= w(&recs[i]);
                i += 1;
            }
            best = best.max(sum);
        }
        best
    }

    /// Sends every size in turn, jumping the fake clock to each WaitUntil. Returns the
    /// clock at the end.
    pub(super) fn drain(ledger: &mut Ledger, l: &Limits, mut now: u64, sizes: &[u32]) -> u64 {
        for &rcpts in sizes {
            loop {
                match ledger.reserve(at(now), rcpts, l).unwrap() {
                    Reservation::Go => break,
                    Reservation::WaitUntil(t) => {
                        let t = floor_ms(t);
                        assert!(t > now, "WaitUntil must be in the future");
                        // Exact: a millisecond earlier it is still refused.
                        assert_eq!(
                            ledger.reserve(at(t - 1), rcpts, l).unwrap(),
                            Reservation::WaitUntil(at(t))
                        );
                        now = t;
                    }
                }
            }
        }
        now
    }

    pub(super) fn sizes(n: usize, seed: u64, max: u32) -> Vec<u32> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                u32::try_from(x >> 33).unwrap() % max + 1
            })
            .collect()
    }

    #[test]
    fn every_operation_refuses_invalid_limits() {
        let (_dir, _path, mut ledger) = setup();
        for (l, _) in invalid_limits() {
            assert!(matches!(
                ledger.reserve(at(T0), 1, &l),
                Err(QuotaError::Limits(_))
            ));
        }
    }

    // -- decisions ----------------------------------------------------------------------

    #[test]
    fn window_boundary_is_exact_and_inclusive() {
        let (_dir, _path, mut ledger) = setup();
        let l = limits("2/1m", "off");
        let hold = 60_061;
        assert_eq!(ledger.reserve(at(T0), 1, &l).unwrap(), Reservation::Go);
        assert_eq!(ledger.reserve(at(T0 + 10), 1, &l).unwrap(), Reservation::Go);
        for now in [T0 + 20, T0 + MIN, T0 + hold - 1] {
            assert_eq!(
                ledger.reserve(at(now), 1, &l).unwrap(),
                Reservation::WaitUntil(at(T0 + hold)),
                "at +{}",
                now - T0
            );
        }
        assert_eq!(
            ledger.reserve(at(T0 + hold), 1, &l).unwrap(),
            Reservation::Go
        );
        assert_eq!(
            ledger.reserve(at(T0 + hold), 1, &l).unwrap(),
            Reservation::WaitUntil(at(T0 + 10 + hold))
        );
        // Stamps round up: a send at T0+hold+0.5ms is stamped T0+hold+1.
        let half = at(T0 + 10 + hold) + Duration::from_micros(500);
        assert_eq!(ledger.reserve(half, 1, &l).unwrap(), Reservation::Go);
        assert_eq!(records(ledger.path()).last(), Some(&(T0 + 11 + hold, 1)));
    }

    #[test]
    fn drain_of_five_times_the_message_limit() {
        let (_dir, path, mut ledger) = setup();
        let l = limits("30/1m", "off");
        drain(&mut ledger, &l, T0, &[1; 150]);
        let recs = records(&path);
        assert_eq!(recs.len(), 150);
        assert_eq!(max_in_window(&recs, MIN, false), 30);
        // The guard also covers up to 60 ms of stamp jitter against the server.
        assert_eq!(max_in_window(&recs, MIN + 60, false), 30);
        let elapsed = recs[149].0 - recs[0].0;
        let ideal = 4 * MIN;
        let used = ideal as f64 / elapsed as f64;
        assert!(used >= 0.99, "used {used}");
    }

    #[test]
    fn drain_of_five_times_the_recipient_limit() {
        let (_dir, path, mut ledger) = setup();
        let l = limits("off", "1000/1h");
        // Uniform sizes: the rate is used to the full.
        drain(&mut ledger, &l, T0, &[10; 500]);
        let recs = records(&path);
        assert_eq!(max_in_window(&recs, HOUR, true), 1000);
        let elapsed = recs[499].0 - recs[0].0;
        let used = (4 * HOUR) as f64 / elapsed as f64;
        assert!(used >= 0.99, "used {used}");

        // Mixed sizes, then both limits binding in turn: never over in any window.
        let (_dir, path, mut ledger) = setup();
        let mixed = sizes(220, 7, 50);
        let end = drain(&mut ledger, &l, T0, &mixed);
        let recs = records(&path);
        assert!(recs.iter().map(|r| u64::from(r.1)).sum::<u64>() >= 5000);
        assert!(max_in_window(&recs, HOUR, true) <= 1000);
        assert!(end - T0 >= 4 * HOUR);

        let (_dir, path, mut ledger) = setup();
        let both = limits("30/1m", "100/10m");
        let mut mixed = sizes(150, 11, 4);
        mixed.extend([1; 100]);
        drain(&mut ledger, &both, T0, &mixed);
        let recs = records(&path);
        assert!(max_in_window(&recs, MIN, false) <= 30);
        assert!(max_in_window(&recs, 10 * MIN, true) <= 100);
        assert_eq!(max_in_window(&recs, 10 * MIN, true), 100);
    }

    #[test]
    fn a_lead_makes_the_entry_count_until_a_window_after_the_server_saw_it() {
        let (_dir, path, mut ledger) = setup();
        let l = limits("2/1m", "off");
        let lead = Duration::from_millis(400);
        assert_eq!(
            ledger.reserve_some_ahead(at(T0), lead, 1, &l).unwrap(),
            Grant::Go(1)
        );
        // Stamped ahead, it counts from now on all the same: one message left.
        assert_eq!(ledger.usage(at(T0 + 1), &l).unwrap().messages_left, Some(1));
        assert_eq!(
            ledger
                .reserve_some_ahead(at(T0 + 100), lead, 1, &l)
                .unwrap(),
            Grant::Go(1)
        );
        assert_eq!(records(&path), [(T0 + 400, 1), (T0 + 500, 1)]);
        assert_eq!(ledger.room(at(T0 + 200), &l).unwrap(), 0);
        // The next may go a hold after the first was *accepted* (at the latest T0 + 400).
        assert_eq!(
            ledger.reserve_some(at(T0 + 200), 1, &l).unwrap(),
            Grant::WaitUntil(at(T0 + 400 + MIN + 1 + 60))
        );
        // A lead longer than MAX_LEAD is cut to it.
        let (_dir, path, mut ledger) = setup();
        let _ = ledger
            .reserve_some_ahead(at(T0), Duration::from_secs(3600), 1, &l)
            .unwrap();
        assert_eq!(records(&path), [(T0 + 60_000, 1)]);
    }

    #[test]
    fn room_splits_a_big_message() {
        let (_dir, _path, mut ledger) = setup();
        let l = Limits {
            max_recipients: 50,
            ..limits("30/1m", "100/1h")
        };
        assert_eq!(ledger.room(at(T0), &l).unwrap(), 50);
        assert_eq!(ledger.reserve(at(T0), 50, &l).unwrap(), Reservation::Go);
        assert_eq!(ledger.reserve(at(T0 + 1), 30, &l).unwrap(), Reservation::Go);
        assert_eq!(ledger.room(at(T0 + 2), &l).unwrap(), 20);
        assert_eq!(
            ledger.reserve(at(T0 + 2), 21, &l).unwrap(),
            Reservation::WaitUntil(at(T0 + 3_603_601))
        );
        assert_eq!(
            ledger.reserve_some(at(T0 + 2), 50, &l).unwrap(),
            Grant::Go(20)
        );
        assert_eq!(ledger.room(at(T0 + 3), &l).unwrap(), 0);
        assert_eq!(
            ledger.reserve_some(at(T0 + 3), 50, &l).unwrap(),
            Grant::WaitUntil(at(T0 + 3_603_601))
        );
        // Once the first 50 leave, 50 fit again (capped by max_recipients).
        assert_eq!(ledger.room(at(T0 + 3_603_601), &l).unwrap(), 50);
        assert_eq!(
            ledger.reserve_some(at(T0 + 3_603_601), 700, &l).unwrap(),
            Grant::Go(50)
        );

        // A full message window gives no room either.
        let (_dir, _path, mut ledger) = setup();
        let l = limits("2/1m", "100/1h");
        for _ in 0..2 {
            assert_eq!(ledger.reserve(at(T0), 1, &l).unwrap(), Reservation::Go);
        }
        assert_eq!(ledger.room(at(T0), &l).unwrap(), 0);
        assert_eq!(
            ledger.reserve_some(at(T0), 5, &l).unwrap(),
            Grant::WaitUntil(at(T0 + 60_061))
        );
    }

    #[test]
    fn reserve_is_honoured() {
        let (_dir, _path, mut ledger) = setup();
        let l = Limits {
            reserve: 10,
            ..limits("off", "100/1h")
        };
        assert_eq!(ledger.room(at(T0), &l).unwrap(), 90);
        assert!(matches!(
            ledger.reserve(at(T0), 91, &l),
            Err(QuotaError::NeverFits { rcpts: 91, .. })
        ));
        assert_eq!(ledger.reserve(at(T0), 45, &l).unwrap(), Reservation::Go);
        assert_eq!(ledger.reserve(at(T0), 45, &l).unwrap(), Reservation::Go);
        assert!(matches!(
            ledger.reserve(at(T0), 1, &l).unwrap(),
            Reservation::WaitUntil(_)
        ));
        let u = ledger.usage(at(T0), &l).unwrap();
        assert_eq!(u.recipients_in_window, 90);
        assert_eq!(u.recipients_left, Some(0));
        assert_eq!(
            u.reason().unwrap(),
            "quota: 90/100 recipients in 1h (10 reserved), room at 23:13:23 UTC"
        );
    }

    #[test]
    fn bad_requests_are_typed_errors() {
        let (_dir, _path, mut ledger) = setup();
        let l = Limits::default();
        assert!(matches!(
            ledger.reserve(at(T0), 0, &l),
            Err(QuotaError::NoRecipients)
        ));
        let e = ledger.reserve(at(T0), 501, &l).unwrap_err();
        assert!(matches!(
            e,
            QuotaError::TooManyRecipients {
                rcpts: 501,
                max: 500
            }
        ));
        assert!(e.to_string().contains("batches of at most 500"));
        assert!(matches!(
            ledger.reserve_some(at(T0), 0, &l),
            Err(QuotaError::NoRecipients)
        ));
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Ledger::open(&dir.path().join("a.freeze")),
            Err(QuotaError::BadPath { .. })
        ));
        assert!(matches!(
            Ledger::open(&dir.path().join("missing/a.ledger")),
            Err(QuotaError::Io { .. })
        ));
    }

    #[test]
    fn usage_and_reasons() {
        let (_dir, _path, mut ledger) = setup();
        let l = limits("2/1m", "3/24h");
        let u = ledger.usage(at(T0), &l).unwrap();
        assert_eq!((u.messages_in_window, u.messages_left), (0, Some(2)));
        assert_eq!((u.recipients_in_window, u.recipients_left), (0, Some(3)));
        assert_eq!(u.reason(), None);
        assert_eq!(ledger.reserve(at(T0), 1, &l).unwrap(), Reservation::Go);
        assert_eq!(ledger.reserve(at(T0), 1, &l).unwrap(), Reservation::Go);
        let u = ledger.usage(at(T0 + 1), &l).unwrap();
        assert_eq!(u.next_message_room, Some(at(T0 + 60_061)));
        assert_eq!(u.next_recipient_room, None);
        assert_eq!(
            u.reason().unwrap(),
            "quota: 2/2 messages in 1m, room at 22:14:20 UTC"
        );
        assert_eq!(
            ledger.reserve(at(T0 + MIN * 2), 1, &l).unwrap(),
            Reservation::Go
        );
        let u = ledger.usage(at(T0 + MIN * 2), &l).unwrap();
        assert_eq!(u.recipients_left, Some(0));
        assert_eq!(u.next_recipient_room, Some(at(T0 + 86_486_401)));
        assert_eq!(
            u.reason().unwrap(),
            "quota: 3/3 recipients in 24h, room at 2023-11-15 22:14:46 UTC"
        );
        let off = ledger.usage(at(T0), &limits("off", "off")).unwrap();
        assert_eq!((off.messages_left, off.recipients_left), (None, None));
        assert_eq!(off.reason(), None);
    }

    #[test]
    fn formats_moments_in_utc() {
        assert_eq!(format_moment(at(T0), at(T0)), "22:13:20 UTC");
        assert_eq!(
            format_moment(at(T0 + 2 * HOUR), at(T0)),
            "2023-11-15 00:13:20 UTC"
        );
        assert_eq!(format_moment(UNIX_EPOCH, UNIX_EPOCH), "00:00:00 UTC");
    }

    #[test]
    fn record_external_counts_without_limits() {
        let (_dir, _path, mut ledger) = setup();
        let l = limits("off", "10/1h");
        ledger.record_external(at(T0), 12).unwrap();
        ledger.record_external(at(T0), 0).unwrap();
        let u = ledger.usage(at(T0 + 1), &l).unwrap();
        assert_eq!(u.recipients_in_window, 12);
        assert_eq!(u.recipients_left, Some(0));
        // 3 more fit once the 12 have left.
        assert_eq!(
            ledger.reserve(at(T0 + 1), 3, &l).unwrap(),
            Reservation::WaitUntil(at(T0 + 3_603_601))
        );
    }

    #[test]
    fn quota_reply_until_uses_the_ledger_when_it_can() {
        let (_dir, _path, mut ledger) = setup();
        let l = Limits {
            reserve: 10,
            ..limits("off", "100/1h")
        };
        assert_eq!(ledger.reserve(at(T0), 40, &l).unwrap(), Reservation::Go);
        // The ledger holds less than the count: the server saw sends we didn't.
        assert_eq!(
            ledger.quota_reply_until(at(T0 + 5), &l).unwrap(),
            at(T0 + 5 + 3_603_601)
        );
        ledger.record_external(at(T0 + 1000), 30).unwrap();
        ledger.record_external(at(T0 + 2000), 30).unwrap();
        // 100 in the window: room comes back when the first 40 leave.
        assert_eq!(
            ledger.quota_reply_until(at(T0 + 3000), &l).unwrap(),
            at(T0 + 3_603_601)
        );
        let off = limits("off", "off");
        assert_eq!(
            ledger.quota_reply_until(at(T0), &off).unwrap(),
            at(T0 + 86_486_401)
        );
    }

    // -- persistence and crashes --------------------------------------------------------

    #[test]
    fn persists_across_reopen() {
        let (_dir, path, mut ledger) = setup();
        let l = limits("3/1m", "off");
        for i in 0..3 {
            assert_eq!(ledger.reserve(at(T0 + i), 1, &l).unwrap(), Reservation::Go);
        }
        drop(ledger);
        let mut again = Ledger::open(&path).unwrap();
        assert_eq!(again.usage(at(T0 + 5), &l).unwrap().messages_in_window, 3);
        assert_eq!(
            again.reserve(at(T0 + 5), 1, &l).unwrap(),
            Reservation::WaitUntil(at(T0 + 60_061))
        );
        assert_eq!(records(&path), [(T0, 1), (T0 + 1, 1), (T0 + 2, 1)]);
    }

    #[test]
    fn vanished_ledger_is_refused() {
        let (_dir, path, mut ledger) = setup();
        fs::remove_file(&path).unwrap();
        assert!(matches!(
            ledger.reserve(at(T0), 1, &Limits::default()),
            Err(QuotaError::Vanished { .. })
        ));
    }

    #[test]
    fn clock_stepped_back_is_bounded() {
        let (_dir, path, mut ledger) = setup();
        let l = limits("1/1m", "off");
        // Sent while the clock read ten days ahead.
        assert_eq!(
            ledger.reserve(at(T0 + 10 * DAY), 1, &l).unwrap(),
            Reservation::Go
        );
        let limit = T0 + 600_000;
        assert_eq!(
            ledger.reserve(at(T0), 1, &l).unwrap(),
            Reservation::WaitUntil(at(limit + 60_061))
        );
        assert_eq!(records(&path), [(limit, 1)]);
        assert_eq!(
            ledger.reserve(at(limit + 60_061), 1, &l).unwrap(),
            Reservation::Go
        );
    }

    // -- concurrency --------------------------------------------------------------------

    #[test]
    fn two_handles_never_jointly_exceed() {
        let (_dir, path, mut a) = setup();
        let mut b = Ledger::open(&path).unwrap();
        let l = limits("5/1s", "12/5s");
        let (mut now_a, mut now_b) = (T0, T0 + 3);
        let (mut sent_a, mut sent_b) = (0, 0);
        while sent_a + sent_b < 100 {
            for (ledger, now, sent) in [
                (&mut a, &mut now_a, &mut sent_a),
                (&mut b, &mut now_b, &mut sent_b),
            ] {
                match ledger.reserve(at(*now), 1, &l).unwrap() {
                    Reservation::Go => *sent += 1,
                    Reservation::WaitUntil(t) => *now = floor_ms(t),
                }
            }
        }
        assert!(sent_a > 20 && sent_b > 20, "{sent_a} {sent_b}");
        let recs = records(&path);
        assert!(max_in_window(&recs, 1000, false) <= 5);
        assert!(max_in_window(&recs, 5000, true) <= 12);
    }

    fn drain_alone(path: &Path, start: u64, n: usize) {
        let mut ledger = Ledger::open(path).unwrap();
        let l = limits("5/1s", "12/5s");
        let mut now = start;
        let mut sent = 0;
        while sent < n {
            match ledger.reserve(at(now), 1, &l).unwrap() {
                Reservation::Go => sent += 1,
                Reservation::WaitUntil(t) => now = floor_ms(t),
            }
        }
    }

    #[test]
    fn two_threads_never_jointly_exceed() {
        let (_dir, path, _ledger) = setup();
        let threads: Vec<_> = (0..2)
            .map(|i| {
                let path = path.clone();
                std::thread::spawn(move || drain_alone(&path, T0 + i, 40))
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let recs = records(&path);
        assert_eq!(recs.len(), 80);
        assert!(max_in_window(&recs, 1000, false) <= 5);
        assert!(max_in_window(&recs, 5000, true) <= 12);
    }

    const CHILD_ENV: &str = "RELAY365_QUOTA_TEST_CHILD";

    /// Run by `two_processes_never_jointly_exceed` in child processes.
    #[test]
    #[ignore = "a child of two_processes_never_jointly_exceed"]
    fn child_drainer() {
        let Ok(path) = std::env::var(CHILD_ENV) else {
            return;
        };
        drain_alone(Path::new(&path), T0, 40);
    }

    #[test]
    fn two_processes_never_jointly_exceed() {
        let (_dir, path, _ledger) = setup();
        let exe = std::env::current_exe().unwrap();
        let children: Vec<_> = (0..2)
            .map(|_| {
                std::process::Command::new(&exe)
                    .args([
                        "--exact",
                        "quota::tests::child_drainer",
                        "--ignored",
                        "--test-threads=1",
                    ])
                    .env(CHILD_ENV, &path)
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for mut c in children {
            assert!(c.wait().unwrap().success());
        }
        let recs = records(&path);
        assert_eq!(recs.len(), 80);
        assert!(max_in_window(&recs, 1000, false) <= 5);
        assert!(max_in_window(&recs, 5000, true) <= 12);
    }
}
