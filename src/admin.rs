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
use crate::spool::paths::{self, Entry, Group, Kind, Owner, Spool};
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
    /// Print the path table as TSV (path, kind, owner, group, octal mode), spool
    /// entries under the configured spool_dir: what the package tests compare the
    /// installed system against.
    #[command(hide = true)]
    Paths,
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
        Command::Paths => {
            let _ = std::io::stdout().write_all(paths_tsv(&spool).as_bytes());
            Exit::Ok
        }
        Command::Queue {
            action: QueueAction::List,
        } => {
            let _ = std::io::stdout().write_all(listing::format(&listing::list(&spool)).as_bytes());
            Exit::Ok
        }
    }
}

/// The path table, spool first, as `path\tkind\towner\tgroup\tmode` lines.
fn paths_tsv(spool: &Spool) -> String {
    let row = |path: &std::path::Path, e: &Entry| {
        let kind = match e.kind {
            Kind::Dir => "dir",
            Kind::Fifo => "fifo",
            Kind::File => "file",
        };
        let owner = match e.owner {
            Owner::Root => "root",
            Owner::Daemon => paths::DAEMON_USER,
        };
        let group = match e.group {
            Group::Root => "root",
            Group::Daemon => paths::DAEMON_USER,
            Group::Drop => paths::DROP_GROUP,
        };
        format!(
            "{}\t{kind}\t{owner}\t{group}\t{:04o}\n",
            path.display(),
            e.mode
        )
    };
    let spool_rows = paths::SPOOL_TABLE
        .iter()
        .map(|e| row(&spool.join(e.path), e));
    let installed = paths::INSTALLED_TABLE
        .iter()
        .map(|e| row(std::path::Path::new(e.path), e));
    spool_rows.chain(installed).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_tsv_lists_every_entry_with_absolute_paths() {
        let tsv = paths_tsv(&Spool::new("/var/spool/relay365"));
        let lines: Vec<&str> = tsv.lines().collect();
        assert_eq!(
            lines.len(),
            paths::SPOOL_TABLE.len() + paths::INSTALLED_TABLE.len()
        );
        assert!(
            lines.contains(&"/var/spool/relay365/incoming/tmp\tdir\trelay365\trelay365-drop\t1730")
        );
        assert!(lines.contains(&"/usr/sbin/sendmail\tfile\troot\trelay365-drop\t2755"));
        assert!(
            lines
                .iter()
                .all(|l| l.starts_with('/') && l.split('\t').count() == 5)
        );
    }
}
