//! `relay365 quota`: each account's windows, freezes and holds, as text or as JSON
//! (`--json`, one object per account and line, schema in relay365(8)); `--thaw` and
//! `--reset-ledger` act on one account first.
//!
//! Trusts the config; the ledgers and hold files are the daemon's own.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::{Account, Config};
use crate::daemon::hold::{Hold, read_hold};
use crate::quota::{Ledger, Usage, format_moment};
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
        &a.limits.recipient_rate,
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
            &a.limits.message_rate,
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
        let usage = match ledger.usage(now, &a.limits) {
            Ok(u) => u,
            Err(e) => {
                say(format_args!("account {}: {e}", a.name));
                return Exit::IoErr;
            }
        };
        let hold = read_hold(spool, &a.name);
        if json {
            let _ = writeln!(out, "{}", json_line(a, &usage, hold.as_ref()));
            continue;
        }
        let left = |n: Option<u64>| n.map_or("unlimited".to_string(), |n| n.to_string());
        let _ = writeln!(out, "account {} <{}>", a.name, a.mailbox);
        let _ = writeln!(
            out,
            "  messages:   {}/{} in {} window, {} left{}",
            usage.messages_in_window,
            a.limits.message_rate.count,
            a.limits.message_rate.window_text(),
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
            a.limits.recipient_rate.count,
            a.limits.recipient_rate.window_text(),
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
