//! `relay365 quota`: each account's windows, freezes and holds, as text or as JSON
//! (`--json`, one object per account and line, schema in relay365(8)); `--thaw` and
//! `--reset-ledger` act on one account first.
//!
//! Trusts the config; the ledgers and hold files are the daemon's own.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::{Account, Config};
use crate::daemon::hold::{Hold, read_hold};
use crate::quota::{Ledger, Store, Usage, format_moment};
use crate::spool::paths::Spool;
use crate::sysexits::Exit;

fn say(message: impl std::fmt::Display) {
    let _ = writeln!(std::io::stderr(), "relay365: {message}");
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// One account as a JSON object: what the text shows, in numbers (times in seconds
/// since the epoch; a limit of null is no limit).
pub fn json_line(a: &Account, usage: &Usage, hold: Option<&Hold>) -> serde_json::Value {
    let window = |rate: &crate::config::limits::Rate,
                  used: u64,
                  left: Option<u64>,
                  room: Option<SystemTime>| {
        serde_json::json!({
            "used": used,
            "limit": (rate.count > 0).then_some(rate.count),
            "window_seconds": rate.window.as_secs(),
            "left": left,
            "room_at": room.map(secs),
        })
    };
    let mut recipients = window(
        &usage.recipient_rate,
        usage.recipients_in_window,
        usage.recipients_left,
        usage.next_recipient_room,
    );
    if let Some(m) = recipients.as_object_mut() {
        m.insert("reserve".into(), usage.reserve.into());
    }
    serde_json::json!({
        "account": a.name,
        "mailbox": a.mailbox,
        "messages": window(
            &usage.message_rate,
            usage.messages_in_window,
            usage.messages_left,
            usage.next_message_room,
        ),
        "recipients": recipients,
        "frozen": usage.frozen.as_ref().map(|f| serde_json::json!({
            "until": secs(f.until),
            "reason": f.reason,
        })),
        "held": hold.map(|h| serde_json::json!({
            "next_probe": h.until_us / 1_000_000,
            "reason": h.reason,
        })),
    })
}

pub fn run(
    config: &Config,
    spool: &Spool,
    thaw: Option<String>,
    reset: Option<String>,
    json: bool,
) -> Exit {
    let now = SystemTime::now();
    let mut out = std::io::stdout().lock();
    for a in &config.accounts {
        let path = spool.ledger(&a.name);
        if reset.as_deref() == Some(&a.name) {
            match Ledger::reset(&path, now, &a.limits) {
                Ok(kept) => {
                    let _ = writeln!(
                        out,
                        "account {}: ledger reset{}",
                        a.name,
                        kept.map(|p| format!(" (old one kept as {})", p.display()))
                            .unwrap_or_default()
                    );
                }
                Err(e) => {
                    say(e);
                    return Exit::IoErr;
                }
            }
        }
        if !json {
            let _ = writeln!(out, "account {} <{}>", a.name, a.mailbox);
        }
        let usage = if let Some(settings) = &config.quota_store {
            // The fleet's view (issue 16): the shared windows and each host's share.
            let password = match super::fleet::store_password(config) {
                Ok(p) => p,
                Err(e) => {
                    say(e);
                    return Exit::Config;
                }
            };
            let opened = Store::open(&path, Some(settings), password, &a.mailbox, None);
            let mut store = match opened {
                Ok(Store::Fleet(f)) => f,
                Ok(Store::Local(_)) => return Exit::Software,
                Err(e) => {
                    say(format_args!("account {}: {e}", a.name));
                    return Exit::IoErr;
                }
            };
            let thaw_it = thaw.as_deref() == Some(&a.name);
            // JSON keeps to one object per account: the fleet's text goes nowhere.
            let mut text: Box<dyn Write> = if json {
                Box::new(std::io::sink())
            } else {
                Box::new(&mut out)
            };
            match super::fleet::show(&mut *text, &mut store, settings, a, thaw_it) {
                Ok(u) => u,
                Err(e) => {
                    drop(text);
                    say(format_args!("account {}: {e}", a.name));
                    return Exit::IoErr;
                }
            }
        } else {
            let mut ledger = match Ledger::open(&path) {
                Ok(l) => l,
                Err(e) => {
                    say(format_args!("account {}: {e}", a.name));
                    return Exit::IoErr;
                }
            };
            if thaw.as_deref() == Some(&a.name) {
                if let Err(e) = ledger.thaw() {
                    say(e);
                    return Exit::IoErr;
                }
                let _ = writeln!(out, "account {}: freeze ended", a.name);
            }
            match ledger.usage(now, &a.limits) {
                Ok(u) => u,
                Err(e) => {
                    say(format_args!("account {}: {e}", a.name));
                    return Exit::IoErr;
                }
            }
        };
        let hold = read_hold(spool, &a.name);
        if json {
            let _ = writeln!(out, "{}", json_line(a, &usage, hold.as_ref()));
            continue;
        }
        let left = |n: Option<u64>| n.map_or("unlimited".to_string(), |n| n.to_string());
        let _ = writeln!(
            out,
            "  messages:   {}/{} in {} window, {} left{}",
            usage.messages_in_window,
            usage.message_rate.count,
            usage.message_rate.window_text(),
            left(usage.messages_left),
            usage
                .next_message_room
                .map(|t| format!(", room at {}", format_moment(t, now)))
                .unwrap_or_default()
        );
        let _ = writeln!(
            out,
            "  recipients: {}/{} in {} window, {} left{}",
            usage.recipients_in_window,
            usage.recipient_rate.count,
            usage.recipient_rate.window_text(),
            left(usage.recipients_left),
            usage
                .next_recipient_room
                .map(|t| format!(", room at {}", format_moment(t, now)))
                .unwrap_or_default()
        );
        if let Some(f) = &usage.frozen {
            let _ = writeln!(
                out,
                "  frozen until {}: {}",
                format_moment(f.until, now),
                f.reason
            );
        }
        if let Some(h) = hold {
            let until = std::time::UNIX_EPOCH + std::time::Duration::from_micros(h.until_us);
            let _ = writeln!(
                out,
                "  held (next probe {}): {}",
                format_moment(until, now),
                h.reason
            );
        }
    }
    Exit::Ok
}
