//! Delivery through Microsoft Graph end to end: `sendmail` → queue → `relay365 flush` or
//! the daemon → the emulator's `sendMail` (or draft and upload session) over HTTPS on
//! 127.0.0.1 with an app token for Graph, and every row of the Graph decision table
//! leading to its action.

use std::time::{Duration, SystemTime};

use crate::harness::*;
use emu::{GraphFault, Via};
use relay365::spool::queue::RcptStatus;

fn send(t: &Tenant, args: &[&str], input: &[u8]) {
    assert_ok(&t.spool.sendmail(args, input));
}

fn graph_tenant() -> Tenant {
    Tenant::graph(tenant_config(), "", "", "", "")
}

const ATTACHMENT: &[u8] = b"%PDF-1.4 the quarterly report\n";

fn mixed_message() -> Vec<u8> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(ATTACHMENT);
    format!(
        "To: Alice <alice@example.org>\nCc: bob@example.org\nBcc: hidden@example.org\nSubject: Gr\u{fc}\u{df}e aus K\u{f6}ln\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"XX\"\n\n--XX\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\nH\u{e9}llo w\u{f6}rld\n--XX\nContent-Type: application/pdf; name=\"report.pdf\"\nContent-Disposition: attachment; filename=\"report.pdf\"\nContent-Transfer-Encoding: base64\n\n{b64}\n--XX--\n"
    )
    .into_bytes()
}

#[test]
fn graph_delivers_to_to_cc_and_envelope_only_bcc_with_an_attachment_and_utf8_headers() {
    let t = graph_tenant();
    send(
        &t,
        &["-t", "-i", "-F", "Web Shop", "-f", "shop@web1.example.com"],
        &mixed_message(),
    );
    let out = t.flush();
    assert_ok(&out);
    let log = stderr(&out);
    assert_eq!(t.emu.message_count(), 1, "log: {log}");
    let m = &t.emu.messages()[0];
    assert_eq!(m.via, Via::GraphMime, "sent as MIME through sendMail");
    assert_eq!(m.mailbox.as_deref(), Some(MAILBOX));
    let mut rcpts = m.rcpts.clone();
    rcpts.sort();
    assert_eq!(
        rcpts,
        ["alice@example.org", "bob@example.org", "hidden@example.org"],
        "the envelope-only recipient went in the copy's Bcc"
    );
    let text = String::from_utf8_lossy(&m.data).into_owned();
    assert!(!text.contains("hidden"), "Bcc is never delivered: {text}");
    assert!(
        text.contains("From: \"Web Shop\" <app@contoso.com>\r\n"),
        "the From policy applies as for SMTP: {text}"
    );
    assert!(
        text.contains("Reply-To: <shop@web1.example.com>\r\n"),
        "{text}"
    );
    assert!(
        text.contains("Subject: Gr\u{fc}\u{df}e aus K\u{f6}ln\r\n"),
        "{text}"
    );
    assert!(text.contains("H\u{e9}llo w\u{f6}rld"), "{text}");
    assert!(text.contains("filename=\"report.pdf\""), "{text}");
    assert!(text.contains("Message-ID: <"), "{text}");
    assert!(log.contains("status=sent (202 Accepted"), "{log}");
    assert!(log.contains("relay=localhost"), "{log}");
    assert!(t.queued().is_empty(), "{:?}", t.queued());
    assert!(!log.contains(CLIENT_SECRET), "never log a secret");
    assert_eq!(t.emu.token().unwrap().issued(), 1);
}

#[test]
fn graph_sends_a_message_over_the_single_request_limit_through_a_draft_and_an_upload_session() {
    use base64::Engine;
    let t = graph_tenant();
    let big: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8).collect();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&big);
    let wrapped: Vec<&str> = b64
        .as_bytes()
        .chunks(76)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    let msg = format!(
        "To: alice@example.org\nBcc: hidden@example.org\nSubject: the big one\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"XX\"\n\n--XX\nContent-Type: text/plain\n\nsee attached\n--XX\nContent-Type: application/octet-stream; name=\"big.bin\"\nContent-Disposition: attachment; filename=\"big.bin\"\nContent-Transfer-Encoding: base64\n\n{}\n--XX--\n",
        wrapped.join("\n")
    );
    send(&t, &["-t", "-i"], msg.as_bytes());
    let out = t.flush();
    assert_ok(&out);
    let log = stderr(&out);
    assert_eq!(t.emu.message_count(), 1, "log: {log}");
    assert_eq!(t.emu.graph_send_requests(), 0, "not through sendMail");
    let m = &t.emu.messages()[0];
    assert_eq!(m.via, Via::GraphJson);
    let mut rcpts = m.rcpts.clone();
    rcpts.sort();
    assert_eq!(rcpts, ["alice@example.org", "hidden@example.org"]);
    let parsed = mailparse::parse_mail(&m.data).unwrap();
    let att = parsed
        .subparts
        .iter()
        .find(|p| p.ctype.params.get("name").map(String::as_str) == Some("big.bin"))
        .expect("the attachment arrived");
    assert_eq!(att.get_body_raw().unwrap(), big);
    assert!(
        String::from_utf8_lossy(&m.data).contains("Subject: the big one"),
        "subject kept"
    );
    assert!(log.contains("status=sent (202 Accepted"), "{log}");
    assert!(t.queued().is_empty());
}

/// What a Graph answer should lead to.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    Frozen,
    Held,
    Deferred,
    Bounced,
}

fn graph_row(fault: GraphFault, expect: Expect, log_needle: &str) -> Tenant {
    let t = graph_tenant();
    send(
        &t,
        &[
            "-i",
            "-f",
            "shop@contoso.com",
            "a@example.org",
            "b@example.org",
        ],
        b"Subject: row\n\nbody\n",
    );
    let what = format!("{} {}", fault.status, fault.code);
    t.emu.inject_graph(fault);
    let out = t.flush();
    assert_flush_status(&out, &t);
    let log = stderr(&out);
    assert!(log.contains(log_needle), "{what}: {log_needle:?} in {log}");
    let queued = t.queued();
    let dsn_sent = t
        .emu
        .messages()
        .iter()
        .any(|m| String::from_utf8_lossy(&m.data).contains("multipart/report"));
    let quota = stdout(&t.spool.relay365(&["quota"]));
    match expect {
        Expect::Frozen | Expect::Held | Expect::Deferred => {
            assert_eq!(queued.len(), 1, "{what}: must stay queued; log: {log}");
            assert!(
                queued[0]
                    .recipients
                    .iter()
                    .all(|r| r.status == RcptStatus::Pending),
                "{what}: {queued:?}"
            );
            assert!(!dsn_sent, "{what}: must never bounce");
            match expect {
                Expect::Frozen => assert!(quota.contains("frozen until"), "{what}: {quota}"),
                Expect::Held => {
                    assert!(quota.contains("held"), "{what}: {quota}");
                    assert!(log.contains("held until"), "{what}: {log}");
                }
                _ => assert!(
                    !quota.contains("frozen") && !quota.contains("held"),
                    "{what}: {quota}"
                ),
            }
        }
        Expect::Bounced => {
            assert!(queued.is_empty(), "{what}: {queued:?}; log {log}");
            let dsn = t
                .emu
                .messages()
                .into_iter()
                .find(|m| String::from_utf8_lossy(&m.data).contains("multipart/report"))
                .unwrap_or_else(|| panic!("{what}: a DSN must go to the sender; log: {log}"));
            assert_eq!(dsn.rcpts, ["shop@contoso.com"]);
        }
    }
    t
}

#[test]
fn graph_table_429_and_503_wait_exactly_retry_after_for_the_account() {
    for (status, code, secs) in [
        (429, "ApplicationThrottled", 7),
        (503, "ServiceUnavailable", 5),
    ] {
        let before = SystemTime::now();
        let t = graph_row(
            GraphFault::new(
                status,
                code,
                "Application is over its MailboxConcurrency limit.",
            )
            .retry_after(secs),
            Expect::Frozen,
            &format!("asked to wait {secs} s"),
        );
        let next = t.queued()[0].next_attempt();
        let wait = next.duration_since(before).unwrap_or_default();
        assert!(
            wait >= Duration::from_secs(secs) && wait <= Duration::from_secs(secs + 3),
            "{status}: next attempt {wait:?} after, not the Retry-After of {secs} s"
        );
    }
}

#[test]
fn graph_table_account_problems_hold_never_bounce() {
    graph_row(
        GraphFault::new(
            403,
            "ErrorAccessDenied",
            "Access is denied. Check credentials and try again.",
        ),
        Expect::Held,
        "New-ApplicationAccessPolicy",
    );
    graph_row(
        GraphFault::new(
            404,
            "ErrorInvalidUser",
            "The requested user 'app@contoso.com' is invalid.",
        ),
        Expect::Held,
        "does not know this mailbox",
    );
    graph_row(
        GraphFault::new(
            403,
            "ErrorMessageSubmissionBlocked",
            "Cannot send mail, 5.1.8 Access denied, bad outbound sender.",
        ),
        Expect::Held,
        "Restricted entities",
    );
    let t = graph_row(
        GraphFault::new(
            401,
            "InvalidAuthenticationToken",
            "Access token validation failure.",
        )
        .times(2),
        Expect::Held,
        "freshly fetched token",
    );
    assert_eq!(
        t.emu.token().unwrap().issued(),
        2,
        "refreshed once, then held"
    );
}

#[test]
fn graph_table_quota_freezes_temporary_defers_and_permanent_bounces() {
    graph_row(
        GraphFault::new(
            403,
            "ErrorSubmissionQuotaExceeded",
            "Cannot submit message. 554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException",
        ),
        Expect::Frozen,
        "daily recipient quota",
    );
    graph_row(
        GraphFault::new(
            500,
            "InternalServerError",
            "An internal server error occurred.",
        ),
        Expect::Deferred,
        "status=deferred",
    );
    graph_row(
        GraphFault::new(
            400,
            "ErrorMessageSizeExceeded",
            "The message exceeds the maximum supported size.",
        ),
        Expect::Bounced,
        "status=bounced",
    );
    graph_row(
        GraphFault::new(
            403,
            "ErrorSendAsDenied",
            "The user account which was used to submit this request does not have the right to send mail on behalf of the specified sending account.",
        ),
        Expect::Bounced,
        "SendAs",
    );
}

#[test]
fn graph_invalid_recipient_bounces_that_recipient_and_delivers_the_others() {
    let t = graph_tenant();
    send(
        &t,
        &[
            "-i",
            "-f",
            "shop@contoso.com",
            "a@example.org",
            "b@example.org",
        ],
        b"To: a@example.org, b@example.org\nSubject: two\n\nbody\n",
    );
    t.emu.inject_graph(GraphFault::new(
        400,
        "ErrorInvalidRecipients",
        "At least one recipient isn't valid., Recipient 'b@example.org' isn't resolved. All recipients must be resolved before a message can be submitted.",
    ));
    let out = t.flush();
    assert_flush_status(&out, &t);
    let log = stderr(&out);
    assert!(
        log.contains("to=<b@example.org>, relay=localhost, ") && log.contains("status=bounced"),
        "{log}"
    );
    assert!(log.contains("to=<a@example.org>"), "{log}");
    let msgs = t.emu.messages();
    let sent = msgs
        .iter()
        .find(|m| !String::from_utf8_lossy(&m.data).contains("multipart/report"))
        .expect("the others went");
    assert_eq!(
        sent.rcpts,
        ["a@example.org"],
        "b was taken out of the copy's To"
    );
    let dsn = msgs
        .iter()
        .find(|m| String::from_utf8_lossy(&m.data).contains("multipart/report"))
        .expect("a DSN for b");
    assert_eq!(dsn.rcpts, ["shop@contoso.com"]);
    assert!(String::from_utf8_lossy(&dsn.data).contains("b@example.org"));
    assert!(t.queued().is_empty());
}

#[test]
fn graph_token_expiry_refreshes_once_and_delivers() {
    let t = graph_tenant();
    send(&t, &["-i", "a@example.org"], b"Subject: one\n\nx\n");
    assert_ok(&t.flush());
    assert_eq!(t.emu.message_count(), 1);
    let tokens = t.emu.token().unwrap();
    // A new process fetches a token again; within the daemon the cache would be reused.
    assert_eq!(tokens.issued(), 1);
    let d = Daemon::start(&t.spool);
    send(&t, &["-i", "b@example.org"], b"Subject: two\n\nx\n");
    assert!(
        t.emu.wait_for_messages(2, Duration::from_secs(15)),
        "{}",
        d.log_text()
    );
    let issued = tokens.issued();
    tokens.expire_all();
    send(&t, &["-i", "c@example.org"], b"Subject: three\n\nx\n");
    assert!(
        t.emu.wait_for_messages(3, Duration::from_secs(15)),
        "{}",
        d.log_text()
    );
    assert_eq!(tokens.issued(), issued + 1, "one refresh after the 401");
    let log = d.log_text();
    assert!(!log.contains("held"), "{log}");
    assert!(!log.contains(CLIENT_SECRET));
    assert!(d.stop().success());
}

#[test]
fn graph_without_mail_send_or_outside_the_access_policy_holds_with_the_fix() {
    let cfg = emu::Config::default()
        .mailbox(emu::Mailbox::new(MAILBOX))
        .app(
            emu::App::with_secret(TENANT, CLIENT_ID, CLIENT_SECRET, MAILBOX).with_graph_roles(&[]),
        );
    let t = Tenant::graph(cfg, "", "", "", "");
    send(&t, &["-i", "a@example.org"], b"Subject: x\n\nx\n");
    let log = stderr(&t.flush());
    assert!(
        log.contains("held until") && log.contains("Mail.Send"),
        "{log}"
    );
    assert_eq!(t.emu.message_count(), 0);
    let cfg = emu::Config::default()
        .mailbox(emu::Mailbox::new(MAILBOX))
        .app(emu::App::with_secret(
            TENANT,
            CLIENT_ID,
            CLIENT_SECRET,
            "other@contoso.com",
        ));
    let t = Tenant::graph(cfg, "", "", "", "");
    send(&t, &["-i", "a@example.org"], b"Subject: x\n\nx\n");
    let log = stderr(&t.flush());
    assert!(
        log.contains("held until") && log.contains("AccessPolicy"),
        "{log}"
    );
    assert_eq!(t.emu.message_count(), 0);
}

#[test]
fn graph_keeps_within_four_concurrent_requests_per_mailbox() {
    let mut cfg = tenant_config();
    cfg.graph_delay = Duration::from_millis(150);
    cfg.message_rate = None;
    let t = Tenant::graph(
        cfg,
        "",
        "connections = 4\nmessage_rate = \"1000/1m\"\n",
        "",
        "",
    );
    let d = Daemon::start(&t.spool);
    for i in 0..12 {
        send(
            &t,
            &["-i", &format!("r{i}@example.org")],
            b"Subject: c\n\nx\n",
        );
    }
    assert!(
        t.emu.wait_for_messages(12, Duration::from_secs(30)),
        "{}",
        d.log_text()
    );
    let most = t.emu.graph_max_concurrent_for(MAILBOX);
    assert!((1..=4).contains(&most), "{most} requests at once");
    assert!(!d.log_text().contains("asked to wait"), "{}", d.log_text());
    assert!(d.stop().success());
}

#[test]
fn graph_limits_beyond_graphs_own_are_refused_with_the_reason() {
    let s = Spool::new("");
    let text = format!(
        "spool_dir = \"{}\"\ndomain = \"example.com\"\n[[account]]\nname = \"app\"\nmailbox = \"{MAILBOX}\"\ntransport = \"graph\"\nconnections = 5\n[account.oauth]\ntenant = \"{TENANT}\"\nclient_id = \"{CLIENT_ID}\"\n",
        s.root().display()
    );
    std::fs::write(&s.config, text).unwrap();
    let out = s.relay365(&["check"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("4 concurrent requests")
            || stdout(&out).contains("4 concurrent requests"),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
}

#[test]
fn check_names_the_graph_roles_and_what_the_mailbox_refuses() {
    let t = graph_tenant();
    let out = t.spool.relay365(&["check"]);
    assert_ok(&out);
    let text = stdout(&out);
    assert!(
        text.contains("application permissions: Mail.Send, Mail.ReadWrite"),
        "{text}"
    );
    assert!(text.contains("read the inbox of app@contoso.com"), "{text}");
    // Only Mail.ReadWrite (no Mail.Send), and an access policy without this mailbox.
    let cfg = emu::Config::default()
        .mailbox(emu::Mailbox::new(MAILBOX))
        .app(
            emu::App::with_secret(TENANT, CLIENT_ID, CLIENT_SECRET, "other@contoso.com")
                .with_graph_roles(&["Mail.ReadWrite"]),
        );
    let t = Tenant::graph(cfg, "", "", "", "");
    let out = t.spool.relay365(&["check"]);
    assert_eq!(out.status.code(), Some(78));
    let text = stdout(&out);
    assert!(
        text.contains("lacks the Mail.Send application permission"),
        "{text}"
    );
    assert!(text.contains("New-ApplicationAccessPolicy"), "{text}");
    assert!(!text.contains(CLIENT_SECRET));
    assert_eq!(t.emu.message_count(), 0);
}

#[test]
fn graph_split_batches_name_only_their_own_recipients() {
    let t = Tenant::graph(tenant_config(), "", "max_recipients = 1", "", "");
    send(
        &t,
        &["-t", "-i"],
        b"To: a@example.org, b@example.org\nBcc: c@example.org\nSubject: split\n\nx\n",
    );
    let out = t.flush();
    assert_ok(&out);
    let msgs = t.emu.messages();
    assert_eq!(msgs.len(), 3, "{}", stderr(&out));
    let mut got: Vec<Vec<String>> = msgs.iter().map(|m| m.rcpts.clone()).collect();
    got.sort();
    assert_eq!(
        got,
        [["a@example.org"], ["b@example.org"], ["c@example.org"]],
        "nobody gets it twice"
    );
    assert!(t.queued().is_empty());
}
