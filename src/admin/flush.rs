//! `relay365 flush`: deliver everything in the queue once, in the foreground, for
//! hosts that run no daemon (cron) and for an administrator who wants it now.
//!
//! Quiet by design, like Postfix's `postqueue -f`: cron mails whatever a job prints,
//! through this very `sendmail`, so a flush that printed a summary every run queued
//! one more message every run. A normal run prints nothing; its log goes to syslog (or
//! the journal); `-v` prints the log and a summary; a problem the administrator must
//! act on (an error-level line: an account held for its credentials, a queue entry
//! that cannot be read) is printed at the end of the first run that meets it, and not
//! again while it lasts (`state/flush.reported` remembers it). The exit status tells a script
//! whether mail is left: 0 the queue is empty, 75 (EX_TEMPFAIL) some is left.
//!
//! Trusts the config and the queue, as the daemon does.

use std::io::Write;
use std::path::Path;

use crate::daemon::engine::Engine;
use crate::logging::{Log, Output};
use crate::spool::listing;
use crate::spool::paths::Spool;
use crate::sysexits::{Exit, ExitStatus};

/// Where the problems the last flush reported are kept (daemon-only `state/`).
const REPORTED: &str = "flush.reported";
/// At most this many are remembered (and printed): a cron mail stays readable.
const MAX_PROBLEMS: usize = 20;

/// A problem's identity across runs: its text without digits, so that the same hold
/// with a later probe time is the same problem.
fn key(problem: &str) -> String {
    problem.chars().filter(|c| !c.is_ascii_digit()).collect()
}

/// Records this run's problems and returns those the last run did not report: a
/// problem is printed once, when it appears, not by every cron run while it lasts.
fn remember<'a>(spool: &Spool, problems: &'a [String]) -> Vec<&'a String> {
    let path = spool.state().join(REPORTED);
    let before = std::fs::read_to_string(&path).unwrap_or_default();
    let known: std::collections::HashSet<&str> = before.lines().collect();
    let problems = &problems[..problems.len().min(MAX_PROBLEMS)];
    let fresh = problems
        .iter()
        .filter(|p| !known.contains(key(p).as_str()))
        .collect();
    let now: String = problems.iter().map(|p| key(p) + "\n").collect();
    if now != before {
        // Best effort: a flush run by a user who cannot write state/ reports each time.
        let tmp = path.with_extension("tmp");
        if std::fs::write(&tmp, now).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
    fresh
}

/// Runs the flush; `verbose`: `-v`.
pub fn run(config_path: &Path, spool: &Spool, verbose: bool) -> Exit {
    let at_terminal =
        nix::unistd::isatty(std::os::fd::AsRawFd::as_raw_fd(&std::io::stderr())).unwrap_or(false);
    // An administrator at a terminal sees the log as it happens; cron sees nothing.
    let output = if verbose || at_terminal {
        Output::Verbose
    } else {
        Output::Quiet
    };
    let mut log = Log::with_output("relay365/flush", output);
    log.keep_problems();
    let mut engine = match Engine::start(config_path, log) {
        Ok(e) => e,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "relay365: {e}");
            return e.exit();
        }
    };
    engine.flush();
    let left = listing::list(spool);
    let problems = engine.problems();
    let fresh = remember(spool, &problems);
    if output != Output::Verbose {
        let mut err = std::io::stderr().lock();
        for p in fresh {
            let _ = writeln!(err, "relay365: {p}");
        }
    }
    if verbose {
        println!(
            "flush: {} message(s) finished, {} deferred, {} left in the queue",
            engine.delivered,
            engine.deferred,
            left.len()
        );
    }
    if left.is_empty() {
        Exit::Ok
    } else {
        Exit::TempFail
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_problem_is_reported_once_while_it_lasts() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path());
        std::fs::create_dir(spool.state()).unwrap();
        let held = |t: &str| vec![format!("account app held until {t}: fix the password")];
        let first = held("Thu, 3 Dec 2026 19:41:06 +0000");
        assert_eq!(remember(&spool, &first).len(), 1);
        let later = held("Thu, 3 Dec 2026 20:41:07 +0000");
        assert!(
            remember(&spool, &later).is_empty(),
            "same problem, later time"
        );
        assert!(remember(&spool, &[]).is_empty());
        assert_eq!(remember(&spool, &later).len(), 1, "it came back");
    }
}
