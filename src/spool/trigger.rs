//! The trigger FIFO (`<spool>/trigger`): how `sendmail -q` and `relay365 flush
//! --wake` ask a running daemon for a queue run. The daemon holds the read end; a
//! waker writes one byte.
//!
//! Trusts nothing about the path: it is opened without `O_CREAT`, without following a
//! symlink, and non-blocking, so only an existing FIFO with a reader (the daemon) can
//! be opened for writing; a regular file planted there is never written.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::sysexits::{Exit, ExitStatus};

/// Why the daemon could not be woken.
#[derive(Debug, thiserror::Error)]
pub enum WakeError {
    #[error(
        "the relay365 daemon is not running, so nobody can retry the queue now: start it (systemctl start relay365) or run relay365 flush"
    )]
    NotRunning,
    #[error("cannot wake the relay365 daemon through {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The byte `sendmail -q` writes: a queue run that respects account holds and
/// backoff, and that the daemon rate-limits.
pub const QUEUE_RUN: u8 = b'q';
/// The byte `relay365 flush --wake` writes: a queue run that overrides account holds
/// and backoff. Only the administrator's `relay365` writes it: the setgid `sendmail`,
/// the only way an ordinary user reaches the FIFO, writes [`QUEUE_RUN`] and nothing else.
pub const FORCED_RUN: u8 = b'f';

/// Asks the daemon listening on `path` for a queue run (`byte`: [`QUEUE_RUN`] or
/// [`FORCED_RUN`]). Call it with whatever privilege opening the FIFO needs (the setgid
/// `sendmail` raises its group for it).
pub fn wake(path: &Path, byte: u8) -> io::Result<()> {
    // SECURITY: no O_CREAT, no symlinks, non-blocking: see the module doc.
    OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path)
        .and_then(|mut f| f.write_all(&[byte]))
}

/// Whether a daemon listens on the trigger FIFO at `path`: it holds the read end, so
/// a non-blocking open for writing succeeds (ENXIO: no reader). Nothing is written,
/// so the daemon is not woken. Call it with the privilege opening the FIFO needs.
pub fn has_reader(path: &Path) -> io::Result<bool> {
    use std::os::unix::fs::FileTypeExt;
    // SECURITY: as in [`wake`]: no O_CREAT, no symlinks, non-blocking.
    match OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path)
    {
        // A regular file in its place is not a daemon.
        Ok(f) => Ok(f.metadata()?.file_type().is_fifo()),
        Err(e) if e.raw_os_error() == Some(nix::libc::ENXIO) => Ok(false),
        Err(e) => Err(e),
    }
}

impl ExitStatus for WakeError {
    fn exit(&self) -> Exit {
        Exit::Unavailable
    }
}

impl WakeError {
    /// Names the failure of [`wake`] on `path`: no reader means no daemon.
    pub fn from_io(path: &Path, source: io::Error) -> WakeError {
        match source.raw_os_error() {
            Some(nix::libc::ENXIO) => WakeError::NotRunning,
            _ => WakeError::Io {
                path: path.to_path_buf(),
                source,
            },
        }
    }
}
