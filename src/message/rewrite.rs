//! The From policy applied at delivery: Exchange Online only accepts a From the
//! mailbox may send as, so by default the address becomes the mailbox while the
//! display name (the one written, a name written as a comment, or "user on domain")
//! still tells the recipient who wrote, and Reply-To carries every original address.
//!
//! Input: a queued message (CRLF, headers completed at intake). Pure logic.

use super::address;
use super::complete::display_name;
use super::header::{self, Header};
use serde::Deserialize;

/// What happens to the From header of outgoing mail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FromPolicy {
    /// Replace the address with the mailbox, keep the display name, put the original
    /// in Reply-To when there was none.
    Rewrite,
    /// Leave it (the mailbox needs Send As rights for every From used).
    Preserve,
    /// As rewrite, and always set Reply-To to the original From.
    ReplyTo,
}

/// The From header's addresses, and the display name of the first that has one
/// (a phrase, or else a comment as in `root@host (Cron Daemon)`).
fn original_from(h: &Header) -> (Vec<String>, Option<String>) {
    let mut addrs = Vec::new();
    let mut name = None;
    if let Ok((parsed, _)) = mailparse::parse_header(h.raw())
        && let Ok(list) = mailparse::addrparse_header(&parsed)
    {
        for item in list.iter() {
            let singles: Vec<&mailparse::SingleInfo> = match item {
                mailparse::MailAddr::Single(info) => vec![info],
                mailparse::MailAddr::Group(g) => g.addrs.iter().collect(),
            };
            for info in singles {
                if name.is_none() {
                    name = info.display_name.clone().filter(|n| !n.trim().is_empty());
                }
                if !info.addr.is_empty() {
                    addrs.push(info.addr.clone());
                }
            }
        }
    }
    if addrs.is_empty()
        && let Ok(list) = address::parse_list(h.raw())
    {
        addrs = list.into_iter().map(|a| a.to_string()).collect();
    }
    if name.is_none() {
        name = comment_name(&h.raw()[h.value_offset()..]);
    }
    (addrs, name)
}

/// The text of the first comment outside quotes (`addr (Name)`), unfolded; nested
/// parentheses and quoted pairs are kept as text.
fn comment_name(value: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(value);
    let mut depth = 0usize;
    let mut quoted = false;
    let mut escaped = false;
    let mut out = String::new();
    for c in text.chars() {
        if escaped {
            if depth > 0 {
                out.push(c);
            }
            escaped = false;
            continue;
        }
        match c {
            '\\' => escaped = true,
            '"' if depth == 0 => quoted = !quoted,
            '(' if !quoted => {
                if depth > 0 {
                    out.push(c);
                }
                depth += 1;
            }
            ')' if !quoted && depth > 0 => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
                out.push(c);
            }
            c if depth > 0 => out.push(if c.is_control() { ' ' } else { c }),
            _ => {}
        }
    }
    let name = out.split_whitespace().collect::<Vec<_>>().join(" ");
    (!name.is_empty()).then_some(name)
}

/// Applies `policy` for `mailbox`; `domain` (the configured `domain`) names where the
/// mail came from in a generated display name (`"www-data on example.com"`). Returns
/// the message unchanged when nothing applies.
pub fn apply(message: &[u8], mailbox: &str, policy: FromPolicy, domain: &str) -> Vec<u8> {
    if policy == FromPolicy::Preserve {
        return message.to_vec();
    }
    let Ok(mut msg) = header::parse(message) else {
        return message.to_vec();
    };
    let Some(pos) = msg.headers.iter().position(|h| h.is("From")) else {
        msg.headers.insert(0, Header::new("From", mailbox));
        return msg.to_bytes();
    };
    let (orig_addrs, orig_name) = original_from(&msg.headers[pos]);
    let same = orig_addrs.len() == 1 && orig_addrs[0].eq_ignore_ascii_case(mailbox);
    if same && policy == FromPolicy::Rewrite {
        return message.to_vec();
    }
    if !same {
        let first = orig_addrs.first().map_or("", String::as_str);
        let local = first.rsplit_once('@').map_or(first, |(l, _)| l);
        let name = orig_name.unwrap_or_else(|| {
            if local.is_empty() {
                domain.to_string()
            } else {
                format!("{local} on {domain}")
            }
        });
        msg.headers[pos] = Header::new("From", &from_value(&name, mailbox));
    }
    let has_reply_to = msg.has("Reply-To");
    let want_reply_to = !orig_addrs.is_empty()
        && !same
        && match policy {
            FromPolicy::Rewrite => !has_reply_to,
            FromPolicy::ReplyTo => true,
            FromPolicy::Preserve => false,
        };
    if want_reply_to {
        msg.remove("Reply-To");
        // Removing a Reply-To written above the From moved the From up.
        let after_from = msg
            .headers
            .iter()
            .position(|h| h.is("From"))
            .map_or(0, |p| p + 1);
        let list: Vec<String> = orig_addrs.iter().map(|a| format!("<{a}>")).collect();
        msg.headers
            .insert(after_from, Header::new("Reply-To", &list.join(",\r\n ")));
    }
    msg.to_bytes()
}

/// `name <mailbox>` for a From field, folded so that no line passes 78 characters
/// when the name is a run of encoded words.
fn from_value(name: &str, mailbox: &str) -> String {
    let phrase = display_name(name);
    let last_line = phrase.rsplit("\r\n").next().unwrap_or("").len();
    // "From: " heads the first line.
    let used = if phrase.contains("\r\n") {
        last_line
    } else {
        last_line + 6
    };
    if phrase.starts_with("=?") && used + mailbox.len() + 3 > 78 {
        format!("{phrase}\r\n <{mailbox}>")
    } else {
        format!("{phrase} <{mailbox}>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(input: &str, policy: FromPolicy) -> String {
        String::from_utf8(apply(
            input.as_bytes(),
            "app@contoso.com",
            policy,
            "example.com",
        ))
        .unwrap()
    }

    #[test]
    fn rewrite_keeps_the_name_and_adds_reply_to() {
        let out = run(
            "From: \"Web Shop\" <shop@web1.example>\r\nSubject: x\r\n\r\nb\r\n",
            FromPolicy::Rewrite,
        );
        assert!(
            out.starts_with(
                "From: \"Web Shop\" <app@contoso.com>\r\nReply-To: <shop@web1.example>\r\n"
            ),
            "{out}"
        );
    }

    #[test]
    fn rewrite_names_user_on_the_configured_domain_when_there_is_no_name() {
        let out = run(
            "From: www-data@web1.example.com\r\n\r\nb\r\n",
            FromPolicy::Rewrite,
        );
        assert!(
            out.contains("From: \"www-data on example.com\" <app@contoso.com>\r\n"),
            "{out}"
        );
    }

    #[test]
    fn a_name_written_as_a_comment_is_kept() {
        let out = run(
            "From: root@example.com (Cron Daemon)\r\n\r\nb\r\n",
            FromPolicy::Rewrite,
        );
        assert!(
            out.starts_with(
                "From: \"Cron Daemon\" <app@contoso.com>\r\nReply-To: <root@example.com>\r\n"
            ),
            "{out}"
        );
        // A phrase wins over a comment; a parenthesis inside quotes is no comment.
        let out = run(
            "From: \"Ops (night)\" <ops@x.org> (pager)\r\n\r\nb\r\n",
            FromPolicy::Rewrite,
        );
        assert!(
            out.contains("From: \"Ops (night)\" <app@contoso.com>"),
            "{out}"
        );
        assert_eq!(
            comment_name(b" a@x.org (Cron\r\n  Daemon (x))"),
            Some("Cron Daemon (x)".into())
        );
        assert_eq!(comment_name(b" \"(not)\" <a@x.org>"), None);
    }

    #[test]
    fn every_from_address_reaches_reply_to() {
        let out = run(
            "From: Ann <ann@x.org>, bob@y.org\r\nSubject: s\r\n\r\nb\r\n",
            FromPolicy::Rewrite,
        );
        assert!(
            out.starts_with(
                "From: \"Ann\" <app@contoso.com>\r\nReply-To: <ann@x.org>,\r\n <bob@y.org>\r\n"
            ),
            "{out}"
        );
        // The mailbox among others is still rewritten: the others need Reply-To.
        let out = run(
            "From: app@contoso.com, bob@y.org\r\n\r\nb\r\n",
            FromPolicy::Rewrite,
        );
        assert!(
            out.contains("Reply-To: <app@contoso.com>,\r\n <bob@y.org>"),
            "{out}"
        );
    }

    #[test]
    fn a_long_non_ascii_name_is_folded_encoded_words_of_at_most_75() {
        let name = "Zażółć gęślą jaźń — Überwachung des Rechenzentrums Nord-Ost";
        let out = run(
            &format!("From: \"{name}\" <shop@x.org>\r\n\r\nb\r\n"),
            FromPolicy::Rewrite,
        );
        let head = out.split("\r\n\r\n").next().unwrap();
        let from: Vec<&str> = head
            .split("\r\n")
            .take_while(|l| !l.starts_with("Reply-To"))
            .collect();
        assert!(from.len() >= 2, "{out}");
        for line in &from {
            assert!(line.len() <= 78, "{line:?} in {out}");
        }
        let words: Vec<&str> = head
            .split_whitespace()
            .filter(|w| w.starts_with("=?"))
            .collect();
        assert!(words.len() >= 2, "{out}");
        for w in &words {
            assert!(w.len() <= 75 && w.ends_with("?="), "{w}");
        }
        // Decoded, the words give the name back whole (no character split).
        let joined = from.join("\r\n");
        let parsed = mailparse::parse_header(joined.as_bytes()).unwrap().0;
        let list = mailparse::addrparse_header(&parsed).unwrap();
        match &list[0] {
            mailparse::MailAddr::Single(i) => {
                assert_eq!(i.display_name.as_deref(), Some(name));
                assert_eq!(i.addr, "app@contoso.com");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rewrite_keeps_an_existing_reply_to_and_reply_to_mode_replaces_it() {
        let src = "From: a@x.org\r\nReply-To: <help@x.org>\r\n\r\nb\r\n";
        let out = run(src, FromPolicy::Rewrite);
        assert!(
            out.contains("Reply-To: <help@x.org>") && !out.contains("Reply-To: <a@x.org>"),
            "{out}"
        );
        let out = run(src, FromPolicy::ReplyTo);
        assert!(
            out.contains("Reply-To: <a@x.org>") && !out.contains("help@x.org"),
            "{out}"
        );
    }

    #[test]
    fn preserve_and_already_right_are_untouched() {
        let src = "From: a@x.org\r\n\r\nb\r\n";
        assert_eq!(run(src, FromPolicy::Preserve), src);
        let src = "From: App <APP@contoso.com>\r\n\r\nb\r\n";
        assert_eq!(run(src, FromPolicy::Rewrite), src);
    }

    #[test]
    fn reply_to_above_the_from_is_replaced_not_a_panic() {
        // Found by fuzzing (fuzz/ rewrite): with from = "reply-to", removing a Reply-To
        // written before the From shifted the From, and the insert after it panicked.
        let out = run(
            "Reply-To: <old@x.org>\r\nFrom: a@x.org\r\n\r\nb\r\n",
            FromPolicy::ReplyTo,
        );
        assert_eq!(
            out,
            "From: \"a on example.com\" <app@contoso.com>\r\nReply-To: <a@x.org>\r\n\r\nb\r\n"
        );
        let out = run(
            "Reply-To: <r1@x.org>\r\nReply-To: <r2@x.org>\r\nSubject: s\r\nFrom: a@x.org\r\n\r\nb\r\n",
            FromPolicy::ReplyTo,
        );
        assert!(
            out.starts_with(
                "Subject: s\r\nFrom: \"a on example.com\" <app@contoso.com>\r\nReply-To: <a@x.org>\r\n"
            ),
            "{out}"
        );
    }
}
