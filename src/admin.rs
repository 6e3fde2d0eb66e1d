//! The `relay365` command line (clap): the daemon, queue and account commands an
//! administrator runs. Thin: each subcommand calls into the module that owns it.
//!
//! Trusts its caller as far as the file system does: it runs as root, the daemon's
//! user, or (tests, demo) a user with a private spool named by `--config`.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::daemon::engine::{self, Engine};
use crate::daemon::hold::{hold_path, read_hold};
use crate::logging::Log;
use crate::quota::{Ledger, Store, format_moment};

mod fleet;
use crate::spool::paths::{self, Spool};
use crate::spool::queue::Queue;
use crate::spool::trigger::{self, WakeError};
use crate::spool::{QueueId, init, listing};
use crate::sysexits::{Exit, ExitStatus};

#[derive(Debug, Parser)]
#[command(
    name = "relay365",
    version,
    about = "Queue mail for Microsoft 365 and deliver it within the mailbox quotas"
)]
struct Cli {
    /// The configuration file.
    #[arg(long, short = 'c', global = true, default_value = paths::CONFIG_FILE)]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the delivery daemon in the foreground (systemd runs it as user relay365).
    Daemon,
    /// Deliver everything due once, in the foreground, and exit.
    Flush {
        /// Instead, ask the running daemon to retry the whole queue now.
        #[arg(long)]
        wake: bool,
    },
    /// Check config, secrets and spool, then connect and authenticate; sends nothing.
    Check,
    /// Show each account's quota windows, holds and freezes.
    Quota {
        /// End a server-verdict freeze of this account.
        #[arg(long, value_name = "ACCOUNT")]
        thaw: Option<String>,
        /// Replace a corrupt ledger of this account (counts a full window as used).
        #[arg(long, value_name = "ACCOUNT")]
        reset_ledger: Option<String>,
    },
    /// Manage an account.
    Account {
        #[command(subcommand)]
        action: AccountAction,
    },
    /// Inspect and manage the queue.
    Queue {
        #[command(subcommand)]
        action: QueueAction,
    },
    /// Print the path table as TSV (path, kind, owner, group, octal mode), spool
    /// entries under the configured spool_dir: what the package tests compare the
    /// installed system against.
    #[command(hide = true)]
    Paths,
    /// Create the spool directories with the owners and modes of the path table.
    Init {
        /// Leave everything owned by the calling user (a private spool for tests and
        /// demos) instead of the relay365 user and group.
        #[arg(long)]
        private: bool,
    },
}

#[derive(Debug, Subcommand)]
enum AccountAction {
    /// Release an account held for a credentials or policy problem.
    Release { name: String },
}

#[derive(Debug, Subcommand)]
enum QueueAction {
    /// List queued messages as mailq does.
    List,
    /// Show a message's envelope, recipient states and headers.
    Show { id: String },
    /// Keep a message from being delivered until released.
    Hold { id: String },
    /// Release a held message.
    Release { id: String },
    /// Delete a message without delivering or bouncing it.
    Delete { id: String },
    /// Make a message (or, with no id, every message) due now.
    Retry { id: Option<String> },
}

fn say(message: impl std::fmt::Display) {
    let _ = writeln!(std::io::stderr(), "relay365: {message}");
}

/// Runs `relay365` with the process's argv.
pub fn main(argv: Vec<OsString>) -> Exit {
    let cli = match Cli::try_parse_from(argv) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                Exit::Usage
            } else {
                Exit::Ok
            };
        }
    };
    // The daemon blocks its signals before any thread (or config load) starts.
    if let Command::Daemon = cli.command {
        return daemon(&cli.config);
    }
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            say(&e);
            return e.exit();
        }
    };
    let spool = Spool::new(&config.spool_dir);
    match cli.command {
        Command::Daemon => Exit::Software,
        Command::Init { private } => match init::init(&spool, !private) {
            Ok(()) => Exit::Ok,
            Err(e) => {
                say(e);
                Exit::CantCreat
            }
        },
        Command::Paths => {
            let _ = std::io::stdout().write_all(paths::table_tsv(&spool).as_bytes());
            Exit::Ok
        }
        Command::Flush { wake: true } => wake(&spool),
        Command::Flush { wake: false } => flush(&cli.config),
        Command::Check => {
            let findings = crate::daemon::check::check(&config);
            let mut out = std::io::stdout().lock();
            let mut all_ok = true;
            for f in &findings {
                all_ok &= f.ok;
                let _ = writeln!(out, "{} {}", if f.ok { "ok:  " } else { "FAIL:" }, f.text);
            }
            if all_ok { Exit::Ok } else { Exit::Config }
        }
        Command::Quota { thaw, reset_ledger } => quota(&config, &spool, thaw, reset_ledger),
        Command::Account {
            action: AccountAction::Release { name },
        } => {
            if !config.accounts.iter().any(|a| a.name == name) {
                say(format_args!(
                    "no account named {name:?} in {}",
                    config.path.display()
                ));
                return Exit::Usage;
            }
            match std::fs::remove_file(hold_path(&spool, &name)) {
                Ok(()) => {
                    println!("account {name} released; run relay365 flush --wake to retry now");
                    Exit::Ok
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    println!("account {name} is not held");
                    Exit::Ok
                }
                Err(e) => {
                    say(e);
                    Exit::IoErr
                }
            }
        }
        Command::Queue { action } => queue(&spool, action),
    }
}

fn daemon(config_path: &Path) -> Exit {
    let signals = match engine::signal_fd() {
        Ok(s) => s,
        Err(e) => {
            say(&e);
            return e.exit();
        }
    };
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            say(&e);
            return e.exit();
        }
    };
    let _lock = match engine::daemon_lock(&Spool::new(&config.spool_dir)) {
        Ok(l) => l,
        Err(e) => {
            say(&e);
            return e.exit();
        }
    };
    let mut engine = match Engine::start(config_path, Log::open("relay365", true)) {
        Ok(e) => e,
        Err(e) => {
            say(&e);
            return e.exit();
        }
    };
    match engine.run(config_path, &signals) {
        Ok(()) => Exit::Ok,
        Err(e) => {
            say(&e);
            e.exit()
        }
    }
}

fn flush(config_path: &Path) -> Exit {
    let mut engine = match Engine::start(config_path, Log::open("relay365/flush", true)) {
        Ok(e) => e,
        Err(e) => {
            say(&e);
            return e.exit();
        }
    };
    engine.flush();
    println!(
        "flush: {} message(s) finished, {} deferred",
        engine.delivered, engine.deferred
    );
    Exit::Ok
}

fn wake(spool: &Spool) -> Exit {
    let path = spool.trigger();
    match trigger::wake(&path) {
        Ok(()) => Exit::Ok,
        Err(e) => {
            let e = WakeError::from_io(&path, e);
            say(&e);
            e.exit()
        }
    }
}

fn quota(config: &Config, spool: &Spool, thaw: Option<String>, reset: Option<String>) -> Exit {
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
        let _ = writeln!(out, "account {} <{}>", a.name, a.mailbox);
        let usage = if let Some(settings) = &config.quota_store {
            let password = match fleet::store_password(config) {
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
            match fleet::show(&mut out, &mut store, settings, a, thaw_it) {
                Ok(u) => u,
                Err(e) => {
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
        if let Some(h) = read_hold(spool, &a.name) {
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

fn queue(spool: &Spool, action: QueueAction) -> Exit {
    let q = Queue::new(spool);
    let parse = |id: &str| QueueId::parse(id).map_err(say);
    let edit = |id: &str, f: &dyn Fn(&mut crate::spool::queue::QueueEntry)| -> Exit {
        let Ok(id) = parse(id) else {
            return Exit::Usage;
        };
        match q.lock(&id) {
            Ok(Some(mut l)) => {
                f(&mut l.entry);
                match q.update(&l.entry) {
                    Ok(()) => Exit::Ok,
                    Err(e) => {
                        say(e);
                        Exit::IoErr
                    }
                }
            }
            Ok(None) if q.contains(&id) => {
                say(format_args!(
                    "{id} is being delivered right now; try again in a moment"
                ));
                Exit::TempFail
            }
            Ok(None) => {
                say(format_args!("no message {id} in the queue"));
                Exit::NoInput
            }
            Err(e) => {
                say(e);
                Exit::IoErr
            }
        }
    };
    match action {
        QueueAction::List => {
            let _ = std::io::stdout().write_all(listing::format(&listing::list(spool)).as_bytes());
            Exit::Ok
        }
        QueueAction::Show { id } => {
            let Ok(id) = parse(&id) else {
                return Exit::Usage;
            };
            match (q.read(&id), std::fs::read(q.msg_path(&id))) {
                (Ok(entry), Ok(msg)) => {
                    let json = serde_json::to_string_pretty(&entry).unwrap_or_default();
                    let head_end = msg
                        .windows(4)
                        .position(|w| w == b"\r\n\r\n")
                        .map_or(msg.len(), |p| p + 2);
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "*** ENVELOPE ***\n{json}\n*** HEADERS ***");
                    let _ = out.write_all(&msg[..head_end]);
                    Exit::Ok
                }
                _ => {
                    say(format_args!("no message {id} in the queue"));
                    Exit::NoInput
                }
            }
        }
        QueueAction::Hold { id } => edit(&id, &|e| e.held = true),
        QueueAction::Release { id } => edit(&id, &|e| {
            e.held = false;
            e.next_attempt_us = 0;
        }),
        QueueAction::Retry { id: Some(id) } => edit(&id, &|e| e.next_attempt_us = 0),
        QueueAction::Retry { id: None } => {
            let Ok(ids) = q.ids() else { return Exit::IoErr };
            for id in ids {
                if let Ok(Some(mut l)) = q.lock(&id) {
                    l.entry.next_attempt_us = 0;
                    let _ = q.update(&l.entry);
                }
            }
            Exit::Ok
        }
        QueueAction::Delete { id } => {
            let Ok(id) = parse(&id) else {
                return Exit::Usage;
            };
            match q.lock(&id) {
                Ok(Some(_l)) => match q.remove(&id) {
                    Ok(()) => {
                        println!("{id}: deleted");
                        Exit::Ok
                    }
                    Err(e) => {
                        say(e);
                        Exit::IoErr
                    }
                },
                Ok(None) => {
                    say(format_args!(
                        "no message {id} in the queue, or it is being delivered"
                    ));
                    Exit::NoInput
                }
                Err(e) => {
                    say(e);
                    Exit::IoErr
                }
            }
        }
    }
}
