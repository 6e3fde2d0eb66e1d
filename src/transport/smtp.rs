//! SMTP submission with lettre's connection-level API: connect, STARTTLS (or implicit
//! TLS), EHLO, AUTH, then per-recipient MAIL/RCPT/DATA so that a recipient refused at
//! RCPT does not sink the others. Connections are kept and reused between messages;
//! the message and its final dot go out in one write (see [`Session::data`]).
//!
//! Trusts the server only after rustls has verified its certificate against the
//! system store plus the account's `ca_file`; there is no way to turn verification
//! off. Every reply is parsed as untrusted text.

use std::net::ToSocketAddrs;
use std::path::Path;
use std::time::Duration;

use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{Certificate, SmtpConnection, TlsParameters, TlsVersion};
use lettre::transport::smtp::extension::ClientId;

use super::classify::{Reply, Stage};
use crate::config::TlsMode;
use crate::secrets::Secret;

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct Endpoint<'a> {
    pub host: &'a str,
    pub port: u16,
    pub tls: TlsMode,
    pub ca_file: Option<&'a Path>,
    pub timeout: Duration,
    pub helo_name: &'a str,
}

/// How to authenticate; secrets stay wrapped until lettre needs them.
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
}

impl Failure {
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

fn failure(stage: Stage, e: &lettre::transport::smtp::Error) -> Failure {
    let reply = e.status().and_then(|code| {
        let code: u16 = code.to_string().parse().ok()?;
        let text = std::error::Error::source(e)
            .map(|s| s.to_string())
            .unwrap_or_default();
        Reply::from_lines(code, text.lines()).ok()
    });
    let detail = if e.is_timeout() {
        format!("timed out: {e}")
    } else if e.is_tls() {
        format!("TLS failure (certificate not trusted or protocol refused): {e}")
    } else {
        e.to_string()
    };
    Failure {
        stage,
        reply,
        detail,
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
                "AUTH" => o.auth = words.map(|w| w.to_ascii_uppercase()).collect(),
                _ => {}
            }
        }
        o
    }
}

/// An open, possibly authenticated, SMTP session.
pub struct Session {
    conn: SmtpConnection,
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

fn tls_parameters(ep: &Endpoint) -> Result<TlsParameters, Failure> {
    let mut b = TlsParameters::builder(ep.host.to_string()).set_min_tls_version(TlsVersion::Tlsv12);
    if let Some(ca) = ep.ca_file {
        let pem = std::fs::read(ca).map_err(|e| Failure {
            stage: Stage::Connect,
            reply: None,
            detail: format!("cannot read ca_file {}: {e}", ca.display()),
        })?;
        let cert = Certificate::from_pem(&pem).map_err(|e| Failure {
            stage: Stage::Connect,
            reply: None,
            detail: format!("ca_file {} is not a PEM certificate: {e}", ca.display()),
        })?;
        b = b.add_root_certificate(cert);
    }
    // SECURITY: verification stays on; lettre's dangerous_* switches are never called.
    b.build_rustls().map_err(|e| failure(Stage::Connect, &e))
}

impl Session {
    /// Connects, secures the connection as configured, and reads the server's offer.
    pub fn open(ep: &Endpoint) -> Result<Session, Failure> {
        let addr = (ep.host, ep.port)
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| Failure {
                stage: Stage::Connect,
                reply: None,
                detail: format!("cannot resolve {}", ep.host),
            })?;
        let relay = format!("{}[{}]:{}", ep.host, addr.ip(), ep.port);
        let hello = ClientId::Domain(ep.helo_name.to_string());
        let implicit = match ep.tls {
            TlsMode::Tls => Some(tls_parameters(ep)?),
            _ => None,
        };
        let mut conn =
            SmtpConnection::connect(addr, Some(ep.timeout), &hello, implicit.as_ref(), None)
                .map_err(|e| failure(Stage::Connect, &e))?;
        if ep.tls == TlsMode::Starttls {
            if !conn.can_starttls() {
                // SECURITY: never fall back to plain text, whatever the server offers.
                return Err(Failure {
                    stage: Stage::Ehlo,
                    reply: None,
                    detail: format!(
                        "{relay} does not offer STARTTLS; refusing to send credentials or mail in plain text"
                    ),
                });
            }
            let params = tls_parameters(ep)?;
            conn.starttls(&params, &hello)
                .map_err(|e| failure(Stage::StartTls, &e))?;
        }
        // lettre keeps only the keywords it knows; ask again to learn SIZE and DSN.
        let ehlo = conn
            .command(format!("EHLO {}\r\n", ep.helo_name))
            .map_err(|e| failure(Stage::Ehlo, &e))?;
        let offer = Offer::parse(ehlo.message());
        Ok(Session {
            conn,
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
            Login::Login { user, password } => (Mechanism::Login, user, password),
            Login::Plain { user, password } => (Mechanism::Plain, user, password),
            Login::Xoauth2 { user, token } => (Mechanism::Xoauth2, user, token),
        };
        let creds = Credentials::new(user.to_string(), secret.expose().to_string());
        self.conn
            .auth(&[mechanism], &creds)
            .map(|_| ())
            .map_err(|e| {
                let mut f = failure(Stage::Auth, &e);
                if f.reply.is_none() && e.is_client() {
                    f.detail = format!(
                        "the server does not offer AUTH {mechanism} (it offers: {})",
                        self.offer.auth.join(" ")
                    );
                }
                f
            })
    }

    fn command(&mut self, stage: Stage, line: String) -> Result<Reply, Failure> {
        match self.conn.command(line) {
            Ok(r) => {
                let code: u16 = r.code().to_string().parse().unwrap_or(250);
                Ok(Reply::from_lines(code, r.message()).unwrap_or(Reply {
                    code,
                    enhanced: None,
                    text: String::new(),
                }))
            }
            Err(e) => Err(failure(stage, &e)),
        }
    }

    /// `MAIL FROM:<sender> params`. Addresses are validated (no CR/LF) upstream.
    pub fn mail(&mut self, sender: &str, params: &[String]) -> Result<Reply, Failure> {
        let mut line = format!("MAIL FROM:<{sender}>");
        for p in params {
            line.push(' ');
            line.push_str(p);
        }
        line.push_str("\r\n");
        self.mails += 1;
        self.command(Stage::Mail, line)
    }

    /// `RCPT TO:<recipient> params`.
    pub fn rcpt(&mut self, recipient: &str, params: &[String]) -> Result<Reply, Failure> {
        let mut line = format!("RCPT TO:<{recipient}>");
        for p in params {
            line.push(' ');
            line.push_str(p);
        }
        line.push_str("\r\n");
        self.command(Stage::Rcpt, line)
    }

    /// `DATA`, the message (dot-stuffed), and the final dot.
    pub fn data(&mut self, message: &[u8]) -> Result<Reply, Failure> {
        self.command(Stage::Data, "DATA\r\n".to_string())?;
        // The final dot goes after the message's own last CRLF, as the one lettre adds
        // would leave an empty line at the end of the body.
        let body = message.strip_suffix(b"\r\n").unwrap_or(message);
        // One write for the message and the dot: lettre's `message` writes them apart,
        // and with the message's last segment unacknowledged, Nagle's algorithm holds
        // the dot back until the server's delayed ACK (40 ms on Linux, up to 200 ms on
        // Windows) — per message. lettre's only single-write path is `command`, which
        // takes text; the rare message that is not UTF-8 still goes the two-write way.
        let sent = match std::str::from_utf8(body) {
            Ok(text) => self.conn.command(DataBlock(text)),
            Err(_) => self.conn.message(body),
        };
        match sent {
            Ok(r) => {
                self.transactions += 1;
                let code: u16 = r.code().to_string().parse().unwrap_or(250);
                Ok(Reply::from_lines(code, r.message()).unwrap_or(Reply {
                    code,
                    enhanced: None,
                    text: String::new(),
                }))
            }
            Err(e) => Err(failure(Stage::AfterDot, &e)),
        }
    }

    /// Ends a transaction that will not be completed.
    pub fn rset(&mut self) -> bool {
        self.conn.command("RSET\r\n").is_ok()
    }

    /// Whether the connection can carry another transaction.
    pub fn is_usable(&self) -> bool {
        !self.conn.has_broken()
    }

    /// Says goodbye; errors do not matter any more.
    pub fn quit(mut self) {
        let _ = self.conn.quit();
    }
}

/// A message body as the DATA phase sends it: transparency (RFC 5321 4.5.2: a line
/// that starts with a dot gets another one, a line being what follows CRLF or the
/// start), then CRLF, the final dot and CRLF. `body` has no final CRLF of its own.
struct DataBlock<'a>(&'a str);

impl std::fmt::Display for DataBlock<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut rest = self.0;
        loop {
            if rest.starts_with('.') {
                f.write_str(".")?;
            }
            match rest.find("\r\n") {
                Some(i) => {
                    f.write_str(&rest[..i + 2])?;
                    rest = &rest[i + 2..];
                }
                None => {
                    f.write_str(rest)?;
                    break;
                }
            }
        }
        f.write_str("\r\n.\r\n")
    }
}

/// xtext (RFC 3461) for ENVID and ORCPT values.
pub fn xtext(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (33..=126).contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(o.eight_bit && o.smtputf8 && o.dsn && !o.starttls);
        assert_eq!(o.auth, ["LOGIN", "XOAUTH2"]);
    }

    #[test]
    fn data_block_stuffs_dots_at_line_starts_only() {
        let block = |s: &str| DataBlock(s).to_string();
        assert_eq!(block(""), "\r\n.\r\n");
        assert_eq!(block("."), "..\r\n.\r\n");
        assert_eq!(
            block("Subject: x\r\n\r\n.\r\n..a\r\nb.c\r\n.d"),
            "Subject: x\r\n\r\n..\r\n...a\r\nb.c\r\n..d\r\n.\r\n"
        );
        // A bare CR or LF does not start a line (as lettre's codec and RFC 5321 say).
        assert_eq!(block("a\n.b\r.c"), "a\n.b\r.c\r\n.\r\n");
        assert_eq!(block("a\r\r\n.b"), "a\r\r\n..b\r\n.\r\n");
    }

    #[test]
    fn xtext_encodes_plus_equals_and_controls() {
        assert_eq!(xtext("a+b=c d"), "a+2Bb+3Dc+20d");
        assert_eq!(xtext("rfc822;x@y"), "rfc822;x@y");
    }
}
