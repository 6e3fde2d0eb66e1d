//! `sendmail` intake end to end: every caller of sendmail-interface.md with its real
//! argv and stdin shape, the option and recipient rules, header completion, every
//! refusal (exit code, message, nothing queued), concurrency and SIGKILL safety.

use crate::harness::*;

fn header<'a>(msg: &'a str, name: &str) -> Vec<&'a str> {
    let head = msg.split("\r\n\r\n").next().unwrap_or("");
    head.split("\r\n")
        .filter(|l| {
            l.len() > name.len()
                && l[..name.len()].eq_ignore_ascii_case(name)
                && l.as_bytes()[name.len()] == b':'
        })
        .collect()
}

fn assert_completed(msg: &str) {
    assert_eq!(header(msg, "Date").len(), 1, "{msg}");
    assert_eq!(header(msg, "Message-ID").len(), 1, "{msg}");
    assert_eq!(header(msg, "From").len(), 1, "{msg}");
    assert!(
        !msg.replace("\r\n", "").contains('\n'),
        "bare LF left in {msg:?}"
    );
    assert!(msg.ends_with("\r\n"));
}

#[test]
fn php_mail_with_crlf_headers_lf_body_and_a_repeated_f() {
    let s = Spool::new("");
    let input = "To: user@example.org\r\nSubject: Grüße from PHP\r\nX-Mailer: PHP/8.2\r\n\r\nline one\nline two\n";
    let out = s.sendmail(
        &[
            "-t",
            "-i",
            "-f",
            "first@example.com",
            "-f",
            "app@example.com",
        ],
        input.as_bytes(),
    );
    assert_ok(&out);
    let (env, msg) = s.only();
    assert_eq!(env.sender, "app@example.com");
    assert_eq!(env.recipients, ["user@example.org"]);
    assert!(
        msg.contains("Subject: Grüße from PHP\r\n"),
        "raw UTF-8 kept: {msg}"
    );
    assert!(msg.ends_with("\r\n\r\nline one\r\nline two\r\n"), "{msg}");
    assert_completed(&msg);
    assert!(
        header(&msg, "From")[0].contains("<app@example.com>"),
        "{msg}"
    );
}

#[test]
fn debian_cron() {
    let s = Spool::new("");
    let input = "From: root (Cron Daemon)\nTo: user\nSubject: Cron <user@host> run-parts /etc/cron.daily\nMIME-Version: 1.0\nContent-Type: text/plain; charset=UTF-8\nContent-Transfer-Encoding: 8bit\nX-Cron-Env: <PATH=/usr/bin:/bin>\n\nerror: disk 91% full\n";
    let out = s.sendmail(
        &["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "user"],
        input.as_bytes(),
    );
    assert_ok(&out);
    let (env, msg) = s.only();
    assert_eq!(env.recipients, ["user@example.com"]);
    assert_eq!(
        env.dsn.body,
        Some(relay365::spool::envelope::BodyType::EightBitMime)
    );
    assert_eq!(
        header(&msg, "From"),
        ["From: root@example.com (Cron Daemon)"],
        "existing From kept, its bare name qualified as Postfix does"
    );
    assert_eq!(header(&msg, "To"), ["To: user@example.com"]);
    assert_completed(&msg);
}

#[test]
fn cronie_anacron_atd_and_systemd_cron() {
    let s = Spool::new("");
    let body = b"Subject: job output\n\nok\n";
    assert_ok(&s.sendmail(
        &[
            "-FCronDaemon",
            "-i",
            "-odi",
            "-oem",
            "-oi",
            "-t",
            "-f",
            "root",
        ],
        b"To: root\nSubject: cronie\n\nx\n",
    ));
    assert_ok(&s.sendmail(&["-FAnacron", "-odi", "root"], body));
    assert_ok(&s.sendmail(&["-i", "alice"], body));
    assert_ok(&s.sendmail(&["-i", "-B", "8BITMIME", "bob"], body));
    let all = s.incoming();
    assert_eq!(all.len(), 4);
    assert_eq!(all[0].0.sender, "root@example.com");
    assert_eq!(all[0].0.recipients, ["root@example.com"]);
    let anacron = String::from_utf8_lossy(&all[1].1).into_owned();
    assert!(
        header(&anacron, "From")[0].contains("\"Anacron\""),
        "{anacron}"
    );
    assert_eq!(all[2].0.recipients, ["alice@example.com"]);
    assert_eq!(all[3].0.recipients, ["bob@example.com"]);
}

#[test]
fn bsd_mailx_with_bcc() {
    let s = Spool::new("");
    let input =
        "To: a@example.org\nCc: b@example.org\nBcc: secret@example.org\nSubject: report\n\nbody\n";
    assert_ok(&s.sendmail(&["-i", "-t"], input.as_bytes()));
    let (env, msg) = s.only();
    assert_eq!(
        env.recipients,
        ["a@example.org", "b@example.org", "secret@example.org"]
    );
    assert!(
        !msg.contains("secret"),
        "Bcc must not reach the headers: {msg}"
    );
    assert!(header(&msg, "Bcc").is_empty());
}

#[test]
fn mailutils_keeps_its_date() {
    let s = Spool::new("");
    let input = "Date: Thu, 26 Nov 2026 10:00:00 +0100\nTo: a@example.org\nSubject: hi\n\nx\n";
    assert_ok(&s.sendmail(
        &["-oi", "-f", "root@host.example.com", "-t"],
        input.as_bytes(),
    ));
    let (env, msg) = s.only();
    assert_eq!(env.sender, "root@host.example.com");
    assert_eq!(
        header(&msg, "Date"),
        ["Date: Thu, 26 Nov 2026 10:00:00 +0100"]
    );
    assert_completed(&msg);
}

#[test]
fn git_send_email_keeps_complete_headers_byte_for_byte() {
    let s = Spool::new("");
    let input = "From: Dev <dev@example.org>\nTo: list@example.org\nSubject: [PATCH] fix\nDate: Thu, 26 Nov 2026 10:00:00 +0000\nMessage-ID: <1@example.org>\nMIME-Version: 1.0\n\n---\n .\n..\n";
    assert_ok(&s.sendmail(
        &["-i", "-f", "dev@example.org", "list@example.org"],
        input.as_bytes(),
    ));
    let (env, msg) = s.only();
    // Only the Received header naming the caller is added in front (issue 18 item 6).
    let received = format!(
        "Received: by example.com (relay365, from userid {})\r\n\tid {}; ",
        nix::unistd::getuid(),
        env.id
    );
    assert!(msg.starts_with(&received), "{msg}");
    let (_, rest) = msg
        .split_once(" +0000\r\n")
        .expect("the date ends the header");
    assert_eq!(rest, input.replace('\n', "\r\n"));
}

// Issue 18 item 6: `-f root -F CronDaemon` from any uid is still allowed (programs rely
// on it), but the queued file's Received header names the uid that really queued it.
#[test]
fn a_message_claiming_to_be_from_root_still_names_the_real_uid_in_received() {
    let s = Spool::new("");
    assert_ok(&s.sendmail(
        &["-i", "-f", "root", "-F", "CronDaemon", "x@example.org"],
        b"Subject: forged\n\nx\n",
    ));
    let (env, msg) = s.only();
    assert_eq!(env.uid, nix::unistd::getuid().as_raw());
    let received = header(&msg, "Received");
    assert_eq!(received.len(), 1, "{msg}");
    assert_eq!(
        received[0],
        format!(
            "Received: by example.com (relay365, from userid {})",
            nix::unistd::getuid()
        )
    );
    assert!(msg.contains(&format!("\r\n\tid {}; ", env.id)), "{msg}");
    assert_eq!(
        header(&msg, "From"),
        ["From: \"CronDaemon\" <root@example.com>"]
    );
}

#[test]
fn mdadm_glued_sender() {
    let s = Spool::new("");
    assert_ok(&s.sendmail(
        &["-t", "-fraid@host.example.com"],
        b"To: root\nSubject: Fail event\n\nx\n",
    ));
    let (env, _) = s.only();
    assert_eq!(env.sender, "raid@host.example.com");
    assert_eq!(env.recipients, ["root@example.com"]);
}

#[test]
fn s_nail_and_nodemailer_use_double_dash() {
    let s = Spool::new("");
    assert_ok(&s.sendmail(
        &["-i", "--", "a@example.org", "b@example.org"],
        b"Subject: s\n\nx\n",
    ));
    assert_ok(&s.sendmail(
        &["-i", "-f", "app@example.com", "--", "c@example.org"],
        b"Subject: n\n\nx\n",
    ));
    let all = s.incoming();
    assert_eq!(all[0].0.recipients, ["a@example.org", "b@example.org"]);
    assert_eq!(all[1].0.sender, "app@example.com");
}

#[test]
fn phpmailer() {
    let s = Spool::new("");
    assert_ok(&s.sendmail(
        &["-oi", "-t", "-f", "web@example.com"],
        b"To: x@example.org\r\nSubject: p\r\n\r\nbody",
    ));
    let (env, msg) = s.only();
    assert_eq!(env.sender, "web@example.com");
    assert!(
        msg.ends_with("\r\n\r\nbody\r\n"),
        "final newline added: {msg:?}"
    );
}

#[test]
fn null_sender_forms() {
    let s = Spool::new("");
    assert_ok(&s.sendmail(&["-f", "", "a@example.org"], b"Subject: s\n\nx\n"));
    assert_ok(&s.sendmail(&["-f<>", "a@example.org"], b"Subject: s\n\nx\n"));
    for (env, _) in s.incoming() {
        assert_eq!(env.sender, "");
    }
}

#[test]
fn recipient_matrix_end_to_end() {
    let with = b"To: h@example.org\n\nb\n".as_slice();
    let without = b"Subject: s\n\nb\n".as_slice();
    type Case<'a> = (&'a [&'a str], &'a [u8], Option<&'a [&'a str]>);
    let cases: [Case; 8] = [
        (
            &["-t", "a@example.org"],
            with,
            Some(&["h@example.org", "a@example.org"]),
        ),
        (&["-t"], with, Some(&["h@example.org"])),
        (&["-t", "a@example.org"], without, Some(&["a@example.org"])),
        (&["-t"], without, None),
        (&["a@example.org"], with, Some(&["a@example.org"])),
        (&["a@example.org"], without, Some(&["a@example.org"])),
        (&[], with, None),
        (&[], without, None),
    ];
    for (args, input, want) in cases {
        let s = Spool::new("");
        let out = s.sendmail(args, input);
        match want {
            Some(r) => {
                assert_ok(&out);
                assert_eq!(s.only().0.recipients, r, "{args:?}");
            }
            None => {
                assert_fails(&out, 64, "no recipients found");
                assert_eq!(s.count_files("incoming/new"), 0);
            }
        }
    }
}

#[test]
fn dot_rule_with_and_without_i() {
    let s = Spool::new("");
    assert_ok(&s.sendmail(&["a@example.org"], b"Subject: s\n\nbefore\n.\nafter\n"));
    assert_ok(&s.sendmail(
        &["-i", "a@example.org"],
        b"Subject: s\n\nbefore\n.\nafter\n",
    ));
    assert_ok(&s.sendmail(
        &["-oi", "a@example.org"],
        b"Subject: s\n\nbefore\r\n.\r\nafter\n",
    ));
    let all = s.incoming();
    let bodies: Vec<String> = all
        .iter()
        .map(|(_, m)| {
            String::from_utf8_lossy(m)
                .split("\r\n\r\n")
                .nth(1)
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(bodies[0], "before\r\n");
    assert_eq!(bodies[1], "before\r\n.\r\nafter\r\n");
    assert_eq!(bodies[2], "before\r\n.\r\nafter\r\n");
}

#[test]
fn unknown_options_warn_and_mail_still_goes() {
    let s = Spool::new("");
    let out = s.sendmail(
        &[
            "-Z",
            "-oQ/var/spool",
            "-X",
            "/nonexistent/log",
            "a@example.org",
        ],
        b"Subject: s\n\nx\n",
    );
    assert_ok(&out);
    assert!(
        stderr(&out).contains("-Z: unknown option ignored"),
        "{}",
        stderr(&out)
    );
    assert!(!std::path::Path::new("/nonexistent/log").exists());
    assert_eq!(s.only().0.recipients, ["a@example.org"]);
}

#[test]
fn dsn_options_are_recorded() {
    let s = Spool::new("");
    assert_ok(&s.sendmail(
        &[
            "-N",
            "failure,delay",
            "-R",
            "hdrs",
            "-V",
            "ENV42",
            "-odq",
            "a@example.org",
        ],
        b"Subject: s\n\nx\n",
    ));
    let (env, _) = s.only();
    assert_eq!(
        env.dsn.notify.map(|n| n.to_string()).as_deref(),
        Some("failure,delay")
    );
    assert_eq!(env.dsn.ret, Some(relay365::spool::envelope::Ret::Hdrs));
    assert_eq!(env.dsn.envid.as_ref().map(|e| e.as_str()), Some("ENV42"));
    assert!(env.queue_only);
}

#[test]
fn header_completion_added_kept_never_duplicated() {
    let s = Spool::new("");
    assert_ok(&s.sendmail(
        &["-F", "Build Bot", "-f", "bot@example.com", "a@example.org"],
        b"Subject: s\nReturn-Path: <forged@evil>\n\nx\n",
    ));
    let (_, msg) = s.only();
    assert_eq!(
        header(&msg, "From"),
        ["From: \"Build Bot\" <bot@example.com>"]
    );
    assert!(header(&msg, "Message-ID")[0].ends_with("@example.com>"));
    assert!(header(&msg, "Return-Path").is_empty());
    assert_completed(&msg);
}

#[test]
fn malformed_input_is_refused_and_nothing_is_queued() {
    let cases: [(&[u8], i32, &str); 5] = [
        (b" folded first\nSubject: x\n\nb\n", 65, "continuation line"),
        (b"Subject: x\nBad Header: y\n\nb\n", 65, "line 2"),
        (b"Subject: x\nnot a header line\n\nb\n", 65, "no colon"),
        (b"Subject: x\n\nnul\0here\n", 65, "NUL byte"),
        (b"Subject: x\n\nb\n", 67, "line break"),
    ];
    for (i, (input, code, needle)) in cases.into_iter().enumerate() {
        let s = Spool::new("");
        let rcpt = if i == 4 {
            "a@example.org\r\nRCPT TO:<evil@x>"
        } else {
            "a@example.org"
        };
        let out = s.sendmail(&["-i", rcpt], input);
        assert_fails(&out, code, needle);
        assert_eq!(s.count_files("incoming/new"), 0);
        assert_eq!(
            s.count_files("incoming/tmp"),
            0,
            "no half-written file left behind"
        );
    }
}

#[test]
fn oversize_message_names_the_limit() {
    let s = Spool::new("max_message_size = \"10K\"");
    let big = format!("Subject: big\n\n{}\n", "x".repeat(20_000));
    let out = s.sendmail(&["-i", "a@example.org"], big.as_bytes());
    assert_fails(&out, 65, "10000 bytes");
    assert!(stderr(&out).contains("max_message_size"));
    assert_eq!(
        s.count_files("incoming/new") + s.count_files("incoming/tmp"),
        0
    );
}

#[test]
fn bad_options_are_usage_errors() {
    let s = Spool::new("");
    assert_fails(&s.sendmail(&["-N", "sometimes", "a@x.org"], b""), 64, "-N");
    assert_fails(&s.sendmail(&["-bd"], b""), 64, "-bd is not supported");
    assert_fails(&s.sendmail(&["-t", "-f"], b""), 64, "needs a value");
}

#[test]
fn bad_config_is_ex_config() {
    let s = Spool::new("");
    std::fs::write(&s.config, "domain = \"example.com\"\nspool_dri = \"/x\"\n").unwrap();
    let out = s.sendmail(&["a@example.org"], b"Subject: s\n\nx\n");
    assert_fails(&out, 78, "spool_dri");
    assert!(stderr(&out).contains("line 2"), "{}", stderr(&out));
}

#[test]
fn missing_spool_is_cantcreat_and_names_the_fix() {
    let s = Spool::new("");
    std::fs::remove_dir_all(s.root().join("incoming")).unwrap();
    let out = s.sendmail(&["a@example.org"], b"Subject: s\n\nx\n");
    assert_fails(&out, 73, "relay365 init");
}

#[test]
fn full_disk_is_tempfail_and_leaves_nothing() {
    if !is_root() {
        eprintln!("skipped: mounting a tiny tmpfs needs root (CI runs as root)");
        return;
    }
    let s = Spool::new("");
    let root = s.root();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(&root)
        .status()
        .expect("mount");
    assert!(status.success());
    let out = s.relay365(&["init", "--private"]);
    assert_ok(&out);
    let big = format!("Subject: big\n\n{}\n", "y".repeat(200_000));
    let out = s.sendmail(&["-i", "a@example.org"], big.as_bytes());
    let new = s.count_files("incoming/new");
    let tmp = s.count_files("incoming/tmp");
    let _ = std::process::Command::new("umount").arg(&root).status();
    assert_fails(&out, 75, "full");
    assert_eq!((new, tmp), (0, 0));
}

#[test]
fn two_hundred_parallel_senders_make_two_hundred_entries() {
    let s = Spool::new("");
    let handles: Vec<_> = (0..200)
        .map(|i| {
            let config = s.config.clone();
            std::thread::spawn(move || {
                let mut cmd = std::process::Command::new(SENDMAIL);
                cmd.arg("-C")
                    .arg(&config)
                    .args(["-i", &format!("r{i}@example.org")]);
                run(
                    cmd,
                    format!("Subject: n{i}\n\n{}\n", "z".repeat(3000)).as_bytes(),
                )
            })
        })
        .collect();
    for h in handles {
        assert_ok(&h.join().unwrap());
    }
    let all = s.incoming();
    assert_eq!(all.len(), 200);
    let mut ids: Vec<_> = all.iter().map(|(e, _)| e.id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 200);
    let mut rcpts: Vec<_> = all.iter().map(|(e, _)| e.recipients[0].clone()).collect();
    rcpts.sort();
    rcpts.dedup();
    assert_eq!(rcpts.len(), 200);
}

#[test]
fn sigkill_at_any_point_never_leaves_a_partial_entry() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let s = Spool::new("");
    let chunk = vec![b'k'; 64 * 1024];
    let mut rng = 0x2545F4914F6CDD1Du64;
    for round in 0..40u64 {
        let mut child = Command::new(SENDMAIL)
            .arg("-C")
            .arg(&s.config)
            .args(["-i", "a@example.org"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let _ = stdin.write_all(b"Subject: crash\n\n");
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let chunks = rng % 48;
        for _ in 0..chunks {
            if stdin.write_all(&chunk).is_err() {
                break;
            }
        }
        if round % 2 == 0 {
            drop(stdin); // let it reach the spool write
            std::thread::sleep(std::time::Duration::from_micros(rng % 3000));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    // Every entry that made it to new/ is complete; harness::incoming asserts that.
    let complete = s.incoming().len();
    eprintln!("{complete} of 40 killed senders had finished their entry");
    for (e, m) in s.incoming() {
        assert_eq!(e.size as usize, m.len());
    }
}

#[test]
fn mailq_lists_queued_mail_postfix_style() {
    let s = Spool::new("");
    let out = s.sendmail_as("mailq", &[], b"");
    assert_ok(&out);
    assert_eq!(stdout(&out), "Mail queue is empty\n");
    assert_ok(&s.sendmail(
        &[
            "-f",
            "alice@example.com",
            "bob@example.org",
            "carol@example.org",
        ],
        b"Subject: s\n\nsecret body text\n",
    ));
    for out in [
        s.sendmail_as("mailq", &[], b""),
        s.sendmail(&["-bp"], b""),
        s.relay365(&["queue", "list"]),
    ] {
        assert_ok(&out);
        let text = stdout(&out);
        let (env, _) = s.only();
        assert!(text.contains(env.id.as_str()), "{text}");
        assert!(
            text.contains("alice@example.com")
                && text.contains("bob@example.org")
                && text.contains("carol@example.org"),
            "{text}"
        );
        assert!(
            !text.contains("secret body"),
            "mailq must never show bodies"
        );
        assert!(text.contains("in 1 Request."), "{text}");
    }
}

#[test]
fn newaliases_is_a_no_op() {
    let s = Spool::new("");
    assert_ok(&s.sendmail_as("newaliases", &[], b""));
    assert_ok(&s.sendmail(&["-bi"], b""));
    assert_ok(&s.sendmail(&["-I"], b""));
    assert_eq!(s.count_files("incoming/new"), 0);
}

#[test]
fn verify_shows_resolution_and_sends_nothing() {
    let s = Spool::new("");
    let aliases = s.dir.path().join("aliases");
    std::fs::write(&aliases, "root: ops@example.org\n").unwrap();
    let text = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(
        &s.config,
        format!("aliases = \"{}\"\n{text}", aliases.display()),
    )
    .unwrap();
    let out = s.sendmail(
        &[
            "-bv",
            "root",
            "nobody-here",
            "x@example.org",
            "ghost@localhost",
        ],
        b"",
    );
    assert_eq!(
        out.status.code(),
        Some(67),
        "one recipient has no route: {}",
        stdout(&out)
    );
    let text = stdout(&out);
    assert!(
        text.contains("root -> <ops@example.org> (local recipient"),
        "{text}"
    );
    assert!(
        text.contains(
            "nobody-here -> <nobody-here@example.com> (qualified with the configured domain)"
        ),
        "{text}"
    );
    assert!(
        text.contains("x@example.org -> <x@example.org> (as given)"),
        "{text}"
    );
    assert!(
        text.contains(
            "ghost@localhost -> <ghost@localhost> (undeliverable: 550 5.1.1 no alias for ghost"
        ),
        "{text}"
    );
    assert_eq!(s.count_files("incoming/new"), 0);
}

#[test]
fn queue_run_without_a_daemon_says_so() {
    let s = Spool::new("");
    let out = s.sendmail(&["-q"], b"");
    assert_fails(&out, 69, "daemon is not running");
}

#[test]
fn spool_modes_follow_the_path_table() {
    let s = Spool::new("");
    let spool = relay365::spool::paths::Spool::new(s.root());
    assert_eq!(relay365::spool::init::verify(&spool), Vec::<String>::new());
}

#[test]
fn two_hundred_fifty_thousand_recipients_are_refused_at_intake_not_lost_at_pickup() {
    // Regression: `sendmail -t` took 250,000 recipients and exited 0; the envelope
    // line was over the pickup's 4 MiB bound, so the pickup quarantined the message
    // with no bounce. Refused here, with what to do, and nothing is queued.
    let s = Spool::new("");
    let mut msg = String::from("Subject: everyone\r\nTo: r0@example.org");
    for i in 1..250_000 {
        msg.push_str(&format!(",\r\n r{i}@example.org"));
    }
    msg.push_str("\r\n\r\nhello\r\n");
    let out = s.sendmail(&["-t", "-i"], msg.as_bytes());
    assert_fails(&out, 65, "too many recipients (250000)");
    let err = stderr(&out);
    assert!(
        err.contains("4 MiB") && err.contains("split the message"),
        "{err}"
    );
    assert_eq!(s.count_files("incoming/new"), 0, "nothing queued");
    assert_eq!(s.count_files("incoming/tmp"), 0, "nothing half-written");
}
