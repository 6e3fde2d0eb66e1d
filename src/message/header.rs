//! The header block reader: splits a CRLF message into header fields and body,
//! keeping every byte the caller wrote.
//!
//! Trusts nothing: input is whatever a local program piped into `sendmail`. Raw
//! 8-bit and UTF-8 header bytes are kept as they are (PHP writes them).

/// One header field, all of its lines, exactly as written (each line ends in CRLF).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    raw: Vec<u8>,
    name_len: usize,
}

impl Header {
    /// Builds a header from a name and a value (one line; the caller folds if needed).
    pub fn new(name: &str, value: &str) -> Header {
        let raw = format!("{name}: {value}\r\n").into_bytes();
        Header {
            raw,
            name_len: name.len(),
        }
    }

    /// The field name as written (without trailing blanks).
    pub fn name(&self) -> &str {
        // The reader only accepts printable ASCII names, so this cannot fail for parsed
        // headers; built headers use a &str name.
        std::str::from_utf8(&self.raw[..self.name_len]).unwrap_or("")
    }

    /// Case-insensitive name comparison.
    pub fn is(&self, name: &str) -> bool {
        self.name().eq_ignore_ascii_case(name)
    }

    /// All lines of the field, including the name and the final CRLF.
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    /// Where the value starts in [`Header::raw`]: just after the colon.
    pub fn value_offset(&self) -> usize {
        self.raw[self.name_len..]
            .iter()
            .position(|&b| b == b':')
            .map_or(self.raw.len(), |p| self.name_len + p + 1)
    }

    /// Replaces the field's bytes, keeping its name: for edits of the value only.
    pub(crate) fn set_raw(&mut self, raw: Vec<u8>) {
        debug_assert!(raw.starts_with(&self.raw[..self.value_offset()]));
        self.raw = raw;
    }
}

/// A message split into its header block and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub headers: Vec<Header>,
    /// Everything after the empty separator line (CRLF line endings).
    pub body: Vec<u8>,
}

/// Why input cannot be a header block.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error(
        "line {line}: the message starts with a continuation line (a line beginning with a space or tab); the first line must be a header such as \"Subject: ...\""
    )]
    ContinuationFirst { line: usize },
    #[error(
        "line {line}: {text:?} is not a header (a header name cannot contain spaces or control characters); end the headers with an empty line before the body"
    )]
    BadName { line: usize, text: String },
    #[error(
        "line {line}: {text:?} is not a header (no colon); end the headers with an empty line before the body"
    )]
    NoColon { line: usize, text: String },
}

/// Where a line's field name ends, if the line is a header line.
enum LineKind {
    Header(usize),
    Continuation,
    NoColon,
    BadName,
}

fn classify(line: &[u8]) -> LineKind {
    if matches!(line.first(), Some(b' ' | b'\t')) {
        return LineKind::Continuation;
    }
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return LineKind::NoColon;
    };
    // RFC 5322's obsolete syntax allows blanks between the name and the colon.
    let name = &line[..colon];
    let name_len = name.len()
        - name
            .iter()
            .rev()
            .take_while(|&&b| b == b' ' || b == b'\t')
            .count();
    let name = &name[..name_len];
    if name.is_empty() || !name.iter().all(|&b| (33..=126).contains(&b)) {
        return LineKind::BadName;
    }
    LineKind::Header(name_len)
}

/// Shows an offending line in an error without flooding the terminal.
fn excerpt(line: &[u8]) -> String {
    let s = String::from_utf8_lossy(line);
    let mut out: String = s.chars().take(60).collect();
    if s.chars().count() > 60 {
        out.push_str("...");
    }
    out
}

/// Splits `input` (CRLF line endings, final CRLF present) into headers and body.
///
/// Postfix's rules: a message whose first line is not a header is all body; one with
/// no empty line is all headers. A leading mbox `From ` line is dropped. A continuation
/// line first, or a later line that is not a header, is refused with its line number.
pub fn parse(input: &[u8]) -> Result<Message, HeaderError> {
    let mut headers: Vec<Header> = Vec::new();
    let mut pos = 0;
    let mut line_no = 0;
    while pos < input.len() {
        let end = input[pos..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .map_or(input.len(), |i| pos + i + 2);
        let line = &input[pos..end];
        let content = line.strip_suffix(b"\r\n").unwrap_or(line);
        line_no += 1;
        if content.is_empty() {
            return Ok(Message {
                headers,
                body: input[end..].to_vec(),
            });
        }
        if line_no == 1
            && content.starts_with(b"From ")
            && !matches!(classify(content), LineKind::Header(_))
        {
            // An mbox envelope line, as mail(1) and some scripts still write; `From : x`
            // is a From header in the obsolete syntax, not one.
            pos = end;
            continue;
        }
        match classify(content) {
            LineKind::Header(name_len) => headers.push(Header {
                raw: line.to_vec(),
                name_len,
            }),
            LineKind::Continuation => match headers.last_mut() {
                Some(h) => h.raw.extend_from_slice(line),
                None => return Err(HeaderError::ContinuationFirst { line: line_no }),
            },
            kind @ (LineKind::NoColon | LineKind::BadName) => {
                if headers.is_empty() {
                    return Ok(Message {
                        headers,
                        body: input[pos..].to_vec(),
                    });
                }
                let text = excerpt(content);
                return Err(match kind {
                    LineKind::NoColon => HeaderError::NoColon {
                        line: line_no,
                        text,
                    },
                    _ => HeaderError::BadName {
                        line: line_no,
                        text,
                    },
                });
            }
        }
        pos = end;
    }
    Ok(Message {
        headers,
        body: Vec::new(),
    })
}

impl Message {
    /// The first header with this name.
    pub fn get(&self, name: &str) -> Option<&Header> {
        self.headers.iter().find(|h| h.is(name))
    }

    /// Whether a header with this name exists.
    pub fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Removes every header with this name.
    pub fn remove(&mut self, name: &str) {
        self.headers.retain(|h| !h.is(name));
    }

    /// Headers, the empty separator line, and the body.
    pub fn to_bytes(&self) -> Vec<u8> {
        let len = self.headers.iter().map(|h| h.raw.len()).sum::<usize>() + 2 + self.body.len();
        let mut out = Vec::with_capacity(len);
        for h in &self.headers {
            out.extend_from_slice(&h.raw);
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&self.body);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_headers_and_body_keeping_bytes() {
        let m = parse(b"Subject: h\xc3\xa9\r\nTo: a@b,\r\n c@d\r\n\r\nbody\r\n").unwrap();
        assert_eq!(m.headers.len(), 2);
        assert_eq!(m.headers[0].name(), "Subject");
        assert_eq!(m.headers[1].raw(), b"To: a@b,\r\n c@d\r\n");
        assert_eq!(m.body, b"body\r\n");
        assert_eq!(
            m.to_bytes(),
            b"Subject: h\xc3\xa9\r\nTo: a@b,\r\n c@d\r\n\r\nbody\r\n"
        );
    }

    #[test]
    fn no_separator_is_all_headers() {
        let m = parse(b"Subject: x\r\nTo: y\r\n").unwrap();
        assert_eq!(m.headers.len(), 2);
        assert!(m.body.is_empty());
    }

    #[test]
    fn first_line_not_a_header_is_all_body() {
        let m = parse(b"Hello there\r\nSubject: not a header\r\n").unwrap();
        assert!(m.headers.is_empty());
        assert_eq!(m.body, b"Hello there\r\nSubject: not a header\r\n");
    }

    #[test]
    fn continuation_first_is_refused() {
        assert_eq!(
            parse(b" folded\r\nSubject: x\r\n"),
            Err(HeaderError::ContinuationFirst { line: 1 })
        );
    }

    #[test]
    fn later_bad_lines_are_refused_with_their_line_number() {
        let e = parse(b"Subject: x\r\nBad Header: y\r\n\r\n").unwrap_err();
        assert!(matches!(e, HeaderError::BadName { line: 2, .. }), "{e:?}");
        let e = parse(b"Subject: x\r\nTo: a\r\nno colon here\r\n\r\n").unwrap_err();
        assert!(matches!(e, HeaderError::NoColon { line: 3, .. }), "{e:?}");
        assert!(e.to_string().contains("no colon here"));
    }

    #[test]
    fn blank_before_colon_is_obsolete_but_valid() {
        let m = parse(b"Subject : x\r\n\r\n").unwrap();
        assert!(m.get("subject").is_some());
    }

    #[test]
    fn mbox_from_line_is_dropped() {
        let m = parse(b"From root Thu Nov 26 10:00:00 2026\r\nSubject: x\r\n\r\nb\r\n").unwrap();
        assert_eq!(m.headers.len(), 1);
    }

    #[test]
    fn obsolete_from_header_first_is_not_an_mbox_line() {
        // Found by fuzzing (fuzz/ header): `From : x` on the first line was dropped as
        // an mbox envelope line, so completion replaced the caller's From.
        let m = parse(b"From : a@b.example\r\nSubject: x\r\n\r\nb\r\n").unwrap();
        assert_eq!(m.headers.len(), 2);
        assert!(m.has("from"));
        assert_eq!(
            m.to_bytes(),
            b"From : a@b.example\r\nSubject: x\r\n\r\nb\r\n"
        );
    }

    #[test]
    fn remove_and_has() {
        let mut m = parse(b"Bcc: a\r\nbcc: b\r\nTo: c\r\n\r\n").unwrap();
        m.remove("BCC");
        assert!(!m.has("bcc"));
        assert!(m.has("to"));
    }
}
