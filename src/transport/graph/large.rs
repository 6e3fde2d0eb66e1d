//! Messages over sendMail's 4 MB request limit: Graph has no larger MIME upload, so the
//! message is rebuilt as a draft (`POST /messages`, JSON: subject, body, recipients,
//! Reply-To, Message-ID and the `X-` headers), its attachments are added one request each
//! (under 3 MB) or through an upload session in 3.125 MB chunks (3 MB to 150 MB,
//! "Attach large files to Outlook messages"), and the draft is sent
//! (`POST /messages/{id}/send`, `202`). Exchange then builds the MIME itself, so the
//! message arrives with the same content but not byte for byte; the mailbox's maximum
//! send size (35 MB by default, at most 150 MB) still applies. A draft left by a failed
//! attempt is deleted.
//!
//! Input: the outgoing copy (see [`super::copy`]), parsed with `mailparse`; everything
//! taken from it goes into JSON strings through serde, never into a URL.

use std::time::SystemTime;

use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Answer, GraphClient, Method};
use crate::transport::classify::{Action, Verdict};

/// Attachments below this go in one request; larger ones through an upload session.
const INLINE_ATTACHMENT: usize = 3 * 1024 * 1024;
/// Upload chunk: a multiple of 320 KiB, as upload sessions require, below 4 MB.
const CHUNK: usize = 10 * 320 * 1024;

/// One attachment taken from the MIME tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub name: String,
    pub content_type: String,
    pub content_id: Option<String>,
    pub inline: bool,
    pub bytes: Vec<u8>,
}

/// The message as Graph's JSON draft, plus its attachments.
#[derive(Debug, Clone)]
pub struct Draft {
    pub json: Value,
    pub attachments: Vec<Attachment>,
}

fn addresses(headers: &[mailparse::MailHeader], name: &str) -> Vec<Value> {
    let mut out = Vec::new();
    for h in headers
        .iter()
        .filter(|h| h.get_key().eq_ignore_ascii_case(name))
    {
        if let Ok(list) = mailparse::addrparse_header(h) {
            let mut push = |s: &mailparse::SingleInfo| {
                let mut e = json!({ "address": s.addr });
                if let Some(n) = s.display_name.as_deref().filter(|n| !n.trim().is_empty()) {
                    e["name"] = json!(n);
                }
                out.push(json!({ "emailAddress": e }));
            };
            for item in list.iter() {
                match item {
                    mailparse::MailAddr::Single(s) => push(s),
                    mailparse::MailAddr::Group(g) => g.addrs.iter().for_each(&mut push),
                }
            }
        }
    }
    out
}

/// Builds the draft from a MIME message.
pub fn draft(mime: &[u8]) -> Result<Draft, String> {
    let parsed =
        mailparse::parse_mail(mime).map_err(|e| format!("the message is not MIME: {e}"))?;
    let headers = &parsed.headers;
    let get = |n: &str| {
        headers
            .iter()
            .find(|h| h.get_key().eq_ignore_ascii_case(n))
            .map(|h| h.get_value())
    };
    let mut leaves = Vec::new();
    collect_leaves(&parsed, &mut leaves);
    let body_at = leaves
        .iter()
        .position(|p| is_body(p, "text/html"))
        .or_else(|| leaves.iter().position(|p| is_body(p, "text/plain")));
    let (kind, content) = match body_at {
        Some(i) => (
            if leaves[i].ctype.mimetype.eq_ignore_ascii_case("text/html") {
                "HTML"
            } else {
                "Text"
            },
            leaves[i]
                .get_body()
                .map_err(|e| format!("unreadable body: {e}"))?,
        ),
        None => ("Text", String::new()),
    };
    let mut attachments = Vec::new();
    for (i, p) in leaves.iter().enumerate() {
        if Some(i) == body_at {
            continue;
        }
        // The plain alternative of an HTML body is not an attachment.
        if body_at.is_some() && is_body(p, "text/plain") {
            continue;
        }
        let disposition = p.get_content_disposition();
        let name = disposition
            .params
            .get("filename")
            .or_else(|| p.ctype.params.get("name"))
            .cloned()
            .unwrap_or_else(|| format!("attachment-{}", attachments.len() + 1));
        let content_id = p
            .headers
            .iter()
            .find(|h| h.get_key().eq_ignore_ascii_case("Content-ID"))
            .map(|h| h.get_value().trim().trim_matches(['<', '>']).to_owned());
        attachments.push(Attachment {
            name,
            content_type: p.ctype.mimetype.clone(),
            inline: disposition.disposition == mailparse::DispositionType::Inline
                && content_id.is_some(),
            content_id,
            bytes: p
                .get_body_raw()
                .map_err(|e| format!("unreadable attachment: {e}"))?,
        });
    }
    let mut json = json!({
        "subject": get("Subject").unwrap_or_default(),
        "body": { "contentType": kind, "content": content },
        "toRecipients": addresses(headers, "To"),
        "ccRecipients": addresses(headers, "Cc"),
        "bccRecipients": addresses(headers, "Bcc"),
    });
    let reply_to = addresses(headers, "Reply-To");
    if !reply_to.is_empty() {
        json["replyTo"] = Value::Array(reply_to);
    }
    if let Some(id) = get("Message-ID") {
        json["internetMessageId"] = json!(id.trim());
    }
    // Graph takes custom headers only if they start with X- (at most 5 KB of them).
    let custom: Vec<Value> = headers
        .iter()
        .filter(|h| h.get_key().len() > 2 && h.get_key()[..2].eq_ignore_ascii_case("x-"))
        .take(20)
        .map(|h| json!({ "name": h.get_key(), "value": h.get_value() }))
        .collect();
    if !custom.is_empty() {
        json["internetMessageHeaders"] = Value::Array(custom);
    }
    Ok(Draft { json, attachments })
}

fn is_body(p: &mailparse::ParsedMail, mimetype: &str) -> bool {
    p.ctype.mimetype.eq_ignore_ascii_case(mimetype)
        && p.get_content_disposition().disposition != mailparse::DispositionType::Attachment
        && !p.get_content_disposition().params.contains_key("filename")
}

fn collect_leaves<'a>(
    p: &'a mailparse::ParsedMail<'a>,
    out: &mut Vec<&'a mailparse::ParsedMail<'a>>,
) {
    if p.subparts.is_empty() {
        out.push(p);
    } else {
        for s in &p.subparts {
            collect_leaves(s, out);
        }
    }
}

#[derive(Deserialize)]
struct Created {
    id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Session {
    upload_url: String,
}

/// Sends a large message through a draft; the answer is the one that decides (the
/// `202` of `send`, or the first refusal).
pub fn send(client: &mut GraphClient, mime: &[u8], now: SystemTime) -> Result<Answer, Verdict> {
    let d = draft(mime).map_err(|why| Verdict {
        action: Action::BounceMessage,
        reason: format!("the message cannot be sent through a Microsoft Graph draft: {why}"),
    })?;
    let url = client.url("/messages");
    let created = client.call(
        Method::Post,
        &url,
        Some("application/json"),
        d.json.to_string().as_bytes(),
        now,
    )?;
    if !created.ok() {
        return Ok(created);
    }
    let id = serde_json::from_slice::<Created>(&created.body)
        .map(|c| c.id)
        .map_err(|_| Verdict {
            action: Action::Defer { hint: None },
            reason: "Microsoft Graph created the draft but its answer has no id".into(),
        })?;
    // SECURITY: the id goes into a URL path; Graph ids are base64url-ish, anything else is refused.
    if id.is_empty()
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_=".contains(&b))
    {
        return Err(Verdict {
            action: Action::Defer { hint: None },
            reason: "Microsoft Graph returned an unusable draft id".into(),
        });
    }
    let result = fill_and_send(client, &id, &d, now);
    if !matches!(&result, Ok(a) if a.ok()) {
        let url = client.url(&format!("/messages/{id}"));
        let _ = client.call(Method::Delete, &url, None, b"", now);
    }
    result
}

fn fill_and_send(
    client: &mut GraphClient,
    id: &str,
    d: &Draft,
    now: SystemTime,
) -> Result<Answer, Verdict> {
    for a in &d.attachments {
        let answer = if a.bytes.len() < INLINE_ATTACHMENT {
            let mut body = json!({
                "@odata.type": "#microsoft.graph.fileAttachment",
                "name": a.name,
                "contentType": a.content_type,
                "isInline": a.inline,
                "contentBytes": base64::engine::general_purpose::STANDARD.encode(&a.bytes),
            });
            if let Some(cid) = &a.content_id {
                body["contentId"] = json!(cid);
            }
            let url = client.url(&format!("/messages/{id}/attachments"));
            client.call(
                Method::Post,
                &url,
                Some("application/json"),
                body.to_string().as_bytes(),
                now,
            )?
        } else {
            upload(client, id, a, now)?
        };
        if !answer.ok() {
            return Ok(answer);
        }
    }
    let url = client.url(&format!("/messages/{id}/send"));
    client.call(Method::Post, &url, Some("application/json"), b"", now)
}

/// One attachment through an upload session: create it, then PUT the chunks to its
/// pre-authenticated URL (which must not get the bearer token).
fn upload(
    client: &mut GraphClient,
    id: &str,
    a: &Attachment,
    now: SystemTime,
) -> Result<Answer, Verdict> {
    let mut item = json!({
        "attachmentType": "file",
        "name": a.name,
        "size": a.bytes.len(),
        "contentType": a.content_type,
        "isInline": a.inline,
    });
    if let Some(cid) = &a.content_id {
        item["contentId"] = json!(cid);
    }
    let url = client.url(&format!("/messages/{id}/attachments/createUploadSession"));
    let created = client.call(
        Method::Post,
        &url,
        Some("application/json"),
        json!({ "AttachmentItem": item }).to_string().as_bytes(),
        now,
    )?;
    if !created.ok() {
        return Ok(created);
    }
    let session: Session = serde_json::from_slice(&created.body).map_err(|_| Verdict {
        action: Action::Defer { hint: None },
        reason: "Microsoft Graph's upload session has no uploadUrl".into(),
    })?;
    // SECURITY: only https; the URL carries its own authorization, the token is not sent.
    if !session.upload_url.starts_with("https://") {
        return Err(Verdict {
            action: Action::Defer { hint: None },
            reason: "Microsoft Graph's upload URL is not https".into(),
        });
    }
    let total = a.bytes.len();
    let mut last = created;
    for (n, chunk) in a.bytes.chunks(CHUNK).enumerate() {
        let start = n * CHUNK;
        let end = start + chunk.len() - 1;
        last = client.call_anonymous(
            Method::Put,
            &session.upload_url,
            &[("content-range", format!("bytes {start}-{end}/{total}"))],
            chunk,
        )?;
        if !last.ok() {
            return Ok(last);
        }
    }
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mime_message_becomes_a_draft_and_attachments() {
        let mime = b"From: app@contoso.com\r\nTo: \"Al\" <a@example.org>\r\nBcc: <h@example.org>\r\nSubject: =?UTF-8?B?w6lsw6k=?=\r\nMessage-ID: <1.Q@example.com>\r\nX-Mailer: t\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nhello\r\n--B\r\nContent-Type: application/pdf; name=r.pdf\r\nContent-Disposition: attachment; filename=r.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\nJVBERg==\r\n--B--\r\n";
        let d = draft(mime).unwrap();
        assert_eq!(d.json["subject"], "élé");
        assert_eq!(d.json["body"]["contentType"], "Text");
        assert_eq!(d.json["body"]["content"], "hello");
        assert_eq!(
            d.json["toRecipients"][0]["emailAddress"]["address"],
            "a@example.org"
        );
        assert_eq!(d.json["toRecipients"][0]["emailAddress"]["name"], "Al");
        assert_eq!(
            d.json["bccRecipients"][0]["emailAddress"]["address"],
            "h@example.org"
        );
        assert_eq!(d.json["internetMessageId"], "<1.Q@example.com>");
        assert_eq!(d.json["internetMessageHeaders"][0]["name"], "X-Mailer");
        assert_eq!(d.attachments.len(), 1);
        assert_eq!(d.attachments[0].name, "r.pdf");
        assert_eq!(d.attachments[0].bytes, b"%PDF");
    }
}
