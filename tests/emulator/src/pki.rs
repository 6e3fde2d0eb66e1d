//! The emulator's certificate authority and the leaf certificates its listeners present.
//!
//! Everything is generated in memory at start; nothing is read from outside. A fresh CA per
//! emulator means a client can only trust these listeners by being handed `ca_pem()`.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::config::CertKind;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error(
        "cannot generate the emulator certificates: {0}; this is a bug in the emulator's rcgen use"
    )]
    Generate(#[from] rcgen::Error),
    #[error(
        "rustls refused the emulator's server configuration: {0}; check the rustls ring provider"
    )]
    Tls(#[from] rustls::Error),
}

impl From<PkiError> for std::io::Error {
    fn from(e: PkiError) -> std::io::Error {
        std::io::Error::other(e)
    }
}

/// A CA and the means to issue leaves under it.
pub(crate) struct Pki {
    ca_cert: rcgen::Certificate,
    ca_key: KeyPair,
}

impl Pki {
    pub(crate) fn new() -> Result<Pki, PkiError> {
        let ca_key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "relay365 emulator test CA");
        dn.push(DnType::OrganizationName, "relay365 tests");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = params.self_signed(&ca_key)?;
        Ok(Pki { ca_cert, ca_key })
    }

    pub(crate) fn ca_pem(&self) -> String {
        self.ca_cert.pem()
    }

    pub(crate) fn ca_der(&self) -> CertificateDer<'static> {
        self.ca_cert.der().clone()
    }

    /// A leaf of the given kind and its private key (PKCS#8 DER).
    fn leaf(&self, kind: &CertKind) -> Result<(CertificateDer<'static>, Vec<u8>), PkiError> {
        let name = match kind {
            CertKind::Valid | CertKind::Expired => "localhost".to_owned(),
            CertKind::WrongName => "wrong.example".to_owned(),
            CertKind::ForName(n) => n.clone(),
        };
        let mut params = CertificateParams::new(vec![name.clone()])?;
        if matches!(kind, CertKind::Valid | CertKind::Expired) {
            params
                .subject_alt_names
                .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        }
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        if *kind == CertKind::Expired {
            params.not_before = rcgen::date_time_ymd(2019, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 1, 1);
        } else {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2099, 1, 1);
        }
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.ca_cert, &self.ca_key)?;
        Ok((cert.der().clone(), key.serialize_der()))
    }

    /// A rustls server configuration presenting a leaf of `kind` plus the CA (TLS 1.2 and 1.3 only).
    pub(crate) fn server_config(&self, kind: &CertKind) -> Result<Arc<ServerConfig>, PkiError> {
        let (leaf, key) = self.leaf(kind)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        // SECURITY: only TLS 1.2 and 1.3, as Exchange Online since 2022.
        let config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf, self.ca_der()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
            )?;
        Ok(Arc::new(config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_every_kind() {
        let pki = Pki::new().unwrap();
        assert!(pki.ca_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        for kind in [
            CertKind::Valid,
            CertKind::WrongName,
            CertKind::Expired,
            CertKind::ForName("a.test".into()),
        ] {
            pki.server_config(&kind).unwrap();
        }
    }
}
