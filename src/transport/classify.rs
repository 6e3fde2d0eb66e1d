//! Reply classification: turns an SMTP reply from Exchange Online, plus the stage of the
//! dialogue it answered, into what the daemon must do (defer, bounce, freeze or hold the
//! account, ...), following the table in docs/exchange-online.md.
//!
//! Trust: reply text comes from the remote server and is untrusted. It is parsed strictly,
//! stripped of control characters and bounded in length before anything (logs, DSNs)
//! can see it. Matching uses substrings and status-code tokens, never whole lines, because
//! Exchange appends `[HOSTNAME timestamp id]` and `[BeginDiagnosticData]...` tails.

use std::fmt;
use std::time::Duration;

/// Longest reply text kept, in bytes; Exchange's diagnostic tails run to a few hundred.
pub const MAX_REPLY_TEXT: usize = 4096;

/// Most lines accepted in one multi-line reply; EHLO lists are the longest real ones.
pub const MAX_REPLY_LINES: usize = 100;

/// First retry delay of the ordinary backoff.
pub const BACKOFF_START: Duration = Duration::from_secs(60);
/// Longest delay of the ordinary backoff.
pub const BACKOFF_CAP: Duration = Duration::from_secs(3600);
/// First pause after `Sender throttled`.
pub const PAUSE_START: Duration = Duration::from_secs(3600);
/// Longest pause after repeated `Sender throttled`.
pub const PAUSE_CAP: Duration = Duration::from_secs(24 * 3600);
/// Shortest wait after `432 4.3.2` (too many connections); the doc says 30–60 s.
pub const CONNECTION_RETRY_MIN: Duration = Duration::from_secs(30);
/// Longest wait after `432 4.3.2`; callers pick a point in between to spread retries.
pub const CONNECTION_RETRY_MAX: Duration = Duration::from_secs(60);
/// How often a held account is probed to see whether the admin fixed it.
pub const HOLD_PROBE_INTERVAL: Duration = Duration::from_secs(3600);

/// Why a reply could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("empty SMTP reply: the server closed or sent nothing; treat as a dropped connection")]
    Empty,
    #[error(
        "malformed SMTP reply line {line}: {what}; the server is not speaking SMTP, check host and port"
    )]
    Malformed { line: usize, what: &'static str },
    #[error(
        "SMTP reply code {code} is outside 200-599; the server is not speaking SMTP, check host and port"
    )]
    BadCode { code: u16 },
    #[error(
        "multi-line SMTP reply changes code from {first} to {other} on line {line}; treat as a protocol error"
    )]
    CodeMismatch { first: u16, other: u16, line: usize },
    #[error("SMTP reply has more than {MAX_REPLY_LINES} lines; treat as a protocol error")]
    TooLong,
}

/// An RFC 3463 enhanced status code such as `5.7.3`: (class, subject, detail).
pub type Enhanced = (u8, u16, u16);

/// One complete SMTP reply, parsed and sanitised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit reply code, 200..=599.
    pub code: u16,
    /// The enhanced status code at the start of the text, if the server sent one.
    pub enhanced: Option<Enhanced>,
    /// The text of all lines joined by single spaces, enhanced code removed from each line,
    /// control characters replaced and length bounded.
    pub text: String,
}

impl Reply {
    /// Parses raw reply text as read from the wire: one or more `NNN-text` lines ending
    /// in one `NNN text` line, CRLF or LF separated.
    pub fn parse(raw: &str) -> Result<Reply, ReplyError> {
        let lines: Vec<&str> = raw
            .trim_end_matches(['\r', '\n'])
            .split('\n')
            .map(|l| l.strip_suffix('\r').unwrap_or(l))
            .collect();
        if lines.len() == 1 && lines[0].is_empty() {
            return Err(ReplyError::Empty);
        }
        // SECURITY: bounds work done on server-controlled input.
        if lines.len() > MAX_REPLY_LINES {
            return Err(ReplyError::TooLong);
        }
        let last = lines.len() - 1;
        let mut code = None;
        let mut texts = Vec::with_capacity(lines.len());
        for (i, line) in lines.iter().enumerate() {
            let bytes = line.as_bytes();
            if bytes.len() < 3 || !bytes[..3].iter().all(u8::is_ascii_digit) {
                return Err(ReplyError::Malformed {
                    line: i + 1,
                    what: "does not start with a three-digit code",
                });
            }
            let this = u16::from(bytes[0] - b'0') * 100
                + u16::from(bytes[1] - b'0') * 10
                + u16::from(bytes[2] - b'0');
            match code {
                None => code = Some(this),
                Some(first) if first != this => {
                    return Err(ReplyError::CodeMismatch {
                        first,
                        other: this,
                        line: i + 1,
                    });
                }
                Some(_) => {}
            }
            let text = match bytes.get(3) {
                None if i == last => "",
                Some(b' ') if i == last => &line[4..],
                Some(b'-') if i != last => &line[4..],
                Some(b' ') | None => {
                    return Err(ReplyError::Malformed {
                        line: i + 1,
                        what: "ends the reply but more lines follow",
                    });
                }
                Some(b'-') => {
                    return Err(ReplyError::Malformed {
                        line: i + 1,
                        what: "announces a continuation but is the last line",
                    });
                }
                Some(_) => {
                    return Err(ReplyError::Malformed {
                        line: i + 1,
                        what: "has no space or hyphen after the code",
                    });
                }
            };
            texts.push(text);
        }
        let code = code.ok_or(ReplyError::Empty)?;
        Reply::from_lines(code, texts)
    }

    /// Builds a reply from a code and its text lines as another parser already split
    /// them (the lines without their `NNN-` prefixes).
    pub fn from_lines<I, S>(code: u16, lines: I) -> Result<Reply, ReplyError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        // SECURITY: only real SMTP codes reach the classifier's class rules.
        if !(200..=599).contains(&code) {
            return Err(ReplyError::BadCode { code });
        }
        let mut enhanced = None;
        let mut joined = String::new();
        for (i, line) in lines.into_iter().enumerate() {
            if i >= MAX_REPLY_LINES {
                return Err(ReplyError::TooLong);
            }
            let line = line.as_ref();
            let (status, rest) = split_enhanced(line);
            let rest = match (i, status) {
                (0, Some(s)) => {
                    enhanced = Some(s);
                    rest
                }
                // RFC 2034 repeats the code on every line; keep it once.
                (_, Some(s)) if Some(s) == enhanced => rest,
                _ => line,
            };
            let rest = rest.trim();
            if rest.is_empty() {
                continue;
            }
            if !joined.is_empty() {
                joined.push(' ');
            }
            joined.push_str(rest);
        }
        Ok(Reply {
            code,
            enhanced,
            text: sanitize(&joined, MAX_REPLY_TEXT),
        })
    }

    /// The reply class digit: 2, 3, 4 or 5.
    pub fn class(&self) -> u16 {
        self.code / 100
    }

    /// Whether `status` is this reply's enhanced code or appears as a status token in its text
    /// (Exchange sometimes puts the telling code, e.g. `5.1.90`, after a generic one).
    pub fn mentions(&self, status: Enhanced) -> bool {
        self.enhanced == Some(status) || status_tokens(&self.text).any(|s| s == status)
    }

    /// Whether any mentioned status lies in `class.subject.lo ..= class.subject.hi`.
    fn mentions_range(&self, class: u8, subject: u16, lo: u16, hi: u16) -> bool {
        let hit = |s: Enhanced| s.0 == class && s.1 == subject && (lo..=hi).contains(&s.2);
        self.enhanced.is_some_and(hit) || status_tokens(&self.text).any(hit)
    }

    /// The RFC 3464 `Status:` value for a DSN: the enhanced code when its class agrees
    /// with the reply code, else `N.0.0` from the reply class.
    pub fn dsn_status(&self) -> String {
        match self.enhanced {
            Some((c, s, d)) if u16::from(c) == self.class() => format!("{c}.{s}.{d}"),
            _ => format!("{}.0.0", self.class()),
        }
    }

    /// The RFC 3464 `Diagnostic-Code:` value: `smtp; 550 5.1.1 text`.
    pub fn diagnostic_code(&self) -> String {
        format!("smtp; {self}")
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code)?;
        if let Some((c, s, d)) = self.enhanced {
            write!(f, " {c}.{s}.{d}")?;
        }
        if !self.text.is_empty() {
            write!(f, " {}", self.text)?;
        }
        Ok(())
    }
}

/// Replaces control characters and bounds length at a character boundary.
fn sanitize(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max));
    for ch in text.chars() {
        if out.len() + ch.len_utf8() > max {
            out.push_str("...");
            break;
        }
        // SECURITY: remote text ends up in logs and DSN headers; no CR, LF or other controls.
        out.push(if ch.is_control() { ' ' } else { ch });
    }
    out
}

/// Splits a leading `c.s.d ` enhanced status code off a line.
fn split_enhanced(line: &str) -> (Option<Enhanced>, &str) {
    let token_end = line.find(' ').unwrap_or(line.len());
    match parse_status(&line[..token_end]) {
        Some(s) => (Some(s), &line[token_end..]),
        None => (None, line),
    }
}

/// Parses `c.s.d` with class 2, 4 or 5 and 1–3 digit subject and detail (RFC 3463).
fn parse_status(token: &str) -> Option<Enhanced> {
    let mut parts = token.split('.');
    let class = parts.next()?;
    let subject = parts.next()?;
    let detail = parts.next()?;
    if parts.next().is_some() {
        return None;
    }
    let digits = |p: &str, max: usize| {
        !p.is_empty() && p.len() <= max && p.bytes().all(|b| b.is_ascii_digit())
    };
    if !(digits(class, 1) && digits(subject, 3) && digits(detail, 3)) {
        return None;
    }
    let class: u8 = class.parse().ok()?;
    if !matches!(class, 2 | 4 | 5) {
        return None;
    }
    Some((class, subject.parse().ok()?, detail.parse().ok()?))
}

/// Every standalone `c.s.d` token in `text`. A token must not be glued to letters, digits
/// or dots, so IP addresses (`10.5.2.251`) and timestamps (`20.123Z`) never match.
fn status_tokens(text: &str) -> impl Iterator<Item = Enhanced> + '_ {
    let bytes = text.as_bytes();
    let mut i = 0;
    std::iter::from_fn(move || {
        while i < bytes.len() {
            let start = i;
            let glued_before = start > 0 && {
                let p = bytes[start - 1];
                p.is_ascii_alphanumeric() || p == b'.'
            };
            if !bytes[start].is_ascii_digit() || glued_before {
                i += 1;
                continue;
            }
            let mut end = start;
            while end < bytes.len() && (bytes[end].is_ascii_digit() || bytes[end] == b'.') {
                end += 1;
            }
            i = end.max(start + 1);
            // A sentence-ending dot is not part of the token.
            let mut tok_end = end;
            if tok_end > start && bytes[tok_end - 1] == b'.' {
                tok_end -= 1;
            }
            let glued_after = end < bytes.len() && bytes[end].is_ascii_alphabetic();
            if glued_after {
                continue;
            }
            if let Some(s) = parse_status(&text[start..tok_end]) {
                return Some(s);
            }
        }
        None
    })
}

/// Where in the SMTP dialogue a reply came.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    Connect,
    Greeting,
    Ehlo,
    StartTls,
    Auth,
    Mail,
    Rcpt,
    Data,
    AfterDot,
}

impl Stage {
    /// Whether a reply at this stage concerns the session or account, not one message.
    fn is_session(self) -> bool {
        matches!(
            self,
            Stage::Connect | Stage::Greeting | Stage::Ehlo | Stage::StartTls | Stage::Auth
        )
    }
}

impl fmt::Display for Stage {
    /// Postfix's "(in reply to ... command)" wording.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Connect => "connect",
            Stage::Greeting => "initial greeting",
            Stage::Ehlo => "EHLO",
            Stage::StartTls => "STARTTLS",
            Stage::Auth => "AUTH",
            Stage::Mail => "MAIL FROM",
            Stage::Rcpt => "RCPT TO",
            Stage::Data => "DATA",
            Stage::AfterDot => "end of DATA",
        })
    }
}

/// Which quota froze an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quota {
    /// The mailbox's 10,000 recipients per rolling 24 hours.
    Daily,
    /// The tenant's external-recipient limit (`5.7.233`, trial tenants `5.7.232`).
    Tenant,
}

impl Quota {
    /// When to try again if the quota ledger cannot tell: 24 h for the daily mailbox
    /// quota, hourly for the tenant quota.
    pub fn fallback_retry(self) -> Duration {
        match self {
            Quota::Daily => Duration::from_secs(24 * 3600),
            Quota::Tenant => Duration::from_secs(3600),
        }
    }
}

/// How long a held account stays held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldUntil {
    /// Until an admin releases it; probe every [`HOLD_PROBE_INTERVAL`].
    Release,
    /// Until the next UTC midnight or an admin release, whichever is first.
    NextUtcDay,
}

/// What the daemon must do after a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// A 2xx or 3xx reply: the step succeeded.
    Accepted,
    /// Defer every message of the account until the quota frees room; never bounce.
    FreezeAccount(Quota),
    /// Close this connection and retry after 30–60 s with fewer connections.
    ReduceConnections,
    /// Pause the account for [`pause_for`] of the consecutive throttles; alert.
    PauseAccount,
    /// Credentials or token rejected: refresh the OAuth2 token once and retry, then hold
    /// the account and alert. Never bounce.
    AuthFailed,
    /// Stop sending from the account and alert with `fix`; never bounce.
    HoldAccount { until: HoldUntil, fix: String },
    /// Too many recipients in one transaction: resend in smaller batches.
    SplitRecipients,
    /// Permanent for this message: bounce it to its sender and never retry it.
    BounceMessage,
    /// Permanent for this recipient: bounce it, keep the others.
    BounceRecipient,
    /// Temporary: retry with [`backoff`]. `hint` is the alert to raise if it repeats.
    Defer { hint: Option<String> },
}

impl Action {
    /// Whether the admin must be told now (the doc's "alert").
    pub fn alerts(&self) -> bool {
        matches!(
            self,
            Action::FreezeAccount(Quota::Tenant)
                | Action::PauseAccount
                | Action::HoldAccount { .. }
        )
    }

    /// Whether this verdict sends a DSN to the message's sender.
    pub fn bounces(&self) -> bool {
        matches!(self, Action::BounceMessage | Action::BounceRecipient)
    }
}

/// A classified reply: the action and a plain-words reason for logs, alerts and DSNs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub action: Action,
    pub reason: String,
}

impl Verdict {
    fn new(action: Action, reason: impl Into<String>) -> Verdict {
        Verdict {
            action,
            reason: reason.into(),
        }
    }
}

/// The fix for SMTP AUTH being off, per mailbox or tenant (`5.7.139`).
const SMTP_AUTH_FIX_MAILBOX: &str = "SMTP AUTH is disabled for this mailbox: an Exchange admin can run \
Set-CASMailbox -Identity <mailbox> -SmtpClientAuthenticationDisabled $false";
const SMTP_AUTH_FIX_TENANT: &str = "SMTP AUTH is disabled for the whole tenant: an Exchange admin can run \
Set-TransportConfig -SmtpClientAuthenticationDisabled $false, or enable it for this mailbox only with \
Set-CASMailbox -Identity <mailbox> -SmtpClientAuthenticationDisabled $false";
const SMTP_AUTH_FIX_DEFAULTS: &str = "SMTP AUTH can't be used while Security Defaults are on in \
Microsoft Entra ID: an admin must turn Security Defaults off for this tenant";
const SMTP_AUTH_FIX_ANY: &str = "SMTP AUTH is disabled or blocked for this mailbox or tenant: an Exchange \
admin can run Set-CASMailbox -Identity <mailbox> -SmtpClientAuthenticationDisabled $false (this mailbox) \
or Set-TransportConfig -SmtpClientAuthenticationDisabled $false (whole tenant); it also can't be used \
while Security Defaults are on";
const BASIC_AUTH_FIX: &str = "basic authentication (AUTH LOGIN) is turned off for SMTP AUTH: switch \
relay365 to OAuth2 (XOAUTH2, an app registration with SMTP.SendAsApp), or have an admin re-enable \
basic auth for SMTP AUTH while Microsoft still allows it";
const MECHANISM_FIX: &str = "Exchange Online rejected the authentication mechanism: it offers AUTH \
LOGIN and XOAUTH2 only (never PLAIN), and only after STARTTLS; configure one of those two on port 587 \
with STARTTLS";
const NOT_AUTHENTICATED_FIX: &str = "the server received MAIL before a successful AUTH: configure \
authentication (XOAUTH2 or LOGIN) with STARTTLS on smtp.office365.com:587, or for direct send or a \
connector on port 25 check that the connector matches this host";
const TLS_FIX: &str = "the server refused the TLS version: Exchange Online requires TLS 1.2 or later; \
relay365 never offers older versions, so something between this host and Microsoft (a proxy or \
middlebox) is downgrading the connection";
const SPAM_FIX: &str = "Microsoft blocked this mailbox from sending as a suspected spammer: find \
the mailbox under Restricted entities in the Microsoft Defender portal, check it for compromise and \
release it; otherwise sending resumes the next UTC day at the earliest";
const MAILBOX_FULL_FIX: &str = "the sending mailbox is full (the copies in its Sent Items count \
against its quota): empty Sent Items or Deleted Items or raise the mailbox quota, then release the \
hold";
const SENDAS_REASON: &str = "Exchange Online does not allow this mailbox to send as the message's \
sender (SendAs denied): set from = \"rewrite\" in relay365.toml so relay365 rewrites the sender to \
the mailbox, or have an admin grant Send As for this address (Add-RecipientPermission)";
const LOGON_HINT: &str = "the mailbox refused the app's logon: if this repeats, give the app's \
service principal access with Add-MailboxPermission -Identity <mailbox> -User <service principal> \
-AccessRights FullAccess";

/// Classifies `reply`, received at `stage`. Specific texts and codes first, the reply
/// class last, exactly in the order of the table in docs/exchange-online.md.
pub fn classify(reply: &Reply, stage: Stage) -> Verdict {
    let text = reply.text.to_ascii_lowercase();
    let has = |needle: &str| text.contains(needle);
    let code = reply.code;
    let permanent = reply.class() == 5;

    if reply.class() <= 3 {
        return Verdict::new(Action::Accepted, format!("accepted: {reply}"));
    }

    // Quota replies are 5xx and must never bounce.
    if has("submissionquotaexceededexception")
        || has("submission quota")
        || reply.mentions((5, 1, 90))
    {
        return Verdict::new(
            Action::FreezeAccount(Quota::Daily),
            "the mailbox reached its daily recipient quota (10,000 per rolling 24 hours): every \
             message of this mailbox waits until its 24-hour ledger frees room",
        );
    }
    if reply.mentions((5, 7, 233)) || reply.mentions((5, 7, 232)) {
        return Verdict::new(
            Action::FreezeAccount(Quota::Tenant),
            "the tenant reached its daily limit of external recipients: mail waits and is retried \
             hourly; an admin should check the tenant's outbound volume",
        );
    }

    // "Sender throttled" shares 5.2.252 with SendAsDenied, so the text decides first.
    if has("sender throttled") {
        return throttled();
    }
    if has("sendasdenied") || reply.mentions((5, 7, 60)) {
        return Verdict::new(Action::BounceMessage, SENDAS_REASON);
    }
    if reply.mentions_range(5, 2, 251, 255) {
        return throttled();
    }

    if (code == 432 && reply.enhanced.is_none_or(|e| e == (4, 3, 2)))
        || has("concurrent connections limit exceeded")
        || has("sender thread limit exceeded")
    {
        return Verdict::new(
            Action::ReduceConnections,
            "too many concurrent connections for this mailbox (Exchange Online allows 3): \
             closing this one and retrying in 30-60 s with fewer",
        );
    }

    // Auth-disabled codes before the generic 535, since 5.7.139 also comes as 535.
    if reply.mentions((5, 7, 139)) {
        let fix = if has("disabled for the tenant") {
            SMTP_AUTH_FIX_TENANT
        } else if has("disabled for the mailbox") {
            SMTP_AUTH_FIX_MAILBOX
        } else if has("security defaults") {
            SMTP_AUTH_FIX_DEFAULTS
        } else if has("basic authentication is disabled") {
            BASIC_AUTH_FIX
        } else {
            SMTP_AUTH_FIX_ANY
        };
        return hold(HoldUntil::Release, fix, reply);
    }
    if reply.mentions((5, 7, 30)) {
        return hold(HoldUntil::Release, BASIC_AUTH_FIX, reply);
    }
    if code == 504 && reply.mentions((5, 7, 4)) {
        return hold(HoldUntil::Release, MECHANISM_FIX, reply);
    }
    if code == 530 && reply.mentions((5, 7, 57)) {
        return hold(HoldUntil::Release, NOT_AUTHENTICATED_FIX, reply);
    }
    if reply.mentions((4, 7, 66)) {
        return hold(HoldUntil::Release, TLS_FIX, reply);
    }
    if code == 535 {
        return Verdict::new(
            Action::AuthFailed,
            format!(
                "the server rejected the credentials or token ({reply}): refreshing the OAuth2 \
                 token once; if that fails the account is held"
            ),
        );
    }

    if reply.mentions((5, 1, 8)) || has("outboundspamexception") {
        return hold(HoldUntil::NextUtcDay, SPAM_FIX, reply);
    }

    // At RCPT, 5.2.2 is the recipient's mailbox; after the envelope it is the sender's.
    if reply.mentions((5, 2, 2)) && (stage != Stage::Rcpt || has("storedrv")) {
        return hold(HoldUntil::Release, MAILBOX_FULL_FIX, reply);
    }

    if (permanent && reply.mentions((5, 3, 4))) || has("maxsubmissionexceeded") {
        return Verdict::new(
            Action::BounceMessage,
            "the message is larger than this mailbox may send (35 MB by default, at most 150 MB): \
             send it smaller or ask an admin to raise the mailbox's maximum send size",
        );
    }

    // X.5.3 is RFC 3463's "too many recipients".
    if has("resolver.adr.reciplimit") || reply.mentions((4, 5, 3)) || reply.mentions((5, 5, 3)) {
        return Verdict::new(
            Action::SplitRecipients,
            "too many recipients in one message for this mailbox: sending in smaller batches",
        );
    }

    if has("mailbox logon failure") || (code == 430 && reply.mentions((4, 2, 0))) {
        return Verdict::new(
            Action::Defer {
                hint: Some(LOGON_HINT.to_owned()),
            },
            format!("mailbox logon failed, retrying later: {reply}"),
        );
    }

    if !permanent {
        return Verdict::new(
            Action::Defer { hint: None },
            format!("temporary failure in reply to {stage}, retrying later: {reply}"),
        );
    }
    if stage.is_session() {
        // Not about any one message: bouncing here would bounce the whole queue.
        return hold(
            HoldUntil::Release,
            "the server refused the session before any message was sent: check host, port, TLS \
             and authentication settings in relay365.toml",
            reply,
        );
    }
    if stage == Stage::Rcpt {
        return Verdict::new(
            Action::BounceRecipient,
            format!("the server rejected this recipient: {reply}"),
        );
    }
    Verdict::new(
        Action::BounceMessage,
        format!("the server rejected the message in reply to {stage}: {reply}"),
    )
}

/// The verdict for a failure with no reply at all: dropped connection, timeout, TLS error.
pub fn classify_no_reply(stage: Stage, what: &str) -> Verdict {
    Verdict::new(
        Action::Defer { hint: None },
        format!(
            "no reply in {stage} ({}), retrying later",
            sanitize(what, MAX_REPLY_TEXT)
        ),
    )
}

fn throttled() -> Verdict {
    Verdict::new(
        Action::PauseAccount,
        "Microsoft throttled this mailbox for repeated errors: sending from it pauses for hours \
         (from 1 h, doubling); check the logs for the errors that caused it",
    )
}

fn hold(until: HoldUntil, fix: &str, reply: &Reply) -> Verdict {
    Verdict::new(
        Action::HoldAccount {
            until,
            fix: fix.to_owned(),
        },
        format!("{fix} (server said: {reply})"),
    )
}

/// Delay before retry number `attempt` (1 = the first retry): 1 min, doubling, capped at 1 h.
pub fn backoff(attempt: u32) -> Duration {
    doubling(BACKOFF_START, attempt, BACKOFF_CAP)
}

/// Pause after the `times`-th consecutive `Sender throttled` (1 = first): 1 h, doubling,
/// capped at 24 h.
pub fn pause_for(times: u32) -> Duration {
    doubling(PAUSE_START, times, PAUSE_CAP)
}

fn doubling(start: Duration, n: u32, cap: Duration) -> Duration {
    let shift = n.saturating_sub(1).min(31);
    start.saturating_mul(1u32 << shift).min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TAIL: &str =
        "[SY5P282MB2635.AUSP282.PROD.OUTLOOK.COM 2025-11-23T11:12:20.123Z 08DE2A6028D26C22]";

    fn reply(raw: &str) -> Reply {
        Reply::parse(&format!("{raw} {TAIL}\r\n")).unwrap()
    }

    fn verdict(raw: &str, stage: Stage) -> Verdict {
        classify(&reply(raw), stage)
    }

    fn action(raw: &str, stage: Stage) -> Action {
        verdict(raw, stage).action
    }

    fn held(raw: &str, stage: Stage) -> (HoldUntil, String) {
        match action(raw, stage) {
            Action::HoldAccount { until, fix } => (until, fix),
            other => panic!("expected hold for {raw:?}, got {other:?}"),
        }
    }

    // --- parsing ---

    #[test]
    fn parses_single_line_with_enhanced_code_and_tail() {
        let r = reply("550 5.1.1 RESOLVER.ADR.RecipNotFound; not found");
        assert_eq!(r.code, 550);
        assert_eq!(r.enhanced, Some((5, 1, 1)));
        assert!(
            r.text
                .starts_with("RESOLVER.ADR.RecipNotFound; not found [")
        );
        assert!(r.text.ends_with("08DE2A6028D26C22]"));
        assert_eq!(r.dsn_status(), "5.1.1");
        assert!(r.diagnostic_code().starts_with("smtp; 550 5.1.1 RESOLVER"));
    }

    #[test]
    fn parses_multi_line_and_drops_repeated_enhanced_codes() {
        let r = Reply::parse("250-SY5P282CA0097.outlook.office365.com Hello [203.0.113.7]\r\n250-SIZE 157286400\r\n250 SMTPUTF8\r\n").unwrap();
        assert_eq!(r.code, 250);
        assert_eq!(r.enhanced, None);
        assert_eq!(
            r.text,
            "SY5P282CA0097.outlook.office365.com Hello [203.0.113.7] SIZE 157286400 SMTPUTF8"
        );
        let r = Reply::parse("554-5.2.0 first\n554 5.2.0 second\n").unwrap();
        assert_eq!(r.enhanced, Some((5, 2, 0)));
        assert_eq!(r.text, "first second");
        assert_eq!(r.to_string(), "554 5.2.0 first second");
    }

    #[test]
    fn parses_code_only_reply() {
        let r = Reply::parse("250\r\n").unwrap();
        assert_eq!((r.code, r.enhanced, r.text.as_str()), (250, None, ""));
    }

    #[test]
    fn rejects_malformed_replies() {
        assert_eq!(Reply::parse(""), Err(ReplyError::Empty));
        assert_eq!(Reply::parse("\r\n"), Err(ReplyError::Empty));
        assert!(matches!(
            Reply::parse("hello"),
            Err(ReplyError::Malformed { line: 1, .. })
        ));
        assert!(matches!(
            Reply::parse("250-a\r\n251 b\r\n"),
            Err(ReplyError::CodeMismatch {
                first: 250,
                other: 251,
                line: 2
            })
        ));
        assert!(matches!(
            Reply::parse("250 a\r\n250 b\r\n"),
            Err(ReplyError::Malformed { line: 1, .. })
        ));
        assert!(matches!(
            Reply::parse("250-a\r\n"),
            Err(ReplyError::Malformed { line: 1, .. })
        ));
        assert!(matches!(
            Reply::parse("250xa"),
            Err(ReplyError::Malformed { line: 1, .. })
        ));
        assert_eq!(
            Reply::parse("650 nope"),
            Err(ReplyError::BadCode { code: 650 })
        );
        let many = "250-x\r\n".repeat(MAX_REPLY_LINES) + "250 y\r\n";
        assert_eq!(Reply::parse(&many), Err(ReplyError::TooLong));
    }

    #[test]
    fn sanitises_and_bounds_text() {
        let r = Reply::from_lines(550, ["5.0.0 bad\x1b[31m\x00 text"]).unwrap();
        assert_eq!(r.text, "bad [31m  text");
        let long = format!("5.0.0 {}", "é".repeat(MAX_REPLY_TEXT));
        let r = Reply::from_lines(550, [long]).unwrap();
        assert!(r.text.len() <= MAX_REPLY_TEXT + 3);
        assert!(r.text.ends_with("..."));
    }

    #[test]
    fn status_tokens_ignore_ips_timestamps_and_words() {
        let text =
            "from 10.5.2.251 at 2025-11-23T11:12:20.123Z v5.7.60 5.7.60x (4.3.2) end 5.1.90.";
        let found: Vec<_> = status_tokens(text).collect();
        assert_eq!(found, vec![(4, 3, 2), (5, 1, 90)]);
    }

    #[test]
    fn dsn_status_falls_back_to_class() {
        assert_eq!(Reply::parse("550 no code").unwrap().dsn_status(), "5.0.0");
        assert_eq!(Reply::parse("451 4.7.0 x").unwrap().dsn_status(), "4.7.0");
        // A class that disagrees with the reply code is not trusted.
        assert_eq!(Reply::parse("550 4.7.0 x").unwrap().dsn_status(), "5.0.0");
    }

    // --- one test per row of the doc's table ---

    #[test]
    fn daily_quota_freezes_and_never_bounces() {
        for raw in [
            "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to process message due to a permanent exception with message [BeginDiagnosticData]Cannot submit message. 0.35250:0A00C184, 1.36674:0A000000, 1.61250:00000000[EndDiagnosticData]",
            "550 5.1.90 Your message can't be sent because you've reached your daily limit for message recipients.",
            "554 5.2.0 Message rejected: submission quota reached for this mailbox",
        ] {
            let v = verdict(raw, Stage::AfterDot);
            assert_eq!(v.action, Action::FreezeAccount(Quota::Daily), "{raw}");
            assert!(!v.action.bounces());
            assert!(v.reason.contains("daily recipient quota"));
        }
        assert_eq!(Quota::Daily.fallback_retry(), Duration::from_secs(86400));
    }

    #[test]
    fn tenant_quota_freezes_hourly_and_alerts() {
        for raw in [
            "550 5.7.233 Your message can't be sent because your organization has exceeded its daily limit for sending to external recipients.",
            "550 5.7.232 Your message can't be sent because your trial tenant has exceeded its daily limit for sending email to external recipients (tenant external recipient rate limit).",
        ] {
            let a = action(raw, Stage::AfterDot);
            assert_eq!(a, Action::FreezeAccount(Quota::Tenant), "{raw}");
            assert!(a.alerts());
        }
        assert_eq!(Quota::Tenant.fallback_retry(), Duration::from_secs(3600));
    }

    #[test]
    fn concurrent_connections_reduce() {
        for raw in [
            "432 4.3.2 Concurrent connections limit exceeded. Visit https://aka.ms/concurrent_sending for more information.",
            "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded [BeginDiagnosticData]Sender thread limit exceeded.[EndDiagnosticData]",
        ] {
            assert_eq!(
                action(raw, Stage::AfterDot),
                Action::ReduceConnections,
                "{raw}"
            );
        }
        // 421 4.3.2 is "Service not active": an ordinary deferral.
        assert_eq!(
            action("421 4.3.2 Service not active", Stage::Greeting),
            Action::Defer { hint: None }
        );
        assert!(CONNECTION_RETRY_MIN >= Duration::from_secs(30));
        assert!(CONNECTION_RETRY_MAX <= Duration::from_secs(60));
    }

    #[test]
    fn sender_throttled_pauses_and_alerts() {
        for detail in 251..=255 {
            let raw = format!(
                "550 5.2.{detail} Sender throttled due to continuous errors. [BeginDiagnosticData]Sender throttled[EndDiagnosticData]"
            );
            let a = action(&raw, Stage::Mail);
            assert_eq!(a, Action::PauseAccount, "{raw}");
            assert!(a.alerts());
        }
        // The range alone, without the words, still pauses.
        assert_eq!(
            action("550 5.2.254 Too many errors", Stage::AfterDot),
            Action::PauseAccount
        );
        // "send as denied" in words is the throttle, not the SendAs bounce.
        assert_eq!(
            action(
                "550 5.2.252 Sender throttled due to continuous send as denied errors.",
                Stage::AfterDot
            ),
            Action::PauseAccount
        );
    }

    #[test]
    fn send_as_denied_bounces_naming_the_rewrite_setting() {
        for raw in [
            "554 5.2.252 SendAsDenied; app@contoso.com not allowed to send as alice@example.org; STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; Failed to process message due to a permanent exception with message [BeginDiagnosticData]Cannot submit message. 0.35250:0A002484[EndDiagnosticData]",
            "550 5.7.60 SMTP; Client does not have permissions to send as this sender",
        ] {
            let v = verdict(raw, Stage::AfterDot);
            assert_eq!(v.action, Action::BounceMessage, "{raw}");
            assert!(v.reason.contains("from = \"rewrite\""), "{}", v.reason);
        }
    }

    #[test]
    fn bad_credentials_are_auth_failures() {
        let v = verdict("535 5.7.3 Authentication unsuccessful", Stage::Auth);
        assert_eq!(v.action, Action::AuthFailed);
        assert!(!v.action.bounces());
        assert!(v.reason.contains("refreshing the OAuth2 token once"));
    }

    #[test]
    fn auth_disabled_holds_with_fix() {
        let (until, fix) = held(
            "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox. Visit https://aka.ms/smtp_auth_disabled for more information.",
            Stage::Auth,
        );
        assert_eq!(until, HoldUntil::Release);
        assert!(fix.contains(
            "Set-CASMailbox -Identity <mailbox> -SmtpClientAuthenticationDisabled $false"
        ));
        let (_, fix) = held(
            "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information.",
            Stage::Auth,
        );
        assert!(fix.contains("Set-TransportConfig -SmtpClientAuthenticationDisabled $false"));
        let (_, fix) = held(
            "535 5.7.139 Authentication unsuccessful, user is locked by your organization's security defaults policy. Contact your administrator.",
            Stage::Auth,
        );
        assert!(fix.contains("Security Defaults"));
        let (_, fix) = held(
            "535 5.7.139 Authentication unsuccessful, basic authentication is disabled.",
            Stage::Auth,
        );
        assert!(fix.contains("XOAUTH2"));
        let (_, fix) = held(
            "535 5.7.139 Authentication unsuccessful, the request did not meet the criteria to be authenticated successfully. Contact your administrator.",
            Stage::Auth,
        );
        assert!(fix.contains("Set-CASMailbox") && fix.contains("Set-TransportConfig"));
        let (_, fix) = held(
            "550 5.7.30 Basic authentication is not supported for Client Submission.",
            Stage::Mail,
        );
        assert!(fix.contains("XOAUTH2"));
        let (_, fix) = held("504 5.7.4 Unrecognized authentication type", Stage::Auth);
        assert!(fix.contains("never PLAIN"));
        let (_, fix) = held(
            "530 5.7.57 Client not authenticated to send mail. Error: 530 5.7.57 Client was not authenticated to send anonymous mail during MAIL FROM",
            Stage::Mail,
        );
        assert!(fix.contains("before a successful AUTH"));
        let (_, fix) = held(
            "421 4.7.66 TLS 1.0 and 1.1 are not supported. Please upgrade/update your client to support TLS 1.2. Visit https://aka.ms/smtp_auth_tls.",
            Stage::StartTls,
        );
        assert!(fix.contains("TLS 1.2"));
        let v = verdict("504 5.7.4 Unrecognized authentication type", Stage::Auth);
        assert!(v.action.alerts() && !v.action.bounces());
        assert!(v.reason.contains("server said: 504 5.7.4"));
    }

    #[test]
    fn outbound_spam_holds_until_next_utc_day() {
        for raw in [
            "550 5.1.8 Access denied, bad outbound sender. AS(42004)",
            "554 5.2.0 STOREDRV.Submission.Exception:OutboundSpamException; WASCL UserAction verdict is not None. Actual verdict is RefuseQuota, ShowTierUpgrade. OutboundSpamException: WASCL UserAction verdict is not None. [BeginDiagnosticData]Cannot submit message.[EndDiagnosticData]",
        ] {
            let (until, fix) = held(raw, Stage::AfterDot);
            assert_eq!(until, HoldUntil::NextUtcDay, "{raw}");
            assert!(fix.contains("Restricted entities"));
        }
    }

    #[test]
    fn sending_mailbox_full_holds() {
        let (until, fix) = held(
            "554 5.2.2 mailbox full; STOREDRV.Submission.Exception:QuotaExceededException.MapiExceptionQuotaExceeded; Failed to process message due to a permanent exception with message [BeginDiagnosticData]Cannot submit message.[EndDiagnosticData]",
            Stage::AfterDot,
        );
        assert_eq!(until, HoldUntil::Release);
        assert!(fix.contains("Sent Items"));
        // A full recipient mailbox at RCPT concerns only that recipient.
        assert_eq!(
            action("552 5.2.2 mailbox full", Stage::Rcpt),
            Action::BounceRecipient
        );
    }

    #[test]
    fn too_large_bounces_message() {
        for raw in [
            "552 5.3.4 Message size exceeds fixed maximum message size",
            "554 5.2.0 STOREDRV.Submission.Exception:MaxSubmissionExceededException; Failed to process message [BeginDiagnosticData]Cannot submit message.[EndDiagnosticData]",
        ] {
            let v = verdict(raw, Stage::AfterDot);
            assert_eq!(v.action, Action::BounceMessage, "{raw}");
            assert!(v.reason.contains("larger than"));
        }
    }

    #[test]
    fn too_many_recipients_split() {
        for (raw, stage) in [
            (
                "550 5.5.3 RESOLVER.ADR.RecipLimit; too many recipients",
                Stage::AfterDot,
            ),
            ("452 4.5.3 Too many recipients", Stage::Rcpt),
        ] {
            assert_eq!(action(raw, stage), Action::SplitRecipients, "{raw}");
        }
    }

    #[test]
    fn mailbox_logon_failure_defers_with_permission_hint() {
        let v = verdict(
            "430 4.2.0 STOREDRV; mailbox logon failure; Failed to process message due to a transient exception with message [BeginDiagnosticData]Cannot open mailbox.[EndDiagnosticData]",
            Stage::AfterDot,
        );
        match v.action {
            Action::Defer { hint: Some(h) } => {
                assert!(h.contains("Add-MailboxPermission -Identity <mailbox>"));
                assert!(h.contains("-AccessRights FullAccess"));
            }
            other => panic!("expected a deferral with hint, got {other:?}"),
        }
    }

    #[test]
    fn temporary_failures_defer() {
        for (raw, stage) in [
            ("421 4.3.2 Service not active", Stage::Greeting),
            (
                "451 4.7.0 Temporary server error. Please try again later. PRX4",
                Stage::AfterDot,
            ),
            ("451 4.3.111 Some transient failure", Stage::Rcpt),
            ("450 4.2.1 Mailbox temporarily unavailable", Stage::Rcpt),
            ("421 4.4.2 Connection dropped due to timeout", Stage::Data),
        ] {
            let v = verdict(raw, stage);
            assert_eq!(v.action, Action::Defer { hint: None }, "{raw}");
            assert!(!v.action.alerts());
        }
        let v = classify_no_reply(Stage::AfterDot, "connection reset\r\nby peer");
        assert_eq!(v.action, Action::Defer { hint: None });
        assert!(!v.reason.contains('\n'));
    }

    #[test]
    fn other_permanent_failures_bounce_by_stage() {
        let v = verdict(
            "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
            Stage::Rcpt,
        );
        assert_eq!(v.action, Action::BounceRecipient);
        assert!(
            v.reason
                .contains("550 5.1.10 RESOLVER.ADR.RecipientNotFound")
        );
        assert_eq!(
            action("550 5.1.7 Invalid address", Stage::Mail),
            Action::BounceMessage
        );
        assert_eq!(
            action("554 5.6.0 Corrupt message content", Stage::AfterDot),
            Action::BounceMessage
        );
        assert_eq!(
            action("554 5.5.1 No valid recipients", Stage::Data),
            Action::BounceMessage
        );
    }

    #[test]
    fn permanent_session_failures_hold_instead_of_bouncing_the_queue() {
        for stage in [Stage::Greeting, Stage::Ehlo, Stage::StartTls, Stage::Auth] {
            let a = action("554 5.7.1 Service unavailable; client host blocked", stage);
            assert!(matches!(a, Action::HoldAccount { .. }), "{stage}: {a:?}");
        }
    }

    #[test]
    fn positive_replies_are_accepted() {
        assert_eq!(
            action(
                "250 2.0.0 OK <abc@contoso.com> [Hostname=SYBP282MB2635.AUSP282.PROD.OUTLOOK.COM]",
                Stage::AfterDot
            ),
            Action::Accepted
        );
        assert_eq!(
            action("354 Start mail input; end with <CRLF>.<CRLF>", Stage::Data),
            Action::Accepted
        );
    }

    #[test]
    fn diagnostic_tail_with_codes_does_not_confuse() {
        // An IP in the tail must not look like 5.2.251.
        assert_eq!(
            action(
                "550 5.1.1 User unknown [BeginDiagnosticData]relay 10.5.2.251 said no[EndDiagnosticData]",
                Stage::Rcpt
            ),
            Action::BounceRecipient
        );
    }

    // --- delays ---

    #[test]
    fn backoff_doubles_from_one_minute_to_one_hour() {
        let mins: Vec<u64> = (0..10).map(|n| backoff(n).as_secs() / 60).collect();
        assert_eq!(mins, vec![1, 1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backoff(u32::MAX), BACKOFF_CAP);
    }

    #[test]
    fn pause_doubles_from_one_hour_to_a_day() {
        let hours: Vec<u64> = (1..8).map(|n| pause_for(n).as_secs() / 3600).collect();
        assert_eq!(hours, vec![1, 2, 4, 8, 16, 24, 24]);
        assert_eq!(pause_for(u32::MAX), PAUSE_CAP);
    }
}
