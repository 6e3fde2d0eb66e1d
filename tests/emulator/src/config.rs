//! The emulator's configuration: TLS mode, mailboxes, registered apps, limits and latency.
//!
//! Written by the test (or by the binary's argument parser); trusted as given, since it is the
//! test's own description of the tenant it wants to talk to.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::store::Received;

/// How the SMTP listener offers TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// Plain connection upgraded with STARTTLS, as smtp.office365.com:587.
    #[default]
    StartTls,
    /// TLS from the first byte (port 465 style; Exchange Online does not offer it, tests do).
    Implicit,
    /// No TLS at all; AUTH is then offered in plaintext (an emulator-only convenience).
    None,
}

/// Which leaf certificate the SMTP listener presents. The token endpoint always presents a valid one.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum CertKind {
    /// Leaf for `localhost` and 127.0.0.1, signed by the emulator CA.
    #[default]
    Valid,
    /// Leaf for `wrong.example`, signed by the emulator CA: the client must refuse the name.
    WrongName,
    /// Leaf for `localhost` whose validity ended in 2020: the client must refuse it.
    Expired,
    /// Leaf for the given DNS name, signed by the emulator CA.
    ForName(String),
}

/// What happens to a message over the per-mailbox message rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OverRate {
    /// Reject after the final dot with the submission quota reply (older behaviour, still reported).
    #[default]
    Reject,
    /// Hold the reply until the window has room: Microsoft's current "carried over" behaviour.
    Throttle,
}

/// A mailbox of the emulated tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mailbox {
    pub address: String,
    /// Password for AUTH LOGIN; `None` means the mailbox can only be used through XOAUTH2.
    pub password: Option<String>,
    /// Extra From / envelope addresses this mailbox may send as (`Add-RecipientPermission`).
    pub send_as: Vec<String>,
}

impl Mailbox {
    pub fn new(address: &str) -> Mailbox {
        Mailbox {
            address: address.to_owned(),
            password: None,
            send_as: Vec::new(),
        }
    }

    pub fn with_password(address: &str, password: &str) -> Mailbox {
        Mailbox::new(address).password(password)
    }

    pub fn password(mut self, password: &str) -> Mailbox {
        self.password = Some(password.to_owned());
        self
    }

    pub fn send_as(mut self, address: &str) -> Mailbox {
        self.send_as.push(address.to_owned());
        self
    }

    /// Whether `address` may appear in From / MAIL FROM for this mailbox.
    pub(crate) fn may_send_as(&self, address: &str) -> bool {
        self.address.eq_ignore_ascii_case(address)
            || self.send_as.iter().any(|a| a.eq_ignore_ascii_case(address))
    }
}

/// How a registered app proves its identity to the token endpoint.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// `client_secret`.
    Secret(String),
    /// `client_assertion` signed by the key of this SubjectPublicKeyInfo (DER, RSA).
    PublicKeyDer(Vec<u8>),
    /// `client_assertion` signed by the key of this certificate (PEM); the JWT's `x5t` or
    /// `x5t#S256` header, when present, must name it.
    CertificatePem(String),
}

impl fmt::Debug for Credential {
    // Secrets stay out of test failure output.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Secret(_) => f.write_str("Secret(<redacted>)"),
            Credential::PublicKeyDer(d) => write!(f, "PublicKeyDer({} bytes)", d.len()),
            Credential::CertificatePem(_) => f.write_str("CertificatePem(..)"),
        }
    }
}

/// An app registration with `SMTP.SendAsApp` and FullAccess on `mailboxes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct App {
    /// Tenant id or domain, the `{tenant}` path segment of the token URL.
    pub tenant: String,
    pub client_id: String,
    pub credential: Credential,
    /// Mailboxes whose XOAUTH2 `user=` this app's tokens may name; for Graph, the
    /// mailboxes its application access policy allows.
    pub mailboxes: Vec<String>,
    /// Microsoft Graph application permissions granted with admin consent (the `roles`
    /// claim of its Graph tokens).
    pub graph_roles: Vec<String>,
}

impl App {
    pub fn with_secret(tenant: &str, client_id: &str, secret: &str, mailbox: &str) -> App {
        App {
            tenant: tenant.to_owned(),
            client_id: client_id.to_owned(),
            credential: Credential::Secret(secret.to_owned()),
            mailboxes: vec![mailbox.to_owned()],
            graph_roles: default_graph_roles(),
        }
    }

    pub fn with_certificate(tenant: &str, client_id: &str, cert_pem: &str, mailbox: &str) -> App {
        App {
            tenant: tenant.to_owned(),
            client_id: client_id.to_owned(),
            credential: Credential::CertificatePem(cert_pem.to_owned()),
            mailboxes: vec![mailbox.to_owned()],
            graph_roles: default_graph_roles(),
        }
    }
}

/// Called with every accepted message, after it is stored (the binary writes files from it).
fn default_graph_roles() -> Vec<String> {
    vec!["Mail.Send".to_owned(), "Mail.ReadWrite".to_owned()]
}

impl App {
    /// The app with exactly these Graph permissions.
    pub fn with_graph_roles(mut self, roles: &[&str]) -> App {
        self.graph_roles = roles.iter().map(|r| (*r).to_owned()).collect();
        self
    }
}

pub type MessageHook = Arc<dyn Fn(&Received) + Send + Sync>;

/// Everything the emulator is told. `Config::default()` is an Exchange Online tenant with no
/// mailboxes; `Config::sink()` is a fast plaintext sink for benchmarks.
#[derive(Clone)]
pub struct Config {
    pub tls: TlsMode,
    pub cert: CertKind,
    /// SMTP port on 127.0.0.1; 0 picks a free one.
    pub port: u16,
    /// The frontend name in the greeting, EHLO and reply tails.
    pub hostname: String,
    /// The mailbox server named in `[Hostname=...]` of submission replies.
    pub mailbox_server: String,
    pub mailboxes: Vec<Mailbox>,
    /// MAIL needs a successful AUTH first (`530 5.7.57`).
    pub auth_required: bool,
    /// AUTH LOGIN allowed; `false` answers it with the `5.7.139` "basic auth disabled" reply.
    pub basic_auth: bool,
    /// After the dot, From header and MAIL FROM must be the mailbox or one of its send_as.
    pub check_send_as: bool,
    /// Messages per mailbox per window.
    pub message_rate: Option<(u32, Duration)>,
    /// Recipients per mailbox per rolling window (every RCPT of every accepted message counts).
    pub recipient_rate: Option<(u32, Duration)>,
    pub max_recipients_per_message: Option<u32>,
    /// Authenticated connections per mailbox; messages on the extra ones get `432 4.3.2`.
    pub max_connections_per_mailbox: Option<u32>,
    /// Advertised in EHLO SIZE and enforced on MAIL SIZE= and on the received data.
    pub max_size: u64,
    pub over_rate: OverRate,
    /// Added before every reply, as a round trip: replies to a pipelined group of
    /// commands go out together after one delay (an Exchange-like latency is about 50 ms).
    pub reply_delay: Duration,
    /// A connection silent this long gets `421 4.4.1` and is closed.
    pub idle_timeout: Duration,
    /// Keep message bytes in `messages()`; benchmarks of huge runs may keep envelopes only.
    pub keep_bodies: bool,
    /// Start the OAuth2 token endpoint next to the SMTP listener.
    pub token_endpoint: bool,
    /// Token endpoint port on 127.0.0.1; 0 picks a free one.
    pub token_port: u16,
    pub apps: Vec<App>,
    /// `expires_in` of issued tokens; the SMTP side refuses them after it.
    pub token_lifetime: Duration,
    pub on_message: Option<MessageHook>,
    /// Graph: concurrent requests per app and mailbox (Microsoft: 4).
    pub graph_max_concurrent: u32,
    /// Graph: requests per app and mailbox in a window (Microsoft: 10,000 per 10 minutes).
    pub graph_request_rate: Option<(u32, Duration)>,
    /// Graph: largest request body (Microsoft: 4 MB).
    pub graph_max_request: usize,
    /// How long after accepting a message its NDRs land in the inbox.
    pub ndr_delay: Duration,
    /// Extra time each Graph request takes (the round trip of a real tenant).
    pub graph_delay: Duration,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("tls", &self.tls)
            .field("cert", &self.cert)
            .field("port", &self.port)
            .field("hostname", &self.hostname)
            .field(
                "mailboxes",
                &self
                    .mailboxes
                    .iter()
                    .map(|m| &m.address)
                    .collect::<Vec<_>>(),
            )
            .field("auth_required", &self.auth_required)
            .field("message_rate", &self.message_rate)
            .field("recipient_rate", &self.recipient_rate)
            .field(
                "max_recipients_per_message",
                &self.max_recipients_per_message,
            )
            .field(
                "max_connections_per_mailbox",
                &self.max_connections_per_mailbox,
            )
            .field("max_size", &self.max_size)
            .field("over_rate", &self.over_rate)
            .field("reply_delay", &self.reply_delay)
            .field("apps", &self.apps)
            .finish_non_exhaustive()
    }
}

/// The SIZE Exchange Online advertises.
pub const EXCHANGE_MAX_SIZE: u64 = 157_286_400;

impl Default for Config {
    fn default() -> Config {
        Config {
            tls: TlsMode::StartTls,
            cert: CertKind::Valid,
            port: 0,
            hostname: "SY5P282CA0097.outlook.office365.com".to_owned(),
            mailbox_server: "SYBP282MB2635.AUSP282.PROD.OUTLOOK.COM".to_owned(),
            mailboxes: Vec::new(),
            auth_required: true,
            basic_auth: true,
            check_send_as: true,
            message_rate: Some((30, Duration::from_secs(60))),
            recipient_rate: Some((10_000, Duration::from_secs(24 * 3600))),
            max_recipients_per_message: Some(500),
            max_connections_per_mailbox: Some(3),
            max_size: EXCHANGE_MAX_SIZE,
            over_rate: OverRate::Reject,
            reply_delay: Duration::ZERO,
            idle_timeout: Duration::from_secs(600),
            keep_bodies: true,
            token_endpoint: true,
            token_port: 0,
            apps: Vec::new(),
            token_lifetime: Duration::from_secs(3599),
            on_message: None,
            graph_max_concurrent: 4,
            graph_request_rate: Some((10_000, Duration::from_secs(600))),
            graph_max_request: 4 * 1024 * 1024,
            ndr_delay: Duration::from_millis(200),
            graph_delay: Duration::ZERO,
        }
    }
}

impl Config {
    /// No TLS, no AUTH, no limits, no SendAs check, no token endpoint: a loopback sink for
    /// benchmarks. Messages are still recorded.
    pub fn sink() -> Config {
        Config {
            tls: TlsMode::None,
            auth_required: false,
            check_send_as: false,
            message_rate: None,
            recipient_rate: None,
            max_recipients_per_message: None,
            max_connections_per_mailbox: None,
            token_endpoint: false,
            ..Config::default()
        }
    }

    pub fn tls(mut self, tls: TlsMode) -> Config {
        self.tls = tls;
        self
    }

    pub fn cert(mut self, cert: CertKind) -> Config {
        self.cert = cert;
        self
    }

    pub fn port(mut self, port: u16) -> Config {
        self.port = port;
        self
    }

    pub fn hostname(mut self, hostname: &str) -> Config {
        self.hostname = hostname.to_owned();
        self
    }

    pub fn mailbox(mut self, mailbox: Mailbox) -> Config {
        self.mailboxes.push(mailbox);
        self
    }

    pub fn app(mut self, app: App) -> Config {
        self.apps.push(app);
        self
    }

    pub fn auth_required(mut self, yes: bool) -> Config {
        self.auth_required = yes;
        self
    }

    pub fn basic_auth(mut self, yes: bool) -> Config {
        self.basic_auth = yes;
        self
    }

    pub fn check_send_as(mut self, yes: bool) -> Config {
        self.check_send_as = yes;
        self
    }

    pub fn message_rate(mut self, count: u32, window: Duration) -> Config {
        self.message_rate = Some((count, window));
        self
    }

    pub fn recipient_rate(mut self, count: u32, window: Duration) -> Config {
        self.recipient_rate = Some((count, window));
        self
    }

    pub fn max_recipients_per_message(mut self, n: u32) -> Config {
        self.max_recipients_per_message = Some(n);
        self
    }

    pub fn max_connections_per_mailbox(mut self, n: u32) -> Config {
        self.max_connections_per_mailbox = Some(n);
        self
    }

    pub fn max_size(mut self, n: u64) -> Config {
        self.max_size = n;
        self
    }

    pub fn over_rate(mut self, o: OverRate) -> Config {
        self.over_rate = o;
        self
    }

    pub fn reply_delay(mut self, d: Duration) -> Config {
        self.reply_delay = d;
        self
    }

    pub fn token_lifetime(mut self, d: Duration) -> Config {
        self.token_lifetime = d;
        self
    }

    pub fn on_message(mut self, hook: MessageHook) -> Config {
        self.on_message = Some(hook);
        self
    }

    pub(crate) fn find_mailbox(&self, address: &str) -> Option<&Mailbox> {
        self.mailboxes
            .iter()
            .find(|m| m.address.eq_ignore_ascii_case(address))
    }
}
