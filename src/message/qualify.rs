//! Qualifies bare local names in address headers (`To: root` becomes
//! `To: root@web1.contoso.com`), as Postfix's cleanup does for mail submitted with
//! sendmail: cron, mailx and many scripts write unqualified names, and a recipient's
//! mail program cannot reply to them.
//!
//! Only the missing `@domain` is inserted; every other byte of the field (display
//! names, comments, encoded words, folding, 8-bit text) stays as the caller wrote it.
//! Input is untrusted: a value the scanner does not understand is left alone.

use super::header::Header;

/// The fields Postfix rewrites in message headers (cleanup's address header list).
const ADDRESS_FIELDS: [&str; 9] = [
    "From",
    "Sender",
    "Reply-To",
    "To",
    "Cc",
    "Resent-From",
    "Resent-Sender",
    "Resent-To",
    "Resent-Cc",
];

/// Whether `header` is one whose addresses are qualified.
pub fn is_address_field(header: &Header) -> bool {
    ADDRESS_FIELDS.iter().any(|n| header.is(n))
}

/// Positions in `value` after which `@domain` belongs: the end of every address in the
/// list that has no `@`. Empty when nothing needs qualifying or the value is not a
/// list this scanner follows (an unbalanced quote, comment or angle bracket).
pub fn bare_address_ends(value: &[u8]) -> Vec<usize> {
    let mut ends = Vec::new();
    let mut piece = Piece::default();
    let (mut quoted, mut depth) = (false, 0u32);
    let mut i = 0;
    while i < value.len() {
        let b = value[i];
        if quoted {
            match b {
                b'\\' => i += 1,
                b'"' => quoted = false,
                _ => {}
            }
            piece.word(i);
        } else if depth > 0 {
            match b {
                b'\\' => i += 1,
                b'(' => depth += 1,
                b')' => depth -= 1,
                _ => {}
            }
        } else {
            match b {
                b'"' => {
                    quoted = true;
                    piece.word(i);
                }
                b'(' => {
                    depth = 1;
                    piece.gap();
                }
                b'<' if piece.angle.is_none() => piece.angle = Some((i, None)),
                b'>' => match &mut piece.angle {
                    Some((_, close @ None)) => *close = Some(i),
                    _ => return Vec::new(),
                },
                b':' if piece.angle.is_none() => {
                    // A group's display name ("team: a, b;"): the address follows.
                    piece = Piece::default();
                }
                b',' | b';' if !piece.in_angle() => {
                    ends.extend(piece.bare_end(value));
                    piece = Piece::default();
                }
                b' ' | b'\t' | b'\r' | b'\n' => piece.gap(),
                _ if piece.in_angle() => {}
                _ => piece.word(i),
            }
        }
        i += 1;
    }
    if quoted || depth > 0 || piece.in_angle() {
        return Vec::new();
    }
    ends.extend(piece.bare_end(value));
    ends
}

/// One list member as the scanner goes through it.
#[derive(Default)]
struct Piece {
    /// Byte ranges of the words outside angle brackets and comments.
    words: Vec<(usize, usize)>,
    /// Whether the next word byte starts a new word.
    broken: bool,
    /// `<` and, once seen, `>`.
    angle: Option<(usize, Option<usize>)>,
}

impl Piece {
    fn in_angle(&self) -> bool {
        matches!(self.angle, Some((_, None)))
    }

    fn word(&mut self, i: usize) {
        match self.words.last_mut() {
            Some((_, end)) if !self.broken => *end = i + 1,
            _ => self.words.push((i, i + 1)),
        }
        self.broken = false;
    }

    fn gap(&mut self) {
        self.broken = true;
    }

    /// Where `@domain` goes if this member's address is a bare local name.
    fn bare_end(&self, value: &[u8]) -> Option<usize> {
        let (start, end) = match self.angle {
            // "Name <root>": the address is what the brackets hold.
            Some((open, Some(close))) => (open + 1, close),
            Some((_, None)) => return None,
            // "root" or "root (comment)": exactly one word, no display name.
            None => match self.words.as_slice() {
                [(s, e)] => (*s, *e),
                _ => return None,
            },
        };
        let addr = value.get(start..end)?;
        let trimmed = addr.trim_ascii();
        let bare = !trimmed.is_empty()
            && !trimmed.contains(&b'@')
            && trimmed.iter().all(|&b| b >= b' ' && b != 0x7f);
        let offset = addr.len() - addr.trim_ascii_start().len() + trimmed.len();
        bare.then_some(start + offset)
    }
}

/// Qualifies the bare names in every address field of `headers` with `domain`.
pub fn qualify_headers(headers: &mut [Header], domain: &str) {
    for h in headers.iter_mut().filter(|h| is_address_field(h)) {
        let value_at = h.value_offset();
        let ends = bare_address_ends(&h.raw()[value_at..]);
        if ends.is_empty() {
            continue;
        }
        let raw = h.raw();
        let mut out = Vec::with_capacity(raw.len() + ends.len() * (domain.len() + 1));
        let mut from = 0;
        for e in ends {
            out.extend_from_slice(&raw[from..value_at + e]);
            out.push(b'@');
            out.extend_from_slice(domain.as_bytes());
            from = value_at + e;
        }
        out.extend_from_slice(&raw[from..]);
        h.set_raw(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(value: &str) -> String {
        let mut h = vec![Header::new("To", value)];
        qualify_headers(&mut h, "example.com");
        let raw = String::from_utf8(h[0].raw().to_vec()).unwrap();
        raw.strip_prefix("To: ")
            .unwrap()
            .strip_suffix("\r\n")
            .unwrap()
            .to_string()
    }

    #[test]
    fn bare_names_get_the_domain() {
        assert_eq!(q("root"), "root@example.com");
        assert_eq!(q("root (Cron Daemon)"), "root@example.com (Cron Daemon)");
        assert_eq!(q("Ops <root>"), "Ops <root@example.com>");
        assert_eq!(q("a, b@x.org, c"), "a@example.com, b@x.org, c@example.com");
        assert_eq!(
            q("team: a, \"Bee\" <b>;"),
            "team: a@example.com, \"Bee\" <b@example.com>;"
        );
        assert_eq!(q("\"john doe\""), "\"john doe\"@example.com");
        assert_eq!(
            q("=?utf-8?q?J=C3=B6rg?= <joerg>"),
            "=?utf-8?q?J=C3=B6rg?= <joerg@example.com>"
        );
    }

    #[test]
    fn qualified_and_odd_values_are_left_alone() {
        for v in [
            "a@b.org",
            "\"a@b\" <c@d.org>",
            "Some Name",
            "",
            "undisclosed-recipients:;",
            "\"unterminated",
            "(open comment",
            "a <b",
            "a > b",
            "<>",
        ] {
            assert_eq!(q(v), v, "{v}");
        }
    }

    #[test]
    fn folding_and_other_fields_are_kept() {
        let mut h = vec![
            Header::new("To", "a,\r\n\tb"),
            Header::new("Subject", "root"),
            Header::new("cc", "x"),
        ];
        qualify_headers(&mut h, "example.com");
        assert_eq!(h[0].raw(), b"To: a@example.com,\r\n\tb@example.com\r\n");
        assert_eq!(h[1].raw(), b"Subject: root\r\n");
        assert_eq!(h[2].raw(), b"cc: x@example.com\r\n");
    }
}
