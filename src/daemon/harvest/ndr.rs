//! Reading an NDR: a `multipart/report; report-type=delivery-status` message (RFC 3462,
//! RFC 3464) as Exchange Online sends to the envelope sender. Yields the failed
//! recipients with their status and diagnostic, and the original message's headers
//! (`text/rfc822-headers`, or the header block of a `message/rfc822` part) with its
//! Message-ID and relay365's own `X-Relay365-Id`.
//!
//! Input: a message read from the mailbox through Graph: fully untrusted. Parsing is
//! done by `mailparse` (total, bounded by the message size); every value taken out is
//! cleaned of control characters and bounded before it reaches a log or a DSN.

use crate::message::text::one_line_max;

/// Longest status or diagnostic kept.
const MAX_FIELD: usize = 400;
/// Longest original header block kept (for the DSN's returned headers).
const MAX_HEADERS: usize = 64 * 1024;

/// One failed recipient of an NDR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failed {
    /// `Final-Recipient`, without the `rfc822;` type.
    pub recipient: String,
    /// `Status`, e.g. `5.1.1`.
    pub status: String,
    /// `Diagnostic-Code` without its `smtp;` type, e.g. `550 5.1.1 RESOLVER.ADR.RecipNotFound; not found`.
    pub diagnostic: Option<String>,
}

/// What an NDR says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub failed: Vec<Failed>,
    /// The original message's header block (CRLF lines), as the NDR returned it.
    pub original_headers: Vec<u8>,
    pub original_message_id: Option<String>,
}

/// Parses `mime` as a delivery-status report; `None` when it is not one (an ordinary
/// message, an out-of-office reply, a delay notice without failures).
pub fn parse(mime: &[u8]) -> Option<Report> {
    let mail = mailparse::parse_mail(mime).ok()?;
    if !mail.ctype.mimetype.eq_ignore_ascii_case("multipart/report") {
        return None;
    }
    let mut failed = Vec::new();
    let mut original_headers = Vec::new();
    for part in &mail.subparts {
        let t = part.ctype.mimetype.to_ascii_lowercase();
        if t == "message/delivery-status" || t == "message/global-delivery-status" {
            let body = part.get_body_raw().ok()?;
            failed.extend(delivery_status(&body));
        } else if t == "text/rfc822-headers"
            || t == "message/rfc822"
            || t == "message/global-headers"
        {
            let raw = part.get_body_raw().ok()?;
            let end = raw
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map(|p| p + 2)
                .or_else(|| raw.windows(2).position(|w| w == b"\n\n").map(|p| p + 1))
                .unwrap_or(raw.len());
            original_headers = raw[..end.min(MAX_HEADERS)].to_vec();
        }
    }
    if failed.is_empty() {
        return None;
    }
    let original_message_id =
        mailparse::parse_headers(&original_headers)
            .ok()
            .and_then(|(h, _)| {
                h.iter()
                    .find(|h| h.get_key().eq_ignore_ascii_case("Message-ID"))
                    .map(|h| one_line_max(h.get_value().trim(), MAX_FIELD))
            });
    Some(Report {
        failed,
        original_headers,
        original_message_id,
    })
}

/// The per-recipient groups of a `message/delivery-status` body whose `Action` is
/// `failed`.
fn delivery_status(body: &[u8]) -> Vec<Failed> {
    let text = String::from_utf8_lossy(body).replace("\r\n", "\n");
    let mut out = Vec::new();
    // The first group is per-message; each later one is per-recipient.
    for group in text.split("\n\n").skip(1) {
        let Ok((fields, _)) = mailparse::parse_headers(group.trim_start().as_bytes()) else {
            continue;
        };
        let get = |n: &str| {
            fields
                .iter()
                .find(|f| f.get_key().eq_ignore_ascii_case(n))
                .map(|f| one_line_max(f.get_value().trim(), MAX_FIELD))
        };
        let typed = |v: String| match v.split_once(';') {
            Some((_, rest)) => rest.trim().to_owned(),
            None => v,
        };
        let Some(recipient) = get("Final-Recipient")
            .or_else(|| get("Original-Recipient"))
            .map(typed)
        else {
            continue;
        };
        if !get("Action").is_some_and(|a| a.eq_ignore_ascii_case("failed")) {
            continue;
        }
        out.push(Failed {
            recipient,
            status: get("Status").unwrap_or_else(|| "5.0.0".to_owned()),
            diagnostic: get("Diagnostic-Code").map(typed),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const NDR: &str = "From: Microsoft Outlook <MicrosoftExchange329e71ec88ae4615bbc36ab6ce41109e@contoso.com>\r\nTo: <app@contoso.com>\r\nSubject: Undeliverable: hi\r\nMIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nDelivery has failed.\r\n--b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns;SY5P282MB2635.AUSP282.PROD.OUTLOOK.COM\r\n\r\nFinal-Recipient: rfc822;nobody@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\nDiagnostic-Code: smtp;550 5.1.1 RESOLVER.ADR.RecipNotFound; not found\r\n\r\nFinal-Recipient: rfc822;late@example.org\r\nAction: delayed\r\nStatus: 4.4.7\r\n\r\n--b\r\nContent-Type: text/rfc822-headers\r\n\r\nFrom: app@contoso.com\r\nTo: nobody@example.org\r\nMessage-ID: <20261203.Q1@example.com>\r\nSubject: hi\r\n\r\n--b--\r\n";

    #[test]
    fn an_exchange_ndr_gives_the_failed_recipient_and_the_original_message_id() {
        let r = parse(NDR.as_bytes()).unwrap();
        assert_eq!(
            r.failed,
            [Failed {
                recipient: "nobody@example.org".into(),
                status: "5.1.1".into(),
                diagnostic: Some("550 5.1.1 RESOLVER.ADR.RecipNotFound; not found".into()),
            }]
        );
        assert_eq!(
            r.original_message_id.as_deref(),
            Some("<20261203.Q1@example.com>")
        );
        assert!(
            String::from_utf8_lossy(&r.original_headers).starts_with("From: app@contoso.com\r\n")
        );
    }

    #[test]
    fn ordinary_mail_and_delay_notices_are_not_ndrs() {
        assert_eq!(parse(b"Subject: hello\r\n\r\nbody\r\n"), None);
        let delayed = NDR.replace("Action: failed", "Action: delayed");
        assert_eq!(parse(delayed.as_bytes()), None);
    }
}
