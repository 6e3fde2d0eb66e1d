//! The deposit: the one way a submission (envelope, message and who handed it in)
//! becomes an entry of `incoming/`. `sendmail`, `sendmail -bs` and the network
//! listener all queue through [`Depositor::deposit`]; the daemon's pickup reads the
//! result with the same distrust whoever wrote it.
//!
//! Maildir-style: write `tmp/<id>`, fsync, rename into `new/<id>`, fsync `new/`. A
//! reader never sees a partial file in `new/`, and once the caller is told "queued"
//! (exit 0, or `250`) the message survives a crash or power loss. The drop group is
//! raised only for the create, the rename and the directory sync.
//!
//! Trusts its caller (the intake) for the bytes; trusts nothing about the spool
//! directory, which may be missing, full or unwritable.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::logging::Log;
use crate::spool::QueueId;
use crate::spool::paths::{self, Spool};
use crate::sysexits::{Exit, ExitStatus};

use super::intake::Submission;
use super::privilege::DropGroup;

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

impl ExitStatus for SpoolError {
    fn exit(&self) -> Exit {
        match self {
            SpoolError::Full { .. } | SpoolError::FileSizeLimit { .. } => Exit::TempFail,
            SpoolError::Unwritable { .. } => Exit::CantCreat,
            SpoolError::Io { .. } => Exit::IoErr,
        }
    }
}

impl SpoolError {
    /// Whether it is a lack of space (SMTP `452 4.3.1`) rather than a write error.
    pub fn is_full(&self) -> bool {
        matches!(
            self,
            SpoolError::Full { .. } | SpoolError::FileSizeLimit { .. }
        )
    }

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

/// Who handed a message in, as the system (not the message) knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A local program: `sendmail` or `sendmail -bs`, run by this uid.
    Local { uid: u32 },
    /// A client of the network listener: its address, HELO name and AUTH user.
    Network {
        client: std::net::IpAddr,
        helo: Option<String>,
        user: Option<String>,
        method: Option<&'static str>,
    },
}

impl Origin {
    /// How the log names the origin: `uid=33`, or Postfix's
    /// `client=unknown[192.0.2.7], helo=<scanner>, sasl_method=PLAIN, sasl_username=bob`.
    pub fn describe(&self) -> String {
        match self {
            Origin::Local { uid } => format!("uid={uid}"),
            Origin::Network {
                client,
                helo,
                user,
                method,
            } => {
                let mut s = format!("client=unknown[{client}]");
                if let Some(h) = helo {
                    // SECURITY: client text in a log line: one line, bounded.
                    s.push_str(&format!(
                        ", helo=<{}>",
                        crate::message::text::one_line_max(h, 255)
                    ));
                }
                if let (Some(u), Some(m)) = (user, method) {
                    let u = crate::message::text::one_line_max(u, 64);
                    s.push_str(&format!(", sasl_method={m}, sasl_username={u}"));
                }
                s
            }
        }
    }
}

/// How the message came: on the command line or in an SMTP dialogue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Sendmail,
    Esmtp,
}

/// Queues submissions into `incoming/` for one caller, logging each.
pub struct Depositor<'a> {
    spool: &'a Spool,
    group: &'a DropGroup,
    log: Log,
    origin: Origin,
    protocol: Protocol,
}

impl<'a> Depositor<'a> {
    pub fn new(
        spool: &'a Spool,
        group: &'a DropGroup,
        log: Log,
        origin: Origin,
        protocol: Protocol,
    ) -> Depositor<'a> {
        Depositor {
            spool,
            group,
            log,
            origin,
            protocol,
        }
    }

    /// Queues `s` durably and logs it; returns only once it is safe to say "queued".
    pub fn deposit(&mut self, s: &Submission) -> Result<(), SpoolError> {
        let env = &s.envelope;
        let bytes = env.to_file_bytes(&s.message);
        let who = self.origin.describe();
        match write(self.spool, self.group, &env.id, &bytes) {
            Ok(_) => {
                let proto = match self.protocol {
                    Protocol::Sendmail => "",
                    Protocol::Esmtp => " proto=ESMTP",
                };
                // Postfix's smtpd logs the client on a line of its own.
                let who = match &self.origin {
                    Origin::Local { .. } => format!("{who} "),
                    Origin::Network { .. } => {
                        self.log.info(&format!("{}: {who}", env.id));
                        String::new()
                    }
                };
                self.log.info(&format!(
                    "{}: {who}from=<{}> size={} nrcpt={}{proto}",
                    env.id,
                    env.sender,
                    env.size,
                    env.recipients.len()
                ));
                Ok(())
            }
            Err(e) => {
                self.log.error(&format!("{who}: not queued: {e}"));
                Err(e)
            }
        }
    }
}

impl super::bs::Spooler for Depositor<'_> {
    fn deposit(&mut self, submission: &Submission) -> Result<(), SpoolError> {
        Depositor::deposit(self, submission)
    }

    fn set_origin(&mut self, origin: Origin) {
        self.origin = origin;
    }
}

/// Writes `bytes` as `incoming/new/<id>`, durably. Returns the final path.
pub fn write(
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
