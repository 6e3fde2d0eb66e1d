//! Advisory `flock(2)` locks on whole files, through `nix`'s [`Flock`] guard (this
//! replaces the `fs2` crate, unmaintained since 2018).
//!
//! A lock belongs to the open file description, as with `flock(2)` itself: it is
//! released when the returned guard drops, or when every descriptor sharing that
//! description closes. To lock a file that must stay open after the lock is let go,
//! pass a [`File::try_clone`] of it: the duplicate shares the description, so the lock
//! is the one other processes see on the original.

use std::fs::File;
use std::io;

use nix::errno::Errno;
pub use nix::fcntl::Flock;
use nix::fcntl::FlockArg;

/// A file held under a lock; it derefs to the [`File`].
pub type Locked = Flock<File>;

/// Waits for the exclusive lock on `file` (retrying when a signal interrupts the wait).
pub fn exclusive(file: File) -> io::Result<Locked> {
    let mut file = file;
    loop {
        match Flock::lock(file, FlockArg::LockExclusive) {
            Ok(locked) => return Ok(locked),
            Err((f, Errno::EINTR)) => file = f,
            Err((_, e)) => return Err(e.into()),
        }
    }
}

/// Takes the exclusive lock on `file` if no one holds any lock on it: `None` when
/// another description holds one.
pub fn try_exclusive(file: File) -> io::Result<Option<Locked>> {
    try_lock(file, FlockArg::LockExclusiveNonblock)
}

/// Takes a shared lock on `file` unless someone holds the exclusive one: `None` then.
pub fn try_shared(file: File) -> io::Result<Option<Locked>> {
    try_lock(file, FlockArg::LockSharedNonblock)
}

fn try_lock(file: File, arg: FlockArg) -> io::Result<Option<Locked>> {
    let mut file = file;
    loop {
        match Flock::lock(file, arg) {
            Ok(locked) => return Ok(Some(locked)),
            Err((_, Errno::EWOULDBLOCK)) => return Ok(None),
            Err((f, Errno::EINTR)) => file = f,
            Err((_, e)) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(path: &std::path::Path) -> File {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .unwrap()
    }

    #[test]
    fn exclusive_excludes_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l");
        let held = exclusive(open(&path)).unwrap();
        assert!(try_exclusive(open(&path)).unwrap().is_none());
        assert!(try_shared(open(&path)).unwrap().is_none());
        drop(held);
        assert!(try_exclusive(open(&path)).unwrap().is_some());
    }

    #[test]
    fn shared_locks_coexist_and_exclude_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l");
        let a = try_shared(open(&path)).unwrap();
        let b = try_shared(open(&path)).unwrap();
        assert!(a.is_some() && b.is_some());
        assert!(try_exclusive(open(&path)).unwrap().is_none());
    }

    #[test]
    fn a_clone_locks_the_original_description() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l");
        let original = open(&path);
        let guard = exclusive(original.try_clone().unwrap()).unwrap();
        assert!(try_exclusive(open(&path)).unwrap().is_none());
        // Dropping the guard releases the lock though `original` stays open.
        drop(guard);
        assert!(try_exclusive(open(&path)).unwrap().is_some());
        drop(original);
    }
}
