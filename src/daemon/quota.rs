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
//! # Window boundary and guard
//! An entry stamped `s` counts against a rate whose window is `W` for every instant `t`
//! with `s <= t < s + hold`, where `hold = W + 1 ms + W/1000` ([`Rate::hold`]):
//! - the `+ 1 ms` makes the boundary inclusive (`t - W <= s`), which is conservative
//!   against a server that counts `t - W < s <= t` or `t - W <= s <= t` on the same clock;
//! - the `W/1000` guard (60 ms for a minute, 86.4 s for 24 hours) absorbs the jitter
//!   between our stamp, taken before the transaction, and the server's stamp, taken
//!   somewhere in it: if an old transaction took longer to reach the server than the
//!   new one, an exact boundary would let the server see `count + 1` in its window, and
//!   for the daily recipient quota that costs a 24-hour block. The scheduler stamps its
//!   reservations ahead by about the transaction's duration
//!   ([`Ledger::reserve_some_ahead`]), so the guard need only cover the misestimate.
//!
//! A long queue therefore drains at `W / hold` of the limit (99.9 %), and
//! [`Reservation::WaitUntil`] is exactly the moment the oldest entry in the way stops
//! counting. Entries stamped later than `now` (another process's clock read a moment
//! later) always count, which is conservative.
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
//! # Concurrency and durability
//! The daemon and `relay365 flush` share the file through an exclusive `flock` on it.
//! Each operation: lock, check that the path still names the open file (otherwise
//! another process compacted it: reopen and re-read), read only the bytes appended
//! since the last look, decide, append one line with a single `write(2)` on an
//! `O_APPEND` descriptor, `fdatasync`, unlock. Appends only: the cost of a reservation
//! is a few system calls plus `O(log n)` arithmetic on the in-memory window.
//!
//! **Torn last line.** A crash or `kill -9` in the middle of an append leaves a last line
//! without `\n`. Ignoring it is safe: the record is written and synced *before* the
//! transaction starts, and the writer only reports [`Reservation::Go`] after the sync,
//! so a torn record means that send never began. The next process to take the lock cuts
//! the torn bytes off before appending (otherwise they would glue onto the next record).
//! After a crash the ledger may over-count (a synced record whose send never happened),
//! never under-count.
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
//!
//! **Compaction.** When entries older than the longest window (at least 24 hours, so a
//! configuration change can't forget a day) make up most of the file (and there are at
//! least [`COMPACT_MIN_DEAD`] of them), the lock holder writes the live entries to
//! `<ledger>.tmp`, fsyncs it, renames it over the ledger and fsyncs the directory, as the
//! last step of its operation. The others notice the new inode on their next lock.
//! Compaction is an optimisation: if it fails, the ledger stays valid and merely longer.
//!
//! **Clock steps.** A stamp more than [`MAX_FUTURE`] ahead of `now` means the clock went
//! back; such stamps are rewritten to `now + MAX_FUTURE`, which is still no earlier than
//! the real send (the caller's `now` can't be that stale), so the account waits at most
//! one window plus ten minutes instead of until the old clock time comes round again.
//!
//! # Freezes
//! Server verdicts win over the ledger. [`Ledger::freeze`] writes `<account>.freeze`
//! beside the ledger (the ledger path with the extension `freeze`) atomically:
//! ```text
//! relay365-freeze 1
//! 1700086400000
//! 554 5.2.0 SubmissionQuotaExceededException
//! ```
//! (header, end in milliseconds since the epoch, reason on one line). A freeze only ever
//! extends: a shorter verdict never cuts a longer one short; [`Ledger::thaw`] ends it.

use std::collections::VecDeque;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

/// The first line of a ledger file.
const LEDGER_HEADER: &str = "relay365-ledger 1";
/// The first line of a freeze file.
const FREEZE_HEADER: &str = "relay365-freeze 1";
/// The longest record line without its `\n`: 20 digits of u64, a space, 10 of u32.
const MAX_LINE: usize = 31;
/// The longest freeze file accepted; ours are under 400 bytes.
const MAX_FREEZE_FILE: u64 = 4096;
/// The longest freeze reason kept, in characters.
const MAX_REASON: usize = 300;
/// Dead (out-of-window) records needed before a compaction is worth a rewrite.
pub const COMPACT_MIN_DEAD: u64 = 4096;
/// How far ahead of `now` a stamp may be before it is taken for a clock step back.
pub const MAX_FUTURE: Duration = Duration::from_secs(600);
/// The longest lead [`Ledger::reserve_some_ahead`] puts on a stamp.
pub const MAX_LEAD: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------
// Rate

/// A sliding-window rate limit: at most `count` per `window`. A `count` of 0 means no
/// limit; it is written `off` (or `unlimited`). Parsed from `COUNT/DURATION` where
/// DURATION is a whole number with the unit `s`, `m`, `h` or `d` (a bare number means
/// seconds): `30/1m`, `10000/24h`, `30/3s`, `5/2d`, `30/60`. `0/1m` is rejected
/// rather than read as "off", because it could as well mean "send nothing".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    /// Sends allowed per window; 0 = no limit.
    pub count: u32,
    /// The sliding window, whole seconds from 1 s to [`Rate::MAX_WINDOW`].
    pub window: Duration,
}

/// Why a rate string was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error(
    "expected COUNT/DURATION such as 30/1m or 10000/24h (units s, m, h, d; `off` for no limit), got {input:?}: {problem}"
)]
pub struct RateError {
    input: String,
    problem: String,
}

impl RateError {
    fn new(input: &str, problem: impl Into<String>) -> Self {
        // The input is echoed into logs and terminals: bound it.
        let input = input.chars().take(64).collect();
        RateError {
            input,
            problem: problem.into(),
        }
    }
}

impl Rate {
    /// No limit.
    pub const UNLIMITED: Rate = Rate {
        count: 0,
        window: Duration::ZERO,
    };
    /// The longest window: the ledger keeps this much history, so it must stay small.
    pub const MAX_WINDOW: Duration = Duration::from_secs(7 * 86_400);

    /// A limited rate, checked like a parsed one.
    pub fn new(count: u32, window: Duration) -> Result<Rate, RateError> {
        let shown = format!("{count}/{}s", window.as_secs());
        if count == 0 {
            return Err(RateError::new(
                &shown,
                "a count of 0 would never send; write `off` for no limit",
            ));
        }
        if window.subsec_nanos() != 0 || window.is_zero() {
            return Err(RateError::new(
                &shown,
                "the duration must be a whole number of seconds, at least 1s",
            ));
        }
        if window > Self::MAX_WINDOW {
            return Err(RateError::new(&shown, "the longest supported window is 7d"));
        }
        Ok(Rate { count, window })
    }

    /// Whether this rate limits anything.
    pub fn is_limited(&self) -> bool {
        self.count > 0
    }

    /// How long one entry counts against this rate: the window, plus 1 ms for an
    /// inclusive boundary, plus a guard of a thousandth of the window against stamp
    /// jitter between us and the server (see the module documentation).
    pub fn hold(&self) -> Duration {
        Duration::from_millis(self.hold_ms())
    }

    fn window_ms(&self) -> u64 {
        u64::try_from(self.window.as_millis()).unwrap_or(u64::MAX)
    }

    fn hold_ms(&self) -> u64 {
        let w = self.window_ms();
        w.saturating_add(1).saturating_add(w / 1000)
    }

    /// The window as written in a rate (`1m`, `24h`, `2d`, `90s`).
    pub fn window_text(&self) -> String {
        let s = self.window.as_secs();
        if s % 86_400 == 0 && s >= 2 * 86_400 {
            format!("{}d", s / 86_400)
        } else if s % 3600 == 0 && s > 0 {
            format!("{}h", s / 3600)
        } else if s % 60 == 0 && s > 0 {
            format!("{}m", s / 60)
        } else {
            format!("{s}s")
        }
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_limited() {
            write!(f, "{}/{}", self.count, self.window_text())
        } else {
            f.write_str("off")
        }
    }
}

fn all_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

impl FromStr for Rate {
    type Err = RateError;

    fn from_str(input: &str) -> Result<Rate, RateError> {
        let err = |problem: &str| RateError::new(input, problem);
        let s = input.trim();
        if s.eq_ignore_ascii_case("off") || s.eq_ignore_ascii_case("unlimited") {
            return Ok(Rate::UNLIMITED);
        }
        let Some((count, window)) = s.split_once('/') else {
            return Err(err("no `/` between the count and the duration"));
        };
        if !all_digits(count) {
            return Err(err("the count must be a whole number such as 30"));
        }
        let count: u32 = count
            .parse()
            .map_err(|_| err("the count is too large (at most 4294967295)"))?;
        if count == 0 {
            return Err(err(
                "a count of 0 would never send; write `off` for no limit",
            ));
        }
        let split = window
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(window.len());
        let (number, unit) = window.split_at(split);
        if !all_digits(number) {
            return Err(err("the duration must start with a whole number, as in 1m"));
        }
        let unit_secs: u64 = match unit {
            "" | "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            _ => return Err(err("the duration's unit must be s, m, h or d")),
        };
        let secs = number
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(unit_secs))
            .ok_or_else(|| err("the longest supported window is 7d"))?;
        if secs == 0 {
            return Err(err("the duration must be at least 1s"));
        }
        if secs > Rate::MAX_WINDOW.as_secs() {
            return Err(err("the longest supported window is 7d"));
        }
        Ok(Rate {
            count,
            window: Duration::from_secs(secs),
        })
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Parses a rate string; `field` names the configuration key in errors.
struct RateVisitor {
    field: Option<&'static str>,
}

impl Visitor<'_> for RateVisitor {
    type Value = Rate;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(field) = self.field {
            write!(f, "{field}: ")?;
        }
        f.write_str("a string COUNT/DURATION such as \"30/1m\", or \"off\"")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Rate, E> {
        v.parse::<Rate>().map_err(|e| match self.field {
            Some(field) => E::custom(format!("{field}: {e}")),
            None => E::custom(e),
        })
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Rate, D::Error> {
        d.deserialize_str(RateVisitor { field: None })
    }
}

fn de_message_rate<'de, D: Deserializer<'de>>(d: D) -> Result<Rate, D::Error> {
    d.deserialize_str(RateVisitor {
        field: Some("message_rate"),
    })
}

fn de_recipient_rate<'de, D: Deserializer<'de>>(d: D) -> Result<Rate, D::Error> {
    d.deserialize_str(RateVisitor {
        field: Some("recipient_rate"),
    })
}

// ---------------------------------------------------------------------------------------
// Limits

/// One mailbox's limits. Every field has a default (Exchange Online's), so a
/// configuration names only what differs. Deliberately without `deny_unknown_fields`:
/// serde can't combine it with `#[serde(flatten)]`, and the account table that embeds
/// these keys must be the one to reject unknown keys (see [`Limits::FIELDS`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    /// Transactions per window (Exchange Online: 30/1m).
    #[serde(deserialize_with = "de_message_rate")]
    pub message_rate: Rate,
    /// Recipients per window, every RCPT counted (Exchange Online: 10000/24h).
    #[serde(deserialize_with = "de_recipient_rate")]
    pub recipient_rate: Rate,
    /// Recipients per transaction (Exchange Online: 500, tenant-configurable 1–1000).
    pub max_recipients: u32,
    /// Concurrent connections the scheduler may open (Exchange Online allows 3).
    pub connections: u32,
    /// Recipients per recipient window left unused for other senders of the mailbox.
    pub reserve: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            message_rate: Rate {
                count: 30,
                window: Duration::from_secs(60),
            },
            recipient_rate: Rate {
                count: 10_000,
                window: Duration::from_secs(86_400),
            },
            max_recipients: 500,
            connections: 1,
            reserve: 0,
        }
    }
}

/// A limits combination that can't work, named by its configuration key.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LimitsError {
    #[error("{field}: {source}")]
    Rate {
        field: &'static str,
        #[source]
        source: RateError,
    },
    #[error(
        "max_recipients = {0}: must be 1 to {max} (Exchange Online allows 500, up to 1000 if the tenant raised it)",
        max = Limits::MAX_RECIPIENTS
    )]
    MaxRecipients(u32),
    #[error(
        "connections = {0}: must be 1 to {max} (Exchange Online allows 3 per mailbox)",
        max = Limits::MAX_CONNECTIONS
    )]
    Connections(u32),
    #[error(
        "reserve = {reserve} leaves no room in recipient_rate = {rate}; make reserve smaller than the count"
    )]
    ReserveTooBig { reserve: u32, rate: Rate },
    #[error(
        "reserve = {0} has no effect with recipient_rate = off; remove reserve or set a recipient_rate"
    )]
    ReserveWithoutRate(u32),
}

impl Limits {
    /// The keys these limits occupy in an account table.
    pub const FIELDS: &'static [&'static str] = &[
        "message_rate",
        "recipient_rate",
        "max_recipients",
        "connections",
        "reserve",
    ];
    /// The largest `max_recipients` accepted (Exchange Online's tenant maximum).
    pub const MAX_RECIPIENTS: u32 = 1000;
    /// The largest `connections` accepted.
    pub const MAX_CONNECTIONS: u32 = 16;

    /// Checks the combination; the ledger calls this on every operation too.
    pub fn validate(&self) -> Result<(), LimitsError> {
        for (field, rate) in [
            ("message_rate", self.message_rate),
            ("recipient_rate", self.recipient_rate),
        ] {
            if rate.is_limited() {
                Rate::new(rate.count, rate.window)
                    .map_err(|source| LimitsError::Rate { field, source })?;
            }
        }
        if !(1..=Self::MAX_RECIPIENTS).contains(&self.max_recipients) {
            return Err(LimitsError::MaxRecipients(self.max_recipients));
        }
        if !(1..=Self::MAX_CONNECTIONS).contains(&self.connections) {
            return Err(LimitsError::Connections(self.connections));
        }
        if self.recipient_rate.is_limited() {
            if self.reserve >= self.recipient_rate.count {
                return Err(LimitsError::ReserveTooBig {
                    reserve: self.reserve,
                    rate: self.recipient_rate,
                });
            }
        } else if self.reserve > 0 {
            return Err(LimitsError::ReserveWithoutRate(self.reserve));
        }
        Ok(())
    }

    /// Recipients per recipient window this account may use.
    fn capacity(&self) -> u64 {
        u64::from(self.recipient_rate.count.saturating_sub(self.reserve))
    }

    /// How long records must be kept: the longest hold, and never less than a day so
    /// that switching a rate off or shortening it doesn't forget a day's sends.
    fn retention_ms(&self) -> u64 {
        let day = Limits::default().recipient_rate.hold_ms();
        [self.message_rate, self.recipient_rate]
            .iter()
            .filter(|r| r.is_limited())
            .map(Rate::hold_ms)
            .fold(day, u64::max)
    }
}

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

/// A server verdict that stops the account until `until`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Freeze {
    pub until: SystemTime,
    pub reason: String,
}

/// What [`Ledger::check_freeze`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FreezeCheck {
    /// No freeze file.
    Free,
    /// A freeze in force.
    Frozen(Freeze),
    /// A freeze that was over; this call removed it.
    Ended(Freeze),
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
// Time in milliseconds

/// `t` in whole milliseconds, rounded down: used for "now" when deciding, so an entry
/// counts a fraction of a millisecond longer rather than shorter.
fn floor_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `t` in whole milliseconds, rounded up: used for stamps, so an entry never starts
/// counting before the send.
fn ceil_ms(t: SystemTime) -> u64 {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    if d.subsec_nanos() % 1_000_000 == 0 {
        ms
    } else {
        ms.saturating_add(1)
    }
}

fn from_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

// ---------------------------------------------------------------------------------------
// Ledger

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Start of the transaction, ms since the epoch.
    ms: u64,
    rcpts: u32,
    /// Recipients of this and every earlier entry since the last full load, so a
    /// window's sum is one subtraction.
    cum: u64,
}

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

fn io_err<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(io::Error) -> QuotaError + 'a {
    move |source| QuotaError::Io {
        path: path.to_path_buf(),
        action,
        source,
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn open_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.read(true)
        .append(true)
        .mode(0o600)
        // SECURITY: never follow a symlink planted in place of a state file.
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits());
    o
}

fn sync_dir(path: &Path) -> Result<(), QuotaError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(path, "sync its directory"))
}

/// Creates `tmp` afresh with `bytes`, synced, and renames it over `path`. Returns the
/// open file (now named `path`).
fn replace_file(path: &Path, tmp: &Path, bytes: &[u8]) -> Result<File, QuotaError> {
    match fs::remove_file(tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(io_err(tmp, "remove a stale temporary file")(e));
        }
        _ => {}
    }
    let mut file = open_options()
        .create_new(true)
        .open(tmp)
        .map_err(io_err(tmp, "create"))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(io_err(tmp, "write"))?;
    fs::rename(tmp, path).map_err(io_err(path, "rename a temporary file over"))?;
    Ok(file)
}

fn file_id(m: &fs::Metadata) -> (u64, u64) {
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

/// Removes a freeze file, durably (a freeze that came back after a crash would stop
/// the account again). Absent is fine.
fn remove_freeze(path: &Path) -> Result<(), QuotaError> {
    match fs::remove_file(path) {
        Ok(()) => sync_dir(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path, "remove")(e)),
    }
}

fn read_freeze(path: &Path) -> Result<Option<Freeze>, QuotaError> {
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

/// One line, no control characters, bounded: it ends up in mailq and syslog.
fn clean_reason(reason: &str) -> String {
    let one_line: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_REASON)
        .collect();
    one_line.trim().to_owned()
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
                    let n = l.in_window(now_ms, &limits.message_rate);
                    let n = u64::try_from(n).unwrap_or(u64::MAX);
                    let at = l.message_free_at(now_ms, &limits.message_rate);
                    let left = u64::from(limits.message_rate.count).saturating_sub(n);
                    (n, Some(left), (at > now_ms).then(|| from_ms(at)))
                } else {
                    (0, None, None)
                };
            let (recipients_in_window, recipients_left, next_recipient_room) =
                if limits.recipient_rate.is_limited() {
                    let first = l.first_in_window(now_ms, &limits.recipient_rate);
                    let sum = l.sum_from(first);
                    let at = l.recipients_free_at(now_ms, 1, limits);
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
            let first = l.first_in_window(now_ms, &rate);
            let sum = l.sum_from(first);
            let full = u64::from(rate.count);
            let at = if limits.recipient_rate.is_limited() && sum >= full {
                l.drop_until(first, sum - full + 1, rate.hold_ms())
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
            if let Some(old) = read_freeze(&l.freeze_path)? {
                if old.until >= wanted.until {
                    return Ok(old);
                }
            }
            let text = format!(
                "{FREEZE_HEADER}\n{}\n{}\n",
                floor_ms(wanted.until),
                wanted.reason
            );
            let tmp = with_suffix(&l.freeze_path, ".tmp");
            replace_file(&l.freeze_path, &tmp, text.as_bytes())?;
            sync_dir(&l.freeze_path)?;
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
            fs2::FileExt::lock_exclusive(&f).map_err(io_err(path, "lock"))?;
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
        // Dropping `old` closes it, which releases its lock.
        drop(old);
        Ok(kept)
    }

    // -- locking and reading ------------------------------------------------------------

    /// Runs `op` under the exclusive lock on an up-to-date view of the file. With
    /// `maintain`, also prunes and compacts for those limits.
    fn locked<T>(
        &mut self,
        maintain: Option<(u64, &Limits)>,
        op: impl FnOnce(&mut Ledger) -> Result<T, QuotaError>,
    ) -> Result<T, QuotaError> {
        loop {
            fs2::FileExt::lock_exclusive(&self.file).map_err(io_err(&self.path, "lock"))?;
            match fs::symlink_metadata(&self.path) {
                Ok(m) if file_id(&m) == self.id => break,
                Ok(_) => {
                    // Another process compacted or reset it: follow the path.
                    let _ = fs2::FileExt::unlock(&self.file);
                    self.reopen()?;
                }
                Err(e) => {
                    let _ = fs2::FileExt::unlock(&self.file);
                    return Err(if e.kind() == io::ErrorKind::NotFound {
                        QuotaError::Vanished {
                            path: self.path.clone(),
                        }
                    } else {
                        io_err(&self.path, "stat")(e)
                    });
                }
            }
        }
        let result = self.refresh().and_then(|()| {
            if let Some((now_ms, limits)) = maintain {
                self.prune(now_ms, limits)?;
            }
            op(self)
        });
        if result.is_ok() && maintain.is_some() {
            self.maybe_compact();
        }
        // Closing would release the lock too; an unlock error changes nothing we wrote.
        let _ = fs2::FileExt::unlock(&self.file);
        result
    }

    fn reopen(&mut self) -> Result<(), QuotaError> {
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
    fn refresh(&mut self) -> Result<(), QuotaError> {
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
    fn reload(&mut self) -> Result<(), QuotaError> {
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
        // A crash mid-append: that send never began (see the module documentation).
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
    fn append(&mut self, stamp_ms: u64, rcpts: u32) -> Result<(), QuotaError> {
        self.append_synced(stamp_ms, rcpts, true)
    }

    /// Appends one record, synced to disk when `sync` (always, when a limit depends on it).
    fn append_synced(&mut self, stamp_ms: u64, rcpts: u32, sync: bool) -> Result<(), QuotaError> {
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

    // -- maintenance --------------------------------------------------------------------

    fn prune(&mut self, now_ms: u64, limits: &Limits) -> Result<(), QuotaError> {
        let retention = limits.retention_ms();
        if retention > self.retention_ms {
            // Longer windows than before: records we dropped from memory may matter.
            self.reload()?;
        }
        self.retention_ms = retention;
        while let Some(e) = self.entries.front() {
            if e.ms.saturating_add(retention) > now_ms {
                break;
            }
            self.entries.pop_front();
            self.dead += 1;
        }
        // The clock went back: see "Clock steps" in the module documentation.
        let limit = now_ms.saturating_add(u64::try_from(MAX_FUTURE.as_millis()).unwrap_or(0));
        for e in self.entries.iter_mut().rev() {
            if e.ms <= limit {
                break;
            }
            e.ms = limit;
            self.must_compact = true;
        }
        Ok(())
    }

    /// Rewrites the file with the live records when dead ones dominate. Runs as the
    /// last step under the lock: once the new file is in place, others can lock it.
    fn maybe_compact(&mut self) {
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
        // The path names the new file now; our lock on the old one ends with it.
        self.file = file;
        self.id = file_id(&meta);
        self.consumed = u64::try_from(text.len()).unwrap_or(u64::MAX);
        self.lines = u64::try_from(self.entries.len()).unwrap_or(u64::MAX);
        self.dead = 0;
        self.must_compact = false;
        sync_dir(&self.path)
    }

    // -- window arithmetic --------------------------------------------------------------

    /// Index of the first entry still counting against `rate` at `now_ms`.
    fn first_in_window(&self, now_ms: u64, rate: &Rate) -> usize {
        let hold = rate.hold_ms();
        self.entries
            .partition_point(|e| e.ms.saturating_add(hold) <= now_ms)
    }

    fn in_window(&self, now_ms: u64, rate: &Rate) -> usize {
        self.entries.len() - self.first_in_window(now_ms, rate)
    }

    /// Recipients of entries `first..`.
    fn sum_from(&self, first: usize) -> u64 {
        match self.entries.get(first) {
            Some(e) => self.total - (e.cum - u64::from(e.rcpts)),
            None => 0,
        }
    }

    /// The moment the oldest entries from `first` on carrying at least `need`
    /// recipients have all left a window of `hold_ms`.
    fn drop_until(&self, first: usize, need: u64, hold_ms: u64) -> u64 {
        let Some(f) = self.entries.get(first) else {
            return 0;
        };
        let base = f.cum - u64::from(f.rcpts);
        let k = self
            .entries
            .partition_point(|e| e.cum.saturating_sub(base) < need);
        self.entries
            .get(k.max(first))
            .map_or(u64::MAX, |e| e.ms.saturating_add(hold_ms))
    }

    /// When one more transaction fits `rate` (`now_ms` if it does now).
    fn message_free_at(&self, now_ms: u64, rate: &Rate) -> u64 {
        let count = usize::try_from(rate.count).unwrap_or(usize::MAX);
        if self.in_window(now_ms, rate) < count {
            return now_ms;
        }
        // The entry whose leaving brings the window down to count - 1.
        let len = self.entries.len();
        self.entries
            .get(len - count)
            .map_or(now_ms, |e| e.ms.saturating_add(rate.hold_ms()))
    }

    /// When `rcpts` more recipients fit the recipient window less the reserve.
    fn recipients_free_at(&self, now_ms: u64, rcpts: u32, limits: &Limits) -> u64 {
        let rate = &limits.recipient_rate;
        let cap = limits.capacity();
        let first = self.first_in_window(now_ms, rate);
        let sum = self.sum_from(first);
        let rcpts = u64::from(rcpts);
        if sum + rcpts <= cap {
            return now_ms;
        }
        self.drop_until(first, sum + rcpts - cap, rate.hold_ms())
    }

    /// The earliest moment a transaction of `rcpts` fits every window and no freeze holds.
    fn earliest(&self, now_ms: u64, rcpts: u32, limits: &Limits) -> Result<u64, QuotaError> {
        let mut at = now_ms;
        if limits.message_rate.is_limited() {
            at = at.max(self.message_free_at(now_ms, &limits.message_rate));
        }
        if limits.recipient_rate.is_limited() {
            at = at.max(self.recipients_free_at(now_ms, rcpts, limits));
        }
        if let Some(freeze) = read_freeze(&self.freeze_path)? {
            at = at.max(floor_ms(freeze.until));
        }
        Ok(at)
    }

    fn room_now(&self, now_ms: u64, limits: &Limits) -> Result<u32, QuotaError> {
        if let Some(freeze) = read_freeze(&self.freeze_path)? {
            if floor_ms(freeze.until) > now_ms {
                return Ok(0);
            }
        }
        if limits.message_rate.is_limited()
            && self.message_free_at(now_ms, &limits.message_rate) > now_ms
        {
            return Ok(0);
        }
        if !limits.recipient_rate.is_limited() {
            return Ok(limits.max_recipients);
        }
        let first = self.first_in_window(now_ms, &limits.recipient_rate);
        let left = limits.capacity().saturating_sub(self.sum_from(first));
        Ok(u32::try_from(left)
            .unwrap_or(u32::MAX)
            .min(limits.max_recipients))
    }

    #[cfg(test)]
    fn set_compact_min_dead(&mut self, n: u64) {
        self.compact_min_dead = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// 2023-11-14 22:13:20 UTC.
    const T0: u64 = 1_700_000_000_000;
    const MIN: u64 = 60_000;
    const HOUR: u64 = 3_600_000;
    const DAY: u64 = 86_400_000;

    fn at(ms: u64) -> SystemTime {
        from_ms(ms)
    }

    fn rate(s: &str) -> Rate {
        s.parse().unwrap()
    }

    fn limits(message: &str, recipient: &str) -> Limits {
        Limits {
            message_rate: rate(message),
            recipient_rate: rate(recipient),
            ..Limits::default()
        }
    }

    fn setup() -> (tempfile::TempDir, PathBuf, Ledger) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acct.ledger");
        let ledger = Ledger::open(&path).unwrap();
        (dir, path, ledger)
    }

    /// The records as the file holds them, parsed independently of the ledger.
    fn records(path: &Path) -> Vec<(u64, u32)> {
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
    fn max_in_window(recs: &[(u64, u32)], window: u64, by_rcpts: bool) -> u64 {
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
    fn drain(ledger: &mut Ledger, l: &Limits, mut now: u64, sizes: &[u32]) -> u64 {
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

    fn sizes(n: usize, seed: u64, max: u32) -> Vec<u32> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                u32::try_from(x >> 33).unwrap() % max + 1
            })
            .collect()
    }

    // -- Rate ---------------------------------------------------------------------------

    #[test]
    fn rate_parses_good_strings() {
        let cases = [
            ("30/1m", 30, 60),
            ("10000/24h", 10_000, 86_400),
            ("30/3s", 30, 3),
            ("5/2d", 5, 172_800),
            ("30/60", 30, 60),
            (" 500/10m ", 500, 600),
            ("1/7d", 1, 604_800),
        ];
        for (s, count, secs) in cases {
            let r = rate(s);
            assert_eq!(
                (r.count, r.window),
                (count, Duration::from_secs(secs)),
                "{s}"
            );
        }
        for s in ["off", "unlimited", "OFF", " Unlimited"] {
            assert_eq!(rate(s), Rate::UNLIMITED, "{s}");
            assert!(!rate(s).is_limited());
        }
    }

    #[test]
    fn rate_display_round_trips() {
        for (s, shown) in [
            ("30/1m", "30/1m"),
            ("10000/24h", "10000/24h"),
            ("1/1d", "1/24h"),
            ("5/2d", "5/2d"),
            ("30/3s", "30/3s"),
            ("30/60", "30/1m"),
            ("7/90s", "7/90s"),
            ("7/120m", "7/2h"),
            ("off", "off"),
            ("unlimited", "off"),
        ] {
            let r = rate(s);
            assert_eq!(r.to_string(), shown);
            assert_eq!(rate(&r.to_string()), r);
        }
    }

    #[test]
    fn rate_rejects_bad_strings() {
        for s in [
            "",
            "30",
            "30/",
            "/1m",
            "0/1m",
            "-1/1m",
            "+1/1m",
            "30/0s",
            "30/1w",
            "30/1.5m",
            "30/8d",
            "30/-1m",
            "30/m",
            "99999999999/1m",
            "30/1m/2",
            "30 /1m",
            "30/1 m",
            "3O/1m",
            "30/99999999999999999999d",
        ] {
            let e = s.parse::<Rate>().unwrap_err().to_string();
            assert!(
                e.starts_with("expected COUNT/DURATION such as 30/1m"),
                "{s:?}: {e}"
            );
        }
        let e = "0/1m".parse::<Rate>().unwrap_err().to_string();
        assert!(e.contains("`off` for no limit"), "{e}");
        let e = "30/8d".parse::<Rate>().unwrap_err().to_string();
        assert!(e.contains("7d"), "{e}");
        assert!(Rate::new(5, Duration::from_millis(1500)).is_err());
        assert!(Rate::new(0, Duration::from_secs(60)).is_err());
        assert_eq!(Rate::new(5, Duration::from_secs(60)).unwrap(), rate("5/1m"));
    }

    #[test]
    fn hold_is_window_plus_guard() {
        assert_eq!(rate("30/1m").hold(), Duration::from_millis(60_061));
        assert_eq!(rate("10000/24h").hold(), Duration::from_millis(86_486_401));
        assert_eq!(rate("30/3s").hold(), Duration::from_millis(3_004));
    }

    // -- Limits -------------------------------------------------------------------------

    #[test]
    fn limits_default_is_exchange_online() {
        let l = Limits::default();
        assert_eq!(l.message_rate, rate("30/1m"));
        assert_eq!(l.recipient_rate, rate("10000/24h"));
        assert_eq!((l.max_recipients, l.connections, l.reserve), (500, 1, 0));
        l.validate().unwrap();
        let empty: Limits = toml::from_str("").unwrap();
        assert_eq!(empty, l);
    }

    #[test]
    fn limits_deserialize_with_defaults_and_named_errors() {
        let l: Limits = toml::from_str("message_rate = \"20/1m\"\nreserve = 100\n").unwrap();
        assert_eq!(l.message_rate, rate("20/1m"));
        assert_eq!(l.reserve, 100);
        assert_eq!(l.recipient_rate, rate("10000/24h"));
        let off: Limits = toml::from_str("recipient_rate = \"off\"").unwrap();
        assert!(!off.recipient_rate.is_limited());

        let e = toml::from_str::<Limits>("message_rate = \"30x\"")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("message_rate: expected COUNT/DURATION such as 30/1m"),
            "{e}"
        );
        let e = toml::from_str::<Limits>("recipient_rate = 10000")
            .unwrap_err()
            .to_string();
        assert!(e.contains("recipient_rate"), "{e}");

        let text = toml::to_string(&Limits::default()).unwrap();
        assert!(text.contains("message_rate = \"30/1m\""), "{text}");
        assert_eq!(toml::from_str::<Limits>(&text).unwrap(), Limits::default());
    }

    /// The integrator's recipe: flatten the limits into the account table and catch
    /// unknown keys with a trailing flattened map.
    #[test]
    fn limits_flatten_into_an_account_table() {
        #[derive(Deserialize)]
        struct Account {
            name: String,
            #[serde(flatten)]
            limits: Limits,
            #[serde(flatten)]
            unknown: BTreeMap<String, toml::Value>,
        }
        #[derive(Deserialize)]
        struct Config {
            account: Vec<Account>,
        }
        let c: Config = toml::from_str(
            "[[account]]\nname = \"a\"\nrecipient_rate = \"5000/24h\"\nmax_recipients = 100\nbogus = 1\n",
        )
        .unwrap();
        let a = &c.account[0];
        assert_eq!(a.name, "a");
        assert_eq!(a.limits.recipient_rate, rate("5000/24h"));
        assert_eq!(a.limits.max_recipients, 100);
        assert_eq!(a.limits.message_rate, rate("30/1m"));
        assert_eq!(a.unknown.keys().collect::<Vec<_>>(), ["bogus"]);
        for key in Limits::FIELDS {
            assert!(!a.unknown.contains_key(*key));
        }
        let e = toml::from_str::<Config>("[[account]]\nname = \"a\"\nmessage_rate = \"x\"\n")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("message_rate: expected COUNT/DURATION"), "{e}");
    }

    #[test]
    fn limits_validation_names_the_key() {
        let bad = [
            (
                Limits {
                    max_recipients: 0,
                    ..Limits::default()
                },
                "max_recipients = 0",
            ),
            (
                Limits {
                    max_recipients: 1001,
                    ..Limits::default()
                },
                "max_recipients = 1001",
            ),
            (
                Limits {
                    connections: 0,
                    ..Limits::default()
                },
                "connections = 0",
            ),
            (
                Limits {
                    reserve: 10_000,
                    ..Limits::default()
                },
                "reserve = 10000",
            ),
            (
                Limits {
                    reserve: 5,
                    recipient_rate: Rate::UNLIMITED,
                    ..Limits::default()
                },
                "reserve = 5",
            ),
            (
                Limits {
                    message_rate: Rate {
                        count: 5,
                        window: Duration::ZERO,
                    },
                    ..Limits::default()
                },
                "message_rate:",
            ),
        ];
        let (_dir, _path, mut ledger) = setup();
        for (l, text) in bad {
            let e = l.validate().unwrap_err().to_string();
            assert!(e.starts_with(text), "{e}");
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
    fn vanished_ledger_is_refused() {
        let (_dir, path, mut ledger) = setup();
        fs::remove_file(&path).unwrap();
        assert!(matches!(
            ledger.reserve(at(T0), 1, &Limits::default()),
            Err(QuotaError::Vanished { .. })
        ));
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

    // -- freezes ------------------------------------------------------------------------

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
                        "daemon::quota::tests::child_drainer",
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
