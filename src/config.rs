//! The configuration file `/etc/relay365/relay365.toml`: typed with serde, every key
//! documented in `etc/relay365.toml`. World-readable and free of secrets.
//!
//! Trusts the file as far as its owner (root) goes, but refuses any unknown key or bad
//! value with the file, line and key named, so a typo never silently changes behaviour.

pub mod access;
pub mod graph;
pub mod limits;
pub mod listener;
pub mod oauth;
pub mod store;

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use self::limits::{Limits, Rate};
use crate::message::rewrite::FromPolicy;
use crate::spool::paths;
use graph::{GraphSettings, ProxySettings, RawGraph};
use oauth::OAuthSettings;
use store::StoreSettings;

impl crate::sysexits::ExitStatus for ConfigError {
    fn exit(&self) -> crate::sysexits::Exit {
        crate::sysexits::Exit::Config
    }
}

/// Errors loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "cannot read the config file {path}: {source} (check that it exists and is readable; another file can be named with -C)"
    )]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        message: String,
    },
    #[error(
        "no mail domain: set domain = \"example.com\" in {path}, or write the domain into /etc/mailname"
    )]
    NoDomain { path: PathBuf },
}

/// A byte size, written as a number of bytes or with a K, M or G suffix ("35M").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses "35M", "1024", "64K", "1G" (powers of 1000, as Microsoft states its limits).
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let (digits, mult) = match t.char_indices().last() {
            Some((i, c)) if c.is_ascii_alphabetic() => {
                let mult = match c.to_ascii_uppercase() {
                    'K' => 1_000,
                    'M' => 1_000_000,
                    'G' => 1_000_000_000,
                    _ => return Err(format!("unknown size suffix in {s:?}: use K, M or G")),
                };
                (&t[..i], mult)
            }
            _ => (t, 1),
        };
        let n: u64 = digits
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not a size such as 35M or 1048576"))?;
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("{s:?} is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        if n >= 1_000_000 && n.is_multiple_of(1_000_000) {
            write!(f, "{}M", n / 1_000_000)
        } else if n >= 1_000 && n.is_multiple_of(1_000) {
            write!(f, "{}K", n / 1_000)
        } else {
            write!(f, "{n} bytes")
        }
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size in bytes, or a string such as \"35M\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A duration written with a unit: `30s`, `5m`, `1h`, `5d` (a bare number is seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span(pub Duration);

impl Span {
    /// Parses `N`, `Ns`, `Nm`, `Nh` or `Nd`; at least one second.
    pub fn parse(s: &str) -> Result<Span, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (number, unit) = t.split_at(split);
        let unit_secs: u64 = match unit {
            "" | "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            _ => {
                return Err(format!(
                    "{s:?}: the unit must be s, m, h or d, as in 30s or 5d"
                ));
            }
        };
        let secs = number
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(unit_secs))
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("{s:?} is not a duration such as 30s, 5m, 1h or 5d"))?;
        Ok(Span(Duration::from_secs(secs)))
    }
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Span::parse(&s).map_err(de::Error::custom)
    }
}

/// How the connection to the server is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Plain connect, then STARTTLS (port 587; Microsoft's submission endpoint).
    Starttls,
    /// TLS from the first byte (port 465).
    Tls,
    /// No TLS: refused unless the host is a loopback address (tests).
    None,
}

/// How the account authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    Xoauth2,
    Login,
    Plain,
    None,
}

/// Where an account's mail goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// SMTP submission (the default).
    Smtp,
    /// A local Maildir: capture instead of sending (staging servers, the demo).
    Maildir(PathBuf),
    /// Microsoft Graph `sendMail` over HTTPS (`[account.graph]`).
    Graph,
}

/// Which HTTP proxy an account's connections go through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proxy {
    /// The one `proxy` names (on the account, else at the top level).
    Configured(ProxySettings),
    /// `proxy = "none"`: straight to Microsoft, whatever the environment says.
    Direct,
    /// No `proxy` key: `HTTPS_PROXY`/`NO_PROXY` from the service's environment, if set.
    FromEnvironment,
}

impl Proxy {
    /// The proxy for a connection to `host`, if any.
    pub fn for_host(&self, host: &str) -> Option<ProxySettings> {
        match self {
            Proxy::Configured(p) => Some(p.clone()),
            Proxy::Direct => None,
            Proxy::FromEnvironment => graph::proxy_from_env(host),
        }
    }
}

/// One `[[account]]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccount {
    name: String,
    mailbox: String,
    host: Option<String>,
    port: Option<u16>,
    tls: Option<TlsMode>,
    auth: Option<AuthMode>,
    ca_file: Option<PathBuf>,
    from: Option<FromPolicy>,
    #[serde(default)]
    senders: Vec<String>,
    #[serde(default)]
    uids: Vec<u32>,
    allowed_uids: Option<Vec<access::IdOrName>>,
    allowed_groups: Option<Vec<access::IdOrName>>,
    transport: Option<String>,
    timeout: Option<Span>,
    helo_name: Option<String>,
    oauth: Option<OAuthSettings>,
    message_rate: Option<Rate>,
    recipient_rate: Option<Rate>,
    max_recipients: Option<u32>,
    connections: Option<u32>,
    reserve: Option<u32>,
    graph: Option<RawGraph>,
    proxy: Option<String>,
    harvest_bounces: Option<bool>,
    credential_expires: Option<String>,
}

/// A validated account: one Microsoft 365 mailbox and how to reach it.
#[derive(Debug, Clone)]
pub struct Account {
    pub name: String,
    /// The authenticated mailbox; always the envelope sender.
    pub mailbox: String,
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    pub auth: AuthMode,
    pub ca_file: Option<PathBuf>,
    pub from: FromPolicy,
    /// Envelope-sender or From patterns routed to this account (`*@billing.example.com`,
    /// `www-data`).
    pub senders: Vec<String>,
    /// Caller uids routed to this account.
    pub uids: Vec<u32>,
    /// `allowed_uids` / `allowed_groups`: who may send through it (routing by
    /// `senders` is not access control).
    pub access: access::Access,
    pub transport: Transport,
    /// Bound on every network wait (connect, each reply, the token endpoint).
    pub timeout: Duration,
    pub helo_name: Option<String>,
    pub oauth: Option<OAuthSettings>,
    pub limits: Limits,
    /// `[account.graph]`: used by `transport = "graph"` and by bounce harvesting.
    pub graph: GraphSettings,
    pub proxy: Proxy,
    /// Read late NDRs from the mailbox through Graph (`Mail.ReadWrite`).
    pub harvest_bounces: bool,
    /// When the client secret or certificate expires (00:00 UTC of the date written),
    /// for `relay365 health`.
    pub credential_expires: Option<std::time::SystemTime>,
}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    spool_dir: Option<PathBuf>,
    domain: Option<String>,
    max_message_size: Option<ByteSize>,
    secrets_file: Option<PathBuf>,
    aliases: Option<PathBuf>,
    admin: Option<String>,
    #[serde(default)]
    local_domains: Vec<String>,
    max_queue_lifetime: Option<Span>,
    proxy: Option<String>,
    log_file: Option<PathBuf>,
    metrics_listen: Option<std::net::SocketAddr>,
    quota_store: Option<String>,
    fleet_size: Option<u32>,
    fleet_host: Option<String>,
    quota_store_ca_file: Option<PathBuf>,
    quota_store_timeout: Option<Span>,
    #[serde(default, rename = "account")]
    accounts: Vec<RawAccount>,
    listener: Option<listener::RawListener>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the config was read from (for messages).
    pub path: PathBuf,
    pub spool_dir: PathBuf,
    /// The domain that qualifies bare local names and ends Message-IDs.
    pub domain: String,
    pub max_message_size: ByteSize,
    pub secrets_file: PathBuf,
    pub aliases: PathBuf,
    /// Where mail for local users without an alias goes (nullmailer's adminaddr).
    pub admin: Option<String>,
    /// Domains whose recipients are local users (resolved through aliases and admin).
    pub local_domains: Vec<String>,
    /// Undeliverable mail older than this bounces.
    pub max_queue_lifetime: Duration,
    /// Also write the log here, as a syslog daemon would (Postfix's maillog_file).
    pub log_file: Option<PathBuf>,
    /// Where the daemon serves `GET /metrics` (Prometheus text format), if anywhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The shared quota ledger of a fleet (`quota_store`); `None`: a local ledger file.
    pub quota_store: Option<StoreSettings>,
    pub accounts: Vec<Account>,
    /// `[listener]`: the network SMTP listener, when configured.
    pub listener: Option<listener::Listener>,
}

/// Microsoft's default mailbox limit for a message (35 MB).
pub const DEFAULT_MAX_MESSAGE_SIZE: ByteSize = ByteSize(35_000_000);

impl Config {
    /// Reads and validates a config file. A missing file at the default path is not an
    /// error (every key has a default), so a fresh install still queues mail.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = match fs::read_to_string(path) {
            Ok(t) => t,
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    && path == Path::new(paths::CONFIG_FILE) =>
            {
                String::new()
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        Self::from_toml(path, &text)
    }

    /// Parses config text; `path` only names the file in errors.
    pub fn from_toml(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let domain = match raw.domain {
            Some(d) => validate_domain(&d).map_err(|message| ConfigError::Invalid {
                path: path.to_path_buf(),
                key: "domain",
                message,
            })?,
            None => default_domain().ok_or_else(|| ConfigError::NoDomain {
                path: path.to_path_buf(),
            })?,
        };
        let spool_dir = raw
            .spool_dir
            .unwrap_or_else(|| PathBuf::from(paths::SPOOL_DIR));
        if !spool_dir.is_absolute() {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                key: "spool_dir",
                message: format!("{} is not an absolute path", spool_dir.display()),
            });
        }
        let max_message_size = raw.max_message_size.unwrap_or(DEFAULT_MAX_MESSAGE_SIZE);
        if max_message_size.0 < 1024 {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                key: "max_message_size",
                message: format!("{max_message_size} is too small to hold a message (at least 1K)"),
            });
        }
        let invalid = |key: &'static str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            message,
        };
        if let Some(a) = &raw.admin {
            crate::message::address::Address::parse(a)
                .ok()
                .filter(|a| a.is_qualified())
                .ok_or_else(|| {
                    invalid(
                        "admin",
                        format!("{a:?} is not a full address such as ops@example.com"),
                    )
                })?;
        }
        if let Some(f) = raw.log_file.as_ref().filter(|f| !f.is_absolute()) {
            return Err(invalid(
                "log_file",
                format!("{} is not an absolute path", f.display()),
            ));
        }
        let mut local_domains = Vec::new();
        for d in raw.local_domains {
            local_domains.push(validate_domain(&d).map_err(|m| invalid("local_domains", m))?);
        }
        for d in [host_fqdn(), Some("localhost".to_string())]
            .into_iter()
            .flatten()
        {
            if !local_domains.contains(&d) {
                local_domains.push(d);
            }
        }
        let proxy = match raw.proxy.as_deref() {
            None => Proxy::FromEnvironment,
            Some(p) => parse_proxy(p).map_err(|m| invalid("proxy", m))?,
        };
        let mut accounts: Vec<Account> = Vec::new();
        for raw_account in raw.accounts {
            let account = Account::validate(raw_account, &proxy)
                .map_err(|(key, message)| invalid(key, message))?;
            if account.name == store::STORE_SECRETS_TABLE {
                return Err(invalid(
                    "account.name",
                    format!(
                        "{:?} names the secrets file's table of the quota store; choose another name",
                        account.name
                    ),
                ));
            }
            if accounts.iter().any(|a| a.name == account.name) {
                return Err(invalid(
                    "account.name",
                    format!("two accounts are named {:?}", account.name),
                ));
            }
            accounts.push(account);
        }
        let names: Vec<String> = accounts.iter().map(|a| a.name.clone()).collect();
        let listener = raw
            .listener
            .map(|l| listener::Listener::validate(l, &names))
            .transpose()
            .map_err(|(key, message)| invalid(key, message))?;
        let fleet_keys = raw.fleet_size.is_some()
            || raw.fleet_host.is_some()
            || raw.quota_store_ca_file.is_some()
            || raw.quota_store_timeout.is_some();
        let quota_store = match raw.quota_store {
            Some(url) => Some(
                store::parse(
                    &url,
                    raw.fleet_size,
                    raw.fleet_host,
                    raw.quota_store_ca_file,
                    raw.quota_store_timeout.map(|s| s.0),
                )
                .map_err(|(key, message)| invalid(key, message))?,
            ),
            None if fleet_keys => {
                return Err(invalid(
                    "quota_store",
                    "fleet_size, fleet_host and quota_store_* need quota_store = \"redis://host:6379/0\"".into(),
                ));
            }
            None => None,
        };
        if let Some(s) = &quota_store {
            for a in &accounts {
                let m = a.limits.message_rate;
                if m.is_limited() && m.count < s.fleet_size {
                    return Err(invalid(
                        "fleet_size",
                        format!(
                            "fleet_size = {} is more than account {}'s message_rate = {m}: while the store is down each host may send 1/{} of it, less than one message",
                            s.fleet_size, a.name, s.fleet_size
                        ),
                    ));
                }
            }
        }
        Ok(Config {
            path: path.to_path_buf(),
            spool_dir,
            domain,
            max_message_size,
            secrets_file: raw
                .secrets_file
                .unwrap_or_else(|| PathBuf::from(paths::SECRETS_FILE)),
            aliases: raw
                .aliases
                .unwrap_or_else(|| PathBuf::from(paths::ALIASES_FILE)),
            admin: raw.admin,
            local_domains,
            max_queue_lifetime: raw
                .max_queue_lifetime
                .map_or(DEFAULT_QUEUE_LIFETIME, |s| s.0),
            log_file: raw.log_file,
            metrics_listen: raw.metrics_listen,
            quota_store,
            accounts,
            listener,
        })
    }
}

/// Bounced after this long in the queue (Postfix's maximal_queue_lifetime).
pub const DEFAULT_QUEUE_LIFETIME: Duration = Duration::from_secs(5 * 86_400);

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl Account {
    /// Whether the daemon must read the secrets file for this account: a password or an
    /// app credential (SMTP AUTH, Graph, bounce harvesting) or a proxy password.
    pub fn needs_secrets(&self) -> bool {
        (self.auth != AuthMode::None && self.transport == Transport::Smtp)
            || self.transport == Transport::Graph
            || self.harvest_bounces
            || matches!(&self.proxy, Proxy::Configured(p) if p.user.is_some() && p.password.is_none())
    }

    fn validate(r: RawAccount, proxy: &Proxy) -> Result<Account, (&'static str, String)> {
        let name_ok = !r.name.is_empty()
            && r.name.len() <= 64
            && r.name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !name_ok {
            // SECURITY: the name becomes a file name under state/.
            return Err((
                "account.name",
                format!("{:?}: use letters, digits, - and _ only", r.name),
            ));
        }
        let mailbox = crate::message::address::Address::parse(&r.mailbox)
            .ok()
            .filter(|a| a.is_qualified())
            .ok_or((
                "account.mailbox",
                format!(
                    "{:?} is not a mailbox address such as app@contoso.com",
                    r.mailbox
                ),
            ))?;
        let host = r.host.unwrap_or_else(|| "smtp.office365.com".to_string());
        let tls = r.tls.unwrap_or(TlsMode::Starttls);
        if tls == TlsMode::None && !is_loopback(&host) {
            // SECURITY: credentials and mail never cross a network in plain text.
            return Err((
                "account.tls",
                format!(
                    "tls = \"none\" is only allowed for a loopback host, not {host:?}; use starttls"
                ),
            ));
        }
        let auth = r.auth.unwrap_or(AuthMode::Xoauth2);
        let transport = match r.transport.as_deref() {
            None | Some("smtp") => Transport::Smtp,
            Some("graph") => Transport::Graph,
            Some(t) => match t.strip_prefix("maildir:") {
                Some(p) if Path::new(p).is_absolute() => Transport::Maildir(PathBuf::from(p)),
                _ => {
                    return Err((
                        "account.transport",
                        format!("{t:?}: use smtp, graph or maildir:/absolute/path"),
                    ));
                }
            },
        };
        let harvest_bounces = r.harvest_bounces.unwrap_or(false);
        if (transport == Transport::Graph || harvest_bounces) && r.oauth.is_none() {
            let what = if transport == Transport::Graph {
                "transport = \"graph\""
            } else {
                "harvest_bounces = true"
            };
            return Err((
                "account.oauth",
                format!(
                    "account {:?} uses {what}, which signs in to Microsoft Graph as an app: add an [account.oauth] table with tenant and client_id",
                    r.name
                ),
            ));
        }
        if auth == AuthMode::Xoauth2 && r.oauth.is_none() {
            return Err((
                "account.oauth",
                format!(
                    "account {:?} uses auth = \"xoauth2\" but has no [account.oauth] table with tenant and client_id",
                    r.name
                ),
            ));
        }
        if transport == Transport::Graph && !matches!(auth, AuthMode::Xoauth2) {
            return Err((
                "account.auth",
                "transport = \"graph\" authenticates with an OAuth2 app token: remove auth or set auth = \"xoauth2\"".to_owned(),
            ));
        }
        let graph = GraphSettings::from_raw(r.graph.unwrap_or_default())?;
        let proxy = match r.proxy.as_deref() {
            None => proxy.clone(),
            Some(p) => parse_proxy(p).map_err(|m| ("account.proxy", m))?,
        };
        let defaults = Limits::default();
        let limits = Limits {
            message_rate: r.message_rate.unwrap_or(defaults.message_rate),
            recipient_rate: r.recipient_rate.unwrap_or(defaults.recipient_rate),
            max_recipients: r.max_recipients.unwrap_or(defaults.max_recipients),
            connections: r.connections.unwrap_or(defaults.connections),
            reserve: r.reserve.unwrap_or(defaults.reserve),
        };
        limits
            .validate()
            .map_err(|e| ("account limits", e.to_string()))?;
        if transport == Transport::Graph
            && let Some(m) = limits.graph_problem()
        {
            return Err(("account limits", m));
        }
        Ok(Account {
            name: r.name,
            mailbox: mailbox.to_string(),
            port: r
                .port
                .unwrap_or(if tls == TlsMode::Tls { 465 } else { 587 }),
            host,
            tls,
            auth,
            ca_file: r.ca_file,
            from: r.from.unwrap_or(FromPolicy::Rewrite),
            senders: r.senders,
            uids: r.uids,
            access: access::Access {
                uids: r.allowed_uids,
                groups: r.allowed_groups,
            },
            transport,
            timeout: r.timeout.map_or(Duration::from_secs(60), |s| s.0),
            helo_name: r.helo_name,
            oauth: r.oauth,
            limits,
            graph,
            proxy,
            harvest_bounces,
            credential_expires: match r.credential_expires {
                Some(d) => Some(parse_date(&d).ok_or((
                    "account.credential_expires",
                    format!("{d:?} is not a date such as \"2027-03-01\""),
                ))?),
                None => None,
            },
        })
    }
}

/// A `proxy` value: a URL, or `"none"` to ignore the environment's proxy.
fn parse_proxy(p: &str) -> Result<Proxy, String> {
    if p.eq_ignore_ascii_case("none") {
        return Ok(Proxy::Direct);
    }
    ProxySettings::parse(p).map(Proxy::Configured)
}

/// `YYYY-MM-DD` as 00:00 UTC of that day.
fn parse_date(s: &str) -> Option<std::time::SystemTime> {
    let mut it = s.trim().splitn(3, '-');
    let y: i64 = it.next()?.parse().ok()?;
    let m: i64 = it.next()?.parse().ok()?;
    let d: i64 = it.next()?.parse().ok()?;
    if !(1970..=9999).contains(&y) || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let days = crate::message::date::days_from_civil(y, m as u32, d as u32);
    let secs = u64::try_from(days).ok()?.checked_mul(86_400)?;
    Some(std::time::UNIX_EPOCH + Duration::from_secs(secs))
}

fn validate_domain(d: &str) -> Result<String, String> {
    let d = d.trim().trim_end_matches('.').to_ascii_lowercase();
    let ok = !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if ok {
        Ok(d)
    } else {
        Err(format!("{d:?} is not a domain name such as example.com"))
    }
}

/// `/etc/mailname`, then the host's fully qualified name: what Debian's MTAs use.
fn default_domain() -> Option<String> {
    if let Ok(s) = fs::read_to_string(paths::MAILNAME_FILE)
        && let Some(line) = s
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
        && let Ok(d) = validate_domain(line)
    {
        return Some(d);
    }
    host_fqdn()
}

/// This host's fully qualified name (hostname, else its qualified form in /etc/hosts).
pub fn host_fqdn() -> Option<String> {
    let name = nix::unistd::gethostname().ok()?.into_string().ok()?;
    if name.contains('.') {
        return validate_domain(&name).ok();
    }
    // A bare host name: look for its qualified form in /etc/hosts, as hostname -f would.
    let hosts = fs::read_to_string("/etc/hosts").unwrap_or_default();
    for line in hosts.lines() {
        let line = line.split('#').next().unwrap_or("");
        let names: Vec<&str> = line.split_whitespace().skip(1).collect();
        if names.iter().any(|n| n.eq_ignore_ascii_case(&name))
            && let Some(fq) = names.iter().find(|n| n.contains('.'))
        {
            return validate_domain(fq).ok();
        }
    }
    validate_domain(&name).ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn credential_expires_is_a_date() {
        let day =
            |s| parse_date(s).map(|t| t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs());
        assert_eq!(day("1970-01-01"), Some(0));
        assert_eq!(day("2027-03-01"), Some(1_803_859_200));
        assert_eq!(day("2027-13-01"), None);
        assert_eq!(day("soon"), None);
    }

    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(Path::new("/t/relay365.toml"), text)
    }

    #[test]
    fn defaults_apply() {
        let c = load("domain = \"Example.COM.\"").unwrap();
        assert_eq!(c.domain, "example.com");
        assert_eq!(c.spool_dir, PathBuf::from("/var/spool/relay365"));
        assert_eq!(c.max_message_size, ByteSize(35_000_000));
    }

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(ByteSize::parse("35M"), Ok(ByteSize(35_000_000)));
        assert_eq!(ByteSize::parse("64k"), Ok(ByteSize(64_000)));
        assert_eq!(ByteSize::parse("2048"), Ok(ByteSize(2048)));
        assert!(ByteSize::parse("35X").is_err());
        assert!(ByteSize::parse("lots").is_err());
        let c = load("domain = \"a.b\"\nmax_message_size = 2048").unwrap();
        assert_eq!(c.max_message_size, ByteSize(2048));
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let e = load("domain = \"a.b\"\n\nspool_dri = \"/x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/t/relay365.toml"), "{e}");
        assert!(e.contains("line 3"), "{e}");
        assert!(e.contains("spool_dri"), "{e}");
    }

    #[test]
    fn accounts_with_defaults() {
        let c = load(
            "domain = \"a.b\"\nadmin = \"ops@a.b\"\n[[account]]\nname = \"app\"\nmailbox = \"app@contoso.com\"\nmessage_rate = \"30/3s\"\n[account.oauth]\ntenant = \"contoso.onmicrosoft.com\"\nclient_id = \"abc\"\n",
        )
        .unwrap();
        let a = &c.accounts[0];
        assert_eq!(
            (a.host.as_str(), a.port, a.tls, a.auth),
            (
                "smtp.office365.com",
                587,
                TlsMode::Starttls,
                AuthMode::Xoauth2
            )
        );
        assert_eq!(a.from, FromPolicy::Rewrite);
        assert_eq!(a.limits.message_rate.window, Duration::from_secs(3));
        assert_eq!(a.limits.recipient_rate.count, 10_000);
        assert_eq!(c.max_queue_lifetime, DEFAULT_QUEUE_LIFETIME);
        assert!(c.local_domains.contains(&"localhost".to_string()));
    }

    #[test]
    fn graph_proxy_and_harvest_keys() {
        let oauth = "[account.oauth]\ntenant = \"contoso.onmicrosoft.com\"\nclient_id = \"abc\"\n";
        let base = "domain = \"a.b\"\nproxy = \"http://u@proxy.corp:3128\"\n[[account]]\nname = \"app\"\nmailbox = \"app@contoso.com\"\n";
        let c = load(&format!(
            "{base}transport = \"graph\"\nharvest_bounces = true\n[account.graph]\nurl = \"https://graph.microsoft.us\"\n{oauth}"
        ))
        .unwrap();
        let a = &c.accounts[0];
        assert_eq!(a.transport, Transport::Graph);
        assert!(a.harvest_bounces && a.needs_secrets());
        assert_eq!(a.graph.scope(), "https://graph.microsoft.us/.default");
        assert!(
            matches!(&a.proxy, Proxy::Configured(p) if p.host == "proxy.corp" && p.port == 3128)
        );
        let c = load(&format!("{base}proxy = \"none\"\n{oauth}")).unwrap();
        assert_eq!(c.accounts[0].proxy, Proxy::Direct);
        let e = load(&format!("{base}transport = \"graph\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("account.oauth") && e.contains("transport = \"graph\""),
            "{e}"
        );
        let e = load(&format!("{base}harvest_bounces = true\nauth = \"login\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("harvest_bounces = true"), "{e}");
        let e = load(&format!(
            "{base}transport = \"graph\"\nauth = \"login\"\n{oauth}"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("account.auth"), "{e}");
        let e = load(&format!("{base}proxy = \"socks5://x:1\"\n{oauth}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("account.proxy") && e.contains("CONNECT"), "{e}");
        let e = load(&format!(
            "{base}transport = \"graph\"\nmessage_rate = \"20000/10m\"\n{oauth}"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("10,000 requests per 10 minutes"), "{e}");
    }

    #[test]
    fn account_errors_name_the_key() {
        let base = "domain = \"a.b\"\n[[account]]\nname = \"app\"\nmailbox = \"app@contoso.com\"\nauth = \"login\"\n";
        let e = load(&format!("{base}tls = \"none\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("account.tls") && e.contains("loopback"), "{e}");
        let e = load(&format!("{base}hots = \"x\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("hots") && e.contains("line 6"), "{e}");
        let e = load(&format!("{base}message_rate = \"30 per minute\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("message_rate"), "{e}");
        let e =
            load("domain = \"a.b\"\n[[account]]\nname = \"app\"\nmailbox = \"app@contoso.com\"\n")
                .unwrap_err()
                .to_string();
        assert!(e.contains("[account.oauth]"), "{e}");
        let e = load(&format!("{base}transport = \"maildir:rel\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("maildir:/absolute/path"), "{e}");
        let e = load(&format!(
            "{base}[[account]]\nname = \"app\"\nmailbox = \"b@contoso.com\"\nauth = \"login\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("two accounts"), "{e}");
        let ok = load(&format!("{base}host = \"127.0.0.1\"\ntls = \"none\"\n")).unwrap();
        assert_eq!(ok.accounts[0].tls, TlsMode::None);
    }

    #[test]
    fn spans() {
        assert_eq!(Span::parse("5d"), Ok(Span(Duration::from_secs(432_000))));
        assert_eq!(Span::parse("90"), Ok(Span(Duration::from_secs(90))));
        assert!(Span::parse("0s").is_err());
        assert!(Span::parse("5 days").is_err());
    }

    #[test]
    fn a_quota_store_and_its_companions() {
        let c = load("quota_store = \"redis://r:6379/0\"\nfleet_size = 3\nfleet_host = \"web1\"\n")
            .unwrap();
        let s = c.quota_store.unwrap();
        assert_eq!((s.fleet_size, s.host.as_str()), (3, "web1"));
        assert!(load("").unwrap().quota_store.is_none());
        let err = |text: &str| load(text).unwrap_err().to_string();
        assert!(err("fleet_size = 3\n").contains("need quota_store"));
        assert!(
            err(
                "[[account]]\nname = \"quota_store\"\nmailbox = \"a@b.example\"\nauth = \"login\"\n"
            )
            .contains("quota store")
        );
        let e = err(
            "quota_store = \"redis://r/0\"\nfleet_size = 4\n[[account]]\nname = \"a\"\nmailbox = \"a@b.example\"\nauth = \"login\"\nmessage_rate = \"3/1m\"\n",
        );
        assert!(e.contains("fleet_size = 4"), "{e}");
        assert!(err("quota_store = \"redis://:pw@r/0\"\n").contains("secrets file"));
    }

    #[test]
    fn bad_values_are_refused() {
        let e = load("domain = \"not a domain\"").unwrap_err().to_string();
        assert!(e.contains("domain"), "{e}");
        let e = load("domain = \"a.b\"\nspool_dir = \"relative\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("spool_dir") && e.contains("absolute"), "{e}");
        let e = load("domain = \"a.b\"\nmax_message_size = \"1\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_message_size"), "{e}");
        let e = load("domain = \"a.b\"\nmax_message_size = -5")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("negative"), "{e}");
    }
}
