//! The SMTP listener: accepts on 127.0.0.1, runs one session thread per connection, and
//! keeps a handle on every live socket so shutdown (or a test) can cut them all at once.
//!
//! Accepts any loopback client; what a client may do is decided by the session.

use std::collections::HashMap;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::ServerConfig;

use crate::config::Config;
use crate::faults::Faults;
use crate::limits::Limits;
use crate::store::Store;
use crate::token::TokenRegistry;

/// State shared by the listener, every session and the `Emulator` handle.
pub(crate) struct Shared {
    pub(crate) cfg: Config,
    pub(crate) smtp_tls: Option<Arc<ServerConfig>>,
    pub(crate) store: Store,
    pub(crate) limits: Limits,
    pub(crate) faults: Faults,
    pub(crate) tokens: Option<Arc<TokenRegistry>>,
    /// Graph, for the NDRs of messages accepted over SMTP (weak: Graph holds this).
    pub(crate) graph: std::sync::OnceLock<std::sync::Weak<crate::graph::Graph>>,
    pub(crate) shutdown: Arc<AtomicBool>,
    live: Mutex<HashMap<u64, TcpStream>>,
    next_conn: AtomicU64,
}

impl Shared {
    pub(crate) fn new(
        cfg: Config,
        smtp_tls: Option<Arc<ServerConfig>>,
        tokens: Option<Arc<TokenRegistry>>,
    ) -> Shared {
        let limits = Limits::new(cfg.message_rate, cfg.recipient_rate);
        Shared {
            cfg,
            smtp_tls,
            store: Store::default(),
            limits,
            faults: Faults::default(),
            tokens,
            graph: std::sync::OnceLock::new(),
            shutdown: Arc::new(AtomicBool::new(false)),
            live: Mutex::default(),
            next_conn: AtomicU64::new(1),
        }
    }

    /// Cuts every open SMTP connection (as a crashing server would).
    pub(crate) fn kill_connections(&self) {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        for s in live.values() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

pub(crate) fn accept_loop(sh: Arc<Shared>, listener: TcpListener) {
    for conn in listener.incoming() {
        if sh.shutdown.load(Ordering::SeqCst) {
            break;
        }
        let Ok(sock) = conn else {
            // EMFILE and friends: back off instead of spinning.
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        let id = sh.next_conn.fetch_add(1, Ordering::Relaxed);
        if let Ok(clone) = sock.try_clone() {
            sh.live
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id, clone);
        }
        sh.store.connection_opened();
        let s = Arc::clone(&sh);
        let spawned = std::thread::Builder::new()
            .name(format!("smtp-{id}"))
            .spawn(move || {
                crate::session::run(&s, sock, id);
                s.live.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                s.store.connection_closed();
            });
        if spawned.is_err() {
            sh.live
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            sh.store.connection_closed();
        }
    }
}
