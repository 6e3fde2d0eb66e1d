//! What several targets share: one scratch directory per fuzzing process, in memory
//! (/dev/shm) when there is one, so that file-reading targets do not wear the disk.

use std::sync::OnceLock;

/// The process's scratch directory (removed when the process exits normally).
pub fn dir() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = std::path::Path::new("/dev/shm");
        if base.is_dir() {
            tempfile::tempdir_in(base).expect("tempdir")
        } else {
            tempfile::tempdir().expect("tempdir")
        }
    })
}
