//! What `sendmail` (and `mailq`, `newaliases`) does with its command line: the
//! orchestration behind the thin `main` in `src/bin/sendmail.rs`.
//!
//! Order matters for security: sanitise the process, lower the setgid group, then
//! parse anything. The group is raised only inside [`crate::spool::incoming`] and for
//! the trigger FIFO.

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::time::SystemTime;

use crate::config::Config;
use crate::logging::Log;
use crate::spool::paths::{self, Spool};
use crate::spool::{QueueId, incoming, listing};
use crate::sysexits::Exit;

use super::intake::{self, Caller, IntakeSettings};
use super::options::{self, Mode, Options};
use super::privilege::{self, DropGroup};

/// Prints `sendmail: <message>` on stderr.
fn say(message: impl std::fmt::Display) {
    let _ = writeln!(std::io::stderr(), "sendmail: {message}");
}

/// Runs sendmail with the process's argv and returns its exit status.
pub fn main(argv: Vec<OsString>) -> Exit {
    privilege::sanitise_process();
    let mut group = match DropGroup::acquire() {
        Ok(g) => g,
        Err(e) => {
            say(e);
            return Exit::OsErr;
        }
    };
    let argv0 = argv.first().map_or_else(
        || "sendmail".to_string(),
        |a| a.to_string_lossy().into_owned(),
    );
    let args = argv.get(1..).unwrap_or(&[]);
    let opts = match options::parse(&argv0, args) {
        Ok(o) => o,
        Err(e) => {
            say(format_args!("{e} (see relay365-sendmail(8))"));
            return Exit::Usage;
        }
    };
    for w in &opts.warnings {
        say(format_args!("warning: {w}"));
    }
    let uid = privilege::caller_uid();
    let config_path = match &opts.config {
        Some(p) => {
            if uid != 0 {
                // SECURITY: a caller's own config may name any spool; honour it only
                // once this process can do nothing the caller could not do alone.
                if let Err(e) = group.drop_permanently() {
                    say(e);
                    return Exit::OsErr;
                }
            }
            p.clone()
        }
        None => PathBuf::from(paths::CONFIG_FILE),
    };
    let config = match Config::load(&config_path) {
        Ok(c) => c,
        Err(e) => {
            say(e);
            return Exit::Config;
        }
    };
    let spool = Spool::new(&config.spool_dir);
    match &opts.mode {
        Mode::RebuildAliases => Exit::Ok,
        Mode::Refused(opt) => {
            say(format_args!(
                "{opt} is not supported: relay365 is a null client that only queues mail for Microsoft 365"
            ));
            Exit::Usage
        }
        Mode::Smtp => {
            say(
                "-bs (SMTP on standard input) is not supported yet: use -t, or give the recipients as arguments",
            );
            Exit::Usage
        }
        Mode::ListQueue => list_queue(&spool),
        Mode::QueueRun => queue_run(&spool, &group),
        Mode::Verify => verify(&opts, &config, uid),
        Mode::Deliver => deliver(&opts, &config, &spool, &group, uid),
    }
}

fn list_queue(spool: &Spool) -> Exit {
    let mut out = std::io::stdout().lock();
    if out
        .write_all(listing::format(&listing::list(spool)).as_bytes())
        .is_err()
    {
        return Exit::IoErr;
    }
    Exit::Ok
}

fn queue_run(spool: &Spool, group: &DropGroup) -> Exit {
    use std::os::unix::fs::OpenOptionsExt;
    let path = spool.trigger();
    // SECURITY: non-blocking, no O_CREAT, no symlinks: only an existing FIFO with a
    // reader (the daemon) can be opened for writing this way.
    let opened = group.with(|| {
        std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOFOLLOW)
            .open(&path)
    });
    match opened.and_then(|mut f| f.write_all(b"q")) {
        Ok(()) => Exit::Ok,
        Err(e) if e.raw_os_error() == Some(nix::libc::ENXIO) => {
            say(
                "the relay365 daemon is not running, so nobody can retry the queue now: start it (systemctl start relay365) or run relay365 flush",
            );
            Exit::Unavailable
        }
        Err(e) => {
            say(format_args!(
                "cannot wake the relay365 daemon through {}: {e}",
                path.display()
            ));
            Exit::Unavailable
        }
    }
}

fn verify(opts: &Options, config: &Config, uid: u32) -> Exit {
    let caller = Caller::lookup(uid);
    let mut out = std::io::stdout().lock();
    match intake::envelope_sender(opts, &caller, &config.domain) {
        Ok(s) => {
            let _ = writeln!(out, "sender <{s}>");
        }
        Err(e) => {
            say(e);
            return Exit::NoUser;
        }
    }
    let mut status = Exit::Ok;
    for arg in &opts.recipients {
        match crate::message::address::parse_argument(arg) {
            Ok(list) => {
                for a in list {
                    let how = if a.is_qualified() {
                        "as given"
                    } else {
                        "qualified with the configured domain"
                    };
                    match a.clone().qualify(&config.domain) {
                        Ok(q) => {
                            let _ = writeln!(
                                out,
                                "{a} -> <{q}> ({how}): deliverable through Microsoft 365"
                            );
                        }
                        Err(e) => {
                            let _ = writeln!(out, "{arg}: undeliverable: {e}");
                            status = Exit::NoUser;
                        }
                    }
                }
            }
            Err(e) => {
                let _ = writeln!(out, "{arg}: undeliverable: {e}");
                status = Exit::NoUser;
            }
        }
    }
    status
}

fn deliver(opts: &Options, config: &Config, spool: &Spool, group: &DropGroup, uid: u32) -> Exit {
    let max = config.max_message_size.0;
    let raw = match intake::read_message(std::io::stdin().lock(), opts.ignore_dots, max) {
        Ok(r) => r,
        Err(e) => {
            say(&e);
            return e.exit();
        }
    };
    let caller = Caller::lookup(uid);
    let now = SystemTime::now();
    let id = QueueId::generate(now);
    let settings = IntakeSettings {
        domain: &config.domain,
        max_message_size: max,
    };
    let submission = match intake::build(opts, &settings, &caller, &raw, now, &id) {
        Ok(s) => s,
        Err(e) => {
            say(&e);
            return e.exit();
        }
    };
    let bytes = submission.envelope.to_file_bytes(&submission.message);
    let tag = opts.log_tag.as_deref().unwrap_or("relay365/sendmail");
    let mut log = Log::open(tag, false);
    match incoming::deposit(spool, group, &id, &bytes) {
        Ok(_) => {
            let env = &submission.envelope;
            log.info(&format!(
                "{id}: uid={uid} from=<{}> size={} nrcpt={}",
                env.sender,
                env.size,
                env.recipients.len()
            ));
            if opts.verbose {
                say(format_args!(
                    "queued as {id} for {} recipient(s)",
                    env.recipients.len()
                ));
            }
            Exit::Ok
        }
        Err(e) => {
            log.error(&format!("uid={uid}: not queued: {e}"));
            say(&e);
            match e {
                incoming::SpoolError::Full { .. } | incoming::SpoolError::FileSizeLimit { .. } => {
                    Exit::TempFail
                }
                incoming::SpoolError::Unwritable { .. } => Exit::CantCreat,
                incoming::SpoolError::Io { .. } => Exit::IoErr,
            }
        }
    }
}
