//! Fuzzes the secrets file reader (`secrets::Secrets::load` on a private temporary
//! file with mode 0600): a mistyped secrets file must give an error that names the
//! line and key and never echoes a secret, never a crash.
//!
//! Invariants: never panics; errors and `Debug` output never contain a value that
//! was loaded as a secret.
#![no_main]

mod common;

use std::os::unix::fs::PermissionsExt;

use libfuzzer_sys::fuzz_target;
use relay365::secrets::{AccountSecrets, Secret, Secrets};

fuzz_target!(|data: &[u8]| {
    let path = common::dir().path().join("secrets.toml");
    std::fs::write(&path, data).expect("write");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    match Secrets::load(&path, None) {
        Ok(s) => {
            let shown = format!("{s:?}");
            // The same shape with dummy secrets: its field names, account names and paths
            // may match a short or wordy secret by chance; only the rest is a leak.
            let skeleton = format!(
                "{:?}",
                Secrets::from_accounts(s.account_names().map(|n| {
                    let mut a = AccountSecrets::default()
                        .with_password(Secret::new("x".into()))
                        .with_client_secret(Secret::new("x".into()));
                    if let Some(c) = s.for_account(n).and_then(|a| a.certificate_path()) {
                        a = a.with_certificate(Secret::new("x".into()), c.to_path_buf());
                    }
                    (n.to_owned(), a)
                }))
            );
            let paths: Vec<String> = s
                .account_names()
                .filter_map(|n| s.for_account(n))
                .filter_map(|a| a.certificate_key_path())
                .map(|p| format!("{p:?}"))
                .collect();
            for name in s.account_names() {
                let Some(a) = s.for_account(name) else {
                    panic!("listed account {name} has no secrets")
                };
                for secret in [a.password(), a.client_secret()].into_iter().flatten() {
                    let v = secret.expose();
                    if v.len() >= 8 && !skeleton.contains(v) && !paths.iter().any(|p| p.contains(v))
                    {
                        assert!(!shown.contains(v), "Debug shows the secret {v:?}: {shown}");
                    }
                }
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
