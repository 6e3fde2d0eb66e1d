//! Logging to syslog's mail facility, in Postfix's `queue-id: key=value` style.
//!
//! Each line is written once, to one place (issue 17: under systemd every line used to
//! reach the journal twice, through syslog and through stderr):
//! - when `JOURNAL_STREAM` names our stderr (systemd connected it to the journal),
//!   stderr only, with a `<N>` priority prefix journald understands; the journal hands
//!   it on to syslog's mail facility (`SyslogFacility=mail` in the unit);
//! - otherwise syslog's mail facility, plus a copy on stderr when the caller asked for
//!   one (`relay365 flush -v`, a daemon run by hand in a terminal) or, for the daemon,
//!   when syslog cannot be reached (a container without /dev/log: the lines must go
//!   somewhere).
//!
//! Optionally also to a file (`log_file`, Postfix's `maillog_file`), in the format a
//! syslog daemon writes, which log tools such as pflogsumm read.
//!
//! Syslog being unavailable must never stop mail: every call here is best effort.
//! Trusts its callers for the text (they sanitise what came from the network).

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use syslog::{Facility, Formatter3164, Logger, LoggerBackend};

/// Severity of a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warning,
    Error,
}

impl Level {
    /// The syslog priority (facility mail = 2, so the journal's prefix is this alone).
    fn priority(self) -> u8 {
        match self {
            Level::Info => 6,
            Level::Warning => 4,
            Level::Error => 3,
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            Level::Info => "",
            Level::Warning => "warning: ",
            Level::Error => "error: ",
        }
    }
}

/// Where a process's log lines go besides syslog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Syslog only (the setgid `sendmail`: its stderr belongs to the caller).
    Syslog,
    /// The daemon: the journal when stderr is it; else syslog, and stderr too when it
    /// is a terminal or syslog cannot be reached.
    Daemon,
    /// A command run from cron (`relay365 flush`): the journal when stderr is it, else
    /// syslog; never stderr, which cron would mail.
    Quiet,
    /// A command whose user asked to see the lines (`-v`): syslog (or the journal)
    /// and stderr.
    Verbose,
}

/// A syslog connection (if one could be made), the journal or stderr, and an optional
/// log file.
pub struct Log {
    syslog: Option<Logger<LoggerBackend, Formatter3164>>,
    tag: String,
    journal: bool,
    to_stderr: bool,
    file: Option<std::fs::File>,
    /// Error-level lines, kept when asked (a flush reports them once at its end).
    problems: Option<Vec<String>>,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log").field("tag", &self.tag).finish()
    }
}

/// Whether `JOURNAL_STREAM` (`device:inode`) names the file open on stderr, as
/// systemd sets it for a service whose stderr is the journal (systemd.exec(5)).
fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    nix::sys::stat::fstat(std::io::stderr().as_raw_fd())
        .is_ok_and(|st| st.st_dev == dev && st.st_ino == ino)
}

fn stderr_is_terminal() -> bool {
    nix::unistd::isatty(std::io::stderr().as_raw_fd()).unwrap_or(false)
}

impl Log {
    /// Opens the mail facility under `tag` (e.g. `relay365/sendmail`); `daemon`:
    /// [`Output::Daemon`], else [`Output::Syslog`].
    pub fn open(tag: &str, daemon: bool) -> Log {
        Log::with_output(
            tag,
            if daemon {
                Output::Daemon
            } else {
                Output::Syslog
            },
        )
    }

    /// Opens the log under `tag` with the given output.
    pub fn with_output(tag: &str, output: Output) -> Log {
        let journal = output != Output::Syslog && stderr_is_journal();
        let syslog = if journal {
            None
        } else {
            let formatter = Formatter3164 {
                facility: Facility::LOG_MAIL,
                hostname: None,
                process: tag.to_string(),
                pid: std::process::id(),
            };
            syslog::unix(formatter).ok()
        };
        let to_stderr = !journal
            && match output {
                Output::Syslog | Output::Quiet => false,
                Output::Verbose => true,
                Output::Daemon => syslog.is_none() || stderr_is_terminal(),
            };
        Log {
            syslog,
            tag: tag.to_string(),
            journal,
            to_stderr,
            file: None,
            problems: None,
        }
    }

    /// Also appends every line to `path` in syslog's file format (`log_file`).
    pub fn add_file(&mut self, path: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            // SECURITY: a log file planted as a symlink is not followed.
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(path)?;
        self.file = Some(f);
        Ok(())
    }

    /// Keeps error-level lines for [`Log::take_problems`].
    pub fn keep_problems(&mut self) {
        self.problems = Some(Vec::new());
    }

    /// The error-level lines kept since [`Log::keep_problems`], each once.
    pub fn take_problems(&mut self) -> Vec<String> {
        let mut seen = std::collections::HashSet::new();
        self.problems
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
            .into_iter()
            .filter(|p| seen.insert(p.clone()))
            .collect()
    }

    pub fn log(&mut self, level: Level, line: &str) {
        if level == Level::Error
            && let Some(p) = self.problems.as_mut()
        {
            p.push(line.to_string());
        }
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
        // One write per line: stderr is unbuffered, and a line written in pieces
        // costs a system call each and can interleave with another writer's.
        if self.journal {
            let text = format!("<{}>{}{line}\n", level.priority(), level.prefix());
            let _ = std::io::stderr().write_all(text.as_bytes());
        } else if self.to_stderr {
            let text = format!("{}: {}{line}\n", self.tag, level.prefix());
            let _ = std::io::stderr().write_all(text.as_bytes());
        }
        if let Some(f) = self.file.as_mut() {
            let text = file_line(
                SystemTime::now(),
                &host_name(),
                &self.tag,
                std::process::id(),
                &format!("{}{line}", level.prefix()),
            );
            let _ = f.write_all(text.as_bytes());
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

fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".to_string())
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// A line as rsyslog writes it to /var/log/mail.log (RFC 3164, UTC):
/// `Dec  3 18:30:47 host relay365/daemon[42]: text`.
pub fn file_line(at: SystemTime, host: &str, tag: &str, pid: u32, text: &str) -> String {
    let secs = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (_, month, day) = crate::message::date::civil_from_days(days);
    format!(
        "{} {day:2} {:02}:{:02}:{:02} {host} {tag}[{pid}]: {text}\n",
        MONTHS[(month - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
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

    fn with<T>(&self, f: impl FnOnce(&mut Log) -> T) -> T {
        // A thread that panicked while logging leaves the log usable: take it anyway.
        let mut l = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut l)
    }

    pub fn log(&self, level: Level, line: &str) {
        self.with(|l| l.log(level, line));
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

    /// See [`Log::add_file`].
    pub fn add_file(&self, path: &Path) -> std::io::Result<()> {
        self.with(|l| l.add_file(path))
    }

    /// See [`Log::take_problems`].
    pub fn take_problems(&self) -> Vec<String> {
        self.with(Log::take_problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_lines_look_like_rsyslogs() {
        let at = UNIX_EPOCH + std::time::Duration::from_secs(1_795_734_105);
        assert_eq!(
            file_line(at, "web1", "relay365/daemon", 42, "0A: status=sent"),
            "Nov 26 23:01:45 web1 relay365/daemon[42]: 0A: status=sent\n"
        );
        let at = UNIX_EPOCH + std::time::Duration::from_secs(1_796_336_447);
        assert!(file_line(at, "h", "t", 1, "x").starts_with("Dec  3 "));
    }

    #[test]
    fn problems_are_kept_once() {
        let mut log = Log::with_output("test", Output::Quiet);
        log.keep_problems();
        log.error("account a is held");
        log.info("fine");
        log.error("account a is held");
        assert_eq!(log.take_problems(), vec!["account a is held".to_string()]);
    }
}
