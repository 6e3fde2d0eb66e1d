//! Graph's `sendMail` and draft `send` in the emulator: scripted faults first, then the
//! body (MIME in base64 or JSON), then Exchange's checks (recipients, Send As, size, the
//! mailbox's quota and rate), then the message is stored and its NDRs scheduled.
//!
//! Input: the client's request body, untrusted.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::Value;

use super::mime::{addresses, draft_mime, ndr_mime, strip_header};
use super::{DraftState, Graph, error, out, push_item, throttled};
use crate::https::HttpOut;
use crate::limits::Denial;
use crate::store::{Received, Via};

impl Graph {
    pub(super) fn take_fault(&self) -> Option<HttpOut> {
        let mut st = self.state();
        let f = st.faults.first_mut()?;
        let mut o = error(f.status, &f.code, &f.message);
        if let Some(s) = f.retry_after {
            o.headers.push(("Retry-After", s.to_string()));
        }
        f.times = f.times.saturating_sub(1);
        if f.times == 0 {
            st.faults.remove(0);
        }
        Some(o)
    }

    pub(super) fn send_mail(
        &self,
        mailbox: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> HttpOut {
        self.send_requests.fetch_add(1, Ordering::Relaxed);
        if body.len() > self.sh.cfg.graph_max_request {
            return error(
                413,
                "RequestEntityTooLarge",
                "The maximum request length supported is 4MB.",
            );
        }
        if let Some(f) = self.take_fault() {
            return f;
        }
        let ct = content_type.unwrap_or("").to_ascii_lowercase();
        let (mime, via) = if ct.starts_with("text/plain") {
            let text: Vec<u8> = body
                .iter()
                .copied()
                .filter(|b| !b.is_ascii_whitespace())
                .collect();
            match STANDARD.decode(&text) {
                Ok(m) => (m, Via::GraphMime),
                Err(_) => {
                    return error(
                        400,
                        "ErrorMimeContentInvalidBase64String",
                        "Invalid base64 string for MIME content.",
                    );
                }
            }
        } else if ct.starts_with("application/json") {
            let v: Value = match serde_json::from_slice(body) {
                Ok(v) => v,
                Err(_) => {
                    return error(
                        400,
                        "RequestBodyRead",
                        "The request body is not valid JSON.",
                    );
                }
            };
            let d = DraftState {
                mailbox: mailbox.to_owned(),
                json: v["message"].clone(),
                attachments: Vec::new(),
            };
            (draft_mime(mailbox, &d), Via::GraphJson)
        } else {
            return error(
                415,
                "UnsupportedMediaType",
                "The content type is not supported: use application/json or text/plain (MIME in base64).",
            );
        };
        self.accept(mailbox, mime, via)
    }

    /// Exchange's checks after a sendMail: recipients, Send As, size, quota; then the
    /// message is sent and its NDRs scheduled.
    pub(super) fn accept(&self, mailbox: &str, mime: Vec<u8>, via: Via) -> HttpOut {
        let cfg = &self.sh.cfg;
        let head = |n: &str| crate::headers::header_value(&mime, n);
        let mut rcpts = Vec::new();
        for n in ["To", "Cc", "Bcc"] {
            for a in addresses(&head(n).unwrap_or_default()) {
                if !a.contains('@') || a.contains(char::is_whitespace) || a.starts_with('@') {
                    return error(
                        400,
                        "ErrorInvalidRecipients",
                        &format!(
                            "At least one recipient isn't valid., Recipient '{a}' isn't resolved. All recipients must be resolved before a message can be submitted."
                        ),
                    );
                }
                rcpts.push(a);
            }
        }
        if rcpts.is_empty() {
            return error(
                400,
                "ErrorInvalidRecipients",
                "At least one recipient is required, but none were found.",
            );
        }
        if cfg.check_send_as {
            let from = head("From").and_then(|f| crate::headers::first_address(&f));
            let allowed = from
                .as_deref()
                .is_none_or(|f| cfg.find_mailbox(mailbox).is_some_and(|m| m.may_send_as(f)));
            if !allowed {
                return error(
                    403,
                    "ErrorSendAsDenied",
                    "The user account which was used to submit this request does not have the right to send mail on behalf of the specified sending account., Cannot submit message.",
                );
            }
        }
        if mime.len() as u64 > cfg.max_size {
            return error(
                400,
                "ErrorMessageSizeExceeded",
                "The message exceeds the maximum supported size., Cannot save changes made to an item to store.",
            );
        }
        let now = Instant::now();
        match self.sh.limits.admit(Some(mailbox), rcpts.len() as u32, now) {
            Ok(()) => {}
            Err(Denial::RecipientQuota) => {
                return error(
                    403,
                    "ErrorSubmissionQuotaExceeded",
                    "Cannot submit message. 554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to process message due to a permanent exception with message [BeginDiagnosticData]Cannot submit message.[EndDiagnosticData]",
                );
            }
            Err(Denial::Rate { until }) => {
                return throttled(
                    "Application is over its MailboxConcurrency limit.",
                    until.saturating_duration_since(now).as_secs() + 1,
                );
            }
        }
        // Exchange drops Bcc from what it delivers (the Sent Items copy keeps it).
        let delivered = strip_header(&mime, "Bcc");
        let id = format!("<{}@{}>", crate::token::uuid(), cfg.mailbox_server);
        let mut received = Received {
            mailbox: Some(mailbox.to_owned()),
            mail_from: mailbox.to_owned(),
            mail_params: Vec::new(),
            rcpt_params: vec![Vec::new(); rcpts.len()],
            rcpts: rcpts.clone(),
            data: delivered,
            accepted_at: SystemTime::now(),
            connection_id: 0,
            message_id: id,
            via,
        };
        if let Some(hook) = &cfg.on_message {
            hook(&received);
        }
        if !cfg.keep_bodies {
            received.data = Vec::new();
        }
        self.sh.store.record(received, now);
        self.schedule_ndrs(mailbox, &mime, &rcpts);
        out(202, Value::Null)
    }

    pub(crate) fn schedule_ndrs(&self, mailbox: &str, mime: &[u8], rcpts: &[String]) {
        let chosen: Vec<(String, String, String)> = {
            let st = self.state();
            rcpts
                .iter()
                .filter_map(|r| {
                    st.ndr_for
                        .get(&r.to_ascii_lowercase())
                        .map(|(s, d)| (r.clone(), s.clone(), d.clone()))
                })
                .collect()
        };
        for (rcpt, status, diag) in chosen {
            let ndr = ndr_mime(
                mailbox,
                &self.sh.cfg.mailbox_server,
                mime,
                &rcpt,
                &status,
                &diag,
            );
            let state = Arc::clone(&self.state);
            let mailbox = mailbox.to_owned();
            let delay = self.sh.cfg.ndr_delay;
            let _ = std::thread::Builder::new()
                .name("ndr".into())
                .spawn(move || {
                    std::thread::sleep(delay);
                    push_item(&state, &mailbox, ndr);
                });
        }
    }
}
