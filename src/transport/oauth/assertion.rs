//! The certificate credential of the OAuth2 client: loading the RSA key, the certificate's
//! `x5t` thumbprint, and the RS256 JWT client assertion signed with the key (RFC 7523,
//! as the Microsoft identity platform takes it).
//!
//! Trust: the key comes from the secrets module (its file checks done) and the
//! certificate from root's configuration; neither the key nor the signed assertion ever
//! appears in an error message.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::{self, PemObject};

use super::OAuthError;
use crate::secrets::Secret;
use crate::transport::tls::{pem_certificates, read_pem_file};

/// How long a client assertion is valid (Microsoft accepts up to 10 minutes' skew anyway).
const ASSERTION_LIFETIME_SECS: u64 = 600;
pub(super) const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Parses a PKCS#8 or PKCS#1 RSA private key from PEM.
pub(super) fn load_rsa_key(pem: &Secret) -> Result<RsaKeyPair, String> {
    let key = PrivateKeyDer::from_pem_slice(pem.expose().as_bytes()).map_err(|e| match e {
        pem::Error::NoItemsFound => {
            "holds no private key: expected -----BEGIN PRIVATE KEY----- or -----BEGIN RSA PRIVATE KEY-----"
                .to_owned()
        }
        _ => "is not valid PEM".to_owned(),
    })?;
    let parsed = match &key {
        PrivateKeyDer::Pkcs8(k) => RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()),
        PrivateKeyDer::Pkcs1(k) => RsaKeyPair::from_der(k.secret_pkcs1_der()),
        _ => {
            return Err(
                "is not an RSA key; the client assertion is signed with RS256: create one with openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048"
                    .to_owned(),
            );
        }
    };
    // ring's reason is a fixed word such as "InvalidEncoding" or "TooSmall": safe to show.
    parsed
        .map_err(|e| format!("is not a usable RSA key ({e}): use an RSA key of 2048 to 4096 bits"))
}

/// `x5t`: base64url of the SHA-1 of the first certificate's DER, which is how Entra ID
/// finds the uploaded certificate that must verify the assertion.
pub(super) fn certificate_thumbprint(path: &Path) -> Result<String, OAuthError> {
    let bad = |problem: String| OAuthError::Certificate {
        path: path.to_path_buf(),
        problem,
    };
    let data = read_pem_file(path).map_err(bad)?;
    let certs = pem_certificates(&data).map_err(bad)?;
    let first = certs.first().ok_or_else(|| {
        bad("holds no -----BEGIN CERTIFICATE----- block: give the certificate uploaded to the app registration".to_owned())
    })?;
    let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, first.as_ref());
    Ok(URL_SAFE_NO_PAD.encode(digest.as_ref()))
}

/// Formats 16 random bytes as a version-4 UUID, the form Microsoft's examples use for `jti`.
fn uuid_v4(mut bytes: [u8; 16]) -> String {
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// The RS256 JWT client assertion: header {alg, typ, x5t}, claims aud = token URL,
/// iss = sub = client_id, jti, nbf = iat = now, exp = now + 10 minutes.
pub(super) fn client_assertion(
    key: &RsaKeyPair,
    rng: &SystemRandom,
    x5t: &str,
    client_id: &str,
    audience: &str,
    now: SystemTime,
    jti: [u8; 16],
) -> Result<Secret, OAuthError> {
    let now = now
        .duration_since(UNIX_EPOCH)
        .map_err(|_| OAuthError::Signing {
            problem: "the system clock is before 1970: fix the clock (NTP)",
        })?
        .as_secs();
    let header = serde_json::json!({ "alg": "RS256", "typ": "JWT", "x5t": x5t });
    let claims = serde_json::json!({
        "aud": audience,
        "iss": client_id,
        "sub": client_id,
        "jti": uuid_v4(jti),
        "nbf": now,
        "iat": now,
        "exp": now + ASSERTION_LIFETIME_SECS,
    });
    let mut jwt = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let mut signature = vec![0u8; key.public().modulus_len()];
    key.sign(&RSA_PKCS1_SHA256, rng, jwt.as_bytes(), &mut signature)
        .map_err(|_| OAuthError::Signing {
            problem: "ring refused to sign with the key: check certificate_key",
        })?;
    jwt.push('.');
    jwt.push_str(&URL_SAFE_NO_PAD.encode(&signature));
    Ok(Secret::new(jwt))
}
