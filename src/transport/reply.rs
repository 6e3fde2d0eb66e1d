//! SMTP reply parsing: one complete reply (`NNN-text` lines ending in one `NNN text`
//! line) into a code, an RFC 3463 enhanced status code and a sanitised text.
//!
//! Trust: reply text comes from the remote server and is untrusted. It is parsed strictly,
//! stripped of control characters and bounded in length (in bytes and in lines) before
//! anything (logs, DSNs, the classifier) can see it.

use std::fmt;

/// Longest reply text kept, in bytes; Exchange's diagnostic tails run to a few hundred.
pub const MAX_REPLY_TEXT: usize = 4096;

/// Most lines accepted in one multi-line reply; EHLO lists are the longest real ones.
pub const MAX_REPLY_LINES: usize = 100;

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
    pub(crate) fn mentions_range(&self, class: u8, subject: u16, lo: u16, hi: u16) -> bool {
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
// SECURITY: remote text ends up in logs and DSN headers; no CR, LF or other controls.
pub(crate) fn sanitize(text: &str, max: usize) -> String {
    crate::message::text::one_line_max(text, max)
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
/// The `dsn=` of a Postfix-style status line: the first enhanced status code in the
/// logged text (a reply such as `550 5.1.1 ...`), with its class made the outcome's
/// (`class`: 2 sent, 4 deferred, 5 bounced, as Postfix's soft_bounce does for a 5xx
/// that is deferred), else `class.0.0`.
pub fn log_dsn(text: &str, class: u8) -> String {
    match status_tokens(text).next() {
        Some((_, s, d)) => format!("{class}.{s}.{d}"),
        None => format!("{class}.0.0"),
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    const TAIL: &str =
        "[SY5P282MB2635.AUSP282.PROD.OUTLOOK.COM 2025-11-23T11:12:20.123Z 08DE2A6028D26C22]";

    fn reply(raw: &str) -> Reply {
        Reply::parse(&format!("{raw} {TAIL}\r\n")).unwrap()
    }

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
    fn log_dsn_takes_the_enhanced_code_in_the_outcomes_class() {
        assert_eq!(log_dsn("250 2.0.0 OK <x@y> [Hostname=AM0]", 2), "2.0.0");
        assert_eq!(
            log_dsn("550 5.1.10 RESOLVER.ADR.RecipientNotFound", 5),
            "5.1.10"
        );
        assert_eq!(log_dsn("451 4.7.500 Server busy", 4), "4.7.500");
        assert_eq!(log_dsn("554 5.2.252 SendAsDenied; quota", 4), "4.2.252");
        assert_eq!(
            log_dsn("connect to 10.1.2.3:587: Connection refused", 4),
            "4.0.0"
        );
        assert_eq!(log_dsn("", 2), "2.0.0");
    }

    #[test]
    fn dsn_status_falls_back_to_class() {
        assert_eq!(Reply::parse("550 no code").unwrap().dsn_status(), "5.0.0");
        assert_eq!(Reply::parse("451 4.7.0 x").unwrap().dsn_status(), "4.7.0");
        // A class that disagrees with the reply code is not trusted.
        assert_eq!(Reply::parse("550 4.7.0 x").unwrap().dsn_status(), "5.0.0");
    }
}
