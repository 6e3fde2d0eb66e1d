//! Pickup: moves complete messages from `incoming/new` into the daemon's queue.
//!
//! SECURITY: every incoming file is distrusted. It must be a regular file (no
//! symlink, opened with O_NOFOLLOW), have one link (no hard link to someone else's
//! file), be no larger than the size bound, and parse as a version-1 envelope whose
//! size matches. The caller is the file's owner uid, never what the envelope says.
//! Anything else goes to `quarantine/` and is never bounced (its "sender" is
//! unauthenticated). The queue copy is synced before the incoming file is removed (the
//! queue directory once per pass, not once per message), so a crash at any point
//! leaves the message in one place or (briefly) both — never none.
//!
//! A pass that cannot write the queue or the quarantine (a full or read-only spool)
//! stops at the first such failure and reports no more work, so the caller's loop
//! ends instead of re-reading the same files forever; the fault is logged once per
//! outage (again every [`FAULT_RELOG`]), and its end once.

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::aliases::Locals;
use crate::config::Config;
use crate::daemon::route;
use crate::logging::SharedLog;
use crate::spool::QueueId;
use crate::spool::envelope::{self, Envelope};
use crate::spool::paths::Spool;
use crate::spool::queue::{Queue, QueueEntry, QueueError, RcptStatus, Recipient};

/// How old a leftover in `incoming/tmp` must be before it is swept (maildir's rule).
const TMP_MAX_AGE: Duration = Duration::from_secs(36 * 3600);

/// How often a spool fault that lasts is logged again.
const FAULT_RELOG: Duration = Duration::from_secs(600);

/// The spool fault the pickup last logged: every new file, trigger and safety scan
/// starts a pass, and an outage logged once per pass flooded the log.
struct Fault {
    incoming: PathBuf,
    what: String,
    logged: Instant,
}

static FAULT: Mutex<Option<Fault>> = Mutex::new(None);

/// Logs a fault that stopped a pass unless the same one was logged lately.
fn fault(incoming: &Path, what: String, line: &str, log: &SharedLog) {
    let Ok(mut last) = FAULT.lock() else {
        log.error(line);
        return;
    };
    let repeat = last.as_ref().is_some_and(|f| {
        f.incoming == incoming && f.what == what && f.logged.elapsed() < FAULT_RELOG
    });
    if !repeat {
        log.error(line);
        *last = Some(Fault {
            incoming: incoming.to_path_buf(),
            what,
            logged: Instant::now(),
        });
    }
}

/// Logs the end of an outage logged by [`fault`].
fn fault_over(incoming: &Path, log: &SharedLog) {
    let Ok(mut last) = FAULT.lock() else { return };
    if last.as_ref().is_some_and(|f| f.incoming == incoming) {
        *last = None;
        log.info("pickup: the spool accepts mail again");
    }
}

/// What stays the same from one failing file to the next (not its path).
fn fault_kind(e: &QueueError) -> String {
    match e {
        QueueError::Io { source, .. } => format!("queue: {}", source.kind()),
        other => format!("queue: {other}"),
    }
}

/// Why one incoming file was refused.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("not a regular file")]
    NotRegular,
    #[error("has {0} links (a hard link planted in incoming/)")]
    Links(u64),
    #[error("is {size} bytes, over the bound of {bound}")]
    TooBig { size: u64, bound: u64 },
    #[error("{0}")]
    Envelope(String),
}

/// Result of one pickup pass.
#[derive(Debug, Default)]
pub struct Picked {
    /// Messages now in the queue.
    pub queued: Vec<QueueId>,
    /// Of those, the ones this pass queued, each with when it is due (µs), so the
    /// scheduler need not read back what was just written. An entry whose recipients
    /// were all refused is among them: its delivery run bounces and removes it.
    pub due: Vec<(QueueId, u64)>,
    pub quarantined: usize,
    /// Files were left in `incoming/new` for the next call (the `limit` was reached).
    pub more: bool,
}

/// Moves what is in `incoming/new` into the queue, oldest first, at most `limit` files
/// (so the caller can hand them to delivery before taking more; see [`Picked::more`]).
pub fn pickup(
    spool: &Spool,
    queue: &Queue,
    config: &Config,
    locals: &Locals,
    log: &SharedLog,
    limit: usize,
) -> Picked {
    let mut picked = Picked::default();
    let dir = spool.incoming_new();
    let Ok(entries) = fs::read_dir(&dir) else {
        return picked;
    };
    let mut names: Vec<_> = entries.flatten().map(|e| e.file_name()).collect();
    names.sort();
    let waiting = names.len();
    if names.len() > limit {
        names.truncate(limit);
        picked.more = true;
    }
    let bound = envelope::max_file_len(config.max_message_size.0);
    // Incoming files whose message is in the queue, removed once the queue is synced.
    let mut taken = Vec::new();
    // Files that left incoming/new in this pass; a pass that moved none ends the
    // caller's loop (a full spool made it re-read the same chunk forever).
    let mut moved = 0usize;
    // A failure to write the queue or the quarantine: the next file would meet it too.
    let mut stuck = false;
    // Quarantines a file, or stops the pass when the quarantine cannot take it.
    let mut refuse = |path: &Path, why: &str, picked: &mut Picked| -> bool {
        match quarantine(spool, path, why, log) {
            Ok(()) => {
                picked.quarantined += 1;
                moved += 1;
                true
            }
            Err(e) => {
                let name = path.file_name().unwrap_or_default();
                fault(
                    &dir,
                    format!("quarantine: {}", e.kind()),
                    &format!(
                        "incoming file {name:?} refused ({why}) and cannot be quarantined: {e}; \
                         pickup stopped, {waiting} file(s) wait in incoming/"
                    ),
                    log,
                );
                false
            }
        }
    };
    for name in names {
        let path = dir.join(&name);
        let Some(id) = name.to_str().and_then(|n| QueueId::parse(n).ok()) else {
            if !refuse(&path, "a file name that is not a queue id", &mut picked) {
                stuck = true;
                break;
            }
            continue;
        };
        match take(&path, bound) {
            Ok((uid, env, message)) => {
                if env.id != id {
                    if !refuse(&path, "its envelope names another queue id", &mut picked) {
                        stuck = true;
                        break;
                    }
                    continue;
                }
                // A crash after queueing but before the unlink leaves both; the queue wins.
                if !queue.is_complete(&id) {
                    let recipients: Vec<Recipient> = env
                        .recipients
                        .iter()
                        .flat_map(|r| locals.resolve(r))
                        .collect();
                    let mut entry = QueueEntry::from_envelope(&env, uid, recipients);
                    let from = route::from_address(&message);
                    // The listener's mail goes out through its AUTH user's account, else
                    // `[listener] account` when set; only accounts of the config count.
                    let listener_account =
                        env.client
                            .and(env.account.clone().or_else(|| {
                                config.listener.as_ref().and_then(|l| l.account.clone())
                            }))
                            .filter(|name| config.accounts.iter().any(|a| &a.name == name));
                    // SECURITY: a local caller no account allows is refused: its
                    // recipients fail here and the sender gets a DSN (issue 18 item 7).
                    let refused = env
                        .client
                        .is_none()
                        .then(|| route::refused(config, uid))
                        .flatten();
                    if let Some(reply) = refused {
                        log.warning(&format!(
                            "{id}: uid={uid} refused: no account allows this caller"
                        ));
                        for r in entry
                            .recipients
                            .iter_mut()
                            .filter(|r| r.status == RcptStatus::Pending)
                        {
                            r.status = RcptStatus::Failed;
                            r.reply = Some(reply.clone());
                        }
                    }
                    entry.account = listener_account.or_else(|| {
                        route::route(config, env.sender.as_str(), from.as_deref(), uid)
                            .map(|a| a.name.clone())
                    });
                    if let Err(e) = queue.insert_unsynced(&entry, &message) {
                        // Leave it and the rest in incoming/ for a later pass (new
                        // mail, a trigger, the safety scan): nothing is lost.
                        fault(
                            &dir,
                            fault_kind(&e),
                            &format!(
                                "{id}: cannot queue: {e}; pickup stopped, \
                                 {waiting} file(s) wait in incoming/"
                            ),
                            log,
                        );
                        stuck = true;
                        break;
                    }
                    picked.due.push((id.clone(), entry.next_attempt_us));
                    let waited = SystemTime::now()
                        .duration_since(UNIX_EPOCH + Duration::from_micros(env.arrival_us))
                        .unwrap_or_default();
                    crate::daemon::metrics::observe_pickup(waited.as_secs_f64());
                    log.info(&format!(
                        "{id}: uid={uid} from=<{}> size={} nrcpt={} (queue active)",
                        env.sender,
                        env.size,
                        env.recipients.len()
                    ));
                    for r in entry
                        .recipients
                        .iter()
                        .filter(|r| r.status == RcptStatus::Failed)
                    {
                        let text = r.reply.as_deref().unwrap_or("");
                        crate::daemon::metrics::count_recipient("none", "bounced");
                        // Info, as Postfix: see AccountWorker::fail.
                        log.info(&format!(
                            "{id}: to=<{}>, relay=none, delay=0, dsn={}, status=bounced ({text})",
                            r.address,
                            crate::transport::reply::log_dsn(text, 5)
                        ));
                    }
                }
                taken.push(path);
                picked.queued.push(id);
            }
            Err(e) => {
                if !refuse(&path, &e.to_string(), &mut picked) {
                    stuck = true;
                    break;
                }
            }
        }
    }
    // One directory sync for the whole pass makes every new queue entry durable
    // before any incoming copy goes; per message it was the pickup's largest cost.
    if !taken.is_empty() {
        match queue.sync_dir() {
            Ok(()) => {
                let mut removed_any = false;
                for path in &taken {
                    if fs::remove_file(path).is_ok() {
                        removed_any = true;
                        moved += 1;
                    }
                }
                if removed_any {
                    // The unlinks need not be durable: a resurrected file is recognised
                    // as queued.
                    let _ = File::open(&dir).and_then(|d| d.sync_all());
                }
            }
            // The incoming copies stay; the next pass finds them queued and removes them.
            Err(e) => {
                stuck = true;
                fault(
                    &dir,
                    format!("sync {}", fault_kind(&e)),
                    &format!("cannot sync the queue: {e}"),
                    log,
                );
            }
        }
    }
    if stuck || moved == 0 {
        picked.more = false;
    } else {
        fault_over(&dir, log);
    }
    if !picked.more {
        sweep_tmp(spool);
    }
    picked
}

/// Opens and validates one incoming file.
fn take(path: &Path, bound: u64) -> Result<(u32, Envelope, Vec<u8>), Refusal> {
    // SECURITY: O_NOFOLLOW refuses a symlink; O_NONBLOCK keeps a planted FIFO from
    // blocking the daemon; fstat on the open file avoids a check-then-open race.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| Refusal::Envelope(format!("cannot open: {e}")))?;
    let meta = file
        .metadata()
        .map_err(|e| Refusal::Envelope(e.to_string()))?;
    if !meta.is_file() {
        return Err(Refusal::NotRegular);
    }
    if meta.nlink() != 1 {
        return Err(Refusal::Links(meta.nlink()));
    }
    if meta.len() > bound {
        return Err(Refusal::TooBig {
            size: meta.len(),
            bound,
        });
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(bound + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Refusal::Envelope(e.to_string()))?;
    let (mut env, message) =
        Envelope::from_file_bytes(&bytes).map_err(|e| Refusal::Envelope(e.to_string()))?;
    // SECURITY: the caller is whoever owns the file, whatever the envelope claims.
    env.uid = meta.uid();
    Ok((meta.uid(), env.clone(), message.to_vec()))
}

/// Moves a refused file to `quarantine/`; on failure the file stays where it is.
fn quarantine(spool: &Spool, path: &Path, why: &str, log: &SharedLog) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let safe: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '-')
        .take(64)
        .collect();
    let target = spool
        .quarantine()
        .join(format!("{safe}.{}", std::process::id()));
    // rename moves the directory entry only: a symlink stays a symlink, never followed.
    fs::rename(path, &target)?;
    log.warning(&format!(
        "incoming file {name:?} quarantined as {}: {why}; it was not delivered or bounced",
        target.display()
    ));
    Ok(())
}

/// Removes leftovers of killed `sendmail` runs from `incoming/tmp`.
fn sweep_tmp(spool: &Spool) {
    let Ok(entries) = fs::read_dir(spool.incoming_tmp()) else {
        return;
    };
    let now = SystemTime::now();
    for e in entries.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|m| now.duration_since(m).ok())
            .is_some_and(|age| age > TMP_MAX_AGE);
        if old {
            let _ = fs::remove_file(e.path());
        }
    }
}
