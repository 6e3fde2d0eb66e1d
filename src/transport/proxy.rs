//! HTTP proxies: the tunnel (`CONNECT host:port`, RFC 9110 §9.3.6) that SMTP submission
//! opens through a corporate proxy, and the same proxy handed to the HTTPS client for the
//! token endpoint and Microsoft Graph. TLS runs end to end inside the tunnel: the proxy
//! sees only the host name and port, and the server's certificate is still verified
//! against Microsoft's name.
//!
//! Trust: the proxy is the administrator's choice but its answers are untrusted network
//! input: the status line and headers are bounded and parsed strictly, and only a `2xx`
//! opens the tunnel. The proxy password comes from the secrets file (or the URL) and is
//! sent only in `Proxy-Authorization`, never logged.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use base64::Engine;

use super::classify::{Action, HoldUntil, Verdict};
use crate::config::Account;
use crate::config::graph::ProxySettings;
use crate::secrets::{AccountSecrets, Secret};

/// Longest proxy answer read before the tunnel (status line plus headers).
const MAX_ANSWER: usize = 16 * 1024;

/// A proxy with its credentials, ready to use.
#[derive(Clone)]
pub struct HttpProxy {
    pub settings: ProxySettings,
    password: Option<Secret>,
}

impl std::fmt::Debug for HttpProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // SECURITY: the password never prints.
        write!(f, "HttpProxy({})", self.settings.display())
    }
}

/// Why a tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot reach the HTTP proxy {proxy}: {detail} (relay365 retries)")]
    Unreachable { proxy: String, detail: String },
    #[error(
        "the HTTP proxy {proxy} requires authentication (407): set the user in proxy = \"http://user@host:port\" and its password as proxy_password in the account's table of the secrets file"
    )]
    AuthRequired { proxy: String },
    #[error(
        "the HTTP proxy {proxy} refused to open a tunnel to {target} ({status}): allow CONNECT to {target} for this host in the proxy's rules (tinyproxy: ConnectPort; squid: http_access for CONNECT and the port)"
    )]
    Refused {
        proxy: String,
        target: String,
        status: String,
    },
    #[error(
        "the HTTP proxy {proxy} could not reach {target} ({status}): relay365 retries; if it lasts, check the proxy's own route to Microsoft"
    )]
    Upstream {
        proxy: String,
        target: String,
        status: String,
    },
    #[error("the HTTP proxy {proxy} sent an unusable answer to CONNECT: {problem}")]
    BadAnswer { proxy: String, problem: String },
}

impl ProxyError {
    /// What the account must do: a proxy that refuses or wants credentials needs the
    /// administrator (hold, never bounce); an unreachable one may come back (defer).
    pub fn verdict(&self) -> Verdict {
        let reason = self.to_string();
        match self {
            ProxyError::Unreachable { .. } | ProxyError::Upstream { .. } => Verdict {
                action: Action::Defer { hint: None },
                reason,
            },
            _ => Verdict {
                action: Action::HoldAccount {
                    until: HoldUntil::Release,
                    fix: reason.clone(),
                },
                reason,
            },
        }
    }
}

impl HttpProxy {
    pub fn new(settings: ProxySettings, password: Option<Secret>) -> HttpProxy {
        HttpProxy { settings, password }
    }

    /// The proxy the account uses for `host`, with the password from the secrets file
    /// (which wins over one written into the URL).
    pub fn for_account(
        account: &Account,
        secrets: Option<&AccountSecrets>,
        host: &str,
    ) -> Option<HttpProxy> {
        let settings = account.proxy.for_host(host)?;
        let password = secrets
            .and_then(AccountSecrets::proxy_password)
            .cloned()
            .or_else(|| settings.password.clone().map(Secret::new));
        Some(HttpProxy { settings, password })
    }

    fn credentials(&self) -> Option<Secret> {
        let user = self.settings.user.as_deref()?;
        let pass = self.password.as_ref().map_or("", |p| p.expose());
        Some(Secret::new(
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}")),
        ))
    }

    /// This proxy for the HTTPS client (token endpoint, Graph), which sends `CONNECT`
    /// itself.
    pub fn for_ureq(&self) -> Result<ureq::Proxy, ProxyError> {
        let mut b = ureq::Proxy::builder(ureq::ProxyProtocol::Http)
            .host(&self.settings.host)
            .port(self.settings.port);
        if let Some(u) = &self.settings.user {
            b = b.username(u);
            if let Some(p) = &self.password {
                b = b.password(p.expose());
            }
        }
        b.build().map_err(|e| ProxyError::BadAnswer {
            proxy: self.settings.display(),
            problem: format!("the proxy setting is not usable: {e}"),
        })
    }

    /// Opens a TCP connection to `host:port` through the proxy: after this the stream
    /// carries the bytes to and from the server, and TLS starts on it as on a direct
    /// connection.
    pub fn connect(
        &self,
        host: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<TcpStream, ProxyError> {
        let proxy = self.settings.display();
        let unreachable = |detail: String| ProxyError::Unreachable {
            proxy: proxy.clone(),
            detail,
        };
        let addrs = (self.settings.host.as_str(), self.settings.port)
            .to_socket_addrs()
            .map_err(|e| unreachable(e.to_string()))?;
        let mut last = String::from("no address");
        let mut stream = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, timeout) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = e.to_string(),
            }
        }
        let mut stream = stream.ok_or_else(|| unreachable(last))?;
        stream
            .set_read_timeout(Some(timeout))
            .and_then(|()| stream.set_write_timeout(Some(timeout)))
            .map_err(|e| unreachable(e.to_string()))?;
        // SECURITY: the target comes from the validated config (a host name), never from
        // mail; a host with a space or CR/LF cannot reach this line.
        if host.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(ProxyError::BadAnswer {
                proxy,
                problem: "the server's host name holds spaces or control characters".into(),
            });
        }
        let target = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some(c) = self.credentials() {
            // SECURITY: the credentials go to the proxy only, in this one header.
            request.push_str(&format!("Proxy-Authorization: Basic {}\r\n", c.expose()));
        }
        request.push_str("\r\n");
        stream
            .write_all(request.as_bytes())
            .and_then(|()| stream.flush())
            .map_err(|e| unreachable(e.to_string()))?;
        drop(Secret::new(request));
        let head = read_head(&mut stream).map_err(|problem| ProxyError::BadAnswer {
            proxy: proxy.clone(),
            problem,
        })?;
        let status = parse_status(&head).ok_or_else(|| ProxyError::BadAnswer {
            proxy: proxy.clone(),
            problem: "no HTTP status line".into(),
        })?;
        match status.0 {
            200..=299 => Ok(stream),
            407 => Err(ProxyError::AuthRequired { proxy }),
            500..=599 => Err(ProxyError::Upstream {
                proxy,
                target,
                status: format!("{} {}", status.0, status.1),
            }),
            _ => Err(ProxyError::Refused {
                proxy,
                target,
                status: format!("{} {}", status.0, status.1),
            }),
        }
    }
}

/// Reads the proxy's answer up to the blank line, one byte at a time so that nothing
/// of the tunnelled stream (the server's greeting) is consumed.
fn read_head(stream: &mut TcpStream) -> Result<String, String> {
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && !head.ends_with(b"\n\n") {
        if head.len() >= MAX_ANSWER {
            return Err("the answer is longer than 16 KiB".into());
        }
        match stream.read(&mut byte) {
            Ok(0) => return Err("the proxy closed the connection".into()),
            Ok(_) => head.push(byte[0]),
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// `HTTP/1.x 200 Connection established` → (200, "Connection established"), the reason
/// cleaned of control characters and bounded.
fn parse_status(head: &str) -> Option<(u16, String)> {
    let line = head.lines().next()?;
    let mut parts = line.splitn(3, ' ');
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?.parse::<u16>().ok()?;
    let reason: String = parts
        .next()
        .unwrap_or("")
        .chars()
        .filter(|c| !c.is_control())
        .take(100)
        .collect();
    Some((code, reason))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn proxy(port: u16, user: Option<&str>, password: Option<&str>) -> HttpProxy {
        HttpProxy::new(
            ProxySettings {
                host: "127.0.0.1".into(),
                port,
                user: user.map(str::to_owned),
                password: None,
            },
            password.map(|p| Secret::new(p.to_owned())),
        )
    }

    /// A one-shot proxy that answers CONNECT with `answer` and records the request.
    fn fake(answer: &'static str) -> (u16, std::thread::JoinHandle<String>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut got = Vec::new();
            let mut b = [0u8; 1];
            while !got.ends_with(b"\r\n\r\n") {
                s.read_exact(&mut b).unwrap();
                got.push(b[0]);
            }
            s.write_all(answer.as_bytes()).unwrap();
            String::from_utf8(got).unwrap()
        });
        (port, t)
    }

    #[test]
    fn a_tunnel_opens_on_200_and_leaves_the_server_bytes_unread() {
        let (port, t) = fake("HTTP/1.1 200 Connection established\r\nX: y\r\n\r\n220 greeting\r\n");
        let mut s = proxy(port, Some("u"), Some("p w"))
            .connect("smtp.office365.com", 587, Duration::from_secs(5))
            .unwrap();
        let req = t.join().unwrap();
        assert!(
            req.starts_with("CONNECT smtp.office365.com:587 HTTP/1.1\r\n"),
            "{req}"
        );
        // base64("u:p w")
        assert!(
            req.contains("Proxy-Authorization: Basic dTpwIHc=\r\n"),
            "{req}"
        );
        let mut rest = String::new();
        s.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "220 greeting\r\n");
    }

    #[test]
    fn refusals_hold_and_an_absent_proxy_defers() {
        let (port, t) = fake("HTTP/1.1 407 Proxy Authentication Required\r\n\r\n");
        let e = proxy(port, None, None)
            .connect("smtp.office365.com", 587, Duration::from_secs(5))
            .unwrap_err();
        t.join().unwrap();
        assert!(matches!(e, ProxyError::AuthRequired { .. }), "{e}");
        assert!(matches!(e.verdict().action, Action::HoldAccount { .. }));
        assert!(e.to_string().contains("proxy_password"), "{e}");
        let (port, t) = fake("HTTP/1.0 403 Access violation\r\n\r\n");
        let e = proxy(port, None, None)
            .connect("smtp.office365.com", 587, Duration::from_secs(5))
            .unwrap_err();
        t.join().unwrap();
        assert!(matches!(e, ProxyError::Refused { .. }), "{e}");
        assert!(e.to_string().contains("403 Access violation"), "{e}");
        assert!(matches!(e.verdict().action, Action::HoldAccount { .. }));
        let free = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = free.local_addr().unwrap().port();
        drop(free);
        let e = proxy(port, None, None)
            .connect("smtp.office365.com", 587, Duration::from_secs(5))
            .unwrap_err();
        assert!(matches!(e.verdict().action, Action::Defer { .. }), "{e}");
    }

    #[test]
    fn status_lines() {
        assert_eq!(
            parse_status("HTTP/1.1 200 OK\r\n\r\n"),
            Some((200, "OK".into()))
        );
        assert_eq!(parse_status("SSH-2.0-x\r\n"), None);
        assert_eq!(parse_status("HTTP/1.1 abc\r\n"), None);
    }
}
