//! The copy of a message that goes to Microsoft Graph. With a MIME body, Graph takes the
//! recipients from the To, Cc and Bcc headers (there is no envelope), so the copy must
//! name exactly the transaction's recipients: those only in the envelope (Bcc, `-t` plus
//! command-line recipients, alias expansion) go into a `Bcc:` header, which Exchange
//! removes from every delivered copy and keeps only in the mailbox's Sent Items; a visible
//! recipient who is not in this transaction (sent earlier, refused, or in another batch)
//! is taken out of To/Cc, or Graph would send to them again.
//!
//! Input: the outgoing message (the daemon's queue file after the From policy) and the
//! validated recipient addresses. Pure logic.

use crate::message::address::{self, Address};
use crate::message::header::{self, Header};

/// `message` with To/Cc/Bcc naming exactly `recipients`.
pub fn copy_for(message: &[u8], recipients: &[&Address]) -> Vec<u8> {
    let Ok(mut msg) = header::parse(message) else {
        return message.to_vec();
    };
    let wanted: Vec<String> = recipients.iter().map(|a| key(a.as_str())).collect();
    let mut visible: Vec<String> = Vec::new();
    let mut rebuilt: Vec<Header> = Vec::with_capacity(msg.headers.len() + 1);
    for h in msg.headers.drain(..) {
        if h.is("Bcc") {
            // complete() removed them at intake; one from a local edit must not leak.
            continue;
        }
        if !(h.is("To") || h.is("Cc")) {
            rebuilt.push(h);
            continue;
        }
        let listed: Vec<String> = address::parse_list(h.raw())
            .map(|l| l.iter().map(|a| key(a.as_str())).collect())
            .unwrap_or_default();
        if listed.iter().all(|a| wanted.contains(a)) {
            visible.extend(listed);
            rebuilt.push(h);
            continue;
        }
        let kept = kept_entries(&h, &wanted);
        visible.extend(kept.iter().map(|(_, a)| key(a)));
        if !kept.is_empty() {
            let value = kept
                .iter()
                .map(|(name, addr)| mailbox(name.as_deref(), addr))
                .collect::<Vec<_>>()
                .join(",\r\n ");
            rebuilt.push(Header::new(h.name(), &value));
        }
    }
    let hidden: Vec<&str> = recipients
        .iter()
        .map(|a| a.as_str())
        .filter(|a| !visible.contains(&key(a)))
        .collect();
    if !hidden.is_empty() {
        // SECURITY: addresses are validated Address values; joined with folding, never
        // with bare CR or LF.
        let value = hidden
            .iter()
            .map(|a| format!("<{a}>"))
            .collect::<Vec<_>>()
            .join(",\r\n ");
        rebuilt.push(Header::new("Bcc", &value));
    }
    msg.headers = rebuilt;
    msg.to_bytes()
}

/// The address as compared: Exchange resolves addresses case-insensitively.
fn key(a: &str) -> String {
    a.to_lowercase()
}

/// The (display name, address) entries of a To/Cc header that are in `wanted`.
fn kept_entries(h: &Header, wanted: &[String]) -> Vec<(Option<String>, String)> {
    let mut out = Vec::new();
    let Ok((parsed, _)) = mailparse::parse_header(h.raw()) else {
        return out;
    };
    let Ok(list) = mailparse::addrparse_header(&parsed) else {
        return out;
    };
    let mut push = |info: &mailparse::SingleInfo| {
        if wanted.contains(&key(&info.addr)) && Address::parse(&info.addr).is_ok() {
            out.push((info.display_name.clone(), info.addr.clone()));
        }
    };
    for item in list.iter() {
        match item {
            mailparse::MailAddr::Single(s) => push(s),
            mailparse::MailAddr::Group(g) => g.addrs.iter().for_each(&mut push),
        }
    }
    out
}

/// `"Name" <addr>`, the name as an RFC 2047 encoded word unless it is plain ASCII.
fn mailbox(name: Option<&str>, addr: &str) -> String {
    let Some(name) = name.map(str::trim).filter(|n| !n.is_empty()) else {
        return format!("<{addr}>");
    };
    let plain = name
        .chars()
        .all(|c| c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ');
    if plain {
        format!("\"{name}\" <{addr}>")
    } else {
        use base64::Engine;
        let enc = base64::engine::general_purpose::STANDARD.encode(name.as_bytes());
        format!("=?UTF-8?B?{enc}?= <{addr}>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(list: &[&str]) -> Vec<Address> {
        list.iter().map(|a| Address::parse(a).unwrap()).collect()
    }

    fn copy(msg: &str, rcpts: &[&str]) -> String {
        let a = addrs(rcpts);
        let refs: Vec<&Address> = a.iter().collect();
        String::from_utf8(copy_for(msg.as_bytes(), &refs)).unwrap()
    }

    const MSG: &str = "From: app@contoso.com\r\nTo: Alice <alice@example.org>\r\nCc: bob@example.org\r\nSubject: s\r\n\r\nbody\r\n";

    #[test]
    fn envelope_only_recipients_go_in_bcc_and_the_rest_is_untouched() {
        let out = copy(
            MSG,
            &["alice@example.org", "bob@example.org", "hidden@example.org"],
        );
        assert!(out.contains("To: Alice <alice@example.org>\r\n"), "{out}");
        assert!(out.contains("Cc: bob@example.org\r\n"), "{out}");
        assert!(
            out.contains("Bcc: <hidden@example.org>\r\n\r\nbody"),
            "{out}"
        );
        assert_eq!(copy(MSG, &["Alice@Example.org", "bob@example.org"]), MSG);
    }

    #[test]
    fn visible_recipients_outside_the_transaction_are_taken_out() {
        let out = copy(MSG, &["bob@example.org"]);
        assert!(!out.contains("alice"), "{out}");
        assert!(!out.contains("To:"), "{out}");
        assert!(out.contains("Cc: bob@example.org\r\n"), "{out}");
        let msg = "To: =?UTF-8?B?SsO8cmdlbg==?= <j@example.org>, x@example.org\r\n\r\nb\r\n";
        let out = copy(msg, &["j@example.org"]);
        assert!(
            out.starts_with("To: =?UTF-8?B?SsO8cmdlbg==?= <j@example.org>\r\n"),
            "{out}"
        );
    }

    #[test]
    fn an_old_bcc_never_survives() {
        let msg = "To: a@example.org\r\nBcc: secret@example.org\r\n\r\nb\r\n";
        let out = copy(msg, &["a@example.org"]);
        assert!(!out.contains("secret"), "{out}");
    }
}
