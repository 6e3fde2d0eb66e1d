//! The From policy applied at delivery: Exchange Online only accepts a From the
//! mailbox may send as, so by default the address becomes the mailbox while the
//! display name (or "user on host") still tells the recipient who wrote.
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

/// The From header's first address and display name, if it has a usable one.
fn original_from(h: &Header) -> Option<(String, Option<String>)> {
    if let Ok((parsed, _)) = mailparse::parse_header(h.raw()) {
        if let Ok(list) = mailparse::addrparse_header(&parsed) {
            for item in list.iter() {
                if let mailparse::MailAddr::Single(info) = item {
                    let name = info.display_name.clone().filter(|n| !n.trim().is_empty());
                    return Some((info.addr.clone(), name));
                }
            }
        }
    }
    address::parse_list(h.raw())
        .ok()?
        .into_iter()
        .next()
        .map(|a| (a.to_string(), None))
}

/// Applies `policy` for `mailbox`; `host` names the machine in a generated display
/// name (`"www-data on web1"`). Returns the message unchanged when nothing applies.
pub fn apply(message: &[u8], mailbox: &str, policy: FromPolicy, host: &str) -> Vec<u8> {
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
    let (orig_addr, orig_name) =
        original_from(&msg.headers[pos]).unwrap_or_else(|| (String::new(), None));
    let same = orig_addr.eq_ignore_ascii_case(mailbox);
    if same && policy == FromPolicy::Rewrite {
        return message.to_vec();
    }
    if !same {
        let local = orig_addr
            .rsplit_once('@')
            .map_or(orig_addr.as_str(), |(l, _)| l);
        let name = orig_name.unwrap_or_else(|| {
            if local.is_empty() {
                host.to_string()
            } else {
                format!("{local} on {host}")
            }
        });
        msg.headers[pos] = Header::new("From", &format!("{} <{mailbox}>", display_name(&name)));
    }
    let has_reply_to = msg.has("Reply-To");
    let want_reply_to = !orig_addr.is_empty()
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
        msg.headers.insert(
            after_from,
            Header::new("Reply-To", &format!("<{orig_addr}>")),
        );
    }
    msg.to_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(input: &str, policy: FromPolicy) -> String {
        String::from_utf8(apply(input.as_bytes(), "app@contoso.com", policy, "web1")).unwrap()
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
    fn rewrite_names_user_on_host_when_there_is_no_name() {
        let out = run(
            "From: www-data@web1.example.com\r\n\r\nb\r\n",
            FromPolicy::Rewrite,
        );
        assert!(
            out.contains("From: \"www-data on web1\" <app@contoso.com>\r\n"),
            "{out}"
        );
        let out = run("From: root (Cron Daemon)\r\n\r\nb\r\n", FromPolicy::Rewrite);
        assert!(out.contains("<app@contoso.com>"), "{out}");
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
            "From: \"a on web1\" <app@contoso.com>\r\nReply-To: <a@x.org>\r\n\r\nb\r\n"
        );
        let out = run(
            "Reply-To: <r1@x.org>\r\nReply-To: <r2@x.org>\r\nSubject: s\r\nFrom: a@x.org\r\n\r\nb\r\n",
            FromPolicy::ReplyTo,
        );
        assert!(
            out.starts_with(
                "Subject: s\r\nFrom: \"a on web1\" <app@contoso.com>\r\nReply-To: <a@x.org>\r\n"
            ),
            "{out}"
        );
    }
}
