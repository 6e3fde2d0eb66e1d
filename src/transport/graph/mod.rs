//! Microsoft Graph: the HTTPS client for one mailbox (app-only token, one refresh on
//! `401`, the account's proxy) and the transport that sends with
//! `POST /v1.0/users/{mailbox}/sendMail` (MIME, base64, `Content-Type: text/plain`), or
//! through a draft and upload sessions when the message is over sendMail's 4 MB request
//! limit ([`large`]). Graph answers go through [`classify::classify_http`], the same
//! decision table as SMTP replies.
//!
//! Microsoft's documentation this follows: "user: sendMail" (MIME in base64 with
//! `text/plain`, `202 Accepted`), "Send Outlook messages with MIME content", "Attach large
//! files to Outlook messages" (upload sessions, 3 MB to 150 MB), "Microsoft Graph
//! throttling limits" (Outlook service: 4 concurrent requests and 10,000 requests per
//! 10 minutes per app and mailbox, `429` with `Retry-After`) and "Microsoft Graph error
//! responses".
//!
//! Trust: every answer is untrusted network input: bodies are bounded, JSON is parsed
//! into fixed shapes, and error texts are cleaned by the classifier before any log sees
//! them. The bearer token is a [`Secret`] and appears only in the `Authorization` header.

pub mod copy;
pub mod large;

use std::time::{Duration, SystemTime};

use serde::Deserialize;

use super::classify::{self, Action, HttpAnswer, Verdict};
use super::oauth::{ClientCredential, OAuthError, TokenSource};
use super::proxy::HttpProxy;
use super::{RcptResult, Transaction, Transport, TxnEnd, TxnResult};
use crate::config::Account;
use crate::config::oauth::DEFAULT_SCOPE;
use crate::message::address::Address;
use crate::secrets::{AccountSecrets, Secret};

/// sendMail's request limit: the base64 body of a MIME message must stay within 4 MB
/// ("about 4 MB per request"); a larger message goes through [`large`].
pub const SENDMAIL_LIMIT: usize = 4_000_000;
/// Longest answer body read (an inbox page with its `@odata.nextLink`, an NDR's MIME).
const MAX_ANSWER: u64 = 16 * 1024 * 1024;

/// An HTTP method the client uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
    Patch,
    Put,
    Delete,
}

/// One answer of Graph: status, body, `Retry-After`, Microsoft's `request-id`.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
    pub retry_after: Option<Duration>,
    pub request_id: Option<String>,
}

#[derive(Deserialize, Default)]
struct ErrorBody {
    #[serde(default)]
    error: ErrorInner,
}

#[derive(Deserialize, Default)]
struct ErrorInner {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

impl Answer {
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// `error.code` and `error.message` of a JSON error body (empty when absent).
    pub fn error(&self) -> (String, String) {
        let e: ErrorBody = serde_json::from_slice(&self.body).unwrap_or_default();
        (e.error.code, e.error.message)
    }

    /// The decision table's verdict for this answer.
    pub fn verdict(&self) -> Verdict {
        let (code, message) = self.error();
        classify::classify_http(&HttpAnswer {
            status: self.status,
            code: &code,
            message: &message,
            retry_after: self.retry_after,
        })
    }

    /// The answer as logged: status, code and message, cleaned and bounded.
    pub fn text(&self) -> String {
        let (code, message) = self.error();
        let id = self
            .request_id
            .as_deref()
            .map(|i| format!(" request-id={}", super::reply::sanitize(i, 64)))
            .unwrap_or_default();
        let mut t = format!("{}", self.status);
        if self.ok() {
            t.push_str(if self.status == 202 {
                " Accepted"
            } else {
                " OK"
            });
        }
        if !code.is_empty() {
            t.push_str(&format!(" {}", super::reply::sanitize(&code, 80)));
        }
        if !message.is_empty() {
            t.push_str(&format!(": {}", super::reply::sanitize(&message, 400)));
        }
        t.push_str(&id);
        t
    }
}

/// An HTTPS client for one mailbox's Graph resources.
pub struct GraphClient {
    base: String,
    mailbox: String,
    agent: ureq::Agent,
    tokens: TokenSource,
    /// `host` of the URL, for log lines (`relay=`).
    pub relay: String,
}

impl std::fmt::Debug for GraphClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GraphClient")
            .field("base", &self.base)
            .field("mailbox", &self.mailbox)
            .finish_non_exhaustive()
    }
}

fn hold(fix: String) -> Verdict {
    Verdict {
        action: Action::HoldAccount {
            until: classify::HoldUntil::Release,
            fix: fix.clone(),
        },
        reason: fix,
    }
}

/// The verdict for a token that could not be had.
pub fn token_verdict(e: &OAuthError) -> Verdict {
    let reason = format!("cannot get an OAuth2 token for Microsoft Graph: {e}");
    if e.is_temporary() {
        Verdict {
            action: Action::Defer { hint: None },
            reason,
        }
    } else {
        hold(reason)
    }
}

impl GraphClient {
    /// The client for `account`'s mailbox: its `[account.graph] url`, a token for Graph
    /// (the `[account.oauth]` app, scope `https://graph.microsoft.com/.default` unless
    /// `scope` names another) and its proxy. `Err` is the verdict for every transaction.
    pub fn for_account(
        account: &Account,
        secrets: Option<&AccountSecrets>,
        secrets_file: &std::path::Path,
    ) -> Result<GraphClient, Verdict> {
        let Some(mut settings) = account.oauth.clone() else {
            return Err(hold(format!(
                "account {} has no [account.oauth] settings for Microsoft Graph",
                account.name
            )));
        };
        if settings.scope == DEFAULT_SCOPE {
            settings.scope = account.graph.scope();
        }
        let Some(cred) = secrets.and_then(ClientCredential::from_account) else {
            return Err(hold(format!(
                "no client_secret or certificate for account {} in the secrets file: add [{}] client_secret = \"...\" to {}",
                account.name,
                account.name,
                secrets_file.display()
            )));
        };
        let token_host = host_of(&settings.resolved_token_url());
        let token_proxy = HttpProxy::for_account(account, secrets, &token_host);
        let graph_proxy = HttpProxy::for_account(account, secrets, account.graph.host());
        let ureq_proxy = |p: Option<HttpProxy>| match p {
            Some(p) => p.for_ureq().map(Some).map_err(|e| e.verdict()),
            None => Ok(None),
        };
        let tokens = TokenSource::new_via(
            settings,
            cred,
            account.ca_file.as_deref(),
            account.timeout,
            ureq_proxy(token_proxy)?,
        )
        .map_err(|e| token_verdict(&e))?;
        let agent = super::http::agent(
            account.ca_file.as_deref(),
            account.timeout,
            ureq_proxy(graph_proxy)?,
        )
        .map_err(|e| hold(format!("cannot set up TLS for Microsoft Graph: {e}")))?;
        Ok(GraphClient {
            base: account.graph.url.clone(),
            mailbox: account.mailbox.clone(),
            agent,
            tokens,
            relay: account.graph.host().to_owned(),
        })
    }

    /// `{url}/v1.0/users/{mailbox}{path}`.
    pub fn url(&self, path: &str) -> String {
        // SECURITY: the mailbox is a validated address; anything but unreserved characters
        // and @ is percent-encoded so it stays one path segment.
        let mut mb = String::new();
        for b in self.mailbox.bytes() {
            if b.is_ascii_alphanumeric() || b"-._~@+".contains(&b) {
                mb.push(char::from(b));
            } else {
                mb.push_str(&format!("%{b:02X}"));
            }
        }
        format!("{}/v1.0/users/{mb}{path}", self.base)
    }

    /// One request to a URL [`GraphClient::url`] built (or Graph's `@odata.nextLink`),
    /// with the bearer token; on `401` the token is fetched anew and the request repeated
    /// once. `Err` is a failure without an HTTP answer (token, network, proxy, TLS).
    pub fn call(
        &mut self,
        method: Method,
        url: &str,
        content_type: Option<&str>,
        body: &[u8],
        now: SystemTime,
    ) -> Result<Answer, Verdict> {
        // SECURITY: only URLs under the configured Graph root get the token, so a
        // nextLink pointing elsewhere cannot take it.
        if !url.starts_with(&format!("{}/", self.base)) {
            return Err(hold(format!(
                "Microsoft Graph sent a link outside {}: refusing to follow it",
                self.base
            )));
        }
        let mut refreshed = false;
        loop {
            let token = self.tokens.token(now).map_err(|e| token_verdict(&e))?;
            let bearer = Secret::new(format!("Bearer {}", token.secret().expose()));
            let answer = self.send(method, url, Some(&bearer), content_type, body)?;
            if answer.status == 401 && !refreshed {
                refreshed = true;
                self.tokens.invalidate();
                continue;
            }
            return Ok(answer);
        }
    }

    /// A request without the token (an upload session's pre-authenticated URL).
    pub fn call_anonymous(
        &mut self,
        method: Method,
        url: &str,
        headers: &[(&str, String)],
        body: &[u8],
    ) -> Result<Answer, Verdict> {
        self.send_with(method, url, None, None, headers, body)
    }

    fn send(
        &self,
        method: Method,
        url: &str,
        bearer: Option<&Secret>,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Result<Answer, Verdict> {
        self.send_with(method, url, bearer, content_type, &[], body)
    }

    fn send_with(
        &self,
        method: Method,
        url: &str,
        bearer: Option<&Secret>,
        content_type: Option<&str>,
        headers: &[(&str, String)],
        body: &[u8],
    ) -> Result<Answer, Verdict> {
        let result = match method {
            Method::Get | Method::Delete => {
                let mut r = if method == Method::Get {
                    self.agent.get(url)
                } else {
                    self.agent.delete(url)
                };
                if let Some(b) = bearer {
                    r = r.header("authorization", b.expose());
                }
                for (k, v) in headers {
                    r = r.header(*k, v);
                }
                r.call()
            }
            Method::Post | Method::Patch | Method::Put => {
                let mut r = match method {
                    Method::Post => self.agent.post(url),
                    Method::Patch => self.agent.patch(url),
                    _ => self.agent.put(url),
                };
                if let Some(b) = bearer {
                    r = r.header("authorization", b.expose());
                }
                if let Some(ct) = content_type {
                    r = r.header("content-type", ct);
                }
                for (k, v) in headers {
                    r = r.header(*k, v);
                }
                r.send(body)
            }
        };
        let mut response = result.map_err(|e| network_verdict(&self.relay, e))?;
        let status = response.status().as_u16();
        let header = |n: &str| {
            response
                .headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let retry_after = header("retry-after")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let request_id = header("request-id");
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER)
            .read_to_vec()
            .map_err(|e| network_verdict(&self.relay, e))?;
        Ok(Answer {
            status,
            body,
            retry_after,
            request_id,
        })
    }

    /// The application permissions (`roles` claim) of the app's Graph token, for
    /// `relay365 check`. The claim is read without verifying the signature: it only
    /// names what to fix, it grants nothing here.
    pub fn roles(&mut self, now: SystemTime) -> Result<Vec<String>, Verdict> {
        use base64::Engine;
        let token = self.tokens.token(now).map_err(|e| token_verdict(&e))?;
        let claims = token
            .secret()
            .expose()
            .split('.')
            .nth(1)
            .and_then(|p| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(p)
                    .ok()
            })
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .unwrap_or_default();
        Ok(claims["roles"]
            .as_array()
            .map(|r| {
                r.iter()
                    .filter_map(|v| v.as_str())
                    .map(|v| super::reply::sanitize(v, 64))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// `POST /sendMail` with the MIME message in base64.
    pub fn send_mime(&mut self, message: &[u8], now: SystemTime) -> Result<Answer, Verdict> {
        use base64::Engine;
        let body = base64::engine::general_purpose::STANDARD.encode(message);
        let url = self.url("/sendMail");
        self.call(Method::Post, &url, Some("text/plain"), body.as_bytes(), now)
    }
}

/// The host of an `https://host[:port]/...` URL.
fn host_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let hostport = rest.split('/').next().unwrap_or("");
    match hostport.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h.to_owned(),
        _ => hostport.to_owned(),
    }
}

/// The verdict for a request that got no HTTP answer.
fn network_verdict(relay: &str, e: ureq::Error) -> Verdict {
    if super::http::is_proxy_refusal(&e) {
        return hold(format!(
            "the HTTP proxy refused the tunnel to Microsoft Graph ({e}): check proxy and proxy_password, and that the proxy allows CONNECT to port 443"
        ));
    }
    let detail = e.to_string();
    let tls = matches!(e, ureq::Error::Rustls(_) | ureq::Error::Tls(_))
        || matches!(&e, ureq::Error::Io(io) if io.get_ref().is_some_and(|i| i.downcast_ref::<rustls::Error>().is_some()));
    if tls && detail.to_ascii_lowercase().contains("certificate") {
        return classify::untrusted_certificate(&super::reply::sanitize(&detail, 200));
    }
    Verdict {
        action: Action::Defer { hint: None },
        reason: format!(
            "no answer from Microsoft Graph at {relay} ({}), retrying later",
            super::reply::sanitize(&detail, 200)
        ),
    }
}

/// The Graph transport of one account worker.
pub struct Graph {
    client: Result<GraphClient, Verdict>,
    relay: String,
}

impl Graph {
    pub fn new(client: Result<GraphClient, Verdict>, relay: String) -> Graph {
        Graph { client, relay }
    }
}

impl Transport for Graph {
    fn connects(&self) -> bool {
        false
    }

    fn open(&mut self, _now: SystemTime) -> Result<(), Verdict> {
        self.client.as_ref().map(|_| ()).map_err(Clone::clone)
    }

    fn send(&mut self, txn: &Transaction, now: SystemTime) -> TxnResult {
        let relay = self.relay.clone();
        let client = match &mut self.client {
            Ok(c) => c,
            Err(v) => return TxnResult::ended(relay, TxnEnd::All(v.clone())),
        };
        let n = txn.recipients.len();
        let mut refused: Vec<Option<RcptResult>> = vec![None; n];
        let mut remaining: Vec<usize> = (0..n).collect();
        loop {
            let rcpts: Vec<&Address> = remaining
                .iter()
                .map(|&i| txn.recipients[i].address)
                .collect();
            let copy = copy::copy_for(txn.message, &rcpts);
            let outcome = if base64_len(copy.len()) > SENDMAIL_LIMIT {
                large::send(client, &copy, now)
            } else {
                client.send_mime(&copy, now)
            };
            let (verdict, text) = match outcome {
                Ok(a) => (a.verdict(), a.text()),
                Err(v) => {
                    let t = v.reason.clone();
                    (v, t)
                }
            };
            if verdict.action == Action::Accepted {
                let recipients = (0..n)
                    .map(|i| refused[i].take().unwrap_or(RcptResult::Accepted))
                    .collect();
                return TxnResult {
                    relay,
                    recipients,
                    end: TxnEnd::Sent(text),
                };
            }
            if verdict.action == Action::BounceRecipient {
                // Graph refuses the whole request and names the recipient: bounce that
                // one and send to the others without it.
                let named = remaining.iter().position(|&i| {
                    text.to_lowercase()
                        .contains(&txn.recipients[i].address.as_str().to_lowercase())
                });
                let at = match (named, remaining.len()) {
                    (Some(p), _) => Some(p),
                    (None, 1) => Some(0),
                    _ => None,
                };
                if let Some(p) = at {
                    let i = remaining.remove(p);
                    refused[i] = Some(RcptResult::Refused {
                        verdict: verdict.clone(),
                        text: text.clone(),
                    });
                    if remaining.is_empty() {
                        let recipients = refused.into_iter().flatten().collect();
                        return TxnResult {
                            relay,
                            recipients,
                            end: TxnEnd::NoneAccepted,
                        };
                    }
                    continue;
                }
            }
            let verdict = if verdict.action == Action::BounceRecipient {
                Verdict {
                    action: Action::BounceMessage,
                    reason: verdict.reason,
                }
            } else {
                verdict
            };
            if refused.iter().all(Option::is_none) {
                return TxnResult::ended(relay, TxnEnd::All(verdict));
            }
            // Some were refused before: they keep their bounce, the rest get this verdict.
            let ends = verdict.action.ends_transaction();
            let recipients = (0..n)
                .map(|i| {
                    refused[i].take().unwrap_or_else(|| RcptResult::Refused {
                        verdict: verdict.clone(),
                        text: text.clone(),
                    })
                })
                .collect();
            return TxnResult {
                relay,
                recipients,
                end: if ends {
                    TxnEnd::Stopped
                } else {
                    TxnEnd::NoneAccepted
                },
            };
        }
    }

    fn close(&mut self) {}
}

/// The length of `n` bytes in base64 with padding.
pub fn base64_len(n: usize) -> usize {
    n.div_ceil(3) * 4
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_become_verdicts_and_log_text() {
        let a = Answer {
            status: 400,
            body: br#"{"error":{"code":"ErrorInvalidRecipients","message":"At least one recipient isn't valid., Recipient 'x@y' isn't resolved."}}"#.to_vec(),
            retry_after: None,
            request_id: Some("abc".into()),
        };
        assert_eq!(a.verdict().action, Action::BounceRecipient);
        assert_eq!(
            a.text(),
            "400 ErrorInvalidRecipients: At least one recipient isn't valid., Recipient 'x@y' isn't resolved. request-id=abc"
        );
        let a = Answer {
            status: 202,
            body: Vec::new(),
            retry_after: None,
            request_id: None,
        };
        assert_eq!(a.verdict().action, Action::Accepted);
        assert_eq!(a.text(), "202 Accepted");
        assert_eq!(
            host_of("https://login.example.com:8443/t/oauth2"),
            "login.example.com"
        );
        assert_eq!(base64_len(3), 4);
        assert_eq!(base64_len(4), 8);
    }
}
