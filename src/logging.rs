//! Logging to syslog's mail facility, in Postfix's `queue-id: key=value` style.
//!
//! Syslog being unavailable (no /dev/log in a container or a test) must never stop
//! mail: every call here is best effort. The daemon also copies lines to stderr so
//! that `journalctl -u relay365` and tests see them.

use std::io::Write;
use std::sync::{Arc, Mutex};

use syslog::{Facility, Formatter3164, Logger, LoggerBackend};

/// Severity of a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warning,
    Error,
}

/// A syslog connection (if one could be made) plus an optional stderr copy.
pub struct Log {
    syslog: Option<Logger<LoggerBackend, Formatter3164>>,
    tag: String,
    to_stderr: bool,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log").field("tag", &self.tag).finish()
    }
}

impl Log {
    /// Opens the mail facility under `tag` (e.g. `relay365/sendmail`).
    pub fn open(tag: &str, to_stderr: bool) -> Log {
        let formatter = Formatter3164 {
            facility: Facility::LOG_MAIL,
            hostname: None,
            process: tag.to_string(),
            pid: std::process::id(),
        };
        Log {
            syslog: syslog::unix(formatter).ok(),
            tag: tag.to_string(),
            to_stderr,
        }
    }

    pub fn log(&mut self, level: Level, line: &str) {
        if let Some(s) = self.syslog.as_mut() {
            let r = match level {
                Level::Info => s.info(line),
                Level::Warning => s.warning(line),
                Level::Error => s.err(line),
            };
            if r.is_err() {
                // The socket went away (syslog restarted); stop trying rather than
                // paying for a failing write on every line.
                self.syslog = None;
            }
        }
        if self.to_stderr {
            let prefix = match level {
                Level::Info => "",
                Level::Warning => "warning: ",
                Level::Error => "error: ",
            };
            // One write per line: stderr is unbuffered, and a line written in pieces
            // costs a system call each and can interleave with another writer's.
            let text = format!("{}: {prefix}{line}\n", self.tag);
            let _ = std::io::stderr().write_all(text.as_bytes());
        }
    }

    pub fn info(&mut self, line: &str) {
        self.log(Level::Info, line);
    }

    pub fn warning(&mut self, line: &str) {
        self.log(Level::Warning, line);
    }

    pub fn error(&mut self, line: &str) {
        self.log(Level::Error, line);
    }
}

/// The daemon's one log, shared by its threads (pickup, account workers, bounces):
/// each line takes the lock on its own, since holding it for a whole pickup pass
/// stalled every delivery behind the pickup.
#[derive(Debug, Clone)]
pub struct SharedLog(Arc<Mutex<Log>>);

impl SharedLog {
    pub fn new(log: Log) -> SharedLog {
        SharedLog(Arc::new(Mutex::new(log)))
    }

    pub fn log(&self, level: Level, line: &str) {
        // A thread that panicked while logging leaves the log usable: take it anyway.
        let mut l = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        l.log(level, line);
    }

    pub fn info(&self, line: &str) {
        self.log(Level::Info, line);
    }

    pub fn warning(&self, line: &str) {
        self.log(Level::Warning, line);
    }

    pub fn error(&self, line: &str) {
        self.log(Level::Error, line);
    }
}
