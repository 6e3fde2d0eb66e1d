//! `relay365 quota` for an account whose ledger is a fleet's (`quota_store`): the
//! fleet's windows, each host's share of them, the waiting line, the freeze every host
//! honours; or, when the store does not answer, why, and this host's local share.
//!
//! Trusts the configuration and the store's answers as `crate::quota::redis` parsed
//! them; the store password comes from the secrets file and is never printed.

use std::io::Write;
use std::time::SystemTime;

use crate::config::Account;
use crate::config::store::{STORE_SECRETS_TABLE, StoreSettings};
use crate::quota::Usage;
use crate::quota::redis::Fleet;
use crate::secrets::{Secret, Secrets};

/// The store password from the secrets file (or systemd credentials), if any.
pub fn store_password(config: &crate::config::Config) -> Result<Option<Secret>, String> {
    let creds = std::env::var_os("CREDENTIALS_DIRECTORY").map(std::path::PathBuf::from);
    if creds.is_none() && !config.secrets_file.exists() {
        return Ok(None);
    }
    let secrets =
        Secrets::load(&config.secrets_file, creds.as_deref()).map_err(|e| e.to_string())?;
    Ok(secrets
        .for_account(STORE_SECRETS_TABLE)
        .and_then(|s| s.password().cloned()))
}

/// Prints the fleet's view of `account`; `thaw` first ends the freeze of every host.
/// Returns the usage printed (the fleet's, or the local share's).
pub fn show(
    out: &mut dyn Write,
    fleet: &mut Fleet,
    settings: &StoreSettings,
    account: &Account,
    thaw: bool,
) -> Result<Usage, String> {
    let now = SystemTime::now();
    if thaw {
        fleet.thaw(&account.limits).map_err(|e| e.to_string())?;
        let _ = writeln!(out, "account {}: freeze ended on every host", account.name);
    }
    match fleet.fleet_usage(now, &account.limits) {
        Ok(f) => {
            let _ = writeln!(
                out,
                "  store:      {} shared by the fleet (fleet_size = {}, this host is {}), clock offset {} ms, {} waiting",
                settings.url, settings.fleet_size, settings.host, f.offset_ms, f.waiting
            );
            for h in &f.hosts {
                let _ = writeln!(
                    out,
                    "  host {:<12} {} messages in the {} window, {} recipients in the {} window",
                    h.host,
                    h.messages,
                    account.limits.message_rate.window_text(),
                    h.recipients,
                    account.limits.recipient_rate.window_text()
                );
            }
            Ok(f.usage)
        }
        Err(e) => {
            let _ = writeln!(
                out,
                "  store:      {} UNREACHABLE: {e}\n  while it is, each host keeps to 1/{} of each limit in its local ledger; this host's local share:",
                settings.url, settings.fleet_size
            );
            let usage = fleet
                .local_usage(now, &account.limits)
                .map_err(|e| e.to_string())?;
            let _ = writeln!(
                out,
                "  local:      {} messages, {} recipients counted (the fleet's last known use included)",
                usage.messages_in_window, usage.recipients_in_window
            );
            Ok(usage)
        }
    }
}
