//! The SMTP client's connection: the socket (plain or TLS), its read buffer, and the
//! bounded reading of replies. A line of any length is read, but only a bounded part of
//! it is kept, a whole reply is bounded, and anything that is not SMTP breaks the
//! connection, as does any I/O error or timeout.
//!
//! Trusts nothing the server sends: every reply goes through [`Reply::parse`].

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use rustls::{ClientConnection, StreamOwned};

use super::{Failure, MAX_LINE_KEPT, MAX_REPLY_KEPT, MAX_REPLY_READ};
use crate::transport::classify::Stage;
use crate::transport::reply::{MAX_REPLY_LINES, Reply};

/// The socket, before or after TLS.
pub(super) enum Stream {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// Why a reply could not be read.
#[derive(Debug)]
enum ReadError {
    Io(io::Error),
    Closed,
    Protocol(String),
}

/// One reply as read: parsed, plus the kept lines' texts after the code (for EHLO).
#[derive(Debug)]
pub(super) struct Raw {
    pub(super) reply: Reply,
    pub(super) lines: Vec<String>,
}

/// Reads one line up to LF, keeping at most `keep` bytes of it (CR LF removed) and
/// consuming the rest, so the stream stays in step whatever the line's length.
fn read_line_bounded<R: BufRead>(
    r: &mut R,
    keep: usize,
    budget: &mut u64,
) -> Result<Vec<u8>, ReadError> {
    let mut kept = Vec::new();
    loop {
        let buf = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ReadError::Io(e)),
        };
        if buf.is_empty() {
            return Err(ReadError::Closed);
        }
        let (n, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if kept.len() < keep {
            let take = (keep - kept.len()).min(n);
            kept.extend_from_slice(&buf[..take]);
        }
        r.consume(n);
        // SECURITY: a server streaming an endless reply is cut off here.
        *budget = budget.checked_sub(n as u64).ok_or_else(|| {
            ReadError::Protocol(format!("reply longer than {MAX_REPLY_READ} bytes"))
        })?;
        if done {
            if kept.last() == Some(&b'\n') {
                kept.pop();
            }
            if kept.last() == Some(&b'\r') {
                kept.pop();
            }
            return Ok(kept);
        }
    }
}

/// Reads one complete reply (`NNN-text` lines ending in one `NNN text` line). Framing
/// is checked on every line as it is read; the kept text goes to [`Reply::parse`].
fn read_reply<R: BufRead>(r: &mut R) -> Result<Raw, ReadError> {
    let mut budget = MAX_REPLY_READ;
    let mut raw = String::new();
    let mut kept_lines = 0;
    let mut first: Option<[u8; 3]> = None;
    loop {
        let line = read_line_bounded(r, MAX_LINE_KEPT, &mut budget)?;
        let code: [u8; 3] = match line.get(..3) {
            Some(&[a, b, c]) if [a, b, c].iter().all(u8::is_ascii_digit) => [a, b, c],
            _ => {
                return Err(ReadError::Protocol(
                    "a reply line does not start with a three-digit code".into(),
                ));
            }
        };
        if first.is_some_and(|f| f != code) {
            return Err(ReadError::Protocol(
                "a multi-line reply changes its code".into(),
            ));
        }
        first = Some(code);
        let last = line.get(3) != Some(&b'-');
        // The first lines up to the bounds, and always the last, so the parser sees a
        // whole reply; lines in between are read and dropped.
        if last || (kept_lines + 1 < MAX_REPLY_LINES && raw.len() + line.len() < MAX_REPLY_KEPT) {
            raw.push_str(&String::from_utf8_lossy(&line));
            raw.push('\n');
            kept_lines += 1;
        }
        if last {
            break;
        }
    }
    let reply = Reply::parse(&raw).map_err(|e| ReadError::Protocol(e.to_string()))?;
    let lines = raw
        .lines()
        .map(|l| l.get(4..).unwrap_or("").to_owned())
        .collect();
    Ok(Raw { reply, lines })
}

pub(super) fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// The connection with its read buffer; `broken` once it can no longer be trusted to
/// be in step with the server.
pub(super) struct Conn {
    pub(super) io: BufReader<Stream>,
    timeout: Duration,
    /// Why the connection broke, if it did.
    pub(super) broken: Option<String>,
}

impl Conn {
    pub(super) fn new(stream: Stream, timeout: Duration) -> Conn {
        Conn {
            io: BufReader::with_capacity(16 * 1024, stream),
            timeout,
            broken: None,
        }
    }

    pub(super) fn break_with(&mut self, stage: Stage, detail: String) -> Failure {
        self.broken.get_or_insert_with(|| detail.clone());
        Failure::new(stage, detail)
    }

    fn io_failure(&mut self, stage: Stage, e: &io::Error, what: &str) -> Failure {
        let detail = if is_timeout(e) {
            format!("timed out after {:?} {what}", self.timeout)
        } else {
            format!("connection error {what}: {e}")
        };
        self.break_with(stage, detail)
    }

    fn check(&self, stage: Stage) -> Result<(), Failure> {
        match &self.broken {
            Some(why) => Err(Failure::new(
                stage,
                format!("connection unusable after an earlier error: {why}"),
            )),
            None => Ok(()),
        }
    }

    /// Writes `bytes` in one go (one TLS record stream, one `write` on a plain socket
    /// for all that fits the send buffer) and flushes.
    pub(super) fn send(&mut self, stage: Stage, bytes: &[u8]) -> Result<(), Failure> {
        self.check(stage)?;
        let stream = self.io.get_mut();
        match stream.write_all(bytes).and_then(|()| stream.flush()) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.io_failure(stage, &e, "sending to the server")),
        }
    }

    /// Reads the next reply, whatever its code.
    pub(super) fn read(&mut self, stage: Stage) -> Result<Raw, Failure> {
        self.check(stage)?;
        match read_reply(&mut self.io) {
            Ok(raw) => {
                if raw.reply.code == 421 {
                    // The server is closing the connection (RFC 5321 3.8).
                    self.broken = Some("the server sent 421".into());
                }
                Ok(raw)
            }
            Err(ReadError::Io(e)) => Err(self.io_failure(stage, &e, "waiting for the reply")),
            Err(ReadError::Closed) => Err(self.break_with(
                stage,
                "the server closed the connection without a reply".into(),
            )),
            Err(ReadError::Protocol(what)) => Err(self.break_with(
                stage,
                format!("protocol error: the server's reply is not SMTP ({what})"),
            )),
        }
    }

    /// Reads a reply that must be of `class` (2 or 3): 4xx and 5xx are the server's
    /// refusal, any other code is a protocol error.
    pub(super) fn expect(&mut self, stage: Stage, class: u16) -> Result<Raw, Failure> {
        let raw = self.read(stage)?;
        match raw.reply.class() {
            c if c == class => Ok(raw),
            4 | 5 => Err(Failure::refused(stage, raw.reply)),
            _ => Err(self.break_with(
                stage,
                format!("protocol error: unexpected reply {}", raw.reply),
            )),
        }
    }

    pub(super) fn command(
        &mut self,
        stage: Stage,
        line: &[u8],
        class: u16,
    ) -> Result<Raw, Failure> {
        self.send(stage, line)?;
        self.expect(stage, class)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::smtp::Offer;

    fn read(bytes: &[u8]) -> Result<Raw, ReadError> {
        // A small buffer, so lines arrive in many pieces as from a slow socket.
        read_reply(&mut BufReader::with_capacity(7, bytes))
    }

    #[test]
    fn multi_line_replies_are_read_whole() {
        let raw = read(b"250-mx.example Hello [127.0.0.1]\r\n250-SIZE 157286400\r\n250-PIPELINING\r\n250 SMTPUTF8\r\n").unwrap();
        assert_eq!(raw.reply.code, 250);
        assert_eq!(
            raw.lines,
            [
                "mx.example Hello [127.0.0.1]",
                "SIZE 157286400",
                "PIPELINING",
                "SMTPUTF8"
            ]
        );
        let offer = Offer::parse(raw.lines.iter().map(String::as_str));
        assert!(offer.pipelining && offer.smtputf8);
        // Bare LF and a code-only last line are accepted too.
        let raw = read(b"354-go\n354\n").unwrap();
        assert_eq!(raw.reply.code, 354);
    }

    #[test]
    fn a_long_line_is_read_and_the_stream_stays_in_step() {
        let tail = "x".repeat(5000);
        let wire = format!(
            "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; {tail}\r\n250 2.0.0 Resetting\r\n"
        );
        let mut r = BufReader::with_capacity(64, wire.as_bytes());
        let raw = read_reply(&mut r).unwrap();
        assert_eq!(raw.reply.code, 554);
        assert_eq!(raw.reply.enhanced, Some((5, 2, 0)));
        assert!(raw.reply.text.contains("SubmissionQuotaExceededException"));
        assert!(raw.reply.text.len() <= MAX_LINE_KEPT);
        // The rest of the long line was consumed: the next reply is read cleanly.
        assert_eq!(read_reply(&mut r).unwrap().reply.code, 250);
    }

    #[test]
    fn a_reply_beyond_the_caps_is_bounded_or_refused() {
        // 4,000 lines of 250 bytes (the emulator's LongReply): read through, kept bounded.
        let mut wire = String::new();
        for i in 0..4000 {
            wire.push_str(&format!("451-4.3.0 {i:04} {}\r\n", "x".repeat(240)));
        }
        wire.push_str("451 4.3.0 Long reply ends\r\n250 OK\r\n");
        let mut r = BufReader::new(wire.as_bytes());
        let raw = read_reply(&mut r).unwrap();
        assert_eq!(raw.reply.code, 451);
        assert!(raw.lines.len() <= MAX_REPLY_LINES);
        assert!(
            raw.lines
                .last()
                .is_some_and(|l| l.contains("Long reply ends"))
        );
        assert_eq!(read_reply(&mut r).unwrap().reply.code, 250);
        // A reply that never ends is cut off at MAX_REPLY_READ, not read forever.
        let endless = io::repeat(b'x').take(MAX_REPLY_READ + 10);
        let mut r = BufReader::new(b"250-".chain(endless));
        assert!(matches!(read_reply(&mut r), Err(ReadError::Protocol(_))));
        let endless_lines = b"250-more\r\n".repeat(2_000_000);
        assert!(matches!(read(&endless_lines), Err(ReadError::Protocol(_))));
    }

    #[test]
    fn garbage_and_truncation_are_not_replies() {
        for bad in [
            &b"* OK garbage \x01\x02 this is not an SMTP reply\r\n"[..],
            b"25 short\r\n",
            b"250-first\r\n550 second\r\n",
            b"250x\r\n",
        ] {
            assert!(
                matches!(read(bad), Err(ReadError::Protocol(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(matches!(read(b""), Err(ReadError::Closed)));
        assert!(matches!(read(b"250-more\r\n"), Err(ReadError::Closed)));
        assert!(matches!(read(b"250 no end"), Err(ReadError::Closed)));
    }
}
