//! Reading what an SMTP client sends, with memory bounded whatever it sends: command
//! lines cut at a maximum (the rest read and dropped), and message data up to the
//! lone dot, dot-unstuffed, kept only up to the size limit.
//!
//! SMTP smuggling: only `<CR><LF>.<CR><LF>` ends message data, and data holding a bare
//! LF is refused whole, as Postfix 3.9 does with `smtpd_forbid_bare_newline = reject`;
//! so no byte sequence that another server would read as the end of the message (LF
//! `.` LF, CRLF `.` LF, LF `.` CRLF, CR `.` CRLF) ends it here, nor starts a second one.
//! Command lines may still end in a bare LF (Postfix's `normalize` does the same).
//!
//! Trusts nothing: every byte comes from the client.

use std::io::{self, BufRead};

/// Message data is read in pieces of at most this size, so a line without end
/// cannot grow a buffer beyond the message size limit.
pub(super) const DATA_PIECE: usize = 64 * 1024;

/// How message data ended.
pub(super) enum Data {
    Message(Vec<u8>),
    TooBig,
    Nul {
        line: usize,
    },
    /// A line ended in LF without CR (the first such line).
    BareLf {
        line: usize,
    },
    Eof,
}

/// How reading a command line ended.
pub(super) enum Line {
    Complete,
    TooLong,
    Eof,
}

/// Appends input to `buf` through the next LF, or until `max` bytes were appended or
/// the input ended. Returns the count appended and whether an LF ended the piece.
fn read_piece(
    input: &mut impl BufRead,
    buf: &mut Vec<u8>,
    max: usize,
) -> io::Result<(usize, bool)> {
    let mut total = 0;
    while total < max {
        let avail = match input.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if avail.is_empty() {
            break;
        }
        let limit = avail.len().min(max - total);
        let (take, lf) = match avail[..limit].iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (limit, false),
        };
        buf.extend_from_slice(&avail[..take]);
        input.consume(take);
        total += take;
        if lf {
            return Ok((total, true));
        }
    }
    Ok((total, false))
}

/// Reads one command line (with its line ending) into `buf`, keeping at most `max`
/// bytes: the rest of a longer line is read and dropped, so memory stays bounded.
pub(super) fn read_line(
    input: &mut impl BufRead,
    buf: &mut Vec<u8>,
    max: usize,
) -> io::Result<Line> {
    buf.clear();
    let (n, lf) = read_piece(input, buf, max)?;
    if n == 0 {
        return Ok(Line::Eof);
    }
    if lf || n < max {
        // n < max without an LF: the input ended; a last line without a newline still
        // counts as a command (Postfix reads it the same way).
        return Ok(Line::Complete);
    }
    buf.clear();
    let mut scratch = Vec::with_capacity(4096);
    loop {
        scratch.clear();
        let (n, lf) = read_piece(input, &mut scratch, 4096)?;
        if n == 0 || lf {
            return Ok(Line::TooLong);
        }
    }
}

/// Reads message data up to `<CR><LF>.<CR><LF>`, undoing dot-stuffing. A line ending
/// in a bare LF makes the whole message [`Data::BareLf`] (the reading goes on to the
/// real end, so what follows is never taken for commands). Past `max` bytes, or once
/// a bare LF was seen, the data is read and dropped, so memory stays bounded.
pub(super) fn read_data(input: &mut impl BufRead, max: u64) -> io::Result<Data> {
    let mut out: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut piece = Vec::with_capacity(4096);
    // The previous piece ended a line (dot-unstuffing and the end apply to line starts).
    let mut at_start = true;
    // It ended the line with CRLF: only then can a lone dot end the data.
    let mut after_crlf = true;
    // The previous piece ended without an LF but with a CR (a CRLF split across pieces).
    let mut pending_cr = false;
    let mut line_no = 0;
    let mut too_big = false;
    let mut nul = None;
    let mut bare_lf = None;
    loop {
        piece.clear();
        let (n, lf) = read_piece(input, &mut piece, DATA_PIECE)?;
        if n == 0 {
            // The input ended before the terminating dot: nothing is queued.
            return Ok(Data::Eof);
        }
        if at_start {
            line_no += 1;
        }
        let mut content: &[u8] = &piece;
        let mut crlf = false;
        if lf {
            content = &content[..content.len() - 1];
            if let Some(c) = content.strip_suffix(b"\r") {
                content = c;
                crlf = true;
            } else if content.is_empty() && pending_cr {
                // The CR of this CRLF ended the previous piece.
                crlf = true;
                if out.last() == Some(&b'\r') {
                    out.pop();
                }
            } else if bare_lf.is_none() {
                // SECURITY: a bare LF is how SMTP smuggling hides a second message
                // from one server and shows it to the next; the message is refused.
                bare_lf = Some(line_no);
            }
        }
        if at_start {
            // SECURITY: only CRLF . CRLF ends the data.
            if after_crlf && crlf && content == b"." {
                break;
            }
            if let Some(unstuffed) = content.strip_prefix(b".") {
                content = unstuffed;
            }
        }
        if nul.is_none() && content.contains(&0) {
            nul = Some(line_no);
        }
        if !too_big && bare_lf.is_none() {
            out.extend_from_slice(content);
            if lf {
                out.extend_from_slice(b"\r\n");
            }
            // SECURITY: past the limit nothing more is kept, whatever the client sends.
            if out.len() as u64 > max {
                too_big = true;
                out = Vec::new();
            }
        }
        pending_cr = !lf && piece.last() == Some(&b'\r');
        at_start = lf;
        after_crlf = crlf;
    }
    Ok(if let Some(line) = bare_lf {
        Data::BareLf { line }
    } else if too_big {
        Data::TooBig
    } else if let Some(line) = nul {
        Data::Nul { line }
    } else {
        Data::Message(out)
    })
}
