//! OAuth2 client-credentials token client for XOAUTH2 submission to Exchange Online: POSTs
//! to the Microsoft identity platform's token endpoint with a client secret or a signed JWT
//! client assertion (certificate), caches the access token until shortly before it expires,
//! and builds the XOAUTH2 SASL response.
//!
//! Trust: the token endpoint is believed only after TLS (rustls with the ring provider,
//! TLS 1.2 or 1.3) has verified its certificate against the system roots plus the optional
//! configured CA file; there is no switch to turn verification off. Even then its answers
//! are size-bounded, parsed strictly (the token must be printable ASCII, since it goes into
//! an SMTP command) and its error text is shown only sanitised. No secret (client secret,
//! assertion, token) ever appears in an error message: errors are built from our own words,
//! the endpoint's error codes and its description with our secrets masked.
//!
//! HTTP is ureq 3. ureq builds the rustls `ClientConfig` itself from its `TlsConfig`, so a
//! prebuilt `ClientConfig` cannot be handed in; instead the ring `CryptoProvider` and an
//! explicit root list are given to it (`unversioned_rustls_crypto_provider`,
//! `RootCerts::Specific`), which yields the same config: ring, TLS 1.2+ (rustls has nothing
//! older), verification against exactly our roots. `disable_verification` is never called.
//! Proxies from the environment are ignored and redirects are not followed, so the secret
//! goes to `token_url` and nowhere else.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use ring::rand::SystemRandom;
use ring::signature::RsaKeyPair;
use serde::Deserialize;

use super::tls::TlsSetupError;
use crate::config::oauth::{DEFAULT_SCOPE, InvalidSetting, OAuthSettings};
use crate::secrets::{AccountSecrets, Secret};
use assertion::{ASSERTION_TYPE, certificate_thumbprint, client_assertion, load_rsa_key};

mod assertion;

/// Largest token endpoint answer read; a real one is 2-4 KB.
const MAX_RESPONSE: u64 = 64 * 1024;
/// Refresh a token this much before it expires at most; short tokens refresh at 90 % of life.
const MAX_EARLY_REFRESH: Duration = Duration::from_secs(300);
/// A token is never cached longer than this, whatever `expires_in` claims.
const MAX_TOKEN_LIFE: Duration = Duration::from_secs(24 * 3600);
/// Longest error description from the endpoint kept in a message.
const MAX_DESCRIPTION: usize = 400;

/// How the app proves its identity to the token endpoint.
#[derive(Debug, Clone)]
pub enum ClientCredential {
    /// A client secret (Certificates & secrets > Client secrets).
    Secret(Secret),
    /// A certificate: the PEM private key (as loaded by the secrets module, with its file
    /// checks) and the PEM certificate uploaded to the app registration.
    Certificate {
        key_pem: Secret,
        certificate: PathBuf,
    },
}

impl ClientCredential {
    /// The credential an account's secrets provide; a certificate wins over a client secret.
    pub fn from_account(secrets: &AccountSecrets) -> Option<ClientCredential> {
        match (
            secrets.certificate_key(),
            secrets.certificate_path(),
            secrets.client_secret(),
        ) {
            (Some(key), Some(cert), _) => Some(ClientCredential::Certificate {
                key_pem: key.clone(),
                certificate: cert.to_path_buf(),
            }),
            (_, _, Some(secret)) => Some(ClientCredential::Secret(secret.clone())),
            _ => None,
        }
    }
}

/// An OAuth2 access token: a bearer credential, so it is a [`Secret`].
#[derive(Debug, Clone)]
pub struct AccessToken {
    value: Secret,
    expires_at: Option<SystemTime>,
}

impl AccessToken {
    /// The token itself.
    pub fn secret(&self) -> &Secret {
        &self.value
    }

    /// When the endpoint said it expires, if it said.
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.expires_at
    }
}

/// The XOAUTH2 SASL client response `user=<mailbox>\x01auth=Bearer <token>\x01\x01`,
/// **not** base64-encoded: the SMTP layer encodes it for `AUTH XOAUTH2 <base64>`.
/// `user` must be a validated address; control characters are dropped so they cannot
/// break the SASL framing.
pub fn xoauth2_response(user: &str, token: &AccessToken) -> Secret {
    xoauth2_sasl(user, token.secret().expose())
}

/// [`xoauth2_response`] from the bare token, as the SMTP session holds it.
pub fn xoauth2_sasl(user: &str, token: &str) -> Secret {
    // Reserve exactly once so building never reallocates and leaves an unzeroed copy.
    let mut response = String::with_capacity(user.len() + token.len() + 22);
    response.push_str("user=");
    // SECURITY: \x01 separates SASL fields; a control character in the user could forge one.
    response.extend(user.chars().filter(|c| !c.is_control()));
    response.push_str("\x01auth=Bearer ");
    response.push_str(token);
    response.push_str("\x01\x01");
    Secret::new(response)
}

/// Why no token could be had. No variant holds a secret.
#[derive(Debug, thiserror::Error)]
pub enum OAuthError {
    #[error("OAuth2 setting {key} {problem}")]
    InvalidSetting {
        key: &'static str,
        problem: &'static str,
    },
    #[error("CA file {}: {problem}", path.display())]
    CaFile { path: PathBuf, problem: String },
    #[error(
        "no trusted CA certificates found (the system store is empty or unreadable): install the ca-certificates package or configure a CA file"
    )]
    NoRoots,
    #[error("certificate {}: {problem}", path.display())]
    Certificate { path: PathBuf, problem: String },
    #[error("the certificate key for {}: {problem}", certificate.display())]
    Key {
        certificate: PathBuf,
        problem: String,
    },
    #[error("cannot sign the OAuth2 client assertion: {problem}")]
    Signing { problem: &'static str },
    #[error(
        "cannot reach the token endpoint {url}: {detail}: check DNS, routing and the firewall for outgoing HTTPS (relay365 retries)"
    )]
    Connect { url: String, detail: String },
    #[error(
        "the token endpoint {url} did not answer within {} s: check the network (relay365 retries)",
        timeout.as_secs()
    )]
    Timeout { url: String, timeout: Duration },
    #[error(
        "TLS with the token endpoint {url} failed: {detail}: check the system CA store, the configured CA file and for a proxy intercepting TLS (relay365 retries)"
    )]
    Tls { url: String, detail: String },
    #[error("the token endpoint {url} refused the token request ({error}{}): {description}: {fix}",
        aadsts.map(|c| format!(", AADSTS{c}")).unwrap_or_default())]
    Rejected {
        url: String,
        status: u16,
        error: String,
        aadsts: Option<u32>,
        description: String,
        fix: String,
        temporary: bool,
    },
    #[error("the token endpoint {url} answered HTTP {status}: {fix}")]
    Http {
        url: String,
        status: u16,
        fix: &'static str,
        temporary: bool,
    },
    #[error(
        "the HTTP proxy refused the tunnel to the token endpoint {url} ({detail}): check proxy and proxy_password, and that the proxy allows CONNECT to port 443"
    )]
    Proxy { url: String, detail: String },
    #[error("the token endpoint {url} sent an unusable answer: {problem}: check token_url")]
    BadResponse { url: String, problem: &'static str },
}

impl OAuthError {
    /// Whether retrying later may help without anyone changing anything (network trouble,
    /// Microsoft's outages), as opposed to a configuration or credential problem that needs
    /// the admin (hold the account and alert).
    pub fn is_temporary(&self) -> bool {
        match self {
            OAuthError::Connect { .. } | OAuthError::Timeout { .. } | OAuthError::Tls { .. } => {
                true
            }
            OAuthError::Rejected { temporary, .. } | OAuthError::Http { temporary, .. } => {
                *temporary
            }
            OAuthError::InvalidSetting { .. }
            | OAuthError::CaFile { .. }
            | OAuthError::NoRoots
            | OAuthError::Certificate { .. }
            | OAuthError::Key { .. }
            | OAuthError::Signing { .. }
            | OAuthError::Proxy { .. }
            | OAuthError::BadResponse { .. } => false,
        }
    }
}

impl From<InvalidSetting> for OAuthError {
    fn from(e: InvalidSetting) -> OAuthError {
        OAuthError::InvalidSetting {
            key: e.key,
            problem: e.problem,
        }
    }
}

/// What the token request authenticates with, ready to use.
enum Auth {
    Secret(Secret),
    Assertion {
        key: Box<RsaKeyPair>,
        /// base64url SHA-1 thumbprint of the certificate, the JWT header's `x5t`.
        x5t: String,
    },
}

struct Cached {
    token: AccessToken,
    fetched_at: SystemTime,
    refresh_at: SystemTime,
}

/// Fetches and caches access tokens for one app registration.
pub struct TokenSource {
    settings: OAuthSettings,
    token_url: String,
    auth: Auth,
    agent: ureq::Agent,
    timeout: Duration,
    rng: SystemRandom,
    cached: Option<Cached>,
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // SECURITY: hand-written so neither the credential nor the cached token can show.
        f.debug_struct("TokenSource")
            .field("token_url", &self.token_url)
            .field("client_id", &self.settings.client_id)
            .field("scope", &self.settings.scope)
            .field(
                "auth",
                &match self.auth {
                    Auth::Secret(_) => "client_secret",
                    Auth::Assertion { .. } => "certificate",
                },
            )
            .field("cached", &self.cached.is_some())
            .finish()
    }
}

impl TokenSource {
    /// Checks the settings, loads the certificate and key (if any) and the trusted roots
    /// (system store plus `ca_file`), and prepares the HTTPS client. Nothing is sent yet.
    pub fn new(
        settings: OAuthSettings,
        credential: ClientCredential,
        ca_file: Option<&Path>,
        timeout: Duration,
    ) -> Result<TokenSource, OAuthError> {
        Self::new_via(settings, credential, ca_file, timeout, None)
    }

    /// As [`TokenSource::new`], through an HTTP proxy (`CONNECT`) when one is given.
    pub fn new_via(
        settings: OAuthSettings,
        credential: ClientCredential,
        ca_file: Option<&Path>,
        timeout: Duration,
        proxy: Option<ureq::Proxy>,
    ) -> Result<TokenSource, OAuthError> {
        settings.validate()?;
        let auth = match credential {
            ClientCredential::Secret(secret) if secret.is_empty() => {
                return Err(OAuthError::InvalidSetting {
                    key: "client_secret",
                    problem: "is empty: put the secret's Value (not its ID) in secrets.toml",
                });
            }
            ClientCredential::Secret(secret) => Auth::Secret(secret),
            ClientCredential::Certificate {
                key_pem,
                certificate,
            } => {
                let key = load_rsa_key(&key_pem).map_err(|problem| OAuthError::Key {
                    certificate: certificate.clone(),
                    problem,
                })?;
                let x5t = certificate_thumbprint(&certificate)?;
                Auth::Assertion {
                    key: Box::new(key),
                    x5t,
                }
            }
        };
        let agent = super::http::agent(ca_file, timeout, proxy).map_err(|e| match e {
            TlsSetupError::CaFile { path, problem } => OAuthError::CaFile { path, problem },
            TlsSetupError::NoRoots | TlsSetupError::Config(_) => OAuthError::NoRoots,
        })?;
        Ok(TokenSource {
            token_url: settings.resolved_token_url(),
            settings,
            auth,
            agent,
            timeout,
            rng: SystemRandom::new(),
            cached: None,
        })
    }

    /// A valid access token: the cached one until shortly before it expires, else a new one.
    pub fn token(&mut self, now: SystemTime) -> Result<AccessToken, OAuthError> {
        if let Some(cached) = &self.cached {
            // A clock that went backwards makes the cache suspect; fetching anew is cheap.
            if now >= cached.fetched_at && now < cached.refresh_at {
                return Ok(cached.token.clone());
            }
        }
        self.cached = None;
        let (form, credential) = self.form(now)?;
        let (status, body) = self.post(&form)?;
        // The credential as sent (url-encoded) and as itself, masked in any error text.
        let encoded = form_encode(&[("", credential.expose())]);
        let mask = [credential.expose(), &encoded.expose()[1..]];
        let answer = parse_response(
            status,
            body.expose(),
            &self.settings,
            &self.token_url,
            &mask,
        )?;
        let life = answer
            .expires_in
            .map(|s| Duration::from_secs(s).min(MAX_TOKEN_LIFE));
        let token = AccessToken {
            value: answer.access_token,
            expires_at: life.and_then(|l| now.checked_add(l)),
        };
        self.cached = Some(Cached {
            token: token.clone(),
            fetched_at: now,
            refresh_at: refresh_at(now, life),
        });
        Ok(token)
    }

    /// Forgets the cached token, so the next [`TokenSource::token`] fetches a new one. The
    /// SMTP transport calls this on `535 5.7.3` and retries once.
    pub fn invalidate(&mut self) {
        self.cached = None;
    }

    /// The client-credentials form and the credential in it (client secret or assertion),
    /// both Secrets.
    fn form(&self, now: SystemTime) -> Result<(Secret, Secret), OAuthError> {
        let s = &self.settings;
        match &self.auth {
            Auth::Secret(secret) => Ok((
                form_encode(&[
                    ("grant_type", "client_credentials"),
                    ("client_id", &s.client_id),
                    ("scope", &s.scope),
                    ("client_secret", secret.expose()),
                ]),
                secret.clone(),
            )),
            Auth::Assertion { key, x5t } => {
                let mut jti = [0u8; 16];
                getrandom::fill(&mut jti).map_err(|_| OAuthError::Signing {
                    problem: "the system random number generator failed",
                })?;
                let assertion =
                    client_assertion(key, &self.rng, x5t, &s.client_id, &self.token_url, now, jti)?;
                let form = form_encode(&[
                    ("grant_type", "client_credentials"),
                    ("client_id", &s.client_id),
                    ("scope", &s.scope),
                    ("client_assertion_type", ASSERTION_TYPE),
                    ("client_assertion", assertion.expose()),
                ]);
                Ok((form, assertion))
            }
        }
    }

    fn post(&self, form: &Secret) -> Result<(u16, Secret), OAuthError> {
        let url = &self.token_url;
        let mut response = self
            .agent
            .post(url)
            .header("content-type", "application/x-www-form-urlencoded")
            .header("accept", "application/json")
            .send(form.expose())
            .map_err(|e| transport_error(url, self.timeout, e))?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_RESPONSE)
            .read_to_string()
            .map_err(|e| match e {
                ureq::Error::BodyExceedsLimit(_) => OAuthError::BadResponse {
                    url: url.clone(),
                    problem: "the answer is larger than 64 KiB",
                },
                other => transport_error(url, self.timeout, other),
            })?;
        // The body holds the token on success; it lives as a Secret from here on.
        Ok((status, Secret::new(body)))
    }
}

/// When to fetch anew: 10 % of the lifetime early, at most 5 minutes early; a token without
/// a lifetime is used once.
fn refresh_at(now: SystemTime, life: Option<Duration>) -> SystemTime {
    match life {
        Some(life) if !life.is_zero() => {
            let early = (life / 10).min(MAX_EARLY_REFRESH);
            now.checked_add(life - early).unwrap_or(now)
        }
        _ => now,
    }
}

/// Classifies a ureq error: all of these are network trouble, hence temporary.
fn transport_error(url: &str, timeout: Duration, e: ureq::Error) -> OAuthError {
    let url = url.to_owned();
    if super::http::is_proxy_refusal(&e) {
        return OAuthError::Proxy {
            url,
            detail: e.to_string(),
        };
    }
    match e {
        ureq::Error::Timeout(_) => OAuthError::Timeout { url, timeout },
        ureq::Error::Io(io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
            ) =>
        {
            OAuthError::Timeout { url, timeout }
        }
        ureq::Error::Io(io) => {
            // rustls handshake failures (unknown issuer, bad name) surface as io errors.
            match io
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            {
                Some(tls) => OAuthError::Tls {
                    url,
                    detail: tls.to_string(),
                },
                None => OAuthError::Connect {
                    url,
                    detail: io.to_string(),
                },
            }
        }
        ureq::Error::Rustls(tls) => OAuthError::Tls {
            url,
            detail: tls.to_string(),
        },
        ureq::Error::Tls(detail) => OAuthError::Tls {
            url,
            detail: detail.to_owned(),
        },
        ureq::Error::HostNotFound => OAuthError::Connect {
            url,
            detail: "host not found".to_owned(),
        },
        // ureq errors describe the connection, never the request body, so their text is safe.
        other => OAuthError::Connect {
            url,
            detail: other.to_string(),
        },
    }
}

/// `application/x-www-form-urlencoded`, built straight into a Secret.
fn form_encode(pairs: &[(&str, &str)]) -> Secret {
    let encoded_len = |s: &str| {
        s.bytes()
            .map(|b| if is_unreserved(b) || b == b' ' { 1 } else { 3 })
            .sum::<usize>()
    };
    let capacity = pairs
        .iter()
        .map(|(k, v)| encoded_len(k) + encoded_len(v) + 2)
        .sum();
    // Exact capacity: no reallocation, so no stale unzeroed copy of the secret.
    let mut out = String::with_capacity(capacity);
    for (i, (key, value)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        push_encoded(&mut out, key);
        out.push('=');
        push_encoded(&mut out, value);
    }
    Secret::new(out)
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'*')
}

fn push_encoded(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for b in s.bytes() {
        if is_unreserved(b) {
            out.push(char::from(b));
        } else if b == b' ' {
            out.push('+');
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
}

/// What a successful answer gave.
struct TokenAnswer {
    access_token: Secret,
    expires_in: Option<u64>,
}

/// `expires_in` arrives as a number from v2.0 and as a string from some v1.0 endpoints.
#[derive(Deserialize)]
#[serde(untagged)]
enum ExpiresIn {
    Number(u64),
    Text(String),
}

#[derive(Deserialize)]
struct RawToken {
    access_token: Option<String>,
    token_type: Option<String>,
    expires_in: Option<ExpiresIn>,
}

#[derive(Deserialize)]
struct RawError {
    error: String,
    error_description: Option<String>,
    #[serde(default)]
    error_codes: Vec<u32>,
}

/// Turns the endpoint's answer into a token or a typed error. `mask` lists secrets that
/// must not appear in an error even if the endpoint echoes them.
fn parse_response(
    status: u16,
    body: &str,
    settings: &OAuthSettings,
    url: &str,
    mask: &[&str],
) -> Result<TokenAnswer, OAuthError> {
    let bad = |problem| OAuthError::BadResponse {
        url: url.to_owned(),
        problem,
    };
    if status == 200 {
        // SECURITY: serde_json's message may quote the token; only our own words go out.
        let raw: RawToken =
            serde_json::from_str(body).map_err(|_| bad("the body is not the token JSON"))?;
        let access_token = raw.access_token.map(Secret::new);
        if let Some(kind) = &raw.token_type
            && !kind.eq_ignore_ascii_case("bearer")
        {
            return Err(bad("token_type is not Bearer"));
        }
        let access_token = access_token.ok_or_else(|| bad("it has no access_token"))?;
        // SECURITY: the token goes into an SMTP command line: printable ASCII only.
        if access_token.is_empty() || !access_token.expose().bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad("the access_token is empty or not printable ASCII"));
        }
        let expires_in = match raw.expires_in {
            None => None,
            Some(ExpiresIn::Number(n)) => Some(n),
            Some(ExpiresIn::Text(t)) => Some(
                t.trim()
                    .parse::<u64>()
                    .map_err(|_| bad("expires_in is not a number of seconds"))?,
            ),
        };
        return Ok(TokenAnswer {
            access_token,
            expires_in,
        });
    }
    let temporary_status = status >= 500 || status == 429;
    if let Ok(raw) = serde_json::from_str::<RawError>(body) {
        let description = raw.error_description.as_deref().unwrap_or("");
        let aadsts = raw
            .error_codes
            .first()
            .copied()
            .or_else(|| aadsts_code(description));
        let temporary = temporary_status
            || matches!(
                raw.error.as_str(),
                "temporarily_unavailable" | "server_error"
            );
        return Err(OAuthError::Rejected {
            url: url.to_owned(),
            status,
            fix: explain(&raw.error, aadsts, temporary, settings),
            error: sanitise(&raw.error, mask, 64),
            aadsts,
            description: sanitise(description, mask, MAX_DESCRIPTION),
            temporary,
        });
    }
    let fix = match status {
        300..=399 => "token_url redirects elsewhere: set token_url to the final address",
        404 => {
            "token_url is wrong: the default is https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token"
        }
        _ if temporary_status => "Microsoft's token service is having trouble (relay365 retries)",
        _ => "unexpected answer without an OAuth2 error: check token_url",
    };
    Err(OAuthError::Http {
        url: url.to_owned(),
        status,
        fix,
        temporary: temporary_status,
    })
}

/// The number in `AADSTS7000215: ...`.
fn aadsts_code(description: &str) -> Option<u32> {
    let rest = &description[description.find("AADSTS")? + 6..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Server text made fit for a log line: control characters flattened, length bounded, and
/// any of our own secrets masked in case the endpoint echoes the request back.
fn sanitise(text: &str, mask: &[&str], max: usize) -> String {
    let mut out = crate::message::text::one_line(text);
    for secret in mask {
        // SECURITY: a hostile or broken endpoint must not get our secret into the logs.
        if !secret.is_empty() && out.contains(secret) {
            out = out.replace(secret, "<redacted>");
        }
    }
    let collapsed = out.split_whitespace().collect::<Vec<_>>().join(" ");
    if collapsed.chars().count() > max {
        let cut: String = collapsed.chars().take(max).collect();
        format!("{cut}...")
    } else {
        collapsed
    }
}

/// What to do about a refusal, in plain words.
fn explain(error: &str, aadsts: Option<u32>, temporary: bool, s: &OAuthSettings) -> String {
    let app = format!(
        "Entra ID > App registrations > (the app with client ID {})",
        s.client_id
    );
    match aadsts {
        Some(7000215 | 7000222) => {
            return format!(
                "the client secret is wrong or expired: create a new one in {app} > Certificates & secrets and put its Value (not its Secret ID) in secrets.toml"
            );
        }
        Some(700016) => {
            return format!(
                "no application with client_id {} exists in tenant {}: check client_id (Application (client) ID on the app's Overview page) and tenant",
                s.client_id, s.tenant
            );
        }
        Some(90002 | 900023 | 90013) => {
            return format!(
                "tenant {} was not found: set tenant to the Directory (tenant) ID or a verified domain such as contoso.onmicrosoft.com",
                s.tenant
            );
        }
        Some(700027 | 50012 | 700023) => {
            return format!(
                "the client assertion was not accepted: upload the certificate (the public .pem/.crt) in {app} > Certificates & secrets, and check that certificate and certificate_key belong together"
            );
        }
        Some(700024) => {
            return "the client assertion is outside its valid time: the system clock is wrong; fix it (NTP)".to_owned();
        }
        Some(7000112) => {
            return "the application is disabled in the tenant: enable it in Entra ID > Enterprise applications > (the app) > Properties".to_owned();
        }
        Some(70011 | 1002012) => {
            return format!(
                "the scope {} is invalid: use scope = \"{DEFAULT_SCOPE}\" (note the /.default)",
                s.scope
            );
        }
        Some(500011) => {
            return format!(
                "the resource of scope {} is not in the tenant: check scope and that the tenant has Exchange Online",
                s.scope
            );
        }
        Some(7000229) => {
            return "the app has no service principal in the tenant: grant admin consent for it (API permissions > Grant admin consent), then run New-ServicePrincipal".to_owned();
        }
        _ => {}
    }
    if temporary {
        return "Microsoft's token service reported a temporary problem (relay365 retries)"
            .to_owned();
    }
    match error {
        "invalid_client" => format!(
            "the client credentials were refused: check client_id, tenant and the client secret or certificate in {app} > Certificates & secrets"
        ),
        "unauthorized_client" => format!(
            "the app may not use the client-credentials grant here: check {app} and that it is enabled in the tenant"
        ),
        "invalid_scope" => format!("use scope = \"{DEFAULT_SCOPE}\""),
        "invalid_request" => {
            "the request was refused as malformed: check tenant, client_id and token_url".to_owned()
        }
        _ => "see Microsoft's description above and the app registration".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use ring::signature::{RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey};
    use rustls::pki_types::PrivateKeyDer;
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener};
    use std::sync::Arc;
    use std::sync::Mutex;
    use std::time::UNIX_EPOCH;

    const KEY_PKCS8: &str = include_str!("../../../tests/data/oauth-test-key.pem");
    const KEY_PKCS1: &str = include_str!("../../../tests/data/oauth-test-key-pkcs1.pem");
    const CERT: &str = "tests/data/oauth-test-cert.pem";
    /// `openssl x509 -noout -fingerprint -sha1` of the test certificate.
    const CERT_SHA1: [u8; 20] = [
        0x2E, 0xF3, 0x4D, 0xB6, 0xB8, 0x1A, 0xC7, 0x28, 0xB0, 0xE8, 0x85, 0xFA, 0x0D, 0x0F, 0x1B,
        0xC3, 0xBF, 0x25, 0x57, 0xA1,
    ];
    const CLIENT_SECRET: &str = "Qx8~client.secret/Value+&=42";
    const TENANT: &str = "contoso.onmicrosoft.com";
    const CLIENT_ID: &str = "00000000-1111-2222-3333-444444444444";

    fn settings() -> OAuthSettings {
        OAuthSettings::new(TENANT, CLIENT_ID)
    }

    fn cert_path() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(CERT)
    }

    fn decode_json(part: &str) -> serde_json::Value {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
    }

    fn form_fields(body: &str) -> Vec<(String, String)> {
        fn decode(s: &str) -> String {
            let bytes = s.as_bytes();
            let mut out = Vec::new();
            let mut i = 0;
            while i < bytes.len() {
                match bytes[i] {
                    b'+' => out.push(b' '),
                    b'%' => {
                        out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                        i += 2;
                    }
                    b => out.push(b),
                }
                i += 1;
            }
            String::from_utf8(out).unwrap()
        }
        body.split('&')
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap();
                (decode(k), decode(v))
            })
            .collect()
    }

    fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn form_encoding() {
        let f = form_encode(&[
            ("a b", "x&y=z"),
            ("scope", "https://h/.default"),
            ("k", "é~"),
        ]);
        assert_eq!(
            f.expose(),
            "a+b=x%26y%3Dz&scope=https%3A%2F%2Fh%2F.default&k=%C3%A9%7E"
        );
        let fields = form_fields(f.expose());
        assert_eq!(field(&fields, "a b"), Some("x&y=z"));
        assert_eq!(field(&fields, "k"), Some("é~"));
    }

    #[test]
    fn token_response_parsing() {
        let s = settings();
        let url = s.resolved_token_url();
        let ok = parse_response(
            200,
            r#"{"token_type":"Bearer","expires_in":3599,"ext_expires_in":3599,"access_token":"eyJ0.abc-_"}"#,
            &s,
            &url,
            &[],
        )
        .unwrap();
        assert_eq!(ok.access_token.expose(), "eyJ0.abc-_");
        assert_eq!(ok.expires_in, Some(3599));
        let text = parse_response(
            200,
            r#"{"token_type":"bearer","expires_in":"3600","access_token":"t"}"#,
            &s,
            &url,
            &[],
        )
        .unwrap();
        assert_eq!(text.expires_in, Some(3600));
        let none = parse_response(200, r#"{"access_token":"t"}"#, &s, &url, &[]).unwrap();
        assert_eq!(none.expires_in, None);

        for (body, leak) in [
            (
                r#"{"token_type":"Bearer","expires_in":"soon","access_token":"SECRETTOKEN"}"#,
                true,
            ),
            (r#"{"token_type":"mac","access_token":"SECRETTOKEN"}"#, true),
            (r#"{"access_token":"SECRET TOKEN"}"#, true),
            (r#"{"access_token":"SECRETTOKEN\u0001"}"#, true),
            (r#"{"access_token":""}"#, false),
            (r#"{"expires_in":3600}"#, false),
            (r#"{"access_token":12345678}"#, false),
            ("<html>SECRETTOKEN</html>", true),
            (r#"{"access_token":"SECRETTOKEN","expires_in":[1]}"#, true),
        ] {
            let err = parse_response(200, body, &s, &url, &[]).err().unwrap();
            assert!(
                matches!(err, OAuthError::BadResponse { .. }),
                "{body}: {err}"
            );
            assert!(!err.is_temporary());
            if leak {
                let shown = format!("{err} {err:?}");
                assert!(!shown.contains("SECRET"), "{body}: {shown}");
            }
        }
    }

    #[test]
    fn microsoft_errors_become_plain_words() {
        let s = settings();
        let url = s.resolved_token_url();
        let body = r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID.\r\nTrace ID: 2b4e\r\nCorrelation ID: 9f1c\r\nTimestamp: 2025-11-23 11:12:20Z","error_codes":[7000215],"timestamp":"2025-11-23 11:12:20Z"}"#;
        let err = parse_response(401, body, &s, &url, &[]).err().unwrap();
        assert!(!err.is_temporary());
        let msg = err.to_string();
        assert!(msg.contains("invalid_client, AADSTS7000215"), "{msg}");
        assert!(msg.contains("wrong or expired"), "{msg}");
        assert!(
            msg.contains("Certificates & secrets") && msg.contains(CLIENT_ID),
            "{msg}"
        );
        assert!(!msg.contains('\r') && !msg.contains('\n'), "{msg}");

        // The code is also found in the description alone.
        let body = r#"{"error":"invalid_request","error_description":"AADSTS90002: Tenant 'x' not found."}"#;
        let err = parse_response(400, body, &s, &url, &[]).err().unwrap();
        assert!(matches!(
            err,
            OAuthError::Rejected {
                aadsts: Some(90002),
                ..
            }
        ));
        assert!(
            err.to_string()
                .contains("tenant contoso.onmicrosoft.com was not found")
        );

        // Temporary: by status or by error code.
        let body = r#"{"error":"temporarily_unavailable","error_description":"AADSTS90033: busy"}"#;
        assert!(
            parse_response(503, body, &s, &url, &[])
                .err()
                .unwrap()
                .is_temporary()
        );
        assert!(
            parse_response(400, body, &s, &url, &[])
                .err()
                .unwrap()
                .is_temporary()
        );
        assert!(
            parse_response(502, "<html>bad gateway</html>", &s, &url, &[])
                .err()
                .unwrap()
                .is_temporary()
        );
        let err = parse_response(404, "not found", &s, &url, &[])
            .err()
            .unwrap();
        assert!(!err.is_temporary() && err.to_string().contains("token_url"));
        assert!(
            !parse_response(302, "", &s, &url, &[])
                .err()
                .unwrap()
                .is_temporary()
        );

        // An endpoint echoing our request never gets the secret into the message.
        let encoded = form_encode(&[("client_secret", CLIENT_SECRET)]);
        let encoded_value = &encoded.expose()["client_secret=".len()..];
        let echo = format!(
            r#"{{"error":"invalid_request","error_description":"got {encoded_value} and {CLIENT_SECRET}"}}"#
        );
        let err = parse_response(400, &echo, &s, &url, &[CLIENT_SECRET, encoded_value])
            .err()
            .unwrap();
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains(CLIENT_SECRET), "{shown}");
        assert!(!shown.contains(encoded_value), "{shown}");
        assert!(shown.contains("got <redacted> and <redacted>"), "{shown}");
    }

    #[test]
    fn refresh_timing() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            refresh_at(t0, Some(Duration::from_secs(3600))),
            t0 + Duration::from_secs(3300)
        );
        assert_eq!(
            refresh_at(t0, Some(Duration::from_secs(60))),
            t0 + Duration::from_secs(54)
        );
        assert_eq!(refresh_at(t0, None), t0);
        assert_eq!(refresh_at(t0, Some(Duration::ZERO)), t0);
    }

    #[test]
    fn xoauth2_sasl_response() {
        let token = AccessToken {
            value: Secret::new("ya29.tok".into()),
            expires_at: None,
        };
        let r = xoauth2_response("app@contoso.com", &token);
        assert_eq!(
            r.expose(),
            "user=app@contoso.com\x01auth=Bearer ya29.tok\x01\x01"
        );
        assert_eq!(format!("{r:?} {token:?}").matches("ya29").count(), 0);
        let r = xoauth2_response("a\x01b@c", &token);
        assert!(r.expose().starts_with("user=ab@c\x01auth"));
    }

    #[test]
    fn rsa_keys_load_in_both_formats() {
        let k8 = load_rsa_key(&Secret::new(KEY_PKCS8.into())).unwrap();
        let k1 = load_rsa_key(&Secret::new(KEY_PKCS1.into())).unwrap();
        assert_eq!(k8.public().as_ref(), k1.public().as_ref());
        let err = load_rsa_key(&Secret::new("nonsense".into())).err().unwrap();
        assert!(err.contains("no private key"), "{err}");
        let ec = rcgen::KeyPair::generate().unwrap().serialize_pem();
        let err = load_rsa_key(&Secret::new(ec)).err().unwrap();
        assert!(err.contains("RSA"), "{err}");
    }

    #[test]
    fn thumbprint_is_base64url_sha1() {
        assert_eq!(
            certificate_thumbprint(&cert_path()).unwrap(),
            URL_SAFE_NO_PAD.encode(CERT_SHA1)
        );
        let err = certificate_thumbprint(Path::new("/nonexistent/cert.pem")).unwrap_err();
        assert!(matches!(err, OAuthError::Certificate { .. }));
    }

    #[test]
    fn jwt_client_assertion() {
        let key = load_rsa_key(&Secret::new(KEY_PKCS8.into())).unwrap();
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let url = settings().resolved_token_url();
        let jwt = client_assertion(
            &key,
            &SystemRandom::new(),
            "thumb",
            CLIENT_ID,
            &url,
            now,
            [7; 16],
        )
        .unwrap();
        assert_eq!(format!("{jwt:?}"), "<redacted>");
        let parts: Vec<&str> = jwt.expose().split('.').collect();
        assert_eq!(parts.len(), 3);
        let header = decode_json(parts[0]);
        assert_eq!(
            header,
            serde_json::json!({"alg": "RS256", "typ": "JWT", "x5t": "thumb"})
        );
        let claims = decode_json(parts[1]);
        assert_eq!(claims["aud"], url.as_str());
        assert_eq!(claims["iss"], CLIENT_ID);
        assert_eq!(claims["sub"], CLIENT_ID);
        assert_eq!(claims["nbf"], 1_700_000_000u64);
        assert_eq!(claims["iat"], 1_700_000_000u64);
        assert_eq!(claims["exp"], 1_700_000_600u64);
        assert_eq!(claims["jti"], "07070707-0707-4707-8707-070707070707");
        let signature = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        let signed = format!("{}.{}", parts[0], parts[1]);
        UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, key.public().as_ref())
            .verify(signed.as_bytes(), &signature)
            .unwrap();
        // A changed claim no longer verifies.
        let forged = format!("{}.{}x", parts[0], parts[1]);
        assert!(
            UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, key.public().as_ref())
                .verify(forged.as_bytes(), &signature)
                .is_err()
        );
    }

    // ---- a minimal HTTPS token endpoint on 127.0.0.1 ----

    struct Ca {
        cert: rcgen::Certificate,
        key: rcgen::KeyPair,
    }

    fn new_ca(name: &str) -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    fn ca_file(ca: &Ca) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(ca.cert.pem().as_bytes()).unwrap();
        f
    }

    struct Seen {
        path: String,
        body: String,
    }

    /// Serves one scripted answer per connection, in order, recording each request.
    fn serve(ca: &Ca, answers: Vec<(u16, String)>) -> (SocketAddr, Arc<Mutex<Vec<Seen>>>) {
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&leaf_key, &ca.cert, &ca.key)
            .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&seen);
        std::thread::spawn(move || {
            for (status, body) in answers {
                let Ok((tcp, _)) = listener.accept() else {
                    return;
                };
                let conn = rustls::ServerConnection::new(Arc::clone(&config)).unwrap();
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                // Read the head, then Content-Length bytes of body; a failed handshake ends here.
                let head_end = loop {
                    if let Some(i) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                        break Some(i + 4);
                    }
                    match tls.read(&mut buf) {
                        Ok(0) | Err(_) => break None,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                };
                let Some(head_end) = head_end else { continue };
                let head = String::from_utf8_lossy(&request[..head_end]).to_string();
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                while request.len() < head_end + length {
                    match tls.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let path = head.split(' ').nth(1).unwrap_or("").to_owned();
                let body_in = String::from_utf8_lossy(&request[head_end..]).to_string();
                record.lock().unwrap().push(Seen {
                    path,
                    body: body_in,
                });
                let answer = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(answer.as_bytes());
                tls.conn.send_close_notify();
                let _ = tls.flush();
            }
        });
        (addr, seen)
    }

    fn local_settings(addr: SocketAddr) -> OAuthSettings {
        OAuthSettings {
            token_url: format!("https://{addr}/{{tenant}}/oauth2/v2.0/token"),
            ..settings()
        }
    }

    fn token_json(token: &str) -> String {
        format!(r#"{{"token_type":"Bearer","expires_in":3599,"access_token":"{token}"}}"#)
    }

    #[test]
    fn end_to_end_client_secret_caching_and_errors() {
        let ca = new_ca("relay365 test CA");
        let ca_pem = ca_file(&ca);
        let error = r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided.","error_codes":[7000215]}"#;
        let (addr, seen) = serve(
            &ca,
            vec![
                (200, token_json("tokenA")),
                (200, token_json("tokenB")),
                (401, error.to_owned()),
            ],
        );
        let mut source = TokenSource::new(
            local_settings(addr),
            ClientCredential::Secret(Secret::new(CLIENT_SECRET.into())),
            Some(ca_pem.path()),
            Duration::from_secs(10),
        )
        .unwrap();
        assert!(!format!("{source:?}").contains(CLIENT_SECRET));
        let t0 = UNIX_EPOCH + Duration::from_secs(1_700_000_000);

        let a = source.token(t0).unwrap();
        assert_eq!(a.secret().expose(), "tokenA");
        assert_eq!(a.expires_at(), Some(t0 + Duration::from_secs(3599)));
        {
            let seen = seen.lock().unwrap();
            assert_eq!(seen.len(), 1);
            assert_eq!(seen[0].path, format!("/{TENANT}/oauth2/v2.0/token"));
            let fields = form_fields(&seen[0].body);
            assert_eq!(field(&fields, "grant_type"), Some("client_credentials"));
            assert_eq!(field(&fields, "client_id"), Some(CLIENT_ID));
            assert_eq!(field(&fields, "scope"), Some(DEFAULT_SCOPE));
            assert_eq!(field(&fields, "client_secret"), Some(CLIENT_SECRET));
            assert_eq!(fields.len(), 4);
        }

        // Cached until shortly before expiry: no new request.
        let again = source.token(t0 + Duration::from_secs(3000)).unwrap();
        assert_eq!(again.secret().expose(), "tokenA");
        assert_eq!(seen.lock().unwrap().len(), 1);

        // invalidate (after 535 5.7.3) forces a new fetch.
        source.invalidate();
        let b = source.token(t0 + Duration::from_secs(3001)).unwrap();
        assert_eq!(b.secret().expose(), "tokenB");
        assert_eq!(seen.lock().unwrap().len(), 2);

        // Past the refresh point: fetch again, and this time the endpoint refuses.
        let err = source
            .token(t0 + Duration::from_secs(3001 + 3400))
            .unwrap_err();
        assert_eq!(seen.lock().unwrap().len(), 3);
        assert!(!err.is_temporary(), "{err}");
        assert!(matches!(
            err,
            OAuthError::Rejected {
                status: 401,
                aadsts: Some(7000215),
                ..
            }
        ));
        let shown = format!("{err} {err:?}");
        assert!(shown.contains("Certificates & secrets"), "{shown}");
        assert!(!shown.contains(CLIENT_SECRET), "{shown}");
    }

    #[test]
    fn end_to_end_certificate_assertion() {
        let ca = new_ca("relay365 test CA");
        let ca_pem = ca_file(&ca);
        let (addr, seen) = serve(&ca, vec![(200, token_json("tokenC"))]);
        let settings = local_settings(addr);
        let mut source = TokenSource::new(
            settings.clone(),
            ClientCredential::Certificate {
                key_pem: Secret::new(KEY_PKCS1.into()),
                certificate: cert_path(),
            },
            Some(ca_pem.path()),
            Duration::from_secs(10),
        )
        .unwrap();
        let t = source.token(SystemTime::now()).unwrap();
        assert_eq!(t.secret().expose(), "tokenC");
        let seen = seen.lock().unwrap();
        let fields = form_fields(&seen[0].body);
        assert_eq!(
            field(&fields, "client_assertion_type"),
            Some(ASSERTION_TYPE)
        );
        assert_eq!(field(&fields, "client_secret"), None);
        let jwt = field(&fields, "client_assertion").unwrap();
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(
            decode_json(parts[0])["x5t"],
            URL_SAFE_NO_PAD.encode(CERT_SHA1).as_str()
        );
        assert_eq!(
            decode_json(parts[1])["aud"],
            settings.resolved_token_url().as_str()
        );
        let key = load_rsa_key(&Secret::new(KEY_PKCS8.into())).unwrap();
        UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, key.public().as_ref())
            .verify(
                format!("{}.{}", parts[0], parts[1]).as_bytes(),
                &URL_SAFE_NO_PAD.decode(parts[2]).unwrap(),
            )
            .unwrap();
    }

    #[test]
    fn server_from_another_ca_is_refused() {
        let server_ca = new_ca("server CA");
        let trusted = ca_file(&new_ca("the CA we trust"));
        let (addr, seen) = serve(&server_ca, vec![(200, token_json("never"))]);
        let mut source = TokenSource::new(
            local_settings(addr),
            ClientCredential::Secret(Secret::new(CLIENT_SECRET.into())),
            Some(trusted.path()),
            Duration::from_secs(10),
        )
        .unwrap();
        let err = source.token(SystemTime::now()).unwrap_err();
        assert!(matches!(err, OAuthError::Tls { .. }), "{err}");
        assert!(err.is_temporary());
        assert!(!err.to_string().contains(CLIENT_SECRET));
        assert!(seen.lock().unwrap().is_empty());
    }

    #[test]
    fn refused_connection_and_timeout_are_temporary() {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let ca = ca_file(&new_ca("any"));
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut source = TokenSource::new(
            local_settings(addr),
            ClientCredential::Secret(Secret::new(CLIENT_SECRET.into())),
            Some(ca.path()),
            Duration::from_secs(5),
        )
        .unwrap();
        let err = source.token(SystemTime::now()).unwrap_err();
        assert!(matches!(err, OAuthError::Connect { .. }), "{err}");
        assert!(err.is_temporary());

        // A listener that never answers.
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut source = TokenSource::new(
            local_settings(silent.local_addr().unwrap()),
            ClientCredential::Secret(Secret::new(CLIENT_SECRET.into())),
            Some(ca.path()),
            Duration::from_millis(300),
        )
        .unwrap();
        let err = source.token(SystemTime::now()).unwrap_err();
        assert!(matches!(err, OAuthError::Timeout { .. }), "{err}");
        assert!(err.is_temporary());
        drop(silent);
    }

    #[test]
    fn construction_checks() {
        let ca = ca_file(&new_ca("any"));
        let err = TokenSource::new(
            settings(),
            ClientCredential::Secret(Secret::new(String::new())),
            Some(ca.path()),
            Duration::from_secs(5),
        )
        .unwrap_err();
        assert!(matches!(
            err,
            OAuthError::InvalidSetting {
                key: "client_secret",
                ..
            }
        ));
        let not_pem = tempfile::NamedTempFile::new().unwrap();
        let err = TokenSource::new(
            settings(),
            ClientCredential::Secret(Secret::new("x".into())),
            Some(not_pem.path()),
            Duration::from_secs(5),
        )
        .unwrap_err();
        assert!(matches!(err, OAuthError::CaFile { .. }), "{err}");
        let err = TokenSource::new(
            settings(),
            ClientCredential::Certificate {
                key_pem: Secret::new("garbage".into()),
                certificate: cert_path(),
            },
            Some(ca.path()),
            Duration::from_secs(5),
        )
        .unwrap_err();
        assert!(matches!(err, OAuthError::Key { .. }), "{err}");
        let acct = AccountSecrets::default().with_client_secret(Secret::new("cs".into()));
        assert!(matches!(
            ClientCredential::from_account(&acct),
            Some(ClientCredential::Secret(_))
        ));
        let acct = acct.with_certificate(Secret::new(KEY_PKCS8.into()), cert_path());
        assert!(matches!(
            ClientCredential::from_account(&acct),
            Some(ClientCredential::Certificate { .. })
        ));
        assert!(ClientCredential::from_account(&AccountSecrets::default()).is_none());
    }
}
