//! The quota ledger's window arithmetic: pure functions over the in-memory records
//! (stamp in milliseconds, recipients), the limits and `now_ms`. No I/O and no ledger
//! state: the [`Ledger`](super::Ledger) reads the files, holds the lock and calls these
//! with its records, so every boundary is tested here on exact instants.
//!
//! Trusted input: records the ledger parsed from its own file (stamps non-decreasing,
//! at least one recipient each) and limits that passed [`Limits::validate`].
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
//!   ([`Ledger::reserve_some_ahead`](super::Ledger::reserve_some_ahead)), so the guard
//!   need only cover the misestimate.
//!
//! A long queue therefore drains at `W / hold` of the limit (99.9 %), and
//! [`Reservation::WaitUntil`](super::Reservation::WaitUntil) is exactly the moment the
//! oldest entry in the way stops counting. Entries stamped later than `now` (another
//! process's clock read a moment later) always count, which is conservative.
//!
//! # Clock steps
//! A stamp more than [`MAX_FUTURE`] ahead of `now` means the clock went back; such
//! stamps are rewritten to `now + MAX_FUTURE` ([`clamp_future`]), which is still no
//! earlier than the real send (the caller's `now` can't be that stale), so the account
//! waits at most one window plus ten minutes instead of until the old clock time comes
//! round again.

use std::collections::VecDeque;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::limits::{Limits, Rate};

/// How far ahead of `now` a stamp may be before it is taken for a clock step back.
pub const MAX_FUTURE: Duration = Duration::from_secs(600);

/// One transaction in memory.
#[derive(Debug, Clone, Copy)]
pub(super) struct Entry {
    /// Start of the transaction, ms since the epoch.
    pub(super) ms: u64,
    pub(super) rcpts: u32,
    /// Recipients of this and every earlier entry since the last full load, so a
    /// window's sum is one subtraction.
    pub(super) cum: u64,
}

// ---------------------------------------------------------------------------------------
// Time in milliseconds

/// `t` in whole milliseconds, rounded down: used for "now" when deciding, so an entry
/// counts a fraction of a millisecond longer rather than shorter.
pub(super) fn floor_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `t` in whole milliseconds, rounded up: used for stamps, so an entry never starts
/// counting before the send.
pub(super) fn ceil_ms(t: SystemTime) -> u64 {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    if d.subsec_nanos().is_multiple_of(1_000_000) {
        ms
    } else {
        ms.saturating_add(1)
    }
}

pub(super) fn from_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

// ---------------------------------------------------------------------------------------
// Windows

/// Index of the first entry still counting against `rate` at `now_ms`.
pub(super) fn first_in_window(entries: &VecDeque<Entry>, now_ms: u64, rate: &Rate) -> usize {
    let hold = rate.hold_ms();
    entries.partition_point(|e| e.ms.saturating_add(hold) <= now_ms)
}

/// Entries counting against `rate` at `now_ms`.
pub(super) fn in_window(entries: &VecDeque<Entry>, now_ms: u64, rate: &Rate) -> usize {
    entries.len() - first_in_window(entries, now_ms, rate)
}

/// Recipients of entries `first..`.
pub(super) fn sum_from(entries: &VecDeque<Entry>, first: usize) -> u64 {
    // The last entry's `cum` is the running total of every entry pushed.
    match (entries.get(first), entries.back()) {
        (Some(e), Some(last)) => last.cum - (e.cum - u64::from(e.rcpts)),
        _ => 0,
    }
}

/// The moment the oldest entries from `first` on carrying at least `need` recipients
/// have all left a window of `hold_ms`: 0 if there are no entries from `first` on,
/// `u64::MAX` if they carry fewer than `need`.
pub(super) fn drop_until(entries: &VecDeque<Entry>, first: usize, need: u64, hold_ms: u64) -> u64 {
    let Some(f) = entries.get(first) else {
        return 0;
    };
    let base = f.cum - u64::from(f.rcpts);
    let k = entries.partition_point(|e| e.cum.saturating_sub(base) < need);
    entries
        .get(k.max(first))
        .map_or(u64::MAX, |e| e.ms.saturating_add(hold_ms))
}

/// When one more transaction fits `rate` (`now_ms` if it does now).
pub(super) fn message_free_at(entries: &VecDeque<Entry>, now_ms: u64, rate: &Rate) -> u64 {
    let count = usize::try_from(rate.count).unwrap_or(usize::MAX);
    if in_window(entries, now_ms, rate) < count {
        return now_ms;
    }
    // The entry whose leaving brings the window down to count - 1.
    let len = entries.len();
    entries
        .get(len - count)
        .map_or(now_ms, |e| e.ms.saturating_add(rate.hold_ms()))
}

/// When `rcpts` more recipients fit the recipient window less the reserve.
pub(super) fn recipients_free_at(
    entries: &VecDeque<Entry>,
    now_ms: u64,
    rcpts: u32,
    limits: &Limits,
) -> u64 {
    let rate = &limits.recipient_rate;
    let cap = limits.capacity();
    let first = first_in_window(entries, now_ms, rate);
    let sum = sum_from(entries, first);
    let rcpts = u64::from(rcpts);
    if sum + rcpts <= cap {
        return now_ms;
    }
    drop_until(entries, first, sum + rcpts - cap, rate.hold_ms())
}

/// The earliest moment a transaction of `rcpts` fits every window and no freeze holds;
/// `freeze_until_ms` is the end of the freeze on file, if any (over or not).
pub(super) fn earliest(
    entries: &VecDeque<Entry>,
    now_ms: u64,
    rcpts: u32,
    limits: &Limits,
    freeze_until_ms: Option<u64>,
) -> u64 {
    let mut at = now_ms;
    if limits.message_rate.is_limited() {
        at = at.max(message_free_at(entries, now_ms, &limits.message_rate));
    }
    if limits.recipient_rate.is_limited() {
        at = at.max(recipients_free_at(entries, now_ms, rcpts, limits));
    }
    if let Some(until) = freeze_until_ms {
        at = at.max(until);
    }
    at
}

/// Recipients one transaction could carry at `now_ms`: 0 if a freeze or the message
/// window is in the way, else what the recipient window has left after the reserve,
/// at most `max_recipients`.
pub(super) fn room_now(
    entries: &VecDeque<Entry>,
    now_ms: u64,
    limits: &Limits,
    freeze_until_ms: Option<u64>,
) -> u32 {
    if freeze_until_ms.is_some_and(|until| until > now_ms) {
        return 0;
    }
    if limits.message_rate.is_limited()
        && message_free_at(entries, now_ms, &limits.message_rate) > now_ms
    {
        return 0;
    }
    if !limits.recipient_rate.is_limited() {
        return limits.max_recipients;
    }
    let first = first_in_window(entries, now_ms, &limits.recipient_rate);
    let left = limits.capacity().saturating_sub(sum_from(entries, first));
    u32::try_from(left)
        .unwrap_or(u32::MAX)
        .min(limits.max_recipients)
}

// ---------------------------------------------------------------------------------------
// Pruning

/// How long records must be kept: the longest hold, and never less than a day so
/// that switching a rate off or shortening it doesn't forget a day's sends.
pub(super) fn retention_ms(limits: &Limits) -> u64 {
    let day = Limits::default().recipient_rate.hold_ms();
    [limits.message_rate, limits.recipient_rate]
        .iter()
        .filter(|r| r.is_limited())
        .map(Rate::hold_ms)
        .fold(day, u64::max)
}

/// Drops the entries at the front that have left every window (stamped `retention_ms`
/// or more before `now_ms`); returns how many.
pub(super) fn drop_expired(entries: &mut VecDeque<Entry>, now_ms: u64, retention_ms: u64) -> u64 {
    let mut dropped = 0;
    while let Some(e) = entries.front() {
        if e.ms.saturating_add(retention_ms) > now_ms {
            break;
        }
        entries.pop_front();
        dropped += 1;
    }
    dropped
}

/// Moves stamps more than [`MAX_FUTURE`] ahead of `now_ms` back to `now_ms +
/// MAX_FUTURE` (see "Clock steps" above); returns whether any moved, in which case the
/// file must be rewritten to match.
pub(super) fn clamp_future(entries: &mut VecDeque<Entry>, now_ms: u64) -> bool {
    let limit = now_ms.saturating_add(u64::try_from(MAX_FUTURE.as_millis()).unwrap_or(0));
    let mut moved = false;
    for e in entries.iter_mut().rev() {
        if e.ms <= limit {
            break;
        }
        e.ms = limit;
        moved = true;
    }
    moved
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::limits::tests::rate;

    /// 2023-11-14 22:13:20 UTC.
    const T0: u64 = 1_700_000_000_000;
    /// The hold of a one-minute window: 60 s + 1 ms + 60 ms.
    const MIN_HOLD: u64 = 60_061;
    /// The hold of a one-hour window: 3600 s + 1 ms + 3.6 s.
    const HOUR_HOLD: u64 = 3_603_601;

    /// Records as the ledger holds them, `cum` counted from `base`.
    fn entries_from(base: u64, recs: &[(u64, u32)]) -> VecDeque<Entry> {
        let mut total = base;
        recs.iter()
            .map(|&(ms, rcpts)| {
                total += u64::from(rcpts);
                Entry {
                    ms,
                    rcpts,
                    cum: total,
                }
            })
            .collect()
    }

    fn entries(recs: &[(u64, u32)]) -> VecDeque<Entry> {
        entries_from(0, recs)
    }

    fn limits(message: &str, recipient: &str) -> Limits {
        Limits {
            message_rate: rate(message),
            recipient_rate: rate(recipient),
            ..Limits::default()
        }
    }

    #[test]
    fn milliseconds_round_down_for_now_and_up_for_stamps() {
        let t = from_ms(T0) + Duration::from_micros(500);
        assert_eq!(floor_ms(t), T0);
        assert_eq!(ceil_ms(t), T0 + 1);
        assert_eq!((floor_ms(from_ms(T0)), ceil_ms(from_ms(T0))), (T0, T0));
        let nano = from_ms(T0) + Duration::from_nanos(1);
        assert_eq!((floor_ms(nano), ceil_ms(nano)), (T0, T0 + 1));
        assert_eq!((floor_ms(UNIX_EPOCH), ceil_ms(UNIX_EPOCH)), (0, 0));
    }

    #[test]
    fn an_entry_counts_from_its_stamp_until_exactly_its_hold() {
        let r = rate("2/1m");
        let e = entries(&[(T0, 1), (T0 + 10, 1)]);
        assert_eq!(first_in_window(&e, T0, &r), 0);
        assert_eq!(in_window(&e, T0 + MIN_HOLD - 1, &r), 2);
        assert_eq!(first_in_window(&e, T0 + MIN_HOLD - 1, &r), 0);
        assert_eq!(first_in_window(&e, T0 + MIN_HOLD, &r), 1);
        assert_eq!(in_window(&e, T0 + MIN_HOLD, &r), 1);
        assert_eq!(in_window(&e, T0 + 10 + MIN_HOLD - 1, &r), 1);
        assert_eq!(in_window(&e, T0 + 10 + MIN_HOLD, &r), 0);
        // A stamp later than now (another process's clock) counts all the same.
        assert_eq!(in_window(&e, T0 - 5_000, &r), 2);
        assert_eq!(in_window(&VecDeque::new(), T0, &r), 0);
    }

    #[test]
    fn sum_from_adds_the_recipients_from_an_index_on() {
        // `cum` need not start at 0: pruned entries leave their count behind.
        for base in [0, 1234] {
            let e = entries_from(base, &[(T0, 5), (T0 + 1, 7), (T0 + 2, 11)]);
            assert_eq!(sum_from(&e, 0), 23);
            assert_eq!(sum_from(&e, 1), 18);
            assert_eq!(sum_from(&e, 2), 11);
            assert_eq!(sum_from(&e, 3), 0);
        }
        assert_eq!(sum_from(&VecDeque::new(), 0), 0);
    }

    #[test]
    fn drop_until_names_the_moment_enough_recipients_have_left() {
        let e = entries(&[(T0, 40), (T0 + 1000, 30), (T0 + 2000, 30)]);
        let hold = HOUR_HOLD;
        assert_eq!(drop_until(&e, 0, 1, hold), T0 + hold);
        assert_eq!(drop_until(&e, 0, 40, hold), T0 + hold);
        assert_eq!(drop_until(&e, 0, 41, hold), T0 + 1000 + hold);
        assert_eq!(drop_until(&e, 0, 100, hold), T0 + 2000 + hold);
        assert_eq!(drop_until(&e, 1, 30, hold), T0 + 1000 + hold);
        assert_eq!(drop_until(&e, 1, 31, hold), T0 + 2000 + hold);
        // More than the entries carry: never; no entries: nothing in the way.
        assert_eq!(drop_until(&e, 0, 101, hold), u64::MAX);
        assert_eq!(drop_until(&e, 3, 1, hold), 0);
    }

    /// At the instant the free-at functions name, the room is there; one millisecond
    /// earlier it is not.
    #[test]
    fn the_free_moment_is_exactly_when_sending_succeeds() {
        // (message_rate, recipient_rate, records, recipients of the next transaction)
        type Case = (&'static str, &'static str, &'static [(u64, u32)], u32);
        let cases: [Case; 6] = [
            ("2/1m", "off", &[(T0, 1), (T0 + 10, 1)], 1),
            ("3/1m", "off", &[(T0, 1), (T0, 1), (T0 + 7, 1)], 1),
            (
                "off",
                "100/1h",
                &[(T0, 40), (T0 + 1000, 30), (T0 + 2000, 30)],
                1,
            ),
            (
                "off",
                "100/1h",
                &[(T0, 40), (T0 + 1000, 30), (T0 + 2000, 30)],
                41,
            ),
            (
                "off",
                "100/1h",
                &[(T0, 40), (T0 + 1000, 30), (T0 + 2000, 30)],
                100,
            ),
            (
                "2/1m",
                "10/1h",
                &[(T0, 5), (T0 + 30_000, 4), (T0 + 40_000, 1)],
                6,
            ),
        ];
        for (message, recipient, recs, rcpts) in cases {
            let l = limits(message, recipient);
            let e = entries(recs);
            let now = T0 + 40_001;
            let at = earliest(&e, now, rcpts, &l, None);
            assert!(
                at > now,
                "{message} {recipient} {rcpts}: room already at now"
            );
            let fits = |t: u64| room_now(&e, t, &l, None) >= rcpts;
            assert!(fits(at), "{message} {recipient} {rcpts}: no room at {at}");
            assert!(
                !fits(at - 1),
                "{message} {recipient} {rcpts}: room 1 ms before {at}"
            );
            assert_eq!(earliest(&e, at, rcpts, &l, None), at);
            assert_eq!(earliest(&e, at - 1, rcpts, &l, None), at);
        }
    }

    #[test]
    fn message_free_at_is_the_hold_of_the_entry_that_makes_room() {
        let r = rate("2/1m");
        let e = entries(&[(T0, 1), (T0 + 10, 1), (T0 + 20, 1)]);
        // Three in the window, two allowed: the second of them must leave.
        assert_eq!(message_free_at(&e, T0 + 30, &r), T0 + 10 + MIN_HOLD);
        assert_eq!(
            message_free_at(&e, T0 + 10 + MIN_HOLD, &r),
            T0 + 10 + MIN_HOLD
        );
        assert_eq!(in_window(&e, T0 + 10 + MIN_HOLD, &r), 1);
        assert_eq!(in_window(&e, T0 + 10 + MIN_HOLD - 1, &r), 2);
        assert_eq!(message_free_at(&VecDeque::new(), T0, &r), T0);
    }

    #[test]
    fn recipients_free_at_leaves_the_reserve() {
        let l = Limits {
            reserve: 10,
            ..limits("off", "100/1h")
        };
        let e = entries(&[(T0, 45), (T0 + 5, 45)]);
        assert_eq!(recipients_free_at(&e, T0 + 6, 1, &l), T0 + HOUR_HOLD);
        assert_eq!(room_now(&e, T0 + 6, &l, None), 0);
        assert_eq!(room_now(&e, T0 + HOUR_HOLD - 1, &l, None), 0);
        assert_eq!(room_now(&e, T0 + HOUR_HOLD, &l, None), 45);
        let e = entries(&[(T0, 45)]);
        assert_eq!(recipients_free_at(&e, T0 + 6, 45, &l), T0 + 6);
        assert_eq!(recipients_free_at(&e, T0 + 6, 46, &l), T0 + HOUR_HOLD);
    }

    #[test]
    fn a_freeze_holds_until_its_end_and_no_longer() {
        let l = limits("30/1m", "off");
        let e = entries(&[(T0, 1)]);
        let until = T0 + 5_000;
        assert_eq!(earliest(&e, T0, 1, &l, Some(until)), until);
        assert_eq!(room_now(&e, until - 1, &l, Some(until)), 0);
        assert_eq!(room_now(&e, until, &l, Some(until)), 500);
        // A freeze that is over changes nothing.
        assert_eq!(earliest(&e, until + 1, 1, &l, Some(until)), until + 1);
    }

    #[test]
    fn room_is_capped_by_max_recipients_and_unlimited_when_off() {
        let l = Limits {
            max_recipients: 50,
            ..limits("30/1m", "100/1h")
        };
        let e = entries(&[(T0, 30)]);
        assert_eq!(room_now(&e, T0, &l, None), 50);
        let e = entries(&[(T0, 30), (T0, 30)]);
        assert_eq!(room_now(&e, T0, &l, None), 40);
        assert_eq!(room_now(&e, T0, &limits("off", "off"), None), 500);
        // A full message window leaves no room whatever the recipients.
        let e = entries(&[(T0, 1), (T0, 1)]);
        assert_eq!(room_now(&e, T0 + 1, &limits("2/1m", "100/1h"), None), 0);
        assert_eq!(
            room_now(&e, T0 + MIN_HOLD, &limits("2/1m", "100/1h"), None),
            98
        );
    }

    #[test]
    fn retention_is_the_longest_hold_and_at_least_a_day() {
        let day = 86_486_401;
        assert_eq!(retention_ms(&Limits::default()), day);
        assert_eq!(retention_ms(&limits("30/1m", "off")), day);
        assert_eq!(retention_ms(&limits("off", "off")), day);
        assert_eq!(
            retention_ms(&limits("30/1m", "5/2d")),
            rate("5/2d").hold_ms()
        );
        assert_eq!(
            retention_ms(&limits("1/7d", "100/1h")),
            604_800_000 + 1 + 604_800
        );
    }

    #[test]
    fn drop_expired_keeps_every_entry_still_within_retention() {
        let mut e = entries(&[(T0, 1), (T0 + 10, 2), (T0 + 20, 3)]);
        assert_eq!(drop_expired(&mut e, T0 + 1000 - 1, 1000), 0);
        assert_eq!(drop_expired(&mut e, T0 + 1000, 1000), 1);
        assert_eq!(drop_expired(&mut e, T0 + 1019, 1000), 1);
        assert_eq!(e.len(), 1);
        // The running count survives: the window's sum is unchanged.
        assert_eq!(sum_from(&e, 0), 3);
        assert_eq!(drop_expired(&mut e, u64::MAX, 1000), 1);
        assert!(e.is_empty());
        assert_eq!(drop_expired(&mut e, u64::MAX, 1000), 0);
    }

    #[test]
    fn clamp_future_moves_only_stamps_past_the_bound() {
        let bound = T0 + 600_000;
        let mut e = entries(&[
            (T0, 1),
            (bound, 1),
            (bound + 1, 1),
            (T0 + 10 * 86_400_000, 2),
        ]);
        assert!(clamp_future(&mut e, T0));
        let stamps: Vec<u64> = e.iter().map(|e| e.ms).collect();
        assert_eq!(stamps, [T0, bound, bound, bound]);
        assert_eq!(sum_from(&e, 0), 5);
        assert!(!clamp_future(&mut e, T0));
        assert!(!clamp_future(&mut VecDeque::new(), T0));
    }
}
