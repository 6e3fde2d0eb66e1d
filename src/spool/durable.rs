//! Durable replacement of a file: the one helper for "write a temporary file, fsync
//! it, rename it over the real name, fsync the directory", so that a crash or power
//! loss leaves either the old or the new content, never a mixture or nothing.
//!
//! Used for queue entries, freezes, holds, the ledger's compaction and the capture
//! transport. Trusts its caller for the paths (always inside the spool or state
//! directory); never follows a symlink planted in place of the temporary file.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The open options for a new file of `mode`: write-only, no symlink, close-on-exec.
pub fn options(mode: u32) -> OpenOptions {
    let mut o = OpenOptions::new();
    o.write(true)
        .mode(mode)
        // SECURITY: never follow a symlink planted in place of the file.
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC);
    o
}

/// Writes `bytes` into `tmp` (created afresh with `open`, a stale one removed first),
/// fsyncs it and renames it over `path`. Returns the file, now named `path`. The
/// directory is not synced: call [`sync_dir`] once for a batch, or use [`replace`].
pub fn replace_unsynced(
    path: &Path,
    tmp: &Path,
    bytes: &[u8],
    open: &OpenOptions,
) -> io::Result<File> {
    match fs::remove_file(tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut o = open.clone();
    let mut file = o.create_new(true).open(tmp)?;
    let written = file.write_all(bytes).and_then(|()| file.sync_all());
    if let Err(e) = written {
        // A partial temporary file is never read, but it would hold space.
        let _ = fs::remove_file(tmp);
        return Err(e);
    }
    fs::rename(tmp, path)?;
    Ok(file)
}

/// [`replace_unsynced`], then the directory synced: durable when it returns.
pub fn replace(path: &Path, tmp: &Path, bytes: &[u8], open: &OpenOptions) -> io::Result<File> {
    let file = replace_unsynced(path, tmp, bytes, open)?;
    sync_dir(path)?;
    Ok(file)
}

/// Fsyncs the directory that holds `path`, making a rename or create in it durable.
pub fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_atomically_with_the_mode_and_clears_a_stale_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        let tmp = dir.path().join(".x.tmp");
        fs::write(&path, "old").unwrap();
        fs::write(&tmp, "stale").unwrap();
        replace(&path, &tmp, b"new", &options(0o640)).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert!(!tmp.exists());
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            mode & !0o640,
            0,
            "no bit beyond the mode asked for: {mode:o}"
        );
    }

    #[test]
    fn a_symlink_in_place_of_the_temporary_is_removed_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "keep").unwrap();
        let tmp = dir.path().join(".x.tmp");
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        replace(&dir.path().join("x"), &tmp, b"new", &options(0o600)).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"keep");
    }
}
