//! Message intake: read the message from stdin (dot rule, line endings, size limit),
//! decide the envelope (sender, `-t` and command-line recipients), complete the
//! headers, and produce the bytes of an incoming file.
//!
//! Trusts nothing: stdin and argv come from any local program.

use std::io::{BufRead, BufReader, Read};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::message::address::{self, Address, AddressError, Sender};
use crate::message::complete::{self, Completion};
use crate::message::header::{self, HeaderError};
use crate::spool::QueueId;
use crate::spool::envelope::{Envelope, EnvelopeError};
use crate::sysexits::{Exit, ExitStatus};

use super::options::Options;

/// Why a message was refused; each maps to one exit status.
#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error(
        "message too large: it exceeds the limit of {limit} bytes (max_message_size in relay365.toml); nothing was queued"
    )]
    TooBig { limit: u64 },
    #[error(
        "line {line} contains a NUL byte, which mail cannot carry; remove it or encode the content (base64)"
    )]
    Nul { line: usize },
    #[error("malformed header block: {0}")]
    Header(#[from] HeaderError),
    #[error("bad address: {0}")]
    Address(#[from] AddressError),
    #[error("no recipients found: {0}")]
    NoRecipients(&'static str),
    #[error("too many recipients ({count}): {source}; split the message")]
    Envelope {
        count: usize,
        #[source]
        source: EnvelopeError,
    },
    #[error("cannot read the message from standard input: {0}")]
    Read(#[from] std::io::Error),
}

impl ExitStatus for IntakeError {
    fn exit(&self) -> Exit {
        match self {
            IntakeError::TooBig { .. }
            | IntakeError::Nul { .. }
            | IntakeError::Header(_)
            | IntakeError::Envelope { .. } => Exit::DataErr,
            IntakeError::Address(_) => Exit::NoUser,
            IntakeError::NoRecipients(_) => Exit::Usage,
            IntakeError::Read(_) => Exit::IoErr,
        }
    }
}

/// Reads a message: LF, CRLF or mixed line endings become CRLF, a missing final
/// newline is added, and without `-i` a line holding a single dot ends the input.
/// Everything else is kept byte for byte. Refuses NUL bytes and more than `max` bytes.
pub fn read_message(input: impl Read, ignore_dots: bool, max: u64) -> Result<Vec<u8>, IntakeError> {
    // Normalised output is never shorter than the raw input, so reading one byte past
    // the limit is enough to know it is exceeded, and bounds memory for a hostile input.
    let mut reader = BufReader::with_capacity(64 * 1024, input.take(max.saturating_add(1)));
    let mut out = Vec::with_capacity(8 * 1024);
    let mut line_no = 0;
    loop {
        // Each line is read straight into `out` and its ending fixed in place: a copy
        // through a line buffer would hold a single 100 MB line twice.
        let start = out.len();
        if reader.read_until(b'\n', &mut out)? == 0 {
            break;
        }
        line_no += 1;
        let mut end = out.len();
        if out[start..end].ends_with(b"\n") {
            end -= 1;
        }
        if out[start..end].ends_with(b"\r") {
            end -= 1;
        }
        let content = &out[start..end];
        if !ignore_dots && content == b"." {
            out.truncate(start);
            return finish(out, max);
        }
        if content.contains(&0) {
            return Err(IntakeError::Nul { line: line_no });
        }
        out.truncate(end);
        out.extend_from_slice(b"\r\n");
        if out.len() as u64 > max {
            return Err(IntakeError::TooBig { limit: max });
        }
    }
    finish(out, max)
}

fn finish(out: Vec<u8>, max: u64) -> Result<Vec<u8>, IntakeError> {
    if out.len() as u64 > max {
        return Err(IntakeError::TooBig { limit: max });
    }
    Ok(out)
}

/// Who is sending, as the system knows them.
#[derive(Debug, Clone)]
pub struct Caller {
    pub uid: u32,
    /// Login name from the passwd entry (or the numeric uid when there is none).
    pub login: String,
    /// The GECOS full name, if any.
    pub full_name: Option<String>,
}

impl Caller {
    /// Looks up the passwd entry of `uid`.
    pub fn lookup(uid: u32) -> Caller {
        match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
            Ok(Some(u)) => {
                let gecos = u.gecos.to_string_lossy().into_owned();
                Caller {
                    uid,
                    full_name: gecos_name(&gecos, &u.name),
                    login: u.name,
                }
            }
            _ => Caller {
                uid,
                login: uid.to_string(),
                full_name: None,
            },
        }
    }
}

/// The full name in a GECOS field: the first comma-separated part, with `&` standing
/// for the capitalised login name (BSD convention).
pub fn gecos_name(gecos: &str, login: &str) -> Option<String> {
    let first = gecos.split(',').next().unwrap_or("").trim();
    if first.is_empty() {
        return None;
    }
    let mut cap = login.to_string();
    if let Some(c) = cap.get(..1) {
        let upper = c.to_ascii_uppercase();
        cap.replace_range(..1, &upper);
    }
    Some(first.replace('&', &cap))
}

/// The settings intake needs from the config.
#[derive(Debug, Clone)]
pub struct IntakeSettings<'a> {
    pub domain: &'a str,
    pub max_message_size: u64,
    /// For a message from the network listener: what its `Received:` header names.
    pub received: Option<Received<'a>>,
}

/// What the listener knows of a network client, for the `Received:` header (Postfix's
/// format) and the envelope. The HELO name is client text already made one-line.
#[derive(Debug, Clone, Copy)]
pub struct Received<'a> {
    pub address: std::net::IpAddr,
    pub helo: Option<&'a str>,
    /// `TLSv1.3 with cipher ...`.
    pub tls: Option<&'a str>,
    pub user: Option<&'a str>,
    /// Recipients of the message: one is named in the header (`for <...>`), as Postfix does.
    pub recipients: usize,
    /// The account the AUTH user is mapped to (recorded in the envelope, not the header).
    pub account: Option<&'a str>,
}

impl Received<'_> {
    /// The header value, folded like Postfix's:
    /// `from printer ([192.168.10.5])\r\n\t(using TLSv1.3 ...)\r\n\t(Authenticated sender: bob)\r\n\tby example.com (relay365) with ESMTPSA id ...\r\n\tfor <a@b>; date`.
    pub fn header_value(
        &self,
        domain: &str,
        id: &QueueId,
        rcpt: Option<&Address>,
        now: SystemTime,
    ) -> String {
        let addr = match self.address {
            std::net::IpAddr::V4(a) => a.to_string(),
            std::net::IpAddr::V6(a) => format!("IPv6:{a}"),
        };
        // SECURITY: client text (HELO, user) reaches a header: controls become spaces.
        let helo = crate::message::text::one_line_max(self.helo.unwrap_or("unknown"), 255);
        let mut v = format!("from {helo} ([{addr}])");
        if let Some(tls) = self.tls {
            v.push_str(&format!("\r\n\t(using {tls})"));
        }
        if let Some(user) = self.user {
            let user = crate::message::text::one_line_max(user, 64);
            v.push_str(&format!("\r\n\t(Authenticated sender: {user})"));
        }
        let proto = match (self.tls.is_some(), self.user.is_some()) {
            (false, false) => "ESMTP",
            (true, false) => "ESMTPS",
            (false, true) => "ESMTPA",
            (true, true) => "ESMTPSA",
        };
        v.push_str(&format!(
            "\r\n\tby {domain} (relay365) with {proto} id {id}"
        ));
        if let (1, Some(r)) = (self.recipients, rcpt) {
            v.push_str(&format!("\r\n\tfor <{r}>"));
        }
        v.push_str(&format!(";\r\n\t{}", complete::rfc5322_date(now)));
        v
    }
}

/// A message ready for the spool.
#[derive(Debug)]
pub struct Submission {
    pub envelope: Envelope,
    pub message: Vec<u8>,
}

impl Submission {
    pub fn id(&self) -> &QueueId {
        &self.envelope.id
    }
}

/// The envelope sender: `-f`/`-r` when given, else the caller's login; bare names are
/// qualified with the configured domain.
pub fn envelope_sender(
    opts: &Options,
    caller: &Caller,
    domain: &str,
) -> Result<Sender, IntakeError> {
    Ok(match &opts.sender {
        Some(s) => match Sender::parse(s)? {
            Sender::Address(a) => Sender::Address(a.qualify(domain)?),
            Sender::Null => Sender::Null,
        },
        None => Sender::Address(Address::parse(&caller.login)?.qualify(domain)?),
    })
}

/// The command-line recipients, qualified, in order.
pub fn argument_recipients(opts: &Options, domain: &str) -> Result<Vec<Address>, IntakeError> {
    let mut out = Vec::new();
    for arg in &opts.recipients {
        for a in address::parse_argument(arg)? {
            out.push(a.qualify(domain)?);
        }
    }
    Ok(out)
}

/// The `Received:` value of a local submission, as Postfix's pickup writes it:
/// `by <host> (relay365, from userid <uid>)` then `id <queue id>; <date>`, folded.
pub fn local_received_value(domain: &str, uid: u32, id: &QueueId, now: SystemTime) -> String {
    format!(
        "by {domain} (relay365, from userid {uid})\r\n\tid {id}; {}",
        complete::rfc5322_date(now)
    )
}

/// Turns a raw message and the command line into a submission.
pub fn build(
    opts: &Options,
    settings: &IntakeSettings,
    caller: &Caller,
    raw: &[u8],
    now: SystemTime,
    id: &QueueId,
) -> Result<Submission, IntakeError> {
    let mut msg = header::parse(raw)?;
    let sender = envelope_sender(opts, caller, settings.domain)?;

    let mut recipients = Vec::new();
    if opts.extract {
        for a in complete::header_recipients(&msg)? {
            recipients.push(a.qualify(settings.domain)?);
        }
    }
    // Postfix >= 2.1, dma, msmtp and nullmailer add command-line recipients to -t ones.
    recipients.extend(argument_recipients(opts, settings.domain)?);
    dedupe(&mut recipients);
    if recipients.is_empty() {
        return Err(IntakeError::NoRecipients(if opts.extract {
            "the To, Cc and Bcc headers name nobody and no recipient was given on the command line"
        } else {
            "give recipients on the command line, or use -t to take them from the headers"
        }));
    }

    let login_address = Address::parse(&caller.login)?.qualify(settings.domain)?;
    let from = match &sender {
        Sender::Address(a) => a.clone(),
        Sender::Null => login_address,
    };
    let full_name = opts.full_name.clone().or_else(|| caller.full_name.clone());
    complete::complete(
        &mut msg,
        &Completion {
            now,
            queue_id: id.as_str(),
            domain: settings.domain,
            from: &from,
            full_name: full_name.as_deref(),
        },
    );
    // Every message says who queued it: a network client (the listener) or a local
    // uid. `-f root` or `-F CronDaemon` from any uid stays allowed, but this header,
    // which the caller cannot choose, shows the truth (issue 18 item 6).
    let value = match &settings.received {
        Some(r) => r.header_value(settings.domain, id, recipients.first(), now),
        None => local_received_value(settings.domain, caller.uid, id, now),
    };
    msg.headers
        .insert(0, crate::message::header::Header::new("Received", &value));
    let message = msg.to_bytes();
    if message.len() as u64 > settings.max_message_size {
        return Err(IntakeError::TooBig {
            limit: settings.max_message_size,
        });
    }
    let envelope = Envelope {
        id: id.clone(),
        sender,
        recipients,
        uid: caller.uid,
        arrival_us: now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64),
        size: message.len() as u64,
        dsn: opts.dsn.clone(),
        queue_only: opts.queue_only,
        client: settings.received.map(|r| r.address),
        sasl_username: settings.received.and_then(|r| r.user).map(str::to_string),
        account: settings
            .received
            .and_then(|r| r.account)
            .map(str::to_string),
    };
    // SECURITY: the pickup quarantines an envelope line over its bound without a
    // bounce; whatever is accepted here must be deliverable or bounced.
    envelope
        .check_line()
        .map_err(|source| IntakeError::Envelope {
            count: envelope.recipients.len(),
            source,
        })?;
    Ok(Submission { envelope, message })
}

/// Keeps the first of each recipient, comparing case-insensitively as Postfix's
/// duplicate filter does for the domain (and, in practice, Exchange for the local part).
fn dedupe(list: &mut Vec<Address>) {
    let mut seen = std::collections::HashSet::new();
    list.retain(|a| seen.insert(a.as_str().to_ascii_lowercase()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sendmail::options;
    use std::ffi::OsString;

    fn read(input: &[u8], ignore_dots: bool) -> Result<Vec<u8>, IntakeError> {
        read_message(input, ignore_dots, 1_000_000)
    }

    #[test]
    fn line_endings_are_normalised() {
        assert_eq!(
            read(b"A: b\n\nx\r\ny", true).unwrap(),
            b"A: b\r\n\r\nx\r\ny\r\n"
        );
        assert_eq!(read(b"", true).unwrap(), b"");
        assert_eq!(read(b"bare\rcr\n", true).unwrap(), b"bare\rcr\r\n");
    }

    #[test]
    fn dot_rule() {
        assert_eq!(
            read(b"A: b\n\nx\n.\nafter\n", false).unwrap(),
            b"A: b\r\n\r\nx\r\n"
        );
        assert_eq!(
            read(b"A: b\n\nx\r\n.\r\nafter\n", false).unwrap(),
            b"A: b\r\n\r\nx\r\n"
        );
        assert_eq!(
            read(b"A: b\n\nx\n.\nafter\n", true).unwrap(),
            b"A: b\r\n\r\nx\r\n.\r\nafter\r\n"
        );
        assert_eq!(read(b"A: b\n\n..\n", false).unwrap(), b"A: b\r\n\r\n..\r\n");
    }

    #[test]
    fn nul_and_size() {
        assert!(matches!(
            read(b"A: b\n\nx\0y\n", true),
            Err(IntakeError::Nul { line: 3 })
        ));
        assert!(matches!(
            read_message(&b"0123456789"[..], true, 5),
            Err(IntakeError::TooBig { limit: 5 })
        ));
        // 5 bytes of LF text become 6 with CRLF.
        assert!(matches!(
            read_message(&b"abcd\n"[..], true, 5),
            Err(IntakeError::TooBig { .. })
        ));
        assert!(read_message(&b"abc\n"[..], true, 5).is_ok());
    }

    #[test]
    fn gecos() {
        assert_eq!(
            gecos_name("Jane Doe,Room 1,,", "jane"),
            Some("Jane Doe".into())
        );
        assert_eq!(gecos_name("& User", "bob"), Some("Bob User".into()));
        assert_eq!(gecos_name(",,,", "x"), None);
    }

    fn submit(args: &[&str], raw: &[u8]) -> Result<Submission, IntakeError> {
        let a: Vec<OsString> = args.iter().map(OsString::from).collect();
        let opts = options::parse("sendmail", &a).unwrap();
        let caller = Caller {
            uid: 33,
            login: "www-data".into(),
            full_name: Some("www-data".into()),
        };
        let settings = IntakeSettings {
            received: None,
            domain: "example.com",
            max_message_size: 1_000_000,
        };
        let now = UNIX_EPOCH + std::time::Duration::from_secs(1_795_734_105);
        build(&opts, &settings, &caller, raw, now, &QueueId::generate(now))
    }

    #[test]
    fn a_local_submission_says_its_uid_in_received_whatever_f_and_capital_f_claim() {
        let sub = submit(
            &["-f", "root", "-F", "CronDaemon", "x@example.org"],
            b"Subject: s\n\nbody\n",
        )
        .unwrap();
        let text = String::from_utf8(sub.message).unwrap();
        let first = text.lines().next().unwrap();
        assert_eq!(
            first, "Received: by example.com (relay365, from userid 33)",
            "{text}"
        );
        let id = sub.envelope.id.as_str();
        assert!(
            text.contains(&format!("\r\n\tid {id}; ")),
            "folded, with the queue id and a date: {text}"
        );
        assert!(
            text.contains("From: \"CronDaemon\" <root@example.com>"),
            "{text}"
        );
        assert_eq!(text.matches("Received:").count(), 1, "{text}");
        assert_eq!(sub.envelope.uid, 33);
    }

    /// xorshift64*: a reproducible stream for the generated cases below.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// A random valid address: plain, with dots and plus, or quoted with characters
    /// JSON must escape (so the line is longer than the sum of the addresses).
    fn address(rng: &mut Rng, i: usize) -> String {
        let len = 1 + rng.below(60) as usize;
        let local: String = (0..len)
            .map(|k| (b'a' + ((k as u64 + rng.below(26)) % 26) as u8) as char)
            .collect();
        match rng.below(4) {
            0 => format!("{local}{i}@example.org"),
            1 => format!("{local}.x+{i}@sub{}.example.net", rng.below(1000)),
            2 => format!("\"{local} \\\"{i}\"@example.org"),
            _ => format!("{local}{i}"),
        }
    }

    #[test]
    fn whatever_intake_accepts_the_pickup_reads() {
        // Generated envelopes of every size, many near the 4 MiB line bound: what build
        // accepts must read back (from_file_bytes) within the pickup's file bound with
        // the same recipients; what it refuses as too many recipients the pickup would
        // have quarantined.
        let max = 1_000_000;
        let mut rng = Rng(0x5eed_1234_abcd_ef01);
        let (mut accepted, mut refused) = (0, 0);
        for case in 0..120 {
            let near = case % 30 == 0;
            let target = if near {
                crate::spool::envelope::MAX_ENVELOPE_LINE - 30_000 + rng.below(60_000) as usize
            } else {
                rng.below(20_000) as usize
            };
            let mut opts = options::parse("sendmail", &[OsString::from("-i")]).unwrap();
            let mut total = 0;
            let mut i = 0;
            while total <= target {
                let a = address(&mut rng, i);
                if Address::parse(&a).is_err() {
                    continue;
                }
                total += a.len() + 3;
                opts.recipients.push(a);
                i += 1;
            }
            let caller = Caller {
                uid: 33,
                login: "www-data".into(),
                full_name: None,
            };
            let settings = IntakeSettings {
                domain: "example.com",
                max_message_size: max,
                received: None,
            };
            let now = UNIX_EPOCH + std::time::Duration::from_secs(1_795_734_105);
            let id = QueueId::generate(now);
            match build(
                &opts,
                &settings,
                &caller,
                b"Subject: s\r\n\r\nb\r\n",
                now,
                &id,
            ) {
                Ok(sub) => {
                    accepted += 1;
                    let bytes = sub.envelope.to_file_bytes(&sub.message);
                    assert!(bytes.len() as u64 <= crate::spool::envelope::max_file_len(max));
                    let (env, msg) = Envelope::from_file_bytes(&bytes)
                        .unwrap_or_else(|e| panic!("case {case}: accepted, then {e}"));
                    assert_eq!(env, sub.envelope, "case {case}");
                    assert_eq!(msg, sub.message);
                }
                Err(e @ IntakeError::Envelope { .. }) => {
                    refused += 1;
                    assert!(near, "case {case}: {e}");
                    assert!(e.to_string().contains("split the message"), "{e}");
                    assert_eq!(e.exit(), Exit::DataErr);
                    // The same envelope, written anyway, is what the pickup quarantines.
                    let mut env = Envelope {
                        id: id.clone(),
                        sender: Sender::Null,
                        recipients: Vec::new(),
                        uid: 33,
                        arrival_us: 0,
                        size: 0,
                        dsn: Default::default(),
                        queue_only: false,
                        client: None,
                        sasl_username: None,
                        account: None,
                    };
                    for r in &opts.recipients {
                        env.recipients
                            .push(Address::parse(r).unwrap().qualify("example.com").unwrap());
                    }
                    assert!(Envelope::from_file_bytes(&env.to_file_bytes(b"")).is_err());
                }
                Err(e) => panic!("case {case}: {e}"),
            }
        }
        assert!(
            accepted > 100 && refused > 0,
            "{accepted} accepted, {refused} refused"
        );
    }

    #[test]
    fn recipient_matrix() {
        let with_hdr = b"To: h@x.org\r\n\r\nb\r\n";
        let no_hdr = b"Subject: s\r\n\r\nb\r\n";
        let r = |s: &Submission| s.envelope.recipients.clone();
        // -t, header and argument: union.
        assert_eq!(
            r(&submit(&["-t", "a@x.org"], with_hdr).unwrap()),
            ["h@x.org", "a@x.org"]
        );
        // -t, header only.
        assert_eq!(r(&submit(&["-t"], with_hdr).unwrap()), ["h@x.org"]);
        // -t, argument only.
        assert_eq!(r(&submit(&["-t", "a@x.org"], no_hdr).unwrap()), ["a@x.org"]);
        // -t, neither.
        assert!(matches!(
            submit(&["-t"], no_hdr),
            Err(IntakeError::NoRecipients(_))
        ));
        // no -t: the command line alone.
        assert_eq!(r(&submit(&["a@x.org"], with_hdr).unwrap()), ["a@x.org"]);
        assert_eq!(r(&submit(&["a@x.org"], no_hdr).unwrap()), ["a@x.org"]);
        assert!(matches!(
            submit(&[], with_hdr),
            Err(IntakeError::NoRecipients(_))
        ));
        assert!(matches!(
            submit(&[], no_hdr),
            Err(IntakeError::NoRecipients(_))
        ));
    }

    #[test]
    fn qualification_and_dedupe() {
        let s = submit(&["-t", "root", "ROOT@example.com"], b"To: root\r\n\r\n").unwrap();
        assert_eq!(s.envelope.recipients, ["root@example.com"]);
        assert_eq!(s.envelope.sender, "www-data@example.com");
    }

    #[test]
    fn bcc_only_with_t_keeps_recipient_in_envelope_only() {
        let s = submit(&["-t"], b"Bcc: hidden@x.org\r\nSubject: s\r\n\r\nb\r\n").unwrap();
        assert_eq!(s.envelope.recipients, ["hidden@x.org"]);
        assert!(!String::from_utf8_lossy(&s.message).contains("hidden"));
    }

    #[test]
    fn null_sender_still_gets_a_from() {
        let s = submit(&["-f", "<>", "a@x.org"], b"Subject: s\r\n\r\n").unwrap();
        assert_eq!(s.envelope.sender, "");
        assert!(
            String::from_utf8_lossy(&s.message)
                .contains("From: \"www-data\" <www-data@example.com>")
        );
    }

    #[test]
    fn control_characters_in_addresses_are_refused() {
        assert!(matches!(
            submit(&["-f", "a@x\r\nRCPT TO:<y@z>", "a@x.org"], b"S: s\r\n\r\n"),
            Err(IntakeError::Address(_))
        ));
        assert!(matches!(
            submit(&["a@x.org\nb"], b"S: s\r\n\r\n"),
            Err(IntakeError::Address(_))
        ));
    }

    #[test]
    fn a_name_too_long_once_qualified_is_refused_at_intake() {
        // Found by fuzzing (fuzz/ intake): sendmail accepted a 315-character bare name,
        // and the daemon refused the incoming file whose qualified address was too long.
        let long = "a".repeat(315);
        for (args, raw) in [
            (vec!["-t"], format!("To: {long}\r\n\r\n")),
            (vec![long.as_str()], "S: s\r\n\r\n".to_string()),
            (
                vec!["-f", long.as_str(), "a@x.org"],
                "S: s\r\n\r\n".to_string(),
            ),
        ] {
            let e = submit(&args, raw.as_bytes()).unwrap_err();
            assert!(
                matches!(e, IntakeError::Address(AddressError::TooLong(_))),
                "{e:?}"
            );
        }
    }
}
