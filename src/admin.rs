//! The `relay365` command line (clap): the daemon, queue and account commands an
//! administrator runs. Thin: each subcommand calls into the module that owns it.
//!
//! Trusts its caller as far as the file system does: it runs as root, the daemon's
//! user, or (tests, demo) a user with a private spool named by `--config`.

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::spool::paths::{self, Spool};
use crate::spool::{init, listing};
use crate::sysexits::Exit;

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
    /// Create the spool directories with the owners and modes of the path table.
    Init {
        /// Leave everything owned by the calling user (a private spool for tests and
        /// demos) instead of the relay365 user and group.
        #[arg(long)]
        private: bool,
    },
    /// Inspect and manage the queue.
    Queue {
        #[command(subcommand)]
        action: QueueAction,
    },
}

#[derive(Debug, Subcommand)]
enum QueueAction {
    /// List queued messages as mailq does.
    List,
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
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            say(e);
            return Exit::Config;
        }
    };
    let spool = Spool::new(&config.spool_dir);
    match cli.command {
        Command::Init { private } => match init::init(&spool, !private) {
            Ok(()) => Exit::Ok,
            Err(e) => {
                say(e);
                Exit::CantCreat
            }
        },
        Command::Queue {
            action: QueueAction::List,
        } => {
            let _ = std::io::stdout().write_all(listing::format(&listing::list(&spool)).as_bytes());
            Exit::Ok
        }
    }
}
