//! Text from outside (a server's reply, a caller's header, an error that quotes
//! either) made safe for one line of a log, a header field or an SMTP reply. The one
//! scrubber every module uses.
//!
//! Pure; trusts nothing about its input.

/// Every control character (CR, LF, TAB, ESC, ...) becomes a space.
pub fn one_line(s: &str) -> String {
    // SECURITY: a CR or LF would end the log line, header field or reply and let the
    // text forge the next one.
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// [`one_line`], at most `max` bytes, cut at a character boundary; a cut text ends
/// in `...` (beyond `max`).
pub fn one_line_max(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max));
    for c in s.chars() {
        if out.len() + c.len_utf8() > max {
            out.push_str("...");
            break;
        }
        out.push(if c.is_control() { ' ' } else { c });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_become_spaces_and_nothing_else_changes() {
        assert_eq!(one_line("a\r\nb\tc\u{1b}d é"), "a  b c d é");
        assert_eq!(one_line(""), "");
    }

    #[test]
    fn bounded_text_is_cut_at_a_character_boundary() {
        assert_eq!(one_line_max("abc", 3), "abc");
        assert_eq!(one_line_max("abcd", 3), "abc...");
        assert_eq!(one_line_max("aé", 2), "a...");
        assert_eq!(one_line_max("a\nb", 10), "a b");
    }
}
