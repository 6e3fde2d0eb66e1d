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
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

use crate::clock::Civil;
use crate::https::HttpOut;
use crate::server::Shared;
use crate::store::Via;
use crate::token::{GraphGrant, TokenRegistry};

mod mime;
mod send;

pub use mime::iso_seconds;
use mime::{decode, draft_mime, encode, parse_iso, query_map, secs};

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
