//! The listening sockets: taken from systemd socket activation (`LISTEN_FDS` and
//! `LISTEN_PID`, `relay365-listen.socket`, so the process never needs root for
//! port 25), or bound from `[listener] listen` when run in the foreground.
//!
//! Trusts the environment's LISTEN_* variables only when LISTEN_PID is this process
//! (checked by `listenfd`), and then only for sockets that are TCP listeners.

use std::net::{SocketAddr, TcpListener};

/// Why no socket could be had.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("socket activation passed fd {index}, which is not a TCP listening socket: {source}")]
    Activation {
        index: usize,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot listen on any of {addresses}: {last}; ports below 1024 need root or socket activation (relay365-listen.socket), or choose other addresses in [listener] listen"
    )]
    Bind { addresses: String, last: String },
}

/// The sockets to serve, and whether systemd passed them.
pub fn sockets(
    listen: &[SocketAddr],
) -> Result<(Vec<TcpListener>, bool, Vec<String>), SocketError> {
    let mut fds = listenfd::ListenFd::from_env();
    let mut out = Vec::new();
    for index in 0..fds.len() {
        match fds.take_tcp_listener(index) {
            Ok(Some(l)) => out.push(l),
            Ok(None) => {}
            Err(source) => return Err(SocketError::Activation { index, source }),
        }
    }
    if !out.is_empty() {
        return Ok((out, true, Vec::new()));
    }
    let mut warnings = Vec::new();
    let mut last = String::from("no address configured");
    for addr in listen {
        match TcpListener::bind(addr) {
            Ok(l) => out.push(l),
            Err(e) => {
                // [::1] may be missing on a host without IPv6: go on with the others.
                last = format!("{addr}: {e}");
                warnings.push(format!("cannot listen on {addr}: {e}"));
            }
        }
    }
    if out.is_empty() {
        return Err(SocketError::Bind {
            addresses: listen
                .iter()
                .map(SocketAddr::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            last,
        });
    }
    Ok((out, false, warnings))
}
