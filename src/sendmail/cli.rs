//! What `sendmail` (and `mailq`, `newaliases`) does with its command line: the
//! orchestration behind the thin `main` in `src/bin/sendmail.rs`.
//!
//! Order matters for security: sanitise the process, lower the setgid group, parse
//! the command line, and give the group up for good unless the mode writes into the
//! spool (see [`Mode::needs_group`]); only then read the config or `/etc/aliases`.
//! The group is raised only inside [`super::deposit`], for the trigger FIFO, and for
//! `-bp`'s reading of the installed spool's incoming/ before the drop
//! ([`super::mailq`]).

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::time::SystemTime;

use crate::config::Config;
use crate::logging::Log;
use crate::message::text;
use crate::spool::QueueId;
use crate::spool::paths::{self, Spool};
use crate::spool::trigger::{self, WakeError};
use crate::sysexits::{Exit, ExitStatus};

use super::bs::{self, Session};
use super::deposit::{Depositor, Origin, Protocol};
use super::intake::{self, Caller, IntakeSettings};
use super::mailq;
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
            // SECURITY: a refused command line needs no privilege to be reported.
            if let Err(e) = group.drop_permanently() {
                say(e);
                return Exit::OsErr;
            }
            say(format_args!("{e} (see relay365-sendmail(8))"));
            return Exit::Usage;
        }
    };
    let uid = privilege::caller_uid();
    // SECURITY: -bp reads the installed spool's incoming/ with the group first, then
    // gives the group up with the other read-only modes below, before any config:
    // the config (which could name another spool) is never read with the group.
    // (Root reads incoming/ itself afterwards.)
    let pre_read = (opts.mode == Mode::ListQueue && opts.config.is_none() && uid != 0)
        .then(|| mailq::pre_read(&group));
    // SECURITY: read-only and refused modes give the group up for good before the
    // config or /etc/aliases is read; so does a caller's own config (-C), which may
    // name any spool, unless the caller is root.
    let own_config = opts.config.is_some() && uid != 0;
    if (!opts.mode.needs_group() || own_config)
        && let Err(e) = group.drop_permanently()
    {
        say(e);
        return Exit::OsErr;
    }
    for w in &opts.warnings {
        say(format_args!("warning: {w}"));
    }
    let (tag, refused) = log_tag(opts.log_tag.as_deref(), uid);
    if let Some(w) = refused {
        say(format_args!("warning: {w}"));
    }
    let config_path = opts
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from(paths::CONFIG_FILE));
    let config = match Config::load(&config_path) {
        Ok(c) => c,
        Err(e) => {
            let _ = group.drop_permanently();
            say(&e);
            return e.exit();
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
        Mode::Smtp => smtp_session(&opts, &config, &spool, &group, uid, &tag),
        Mode::ListQueue => mailq::list(&spool, pre_read, |m| say(m)),
        Mode::QueueRun => queue_run(&spool, &group),
        Mode::Verify => verify(&opts, &config, uid),
        Mode::Enqueue => enqueue(&opts, &config, &spool, &group, uid, &tag),
    }
}

fn queue_run(spool: &Spool, group: &DropGroup) -> Exit {
    let path = spool.trigger();
    // SECURITY: the group is raised for the open of the existing FIFO only.
    match group.with(|| trigger::wake(&path, trigger::QUEUE_RUN)) {
        Ok(()) => Exit::Ok,
        Err(e) => {
            let e = WakeError::from_io(&path, e);
            say(&e);
            e.exit()
        }
    }
}

fn verify(opts: &Options, config: &Config, uid: u32) -> Exit {
    use crate::aliases::{Aliases, Locals};
    use crate::spool::queue::RcptStatus;
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
    // The aliases file is world-readable; a problem with it is reported, not fatal.
    let aliases = match Aliases::load_if_present(&config.aliases) {
        Ok(a) => a,
        Err(e) => {
            say(format_args!("warning: {e}"));
            Aliases::default()
        }
    };
    let locals = Locals::new(config, &aliases);
    let mut status = Exit::Ok;
    for arg in &opts.recipients {
        match crate::message::address::parse_argument(arg) {
            Ok(list) => {
                for a in list {
                    // qualify re-validates: a bare name that is valid alone can be
                    // too long once the domain is added (found by fuzzing).
                    let q = match a.clone().qualify(&config.domain) {
                        Ok(q) => q,
                        Err(e) => {
                            let _ = writeln!(out, "{arg}: undeliverable: {e}");
                            status = Exit::NoUser;
                            continue;
                        }
                    };
                    for r in locals.resolve(&q) {
                        let how = match (&r.status, r.address == q.as_str(), a.is_qualified()) {
                            (RcptStatus::Failed, _, _) => {
                                status = Exit::NoUser;
                                format!("undeliverable: {}", r.reply.as_deref().unwrap_or(""))
                            }
                            (_, false, _) => {
                                "local recipient, through the aliases or admin address".to_string()
                            }
                            (_, true, false) => "qualified with the configured domain".to_string(),
                            _ => "as given".to_string(),
                        };
                        let _ = writeln!(out, "{a} -> <{}> ({how})", r.address);
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

fn enqueue(
    opts: &Options,
    config: &Config,
    spool: &Spool,
    group: &DropGroup,
    uid: u32,
    tag: &str,
) -> Exit {
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
        received: None,
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
    let mut depositor = Depositor::new(
        spool,
        group,
        Log::open(tag, false),
        Origin::Local { uid },
        Protocol::Sendmail,
    );
    match depositor.deposit(&submission) {
        Ok(()) => {
            if opts.verbose {
                say(format_args!(
                    "queued as {id} for {} recipient(s)",
                    submission.envelope.recipients.len()
                ));
            }
            Exit::Ok
        }
        Err(e) => {
            say(&e);
            e.exit()
        }
    }
}

/// The syslog tag when `-L` is not honoured.
const DEFAULT_TAG: &str = "relay365/sendmail";
/// The longest `-L` tag kept (RFC 3164 allows 32; Postfix's `-L` is not cut).
const MAX_TAG: usize = 64;

/// The syslog tag: `-L` from root, else relay365/sendmail; and the warning for a
/// caller whose `-L` was not honoured.
fn log_tag(requested: Option<&str>, uid: u32) -> (String, Option<String>) {
    match requested {
        None => (DEFAULT_TAG.to_string(), None),
        // SECURITY: the tag heads every syslog line of this run; from anyone but root
        // it would let a local user pass their lines off as another program's.
        Some(_) if uid != 0 => (
            DEFAULT_TAG.to_string(),
            Some(format!(
                "-L is honoured for root only; logging as {DEFAULT_TAG}"
            )),
        ),
        // SECURITY: a CR or LF in the tag would start a forged log line.
        Some(t) => {
            let t = text::one_line_max(t.trim(), MAX_TAG);
            if t.trim().is_empty() {
                (DEFAULT_TAG.to_string(), None)
            } else {
                (t, None)
            }
        }
    }
}

/// `-bs`: the SMTP dialogue on stdin/stdout. The envelope comes from MAIL FROM and
/// RCPT TO, so `-t`, `-f` and recipient arguments do not apply (as with Postfix).
fn smtp_session(
    opts: &Options,
    config: &Config,
    spool: &Spool,
    group: &DropGroup,
    uid: u32,
    tag: &str,
) -> Exit {
    if opts.extract || !opts.recipients.is_empty() || opts.sender.is_some() {
        say(
            "warning: -t, -f and recipient arguments are ignored with -bs: the envelope comes from MAIL FROM and RCPT TO",
        );
    }
    let caller = Caller::lookup(uid);
    let sink = Depositor::new(
        spool,
        group,
        Log::open(tag, false),
        Origin::Local { uid },
        Protocol::Esmtp,
    );
    let settings = bs::Settings {
        domain: &config.domain,
        max_message_size: config.max_message_size.0,
        max_recipients: bs::DEFAULT_MAX_RECIPIENTS,
    };
    let report = Session::new(settings, opts, &caller, sink)
        .run(std::io::stdin().lock(), std::io::stdout().lock());
    match &report.ending {
        bs::Ending::Abandoned { in_data } => say(format_args!(
            "the SMTP input ended {} without QUIT: that message was not queued; send it again",
            if *in_data {
                "in the middle of a message (no <CR><LF>.<CR><LF>; a dot ended by LF alone does not end the data)"
            } else {
                "after MAIL FROM but before the message data"
            }
        )),
        bs::Ending::Io(e) => say(format_args!(
            "SMTP session on standard input/output failed: {e}"
        )),
        bs::Ending::Quit | bs::Ending::EndOfInput | bs::Ending::Closed(_) => {}
    }
    if opts.verbose {
        say(format_args!(
            "queued {} message(s): {}",
            report.queued.len(),
            report
                .queued
                .iter()
                .map(QueueId::as_str)
                .collect::<Vec<_>>()
                .join(" ")
        ));
    }
    report.ending.exit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_tag_is_root_only_and_one_line() {
        assert_eq!(log_tag(None, 1000), (DEFAULT_TAG.to_string(), None));
        assert_eq!(log_tag(None, 0), (DEFAULT_TAG.to_string(), None));
        let (tag, warning) = log_tag(Some("myapp"), 1000);
        assert_eq!(tag, DEFAULT_TAG);
        assert!(warning.is_some_and(|w| w.contains("root only")));
        assert_eq!(log_tag(Some("myapp"), 0), ("myapp".to_string(), None));
        // A forged second line: the control characters become spaces.
        let (tag, _) = log_tag(
            Some("app\nDec  3 12:00:00 host relay365/daemon[1]: 0A: status=sent\r\x1b[2J"),
            0,
        );
        assert!(!tag.chars().any(char::is_control), "{tag:?}");
        assert!(tag.len() <= MAX_TAG + 3, "{tag:?}");
        assert_eq!(log_tag(Some("\n\t "), 0).0, DEFAULT_TAG);
        // Forged from a user: not honoured at all.
        assert_eq!(log_tag(Some("a\nb"), 33).0, DEFAULT_TAG);
    }
}
