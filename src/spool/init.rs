//! Creates the spool from the path table (`relay365 init`): what the Debian package's
//! postinst runs, and what tests and the demo use for a private spool.
//!
//! Run as root it applies the table's owners and modes; run as anyone else, or with
//! `--private`, it creates a spool owned by the caller with the same modes (a test or
//! demo spool).

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::PathBuf;

use nix::sys::stat::Mode;
use nix::unistd::{Gid, Group as SysGroup, Uid, User, chown, mkfifo};

use super::paths::{self, Entry, Group, Kind, Owner, Spool};

/// Why the spool could not be created.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("cannot create {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} exists but is not a {kind}: move it away and run relay365 init again")]
    WrongKind { path: PathBuf, kind: &'static str },
    #[error(
        "user {0:?} or group {1:?} does not exist: install the package (it creates them) or run: adduser --system --group relay365 && addgroup --system relay365-drop"
    )]
    NoAccount(&'static str, &'static str),
}

/// The uid and gid for each table owner/group when running as root.
struct Ids {
    daemon_uid: Uid,
    daemon_gid: Gid,
    drop_gid: Gid,
}

fn system_ids() -> Result<Ids, InitError> {
    let none = || InitError::NoAccount(paths::DAEMON_USER, paths::DROP_GROUP);
    let user = User::from_name(paths::DAEMON_USER)
        .ok()
        .flatten()
        .ok_or_else(none)?;
    let drop = SysGroup::from_name(paths::DROP_GROUP)
        .ok()
        .flatten()
        .ok_or_else(none)?;
    Ok(Ids {
        daemon_uid: user.uid,
        daemon_gid: user.gid,
        drop_gid: drop.gid,
    })
}

/// Creates every spool entry that is missing and fixes modes; with `system_owners`
/// (and run as root) also the owners and groups of the table.
pub fn init(spool: &Spool, system_owners: bool) -> Result<(), InitError> {
    let ids = if system_owners && Uid::effective().is_root() {
        Some(system_ids()?)
    } else {
        None
    };
    for entry in paths::SPOOL_TABLE {
        create(spool, entry, ids.as_ref())?;
    }
    Ok(())
}

fn create(spool: &Spool, e: &Entry, ids: Option<&Ids>) -> Result<(), InitError> {
    let path = spool.join(e.path);
    let err = |source| InitError::Create {
        path: path.clone(),
        source,
    };
    match fs::symlink_metadata(&path) {
        Ok(m) => {
            let ok = match e.kind {
                Kind::Dir => m.is_dir(),
                Kind::Fifo => m.file_type().is_fifo(),
                Kind::File => m.is_file(),
            };
            if !ok {
                let kind = match e.kind {
                    Kind::Dir => "directory",
                    Kind::Fifo => "FIFO",
                    Kind::File => "file",
                };
                return Err(InitError::WrongKind { path, kind });
            }
        }
        Err(_) => match e.kind {
            Kind::Dir => fs::create_dir_all(&path).map_err(err)?,
            Kind::Fifo => {
                mkfifo(&path, Mode::from_bits_truncate(0o600)).map_err(|e| err(e.into()))?
            }
            Kind::File => return Ok(()),
        },
    }
    if let Some(ids) = ids {
        let uid = match e.owner {
            Owner::Root => Uid::from_raw(0),
            Owner::Daemon => ids.daemon_uid,
        };
        let gid = match e.group {
            Group::Root => Gid::from_raw(0),
            Group::Daemon => ids.daemon_gid,
            Group::Drop => ids.drop_gid,
        };
        chown(&path, Some(uid), Some(gid)).map_err(|e| err(e.into()))?;
    }
    // Set after chown: chown clears the sticky and setgid bits on some systems.
    fs::set_permissions(&path, fs::Permissions::from_mode(e.mode)).map_err(err)?;
    Ok(())
}

/// Differences between the spool on disk and the table, for `relay365 check` and tests.
pub fn verify(spool: &Spool) -> Vec<String> {
    let mut problems = Vec::new();
    for e in paths::SPOOL_TABLE {
        let path = spool.join(e.path);
        match fs::symlink_metadata(&path) {
            Ok(m) => {
                if m.mode() & 0o7777 != e.mode {
                    problems.push(format!(
                        "{} has mode {:04o}, expected {:04o}: run relay365 init",
                        path.display(),
                        m.mode() & 0o7777,
                        e.mode
                    ));
                }
            }
            Err(_) => problems.push(format!("{} is missing: run relay365 init", path.display())),
        }
    }
    problems
}
