//! What the SMTP dialogue needs only on the network: the channel that can switch to
//! TLS ([`Channel`]), the policy the listener applies ([`Gate`]: relay access, AUTH,
//! rates, `require_tls`), what is known of the client ([`Client`]), the SASL
//! decoding of AUTH PLAIN and LOGIN, and the per-command counters Postfix logs at
//! disconnect. `sendmail -bs` on stdio has no gate: it offers neither STARTTLS nor
//! AUTH, and its caller is a local uid.
//!
//! Trusts nothing: every byte comes from the client; decoded credentials are handed to
//! the gate and never logged or echoed.

use std::fmt::Write as _;
use std::io::{self, BufRead, Read, Write};
use std::net::IpAddr;

use base64::Engine as _;

use crate::message::address::{Address, Sender};

use super::read::{Line, read_line};
use super::{Flow, Session, Spooler, reply, strip_line_end};

/// An input and output that may be switched to TLS mid-session.
pub trait Channel: BufRead + Write {
    /// Runs the server side of a TLS handshake. SECURITY: the implementation must drop
    /// any plaintext already read past the STARTTLS command (CVE-2011-0411, command
    /// injection), so that nothing sent before the handshake counts after it.
    fn start_tls(&mut self) -> io::Result<()>;
    /// `TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384` once TLS is up.
    fn tls(&self) -> Option<String>;
}

/// Standard input and output as a [`Channel`] that cannot do TLS (`sendmail -bs`).
pub struct Stdio<R, W> {
    pub input: R,
    pub output: W,
}

impl<R: BufRead, W> Read for Stdio<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl<R: BufRead, W> BufRead for Stdio<R, W> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.input.fill_buf()
    }
    fn consume(&mut self, amt: usize) {
        self.input.consume(amt);
    }
}

impl<R, W: Write> Write for Stdio<R, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.output.flush()
    }
}

impl<R: BufRead, W: Write> Channel for Stdio<R, W> {
    fn start_tls(&mut self) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "no TLS on standard input",
        ))
    }
    fn tls(&self) -> Option<String> {
        None
    }
}

/// What the session knows about a network client.
#[derive(Debug, Clone)]
pub struct Client {
    pub address: IpAddr,
    /// The EHLO/HELO name, made printable and bounded.
    pub helo: Option<String>,
    /// The TLS protocol and cipher once STARTTLS succeeded.
    pub tls: Option<String>,
    /// The authenticated user, after a successful AUTH.
    pub user: Option<String>,
    /// The SASL mechanism of that AUTH.
    pub method: Option<&'static str>,
}

impl Client {
    pub fn new(address: IpAddr) -> Client {
        Client {
            address,
            helo: None,
            tls: None,
            user: None,
            method: None,
        }
    }
}

/// The answer to an AUTH attempt.
pub enum AuthVerdict {
    /// The credentials are good: `235`.
    Accept,
    /// Wrong user or password: this reply (`535 5.7.8`), the session goes on.
    Reject(String),
    /// Too many failures: this reply (`421 4.7.0`), then the connection is closed.
    Close(String),
}

/// The listener's policy, asked at each step of a network session. A refusal is the
/// reply to send (one line, `NNN X.Y.Z text`).
pub trait Gate {
    /// Whether EHLO offers STARTTLS (a certificate is configured).
    fn offers_tls(&self) -> bool;
    /// Whether EHLO offers AUTH once TLS is up (a users file is configured).
    fn offers_auth(&self) -> bool;
    /// Checks credentials; may sleep to slow down guessing.
    fn authenticate(
        &mut self,
        client: &Client,
        mechanism: &str,
        user: &str,
        password: &str,
    ) -> AuthVerdict;
    /// Before MAIL FROM is accepted: `require_tls`, the client's rate, the sender an
    /// AUTH user may use.
    fn mail(&mut self, client: &Client, sender: &Sender) -> Result<(), String>;
    /// Before a recipient is accepted: never an open relay.
    fn rcpt(&mut self, client: &Client, sender: &Sender, rcpt: &Address) -> Result<(), String>;
    /// A message from this client was queued.
    fn queued(&mut self, client: &Client);
    /// The account that sends this client's mail (its AUTH user's), if it has one.
    fn account(&mut self, _client: &Client) -> Option<String> {
        None
    }
}

/// SASL mechanisms offered (after STARTTLS only).
pub const MECHANISMS: &str = "PLAIN LOGIN";
/// The longest SASL response line kept (a PLAIN response for 255-byte names fits).
pub const MAX_SASL_LINE: usize = 12 * 1024;

/// Decodes one base64 SASL response; `None` if it is not base64 or not UTF-8.
pub fn decode(line: &str) -> Option<String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(line.trim())
        .ok()?;
    String::from_utf8(bytes).ok()
}

pub fn encode(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// Splits an RFC 4616 PLAIN response (`authzid NUL authcid NUL passwd`) into the user
/// and password. An authorization identity other than the user is refused: a user may
/// not act for another.
pub fn plain(response: &str) -> Option<(String, String)> {
    let mut parts = response.split('\0');
    let (authz, user, pass) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || user.is_empty() || (!authz.is_empty() && authz != user) {
        return None;
    }
    Some((user.to_string(), pass.to_string()))
}

/// Postfix's per-command counters: `ehlo=1 starttls=1 auth=0/1 ... commands=5/6`.
#[derive(Debug, Default, Clone)]
pub struct Counters {
    /// (verb, accepted, tried) in first-use order.
    verbs: Vec<(&'static str, u32, u32)>,
    /// Replies of class 4 or 5 to commands, for the hard error limit.
    pub errors: u32,
}

impl Counters {
    pub fn count(&mut self, verb: &'static str, ok: bool) {
        if !ok {
            self.errors += 1;
        }
        match self.verbs.iter_mut().find(|v| v.0 == verb) {
            Some(v) => {
                v.1 += u32::from(ok);
                v.2 += 1;
            }
            None => self.verbs.push((verb, u32::from(ok), 1)),
        }
    }

    /// `ehlo=1 mail=1 rcpt=0/1 quit=1 commands=3/4`.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let (mut ok, mut all) = (0, 0);
        for (verb, good, tried) in &self.verbs {
            ok += good;
            all += tried;
            let _ = write!(out, "{verb}={}", ratio(*good, *tried));
            out.push(' ');
        }
        let _ = write!(out, "commands={}", ratio(ok, all));
        out
    }
}

fn ratio(ok: u32, all: u32) -> String {
    if ok == all {
        ok.to_string()
    } else {
        format!("{ok}/{all}")
    }
}

/// The counter name of a command verb (unknown verbs count as `unknown`).
pub fn counter_name(verb: &str) -> &'static str {
    const KNOWN: [&str; 14] = [
        "ehlo", "helo", "starttls", "auth", "mail", "rcpt", "data", "rset", "noop", "vrfy", "help",
        "quit", "expn", "bdat",
    ];
    let lower = verb.to_ascii_lowercase();
    KNOWN
        .iter()
        .find(|k| **k == lower)
        .copied()
        .unwrap_or("unknown")
}

/// STARTTLS and AUTH: the commands only a network session has.
impl<S: Spooler> Session<'_, S> {
    /// STARTTLS (RFC 3207): on success the session starts over, as if just connected.
    pub(super) fn starttls<C: Channel>(
        &mut self,
        io: &mut Tracked<'_, C>,
        arg: &str,
    ) -> io::Result<Flow> {
        let Some(net) = self.net.as_mut() else {
            reply(io, "502 5.5.1 Error: command not implemented")?;
            return Ok(Flow::Continue);
        };
        if net.client.tls.is_some() {
            reply(io, "554 5.5.1 Error: TLS already active")?;
        } else if !net.gate.offers_tls() {
            reply(io, "502 5.5.1 Error: command not implemented")?;
        } else if !arg.is_empty() {
            reply(io, "501 5.5.4 Syntax: STARTTLS")?;
        } else {
            reply(io, "220 2.0.0 Ready to start TLS")?;
            // SECURITY: start_tls drops any pipelined plaintext (command injection).
            io.inner.start_tls()?;
            // RFC 3207 4.2: forget everything learnt before TLS.
            self.tx = None;
            net.client.helo = None;
            net.client.user = None;
            net.client.method = None;
            net.client.tls = io.inner.tls();
        }
        Ok(Flow::Continue)
    }

    /// AUTH PLAIN and LOGIN (RFC 4954, 4616), inside TLS only.
    pub(super) fn auth<C: Channel>(
        &mut self,
        io: &mut Tracked<'_, C>,
        arg: &str,
    ) -> io::Result<Flow> {
        let in_tx = self.tx.is_some();
        let Some(net) = self.net.as_mut() else {
            reply(io, "502 5.5.1 Error: command not implemented")?;
            return Ok(Flow::Continue);
        };
        // SECURITY: no credentials in clear text: AUTH is refused before STARTTLS.
        if net.client.tls.is_none() || !net.gate.offers_auth() {
            reply(io, "503 5.5.1 Error: authentication not enabled")?;
            return Ok(Flow::Continue);
        }
        if net.client.user.is_some() {
            reply(io, "503 5.5.1 Error: already authenticated")?;
            return Ok(Flow::Continue);
        }
        if in_tx {
            reply(io, "503 5.5.1 Error: MAIL transaction in progress")?;
            return Ok(Flow::Continue);
        }
        let (mechanism, initial) = match arg.split_once(' ') {
            Some((m, i)) => (m.to_ascii_uppercase(), Some(i.trim())),
            None => (arg.to_ascii_uppercase(), None),
        };
        let mut line = Vec::new();
        // One client response: the initial one, or the next line (`*` cancels).
        let mut ask = |io: &mut Tracked<'_, C>,
                       prompt: &str,
                       initial: Option<&str>|
         -> io::Result<Option<Option<String>>> {
            let text = match initial {
                Some(i) => i.to_string(),
                None => {
                    reply(io, &format!("334 {prompt}"))?;
                    // SECURITY: responses are bounded like commands.
                    match read_line(io, &mut line, MAX_SASL_LINE)? {
                        Line::Eof => return Ok(None),
                        Line::TooLong => return Ok(Some(None)),
                        Line::Complete => {
                            String::from_utf8_lossy(strip_line_end(&line)).into_owned()
                        }
                    }
                }
            };
            if text == "*" {
                return Ok(Some(Some("*".to_string())));
            }
            // `=` is the empty initial response (RFC 4954).
            if text == "=" {
                return Ok(Some(Some(String::new())));
            }
            Ok(Some(decode(&text)))
        };
        let credentials = match mechanism.as_str() {
            "PLAIN" => match ask(io, "", initial)? {
                None => return Ok(Flow::Abandoned),
                Some(Some(r)) if r == "*" => None,
                Some(r) => Some(r.as_deref().and_then(plain)),
            },
            "LOGIN" => {
                let user = match ask(io, &encode("Username:"), initial)? {
                    None => return Ok(Flow::Abandoned),
                    Some(u) => u,
                };
                match user {
                    Some(u) if u == "*" => None,
                    Some(u) => match ask(io, &encode("Password:"), None)? {
                        None => return Ok(Flow::Abandoned),
                        Some(Some(p)) if p == "*" => None,
                        Some(p) => Some(p.filter(|_| !u.is_empty()).map(|p| (u, p))),
                    },
                    None => Some(None),
                }
            }
            _ => {
                reply(io, "504 5.5.4 Unsupported authentication mechanism")?;
                return Ok(Flow::Continue);
            }
        };
        let Some(credentials) = credentials else {
            reply(io, "501 5.7.0 Authentication aborted")?;
            return Ok(Flow::Continue);
        };
        let Some((user, password)) = credentials else {
            reply(io, "501 5.5.2 Cannot decode response")?;
            return Ok(Flow::Continue);
        };
        let method = if mechanism == "PLAIN" {
            "PLAIN"
        } else {
            "LOGIN"
        };
        match net.gate.authenticate(&net.client, method, &user, &password) {
            AuthVerdict::Accept => {
                net.client.user = Some(user);
                net.client.method = Some(method);
                reply(io, "235 2.7.0 Authentication successful")?;
                Ok(Flow::Continue)
            }
            AuthVerdict::Reject(r) => {
                reply(io, &r)?;
                Ok(Flow::Continue)
            }
            AuthVerdict::Close(r) => {
                reply(io, &r)?;
                Ok(Flow::Closed("too many authentication failures"))
            }
        }
    }
}

/// The channel, remembering the code of the last reply line written (for the
/// per-command counters and the hard error limit).
pub(super) struct Tracked<'c, C> {
    pub(super) inner: &'c mut C,
    pub(super) last: u8,
    pub(super) at_line_start: bool,
}

impl<C: Channel> Read for Tracked<'_, C> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

impl<C: Channel> BufRead for Tracked<'_, C> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.inner.fill_buf()
    }
    fn consume(&mut self, amt: usize) {
        self.inner.consume(amt);
    }
}

impl<C: Channel> Write for Tracked<'_, C> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        for &b in buf.get(..n).unwrap_or(&[]) {
            if self.at_line_start {
                self.last = b;
            }
            self.at_line_start = b == b'\n';
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::sendmail::bs::Settings;
    use crate::sendmail::deposit::SpoolError;
    use crate::sendmail::intake::{Caller, Submission};
    use crate::sendmail::options;

    /// Input in packets (as TCP segments); STARTTLS drops the rest of the packet.
    struct Packets {
        packets: Vec<Vec<u8>>,
        current: Vec<u8>,
        pos: usize,
        out: Vec<u8>,
        tls: bool,
    }

    impl Read for Packets {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let avail = self.fill_buf()?;
            let n = avail.len().min(buf.len());
            buf[..n].copy_from_slice(&avail[..n]);
            self.consume(n);
            Ok(n)
        }
    }
    impl BufRead for Packets {
        fn fill_buf(&mut self) -> io::Result<&[u8]> {
            if self.pos >= self.current.len() && !self.packets.is_empty() {
                self.current = self.packets.remove(0);
                self.pos = 0;
            }
            Ok(&self.current[self.pos..])
        }
        fn consume(&mut self, amt: usize) {
            self.pos += amt;
        }
    }
    impl Write for Packets {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.out.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    impl Channel for Packets {
        fn start_tls(&mut self) -> io::Result<()> {
            self.pos = self.current.len();
            self.tls = true;
            Ok(())
        }
        fn tls(&self) -> Option<String> {
            self.tls.then(|| "TLSv1.3 with cipher X".to_string())
        }
    }

    struct TestGate {
        allowed: bool,
        checked: Vec<String>,
    }
    impl Gate for TestGate {
        fn offers_tls(&self) -> bool {
            true
        }
        fn offers_auth(&self) -> bool {
            true
        }
        fn authenticate(&mut self, c: &Client, _m: &str, user: &str, pw: &str) -> AuthVerdict {
            assert!(c.tls.is_some());
            self.checked.push(format!("{user}:{pw}"));
            if pw == "right" {
                AuthVerdict::Accept
            } else {
                AuthVerdict::Reject("535 5.7.8 Error: authentication failed".into())
            }
        }
        fn mail(&mut self, _c: &Client, _s: &Sender) -> Result<(), String> {
            Ok(())
        }
        fn rcpt(&mut self, c: &Client, _s: &Sender, r: &Address) -> Result<(), String> {
            if self.allowed || c.user.is_some() {
                Ok(())
            } else {
                Err(format!("554 5.7.1 <{r}>: Relay access denied"))
            }
        }
        fn queued(&mut self, _c: &Client) {}
    }

    #[derive(Default)]
    struct Kept(Vec<String>);
    impl Spooler for &mut Kept {
        fn deposit(&mut self, s: &Submission) -> Result<(), SpoolError> {
            self.0
                .push(String::from_utf8_lossy(&s.message).into_owned());
            Ok(())
        }
    }

    fn net(packets: &[&str], allowed: bool) -> (Vec<String>, Vec<String>, Vec<String>) {
        let o = options::parse("sendmail", &[std::ffi::OsString::from("-bs")]).unwrap();
        let c = Caller {
            uid: 0,
            login: "MAILER-DAEMON".into(),
            full_name: None,
        };
        let mut gate = TestGate {
            allowed,
            checked: Vec::new(),
        };
        let mut kept = Kept::default();
        let mut ch = Packets {
            packets: packets.iter().map(|p| p.as_bytes().to_vec()).collect(),
            current: Vec::new(),
            pos: 0,
            out: Vec::new(),
            tls: false,
        };
        let settings = Settings {
            domain: "example.com",
            max_message_size: 10_000,
            max_recipients: 5,
        };
        Session::new(settings, &o, &c, &mut kept)
            .network(&mut gate, Client::new("192.0.2.9".parse().unwrap()))
            .run_on(&mut ch);
        let lines = String::from_utf8(ch.out)
            .unwrap()
            .split("\r\n")
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        (lines, gate.checked, kept.0)
    }

    #[test]
    fn auth_only_inside_tls_and_pipelined_plaintext_is_dropped() {
        let plain = encode("\0bob\0right");
        let (lines, checked, _) = net(
            &[
                &format!("EHLO a\r\nAUTH PLAIN {plain}\r\nSTARTTLS\r\nAUTH PLAIN {plain}\r\n"),
                "EHLO a\r\nAUTH LOGIN\r\nYm9i\r\nd3Jvbmc=\r\nQUIT\r\n",
            ],
            false,
        );
        assert!(
            !lines.iter().take(9).any(|l| l.contains("AUTH")),
            "{lines:?}"
        );
        assert!(lines.contains(&"250-STARTTLS".to_string()));
        assert!(lines.contains(&"503 5.5.1 Error: authentication not enabled".to_string()));
        assert!(lines.contains(&"220 2.0.0 Ready to start TLS".to_string()));
        // The AUTH pipelined behind STARTTLS in clear was never read.
        assert_eq!(checked, ["bob:wrong"]);
        assert!(lines.contains(&"250-AUTH PLAIN LOGIN".to_string()));
        assert!(lines.contains(&"334 VXNlcm5hbWU6".to_string()));
        assert!(lines.contains(&"535 5.7.8 Error: authentication failed".to_string()));
    }

    #[test]
    fn relay_is_refused_unless_allowed_or_authenticated_and_received_names_the_client() {
        let msg = "MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\nS: x\r\n\r\nb\r\n.\r\n";
        let (lines, _, kept) = net(&[&format!("EHLO c\r\n{msg}QUIT\r\n")], false);
        assert!(lines.contains(&"554 5.7.1 <d@e.f>: Relay access denied".to_string()));
        assert!(kept.is_empty());
        let (_, _, kept) = net(&[&format!("HELO printer\r\n{msg}QUIT\r\n")], true);
        assert_eq!(kept.len(), 1);
        assert!(
            kept[0].starts_with(
                "Received: from printer ([192.0.2.9])\r\n\tby example.com (relay365) with ESMTP id "
            ),
            "{}",
            kept[0]
        );
        let auth = encode("\0bob\0right");
        let (_, _, kept) = net(
            &[
                "EHLO c\r\nSTARTTLS\r\n",
                &format!("EHLO c\r\nAUTH PLAIN {auth}\r\n{msg}QUIT\r\n"),
            ],
            false,
        );
        assert_eq!(kept.len(), 1);
        assert!(kept[0].contains("\r\n\t(using TLSv1.3 with cipher X)\r\n\t(Authenticated sender: bob)\r\n\tby example.com (relay365) with ESMTPSA id "), "{}", kept[0]);
    }

    #[test]
    fn plain_responses() {
        assert_eq!(
            plain("\0bob\0pw"),
            Some(("bob".to_string(), "pw".to_string()))
        );
        assert_eq!(
            plain("bob\0bob\0pw"),
            Some(("bob".to_string(), "pw".to_string()))
        );
        assert_eq!(plain("alice\0bob\0pw"), None, "acting for another user");
        assert_eq!(plain("\0\0pw"), None);
        assert_eq!(plain("\0bob"), None);
        assert_eq!(plain("\0bob\0pw\0x"), None);
        assert_eq!(decode(&encode("\0bob\0pw")).as_deref(), Some("\0bob\0pw"));
        assert_eq!(decode("!!"), None);
    }

    #[test]
    fn counters_read_like_postfix() {
        let mut c = Counters::default();
        for (v, ok) in [
            ("ehlo", true),
            ("auth", false),
            ("auth", true),
            ("quit", true),
        ] {
            c.count(v, ok);
        }
        assert_eq!(c.summary(), "ehlo=1 auth=1/2 quit=1 commands=3/4");
        assert_eq!(c.errors, 1);
        assert_eq!(counter_name("StartTLS"), "starttls");
        assert_eq!(counter_name("XYZZY"), "unknown");
    }
}
