//! Microsoft Graph's mail endpoints for one tenant, served on the token endpoint's HTTPS
//! listener: `sendMail` (MIME in base64 with `text/plain`, or JSON), drafts with
//! attachments and upload sessions, inbox reads with paging and `$filter`, `$value`,
//! mark-read, move and folders, with Graph's documented error bodies, `429` with
//! `Retry-After` for concurrency (4 per app and mailbox) and request rate (10,000 per
//! 10 minutes), the mailbox's sending quota, and NDRs dropped into the inbox a moment
//! after accepting a message for a chosen recipient (multipart/report with the original
//! headers), as Exchange does.
//!
//! Trust: requests are untrusted client input (the body size is bounded by the listener,
//! every field is parsed defensively, nothing panics); the bearer token must be one the
//! token endpoint issued for Graph, before expiry, for a permitted mailbox, with the
//! roles the operation needs. Faults and NDR choices come from the test and are trusted.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

use crate::clock::Civil;
use crate::limits::Denial;
use crate::server::Shared;
use crate::store::{Received, Via};
use crate::token::{GraphGrant, HttpOut, TokenRegistry};

/// A scripted answer to the next `sendMail` (or draft `send`) requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphFault {
    pub status: u16,
    pub code: String,
    pub message: String,
    pub retry_after: Option<u64>,
    pub times: u32,
}

impl GraphFault {
    pub fn new(status: u16, code: &str, message: &str) -> GraphFault {
        GraphFault {
            status,
            code: code.to_owned(),
            message: message.to_owned(),
            retry_after: None,
            times: 1,
        }
    }

    pub fn retry_after(mut self, secs: u64) -> GraphFault {
        self.retry_after = Some(secs);
        self
    }

    pub fn times(mut self, n: u32) -> GraphFault {
        self.times = n;
        self
    }
}

/// A message in a mailbox, as tests see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailItem {
    pub id: String,
    pub mailbox: String,
    /// `inbox`, or the id of a folder the client created.
    pub folder: String,
    pub received: SystemTime,
    pub is_read: bool,
    pub subject: String,
    pub from: String,
    pub mime: Vec<u8>,
}

struct DraftState {
    mailbox: String,
    json: Value,
    attachments: Vec<(String, String, Vec<u8>)>,
}

struct Upload {
    draft: String,
    name: String,
    content_type: String,
    size: usize,
    data: Vec<u8>,
}

#[derive(Default)]
struct State {
    inflight: HashMap<String, u32>,
    max_inflight: HashMap<String, u32>,
    requests: HashMap<String, VecDeque<Instant>>,
    items: Vec<MailItem>,
    next_id: u64,
    drafts: HashMap<String, DraftState>,
    uploads: HashMap<String, Upload>,
    folders: Vec<(String, String, String)>,
    ndr_for: HashMap<String, (String, String)>,
    faults: Vec<GraphFault>,
}

/// Graph's state for the emulator.
pub(crate) struct Graph {
    sh: Arc<Shared>,
    registry: Arc<TokenRegistry>,
    /// `https://localhost:PORT`.
    pub(crate) base: String,
    state: Arc<Mutex<State>>,
    pub(crate) send_requests: AtomicU64,
    pub(crate) requests: AtomicU64,
}

fn out(status: u16, body: Value) -> HttpOut {
    HttpOut {
        status,
        content_type: "application/json; odata.metadata=minimal; charset=utf-8",
        body: if body.is_null() {
            Vec::new()
        } else {
            body.to_string().into_bytes()
        },
        headers: Vec::new(),
    }
}

/// Graph's error body: `{"error": {"code", "message", "innerError": {...}}}`.
pub(crate) fn error(status: u16, code: &str, message: &str) -> HttpOut {
    let now = Civil::now();
    out(
        status,
        json!({ "error": {
            "code": code,
            "message": message,
            "innerError": {
                "date": format!("{:04}-{:02}-{:02}T{:02}:{:02}:{:02}", now.year, now.month, now.day, now.hour, now.minute, now.second),
                "request-id": crate::token::uuid(),
                "client-request-id": crate::token::uuid(),
            }
        }}),
    )
}

fn throttled(message: &str, secs: u64) -> HttpOut {
    let mut o = error(429, "ApplicationThrottled", message);
    o.headers.push(("Retry-After", secs.max(1).to_string()));
    o
}

/// `2026-12-03T18:00:00Z`: Graph's `receivedDateTime` (seconds).
pub fn iso_seconds(t: SystemTime) -> String {
    let c = Civil::from_system(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        c.year, c.month, c.day, c.hour, c.minute, c.second
    )
}

/// Parses `YYYY-MM-DDThh:mm:ss[.fff]Z`.
fn parse_iso(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> { s.get(r)?.parse().ok() };
    if b.len() < 20 || b[4] != b'-' || b[10] != b'T' {
        return None;
    }
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    // Howard Hinnant's days_from_civil.
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    Some(UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?))
}

/// The addresses of an address-list header value: the `<...>` parts, else the
/// comma-separated tokens.
fn addresses(value: &str) -> Vec<String> {
    let mut v = Vec::new();
    if value.contains('<') {
        let mut rest = value;
        while let Some(a) = rest.find('<') {
            let Some(b) = rest[a..].find('>') else { break };
            v.push(rest[a + 1..a + b].trim().to_owned());
            rest = &rest[a + b + 1..];
        }
    } else {
        v.extend(
            value
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty() && !s.ends_with(';'))
                .map(str::to_owned),
        );
    }
    v
}

fn query_map(q: &str) -> HashMap<String, String> {
    let mut m = HashMap::new();
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        m.insert(decode(k), decode(v));
    }
    m
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut o = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'%', Some(v)) => {
                o.push(v);
                i += 3;
            }
            (b'+', _) => {
                o.push(b' ');
                i += 1;
            }
            (c, _) => {
                o.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&o).into_owned()
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~$".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

impl Graph {
    pub(crate) fn new(sh: Arc<Shared>, registry: Arc<TokenRegistry>, base: String) -> Graph {
        Graph {
            sh,
            registry,
            base,
            state: Arc::default(),
            send_requests: AtomicU64::new(0),
            requests: AtomicU64::new(0),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn inject(&self, f: GraphFault) {
        self.state().faults.push(f);
    }

    pub(crate) fn ndr_for(&self, rcpt: &str, status: &str, diagnostic: &str) {
        self.state().ndr_for.insert(
            rcpt.to_ascii_lowercase(),
            (status.to_owned(), diagnostic.to_owned()),
        );
    }

    pub(crate) fn items(&self, mailbox: &str) -> Vec<MailItem> {
        self.state()
            .items
            .iter()
            .filter(|i| i.mailbox.eq_ignore_ascii_case(mailbox))
            .cloned()
            .collect()
    }

    pub(crate) fn max_concurrent(&self, mailbox: &str) -> u32 {
        self.state()
            .max_inflight
            .iter()
            .filter(|(k, _)| k.ends_with(&format!("/{}", mailbox.to_ascii_lowercase())))
            .map(|(_, v)| *v)
            .max()
            .unwrap_or(0)
    }

    /// Puts a message into `mailbox`'s inbox, as if it had arrived.
    pub(crate) fn deliver(&self, mailbox: &str, mime: Vec<u8>) -> String {
        push_item(&self.state, mailbox, mime)
    }

    /// Answers one request under `/v1.0/` or `/upload/`.
    pub(crate) fn answer(
        &self,
        method: &str,
        target: &str,
        headers: &[(String, String)],
        body: &[u8],
    ) -> HttpOut {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let header = |n: &str| {
            headers
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.as_str())
        };
        if let Some(token) = path.strip_prefix("/upload/") {
            return self.upload(token, header("content-range"), body);
        }
        let segs: Vec<String> = path.split('/').skip(1).map(decode).collect();
        let seg_refs: Vec<&str> = segs.iter().map(String::as_str).collect();
        let ["v1.0", "users", mailbox, rest @ ..] = seg_refs.as_slice() else {
            return error(
                400,
                "BadRequest",
                &format!(
                    "Resource not found for the segment '{}'.",
                    segs.get(1).map_or("", |s| s)
                ),
            );
        };
        let rest: Vec<&str> = rest.to_vec();
        let mailbox = (*mailbox).to_owned();
        let Some(bearer) = header("authorization").and_then(|a| a.strip_prefix("Bearer ")) else {
            return error(401, "InvalidAuthenticationToken", "Access token is empty.");
        };
        let grant = match self.registry.check_graph(bearer.trim()) {
            Ok(g) => g,
            Err((code, message)) => return error(401, code, message),
        };
        if self.sh.cfg.find_mailbox(&mailbox).is_none() {
            return error(
                404,
                "ErrorInvalidUser",
                &format!("The requested user '{mailbox}' is invalid."),
            );
        }
        if !grant
            .mailboxes
            .iter()
            .any(|m| m.eq_ignore_ascii_case(&mailbox))
        {
            return error(
                403,
                "ErrorAccessDenied",
                "Access to OData is disabled: [RAOP] : Blocked by tenant configured AppOnly AccessPolicy settings.",
            );
        }
        let key = format!("{}/{}", grant.app, mailbox.to_ascii_lowercase());
        if let Some(o) = self.admit(&key) {
            return o;
        }
        std::thread::sleep(self.sh.cfg.graph_delay);
        let o = self.route(
            method,
            &rest,
            query,
            header("content-type"),
            body,
            &grant,
            &mailbox,
        );
        let mut st = self.state();
        if let Some(n) = st.inflight.get_mut(&key) {
            *n = n.saturating_sub(1);
        }
        o
    }

    /// Concurrency and request rate per app and mailbox; counts the request in.
    fn admit(&self, key: &str) -> Option<HttpOut> {
        let cfg = &self.sh.cfg;
        let mut st = self.state();
        let now = Instant::now();
        if let Some((limit, window)) = cfg.graph_request_rate {
            let q = st.requests.entry(key.to_owned()).or_default();
            while q.front().is_some_and(|&t| now.duration_since(t) >= window) {
                q.pop_front();
            }
            if q.len() >= limit as usize {
                let wait = q
                    .front()
                    .map_or(window, |&t| window - now.duration_since(t));
                return Some(throttled(
                    "Application is over its MailboxRequestRate limit.",
                    wait.as_secs() + 1,
                ));
            }
            q.push_back(now);
        }
        let n = st.inflight.entry(key.to_owned()).or_default();
        if *n >= cfg.graph_max_concurrent {
            return Some(throttled(
                "Application is over its MailboxConcurrency limit.",
                1,
            ));
        }
        *n += 1;
        let n = *n;
        let max = st.max_inflight.entry(key.to_owned()).or_default();
        *max = (*max).max(n);
        None
    }

    #[allow(clippy::too_many_arguments)]
    fn route(
        &self,
        method: &str,
        rest: &[&str],
        query: &str,
        content_type: Option<&str>,
        body: &[u8],
        grant: &GraphGrant,
        mailbox: &str,
    ) -> HttpOut {
        let has = |r: &str| grant.roles.iter().any(|g| g.eq_ignore_ascii_case(r));
        let denied = || {
            error(
                403,
                "ErrorAccessDenied",
                "Access is denied. Check credentials and try again.",
            )
        };
        let read = has("Mail.Read") || has("Mail.ReadWrite");
        let write = has("Mail.ReadWrite");
        match (method, rest) {
            ("POST", ["sendMail"]) => {
                if !has("Mail.Send") {
                    return denied();
                }
                self.send_mail(mailbox, content_type, body)
            }
            ("GET", ["mailFolders", "inbox"]) if read => out(
                200,
                json!({"id": "inbox", "displayName": "Inbox",
                       "totalItemCount": self.items(mailbox).iter().filter(|i| i.folder == "inbox").count()}),
            ),
            ("GET", ["mailFolders", "inbox", "messages"]) if read => self.list(mailbox, query),
            ("GET", ["messages", id, "$value"]) if read => {
                match self.items(mailbox).into_iter().find(|i| i.id == *id) {
                    Some(i) => HttpOut {
                        status: 200,
                        content_type: "text/plain",
                        body: i.mime,
                        headers: Vec::new(),
                    },
                    None => not_found(),
                }
            }
            ("PATCH", ["messages", id]) if write => {
                let v: Value = serde_json::from_slice(body).unwrap_or_default();
                let mut st = self.state();
                match st.items.iter_mut().find(|i| i.id == *id) {
                    Some(i) => {
                        if let Some(r) = v["isRead"].as_bool() {
                            i.is_read = r;
                        }
                        out(200, json!({"id": i.id, "isRead": i.is_read}))
                    }
                    None => not_found(),
                }
            }
            ("POST", ["messages", id, "move"]) if write => {
                let v: Value = serde_json::from_slice(body).unwrap_or_default();
                let dest = v["destinationId"].as_str().unwrap_or("").to_owned();
                let mut st = self.state();
                if !st
                    .folders
                    .iter()
                    .any(|(m, fid, _)| m == mailbox && *fid == dest)
                {
                    return error(
                        404,
                        "ErrorItemNotFound",
                        "The specified folder could not be found in the store.",
                    );
                }
                match st.items.iter_mut().find(|i| i.id == *id) {
                    Some(i) => {
                        i.folder = dest;
                        out(201, json!({"id": i.id}))
                    }
                    None => not_found(),
                }
            }
            ("GET", ["mailFolders"]) if read => {
                let q = query_map(query);
                let want = q
                    .get("$filter")
                    .and_then(|f| f.split_once("eq '"))
                    .map(|(_, v)| v.trim_end_matches('\'').to_owned());
                let st = self.state();
                let value: Vec<Value> = st
                    .folders
                    .iter()
                    .filter(|(m, _, n)| m == mailbox && want.as_ref().is_none_or(|w| w == n))
                    .map(|(_, id, n)| json!({"id": id, "displayName": n}))
                    .collect();
                out(200, json!({ "value": value }))
            }
            ("POST", ["mailFolders"]) if write => {
                let v: Value = serde_json::from_slice(body).unwrap_or_default();
                let name = v["displayName"].as_str().unwrap_or("").to_owned();
                if name.is_empty() {
                    return error(400, "ErrorInvalidRequest", "displayName is required.");
                }
                let mut st = self.state();
                st.next_id += 1;
                let id = format!("AAMkFolder{}", st.next_id);
                st.folders
                    .push((mailbox.to_owned(), id.clone(), name.clone()));
                out(201, json!({"id": id, "displayName": name}))
            }
            ("POST", ["messages"]) if write => {
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
                let mut st = self.state();
                st.next_id += 1;
                let id = format!("AAMkDraft{}", st.next_id);
                st.drafts.insert(
                    id.clone(),
                    DraftState {
                        mailbox: mailbox.to_owned(),
                        json: v,
                        attachments: Vec::new(),
                    },
                );
                out(201, json!({"id": id, "isDraft": true}))
            }
            ("DELETE", ["messages", id]) if write => {
                let mut st = self.state();
                let gone = st.drafts.remove(*id).is_some();
                let before = st.items.len();
                st.items.retain(|i| i.id != *id);
                if gone || st.items.len() < before {
                    out(204, Value::Null)
                } else {
                    not_found()
                }
            }
            ("POST", ["messages", id, "attachments"]) if write => {
                let v: Value = serde_json::from_slice(body).unwrap_or_default();
                let bytes = STANDARD
                    .decode(v["contentBytes"].as_str().unwrap_or(""))
                    .unwrap_or_default();
                let mut st = self.state();
                match st.drafts.get_mut(*id) {
                    Some(d) => {
                        d.attachments.push((
                            v["name"].as_str().unwrap_or("attachment").to_owned(),
                            v["contentType"]
                                .as_str()
                                .unwrap_or("application/octet-stream")
                                .to_owned(),
                            bytes,
                        ));
                        out(201, json!({"id": format!("att{}", d.attachments.len())}))
                    }
                    None => not_found(),
                }
            }
            ("POST", ["messages", id, "attachments", "createUploadSession"]) if write => {
                let v: Value = serde_json::from_slice(body).unwrap_or_default();
                let item = &v["AttachmentItem"];
                let size = item["size"].as_u64().unwrap_or(0) as usize;
                if !(3 * 1024 * 1024..=150 * 1024 * 1024).contains(&size) {
                    return error(
                        400,
                        "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize",
                        "Attachment size must be between 3 MB and 150 MB for an upload session.",
                    );
                }
                let mut st = self.state();
                if !st.drafts.contains_key(*id) {
                    return not_found();
                }
                st.next_id += 1;
                let token = format!("u{}x{:x}", st.next_id, crate::replies::random_u64());
                st.uploads.insert(
                    token.clone(),
                    Upload {
                        draft: (*id).to_owned(),
                        name: item["name"].as_str().unwrap_or("attachment").to_owned(),
                        content_type: item["contentType"]
                            .as_str()
                            .unwrap_or("application/octet-stream")
                            .to_owned(),
                        size,
                        data: Vec::new(),
                    },
                );
                out(
                    201,
                    json!({"uploadUrl": format!("{}/upload/{token}", self.base),
                           "expirationDateTime": iso_seconds(SystemTime::now() + Duration::from_secs(900)),
                           "nextExpectedRanges": ["0-"]}),
                )
            }
            ("POST", ["messages", id, "send"]) if write => {
                let draft = self.state().drafts.remove(*id);
                match draft {
                    Some(d) if d.mailbox.eq_ignore_ascii_case(mailbox) => {
                        if let Some(f) = self.take_fault() {
                            return f;
                        }
                        let mime = draft_mime(mailbox, &d);
                        self.accept(mailbox, mime, Via::GraphJson)
                    }
                    _ => not_found(),
                }
            }
            _ if !read || !write => denied(),
            _ => error(400, "BadRequest", "Unsupported segment or method."),
        }
    }

    fn take_fault(&self) -> Option<HttpOut> {
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

    fn send_mail(&self, mailbox: &str, content_type: Option<&str>, body: &[u8]) -> HttpOut {
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
    fn accept(&self, mailbox: &str, mime: Vec<u8>, via: Via) -> HttpOut {
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

    fn list(&self, mailbox: &str, query: &str) -> HttpOut {
        let q = query_map(query);
        let mut since: Option<SystemTime> = None;
        let mut unread_only = false;
        if let Some(f) = q.get("$filter") {
            for clause in f.split(" and ") {
                let c = clause.trim();
                if let Some(v) = c.strip_prefix("receivedDateTime ge ") {
                    match parse_iso(v.trim()) {
                        Some(t) => since = Some(t),
                        None => {
                            return error(
                                400,
                                "BadRequest",
                                "Invalid filter clause: the date is not valid.",
                            );
                        }
                    }
                } else if c == "isRead eq false" {
                    unread_only = true;
                } else {
                    return error(400, "BadRequest", "Invalid filter clause.");
                }
            }
        }
        let top = q
            .get("$top")
            .and_then(|t| t.parse::<usize>().ok())
            .unwrap_or(10)
            .clamp(1, 1000);
        let skip = q
            .get("$skip")
            .and_then(|t| t.parse::<usize>().ok())
            .unwrap_or(0);
        let asc = q
            .get("$orderby")
            .is_some_and(|o| o.ends_with(" asc") || o == "receivedDateTime");
        let mut items: Vec<MailItem> = self
            .items(mailbox)
            .into_iter()
            .filter(|i| i.folder == "inbox")
            .filter(|i| !unread_only || !i.is_read)
            // Graph compares at its seconds precision.
            .filter(|i| since.is_none_or(|s| secs(i.received) >= secs(s)))
            .collect();
        items.sort_by_key(|i| (i.received, i.id.clone()));
        if !asc {
            items.reverse();
        }
        let page: Vec<Value> = items
            .iter()
            .skip(skip)
            .take(top)
            .map(|i| {
                json!({
                    "id": i.id,
                    "receivedDateTime": iso_seconds(i.received),
                    "isRead": i.is_read,
                    "subject": i.subject,
                    "from": {"emailAddress": {"address": i.from, "name": i.from}},
                })
            })
            .collect();
        let mut body = json!({ "value": page });
        if skip + top < items.len() {
            let mut pairs: Vec<String> = q
                .iter()
                .filter(|(k, _)| k.as_str() != "$skip")
                .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
                .collect();
            pairs.sort();
            pairs.push(format!("$skip={}", skip + top));
            body["@odata.nextLink"] = json!(format!(
                "{}/v1.0/users/{}/mailFolders/inbox/messages?{}",
                self.base,
                mailbox,
                pairs.join("&")
            ));
        }
        out(200, body)
    }

    fn upload(&self, token: &str, range: Option<&str>, body: &[u8]) -> HttpOut {
        let mut st = self.state();
        let Some(u) = st.uploads.get_mut(token) else {
            return error(404, "ItemNotFound", "The upload session was not found.");
        };
        let parsed = range
            .and_then(|r| r.strip_prefix("bytes "))
            .and_then(|r| r.split_once('/'))
            .and_then(|(span, total)| {
                let (a, b) = span.split_once('-')?;
                Some((
                    a.parse::<usize>().ok()?,
                    b.parse::<usize>().ok()?,
                    total.parse::<usize>().ok()?,
                ))
            });
        let Some((start, end, total)) = parsed else {
            return error(
                400,
                "InvalidRequest",
                "The Content-Range header is missing or malformed.",
            );
        };
        if start != u.data.len()
            || end + 1 - start != body.len()
            || total != u.size
            || body.len() > 4 * 1024 * 1024
        {
            return error(
                416,
                "InvalidRange",
                "The uploaded fragment overlaps or is out of order.",
            );
        }
        u.data.extend_from_slice(body);
        if u.data.len() < u.size {
            return out(
                200,
                json!({"nextExpectedRanges": [format!("{}-", u.data.len())]}),
            );
        }
        let Some(u) = st.uploads.remove(token) else {
            return not_found();
        };
        if let Some(d) = st.drafts.get_mut(&u.draft) {
            d.attachments.push((u.name, u.content_type, u.data));
        }
        out(201, Value::Null)
    }
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn not_found() -> HttpOut {
    error(
        404,
        "ErrorItemNotFound",
        "The specified object was not found in the store.",
    )
}

fn push_item(state: &Mutex<State>, mailbox: &str, mime: Vec<u8>) -> String {
    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
    st.next_id += 1;
    let id = format!("AAMkAGI2{:08}", st.next_id);
    let subject = crate::headers::header_value(&mime, "Subject").unwrap_or_default();
    let from = crate::headers::header_value(&mime, "From")
        .and_then(|f| crate::headers::first_address(&f))
        .unwrap_or_default();
    st.items.push(MailItem {
        id: id.clone(),
        mailbox: mailbox.to_owned(),
        folder: "inbox".to_owned(),
        received: SystemTime::now(),
        is_read: false,
        subject,
        from,
        mime,
    });
    id
}

fn strip_header(mime: &[u8], name: &str) -> Vec<u8> {
    let end = mime
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(mime.len(), |p| p + 2);
    let mut out = Vec::with_capacity(mime.len());
    let mut skipping = false;
    for line in mime[..end].split_inclusive(|&b| b == b'\n') {
        let folded = line.first().is_some_and(|&b| b == b' ' || b == b'\t');
        if !folded {
            skipping = line.iter().position(|&b| b == b':').is_some_and(|c| {
                String::from_utf8_lossy(&line[..c])
                    .trim()
                    .eq_ignore_ascii_case(name)
            });
        }
        if !skipping {
            out.extend_from_slice(line);
        }
    }
    out.extend_from_slice(&mime[end..]);
    out
}

/// The MIME Exchange makes of a JSON message or a draft (enough for tests).
fn draft_mime(mailbox: &str, d: &DraftState) -> Vec<u8> {
    let j = &d.json;
    let list = |k: &str| {
        j[k].as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|r| r["emailAddress"]["address"].as_str())
                    .map(|a| format!("<{a}>"))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    };
    let mut m = format!("From: <{mailbox}>\r\n");
    for (h, k) in [
        ("To", "toRecipients"),
        ("Cc", "ccRecipients"),
        ("Bcc", "bccRecipients"),
    ] {
        let v = list(k);
        if !v.is_empty() {
            m.push_str(&format!("{h}: {v}\r\n"));
        }
    }
    m.push_str(&format!(
        "Subject: {}\r\n",
        j["subject"].as_str().unwrap_or("")
    ));
    if let Some(id) = j["internetMessageId"].as_str() {
        m.push_str(&format!("Message-ID: {id}\r\n"));
    }
    if let Some(hs) = j["internetMessageHeaders"].as_array() {
        for h in hs {
            m.push_str(&format!(
                "{}: {}\r\n",
                h["name"].as_str().unwrap_or("X-Unknown"),
                h["value"].as_str().unwrap_or("")
            ));
        }
    }
    let html = j["body"]["contentType"].as_str() == Some("HTML");
    let ctype = if html { "text/html" } else { "text/plain" };
    let content = j["body"]["content"].as_str().unwrap_or("");
    m.push_str("MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"_emu_\"\r\n\r\n");
    m.push_str(&format!("--_emu_\r\nContent-Type: {ctype}; charset=\"utf-8\"\r\nContent-Transfer-Encoding: base64\r\n\r\n{}\r\n", STANDARD.encode(content)));
    for (name, ct, bytes) in &d.attachments {
        m.push_str(&format!(
            "--_emu_\r\nContent-Type: {ct}; name=\"{name}\"\r\nContent-Disposition: attachment; filename=\"{name}\"; size={}\r\nContent-Transfer-Encoding: base64\r\n\r\n{}\r\n",
            bytes.len(),
            STANDARD.encode(bytes)
        ));
    }
    m.push_str("--_emu_--\r\n");
    m.into_bytes()
}

/// An NDR as Exchange Online writes one: from the tenant's Microsoft Outlook system
/// mailbox to the sender, `multipart/report; report-type=delivery-status` with a human
/// part, the `message/delivery-status` part and the original headers.
fn ndr_mime(
    mailbox: &str,
    server: &str,
    original: &[u8],
    rcpt: &str,
    status: &str,
    diag: &str,
) -> Vec<u8> {
    let head_end = original
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(original.len(), |p| p + 2);
    let headers = String::from_utf8_lossy(&strip_header(&original[..head_end], "Bcc")).into_owned();
    let subject = crate::headers::header_value(original, "Subject").unwrap_or_default();
    let domain = mailbox.rsplit_once('@').map_or("contoso.com", |(_, d)| d);
    let b = format!("_ndr_{:x}", crate::replies::random_u64());
    format!(
        "From: Microsoft Outlook <MicrosoftExchange329e71ec88ae4615bbc36ab6ce41109e@{domain}>\r\n\
To: <{mailbox}>\r\n\
Date: {date}\r\n\
Subject: Undeliverable: {subject}\r\n\
Message-ID: <{id}@{server}>\r\n\
Auto-Submitted: auto-replied\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/report; report-type=delivery-status; boundary=\"{b}\"\r\n\
\r\n\
--{b}\r\n\
Content-Type: text/plain; charset=\"us-ascii\"\r\n\
\r\n\
Delivery has failed to these recipients or groups:\r\n\
\r\n\
{rcpt}\r\n\
The email couldn't be delivered.\r\n\
\r\n\
Diagnostic information for administrators:\r\n\
Remote server returned '{diag}'\r\n\
\r\n\
--{b}\r\n\
Content-Type: message/delivery-status\r\n\
\r\n\
Reporting-MTA: dns;{server}\r\n\
Received-From-MTA: dns;{server}\r\n\
Arrival-Date: {date}\r\n\
\r\n\
Final-Recipient: rfc822;{rcpt}\r\n\
Action: failed\r\n\
Status: {status}\r\n\
Diagnostic-Code: smtp;{diag}\r\n\
\r\n\
--{b}\r\n\
Content-Type: text/rfc822-headers\r\n\
\r\n\
{headers}\r\n\
--{b}--\r\n",
        date = Civil::now().rfc2822(),
        id = crate::token::uuid(),
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_dates_round_trip_and_headers_strip() {
        let t = UNIX_EPOCH + Duration::from_secs(1_796_000_000);
        assert_eq!(parse_iso(&iso_seconds(t)), Some(t));
        assert_eq!(
            strip_header(
                b"To: a@b\r\nBcc: x@y,\r\n z@w\r\nSubject: s\r\n\r\nBcc: body\r\n",
                "Bcc"
            ),
            b"To: a@b\r\nSubject: s\r\n\r\nBcc: body\r\n"
        );
        assert_eq!(addresses("\"A, B\" <a@x>, <b@y>"), ["a@x", "b@y"]);
        assert_eq!(addresses("a@x, b@y"), ["a@x", "b@y"]);
    }
}
