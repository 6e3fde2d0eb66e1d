//! The rate limit of `sendmail -q` (issue 18 item 1): any local user can write the
//! trigger FIFO in a loop, so a `-q` request starts at most one queue run per
//! [`QUEUE_RUN_INTERVAL`]; requests within it are coalesced into one run at its end.
//! Such a run retries deferred messages now but respects account holds and backoff;
//! only root's `relay365 flush --wake` (its own trigger byte) overrides those.

use std::time::{Duration, Instant};

/// At most one `sendmail -q` queue run per this long.
pub const QUEUE_RUN_INTERVAL: Duration = Duration::from_secs(5);

/// When the last `sendmail -q` run started, and whether a request waits.
#[derive(Debug, Default)]
pub struct QueueRuns {
    last: Option<Instant>,
    waiting: bool,
}

impl QueueRuns {
    /// A `sendmail -q` request arrived.
    pub fn request(&mut self) {
        self.waiting = true;
    }

    /// How long until a waiting request may run (zero: now); `None` when none waits.
    pub fn wait(&self) -> Option<Duration> {
        self.waiting.then(|| {
            self.last.map_or(Duration::ZERO, |at| {
                QUEUE_RUN_INTERVAL.saturating_sub(at.elapsed())
            })
        })
    }

    /// Whether a waiting request is due now; if so it is taken (the run starts).
    pub fn take_due(&mut self) -> bool {
        if self.wait() != Some(Duration::ZERO) {
            return false;
        }
        self.waiting = false;
        self.last = Some(Instant::now());
        true
    }

    /// A forced run (root's) started: it serves a waiting request too.
    pub fn forced(&mut self) {
        self.waiting = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_within_the_interval_are_coalesced_into_one_run_at_its_end() {
        let mut q = QueueRuns::default();
        assert_eq!(q.wait(), None);
        assert!(!q.take_due());
        q.request();
        assert!(q.take_due(), "the first runs at once");
        q.request();
        q.request();
        assert!(!q.take_due(), "within the interval: waits");
        assert!(
            q.wait()
                .is_some_and(|d| d > Duration::ZERO && d <= QUEUE_RUN_INTERVAL)
        );
    }
}
