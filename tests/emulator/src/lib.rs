//! relay365-emulator: an in-process Exchange Online SMTP submission endpoint and Entra ID token
//! endpoint on 127.0.0.1, faithful to docs/exchange-online.md, for relay365's tests and benchmarks.
//!
//! ```text
//! test ──SMTP (STARTTLS|implicit|plain)──► server (accept) ─► session (thread per connection)
//!   │                                                          │  replies (exact texts, tails)
//!   │                                                          │  limits (rate, quota, concurrency)
//!   │                                                          │  faults (scripted misbehaviour)
//!   │                                                          ▼
//!   │                                                        store (messages, counters)
//!   └──HTTPS POST /{tenant}/oauth2/v2.0/token──► token (registry shared with the sessions for XOAUTH2)
//! pki: one CA per emulator, leaves for localhost/127.0.0.1 (or deliberately wrong / expired)
//! ```
//! Trust: everything arriving on a socket is untrusted client input (see each module); the
//! `Config` and injected faults come from the test and are trusted.

mod clock;
pub mod config;
pub mod faults;
pub mod graph;
mod headers;
mod https;
mod io;
pub mod jwt;
mod limits;
mod pki;
mod replies;
mod server;
mod session;
pub mod store;
pub mod testkey;
pub mod token;

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

pub use config::{
    App, CertKind, Config, Credential, EXCHANGE_MAX_SIZE, Mailbox, MessageHook, OverRate, TlsMode,
};
pub use faults::{Action, Fault, Stage};
pub use graph::{GraphFault, MailItem};
pub use jwt::{sign_client_assertion, test_certificate_pem};
pub use store::Received;
pub use store::Via;
pub use testkey::TEST_RSA_KEY_PEM;
pub use token::{GRAPH_SCOPE, SCOPE, TokenEndpoint, TokenFault};

use server::Shared;

/// A running emulator. Dropping it (or `shutdown()`) stops the listeners and cuts every connection.
pub struct Emulator {
    shared: Arc<Shared>,
    addr: SocketAddr,
    ca_pem: String,
    token: Option<TokenEndpoint>,
    graph: Option<Arc<graph::Graph>>,
    accept: Option<JoinHandle<()>>,
}

impl Emulator {
    /// Generates the certificates, binds 127.0.0.1 and starts serving.
    pub fn start(cfg: Config) -> std::io::Result<Emulator> {
        let pki = pki::Pki::new()?;
        let smtp_tls = match cfg.tls {
            TlsMode::None => None,
            _ => Some(pki.server_config(&cfg.cert)?),
        };
        let (registry, token) = if cfg.token_endpoint {
            let registry = Arc::new(
                token::TokenRegistry::new(&cfg.apps, cfg.token_lifetime)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?,
            );
            let tls = pki.server_config(&CertKind::Valid)?;
            let endpoint = TokenEndpoint::start(Arc::clone(&registry), tls, cfg.token_port)?;
            (Some(registry), Some(endpoint))
        } else {
            (None, None)
        };
        let listener = TcpListener::bind(("127.0.0.1", cfg.port))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(cfg, smtp_tls, registry.clone()));
        let graph = match (&token, registry) {
            (Some(t), Some(r)) => {
                let g = Arc::new(graph::Graph::new(Arc::clone(&shared), r, t.authority()));
                t.set_graph(Arc::clone(&g));
                let _ = shared.graph.set(Arc::downgrade(&g));
                Some(g)
            }
            _ => None,
        };
        let s = Arc::clone(&shared);
        let accept = std::thread::Builder::new()
            .name("smtp-accept".into())
            .spawn(move || server::accept_loop(s, listener))?;
        Ok(Emulator {
            shared,
            addr,
            ca_pem: pki.ca_pem(),
            token,
            graph,
            accept: Some(accept),
        })
    }

    /// Microsoft Graph's root on the token endpoint's listener (`https://localhost:PORT`),
    /// unless `Config::token_endpoint` was off: configure it as `[account.graph] url`.
    pub fn graph_url(&self) -> Option<String> {
        self.graph.as_ref().map(|g| g.base.clone())
    }

    /// Answers the next `sendMail` (or draft send) requests with this error.
    pub fn inject_graph(&self, fault: GraphFault) {
        if let Some(g) = &self.graph {
            g.inject(fault);
        }
    }

    /// After accepting a message for `rcpt` through Graph, drop an NDR with this status
    /// (`5.1.1`) and diagnostic (`550 5.1.1 RESOLVER.ADR.RecipNotFound; not found`) into
    /// the sending mailbox's inbox, `Config::ndr_delay` later.
    pub fn ndr_for(&self, rcpt: &str, status: &str, diagnostic: &str) {
        if let Some(g) = &self.graph {
            g.ndr_for(rcpt, status, diagnostic);
        }
    }

    /// The messages in `mailbox` (every folder), as Graph keeps them.
    pub fn mailbox_items(&self, mailbox: &str) -> Vec<MailItem> {
        self.graph
            .as_ref()
            .map(|g| g.items(mailbox))
            .unwrap_or_default()
    }

    /// Puts a message into `mailbox`'s inbox; returns its id.
    pub fn deliver_to_inbox(&self, mailbox: &str, mime: &[u8]) -> Option<String> {
        self.graph
            .as_ref()
            .map(|g| g.deliver(mailbox, mime.to_vec()))
    }

    /// `sendMail` requests received.
    pub fn graph_send_requests(&self) -> u64 {
        self.graph
            .as_ref()
            .map_or(0, |g| g.send_requests.load(Ordering::Relaxed))
    }

    /// Graph requests received (any path).
    pub fn graph_requests(&self) -> u64 {
        self.graph
            .as_ref()
            .map_or(0, |g| g.requests.load(Ordering::Relaxed))
    }

    /// The most Graph requests of one app for `mailbox` ever in flight at once.
    pub fn graph_max_concurrent_for(&self, mailbox: &str) -> u32 {
        self.graph.as_ref().map_or(0, |g| g.max_concurrent(mailbox))
    }

    /// The SMTP listener address (127.0.0.1:port).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn config(&self) -> &Config {
        &self.shared.cfg
    }

    /// The CA certificate (PEM) that signed the listeners' leaves: give it to the client as its
    /// only trust anchor.
    pub fn ca_pem(&self) -> String {
        self.ca_pem.clone()
    }

    pub fn write_ca(&self, path: impl AsRef<Path>) -> std::io::Result<()> {
        std::fs::write(path.as_ref(), &self.ca_pem)
    }

    /// The token endpoint, unless `Config::token_endpoint` was off.
    pub fn token(&self) -> Option<&TokenEndpoint> {
        self.token.as_ref()
    }

    pub fn token_port(&self) -> Option<u16> {
        self.token.as_ref().map(TokenEndpoint::port)
    }

    /// `https://localhost:PORT/{tenant}/oauth2/v2.0/token`.
    pub fn token_url(&self, tenant: &str) -> Option<String> {
        self.token.as_ref().map(|t| t.url(tenant))
    }

    /// `https://localhost:PORT` (replaces `https://login.microsoftonline.com`).
    pub fn token_authority(&self) -> Option<String> {
        self.token.as_ref().map(TokenEndpoint::authority)
    }

    /// Scripts a fault; faults are consumed in injection order per stage.
    pub fn inject(&self, fault: Fault) {
        self.shared.faults.inject(fault);
    }

    pub fn clear_faults(&self) {
        self.shared.faults.clear();
    }

    /// Faults not yet used up.
    pub fn pending_faults(&self) -> Vec<Fault> {
        self.shared.faults.pending()
    }

    /// Every accepted message so far, in acceptance order.
    pub fn messages(&self) -> Vec<Received> {
        self.shared.store.messages()
    }

    pub fn message_count(&self) -> usize {
        self.shared.store.message_count()
    }

    /// Waits until at least `n` messages were accepted; false on timeout.
    pub fn wait_for_messages(&self, n: usize, timeout: Duration) -> bool {
        self.shared.store.wait_for(n, timeout)
    }

    /// Forgets messages, reply counters, error replies and connection counters (not the rate
    /// and quota ledgers: see `reset_limits`).
    pub fn clear(&self) {
        self.shared.store.clear();
        self.shared.limits.clear_max_concurrent();
    }

    /// Forgets the message-rate and recipient-quota history of every mailbox.
    pub fn reset_limits(&self) {
        self.shared.limits.reset();
    }

    /// Connections accepted.
    pub fn connections_opened(&self) -> u64 {
        self.shared.store.connections_opened.load(Ordering::Relaxed)
    }

    /// Commands that arrived before the reply to the command before them was sent
    /// (the client pipelined them, RFC 2920).
    pub fn pipelined_commands(&self) -> u64 {
        self.shared.store.pipelined.load(Ordering::Relaxed)
    }

    /// Connections open right now.
    pub fn connections_current(&self) -> u64 {
        self.shared
            .store
            .connections_current
            .load(Ordering::Relaxed)
    }

    /// The most connections ever open at once.
    pub fn max_concurrent_connections(&self) -> u64 {
        self.shared.store.connections_max.load(Ordering::Relaxed)
    }

    /// The most authenticated connections of `mailbox` ever open at once.
    pub fn max_concurrent_for(&self, mailbox: &str) -> u32 {
        self.shared.limits.max_concurrent(mailbox)
    }

    /// How many replies with this code were sent (e.g. `assert_eq!(emu.reply_count(554), 0)`).
    pub fn reply_count(&self, code: u16) -> u64 {
        self.shared.store.reply_count(code)
    }

    pub fn reply_counts(&self) -> BTreeMap<u16, u64> {
        self.shared.store.reply_counts()
    }

    /// The first line of every 4xx/5xx reply sent, in order.
    pub fn error_replies(&self) -> Vec<String> {
        self.shared.store.error_replies()
    }

    /// Messages whose reply was held back by `OverRate::Throttle`.
    pub fn throttled_count(&self) -> u64 {
        self.shared.store.throttled.load(Ordering::Relaxed)
    }

    pub fn accepted_times(&self) -> Vec<SystemTime> {
        self.shared.store.accepted_times()
    }

    /// The most messages accepted within any span of `window` (all mailboxes).
    pub fn max_in_window(&self, window: Duration) -> u32 {
        self.shared.store.max_in_window(window, None, false)
    }

    /// The most recipients accepted within any span of `window` (all mailboxes).
    pub fn max_recipients_in_window(&self, window: Duration) -> u32 {
        self.shared.store.max_in_window(window, None, true)
    }

    /// As `max_in_window`, for one authenticated mailbox.
    pub fn max_in_window_for(&self, mailbox: &str, window: Duration) -> u32 {
        self.shared
            .store
            .max_in_window(window, Some(mailbox), false)
    }

    pub fn max_recipients_in_window_for(&self, mailbox: &str, window: Duration) -> u32 {
        self.shared.store.max_in_window(window, Some(mailbox), true)
    }

    /// Cuts every open SMTP connection without a reply (the listener stays up).
    pub fn kill_connections(&self) {
        self.shared.kill_connections();
    }

    /// Stops listening and cuts every connection. Idempotent.
    pub fn shutdown(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            // Wake the blocking accept so it sees the flag.
            let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
            let _ = t.join();
        }
        self.shared.kill_connections();
        if let Some(mut t) = self.token.take() {
            t.shutdown();
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn handles_can_be_shared_across_test_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<super::Emulator>();
        assert_send_sync::<super::TokenEndpoint>();
        assert_send_sync::<super::Config>();
    }
}
