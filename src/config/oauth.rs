//! The `[account.oauth]` settings of an app registration: tenant, client ID, token URL
//! and scope, with their defaults and the checks the token client applies before use.
//!
//! Trust: read from root's world-readable config file; nothing here is secret. Every
//! value ends up in an HTTPS request, so each is checked strictly ([`OAuthSettings::validate`]).

use serde::Deserialize;

/// Microsoft's v2.0 token endpoint; `{tenant}` is replaced by [`OAuthSettings::tenant`].
pub const DEFAULT_TOKEN_URL: &str = "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token";
/// The app-only scope for SMTP AUTH to Exchange Online.
pub const DEFAULT_SCOPE: &str = "https://outlook.office365.com/.default";

fn default_token_url() -> String {
    DEFAULT_TOKEN_URL.to_owned()
}

fn default_scope() -> String {
    DEFAULT_SCOPE.to_owned()
}

/// The `[account.oauth]`-style settings of an app registration (not secret: they may live in
/// the world-readable config).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuthSettings {
    /// Directory (tenant) ID or a verified domain, e.g. `contoso.onmicrosoft.com`.
    pub tenant: String,
    /// Application (client) ID of the app registration.
    pub client_id: String,
    /// Token endpoint; `{tenant}` is substituted.
    #[serde(default = "default_token_url")]
    pub token_url: String,
    /// Scope requested; Exchange Online's `.default` unless using another resource.
    #[serde(default = "default_scope")]
    pub scope: String,
}

impl OAuthSettings {
    /// Settings with the default token URL and scope.
    pub fn new(tenant: impl Into<String>, client_id: impl Into<String>) -> Self {
        OAuthSettings {
            tenant: tenant.into(),
            client_id: client_id.into(),
            token_url: default_token_url(),
            scope: default_scope(),
        }
    }

    /// The token URL with `{tenant}` substituted.
    pub fn resolved_token_url(&self) -> String {
        self.token_url.replace("{tenant}", &self.tenant)
    }

    /// Checks each setting; the token client refuses settings that fail.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        let invalid = |key, problem| Err(InvalidSetting { key, problem });
        // SECURITY: the tenant is pasted into the URL, so only host/path-safe characters pass.
        if self.tenant.is_empty()
            || !self
                .tenant
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        {
            return invalid(
                "tenant",
                "must be the Directory (tenant) ID or a verified domain such as contoso.onmicrosoft.com (Entra ID > Overview)",
            );
        }
        if self.client_id.is_empty()
            || !self
                .client_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
        {
            return invalid(
                "client_id",
                "must be the Application (client) ID of the app registration (Entra ID > App registrations > Overview)",
            );
        }
        let url = self.resolved_token_url();
        // SECURITY: the client secret travels in this request; never over plain HTTP.
        if !url
            .get(..8)
            .is_some_and(|s| s.eq_ignore_ascii_case("https://"))
            || url.bytes().any(|b| b <= b' ' || b == 0x7f)
        {
            return invalid(
                "token_url",
                "must be an https:// URL without spaces; the default is https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token",
            );
        }
        if self.scope.is_empty() || self.scope.bytes().any(|b| b < b' ' || b == 0x7f) {
            return invalid(
                "scope",
                "must be a scope such as https://outlook.office365.com/.default",
            );
        }
        Ok(())
    }
}

/// A setting that cannot be used, and what it must be instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("OAuth2 setting {key} {problem}")]
pub struct InvalidSetting {
    pub key: &'static str,
    pub problem: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_defaults_and_unknown_keys() {
        let s: OAuthSettings =
            toml::from_str("tenant = \"contoso.onmicrosoft.com\"\nclient_id = \"abc\"\n").unwrap();
        assert_eq!(s.scope, DEFAULT_SCOPE);
        assert_eq!(
            s.resolved_token_url(),
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
        );
        assert!(
            toml::from_str::<OAuthSettings>("tenant = \"t\"\nclient_id = \"c\"\nscop = \"x\"\n")
                .is_err()
        );
        assert!(s.validate().is_ok());
        let mut bad = s.clone();
        bad.tenant = "evil.com/x?".into();
        assert!(matches!(
            bad.validate(),
            Err(InvalidSetting { key: "tenant", .. })
        ));
        let mut bad = s.clone();
        bad.token_url = "http://login.microsoftonline.com/{tenant}/oauth2/v2.0/token".into();
        assert!(matches!(
            bad.validate(),
            Err(InvalidSetting {
                key: "token_url",
                ..
            })
        ));
    }
}
