//! What the emulator saw: accepted messages, connection counts, replies per code and the
//! error replies themselves, for tests to assert on.
//!
//! Filled only by the emulator's own sessions; the message bytes inside are the client's,
//! kept verbatim.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// One accepted message, as the server received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The authenticated mailbox, `None` on an unauthenticated (sink) connection.
    pub mailbox: Option<String>,
    /// MAIL FROM address without angle brackets (empty for `<>`).
    pub mail_from: String,
    /// MAIL FROM parameters verbatim, e.g. `["SIZE=1234", "BODY=8BITMIME"]`.
    pub mail_params: Vec<String>,
    pub rcpts: Vec<String>,
    /// RCPT parameters verbatim, parallel to `rcpts`.
    pub rcpt_params: Vec<Vec<String>>,
    /// The message after dot-unstuffing, CRLFs as sent, without the final `.` line.
    pub data: Vec<u8>,
    pub accepted_at: SystemTime,
    pub connection_id: u64,
    /// The id in the `250 2.0.0 OK <id>` reply.
    pub message_id: String,
    /// How it came: SMTP submission or Microsoft Graph.
    pub via: Via,
}

/// The way a message reached the emulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Via {
    #[default]
    Smtp,
    /// `sendMail` with a MIME body.
    GraphMime,
    /// `sendMail` with a JSON message, or a draft sent with `/send`.
    GraphJson,
}

impl Received {
    /// The value of a MAIL FROM parameter (`SIZE`, `BODY`, `RET`, `ENVID`...), `Some("")` for a
    /// keyword without value.
    pub fn mail_param(&self, key: &str) -> Option<&str> {
        param(&self.mail_params, key)
    }

    /// The value of a parameter of the n-th RCPT (`NOTIFY`, `ORCPT`).
    pub fn rcpt_param(&self, n: usize, key: &str) -> Option<&str> {
        self.rcpt_params.get(n).and_then(|p| param(p, key))
    }

    /// The first value of a header, unfolded (`None` if absent).
    pub fn header(&self, name: &str) -> Option<String> {
        crate::headers::header_value(&self.data, name)
    }
}

fn param<'a>(params: &'a [String], key: &str) -> Option<&'a str> {
    params.iter().find_map(|p| {
        let (k, v) = p.split_once('=').unwrap_or((p.as_str(), ""));
        k.eq_ignore_ascii_case(key).then_some(v)
    })
}

/// One accepted message in the time log used for window checks.
#[derive(Debug, Clone, Copy)]
struct Stamp {
    at: Instant,
    wall: SystemTime,
    rcpts: u32,
}

#[derive(Default)]
struct Inner {
    messages: Vec<Received>,
    stamps: Vec<Stamp>,
    /// Mailbox for each stamp (parallel), for per-mailbox window checks.
    stamp_mailbox: Vec<Option<String>>,
    error_replies: Vec<String>,
}

pub(crate) struct Store {
    inner: Mutex<Inner>,
    arrived: Condvar,
    pub(crate) connections_opened: AtomicU64,
    pub(crate) connections_current: AtomicU64,
    pub(crate) connections_max: AtomicU64,
    pub(crate) throttled: AtomicU64,
    /// Commands that had already arrived when the one before them was read, i.e.
    /// before its reply was sent: the client pipelined them (RFC 2920).
    pub(crate) pipelined: AtomicU64,
    replies: Box<[AtomicU64]>,
}

impl Default for Store {
    fn default() -> Store {
        Store {
            inner: Mutex::default(),
            arrived: Condvar::new(),
            connections_opened: AtomicU64::new(0),
            connections_current: AtomicU64::new(0),
            connections_max: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
            pipelined: AtomicU64::new(0),
            replies: (0..1000).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

/// Largest number of stamps inside any window of length `window` (two-pointer sweep).
fn max_in_window(stamps: &[(Instant, u32)], window: Duration) -> u32 {
    let mut best = 0u32;
    let mut sum = 0u32;
    let mut lo = 0;
    for hi in 0..stamps.len() {
        sum += stamps[hi].1;
        while stamps[hi].0.duration_since(stamps[lo].0) >= window {
            sum -= stamps[lo].1;
            lo += 1;
        }
        best = best.max(sum);
    }
    best
}

impl Store {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn record(&self, msg: Received, at: Instant) {
        let mut inner = self.lock();
        inner.stamps.push(Stamp {
            at,
            wall: msg.accepted_at,
            rcpts: msg.rcpts.len() as u32,
        });
        inner.stamp_mailbox.push(msg.mailbox.clone());
        inner.messages.push(msg);
        drop(inner);
        self.arrived.notify_all();
    }

    pub(crate) fn count_reply(&self, code: u16, first_line: &str) {
        if let Some(c) = self.replies.get(usize::from(code)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        if code >= 400 {
            self.lock().error_replies.push(first_line.to_owned());
        }
    }

    pub(crate) fn connection_opened(&self) {
        self.connections_opened.fetch_add(1, Ordering::Relaxed);
        let now = self.connections_current.fetch_add(1, Ordering::Relaxed) + 1;
        self.connections_max.fetch_max(now, Ordering::Relaxed);
    }

    pub(crate) fn connection_closed(&self) {
        self.connections_current.fetch_sub(1, Ordering::Relaxed);
    }

    pub(crate) fn messages(&self) -> Vec<Received> {
        self.lock().messages.clone()
    }

    pub(crate) fn message_count(&self) -> usize {
        self.lock().messages.len()
    }

    pub(crate) fn wait_for(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut inner = self.lock();
        while inner.messages.len() < n {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            inner = match self.arrived.wait_timeout(inner, deadline - now) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        true
    }

    pub(crate) fn clear(&self) {
        let mut inner = self.lock();
        *inner = Inner::default();
        drop(inner);
        for c in self.replies.iter() {
            c.store(0, Ordering::Relaxed);
        }
        self.throttled.store(0, Ordering::Relaxed);
        self.pipelined.store(0, Ordering::Relaxed);
        let current = self.connections_current.load(Ordering::Relaxed);
        self.connections_opened.store(0, Ordering::Relaxed);
        self.connections_max.store(current, Ordering::Relaxed);
    }

    pub(crate) fn reply_count(&self, code: u16) -> u64 {
        self.replies
            .get(usize::from(code))
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    pub(crate) fn reply_counts(&self) -> BTreeMap<u16, u64> {
        self.replies
            .iter()
            .enumerate()
            .filter_map(|(code, c)| {
                let n = c.load(Ordering::Relaxed);
                (n > 0).then_some((code as u16, n))
            })
            .collect()
    }

    pub(crate) fn error_replies(&self) -> Vec<String> {
        self.lock().error_replies.clone()
    }

    pub(crate) fn accepted_times(&self) -> Vec<SystemTime> {
        self.lock().stamps.iter().map(|s| s.wall).collect()
    }

    fn sorted_stamps(&self, mailbox: Option<&str>, rcpts: bool) -> Vec<(Instant, u32)> {
        let inner = self.lock();
        let mut v: Vec<(Instant, u32)> = inner
            .stamps
            .iter()
            .zip(&inner.stamp_mailbox)
            .filter(|(_, m)| {
                mailbox
                    .is_none_or(|want| m.as_deref().is_some_and(|m| m.eq_ignore_ascii_case(want)))
            })
            .map(|(s, _)| (s.at, if rcpts { s.rcpts } else { 1 }))
            .collect();
        // Throttled sessions may record slightly out of order.
        v.sort_by_key(|s| s.0);
        v
    }

    pub(crate) fn max_in_window(
        &self,
        window: Duration,
        mailbox: Option<&str>,
        rcpts: bool,
    ) -> u32 {
        max_in_window(&self.sorted_stamps(mailbox, rcpts), window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_sweep() {
        let t0 = Instant::now();
        let s = |ms: u64, n: u32| (t0 + Duration::from_millis(ms), n);
        let stamps = [s(0, 1), s(10, 2), s(50, 1), s(100, 5), s(120, 1)];
        assert_eq!(max_in_window(&stamps, Duration::from_millis(60)), 6);
        assert_eq!(max_in_window(&stamps, Duration::from_millis(100)), 8);
        assert_eq!(max_in_window(&stamps, Duration::from_millis(101)), 9);
        assert_eq!(max_in_window(&[], Duration::from_secs(1)), 0);
    }

    #[test]
    fn params_lookup() {
        let p = vec!["SIZE=12".to_owned(), "SMTPUTF8".to_owned()];
        assert_eq!(param(&p, "size"), Some("12"));
        assert_eq!(param(&p, "SMTPUTF8"), Some(""));
        assert_eq!(param(&p, "RET"), None);
    }
}
