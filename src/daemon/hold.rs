//! The account hold: an account stopped for a problem only an administrator can fix
//! (bad credentials, SMTP AUTH disabled, mailbox blocked), kept in `state/<account>.hold`
//! so that the daemon, `relay365 flush` and `relay365 account release` agree.
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
