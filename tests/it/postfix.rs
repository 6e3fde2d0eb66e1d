//! Delivery end to end against a real Postfix submission server on 127.0.0.1:
//! `sendmail` → queue → `relay365 flush` or the daemon → Postfix (STARTTLS required
//! before AUTH, Cyrus SASL LOGIN and PLAIN, anvil's message rate limit answering 450)
//! → the virtual delivery agent's Maildir, which the tests read back.
//!
//! Each test starts its own Postfix with tests/system/postfix/start (installing the packages
//! first if missing and running as root) and stops it on drop with tests/system/postfix/stop.
//! Without root or the packages, the tests print a skip notice, or fail when `CI` is
//! set: in CI a skipped Postfix test would be a silent hole.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::harness::*;
use relay365::spool::queue::RcptStatus;

const SCRIPTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/system/postfix");

/// Whether Postfix can run here; checked (and installed) once per test process.
fn available() -> &'static Result<(), String> {
    static AVAILABLE: OnceLock<Result<(), String>> = OnceLock::new();
    AVAILABLE.get_or_init(|| {
        if !is_root() {
            return Err(
                "not running as root (Postfix's master and virtual delivery need root; \
                 run the tests as root, as CI does)"
                    .into(),
            );
        }
        let out = Command::new(format!("{SCRIPTS}/install"))
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {SCRIPTS}/install: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{SCRIPTS}/install failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    })
}

/// `Some(())` when Postfix can run; otherwise a skip notice, or a failure under CI.
fn postfix_or_skip(test: &str) -> Option<()> {
    match available() {
        Ok(()) => Some(()),
        Err(why) if std::env::var_os("CI").is_some() => {
            panic!("{test}: the real-Postfix test cannot run in CI: {why}")
        }
        Err(why) => {
            eprintln!("SKIPPED {test}: no real Postfix: {why}");
            None
        }
    }
}

/// How to start a Postfix.
struct Options<'a> {
    password: &'a str,
    /// smtpd_client_message_rate_limit; 0 is none.
    rate: u32,
    /// anvil_rate_time_unit in seconds.
    window: u64,
    /// smtpd_timeout in seconds: how long Postfix keeps an idle connection.
    idle: u64,
}

impl Default for Options<'_> {
    fn default() -> Self {
        Options {
            password: PASSWORD,
            rate: 0,
            window: 60,
            idle: 300,
        }
    }
}

/// A private Postfix on 127.0.0.1; stopped (with every child) on drop, before its
/// directory goes.
struct Postfix {
    work: tempfile::TempDir,
    port: u16,
}

impl Postfix {
    fn start(opts: Options) -> Postfix {
        let mut last = String::new();
        // A port picked from the kernel can be taken by another test before Postfix
        // binds it; then `postfix start` fails, the script cleans up, we pick again.
        for _ in 0..3 {
            let work = tempfile::tempdir().expect("tempdir");
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            let pw = work.path().join("password");
            std::fs::write(&pw, format!("{}\n", opts.password)).expect("password file");
            let log = std::fs::File::create(work.path().join("start.log")).expect("start.log");
            // Output to a file: the server's daemons must not hold our pipes open.
            let status = Command::new(format!("{SCRIPTS}/start"))
                .arg(work.path())
                .arg(port.to_string())
                .args(["--user", MAILBOX, "--password-file"])
                .arg(&pw)
                .args(["--rate", &opts.rate.to_string()])
                .args(["--rate-window", &format!("{}s", opts.window)])
                .args(["--idle-timeout", &format!("{}s", opts.idle)])
                .args(["--owner-pid", &std::process::id().to_string()])
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("dup"))
                .stderr(log)
                .status()
                .expect("run tests/system/postfix/start");
            let pf = Postfix { work, port };
            if status.success() {
                return pf;
            }
            last = std::fs::read_to_string(pf.work.path().join("start.log")).unwrap_or_default();
        }
        panic!("tests/system/postfix/start failed three times; last output:\n{last}");
    }

    fn ca(&self) -> PathBuf {
        self.work.path().join("ca.pem")
    }

    fn maillog(&self) -> String {
        std::fs::read_to_string(self.work.path().join("maillog")).unwrap_or_default()
    }

    /// The messages delivered to `user@example.org`, oldest first.
    fn mailbox(&self, user: &str) -> Vec<Delivered> {
        let dir = self
            .work
            .path()
            .join("maildir/example.org")
            .join(user)
            .join("new");
        let mut files: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&dir)
            .map(|d| {
                d.flatten()
                    .map(|e| {
                        let t = e
                            .metadata()
                            .and_then(|m| m.modified())
                            .unwrap_or(std::time::UNIX_EPOCH);
                        (t, e.path())
                    })
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files
            .into_iter()
            .map(|(_, p)| Delivered::parse(&std::fs::read(p).expect("read a delivered message")))
            .collect()
    }

    /// Waits until `user` has `n` messages; returns them.
    #[track_caller]
    fn wait_mailbox(&self, user: &str, n: usize) -> Vec<Delivered> {
        let ok = eventually(Duration::from_secs(15), || self.mailbox(user).len() >= n);
        let got = self.mailbox(user);
        assert!(
            ok && got.len() == n,
            "{user}@example.org: expected {n} message(s), got {}; Postfix log:\n{}",
            got.len(),
            self.maillog()
        );
        got
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = Command::new(format!("{SCRIPTS}/stop"))
            .arg(self.work.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// One message as the virtual delivery agent wrote it (LF line ends).
#[derive(Debug)]
struct Delivered {
    header: String,
    body: Vec<u8>,
}

impl Delivered {
    fn parse(bytes: &[u8]) -> Delivered {
        let split = bytes
            .windows(2)
            .position(|w| w == b"\n\n")
            .expect("a header block ends in an empty line");
        Delivered {
            header: String::from_utf8_lossy(&bytes[..split + 1]).into_owned(),
            body: bytes[split + 2..].to_vec(),
        }
    }

    /// The first value of header `name` (unfolded).
    fn get(&self, name: &str) -> Option<String> {
        let prefix = format!("{}:", name.to_ascii_lowercase());
        let mut lines = self.header.split('\n').peekable();
        while let Some(line) = lines.next() {
            if line.to_ascii_lowercase().starts_with(&prefix) {
                let mut value = line[prefix.len()..].trim().to_string();
                while lines
                    .peek()
                    .is_some_and(|l| l.starts_with(' ') || l.starts_with('\t'))
                {
                    value.push(' ');
                    value.push_str(lines.next().unwrap_or_default().trim());
                }
                return Some(value);
            }
        }
        None
    }
}

/// How relay365 authenticates to Postfix.
#[derive(Debug, Clone, Copy)]
enum Mech {
    Login,
    Plain,
}

/// A relay365 spool whose one account submits to `pf`.
fn client(pf: &Postfix, mech: Mech, password: &str, host: &str, extra: &str) -> Spool {
    let dir = tempfile::tempdir().expect("tempdir");
    let secrets = dir.path().join("secrets.toml");
    std::fs::write(&secrets, format!("[app]\npassword = \"{password}\"\n")).expect("secrets");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    let aliases = dir.path().join("aliases");
    std::fs::write(&aliases, "root: carol@example.org\n").expect("aliases");
    let auth = match mech {
        Mech::Login => "login",
        Mech::Plain => "plain",
    };
    let toml = format!(
        "secrets_file = \"{}\"\naliases = \"{}\"\nadmin = \"dave@example.org\"\n\n[[account]]\nname = \"app\"\nmailbox = \"{MAILBOX}\"\nhost = \"{host}\"\nport = {}\ntls = \"starttls\"\nauth = \"{auth}\"\nca_file = \"{}\"\ntimeout = \"10s\"\n{extra}\n",
        secrets.display(),
        aliases.display(),
        pf.port,
        pf.ca().display(),
    );
    Spool::new_in(dir, &toml)
}

fn queued(spool: &Spool) -> Vec<relay365::spool::queue::QueueEntry> {
    let q = relay365::spool::queue::Queue::new(&relay365::spool::paths::Spool::new(spool.root()));
    q.ids()
        .unwrap_or_default()
        .iter()
        .filter_map(|id| q.read(id).ok())
        .collect()
}

/// A message with what tends to break on the way: 8-bit UTF-8, a line that is a lone
/// dot, a line starting with a dot, trailing blanks, an empty last line but one.
const MSG: &[u8] = "To: alice@example.org\nCc: bob@example.org\nBcc: hidden@example.org\nSubject: status report\n\nAll systems nominal.\n.\n..leading dots stay\ntrailing blanks   \nGrüße aus Köln\n\nend\n".as_bytes();
const BODY: &[u8] =
    "All systems nominal.\n.\n..leading dots stay\ntrailing blanks   \nGrüße aus Köln\n\nend\n"
        .as_bytes();

fn check_copy(m: &Delivered, rcpt: &str, log: &str) {
    assert_eq!(
        m.get("Return-Path").as_deref(),
        Some("<app@contoso.com>"),
        "the envelope sender is the mailbox:\n{}",
        m.header
    );
    assert_eq!(m.get("Delivered-To").as_deref(), Some(rcpt), "{}", m.header);
    assert_eq!(
        m.get("From").as_deref(),
        Some("\"Web Shop\" <app@contoso.com>"),
        "{}",
        m.header
    );
    assert_eq!(
        m.get("Reply-To").as_deref(),
        Some("<shop@web1.example.com>"),
        "{}",
        m.header
    );
    assert_eq!(m.get("Subject").as_deref(), Some("status report"));
    assert!(m.get("Message-ID").is_some(), "{}", m.header);
    assert!(
        m.get("Bcc").is_none(),
        "Bcc never reaches the server:\n{}",
        m.header
    );
    assert!(
        !m.header.contains("hidden") || rcpt == "hidden@example.org",
        "no trace of the Bcc recipient in another copy:\n{}",
        m.header
    );
    let received = m.get("Received").unwrap_or_default();
    assert!(
        received.contains("with ESMTPSA") && received.contains("using TLSv1."),
        "submitted over TLS with AUTH: {received}\n{log}"
    );
    assert_eq!(
        String::from_utf8_lossy(&m.body),
        String::from_utf8_lossy(BODY),
        "the body arrives byte for byte"
    );
}

#[test]
fn login_delivery_to_postfix_through_flush() {
    if postfix_or_skip("login_delivery_to_postfix_through_flush").is_none() {
        return;
    }
    let pf = Postfix::start(Options::default());
    let spool = client(&pf, Mech::Login, PASSWORD, "localhost", "");
    assert_ok(&spool.sendmail(
        &["-t", "-i", "-F", "Web Shop", "-f", "shop@web1.example.com"],
        MSG,
    ));
    let out = spool.relay365(&["flush", "-v"]);
    assert_ok(&out);
    let log = stderr(&out);
    assert!(queued(&spool).is_empty(), "{log}");
    for user in ["alice", "bob", "hidden"] {
        let got = pf.wait_mailbox(user, 1);
        check_copy(&got[0], &format!("{user}@example.org"), &pf.maillog());
    }
    let ml = pf.maillog();
    assert!(
        ml.contains("sasl_method=LOGIN, sasl_username=app@contoso.com"),
        "{ml}"
    );
    assert!(ml.contains("TLS connection established from"), "{ml}");
    assert!(
        log.matches("status=sent (250 2.0.0 Ok: queued as").count() == 3,
        "one sent line per recipient, with Postfix's reply: {log}"
    );
    assert!(log.contains("relay=localhost[127.0.0.1]:"), "{log}");
    assert!(!log.contains(PASSWORD), "never log a secret");
    // One transaction for the three recipients.
    assert_eq!(ml.matches("nrcpt=3").count(), 1, "{ml}");
}

#[test]
fn plain_delivery_to_postfix_through_the_daemon() {
    if postfix_or_skip("plain_delivery_to_postfix_through_the_daemon").is_none() {
        return;
    }
    let pf = Postfix::start(Options {
        idle: 2,
        ..Options::default()
    });
    let spool = client(&pf, Mech::Plain, PASSWORD, "127.0.0.1", "");
    let d = Daemon::start(&spool);
    assert_ok(&spool.sendmail(
        &["-t", "-i", "-F", "Web Shop", "-f", "shop@web1.example.com"],
        MSG,
    ));
    for user in ["alice", "bob", "hidden"] {
        let got = pf.wait_mailbox(user, 1);
        check_copy(&got[0], &format!("{user}@example.org"), &d.log_text());
    }
    // Postfix drops the daemon's idle connection (421 after smtpd_timeout); the next
    // message goes out at once on a new one, not after a deferral.
    assert!(
        eventually(Duration::from_secs(10), || pf
            .maillog()
            .contains("timeout after END-OF-MESSAGE")),
        "{}",
        pf.maillog()
    );
    // A local recipient goes through the aliases file.
    assert_ok(&spool.sendmail(&["-i", "root"], b"Subject: for root\n\nlocal\n"));
    let got = pf.wait_mailbox("carol", 1);
    assert_eq!(got[0].get("Subject").as_deref(), Some("for root"));
    assert_eq!(got[0].body, b"local\n");
    assert!(
        eventually(Duration::from_secs(10), || queued(&spool).is_empty()),
        "{}",
        d.log_text()
    );
    let ml = pf.maillog();
    assert!(
        ml.contains("sasl_method=PLAIN, sasl_username=app@contoso.com"),
        "{ml}"
    );
    let log = d.log_text();
    assert!(!log.contains(PASSWORD), "never log a secret");
    assert!(!log.contains("held"), "{log}");
    assert!(!log.contains("status=deferred"), "{log}");
    assert_eq!(
        pf.maillog()
            .matches("TLS connection established from")
            .count(),
        2,
        "a second connection after the idle one was dropped: {}",
        pf.maillog()
    );
    assert!(d.stop().success(), "SIGTERM exits 0");
}

/// Subjects of `user`'s messages, sorted.
fn subjects(pf: &Postfix, user: &str) -> Vec<String> {
    let mut s: Vec<String> = pf
        .mailbox(user)
        .iter()
        .filter_map(|m| m.get("Subject"))
        .collect();
    s.sort();
    s
}

/// Postfix's anvil accepts `RATE` messages per window and answers the rest
/// `450 4.7.1 Error: too much mail from 127.0.0.1` at MAIL FROM. The window is long
/// enough that one queue run (a few hundred milliseconds) never straddles a reset.
const RATE: u32 = 3;
const WINDOW: u64 = 3;

/// Anvil resets a client's counts once a whole window has passed since its first
/// connection, compared in whole seconds. `after` is a moment after that connection
/// (the end of the run that met the limit): a window plus a second from it is enough.
fn wait_for_anvil_window(after: Instant) {
    let due = after + Duration::from_secs(WINDOW + 1) + Duration::from_millis(100);
    if let Some(left) = due.checked_duration_since(Instant::now()) {
        std::thread::sleep(left);
    }
}

fn check_rate_deferrals(spool: &Spool, pf: &Postfix, log: &str, deferred: usize) {
    let q = queued(spool);
    assert_eq!(q.len(), deferred, "the excess stays queued: {log}");
    for e in &q {
        assert!(!e.is_bounce, "nothing is bounced: {q:?}");
        for r in &e.recipients {
            assert_eq!(r.status, RcptStatus::Pending, "{q:?}");
            let reply = r.reply.as_deref().unwrap_or_default();
            assert!(
                reply.contains("450") && reply.contains("too much mail from 127.0.0.1"),
                "the recipient keeps Postfix's reason: {reply:?}"
            );
        }
    }
    assert!(!log.contains("status=bounced"), "{log}");
    let mailq = stdout(&spool.sendmail_as("mailq", &[], b""));
    assert_eq!(
        mailq.matches("too much mail from 127.0.0.1").count(),
        deferred,
        "mailq shows why: {mailq}"
    );
    assert!(
        pf.maillog()
            .contains("Message delivery request rate limit exceeded"),
        "{}",
        pf.maillog()
    );
}

#[test]
fn postfix_rate_limit_defers_the_excess_and_a_retry_delivers_it() {
    if postfix_or_skip("postfix_rate_limit_defers_the_excess_and_a_retry_delivers_it").is_none() {
        return;
    }
    let pf = Postfix::start(Options {
        rate: RATE,
        window: WINDOW,
        ..Options::default()
    });
    // relay365's own pacing off, so Postfix's limit is what bites.
    let spool = client(
        &pf,
        Mech::Login,
        PASSWORD,
        "localhost",
        "message_rate = \"off\"",
    );
    let n = RATE as usize + 3;
    for i in 1..=n {
        assert_ok(&spool.sendmail(
            &["-i", "alice@example.org"],
            format!("Subject: m{i}\n\nnumber {i}\n").as_bytes(),
        ));
    }
    let out = spool.relay365(&["flush", "-v"]);
    let limited = Instant::now();
    assert_left(&out);
    let log = stderr(&out);
    pf.wait_mailbox("alice", RATE as usize);
    check_rate_deferrals(&spool, &pf, &log, 3);
    assert_eq!(
        log.matches("status=deferred").count(),
        3,
        "one deferral per refused message: {log}"
    );
    // No retry before the server's window passed; then an administrator's retry.
    wait_for_anvil_window(limited);
    assert_ok(&spool.relay365(&["queue", "retry"]));
    let out = spool.relay365(&["flush", "-v"]);
    assert_ok(&out);
    assert!(queued(&spool).is_empty(), "{}", stderr(&out));
    pf.wait_mailbox("alice", n);
    let want: Vec<String> = {
        let mut w: Vec<String> = (1..=n).map(|i| format!("m{i}")).collect();
        w.sort();
        w
    };
    assert_eq!(subjects(&pf, "alice"), want, "each message exactly once");
}

#[test]
fn postfix_rate_limit_with_the_daemon_and_sendmail_q() {
    if postfix_or_skip("postfix_rate_limit_with_the_daemon_and_sendmail_q").is_none() {
        return;
    }
    let pf = Postfix::start(Options {
        rate: RATE,
        window: WINDOW,
        ..Options::default()
    });
    let spool = client(
        &pf,
        Mech::Plain,
        PASSWORD,
        "localhost",
        "message_rate = \"off\"",
    );
    // Queue everything before the daemon starts, so its first run meets the limit.
    let n = RATE as usize + 3;
    for i in 1..=n {
        assert_ok(&spool.sendmail(
            &["-i", "bob@example.org"],
            format!("Subject: d{i}\n\nnumber {i}\n").as_bytes(),
        ));
    }
    let d = Daemon::start(&spool);
    pf.wait_mailbox("bob", RATE as usize);
    assert!(
        eventually(Duration::from_secs(10), || d
            .log_text()
            .matches("status=deferred")
            .count()
            == 3),
        "{}",
        d.log_text()
    );
    let limited = Instant::now();
    // The log line comes just before the queue file records the reply.
    assert!(
        eventually(Duration::from_secs(5), || queued(&spool)
            .iter()
            .filter(|e| e.recipients[0]
                .reply
                .as_deref()
                .is_some_and(|r| r.contains("too much mail")))
            .count()
            == 3),
        "{:?}",
        queued(&spool)
    );
    check_rate_deferrals(&spool, &pf, &d.log_text(), 3);
    // The daemon's backoff (a minute) is longer than this test; sendmail -q asks it
    // to retry now, once the server's window has passed.
    wait_for_anvil_window(limited);
    assert_ok(&spool.sendmail(&["-q"], b""));
    pf.wait_mailbox("bob", n);
    assert!(
        eventually(Duration::from_secs(10), || queued(&spool).is_empty()),
        "{}",
        d.log_text()
    );
    let want: Vec<String> = {
        let mut w: Vec<String> = (1..=n).map(|i| format!("d{i}")).collect();
        w.sort();
        w
    };
    assert_eq!(subjects(&pf, "bob"), want, "each message exactly once");
    assert!(!d.log_text().contains("status=bounced"), "{}", d.log_text());
    assert!(d.stop().success());
}

#[test]
fn wrong_password_holds_the_account_and_bounces_nothing() {
    if postfix_or_skip("wrong_password_holds_the_account_and_bounces_nothing").is_none() {
        return;
    }
    let pf = Postfix::start(Options::default());
    let wrong = "not the password";
    let spool = client(&pf, Mech::Login, wrong, "localhost", "");
    assert_ok(&spool.sendmail(
        &["-i", "-f", "shop@contoso.com", "alice@example.org"],
        b"Subject: held\n\nx\n",
    ));
    let out = spool.relay365(&["flush", "-v"]);
    assert_left(&out);
    let log = stderr(&out);
    let q = queued(&spool);
    assert_eq!(q.len(), 1, "still queued: {log}");
    assert!(!q[0].is_bounce);
    assert_eq!(q[0].recipients[0].status, RcptStatus::Pending, "{q:?}");
    assert!(log.contains("held until"), "{log}");
    assert!(
        log.contains("535"),
        "the server's reply is in the log: {log}"
    );
    assert!(!log.contains("status=bounced"), "{log}");
    assert!(!log.contains(wrong), "never log a secret: {log}");
    let quota = stdout(&spool.relay365(&["quota"]));
    assert!(quota.contains("held"), "{quota}");
    // The hold says what is wrong and what to do, not the OAuth2 token story.
    assert!(
        quota.contains("refused the password of app@contoso.com")
            && quota.contains("secrets.toml")
            && quota.contains("relay365 account release app"),
        "{quota}"
    );
    assert!(!quota.contains("OAuth2"), "{quota}");
    let ml = pf.maillog();
    assert!(ml.contains("authentication failed"), "{ml}");
    assert!(!ml.contains("status=sent"), "nothing was delivered: {ml}");
    // One failed AUTH, not a storm.
    assert_eq!(
        ml.matches("SASL LOGIN authentication failed").count(),
        1,
        "{ml}"
    );

    // The administrator fixes the password and releases the account.
    let secrets = spool.dir.path().join("secrets.toml");
    std::fs::write(&secrets, format!("[app]\npassword = \"{PASSWORD}\"\n")).expect("secrets");
    assert_ok(&spool.relay365(&["account", "release", "app"]));
    let out = spool.relay365(&["flush", "-v"]);
    assert_ok(&out);
    let got = pf.wait_mailbox("alice", 1);
    assert_eq!(got[0].get("Subject").as_deref(), Some("held"));
    assert!(queued(&spool).is_empty(), "{}", stderr(&out));
    assert!(!stdout(&spool.relay365(&["quota"])).contains("held"));
}

/// Guards the guard: a dropped `Postfix` leaves no process of its instance behind.
#[test]
fn a_dropped_postfix_leaves_nothing_running() {
    if postfix_or_skip("a_dropped_postfix_leaves_nothing_running").is_none() {
        return;
    }
    let pf = Postfix::start(Options::default());
    let pid: i32 = std::fs::read_to_string(pf.work.path().join("queue/pid/master.pid"))
        .expect("master.pid")
        .trim()
        .parse()
        .expect("a pid");
    let watchdog: i32 = std::fs::read_to_string(pf.work.path().join("watchdog.pid"))
        .expect("watchdog.pid")
        .trim()
        .parse()
        .expect("a pid");
    let work: PathBuf = pf.work.path().to_path_buf();
    drop(pf);
    assert!(!Path::new(&work).exists(), "the work directory is gone");
    // A zombie waiting for PID 1 to reap it counts as gone.
    let alive = |p: i32| {
        std::fs::read_to_string(format!("/proc/{p}/stat"))
            .ok()
            .and_then(|s| Some(s.rsplit_once(')')?.1.split_whitespace().next()? != "Z"))
            .unwrap_or(false)
    };
    let group_alive = || {
        std::fs::read_dir("/proc")
            .map(|d| {
                d.flatten().any(|e| {
                    std::fs::read_to_string(e.path().join("stat"))
                        .ok()
                        .and_then(|s| {
                            // Fields after the command's closing parenthesis: state ppid pgrp.
                            let rest = s.rsplit_once(')')?.1.to_string();
                            let mut f = rest.split_whitespace();
                            let state = f.next()?;
                            let pgrp = f.nth(1)?.parse::<i32>().ok()?;
                            Some(state != "Z" && pgrp == pid)
                        })
                        .unwrap_or(false)
                })
            })
            .unwrap_or(false)
    };
    assert!(
        eventually(Duration::from_secs(5), || !alive(pid) && !group_alive()),
        "Postfix's master {pid} or one of its children is still running"
    );
    assert!(
        eventually(Duration::from_secs(5), || !alive(watchdog)),
        "the watchdog {watchdog} is still running"
    );
}

#[test]
fn postfix_refusing_one_recipient_bounces_it_and_delivers_the_rest() {
    if postfix_or_skip("postfix_refusing_one_recipient_bounces_it_and_delivers_the_rest").is_none()
    {
        return;
    }
    let pf = Postfix::start(Options::default());
    let spool = client(&pf, Mech::Login, PASSWORD, "localhost", "");
    // One recipient refused for good among two good ones...
    assert_ok(&spool.sendmail(
        &[
            "-i",
            "-f",
            "dave@example.org",
            "alice@example.org",
            "refused@example.org",
            "bob@example.org",
        ],
        b"Subject: partial\n\nbody\n",
    ));
    // ...and one refused for now beside a good one.
    assert_ok(&spool.sendmail(
        &[
            "-i",
            "-f",
            "dave@example.org",
            "later@example.org",
            "carol@example.org",
        ],
        b"Subject: later\n\nbody\n",
    ));
    let out = spool.relay365(&["flush", "-v"]);
    assert_left(&out);
    let log = stderr(&out);
    // The others go in one transaction each.
    assert_eq!(pf.wait_mailbox("alice", 1)[0].body, b"body\n");
    assert_eq!(pf.wait_mailbox("bob", 1)[0].body, b"body\n");
    assert_eq!(pf.wait_mailbox("carol", 1)[0].body, b"body\n");
    // The refused one is bounced to the sender, through the same server.
    let dsn = &pf.wait_mailbox("dave", 1)[0];
    let text = String::from_utf8_lossy(&dsn.body).into_owned();
    assert!(
        dsn.get("Content-Type")
            .is_some_and(|c| c.contains("multipart/report")),
        "{}",
        dsn.header
    );
    assert!(
        text.contains("Final-Recipient: rfc822; refused@example.org"),
        "{text}"
    );
    assert!(text.contains("Status: 5.1.1"), "{text}");
    assert!(
        text.contains("Diagnostic-Code: smtp; 550 5.1.1 <refused@example.org>:")
            && text.contains("no such user"),
        "Postfix's reply is in the report: {text}"
    );
    assert!(
        text.contains("Subject: partial"),
        "the original is attached: {text}"
    );
    assert!(
        !text.contains("Final-Recipient: rfc822; alice@example.org")
            && !text.contains("later@example.org"),
        "{text}"
    );
    // The 450 one waits for a retry, never bounced.
    let q = queued(&spool);
    assert_eq!(q.len(), 1, "{log}");
    let pending: Vec<&str> = q[0]
        .recipients
        .iter()
        .filter(|r| r.status == RcptStatus::Pending)
        .map(|r| r.address.as_str())
        .collect();
    assert_eq!(pending, ["later@example.org"], "{q:?}");
    assert!(
        log.contains("to=<refused@example.org>") && log.contains("status=bounced"),
        "{log}"
    );
    assert!(
        log.contains("to=<later@example.org>") && log.contains("status=deferred"),
        "{log}"
    );
}

#[test]
fn postfix_gets_smtputf8_and_dsn_parameters() {
    if postfix_or_skip("postfix_gets_smtputf8_and_dsn_parameters").is_none() {
        return;
    }
    let pf = Postfix::start(Options::default());
    let spool = client(&pf, Mech::Login, PASSWORD, "localhost", "");
    assert_ok(&spool.sendmail(
        &["-i", "-N", "success,failure", "jürgen@example.org"],
        "Subject: Grüße\n\nü\n".as_bytes(),
    ));
    let out = spool.relay365(&["flush", "-v"]);
    assert_ok(&out);
    let got = pf.wait_mailbox("other", 1);
    let m = &got[0];
    assert_eq!(m.get("Delivered-To").as_deref(), Some("jürgen@example.org"));
    assert!(
        m.get("Received")
            .is_some_and(|r| r.contains("with UTF8SMTPSA")),
        "sent with SMTPUTF8: {}",
        m.header
    );
    assert_eq!(m.get("Subject").as_deref(), Some("Grüße"));
    assert_eq!(m.body, "ü\n".as_bytes());
    // NOTIFY=SUCCESS reached Postfix: it reports the delivery to the envelope sender.
    assert!(
        eventually(Duration::from_secs(10), || pf
            .maillog()
            .contains("sender delivery status notification")),
        "{}",
        pf.maillog()
    );
    assert!(queued(&spool).is_empty(), "{}", stderr(&out));
}

#[test]
fn a_postfix_certificate_from_an_unknown_ca_is_refused() {
    if postfix_or_skip("a_postfix_certificate_from_an_unknown_ca_is_refused").is_none() {
        return;
    }
    let pf = Postfix::start(Options::default());
    let spool = client(&pf, Mech::Login, PASSWORD, "localhost", "");
    // The same account without the test CA: only the system store, which never signed
    // this server's certificate.
    let cfg: String = std::fs::read_to_string(&spool.config)
        .expect("config")
        .lines()
        .filter(|l| !l.starts_with("ca_file"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&spool.config, cfg).expect("config");
    let check = spool.relay365(&["check"]);
    assert!(!check.status.success(), "{}", stdout(&check));
    assert!(
        stdout(&check).contains("UnknownIssuer"),
        "{}",
        stdout(&check)
    );
    assert_ok(&spool.sendmail(&["-i", "alice@example.org"], b"Subject: x\n\nx\n"));
    let out = spool.relay365(&["flush", "-v"]);
    assert_left(&out);
    let q = queued(&spool);
    assert_eq!(
        q.len(),
        1,
        "deferred, not lost or bounced: {}",
        stderr(&out)
    );
    assert!(
        q[0].recipients[0]
            .reply
            .as_deref()
            .is_some_and(|r| r.contains("invalid peer certificate")),
        "{q:?}"
    );
    let ml = pf.maillog();
    assert!(
        ml.contains("alert unknown ca"),
        "rustls hung up in the handshake: {ml}"
    );
    assert!(
        !ml.contains("sasl_method"),
        "no AUTH without a trusted server: {ml}"
    );
}
