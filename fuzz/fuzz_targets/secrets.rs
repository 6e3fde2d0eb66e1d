//! Fuzzes the secrets file reader (`secrets::Secrets::load` on a private temporary
//! file with mode 0600): a mistyped secrets file must give an error that names the
//! line and key and never echoes a secret, never a crash.
//!
//! Invariants: never panics; errors and `Debug` output never contain a value that
//! was loaded as a secret.
#![no_main]

use std::os::unix::fs::PermissionsExt;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use relay365::secrets::Secrets;

fn dir() -> &'static tempfile::TempDir {
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

fuzz_target!(|data: &[u8]| {
    let path = dir().path().join("secrets.toml");
    std::fs::write(&path, data).expect("write");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    match Secrets::load(&path, None) {
        Ok(s) => {
            let shown = format!("{s:?}");
            for name in s.account_names() {
                let Some(a) = s.for_account(name) else {
                    panic!("listed account {name} has no secrets")
                };
                for secret in [a.password(), a.client_secret()].into_iter().flatten() {
                    let v = secret.expose();
                    // Very short values may occur in the output by chance.
                    if v.len() >= 8 {
                        assert!(!shown.contains(v), "Debug shows a secret");
                    }
                }
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
