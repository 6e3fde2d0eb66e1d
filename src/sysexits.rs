//! Exit codes from sysexits.h, the one mapping every binary's errors end in.
//!
//! Callers such as PHP's `mail()` only test for non-zero, but cron, git and the
//! mail user agents print the code, and `EX_TEMPFAIL` tells a caller it may retry.
//!
//! Every error a command can end in implements [`ExitStatus`]; this module is the
//! lowest layer, so the impls sit beside the errors, and the mapping is this table:
//!
//! | error | status |
//! |---|---|
//! | bad command line (sendmail's options, clap) | `EX_USAGE` 64 |
//! | `IntakeError`: too big, NUL, bad header | `EX_DATAERR` 65 |
//! | `IntakeError`: bad address | `EX_NOUSER` 67 |
//! | `IntakeError`: no recipients | `EX_USAGE` 64 |
//! | `IntakeError`: cannot read stdin; `SpoolError::Io` | `EX_IOERR` 74 |
//! | `SpoolError`: spool full, file size limit | `EX_TEMPFAIL` 75 |
//! | `SpoolError`: spool unwritable or missing | `EX_CANTCREAT` 73 |
//! | `-bs` input ended inside a transaction | `EX_TEMPFAIL` 75 |
//! | `WakeError`: the daemon is not running | `EX_UNAVAILABLE` 69 |
//! | `ConfigError`, secrets and aliases at start-up | `EX_CONFIG` 78 |
//! | `EngineError`: set-up (inotify, signals) | `EX_OSERR` 71 |
//! | `EngineError`: another daemon holds the lock | `EX_TEMPFAIL` 75 |
//! | privilege handling failed | `EX_OSERR` 71 |
//! | `relay365 flush`: mail is left in the queue | `EX_TEMPFAIL` 75 |
//! | `relay365 health`: WARNING, CRITICAL, UNKNOWN | 1, 2, 3 (the monitoring-plugin convention Nagios, Icinga and Zabbix read, not sysexits) |

use std::process::ExitCode;

/// A sysexits.h status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Ok = 0,
    /// `relay365 health` only: the plugin states WARNING, CRITICAL and UNKNOWN.
    PluginWarning = 1,
    PluginCritical = 2,
    PluginUnknown = 3,
    Usage = 64,
    DataErr = 65,
    NoInput = 66,
    NoUser = 67,
    Unavailable = 69,
    Software = 70,
    OsErr = 71,
    CantCreat = 73,
    IoErr = 74,
    TempFail = 75,
    NoPerm = 77,
    Config = 78,
}

impl Exit {
    /// The numeric status.
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// An error a command can end in, and the status it ends with (see the table above).
pub trait ExitStatus {
    fn exit(&self) -> Exit;
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> Self {
        ExitCode::from(e.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_match_sysexits_h() {
        assert_eq!(Exit::Usage.code(), 64);
        assert_eq!(Exit::DataErr.code(), 65);
        assert_eq!(Exit::CantCreat.code(), 73);
        assert_eq!(Exit::TempFail.code(), 75);
        assert_eq!(Exit::Config.code(), 78);
    }
}
