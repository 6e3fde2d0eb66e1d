//! Per-mailbox limits of Exchange Online: message rate, rolling recipient quota, recipients
//! per message (checked by the session) and concurrent authenticated connections.
//!
//! Counts only what the emulator itself accepted; mailbox names are compared case-insensitively
//! after lowercasing here, so a client cannot dodge a limit by changing case.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Why a message may not be accepted now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Denial {
    /// The rolling recipient quota would be exceeded.
    RecipientQuota,
    /// The message rate is used up until this instant.
    Rate { until: Instant },
}

#[derive(Default)]
struct Ledger {
    messages: VecDeque<Instant>,
    rcpts: VecDeque<(Instant, u32)>,
    rcpt_sum: u64,
}

#[derive(Default)]
struct Concurrency {
    /// Authentication sequence numbers of the open connections of each mailbox.
    open: HashMap<String, Vec<u64>>,
    max_seen: HashMap<String, u32>,
    next_seq: u64,
}

pub(crate) struct Limits {
    message_rate: Option<(u32, Duration)>,
    recipient_rate: Option<(u32, Duration)>,
    ledgers: Mutex<HashMap<Option<String>, Ledger>>,
    concurrency: Mutex<Concurrency>,
}

fn key(mailbox: Option<&str>) -> Option<String> {
    mailbox.map(str::to_ascii_lowercase)
}

impl Limits {
    pub(crate) fn new(
        message_rate: Option<(u32, Duration)>,
        recipient_rate: Option<(u32, Duration)>,
    ) -> Limits {
        Limits {
            message_rate,
            recipient_rate,
            ledgers: Mutex::default(),
            concurrency: Mutex::default(),
        }
    }

    /// Checks both rolling windows and, if the message fits, records it, atomically so that
    /// parallel connections of one mailbox cannot both take the last slot.
    pub(crate) fn admit(
        &self,
        mailbox: Option<&str>,
        rcpts: u32,
        now: Instant,
    ) -> Result<(), Denial> {
        if self.message_rate.is_none() && self.recipient_rate.is_none() {
            return Ok(());
        }
        let mut ledgers = self.ledgers.lock().unwrap_or_else(|e| e.into_inner());
        let ledger = ledgers.entry(key(mailbox)).or_default();
        if let Some((limit, window)) = self.recipient_rate {
            while let Some(&(t, n)) = ledger.rcpts.front() {
                if now.duration_since(t) < window {
                    break;
                }
                ledger.rcpt_sum -= u64::from(n);
                ledger.rcpts.pop_front();
            }
            if ledger.rcpt_sum + u64::from(rcpts) > u64::from(limit) {
                return Err(Denial::RecipientQuota);
            }
        }
        if let Some((limit, window)) = self.message_rate {
            while let Some(&t) = ledger.messages.front() {
                if now.duration_since(t) < window {
                    break;
                }
                ledger.messages.pop_front();
            }
            if ledger.messages.len() >= limit as usize {
                let until = ledger.messages.front().map_or(now, |&t| t + window);
                return Err(Denial::Rate { until });
            }
            ledger.messages.push_back(now);
        }
        if self.recipient_rate.is_some() {
            ledger.rcpts.push_back((now, rcpts));
            ledger.rcpt_sum += u64::from(rcpts);
        }
        Ok(())
    }

    /// Forgets all rate and quota history.
    pub(crate) fn reset(&self) {
        self.ledgers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Registers an authenticated connection; returns its sequence number for `rank`/`leave`.
    pub(crate) fn enter(&self, mailbox: &str) -> u64 {
        let mut c = self.concurrency.lock().unwrap_or_else(|e| e.into_inner());
        c.next_seq += 1;
        let seq = c.next_seq;
        let k = mailbox.to_ascii_lowercase();
        let open = c.open.entry(k.clone()).or_default();
        open.push(seq);
        let n = open.len() as u32;
        let max = c.max_seen.entry(k).or_default();
        *max = (*max).max(n);
        seq
    }

    pub(crate) fn leave(&self, mailbox: &str, seq: u64) {
        let mut c = self.concurrency.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(open) = c.open.get_mut(&mailbox.to_ascii_lowercase()) {
            open.retain(|&s| s != seq);
        }
    }

    /// How many open connections of the mailbox authenticated before this one: the first
    /// `max` connections are served, the later ones get `432 4.3.2`.
    pub(crate) fn rank(&self, mailbox: &str, seq: u64) -> u32 {
        let c = self.concurrency.lock().unwrap_or_else(|e| e.into_inner());
        c.open
            .get(&mailbox.to_ascii_lowercase())
            .map_or(0, |open| open.iter().filter(|&&s| s < seq).count() as u32)
    }

    pub(crate) fn max_concurrent(&self, mailbox: &str) -> u32 {
        let c = self.concurrency.lock().unwrap_or_else(|e| e.into_inner());
        c.max_seen
            .get(&mailbox.to_ascii_lowercase())
            .copied()
            .unwrap_or(0)
    }

    pub(crate) fn clear_max_concurrent(&self) {
        let mut c = self.concurrency.lock().unwrap_or_else(|e| e.into_inner());
        let current: HashMap<String, u32> = c
            .open
            .iter()
            .map(|(k, v)| (k.clone(), v.len() as u32))
            .collect();
        c.max_seen = current;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_rate_window() {
        let l = Limits::new(Some((2, Duration::from_secs(60))), None);
        let t0 = Instant::now();
        assert_eq!(l.admit(Some("A@x"), 1, t0), Ok(()));
        assert_eq!(l.admit(Some("a@x"), 1, t0 + Duration::from_secs(1)), Ok(()));
        assert_eq!(
            l.admit(Some("a@x"), 1, t0 + Duration::from_secs(2)),
            Err(Denial::Rate {
                until: t0 + Duration::from_secs(60)
            })
        );
        assert_eq!(l.admit(Some("b@x"), 1, t0), Ok(()));
        assert_eq!(
            l.admit(Some("a@x"), 1, t0 + Duration::from_secs(60)),
            Ok(())
        );
    }

    #[test]
    fn recipient_quota_counts_every_rcpt() {
        let l = Limits::new(None, Some((10, Duration::from_secs(100))));
        let t0 = Instant::now();
        assert_eq!(l.admit(Some("a@x"), 6, t0), Ok(()));
        assert_eq!(l.admit(Some("a@x"), 5, t0), Err(Denial::RecipientQuota));
        assert_eq!(l.admit(Some("a@x"), 4, t0), Ok(()));
        assert_eq!(l.admit(Some("a@x"), 1, t0), Err(Denial::RecipientQuota));
        assert_eq!(
            l.admit(Some("a@x"), 6, t0 + Duration::from_secs(100)),
            Ok(())
        );
    }

    #[test]
    fn concurrency_rank() {
        let l = Limits::new(None, None);
        let a = l.enter("m@x");
        let b = l.enter("M@x");
        let c = l.enter("m@x");
        assert_eq!(
            (l.rank("m@x", a), l.rank("m@x", b), l.rank("m@x", c)),
            (0, 1, 2)
        );
        l.leave("m@x", a);
        assert_eq!(l.rank("m@x", c), 1);
        assert_eq!(l.max_concurrent("m@X"), 3);
    }
}
