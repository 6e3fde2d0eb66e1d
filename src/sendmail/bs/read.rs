//! Reading what an SMTP client sends, with memory bounded whatever it sends: command
//! lines cut at a maximum (the rest read and dropped), and message data up to the
//! lone dot, dot-unstuffed, kept only up to the size limit.
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
    Nul { line: usize },
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

/// Reads message data up to the line holding a single dot, undoing dot-stuffing and
/// storing CRLF line endings (LF alone is accepted, as Postfix does). Past `max` bytes
/// the data is read and dropped, so memory stays bounded.
pub(super) fn read_data(input: &mut impl BufRead, max: u64) -> io::Result<Data> {
    let mut out: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut piece = Vec::with_capacity(4096);
    let mut at_start = true;
    let mut line_no = 0;
    let mut too_big = false;
    let mut nul = None;
    loop {
        piece.clear();
        let (n, lf) = read_piece(input, &mut piece, DATA_PIECE)?;
        if n == 0 {
            // The input ended before the terminating dot: nothing is queued.
            return Ok(Data::Eof);
        }
        let mut content: &[u8] = &piece;
        if lf {
            content = &content[..content.len() - 1];
            if let Some(c) = content.strip_suffix(b"\r") {
                content = c;
            } else if content.is_empty() && !at_start && !too_big && out.last() == Some(&b'\r') {
                // The CR of this CRLF ended the previous piece.
                out.pop();
            }
        }
        if at_start {
            line_no += 1;
            if lf && content == b"." {
                break;
            }
            if let Some(unstuffed) = content.strip_prefix(b".") {
                content = unstuffed;
            }
        }
        if nul.is_none() && content.contains(&0) {
            nul = Some(line_no);
        }
        if !too_big {
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
        at_start = lf;
    }
    Ok(if too_big {
        Data::TooBig
    } else if let Some(line) = nul {
        Data::Nul { line }
    } else {
        Data::Message(out)
    })
}
