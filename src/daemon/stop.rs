//! The daemon's stop signal for its account workers (at shutdown, at the end of a
//! queue run, before a reload), with a sleep that the signal cuts short.
//!
//! Trusts nothing outside the process; a poisoned lock ends the sleep as if stopped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::SystemTime;

/// Shared stop signal with an interruptible sleep.
#[derive(Debug, Default)]
pub struct Stop {
    flag: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
}

impl Stop {
    pub fn set(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.cv.notify_all();
    }
    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
    /// Sleeps until `t` (exactly, not past it) unless stopped; true if `t` was reached.
    pub fn sleep_until(&self, t: SystemTime) -> bool {
        let Ok(mut guard) = self.lock.lock() else {
            return false;
        };
        loop {
            if self.is_set() {
                return false;
            }
            let Ok(left) = t.duration_since(SystemTime::now()) else {
                return true;
            };
            if left.is_zero() {
                return true;
            }
            match self.cv.wait_timeout(guard, left) {
                Ok((g, _)) => guard = g,
                Err(_) => return false,
            }
        }
    }
}
