//! The HTTPS client shared by the token endpoint and Microsoft Graph: ureq on rustls,
//! verifying against exactly the system roots plus the account's `ca_file`, through the
//! account's HTTP proxy (`CONNECT`) when it has one.
//!
//! Trust: the agent never follows redirects (a bearer token or client secret must go
//! only where it was meant to), never speaks plain HTTP, and takes no proxy from the
//! environment by itself (the config decides, see [`crate::config::Proxy`]).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ureq::tls::{Certificate, RootCerts, TlsConfig, TlsProvider};

use super::tls::{self, TlsSetupError};

/// The agent for one account's HTTPS requests. Error bodies are read, not turned into
/// errors: Microsoft's JSON bodies carry the reason.
pub fn agent(
    ca_file: Option<&Path>,
    timeout: Duration,
    proxy: Option<ureq::Proxy>,
) -> Result<ureq::Agent, TlsSetupError> {
    let roots: Vec<Certificate<'static>> = tls::trusted_roots(ca_file)?
        .iter()
        .map(|c| Certificate::from_der(c.as_ref()).to_owned())
        .collect();
    let tls = TlsConfig::builder()
        .provider(TlsProvider::Rustls)
        // SECURITY: verification against exactly these roots; disable_verification is never set.
        .root_certs(RootCerts::Specific(Arc::new(roots)))
        .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .build();
    Ok(ureq::Agent::config_builder()
        .tls_config(tls)
        // SECURITY: secrets and tokens go to the configured URL only: no plain HTTP, no
        // redirects, no proxy but the configured one.
        .https_only(true)
        .max_redirects(0)
        .proxy(proxy)
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .user_agent(concat!("relay365/", env!("CARGO_PKG_VERSION")))
        .build()
        .into())
}

/// Whether a ureq error is the proxy refusing the tunnel (as opposed to the proxy or
/// the server being unreachable): `CONNECT` answered with a 4xx status (403 refused by
/// its rules, 407 authentication required), which only the administrator can fix.
pub fn is_proxy_refusal(e: &ureq::Error) -> bool {
    matches!(e, ureq::Error::ConnectProxyFailed(why) if why.contains("responded 4"))
}
