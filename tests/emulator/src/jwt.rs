//! Client assertions (RFC 7523 JWTs, RS256/PS256) as Entra ID checks them: signature against the
//! app's registered key, `x5t`/`x5t#S256` thumbprint, `aud`, `iss`, `sub`, `exp` and `nbf`.
//! Also the minimal DER walking needed to get an RSA key out of a certificate or SPKI.
//!
//! The assertion is untrusted client input: every length is checked before slicing, and any
//! parse failure is a rejection, never a panic.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::signature;

use crate::config::Credential;

/// Why an assertion or registered key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssertionError {
    #[error("the client assertion is not a well-formed JWT: {0}")]
    Malformed(String),
    #[error("the client assertion uses algorithm {0}; Entra ID accepts RS256 or PS256")]
    Algorithm(String),
    #[error(
        "the certificate named by the assertion's thumbprint ({0}) is not registered on the application"
    )]
    UnknownKey(String),
    #[error("the client assertion's signature does not verify against the registered key")]
    Signature,
    #[error("the client assertion expired at {exp} (now {now})")]
    Expired { exp: i64, now: i64 },
    #[error("the client assertion is valid only from {nbf} (now {now})")]
    NotYetValid { nbf: i64, now: i64 },
    #[error("the client assertion's audience {0:?} is not this tenant's token endpoint")]
    Audience(String),
    #[error("the client assertion's iss/sub {0:?} is not the client_id")]
    Issuer(String),
    #[error("the client assertion has no {0} claim")]
    Missing(&'static str),
    #[error(
        "the registered key is unusable: {0}; register an RSA certificate or SubjectPublicKeyInfo"
    )]
    BadRegisteredKey(String),
}

/// The public half of a registered certificate or key.
#[derive(Debug, Clone)]
pub(crate) struct RegisteredKey {
    /// PKCS#1 RSAPublicKey, what ring verifies with.
    rsa_public_key: Vec<u8>,
    /// base64url SHA-1 and SHA-256 of the certificate DER, when registered as a certificate.
    thumbprints: Option<(String, String)>,
}

/// One DER TLV: tag, content, and the bytes after it.
fn der_next(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

const RSA_ENCRYPTION_OID: &[u8] = &[
    0x06, 0x09, 0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01, 0x01,
];

/// The PKCS#1 RSA key inside a SubjectPublicKeyInfo.
fn spki_rsa_key(spki: &[u8]) -> Result<Vec<u8>, AssertionError> {
    let bad = |w: &str| AssertionError::BadRegisteredKey(w.to_owned());
    let (tag, body, _) = der_next(spki).ok_or_else(|| bad("SPKI is not DER"))?;
    if tag != 0x30 {
        return Err(bad("SPKI is not a SEQUENCE"));
    }
    let (tag, alg, rest) = der_next(body).ok_or_else(|| bad("SPKI has no algorithm"))?;
    if tag != 0x30 || !alg.starts_with(RSA_ENCRYPTION_OID) {
        return Err(bad("the key is not RSA"));
    }
    let (tag, bits, _) = der_next(rest).ok_or_else(|| bad("SPKI has no key"))?;
    match (tag, bits.split_first()) {
        (0x03, Some((0, key))) => Ok(key.to_vec()),
        _ => Err(bad("SPKI key is not a BIT STRING")),
    }
}

/// The SubjectPublicKeyInfo TLV inside a certificate.
fn cert_spki(cert: &[u8]) -> Option<&[u8]> {
    let (_, body, _) = der_next(cert)?;
    let (_, tbs, _) = der_next(body)?;
    let mut rest = tbs;
    let (tag, _, r) = der_next(rest)?;
    if tag == 0xA0 {
        rest = r; // explicit version
    }
    // serialNumber, signature, issuer, validity, subject
    for _ in 0..5 {
        rest = der_next(rest)?.2;
    }
    let (_, _, after) = der_next(rest)?;
    Some(&rest[..rest.len() - after.len()])
}

/// The DER of the first CERTIFICATE block of a PEM text.
pub(crate) fn pem_cert_der(pem: &str) -> Option<Vec<u8>> {
    let start = pem.find("-----BEGIN CERTIFICATE-----")? + "-----BEGIN CERTIFICATE-----".len();
    let end = start + pem[start..].find("-----END CERTIFICATE-----")?;
    let b64: String = pem[start..end]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    STANDARD.decode(b64).ok()
}

impl RegisteredKey {
    pub(crate) fn from_credential(c: &Credential) -> Result<Option<RegisteredKey>, AssertionError> {
        match c {
            Credential::Secret(_) => Ok(None),
            Credential::PublicKeyDer(spki) => Ok(Some(RegisteredKey {
                rsa_public_key: spki_rsa_key(spki)?,
                thumbprints: None,
            })),
            Credential::CertificatePem(pem) => {
                let der = pem_cert_der(pem).ok_or_else(|| {
                    AssertionError::BadRegisteredKey("no CERTIFICATE in the PEM".into())
                })?;
                let spki = cert_spki(&der).ok_or_else(|| {
                    AssertionError::BadRegisteredKey("certificate is not DER".into())
                })?;
                let sha1 = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &der);
                let sha256 = ring::digest::digest(&ring::digest::SHA256, &der);
                Ok(Some(RegisteredKey {
                    rsa_public_key: spki_rsa_key(spki)?,
                    thumbprints: Some((
                        URL_SAFE_NO_PAD.encode(sha1),
                        URL_SAFE_NO_PAD.encode(sha256),
                    )),
                }))
            }
        }
    }
}

fn b64_json(part: &str, what: &str) -> Result<serde_json::Value, AssertionError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .map_err(|_| AssertionError::Malformed(format!("{what} is not base64url")))?;
    serde_json::from_slice(&bytes)
        .map_err(|_| AssertionError::Malformed(format!("{what} is not JSON")))
}

/// Verifies a client assertion for `client_id` at `tenant`'s token endpoint at time `now`
/// (Unix seconds).
pub(crate) fn verify_assertion(
    jwt: &str,
    key: &RegisteredKey,
    client_id: &str,
    tenant: &str,
    now: i64,
) -> Result<(), AssertionError> {
    let mut parts = jwt.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AssertionError::Malformed(
            "expected three dot-separated parts".into(),
        ));
    };
    let header = b64_json(h, "header")?;
    let claims = b64_json(p, "payload")?;
    let sig = URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| AssertionError::Malformed("signature is not base64url".into()))?;

    let alg = header.get("alg").and_then(|a| a.as_str()).unwrap_or("");
    let algorithm: &dyn signature::VerificationAlgorithm = match alg {
        "RS256" => &signature::RSA_PKCS1_2048_8192_SHA256,
        "PS256" => &signature::RSA_PSS_2048_8192_SHA256,
        other => return Err(AssertionError::Algorithm(other.to_owned())),
    };
    if let Some((sha1, sha256)) = &key.thumbprints {
        let named = header
            .get("x5t#S256")
            .or_else(|| header.get("x5t"))
            .and_then(|v| v.as_str());
        match named {
            Some(t) if t == sha1 || t == sha256 => {}
            Some(t) => return Err(AssertionError::UnknownKey(t.to_owned())),
            None => return Err(AssertionError::Missing("x5t")),
        }
    }
    let signed = &jwt[..h.len() + 1 + p.len()];
    // SECURITY: the token endpoint issues nothing unless the assertion verifies against the registered key.
    signature::UnparsedPublicKey::new(algorithm, &key.rsa_public_key)
        .verify(signed.as_bytes(), &sig)
        .map_err(|_| AssertionError::Signature)?;

    for claim in ["iss", "sub"] {
        let v = claims
            .get(claim)
            .and_then(|v| v.as_str())
            .ok_or(AssertionError::Missing(claim))?;
        if v != client_id {
            return Err(AssertionError::Issuer(v.to_owned()));
        }
    }
    let auds: Vec<&str> = match claims.get("aud") {
        Some(serde_json::Value::String(a)) => vec![a.as_str()],
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_str()).collect(),
        _ => return Err(AssertionError::Missing("aud")),
    };
    // The host is the test's token endpoint, not login.microsoftonline.com: check the path only.
    let token_path = format!("/{tenant}/oauth2/v2.0/token");
    let v2_issuer = format!("https://login.microsoftonline.com/{tenant}/v2.0");
    if !auds
        .iter()
        .any(|a| a.ends_with(&token_path) || *a == v2_issuer)
    {
        return Err(AssertionError::Audience(auds.join(" ")));
    }
    let exp = claims
        .get("exp")
        .and_then(|v| v.as_i64())
        .ok_or(AssertionError::Missing("exp"))?;
    if exp <= now {
        return Err(AssertionError::Expired { exp, now });
    }
    if let Some(nbf) = claims.get("nbf").and_then(|v| v.as_i64()) {
        // Entra tolerates five minutes of clock skew on the start.
        if nbf > now + 300 {
            return Err(AssertionError::NotYetValid { nbf, now });
        }
    }
    Ok(())
}

/// A self-signed certificate (PEM) for [`crate::testkey::TEST_RSA_KEY_PEM`], to register on a
/// test app.
pub fn test_certificate_pem() -> std::io::Result<String> {
    let key = rcgen::KeyPair::from_pem(crate::testkey::TEST_RSA_KEY_PEM)
        .map_err(std::io::Error::other)?;
    let mut params =
        rcgen::CertificateParams::new(Vec::<String>::new()).map_err(std::io::Error::other)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "relay365 test app");
    Ok(params
        .self_signed(&key)
        .map_err(std::io::Error::other)?
        .pem())
}

/// Signs a client assertion the way an Entra ID client does (RS256, `x5t` of `cert_pem`), for
/// the emulator's own tests and for benchmarks.
pub fn sign_client_assertion(
    key_pem: &str,
    cert_pem: &str,
    client_id: &str,
    audience: &str,
    lifetime_secs: i64,
) -> std::io::Result<String> {
    let der_of = |pem: &str, label: &str| -> Option<Vec<u8>> {
        let begin = format!("-----BEGIN {label}-----");
        let start = pem.find(&begin)? + begin.len();
        let end = start + pem[start..].find("-----END")?;
        STANDARD
            .decode(
                pem[start..end]
                    .chars()
                    .filter(|c| !c.is_whitespace())
                    .collect::<String>(),
            )
            .ok()
    };
    let bad = |w: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, w.to_owned());
    let key_der =
        der_of(key_pem, "PRIVATE KEY").ok_or_else(|| bad("key_pem has no PRIVATE KEY block"))?;
    let cert_der =
        pem_cert_der(cert_pem).ok_or_else(|| bad("cert_pem has no CERTIFICATE block"))?;
    let key = signature::RsaKeyPair::from_pkcs8(&key_der)
        .map_err(|e| bad(&format!("not an RSA PKCS#8 key: {e}")))?;
    let x5t = URL_SAFE_NO_PAD.encode(ring::digest::digest(
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        &cert_der,
    ));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64;
    let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "x5t": x5t});
    let claims = serde_json::json!({
        "aud": audience, "iss": client_id, "sub": client_id,
        "jti": format!("{:016x}", crate::replies::random_u64()),
        "nbf": now, "iat": now, "exp": now + lifetime_secs,
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let mut sig = vec![0; key.public().modulus_len()];
    key.sign(
        &signature::RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        signing_input.as_bytes(),
        &mut sig,
    )
    .map_err(|_| std::io::Error::other("RSA signing failed"))?;
    Ok(format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkey::TEST_RSA_KEY_PEM;

    const AUD: &str = "https://localhost:1/t1/oauth2/v2.0/token";

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    fn registered() -> (String, RegisteredKey) {
        let cert = test_certificate_pem().unwrap();
        let key = RegisteredKey::from_credential(&Credential::CertificatePem(cert.clone()))
            .unwrap()
            .unwrap();
        (cert, key)
    }

    #[test]
    fn accepts_a_good_assertion_and_rejects_tampering() {
        let (cert, key) = registered();
        let jwt = sign_client_assertion(TEST_RSA_KEY_PEM, &cert, "app1", AUD, 600).unwrap();
        assert_eq!(verify_assertion(&jwt, &key, "app1", "t1", now()), Ok(()));
        assert_eq!(
            verify_assertion(&jwt, &key, "app2", "t1", now()),
            Err(AssertionError::Issuer("app1".into()))
        );
        assert!(matches!(
            verify_assertion(&jwt, &key, "app1", "t2", now()),
            Err(AssertionError::Audience(_))
        ));
        assert!(matches!(
            verify_assertion(&jwt, &key, "app1", "t1", now() + 601),
            Err(AssertionError::Expired { .. })
        ));
        let mut parts: Vec<&str> = jwt.split('.').collect();
        let forged = URL_SAFE_NO_PAD.encode(
            serde_json::json!({"aud": AUD, "iss": "app1", "sub": "app1", "exp": now() + 99999})
                .to_string(),
        );
        parts[1] = &forged;
        assert_eq!(
            verify_assertion(&parts.join("."), &key, "app1", "t1", now()),
            Err(AssertionError::Signature)
        );
        assert!(matches!(
            verify_assertion("a.b", &key, "app1", "t1", now()),
            Err(AssertionError::Malformed(_))
        ));
    }

    #[test]
    fn spki_registration_and_wrong_thumbprint() {
        let (cert, key) = registered();
        let der = pem_cert_der(&cert).unwrap();
        let spki = cert_spki(&der).unwrap().to_vec();
        let by_spki = RegisteredKey::from_credential(&Credential::PublicKeyDer(spki))
            .unwrap()
            .unwrap();
        assert_eq!(by_spki.rsa_public_key, key.rsa_public_key);
        let other = crate::pki::Pki::new().unwrap().ca_pem();
        let jwt = sign_client_assertion(TEST_RSA_KEY_PEM, &other, "app1", AUD, 600).unwrap();
        assert_eq!(
            verify_assertion(&jwt, &by_spki, "app1", "t1", now()),
            Ok(())
        );
        assert!(matches!(
            verify_assertion(&jwt, &key, "app1", "t1", now()),
            Err(AssertionError::UnknownKey(_))
        ));
        // An EC certificate cannot be registered for RS256 assertions.
        assert!(RegisteredKey::from_credential(&Credential::CertificatePem(other)).is_err());
    }

    #[test]
    fn der_reader_is_total() {
        for input in [
            &[][..],
            &[0x30],
            &[0x30, 0x85, 1, 1, 1, 1, 1],
            &[0x30, 0x82, 0xff],
            &[0x30, 0x02, 0x01],
        ] {
            assert!(der_next(input).is_none());
        }
        assert!(cert_spki(&[0x30, 0x03, 0x30, 0x01, 0x00]).is_none());
    }
}
