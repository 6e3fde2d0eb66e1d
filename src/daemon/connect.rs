//! Connection set-up and login for an account: the names given to the server, the
//! credential for AUTH (the password, or an OAuth2 token fetched and refreshed once on
//! refusal), what a refused login means, and the one factory of an account's
//! [`Transport`] from its config. `relay365 check` uses the same pieces.
//!
//! Trusts the config and the secrets (read by [`crate::secrets`]); secrets are only
//! touched to build the AUTH exchange and never appear in a verdict or a log line.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::config::{Account, AuthMode, Config, Transport as Kind};
use crate::secrets::{AccountSecrets, Secret};
use crate::transport::Transport;
use crate::transport::capture::Capture;
use crate::transport::classify::{Action, HoldUntil, Verdict};
use crate::transport::graph::{Graph, GraphClient};
use crate::transport::oauth::{ClientCredential, TokenSource};
use crate::transport::proxy::HttpProxy;
use crate::transport::smtp::{Dial, Endpoint, Failure, Login, Session, Submission};

/// The transport an account's config names, for one account worker.
pub fn transport_for(
    account: &Account,
    config: &Config,
    secrets: Option<AccountSecrets>,
) -> Box<dyn Transport> {
    match &account.transport {
        Kind::Maildir(dir) => Box::new(Capture::new(dir.clone())),
        Kind::Graph => Box::new(Graph::new(
            GraphClient::for_account(account, secrets.as_ref(), &config.secrets_file),
            account.graph.host().to_owned(),
        )),
        Kind::Smtp => Box::new(Submission::new(Box::new(AccountLogin::new(
            account.clone(),
            config.secrets_file.clone(),
            secrets,
        )))),
    }
}

/// The OAuth2 token client of an account for `settings`, through the account's proxy
/// for the token endpoint's host, if it has one. `Err` says what is wrong.
pub fn token_source(
    account: &Account,
    secrets: Option<&AccountSecrets>,
    settings: crate::config::oauth::OAuthSettings,
    cred: ClientCredential,
) -> Result<TokenSource, String> {
    let url = settings.resolved_token_url();
    let host = url
        .split_once("://")
        .map_or("", |(_, r)| r)
        .split(['/', ':'])
        .next()
        .unwrap_or("")
        .to_owned();
    let proxy = match HttpProxy::for_account(account, secrets, &host) {
        Some(p) => Some(p.for_ureq().map_err(|e| e.to_string())?),
        None => None,
    };
    TokenSource::new_via(
        settings,
        cred,
        account.ca_file.as_deref(),
        account.timeout,
        proxy,
    )
    .map_err(|e| e.to_string())
}

/// The short host name, for display names and the DSN's reporting MTA.
pub fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".to_string())
}

/// The name given in EHLO: the account's `helo_name`, else this host's fully
/// qualified name (servers may refuse a bare one), else the short name.
pub fn helo_name(account: &Account) -> String {
    account
        .helo_name
        .clone()
        .or_else(crate::config::host_fqdn)
        .unwrap_or_else(host_name)
}

/// Where and how the account connects, greeting with `helo`, through `proxy` if any.
pub fn endpoint<'a>(
    account: &'a Account,
    helo: &'a str,
    proxy: Option<&'a HttpProxy>,
) -> Endpoint<'a> {
    Endpoint {
        proxy,
        host: &account.host,
        port: account.port,
        tls: account.tls,
        ca_file: account.ca_file.as_deref(),
        timeout: account.timeout,
        helo_name: helo,
    }
}

/// The AUTH exchange for the account's mode with `secret` (none: no AUTH).
pub fn login<'a>(account: &'a Account, secret: Option<&'a Secret>) -> Login<'a> {
    let user = &account.mailbox;
    match (&account.auth, secret) {
        (AuthMode::Login, Some(s)) => Login::Login { user, password: s },
        (AuthMode::Plain, Some(s)) => Login::Plain { user, password: s },
        (AuthMode::Xoauth2, Some(s)) => Login::Xoauth2 { user, token: s },
        _ => Login::None,
    }
}

/// The credentials of one account, with its OAuth2 token cache.
struct Credentials {
    secrets: Option<AccountSecrets>,
    tokens: Option<TokenSource>,
    secrets_file: PathBuf,
}

impl Credentials {
    /// The credential for AUTH, fetching an OAuth2 token when needed.
    fn secret(&mut self, account: &Account, now: SystemTime) -> Result<Option<Secret>, Verdict> {
        let hold = |fix: String| Verdict {
            action: Action::HoldAccount {
                until: HoldUntil::Release,
                fix: fix.clone(),
            },
            reason: fix,
        };
        match account.auth {
            AuthMode::None => Ok(None),
            AuthMode::Login | AuthMode::Plain => self
                .secrets
                .as_ref()
                .and_then(|s| s.password())
                .cloned()
                .map(Some)
                .ok_or_else(|| hold(format!("no password for account {} in the secrets file: add [{}] password = \"...\" to {}", account.name, account.name, self.secrets_file.display()))),
            AuthMode::Xoauth2 => {
                if self.tokens.is_none() {
                    let Some(settings) = account.oauth.clone() else {
                        return Err(hold(format!("account {} has no [account.oauth] settings", account.name)));
                    };
                    let Some(cred) = self.secrets.as_ref().and_then(ClientCredential::from_account) else {
                        return Err(hold(format!("no client_secret or certificate for account {} in the secrets file: add [{}] client_secret = \"...\" to {}", account.name, account.name, self.secrets_file.display())));
                    };
                    let ts = token_source(account, self.secrets.as_ref(), settings, cred)
                        .map_err(hold)?;
                    self.tokens = Some(ts);
                }
                let Some(ts) = self.tokens.as_mut() else {
                    return Ok(None);
                };
                let token = ts.token(now);
                if token.is_err() {
                    crate::daemon::metrics::count_token_failure(&account.name);
                }
                match token {
                    Ok(t) => Ok(Some(t.secret().clone())),
                    Err(e) if e.is_temporary() => Err(Verdict {
                        action: Action::Defer { hint: None },
                        reason: format!("cannot get an OAuth2 token: {e}"),
                    }),
                    Err(e) => Err(hold(format!("cannot get an OAuth2 token: {e}"))),
                }
            }
        }
    }
}

/// Opens authenticated sessions for one account: the SMTP transport's [`Dial`].
pub struct AccountLogin {
    account: Account,
    credentials: Credentials,
    proxy: Option<HttpProxy>,
}

impl AccountLogin {
    pub fn new(
        account: Account,
        secrets_file: PathBuf,
        secrets: Option<AccountSecrets>,
    ) -> AccountLogin {
        let proxy = HttpProxy::for_account(&account, secrets.as_ref(), &account.host);
        AccountLogin {
            proxy,
            account,
            credentials: Credentials {
                secrets,
                tokens: None,
                secrets_file,
            },
        }
    }

    /// Opens and authenticates a session, refreshing an OAuth2 token once on 535 or on
    /// High Volume Email's `501 5.5.12x` (both classify as [`Action::AuthFailed`]).
    pub fn open_session(&mut self, now: SystemTime) -> Result<Session, Verdict> {
        let helo = helo_name(&self.account);
        let ep = endpoint(&self.account, &helo, self.proxy.as_ref());
        let mut refreshed = false;
        loop {
            let secret = self.credentials.secret(&self.account, now)?;
            let mut session = Session::open(&ep).map_err(|f| f.verdict())?;
            match session.authenticate(&login(&self.account, secret.as_ref())) {
                Ok(()) => return Ok(session),
                Err(f) => {
                    let v = f.verdict();
                    if v.action == Action::AuthFailed
                        && self.account.auth == AuthMode::Xoauth2
                        && !refreshed
                    {
                        refreshed = true;
                        if let Some(t) = self.credentials.tokens.as_mut() {
                            t.invalidate();
                        }
                        continue;
                    }
                    if v.action == Action::AuthFailed {
                        let file = &self.credentials.secrets_file;
                        return Err(auth_rejected(&self.account, file, &f));
                    }
                    return Err(v);
                }
            }
        }
    }
}

impl Dial for AccountLogin {
    fn dial(&mut self, now: SystemTime) -> Result<Session, Verdict> {
        self.open_session(now)
    }
}

/// The hold for credentials the server refused for good: a password is wrong, or a
/// token was refused even after one refresh. The classifier's generic reason promises
/// a token refresh, which here has already happened or does not apply, and names no
/// fix; this one says what to change and how to resume.
pub fn auth_rejected(account: &Account, secrets_file: &Path, f: &Failure) -> Verdict {
    let name = &account.name;
    let hve = |d: u16| f.reply.as_ref().is_some_and(|r| r.mentions((5, 5, d)));
    let hve_any = f
        .reply
        .as_ref()
        .is_some_and(|r| r.code == 501 && r.mentions_range(5, 5, 120, 129));
    let fix = match account.auth {
        _ if hve(124) => format!(
            "the High Volume Email endpoint says the user address {} is not valid (501 5.5.124): \
             mailbox = must be the HVE account's own SMTP address, and the app needs Mail.Send and \
             Add-HVEAppAccess for it; then run relay365 account release {name}",
            account.mailbox
        ),
        _ if hve_any => format!(
            "the High Volume Email endpoint refused even a freshly fetched token (it refuses tokens \
             about 10 minutes before they expire): check this host's clock (NTP) and the token \
             lifetime of the app registration, then run relay365 account release {name}"
        ),
        AuthMode::Xoauth2 => format!(
            "the server refused a freshly fetched OAuth2 token for {}: check that the app \
             registration has SMTP.SendAsApp with admin consent, that its service principal \
             exists (New-ServicePrincipal) and has FullAccess on the mailbox \
             (Add-MailboxPermission), then run relay365 account release {name}",
            account.mailbox
        ),
        _ => format!(
            "the server refused the password of {}: correct password in the [{name}] table \
             of {}, then run relay365 account release {name}",
            account.mailbox,
            secrets_file.display()
        ),
    };
    Verdict {
        action: Action::AuthFailed,
        reason: format!("{fix} (server said: {f})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::classify::Stage;
    use crate::transport::reply::Reply;

    fn account(auth: &str) -> Account {
        let oauth = "[account.oauth]\ntenant = \"contoso.onmicrosoft.com\"\nclient_id = \"x\"\n";
        let text = format!(
            "domain = \"a.b\"\n[[account]]\nname = \"app\"\nmailbox = \"app@contoso.com\"\nauth = \"{auth}\"\n{oauth}"
        );
        crate::config::Config::from_toml(std::path::Path::new("/t.toml"), &text)
            .unwrap()
            .accounts
            .remove(0)
    }

    fn refused() -> Failure {
        Failure {
            stage: Stage::Auth,
            reply: Reply::parse("535 5.7.8 Error: authentication failed: authentication failure")
                .ok(),
            detail: String::new(),
            decided: None,
        }
    }

    // Regression: a wrong password held the account with "refreshing the OAuth2 token
    // once" as the reason, which neither applies to passwords nor says what to fix.
    #[test]
    fn a_refused_password_holds_with_the_fix() {
        let v = auth_rejected(
            &account("login"),
            std::path::Path::new("/etc/relay365/secrets.toml"),
            &refused(),
        );
        assert_eq!(v.action, Action::AuthFailed);
        assert!(!v.reason.contains("OAuth2"), "{}", v.reason);
        assert!(
            v.reason
                .contains("[app] table of /etc/relay365/secrets.toml"),
            "{}",
            v.reason
        );
        assert!(
            v.reason.contains("relay365 account release app"),
            "{}",
            v.reason
        );
        assert!(v.reason.contains("535 5.7.8"), "{}", v.reason);
    }

    #[test]
    fn a_repeated_high_volume_email_501_holds_with_its_own_fix() {
        for (raw, needle) in [
            (
                "501 5.5.127 Invalid XOAUTH2 auth data - Token will expire soon",
                "clock",
            ),
            (
                "501 5.5.124 Invalid XOAUTH2 auth data - User address provided is not valid",
                "Add-HVEAppAccess",
            ),
        ] {
            let f = Failure {
                reply: Reply::parse(raw).ok(),
                ..refused()
            };
            let v = auth_rejected(
                &account("xoauth2"),
                std::path::Path::new("/etc/relay365/secrets.toml"),
                &f,
            );
            assert_eq!(v.action, Action::AuthFailed);
            assert!(v.reason.contains(needle), "{}", v.reason);
            assert!(
                v.reason.contains("relay365 account release app"),
                "{}",
                v.reason
            );
        }
    }

    #[test]
    fn a_refused_fresh_token_holds_with_the_permissions_to_check() {
        let v = auth_rejected(
            &account("xoauth2"),
            std::path::Path::new("/etc/relay365/secrets.toml"),
            &refused(),
        );
        assert!(!v.reason.contains("refreshing"), "{}", v.reason);
        assert!(v.reason.contains("SMTP.SendAsApp"), "{}", v.reason);
        assert!(v.reason.contains("Add-MailboxPermission"), "{}", v.reason);
        assert!(
            v.reason.contains("relay365 account release app"),
            "{}",
            v.reason
        );
    }
}
