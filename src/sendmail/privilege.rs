//! The setgid front end's privilege handling: sanitise the process the caller handed
//! us, then hold the drop group only around the file operations that need it.
//!
//! Trusts nothing the caller controls: file descriptors, umask, environment, rlimits.
//!
//! The checklist, in the order `sendmail` runs it:
//! 1. [`sanitise_process`]: fds 0-2 open, fixed umask, empty environment, no core
//!    dumps, the file size limit raised as far as the caller's hard limit allows.
//! 2. [`DropGroup::acquire`]: the effective group becomes the caller's at once; the
//!    drop group stays only as the *saved* gid.
//! 3. After the command line is parsed, every mode that does not write into the
//!    spool (`-bp`, `-bv`, `-bi`, refused modes, usage errors) and a caller's own
//!    config (`-C`, unless root) call [`DropGroup::drop_permanently`] before the
//!    config or `/etc/aliases` is read: from then on the process can do nothing the
//!    caller could not do alone. Just before that drop, `-bp` without `-C` raises the
//!    group for reads of the installed spool only ([`super::mailq::pre_read`]): the
//!    listing of `incoming/new`, each envelope line (distrusted, bounded), and the
//!    open of the trigger FIFO; it holds the group only before the config is read.
//! 4. The enqueue modes (`-bm`, `-bs`) and `-q` keep the saved group and raise it
//!    with [`DropGroup::with`] only for the create in `incoming/tmp`, the rename into
//!    `incoming/new`, the directory sync, and the open of the trigger FIFO.
//!
//! Why the saved group is kept in the enqueue modes: the rename into `new/` and the
//! directory sync happen *after* the message has been read and its headers parsed,
//! and the kernel checks write permission on `incoming/` at the `rename(2)` itself,
//! so the group cannot be given up before the input is handled. The alternative is
//! Postfix's: a second, tiny setgid program (postdrop) that receives the finished
//! file and only renames it, while the parsing program holds no group at all. That
//! costs an exec and a pipe per message (measurable on the enqueue benchmark, where
//! the whole deposit is under a millisecond), a second binary in the package's
//! statoverride, and a record protocol between the two; with the group lowered to
//! the saved slot during parsing, the gain is only against a bug that could call
//! `setegid` — which needs code execution, and then the saved group is the least of
//! it. We keep one program and a short, audited list of raised operations instead.

use nix::unistd::{Gid, getegid, getgid, getuid, setegid, setresgid};

use crate::spool::paths;

/// Why privileges could not be handled; always EX_OSERR-class.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action}: {source}")]
pub struct PrivilegeError {
    action: &'static str,
    #[source]
    source: nix::Error,
}

/// The drop group, when this process was started setgid to it.
#[derive(Debug)]
pub struct DropGroup {
    /// The group we were installed setgid to, if we were; `None` when running as a
    /// plain program (tests, `-C` for a non-root caller, root).
    privileged: Option<Gid>,
    real: Gid,
}

impl DropGroup {
    /// Records the setgid group and lowers it at once (kept as the saved gid).
    pub fn acquire() -> Result<DropGroup, PrivilegeError> {
        let real = getgid();
        let effective = getegid();
        if effective == real {
            return Ok(DropGroup {
                privileged: None,
                real,
            });
        }
        // SECURITY: run as the caller's own group until a file operation needs ours.
        setresgid(Gid::from_raw(u32::MAX), real, Gid::from_raw(u32::MAX)).map_err(|source| {
            PrivilegeError {
                action: "lower the setgid group",
                source,
            }
        })?;
        Ok(DropGroup {
            privileged: Some(effective),
            real,
        })
    }

    /// Gives the group up for good (real, effective and saved), e.g. before honouring
    /// `-C` for a caller who is not root.
    pub fn drop_permanently(&mut self) -> Result<(), PrivilegeError> {
        if self.privileged.take().is_some() {
            // SECURITY: after this the process can do nothing the caller could not.
            setresgid(self.real, self.real, self.real).map_err(|source| PrivilegeError {
                action: "drop the setgid group",
                source,
            })?;
        }
        Ok(())
    }

    /// Whether the group is held in reserve.
    pub fn is_privileged(&self) -> bool {
        self.privileged.is_some()
    }

    /// Runs `f` with the drop group as the effective group, then lowers it again.
    pub fn with<T>(&self, f: impl FnOnce() -> std::io::Result<T>) -> std::io::Result<T> {
        let Some(gid) = self.privileged else {
            return f();
        };
        // SECURITY: raise the group for this one operation only.
        setegid(gid).map_err(std::io::Error::from)?;
        let out = f();
        // SECURITY: if lowering fails we must not continue with the group held.
        if setegid(self.real).is_err() {
            std::process::abort();
        }
        out
    }
}

/// Puts the process into a known state before anything else runs: fds 0-2 open,
/// a fixed umask, no inherited environment, no core dumps, a sane file size limit.
pub fn sanitise_process() {
    use nix::fcntl::{FcntlArg, OFlag, fcntl, open};
    use nix::sys::stat::{Mode, umask};

    // SECURITY: a closed 0-2 would let our spool file become the caller's stdout.
    for fd in 0..3 {
        if fcntl(fd, FcntlArg::F_GETFD).is_err()
            && let Ok(n) = open("/dev/null", OFlag::O_RDWR, Mode::empty())
            && n != fd
        {
            let _ = nix::unistd::dup2(n, fd);
            let _ = nix::unistd::close(n);
        }
    }
    // SECURITY: files we create get exactly the modes of the path table.
    umask(Mode::from_bits_truncate(paths::UMASK));
    clear_environment();
    // SECURITY: a setgid process must not leave a readable core file behind.
    let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0);
    // A lowered file size limit would kill us with SIGXFSZ half-way through a write;
    // raise the soft limit as far as the caller's hard limit allows.
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_FSIZE) {
        let _ = setrlimit(Resource::RLIMIT_FSIZE, hard, hard);
    }
}

/// SECURITY: nothing the caller put in the environment may steer this process.
#[allow(unsafe_code)]
fn clear_environment() {
    let keys: Vec<std::ffi::OsString> = std::env::vars_os().map(|(k, _)| k).collect();
    for k in keys {
        // SAFETY: called first thing in main, before any thread exists, so no other
        // thread can read the environment concurrently (the only soundness condition).
        unsafe { std::env::remove_var(&k) };
    }
}

/// The calling user's id (the real uid: we are setgid, never setuid).
pub fn caller_uid() -> u32 {
    getuid().as_raw()
}
