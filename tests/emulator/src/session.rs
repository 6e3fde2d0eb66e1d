//! One SMTP submission session as Exchange Online runs it: greeting, EHLO, STARTTLS, AUTH
//! LOGIN / XOAUTH2, MAIL/RCPT/DATA/BDAT, and the checks Exchange makes after the final dot
//! (concurrency, SendAs, recipient quota, message rate, size).
//!
//! Everything read here comes from an untrusted client: command lines are bounded, SASL data
//! is base64-decoded defensively, nothing is authorised before AUTH succeeds, and plaintext
//! pipelined behind STARTTLS is discarded.

use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::config::{OverRate, TlsMode};
use crate::faults::{Action, Stage};
use crate::headers::{first_address, header_value, parse_path};
use crate::io::{Io, ReadStop};
use crate::limits::Denial;
use crate::replies::{Replies, TlsExt, echo, session_id};
use crate::server::Shared;
use crate::store::Received;

/// Longest command line (XOAUTH2 lines carry tokens of several KB).
const MAX_COMMAND: usize = 64 * 1024;
/// Body lines longer than this are taken in pieces.
const BODY_CHUNK: usize = 64 * 1024;
const GARBAGE: &[u8] = b"* OK garbage \x01\x02 this is not an SMTP reply\r\n";

/// What to do after a command.
enum Next {
    Continue,
    Close,
}

/// The outcome of looking for a fault at a stage.
enum Flow {
    /// Process normally; replace the reply text if `Some`.
    Go(Option<String>),
    /// The fault answered; the command fails without changing state.
    Stop,
    /// Close the connection now.
    Close,
    /// AfterDot only: accept the message, then drop the connection.
    AcceptThenDrop,
}

struct Txn {
    from: String,
    params: Vec<String>,
    rcpts: Vec<String>,
    rcpt_params: Vec<Vec<String>>,
    /// BDAT chunks received so far, and whether they overflowed the size limit.
    bdat: Option<(Vec<u8>, bool)>,
}

struct Auth {
    mailbox: String,
    seq: u64,
}

struct Session<'a> {
    sh: &'a Shared,
    io: Io,
    id: u64,
    sid: String,
    peer: String,
    upgraded: bool,
    greeted: bool,
    auth: Option<Auth>,
    txn: Option<Txn>,
}

/// Runs a session to its end; all errors end in closing the socket.
pub(crate) fn run(sh: &Shared, sock: TcpStream, id: u64) {
    let peer = sock
        .peer_addr()
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|_| "127.0.0.1".into());
    let Ok(io) = Io::new(sock, sh.shutdown.clone(), sh.cfg.idle_timeout) else {
        return;
    };
    let mut s = Session {
        sh,
        io,
        id,
        sid: session_id(),
        peer,
        upgraded: false,
        greeted: false,
        auth: None,
        txn: None,
    };
    s.serve();
    s.io.close();
    if let Some(a) = s.auth.take() {
        sh.limits.leave(&a.mailbox, a.seq);
    }
}

fn code_of(reply: &str) -> u16 {
    reply.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0)
}

fn is_positive(reply: &str) -> bool {
    reply.starts_with('2') || reply.starts_with('3')
}

impl Session<'_> {
    fn replies(&self) -> Replies<'_> {
        Replies {
            hostname: &self.sh.cfg.hostname,
            mailbox_server: &self.sh.cfg.mailbox_server,
            session_id: &self.sid,
        }
    }

    fn err(&self, text: &str) -> String {
        self.replies().err(text)
    }

    /// Queues a (possibly multi-line, `\n`-separated) reply, after the configured delay.
    /// The delay stands for a network round trip: a reply to a command that came with
    /// the next one (pipelined, RFC 2920) waits in the buffer and goes out with the
    /// last reply of the group, so a pipelined group costs one delay, as on a real link.
    fn reply(&mut self, text: &str) -> std::io::Result<()> {
        if !self.sh.cfg.reply_delay.is_zero() && !self.io.has_buffered() {
            self.io.flush()?;
            self.io.sleep(self.sh.cfg.reply_delay);
        }
        let first = text.lines().next().unwrap_or("");
        self.sh.store.count_reply(code_of(first), first);
        for line in text.lines() {
            self.io.write(line.trim_end_matches('\r').as_bytes());
            self.io.write(b"\r\n");
        }
        Ok(())
    }

    fn long_reply(&mut self) -> std::io::Result<()> {
        let filler = "x".repeat(240);
        let mut text = String::with_capacity(1 << 20);
        for i in 0..4000 {
            text.push_str(&format!("451-4.3.0 {i:04} {filler}\n"));
        }
        text.push_str(&self.err("451 4.3.0 Long reply ends"));
        self.reply(&text)
    }

    fn fault(&mut self, stage: Stage, rcpt: Option<&str>) -> std::io::Result<Flow> {
        let Some(action) = self.sh.faults.take(&stage, rcpt) else {
            return Ok(Flow::Go(None));
        };
        Ok(match action {
            Action::Reply(text) if is_positive(&text) => Flow::Go(Some(text)),
            Action::Reply(text) => {
                self.reply(&text)?;
                if text.starts_with("421") {
                    Flow::Close
                } else {
                    Flow::Stop
                }
            }
            Action::AcceptThenDrop if stage == Stage::AfterDot => Flow::AcceptThenDrop,
            Action::Drop | Action::AcceptThenDrop => {
                self.io.abort();
                Flow::Close
            }
            Action::Stall(d) => {
                self.io.flush()?;
                if self.io.sleep(d) {
                    Flow::Go(None)
                } else {
                    Flow::Close
                }
            }
            Action::Garbage => {
                self.io.write(GARBAGE);
                Flow::Stop
            }
            Action::LongReply => {
                self.long_reply()?;
                Flow::Stop
            }
        })
    }

    fn serve(&mut self) {
        if self.open().is_err() {
            return;
        }
        loop {
            let line = match self.io.read_line(MAX_COMMAND) {
                Ok(l) => String::from_utf8_lossy(l)
                    .trim_end_matches(['\r', '\n'])
                    .to_owned(),
                Err(ReadStop::TooLong) => {
                    let r = self.err("500 5.3.3 Line too long");
                    if self.reply(&r).is_err() {
                        return;
                    }
                    continue;
                }
                Err(ReadStop::Idle) => {
                    let r = self.err("421 4.4.1 Connection timed out");
                    let _ = self.reply(&r);
                    return;
                }
                Err(_) => return,
            };
            if self.io.has_buffered() {
                // The next command came before this one's reply: pipelining.
                self.sh.store.pipelined.fetch_add(1, Ordering::Relaxed);
            }
            match self.command(&line) {
                Ok(Next::Continue) => {}
                Ok(Next::Close) | Err(_) => return,
            }
        }
    }

    /// Connect and greeting stages, implicit TLS. Err = close.
    fn open(&mut self) -> Result<(), ()> {
        match self.fault(Stage::Connect, None).map_err(|_| ())? {
            Flow::Go(over) => {
                if let Some(text) = over {
                    self.reply(&text).map_err(|_| ())?;
                    return Ok(());
                }
            }
            _ => return Err(()),
        }
        if self.sh.cfg.tls == TlsMode::Implicit {
            let tls = self.sh.smtp_tls.clone().ok_or(())?;
            self.io.start_tls(tls).map_err(|_| ())?;
        }
        let text = match self.fault(Stage::Greeting, None).map_err(|_| ())? {
            Flow::Go(over) => over.unwrap_or_else(|| self.replies().greeting()),
            _ => return Err(()),
        };
        self.reply(&text).map_err(|_| ())
    }

    fn command(&mut self, line: &str) -> std::io::Result<Next> {
        let (verb, arg) = match line.split_once(' ') {
            Some((v, a)) => (v, a.trim()),
            None => (line, ""),
        };
        let verb = verb.to_ascii_uppercase();
        match verb.as_str() {
            "EHLO" => self.ehlo(arg, true),
            "HELO" => self.ehlo(arg, false),
            "STARTTLS" => self.starttls(),
            "AUTH" => self.auth(arg),
            "MAIL" => self.mail(line),
            "RCPT" => self.rcpt(line),
            "DATA" => self.data(),
            "BDAT" => self.bdat(arg),
            "RSET" => {
                self.txn = None;
                self.reply("250 2.0.0 Resetting")?;
                Ok(Next::Continue)
            }
            "NOOP" => {
                self.reply("250 2.0.0 OK")?;
                Ok(Next::Continue)
            }
            "VRFY" => {
                self.reply("252 2.1.5 Cannot VRFY user")?;
                Ok(Next::Continue)
            }
            "QUIT" => {
                let text = match self.fault(Stage::Quit, None)? {
                    Flow::Go(over) => over
                        .unwrap_or_else(|| "221 2.0.0 Service closing transmission channel".into()),
                    Flow::Stop => return Ok(Next::Continue),
                    _ => return Ok(Next::Close),
                };
                self.reply(&text)?;
                Ok(Next::Close)
            }
            _ => {
                let r = self.err(&format!("500 5.3.3 Unrecognized command '{}'", echo(&verb)));
                self.reply(&r)?;
                Ok(Next::Continue)
            }
        }
    }

    /// Sends `normal`, or the fault's replacement text.
    fn answer(&mut self, over: Option<String>, normal: String) -> std::io::Result<Next> {
        self.reply(&over.unwrap_or(normal))?;
        Ok(Next::Continue)
    }

    fn tls_ext(&self) -> TlsExt {
        let cfg = &self.sh.cfg;
        match cfg.tls {
            TlsMode::StartTls if !self.io.is_tls() => TlsExt::StartTls,
            // A plaintext sink with nobody to authenticate offers no AUTH at all.
            TlsMode::None
                if !cfg.auth_required && cfg.mailboxes.is_empty() && cfg.apps.is_empty() =>
            {
                TlsExt::Nothing
            }
            _ => TlsExt::Auth,
        }
    }

    fn ehlo(&mut self, arg: &str, esmtp: bool) -> std::io::Result<Next> {
        if arg.is_empty() {
            let r = self.err("501 5.5.4 Invalid domain name");
            self.reply(&r)?;
            return Ok(Next::Continue);
        }
        let stage = if self.upgraded {
            Stage::AfterTls
        } else {
            Stage::Ehlo
        };
        let over = match self.fault(stage, None)? {
            Flow::Go(over) => over,
            Flow::Stop => return Ok(Next::Continue),
            _ => return Ok(Next::Close),
        };
        self.greeted = true;
        self.txn = None;
        let text = self
            .replies()
            .ehlo(&self.peer, esmtp, self.tls_ext(), self.sh.cfg.max_size);
        self.answer(over, text)
    }

    fn starttls(&mut self) -> std::io::Result<Next> {
        let tls = match (&self.sh.cfg.tls, &self.sh.smtp_tls) {
            (TlsMode::StartTls, Some(tls)) if !self.io.is_tls() => tls.clone(),
            (TlsMode::None, _) => {
                let r = self.err("500 5.3.3 Unrecognized command 'STARTTLS'");
                return self.answer(None, r);
            }
            _ => {
                let r = self.err("503 5.5.1 TLS already active");
                return self.answer(None, r);
            }
        };
        if !self.greeted {
            let r = self.err("503 5.5.2 Send hello first");
            return self.answer(None, r);
        }
        let over = match self.fault(Stage::StartTls, None)? {
            Flow::Go(over) => over,
            Flow::Stop => return Ok(Next::Continue),
            _ => return Ok(Next::Close),
        };
        self.reply(&over.unwrap_or_else(|| "220 2.0.0 SMTP server ready".into()))?;
        self.io.flush()?;
        // A handshake failure (old TLS, untrusted certificate on the client side) ends the session.
        self.io.start_tls(tls)?;
        self.upgraded = true;
        self.greeted = false;
        self.txn = None;
        Ok(Next::Continue)
    }

    /// Reads one SASL response line; `None` when the client cancelled with `*`.
    fn sasl_line(&mut self) -> std::io::Result<Option<String>> {
        match self.io.read_line(MAX_COMMAND) {
            Ok(l) => {
                let s = String::from_utf8_lossy(l).trim().to_owned();
                Ok((s != "*").then_some(s))
            }
            Err(ReadStop::Io(e)) => Err(e),
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "client left during AUTH",
            )),
        }
    }

    fn auth(&mut self, arg: &str) -> std::io::Result<Next> {
        let (mech, initial) = match arg.split_once(' ') {
            Some((m, i)) => (m.to_ascii_uppercase(), Some(i.trim().to_owned())),
            None => (arg.to_ascii_uppercase(), None),
        };
        // SECURITY: no credentials over plaintext when the listener is STARTTLS (AUTH is not offered).
        if self.sh.cfg.tls == TlsMode::StartTls && !self.io.is_tls() {
            let r = self.err("504 5.7.4 Unrecognized authentication type");
            return self.answer(None, r);
        }
        if !self.greeted {
            let r = self.err("503 5.5.2 Send hello first");
            return self.answer(None, r);
        }
        if self.auth.is_some() {
            let r = self.err("503 5.5.2 Already authenticated");
            return self.answer(None, r);
        }
        if self.txn.is_some() {
            let r = self.err("503 5.5.2 Mail transaction in progress");
            return self.answer(None, r);
        }
        let outcome = match mech.as_str() {
            "LOGIN" => self.auth_login(initial)?,
            "XOAUTH2" => self.auth_xoauth2(initial)?,
            _ => {
                let r = self.err("504 5.7.4 Unrecognized authentication type");
                return self.answer(None, r);
            }
        };
        let Some(outcome) = outcome else {
            let r = self.err("501 5.0.0 Authentication cancelled");
            return self.answer(None, r);
        };
        let over = match self.fault(Stage::Auth, None)? {
            Flow::Go(over) => over,
            Flow::Stop => return Ok(Next::Continue),
            _ => return Ok(Next::Close),
        };
        let text = match outcome {
            Ok(mailbox) => {
                let seq = self.sh.limits.enter(&mailbox);
                self.auth = Some(Auth { mailbox, seq });
                "235 2.7.0 Authentication successful".to_owned()
            }
            Err(reply) => reply,
        };
        self.answer(over, text)
    }

    fn decode(&self, b64: &str) -> Option<String> {
        let b64 = if b64 == "=" { "" } else { b64 };
        STANDARD
            .decode(b64)
            .ok()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    }

    /// `None` = cancelled; `Some(Ok(mailbox))` or `Some(Err(reply))`.
    fn auth_login(
        &mut self,
        initial: Option<String>,
    ) -> std::io::Result<Option<Result<String, String>>> {
        let user_b64 = match initial {
            Some(i) => i,
            None => {
                self.reply("334 VXNlcm5hbWU6")?;
                match self.sasl_line()? {
                    Some(l) => l,
                    None => return Ok(None),
                }
            }
        };
        let Some(user) = self.decode(&user_b64) else {
            return Ok(Some(Err(
                self.err("501 5.5.2 Cannot Base64-decode Client responses")
            )));
        };
        self.reply("334 UGFzc3dvcmQ6")?;
        let Some(pass_b64) = self.sasl_line()? else {
            return Ok(None);
        };
        let Some(pass) = self.decode(&pass_b64) else {
            return Ok(Some(Err(
                self.err("501 5.5.2 Cannot Base64-decode Client responses")
            )));
        };
        if !self.sh.cfg.basic_auth {
            return Ok(Some(Err(self.err(
                "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information.",
            ))));
        }
        // SECURITY: basic auth succeeds only for a configured mailbox with exactly this password.
        let ok = self
            .sh
            .cfg
            .find_mailbox(&user)
            .is_some_and(|m| m.password.as_deref() == Some(pass.as_str()));
        Ok(Some(if ok {
            Ok(self
                .sh
                .cfg
                .find_mailbox(&user)
                .map_or(user, |m| m.address.clone()))
        } else {
            Err(self.err("535 5.7.3 Authentication unsuccessful"))
        }))
    }

    fn auth_xoauth2(
        &mut self,
        initial: Option<String>,
    ) -> std::io::Result<Option<Result<String, String>>> {
        let b64 = match initial {
            Some(i) => i,
            None => {
                self.reply("334 ")?;
                match self.sasl_line()? {
                    Some(l) => l,
                    None => return Ok(None),
                }
            }
        };
        let fail = self.err("535 5.7.3 Authentication unsuccessful");
        let Some(payload) = self.decode(&b64) else {
            return Ok(Some(Err(fail)));
        };
        let mut user = None;
        let mut token = None;
        for field in payload.split('\x01') {
            if let Some(u) = field.strip_prefix("user=") {
                user = Some(u.to_owned());
            } else if let Some(t) = field.strip_prefix("auth=Bearer ") {
                token = Some(t.to_owned());
            }
        }
        let (Some(user), Some(token)) = (user, token) else {
            return Ok(Some(Err(fail)));
        };
        // SECURITY: only a live token issued by our endpoint to an app allowed on this mailbox.
        let ok = self
            .sh
            .tokens
            .as_ref()
            .is_some_and(|t| t.check(&token, &user));
        Ok(Some(if ok {
            Ok(self
                .sh
                .cfg
                .find_mailbox(&user)
                .map_or(user, |m| m.address.clone()))
        } else {
            Err(fail)
        }))
    }

    fn mail(&mut self, line: &str) -> std::io::Result<Next> {
        if !self.greeted {
            let r = self.err("503 5.5.2 Send hello first");
            return self.answer(None, r);
        }
        // SECURITY: nothing is accepted for submission before AUTH when the tenant requires it.
        if self.sh.cfg.auth_required && self.auth.is_none() {
            let r = self.err(
                "530 5.7.57 Client not authenticated to send mail. Error: 530 5.7.57 SMTP; Client was not authenticated to send anonymous mail during MAIL FROM",
            );
            return self.answer(None, r);
        }
        if self.txn.is_some() {
            let r = self.err("503 5.5.2 Sender already specified");
            return self.answer(None, r);
        }
        let Some(arg) = line
            .get(..10)
            .filter(|p| p.eq_ignore_ascii_case("MAIL FROM:"))
            .map(|_| &line[10..])
        else {
            let r = self.err("501 5.5.4 Invalid arguments");
            return self.answer(None, r);
        };
        let Some((from, params)) = parse_path(arg) else {
            let r = self.err("501 5.1.7 Invalid address");
            return self.answer(None, r);
        };
        for p in &params {
            let (k, v) = p.split_once('=').unwrap_or((p.as_str(), ""));
            let ok = match k.to_ascii_uppercase().as_str() {
                "SIZE" => match v.parse::<u64>() {
                    Ok(n) if n > self.sh.cfg.max_size => {
                        let r = self.replies().too_big();
                        return self.answer(None, r);
                    }
                    Ok(_) => true,
                    Err(_) => false,
                },
                "BODY" => ["7BIT", "8BITMIME", "BINARYMIME"]
                    .iter()
                    .any(|b| b.eq_ignore_ascii_case(v)),
                "RET" => v.eq_ignore_ascii_case("FULL") || v.eq_ignore_ascii_case("HDRS"),
                "SMTPUTF8" => v.is_empty(),
                "ENVID" | "AUTH" => !v.is_empty(),
                _ => false,
            };
            if !ok {
                let r = self.err("501 5.5.4 Invalid arguments");
                return self.answer(None, r);
            }
        }
        let over = match self.fault(Stage::Mail, None)? {
            Flow::Go(over) => over,
            Flow::Stop => return Ok(Next::Continue),
            _ => return Ok(Next::Close),
        };
        self.txn = Some(Txn {
            from,
            params,
            rcpts: Vec::new(),
            rcpt_params: Vec::new(),
            bdat: None,
        });
        self.answer(over, "250 2.1.0 Sender OK".into())
    }

    fn rcpt(&mut self, line: &str) -> std::io::Result<Next> {
        let Some(txn) = &self.txn else {
            let r = self.err("503 5.5.2 Need mail command");
            return self.answer(None, r);
        };
        let count = txn.rcpts.len();
        let Some(arg) = line
            .get(..8)
            .filter(|p| p.eq_ignore_ascii_case("RCPT TO:"))
            .map(|_| &line[8..])
        else {
            let r = self.err("501 5.5.4 Invalid arguments");
            return self.answer(None, r);
        };
        let Some((to, params)) = parse_path(arg).filter(|(to, _)| to.contains('@')) else {
            let r = self.err("501 5.1.3 Invalid address");
            return self.answer(None, r);
        };
        for p in &params {
            let k = p.split_once('=').map_or(p.as_str(), |(k, _)| k);
            if !(k.eq_ignore_ascii_case("NOTIFY") || k.eq_ignore_ascii_case("ORCPT")) {
                let r = self.err("501 5.5.4 Invalid arguments");
                return self.answer(None, r);
            }
        }
        if self
            .sh
            .cfg
            .max_recipients_per_message
            .is_some_and(|max| count >= max as usize)
        {
            let r = self.err("452 4.5.3 Too many recipients");
            return self.answer(None, r);
        }
        let over = match self.fault(Stage::Rcpt(None), Some(&to))? {
            Flow::Go(over) => over,
            Flow::Stop => return Ok(Next::Continue),
            _ => return Ok(Next::Close),
        };
        if let Some(txn) = &mut self.txn {
            txn.rcpts.push(to);
            txn.rcpt_params.push(params);
        }
        self.answer(over, "250 2.1.5 Recipient OK".into())
    }

    /// The common preconditions of DATA and BDAT; `Some(reply)` when they fail.
    fn transaction_ready(&self) -> Option<String> {
        match &self.txn {
            None => Some(self.err("503 5.5.2 Need mail command")),
            Some(t) if t.rcpts.is_empty() => Some(self.err("503 5.5.2 Need rcpt command")),
            _ => None,
        }
    }

    fn data(&mut self) -> std::io::Result<Next> {
        if let Some(r) = self.transaction_ready() {
            return self.answer(None, r);
        }
        if self.txn.as_ref().is_some_and(|t| t.bdat.is_some()) {
            let r = self.err("503 5.5.1 Bad sequence of commands: DATA after BDAT");
            return self.answer(None, r);
        }
        let over = match self.fault(Stage::Data, None)? {
            Flow::Go(over) => over,
            Flow::Stop => return Ok(Next::Continue),
            _ => return Ok(Next::Close),
        };
        self.reply(&over.unwrap_or_else(|| "354 Start mail input; end with <CRLF>.<CRLF>".into()))?;
        let limit = usize::try_from(self.sh.cfg.max_size).unwrap_or(usize::MAX);
        let mut data = Vec::with_capacity(8 * 1024);
        let mut too_big = false;
        let mut at_line_start = true;
        let mut first = true;
        loop {
            let (piece, ends_line) = match self.io.read_line_or_chunk(BODY_CHUNK) {
                Ok(x) => x,
                Err(ReadStop::Idle) => {
                    let r = self.err("421 4.4.1 Connection timed out");
                    self.reply(&r)?;
                    return Ok(Next::Close);
                }
                Err(_) => return Ok(Next::Close),
            };
            if at_line_start && ends_line && (piece == b".\r\n" || piece == b".\n") {
                break;
            }
            // Dot-unstuffing: a leading dot on a body line was added by the client.
            let body = if at_line_start && piece.first() == Some(&b'.') {
                &piece[1..]
            } else {
                piece
            };
            if data.len() + body.len() <= limit {
                data.extend_from_slice(body);
            } else {
                too_big = true;
            }
            at_line_start = ends_line;
            if first {
                first = false;
                if !self.mid_data_fault()? {
                    return Ok(Next::Close);
                }
            }
        }
        self.after_dot(data, too_big)
    }

    /// A fault while the body arrives. Replies here leave the client out of step (it is still
    /// sending), so after one the connection closes, as Exchange does. False = close.
    fn mid_data_fault(&mut self) -> std::io::Result<bool> {
        let Some(action) = self.sh.faults.take(&Stage::MidData, None) else {
            return Ok(true);
        };
        match action {
            Action::Reply(text) => {
                self.reply(&text)?;
                self.io.flush()?;
                Ok(false)
            }
            Action::LongReply => {
                self.long_reply()?;
                self.io.flush()?;
                Ok(false)
            }
            Action::Drop | Action::AcceptThenDrop => {
                self.io.abort();
                Ok(false)
            }
            Action::Stall(d) => Ok(self.io.sleep(d)),
            Action::Garbage => {
                self.io.write(GARBAGE);
                self.io.flush()?;
                Ok(true)
            }
        }
    }

    fn bdat(&mut self, arg: &str) -> std::io::Result<Next> {
        let mut words = arg.split_ascii_whitespace();
        let size = words.next().and_then(|n| n.parse::<u64>().ok());
        let last = match words.next() {
            None => false,
            Some(w) if w.eq_ignore_ascii_case("LAST") => true,
            Some(_) => {
                let r = self.err("501 5.5.4 Invalid arguments");
                return self.answer(None, r);
            }
        };
        let Some(size) = size else {
            let r = self.err("501 5.5.4 Invalid arguments");
            return self.answer(None, r);
        };
        let not_ready = self.transaction_ready();
        let limit = usize::try_from(self.sh.cfg.max_size).unwrap_or(usize::MAX);
        let mut chunk = Vec::new();
        let mut overflow = false;
        // The chunk must be consumed even when it is refused, or it would be read as commands.
        let read = self.io.read_exact_to(size, |b| {
            if chunk.len() + b.len() <= limit {
                chunk.extend_from_slice(b);
            } else {
                overflow = true;
            }
        });
        match read {
            Ok(()) => {}
            Err(ReadStop::Io(e)) => return Err(e),
            Err(_) => return Ok(Next::Close),
        }
        if let Some(r) = not_ready {
            return self.answer(None, r);
        }
        let Some(txn) = &mut self.txn else {
            return Ok(Next::Close);
        };
        let (buf, too_big) = txn.bdat.get_or_insert_with(|| (Vec::new(), false));
        if overflow || buf.len() + chunk.len() > limit {
            *too_big = true;
        } else {
            buf.extend_from_slice(&chunk);
        }
        if !last {
            return self.answer(None, format!("250 2.0.0 CHUNK received OK, {size} octets"));
        }
        let (data, too_big) = txn.bdat.take().unwrap_or_default();
        self.after_dot(data, too_big)
    }

    /// Everything Exchange decides once the whole message is in.
    fn after_dot(&mut self, data: Vec<u8>, too_big: bool) -> std::io::Result<Next> {
        let Some(txn) = self.txn.take() else {
            return Ok(Next::Close);
        };
        let mut over = None;
        let mut drop_after = false;
        match self.fault(Stage::AfterDot, None)? {
            Flow::Go(o) => over = o,
            Flow::Stop => return Ok(Next::Continue),
            Flow::Close => return Ok(Next::Close),
            Flow::AcceptThenDrop => drop_after = true,
        }
        if !drop_after && let Some(reply) = self.refusal(&txn, &data, too_big) {
            self.reply(&reply)?;
            return Ok(Next::Continue);
        }
        let message_id = header_value(&data, "Message-ID")
            .filter(|m| m.starts_with('<') && m.ends_with('>'))
            .map(|m| echo(&m))
            .unwrap_or_else(|| self.replies().generated_message_id());
        let now = Instant::now();
        let mut received = Received {
            mailbox: self.auth.as_ref().map(|a| a.mailbox.clone()),
            mail_from: txn.from,
            mail_params: txn.params,
            rcpts: txn.rcpts,
            rcpt_params: txn.rcpt_params,
            data,
            accepted_at: SystemTime::now(),
            connection_id: self.id,
            message_id: message_id.clone(),
            via: crate::store::Via::Smtp,
        };
        if let Some(hook) = &self.sh.cfg.on_message {
            hook(&received);
        }
        if let (Some(g), Some(mb)) = (
            self.sh.graph.get().and_then(std::sync::Weak::upgrade),
            received.mailbox.as_deref(),
        ) {
            g.schedule_ndrs(mb, &received.data, &received.rcpts);
        }
        if !self.sh.cfg.keep_bodies {
            received.data = Vec::new();
        }
        self.sh.store.record(received, now);
        if drop_after {
            self.io.abort();
            return Ok(Next::Close);
        }
        let text = over.unwrap_or_else(|| self.replies().queued(&message_id));
        self.reply(&text)?;
        Ok(Next::Continue)
    }

    /// The reply refusing the message after the dot, or `None` to accept it (which also
    /// records it against the mailbox's rate and quota).
    fn refusal(&mut self, txn: &Txn, data: &[u8], too_big: bool) -> Option<String> {
        let cfg = &self.sh.cfg;
        if too_big {
            return Some(self.replies().too_big());
        }
        if let (Some(auth), Some(max)) = (&self.auth, cfg.max_connections_per_mailbox)
            && self.sh.limits.rank(&auth.mailbox, auth.seq) >= max
        {
            return Some(self.replies().thread_limit());
        }
        if let (Some(auth), true) = (&self.auth, cfg.check_send_as) {
            let mailbox = cfg.find_mailbox(&auth.mailbox);
            let allowed = |a: &str| {
                a.eq_ignore_ascii_case(&auth.mailbox) || mailbox.is_some_and(|m| m.may_send_as(a))
            };
            let from = header_value(data, "From").and_then(|v| first_address(&v));
            // SECURITY: the From header must be the mailbox or one it has SendAs on.
            if let Some(from) = &from
                && !allowed(from)
            {
                return Some(self.replies().send_as_denied(&auth.mailbox, from));
            }
            // SECURITY: so must the envelope sender (the null sender of a DSN is let through).
            if !txn.from.is_empty() && !allowed(&txn.from) {
                return Some(self.replies().envelope_denied());
            }
        }
        let mailbox = self.auth.as_ref().map(|a| a.mailbox.clone());
        let rcpts = txn.rcpts.len() as u32;
        loop {
            match self
                .sh
                .limits
                .admit(mailbox.as_deref(), rcpts, Instant::now())
            {
                Ok(()) => return None,
                Err(Denial::RecipientQuota) => return Some(self.replies().quota_exceeded()),
                Err(Denial::Rate { until }) => match cfg.over_rate {
                    OverRate::Reject => return Some(self.replies().quota_exceeded()),
                    OverRate::Throttle => {
                        self.sh
                            .store
                            .throttled
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let wait = until.saturating_duration_since(Instant::now())
                            + Duration::from_millis(1);
                        if self.io.flush().is_err() || !self.io.sleep(wait) {
                            return Some(self.err("421 4.3.2 Service not active"));
                        }
                    }
                },
            }
        }
    }
}
