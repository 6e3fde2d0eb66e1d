//! Microsoft Graph in the emulator, with an independent HTTPS client: token audience,
//! sendMail with MIME and JSON bodies, the documented error bodies, 429 with
//! `Retry-After` for concurrency, and inbox paging.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use relay365_emulator::{App, Config, Emulator, GRAPH_SCOPE, GraphFault, Mailbox, SCOPE, Via};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

const MB: &str = "app@contoso.com";
const TENANT: &str = "contoso.onmicrosoft.com";
const CLIENT: &str = "graph-test";
const SECRET: &str = "s3cret";

fn start(cfg: Config) -> Emulator {
    Emulator::start(
        cfg.mailbox(Mailbox::new(MB))
            .app(App::with_secret(TENANT, CLIENT, SECRET, MB)),
    )
    .unwrap()
}

fn agent(emu: &Emulator) -> ureq::Agent {
    let pem = emu.ca_pem();
    let roots: Vec<ureq::tls::Certificate<'static>> =
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .map(|c| ureq::tls::Certificate::from_der(c.unwrap().as_ref()).to_owned())
            .collect();
    let tls = ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::Rustls)
        .root_certs(ureq::tls::RootCerts::Specific(Arc::new(roots)))
        .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .build();
    ureq::Agent::config_builder()
        .tls_config(tls)
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(20)))
        .build()
        .into()
}

fn token(a: &ureq::Agent, emu: &Emulator, scope: &str) -> String {
    let form = format!(
        "grant_type=client_credentials&client_id={CLIENT}&client_secret={SECRET}&scope={}",
        scope.replace(':', "%3A").replace('/', "%2F")
    );
    let mut r = a
        .post(&emu.token_url(TENANT).unwrap())
        .header("content-type", "application/x-www-form-urlencoded")
        .send(form.as_bytes())
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: serde_json::Value =
        serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    v["access_token"].as_str().unwrap().to_owned()
}

/// (status, body, Retry-After)
fn post(
    a: &ureq::Agent,
    url: &str,
    token: &str,
    ct: &str,
    body: &[u8],
) -> (u16, serde_json::Value, Option<String>) {
    let mut r = a
        .post(url)
        .header("authorization", &format!("Bearer {token}"))
        .header("content-type", ct)
        .send(body)
        .unwrap();
    let retry = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let text = r.body_mut().read_to_string().unwrap_or_default();
    (
        r.status().as_u16(),
        serde_json::from_str(&text).unwrap_or_default(),
        retry,
    )
}

fn get(a: &ureq::Agent, url: &str, token: &str) -> (u16, serde_json::Value) {
    let mut r = a
        .get(url)
        .header("authorization", &format!("Bearer {token}"))
        .call()
        .unwrap();
    let text = r.body_mut().read_to_string().unwrap_or_default();
    (
        r.status().as_u16(),
        serde_json::from_str(&text).unwrap_or_default(),
    )
}

#[test]
fn send_mail_takes_mime_and_json_with_graph_tokens_only_and_documented_errors() {
    let emu = start(Config::default());
    let a = agent(&emu);
    let url = format!("{}/v1.0/users/{MB}/sendMail", emu.graph_url().unwrap());
    let exchange = token(&a, &emu, SCOPE);
    let (status, body, _) = post(&a, &url, &exchange, "text/plain", b"");
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "InvalidAuthenticationToken");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Invalid audience")
    );

    let graph = token(&a, &emu, GRAPH_SCOPE);
    let mime = b"From: app@contoso.com\r\nTo: a@example.org\r\nBcc: b@example.org\r\nSubject: s\r\n\r\nhello\r\n";
    let b64 = base64::engine::general_purpose::STANDARD.encode(mime);
    let (status, _, _) = post(&a, &url, &graph, "text/plain", b64.as_bytes());
    assert_eq!(status, 202);
    let m = &emu.messages()[0];
    assert_eq!(m.via, Via::GraphMime);
    assert_eq!(m.rcpts, ["a@example.org", "b@example.org"]);
    assert!(
        !String::from_utf8_lossy(&m.data).contains("b@example.org"),
        "Bcc is not delivered"
    );

    let json = r#"{"message":{"subject":"j","body":{"contentType":"Text","content":"hi"},"toRecipients":[{"emailAddress":{"address":"c@example.org"}}]},"saveToSentItems":true}"#;
    let (status, _, _) = post(&a, &url, &graph, "application/json", json.as_bytes());
    assert_eq!(status, 202);
    let m = &emu.messages()[1];
    assert_eq!(
        (m.via, m.rcpts.clone()),
        (Via::GraphJson, vec!["c@example.org".to_owned()])
    );

    let (status, body, _) = post(&a, &url, &graph, "text/plain", b"%%% not base64");
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "ErrorMimeContentInvalidBase64String");
    let spoofed = base64::engine::general_purpose::STANDARD
        .encode(b"From: ceo@contoso.com\r\nTo: a@example.org\r\n\r\nx\r\n");
    let (status, body, _) = post(&a, &url, &graph, "text/plain", spoofed.as_bytes());
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("ErrorSendAsDenied"))
    );

    emu.inject_graph(
        GraphFault::new(
            429,
            "ApplicationThrottled",
            "Application is over its MailboxConcurrency limit.",
        )
        .retry_after(3),
    );
    let (status, body, retry) = post(&a, &url, &graph, "text/plain", b64.as_bytes());
    assert_eq!((status, retry.as_deref()), (429, Some("3")));
    assert_eq!(body["error"]["code"], "ApplicationThrottled");
    assert_eq!(emu.message_count(), 2);
}

#[test]
fn more_than_four_requests_at_once_get_429_and_the_inbox_pages() {
    let emu = Arc::new(start(Config {
        graph_delay: Duration::from_millis(1500),
        ..Config::default()
    }));
    let a = agent(&emu);
    let graph = token(&a, &emu, GRAPH_SCOPE);
    let url = format!(
        "{}/v1.0/users/{MB}/mailFolders/inbox",
        emu.graph_url().unwrap()
    );
    let threads: Vec<_> = (0..6)
        .map(|_| {
            let (a, url, graph) = (a.clone(), url.clone(), graph.clone());
            std::thread::spawn(move || get(&a, &url, &graph).0)
        })
        .collect();
    let statuses: Vec<u16> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(
        statuses.iter().filter(|&&s| s == 200).count(),
        4,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|&&s| s == 429).count(),
        2,
        "{statuses:?}"
    );
    assert_eq!(emu.graph_max_concurrent_for(MB), 4);

    for n in 0..3 {
        emu.deliver_to_inbox(MB, format!("Subject: n{n}\r\n\r\nx\r\n").as_bytes());
    }
    let list = format!("{url}/messages?$top=2&$orderby=receivedDateTime%20asc");
    let (status, page) = get(&a, &list, &graph);
    assert_eq!(status, 200);
    assert_eq!(page["value"].as_array().unwrap().len(), 2);
    let next = page["@odata.nextLink"].as_str().unwrap().to_owned();
    let (_, page) = get(&a, &next, &graph);
    assert_eq!(page["value"].as_array().unwrap().len(), 1);
    assert_eq!(page["value"][0]["subject"], "n2");
    assert!(page["@odata.nextLink"].is_null());
}
