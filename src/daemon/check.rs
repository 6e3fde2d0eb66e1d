//! `relay365 check`: validates the configuration, the secrets (permissions included),
//! the spool, then for each account fetches a token, connects, secures the connection
//! and authenticates — and says in plain words what is wrong and how to fix it; with a
//! `quota_store`, checks the store too (reachable, authenticated, the ledger script
//! loaded, the clock offset).
//! Sends no mail.

use std::time::SystemTime;

use crate::config::store::{STORE_SECRETS_TABLE, StoreSettings};
use crate::config::{Account, AuthMode, Config, Transport};
use crate::daemon::connect::{auth_rejected, endpoint, helo_name, login, token_source};
use crate::quota::redis;
use crate::secrets::Secrets;
use crate::spool::paths::Spool;
use crate::transport::classify::{self, Action};
use crate::transport::graph::{GraphClient, Method};
use crate::transport::oauth::ClientCredential;
use crate::transport::smtp::Session;

/// One line of the report.
pub struct Finding {
    pub ok: bool,
    pub text: String,
}

fn ok(text: String) -> Finding {
    Finding { ok: true, text }
}

fn bad(text: String) -> Finding {
    Finding { ok: false, text }
}

/// Runs every check; the caller prints the findings and fails if any is not ok.
pub fn check(config: &Config) -> Vec<Finding> {
    let mut out = vec![ok(format!("config {} is valid", config.path.display()))];
    let spool = Spool::new(&config.spool_dir);
    let problems = crate::spool::init::verify(&spool);
    if problems.is_empty() {
        out.push(ok(format!(
            "spool {} matches the path table",
            spool.root().display()
        )));
    } else {
        out.extend(problems.into_iter().map(bad));
    }
    if let Some(settings) = &config.quota_store {
        out.extend(store_findings(config, settings));
    }
    if config.accounts.is_empty() {
        out.push(bad(
            "no [[account]] is configured: add one to relay365.toml (see relay365.toml(5))".into(),
        ));
        return out;
    }
    if config
        .accounts
        .iter()
        .any(|a| a.proxy == crate::config::Proxy::FromEnvironment)
    {
        for n in ["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"] {
            let Ok(v) = std::env::var(n) else { continue };
            if v.trim().is_empty() {
                continue;
            }
            if let Err(why) = crate::config::graph::ProxySettings::parse(v.trim()) {
                out.push(bad(format!(
                    "{n} in the environment is not a proxy relay365 can use ({why}); it is ignored: fix it, or set proxy in relay365.toml"
                )));
            }
        }
    }
    let needs = config.accounts.iter().any(Account::needs_secrets);
    let creds_dir = std::env::var_os("CREDENTIALS_DIRECTORY").map(std::path::PathBuf::from);
    let secrets = if needs {
        match Secrets::load(&config.secrets_file, creds_dir.as_deref()) {
            Ok(s) => {
                out.push(ok(format!(
                    "secrets {} are readable by this user only",
                    config.secrets_file.display()
                )));
                s
            }
            Err(e) => {
                out.push(bad(e.to_string()));
                return out;
            }
        }
    } else {
        Secrets::default()
    };
    for a in &config.accounts {
        if let Transport::Maildir(dir) = &a.transport {
            out.push(ok(format!(
                "account {}: captures into the Maildir {} (sends nothing)",
                a.name,
                dir.display()
            )));
            continue;
        }
        let s = secrets.for_account(&a.name);
        if a.transport == Transport::Graph || a.harvest_bounces {
            out.extend(check_graph(a, s, config));
        }
        if a.transport == Transport::Graph {
            continue;
        }
        let secret = match a.auth {
            AuthMode::None => None,
            AuthMode::Login | AuthMode::Plain => match s.and_then(|s| s.password()) {
                Some(p) => Some(p.clone()),
                None => {
                    out.push(bad(format!(
                        "account {}: no password in {}: add [{}] password = \"...\"",
                        a.name,
                        config.secrets_file.display(),
                        a.name
                    )));
                    continue;
                }
            },
            AuthMode::Xoauth2 => {
                let (Some(settings), Some(cred)) =
                    (a.oauth.clone(), s.and_then(ClientCredential::from_account))
                else {
                    out.push(bad(format!("account {}: no client_secret or certificate in {}: add [{}] client_secret = \"...\"", a.name, config.secrets_file.display(), a.name)));
                    continue;
                };
                let fetched = token_source(a, s, settings, cred)
                    .and_then(|mut t| t.token(SystemTime::now()).map_err(|e| e.to_string()));
                match fetched {
                    Ok(t) => {
                        out.push(ok(format!("account {}: OAuth2 token fetched", a.name)));
                        Some(t.secret().clone())
                    }
                    Err(e) => {
                        out.push(bad(format!("account {}: {e}", a.name)));
                        continue;
                    }
                }
            }
        };
        let helo = helo_name(a);
        let proxy = crate::transport::proxy::HttpProxy::for_account(a, s, &a.host);
        let mut session = match Session::open(&endpoint(a, &helo, proxy.as_ref())) {
            Ok(s) => s,
            Err(f) => {
                out.push(bad(format!(
                    "account {}: cannot connect to {}:{}: {f}",
                    a.name, a.host, a.port
                )));
                continue;
            }
        };
        match session.authenticate(&login(a, secret.as_ref())) {
            Ok(()) => out.push(ok(format!(
                "account {}: connected to {} with TLS and authenticated as {}",
                a.name, session.relay, a.mailbox
            ))),
            Err(f) => {
                let advice = match f.reply.as_ref().map(|r| classify::classify(r, f.stage)) {
                    Some(v) if v.action == Action::AuthFailed => {
                        auth_rejected(a, &config.secrets_file, &f).reason
                    }
                    Some(v) => v.reason,
                    None => f.to_string(),
                };
                out.push(bad(format!(
                    "account {}: authentication failed: {advice}",
                    a.name
                )));
            }
        }
        session.quit();
    }
    out
}

/// A Graph account (or one that harvests bounces): the token and its roles, then a
/// read of the mailbox, each with what to fix in plain words.
fn check_graph(
    a: &Account,
    s: Option<&crate::secrets::AccountSecrets>,
    config: &Config,
) -> Vec<Finding> {
    let name = &a.name;
    let mut out = Vec::new();
    let mut client = match GraphClient::for_account(a, s, &config.secrets_file) {
        Ok(c) => c,
        Err(v) => return vec![bad(format!("account {name}: {}", v.reason))],
    };
    let now = SystemTime::now();
    let roles = match client.roles(now) {
        Ok(r) => r,
        Err(v) => return vec![bad(format!("account {name}: {}", v.reason))],
    };
    out.push(ok(format!(
        "account {name}: Microsoft Graph token fetched; the app's application permissions: {}",
        if roles.is_empty() {
            "none".to_owned()
        } else {
            roles.join(", ")
        }
    )));
    let has = |r: &str| roles.iter().any(|x| x.eq_ignore_ascii_case(r));
    if a.transport == Transport::Graph && !has("Mail.Send") {
        out.push(bad(format!(
            "account {name}: the app lacks the Mail.Send application permission: add it under Entra ID > App registrations > API permissions > Microsoft Graph > Application permissions and grant admin consent"
        )));
    }
    let reads = has("Mail.Read") || has("Mail.ReadWrite");
    if a.harvest_bounces && !has("Mail.ReadWrite") {
        out.push(bad(format!(
            "account {name}: harvest_bounces needs the Mail.ReadWrite application permission (to read NDRs and mark or move them): add it with admin consent"
        )));
    }
    if !reads {
        out.push(ok(format!(
            "account {name}: without Mail.Read the mailbox cannot be read to check the application access policy; a refusal shows at the first message (403 ErrorAccessDenied)"
        )));
        return out;
    }
    let url = client.url("/mailFolders/inbox");
    match client.call(Method::Get, &url, None, b"", now) {
        Ok(answer) if answer.ok() => out.push(ok(format!(
            "account {name}: read the inbox of {} through Microsoft Graph",
            a.mailbox
        ))),
        Ok(answer) => out.push(bad(format!(
            "account {name}: reading the mailbox failed: {}",
            answer.verdict().reason
        ))),
        Err(v) => out.push(bad(format!("account {name}: {}", v.reason))),
    }
    out
}

/// A host clock further than this from the store's is reported: decisions use the
/// store's clock, but freezes, `mailq` and the fallback ledger use ours.
const MAX_CLOCK_OFFSET_MS: i64 = 60_000;

/// The quota store: reachable, authenticated, script loaded, clock offset; once per
/// mailbox.
fn store_findings(config: &Config, settings: &StoreSettings) -> Vec<Finding> {
    let mut out = Vec::new();
    let creds_dir = std::env::var_os("CREDENTIALS_DIRECTORY").map(std::path::PathBuf::from);
    let password = if creds_dir.is_some() || config.secrets_file.exists() {
        match Secrets::load(&config.secrets_file, creds_dir.as_deref()) {
            Ok(s) => s
                .for_account(STORE_SECRETS_TABLE)
                .and_then(|s| s.password().cloned()),
            Err(e) => {
                out.push(bad(format!("quota store {}: {e}", settings.url)));
                return out;
            }
        }
    } else {
        None
    };
    let mut seen = Vec::new();
    for a in &config.accounts {
        if seen.contains(&a.mailbox) {
            continue;
        }
        seen.push(a.mailbox.clone());
        match redis::probe(settings, password.clone(), &a.mailbox, &a.limits) {
            Ok(p) => {
                out.push(ok(format!(
                    "quota store {} for {}: reachable{}, script {} {}, round trip {} ms",
                    settings.url,
                    a.mailbox,
                    if password.is_some() {
                        " and authenticated"
                    } else {
                        ""
                    },
                    &p.script_hash[..12.min(p.script_hash.len())],
                    if p.script_was_loaded {
                        "loaded"
                    } else {
                        "loaded now"
                    },
                    p.round_trip.as_millis()
                )));
                let line = format!(
                    "quota store {}: this host's clock is {} ms off the store's",
                    settings.url, p.offset_ms
                );
                if p.offset_ms.abs() > MAX_CLOCK_OFFSET_MS {
                    out.push(bad(format!(
                        "{line}: decisions use the store's clock, but freezes and mailq use this one; run chrony or systemd-timesyncd"
                    )));
                } else {
                    out.push(ok(line));
                }
            }
            Err(e) => out.push(bad(format!(
                "{e} (fleet_size = {}: until it answers each host keeps to 1/{} of each limit)",
                settings.fleet_size, settings.fleet_size
            ))),
        }
    }
    out
}
