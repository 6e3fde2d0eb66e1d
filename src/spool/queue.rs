//! The daemon's queue: `queue/<id>.msg` (the message, daemon only) and
//! `queue/<id>.env` (envelope plus per-recipient state, readable by all for `mailq`).
//!
//! An `.env` file is JSON ([`QueueEntry`]), replaced atomically (write a temporary
//! file, fsync, rename, fsync the directory) after every transaction, so a crash
//! leaves either the old or the new state. A message being delivered is locked with
//! an exclusive flock on its `.msg` file, so a daemon and a `relay365 flush` never
//! deliver the same message at once. Written only by the daemon; still read with
//! distrust by `mailq`, which any user runs.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::QueueId;
use super::durable;
use super::envelope::{BodyType, Ret};
use super::envelope::{Dsn, EnvId, Envelope, Notify};
use super::paths::{self, QUEUE_ENTRY_SUFFIX as ENV, QUEUE_MESSAGE_SUFFIX as MSG, Spool};
use crate::message::address::{Address, Sender};

/// The format version written into every `.env`.
pub const VERSION: u32 = 1;
/// An `.env` larger than this is refused (bounded memory for `mailq`).
pub const MAX_ENV_SIZE: u64 = 16 << 20;

/// Where one recipient stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RcptStatus {
    /// Still to be delivered.
    Pending,
    /// Accepted by the server.
    Sent,
    /// Failed for good; reported in a bounce when the message is finished.
    Failed,
}

/// One recipient of a queued message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipient {
    /// The address the server sees.
    pub address: Address,
    /// What the caller wrote, when an alias or the admin address replaced it (ORCPT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original: Option<Address>,
    pub status: RcptStatus,
    /// The last reply or error for this recipient.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
}

/// A queued message's envelope and state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueEntry {
    pub version: u32,
    pub id: QueueId,
    /// Written empty for the null sender.
    pub sender: Sender,
    /// The caller, from the incoming file's owner (never from its content).
    pub uid: u32,
    pub arrival_us: u64,
    pub size: u64,
    pub recipients: Vec<Recipient>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<Notify>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ret: Option<Ret>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envid: Option<EnvId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<BodyType>,
    /// Delivery attempts so far (drives the backoff).
    #[serde(default)]
    pub attempts: u32,
    /// Not before this moment (µs since the epoch); 0 = now.
    #[serde(default)]
    pub next_attempt_us: u64,
    /// Held by an administrator: never attempted until released.
    #[serde(default)]
    pub held: bool,
    /// `-odq`: wait for an explicit queue run.
    #[serde(default)]
    pub queue_only: bool,
    /// A bounce we generated: it is never bounced itself.
    #[serde(default)]
    pub is_bounce: bool,
    /// The account it goes out through, as routed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// Why it waits, for mailq ("quota: ...", the last error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Errors reading or writing the queue.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: not a valid queue entry: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("no message {0} in the queue")]
    NotFound(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> QueueError + '_ {
    move |source| QueueError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl QueueEntry {
    /// A fresh entry with no DSN options, due now.
    pub fn new(
        id: &QueueId,
        sender: &Sender,
        uid: u32,
        arrival: SystemTime,
        size: u64,
        recipients: Vec<Recipient>,
    ) -> QueueEntry {
        QueueEntry {
            version: VERSION,
            id: id.clone(),
            sender: sender.clone(),
            uid,
            arrival_us: micros(arrival),
            size,
            recipients,
            notify: None,
            ret: None,
            envid: None,
            body: None,
            attempts: 0,
            next_attempt_us: 0,
            held: false,
            queue_only: false,
            is_bounce: false,
            account: None,
            reason: None,
        }
    }

    /// A queue entry for a picked-up incoming message.
    pub fn from_envelope(env: &Envelope, uid: u32, recipients: Vec<Recipient>) -> QueueEntry {
        let mut entry =
            QueueEntry::new(&env.id, &env.sender, uid, UNIX_EPOCH, env.size, recipients);
        entry.arrival_us = env.arrival_us;
        entry.set_dsn(&env.dsn);
        entry.queue_only = env.queue_only;
        entry
    }

    /// The message-level DSN parameters and body type, as one value.
    pub fn dsn(&self) -> Dsn {
        Dsn {
            notify: self.notify,
            ret: self.ret,
            envid: self.envid.clone(),
            body: self.body,
        }
    }

    pub fn set_dsn(&mut self, dsn: &Dsn) {
        self.notify = dsn.notify;
        self.ret = dsn.ret;
        self.envid = dsn.envid.clone();
        self.body = dsn.body;
    }

    pub fn pending(&self) -> impl Iterator<Item = &Recipient> {
        self.recipients
            .iter()
            .filter(|r| r.status == RcptStatus::Pending)
    }

    pub fn has_pending(&self) -> bool {
        self.pending().next().is_some()
    }

    pub fn arrival(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_micros(self.arrival_us)
    }

    pub fn next_attempt(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_micros(self.next_attempt_us)
    }

    pub fn set_next_attempt(&mut self, t: SystemTime) {
        self.next_attempt_us = micros(t);
    }

    /// Whether a queue run at `now` should attempt it (`explicit`: a flush or -q).
    pub fn is_due(&self, now: SystemTime, explicit: bool) -> bool {
        if self.held {
            return false;
        }
        if !self.has_pending() {
            // Every recipient is final but the message is still queued: its bounce
            // could not be queued yet, or its removal failed. It is due to be settled.
            return explicit || self.next_attempt_us <= micros(now);
        }
        if self.queue_only && !explicit && self.attempts == 0 {
            return false;
        }
        explicit || self.next_attempt_us <= micros(now)
    }
}

/// Microseconds since the epoch.
pub fn micros(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The queue directory of a spool.
#[derive(Debug, Clone)]
pub struct Queue {
    dir: PathBuf,
}

/// A message locked for delivery; the lock goes with the value.
#[derive(Debug)]
pub struct Locked {
    file: crate::spool::flock::Locked,
    pub entry: QueueEntry,
}

impl Locked {
    /// The message bytes.
    pub fn message(&mut self) -> Result<Vec<u8>, io::Error> {
        use std::io::Seek;
        self.file.seek(io::SeekFrom::Start(0))?;
        let mut buf = Vec::with_capacity(self.entry.size as usize);
        self.file.read_to_end(&mut buf)?;
        Ok(buf)
    }
}

impl Queue {
    pub fn new(spool: &Spool) -> Queue {
        Queue { dir: spool.queue() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn msg_path(&self, id: &QueueId) -> PathBuf {
        self.dir.join(format!("{id}{MSG}"))
    }

    pub fn env_path(&self, id: &QueueId) -> PathBuf {
        self.dir.join(format!("{id}{ENV}"))
    }

    /// Whether a message with this id is queued.
    pub fn contains(&self, id: &QueueId) -> bool {
        self.env_path(id).exists()
    }

    /// Whether both files of a message are in the queue. Before the directory is
    /// synced a crash may keep one name and lose the other, so the pickup asks this,
    /// not [`Queue::contains`], before it lets the incoming copy go.
    pub fn is_complete(&self, id: &QueueId) -> bool {
        self.env_path(id).exists() && self.msg_path(id).exists()
    }

    /// Queues a new message: the message file first, then its entry, each synced, then
    /// the directory. A crash in between leaves a `.msg` without `.env`, which
    /// [`Queue::ids`] ignores and the pickup overwrites on its retry.
    pub fn insert(&self, entry: &QueueEntry, message: &[u8]) -> Result<(), QueueError> {
        self.insert_unsynced(entry, message)?;
        self.sync_dir()
    }

    /// [`Queue::insert`] without the directory sync, for a caller that queues many
    /// messages and then calls [`Queue::sync_dir`] once before relying on any of them.
    pub fn insert_unsynced(&self, entry: &QueueEntry, message: &[u8]) -> Result<(), QueueError> {
        let msg = self.msg_path(&entry.id);
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(paths::QUEUE_MESSAGE_MODE)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&msg)
            .map_err(io_err(&msg))?;
        f.write_all(message).map_err(io_err(&msg))?;
        f.sync_all().map_err(io_err(&msg))?;
        self.write_entry_nosync(entry)
    }

    fn write_entry_nosync(&self, entry: &QueueEntry) -> Result<(), QueueError> {
        let env = self.dir.join(format!("{}{ENV}", entry.id));
        let tmp = self.dir.join(format!(".{}{ENV}.tmp", entry.id));
        let json = serde_json::to_vec(entry).map_err(|e| QueueError::Corrupt {
            path: env.clone(),
            reason: e.to_string(),
        })?;
        durable::replace_unsynced(
            &env,
            &tmp,
            &json,
            &durable::options(paths::QUEUE_ENVELOPE_MODE),
        )
        .map(drop)
        .map_err(io_err(&env))
    }

    /// Replaces an entry's state durably.
    pub fn update(&self, entry: &QueueEntry) -> Result<(), QueueError> {
        self.write_entry_nosync(entry)?;
        self.sync_dir()
    }

    /// Makes the queue directory's entries (new, renamed, removed) durable.
    pub fn sync_dir(&self) -> Result<(), QueueError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.dir))
    }

    /// Removes a finished message: the entry first, so a crash leaves at worst an
    /// orphan `.msg` (removed by [`Queue::sweep`]), never an entry without its message.
    pub fn remove(&self, id: &QueueId) -> Result<(), QueueError> {
        let env = self.env_path(id);
        match fs::remove_file(&env) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&env)(e)),
        }
        let msg = self.msg_path(id);
        let _ = fs::remove_file(&msg);
        self.sync_dir()
    }

    /// Reads an entry without locking (listings, scheduling decisions).
    pub fn read(&self, id: &QueueId) -> Result<QueueEntry, QueueError> {
        read_entry(&self.env_path(id))
    }

    /// Every queued id (entries with an `.env`), in arrival order.
    pub fn ids(&self) -> Result<Vec<QueueId>, QueueError> {
        Ok(self.scan()?.into_iter().map(|(id, _)| id).collect())
    }

    /// Every queued id in arrival order, with the inode number of its `.msg` as the
    /// directory listing gives it (no `stat`), for [`LockTable::holds`].
    pub fn scan(&self) -> Result<Vec<(QueueId, Option<u64>)>, QueueError> {
        use std::os::unix::fs::DirEntryExt;
        let mut ids = Vec::new();
        let mut msgs = std::collections::HashMap::new();
        for e in fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let e = e.map_err(io_err(&self.dir))?;
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(stem) = name.strip_suffix(ENV) {
                if let Ok(id) = QueueId::parse(stem) {
                    ids.push(id);
                }
            } else if let Some(stem) = name.strip_suffix(MSG) {
                msgs.insert(stem.to_string(), e.ino());
            }
        }
        ids.sort();
        Ok(ids
            .into_iter()
            .map(|id| {
                let ino = msgs.get(id.as_str()).copied();
                (id, ino)
            })
            .collect())
    }

    /// Locks a message for delivery, or `None` if another process holds it (or it was
    /// finished meanwhile). The entry is re-read under the lock.
    pub fn lock(&self, id: &QueueId) -> Result<Option<Locked>, QueueError> {
        let msg = self.msg_path(id);
        let file = match OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&msg)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&msg)(e)),
        };
        let file = match crate::spool::flock::try_exclusive(file) {
            Ok(Some(locked)) => locked,
            Ok(None) => return Ok(None),
            Err(e) => return Err(io_err(&msg)(e)),
        };
        // Another flusher may have finished it between our listing and the lock.
        match self.read(id) {
            Ok(entry) => Ok(Some(Locked { file, entry })),
            Err(QueueError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Removes what a crash left behind: `.msg` files without their `.env` (a crash
    /// inside [`Queue::insert`] or [`Queue::remove`]) and temporary entry files, once
    /// older than `min_age` so that an insert in progress in another process (a flush
    /// queueing a bounce) is never touched. Returns how many files went.
    pub fn sweep(&self, min_age: Duration) -> usize {
        let Ok(dir) = fs::read_dir(&self.dir) else {
            return 0;
        };
        // One listing, no stat per entry: the daemon sweeps at start, when the queue
        // may hold 100,000 messages.
        let names: std::collections::HashSet<String> = dir
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        let now = SystemTime::now();
        let mut removed = 0;
        for name in &names {
            let orphan = name.strip_suffix(MSG).and_then(|stem| {
                let id = QueueId::parse(stem).ok()?;
                (!names.contains(&format!("{stem}{ENV}"))).then_some(id)
            });
            let temporary = name.starts_with('.') && name.ends_with(".env.tmp");
            if orphan.is_none() && !temporary {
                continue;
            }
            // The listing is a moment's view: an insert may have completed since.
            if orphan.is_some_and(|id| self.env_path(&id).exists()) {
                continue;
            }
            let path = self.dir.join(name);
            let old = fs::symlink_metadata(&path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .is_some_and(|age| age >= min_age);
            if old && fs::remove_file(&path).is_ok() {
                removed += 1;
            }
        }
        removed
    }

    /// Whether another process holds the delivery lock (for `mailq`'s `*`).
    pub fn is_locked(&self, id: &QueueId) -> bool {
        match File::open(self.msg_path(id)) {
            // The probe's lock goes when its guard drops, at once.
            Ok(f) => !matches!(crate::spool::flock::try_shared(f), Ok(Some(_))),
            Err(_) => false,
        }
    }
}

/// The files some process holds an exclusive `flock` on, read once from `/proc/locks`:
/// a listing of 100,000 messages asks this instead of opening and trying to lock each
/// one (which cost more than reading the entries).
#[derive(Debug)]
pub struct LockTable {
    /// Inodes on the queue's file system.
    inodes: std::collections::HashSet<u64>,
}

impl LockTable {
    /// The exclusive flocks on the file system of `dir`; `None` where `/proc/locks`
    /// cannot be read (then ask [`Queue::is_locked`] per message).
    pub fn read(dir: &Path) -> Option<LockTable> {
        use std::os::unix::fs::MetadataExt;
        let dev = fs::metadata(dir).ok()?.dev();
        let device = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
        let text = fs::read_to_string("/proc/locks").ok()?;
        Some(LockTable::parse(device, &text))
    }

    /// Parses `/proc/locks` lines such as `1: FLOCK  ADVISORY  WRITE 7907 fe:00:10076256 0 EOF`;
    /// waiters (`1: -> FLOCK ...`) hold nothing and are skipped.
    fn parse(device: (u64, u64), text: &str) -> LockTable {
        let mut inodes = std::collections::HashSet::new();
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let [_, "FLOCK", _, "WRITE", _, file, ..] = f.as_slice() else {
                continue;
            };
            let mut parts = file.split(':');
            let (Some(maj), Some(min), Some(ino)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let (Ok(maj), Ok(min), Ok(ino)) = (
                u64::from_str_radix(maj, 16),
                u64::from_str_radix(min, 16),
                ino.parse::<u64>(),
            ) else {
                continue;
            };
            if (maj, min) == device {
                inodes.insert(ino);
            }
        }
        LockTable { inodes }
    }

    /// Whether the file with this inode number (on the queue's file system) is locked.
    pub fn holds(&self, inode: u64) -> bool {
        self.inodes.contains(&inode)
    }
}

/// Reads and validates one `.env` file.
pub fn read_entry(path: &Path) -> Result<QueueEntry, QueueError> {
    // SECURITY: no symlinks, bounded size: mailq runs as any user over this directory.
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)
        .map_err(io_err(path))?;
    // Room for a typical entry up front: from an empty buffer, `read_to_end` probes with
    // small reads, six system calls per entry instead of two.
    let mut buf = Vec::with_capacity(4096);
    f.take(MAX_ENV_SIZE)
        .read_to_end(&mut buf)
        .map_err(io_err(path))?;
    let entry: QueueEntry = serde_json::from_slice(&buf).map_err(|e| QueueError::Corrupt {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    if entry.version != VERSION {
        return Err(QueueError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("version {} (this relay365 reads {VERSION})", entry.version),
        });
    }
    Ok(entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &QueueId) -> QueueEntry {
        let rcpt = Recipient {
            address: Address::parse("x@y.z").unwrap(),
            original: None,
            status: RcptStatus::Pending,
            reply: None,
        };
        QueueEntry::new(
            id,
            &Sender::parse("a@b.c").unwrap(),
            1000,
            UNIX_EPOCH,
            4,
            vec![rcpt],
        )
    }

    fn queue() -> (tempfile::TempDir, Queue) {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("queue")).unwrap();
        let q = Queue::new(&Spool::new(d.path()));
        (d, q)
    }

    #[test]
    fn insert_read_update_remove() {
        let (_d, q) = queue();
        let id = QueueId::generate(SystemTime::now());
        let mut e = entry(&id);
        q.insert(&e, b"abcd").unwrap();
        assert_eq!(q.ids().unwrap(), vec![id.clone()]);
        assert_eq!(q.read(&id).unwrap(), e);
        e.recipients[0].status = RcptStatus::Sent;
        q.update(&e).unwrap();
        assert!(!q.read(&id).unwrap().has_pending());
        q.remove(&id).unwrap();
        assert!(q.ids().unwrap().is_empty());
        assert!(!q.msg_path(&id).exists());
    }

    #[test]
    fn a_locked_message_cannot_be_locked_twice() {
        let (_d, q) = queue();
        let id = QueueId::generate(SystemTime::now());
        q.insert(&entry(&id), b"abcd").unwrap();
        let mut first = q.lock(&id).unwrap().unwrap();
        assert_eq!(first.message().unwrap(), b"abcd");
        assert!(q.lock(&id).unwrap().is_none());
        assert!(q.is_locked(&id));
        drop(first);
        assert!(q.lock(&id).unwrap().is_some());
    }

    #[test]
    fn due_rules() {
        let id = QueueId::generate(SystemTime::now());
        let mut e = entry(&id);
        let now = SystemTime::now();
        assert!(e.is_due(now, false));
        e.set_next_attempt(now + Duration::from_secs(60));
        assert!(!e.is_due(now, false));
        assert!(e.is_due(now, true));
        e.held = true;
        assert!(!e.is_due(now, true));
        e.held = false;
        e.queue_only = true;
        e.next_attempt_us = 0;
        assert!(!e.is_due(now, false));
        assert!(e.is_due(now, true));
    }

    #[test]
    fn a_finished_entry_left_in_the_queue_is_due_for_settling() {
        let id = QueueId::generate(SystemTime::now());
        let mut e = entry(&id);
        e.recipients[0].status = RcptStatus::Failed;
        let now = SystemTime::now();
        assert!(e.is_due(now, false));
        e.set_next_attempt(now + Duration::from_secs(60));
        assert!(!e.is_due(now, false));
        assert!(e.is_due(now, true));
        e.held = true;
        assert!(!e.is_due(now, true));
    }

    #[test]
    fn sweep_removes_old_leftovers_only() {
        let (_d, q) = queue();
        let kept = QueueId::generate(SystemTime::now());
        q.insert(&entry(&kept), b"abcd").unwrap();
        let orphan = QueueId::generate(SystemTime::now());
        fs::write(q.msg_path(&orphan), b"x").unwrap();
        let tmp = q.dir().join(format!(".{orphan}.env.tmp"));
        fs::write(&tmp, b"{").unwrap();
        assert_eq!(q.sweep(Duration::from_secs(3600)), 0, "too young");
        assert_eq!(q.sweep(Duration::ZERO), 2);
        assert!(!q.msg_path(&orphan).exists() && !tmp.exists());
        assert!(q.msg_path(&kept).exists() && q.env_path(&kept).exists());
    }

    #[test]
    fn lock_table_from_proc_locks() {
        let text = "1: FLOCK  ADVISORY  WRITE 7907 fe:00:10076256 0 EOF\n\
                    2: FLOCK  ADVISORY  READ 7907 fe:00:10076257 0 EOF\n\
                    3: POSIX  ADVISORY  WRITE 7907 fe:00:10076258 0 EOF\n\
                    4: -> FLOCK  ADVISORY  WRITE 7908 fe:00:10076259 0 EOF\n\
                    5: FLOCK  ADVISORY  WRITE 7907 08:01:10076260 0 EOF\n\
                    garbage\n";
        let t = LockTable::parse((0xfe, 0), text);
        assert!(t.holds(10076256));
        for ino in [10076257, 10076258, 10076259, 10076260] {
            assert!(!t.holds(ino), "{ino}");
        }
    }

    #[test]
    fn the_lock_table_sees_a_delivery_lock() {
        let (_d, q) = queue();
        let id = QueueId::generate(SystemTime::now());
        q.insert(&entry(&id), b"abcd").unwrap();
        let ino = |q: &Queue| q.scan().unwrap()[0].1.expect("the .msg inode");
        let Some(t) = LockTable::read(q.dir()) else {
            return; // no /proc/locks here; the listing falls back to is_locked
        };
        assert!(!t.holds(ino(&q)));
        let held = q.lock(&id).unwrap().unwrap();
        assert!(LockTable::read(q.dir()).unwrap().holds(ino(&q)));
        drop(held);
        assert!(!LockTable::read(q.dir()).unwrap().holds(ino(&q)));
    }

    #[test]
    fn corrupt_entries_are_errors() {
        let (_d, q) = queue();
        let p = q.dir().join("0000000000000000000000AA.env");
        fs::write(&p, b"{not json").unwrap();
        assert!(matches!(read_entry(&p), Err(QueueError::Corrupt { .. })));
    }
}
