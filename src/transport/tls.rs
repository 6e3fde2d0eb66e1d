//! The trusted roots and the rustls client configuration, shared by SMTP submission
//! ([`super::smtp`]) and the OAuth2 token client ([`super::oauth`]) so both trust
//! exactly the same certificates: the system store (rustls-native-certs) plus every
//! certificate in the account's `ca_file`.
//!
//! Trust: the CA file is the administrator's, but it is read bounded (1 MiB) and parsed
//! strictly, and every certificate in it must be usable as a trust anchor, so a wrong
//! file is reported by name rather than silently trusting less than intended. There is
//! no way to turn certificate verification off.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ClientConfig;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// Largest certificate or CA file read.
pub const MAX_PEM_FILE: u64 = 1024 * 1024;

/// Why no TLS client configuration could be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsSetupError {
    #[error("CA file {}: {problem}", path.display())]
    CaFile { path: PathBuf, problem: String },
    #[error(
        "no trusted CA certificates found (the system store is empty or unreadable): install the ca-certificates package or configure a CA file"
    )]
    NoRoots,
    #[error("cannot set up TLS: {0}")]
    Config(String),
}

/// Reads a PEM file, bounded so a wrong path (a log, a device) cannot eat memory.
pub fn read_pem_file(path: &Path) -> Result<Vec<u8>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let mut data = Vec::new();
    file.take(MAX_PEM_FILE + 1)
        .read_to_end(&mut data)
        .map_err(|e| format!("cannot read: {e}"))?;
    if data.len() as u64 > MAX_PEM_FILE {
        return Err("is larger than 1 MiB: is it the right file?".to_owned());
    }
    Ok(data)
}

/// Every `CERTIFICATE` block of a PEM file.
pub fn pem_certificates(data: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_slice_iter(data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| "is not valid PEM".to_owned())
}

/// The system roots (rustls-native-certs: /etc/ssl/certs, or `SSL_CERT_FILE`/`SSL_CERT_DIR`)
/// plus the certificates of `ca_file`.
pub fn trusted_roots(
    ca_file: Option<&Path>,
) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    // Unreadable entries in the system store are skipped; an empty result is caught below.
    let mut roots = rustls_native_certs::load_native_certs().certs;
    if let Some(path) = ca_file {
        let bad = |problem: String| TlsSetupError::CaFile {
            path: path.to_path_buf(),
            problem,
        };
        let data = read_pem_file(path).map_err(bad)?;
        let certs = pem_certificates(&data).map_err(bad)?;
        if certs.is_empty() {
            return Err(bad("holds no -----BEGIN CERTIFICATE----- block".to_owned()));
        }
        let mut check = rustls::RootCertStore::empty();
        for cert in certs {
            // Callers (ureq) may silently skip roots they cannot parse; check here so the
            // admin hears of it.
            check.add(cert.clone()).map_err(|e| {
                bad(format!(
                    "holds a certificate that cannot be a trust anchor: {e}"
                ))
            })?;
            roots.push(cert);
        }
    }
    if roots.is_empty() {
        return Err(TlsSetupError::NoRoots);
    }
    Ok(roots)
}

/// A rustls client configuration: ring, TLS 1.2 and 1.3 only, verification against
/// [`trusted_roots`], no client certificate.
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, TlsSetupError> {
    let mut store = rustls::RootCertStore::empty();
    // System certificates rustls cannot use are skipped, as every TLS client does;
    // the CA file's were checked one by one above.
    let (added, _skipped) = store.add_parsable_certificates(trusted_roots(ca_file)?);
    if added == 0 {
        return Err(TlsSetupError::NoRoots);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        // SECURITY: TLS 1.2+ only (Exchange Online refuses older too).
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsSetupError::Config(e.to_string()))?
        // SECURITY: the default WebPKI verifier; there is no dangerous_* override anywhere.
        .with_root_certificates(store)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_ca_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = client_config(Some(&missing)).unwrap_err();
        assert!(e.to_string().contains("missing.pem"), "{e}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = client_config(Some(&empty)).unwrap_err();
        assert!(
            e.to_string().contains("empty.pem") && e.to_string().contains("BEGIN CERTIFICATE"),
            "{e}"
        );
    }
}
