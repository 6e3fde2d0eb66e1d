//! Hostile messages through the real binaries: a 100 MB line, a million headers,
//! deeply nested MIME, invalid UTF-8, NUL bytes and bare CR, and a `-bs` session with a
//! 100 MB command line and 100 MB of message data. Each is refused with a
//! clear error or carried through intake, the From rewrite, bounces and the capture
//! transport unharmed, and the memory it costs is measured (peak RSS from
//! /proc/<pid>/status VmHWM, polled while the child runs) and bounded.

use std::io::{Read, Write};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::harness::*;

/// A child's exit, output, and what it cost.
struct Measured {
    status: ExitStatus,
    stderr: String,
    /// Highest VmHWM seen, in KiB.
    peak_kb: u64,
    /// Bytes of stdin the child took before it exited or closed it.
    written: u64,
    elapsed: Duration,
}

fn vm_hwm_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Runs `cmd`, streaming `chunks` into its stdin from a thread, and polls its peak RSS.
/// VmHWM only grows, so the last reading before exit is the peak up to that moment.
fn measure(mut cmd: Command, chunks: Box<dyn Iterator<Item = Vec<u8>> + Send>) -> Measured {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd.spawn().expect("spawn");
    let pid = child.id();
    let mut stdin = child.stdin.take().expect("stdin");
    let writer = std::thread::spawn(move || {
        let mut n = 0u64;
        for chunk in chunks {
            // The child may stop reading (message too large) and close the pipe.
            if stdin.write_all(&chunk).is_err() {
                break;
            }
            n += chunk.len() as u64;
        }
        n
    });
    let mut stderr_pipe = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr_pipe.read_to_string(&mut s);
        s
    });
    let mut peak_kb = 0;
    let status = loop {
        if let Some(kb) = vm_hwm_kb(pid) {
            peak_kb = peak_kb.max(kb);
        }
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    Measured {
        status,
        stderr: reader.join().expect("stderr reader"),
        peak_kb,
        written: writer.join().expect("writer"),
        elapsed: started.elapsed(),
    }
}

fn sendmail_cmd(s: &Spool, args: &[&str]) -> Command {
    let mut cmd = Command::new(SENDMAIL);
    cmd.arg("-C").arg(&s.config).args(args);
    cmd
}

fn once(bytes: Vec<u8>) -> Box<dyn Iterator<Item = Vec<u8>> + Send> {
    Box::new(std::iter::once(bytes))
}

/// A spool whose one account writes to a maildir (no network), whose `example.com`
/// users are local with no alias or admin (so mail to them bounces), and the maildir.
fn capture_spool(extra: &str) -> (Spool, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let aliases = dir.path().join("aliases");
    std::fs::write(&aliases, "postmaster: ops@contoso.com\n").expect("aliases");
    let s = Spool::new(&format!(
        "aliases = \"{}\"\nlocal_domains = [\"example.com\"]\n{extra}\n[[account]]\nname = \"capture\"\nmailbox = \"app@contoso.com\"\nauth = \"none\"\ntransport = \"maildir:{}\"\n",
        aliases.display(),
        dir.path().join("Maildir").display()
    ));
    (s, dir)
}

/// Every message the capture transport wrote.
fn captured(maildir: &tempfile::TempDir) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(maildir.path().join("Maildir/new"))
        .map(|d| {
            d.flatten()
                .map(|e| std::fs::read(e.path()).expect("read captured"))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn has_bare_lf(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (i == 0 || bytes[i - 1] != b'\r'))
}

const MB: u64 = 1 << 20;

#[test]
fn a_100_mb_line_is_refused_at_the_limit_without_reading_it_all() {
    // The default limit (35 MB): what every installation has.
    let s = Spool::new("");
    let chunk = vec![b'x'; 64 * 1024];
    let line = std::iter::repeat_n(chunk, 1600).chain(std::iter::once(b"\n".to_vec()));
    let m = measure(sendmail_cmd(&s, &["-i", "a@example.org"]), Box::new(line));
    assert_eq!(
        m.status.code(),
        Some(65),
        "EX_DATAERR; stderr: {}",
        m.stderr
    );
    assert!(m.stderr.contains("message too large"), "{}", m.stderr);
    assert!(
        m.stderr.contains("35000000"),
        "names the limit: {}",
        m.stderr
    );
    assert_eq!(s.count_files("incoming/new"), 0, "nothing queued");
    assert_eq!(s.count_files("incoming/tmp"), 0, "no temporary file left");
    // It stopped reading just past the limit (plus what the pipe and buffers hold)...
    assert!(
        m.written < 36 * MB,
        "read {} bytes of a 100 MB line",
        m.written
    );
    // ...and holds the message once: the limit plus the program, not the input.
    eprintln!(
        "100 MB line: peak RSS {} KiB, {} bytes taken, {:?}",
        m.peak_kb, m.written, m.elapsed
    );
    assert!(m.peak_kb > 0, "no RSS reading");
    assert!(
        m.peak_kb * 1024 < 35_000_000 + 20 * MB,
        "peak RSS {} KiB for a 35 MB limit",
        m.peak_kb
    );
}

#[test]
fn bs_a_100_mb_command_line_and_100_mb_of_data_keep_memory_bounded() {
    // `-bs` reads the whole input (a client may go on after a refusal), so unlike the
    // command-line path it cannot stop early: what must stay bounded is what it holds.
    let s = Spool::new("");
    let chunk = vec![b'x'; 64 * 1024];
    let mut input: Vec<Vec<u8>> = vec![b"EHLO app.example.org\r\nNOOP ".to_vec()];
    input.extend(std::iter::repeat_n(chunk.clone(), 1600));
    input.push(b"\r\nMAIL FROM:<app@example.org>\r\nRCPT TO:<a@example.org>\r\nDATA\r\n".to_vec());
    input.extend(std::iter::repeat_n(chunk, 1600));
    // After both refusals the session still works: this one is queued.
    input.push(
        b"\r\n.\r\nMAIL FROM:<app@example.org>\r\nRCPT TO:<a@example.org>\r\nDATA\r\nSubject: after\r\n\r\nok\r\n.\r\nQUIT\r\n"
            .to_vec(),
    );
    let total: u64 = input.iter().map(|c| c.len() as u64).sum();
    let m = measure(sendmail_cmd(&s, &["-bs"]), Box::new(input.into_iter()));
    eprintln!(
        "-bs, 100 MB line + 100 MB data: peak RSS {} KiB, {} of {total} bytes taken, {:?}",
        m.peak_kb, m.written, m.elapsed
    );
    assert!(m.status.success(), "stderr: {}", m.stderr);
    assert_eq!(m.written, total, "the whole session was read");
    assert_eq!(
        s.count_files("incoming/new"),
        1,
        "only the small message queued"
    );
    assert_eq!(s.count_files("incoming/tmp"), 0, "no temporary file left");
    // The oversized message is dropped once past the 35 MB limit, the long line at
    // 2 KB: at most one message limit plus the program.
    assert!(m.peak_kb > 0, "no RSS reading");
    assert!(
        m.peak_kb * 1024 < 35_000_000 + 20 * MB,
        "peak RSS {} KiB",
        m.peak_kb
    );
}

#[test]
fn a_million_headers_within_the_limit_are_queued_and_delivered() {
    let (s, maildir) = capture_spool("max_message_size = \"20M\"");
    let mut msg = Vec::with_capacity(9 << 20);
    msg.extend_from_slice(b"To: alice@example.org\nSubject: many headers\n");
    for i in 0..1_000_000u32 {
        msg.extend_from_slice(format!("X-H: {i:06}\n").as_bytes());
    }
    msg.extend_from_slice(b"\nbody\n");
    let size = msg.len() as u64;
    let m = measure(sendmail_cmd(&s, &["-t", "-i"]), once(msg));
    eprintln!(
        "a million headers ({size} bytes): sendmail peak RSS {} KiB, {:?}",
        m.peak_kb, m.elapsed
    );
    assert!(m.status.success(), "stderr: {}", m.stderr);
    let (env, queued) = s.only();
    assert_eq!(env.recipients, ["alice@example.org"]);
    assert!(queued.contains("\r\nX-H: 999999\r\n"));
    assert!(queued.ends_with("\r\n\r\nbody\r\n"));
    // One line per header: the message, the reader's Vec per header, the output.
    assert!(
        m.peak_kb * 1024 < 20 * size + 20 * MB,
        "sendmail peak RSS {} KiB for {size} bytes",
        m.peak_kb
    );

    let mut flush = Command::new(RELAY365);
    flush.arg("--config").arg(&s.config).args(["flush", "-v"]);
    let f = measure(flush, once(Vec::new()));
    eprintln!(
        "a million headers: flush peak RSS {} KiB, {:?}",
        f.peak_kb, f.elapsed
    );
    assert!(f.status.success(), "flush: {}", f.stderr);
    let got = captured(&maildir);
    assert_eq!(got.len(), 1);
    assert!(contains(&got[0], b"\r\nX-H: 000000\r\n"));
    assert!(contains(&got[0], b"\r\nX-H: 999999\r\n"));
    assert!(
        contains(&got[0], b"From: \"www-data on ") || contains(&got[0], b"<app@contoso.com>"),
        "From rewritten to the mailbox"
    );
    assert!(
        f.peak_kb * 1024 < 20 * size + 40 * MB,
        "flush peak RSS {} KiB for {size} bytes",
        f.peak_kb
    );
}

#[test]
fn deeply_nested_mime_goes_through_intake_rewrite_and_bounce() {
    let (s, maildir) = capture_spool("");
    const DEPTH: usize = 20_000;
    let mut msg = b"From: \"Web Shop\" <shop@web1.example>\nSubject: nested\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"b0\"\n\n".to_vec();
    for i in 0..DEPTH {
        msg.extend_from_slice(
            format!(
                "--b{i}\nContent-Type: multipart/mixed; boundary=\"b{}\"\n\n",
                i + 1
            )
            .as_bytes(),
        );
    }
    msg.extend_from_slice(
        format!("--b{DEPTH}\nContent-Type: text/plain\n\ninnermost\n").as_bytes(),
    );
    for i in (0..=DEPTH).rev() {
        msg.extend_from_slice(format!("--b{i}--\n").as_bytes());
    }
    // alice gets it (From rewrite on the way); nobody@example.com is a local user with
    // no alias and no admin address, so that copy bounces to the sender.
    let out = s.sendmail(
        &[
            "-i",
            "-f",
            "shop@contoso.com",
            "alice@example.org",
            "nobody@example.com",
        ],
        &msg,
    );
    assert_ok(&out);
    assert_ok(&s.relay365(&["flush", "-v"]));
    assert_ok(&s.relay365(&["flush", "-v"]));
    let got = captured(&maildir);
    let delivered = got
        .iter()
        .find(|m| contains(m, b"X-Envelope-To: <alice@example.org>"))
        .expect("delivered to alice");
    assert!(contains(
        delivered,
        b"From: \"Web Shop\" <app@contoso.com>\r\n"
    ));
    assert!(contains(delivered, b"Reply-To: <shop@web1.example>\r\n"));
    assert!(contains(delivered, b"\r\ninnermost\r\n--b20000--\r\n"));
    let bounce = got
        .iter()
        .find(|m| contains(m, b"multipart/report"))
        .expect("a bounce for nobody@example.com");
    assert!(contains(bounce, b"X-Envelope-To: <shop@contoso.com>"));
    assert!(contains(bounce, b"nobody@example.com"));
    let queue = relay365::spool::queue::Queue::new(&relay365::spool::paths::Spool::new(s.root()));
    assert_eq!(
        queue.ids().map(|i| i.len()).ok(),
        Some(0),
        "nothing left queued"
    );
}

#[test]
fn invalid_utf8_in_headers_and_body_is_carried_byte_for_byte() {
    let (s, maildir) = capture_spool("");
    let msg = b"To: alice@example.org\nFrom: \"Jos\xe9\" <jose@web1.example>\nSubject: caf\xe9 \xff\xfe\xc3\n\nbody \x80\x81\xff\nline \xed\xa0\x80 (a surrogate)\n";
    assert_ok(&s.sendmail(&["-t", "-i"], msg));
    let (_, queued) = s.only();
    assert!(queued.contains("Subject: caf\u{fffd}"), "{queued}");
    assert_ok(&s.relay365(&["flush", "-v"]));
    let got = captured(&maildir);
    assert_eq!(got.len(), 1);
    let m = &got[0];
    assert!(
        contains(m, b"Subject: caf\xe9 \xff\xfe\xc3\r\n"),
        "header bytes kept"
    );
    assert!(contains(
        m,
        b"\r\n\r\nbody \x80\x81\xff\r\nline \xed\xa0\x80 (a surrogate)\r\n"
    ));
    assert!(contains(m, b"<app@contoso.com>\r\n"), "From rewritten");
    assert!(contains(m, b"Reply-To: <jose@web1.example>\r\n"));
    assert!(!has_bare_lf(m));

    // Invalid UTF-8 in an address header that -t reads is taken lossily by the list
    // parser; it must never reach the envelope as a control character or raw byte.
    let s = Spool::new("");
    let out = s.sendmail(&["-t", "-i"], b"To: \xff\xfe@example.org\n\nx\n");
    if out.status.success() {
        let (env, _) = s.only();
        eprintln!("invalid UTF-8 To: queued for {:?}", env.recipients);
        for r in &env.recipients {
            assert!(!r.as_str().chars().any(char::is_control), "{r:?}");
        }
    } else {
        assert_fails(&out, 67, "address");
    }
}

#[test]
fn nul_bytes_are_refused_naming_the_line() {
    let s = Spool::new("");
    let out = s.sendmail(
        &["-i", "a@example.org"],
        b"Subject: x\n\nline one\nline\0two\n",
    );
    assert_fails(&out, 65, "line 4 contains a NUL byte");
    let out = s.sendmail(&["-i", "a@example.org"], b"Sub\0ject: x\n\nbody\n");
    assert_fails(&out, 65, "line 1 contains a NUL byte");
    // Past the end of the message (after a lone dot) a NUL is never read.
    assert_ok(&s.sendmail(&["a@example.org"], b"Subject: x\n\nbody\n.\n\0\0\n"));
    assert_eq!(s.count_files("incoming/new"), 1, "only the last one queued");
}

#[test]
fn bare_cr_stays_data_inside_its_line() {
    let (s, maildir) = capture_spool("");
    // A CR alone does not end a line: no header is hidden behind it (the Bcc stays
    // part of the Subject's text) and no lone dot appears.
    let msg = b"To: alice@example.org\nSubject: one\rBcc: hidden@example.org\n\nbody\rline\n.\rnot the end\nend\r\n";
    assert_ok(&s.sendmail(&["-t"], msg));
    let (env, queued) = s.only();
    assert_eq!(
        env.recipients,
        ["alice@example.org"],
        "Bcc after a CR is no header"
    );
    assert!(
        queued.contains("Subject: one\rBcc: hidden@example.org\r\n"),
        "{queued:?}"
    );
    assert!(queued.contains("\r\nbody\rline\r\n.\rnot the end\r\nend\r\n"));
    assert!(!has_bare_lf(queued.as_bytes()));
    assert_ok(&s.relay365(&["flush", "-v"]));
    let got = captured(&maildir);
    assert_eq!(got.len(), 1);
    assert!(contains(
        &got[0],
        b"\r\nbody\rline\r\n.\rnot the end\r\nend\r\n"
    ));
}
