//! SMTP submission client: our own small dialogue over a std `TcpStream`, secured with
//! rustls (STARTTLS or implicit TLS), then EHLO, AUTH (LOGIN, PLAIN, XOAUTH2), and
//! per-recipient MAIL/RCPT/DATA so that a recipient refused at RCPT does not sink the
//! others. When the server offers PIPELINING (RFC 2920, as Exchange Online does),
//! MAIL, every RCPT and DATA go out in one write ([`Session::envelope`]), which halves
//! the round trips per message; the message and its final dot always go out in one
//! write. Connections are kept and reused between messages.
//!
//! Why not lettre: it refuses reply lines over 1,000 bytes, and Exchange's quota replies
//! carry long diagnostic tails (read as "no reply", the account was deferred instead of
//! frozen); it cannot pipeline; and it wrote the body and the final dot apart (a Nagle
//! stall per message).
//!
//! Trusts the server only after rustls has verified its certificate against the system
//! store plus the account's `ca_file` ([`super::tls`]); there is no way to turn
//! verification off. Every reply is untrusted: lines of any length are read, but only
//! a bounded part of each is kept, a whole reply is bounded, and anything that is not
//! SMTP ends the connection. Any I/O error, timeout or protocol error marks the
//! session unusable, so the caller reconnects.

use std::io::Write;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use zeroize::Zeroizing;

use super::classify::{self, Stage, Verdict};
use super::oauth::xoauth2_sasl;
use super::proxy::HttpProxy;
use super::reply::Reply;
use conn::{Conn, Stream, is_timeout};
pub use submit::{Dial, Submission};

mod conn;
pub mod params;
mod submit;
use crate::config::TlsMode;
use crate::secrets::Secret;

/// Most bytes kept of one reply line; the rest of the line is read and dropped.
pub const MAX_LINE_KEPT: usize = 4 * 1024;
/// Most bytes kept of one reply (the last line is always kept, bounded as above).
pub const MAX_REPLY_KEPT: usize = 64 * 1024;
/// Most bytes read for one reply before the server is taken for broken: bounds the
/// work a server that never ends its reply can cause (the per-read timeout cannot).
pub const MAX_REPLY_READ: u64 = 16 * 1024 * 1024;

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct Endpoint<'a> {
    pub host: &'a str,
    pub port: u16,
    pub tls: TlsMode,
    pub ca_file: Option<&'a Path>,
    pub timeout: Duration,
    pub helo_name: &'a str,
    /// The HTTP proxy to tunnel through (`CONNECT host:port`), if any.
    pub proxy: Option<&'a HttpProxy>,
}

/// How to authenticate; secrets stay wrapped until the AUTH line is built.
#[derive(Debug)]
pub enum Login<'a> {
    None,
    Login { user: &'a str, password: &'a Secret },
    Plain { user: &'a str, password: &'a Secret },
    Xoauth2 { user: &'a str, token: &'a Secret },
}

/// A step that did not succeed: the stage, the server's reply if there was one, and
/// a description otherwise (dropped connection, timeout, TLS failure).
#[derive(Debug, Clone)]
pub struct Failure {
    pub stage: Stage,
    pub reply: Option<Reply>,
    pub detail: String,
    /// The verdict when it does not follow from a reply (a proxy that refused).
    pub decided: Option<Box<Verdict>>,
}

impl Failure {
    fn new(stage: Stage, detail: impl Into<String>) -> Failure {
        Failure {
            stage,
            reply: None,
            detail: detail.into(),
            decided: None,
        }
    }

    fn refused(stage: Stage, reply: Reply) -> Failure {
        Failure {
            stage,
            detail: reply.to_string(),
            reply: Some(reply),
            decided: None,
        }
    }

    /// What the failure means, from [`classify`]'s decision table.
    pub fn verdict(&self) -> Verdict {
        if let Some(v) = &self.decided {
            return (**v).clone();
        }
        match &self.reply {
            Some(r) => classify::classify(r, self.stage),
            None if self.is_certificate_error() => classify::untrusted_certificate(&self.detail),
            None => classify::classify_no_reply(self.stage, &self.detail),
        }
    }

    /// Whether TLS failed because the server's certificate could not be verified.
    pub fn is_certificate_error(&self) -> bool {
        self.reply.is_none()
            && matches!(self.stage, Stage::Connect | Stage::StartTls)
            && self.detail.to_ascii_lowercase().contains("certificate")
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.reply {
            Some(r) => write!(f, "{r} (in reply to {})", self.stage),
            None => write!(f, "{} (during {})", self.detail, self.stage),
        }
    }
}

/// What the server offers, from its EHLO reply after TLS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Offer {
    /// The advertised SIZE limit, if any.
    pub size: Option<u64>,
    pub eight_bit: bool,
    pub smtputf8: bool,
    pub dsn: bool,
    pub auth: Vec<String>,
    pub starttls: bool,
    /// RFC 2920: MAIL, RCPT and DATA may be sent without waiting for each reply.
    pub pipelining: bool,
}

impl Offer {
    /// Parses EHLO keyword lines (without the code).
    pub fn parse<'a>(lines: impl Iterator<Item = &'a str>) -> Offer {
        let mut o = Offer::default();
        for line in lines.skip(1) {
            let mut words = line.split_whitespace();
            let Some(kw) = words.next() else { continue };
            match kw.to_ascii_uppercase().as_str() {
                "SIZE" => o.size = words.next().and_then(|n| n.parse().ok()).filter(|&n| n > 0),
                "8BITMIME" => o.eight_bit = true,
                "SMTPUTF8" => o.smtputf8 = true,
                "DSN" => o.dsn = true,
                "STARTTLS" => o.starttls = true,
                "PIPELINING" => o.pipelining = true,
                "AUTH" => o.auth = words.map(|w| w.to_ascii_uppercase()).collect(),
                _ => {}
            }
        }
        o
    }
}

/// Builds `verb` + parameters + CRLF, refusing CR or LF inside (they would inject commands).
fn command_line(stage: Stage, head: String, params: &[String]) -> Result<String, Failure> {
    let mut line = head;
    for p in params {
        line.push(' ');
        line.push_str(p);
    }
    // SECURITY: one command per line; addresses are validated upstream, this is the backstop.
    if line.contains(['\r', '\n']) {
        return Err(Failure::new(
            stage,
            "refusing to send a command containing CR or LF",
        ));
    }
    line.push_str("\r\n");
    Ok(line)
}

/// `prefix` + base64(`data`) + CRLF, in a buffer that is wiped when dropped.
fn sasl_line(prefix: &str, data: &[u8]) -> Zeroizing<String> {
    let len = base64::encoded_len(data.len(), true).unwrap_or(0);
    // Reserve once so building never reallocates and leaves an unzeroed copy.
    let mut line = Zeroizing::new(String::with_capacity(prefix.len() + len + 2));
    line.push_str(prefix);
    STANDARD.encode_string(data, &mut line);
    line.push_str("\r\n");
    line
}

/// The message as the DATA phase sends it: transparency (RFC 5321 4.5.2: a line that
/// starts with a dot gets another one, a line being what follows CRLF or the start),
/// then the final dot. Works on bytes, so a message that is not UTF-8 goes the same
/// way. The stored message ends in CRLF; one is added only if it does not, so the dot
/// never joins the last line, and no empty line is added to the body.
fn data_block(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + message.len() / 512 + 8);
    let mut rest = message;
    while !rest.is_empty() {
        if rest[0] == b'.' {
            out.push(b'.');
        }
        let end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .map_or(rest.len(), |i| i + 2);
        out.extend_from_slice(&rest[..end]);
        rest = &rest[end..];
    }
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// The replies to a pipelined MAIL and RCPTs, in order; the DATA reply is kept by the
/// session for [`Session::data`] or [`Session::rset`].
#[derive(Debug)]
pub struct Envelope {
    pub mail: Result<Reply, Failure>,
    pub rcpts: Vec<Result<Reply, Failure>>,
}

/// An open, possibly authenticated, SMTP session.
pub struct Session {
    conn: Conn,
    peer: SocketAddr,
    tls: bool,
    /// The reply to a pipelined DATA not yet acted on, and whether any of that
    /// transaction's recipients was accepted.
    pending_data: Option<(Result<Reply, Failure>, bool)>,
    pub offer: Offer,
    /// `host[address]:port`, for log lines.
    pub relay: String,
    /// Transactions completed on this connection.
    pub transactions: u32,
    /// MAIL commands sent on this connection, whatever their outcome.
    pub mails: u32,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("relay", &self.relay)
            .finish()
    }
}

/// Connects to the first address of `host` that answers.
fn connect(ep: &Endpoint) -> Result<(TcpStream, SocketAddr), Failure> {
    if let Some(proxy) = ep.proxy {
        // SECURITY: the tunnel carries the same TLS as a direct connection; the
        // certificate is checked against ep.host, never the proxy's name.
        let tcp = proxy
            .connect(ep.host, ep.port, ep.timeout)
            .map_err(|e| Failure {
                decided: Some(Box::new(e.verdict())),
                ..Failure::new(Stage::Connect, e.to_string())
            })?;
        let peer = tcp
            .peer_addr()
            .map_err(|e| Failure::new(Stage::Connect, format!("the proxy's socket: {e}")))?;
        return Ok((tcp, peer));
    }
    let addrs: Vec<SocketAddr> = (ep.host, ep.port)
        .to_socket_addrs()
        .map(Iterator::collect)
        .unwrap_or_default();
    if addrs.is_empty() {
        return Err(Failure::new(
            Stage::Connect,
            format!("cannot resolve {}", ep.host),
        ));
    }
    let mut last = String::new();
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, ep.timeout) {
            Ok(s) => return Ok((s, addr)),
            Err(e) if is_timeout(&e) => {
                last = format!("timed out after {:?} connecting to {addr}", ep.timeout);
            }
            Err(e) => last = format!("cannot connect to {addr}: {e}"),
        }
    }
    Err(Failure::new(Stage::Connect, last))
}

/// Runs the TLS handshake to its end, so a certificate or protocol failure shows at
/// the stage that caused it rather than at the next command.
fn handshake(
    mut tcp: TcpStream,
    config: Arc<ClientConfig>,
    host: &str,
    stage: Stage,
) -> Result<Stream, Failure> {
    // SECURITY: SNI and certificate name checks use the configured host name.
    let name = ServerName::try_from(host.to_owned())
        .map_err(|_| Failure::new(stage, format!("{host} is not a valid TLS server name")))?;
    let mut conn = ClientConnection::new(config, name)
        .map_err(|e| Failure::new(stage, format!("cannot start TLS: {e}")))?;
    while conn.is_handshaking() {
        match conn.complete_io(&mut tcp) {
            Ok((0, 0)) if conn.wants_read() => {
                return Err(Failure::new(
                    stage,
                    "the server closed the connection during the TLS handshake",
                ));
            }
            Ok(_) => {}
            Err(e) if is_timeout(&e) => {
                return Err(Failure::new(stage, "timed out during the TLS handshake"));
            }
            Err(e) => {
                let untrusted = e
                    .get_ref()
                    .and_then(|i| i.downcast_ref::<rustls::Error>())
                    .is_some_and(|e| matches!(e, rustls::Error::InvalidCertificate(_)));
                let detail = if untrusted {
                    format!("TLS failure: the server's certificate is not trusted: {e}")
                } else {
                    format!("TLS handshake failed: {e}")
                };
                return Err(Failure::new(stage, detail));
            }
        }
    }
    Ok(Stream::Tls(Box::new(StreamOwned::new(conn, tcp))))
}

fn tls_config(ep: &Endpoint) -> Result<Arc<ClientConfig>, Failure> {
    super::tls::client_config(ep.ca_file).map_err(|e| Failure::new(Stage::Connect, e.to_string()))
}

impl Session {
    /// Connects, secures the connection as configured, and reads the server's offer.
    pub fn open(ep: &Endpoint) -> Result<Session, Failure> {
        if ep.helo_name.is_empty()
            || ep
                .helo_name
                .contains(|c: char| c.is_whitespace() || c.is_control())
        {
            return Err(Failure::new(
                Stage::Ehlo,
                format!("{:?} is not a usable EHLO name", ep.helo_name),
            ));
        }
        let config = match ep.tls {
            TlsMode::None => None,
            TlsMode::Starttls | TlsMode::Tls => Some(tls_config(ep)?),
        };
        let (tcp, peer) = connect(ep)?;
        let relay = format!("{}[{}]:{}", ep.host, peer.ip(), ep.port);
        let timeout = Some(ep.timeout).filter(|t| !t.is_zero());
        // Commands are written whole; Nagle would only hold the last segment back.
        let setup = tcp
            .set_nodelay(true)
            .and_then(|()| tcp.set_read_timeout(timeout))
            .and_then(|()| tcp.set_write_timeout(timeout));
        if let Err(e) = setup {
            return Err(Failure::new(
                Stage::Connect,
                format!("cannot set up the socket: {e}"),
            ));
        }
        let stream = match (&config, ep.tls) {
            (Some(c), TlsMode::Tls) => handshake(tcp, c.clone(), ep.host, Stage::Connect)?,
            _ => Stream::Plain(tcp),
        };
        let mut conn = Conn::new(stream, ep.timeout);
        conn.expect(Stage::Greeting, 2)?;
        let ehlo = format!("EHLO {}\r\n", ep.helo_name);
        let mut hello = conn.command(Stage::Ehlo, ehlo.as_bytes(), 2)?;
        let mut tls = ep.tls == TlsMode::Tls;
        if let (Some(config), TlsMode::Starttls) = (config, ep.tls) {
            if !Offer::parse(hello.lines.iter().map(String::as_str)).starttls {
                // SECURITY: never fall back to plain text, whatever the server offers.
                return Err(Failure::new(
                    Stage::Ehlo,
                    format!(
                        "{relay} does not offer STARTTLS; refusing to send credentials or mail in plain text"
                    ),
                ));
            }
            conn.command(Stage::StartTls, b"STARTTLS\r\n", 2)?;
            // SECURITY: bytes that came with the 220 were sent in plain text, where anyone
            // on the path could have added them; taking them as replies over TLS is the
            // STARTTLS injection flaw (CVE-2011-0411 class). Refuse the server instead.
            if !conn.io.buffer().is_empty() {
                return Err(Failure::new(
                    Stage::StartTls,
                    format!(
                        "{relay} sent data after its reply to STARTTLS, before TLS began (possible command injection); refusing to continue"
                    ),
                ));
            }
            let Stream::Plain(tcp) = conn.io.into_inner() else {
                return Err(Failure::new(Stage::StartTls, "TLS is already on"));
            };
            conn = Conn::new(
                handshake(tcp, config, ep.host, Stage::StartTls)?,
                ep.timeout,
            );
            tls = true;
            // RFC 3207: forget what was learnt before TLS and ask again.
            hello = conn.command(Stage::Ehlo, ehlo.as_bytes(), 2)?;
        }
        let offer = Offer::parse(hello.lines.iter().map(String::as_str));
        Ok(Session {
            conn,
            peer,
            tls,
            pending_data: None,
            offer,
            relay,
            transactions: 0,
            mails: 0,
        })
    }

    /// Authenticates; `Login::None` does nothing.
    pub fn authenticate(&mut self, login: &Login) -> Result<(), Failure> {
        let (mechanism, user, secret) = match login {
            Login::None => return Ok(()),
            Login::Login { user, password } => ("LOGIN", user, password),
            Login::Plain { user, password } => ("PLAIN", user, password),
            Login::Xoauth2 { user, token } => ("XOAUTH2", user, token),
        };
        if !self.offer.auth.iter().any(|m| m == mechanism) {
            return Err(Failure::new(
                Stage::Auth,
                format!(
                    "the server does not offer AUTH {mechanism} (it offers: {})",
                    self.offer.auth.join(" ")
                ),
            ));
        }
        // SECURITY: credentials only over TLS, or in plain text to this machine
        // (tls = "none", which the configuration allows only for a loopback host).
        if !self.tls && !self.peer.ip().is_loopback() {
            return Err(Failure::new(
                Stage::Auth,
                format!("refusing to send credentials to {} without TLS", self.relay),
            ));
        }
        let secret_text = secret.expose();
        let secret = secret_text.as_bytes();
        let stage = Stage::Auth;
        match mechanism {
            "LOGIN" => {
                self.conn.command(stage, b"AUTH LOGIN\r\n", 3)?;
                self.conn
                    .command(stage, sasl_line("", user.as_bytes()).as_bytes(), 3)?;
                self.conn
                    .command(stage, sasl_line("", secret).as_bytes(), 2)?;
            }
            "PLAIN" => {
                let mut sasl = Zeroizing::new(Vec::with_capacity(user.len() + secret.len() + 2));
                sasl.push(0);
                sasl.extend_from_slice(user.as_bytes());
                sasl.push(0);
                sasl.extend_from_slice(secret);
                let line = sasl_line("AUTH PLAIN ", &sasl);
                self.conn.command(stage, line.as_bytes(), 2)?;
            }
            _ => {
                let sasl = xoauth2_sasl(user, secret_text);
                let line = sasl_line("AUTH XOAUTH2 ", sasl.expose().as_bytes());
                self.conn.send(stage, line.as_bytes())?;
                let raw = self.conn.read(stage)?;
                match raw.reply.class() {
                    2 => {}
                    // The error comes as a base64 JSON challenge; an empty response
                    // ends the exchange and the final reply is the one to report.
                    3 => {
                        let fin = self.conn.command(stage, b"\r\n", 2)?;
                        // A success after an error challenge is not SMTP as we know it.
                        return Err(self.conn.break_with(
                            stage,
                            format!("protocol error: unexpected reply {}", fin.reply),
                        ));
                    }
                    _ => return Err(Failure::refused(stage, raw.reply)),
                }
            }
        }
        Ok(())
    }

    /// `MAIL FROM:<sender> params`. Addresses are validated (no CR/LF) upstream.
    pub fn mail(&mut self, sender: &str, params: &[String]) -> Result<Reply, Failure> {
        let line = command_line(Stage::Mail, format!("MAIL FROM:<{sender}>"), params)?;
        self.mails += 1;
        Ok(self.conn.command(Stage::Mail, line.as_bytes(), 2)?.reply)
    }

    /// `RCPT TO:<recipient> params`.
    pub fn rcpt(&mut self, recipient: &str, params: &[String]) -> Result<Reply, Failure> {
        let line = command_line(Stage::Rcpt, format!("RCPT TO:<{recipient}>"), params)?;
        Ok(self.conn.command(Stage::Rcpt, line.as_bytes(), 2)?.reply)
    }

    /// RFC 2920 pipelining: MAIL FROM, every RCPT TO and DATA in one write, then their
    /// replies in order. The DATA reply is kept: [`Session::data`] sends the message if
    /// it was 354, and [`Session::rset`] ends the transaction otherwise. Only for a
    /// server whose offer has `pipelining`.
    pub fn envelope(
        &mut self,
        sender: &str,
        params: &[String],
        rcpts: &[(String, Vec<String>)],
    ) -> Envelope {
        let mut group = match command_line(Stage::Mail, format!("MAIL FROM:<{sender}>"), params) {
            Ok(l) => l,
            Err(f) => return self.envelope_failed(f, rcpts.len()),
        };
        for (to, p) in rcpts {
            match command_line(Stage::Rcpt, format!("RCPT TO:<{to}>"), p) {
                Ok(l) => group.push_str(&l),
                Err(f) => return self.envelope_failed(f, rcpts.len()),
            }
        }
        group.push_str("DATA\r\n");
        self.mails += 1;
        if let Err(f) = self.conn.send(Stage::Mail, group.as_bytes()) {
            return self.envelope_failed(f, rcpts.len());
        }
        // Every reply is read, whatever came before, to stay in step (RFC 2920 3.1).
        let mail = self.conn.expect(Stage::Mail, 2).map(|r| r.reply);
        let rcpts: Vec<_> = rcpts
            .iter()
            .map(|_| self.conn.expect(Stage::Rcpt, 2).map(|r| r.reply))
            .collect();
        let data = self.conn.expect(Stage::Data, 3).map(|r| r.reply);
        let accepted = mail.is_ok() && rcpts.iter().any(Result::is_ok);
        self.pending_data = Some((data, accepted));
        Envelope { mail, rcpts }
    }

    fn envelope_failed(&mut self, f: Failure, rcpts: usize) -> Envelope {
        let at = |stage| Failure { stage, ..f.clone() };
        self.pending_data = Some((Err(at(Stage::Data)), false));
        Envelope {
            mail: Err(at(Stage::Mail)),
            rcpts: (0..rcpts).map(|_| Err(at(Stage::Rcpt))).collect(),
        }
    }

    /// `DATA` (unless pipelined with the envelope), the message (dot-stuffed) and the
    /// final dot, those two in one write.
    pub fn data(&mut self, message: &[u8]) -> Result<Reply, Failure> {
        match self.pending_data.take() {
            Some((started, _)) => started?,
            None => self.conn.command(Stage::Data, b"DATA\r\n", 3)?.reply,
        };
        // One write for the message and the dot: written apart, with the message's last
        // segment unacknowledged, the dot could wait for the server's delayed ACK.
        self.conn.send(Stage::AfterDot, &data_block(message))?;
        let done = self.conn.expect(Stage::AfterDot, 2)?;
        self.transactions += 1;
        Ok(done.reply)
    }

    /// Ends a transaction that will not be completed.
    pub fn rset(&mut self) -> bool {
        if let Some((Ok(_), accepted)) = self.pending_data.take() {
            if accepted {
                // The server waits for the message of accepted recipients; any end we
                // could send would deliver an empty one. Only closing is safe.
                self.conn.broken = Some("a pipelined transaction was abandoned".into());
                return false;
            }
            // RFC 2920 3.1: DATA accepted though no recipient was: end it with a lone dot.
            if self.conn.send(Stage::Data, b".\r\n").is_err()
                || self.conn.read(Stage::AfterDot).is_err()
            {
                return false;
            }
        }
        self.conn.command(Stage::Mail, b"RSET\r\n", 2).is_ok()
    }

    /// Whether the connection can carry another transaction.
    pub fn is_usable(&self) -> bool {
        self.conn.broken.is_none() && self.pending_data.is_none()
    }

    /// Says goodbye; errors do not matter any more. A broken connection is just
    /// closed: no QUIT that would wait another timeout for a dead server.
    pub fn quit(mut self) {
        if self.is_usable() && self.conn.send(Stage::Mail, b"QUIT\r\n").is_ok() {
            let _ = self.conn.read(Stage::Mail);
        }
        if let Stream::Tls(s) = self.conn.io.get_mut() {
            s.conn.send_close_notify();
            let _ = s.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};

    #[test]
    fn offer_from_exchange_ehlo() {
        let lines = [
            "SY5P282CA0097.outlook.office365.com Hello [203.0.113.7]",
            "SIZE 157286400",
            "PIPELINING",
            "DSN",
            "ENHANCEDSTATUSCODES",
            "AUTH LOGIN XOAUTH2",
            "8BITMIME",
            "BINARYMIME",
            "CHUNKING",
            "SMTPUTF8",
        ];
        let o = Offer::parse(lines.into_iter());
        assert_eq!(o.size, Some(157_286_400));
        assert!(o.eight_bit && o.smtputf8 && o.dsn && o.pipelining && !o.starttls);
        assert_eq!(o.auth, ["LOGIN", "XOAUTH2"]);
    }

    #[test]
    fn data_block_stuffs_dots_at_line_starts_only() {
        let block = |s: &[u8]| String::from_utf8_lossy(&data_block(s)).into_owned();
        assert_eq!(block(b""), "\r\n.\r\n");
        assert_eq!(block(b".\r\n"), "..\r\n.\r\n");
        // The stored message ends in CRLF: nothing is added before the dot.
        assert_eq!(block(b"a\r\n"), "a\r\n.\r\n");
        assert_eq!(
            block(b"Subject: x\r\n\r\n.\r\n..a\r\nb.c\r\n.d\r\n"),
            "Subject: x\r\n\r\n..\r\n...a\r\nb.c\r\n..d\r\n.\r\n"
        );
        // Without a final CRLF one is added, so the dot stands on its own line.
        assert_eq!(block(b"x\r\n.d"), "x\r\n..d\r\n.\r\n");
        // A bare CR or LF does not start a line (RFC 5321).
        assert_eq!(block(b"a\n.b\r.c\r\n"), "a\n.b\r.c\r\n.\r\n");
        assert_eq!(block(b"a\r\r\n.b\r\n"), "a\r\r\n..b\r\n.\r\n");
        // Bytes, not text: 8-bit and invalid UTF-8 pass unchanged.
        assert_eq!(
            data_block(b"\xff\xfe\r\n.\xe9\r\n"),
            b"\xff\xfe\r\n..\xe9\r\n.\r\n"
        );
    }

    #[test]
    fn xoauth2_initial_response_encoding() {
        let line = sasl_line(
            "AUTH XOAUTH2 ",
            xoauth2_sasl("app@contoso.com", "tok").expose().as_bytes(),
        );
        assert_eq!(
            line.as_str(),
            "AUTH XOAUTH2 dXNlcj1hcHBAY29udG9zby5jb20BYXV0aD1CZWFyZXIgdG9rAQE=\r\n"
        );
        let b64 = line
            .strip_prefix("AUTH XOAUTH2 ")
            .and_then(|l| l.strip_suffix("\r\n"))
            .unwrap();
        assert_eq!(
            STANDARD.decode(b64).unwrap(),
            b"user=app@contoso.com\x01auth=Bearer tok\x01\x01"
        );
        assert_eq!(sasl_line("", b"\0u\0p").as_str(), "AHUAcA==\r\n");
    }

    #[test]
    fn commands_never_carry_line_breaks() {
        assert!(
            command_line(
                Stage::Mail,
                "MAIL FROM:<a@b>".into(),
                &["X=1\r\nRSET".into()]
            )
            .is_err()
        );
        assert_eq!(
            command_line(
                Stage::Rcpt,
                "RCPT TO:<a@b>".into(),
                &["NOTIFY=NEVER".into()]
            )
            .unwrap(),
            "RCPT TO:<a@b> NOTIFY=NEVER\r\n"
        );
    }

    /// A plain-TCP server on loopback that sends `greeting`, then answers each line it
    /// reads with the next reply of `script` (an empty reply sends nothing), and returns
    /// the lines it read.
    fn scripted(
        greeting: &'static str,
        script: Vec<&'static str>,
    ) -> (u16, std::thread::JoinHandle<Vec<String>>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (sock, _) = listener.accept().unwrap();
            let mut out = sock.try_clone().unwrap();
            let mut lines = BufReader::new(sock);
            out.write_all(greeting.as_bytes()).unwrap();
            let mut seen = Vec::new();
            for reply in script {
                let mut line = String::new();
                if lines.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                seen.push(line.trim_end().to_owned());
                out.write_all(reply.as_bytes()).unwrap();
            }
            // Hold the connection open until the client closes it.
            let mut rest = String::new();
            while lines.read_line(&mut rest).unwrap_or(0) > 0 {}
            seen
        });
        (port, server)
    }

    fn endpoint(port: u16, tls: TlsMode) -> Endpoint<'static> {
        Endpoint {
            host: "127.0.0.1",
            port,
            tls,
            ca_file: None,
            timeout: Duration::from_secs(5),
            helo_name: "client.example",
            proxy: None,
        }
    }

    const EHLO: &str = "250-mx Hello\r\n250-PIPELINING\r\n250 AUTH LOGIN PLAIN XOAUTH2\r\n";

    #[test]
    fn an_xoauth2_error_challenge_is_answered_and_its_final_reply_reported() {
        let (port, server) = scripted(
            "220 mx ESMTP\r\n",
            vec![
                EHLO,
                "334 eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIn0=\r\n",
                "535 5.7.3 Authentication unsuccessful\r\n",
            ],
        );
        let mut s = Session::open(&endpoint(port, TlsMode::None)).unwrap();
        assert!(s.offer.pipelining);
        let token = Secret::new("tok".into());
        let f = s
            .authenticate(&Login::Xoauth2 {
                user: "app@contoso.com",
                token: &token,
            })
            .unwrap_err();
        assert_eq!(f.reply.map(|r| r.code), Some(535));
        drop(s);
        let seen = server.join().unwrap();
        assert!(
            seen[1].starts_with("AUTH XOAUTH2 dXNlcj1hcHBAY29udG9zby5jb20B"),
            "{seen:?}"
        );
        assert_eq!(seen[2], "", "an empty response to the error challenge");
    }

    #[test]
    fn a_pipelined_data_accepted_with_no_recipient_is_ended_with_a_lone_dot() {
        let (port, server) = scripted(
            "220 mx ESMTP\r\n",
            vec![
                EHLO,
                "250 2.1.0 Sender OK\r\n",
                "550 5.1.1 no such user\r\n",
                "354 go ahead\r\n",
                "554 5.5.1 no valid recipients\r\n",
                "250 2.0.0 Resetting\r\n",
                "221 bye\r\n",
            ],
        );
        let mut s = Session::open(&endpoint(port, TlsMode::None)).unwrap();
        let env = s.envelope(
            "a@contoso.com",
            &["SIZE=10".into()],
            &[("x@example.org".into(), vec![])],
        );
        assert!(env.mail.is_ok());
        assert_eq!(
            env.rcpts[0]
                .as_ref()
                .unwrap_err()
                .reply
                .as_ref()
                .map(|r| r.code),
            Some(550)
        );
        assert!(!s.is_usable(), "a DATA reply is pending");
        assert!(s.rset());
        assert!(s.is_usable());
        s.quit();
        let seen = server.join().unwrap();
        assert_eq!(
            seen,
            [
                "EHLO client.example",
                "MAIL FROM:<a@contoso.com> SIZE=10",
                "RCPT TO:<x@example.org>",
                "DATA",
                ".",
                "RSET",
                "QUIT"
            ]
        );
    }

    #[test]
    fn bytes_after_the_starttls_reply_are_refused() {
        let (port, server) = scripted(
            "220 mx ESMTP\r\n",
            vec![
                "250-mx Hello\r\n250 STARTTLS\r\n",
                "220 2.0.0 go ahead\r\n250 injected\r\n",
            ],
        );
        let f = Session::open(&endpoint(port, TlsMode::Starttls)).unwrap_err();
        assert_eq!(f.stage, Stage::StartTls);
        assert!(f.detail.contains("injection"), "{f}");
        let _ = server.join();
    }

    #[test]
    fn a_timeout_is_reported_and_breaks_the_session() {
        let (port, server) = scripted("220 mx ESMTP\r\n", vec![EHLO, ""]);
        let mut ep = endpoint(port, TlsMode::None);
        ep.timeout = Duration::from_millis(300);
        let mut s = Session::open(&ep).unwrap();
        let f = s.mail("a@contoso.com", &[]).unwrap_err();
        assert!(f.reply.is_none() && f.detail.contains("timed out"), "{f}");
        assert!(!s.is_usable());
        s.quit();
        let _ = server.join();
    }
}
