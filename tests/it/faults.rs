//! Server faults at every stage of the dialogue, from the Exchange Online emulator, a
//! scripted plain-TCP server and `openssl s_server` speaking only TLS 1.1: connection
//! refused, resets, stalls past the account's `timeout` (2 s here), garbage, multi-line
//! and 1 MiB replies, bad certificates, an old TLS version, no STARTTLS, and a token
//! endpoint that is down, slow or failing. Every one must defer: the message stays
//! queued with its recipient pending, no bounce is sent, no plaintext AUTH is ever
//! sent, each attempt ends within a bound set by `timeout`, and once the fault is gone
//! the message is delivered — exactly once, or twice where the server accepted it but
//! its final reply was lost (counted and reported).

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::*;
use crate::stress::*;
use emu::{Action as FaultAction, Fault, Stage, TokenFault};
use relay365::spool::queue::RcptStatus;

/// The account's `timeout` in these tests.
const TIMEOUT: &str = "2s";
/// An attempt against a faulty server must end within this (a few network waits of
/// `timeout` each, plus start-up).
const ATTEMPT_BOUND: Duration = Duration::from_secs(15);

/// A tenant for fault tests: no rate limits in the way, a 2 s timeout.
fn tenant(auth: Auth) -> Tenant {
    let mut cfg = tenant_config();
    cfg.message_rate = None;
    cfg.max_connections_per_mailbox = None;
    let t = Tenant::with(cfg, auth, "message_rate = \"off\"");
    set_timeout(&t.spool, TIMEOUT);
    t
}

fn dsn_count(t: &Tenant) -> usize {
    t.emu
        .messages()
        .iter()
        .filter(|m| String::from_utf8_lossy(&m.data).contains("multipart/report"))
        .count()
}

/// What a row allows once the fault is gone.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Final {
    /// Delivered exactly once.
    Once,
    /// The server may have accepted it before its reply was lost: once or twice.
    AtMostTwice,
}

/// Queues one tagged message, runs a flush against the fault, checks the deferral,
/// removes the fault with `clear`, flushes again and checks the delivery.
fn row(
    t: &Tenant,
    name: &str,
    n: &mut u64,
    inject: impl FnOnce(),
    clear: impl FnOnce(),
    fin: Final,
) -> String {
    *n += 1;
    let tag = tag(name, *n);
    let (code, err) = send_tagged(
        &t.spool.config,
        &["a@example.org".to_string()],
        tagged_message(&tag, 500),
    );
    assert_eq!(code, Some(0), "{err}");
    let dsn_before = dsn_count(t);
    inject();
    let started = Instant::now();
    let out = t.flush();
    let took = started.elapsed();
    assert_left(&out);
    let log = stderr(&out);
    let queued = t.queued();
    assert_eq!(
        queued.len(),
        1,
        "{name}: deferred, not lost or bounced: {log}"
    );
    assert!(
        queued[0]
            .recipients
            .iter()
            .all(|r| r.status == RcptStatus::Pending),
        "{name}: {queued:?}"
    );
    assert_eq!(dsn_count(t), dsn_before, "{name}: never a bounce: {log}");
    assert!(
        log.contains("status=deferred") || log.contains("deferred") || log.contains("held"),
        "{name}: the log says why: {log}"
    );
    assert!(
        took < ATTEMPT_BOUND,
        "{name}: the attempt took {took:?}, over {ATTEMPT_BOUND:?}"
    );
    let why = queued[0].recipients[0]
        .reply
        .clone()
        .or_else(|| queued[0].reason.clone())
        .unwrap_or_default();
    report(
        "server_faults",
        name,
        format!(
            "deferred in {:.1}s: {}",
            took.as_secs_f64(),
            why.chars().take(160).collect::<String>()
        ),
    );
    clear();
    // A hold would need an administrator; temporary faults must not cause one.
    let quota = stdout(&t.spool.relay365(&["quota"]));
    assert!(
        !quota.contains("held"),
        "{name}: a temporary fault held the account: {quota}"
    );
    let out = t.flush();
    assert_ok(&out);
    assert!(
        t.queued().is_empty(),
        "{name}: delivered once the fault is gone: {}",
        stderr(&out)
    );
    let times = deliveries(&t.emu).get(&tag).copied().unwrap_or(0);
    match fin {
        Final::Once => assert_eq!(times, 1, "{name}: exactly once"),
        Final::AtMostTwice => assert!((1..=2).contains(&times), "{name}: {times} deliveries"),
    }
    if times == 2 {
        report(
            "server_faults",
            &format!("{name}_delivered_twice"),
            "yes (final reply lost)",
        );
    }
    why
}

#[test]
fn drops_at_every_stage_defer() {
    let t = tenant(Auth::Login);
    let mut n = 0;
    for stage in [
        Stage::Connect,
        Stage::Greeting,
        Stage::Ehlo,
        Stage::StartTls,
        Stage::AfterTls,
        Stage::Auth,
        Stage::Mail,
        Stage::Rcpt(None),
        Stage::Data,
        Stage::MidData,
        Stage::AfterDot,
    ] {
        let name = format!("drop_at_{stage:?}").replace("(None)", "");
        let fin = if stage == Stage::AfterDot || stage == Stage::MidData {
            Final::AtMostTwice
        } else {
            Final::Once
        };
        row(
            &t,
            &name,
            &mut n,
            || {
                t.emu
                    .inject(Fault::new(stage.clone(), FaultAction::Drop).forever())
            },
            || t.emu.clear_faults(),
            fin,
        );
    }
    // The classic lost reply: the server took the message, then the connection died.
    row(
        &t,
        "accept_then_drop_after_dot",
        &mut n,
        || {
            t.emu
                .inject(Fault::new(Stage::AfterDot, FaultAction::AcceptThenDrop))
        },
        || t.emu.clear_faults(),
        Final::AtMostTwice,
    );
    assert!(
        t.emu.messages().len() as u64 > n,
        "AcceptThenDrop really delivered a copy before the reset"
    );
}

#[test]
fn stalls_are_bounded_by_the_configured_timeout() {
    let t = tenant(Auth::Login);
    let mut n = 0;
    for stage in [
        Stage::Greeting,
        Stage::Ehlo,
        Stage::StartTls,
        Stage::Auth,
        Stage::Mail,
        Stage::Rcpt(None),
        Stage::Data,
        Stage::AfterDot,
    ] {
        let name = format!("stall_at_{stage:?}").replace("(None)", "");
        // After the dot the server may record the message when its stall ends.
        let fin = if stage == Stage::AfterDot {
            Final::AtMostTwice
        } else {
            Final::Once
        };
        row(
            &t,
            &name,
            &mut n,
            || {
                t.emu.inject(
                    Fault::new(stage.clone(), FaultAction::Stall(Duration::from_secs(3))).times(1),
                )
            },
            || {
                t.emu.clear_faults();
                if fin == Final::AtMostTwice {
                    // Let the stalled session record its copy before the retry, so the
                    // duplicate is counted rather than racing the check.
                    std::thread::sleep(Duration::from_secs(3));
                }
            },
            fin,
        );
    }
}

/// Garbage is a protocol error (no reply, connection dropped); a 1 MiB multi-line 451
/// is read through (only a bounded part is kept) and classified by its code.
#[test]
fn garbage_multiline_and_overlong_replies_defer() {
    let t = tenant(Auth::Login);
    let mut n = 0;
    for stage in [
        Stage::Greeting,
        Stage::Ehlo,
        Stage::StartTls,
        Stage::AfterTls,
        Stage::Auth,
        Stage::Mail,
        Stage::Rcpt(None),
        Stage::Data,
        Stage::AfterDot,
    ] {
        for (what, action) in [
            ("garbage", FaultAction::Garbage),
            ("long_reply", FaultAction::LongReply),
        ] {
            let name = format!("{what}_at_{stage:?}").replace("(None)", "");
            let fin = if stage == Stage::AfterDot {
                Final::AtMostTwice
            } else {
                Final::Once
            };
            let why = row(
                &t,
                &name,
                &mut n,
                || {
                    t.emu
                        .inject(Fault::new(stage.clone(), action.clone()).forever())
                },
                || t.emu.clear_faults(),
                fin,
            );
            if action == FaultAction::LongReply {
                assert!(
                    why.contains("451") && !why.contains("no reply"),
                    "{name}: read and classified by its code: {why}"
                );
            } else {
                assert!(why.contains("protocol error"), "{name}: {why}");
            }
        }
    }
    for stage in [Stage::Mail, Stage::Rcpt(None), Stage::AfterDot] {
        let name = format!("multiline_451_at_{stage:?}").replace("(None)", "");
        row(
            &t,
            &name,
            &mut n,
            || {
                t.emu.inject(
                    Fault::reply(
                        stage.clone(),
                        "451-4.7.0 Temporary server error.\n451-4.7.0 Please try again later.\n451 4.7.0 PRX4 [SY5P282CA0097 2025-11-23T11:12:20.123Z]",
                    )
                    .forever(),
                )
            },
            || t.emu.clear_faults(),
            Final::Once,
        );
    }
}

#[test]
fn connection_refused_and_bad_certificates_defer() {
    let mut t = tenant(Auth::Login);
    let mut n = 0;
    let port = t.emu.port();
    let ca = t.spool.dir.path().join("ca.pem");
    // Connection refused: the emulator is gone; it comes back on the same port.
    n += 1;
    let tag1 = tag("refused", n);
    assert_eq!(
        send_tagged(
            &t.spool.config,
            &["a@example.org".into()],
            tagged_message(&tag1, 300)
        )
        .0,
        Some(0)
    );
    t.emu.shutdown();
    let started = Instant::now();
    let out = t.flush();
    assert_left(&out);
    assert_eq!(t.queued().len(), 1, "{}", stderr(&out));
    assert!(started.elapsed() < ATTEMPT_BOUND);
    report(
        "server_faults",
        "connection_refused",
        format!(
            "deferred in {:.1}s: {}",
            started.elapsed().as_secs_f64(),
            t.queued()[0].recipients[0]
                .reply
                .clone()
                .unwrap_or_default()
        ),
    );
    let restart = |cert: emu::CertKind| {
        let mut cfg = tenant_config().port(port).cert(cert);
        cfg.message_rate = None;
        // The old listener may take a moment to go away.
        let mut tries = 0;
        let e = loop {
            match emu::Emulator::start(cfg.clone()) {
                Ok(e) => break e,
                Err(err) if tries < 100 => {
                    tries += 1;
                    let _ = err;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(err) => panic!("restart emulator on port {port}: {err}"),
            }
        };
        e.write_ca(&ca).unwrap();
        e
    };
    t.emu = restart(emu::CertKind::Valid);
    assert_ok(&t.flush());
    assert_eq!(deliveries(&t.emu).get(&tag1), Some(&1));
    // Certificates that must be refused before anything is sent.
    for (name, kind) in [
        ("wrong_certificate_name", emu::CertKind::WrongName),
        ("expired_certificate", emu::CertKind::Expired),
    ] {
        t.emu.shutdown();
        t.emu = restart(kind);
        n += 1;
        let tg = tag(name, n);
        assert_eq!(
            send_tagged(
                &t.spool.config,
                &["a@example.org".into()],
                tagged_message(&tg, 300)
            )
            .0,
            Some(0)
        );
        let out = t.flush();
        assert_left(&out);
        assert_eq!(t.emu.message_count(), 0, "{name}");
        assert_eq!(
            t.emu.reply_count(235),
            0,
            "{name}: no AUTH over an untrusted TLS"
        );
        let q = t.queued();
        assert_eq!(q.len(), 1, "{name}: {}", stderr(&out));
        assert_eq!(q[0].recipients[0].status, RcptStatus::Pending);
        report(
            "server_faults",
            name,
            q[0].recipients[0].reply.clone().unwrap_or_default(),
        );
        t.emu.shutdown();
        t.emu = restart(emu::CertKind::Valid);
        assert_ok(&t.flush());
        assert_eq!(deliveries(&t.emu).get(&tg), Some(&1), "{name}");
    }
}

#[test]
fn token_endpoint_down_slow_or_failing_defers() {
    let t = tenant(Auth::Xoauth2);
    let tokens = || t.emu.token().expect("token endpoint");
    let mut n = 0;
    row(
        &t,
        "token_endpoint_down",
        &mut n,
        || tokens().set_down(true),
        || tokens().set_down(false),
        Final::Once,
    );
    // Each row starts without a cached token: the flush is a new process.
    row(
        &t,
        "token_endpoint_slow",
        &mut n,
        || tokens().inject(TokenFault::Slow(Duration::from_secs(6)), None),
        || tokens().clear_faults(),
        Final::Once,
    );
    for status in [500u16, 502, 503, 504, 429] {
        row(
            &t,
            &format!("token_endpoint_http_{status}"),
            &mut n,
            || {
                tokens().inject(
                    TokenFault::Error {
                        status,
                        body: "{\"error\":\"temporarily_unavailable\",\"error_description\":\"AADSTS50196: The server is temporarily unavailable.\"}".into(),
                    },
                    None,
                )
            },
            || tokens().clear_faults(),
            Final::Once,
        );
    }
    row(
        &t,
        "token_endpoint_drops_the_connection",
        &mut n,
        || tokens().inject(TokenFault::Drop, None),
        || tokens().clear_faults(),
        Final::Once,
    );
}

// ---------------------------------------------------------------------------------
// Servers the emulator cannot be: a scripted plain-TCP server that records every line
// it receives, optionally handing the connection to `openssl s_server` after STARTTLS.

/// What the scripted server does with STARTTLS.
#[derive(Clone, Copy)]
enum OnStartTls {
    Reply(&'static str),
    /// Answers 220, then bridges the socket to a TLS server on this port.
    Bridge(u16),
}

struct ScriptedServer {
    port: u16,
    seen: Arc<Mutex<Vec<String>>>,
}

impl ScriptedServer {
    fn start(ehlo: &'static str, on_starttls: OnStartTls) -> ScriptedServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let s = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let seen = s.clone();
                std::thread::spawn(move || converse(stream, ehlo, on_starttls, &seen));
            }
        });
        ScriptedServer { port, seen }
    }

    fn lines(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

fn converse(stream: TcpStream, ehlo: &str, on_starttls: OnStartTls, seen: &Mutex<Vec<String>>) {
    let mut out = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let _ = out.write_all(b"220 scripted.example ESMTP\r\n");
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        seen.lock().unwrap().push(line.trim_end().to_string());
        let cmd = line.to_ascii_uppercase();
        let reply: &str = if cmd.starts_with("EHLO") || cmd.starts_with("HELO") {
            ehlo
        } else if cmd.starts_with("STARTTLS") {
            match on_starttls {
                OnStartTls::Reply(r) => r,
                OnStartTls::Bridge(port) => {
                    let _ = out.write_all(b"220 2.0.0 SMTP server ready\r\n");
                    let Ok(tls) = TcpStream::connect(("127.0.0.1", port)) else {
                        return;
                    };
                    let mut to_tls = tls.try_clone().unwrap();
                    let mut from_tls = tls;
                    let mut client_in = reader.into_inner();
                    let mut client_out = out;
                    let a = std::thread::spawn(move || {
                        let _ = std::io::copy(&mut client_in, &mut to_tls);
                        let _ = to_tls.shutdown(std::net::Shutdown::Write);
                    });
                    let _ = std::io::copy(&mut from_tls, &mut client_out);
                    let _ = client_out.shutdown(std::net::Shutdown::Both);
                    let _ = a.join();
                    return;
                }
            }
        } else if cmd.starts_with("AUTH") {
            "535 5.7.3 Authentication unsuccessful\r\n"
        } else if cmd.starts_with("QUIT") {
            let _ = out.write_all(b"221 2.0.0 bye\r\n");
            return;
        } else {
            "250 2.0.0 OK\r\n"
        };
        let _ = out.write_all(reply.as_bytes());
    }
}

/// Points the tenant's account at another port (and TLS mode).
fn retarget(t: &Tenant, port: u16, tls: &str) {
    let text = std::fs::read_to_string(&t.spool.config).unwrap();
    let text = text.replace(
        &format!("port = {}\n", t.emu.port()),
        &format!("port = {port}\ntls = \"{tls}\"\n"),
    );
    std::fs::write(&t.spool.config, text).unwrap();
}

/// Queues a message, flushes against the current target, checks it deferred.
fn deferred_against(t: &Tenant, name: &str) -> String {
    let tg = tag(name, 1);
    assert_eq!(
        send_tagged(
            &t.spool.config,
            &["a@example.org".into()],
            tagged_message(&tg, 300)
        )
        .0,
        Some(0)
    );
    let started = Instant::now();
    let out = t.flush();
    assert_left(&out);
    assert!(
        started.elapsed() < ATTEMPT_BOUND,
        "{name}: {:?}",
        started.elapsed()
    );
    let q = t.queued();
    assert_eq!(q.len(), 1, "{name}: {}", stderr(&out));
    assert_eq!(q[0].recipients[0].status, RcptStatus::Pending, "{name}");
    let why = q[0].recipients[0].reply.clone().unwrap_or_default();
    report("server_faults", name, &why);
    why
}

#[test]
fn no_plaintext_auth_without_starttls() {
    for (name, ehlo, on) in [
        (
            "server_without_starttls",
            "250-scripted.example\r\n250-AUTH LOGIN PLAIN XOAUTH2\r\n250 SIZE 1000000\r\n",
            OnStartTls::Reply("502 5.5.1 no\r\n"),
        ),
        (
            "server_refusing_starttls",
            "250-scripted.example\r\n250-STARTTLS\r\n250 AUTH LOGIN PLAIN XOAUTH2\r\n",
            OnStartTls::Reply("454 4.7.0 TLS not available due to temporary reason\r\n"),
        ),
    ] {
        let t = tenant(Auth::Login);
        let server = ScriptedServer::start(ehlo, on);
        retarget(&t, server.port, "starttls");
        let why = deferred_against(&t, name);
        let lines = server.lines();
        assert!(
            lines.iter().any(|l| l.starts_with("EHLO")),
            "{name}: the client did talk to it: {lines:?}"
        );
        assert!(
            !lines
                .iter()
                .any(|l| l.to_ascii_uppercase().starts_with("AUTH")
                    || l.contains(PASSWORD)
                    || l.starts_with("MAIL")),
            "{name}: plaintext AUTH or mail: {lines:?}"
        );
        assert!(!why.contains(PASSWORD));
        report(
            "server_faults",
            &format!("{name}_lines_received"),
            lines.join(" | "),
        );
    }
}

/// `openssl s_server` allowing only TLS 1.1, with a throw-away self-signed certificate.
struct OldTls {
    child: std::process::Child,
    port: u16,
}

impl OldTls {
    fn start(dir: &std::path::Path) -> Option<OldTls> {
        let key = dir.join("old.key");
        let crt = dir.join("old.crt");
        let ok = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=localhost",
                "-keyout",
            ])
            .arg(&key)
            .arg("-out")
            .arg(&crt)
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?
            .success();
        if !ok {
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let child = std::process::Command::new("openssl")
            .args([
                "s_server",
                "-tls1_1",
                "-cipher",
                "DEFAULT@SECLEVEL=0",
                "-accept",
            ])
            .arg(format!("127.0.0.1:{port}"))
            .arg("-cert")
            .arg(&crt)
            .arg("-key")
            .arg(&key)
            // s_server quits when its stdin ends; keep it open.
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?;
        let s = OldTls { child, port };
        // Ready, and really speaking TLS 1.1 (the test would prove nothing otherwise).
        let speaks_11 = eventually(Duration::from_secs(5), || {
            std::process::Command::new("openssl")
                .args([
                    "s_client",
                    "-tls1_1",
                    "-cipher",
                    "DEFAULT@SECLEVEL=0",
                    "-connect",
                ])
                .arg(format!("127.0.0.1:{port}"))
                .stdin(std::process::Stdio::null())
                .output()
                .is_ok_and(|o| {
                    String::from_utf8_lossy(&o.stdout).contains("Protocol  : TLSv1.1")
                        && String::from_utf8_lossy(&o.stdout).contains("Cipher is ECDHE")
                })
        });
        speaks_11.then_some(s)
    }
}

impl Drop for OldTls {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_tls_1_1_only_server_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let Some(old) = OldTls::start(dir.path()) else {
        assert!(
            std::env::var_os("CI").is_none(),
            "openssl s_server -tls1_1 is needed in CI"
        );
        eprintln!("skipped: openssl cannot serve TLS 1.1 here");
        return;
    };
    // Implicit TLS straight to s_server.
    let t = tenant(Auth::Login);
    retarget(&t, old.port, "tls");
    let why = deferred_against(&t, "tls_1_1_only_implicit");
    assert!(
        why.to_lowercase().contains("version") || why.contains("TLS"),
        "{why}"
    );
    // STARTTLS on a plain listener, then the TLS 1.1 server behind it.
    let t = tenant(Auth::Login);
    let server = ScriptedServer::start(
        "250-scripted.example\r\n250-STARTTLS\r\n250 AUTH LOGIN PLAIN\r\n",
        OnStartTls::Bridge(old.port),
    );
    retarget(&t, server.port, "starttls");
    let why = deferred_against(&t, "tls_1_1_only_starttls");
    assert!(
        why.to_lowercase().contains("version") || why.contains("TLS"),
        "{why}"
    );
    let lines = server.lines();
    assert!(lines.iter().any(|l| l == "STARTTLS"), "{lines:?}");
    assert!(
        !lines
            .iter()
            .any(|l| l.to_ascii_uppercase().starts_with("AUTH")),
        "{lines:?}"
    );
}
