//! The account hold: an account stopped for a problem only an administrator can fix
//! (bad credentials, SMTP AUTH disabled, mailbox blocked), kept in `state/<account>.hold`
//! so that the daemon, `relay365 flush` and `relay365 account release` agree; and the
//! count of consecutive `430 4.2.0 mailbox logon failure` replies that leads to one,
//! kept in `state/<account>.logon` so that it adds up across workers and flush runs.
//!
//! Trusts the state directory (the daemon's own); a hold file that cannot be read or
//! parsed counts as no hold.

use std::path::PathBuf;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::spool::durable;
use crate::spool::paths::Spool;
use crate::spool::queue::micros;

/// An account held for a problem only an administrator can fix (bad credentials,
/// SMTP AUTH disabled, mailbox blocked): persisted so flush and daemon agree.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hold {
    pub until_us: u64,
    pub reason: String,
}

/// Where an account's hold is kept.
pub fn hold_path(spool: &Spool, account: &str) -> PathBuf {
    spool.hold(account)
}

/// Reads an account's hold, if any.
pub fn read_hold(spool: &Spool, account: &str) -> Option<Hold> {
    let text = std::fs::read(hold_path(spool, account)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Holds `account` until `until` for `reason`, replacing any hold it had. `Err` names
/// the file that could not be written.
pub fn write_hold(
    spool: &Spool,
    account: &str,
    until: SystemTime,
    reason: &str,
) -> Result<(), PathBuf> {
    let hold = Hold {
        until_us: micros(until),
        reason: reason.to_string(),
    };
    let path = hold_path(spool, account);
    let tmp = path.with_extension("hold.tmp");
    // Durable like every state file: a hold lost in a crash would retry a refused
    // password at once, which is what the hold is there to prevent.
    let ok = serde_json::to_vec(&hold)
        .ok()
        .is_some_and(|b| durable::replace(&path, &tmp, &b, &durable::options(0o600)).is_ok());
    if ok { Ok(()) } else { Err(path) }
}

/// Where an account's count of consecutive mailbox logon failures is kept.
fn logon_path(spool: &Spool, account: &str) -> PathBuf {
    spool.state().join(format!("{account}.logon"))
}

/// Counts one more mailbox logon failure of `account` and returns the count so far
/// (1 for the first). Workers racing may lose a count, which only delays the hold.
pub fn count_logon_failure(spool: &Spool, account: &str) -> u32 {
    let path = logon_path(spool, account);
    let n = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok())
        .unwrap_or(0)
        .saturating_add(1);
    let tmp = path.with_extension("logon.tmp");
    let _ = durable::replace(
        &path,
        &tmp,
        n.to_string().as_bytes(),
        &durable::options(0o600),
    );
    n
}

/// Forgets the account's mailbox logon failures (a message went out, or it was held).
pub fn clear_logon_failures(spool: &Spool, account: &str) {
    let _ = std::fs::remove_file(logon_path(spool, account));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logon_failures_add_up_across_calls_and_clear() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path());
        std::fs::create_dir_all(spool.state()).unwrap();
        assert_eq!(count_logon_failure(&spool, "app"), 1);
        assert_eq!(count_logon_failure(&spool, "app"), 2);
        assert_eq!(count_logon_failure(&spool, "other"), 1);
        clear_logon_failures(&spool, "app");
        assert_eq!(count_logon_failure(&spool, "app"), 1);
    }
}
