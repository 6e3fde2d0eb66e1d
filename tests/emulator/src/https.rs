//! HTTP/1.1 plumbing shared by the token endpoint and Graph: the status reasons, a
//! bounded chunked-body reader, and writing an answer with Microsoft's usual headers.
//!
//! Input: bytes from the client under test, untrusted; every read is bounded.

use crate::clock::Civil;
use crate::io::Io;
use crate::token::uuid;

use std::collections::HashMap;

const MAX_HEADER_LINE: usize = 16 * 1024;

pub(crate) fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        403 => "Forbidden",
        413 => "Request Entity Too Large",
        401 => "Unauthorized",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// A `Transfer-Encoding: chunked` body, bounded by `MAX_BODY`; `None` on any malformation.
pub(crate) fn read_chunked(io: &mut Io, limit: u64) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line = io.read_line(MAX_HEADER_LINE).ok()?;
        let size_text = String::from_utf8_lossy(line);
        let size_text = size_text.trim().split(';').next().unwrap_or("");
        let size = u64::from_str_radix(size_text, 16).ok()?;
        // SECURITY: the body stays bounded even when sent in chunks.
        if body.len() as u64 + size > limit {
            return None;
        }
        if size == 0 {
            // Trailers up to the empty line.
            while !io.read_line(MAX_HEADER_LINE).ok()?.trim_ascii().is_empty() {}
            return Some(body);
        }
        io.read_exact_to(size, |b| body.extend_from_slice(b)).ok()?;
        io.read_line(MAX_HEADER_LINE).ok()?;
    }
}

/// A Graph answer: status, content type, body and extra headers (`Retry-After`).
pub(crate) struct HttpOut {
    pub(crate) status: u16,
    pub(crate) content_type: &'static str,
    pub(crate) body: Vec<u8>,
    pub(crate) headers: Vec<(&'static str, String)>,
}

pub(crate) fn respond_full(io: &mut Io, a: &HttpOut, close: bool) {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nCache-Control: no-cache\r\nrequest-id: {}\r\nclient-request-id: {}\r\nDate: {}\r\nContent-Length: {}\r\n",
        a.status,
        reason(a.status),
        uuid(),
        uuid(),
        Civil::now().rfc2822().replace("+0000", "GMT"),
        a.body.len(),
    );
    if !a.body.is_empty() {
        head.push_str(&format!("Content-Type: {}\r\n", a.content_type));
    }
    for (k, v) in &a.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    io.write(head.as_bytes());
    io.write(&a.body);
    let _ = io.flush();
}

pub(crate) fn respond(io: &mut Io, status: u16, json: &str, close: bool) {
    let head = format!(
        "HTTP/1.1 {status} {}\r\nCache-Control: no-store, no-cache\r\nPragma: no-cache\r\nContent-Type: application/json; charset=utf-8\r\nExpires: -1\r\nStrict-Transport-Security: max-age=31536000; includeSubDomains\r\nX-Content-Type-Options: nosniff\r\nx-ms-request-id: {}\r\nDate: {}\r\nContent-Length: {}\r\n{}\r\n",
        reason(status),
        uuid(),
        Civil::now().rfc2822().replace("+0000", "GMT"),
        json.len(),
        if close { "Connection: close\r\n" } else { "" },
    );
    io.write(head.as_bytes());
    io.write(json.as_bytes());
    let _ = io.flush();
}

pub(crate) fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'+', _) => out.push(b' '),
            (b'%', Some(v)) => {
                out.push(v);
                i += 2;
            }
            (c, _) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `application/x-www-form-urlencoded`; a repeated key keeps its first value.
pub(crate) fn parse_form(body: &[u8]) -> HashMap<String, String> {
    let mut form = HashMap::new();
    for pair in String::from_utf8_lossy(body).split('&') {
        if pair.is_empty() {
            continue;
        }
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        form.entry(percent_decode(k))
            .or_insert_with(|| percent_decode(v));
    }
    form
}
