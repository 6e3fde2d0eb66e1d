//! `relay365 health`: one check for Nagios, Icinga, Zabbix and the like. Prints one
//! line, `RELAY365 <STATE> - <what> | <perfdata>`, and exits 0 OK, 1 WARNING,
//! 2 CRITICAL or 3 UNKNOWN (the monitoring plugin convention).
//!
//! CRITICAL: the daemon is not running (unless `--no-daemon`), an account is held
//! (credentials, permissions: nothing goes until an administrator acts), the oldest
//! message is older than `--crit`, a credential expires within `--expiry-crit` or has
//! expired. WARNING: the oldest message is older than `--warn`, an account is frozen
//! by a server quota verdict, a credential expires within `--expiry-warn`.
//! UNKNOWN: the config cannot be read, or this user cannot open the trigger FIFO that
//! tells whether the daemon runs (and cannot read state/ either).
//!
//! Trusts the config and the spool as the other admin commands do.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::Config;
use crate::daemon::engine::daemon_running;
use crate::daemon::hold::read_hold;
use crate::quota::Ledger;
use crate::spool::listing;
use crate::spool::paths::Spool;
use crate::sysexits::Exit;

/// The thresholds of one run.
#[derive(Debug, Clone)]
pub struct Thresholds {
    pub warn_age: Duration,
    pub crit_age: Duration,
    pub expiry_warn: Duration,
    pub expiry_crit: Duration,
    /// A host without the daemon (flush from cron): its absence is no problem.
    pub no_daemon: bool,
}

/// A monitoring plugin state, in order of severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    Ok,
    Warning,
    Critical,
    Unknown,
}

impl Status {
    fn word(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::Warning => "WARNING",
            Status::Critical => "CRITICAL",
            Status::Unknown => "UNKNOWN",
        }
    }

    /// The exit code monitoring plugins use (not sysexits: Nagios reads 0-3).
    pub fn exit(self) -> Exit {
        match self {
            Status::Ok => Exit::Ok,
            Status::Warning => Exit::PluginWarning,
            Status::Critical => Exit::PluginCritical,
            Status::Unknown => Exit::PluginUnknown,
        }
    }
}

/// The finished check: its state and its one line.
pub struct Report {
    pub status: Status,
    pub line: String,
}

fn secs(d: Duration) -> u64 {
    d.as_secs()
}

/// A short reason for the line: perfdata must stay on it, so no `|` and no newline.
fn short(text: &str) -> String {
    let t: String = text
        .chars()
        .map(|c| if c == '|' || c.is_control() { ' ' } else { c })
        .take(120)
        .collect();
    t
}

/// Runs the checks for `config` at `now`.
pub fn check(config: &Config, t: &Thresholds, now: SystemTime) -> Report {
    let spool = Spool::new(&config.spool_dir);
    let mut status = Status::Ok;
    let mut problems: Vec<String> = Vec::new();
    let mut raise = |s: Status, why: String, problems: &mut Vec<String>| {
        status = status.max(s);
        problems.push(why);
    };

    let running = daemon_running(&spool);
    match running {
        None => {
            return Report {
                status: Status::Unknown,
                line: format!(
                    "RELAY365 UNKNOWN - cannot open {} to see whether the daemon runs: run the check as root (sudo in NRPE)",
                    spool.trigger().display()
                ),
            };
        }
        Some(false) if !t.no_daemon => raise(
            Status::Critical,
            "daemon not running (systemctl start relay365)".into(),
            &mut problems,
        ),
        _ => {}
    }

    let entries = listing::list(&spool);
    let now_us = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    let oldest = entries
        .iter()
        .map(|e| Duration::from_micros(now_us.saturating_sub(e.arrival_us)))
        .max()
        .unwrap_or_default();
    if oldest >= t.crit_age {
        raise(
            Status::Critical,
            format!("oldest message waits {}s", oldest.as_secs()),
            &mut problems,
        );
    } else if oldest >= t.warn_age {
        raise(
            Status::Warning,
            format!("oldest message waits {}s", oldest.as_secs()),
            &mut problems,
        );
    }

    let mut held = 0;
    let mut frozen = 0;
    let mut min_days: Option<i64> = None;
    for a in &config.accounts {
        if let Some(h) = read_hold(&spool, &a.name) {
            held += 1;
            raise(
                Status::Critical,
                format!("account {} held: {}", a.name, short(&h.reason)),
                &mut problems,
            );
        }
        let usage = Ledger::open(&spool.ledger(&a.name))
            .ok()
            .and_then(|mut l| l.usage(now, &a.limits).ok());
        if let Some(f) = usage.and_then(|u| u.frozen) {
            frozen += 1;
            raise(
                Status::Warning,
                format!("account {} frozen: {}", a.name, short(&f.reason)),
                &mut problems,
            );
        }
        if let Some(expires) = a.credential_expires {
            let left = expires.duration_since(now).unwrap_or_default();
            let days = match expires.duration_since(now) {
                Ok(d) => (d.as_secs() / 86_400) as i64,
                Err(e) => -((e.duration().as_secs() / 86_400) as i64) - 1,
            };
            min_days = Some(min_days.map_or(days, |m| m.min(days)));
            if left <= t.expiry_crit {
                let what = if left.is_zero() {
                    "has expired"
                } else {
                    "expires"
                };
                raise(
                    Status::Critical,
                    format!(
                        "account {} credential {what} ({} days left): renew it in Entra ID",
                        a.name,
                        days.max(0)
                    ),
                    &mut problems,
                );
            } else if left <= t.expiry_warn {
                raise(
                    Status::Warning,
                    format!(
                        "account {} credential expires in {days} days: renew it in Entra ID",
                        a.name
                    ),
                    &mut problems,
                );
            }
        }
    }

    let summary = if problems.is_empty() {
        format!(
            "{} message(s) queued, oldest {}s, daemon {}",
            entries.len(),
            oldest.as_secs(),
            if running == Some(true) {
                "running"
            } else {
                "not running (not expected)"
            }
        )
    } else {
        problems.join("; ")
    };
    let mut perf = format!(
        "queued={};;;0 oldest_age={}s;{};{};0 held={held};;1;0 frozen={frozen};1;;0 daemon={}",
        entries.len(),
        oldest.as_secs(),
        secs(t.warn_age),
        secs(t.crit_age),
        u8::from(running == Some(true))
    );
    if let Some(d) = min_days {
        perf.push_str(&format!(
            " credential_days={d};{};{}",
            secs(t.expiry_warn) / 86_400,
            secs(t.expiry_crit) / 86_400
        ));
    }
    Report {
        status,
        line: format!("RELAY365 {} - {summary} | {perf}", status.word()),
    }
}

/// The check for a config that could not be read.
pub fn unknown(why: &str) -> Report {
    Report {
        status: Status::Unknown,
        line: format!("RELAY365 UNKNOWN - {}", short(why)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_order_by_severity_and_map_to_plugin_codes() {
        assert!(Status::Ok < Status::Warning && Status::Warning < Status::Critical);
        assert!(Status::Critical < Status::Unknown);
        assert_eq!(Status::Critical.exit(), Exit::PluginCritical);
        assert_eq!(short("a|b\nc"), "a b c");
    }
}
