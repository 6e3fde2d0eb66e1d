//! Just enough RFC 5322 / RFC 5321 parsing for the checks Exchange does after the dot:
//! the From header's address, the Message-ID, and SMTP paths with their parameters.
//!
//! Input is the client's message and command lines, fully untrusted: every function here is
//! total (no panics, bounded work) and answers `None` on anything it does not understand.

/// The first value of header `name` in the header block of `data`, unfolded and trimmed.
pub(crate) fn header_value(data: &[u8], name: &str) -> Option<String> {
    let mut found: Option<String> = None;
    for raw in data.split(|&b| b == b'\n') {
        let line = raw.strip_suffix(b"\r").unwrap_or(raw);
        if let Some(v) = found.as_mut() {
            if line.first().is_some_and(|&b| b == b' ' || b == b'\t') {
                v.push(' ');
                v.push_str(String::from_utf8_lossy(line).trim());
                continue;
            }
            break;
        }
        if line.is_empty() {
            return None;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let key = String::from_utf8_lossy(&line[..colon]);
        if key.trim_end().eq_ignore_ascii_case(name) {
            found = Some(
                String::from_utf8_lossy(&line[colon + 1..])
                    .trim()
                    .to_owned(),
            );
        }
    }
    found
}

/// Removes quoted strings and comments so that `<`, `,` and `@` inside display names do not confuse
/// the address search.
fn strip_quotes_and_comments(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut depth = 0u32;
    let mut quoted = false;
    let mut escape = false;
    for c in s.chars() {
        if escape {
            escape = false;
            continue;
        }
        match c {
            '\\' if quoted || depth > 0 => escape = true,
            '"' if depth == 0 => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted && depth > 0 => depth -= 1,
            _ if quoted || depth > 0 => {}
            _ => out.push(c),
        }
    }
    out
}

/// The first mailbox address in an address-list header value (`"A" <a@x>, b@y` → `a@x`).
pub(crate) fn first_address(value: &str) -> Option<String> {
    let s = strip_quotes_and_comments(value);
    let first = s.split(',').next()?.trim();
    let addr = match (first.find('<'), first.find('>')) {
        (Some(a), Some(b)) if a < b => &first[a + 1..b],
        _ => first,
    };
    // A group ("undisclosed-recipients:;") or garbage has no usable address.
    let addr = addr.trim();
    (addr.contains('@') && !addr.contains(char::is_whitespace)).then(|| addr.to_owned())
}

/// The argument of `MAIL FROM:` / `RCPT TO:` split into the path and its parameters.
/// `None` when there is no path at all.
pub(crate) fn parse_path(arg: &str) -> Option<(String, Vec<String>)> {
    let arg = arg.trim_start();
    let (path, rest) = if let Some(inner) = arg.strip_prefix('<') {
        let end = inner.find('>')?;
        (&inner[..end], &inner[end + 1..])
    } else {
        // Lenient like Exchange: a bare address without brackets.
        let end = arg.find(' ').unwrap_or(arg.len());
        (&arg[..end], &arg[end..])
    };
    if path.contains(char::is_whitespace) {
        return None;
    }
    // Source routes (`@a,@b:user@c`) are obsolete; keep the mailbox part.
    let path = path.rsplit_once(':').map_or(path, |(_, m)| m);
    let params = rest.split_ascii_whitespace().map(str::to_owned).collect();
    Some((path.to_owned(), params))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_folded_headers() {
        let msg = b"Subject: hi\r\nFrom: \"Doe, <John>\"\r\n <j@x.example>\r\nMessage-ID: <1@x>\r\n\r\nFrom: body@x\r\n";
        assert_eq!(
            header_value(msg, "from").as_deref(),
            Some("\"Doe, <John>\" <j@x.example>")
        );
        assert_eq!(header_value(msg, "Message-Id").as_deref(), Some("<1@x>"));
        assert_eq!(header_value(msg, "To"), None);
        assert_eq!(header_value(b"\r\nFrom: a@b\r\n", "From"), None);
    }

    #[test]
    fn extracts_addresses() {
        assert_eq!(
            first_address("\"Doe, <John>\" <j@x.example>").as_deref(),
            Some("j@x.example")
        );
        assert_eq!(first_address("a@x (Mr A), b@y").as_deref(), Some("a@x"));
        assert_eq!(first_address("Name <a@x>").as_deref(), Some("a@x"));
        assert_eq!(first_address("undisclosed-recipients:;"), None);
        assert_eq!(first_address(""), None);
        assert_eq!(first_address("(only a comment"), None);
    }

    #[test]
    fn parses_paths() {
        assert_eq!(
            parse_path("<a@x> SIZE=10 BODY=8BITMIME"),
            Some(("a@x".into(), vec!["SIZE=10".into(), "BODY=8BITMIME".into()]))
        );
        assert_eq!(parse_path(" <>"), Some((String::new(), vec![])));
        assert_eq!(
            parse_path("a@x NOTIFY=NEVER"),
            Some(("a@x".into(), vec!["NOTIFY=NEVER".into()]))
        );
        assert_eq!(parse_path("<@r:a@x>"), Some(("a@x".into(), vec![])));
        assert_eq!(parse_path("<a@x"), None);
        assert_eq!(parse_path("<a b@x>"), None);
    }
}
