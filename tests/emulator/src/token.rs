//! The Entra ID v2.0 token endpoint for the client-credentials grant, over HTTPS on loopback,
//! and the registry of tokens it issued that the SMTP side checks for XOAUTH2.
//!
//! Requests are untrusted HTTP from the client under test: header and body sizes are bounded,
//! the form is parsed strictly, and a token is issued only for a registered app whose secret
//! or signed assertion checks out.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SecureRandom;
use rustls::ServerConfig;

use crate::clock::Civil;
use crate::config::{App, Credential};
use crate::https::{parse_form, read_chunked, respond, respond_full};
use crate::io::{Io, sleep_unless};
use crate::jwt::{AssertionError, RegisteredKey, verify_assertion};
use crate::replies::random_u64;

pub const SCOPE: &str = "https://outlook.office365.com/.default";
/// The app-only scope for Microsoft Graph.
pub const GRAPH_SCOPE: &str = "https://graph.microsoft.com/.default";
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
const MAX_HEADER_LINE: usize = 16 * 1024;
const MAX_HEADERS: usize = 100;
const MAX_BODY: u64 = 1024 * 1024;
/// Graph requests are read up to this (Graph itself refuses more than 4 MB).
const MAX_GRAPH_BODY: u64 = 8 * 1024 * 1024;

/// A scripted misbehaviour of the token endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenFault {
    /// Answer normally, but only after this delay.
    Slow(Duration),
    /// Answer with this HTTP status and JSON body instead.
    Error { status: u16, body: String },
    /// Close the connection without an answer.
    Drop,
}

struct Issued {
    mailboxes: Vec<String>,
    expires: Instant,
    /// Issued for Graph (`aud` graph.microsoft.com) rather than Exchange Online.
    graph: bool,
    roles: Vec<String>,
    app: String,
}

/// What a valid Graph token lets its app do.
#[derive(Debug, Clone)]
pub(crate) struct GraphGrant {
    pub(crate) app: String,
    pub(crate) roles: Vec<String>,
    pub(crate) mailboxes: Vec<String>,
}

/// Apps, issued tokens and counters; shared by the HTTPS listener and the SMTP sessions.
pub(crate) struct TokenRegistry {
    apps: Vec<(App, Option<RegisteredKey>)>,
    lifetime: Mutex<Duration>,
    tokens: Mutex<HashMap<String, Issued>>,
    requests: AtomicU64,
    issued: AtomicU64,
    faults: Mutex<Vec<(TokenFault, Option<u32>)>>,
    rng: ring::rand::SystemRandom,
}

fn random_bytes(rng: &ring::rand::SystemRandom, n: usize) -> Vec<u8> {
    let mut v = vec![0; n];
    if rng.fill(&mut v).is_err() {
        // The OS RNG failing is not worth a panic in a test server; fall back to SplitMix.
        v.iter_mut().for_each(|b| *b = random_u64() as u8);
    }
    v
}

pub(crate) fn uuid() -> String {
    let a = random_u64();
    let b = random_u64();
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        (b >> 48) & 0x3fff | 0x8000,
        b & 0xffff_ffff_ffff
    )
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64
}

impl TokenRegistry {
    pub(crate) fn new(apps: &[App], lifetime: Duration) -> Result<TokenRegistry, AssertionError> {
        let apps = apps
            .iter()
            .map(|a| Ok((a.clone(), RegisteredKey::from_credential(&a.credential)?)))
            .collect::<Result<_, AssertionError>>()?;
        Ok(TokenRegistry {
            apps,
            lifetime: Mutex::new(lifetime),
            tokens: Mutex::default(),
            requests: AtomicU64::new(0),
            issued: AtomicU64::new(0),
            faults: Mutex::default(),
            rng: ring::rand::SystemRandom::new(),
        })
    }

    fn lifetime(&self) -> Duration {
        *self.lifetime.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn app(&self, tenant: &str, client_id: &str) -> Option<&(App, Option<RegisteredKey>)> {
        self.apps.iter().find(|(a, _)| {
            a.tenant.eq_ignore_ascii_case(tenant) && a.client_id.eq_ignore_ascii_case(client_id)
        })
    }

    /// A fresh access token for `app`, shaped like an Entra ID v1 access token (about 2 KB).
    fn issue(&self, app: &App) -> (String, u64) {
        self.issue_for(app, false)
    }

    fn issue_for(&self, app: &App, graph: bool) -> (String, u64) {
        let lifetime = self.lifetime();
        let now = unix_now();
        let header = serde_json::json!({
            "typ": "JWT",
            "nonce": URL_SAFE_NO_PAD.encode(random_bytes(&self.rng, 32)),
            "alg": "RS256",
            "x5t": "JYhAcTPMZ_LX6DBlOWQ7Hn0NeXE",
            "kid": "JYhAcTPMZ_LX6DBlOWQ7Hn0NeXE",
        });
        let claims = serde_json::json!({
            "aud": if graph { "https://graph.microsoft.com" } else { "https://outlook.office365.com" },
            "iss": format!("https://sts.windows.net/{}/", app.tenant),
            "iat": now, "nbf": now, "exp": now + lifetime.as_secs() as i64,
            "aio": URL_SAFE_NO_PAD.encode(random_bytes(&self.rng, 96)),
            "app_displayname": "relay365",
            "appid": app.client_id,
            "appidacr": "1",
            "idp": format!("https://sts.windows.net/{}/", app.tenant),
            "oid": uuid(),
            "rh": URL_SAFE_NO_PAD.encode(random_bytes(&self.rng, 48)),
            "roles": if graph { app.graph_roles.clone() } else { vec!["SMTP.SendAsApp".to_owned()] },
            "sid": uuid(),
            "sub": uuid(),
            "tid": app.tenant,
            "uti": URL_SAFE_NO_PAD.encode(random_bytes(&self.rng, 16)),
            "ver": "1.0",
            "wids": ["0997a1d0-0d1d-4acb-b408-d5ca73121e90"],
            "xms_idrel": "7 26",
            "xms_ftd": URL_SAFE_NO_PAD.encode(random_bytes(&self.rng, 64)),
        });
        let token = format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string()),
            // SECURITY: 256 unpredictable bytes, so a client cannot guess a token it was not issued.
            URL_SAFE_NO_PAD.encode(random_bytes(&self.rng, 256))
        );
        let issued = Issued {
            mailboxes: app.mailboxes.clone(),
            expires: Instant::now() + lifetime,
            graph,
            roles: app.graph_roles.clone(),
            app: app.client_id.clone(),
        };
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(token.clone(), issued);
        self.issued.fetch_add(1, Ordering::Relaxed);
        (token, lifetime.as_secs())
    }

    /// Whether `token` was issued here, is unexpired, and its app may use `mailbox`.
    pub(crate) fn check(&self, token: &str, mailbox: &str) -> bool {
        let tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        // SECURITY: only tokens this endpoint issued, before expiry, for a permitted mailbox.
        tokens.get(token).is_some_and(|t| {
            Instant::now() < t.expires
                && !t.graph
                && t.mailboxes.iter().any(|m| m.eq_ignore_ascii_case(mailbox))
        })
    }

    /// The grant of a Graph bearer token, or Graph's 401 error (code, message).
    pub(crate) fn check_graph(
        &self,
        token: &str,
    ) -> Result<GraphGrant, (&'static str, &'static str)> {
        let tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        // SECURITY: only tokens this endpoint issued, before expiry, for Graph's audience.
        match tokens.get(token) {
            None => Err((
                "InvalidAuthenticationToken",
                "IDX14100: JWT is not well formed, there are no dots (.).",
            )),
            Some(t) if Instant::now() >= t.expires => Err((
                "InvalidAuthenticationToken",
                "Lifetime validation failed, the token is expired.",
            )),
            Some(t) if !t.graph => Err((
                "InvalidAuthenticationToken",
                "Access token validation failure. Invalid audience.",
            )),
            Some(t) => Ok(GraphGrant {
                app: t.app.clone(),
                roles: t.roles.clone(),
                mailboxes: t.mailboxes.clone(),
            }),
        }
    }

    fn take_fault(&self) -> Option<TokenFault> {
        let mut faults = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        let (fault, times) = faults.first_mut()?;
        let f = fault.clone();
        match times {
            Some(n) if *n <= 1 => {
                faults.remove(0);
            }
            Some(n) => *n -= 1,
            None => {}
        }
        Some(f)
    }

    /// Answers one token request: (HTTP status, JSON body).
    fn answer(&self, method: &str, path: &str, body: &[u8]) -> (u16, String) {
        let segs: Vec<&str> = path.split('?').next().unwrap_or("").split('/').collect();
        let tenant = match segs.as_slice() {
            ["", tenant, "oauth2", "v2.0", "token"] if !tenant.is_empty() => *tenant,
            _ => return (404, String::new()),
        };
        if method != "POST" {
            return entra_error(
                400,
                "invalid_request",
                900561,
                &format!(
                    "The endpoint only accepts POST requests. Received a {} request.",
                    crate::replies::echo(method)
                ),
            );
        }
        if !self
            .apps
            .iter()
            .any(|(a, _)| a.tenant.eq_ignore_ascii_case(tenant))
        {
            return entra_error(
                400,
                "invalid_request",
                90002,
                &format!(
                    "Tenant '{}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud. Check with your subscription administrator, this may happen if there are no active subscriptions for the tenant.",
                    crate::replies::echo(tenant)
                ),
            );
        }
        let form = parse_form(body);
        let get = |k: &str| form.get(k).map(String::as_str);
        let missing = |p: &str| {
            entra_error(
                400,
                "invalid_request",
                900144,
                &format!("The request body must contain the following parameter: '{p}'."),
            )
        };
        let Some(grant) = get("grant_type") else {
            return missing("grant_type");
        };
        if grant != "client_credentials" {
            return entra_error(
                400,
                "unsupported_grant_type",
                70003,
                &format!(
                    "The app requested an unsupported grant type '{}'.",
                    crate::replies::echo(grant)
                ),
            );
        }
        let Some(client_id) = get("client_id") else {
            return missing("client_id");
        };
        let Some((app, key)) = self.app(tenant, client_id) else {
            return entra_error(
                400,
                "unauthorized_client",
                700016,
                &format!(
                    "Application with identifier '{}' was not found in the directory '{}'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You may have sent your authentication request to the wrong tenant.",
                    crate::replies::echo(client_id),
                    crate::replies::echo(tenant)
                ),
            );
        };
        let Some(scope) = get("scope") else {
            return missing("scope");
        };
        if scope != SCOPE && scope != GRAPH_SCOPE {
            let (code, text) = if scope.ends_with("/.default") {
                (
                    70011,
                    format!(
                        "The provided request must include a 'scope' input parameter. The provided value for the input parameter 'scope' is not valid. The scope {} is not valid.",
                        crate::replies::echo(scope)
                    ),
                )
            } else {
                (
                    1002012,
                    format!(
                        "The provided value for scope {} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI).",
                        crate::replies::echo(scope)
                    ),
                )
            };
            return entra_error(400, "invalid_scope", code, &text);
        }
        match (get("client_secret"), get("client_assertion")) {
            (Some(secret), _) => {
                // SECURITY: the secret must match the registered one exactly.
                if !matches!(&app.credential, Credential::Secret(s) if s == secret) {
                    return entra_error(
                        401,
                        "invalid_client",
                        7000215,
                        &format!(
                            "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{}'.",
                            app.client_id
                        ),
                    );
                }
            }
            (None, Some(assertion)) => {
                match get("client_assertion_type") {
                    None => return missing("client_assertion_type"),
                    Some(t) if t != JWT_BEARER => {
                        return entra_error(
                            400,
                            "invalid_request",
                            50027,
                            "JWT token is invalid or malformed. The client_assertion_type is not supported.",
                        );
                    }
                    Some(_) => {}
                }
                let Some(key) = key else {
                    return entra_error(
                        401,
                        "invalid_client",
                        700027,
                        &format!(
                            "Client assertion contains an invalid signature. [Reason - The key was not found., Please visit the Azure Portal, Graph Explorer or directly use MS Graph to see configured keys for app Id '{}'.]",
                            app.client_id
                        ),
                    );
                };
                if let Err(e) = verify_assertion(assertion, key, &app.client_id, tenant, unix_now())
                {
                    return assertion_error(&e, &app.client_id);
                }
            }
            (None, None) => {
                return entra_error(
                    401,
                    "invalid_client",
                    7000218,
                    "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
                );
            }
        }
        let (token, expires_in) = self.issue_for(app, scope == GRAPH_SCOPE);
        let body = serde_json::json!({
            "token_type": "Bearer",
            "expires_in": expires_in,
            "ext_expires_in": expires_in,
            "access_token": token,
        });
        (200, body.to_string())
    }
}

fn assertion_error(e: &AssertionError, client_id: &str) -> (u16, String) {
    match e {
        AssertionError::Expired { .. } | AssertionError::NotYetValid { .. } => entra_error(
            401,
            "invalid_client",
            700024,
            &format!("Client assertion is not within its valid time range. ({e})"),
        ),
        AssertionError::Signature
        | AssertionError::UnknownKey(_)
        | AssertionError::Missing("x5t") => entra_error(
            401,
            "invalid_client",
            700027,
            &format!(
                "Client assertion contains an invalid signature. [Reason - {e}, Please visit the Azure Portal, Graph Explorer or directly use MS Graph to see configured keys for app Id '{client_id}'.]"
            ),
        ),
        AssertionError::Issuer(_) => entra_error(
            401,
            "invalid_client",
            700021,
            &format!(
                "Client assertion application identifier doesn't match 'client_id' parameter. ({e})"
            ),
        ),
        _ => entra_error(
            400,
            "invalid_request",
            50027,
            &format!("JWT token is invalid or malformed. ({e})"),
        ),
    }
}

/// An Entra ID error body: `error`, `error_description` with trace/correlation ids, `error_codes`...
fn entra_error(status: u16, error: &str, code: u32, text: &str) -> (u16, String) {
    let ts = Civil::now().entra();
    let trace = uuid();
    let correlation = uuid();
    let body = serde_json::json!({
        "error": error,
        "error_description": format!("AADSTS{code}: {text} Trace ID: {trace} Correlation ID: {correlation} Timestamp: {ts}"),
        "error_codes": [code],
        "timestamp": ts,
        "trace_id": trace,
        "correlation_id": correlation,
        "error_uri": format!("https://login.microsoftonline.com/error?code={code}"),
    });
    (status, body.to_string())
}

struct ListenState {
    down: bool,
    listening: bool,
}

struct Shared {
    registry: Arc<TokenRegistry>,
    /// Microsoft Graph, served on the same HTTPS listener once the emulator set it.
    graph: std::sync::OnceLock<Arc<crate::graph::Graph>>,
    tls: Arc<ServerConfig>,
    addr: SocketAddr,
    shutdown: Arc<AtomicBool>,
    state: Mutex<ListenState>,
    changed: Condvar,
}

/// The HTTPS token endpoint. Dropping it stops it.
pub struct TokenEndpoint {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl TokenEndpoint {
    pub(crate) fn start(
        registry: Arc<TokenRegistry>,
        tls: Arc<ServerConfig>,
        port: u16,
    ) -> io::Result<TokenEndpoint> {
        let listener = TcpListener::bind(("127.0.0.1", port))?;
        let shared = Arc::new(Shared {
            registry,
            graph: std::sync::OnceLock::new(),
            tls,
            addr: listener.local_addr()?,
            shutdown: Arc::new(AtomicBool::new(false)),
            state: Mutex::new(ListenState {
                down: false,
                listening: true,
            }),
            changed: Condvar::new(),
        });
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("token-accept".into())
            .spawn(move || accept_loop(&s, listener))?;
        Ok(TokenEndpoint {
            shared,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    pub fn port(&self) -> u16 {
        self.shared.addr.port()
    }

    /// `https://localhost:PORT` — the authority to configure instead of login.microsoftonline.com.
    pub fn authority(&self) -> String {
        format!("https://localhost:{}", self.port())
    }

    /// `https://localhost:PORT/{tenant}/oauth2/v2.0/token`.
    pub fn url(&self, tenant: &str) -> String {
        format!("{}/{tenant}/oauth2/v2.0/token", self.authority())
    }

    /// Serves Microsoft Graph's paths (`/v1.0/...`, upload URLs) on this listener.
    pub(crate) fn set_graph(&self, graph: Arc<crate::graph::Graph>) {
        let _ = self.shared.graph.set(graph);
    }

    /// Requests received (each HTTP request, whatever its outcome).
    pub fn requests(&self) -> u64 {
        self.shared.registry.requests.load(Ordering::Relaxed)
    }

    /// Tokens issued.
    pub fn issued(&self) -> u64 {
        self.shared.registry.issued.load(Ordering::Relaxed)
    }

    /// Applies `fault` to the next `times` requests (`None` = all).
    pub fn inject(&self, fault: TokenFault, times: Option<u32>) {
        self.shared
            .registry
            .faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((fault, times));
    }

    pub fn clear_faults(&self) {
        self.shared
            .registry
            .faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Closes (true) or reopens (false) the listening socket: while down, connections are
    /// refused. Returns once the change is in effect.
    pub fn set_down(&self, down: bool) {
        let sh = &self.shared;
        let mut st = sh.state.lock().unwrap_or_else(|e| e.into_inner());
        st.down = down;
        sh.changed.notify_all();
        if down && st.listening {
            drop(st);
            // Wake the blocking accept so it sees the flag.
            let _ = TcpStream::connect_timeout(&sh.addr, Duration::from_secs(1));
            st = sh.state.lock().unwrap_or_else(|e| e.into_inner());
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while st.listening == down && Instant::now() < deadline {
            st = match sh.changed.wait_timeout(st, Duration::from_millis(50)) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
    }

    /// Sets `expires_in` for tokens issued from now on.
    pub fn set_lifetime(&self, lifetime: Duration) {
        *self
            .shared
            .registry
            .lifetime
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = lifetime;
    }

    /// Makes every token issued so far expired (as after their `expires_in`).
    pub fn expire_all(&self) {
        let past = Instant::now();
        for t in self
            .shared
            .registry
            .tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values_mut()
        {
            t.expires = past;
        }
    }

    /// Issues a token for a registered app without HTTP (for tests of the SMTP side alone).
    pub fn issue(&self, tenant: &str, client_id: &str) -> Option<String> {
        let reg = &self.shared.registry;
        let (app, _) = reg.app(tenant, client_id)?;
        Some(reg.issue(app).0)
    }

    pub fn shutdown(&mut self) {
        let sh = &self.shared;
        sh.shutdown.store(true, Ordering::SeqCst);
        sh.changed.notify_all();
        let _ = TcpStream::connect_timeout(&sh.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for TokenEndpoint {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn accept_loop(sh: &Arc<Shared>, first: TcpListener) {
    let mut listener = Some(first);
    loop {
        if sh.shutdown.load(Ordering::SeqCst) {
            return;
        }
        let down = sh.state.lock().unwrap_or_else(|e| e.into_inner()).down;
        if down || listener.is_none() {
            listener = None;
            let mut st = sh.state.lock().unwrap_or_else(|e| e.into_inner());
            st.listening = false;
            sh.changed.notify_all();
            while st.down && !sh.shutdown.load(Ordering::SeqCst) {
                st = match sh.changed.wait_timeout(st, Duration::from_millis(200)) {
                    Ok((g, _)) => g,
                    Err(e) => e.into_inner().0,
                };
            }
            drop(st);
            if sh.shutdown.load(Ordering::SeqCst) {
                return;
            }
            match TcpListener::bind(sh.addr) {
                Ok(l) => listener = Some(l),
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            }
            let mut st = sh.state.lock().unwrap_or_else(|e| e.into_inner());
            st.listening = true;
            sh.changed.notify_all();
        }
        let Some(l) = &listener else { continue };
        match l.accept() {
            Ok((sock, _)) => {
                if sh.shutdown.load(Ordering::SeqCst)
                    || sh.state.lock().unwrap_or_else(|e| e.into_inner()).down
                {
                    continue;
                }
                let s = Arc::clone(sh);
                let _ = std::thread::Builder::new()
                    .name("token-conn".into())
                    .spawn(move || serve(&s, sock));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// One HTTP/1.1 connection, keep-alive until the client closes or says `Connection: close`.
fn serve(sh: &Shared, sock: TcpStream) {
    let Ok(mut io) = Io::new(sock, Arc::clone(&sh.shutdown), Duration::from_secs(30)) else {
        return;
    };
    if io.start_tls(Arc::clone(&sh.tls)).is_err() {
        return;
    }
    while let Ok(l) = io.read_line(MAX_HEADER_LINE) {
        let request_line = String::from_utf8_lossy(l).trim_end().to_owned();
        if request_line.is_empty() {
            continue;
        }
        let mut parts = request_line.split(' ');
        let method = parts.next().unwrap_or("").to_owned();
        let path = parts.next().unwrap_or("").to_owned();
        let mut content_length = 0u64;
        let mut close = false;
        let mut chunked = false;
        let mut headers: Vec<(String, String)> = Vec::new();
        let mut headers_ok = false;
        for _ in 0..MAX_HEADERS {
            let line = match io.read_line(MAX_HEADER_LINE) {
                Ok(l) => String::from_utf8_lossy(l).trim_end().to_owned(),
                Err(_) => {
                    io.close();
                    return;
                }
            };
            if line.is_empty() {
                headers_ok = true;
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                let v = v.trim();
                if headers.len() < MAX_HEADERS {
                    headers.push((k.trim().to_ascii_lowercase(), v.to_owned()));
                }
                if k.eq_ignore_ascii_case("content-length") {
                    content_length = v.parse().unwrap_or(u64::MAX);
                } else if k.eq_ignore_ascii_case("connection") && v.eq_ignore_ascii_case("close") {
                    close = true;
                } else if k.eq_ignore_ascii_case("transfer-encoding")
                    && v.eq_ignore_ascii_case("chunked")
                {
                    chunked = true;
                }
            }
        }
        // SECURITY: bounded header count and body size.
        let graph = sh
            .graph
            .get()
            .filter(|_| path.starts_with("/v1.0/") || path.starts_with("/upload/"));
        let limit = if graph.is_some() {
            MAX_GRAPH_BODY
        } else {
            MAX_BODY
        };
        if !headers_ok || content_length > limit {
            respond(&mut io, 400, "", true);
            break;
        }
        let body = if chunked {
            read_chunked(&mut io, limit)
        } else {
            let mut body = Vec::with_capacity(content_length as usize);
            io.read_exact_to(content_length, |b| body.extend_from_slice(b))
                .map(|_| body)
                .ok()
        };
        let Some(body) = body else { break };
        if let Some(g) = graph {
            let a = g.answer(&method, &path, &headers, &body);
            respond_full(&mut io, &a, close);
            if close || io.flush().is_err() {
                break;
            }
            continue;
        }
        sh.registry.requests.fetch_add(1, Ordering::Relaxed);
        let (status, json) = match sh.registry.take_fault() {
            Some(TokenFault::Drop) => {
                io.abort();
                return;
            }
            Some(TokenFault::Error { status, body }) => (status, body),
            Some(TokenFault::Slow(d)) => {
                if !sleep_unless(&sh.shutdown, d) {
                    break;
                }
                sh.registry.answer(&method, &path, &body)
            }
            None => sh.registry.answer(&method, &path, &body),
        };
        respond(&mut io, status, &json, close);
        if close || io.flush().is_err() {
            break;
        }
    }
    io.close();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> TokenRegistry {
        TokenRegistry::new(
            &[App::with_secret("t1", "app1", "s3cret", "m@x")],
            Duration::from_secs(60),
        )
        .unwrap()
    }

    fn form(pairs: &[(&str, &str)]) -> Vec<u8> {
        pairs
            .iter()
            .map(|(k, v)| format!("{k}={}", v.replace(':', "%3A").replace('/', "%2F")))
            .collect::<Vec<_>>()
            .join("&")
            .into_bytes()
    }

    #[test]
    fn issues_for_the_right_secret_only() {
        let r = registry();
        let good = form(&[
            ("grant_type", "client_credentials"),
            ("client_id", "app1"),
            ("client_secret", "s3cret"),
            ("scope", SCOPE),
        ]);
        let (status, body) = r.answer("POST", "/t1/oauth2/v2.0/token", &good);
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let token = v["access_token"].as_str().unwrap();
        assert!(
            (1500..=3072).contains(&token.len()),
            "token length {}",
            token.len()
        );
        assert_eq!(v["token_type"], "Bearer");
        assert_eq!(v["expires_in"], 60);
        assert!(r.check(token, "M@x"));
        assert!(!r.check(token, "other@x"));
        assert!(!r.check("forged", "m@x"));

        let bad = form(&[
            ("grant_type", "client_credentials"),
            ("client_id", "app1"),
            ("client_secret", "nope"),
            ("scope", SCOPE),
        ]);
        let (status, body) = r.answer("POST", "/t1/oauth2/v2.0/token", &bad);
        assert_eq!(status, 401);
        assert!(body.contains("\"error\":\"invalid_client\""));
        assert!(body.contains("AADSTS7000215: Invalid client secret provided."));
        assert!(body.contains("\"error_codes\":[7000215]"));
    }

    #[test]
    fn entra_errors() {
        let r = registry();
        let p = "/t1/oauth2/v2.0/token";
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], u16, &'a str);
        let cases: &[Case] = &[
            (p, &[], 400, "AADSTS900144"),
            (p, &[("grant_type", "password")], 400, "AADSTS70003"),
            (
                p,
                &[("grant_type", "client_credentials"), ("client_id", "zzz")],
                400,
                "AADSTS700016",
            ),
            (
                p,
                &[
                    ("grant_type", "client_credentials"),
                    ("client_id", "app1"),
                    ("scope", "https://x/Mail.Send"),
                ],
                400,
                "AADSTS1002012",
            ),
            (
                p,
                &[
                    ("grant_type", "client_credentials"),
                    ("client_id", "app1"),
                    ("scope", SCOPE),
                ],
                401,
                "AADSTS7000218",
            ),
            ("/t9/oauth2/v2.0/token", &[], 400, "AADSTS90002"),
        ];
        for (path, f, status, code) in cases {
            let (s, body) = r.answer("POST", path, &form(f));
            assert_eq!((s, body.contains(code)), (*status, true), "{body}");
        }
        assert_eq!(r.answer("POST", "/nope", b"").0, 404);
        assert_eq!(r.answer("GET", p, b"").0, 400);
    }

    #[test]
    fn form_decoding() {
        let f = parse_form(b"a=1%2B2+3&b=%zz&c&a=ignored");
        assert_eq!(f["a"], "1+2 3");
        assert_eq!(f["b"], "%zz");
        assert_eq!(f["c"], "");
        assert_eq!(crate::https::percent_decode("%"), "%");
        assert_eq!(crate::https::percent_decode("%4"), "%4");
        assert_eq!(crate::https::percent_decode("%41"), "A");
        assert_eq!(crate::https::percent_decode("%+1"), "% 1");
    }
}
