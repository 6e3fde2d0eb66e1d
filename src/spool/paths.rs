//! Every path relay365 uses, with its owner, group and mode: the one table that the
//! code, the Debian package and the tests all read (Postfix's `postfix-files` idea).
//!
//! Trusts nothing: these are constants. The spool root itself comes from the config.

use std::path::{Path, PathBuf};

/// The user the daemon runs as; it owns the queue and the secrets.
pub const DAEMON_USER: &str = "relay365";
/// The user `relay365 listen` runs as (in the drop group, so it can write only
/// `incoming/`); it never reads the secrets.
pub const LISTEN_USER: &str = "relay365-listen";
/// The listener's AUTH users, hashed passwords only: root-owned, readable by the
/// listener's user (its group), written by `relay365 listener-user`.
pub const LISTENER_USERS_FILE: &str = "/etc/relay365/listener-users";
/// Mode of the users file (owner root, group [`LISTEN_USER`]).
pub const LISTENER_USERS_MODE: u32 = 0o640;
/// The group `sendmail` is setgid to. It owns nothing but `incoming/` and the trigger.
pub const DROP_GROUP: &str = "relay365-drop";

/// The world-readable configuration file.
pub const CONFIG_FILE: &str = "/etc/relay365/relay365.toml";
/// The secrets file: mode 0600, owned by [`DAEMON_USER`].
pub const SECRETS_FILE: &str = "/etc/relay365/secrets.toml";
/// The default spool root.
pub const SPOOL_DIR: &str = "/var/spool/relay365";
/// Where the default mail domain is read from first (Debian convention).
pub const MAILNAME_FILE: &str = "/etc/mailname";
/// The aliases file read for local recipients.
pub const ALIASES_FILE: &str = "/etc/aliases";

/// Who owns a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    Root,
    Daemon,
}

/// Which group a path belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    Root,
    Daemon,
    Drop,
}

/// What kind of file system object a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    Fifo,
    File,
}

/// One row of the path table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Relative to the spool root for spool entries; absolute for installed files.
    pub path: &'static str,
    pub kind: Kind,
    pub owner: Owner,
    pub group: Group,
    pub mode: u32,
}

/// `incoming/`: traversable by the drop group only.
pub const INCOMING: &str = "incoming";
/// `incoming/tmp`: where `sendmail` writes a message before it is complete.
pub const INCOMING_TMP: &str = "incoming/tmp";
/// `incoming/new`: complete messages waiting for the daemon's pickup.
pub const INCOMING_NEW: &str = "incoming/new";
/// `queue/`: the daemon's own queue. Envelope files are readable by all (for `mailq`);
/// message files are not.
pub const QUEUE: &str = "queue";
/// `state/`: quota ledgers, account state, the token cache. Daemon only.
pub const STATE: &str = "state";
/// `quarantine/`: incoming files the pickup refused, kept for the administrator.
pub const QUARANTINE: &str = "quarantine";
/// `trigger`: a FIFO the drop group writes one byte into to wake the daemon (`sendmail -q`).
pub const TRIGGER: &str = "trigger";

/// The spool, relative to its root. Order matters: parents before children.
#[rustfmt::skip]
pub const SPOOL_TABLE: &[Entry] = &[
    Entry { path: "", kind: Kind::Dir, owner: Owner::Root, group: Group::Root, mode: 0o755 },
    // SECURITY: the drop group may traverse but not list, so nobody can learn other
    // callers' file names; group write plus sticky lets it create files and rename its
    // own, never anyone else's (Postfix's maildrop is 1730 for the same reason).
    Entry { path: INCOMING, kind: Kind::Dir, owner: Owner::Daemon, group: Group::Drop, mode: 0o710 },
    Entry { path: INCOMING_TMP, kind: Kind::Dir, owner: Owner::Daemon, group: Group::Drop, mode: 0o1730 },
    // SECURITY: new/ must be readable by the group too, because making the rename
    // durable needs an fsync of the directory, and open(2) of a directory needs read
    // permission. Only sendmail's own code ever holds the group, and it never lists
    // or reads new/; a planted entry would still meet the pickup's distrust.
    Entry { path: INCOMING_NEW, kind: Kind::Dir, owner: Owner::Daemon, group: Group::Drop, mode: 0o1770 },
    Entry { path: QUEUE, kind: Kind::Dir, owner: Owner::Daemon, group: Group::Daemon, mode: 0o755 },
    Entry { path: STATE, kind: Kind::Dir, owner: Owner::Daemon, group: Group::Daemon, mode: 0o700 },
    Entry { path: QUARANTINE, kind: Kind::Dir, owner: Owner::Daemon, group: Group::Daemon, mode: 0o700 },
    // SECURITY: write-only for the drop group: it can wake the daemon, nothing more.
    Entry { path: TRIGGER, kind: Kind::Fifo, owner: Owner::Daemon, group: Group::Drop, mode: 0o620 },
];

/// Installed files outside the spool.
#[rustfmt::skip]
pub const INSTALLED_TABLE: &[Entry] = &[
    // SECURITY: setgid to the drop group only; never setuid.
    Entry { path: "/usr/sbin/sendmail", kind: Kind::File, owner: Owner::Root, group: Group::Drop, mode: 0o2755 },
    Entry { path: "/usr/bin/relay365", kind: Kind::File, owner: Owner::Root, group: Group::Root, mode: 0o755 },
    Entry { path: "/etc/relay365", kind: Kind::Dir, owner: Owner::Root, group: Group::Root, mode: 0o755 },
    Entry { path: CONFIG_FILE, kind: Kind::File, owner: Owner::Root, group: Group::Root, mode: 0o644 },
    // SECURITY: the mailbox password or client secret: the daemon's user alone reads it.
    Entry { path: SECRETS_FILE, kind: Kind::File, owner: Owner::Daemon, group: Group::Daemon, mode: 0o600 },
];

/// Mode of a message file in `incoming/`: the caller owns it, the drop group (the
/// daemon is a member) reads it, nobody else does.
pub const INCOMING_FILE_MODE: u32 = 0o640;
/// Mode of a queued message body: daemon only.
pub const QUEUE_MESSAGE_MODE: u32 = 0o600;
/// Mode of a queued envelope: readable by all so `mailq` needs no privilege. It holds
/// addresses and state, never the message (Postfix's `mailq` shows the same to anyone).
pub const QUEUE_ENVELOPE_MODE: u32 = 0o644;
/// Umask for everything relay365 creates.
pub const UMASK: u32 = 0o027;

/// The spool rooted at a directory from the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spool {
    root: PathBuf,
}

impl Spool {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Spool { root: root.into() }
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn join(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }
    pub fn incoming_tmp(&self) -> PathBuf {
        self.join(INCOMING_TMP)
    }
    pub fn incoming_new(&self) -> PathBuf {
        self.join(INCOMING_NEW)
    }
    pub fn queue(&self) -> PathBuf {
        self.join(QUEUE)
    }
    pub fn state(&self) -> PathBuf {
        self.join(STATE)
    }
    pub fn quarantine(&self) -> PathBuf {
        self.join(QUARANTINE)
    }
    pub fn trigger(&self) -> PathBuf {
        self.join(TRIGGER)
    }
    /// `state/<account>.ledger`: the account's quota ledger (daemon only, 0600).
    pub fn ledger(&self, account: &str) -> PathBuf {
        self.state().join(format!("{account}{LEDGER_SUFFIX}"))
    }
    /// `state/<account>.freeze`: a quota freeze, beside the ledger (daemon only, 0600).
    pub fn freeze(&self, account: &str) -> PathBuf {
        self.state().join(format!("{account}{FREEZE_SUFFIX}"))
    }
    /// `state/<account>.hold`: an account held for a credentials or policy problem.
    pub fn hold(&self, account: &str) -> PathBuf {
        self.state().join(format!("{account}{HOLD_SUFFIX}"))
    }
    /// `state/<account>.sent`: what went out, for matching late NDRs (daemon only, 0600).
    pub fn sent_log(&self, account: &str) -> PathBuf {
        self.state().join(format!("{account}{SENT_SUFFIX}"))
    }
    /// `state/<account>.harvest`: how far the bounce harvester read the inbox (0600).
    pub fn harvest(&self, account: &str) -> PathBuf {
        self.state().join(format!("{account}{HARVEST_SUFFIX}"))
    }
}

/// The file names inside `queue/` and `state/`, by suffix: `queue/<id>.msg` (the
/// message, [`QUEUE_MESSAGE_MODE`]), `queue/<id>.env` (its envelope and state,
/// [`QUEUE_ENVELOPE_MODE`]), `state/<account>.ledger`, `.freeze` and `.hold`.
pub const QUEUE_MESSAGE_SUFFIX: &str = ".msg";
pub const QUEUE_ENTRY_SUFFIX: &str = ".env";
pub const LEDGER_SUFFIX: &str = ".ledger";
pub const FREEZE_SUFFIX: &str = ".freeze";
pub const HOLD_SUFFIX: &str = ".hold";
pub const SENT_SUFFIX: &str = ".sent";
pub const HARVEST_SUFFIX: &str = ".harvest";

/// The whole table as TSV lines (absolute path, kind, owner, group, octal mode), the
/// spool rooted at `spool`: what `relay365 paths` prints for the package tests.
pub fn table_tsv(spool: &Spool) -> String {
    let row = |path: &Path, e: &Entry| {
        let kind = match e.kind {
            Kind::Dir => "dir",
            Kind::Fifo => "fifo",
            Kind::File => "file",
        };
        let owner = match e.owner {
            Owner::Root => "root",
            Owner::Daemon => DAEMON_USER,
        };
        let group = match e.group {
            Group::Root => "root",
            Group::Daemon => DAEMON_USER,
            Group::Drop => DROP_GROUP,
        };
        format!(
            "{}\t{kind}\t{owner}\t{group}\t{:04o}\n",
            path.display(),
            e.mode
        )
    };
    let spool_rows = SPOOL_TABLE.iter().map(|e| row(&spool.join(e.path), e));
    let installed = INSTALLED_TABLE.iter().map(|e| row(Path::new(e.path), e));
    spool_rows.chain(installed).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsv_lists_every_entry_with_absolute_paths() {
        let tsv = table_tsv(&Spool::new("/var/spool/relay365"));
        let lines: Vec<&str> = tsv.lines().collect();
        assert_eq!(lines.len(), SPOOL_TABLE.len() + INSTALLED_TABLE.len());
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

    #[test]
    fn parents_come_before_children() {
        for (i, e) in SPOOL_TABLE.iter().enumerate() {
            if let Some((parent, _)) = e.path.rsplit_once('/') {
                let at = SPOOL_TABLE.iter().position(|p| p.path == parent);
                assert!(
                    matches!(at, Some(j) if j < i),
                    "{} before its parent",
                    e.path
                );
            }
        }
    }

    #[test]
    fn only_incoming_and_trigger_belong_to_the_drop_group() {
        for e in SPOOL_TABLE.iter().filter(|e| e.group == Group::Drop) {
            assert!(
                e.path.starts_with(INCOMING) || e.path == TRIGGER,
                "{}",
                e.path
            );
            assert_eq!(e.mode & 0o007, 0, "{} must be closed to others", e.path);
        }
    }
}
