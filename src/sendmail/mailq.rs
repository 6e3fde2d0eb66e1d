//! `mailq` and `sendmail -bp` for any user: the queue (world-readable envelopes) and
//! the messages still waiting in `incoming/` for the daemon's pickup, with whether the
//! daemon runs at all: exactly what someone wonders when they type `mailq`.
//!
//! `incoming/` is open to the drop group only, so the setgid `mailq` reads it with
//! the group before it gives the group up, and before it reads the config (which names
//! the spool): it reads the spool the package installs ([`paths::SPOOL_DIR`]) and
//! nothing else, and afterwards keeps that list only if the config names the same
//! spool. Every file there is distrusted ([`listing::read_incoming_envelope`]: no
//! symlink, a regular file with one link, a bounded size, only the envelope line,
//! validated); what is kept is addresses, sizes and times, as for the queue. The group
//! is raised for the listing of `incoming/new`, each envelope's open and read, and the
//! open of the trigger FIFO that tells whether the daemon runs (see the checklist in
//! [`super::privilege`]).

use std::io::Write;
use std::path::Path;

use crate::spool::listing::{self, Listed};
use crate::spool::paths::{self, Spool};
use crate::spool::{QueueId, trigger};
use crate::sysexits::Exit;

use super::privilege::DropGroup;

/// At most this many incoming files are read with the group raised.
const MAX_INCOMING: usize = 10_000;
/// And at most this many bytes of addresses kept from them: a user who queued many
/// messages with huge recipient lists cannot make another user's mailq take gigabytes.
const MAX_ADDRESS_BYTES: usize = 64 << 20;

/// What was read of the default spool while the group was still saved.
#[derive(Debug, Default)]
pub struct PreRead {
    /// The incoming messages, or `None` if incoming/new could not be listed.
    incoming: Option<Vec<Listed>>,
    /// Whether the daemon listens on the trigger, if that could be told.
    daemon: Option<bool>,
}

/// Reads the default spool's `incoming/new` and trigger with `group` raised for each
/// operation. Call it before [`DropGroup::drop_permanently`] and before the config.
pub fn pre_read(group: &DropGroup) -> PreRead {
    let spool = Spool::new(paths::SPOOL_DIR);
    // SECURITY: the group is raised for the open of the existing FIFO only.
    let daemon = group.with(|| trigger::has_reader(&spool.trigger())).ok();
    // SECURITY: raised for listing incoming/new, names only, bounded in number.
    let names = group.with(|| {
        let mut ids = Vec::new();
        for entry in std::fs::read_dir(spool.incoming_new())?.flatten() {
            if ids.len() >= MAX_INCOMING {
                break;
            }
            if let Some(id) = entry
                .file_name()
                .to_str()
                .and_then(|n| QueueId::parse(n).ok())
            {
                ids.push(id);
            }
        }
        Ok(ids)
    });
    let incoming = names.ok().map(|ids| {
        let dir = spool.incoming_new();
        let mut kept = 0usize;
        let mut out = Vec::new();
        for id in ids {
            if kept > MAX_ADDRESS_BYTES {
                break;
            }
            let path = dir.join(id.as_str());
            // SECURITY: raised for this one distrusting open and bounded read.
            let Some(env) = group
                .with(|| Ok(listing::read_incoming_envelope(&path)))
                .ok()
                .flatten()
            else {
                continue;
            };
            kept += env.sender.as_str().len()
                + env
                    .recipients
                    .iter()
                    .map(|r| r.as_str().len())
                    .sum::<usize>();
            out.push(listing::incoming_entry(id, env));
        }
        out
    });
    PreRead { incoming, daemon }
}

/// Prints the listing of `spool` (the config's), with what [`pre_read`] found when
/// that is the default spool; says on stderr when the daemon is not running and when
/// incoming/ could not be shown.
pub fn list(spool: &Spool, pre: Option<PreRead>, say: impl Fn(&str)) -> Exit {
    let default = spool.root() == Path::new(paths::SPOOL_DIR);
    let pre = pre.filter(|_| default);
    let mut entries = listing::queued(spool);
    let mut unseen = false;
    // Root, and a caller's own spool (-C), read incoming/ directly.
    match listing::incoming_checked(spool) {
        Ok(list) => entries.extend(list),
        Err(_) => match pre.as_ref().and_then(|p| p.incoming.clone()) {
            Some(list) => entries.extend(list),
            None => unseen = true,
        },
    }
    listing::sort(&mut entries);
    let daemon = trigger::has_reader(&spool.trigger())
        .ok()
        .or_else(|| pre.as_ref().and_then(|p| p.daemon));
    let mut out = std::io::stdout().lock();
    if out
        .write_all(listing::format(&entries).as_bytes())
        .and_then(|()| out.flush())
        .is_err()
    {
        return Exit::IoErr;
    }
    if daemon == Some(false) {
        say(
            "warning: the relay365 daemon is not running: nothing is picked up or delivered until it is started (systemctl start relay365)",
        );
    }
    if unseen {
        say(&format!(
            "warning: messages waiting in {} for the daemon's pickup cannot be shown: only the spool the package installs ({}) is read with the drop group; run mailq as root to see them",
            spool.incoming_new().display(),
            paths::SPOOL_DIR
        ));
    }
    Exit::Ok
}
