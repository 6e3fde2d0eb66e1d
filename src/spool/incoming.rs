//! Maildir-style delivery into `incoming/`: write `tmp/<id>`, fsync, rename into
//! `new/<id>`, fsync `new/`. A reader never sees a partial file in `new/`, and once
//! `sendmail` exits 0 the message survives a crash or power loss.
//!
//! Trusts its caller (the intake) for the bytes; trusts nothing about the spool
//! directory, which may be missing, full or unwritable.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::QueueId;
use super::paths::{self, Spool};
use crate::sendmail::privilege::DropGroup;

/// Why a message could not be queued.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error(
        "the spool {path} is full ({source}); the message was not queued, try again when space is freed"
    )]
    Full {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot write into {path}: {source}; check that the spool exists with the modes `relay365 init` creates (or reinstall the package)"
    )]
    Unwritable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("I/O error queueing into {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the message ({size} bytes) exceeds this process's file size limit ({limit} bytes, see ulimit -f)"
    )]
    FileSizeLimit { size: u64, limit: u64 },
}

impl SpoolError {
    fn from_io(path: &Path, source: io::Error) -> SpoolError {
        let path = path.to_path_buf();
        match source.raw_os_error() {
            Some(libc_enospc)
                if libc_enospc == nix::libc::ENOSPC || libc_enospc == nix::libc::EDQUOT =>
            {
                SpoolError::Full { path, source }
            }
            Some(e)
                if [
                    nix::libc::EACCES,
                    nix::libc::EPERM,
                    nix::libc::ENOENT,
                    nix::libc::EROFS,
                    nix::libc::ENOTDIR,
                ]
                .contains(&e) =>
            {
                SpoolError::Unwritable { path, source }
            }
            _ => SpoolError::Io { path, source },
        }
    }
}

/// Removes the temporary file unless the deposit completed.
struct TmpGuard<'a> {
    path: PathBuf,
    group: &'a DropGroup,
    armed: bool,
}

impl Drop for TmpGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            // Best effort: a leftover in tmp/ is never read and is swept by the daemon.
            let _ = self.group.with(|| fs::remove_file(&self.path));
        }
    }
}

/// Writes `bytes` as `incoming/new/<id>`, durably. Returns the final path.
pub fn deposit(
    spool: &Spool,
    group: &DropGroup,
    id: &QueueId,
    bytes: &[u8],
) -> Result<PathBuf, SpoolError> {
    let limit = file_size_limit();
    if bytes.len() as u64 > limit {
        return Err(SpoolError::FileSizeLimit {
            size: bytes.len() as u64,
            limit,
        });
    }
    let tmp = spool.incoming_tmp().join(id.as_str());
    let new_dir = spool.incoming_new();
    let new = new_dir.join(id.as_str());

    // SECURITY: the group is held only to create the file; O_EXCL|O_NOFOLLOW refuse a
    // planted name or symlink.
    let mut file: File = group
        .with(|| {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(paths::INCOMING_FILE_MODE)
                .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
                .open(&tmp)
        })
        .map_err(|e| SpoolError::from_io(&tmp, e))?;
    let mut guard = TmpGuard {
        path: tmp.clone(),
        group,
        armed: true,
    };
    file.write_all(bytes)
        .map_err(|e| SpoolError::from_io(&tmp, e))?;
    file.sync_all().map_err(|e| SpoolError::from_io(&tmp, e))?;
    drop(file);

    // SECURITY: group held for the rename and the directory sync only.
    group
        .with(|| fs::rename(&tmp, &new))
        .map_err(|e| SpoolError::from_io(&new, e))?;
    guard.armed = false;
    // The rename is only durable once the directory is synced; if that fails the
    // message is in new/ but may not survive a crash, so report failure and take it back.
    if let Err(e) = group.with(|| File::open(&new_dir).and_then(|d| d.sync_all())) {
        let _ = group.with(|| fs::remove_file(&new));
        return Err(SpoolError::from_io(&new_dir, e));
    }
    Ok(new)
}

/// The soft RLIMIT_FSIZE: a caller could lower it to make a write die half-way.
fn file_size_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit};
    getrlimit(Resource::RLIMIT_FSIZE).map_or(u64::MAX, |(soft, _)| soft)
}
