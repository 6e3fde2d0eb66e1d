//! Through a real HTTP proxy on loopback (Debian's tinyproxy): the token endpoint and
//! Microsoft Graph over `CONNECT` (ureq), SMTP submission over our own `CONNECT` tunnel
//! with TLS end to end, with and without proxy authentication, and a proxy that
//! requires credentials or refuses `CONNECT` holds the account in plain words.
//!
//! Without tinyproxy the tests print a skip notice, or fail when `CI` is set (`.ci/run`
//! installs the `tinyproxy-bin` package).

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::harness::*;

const PROXY_USER: &str = "relay";
const PROXY_PASSWORD: &str = "pr0xy-pa55-never-logged";

/// A tinyproxy on 127.0.0.1, killed on drop.
struct Tinyproxy {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Open,
    /// `BasicAuth relay <password>`.
    Auth,
    /// CONNECT only to port 1: every tunnel relay365 asks for is refused (403).
    RefuseConnect,
}

fn tinyproxy_or_skip(test: &str) -> Option<()> {
    let found = Command::new("tinyproxy")
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return Some(());
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: tinyproxy is not installed: apt-get install tinyproxy-bin (.ci/run does)");
    }
    eprintln!("SKIPPED {test}: tinyproxy is not installed (apt-get install tinyproxy-bin)");
    None
}

impl Tinyproxy {
    fn start(mode: Mode) -> Tinyproxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let log = dir.path().join("tinyproxy.log");
        let mut conf = format!(
            "Port {port}\nListen 127.0.0.1\nTimeout 30\nLogLevel Connect\nLogFile \"{}\"\nMaxClients 50\nAllow 127.0.0.1\n",
            log.display()
        );
        if is_root() {
            conf.push_str("User nobody\nGroup nogroup\n");
            // The log is written after dropping privileges.
            let _ = std::fs::set_permissions(
                dir.path(),
                std::os::unix::fs::PermissionsExt::from_mode(0o777),
            );
        }
        match mode {
            Mode::Open => {}
            Mode::Auth => conf.push_str(&format!("BasicAuth {PROXY_USER} {PROXY_PASSWORD}\n")),
            Mode::RefuseConnect => conf.push_str("ConnectPort 1\n"),
        }
        let path = dir.path().join("tinyproxy.conf");
        std::fs::write(&path, conf).expect("conf");
        let child = Command::new("tinyproxy")
            .arg("-d")
            .arg("-c")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn tinyproxy");
        assert!(
            eventually(Duration::from_secs(10), || TcpStream::connect((
                "127.0.0.1",
                port
            ))
            .is_ok()),
            "tinyproxy did not start"
        );
        Tinyproxy {
            child,
            port,
            log,
            _dir: dir,
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Tunnels opened to `port` (tinyproxy logs each CONNECT request line).
    fn connects_to(&self, port: u16) -> usize {
        self.log_text()
            .lines()
            .filter(|l| {
                l.contains("Request") && l.contains("CONNECT") && l.contains(&format!(":{port} "))
            })
            .count()
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn send(t: &Tenant, rcpt: &str) {
    assert_ok(
        &t.spool
            .sendmail(&["-i", rcpt], b"Subject: via proxy\n\nbody\n"),
    );
}

#[test]
fn graph_and_its_token_go_through_an_http_proxy_with_and_without_authentication() {
    if tinyproxy_or_skip(
        "graph_and_its_token_go_through_an_http_proxy_with_and_without_authentication",
    )
    .is_none()
    {
        return;
    }
    let open = Tinyproxy::start(Mode::Open);
    let t = Tenant::graph(
        tenant_config(),
        &format!("proxy = \"http://127.0.0.1:{}\"", open.port),
        "",
        "",
        "",
    );
    send(&t, "a@example.org");
    let out = t.flush();
    assert_ok(&out);
    assert_eq!(t.emu.message_count(), 1, "{}", stderr(&out));
    let https = t.emu.token_port().unwrap();
    assert!(
        open.connects_to(https) >= 1,
        "the token and Graph went through the proxy: {}",
        open.log_text()
    );

    let auth = Tinyproxy::start(Mode::Auth);
    let t = Tenant::graph(
        tenant_config(),
        "",
        &format!("proxy = \"http://{PROXY_USER}@127.0.0.1:{}\"", auth.port),
        "",
        &format!("proxy_password = \"{PROXY_PASSWORD}\""),
    );
    send(&t, "a@example.org");
    let out = t.flush();
    assert_ok(&out);
    assert_eq!(t.emu.message_count(), 1, "{}", stderr(&out));
    assert!(
        auth.connects_to(t.emu.token_port().unwrap()) >= 1,
        "{}",
        auth.log_text()
    );
    assert!(
        !stderr(&out).contains(PROXY_PASSWORD),
        "never log the proxy password"
    );
}

/// An SMTP tenant (XOAUTH2, so the token endpoint is used too) whose account goes
/// through `proxy`, with `proxy_password` in its secrets table when given.
fn smtp_tenant(proxy: &str, password: Option<&str>) -> Tenant {
    let t = Tenant::with(
        tenant_config(),
        Auth::Xoauth2,
        &format!("proxy = \"{proxy}\""),
    );
    if let Some(p) = password {
        let path = t.spool.dir.path().join("secrets.toml");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(&format!("proxy_password = \"{p}\"\n"));
        std::fs::write(&path, text).unwrap();
    }
    t
}

#[test]
fn smtp_submission_tunnels_through_an_authenticating_proxy_with_tls_end_to_end() {
    if tinyproxy_or_skip(
        "smtp_submission_tunnels_through_an_authenticating_proxy_with_tls_end_to_end",
    )
    .is_none()
    {
        return;
    }
    let auth = Tinyproxy::start(Mode::Auth);
    let t = smtp_tenant(
        &format!("http://{PROXY_USER}@127.0.0.1:{}", auth.port),
        Some(PROXY_PASSWORD),
    );
    send(&t, "a@example.org");
    let out = t.flush();
    assert_ok(&out);
    let log = stderr(&out);
    assert_eq!(t.emu.message_count(), 1, "{log}");
    assert_eq!(
        t.emu.messages()[0].mailbox.as_deref(),
        Some(MAILBOX),
        "authenticated over the tunnel"
    );
    assert!(log.contains("status=sent (250"), "{log}");
    assert!(
        auth.connects_to(t.emu.port()) >= 1,
        "SMTP went through the proxy: {}",
        auth.log_text()
    );
    assert!(
        auth.connects_to(t.emu.token_port().unwrap()) >= 1,
        "so did the token: {}",
        auth.log_text()
    );
    assert!(!log.contains(PROXY_PASSWORD));
    // The tunnel carries TLS to the server's own name: a proxy cannot downgrade it, and
    // the emulator saw STARTTLS (it refuses AUTH without it).
    assert!(!log.contains("plain text"), "{log}");
}

#[test]
fn a_proxy_that_wants_credentials_or_refuses_connect_holds_the_account_in_plain_words() {
    if tinyproxy_or_skip(
        "a_proxy_that_wants_credentials_or_refuses_connect_holds_the_account_in_plain_words",
    )
    .is_none()
    {
        return;
    }
    let auth = Tinyproxy::start(Mode::Auth);
    let refuse = Tinyproxy::start(Mode::RefuseConnect);
    for (proxy, needle) in [
        (format!("http://127.0.0.1:{}", auth.port), "proxy_password"),
        (format!("http://127.0.0.1:{}", refuse.port), "CONNECT"),
    ] {
        // SMTP with a password: only our own tunnel is involved.
        let t = Tenant::with(
            tenant_config(),
            Auth::Login,
            &format!("proxy = \"{proxy}\""),
        );
        send(&t, "a@example.org");
        let out = t.flush();
        let log = stderr(&out);
        assert!(
            log.contains("held until") && log.contains(needle),
            "{proxy}: {log}"
        );
        assert!(!log.contains("status=bounced"), "never a bounce: {log}");
        assert_eq!(t.queued().len(), 1);
        assert_eq!(t.emu.message_count(), 0);
        // Graph: the token request meets the proxy first.
        let t = Tenant::graph(tenant_config(), &format!("proxy = \"{proxy}\""), "", "", "");
        send(&t, "a@example.org");
        let out = t.flush();
        let log = stderr(&out);
        assert!(
            log.contains("held until") && log.contains("proxy"),
            "{proxy}: {log}"
        );
        assert!(!log.contains("status=bounced"), "never a bounce: {log}");
        assert_eq!(t.queued().len(), 1);
    }
}

#[test]
fn https_proxy_from_the_environment_is_used_unless_no_proxy_exempts_the_host() {
    if tinyproxy_or_skip(
        "https_proxy_from_the_environment_is_used_unless_no_proxy_exempts_the_host",
    )
    .is_none()
    {
        return;
    }
    let open = Tinyproxy::start(Mode::Open);
    let flush = |t: &Tenant, no_proxy: Option<&str>| {
        let mut cmd = Command::new(RELAY365);
        cmd.arg("--config")
            .arg(&t.spool.config)
            .arg("flush")
            .env("HTTPS_PROXY", format!("http://127.0.0.1:{}", open.port))
            .env_remove("NO_PROXY")
            .env_remove("no_proxy");
        if let Some(n) = no_proxy {
            cmd.env("NO_PROXY", n);
        }
        run(cmd, b"")
    };
    let t = Tenant::graph(tenant_config(), "", "", "", "");
    let https = t.emu.token_port().unwrap();
    send(&t, "a@example.org");
    assert_ok(&flush(&t, None));
    assert_eq!(t.emu.message_count(), 1);
    let through = open.connects_to(https);
    assert!(through >= 1, "{}", open.log_text());
    send(&t, "b@example.org");
    assert_ok(&flush(&t, Some("example.net,localhost")));
    assert_eq!(t.emu.message_count(), 2);
    assert_eq!(
        open.connects_to(https),
        through,
        "NO_PROXY=localhost goes direct"
    );
}
