//! Bounces: builds RFC 3464 delivery status notifications (multipart/report;
//! report-type=delivery-status) for failed, delayed or delivered recipients, in the spirit
//! of Postfix's bounce daemon.
//!
//! Trust: the envelope, queue id and host name come from the daemon's own queue and config;
//! the diagnostic text comes from the remote server and the original message from a local
//! user, so every header field value is flattened to one line (no CR, LF or controls) and the
//! original is attached with its line endings normalised and a declared transfer encoding
//! that matches its bytes. The DSN is sent with a null envelope sender (`MAIL FROM:<>`), so it
//! can never bounce in turn; callers must check [`is_bounce_sender`] before building one.

pub mod queue;

use crate::message::complete::{compact_timestamp, rfc5322_date};
use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Largest original returned in full; beyond it only the headers go back (Postfix's
/// `bounce_size_limit` default), so a bounce never doubles a 150 MB message.
pub const DEFAULT_RETURN_LIMIT: usize = 50_000;

/// Longest line a message may carry (RFC 5322 §2.1.1), CRLF excluded.
const MAX_LINE: usize = 998;
/// Where header fields are folded, when whitespace allows.
const FOLD_AT: usize = 76;
/// Width of the human-readable part.
const WRAP_AT: usize = 72;

/// Whether an envelope sender is the null sender of a bounce. Mail from the null sender
/// must never be bounced: a DSN goes out with `MAIL FROM:<>` and a failure of that DSN is
/// only logged, which is what stops bounce loops between two mail systems.
pub fn is_bounce_sender(sender: &str) -> bool {
    matches!(sender.trim(), "" | "<>")
}

/// The RFC 3464 `Action:` of one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DsnAction {
    Failed,
    Delayed,
    Delivered,
}

impl DsnAction {
    fn as_str(self) -> &'static str {
        match self {
            DsnAction::Failed => "failed",
            DsnAction::Delayed => "delayed",
            DsnAction::Delivered => "delivered",
        }
    }

    /// The status to report when the caller's is missing or malformed.
    fn default_status(self) -> &'static str {
        match self {
            DsnAction::Failed => "5.0.0",
            DsnAction::Delayed => "4.0.0",
            DsnAction::Delivered => "2.0.0",
        }
    }

    /// Status classes that fit the action; a message that expired after temporary
    /// errors fails with its last 4.x.y status, as Postfix reports it.
    fn fits(self, class: u8) -> bool {
        match self {
            DsnAction::Failed => class == 5 || class == 4,
            DsnAction::Delayed => class == 4,
            DsnAction::Delivered => class == 2,
        }
    }
}

/// What of the original goes back (the ESMTP `RET` parameter, or sendmail's `-R`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Return {
    Full,
    Headers,
}

/// One recipient's line in the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DsnRecipient {
    /// The address relay365 tried, e.g. `bob@example.org`.
    pub final_recipient: String,
    /// The ORCPT value, xtext-decoded, with its type (`rfc822;bob@example.org`); a value
    /// without a type gets `rfc822;`.
    pub original_recipient: Option<String>,
    pub action: DsnAction,
    /// The RFC 3463 status, e.g. `5.1.1` (`Reply::dsn_status`).
    pub status: String,
    /// The `Diagnostic-Code:` value, e.g. `smtp; 550 5.1.1 ...` (`Reply::diagnostic_code`);
    /// a bare reply gets `smtp; ` put in front.
    pub diagnostic: Option<String>,
    /// The server that answered, e.g. `smtp.office365.com`.
    pub remote_mta: Option<String>,
    pub last_attempt: Option<SystemTime>,
    /// For delayed recipients: when relay365 gives up.
    pub will_retry_until: Option<SystemTime>,
    /// Plain words for the sender (e.g. a classify `Verdict::reason`), shown in the first part.
    pub reason: Option<String>,
}

/// Everything a DSN says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DsnInput<'a> {
    /// This host's name, for `Reporting-MTA:` and the text.
    pub reporting_mta: String,
    /// The DSN's `From:`, e.g. `MAILER-DAEMON@host.example.org`.
    pub from: String,
    /// The original envelope sender, the DSN's `To:`; never the null sender.
    pub to: String,
    /// The ENVID (sendmail `-V`, ESMTP `ENVID=`), xtext-decoded.
    pub envid: Option<String>,
    pub arrival: SystemTime,
    pub queue_id: String,
    pub recipients: Vec<DsnRecipient>,
    /// The queued message as submitted, LF or CRLF line endings.
    pub original: &'a [u8],
    pub ret: Return,
    /// Originals larger than this come back as headers only ([`DEFAULT_RETURN_LIMIT`]).
    pub return_limit: usize,
    /// The time the DSN is made, for `Date:` and `Message-ID:`.
    pub now: SystemTime,
}

/// Which kind of report, from the recipients' actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bounce,
    Delay,
    Success,
}

impl Kind {
    fn of(recipients: &[DsnRecipient]) -> Kind {
        if recipients.iter().any(|r| r.action == DsnAction::Failed) {
            Kind::Bounce
        } else if recipients.iter().any(|r| r.action == DsnAction::Delayed) {
            Kind::Delay
        } else {
            Kind::Success
        }
    }

    fn subject(self) -> &'static str {
        match self {
            Kind::Bounce => "Undelivered Mail Returned to Sender",
            Kind::Delay => "Delayed Mail (still being retried)",
            Kind::Success => "Successful Mail Delivery Report",
        }
    }
}

/// The third part: what of the original is attached and why.
struct Returned {
    content_type: &'static str,
    body: Vec<u8>,
    eight_bit: bool,
    note: Option<&'static str>,
}

/// Builds the complete DSN message, CRLF line endings throughout, ready to queue with a
/// null envelope sender to `input.to`.
pub fn build_dsn(input: &DsnInput<'_>) -> Vec<u8> {
    let kind = Kind::of(&input.recipients);
    let host = hostname(&input.reporting_mta);
    let returned = returned_part(input, kind);
    let human = human_part(input, kind, &host, &returned);
    let human_8bit = !human.is_ascii();
    let (status, status_8bit) = status_part(input, &host);
    let boundary = boundary(input, &host, &[human.as_bytes(), &status, &returned.body]);
    let any_8bit = human_8bit || status_8bit || returned.eight_bit;

    let mut out = Vec::with_capacity(returned.body.len() + human.len() + status.len() + 2048);
    let mut head = String::new();
    field(&mut head, "Date", &rfc5322_date(input.now));
    field(
        &mut head,
        "From",
        &format!("Mail Delivery System <{}>", one_line(&input.from)),
    );
    field(&mut head, "To", &one_line(&input.to));
    field(&mut head, "Subject", kind.subject());
    field(
        &mut head,
        "Message-ID",
        &message_id(input.now, &input.queue_id, &host),
    );
    field(&mut head, "Auto-Submitted", "auto-replied");
    field(&mut head, "MIME-Version", "1.0");
    field(
        &mut head,
        "Content-Type",
        &format!("multipart/report; report-type=delivery-status; boundary=\"{boundary}\""),
    );
    // A multipart's encoding must be at least as wide as its widest part (RFC 2045 §6.4).
    field(
        &mut head,
        "Content-Transfer-Encoding",
        if any_8bit { "8bit" } else { "7bit" },
    );
    head.push_str("\r\n");
    head.push_str("This is a MIME-encapsulated message.\r\n\r\n");

    head.push_str(&format!("--{boundary}\r\n"));
    field(&mut head, "Content-Description", "Notification");
    field(&mut head, "Content-Type", "text/plain; charset=utf-8");
    field(
        &mut head,
        "Content-Transfer-Encoding",
        if human_8bit { "8bit" } else { "7bit" },
    );
    head.push_str("\r\n");
    head.push_str(&human);
    head.push_str(&format!("\r\n--{boundary}\r\n"));
    field(&mut head, "Content-Description", "Delivery report");
    // Non-ASCII addresses need RFC 6533's UTF-8 report type.
    field(
        &mut head,
        "Content-Type",
        if status_8bit {
            "message/global-delivery-status"
        } else {
            "message/delivery-status"
        },
    );
    field(
        &mut head,
        "Content-Transfer-Encoding",
        if status_8bit { "8bit" } else { "7bit" },
    );
    head.push_str("\r\n");
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(&status);

    let mut third = format!("\r\n--{boundary}\r\n");
    field(
        &mut third,
        "Content-Description",
        if returned.content_type == "message/rfc822" {
            "Undelivered Message"
        } else {
            "Undelivered Message Headers"
        },
    );
    field(&mut third, "Content-Type", returned.content_type);
    // message/rfc822 allows only 7bit, 8bit or binary (RFC 2046 §5.2.1): the original is
    // attached as-is and the encoding says which it is.
    field(
        &mut third,
        "Content-Transfer-Encoding",
        if returned.eight_bit { "8bit" } else { "7bit" },
    );
    third.push_str("\r\n");
    out.extend_from_slice(third.as_bytes());
    out.extend_from_slice(&returned.body);
    if !returned.body.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

/// The human-readable first part, already CRLF-terminated.
fn human_part(input: &DsnInput<'_>, kind: Kind, host: &str, returned: &Returned) -> String {
    let full = returned.content_type == "message/rfc822";
    let note = returned.note;
    let mut t = String::new();
    let para = |t: &mut String, text: &str| {
        wrap_into(t, text, "");
        t.push_str("\r\n");
    };
    para(&mut t, &format!("This is the mail system at host {host}."));
    let attached = match kind {
        Kind::Bounce if full => {
            "I'm sorry to have to inform you that your message could not be delivered to one or \
             more recipients. The reasons follow; your message is attached below."
        }
        Kind::Bounce => {
            "I'm sorry to have to inform you that your message could not be delivered to one or \
             more recipients. The reasons follow; your message's headers are attached below."
        }
        Kind::Delay => {
            "This is a warning only; you do not need to resend your message. Your \
                        message could not yet be delivered to one or more recipients. The mail \
                        system keeps trying; the reasons so far follow."
        }
        Kind::Success => "Your message was successfully delivered to the recipients listed below.",
    };
    para(&mut t, attached);
    if let Some(note) = note {
        para(&mut t, note);
    }
    if kind == Kind::Bounce {
        para(
            &mut t,
            "For further assistance, please send mail to postmaster. If you do so, please \
             include this problem report.",
        );
    }
    t.push_str("                   The mail system\r\n\r\n");
    for r in &input.recipients {
        let mut line = format!("<{}>: ", one_line(&r.final_recipient));
        match (&r.reason, &r.diagnostic) {
            // A classify reason often quotes the reply already; say it once.
            (Some(reason), Some(diag))
                if one_line(reason).contains(strip_type(&one_line(diag))) =>
            {
                line.push_str(&one_line(reason));
            }
            (Some(reason), Some(diag)) => {
                let _ = write!(
                    line,
                    "{} (the server said: {})",
                    one_line(reason),
                    strip_type(&one_line(diag))
                );
            }
            (Some(reason), None) => line.push_str(&one_line(reason)),
            (None, Some(diag)) => line.push_str(strip_type(&one_line(diag))),
            (None, None) => line.push_str(match r.action {
                DsnAction::Failed => "delivery failed",
                DsnAction::Delayed => "delivery delayed",
                DsnAction::Delivered => "delivered",
            }),
        }
        if let (DsnAction::Delayed, Some(until)) = (r.action, r.will_retry_until) {
            let _ = write!(line, "; retried until {}", rfc5322_date(until));
        }
        wrap_into(&mut t, &line, "    ");
        t.push_str("\r\n");
    }
    t
}

/// The message/delivery-status body and whether it holds non-ASCII.
fn status_part(input: &DsnInput<'_>, host: &str) -> (Vec<u8>, bool) {
    let mut s = String::new();
    field(&mut s, "Reporting-MTA", &format!("dns; {host}"));
    field(&mut s, "X-Relay365-Queue-ID", &one_line(&input.queue_id));
    field(
        &mut s,
        "X-Relay365-Sender",
        &format!("rfc822; {}", one_line(&input.to)),
    );
    if let Some(envid) = &input.envid {
        field(&mut s, "Original-Envelope-Id", &one_line(envid));
    }
    field(&mut s, "Arrival-Date", &rfc5322_date(input.arrival));
    for r in &input.recipients {
        s.push_str("\r\n");
        field(
            &mut s,
            "Final-Recipient",
            &format!("rfc822; {}", one_line(&r.final_recipient)),
        );
        if let Some(orcpt) = &r.original_recipient {
            let orcpt = one_line(orcpt);
            let value = if has_type(&orcpt) {
                orcpt
            } else {
                format!("rfc822; {orcpt}")
            };
            field(&mut s, "Original-Recipient", &value);
        }
        field(&mut s, "Action", r.action.as_str());
        field(&mut s, "Status", &status_for(r));
        if let Some(mta) = &r.remote_mta {
            field(&mut s, "Remote-MTA", &format!("dns; {}", one_line(mta)));
        }
        if let Some(diag) = &r.diagnostic {
            let diag = one_line(diag);
            let value = if has_type(&diag) {
                diag
            } else {
                format!("smtp; {diag}")
            };
            field(&mut s, "Diagnostic-Code", &value);
        }
        if let Some(at) = r.last_attempt {
            field(&mut s, "Last-Attempt-Date", &rfc5322_date(at));
        }
        if let (DsnAction::Delayed, Some(until)) = (r.action, r.will_retry_until) {
            field(&mut s, "Will-Retry-Until", &rfc5322_date(until));
        }
    }
    let eight_bit = !s.is_ascii();
    (s.into_bytes(), eight_bit)
}

/// The status if well formed and fitting the action, else the action's default.
fn status_for(r: &DsnRecipient) -> String {
    let s = r.status.trim();
    let mut parts = s.split('.');
    let ok = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(c), Some(sub), Some(d), None) => {
            let num = |p: &str, max: usize| {
                !p.is_empty() && p.len() <= max && p.bytes().all(|b| b.is_ascii_digit())
            };
            num(c, 1) && num(sub, 3) && num(d, 3) && c.parse().is_ok_and(|c| r.action.fits(c))
        }
        _ => false,
    };
    if ok {
        s.to_owned()
    } else {
        r.action.default_status().to_owned()
    }
}

/// Decides what of the original goes back, normalised to CRLF.
fn returned_part(input: &DsnInput<'_>, kind: Kind) -> Returned {
    let message = crlf(input.original);
    let header_end = header_end(&message);
    // RET only governs failure reports (RFC 3461 §4.3); warnings carry the headers only.
    let want_full = kind == Kind::Bounce && input.ret == Return::Full;
    let too_big = message.len() > input.return_limit;
    // SECURITY: NUL bytes and over-long lines cannot travel as 8bit; never send them as-is.
    let unsafe_body = !is_8bit_clean(&message);
    if want_full && !too_big && !unsafe_body {
        let eight_bit = !message.is_ascii();
        return Returned {
            content_type: "message/rfc822",
            body: message,
            eight_bit,
            note: None,
        };
    }
    let note = if !want_full {
        None
    } else if too_big {
        Some("Your message was too large to return in full; only its headers are attached.")
    } else {
        Some("Your message could not be attached safely; only its headers are attached.")
    };
    let mut headers = message[..header_end].to_vec();
    // SECURITY: headers alone are held to the same bounds as a full return.
    headers.retain(|&b| b != 0);
    if headers.len() > input.return_limit {
        let cut = headers[..input.return_limit]
            .windows(2)
            .rposition(|w| w == b"\r\n")
            .map_or(0, |p| p + 2);
        headers.truncate(cut);
    }
    let headers = split_long_lines(&headers);
    let eight_bit = !headers.is_ascii();
    Returned {
        content_type: "text/rfc822-headers",
        body: headers,
        eight_bit,
        note,
    }
}

/// Rewrites LF, CR and CRLF line ends all to CRLF, so the DSN has only CRLF.
fn crlf(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 32);
    let mut i = 0;
    while i < data.len() {
        match data[i] {
            b'\r' => {
                out.extend_from_slice(b"\r\n");
                if data.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
            }
            b'\n' => out.extend_from_slice(b"\r\n"),
            b => out.push(b),
        }
        i += 1;
    }
    out
}

/// Length of the header block including its terminating blank line, or all of it.
fn header_end(message: &[u8]) -> usize {
    if message.starts_with(b"\r\n") {
        return 2;
    }
    message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(message.len(), |p| p + 4)
}

/// No NUL and no line longer than [`MAX_LINE`] (RFC 2045 §2.8 "8bit data").
fn is_8bit_clean(crlf_data: &[u8]) -> bool {
    !crlf_data.contains(&0)
        && crlf_data
            .split(|&b| b == b'\n')
            .all(|line| line.len() <= MAX_LINE + 1)
}

/// Breaks lines over [`MAX_LINE`] with a folding space, for returned headers.
fn split_long_lines(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    for (i, line) in data.split(|&b| b == b'\n').enumerate() {
        if i > 0 {
            out.push(b'\n');
        }
        let mut rest = line;
        while rest.len() > MAX_LINE + 1 {
            out.extend_from_slice(&rest[..MAX_LINE - 1]);
            out.extend_from_slice(b"\r\n ");
            rest = &rest[MAX_LINE - 1..];
        }
        out.extend_from_slice(rest);
    }
    out
}

/// A boundary that appears in none of the parts.
fn boundary(input: &DsnInput<'_>, host: &str, parts: &[&[u8]]) -> String {
    let secs = input
        .now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let base = format!("{}.{secs}/{host}", token(&input.queue_id));
    let mut candidate = base.clone();
    let mut n = 0u32;
    // SECURITY: the original is user data; a boundary it contains would let it forge parts.
    while parts.iter().any(|p| {
        p.windows(candidate.len())
            .any(|w| w == candidate.as_bytes())
    }) {
        n += 1;
        candidate = format!("{base}/{n}");
    }
    candidate
}

/// `<20251123111220.123456789.QUEUEID@host>`.
fn message_id(now: SystemTime, queue_id: &str, host: &str) -> String {
    let d = now.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    format!(
        "<{}.{:09}.{}@{host}>",
        compact_timestamp(now),
        d.subsec_nanos(),
        token(queue_id)
    )
}

/// The host name reduced to DNS characters, for fields and Message-ID.
fn hostname(name: &str) -> String {
    // SECURITY: the name lands in Message-ID and the boundary; only DNS characters pass.
    let h: String = name
        .trim()
        .trim_end_matches('.')
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        .collect();
    if h.is_empty() {
        "localhost".to_owned()
    } else {
        h
    }
}

/// A queue id reduced to letters and digits, for Message-ID and the boundary.
fn token(s: &str) -> String {
    let t: String = s.chars().filter(char::is_ascii_alphanumeric).collect();
    if t.is_empty() { "dsn".to_owned() } else { t }
}

/// One line of text: controls become spaces.
fn one_line(s: &str) -> String {
    // SECURITY: no CR/LF may reach a header field: that would be header injection.
    crate::message::text::one_line(s).trim().to_owned()
}

/// Whether a DSN value starts with a `type;` such as `smtp;` or `rfc822;`.
fn has_type(value: &str) -> bool {
    value.split_once(';').is_some_and(|(t, _)| {
        !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    })
}

/// The value without its `type;` prefix, for the human text.
fn strip_type(value: &str) -> &str {
    if has_type(value) {
        value.split_once(';').map_or(value, |(_, v)| v.trim_start())
    } else {
        value
    }
}

/// Appends `Name: value` CRLF, folded at whitespace near [`FOLD_AT`] columns; words too
/// long for a line are cut so no line passes [`MAX_LINE`].
fn field(out: &mut String, name: &str, value: &str) {
    out.push_str(name);
    out.push(':');
    let mut col = name.len() + 1;
    for word in value.split(' ').filter(|w| !w.is_empty()) {
        let word = cut(word, MAX_LINE - 2);
        if col + 1 + word.len() > FOLD_AT && col > name.len() + 1 {
            out.push_str("\r\n");
            col = 0;
        }
        out.push(' ');
        out.push_str(word);
        col += 1 + word.len();
    }
    out.push_str("\r\n");
}

/// Appends `text` word-wrapped at [`WRAP_AT`] with CRLF, continuation lines indented.
fn wrap_into(out: &mut String, text: &str, indent: &str) {
    let mut col = 0;
    for word in text.split_whitespace() {
        let word = cut(word, MAX_LINE - 2 - indent.len());
        if col > 0 && col + 1 + word.len() > WRAP_AT {
            out.push_str("\r\n");
            out.push_str(indent);
            col = indent.len();
        } else if col > 0 {
            out.push(' ');
            col += 1;
        }
        out.push_str(word);
        col += word.len();
    }
    out.push_str("\r\n");
}

/// The longest prefix of `s` within `max` bytes, at a character boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use mailparse::{MailHeaderMap, ParsedMail, parse_headers, parse_mail};

    const ORIGINAL: &[u8] = b"From: Cron Daemon <root@web1.example.org>\n\
To: ops@example.org\n\
Subject: backup report\n\
Message-ID: <1@web1>\n\
\n\
All good.\n\
Line two.\n";

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn failed(rcpt: &str) -> DsnRecipient {
        DsnRecipient {
            final_recipient: rcpt.to_owned(),
            original_recipient: Some(format!("rfc822;{rcpt}")),
            action: DsnAction::Failed,
            status: "5.1.10".to_owned(),
            diagnostic: Some(
                "smtp; 550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup [SY5P282MB2635.AUSP282.PROD.OUTLOOK.COM 2025-11-23T11:12:20.123Z 08DE2A6028D26C22]".to_owned(),
            ),
            remote_mta: Some("smtp.office365.com".to_owned()),
            last_attempt: Some(at(1_763_896_340)),
            will_retry_until: None,
            reason: Some("the server rejected this recipient".to_owned()),
        }
    }

    fn input(original: &[u8]) -> DsnInput<'_> {
        DsnInput {
            reporting_mta: "web1.example.org".to_owned(),
            from: "MAILER-DAEMON@web1.example.org".to_owned(),
            to: "root@web1.example.org".to_owned(),
            envid: Some("QQ314159".to_owned()),
            arrival: at(1_763_896_000),
            queue_id: "4dXyZ7Qk".to_owned(),
            recipients: vec![failed("nobody@example.org")],
            original,
            ret: Return::Full,
            return_limit: DEFAULT_RETURN_LIMIT,
            now: at(1_763_896_340),
        }
    }

    fn assert_crlf_only(data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            if b == b'\n' {
                assert!(i > 0 && data[i - 1] == b'\r', "bare LF at byte {i}");
            }
            if b == b'\r' {
                assert_eq!(data.get(i + 1), Some(&b'\n'), "bare CR at byte {i}");
            }
        }
        for line in data.split(|&b| b == b'\n') {
            assert!(line.len() <= MAX_LINE + 1, "line too long");
        }
    }

    /// The blocks of a delivery-status body, each parsed as header fields.
    fn status_blocks(part: &ParsedMail<'_>) -> Vec<Vec<(String, String)>> {
        let body = part.get_body_raw().unwrap();
        let text = String::from_utf8(body).unwrap();
        text.split("\r\n\r\n")
            .filter(|b| !b.trim().is_empty())
            .map(|block| {
                let raw = format!("{block}\r\n\r\n");
                let (headers, _) = parse_headers(raw.as_bytes()).unwrap();
                headers
                    .iter()
                    .map(|h| (h.get_key(), h.get_value()))
                    .collect()
            })
            .collect()
    }

    fn get<'a>(block: &'a [(String, String)], key: &str) -> Option<&'a str> {
        block
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn bounce_has_rfc3464_structure() {
        let dsn = build_dsn(&input(ORIGINAL));
        assert_crlf_only(&dsn);
        let mail = parse_mail(&dsn).unwrap();
        let h = mail.get_headers();
        assert_eq!(
            h.get_first_value("Subject").unwrap(),
            "Undelivered Mail Returned to Sender"
        );
        assert_eq!(h.get_first_value("Auto-Submitted").unwrap(), "auto-replied");
        assert_eq!(h.get_first_value("To").unwrap(), "root@web1.example.org");
        assert_eq!(
            h.get_first_value("From").unwrap(),
            "Mail Delivery System <MAILER-DAEMON@web1.example.org>"
        );
        assert_eq!(
            h.get_first_value("Date").unwrap(),
            "Sun, 23 Nov 2025 11:12:20 +0000"
        );
        let mid = h.get_first_value("Message-ID").unwrap();
        assert!(
            mid.starts_with("<20251123111220.") && mid.ends_with(".4dXyZ7Qk@web1.example.org>")
        );
        assert_eq!(mail.ctype.mimetype, "multipart/report");
        assert_eq!(
            mail.ctype.params.get("report-type").unwrap(),
            "delivery-status"
        );
        assert_eq!(
            h.get_first_value("Content-Transfer-Encoding").unwrap(),
            "7bit"
        );
        assert_eq!(mail.subparts.len(), 3);

        let human = &mail.subparts[0];
        assert_eq!(human.ctype.mimetype, "text/plain");
        let text = human.get_body().unwrap();
        assert!(text.starts_with("This is the mail system at host web1.example.org."));
        assert!(text.contains("I'm sorry to have to inform you that your message could not be"));
        assert!(text.contains("<nobody@example.org>: the server rejected this recipient"));
        assert!(text.contains("550 5.1.10 RESOLVER.ADR.RecipientNotFound"));

        let status = &mail.subparts[1];
        assert_eq!(status.ctype.mimetype, "message/delivery-status");
        let blocks = status_blocks(status);
        assert_eq!(blocks.len(), 2);
        let msg = &blocks[0];
        assert_eq!(get(msg, "Reporting-MTA"), Some("dns; web1.example.org"));
        assert_eq!(get(msg, "Original-Envelope-Id"), Some("QQ314159"));
        assert_eq!(get(msg, "X-Relay365-Queue-ID"), Some("4dXyZ7Qk"));
        assert_eq!(
            get(msg, "Arrival-Date"),
            Some("Sun, 23 Nov 2025 11:06:40 +0000")
        );
        let rcpt = &blocks[1];
        assert_eq!(
            get(rcpt, "Final-Recipient"),
            Some("rfc822; nobody@example.org")
        );
        assert_eq!(
            get(rcpt, "Original-Recipient"),
            Some("rfc822;nobody@example.org")
        );
        assert_eq!(get(rcpt, "Action"), Some("failed"));
        assert_eq!(get(rcpt, "Status"), Some("5.1.10"));
        assert_eq!(get(rcpt, "Remote-MTA"), Some("dns; smtp.office365.com"));
        // Folded, then unfolded by the parser back to one value.
        assert_eq!(
            get(rcpt, "Diagnostic-Code"),
            Some(
                "smtp; 550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup [SY5P282MB2635.AUSP282.PROD.OUTLOOK.COM 2025-11-23T11:12:20.123Z 08DE2A6028D26C22]"
            )
        );
        assert_eq!(
            get(rcpt, "Last-Attempt-Date"),
            Some("Sun, 23 Nov 2025 11:12:20 +0000")
        );

        let returned = &mail.subparts[2];
        assert_eq!(returned.ctype.mimetype, "message/rfc822");
        let inner_raw = returned.get_body_raw().unwrap();
        let inner = parse_mail(&inner_raw).unwrap();
        assert_eq!(
            inner.get_headers().get_first_value("Subject").unwrap(),
            "backup report"
        );
        assert!(inner.get_body().unwrap().contains("All good.\r\nLine two."));
    }

    #[test]
    fn headers_only_when_ret_hdrs() {
        let mut i = input(ORIGINAL);
        i.ret = Return::Headers;
        let dsn = build_dsn(&i);
        assert_crlf_only(&dsn);
        let mail = parse_mail(&dsn).unwrap();
        let part = &mail.subparts[2];
        assert_eq!(part.ctype.mimetype, "text/rfc822-headers");
        let body = String::from_utf8(part.get_body_raw().unwrap()).unwrap();
        assert!(body.contains("Subject: backup report"));
        assert!(!body.contains("All good."));
    }

    #[test]
    fn headers_only_when_too_large() {
        let mut big = ORIGINAL.to_vec();
        big.extend(std::iter::repeat_n(b"0123456789abcdef\n".as_slice(), 5000).flatten());
        let mut i = input(&big);
        i.return_limit = 10_000;
        let mail_bytes = build_dsn(&i);
        let mail = parse_mail(&mail_bytes).unwrap();
        assert_eq!(mail.subparts[2].ctype.mimetype, "text/rfc822-headers");
        assert!(mail.subparts[0].get_body().unwrap().contains("too large"));
        assert!(mail_bytes.len() < 10_000);
    }

    #[test]
    fn eight_bit_original_is_declared_8bit() {
        let original = "From: Jürgen <j@example.org>\nSubject: Grüße\n\nÄrger mit dem Backup.\n";
        let dsn = build_dsn(&input(original.as_bytes()));
        assert_crlf_only(&dsn);
        let mail = parse_mail(&dsn).unwrap();
        assert_eq!(
            mail.get_headers()
                .get_first_value("Content-Transfer-Encoding")
                .unwrap(),
            "8bit"
        );
        let part = &mail.subparts[2];
        assert_eq!(part.ctype.mimetype, "message/rfc822");
        assert_eq!(
            part.get_headers()
                .get_first_value("Content-Transfer-Encoding")
                .unwrap(),
            "8bit"
        );
        let raw = part.get_body_raw().unwrap();
        assert_eq!(
            raw,
            "From: Jürgen <j@example.org>\r\nSubject: Grüße\r\n\r\nÄrger mit dem Backup.\r\n"
                .as_bytes()
        );
        // The other parts stay 7bit.
        assert_eq!(
            mail.subparts[1]
                .get_headers()
                .get_first_value("Content-Transfer-Encoding")
                .unwrap(),
            "7bit"
        );
    }

    #[test]
    fn unsafe_original_falls_back_to_headers() {
        let mut original = b"Subject: binary\n\n".to_vec();
        original.extend_from_slice(b"nul\0byte\n");
        original.extend(std::iter::repeat_n(b'x', 2000));
        let dsn = build_dsn(&input(&original));
        assert_crlf_only(&dsn);
        assert!(!dsn.contains(&0));
        let mail = parse_mail(&dsn).unwrap();
        assert_eq!(mail.subparts[2].ctype.mimetype, "text/rfc822-headers");
        assert!(
            mail.subparts[0]
                .get_body()
                .unwrap()
                .contains("could not be attached safely")
        );
    }

    #[test]
    fn mixed_line_endings_become_crlf() {
        let dsn = build_dsn(&input(b"Subject: x\r\nX-A: 1\r\r\nbody\rmore\n"));
        assert_crlf_only(&dsn);
    }

    #[test]
    fn delayed_report_has_headers_only_and_retry_fields() {
        let mut i = input(ORIGINAL);
        i.recipients = vec![DsnRecipient {
            action: DsnAction::Delayed,
            status: "4.7.0".to_owned(),
            diagnostic: Some(
                "451 4.7.0 Temporary server error. Please try again later. PRX4".to_owned(),
            ),
            will_retry_until: Some(at(1_763_896_340 + 5 * 86_400)),
            reason: None,
            ..failed("late@example.org")
        }];
        let dsn = build_dsn(&i);
        let mail = parse_mail(&dsn).unwrap();
        assert_eq!(
            mail.get_headers().get_first_value("Subject").unwrap(),
            "Delayed Mail (still being retried)"
        );
        let blocks = status_blocks(&mail.subparts[1]);
        assert_eq!(get(&blocks[1], "Action"), Some("delayed"));
        assert_eq!(get(&blocks[1], "Status"), Some("4.7.0"));
        assert_eq!(
            get(&blocks[1], "Diagnostic-Code"),
            Some("smtp; 451 4.7.0 Temporary server error. Please try again later. PRX4")
        );
        assert_eq!(
            get(&blocks[1], "Will-Retry-Until"),
            Some("Fri, 28 Nov 2025 11:12:20 +0000")
        );
        assert_eq!(mail.subparts[2].ctype.mimetype, "text/rfc822-headers");
        let text = mail.subparts[0].get_body().unwrap();
        assert!(text.contains("warning only"));
        assert!(text.contains("retried until Fri, 28 Nov 2025"));
    }

    #[test]
    fn several_recipients_and_bad_statuses() {
        let mut i = input(ORIGINAL);
        let mut bad = failed("b@example.org");
        bad.status = "2.0.0".to_owned(); // does not fit "failed"
        bad.original_recipient = Some("b@example.org".to_owned());
        let mut garbage = failed("c@example.org");
        garbage.status = "five".to_owned();
        garbage.diagnostic = None;
        garbage.reason = None;
        let mut ok = failed("d@example.org");
        ok.action = DsnAction::Delivered;
        ok.status = "2.0.0".to_owned();
        i.recipients = vec![failed("a@example.org"), bad, garbage, ok];
        i.envid = None;
        let mail_bytes = build_dsn(&i);
        let mail = parse_mail(&mail_bytes).unwrap();
        let blocks = status_blocks(&mail.subparts[1]);
        assert_eq!(blocks.len(), 5);
        assert_eq!(get(&blocks[0], "Original-Envelope-Id"), None);
        assert_eq!(get(&blocks[2], "Status"), Some("5.0.0"));
        assert_eq!(
            get(&blocks[2], "Original-Recipient"),
            Some("rfc822; b@example.org")
        );
        assert_eq!(get(&blocks[3], "Status"), Some("5.0.0"));
        assert_eq!(get(&blocks[3], "Diagnostic-Code"), None);
        assert_eq!(get(&blocks[4], "Action"), Some("delivered"));
        assert!(
            mail.subparts[0]
                .get_body()
                .unwrap()
                .contains("<c@example.org>: delivery failed")
        );
    }

    #[test]
    fn header_injection_is_flattened() {
        let mut i = input(ORIGINAL);
        i.to = "root@x\r\nBcc: victim@example.net".to_owned();
        i.envid = Some("id\nX-Evil: 1".to_owned());
        let mut r = failed("a@example.org");
        r.diagnostic = Some("550 5.0.0 bad\r\n\r\n--fake\r\nContent-Type: text/html".to_owned());
        i.recipients = vec![r];
        let dsn = build_dsn(&i);
        assert_crlf_only(&dsn);
        let mail = parse_mail(&dsn).unwrap();
        assert!(mail.get_headers().get_first_value("Bcc").is_none());
        assert_eq!(mail.subparts.len(), 3);
        let blocks = status_blocks(&mail.subparts[1]);
        assert_eq!(blocks.len(), 2);
        assert!(get(&blocks[0], "X-Evil").is_none());
    }

    #[test]
    fn boundary_avoids_collisions_with_the_original() {
        let i = input(ORIGINAL);
        let first = build_dsn(&i);
        let mail = parse_mail(&first).unwrap();
        let b = mail.ctype.params.get("boundary").unwrap().clone();
        let evil =
            format!("Subject: x\n\n--{b}\nContent-Type: text/html\n\n<b>forged</b>\n--{b}--\n");
        let dsn = build_dsn(&input(evil.as_bytes()));
        let mail = parse_mail(&dsn).unwrap();
        assert_ne!(mail.ctype.params.get("boundary").unwrap(), &b);
        assert_eq!(mail.subparts.len(), 3);
        assert_eq!(mail.subparts[2].ctype.mimetype, "message/rfc822");
    }

    #[test]
    fn reply_quoted_in_reason_is_said_once() {
        let mut i = input(ORIGINAL);
        let mut r = failed("a@example.org");
        r.diagnostic = Some("smtp; 550 5.1.1 User unknown".to_owned());
        r.reason = Some("the server rejected this recipient: 550 5.1.1 User unknown".to_owned());
        i.recipients = vec![r];
        let dsn = build_dsn(&i);
        let text = parse_mail(&dsn).unwrap().subparts[0].get_body().unwrap();
        assert_eq!(text.matches("5.1.1").count(), 1, "{text}");
        assert!(!text.contains("the server said"));
    }

    #[test]
    fn null_sender_is_a_bounce_sender() {
        assert!(is_bounce_sender(""));
        assert!(is_bounce_sender("<>"));
        assert!(is_bounce_sender("  "));
        assert!(!is_bounce_sender("MAILER-DAEMON@example.org"));
        assert!(!is_bounce_sender("root@example.org"));
    }

    #[test]
    fn dates_are_rfc5322() {
        assert_eq!(rfc5322_date(at(0)), "Thu, 1 Jan 1970 00:00:00 +0000");
        assert_eq!(
            rfc5322_date(at(951_782_400)),
            "Tue, 29 Feb 2000 00:00:00 +0000"
        );
        assert_eq!(
            rfc5322_date(at(1_763_896_340)),
            "Sun, 23 Nov 2025 11:12:20 +0000"
        );
        assert_eq!(
            rfc5322_date(at(4_102_444_799)),
            "Thu, 31 Dec 2099 23:59:59 +0000"
        );
    }

    #[test]
    fn non_ascii_recipient_uses_global_delivery_status() {
        let mut i = input(ORIGINAL);
        i.recipients = vec![failed("jörg@example.de")];
        let mail_bytes = build_dsn(&i);
        let mail = parse_mail(&mail_bytes).unwrap();
        assert_eq!(
            mail.subparts[1].ctype.mimetype,
            "message/global-delivery-status"
        );
        assert_eq!(
            mail.get_headers()
                .get_first_value("Content-Transfer-Encoding")
                .unwrap(),
            "8bit"
        );
    }
}
