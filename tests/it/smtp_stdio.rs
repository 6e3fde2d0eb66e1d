//! `sendmail -bs` end to end: the real binary speaking SMTP on its stdin/stdout, both
//! in lock-step (a client that waits for every reply) and pipelined (the whole session
//! written at once), every command and error path, several messages per session, what
//! the spool holds afterwards, and a real client (Python's smtplib over a socketpair).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use crate::harness::*;

/// Splits a session's output into reply lines.
fn lines(out: &std::process::Output) -> Vec<String> {
    let text = stdout(out);
    assert!(
        text.ends_with("\r\n"),
        "replies end in CRLF: {text:?} stderr: {}",
        stderr(out)
    );
    text.split("\r\n")
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

/// The final line of each reply.
fn finals(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter(|l| l.as_bytes().get(3) != Some(&b'-'))
        .cloned()
        .collect()
}

fn codes(lines: &[String]) -> Vec<String> {
    finals(lines).iter().map(|l| l[..3].to_string()).collect()
}

/// A client that waits for each reply before sending the next command: proves every
/// reply is flushed without the input being closed.
struct Dialogue {
    child: Child,
    input: ChildStdin,
    output: BufReader<ChildStdout>,
}

impl Dialogue {
    fn start(s: &Spool, args: &[&str]) -> (Dialogue, Vec<String>) {
        let mut child = Command::new(SENDMAIL)
            .arg("-C")
            .arg(&s.config)
            .arg("-bs")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sendmail -bs");
        let input = child.stdin.take().expect("stdin");
        let output = BufReader::new(child.stdout.take().expect("stdout"));
        // A hung dialogue must fail the test, not hang it.
        let pid = child.id();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(60));
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        });
        let mut d = Dialogue {
            child,
            input,
            output,
        };
        let greeting = d.read_reply();
        (d, greeting)
    }

    fn read_reply(&mut self) -> Vec<String> {
        let mut reply = Vec::new();
        loop {
            let mut line = String::new();
            let n = self.output.read_line(&mut line).expect("read reply");
            assert!(n > 0, "sendmail closed its output; so far: {reply:?}");
            assert!(line.ends_with("\r\n"), "{line:?}");
            let line = line.trim_end().to_string();
            let last = line.as_bytes().get(3) != Some(&b'-');
            reply.push(line);
            if last {
                return reply;
            }
        }
    }

    /// Sends one line and returns the reply's lines.
    fn cmd(&mut self, line: &str) -> Vec<String> {
        self.input
            .write_all(format!("{line}\r\n").as_bytes())
            .expect("write");
        self.input.flush().expect("flush");
        self.read_reply()
    }

    /// Sends message data (already dot-stuffed, ending in CRLF) and the final dot.
    fn data(&mut self, text: &str) -> Vec<String> {
        self.input
            .write_all(format!("{text}.\r\n").as_bytes())
            .expect("write");
        self.read_reply()
    }

    fn finish(self) -> std::process::Output {
        drop(self.input);
        self.child.wait_with_output().expect("wait")
    }
}

#[test]
fn lock_step_dialogue_covers_every_command() {
    let s = Spool::new("max_message_size = \"20K\"");
    let (mut d, greeting) = Dialogue::start(&s, &[]);
    assert_eq!(greeting, ["220 example.com ESMTP relay365"]);
    assert_eq!(
        d.cmd("EHLO client.example"),
        [
            "250-example.com",
            "250-PIPELINING",
            "250-SIZE 20000",
            "250-8BITMIME",
            "250-DSN",
            "250-SMTPUTF8",
            "250 ENHANCEDSTATUSCODES"
        ]
    );
    assert_eq!(d.cmd("HELO client.example"), ["250 example.com"]);
    assert_eq!(d.cmd("NOOP"), ["250 2.0.0 Ok"]);
    assert_eq!(
        d.cmd("HELP"),
        ["214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP VRFY HELP QUIT"]
    );
    assert_eq!(
        d.cmd("VRFY root"),
        ["252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery"]
    );
    assert_eq!(
        d.cmd("MAIL FROM:<app@example.com> SIZE=300 BODY=8BITMIME"),
        ["250 2.1.0 Ok"]
    );
    assert_eq!(
        d.cmd("RCPT TO:<to@example.org> NOTIFY=FAILURE,DELAY ORCPT=rfc822;to@example.org"),
        ["250 2.1.5 Ok"]
    );
    assert_eq!(d.cmd("RCPT TO:<root>"), ["250 2.1.5 Ok"]);
    assert_eq!(d.cmd("DATA"), ["354 End data with <CR><LF>.<CR><LF>"]);
    // Nothing is queued before the final dot.
    assert_eq!(s.count_files("incoming/new"), 0);
    let reply = d.data("Subject: lock step\r\nTo: to@example.org\r\n\r\n..dotted\r\nbody\r\n");
    assert_eq!(reply.len(), 1);
    let id = reply[0]
        .strip_prefix("250 2.0.0 Ok: queued as ")
        .unwrap_or_else(|| panic!("{reply:?}"))
        .to_string();
    // Queued before the 250 was written: the file is already in new/.
    assert!(s.new_dir().join(&id).exists(), "{id} not in new/");
    assert_eq!(d.cmd("MAIL FROM:<other@example.com>"), ["250 2.1.0 Ok"]);
    assert_eq!(d.cmd("RSET"), ["250 2.0.0 Ok"]);
    assert_eq!(
        d.cmd("RCPT TO:<x@example.org>"),
        ["503 5.5.1 Error: need MAIL command"]
    );
    assert_eq!(d.cmd("QUIT"), ["221 2.0.0 Bye"]);
    let out = d.finish();
    assert_ok(&out);
    let (env, msg) = s.only();
    assert_eq!(env.id.as_str(), id);
    assert_eq!(env.sender, "app@example.com");
    assert_eq!(env.recipients, ["to@example.org", "root@example.com"]);
    assert_eq!(env.dsn.notify, None, "NOTIFY differed per recipient");
    assert_eq!(
        env.dsn.body,
        Some(relay365::spool::envelope::BodyType::EightBitMime)
    );
    assert!(msg.ends_with("\r\n\r\n.dotted\r\nbody\r\n"), "{msg}");
    assert!(
        msg.contains("\r\nMessage-ID: <") && msg.contains("\r\nDate: "),
        "{msg}"
    );
}

#[test]
fn pipelined_session_with_several_messages() {
    let s = Spool::new("");
    let session = "EHLO c\r\n\
        MAIL FROM:<a@example.com>\r\nRCPT TO:<one@example.org>\r\nDATA\r\n\
        Subject: first\r\n\r\n1\r\n.\r\n\
        MAIL FROM:<> RET=HDRS ENVID=env-2\r\nRCPT TO:<two@example.org> NOTIFY=NEVER\r\nRCPT TO:<www-data> NOTIFY=NEVER\r\nDATA\r\n\
        Subject: second\r\nBcc: secret@example.org\r\n\r\n2\r\n.\r\n\
        NOOP\r\n\
        MAIL FROM:<c@example.com>\r\nRCPT TO:<three@example.org>\r\nDATA\r\n\
        Subject: third\r\n\r\n3\r\n.\r\n\
        QUIT\r\n";
    let out = s.sendmail(&["-bs"], session.as_bytes());
    assert_ok(&out);
    let l = lines(&out);
    assert_eq!(
        codes(&l),
        [
            "220", "250", "250", "250", "354", "250", "250", "250", "250", "354", "250", "250",
            "250", "250", "354", "250", "221"
        ]
    );
    let queued = s.incoming();
    assert_eq!(queued.len(), 3);
    let (e1, _) = &queued[0];
    assert_eq!(
        (e1.sender.as_str(), e1.recipients.len()),
        ("a@example.com", 1)
    );
    assert_eq!(e1.recipients, ["one@example.org"]);
    let (e2, m2) = &queued[1];
    assert_eq!(e2.sender, "");
    assert_eq!(e2.recipients, ["two@example.org", "www-data@example.com"]);
    assert_eq!(
        e2.dsn.notify,
        Some(relay365::spool::envelope::Notify::Never)
    );
    assert_eq!(e2.dsn.ret, Some(relay365::spool::envelope::Ret::Hdrs));
    assert_eq!(e2.dsn.envid.as_ref().map(|e| e.as_str()), Some("env-2"));
    let m2 = String::from_utf8_lossy(m2);
    assert!(!m2.contains("secret"), "Bcc header removed: {m2}");
    assert_eq!(queued[2].0.recipients, ["three@example.org"]);
    // Each 250 names the id of the file it wrote.
    let ids: Vec<String> = finals(&l)
        .iter()
        .filter_map(|r| r.strip_prefix("250 2.0.0 Ok: queued as ").map(String::from))
        .collect();
    let env_ids: Vec<String> = queued.iter().map(|(e, _)| e.id.to_string()).collect();
    assert_eq!(ids, env_ids);
}

#[test]
fn error_paths_get_their_replies_and_the_session_goes_on() {
    let s = Spool::new("max_message_size = \"2K\"");
    let long = format!("MAIL FROM:<{}@example.com>", "a".repeat(100_000));
    let big_body = "x".repeat(3000);
    let session = format!(
        "BOGUS\r\n\
         \r\n\
         EXPN staff\r\n\
         DATA\r\n\
         RCPT TO:<a@example.org>\r\n\
         {long}\r\n\
         MAIL FROM:a@b c@d\r\n\
         MAIL FROM:<a b@example.com>\r\n\
         MAIL FROM:<a@example.com> SIZE=5000\r\n\
         MAIL FROM:<a@example.com> FOO=BAR\r\n\
         MAIL FROM:<a@example.com>\r\n\
         MAIL FROM:<a@example.com>\r\n\
         DATA\r\n\
         RCPT TO:<>\r\n\
         DATA\r\n\
         RSET\r\n\
         MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n\
         Subject: ok\r\n Bad continuation is fine\r\nnot a header\r\n\r\nbody\r\n.\r\n\
         MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n\
         Subject: big\r\n\r\n{big_body}\r\n.\r\n\
         MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n\
         Subject: fine\r\n\r\nbody\r\n.\r\n\
         QUIT\r\n"
    );
    let out = s.sendmail(&["-bs"], session.as_bytes());
    assert_ok(&out);
    let f = finals(&lines(&out));
    let expect_prefix = [
        "220 ",
        "502 5.5.2 Error: command not recognized",
        "500 5.5.2 Error: bad syntax",
        "502 5.5.1 Error: command not implemented",
        "503 5.5.1 Error: need MAIL command",
        "503 5.5.1 Error: need MAIL command",
        "500 5.5.6 Error: line too long",
        "555 5.5.4 Unsupported option: c@d",
        "501 5.1.7 Bad sender address syntax",
        "552 5.3.4 Message size exceeds fixed limit of 2000 bytes",
        "555 5.5.4 Unsupported option: FOO=BAR",
        "250 2.1.0 Ok",
        "503 5.5.1 Error: nested MAIL command",
        "503 5.5.1 Error: need RCPT command",
        "501 5.1.3 Bad recipient address syntax",
        "554 5.5.1 Error: no valid recipients",
        "250 2.0.0 Ok",
        "250 2.1.0 Ok",
        "250 2.1.5 Ok",
        "354 ",
        "554 5.6.0 Error: malformed header block: line 3: \"not a header\"",
        "250 2.1.0 Ok",
        "250 2.1.5 Ok",
        "354 ",
        "552 5.3.4 Error: message too large",
        "250 2.1.0 Ok",
        "250 2.1.5 Ok",
        "354 ",
        "250 2.0.0 Ok: queued as ",
        "221 2.0.0 Bye",
    ];
    assert_eq!(f.len(), expect_prefix.len(), "{f:#?}");
    for (got, want) in f.iter().zip(expect_prefix) {
        assert!(
            got.starts_with(want),
            "got {got:?}, want {want:?}...; all: {f:#?}"
        );
    }
    let (env, msg) = s.only();
    assert_eq!(env.recipients, ["b@example.org"]);
    assert!(msg.contains("Subject: fine"));
}

#[test]
fn too_many_recipients_get_452_and_the_first_thousand_are_kept() {
    let s = Spool::new("");
    let mut session = String::from("MAIL FROM:<a@example.com>\r\n");
    for i in 0..1002 {
        session.push_str(&format!("RCPT TO:<r{i}@example.org>\r\n"));
    }
    session.push_str("DATA\r\nSubject: many\r\n\r\nb\r\n.\r\nQUIT\r\n");
    let out = s.sendmail(&["-bs"], session.as_bytes());
    assert_ok(&out);
    let f = finals(&lines(&out));
    // f[0] is the greeting, f[1] the MAIL reply, f[2..=1001] the first 1000 RCPTs.
    assert_eq!(f[1001], "250 2.1.5 Ok");
    assert_eq!(f[1002], "452 4.5.3 Error: too many recipients");
    assert_eq!(f[1003], "452 4.5.3 Error: too many recipients");
    assert!(
        f[1005].starts_with("250 2.0.0 Ok: queued as "),
        "{}",
        f[1005]
    );
    let (env, _) = s.only();
    assert_eq!(env.recipients.len(), 1000);
}

#[test]
fn end_of_input_mid_data_queues_nothing_and_exits_tempfail() {
    let s = Spool::new("");
    let session = "EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\nSubject: cut\r\n\r\nhalf a mess";
    let out = s.sendmail(&["-bs"], session.as_bytes());
    assert_fails(&out, 75, "not queued");
    assert_eq!(s.count_files("incoming/new"), 0);
    assert_eq!(s.count_files("incoming/tmp"), 0);
    // A complete message earlier in the same session stays queued.
    let session = "MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\nSubject: whole\r\n\r\nx\r\n.\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\nSubject: cut\r\n";
    let out = s.sendmail(&["-bs"], session.as_bytes());
    assert_fails(&out, 75, "in the middle of a message");
    let (_, msg) = s.only();
    assert!(msg.contains("Subject: whole"));
    assert_eq!(s.count_files("incoming/tmp"), 0);
    // An open transaction without DATA is not queued either.
    let out = s.sendmail(
        &["-bs"],
        b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n",
    );
    assert_fails(&out, 75, "before the message data");
    assert_eq!(s.count_files("incoming/new"), 1);
}

#[test]
fn end_of_input_without_quit_after_complete_transactions_is_success() {
    let s = Spool::new("");
    let out = s.sendmail(
        &["-bs"],
        b"MAIL FROM:<a@example.com>\nRCPT TO:<b@example.org>\nDATA\nSubject: lf only\r\n\r\nbody\r\n.\r\n",
    );
    assert_ok(&out);
    assert_eq!(codes(&lines(&out)), ["220", "250", "250", "354", "250"]);
    let (_, msg) = s.only();
    assert!(msg.ends_with("\r\n\r\nbody\r\n"), "{msg}");
    let out = s.sendmail(&["-bs"], b"");
    assert_ok(&out);
}

#[test]
fn unwritable_spool_is_451_and_the_session_goes_on() {
    let s = Spool::new("");
    std::fs::remove_dir(s.root().join("incoming/tmp")).unwrap();
    let msg = "MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\nSubject: s\r\n\r\nb\r\n.\r\n";
    let out = s.sendmail(&["-bs"], format!("{msg}NOOP\r\nQUIT\r\n").as_bytes());
    assert_ok(&out);
    let f = finals(&lines(&out));
    assert!(
        f[4].starts_with("451 4.3.0 Error: queue file write error: cannot write into"),
        "{f:?}"
    );
    assert_eq!(f[5], "250 2.0.0 Ok");
    assert_eq!(f[6], "221 2.0.0 Bye");
}

#[test]
fn full_disk_is_452_and_a_smaller_message_still_goes() {
    if !is_root() {
        eprintln!("skipped: mounting a tiny tmpfs needs root (CI runs as root)");
        return;
    }
    let s = Spool::new("");
    let root = s.root();
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(&root)
        .status()
        .expect("mount");
    assert!(status.success());
    assert_ok(&s.relay365(&["init", "--private"]));
    let big = "y".repeat(200_000);
    let session = format!(
        "MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\nSubject: big\r\n\r\n{big}\r\n.\r\n\
         MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\nSubject: small\r\n\r\nb\r\n.\r\nQUIT\r\n"
    );
    let out = s.sendmail(&["-bs"], session.as_bytes());
    let tmp = s.count_files("incoming/tmp");
    let queued = s.incoming();
    let _ = Command::new("umount").arg(&root).status();
    assert_ok(&out);
    let f = finals(&lines(&out));
    assert!(
        f[4].starts_with("452 4.3.1 Insufficient system storage"),
        "{f:?}"
    );
    assert!(f[8].starts_with("250 2.0.0 Ok: queued as "), "{f:?}");
    assert_eq!(tmp, 0);
    assert_eq!(queued.len(), 1);
}

#[test]
fn command_line_envelope_options_are_ignored_with_a_warning() {
    let s = Spool::new("");
    let out = s.sendmail(
        &["-bs", "-t", "-f", "argv@example.com", "argv-rcpt@example.org"],
        b"MAIL FROM:<smtp@example.com>\r\nRCPT TO:<smtp-rcpt@example.org>\r\nDATA\r\nTo: header@example.org\r\n\r\nb\r\n.\r\nQUIT\r\n",
    );
    assert_ok(&out);
    assert!(
        stderr(&out).contains("ignored with -bs"),
        "{}",
        stderr(&out)
    );
    let (env, _) = s.only();
    assert_eq!(env.sender, "smtp@example.com");
    assert_eq!(env.recipients, ["smtp-rcpt@example.org"]);
}

#[test]
fn python_smtplib_over_a_pipe() {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/system/clients/smtp_pipe.py"
    );
    if Command::new("python3")
        .arg("-c")
        .arg("import smtplib")
        .output()
        .is_err()
    {
        eprintln!("skipped: python3 is not installed");
        return;
    }
    let s = Spool::new("");
    let out = Command::new("python3")
        .arg(script)
        .arg(SENDMAIL)
        .arg("-C")
        .arg(&s.config)
        .arg("-bs")
        .output()
        .expect("run python3");
    assert_ok(&out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(report["greeting"][0], 220);
    assert_eq!(report["exit"], 0, "{report}");
    assert_eq!(report["quit"][0], 221);
    assert_eq!(report["refused"], serde_json::json!([]));
    let features: Vec<&str> = report["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for f in [
        "8bitmime",
        "dsn",
        "enhancedstatuscodes",
        "pipelining",
        "size",
        "smtputf8",
    ] {
        assert!(features.contains(&f), "{features:?}");
    }
    let queued = s.incoming();
    assert_eq!(queued.len(), 2);
    let (env, msg) = &queued[0];
    let msg = String::from_utf8_lossy(msg);
    assert_eq!(env.sender, "app@example.com");
    assert_eq!(
        env.recipients,
        ["to@example.org", "cc@example.org", "hidden@example.org"]
    );
    assert!(!msg.contains("hidden") && !msg.contains("Bcc"), "{msg}");
    assert!(msg.contains("Subject: smtplib over a pipe\r\n"), "{msg}");
    assert!(
        msg.ends_with("\r\n\r\nfirst line\r\n.a line that starts with a dot\r\nlast line\r\n"),
        "{msg:?}"
    );
    let (env, msg) = &queued[1];
    let msg = String::from_utf8_lossy(msg);
    assert_eq!(env.sender, "");
    assert_eq!(env.recipients, ["root@example.com"]);
    assert!(msg.contains("Schöne Grüße\r\n"), "8-bit body kept: {msg}");
    assert!(msg.contains("Content-Transfer-Encoding: 8bit"), "{msg}");
}

#[test]
fn smtp_smuggling_over_bs_queues_nothing_and_lf_only_data_never_ends() {
    // A client (or a web form feeding one) hides a second transaction behind an
    // end-of-data that some servers accept: `<LF>.<LF>`, `<CR><LF>.<LF>`,
    // `<LF>.<CR><LF>`. Only `<CR><LF>.<CR><LF>` ends the data; the bare LF gets
    // Postfix's `550 5.5.2 Error: bare <LF> received` and nothing is queued.
    let s = Spool::new("");
    for end in ["\n.\n", "\r\n.\n", "\n.\r\n"] {
        let session = format!(
            "MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n\
             Subject: cover\r\n\r\nhello{end}\
             MAIL FROM:<ceo@example.com>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n\
             Subject: smuggled\r\n\r\npay now\r\n.\r\nQUIT\r\n"
        );
        let out = s.sendmail(&["-bs"], session.as_bytes());
        assert_ok(&out);
        let l = lines(&out);
        assert_eq!(
            codes(&l),
            ["220", "250", "250", "354", "550", "221"],
            "{end:?}"
        );
        assert!(
            l[4].starts_with("550 5.5.2 Error: bare <LF> received"),
            "{}",
            l[4]
        );
        assert_eq!(s.count_files("incoming/new"), 0, "{end:?}: nothing queued");
    }
    // LF-only data (a client that writes LF everywhere) never ends: tempfail, resend.
    let out = s.sendmail(
        &["-bs"],
        b"MAIL FROM:<a@example.com>\nRCPT TO:<b@example.org>\nDATA\nSubject: s\n\nbody\n.\nQUIT\n",
    );
    assert_fails(&out, 75, "<CR><LF>.<CR><LF>");
    assert_eq!(s.count_files("incoming/new"), 0);
}
