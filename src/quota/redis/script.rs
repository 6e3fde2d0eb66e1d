//! The wire side of the shared ledger: connecting to Redis (plain, TLS with a CA file,
//! or through Sentinel; the password from the secrets file), and running the ledger
//! script (`ledger.lua`) with EVALSHA — one round trip per call; the client loads the
//! script once on `NOSCRIPT` (a restarted or failed-over server) and retries.
//!
//! Trusted input: the settings (validated config) and the password (`secrets`). The
//! server's answers are parsed strictly: an answer of the wrong shape is an error, so
//! a foreign program on the port can only make relay365 fall back to its local share.
//!
//! # Keys
//! One mailbox's ledger is five keys with the common prefix `relay365:{<mailbox>}:`
//! (`t`, `c`, `m`, `q`, `w`; the braces keep them in one hash slot). Every host that
//! names the same store and mailbox shares them, whatever its account is called.
//!
//! # Answers
//! Every mode returns `[kind, value, now, messages, recipients, freeze_until,
//! freeze_reason, total]`: `kind` 1 = go with `value` recipients, 0 = wait until `value`
//! (ms, server clock); `now` the server's clock; the message and recipient windows'
//! counts after the call; the freeze in force (0 if none); `total` the running
//! recipient count, which only a server that lost its data can show going down.
//! `usage` appends the next rooms, the number of waiting reservers, and per host
//! (name, messages, recipients).

use std::time::{Duration, SystemTime};

use redis::{Client, Connection, Script, TlsCertificates, Value};

use super::super::window::floor_ms;
use crate::config::limits::{Limits, Rate};
use crate::config::store::{StoreAddress, StoreSettings};
use crate::secrets::Secret;

/// The ledger script, run by EVALSHA.
pub(super) const LEDGER_SCRIPT: &str = include_str!("ledger.lua");

/// Why the store could not answer. The message names the fix, never the password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error(
        "quota store {url}: cannot reach it: {detail}; check that Redis runs there and the firewall lets this host in"
    )]
    Unreachable { url: String, detail: String },
    #[error(
        "quota store {url}: authentication failed ({detail}); put the right password = \"...\" in the [quota_store] table of the secrets file (or the quota_store.password credential)"
    )]
    Auth { url: String, detail: String },
    #[error(
        "quota store {url}: TLS: {detail}; check quota_store_ca_file names the CA that signed the server's certificate and the host name in the URL is in it"
    )]
    Tls { url: String, detail: String },
    #[error("quota store {url}: {detail}")]
    Answer { url: String, detail: String },
}

impl StoreError {
    /// Whether another attempt later may work without a change of configuration.
    pub fn transient(&self) -> bool {
        matches!(self, StoreError::Unreachable { .. })
    }
}

/// One call's arguments (the script's ARGV after the mode).
#[derive(Debug, Clone, Default)]
pub(super) struct Args {
    pub lead_ms: u64,
    pub wanted: u32,
    pub extra: Option<(String, String)>,
}

/// A parsed answer (see "Answers").
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Answer {
    pub go: bool,
    pub value: u64,
    pub now_ms: u64,
    pub messages: u64,
    pub recipients: u64,
    pub freeze_until_ms: u64,
    pub freeze_reason: String,
    pub total: u64,
    /// What `usage` adds, as sent.
    pub rest: Vec<String>,
    /// The local clock just before the call and just after the answer.
    pub sent_at: SystemTime,
    pub got_at: SystemTime,
}

impl Answer {
    /// The server's clock minus ours, rounded so that a server moment converted with
    /// it to our clock is never earlier than the truth (we wake late, never early).
    pub fn offset_late(&self) -> i64 {
        self.now_ms as i64 - floor_ms(self.got_at) as i64
    }

    /// The same rounded the other way: our moments converted to the server's clock
    /// with it are never earlier than the truth (a freeze ends late, never early).
    pub fn offset_early(&self) -> i64 {
        self.now_ms as i64 - floor_ms(self.sent_at) as i64
    }
}

/// A connection to the store, made on first use and again after an error.
pub(super) struct Remote {
    settings: StoreSettings,
    password: Option<Secret>,
    conn: Option<Connection>,
    script: Script,
    keys: [String; 5],
    host: String,
    id: String,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // SECURITY: the password stays out of debug output (Secret redacts it anyway).
        f.debug_struct("Remote")
            .field("url", &self.settings.url)
            .field("id", &self.id)
            .finish()
    }
}

impl Remote {
    /// The ledger of `mailbox` in the store; `id` names this reserver in the line of
    /// waiters (host, process and worker).
    pub fn new(
        settings: &StoreSettings,
        password: Option<Secret>,
        mailbox: &str,
        id: String,
    ) -> Remote {
        let prefix = format!("relay365:{{{}}}:", mailbox.to_ascii_lowercase());
        Remote {
            keys: ["t", "c", "m", "q", "w"].map(|k| format!("{prefix}{k}")),
            host: settings.host.clone(),
            settings: settings.clone(),
            password,
            conn: None,
            script: Script::new(LEDGER_SCRIPT),
            id,
        }
    }

    pub fn url(&self) -> &str {
        &self.settings.url
    }

    pub fn connected(&self) -> bool {
        self.conn.is_some()
    }

    /// The script's SHA1, as `SCRIPT EXISTS` knows it.
    pub fn script_hash(&self) -> &str {
        self.script.get_hash()
    }

    fn error(&self, e: &redis::RedisError) -> StoreError {
        let url = self.settings.url.clone();
        // The client's messages name addresses and server replies, never the password.
        let detail = e.to_string();
        let lower = detail.to_ascii_lowercase();
        if e.kind() == redis::ErrorKind::AuthenticationFailed
            || lower.contains("wrongpass")
            || lower.contains("noauth")
            || lower.contains("invalid password")
            || lower.contains("invalid username-password")
        {
            StoreError::Auth { url, detail }
        } else if lower.contains("certificate") || lower.contains("tls") {
            StoreError::Tls { url, detail }
        } else if e.is_io_error()
            || e.is_timeout()
            || e.is_connection_refusal()
            || e.kind() == redis::ErrorKind::Io
        {
            StoreError::Unreachable { url, detail }
        } else {
            StoreError::Answer { url, detail }
        }
    }

    fn tls_certs(&self) -> Result<TlsCertificates, StoreError> {
        let root_cert = match &self.settings.ca_file {
            Some(p) => Some(std::fs::read(p).map_err(|e| StoreError::Tls {
                url: self.settings.url.clone(),
                detail: format!("cannot read quota_store_ca_file {}: {e}", p.display()),
            })?),
            None => None,
        };
        Ok(TlsCertificates {
            client_tls: None,
            root_cert,
        })
    }

    fn open(&self) -> Result<Connection, StoreError> {
        let timeout = self.settings.timeout;
        let con = match &self.settings.address {
            StoreAddress::Direct { url } => {
                let mut info = redis::IntoConnectionInfo::into_connection_info(url.as_str())
                    .map_err(|e| self.error(&e))?;
                if let Some(p) = &self.password {
                    let settings = info.redis_settings().clone().set_password(p.expose());
                    info = info.set_redis_settings(settings);
                }
                let client = if self.settings.tls() {
                    Client::build_with_tls(info, self.tls_certs()?)
                } else {
                    Client::open(info)
                }
                .map_err(|e| self.error(&e))?;
                client
                    .get_connection_with_timeout(timeout)
                    .map_err(|e| self.error(&e))?
            }
            StoreAddress::Sentinel {
                sentinels,
                master,
                db,
                tls,
            } => self.open_sentinel(sentinels, master, *db, *tls)?,
        };
        con.set_read_timeout(Some(timeout))
            .and_then(|()| con.set_write_timeout(Some(timeout)))
            .map_err(|e| self.error(&e))?;
        Ok(con)
    }

    fn open_sentinel(
        &self,
        sentinels: &[String],
        master: &str,
        db: i64,
        tls: bool,
    ) -> Result<Connection, StoreError> {
        use redis::sentinel::{SentinelClientBuilder, SentinelServerType};
        let mut addrs = Vec::new();
        for s in sentinels {
            let (h, p) = s.rsplit_once(':').unwrap_or((s.as_str(), "26379"));
            let port = p.parse::<u16>().map_err(|_| StoreError::Answer {
                url: self.settings.url.clone(),
                detail: format!("sentinel address {s:?}: the port is not a number"),
            })?;
            addrs.push(if tls {
                redis::ConnectionAddr::TcpTls {
                    host: h.to_owned(),
                    port,
                    insecure: false,
                    tls_params: None,
                }
            } else {
                redis::ConnectionAddr::Tcp(h.to_owned(), port)
            });
        }
        let mut b = SentinelClientBuilder::new(addrs, master, SentinelServerType::Master)
            .map_err(|e| self.error(&e))?
            .set_client_to_redis_db(db);
        if let Some(p) = &self.password {
            b = b.set_client_to_redis_password(p.expose());
        }
        if tls {
            b = b
                .set_client_to_redis_tls_mode(redis::TlsMode::Secure)
                .set_client_to_sentinel_tls_mode(redis::TlsMode::Secure)
                .set_client_to_redis_certificates(self.tls_certs()?)
                .set_client_to_sentinel_certificates(self.tls_certs()?);
        }
        let mut client = b.build().map_err(|e| self.error(&e))?;
        client.get_connection().map_err(|e| self.error(&e))
    }

    /// Runs the script in `mode` for `limits`. On any error the connection is dropped
    /// (the next call reconnects).
    pub fn call(&mut self, mode: &str, limits: &Limits, a: &Args) -> Result<Answer, StoreError> {
        if self.conn.is_none() {
            self.conn = Some(self.open()?);
        }
        let hold = |r: &Rate| if r.is_limited() { r.hold_ms() } else { 0 };
        let day = Limits::default().recipient_rate;
        let (rcount, rhold, cap) = match (mode, limits.recipient_rate.is_limited()) {
            (_, true) => (
                limits.recipient_rate.count,
                hold(&limits.recipient_rate),
                limits.capacity(),
            ),
            ("usage" | "until", false) => (0, day.hold_ms(), 0),
            (_, false) => (0, 0, 0),
        };
        let mhold = match (mode, limits.message_rate.is_limited()) {
            (_, true) => hold(&limits.message_rate),
            ("usage", false) => {
                Rate::new(30, Duration::from_secs(60)).map_or(60_061, |r| r.hold_ms())
            }
            (_, false) => 0,
        };
        let retention = super::super::window::retention_ms(limits);
        let mut inv = self.script.prepare_invoke();
        for k in &self.keys {
            inv.key(k);
        }
        inv.arg(mode)
            .arg(&self.id)
            .arg(&self.host)
            .arg(a.lead_ms)
            .arg(a.wanted)
            .arg(limits.message_rate.count)
            .arg(mhold)
            .arg(rcount)
            .arg(rhold)
            .arg(cap)
            .arg(limits.max_recipients)
            .arg(retention);
        if let Some((x, y)) = &a.extra {
            inv.arg(x).arg(y);
        }
        let sent_at = SystemTime::now();
        let result: Result<Value, _> = match self.conn.as_mut() {
            Some(c) => inv.invoke(c),
            None => return Err(self.unreachable("no connection")),
        };
        let got_at = SystemTime::now();
        let value = match result {
            Ok(v) => v,
            Err(e) => {
                self.conn = None;
                return Err(self.error(&e));
            }
        };
        let bad = |what: &str| StoreError::Answer {
            url: self.settings.url.clone(),
            detail: format!(
                "the ledger script answered {what}; is another program using relay365's keys?"
            ),
        };
        let fields = texts(value).ok_or_else(|| bad("something that is not a list"))?;
        if fields.len() < 8 {
            return Err(bad("a list too short"));
        }
        let num = |i: usize| fields[i].parse::<u64>().map_err(|_| bad("a bad number"));
        Ok(Answer {
            go: num(0)? == 1,
            value: num(1)?,
            now_ms: num(2)?,
            messages: num(3)?,
            recipients: num(4)?,
            freeze_until_ms: num(5)?,
            freeze_reason: fields[6].clone(),
            total: num(7)?,
            rest: fields[8..].to_vec(),
            sent_at,
            got_at,
        })
    }

    fn unreachable(&self, detail: &str) -> StoreError {
        StoreError::Unreachable {
            url: self.settings.url.clone(),
            detail: detail.to_owned(),
        }
    }

    /// Whether the server has the script cached (`SCRIPT EXISTS`), for `relay365 check`.
    pub fn script_loaded(&mut self) -> Result<bool, StoreError> {
        if self.conn.is_none() {
            self.conn = Some(self.open()?);
        }
        let hash = self.script.get_hash().to_owned();
        let result: Result<Vec<bool>, _> = match self.conn.as_mut() {
            Some(c) => redis::cmd("SCRIPT").arg("EXISTS").arg(&hash).query(c),
            None => return Err(self.unreachable("no connection")),
        };
        result
            .map(|v| v.first().copied().unwrap_or(false))
            .map_err(|e| self.error(&e))
    }
}

/// An answer as strings (integers and bulk strings), or `None` if it is not a list.
fn texts(v: Value) -> Option<Vec<String>> {
    let Value::Array(items) = v else {
        return None;
    };
    items
        .into_iter()
        .map(|i| match i {
            Value::Int(n) => Some(n.to_string()),
            Value::BulkString(b) => String::from_utf8(b).ok(),
            Value::SimpleString(s) => Some(s),
            _ => None,
        })
        .collect()
}
