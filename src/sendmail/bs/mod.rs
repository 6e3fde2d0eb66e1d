//! `sendmail -bs`: an SMTP server dialogue on standard input and output, as Postfix's
//! `sendmail -bs` offers it (Postfix runs its smtpd on stdio). Symfony Mailer, Laravel
//! and SwiftMailer use it by default.
//!
//! The dialogue is a pure state machine over a [`BufRead`] and a [`Write`], so it is
//! tested without processes; the spool write is behind the [`Spooler`] trait. Each
//! message goes through the same [`intake::build`] as the command-line path (header
//! completion, size limit), with the envelope from MAIL FROM and RCPT TO instead of
//! argv, and is queued (the spool write returned) before its `250` is written.
//!
//! Trusts nothing: every byte on stdin comes from the calling program. Memory stays
//! bounded whatever it sends: command lines are cut at [`MAX_COMMAND_LINE`] bytes
//! (the rest of the line is read and thrown away), and message data stops being kept
//! once it passes the size limit.
//!
//! Replies carry RFC 3463 enhanced status codes, except where RFC 2034 rules them
//! out: the greeting, the EHLO/HELO replies and the 354 (there is no class 3).
//!
//! The network listener (`relay365 listen`) drives the same machine over TCP through
//! [`Session::network`]: a [`network::Gate`] decides relay access, AUTH and rates, the
//! [`network::Channel`] can switch to TLS, and only then are STARTTLS and AUTH (after
//! STARTTLS) offered; a hard error limit closes a client that keeps failing. On stdio
//! none of that exists and the dialogue is the one `sendmail -bs` always had.

use std::io::{self, BufRead, Write};
use std::time::SystemTime;

use crate::message::address::{Address, Sender};
use crate::message::text;
use crate::spool::QueueId;
use crate::spool::envelope::{BodyType, Dsn, EnvId, Notify, Ret};
use crate::sysexits::{Exit, ExitStatus};

pub mod network;
mod read;

use network::{Channel, Client, Counters, Gate, Stdio, Tracked};
use read::{Data, Line, read_data, read_line};

use super::deposit::{Origin, SpoolError};
use super::intake::{self, Caller, IntakeError, IntakeSettings, Received, Submission};
use super::options::{Mode, Options};

/// The longest command line kept, line ending included (Postfix's `line_length_limit`);
/// RFC 5321 asks for 512, extensions need more. A longer line gets `500 5.5.6`.
pub const MAX_COMMAND_LINE: usize = 2048;
/// Recipients per message (Exchange Online allows at most 1000 per message).
pub const DEFAULT_MAX_RECIPIENTS: usize = 1000;
/// Replies of class 4 or 5 after which a network client is disconnected (Postfix's
/// `smtpd_hard_error_limit`).
pub const HARD_ERROR_LIMIT: u32 = 20;
/// The longest EHLO/HELO name kept (for the Received header and the logs).
const MAX_HELO: usize = 255;
/// The longest ENVID (RFC 3461) and ORCPT value accepted.
const MAX_ENVID: usize = 100;
const MAX_ORCPT: usize = 500;

/// Where a finished message goes: the deposit into `incoming/` in production
/// ([`super::deposit::Depositor`]), a vector in tests.
pub trait Spooler {
    /// Queues the submission durably; returns only once it is safe to say `250`.
    fn deposit(&mut self, submission: &Submission) -> Result<(), SpoolError>;
    /// Who hands the next submissions in, when the dialogue learns more of it (HELO,
    /// AUTH); the local caller never changes.
    fn set_origin(&mut self, _origin: Origin) {}
}

/// What a session needs from the configuration.
#[derive(Debug, Clone)]
pub struct Settings<'a> {
    /// The greeting's name and the domain that qualifies bare local names.
    pub domain: &'a str,
    /// Advertised as `SIZE`; larger messages get `552 5.3.4`.
    pub max_message_size: u64,
    /// Accepted recipients per message; more get `452 4.5.3`.
    pub max_recipients: usize,
}

/// How a session ended.
#[derive(Debug)]
pub enum Ending {
    /// The client said QUIT.
    Quit,
    /// End of input with no transaction open: everything the client finished was queued.
    EndOfInput,
    /// End of input with a transaction open (after MAIL, or inside DATA): that message
    /// was not queued.
    Abandoned { in_data: bool },
    /// Reading the input or writing a reply failed (the client went away).
    Io(io::Error),
    /// The server closed a network session (too many errors or failed AUTHs); the
    /// `421` reply was sent.
    Closed(&'static str),
}

impl ExitStatus for Ending {
    /// The exit status. Postfix's smtpd in this mode exits 0 even when the input ends
    /// in the middle of a message, which tells a caller that only checks the status
    /// (as PHP's transports do) that all is well when a message was dropped. relay365
    /// exits `EX_TEMPFAIL` instead: nothing of that message was queued and nothing is
    /// wrong with its data (so not `EX_DATAERR`), the connection was lost, and sending
    /// the whole message again is the right reaction.
    fn exit(&self) -> Exit {
        match self {
            Ending::Quit | Ending::EndOfInput => Exit::Ok,
            Ending::Abandoned { .. } | Ending::Closed(_) => Exit::TempFail,
            Ending::Io(_) => Exit::IoErr,
        }
    }
}

/// The outcome of a session: how it ended and what it queued, in order.
#[derive(Debug)]
pub struct Report {
    pub ending: Ending,
    pub queued: Vec<QueueId>,
    /// Commands accepted and tried, for the listener's `disconnect` line.
    pub counters: Counters,
}

/// One mail transaction, from MAIL FROM to the end of DATA.
#[derive(Debug)]
struct Transaction {
    sender: Sender,
    smtputf8: bool,
    /// MAIL FROM's BODY, RET and ENVID; `notify` stays unset here (it is per RCPT).
    dsn: Dsn,
    recipients: Vec<Address>,
    /// NOTIFY per accepted recipient.
    notify: Vec<Option<Notify>>,
    /// Whether any RCPT was tried, to tell "need RCPT" from "no valid recipients".
    rcpt_tried: bool,
}

/// What to do after a command.
enum Flow {
    Continue,
    Quit,
    Abandoned,
    Closed(&'static str),
}

/// The network side of a session: the listener's policy and what is known of the client.
struct Net<'a> {
    gate: &'a mut dyn Gate,
    client: Client,
}

/// An SMTP session on one input and one output.
pub struct Session<'a, S: Spooler> {
    settings: Settings<'a>,
    /// The command line's options: `-F`, `-N`, `-R`, `-V`, `-B`, `-odq` still apply,
    /// MAIL FROM parameters override them per message.
    base: &'a Options,
    caller: &'a Caller,
    spooler: S,
    tx: Option<Transaction>,
    queued: Vec<QueueId>,
    net: Option<Net<'a>>,
    counters: Counters,
}

impl<'a, S: Spooler> Session<'a, S> {
    pub fn new(settings: Settings<'a>, base: &'a Options, caller: &'a Caller, spooler: S) -> Self {
        Session {
            settings,
            base,
            caller,
            spooler,
            tx: None,
            queued: Vec::new(),
            net: None,
            counters: Counters::default(),
        }
    }

    /// Makes this a network session for `client`, under the listener's `gate`.
    pub fn network(mut self, gate: &'a mut dyn Gate, client: Client) -> Self {
        self.net = Some(Net { gate, client });
        self
    }

    /// Runs the dialogue on standard input and output until QUIT, end of input or an
    /// I/O error.
    pub fn run(self, input: impl BufRead, output: impl Write) -> Report {
        self.run_on(&mut Stdio { input, output })
    }

    /// Runs the dialogue on a channel (a TCP connection that may turn to TLS).
    pub fn run_on(mut self, channel: &mut impl Channel) -> Report {
        let mut io = Tracked {
            inner: channel,
            last: 0,
            at_line_start: true,
        };
        let ending = match self.dialogue(&mut io) {
            Ok(e) => e,
            Err(e) => Ending::Io(e),
        };
        Report {
            ending,
            queued: self.queued,
            counters: self.counters,
        }
    }

    fn dialogue<C: Channel>(&mut self, io: &mut Tracked<'_, C>) -> io::Result<Ending> {
        let greeting = format!("220 {} ESMTP relay365", self.settings.domain);
        send(io, &[greeting])?;
        let mut line = Vec::with_capacity(512);
        loop {
            // SECURITY: at most MAX_COMMAND_LINE bytes of a command are ever held.
            match read_line(io, &mut line, MAX_COMMAND_LINE)? {
                Line::Eof => {
                    return Ok(if self.tx.is_some() {
                        Ending::Abandoned { in_data: false }
                    } else {
                        Ending::EndOfInput
                    });
                }
                Line::TooLong => {
                    reply(io, "500 5.5.6 Error: line too long")?;
                    self.counters.count("unknown", false);
                }
                Line::Complete => match self.command(&line, io)? {
                    Flow::Continue => {}
                    Flow::Quit => return Ok(Ending::Quit),
                    Flow::Abandoned => return Ok(Ending::Abandoned { in_data: true }),
                    Flow::Closed(why) => return Ok(Ending::Closed(why)),
                },
            }
            // SECURITY: a network client that keeps failing is cut off (Postfix's
            // hard error limit), so it cannot probe forever on one connection.
            if self.net.is_some() && self.counters.errors >= HARD_ERROR_LIMIT {
                let domain = self.settings.domain;
                reply(io, &format!("421 4.7.0 {domain} Error: too many errors"))?;
                return Ok(Ending::Closed("too many errors"));
            }
        }
    }

    fn command<C: Channel>(&mut self, raw: &[u8], io: &mut Tracked<'_, C>) -> io::Result<Flow> {
        let flow = self.dispatch(raw, io)?;
        let verb = strip_line_end(raw)
            .split(|b| *b == b' ' || *b == b'\t')
            .next()
            .and_then(|v| std::str::from_utf8(v).ok())
            .unwrap_or("");
        // A DATA whose input ended before the dot did not succeed, whatever its 354 said.
        let ok = matches!(io.last, b'2' | b'3') && !matches!(flow, Flow::Abandoned);
        self.counters.count(network::counter_name(verb), ok);
        Ok(flow)
    }

    fn dispatch<C: Channel>(&mut self, raw: &[u8], io: &mut Tracked<'_, C>) -> io::Result<Flow> {
        let out = &mut *io;
        let raw = strip_line_end(raw);
        let Ok(text) = std::str::from_utf8(raw) else {
            reply(out, "500 5.5.2 Error: bad UTF-8 syntax")?;
            return Ok(Flow::Continue);
        };
        let text = text.trim_matches([' ', '\t']);
        let (verb, arg) = match text.split_once([' ', '\t']) {
            Some((v, a)) => (v, a.trim_start_matches([' ', '\t'])),
            None => (text, ""),
        };
        if verb.is_empty() {
            reply(out, "500 5.5.2 Error: bad syntax")?;
            return Ok(Flow::Continue);
        }
        match verb.to_ascii_uppercase().as_str() {
            "EHLO" => self.hello(out, arg, true)?,
            "HELO" => self.hello(out, arg, false)?,
            "MAIL" => self.mail(out, arg)?,
            "RCPT" => self.rcpt(out, arg)?,
            "DATA" => return self.data(io, arg),
            "STARTTLS" if self.net.is_some() => return self.starttls(io, arg),
            "AUTH" if self.net.is_some() => return self.auth(io, arg),
            "RSET" => {
                if arg.is_empty() {
                    self.tx = None;
                    reply(out, "250 2.0.0 Ok")?;
                } else {
                    reply(out, "501 5.5.4 Syntax: RSET")?;
                }
            }
            // RFC 5321 lets NOOP carry a string, which is ignored.
            "NOOP" => reply(out, "250 2.0.0 Ok")?,
            "VRFY" => {
                if arg.is_empty() {
                    reply(out, "501 5.5.4 Syntax: VRFY address")?;
                } else {
                    reply(
                        out,
                        "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery",
                    )?;
                }
            }
            "HELP" => reply(
                out,
                "214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP VRFY HELP QUIT",
            )?,
            "QUIT" => {
                reply(out, "221 2.0.0 Bye")?;
                return Ok(Flow::Quit);
            }
            "EXPN" | "STARTTLS" | "AUTH" | "BDAT" | "ETRN" | "TURN" | "ATRN" | "XCLIENT"
            | "XFORWARD" => reply(out, "502 5.5.1 Error: command not implemented")?,
            _ => reply(out, "502 5.5.2 Error: command not recognized")?,
        }
        Ok(Flow::Continue)
    }

    fn hello(&mut self, out: &mut impl Write, arg: &str, extended: bool) -> io::Result<()> {
        if arg.is_empty() {
            let verb = if extended { "EHLO" } else { "HELO" };
            return reply(out, &format!("501 5.5.4 Syntax: {verb} hostname"));
        }
        // RFC 5321 4.1.4: a greeting in the middle of a transaction resets it.
        self.tx = None;
        let domain = self.settings.domain;
        if let Some(net) = self.net.as_mut() {
            // SECURITY: the name goes into a header and the logs: one line, bounded.
            net.client.helo = Some(text::one_line_max(arg, MAX_HELO));
        }
        if !extended {
            return reply(out, &format!("250 {domain}"));
        }
        let mut lines = vec![
            domain.to_string(),
            "PIPELINING".into(),
            format!("SIZE {}", self.settings.max_message_size),
        ];
        if let Some(net) = &self.net {
            let tls = net.client.tls.is_some();
            if !tls && net.gate.offers_tls() {
                lines.push("STARTTLS".into());
            }
            // SECURITY: AUTH only inside TLS, so no password ever crosses in clear.
            if tls && net.gate.offers_auth() && net.client.user.is_none() {
                lines.push(format!("AUTH {}", network::MECHANISMS));
            }
        }
        lines.extend([
            "8BITMIME".into(),
            "DSN".into(),
            "SMTPUTF8".into(),
            "ENHANCEDSTATUSCODES".into(),
        ]);
        let lines: Vec<String> = lines.into_iter().map(|l| format!("250 {l}")).collect();
        send(out, &lines)
    }

    fn mail(&mut self, out: &mut impl Write, arg: &str) -> io::Result<()> {
        if self.tx.is_some() {
            return reply(out, "503 5.5.1 Error: nested MAIL command");
        }
        let Some(rest) = strip_prefix_ci(arg, "FROM:") else {
            return reply(out, "501 5.5.4 Syntax: MAIL FROM:<address>");
        };
        let Some((path, params)) = split_path(rest) else {
            return reply(out, "501 5.5.4 Syntax: MAIL FROM:<address>");
        };
        let mut tx = Transaction {
            sender: Sender::Null,
            smtputf8: false,
            dsn: Dsn::default(),
            recipients: Vec::new(),
            notify: Vec::new(),
            rcpt_tried: false,
        };
        for param in params.split_whitespace() {
            let (key, value) = match param.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (param, None),
            };
            match (key.to_ascii_uppercase().as_str(), value) {
                ("SIZE", Some(v)) => match v.parse::<u64>() {
                    Ok(n) if n > self.settings.max_message_size => {
                        return reply(
                            out,
                            &format!(
                                "552 5.3.4 Message size exceeds fixed limit of {} bytes",
                                self.settings.max_message_size
                            ),
                        );
                    }
                    Ok(_) => {}
                    Err(_) => return reply(out, "501 5.5.4 Bad message size syntax"),
                },
                ("BODY", Some(v)) => match BodyType::parse(v) {
                    Some(b) => tx.dsn.body = Some(b),
                    None => return reply(out, "501 5.5.4 Bad BODY keyword syntax"),
                },
                ("RET", Some(v)) => match Ret::parse(v) {
                    Some(r) => tx.dsn.ret = Some(r),
                    None => return reply(out, "501 5.5.4 Bad RET parameter syntax"),
                },
                // Kept in its xtext form: for the values -V accepts (no + or =) that
                // is the plain text too, so the spool holds one form either way.
                ("ENVID", Some(v)) if v.len() <= MAX_ENVID && is_xtext(v) => {
                    match EnvId::parse(v) {
                        Some(e) => tx.dsn.envid = Some(e),
                        None => return reply(out, "501 5.5.4 Bad ENVID parameter syntax"),
                    }
                }
                ("ENVID", _) => return reply(out, "501 5.5.4 Bad ENVID parameter syntax"),
                ("SMTPUTF8", None) => tx.smtputf8 = true,
                _ => {
                    return reply(
                        out,
                        &format!("555 5.5.4 Unsupported option: {}", printable(param)),
                    );
                }
            }
        }
        if !path.is_ascii() && !tx.smtputf8 {
            return reply(
                out,
                "553 5.6.7 Must declare SMTPUTF8 to send unicode address",
            );
        }
        // SECURITY: Sender::parse refuses CR, LF and other controls, so nothing from
        // MAIL FROM can reach the envelope file or a later SMTP command as a line break.
        tx.sender = match Sender::parse(path) {
            Ok(s) => s,
            Err(e) => {
                return reply(
                    out,
                    &format!(
                        "501 5.1.7 Bad sender address syntax: {}",
                        printable(&e.to_string())
                    ),
                );
            }
        };
        if let Some(net) = self.net.as_mut()
            && let Err(refusal) = net.gate.mail(&net.client, &tx.sender)
        {
            return reply(out, &refusal);
        }
        self.tx = Some(tx);
        reply(out, "250 2.1.0 Ok")
    }

    fn rcpt(&mut self, out: &mut impl Write, arg: &str) -> io::Result<()> {
        let max = self.settings.max_recipients;
        let Some(tx) = self.tx.as_mut() else {
            return reply(out, "503 5.5.1 Error: need MAIL command");
        };
        let Some(rest) = strip_prefix_ci(arg, "TO:") else {
            return reply(out, "501 5.5.4 Syntax: RCPT TO:<address>");
        };
        let Some((path, params)) = split_path(rest) else {
            return reply(out, "501 5.5.4 Syntax: RCPT TO:<address>");
        };
        tx.rcpt_tried = true;
        let mut notify = None;
        for param in params.split_whitespace() {
            let (key, value) = match param.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (param, None),
            };
            match (key.to_ascii_uppercase().as_str(), value) {
                ("NOTIFY", Some(v)) => match Notify::parse(v) {
                    Some(n) => notify = Some(n),
                    None => return reply(out, "501 5.5.4 Error: Bad NOTIFY parameter syntax"),
                },
                // Checked but not kept: the envelope has no field for it, and Exchange
                // Online's DSNs name the recipient as submitted anyway.
                ("ORCPT", Some(v)) if is_orcpt(v) => {}
                ("ORCPT", _) => return reply(out, "501 5.5.4 Error: Bad ORCPT parameter syntax"),
                _ => {
                    return reply(
                        out,
                        &format!("555 5.5.4 Unsupported option: {}", printable(param)),
                    );
                }
            }
        }
        if !path.is_ascii() && !tx.smtputf8 {
            return reply(
                out,
                "553 5.6.7 Must declare SMTPUTF8 to send unicode address",
            );
        }
        // SECURITY: the same control-character refusal for every recipient.
        let address = match Address::parse(path) {
            Ok(a) => a,
            Err(e) => {
                return reply(
                    out,
                    &format!(
                        "501 5.1.3 Bad recipient address syntax: {}",
                        printable(&e.to_string())
                    ),
                );
            }
        };
        if let Some(net) = self.net.as_mut() {
            // SECURITY: never an open relay: the gate refuses a client that is neither
            // in `allow` nor authenticated.
            if let Err(refusal) = net.gate.rcpt(&net.client, &tx.sender, &address) {
                return reply(out, &refusal);
            }
        }
        if tx.recipients.len() >= max {
            return reply(out, "452 4.5.3 Error: too many recipients");
        }
        tx.recipients.push(address);
        tx.notify.push(notify);
        reply(out, "250 2.1.5 Ok")
    }

    fn data<C: Channel>(&mut self, io: &mut Tracked<'_, C>, arg: &str) -> io::Result<Flow> {
        let out = &mut *io;
        if !arg.is_empty() {
            reply(out, "501 5.5.4 Syntax: DATA")?;
            return Ok(Flow::Continue);
        }
        let Some(tx) = self.tx.as_ref() else {
            reply(out, "503 5.5.1 Error: need MAIL command")?;
            return Ok(Flow::Continue);
        };
        if tx.recipients.is_empty() {
            if tx.rcpt_tried {
                reply(out, "554 5.5.1 Error: no valid recipients")?;
            } else {
                reply(out, "503 5.5.1 Error: need RCPT command")?;
            }
            return Ok(Flow::Continue);
        }
        reply(out, "354 End data with <CR><LF>.<CR><LF>")?;
        let data = read_data(io, self.settings.max_message_size)?;
        let out = &mut *io;
        // Whatever the outcome, the transaction is over (RFC 5321 4.1.1.4).
        let Some(tx) = self.tx.take() else {
            return Ok(Flow::Continue);
        };
        let raw = match data {
            Data::Eof => return Ok(Flow::Abandoned),
            Data::TooBig => {
                reply(
                    out,
                    &format!(
                        "552 5.3.4 Error: message too large: it exceeds the limit of {} bytes",
                        self.settings.max_message_size
                    ),
                )?;
                return Ok(Flow::Continue);
            }
            Data::BareLf { line } => {
                // Postfix's reply with smtpd_forbid_bare_newline = reject; the session
                // goes on, as there (no 521 and disconnect: the caller is local).
                reply(
                    out,
                    &format!(
                        "550 5.5.2 Error: bare <LF> received (line {line} of the message; end every line with <CR><LF>)"
                    ),
                )?;
                return Ok(Flow::Continue);
            }
            Data::Nul { line } => {
                reply(
                    out,
                    &format!(
                        "554 5.6.0 Error: line {line} of the message contains a NUL byte, which mail cannot carry"
                    ),
                )?;
                return Ok(Flow::Continue);
            }
            Data::Message(raw) => raw,
        };
        let answer = self.queue(&tx, &raw);
        reply(out, &answer)?;
        Ok(Flow::Continue)
    }

    /// Builds and queues one message; returns the reply that says how it went.
    fn queue(&mut self, tx: &Transaction, raw: &[u8]) -> String {
        let opts = self.message_options(tx);
        let account = self.net.as_mut().and_then(|n| n.gate.account(&n.client));
        let received = self.net.as_ref().map(|n| Received {
            address: n.client.address,
            helo: n.client.helo.as_deref(),
            tls: n.client.tls.as_deref(),
            user: n.client.user.as_deref(),
            recipients: tx.recipients.len(),
            account: account.as_deref(),
        });
        let settings = IntakeSettings {
            domain: self.settings.domain,
            max_message_size: self.settings.max_message_size,
            received,
        };
        let now = SystemTime::now();
        let id = QueueId::generate(now);
        if let Some(net) = &self.net {
            self.spooler.set_origin(Origin::Network {
                client: net.client.address,
                helo: net.client.helo.clone(),
                user: net.client.user.clone(),
                method: net.client.method,
            });
        }
        let submission = match intake::build(&opts, &settings, self.caller, raw, now, &id) {
            Ok(s) => s,
            Err(e) => return intake_reply(&e),
        };
        match self.spooler.deposit(&submission) {
            Ok(()) => {
                let answer = format!("250 2.0.0 Ok: queued as {id}");
                self.queued.push(id);
                if let Some(net) = self.net.as_mut() {
                    net.gate.queued(&net.client);
                }
                answer
            }
            Err(e) if e.is_full() => format!(
                "452 4.3.1 Insufficient system storage: {}",
                printable(&e.to_string())
            ),
            Err(e) => format!(
                "451 4.3.0 Error: queue file write error: {}",
                printable(&e.to_string())
            ),
        }
    }

    /// The options `intake::build` sees for one message: the command line's, with the
    /// envelope from MAIL FROM and RCPT TO (as `-f` and recipient arguments would give
    /// it) and the DSN parameters of this transaction.
    fn message_options(&self, tx: &Transaction) -> Options {
        let mut o = self.base.clone();
        o.mode = Mode::Enqueue;
        o.extract = false;
        o.sender = Some(match &tx.sender {
            Sender::Null => "<>".to_string(),
            Sender::Address(a) => a.to_string(),
        });
        o.recipients = tx.recipients.iter().map(|a| a.to_string()).collect();
        if tx.dsn.body.is_some() {
            o.dsn.body = tx.dsn.body;
        }
        if tx.dsn.ret.is_some() {
            o.dsn.ret = tx.dsn.ret;
        }
        if tx.dsn.envid.is_some() {
            o.dsn.envid = tx.dsn.envid.clone();
        }
        // The envelope holds one NOTIFY per message: keep the recipients' common value;
        // when they differ (no client seen does that) fall back to the default.
        if let Some(Some(first)) = tx.notify.first() {
            if tx.notify.iter().all(|n| n.as_ref() == Some(first)) {
                o.dsn.notify = Some(*first);
            } else {
                o.dsn.notify = None;
            }
        } else if tx.notify.iter().any(Option::is_some) {
            o.dsn.notify = None;
        }
        o
    }
}

/// The reply for a message intake refused.
fn intake_reply(e: &IntakeError) -> String {
    let why = printable(&e.to_string());
    match e {
        IntakeError::TooBig { .. } => format!("552 5.3.4 Error: {why}"),
        IntakeError::Envelope { .. } => format!("552 5.5.3 Error: {why}"),
        IntakeError::Nul { .. } | IntakeError::Header(_) | IntakeError::Address(_) => {
            format!("554 5.6.0 Error: {why}")
        }
        IntakeError::NoRecipients(_) => format!("554 5.5.1 Error: {why}"),
        IntakeError::Read(_) => format!("451 4.3.0 Error: {why}"),
    }
}

/// Writes a one-line reply and flushes it: a client that does not pipeline waits for it.
fn reply(out: &mut impl Write, line: &str) -> io::Result<()> {
    send(out, &[line.to_string()])
}

/// Writes a reply of one or more lines `NNN text`, turning all but the last into
/// `NNN-text` continuation lines, and flushes.
fn send(out: &mut impl Write, lines: &[String]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(64 * lines.len());
    for (i, line) in lines.iter().enumerate() {
        let mut l = line.clone();
        if i + 1 < lines.len() && l.len() > 3 && l.as_bytes()[3] == b' ' {
            l.replace_range(3..4, "-");
        }
        buf.extend_from_slice(l.as_bytes());
        buf.extend_from_slice(b"\r\n");
    }
    out.write_all(&buf)?;
    out.flush()
}

/// SECURITY: text that goes into a reply (error messages quoting client input) must
/// stay on one line, or the client would read a forged reply.
fn printable(s: &str) -> String {
    text::one_line(s)
}

fn strip_line_end(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn strip_prefix_ci<'s>(s: &'s str, prefix: &str) -> Option<&'s str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// Splits `<path> PARAMS` (or a bare `path PARAMS`, which Postfix accepts too) into the
/// address and the parameters. A source route (`<@a,@b:user@c>`) is dropped, as RFC 5321
/// asks. `None` for a missing `>` or text glued to it.
fn split_path(rest: &str) -> Option<(&str, &str)> {
    let rest = rest.trim_start_matches([' ', '\t']);
    let (path, params) = if let Some(inner) = rest.strip_prefix('<') {
        let mut quoted = false;
        let mut escaped = false;
        let mut close = None;
        for (i, c) in inner.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if quoted => escaped = true,
                '"' => quoted = !quoted,
                '>' if !quoted => {
                    close = Some(i);
                    break;
                }
                _ => {}
            }
        }
        let close = close?;
        let after = &inner[close + 1..];
        if !after.is_empty() && !after.starts_with([' ', '\t']) {
            return None;
        }
        (&inner[..close], after)
    } else {
        match rest.split_once([' ', '\t']) {
            Some((p, a)) => (p, a),
            None => (rest, ""),
        }
    };
    let path = match (path.starts_with('@'), path.split_once(':')) {
        (true, Some((_, mailbox))) => mailbox,
        _ => path,
    };
    Some((path, params))
}

/// RFC 3461 xtext: printable ASCII but `=`, with `+` introducing two upper-case hex digits.
fn is_xtext(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => {
                let hex = |c: Option<&u8>| {
                    c.is_some_and(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(c))
                };
                if !(hex(b.get(i + 1)) && hex(b.get(i + 2))) {
                    return false;
                }
                i += 3;
            }
            b'=' => return false,
            33..=126 => i += 1,
            _ => return false,
        }
    }
    !b.is_empty()
}

/// ORCPT: `addr-type;xtext` (RFC 3461 4.2).
fn is_orcpt(v: &str) -> bool {
    match v.split_once(';') {
        Some((kind, addr)) => {
            v.len() <= MAX_ORCPT
                && !kind.is_empty()
                && kind.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && is_xtext(addr)
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sendmail::options;
    use crate::spool::envelope::Envelope;
    use std::ffi::OsString;
    use std::path::PathBuf;

    /// Collects submissions; can be told to fail the next deposits.
    #[derive(Default)]
    struct Fake {
        queued: Vec<(QueueId, Envelope, Vec<u8>)>,
        fail: Vec<SpoolError>,
    }

    impl Spooler for &mut Fake {
        fn deposit(&mut self, s: &Submission) -> Result<(), SpoolError> {
            if let Some(e) = self.fail.pop() {
                return Err(e);
            }
            self.queued
                .push((s.envelope.id.clone(), s.envelope.clone(), s.message.clone()));
            Ok(())
        }
    }

    fn caller() -> Caller {
        Caller {
            uid: 33,
            login: "www-data".into(),
            full_name: Some("www-data".into()),
        }
    }

    fn opts(args: &[&str]) -> Options {
        let a: Vec<OsString> = args.iter().map(OsString::from).collect();
        options::parse("sendmail", &a).unwrap()
    }

    /// Runs a whole (pipelined) session; returns the replies and the report.
    fn session_with(
        input: &[u8],
        fake: &mut Fake,
        max_size: u64,
        max_rcpt: usize,
    ) -> (Vec<String>, Report) {
        let o = opts(&["-bs"]);
        let c = caller();
        let settings = Settings {
            domain: "example.com",
            max_message_size: max_size,
            max_recipients: max_rcpt,
        };
        let mut out = Vec::new();
        let report = Session::new(settings, &o, &c, fake).run(input, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.is_empty() || text.ends_with("\r\n"));
        let lines = text
            .split("\r\n")
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        (lines, report)
    }

    fn session(input: &str, fake: &mut Fake) -> (Vec<String>, Report) {
        session_with(input.as_bytes(), fake, 10_000, 5)
    }

    /// The code of each final reply line (skipping continuation lines).
    fn codes(lines: &[String]) -> Vec<&str> {
        lines
            .iter()
            .filter(|l| l.as_bytes().get(3) != Some(&b'-'))
            .map(|l| &l[..3])
            .collect()
    }

    const ONE: &str = "EHLO client\r\nMAIL FROM:<app@example.org>\r\nRCPT TO:<a@x.org>\r\nDATA\r\nSubject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n";

    #[test]
    fn a_whole_pipelined_session() {
        let mut f = Fake::default();
        let (lines, report) = session(ONE, &mut f);
        assert_eq!(lines[0], "220 example.com ESMTP relay365");
        assert_eq!(
            codes(&lines),
            ["220", "250", "250", "250", "354", "250", "221"]
        );
        assert!(matches!(report.ending, Ending::Quit));
        assert_eq!(report.ending.exit(), Exit::Ok);
        assert_eq!(f.queued.len(), 1);
        let (id, env, msg) = &f.queued[0];
        assert_eq!(report.queued, std::slice::from_ref(id));
        assert_eq!(lines[11], format!("250 2.0.0 Ok: queued as {id}"));
        assert_eq!(env.sender, "app@example.org");
        assert_eq!(env.recipients, ["a@x.org"]);
        assert_eq!(env.uid, 33);
        let msg = String::from_utf8_lossy(msg);
        assert!(
            msg.starts_with("Received: by example.com (relay365, from userid 33)\r\n\tid "),
            "{msg}"
        );
        assert!(
            msg.contains("\r\nSubject: hi\r\nFrom: \"www-data\" <app@example.org>\r\nDate: "),
            "{msg}"
        );
        assert!(msg.contains("\r\nMessage-ID: <"), "{msg}");
        assert!(msg.ends_with("\r\n\r\nbody\r\n"), "{msg}");
    }

    #[test]
    fn ehlo_advertises_the_extensions_and_the_size() {
        let mut f = Fake::default();
        let (lines, _) = session("EHLO c\r\nQUIT\r\n", &mut f);
        assert_eq!(
            lines[1..8],
            [
                "250-example.com",
                "250-PIPELINING",
                "250-SIZE 10000",
                "250-8BITMIME",
                "250-DSN",
                "250-SMTPUTF8",
                "250 ENHANCEDSTATUSCODES"
            ]
        );
        let (lines, _) = session("HELO c\r\nEHLO\r\nHELO\r\n", &mut f);
        assert_eq!(lines[1], "250 example.com");
        assert_eq!(lines[2], "501 5.5.4 Syntax: EHLO hostname");
        assert_eq!(lines[3], "501 5.5.4 Syntax: HELO hostname");
    }

    #[test]
    fn every_reply_but_greeting_helo_and_354_has_an_enhanced_code() {
        let mut f = Fake::default();
        let input = "NOOP\r\nHELP\r\nVRFY root\r\nVRFY\r\nRSET\r\nRSET x\r\nBOGUS\r\nEXPN x\r\n\r\nDATA\r\nRCPT TO:<a@b>\r\nMAIL FROM:<>\r\nMAIL FROM:<>\r\nDATA\r\nRCPT TO:<a@b>\r\nDATA x\r\nQUIT\r\n";
        let (lines, _) = session(input, &mut f);
        let expected = [
            "220 example.com ESMTP relay365",
            "250 2.0.0 Ok",
            "214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP VRFY HELP QUIT",
            "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery",
            "501 5.5.4 Syntax: VRFY address",
            "250 2.0.0 Ok",
            "501 5.5.4 Syntax: RSET",
            "502 5.5.2 Error: command not recognized",
            "502 5.5.1 Error: command not implemented",
            "500 5.5.2 Error: bad syntax",
            "503 5.5.1 Error: need MAIL command",
            "503 5.5.1 Error: need MAIL command",
            "250 2.1.0 Ok",
            "503 5.5.1 Error: nested MAIL command",
            "503 5.5.1 Error: need RCPT command",
            "250 2.1.5 Ok",
            "501 5.5.4 Syntax: DATA",
            "221 2.0.0 Bye",
        ];
        assert_eq!(lines, expected);
        for l in &lines[1..] {
            let enhanced = l[4..].split(' ').next().unwrap();
            assert!(
                enhanced.split('.').count() == 3 && enhanced.starts_with(&l[..1]),
                "{l}"
            );
        }
    }

    #[test]
    fn commands_are_case_insensitive_and_bracketless_paths_work() {
        let mut f = Fake::default();
        let input = "ehlo c\r\nmail from: app@example.org\r\nrcpt to: root\r\ndata\r\nS: s\r\n\r\nb\r\n.\r\nquit\r\n";
        let (lines, _) = session(input, &mut f);
        assert_eq!(
            codes(&lines),
            ["220", "250", "250", "250", "354", "250", "221"]
        );
        assert_eq!(f.queued[0].1.recipients, ["root@example.com"]);
    }

    #[test]
    fn null_sender_and_source_routes() {
        let mut f = Fake::default();
        let input = "MAIL FROM:<>\r\nRCPT TO:<@relay.example,@r2.example:user@x.org>\r\nDATA\r\n\r\nb\r\n.\r\n";
        let (lines, report) = session(input, &mut f);
        assert_eq!(codes(&lines), ["220", "250", "250", "354", "250"]);
        assert!(matches!(report.ending, Ending::EndOfInput));
        assert_eq!(f.queued[0].1.sender, "");
        assert_eq!(f.queued[0].1.recipients, ["user@x.org"]);
        // A null sender still gets a From: the caller's own address.
        let msg = String::from_utf8_lossy(&f.queued[0].2);
        assert!(
            msg.contains("From: \"www-data\" <www-data@example.com>\r\n"),
            "{msg}"
        );
    }

    #[test]
    fn bad_addresses_and_syntax() {
        let mut f = Fake::default();
        let input = "MAIL\r\nMAIL FROM\r\nMAIL FROM:<a@b\r\nMAIL FROM:<a b@c>\r\nMAIL FROM:<a@b>x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<>\r\nRCPT TO:<a@b\r\nRCPT x\r\nRCPT TO:<\"unterminated@x>\r\nQUIT\r\n";
        let (lines, _) = session(input, &mut f);
        assert_eq!(lines[1], "501 5.5.4 Syntax: MAIL FROM:<address>");
        assert_eq!(lines[2], "501 5.5.4 Syntax: MAIL FROM:<address>");
        assert_eq!(lines[3], "501 5.5.4 Syntax: MAIL FROM:<address>");
        assert!(
            lines[4].starts_with("501 5.1.7 Bad sender address syntax"),
            "{}",
            lines[4]
        );
        assert_eq!(lines[5], "501 5.5.4 Syntax: MAIL FROM:<address>");
        assert_eq!(lines[6], "250 2.1.0 Ok");
        assert!(
            lines[7].starts_with("501 5.1.3 Bad recipient address syntax"),
            "{}",
            lines[7]
        );
        assert_eq!(lines[8], "501 5.5.4 Syntax: RCPT TO:<address>");
        assert_eq!(lines[9], "501 5.5.4 Syntax: RCPT TO:<address>");
        assert_eq!(lines[10], "501 5.5.4 Syntax: RCPT TO:<address>");
        assert_eq!(lines[11], "221 2.0.0 Bye");
    }

    #[test]
    fn mail_parameters() {
        let mut f = Fake::default();
        let input = "MAIL FROM:<a@b> SIZE=10001\r\n\
                     MAIL FROM:<a@b> SIZE=lots\r\n\
                     MAIL FROM:<a@b> BODY=BINARYMIME\r\n\
                     MAIL FROM:<a@b> RET=ALL\r\n\
                     MAIL FROM:<a@b> ENVID=a=b\r\n\
                     MAIL FROM:<a@b> ENVID=+4\r\n\
                     MAIL FROM:<a@b> AUTH=<>\r\n\
                     MAIL FROM:<a@b> SMTPUTF8=yes\r\n\
                     MAIL FROM:<a@b> size=10000 body=8bitmime ret=hdrs envid=QQ+2B1 smtputf8\r\n\
                     RCPT TO:<c@d> NOTIFY=SUCCESS,failure ORCPT=rfc822;c+40d\r\n\
                     DATA\r\n\r\nb\r\n.\r\n";
        let (lines, _) = session(input, &mut f);
        assert_eq!(
            lines[1],
            "552 5.3.4 Message size exceeds fixed limit of 10000 bytes"
        );
        assert_eq!(lines[2], "501 5.5.4 Bad message size syntax");
        assert_eq!(lines[3], "501 5.5.4 Bad BODY keyword syntax");
        assert_eq!(lines[4], "501 5.5.4 Bad RET parameter syntax");
        assert_eq!(lines[5], "501 5.5.4 Bad ENVID parameter syntax");
        assert_eq!(lines[6], "501 5.5.4 Bad ENVID parameter syntax");
        assert_eq!(lines[7], "555 5.5.4 Unsupported option: AUTH=<>");
        assert_eq!(lines[8], "555 5.5.4 Unsupported option: SMTPUTF8=yes");
        assert_eq!(codes(&lines[9..]), ["250", "250", "354", "250"]);
        let env = &f.queued[0].1;
        assert_eq!(env.dsn.body, Some(BodyType::EightBitMime));
        assert_eq!(env.dsn.ret, Some(Ret::Hdrs));
        assert_eq!(env.dsn.envid.as_ref().map(EnvId::as_str), Some("QQ+2B1"));
        assert_eq!(env.dsn.notify, Notify::parse("success,failure"));
    }

    #[test]
    fn rcpt_parameters() {
        let mut f = Fake::default();
        let input = "MAIL FROM:<a@b>\r\n\
                     RCPT TO:<c@d> NOTIFY=SOMETIMES\r\n\
                     RCPT TO:<c@d> NOTIFY=never,failure\r\n\
                     RCPT TO:<c@d> ORCPT=rfc822\r\n\
                     RCPT TO:<c@d> ORCPT=rfc822;a=b\r\n\
                     RCPT TO:<c@d> FOO=1\r\n\
                     RCPT TO:<c@d> NOTIFY=NEVER\r\n\
                     RCPT TO:<e@d> NOTIFY=DELAY\r\n\
                     DATA\r\n\r\nb\r\n.\r\n";
        let (lines, _) = session(input, &mut f);
        assert_eq!(lines[2], "501 5.5.4 Error: Bad NOTIFY parameter syntax");
        assert_eq!(lines[3], "501 5.5.4 Error: Bad NOTIFY parameter syntax");
        assert_eq!(lines[4], "501 5.5.4 Error: Bad ORCPT parameter syntax");
        assert_eq!(lines[5], "501 5.5.4 Error: Bad ORCPT parameter syntax");
        assert_eq!(lines[6], "555 5.5.4 Unsupported option: FOO=1");
        assert_eq!(codes(&lines[7..]), ["250", "250", "354", "250"]);
        // Differing NOTIFY values cannot be kept in one envelope: the default applies.
        assert_eq!(f.queued[0].1.dsn.notify, None);
    }

    #[test]
    fn unicode_addresses_need_smtputf8() {
        let mut f = Fake::default();
        let input = "MAIL FROM:<jörg@x.de>\r\nMAIL FROM:<a@b>\r\nRCPT TO:<jörg@x.de>\r\nRSET\r\nMAIL FROM:<jörg@x.de> SMTPUTF8\r\nRCPT TO:<zoë@x.de>\r\nDATA\r\nSubject: Grüße\r\n\r\nb\r\n.\r\n";
        let (lines, _) = session(input, &mut f);
        assert_eq!(
            lines[1],
            "553 5.6.7 Must declare SMTPUTF8 to send unicode address"
        );
        assert_eq!(
            lines[3],
            "553 5.6.7 Must declare SMTPUTF8 to send unicode address"
        );
        assert_eq!(codes(&lines[4..]), ["250", "250", "250", "354", "250"]);
        assert_eq!(f.queued[0].1.sender, "jörg@x.de");
        assert_eq!(f.queued[0].1.recipients, ["zoë@x.de"]);
    }

    #[test]
    fn recipient_limit_and_dedupe() {
        let mut f = Fake::default();
        let mut input = String::from("MAIL FROM:<a@b>\r\n");
        for i in 0..7 {
            input.push_str(&format!("RCPT TO:<r{i}@x.org>\r\n"));
        }
        input.push_str("DATA\r\n\r\nb\r\n.\r\n");
        let (lines, _) = session(&input, &mut f);
        assert_eq!(
            codes(&lines[2..9]),
            ["250", "250", "250", "250", "250", "452", "452"]
        );
        assert_eq!(lines[7], "452 4.5.3 Error: too many recipients");
        assert_eq!(f.queued[0].1.recipients.len(), 5);
        let mut f = Fake::default();
        session(
            "MAIL FROM:<a@b>\r\nRCPT TO:<root>\r\nRCPT TO:<ROOT@example.com>\r\nDATA\r\n\r\n.\r\n",
            &mut f,
        );
        assert_eq!(f.queued[0].1.recipients, ["root@example.com"]);
    }

    #[test]
    fn an_envelope_over_the_queue_bound_gets_552_and_is_not_queued() {
        // Only with a recipient limit far above Exchange's: the same bound as the
        // command line (intake::build), so the pickup never quarantines what -bs took.
        let mut f = Fake::default();
        let mut input = String::from("MAIL FROM:<a@b>\r\n");
        let local = "r".repeat(60);
        for i in 0..20_000 {
            input.push_str(&format!(
                "RCPT TO:<{local}{i}@{}.example.org>\r\n",
                "d".repeat(150)
            ));
        }
        input.push_str("DATA\r\n\r\nb\r\n.\r\nQUIT\r\n");
        let (lines, _) = session_with(input.as_bytes(), &mut f, 10_000, 20_000);
        let answer = &lines[lines.len() - 2];
        assert!(
            answer.starts_with("552 5.5.3 Error: too many recipients (20000)"),
            "{answer}"
        );
        assert!(answer.contains("split the message"), "{answer}");
        assert!(f.queued.is_empty());
    }

    #[test]
    fn no_valid_recipients() {
        let mut f = Fake::default();
        let (lines, _) = session("MAIL FROM:<a@b>\r\nRCPT TO:<>\r\nDATA\r\n", &mut f);
        assert_eq!(lines[3], "554 5.5.1 Error: no valid recipients");
    }

    #[test]
    fn dot_unstuffing_and_line_endings() {
        let mut f = Fake::default();
        let input = b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nSubject: s\r\n\r\n..leading dot\r\n...\r\n\r\nbare\rcr\r\n.x\r\n. \r\n.\r\nQUIT\r\n";
        let (lines, _) = session_with(input, &mut f, 10_000, 5);
        assert_eq!(codes(&lines), ["220", "250", "250", "354", "250", "221"]);
        let msg = String::from_utf8(f.queued[0].2.clone()).unwrap();
        assert!(
            msg.ends_with("\r\n\r\n.leading dot\r\n..\r\n\r\nbare\rcr\r\nx\r\n \r\n"),
            "{msg:?}"
        );
        // LF-only command lines still work; the data must end in CRLF . CRLF.
        let mut f = Fake::default();
        let (lines, _) = session_with(
            b"MAIL FROM:<a@b>\nRCPT TO:<c@d>\nDATA\nS: s\r\n\r\nb\r\n.\r\nQUIT\n",
            &mut f,
            10_000,
            5,
        );
        assert_eq!(codes(&lines), ["220", "250", "250", "354", "250", "221"]);
        assert!(f.queued[0].2.ends_with(b"\r\n\r\nb\r\n"));
        // An LF-only terminator does not end the data: the input ends inside it.
        let mut f = Fake::default();
        let (lines, report) = session_with(
            b"MAIL FROM:<a@b>\nRCPT TO:<c@d>\nDATA\nS: s\n\nb\n.\nQUIT\n",
            &mut f,
            10_000,
            5,
        );
        assert_eq!(codes(&lines), ["220", "250", "250", "354"]);
        assert!(
            matches!(report.ending, Ending::Abandoned { in_data: true }),
            "{lines:?}"
        );
        assert!(f.queued.is_empty());
    }

    #[test]
    fn smtp_smuggling_never_ends_the_data_nor_starts_a_second_message() {
        // Each of these ends the data for some server (CVE-2023-51764/5/6); here only
        // CRLF . CRLF does. The smuggled transaction after it must stay message text.
        let smuggled = "MAIL FROM:<evil@x.org>\r\nRCPT TO:<victim@y.org>\r\nDATA\r\n\
                        Subject: smuggled\r\n\r\nx\r\n";
        for (end, bare_lf) in [
            ("\n.\n", true),
            ("\r\n.\n", true),
            ("\n.\r\n", true),
            ("\r.\r\n", false),
            ("\r\n.\r\r\n", false),
        ] {
            let input = format!(
                "MAIL FROM:<a@b.org>\r\nRCPT TO:<c@d.org>\r\nDATA\r\nSubject: s\r\n\r\nfirst\
                 {end}{smuggled}.\r\nQUIT\r\n"
            );
            let mut f = Fake::default();
            let (lines, report) = session_with(input.as_bytes(), &mut f, 10_000, 5);
            let want = if bare_lf { "550" } else { "250" };
            assert_eq!(
                codes(&lines),
                ["220", "250", "250", "354", want, "221"],
                "{end:?}: {lines:?}"
            );
            assert!(matches!(report.ending, Ending::Quit), "{end:?}");
            if bare_lf {
                assert_eq!(
                    lines[4],
                    "550 5.5.2 Error: bare <LF> received (line 3 of the message; end every line with <CR><LF>)"
                        .replace("line 3", if end.starts_with("\r\n") { "line 4" } else { "line 3" }),
                    "{end:?}"
                );
                assert!(f.queued.is_empty(), "{end:?}");
            } else {
                // One message, to the one recipient, the smuggled commands in its text.
                assert_eq!(f.queued.len(), 1, "{end:?}");
                assert_eq!(f.queued[0].1.recipients, ["c@d.org"]);
                let text = String::from_utf8_lossy(&f.queued[0].2);
                assert!(text.contains("RCPT TO:<victim@y.org>"), "{text:?}");
            }
        }
    }

    #[test]
    fn a_bare_lf_in_the_data_is_refused_and_the_session_goes_on() {
        let mut f = Fake::default();
        let input = b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nSubject: s\r\n\r\nbare lf\nx\r\n.\r\n\
                      MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nSubject: t\r\n\r\nok\r\n.\r\nQUIT\r\n";
        let (lines, _) = session_with(input, &mut f, 10_000, 5);
        assert_eq!(
            codes(&lines),
            [
                "220", "250", "250", "354", "550", "250", "250", "354", "250", "221"
            ]
        );
        assert!(
            lines[4].starts_with("550 5.5.2 Error: bare <LF> received (line 3"),
            "{}",
            lines[4]
        );
        assert_eq!(f.queued.len(), 1);
        assert!(f.queued[0].2.ends_with(b"\r\n\r\nok\r\n"));
        // A CRLF split across two pieces of the reader is no bare LF.
        let mut f = Fake::default();
        let mut input = b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nS: s\r\n\r\n".to_vec();
        input.extend(std::iter::repeat_n(b'y', read::DATA_PIECE - 1));
        input.extend_from_slice(b"\r\n.\r\nQUIT\r\n");
        let (lines, _) = session_with(&input, &mut f, 1_000_000, 5);
        assert_eq!(codes(&lines), ["220", "250", "250", "354", "250", "221"]);
        assert!(f.queued[0].2.ends_with(b"yy\r\n"));
    }

    #[test]
    fn several_messages_per_session_with_rset_between() {
        let mut f = Fake::default();
        let input = "EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<one@x>\r\nDATA\r\nSubject: 1\r\n\r\n1\r\n.\r\nMAIL FROM:<c@d>\r\nRCPT TO:<gone@x>\r\nRSET\r\nMAIL FROM:<e@f>\r\nRCPT TO:<two@x>\r\nRCPT TO:<three@x>\r\nDATA\r\nSubject: 2\r\n\r\n2\r\n.\r\nQUIT\r\n";
        let (_, report) = session(input, &mut f);
        assert_eq!(f.queued.len(), 2);
        assert_eq!(report.queued.len(), 2);
        assert_eq!(f.queued[0].1.recipients, ["one@x"]);
        assert_eq!(f.queued[1].1.sender, "e@f");
        assert_eq!(f.queued[1].1.recipients, ["two@x", "three@x"]);
        assert_ne!(f.queued[0].0, f.queued[1].0);
    }

    #[test]
    fn ehlo_in_a_transaction_resets_it() {
        let mut f = Fake::default();
        let (lines, _) = session(
            "MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nHELO x\r\nDATA\r\n",
            &mut f,
        );
        assert_eq!(lines[4], "503 5.5.1 Error: need MAIL command");
    }

    #[test]
    fn over_long_command_lines_are_refused_and_the_session_goes_on() {
        let mut f = Fake::default();
        let mut input = format!(
            "MAIL FROM:<{}@x.org>\r\n",
            "a".repeat(10 * MAX_COMMAND_LINE)
        );
        input.push_str("NOOP\r\n");
        input.push_str(&"x".repeat(MAX_COMMAND_LINE - 2));
        input.push_str("\r\nNOOP\r\n");
        let (lines, _) = session(&input, &mut f);
        assert_eq!(
            lines[1..],
            [
                "500 5.5.6 Error: line too long",
                "250 2.0.0 Ok",
                "502 5.5.2 Error: command not recognized",
                "250 2.0.0 Ok"
            ]
        );
    }

    #[test]
    fn oversize_messages_are_refused_after_the_data() {
        let mut f = Fake::default();
        let mut input = String::from("MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n");
        for _ in 0..200 {
            input.push_str(&"y".repeat(99));
            input.push_str("\r\n");
        }
        input.push_str(".\r\nNOOP\r\n");
        let (lines, _) = session(&input, &mut f);
        assert_eq!(
            lines[4],
            "552 5.3.4 Error: message too large: it exceeds the limit of 10000 bytes"
        );
        assert_eq!(lines[5], "250 2.0.0 Ok");
        assert!(f.queued.is_empty());
        // One line with no end at all is bounded the same way.
        let mut f = Fake::default();
        let mut input = b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n".to_vec();
        input.extend(std::iter::repeat_n(b'z', 300_000));
        input.extend_from_slice(b"\r\n.\r\nNOOP\r\n");
        let (lines, _) = session_with(&input, &mut f, 10_000, 5);
        assert!(lines[4].starts_with("552 5.3.4 "), "{}", lines[4]);
        assert_eq!(lines[5], "250 2.0.0 Ok");
    }

    #[test]
    fn a_crlf_split_across_pieces_stays_one_line_end() {
        let mut f = Fake::default();
        let mut input = b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n\r\n".to_vec();
        input.extend(std::iter::repeat_n(b'q', read::DATA_PIECE - 1));
        input.extend_from_slice(b"\r\nend\r\n.\r\n");
        let (lines, _) = session_with(&input, &mut f, 1_000_000, 5);
        assert_eq!(&lines[4][..3], "250");
        let msg = &f.queued[0].2;
        assert!(msg.ends_with(b"qq\r\nend\r\n"));
        assert!(!msg.windows(3).any(|w| w == b"\r\r\n"));
    }

    #[test]
    fn header_errors_and_nul_bytes_get_554_and_the_session_goes_on() {
        let mut f = Fake::default();
        let input = b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nSubject: x\r\nBad Header: y\r\n\r\nb\r\n.\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nS: x\r\n\r\na\0b\r\n.\r\nNOOP\r\n";
        let (lines, _) = session_with(input, &mut f, 10_000, 5);
        assert!(
            lines[4].starts_with("554 5.6.0 Error: malformed header block: line 2:")
                && lines[4].contains("Bad Header"),
            "{}",
            lines[4]
        );
        assert!(
            lines[8].starts_with("554 5.6.0 Error: line 3 "),
            "{}",
            lines[8]
        );
        assert_eq!(lines[9], "250 2.0.0 Ok");
        assert!(f.queued.is_empty());
    }

    #[test]
    fn spool_errors_get_4xx_and_the_session_goes_on() {
        let mut f = Fake::default();
        let io = |kind| io::Error::from(kind);
        f.fail = vec![
            SpoolError::Io {
                path: PathBuf::from("/s"),
                source: io(io::ErrorKind::Other),
            },
            SpoolError::Full {
                path: PathBuf::from("/s"),
                source: io(io::ErrorKind::StorageFull),
            },
        ];
        let msg = "MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n\r\nb\r\n.\r\n";
        let (lines, _) = session(&format!("{msg}{msg}{msg}QUIT\r\n"), &mut f);
        let finals: Vec<&String> = lines.iter().filter(|l| l.starts_with('4')).collect();
        assert!(
            finals[0].starts_with("452 4.3.1 Insufficient system storage: the spool /s is full")
        );
        assert!(finals[1].starts_with("451 4.3.0 Error: queue file write error:"));
        assert_eq!(f.queued.len(), 1, "the third message goes through");
    }

    #[test]
    fn end_of_input_in_data_or_transaction_queues_nothing_and_is_tempfail() {
        let mut f = Fake::default();
        let (_, report) = session(
            "MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nSubject: x\r\n\r\nhalf",
            &mut f,
        );
        assert!(matches!(report.ending, Ending::Abandoned { in_data: true }));
        assert_eq!(report.ending.exit(), Exit::TempFail);
        // A dot without its line ending is not the end of the data.
        let (_, report) = session(
            "MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nS: x\r\n\r\n.",
            &mut f,
        );
        assert!(matches!(report.ending, Ending::Abandoned { in_data: true }));
        let (_, report) = session("MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n", &mut f);
        assert!(matches!(
            report.ending,
            Ending::Abandoned { in_data: false }
        ));
        assert_eq!(report.ending.exit(), Exit::TempFail);
        assert!(f.queued.is_empty());
        // After complete transactions, end of input without QUIT is fine.
        let (_, report) = session(&ONE.replace("QUIT\r\n", "NOOP"), &mut f);
        assert!(matches!(report.ending, Ending::EndOfInput));
        assert_eq!(report.ending.exit(), Exit::Ok);
        assert_eq!(f.queued.len(), 1);
    }

    #[test]
    fn replies_never_carry_client_line_breaks() {
        let mut f = Fake::default();
        let (lines, _) = session("MAIL FROM:<a@b> X=\u{b}250 fake\r\n", &mut f);
        assert_eq!(lines.len(), 2);
        assert!(!lines[1].contains('\u{b}'));
    }

    #[test]
    fn bad_utf8_commands() {
        let mut f = Fake::default();
        let (lines, _) = session_with(b"MAIL FROM:<\xff@x>\r\n", &mut f, 10_000, 5);
        assert_eq!(lines[1], "500 5.5.2 Error: bad UTF-8 syntax");
    }

    #[test]
    fn command_line_options_apply_and_mail_parameters_override_them() {
        let o = opts(&["-bs", "-F", "Web App", "-N", "never", "-R", "full", "-odq"]);
        let c = caller();
        let mut f = Fake::default();
        let settings = Settings {
            domain: "example.com",
            max_message_size: 10_000,
            max_recipients: 5,
        };
        let input = "MAIL FROM:<> RET=HDRS\r\nRCPT TO:<c@d>\r\nDATA\r\nS: s\r\n\r\n.\r\n";
        let mut out = Vec::new();
        Session::new(settings, &o, &c, &mut f).run(input.as_bytes(), &mut out);
        let env = &f.queued[0].1;
        assert_eq!(env.dsn.ret, Some(Ret::Hdrs));
        assert_eq!(env.dsn.notify, Some(Notify::Never));
        assert!(env.queue_only);
        assert!(
            String::from_utf8_lossy(&f.queued[0].2)
                .contains("From: \"Web App\" <www-data@example.com>")
        );
    }

    #[test]
    fn xtext_and_orcpt_parsing() {
        assert!(is_xtext("abc+2Bdef"));
        assert!(!is_xtext("a+2b"));
        assert!(!is_xtext("a+2"));
        assert!(!is_xtext(""));
        assert!(!is_xtext("a b"));
        assert!(is_orcpt("rfc822;a+40b"));
        assert!(!is_orcpt(";a"));
    }
}
