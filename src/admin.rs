//! The `relay365` command line (clap): the daemon, queue and account commands an
//! administrator runs. Thin: each subcommand calls into the module that owns it.
//!
//! Trusts its caller as far as the file system does: it runs as root, the daemon's
//! user, or (tests, demo) a user with a private spool named by `--config`.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand};

mod fleet;
mod flush;
mod health;
mod quota;

use crate::config::Config;
use crate::daemon::engine::{self, Engine};
use crate::daemon::hold::hold_path;
use crate::logging::Log;
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
    /// Run the network SMTP listener in the foreground (systemd runs it as user
    /// relay365-listen from relay365-listen.socket); see relay365-listen(8).
    Listen,
    /// Manage the listener's AUTH users (passwords hashed; `add` reads it from stdin).
    ListenerUser {
        #[command(subcommand)]
        action: ListenerUserAction,
    },
    /// Deliver the whole queue once, in the foreground, and exit: 0 when the queue is
    /// empty afterwards, 75 (EX_TEMPFAIL) when mail is left. Silent unless -v or a
    /// problem needs the administrator.
    Flush {
        /// Instead, ask the running daemon to retry the whole queue now.
        #[arg(long)]
        wake: bool,
        /// Print the log and a summary.
        #[arg(long, short = 'v')]
        verbose: bool,
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
        /// One JSON object per account and line (schema in relay365(8)).
        #[arg(long)]
        json: bool,
    },
    /// Print the metrics in the Prometheus text format (node_exporter textfile).
    Metrics,
    /// One line and an exit status for Nagios, Icinga or Zabbix: 0 OK, 1 WARNING,
    /// 2 CRITICAL, 3 UNKNOWN.
    Health {
        /// WARNING when the oldest message has waited this long.
        #[arg(long, default_value = "1h", value_parser = span)]
        warn: Duration,
        /// CRITICAL when the oldest message has waited this long.
        #[arg(long, default_value = "4h", value_parser = span)]
        crit: Duration,
        /// WARNING when an account's credential_expires is this close.
        #[arg(long, default_value = "30d", value_parser = span)]
        expiry_warn: Duration,
        /// CRITICAL when an account's credential_expires is this close.
        #[arg(long, default_value = "7d", value_parser = span)]
        expiry_crit: Duration,
        /// This host runs no daemon (relay365 flush from cron): do not require one.
        #[arg(long)]
        no_daemon: bool,
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
enum ListenerUserAction {
    /// Add a user, or replace its password; the password is read from standard input.
    Add {
        name: String,
        /// An envelope sender (pattern) this user may use; repeat for more. Default: any.
        #[arg(long = "allowed-sender", value_name = "PATTERN")]
        allowed_senders: Vec<String>,
        /// The [[account]] that sends this user's mail.
        #[arg(long)]
        account: Option<String>,
    },
    /// Remove a user.
    Remove { name: String },
    /// List the users (names and restrictions, never the hashes).
    List,
}

#[derive(Debug, Subcommand)]
enum QueueAction {
    /// List queued messages as mailq does.
    List {
        /// One JSON object per message and line, as Postfix's postqueue -j (schema
        /// in relay365(8)).
        #[arg(long)]
        json: bool,
    },
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

fn span(s: &str) -> Result<Duration, String> {
    crate::config::Span::parse(s).map(|s| s.0)
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
    if let Command::Listen = cli.command {
        return crate::listen::main(&cli.config);
    }
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            if let Command::Health { .. } = cli.command {
                let r = health::unknown(&e.to_string());
                println!("{}", r.line);
                return r.status.exit();
            }
            say(&e);
            return e.exit();
        }
    };
    let spool = Spool::new(&config.spool_dir);
    match cli.command {
        Command::Daemon | Command::Listen => Exit::Software,
        Command::ListenerUser { action } => listener_user(&config, action),
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
        Command::Flush { wake: true, .. } => wake(&spool),
        Command::Flush { verbose, .. } => flush::run(&cli.config, &spool, verbose),
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
        Command::Quota {
            thaw,
            reset_ledger,
            json,
        } => quota::run(&config, &spool, thaw, reset_ledger, json),
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
        Command::Metrics => {
            let text =
                crate::daemon::metrics::render(&config, &spool, std::time::SystemTime::now());
            match std::io::stdout().write_all(text.as_bytes()) {
                Ok(()) => Exit::Ok,
                Err(_) => Exit::IoErr,
            }
        }
        Command::Health {
            warn,
            crit,
            expiry_warn,
            expiry_crit,
            no_daemon,
        } => {
            let t = health::Thresholds {
                warn_age: warn,
                crit_age: crit,
                expiry_warn,
                expiry_crit,
                no_daemon,
            };
            let r = health::check(&config, &t, std::time::SystemTime::now());
            println!("{}", r.line);
            r.status.exit()
        }
    }
}

fn listener_user(config: &Config, action: ListenerUserAction) -> Exit {
    use crate::listen::users;
    let done = match action {
        ListenerUserAction::Add {
            name,
            allowed_senders,
            account,
        } => users::add(
            config,
            &name,
            allowed_senders,
            account,
            std::io::stdin().lock(),
        ),
        ListenerUserAction::Remove { name } => users::remove(config, &name),
        ListenerUserAction::List => {
            users::list(config, &mut std::io::stdout().lock()).map(|()| String::new())
        }
    };
    match done {
        Ok(m) if m.is_empty() => Exit::Ok,
        Ok(m) => {
            println!("{m}");
            Exit::Ok
        }
        Err(e) => {
            say(&e);
            e.exit()
        }
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
    let mut engine = match Engine::start(config_path, Log::open("relay365/daemon", true)) {
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

fn wake(spool: &Spool) -> Exit {
    let path = spool.trigger();
    match trigger::wake(&path, trigger::FORCED_RUN) {
        Ok(()) => Exit::Ok,
        Err(e) => {
            let e = WakeError::from_io(&path, e);
            say(&e);
            e.exit()
        }
    }
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
        QueueAction::List { json } => {
            let entries = listing::list(spool);
            let text = if json {
                listing::json_lines(&entries)
            } else {
                listing::format(&entries)
            };
            let _ = std::io::stdout().write_all(text.as_bytes());
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
