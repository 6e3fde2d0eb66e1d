//! The network listener (`relay365 listen`) over real TCP on loopback: a raw client
//! for the exact bytes (an old printer's plain session, pipelining, smuggling, sizes,
//! limits, kills), and swaks, Python's smtplib and curl for STARTTLS and AUTH. Every
//! message accepted is followed through `relay365 flush` to the Exchange Online
//! emulator.
//!
//! swaks, curl and python3 come from apt (`.ci/run` installs them): without one of
//! them a test prints a skip notice, or fails when `CI` is set.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::*;

/// A CA and a leaf for `localhost` and 127.0.0.1, written as PEM files.
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn pki(dir: &Path) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(vec![]).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "relay365 listener test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    leaf.subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let leaf_key = KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&leaf_key, &ca, &ca_key).unwrap();
    let p = Pki {
        ca: dir.join("listener-ca.pem"),
        cert: dir.join("listener.pem"),
        key: dir.join("listener.key"),
    };
    std::fs::write(&p.ca, ca.pem()).unwrap();
    std::fs::write(&p.cert, format!("{}{}", cert.pem(), ca.pem())).unwrap();
    std::fs::write(&p.key, leaf_key.serialize_pem()).unwrap();
    p
}

/// A tenant (spool + emulator) whose config has a `[listener]` table with `extra` keys,
/// listening on an ephemeral loopback port.
struct Site {
    t: Tenant,
    pki: Pki,
    users: PathBuf,
}

impl Site {
    fn new(extra: &str) -> Site {
        Site::with_config(extra, "")
    }

    fn with_config(extra: &str, top: &str) -> Site {
        Site::with_tenant(Tenant::new(Auth::Login), extra, top)
    }

    fn with_tenant(t: Tenant, extra: &str, top: &str) -> Site {
        let dir = t.spool.dir.path().to_path_buf();
        let pki = pki(&dir);
        let users = dir.join("listener-users");
        let mut text = std::fs::read_to_string(&t.spool.config).unwrap();
        if !top.is_empty() {
            text = format!("{top}\n{text}");
        }
        text.push_str(&format!(
            "\n[listener]\nlisten = [\"127.0.0.1:0\"]\nusers_file = \"{}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n{extra}\n",
            users.display(),
            pki.cert.display(),
            pki.key.display()
        ));
        std::fs::write(&t.spool.config, text).unwrap();
        Site { t, pki, users }
    }

    fn add_user(&self, name: &str, password: &str, extra: &[&str]) {
        let mut cmd = Command::new(RELAY365);
        cmd.arg("--config")
            .arg(&self.t.spool.config)
            .args(["listener-user", "add", name])
            .args(extra);
        let out = run(cmd, format!("{password}\n").as_bytes());
        assert_ok(&out);
    }

    fn start(&self) -> Listener {
        Listener::start(&self.t.spool.config)
    }

    /// Flushes the queue to the emulator and returns what it received.
    fn flush(&self) -> Vec<emu::Received> {
        let out = self.t.flush();
        assert_ok(&out);
        eprintln!("flush: {}", stderr(&out));
        self.t.emu.messages()
    }
}

/// A running `relay365 listen`; killed on drop.
struct Listener {
    child: Child,
    log: Arc<Mutex<String>>,
    addr: SocketAddr,
}

impl Listener {
    fn start(config: &Path) -> Listener {
        let mut child = Command::new(RELAY365)
            .arg("--config")
            .arg(config)
            .arg("listen")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn relay365 listen");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let mut l = Listener {
            child,
            log,
            addr: "127.0.0.1:1".parse().unwrap(),
        };
        let found = eventually(Duration::from_secs(10), || {
            l.log().contains("listening on ")
        });
        assert!(found, "the listener did not start: {}", l.log());
        let text = l.log();
        let at = text.find("listening on ").unwrap() + "listening on ".len();
        let addr = text[at..].split_whitespace().next().unwrap();
        l.addr = addr.parse().unwrap();
        l
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    #[track_caller]
    fn wait_log(&self, needle: &str) {
        assert!(
            eventually(Duration::from_secs(10), || self.log().contains(needle)),
            "{needle:?} not logged: {}",
            self.log()
        );
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }

    fn client(&self) -> Smtp {
        Smtp::connect(self.addr, None)
    }

    fn client_from(&self, source: &str) -> Smtp {
        Smtp::connect(self.addr, Some(source))
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A raw SMTP client: exact bytes out, whole replies in.
struct Smtp {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Smtp {
    fn connect(to: SocketAddr, source: Option<&str>) -> Smtp {
        let stream = match source {
            None => TcpStream::connect(to).expect("connect"),
            Some(src) => {
                use nix::sys::socket::{
                    AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, socket,
                };
                use std::os::fd::AsRawFd;
                let fd = socket(
                    AddressFamily::Inet,
                    SockType::Stream,
                    SockFlag::empty(),
                    None,
                )
                .expect("socket");
                let src: std::net::SocketAddrV4 = format!("{src}:0").parse().unwrap();
                bind(fd.as_raw_fd(), &SockaddrIn::from(src)).expect("bind the source address");
                let SocketAddr::V4(to) = to else { panic!("v4") };
                connect(fd.as_raw_fd(), &SockaddrIn::from(to)).expect("connect");
                TcpStream::from(fd)
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut s = Smtp {
            r: BufReader::new(stream.try_clone().unwrap()),
            w: stream,
        };
        let greeting = s.reply();
        assert!(greeting[0].starts_with("220 "), "{greeting:?}");
        s
    }

    /// One reply, all its lines; empty at end of input.
    fn reply(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let mut l = String::new();
            match self.r.read_line(&mut l) {
                Ok(0) | Err(_) => return lines,
                Ok(_) => {}
            }
            let l = l.trim_end().to_string();
            let last = l.as_bytes().get(3) != Some(&b'-');
            lines.push(l);
            if last {
                return lines;
            }
        }
    }

    /// The final line of the reply to `line`.
    fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply().pop().unwrap_or_default()
    }

    fn send(&mut self, bytes: &[u8]) {
        self.w.write_all(bytes).expect("send");
    }

    /// A whole message transaction; returns the final reply to the data.
    fn message(&mut self, from: &str, to: &str, body: &str) -> String {
        assert!(self.cmd(&format!("MAIL FROM:<{from}>")).starts_with("250"));
        assert!(self.cmd(&format!("RCPT TO:<{to}>")).starts_with("250"));
        assert!(self.cmd("DATA").starts_with("354"));
        self.send(format!("{body}\r\n.\r\n").as_bytes());
        self.reply().pop().unwrap_or_default()
    }

    /// Whether the server closed the connection.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.r.read(&mut b), Ok(0) | Err(_))
    }
}

/// Whether an apt tool is there; a skip notice without it, a failure under CI.
fn tool(name: &str, test: &str) -> bool {
    let there = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .is_ok_and(|o| o.status.success());
    if !there {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: {name} is not installed (.ci/run installs it)"
        );
        eprintln!("skipped {test}: {name} is not installed (apt-get install {name})");
    }
    there
}

fn incoming(site: &Site) -> usize {
    site.t.spool.count_files("incoming/new")
}

#[test]
fn listen_an_old_printer_on_an_allowed_network_sends_in_plain_text_and_it_reaches_exchange() {
    let site = Site::new("");
    let l = site.start();
    let mut c = l.client();
    // Old devices say HELO and nothing fancy.
    assert!(c.cmd("HELO MFP-4th-floor").starts_with("250 "));
    let reply = c.message(
        "scanner@contoso.com",
        "alice@example.org",
        "Subject: Scan from MFP\r\nTo: alice@example.org\r\n\r\nscan attached",
    );
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
    assert!(c.cmd("QUIT").starts_with("221"));
    l.wait_log("disconnect from unknown[127.0.0.1] helo=1 mail=1 rcpt=1 data=1 quit=1 commands=5");
    let log = l.log();
    assert!(log.contains("connect from unknown[127.0.0.1]"), "{log}");
    assert!(
        log.contains("client=unknown[127.0.0.1], helo=<MFP-4th-floor>"),
        "{log}"
    );
    let (env, msg) = site.t.spool.only();
    assert_eq!(env.client, Some("127.0.0.1".parse().unwrap()));
    assert_eq!(env.sasl_username, None);
    assert!(
        msg.starts_with("Received: from MFP-4th-floor ([127.0.0.1])\r\n\tby example.com (relay365) with ESMTP id "),
        "{msg}"
    );
    assert!(msg.contains("\r\n\tfor <alice@example.org>;"), "{msg}");
    let got = site.flush();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].rcpts, ["alice@example.org"]);
    assert!(String::from_utf8_lossy(&got[0].data).contains("Subject: Scan from MFP"));
}

#[test]
fn listen_a_client_outside_allow_is_refused_at_rcpt_and_nothing_is_queued() {
    let site = Site::new("allow = [\"127.0.0.1/32\"]");
    let l = site.start();
    let mut c = l.client_from("127.0.0.2");
    assert!(c.cmd("EHLO outside").starts_with("250 "));
    assert!(c.cmd("MAIL FROM:<spam@example.net>").starts_with("250"));
    let r = c.cmd("RCPT TO:<victim@example.org>");
    assert_eq!(r, "554 5.7.1 <victim@example.org>: Relay access denied");
    assert_eq!(c.cmd("DATA"), "554 5.5.1 Error: no valid recipients");
    assert!(c.cmd("QUIT").starts_with("221"));
    l.wait_log("NOQUEUE: reject: RCPT from unknown[127.0.0.2]: 554 5.7.1 <victim@example.org>: Relay access denied; from=<spam@example.net> to=<victim@example.org> proto=ESMTP helo=<outside>");
    l.wait_log(
        "disconnect from unknown[127.0.0.2] ehlo=1 mail=1 rcpt=0/1 data=0/1 quit=1 commands=3/5",
    );
    assert_eq!(incoming(&site), 0);
    assert!(site.flush().is_empty());
    // The same listener still serves the allowed address.
    let mut ok = l.client();
    assert!(ok.cmd("EHLO inside").starts_with("250 "));
    assert!(
        ok.message("a@contoso.com", "b@example.org", "Subject: in\r\n\r\nx")
            .starts_with("250 ")
    );
    assert_eq!(site.flush().len(), 1);
}

#[test]
fn listen_stdio_sendmail_bs_offers_neither_starttls_nor_auth() {
    let s = Spool::new("");
    let out = s.sendmail(
        &["-bs"],
        b"EHLO x\r\nSTARTTLS\r\nAUTH PLAIN AGJvYgBwdw==\r\nQUIT\r\n",
    );
    let text = stdout(&out);
    assert!(
        !text.contains("STARTTLS\r\n") && !text.contains("AUTH "),
        "{text}"
    );
    assert_eq!(
        text.matches("502 5.5.1 Error: command not implemented")
            .count(),
        2,
        "{text}"
    );
}

#[test]
fn listen_auth_is_offered_only_after_starttls_and_pipelined_plaintext_is_dropped() {
    let site = Site::new("allow = [\"127.0.0.1/32\"]");
    site.add_user("scanner", "pw-for-scanner", &[]);
    let l = site.start();
    let mut c = l.client_from("127.0.0.2");
    c.send(b"EHLO outside\r\n");
    let ehlo = c.reply();
    assert!(ehlo.iter().any(|l| l == "250-STARTTLS"), "{ehlo:?}");
    assert!(!ehlo.iter().any(|l| l.contains("AUTH")), "{ehlo:?}");
    assert_eq!(
        c.cmd("AUTH PLAIN AHNjYW5uZXIAcHctZm9yLXNjYW5uZXI="),
        "503 5.5.1 Error: authentication not enabled"
    );
    // STARTTLS with a command pipelined behind it in clear: that command must not
    // count inside TLS (CVE-2011-0411). The raw client stops here: TLS is the
    // script clients' part; the injected NOOP must not be answered in plain text.
    c.send(b"STARTTLS\r\nNOOP\r\n");
    assert_eq!(c.reply().pop().unwrap(), "220 2.0.0 Ready to start TLS");
    drop(c);
    l.wait_log("disconnect from unknown[127.0.0.2]");
}

/// A Python smtplib session: STARTTLS, AUTH (`mech`), several messages.
fn smtplib(
    site: &Site,
    l: &Listener,
    source: &str,
    user: &str,
    password: &str,
    mech: &str,
) -> std::process::Output {
    let script = format!(
        r#"
import smtplib, ssl, sys, json
ctx = ssl.create_default_context(cafile={ca:?})
s = smtplib.SMTP("localhost", {port}, source_address=({source:?}, 0), timeout=30)
s.ehlo("python-app")
before = sorted(s.esmtp_features)
s.starttls(context=ctx)
s.ehlo("python-app")
after = sorted(s.esmtp_features)
s.user, s.password = {user:?}, {password:?}
try:
    code, text = s.auth({mech:?}, getattr(s, "auth_" + {mech:?}.lower()), initial_response_ok=False)
except smtplib.SMTPAuthenticationError as e:
    print(json.dumps({{"before": before, "after": after, "auth": e.smtp_code}}))
    sys.exit(0)
ids = []
for i in range(3):
    msg = "From: app@contoso.com\r\nTo: r%d@example.org\r\nSubject: smtplib %d\r\n\r\nbody %d\r\n" % (i, i, i)
    s.sendmail("app@contoso.com", ["r%d@example.org" % i], msg)
s.quit()
print(json.dumps({{"before": before, "after": after, "auth": code}}))
"#,
        ca = site.pki.ca.display().to_string(),
        port = l.port(),
    );
    Command::new("python3")
        .arg("-c")
        .arg(script)
        .output()
        .expect("python3")
}

#[test]
fn listen_python_smtplib_starttls_auth_plain_and_login_several_messages_a_session() {
    if !tool("python3", "listen_python_smtplib") {
        return;
    }
    let site = Site::new("allow = [\"127.0.0.1/32\"]");
    site.add_user("scanner", "pw-for-scanner", &[]);
    site.add_user(
        "app2",
        "another one",
        &["--allowed-sender", "*@contoso.com"],
    );
    let l = site.start();
    for (user, pw, mech) in [
        ("scanner", "pw-for-scanner", "PLAIN"),
        ("app2", "another one", "LOGIN"),
    ] {
        let out = smtplib(&site, &l, "127.0.0.2", user, pw, mech);
        assert_ok(&out);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        assert_eq!(report["auth"], 235, "{report}");
        assert!(
            report["before"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f == "starttls")
        );
        assert!(
            !report["before"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f == "auth")
        );
        assert!(
            report["after"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f == "auth")
        );
        l.wait_log(&format!("sasl_method={mech}, sasl_username={user}"));
    }
    l.wait_log("disconnect from unknown[127.0.0.2] ehlo=2 starttls=1 auth=1 mail=3 rcpt=3 data=3 quit=1 commands=14");
    let queued = site.t.spool.incoming();
    assert_eq!(queued.len(), 6);
    let (env, msg) = &queued[0];
    assert_eq!(env.sasl_username.as_deref(), Some("scanner"));
    let msg = String::from_utf8_lossy(msg);
    assert!(
        msg.starts_with("Received: from python-app ([127.0.0.2])\r\n\t(using TLSv1.3 with cipher "),
        "{msg}"
    );
    assert!(
        msg.contains(
            "(Authenticated sender: scanner)\r\n\tby example.com (relay365) with ESMTPSA id "
        ),
        "{msg}"
    );
    // Passwords are never written anywhere in clear.
    let users = std::fs::read_to_string(&site.users).unwrap();
    assert!(!users.contains("pw-for-scanner") && users.contains("$argon2id$"));
    assert!(!l.log().contains("pw-for-scanner"));
    assert_eq!(site.flush().len(), 6);
}

#[test]
fn listen_wrong_passwords_are_slowed_and_then_the_address_is_refused() {
    if !tool("python3", "listen_wrong_passwords") {
        return;
    }
    let site = Site::new("allow = [\"127.0.0.1/32\"]");
    site.add_user("scanner", "right", &[]);
    let l = site.start();
    let started = Instant::now();
    for _ in 0..2 {
        let out = smtplib(&site, &l, "127.0.0.2", "scanner", "wrong", "PLAIN");
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        assert_eq!(report["auth"], 535, "{report} {}", stderr(&out));
    }
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "each failure costs a second"
    );
    let out = smtplib(&site, &l, "127.0.0.2", "nobody", "wrong", "LOGIN");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(report["auth"], 421, "{report}");
    l.wait_log("anvil: unknown[127.0.0.2]: 3 authentication failures");
    l.wait_log("SASL PLAIN authentication failed: user=<scanner>");
    assert!(!l.log().contains("wrong"), "{}", l.log());
    // The address is refused for a while, even with the right password...
    let mut c = Smtp::connect_raw(l.addr, "127.0.0.2");
    let greeting = c.reply();
    assert!(
        greeting[0].starts_with(
            "421 4.7.0 example.com Error: too many authentication failures from 127.0.0.2"
        ),
        "{greeting:?}"
    );
    // ...while others are not.
    let mut ok = l.client();
    assert!(ok.cmd("EHLO x").starts_with("250"));
    assert_eq!(incoming(&site), 0);
}

impl Smtp {
    /// Connects without reading the greeting.
    fn connect_raw(to: SocketAddr, source: &str) -> Smtp {
        use nix::sys::socket::{
            AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, socket,
        };
        use std::os::fd::AsRawFd;
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )
        .unwrap();
        let src: std::net::SocketAddrV4 = format!("{source}:0").parse().unwrap();
        bind(fd.as_raw_fd(), &SockaddrIn::from(src)).unwrap();
        let SocketAddr::V4(to) = to else { panic!("v4") };
        connect(fd.as_raw_fd(), &SockaddrIn::from(to)).unwrap();
        let stream = TcpStream::from(fd);
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        Smtp {
            r: BufReader::new(stream.try_clone().unwrap()),
            w: stream,
        }
    }
}

#[test]
fn listen_swaks_with_starttls_auth_login_and_pipelining() {
    if !tool("swaks", "listen_swaks") {
        return;
    }
    let site = Site::new("allow = [\"127.0.0.1/32\"]");
    site.add_user("printer", "swaks-pass", &[]);
    let l = site.start();
    let out = Command::new("swaks")
        .args(["--server", "127.0.0.1", "--port", &l.port().to_string()])
        .args(["--local-interface", "127.0.0.2"])
        .args(["--from", "printer@contoso.com", "--to", "bob@example.org"])
        .args([
            "--tls",
            "--auth",
            "LOGIN",
            "--auth-user",
            "printer",
            "--auth-password",
            "swaks-pass",
        ])
        .args(["--pipeline", "--header", "Subject: via swaks"])
        .output()
        .expect("swaks");
    assert_ok(&out);
    let text = stdout(&out);
    assert!(
        text.contains("235 2.7.0 Authentication successful"),
        "{text}"
    );
    assert!(text.contains("250 2.0.0 Ok: queued as"), "{text}");
    // Plain text from outside: relay refused.
    let out = Command::new("swaks")
        .args(["--server", "127.0.0.1", "--port", &l.port().to_string()])
        .args(["--local-interface", "127.0.0.2"])
        .args(["--from", "x@contoso.com", "--to", "bob@example.org"])
        .output()
        .expect("swaks");
    assert!(
        stdout(&out).contains("554 5.7.1 <bob@example.org>: Relay access denied"),
        "{}",
        stdout(&out)
    );
    let got = site.flush();
    assert_eq!(got.len(), 1);
    assert!(String::from_utf8_lossy(&got[0].data).contains("Subject: via swaks"));
}

#[test]
fn listen_curl_plain_from_an_allowed_address_and_with_starttls_and_auth() {
    if !tool("curl", "listen_curl") {
        return;
    }
    let site = Site::new("allow = [\"127.0.0.1/32\"]");
    site.add_user("app", "curl pass", &[]);
    let l = site.start();
    let msg = site.t.spool.dir.path().join("msg.txt");
    std::fs::write(
        &msg,
        "From: app@contoso.com\r\nTo: c@example.org\r\nSubject: via curl\r\n\r\nhello\r\n",
    )
    .unwrap();
    let url = format!("smtp://localhost:{}", l.port());
    let curl = |extra: &[&str]| {
        Command::new("curl")
            .args([
                "-sS",
                "--url",
                &url,
                "--mail-from",
                "app@contoso.com",
                "--mail-rcpt",
                "c@example.org",
            ])
            .arg("--upload-file")
            .arg(&msg)
            .args(extra)
            .output()
            .expect("curl")
    };
    assert_ok(&curl(&[]));
    let ca = site.pki.ca.display().to_string();
    assert_ok(&curl(&[
        "--interface",
        "127.0.0.2",
        "--ssl-reqd",
        "--cacert",
        &ca,
        "--user",
        "app:curl pass",
    ]));
    let refused = curl(&["--interface", "127.0.0.2"]);
    assert!(
        !refused.status.success(),
        "relay from outside without AUTH must fail"
    );
    l.wait_log("sasl_username=app");
    assert_eq!(site.flush().len(), 2);
}

#[test]
fn listen_pipelined_messages_in_one_write_are_each_queued_before_their_250() {
    let site = Site::new("");
    let l = site.start();
    let mut c = l.client();
    let mut all = String::from("EHLO pipeliner\r\n");
    for i in 0..3 {
        all.push_str(&format!(
            "MAIL FROM:<app@contoso.com>\r\nRCPT TO:<p{i}@example.org>\r\nDATA\r\nSubject: p{i}\r\n\r\nbody\r\n.\r\n"
        ));
    }
    all.push_str("QUIT\r\n");
    c.send(all.as_bytes());
    let mut finals = Vec::new();
    loop {
        let r = c.reply();
        let Some(last) = r.last() else { break };
        finals.push(last[..3].to_string());
        if last.starts_with("221") {
            break;
        }
    }
    assert_eq!(
        finals,
        [
            "250", "250", "250", "354", "250", "250", "250", "354", "250", "250", "250", "354",
            "250", "221"
        ]
    );
    assert_eq!(site.flush().len(), 3);
}

/// Sends a message whose body holds `end` (a would-be terminator) and then a second,
/// smuggled transaction; returns the replies and what was queued.
fn smuggle(l: &Listener, end: &[u8]) -> Vec<String> {
    let mut c = l.client();
    assert!(c.cmd("EHLO smuggler").starts_with("250"));
    assert!(c.cmd("MAIL FROM:<app@contoso.com>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<one@example.org>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    let mut data = b"Subject: first\r\n\r\nbody".to_vec();
    data.extend_from_slice(end);
    data.extend_from_slice(b"MAIL FROM:<ceo@contoso.com>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\nSubject: smuggled\r\n\r\nsmuggled\r\n.\r\n");
    c.send(&data);
    let mut replies = vec![c.reply().pop().unwrap_or_default()];
    replies.push(c.cmd("QUIT"));
    replies
}

fn assert_not_smuggled(site: &Site, l: &Listener, end: &[u8]) {
    let before = site.t.spool.incoming().len();
    let replies = smuggle(l, end);
    let label = String::from_utf8_lossy(end).escape_debug().to_string();
    // One reply to the one DATA, then QUIT's: nothing answered a second transaction.
    assert!(
        replies[0].starts_with("250 ") || replies[0].starts_with("5"),
        "{label}: {replies:?}"
    );
    assert!(
        replies[1].starts_with("221"),
        "{label}: a second transaction was answered: {replies:?}"
    );
    let queued = site.t.spool.incoming();
    assert!(queued.len() <= before + 1, "{label}");
    for (env, msg) in &queued {
        assert!(
            env.recipients
                .iter()
                .all(|r| r.as_str() != "victim@example.org"),
            "{label}: smuggled"
        );
        assert!(env.sender.as_str() != "ceo@contoso.com", "{label}");
        let _ = msg;
    }
}

#[test]
fn listen_smuggling_with_a_bare_cr_dot_never_ends_data() {
    let site = Site::new("");
    let l = site.start();
    for end in [&b"\r.\n"[..], b"\r\n.\r", b"\r.\r\n"] {
        assert_not_smuggled(&site, &l, end);
    }
    for (_, m) in site.t.spool.incoming() {
        assert!(
            String::from_utf8_lossy(&m).contains("smuggled"),
            "kept as body text"
        );
    }
    let got = site.flush();
    assert!(got.iter().all(|m| m.rcpts == ["one@example.org"]));
}

#[test]
fn listen_smuggling_with_bare_lf_dot_never_ends_data() {
    let site = Site::new("");
    let l = site.start();
    for end in [&b"\n.\n"[..], b"\n.\r\n", b"\r\n.\n"] {
        assert_not_smuggled(&site, &l, end);
    }
    let got = site.flush();
    assert!(got.iter().all(|m| m.rcpts == ["one@example.org"]));
}

#[test]
fn listen_a_client_that_stops_mid_data_queues_nothing() {
    let site = Site::new("");
    let l = site.start();
    let mut c = l.client();
    assert!(c.cmd("EHLO x").starts_with("250"));
    assert!(c.cmd("MAIL FROM:<a@contoso.com>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<b@example.org>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(b"Subject: half\r\n\r\nhalf a message\r\n");
    c.w.shutdown(std::net::Shutdown::Both).unwrap();
    l.wait_log("lost connection after DATA from unknown[127.0.0.1]: nothing queued");
    l.wait_log("disconnect from unknown[127.0.0.1] ehlo=1 mail=1 rcpt=1 data=0/1 commands=3/4");
    assert_eq!(incoming(&site), 0);
    assert_eq!(site.t.spool.count_files("incoming/tmp"), 0);
    assert!(site.flush().is_empty());
}

#[test]
fn listen_a_40_mb_message_is_refused_by_size_and_the_session_goes_on() {
    let site = Site::new("");
    let l = site.start();
    let mut c = l.client();
    let ehlo = {
        c.send(b"EHLO big\r\n");
        c.reply()
    };
    assert!(ehlo.contains(&"250-SIZE 35000000".to_string()), "{ehlo:?}");
    assert_eq!(
        c.cmd("MAIL FROM:<a@contoso.com> SIZE=40000000"),
        "552 5.3.4 Message size exceeds fixed limit of 35000000 bytes"
    );
    // Sent anyway without SIZE: read and dropped, never held whole, then refused.
    assert!(c.cmd("MAIL FROM:<a@contoso.com>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<b@example.org>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(b"Subject: big\r\n\r\n");
    let line = [b'x'; 999];
    let mut chunk = Vec::new();
    for _ in 0..1000 {
        chunk.extend_from_slice(&line);
        chunk.extend_from_slice(b"\r\n");
    }
    for _ in 0..40 {
        c.send(&chunk);
    }
    c.send(b".\r\n");
    let r = c.reply().pop().unwrap();
    assert!(r.starts_with("552 5.3.4 Error: message too large"), "{r}");
    assert!(
        c.message("a@contoso.com", "b@example.org", "Subject: small\r\n\r\nok")
            .starts_with("250")
    );
    assert_eq!(site.flush().len(), 1);
}

#[test]
fn listen_client_rate_exceeded_gets_451_with_the_retry_time() {
    let site = Site::new("client_rate = \"2/1h\"");
    let l = site.start();
    let mut c = l.client();
    assert!(c.cmd("EHLO x").starts_with("250"));
    for i in 0..2 {
        assert!(
            c.message(
                "a@contoso.com",
                &format!("r{i}@example.org"),
                "Subject: r\r\n\r\nx"
            )
            .starts_with("250")
        );
    }
    let r = c.cmd("MAIL FROM:<a@contoso.com>");
    assert!(
        r.starts_with(
            "451 4.7.1 Error: too many messages from 127.0.0.1 (client_rate 2/1h); retry in 3"
        ),
        "{r}"
    );
    assert!(r.contains(", after "), "{r}");
    l.wait_log("NOQUEUE: reject: MAIL from unknown[127.0.0.1]: 451 4.7.1");
    assert_eq!(site.flush().len(), 2);
}

#[test]
fn listen_connections_beyond_the_per_client_limit_get_421_and_others_still_get_through() {
    let site = Site::new(
        "allow = [\"127.0.0.0/8\"]\nmax_connections = 10\nmax_connections_per_client = 3",
    );
    let l = site.start();
    let held: Vec<Smtp> = (0..3).map(|_| l.client()).collect();
    let mut extra = Smtp::connect_raw(l.addr, "127.0.0.1");
    let r = extra.reply();
    assert_eq!(
        r,
        ["421 4.7.0 example.com Error: too many connections from 127.0.0.1"]
    );
    let mut other = l.client_from("127.0.0.3");
    assert!(
        other
            .message("a@contoso.com", "b@example.org", "Subject: s\r\n\r\nx")
            .starts_with("250")
    );
    drop(held);
    l.wait_log("max_connections_per_client reached: refusing connection from unknown[127.0.0.1]");
    assert_eq!(site.flush().len(), 1);
}

#[test]
fn listen_a_thousand_idle_connections_while_another_client_gets_through() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let want = 4096.min(hard);
    let _ = setrlimit(Resource::RLIMIT_NOFILE, want, hard);
    if want < 2200 {
        eprintln!("skipped: RLIMIT_NOFILE hard limit {hard} is too low for 1000 connections");
        return;
    }
    let site = Site::new(
        "allow = [\"127.0.0.0/8\"]\nmax_connections = 1100\nmax_connections_per_client = 1000",
    );
    let l = site.start();
    let mut idle = Vec::new();
    for _ in 0..1000 {
        idle.push(TcpStream::connect(l.addr).unwrap());
    }
    // Every one of them is greeted (a thread each) and holds nothing else.
    let start = Instant::now();
    let mut c = l.client_from("127.0.0.5");
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(c.cmd("EHLO busy").starts_with("250"));
    assert!(
        c.message("a@contoso.com", "b@example.org", "Subject: s\r\n\r\nx")
            .starts_with("250")
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", l.child.id())).unwrap();
    let rss_kb: u64 = status
        .lines()
        .find(|x| x.starts_with("VmRSS:"))
        .and_then(|x| x.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap();
    eprintln!("listener RSS with 1000 idle sessions: {rss_kb} kB");
    assert!(rss_kb < 300_000, "{rss_kb} kB for 1000 idle sessions");
    drop(idle);
    assert_eq!(site.flush().len(), 1);
}

#[test]
fn listen_kill_9_during_data_leaves_nothing_half_queued_and_never_said_250() {
    let site = Site::new("");
    let mut l = site.start();
    let mut c = l.client();
    assert!(c.cmd("EHLO x").starts_with("250"));
    assert!(c.cmd("MAIL FROM:<a@contoso.com>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<b@example.org>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(b"Subject: doomed\r\n\r\nhalf");
    std::thread::sleep(Duration::from_millis(100));
    let _ = l.child.kill();
    let _ = l.child.wait();
    let _ = c.w.write_all(b" and the rest\r\n.\r\n");
    let rest = c.reply();
    assert!(rest.iter().all(|r| !r.starts_with("250")), "{rest:?}");
    assert!(c.closed());
    assert_eq!(incoming(&site), 0);
    assert_eq!(site.t.spool.count_files("incoming/tmp"), 0);
    // A new listener takes the mail, which was never acknowledged, on the next try.
    let l2 = site.start();
    let mut c = l2.client();
    assert!(c.cmd("EHLO x").starts_with("250"));
    assert!(
        c.message("a@contoso.com", "b@example.org", "Subject: again\r\n\r\nx")
            .starts_with("250")
    );
    assert_eq!(site.flush().len(), 1);
}

#[test]
fn listen_too_many_errors_close_the_connection() {
    let site = Site::new("");
    let l = site.start();
    let mut c = l.client();
    let mut last = String::new();
    for _ in 0..20 {
        last = c.cmd("BOGUS");
    }
    assert_eq!(last, "502 5.5.2 Error: command not recognized");
    // The twentieth error is the last: Postfix's smtpd_hard_error_limit.
    assert_eq!(c.reply(), ["421 4.7.0 example.com Error: too many errors"]);
    assert!(c.closed());
    l.wait_log("disconnected: too many errors");
}

#[test]
fn listen_require_tls_refuses_mail_in_clear_from_outside_allow() {
    let site = Site::new("allow = [\"127.0.0.1/32\"]\nrequire_tls = true");
    let l = site.start();
    let mut c = l.client_from("127.0.0.2");
    assert!(c.cmd("EHLO x").starts_with("250"));
    assert_eq!(
        c.cmd("MAIL FROM:<a@contoso.com>"),
        "530 5.7.0 Must issue a STARTTLS command first"
    );
    let mut ok = l.client();
    assert!(ok.cmd("EHLO x").starts_with("250"));
    assert!(
        ok.cmd("MAIL FROM:<a@contoso.com>").starts_with("250"),
        "allowed devices may send in clear"
    );
}

#[test]
fn listen_listener_user_add_list_remove_never_shows_the_password() {
    let site = Site::new("");
    site.add_user(
        "mfp",
        "hunter2",
        &["--allowed-sender", "mfp@contoso.com", "--account", "app"],
    );
    let list = site.t.spool.relay365(&["listener-user", "list"]);
    assert_ok(&list);
    assert_eq!(stdout(&list), "mfp\tsenders mfp@contoso.com account app\n");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&site.users).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640);
    assert!(
        !std::fs::read_to_string(&site.users)
            .unwrap()
            .contains("hunter2")
    );
    let mut cmd = Command::new(RELAY365);
    cmd.arg("--config")
        .arg(&site.t.spool.config)
        .args(["listener-user", "add", "x"]);
    assert_fails(&run(cmd, b""), 64, "no password on standard input");
    assert_ok(&site.t.spool.relay365(&["listener-user", "remove", "mfp"]));
    assert_fails(
        &site.t.spool.relay365(&["listener-user", "remove", "mfp"]),
        67,
        "no listener user",
    );
}

#[test]
fn listen_config_errors_name_the_key() {
    let s = Spool::new("");
    let base = std::fs::read_to_string(&s.config).unwrap();
    for (table, key) in [
        ("allow = [\"192.168.10.1/24\"]", "listener.allow"),
        ("require_tls = true", "listener.require_tls"),
        ("account = \"nope\"", "listener.account"),
        ("listen_on = []", "listen_on"),
    ] {
        std::fs::write(&s.config, format!("{base}\n[listener]\n{table}\n")).unwrap();
        assert_fails(&s.relay365(&["listen"]), 78, key);
    }
}

#[test]
fn listen_an_auth_user_mapped_to_an_account_sends_through_it_and_others_through_listener_account() {
    if !tool("python3", "listen_account_mapping") {
        return;
    }
    let t = Tenant::with_accounts(
        tenant_config(),
        Auth::Login,
        "",
        &[ExtraAccount {
            name: "billing",
            mailbox: "billing@contoso.com",
            extra: String::new(),
        }],
    );
    let site = Site::with_tenant(t, "allow = [\"127.0.0.1/32\"]\naccount = \"app\"", "");
    site.add_user("erp", "erp pass", &["--account", "billing"]);
    let l = site.start();
    let out = smtplib(&site, &l, "127.0.0.2", "erp", "erp pass", "PLAIN");
    assert_ok(&out);
    let mut c = l.client();
    assert!(c.cmd("HELO printer").starts_with("250"));
    assert!(
        c.message(
            "scanner@contoso.com",
            "x@example.org",
            "Subject: scan\r\n\r\nx"
        )
        .starts_with("250")
    );
    let queued = site.t.spool.incoming();
    assert_eq!(
        queued
            .iter()
            .filter(|(e, _)| e.account.as_deref() == Some("billing"))
            .count(),
        3
    );
    let got = site.flush();
    assert_eq!(got.len(), 4);
    let by = |m: &str| {
        got.iter()
            .filter(|r| r.mailbox.as_deref() == Some(m))
            .count()
    };
    assert_eq!(by("billing@contoso.com"), 3);
    assert_eq!(by("app@contoso.com"), 1);
}
