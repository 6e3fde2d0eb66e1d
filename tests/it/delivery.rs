//! Delivery end to end: `sendmail` → queue → `relay365 flush` or the daemon → the
//! Exchange Online emulator over STARTTLS on 127.0.0.1, with AUTH LOGIN and XOAUTH2,
//! and every row of exchange-online.md's reply table leading to its action.

use std::time::Duration;

use crate::harness::*;
use emu::{Action as FaultAction, Fault, Stage};
use relay365::spool::queue::RcptStatus;

const MSG: &[u8] = b"To: alice@example.org\nCc: bob@example.org\nBcc: hidden@example.org\nSubject: status report\n\nAll systems nominal.\n";

fn send(t: &Tenant, args: &[&str], input: &[u8]) {
    assert_ok(&t.spool.sendmail(args, input));
}

#[test]
fn login_delivery_end_to_end_through_flush() {
    let t = Tenant::new(Auth::Login);
    send(
        &t,
        &["-t", "-i", "-F", "Web Shop", "-f", "shop@web1.example.com"],
        MSG,
    );
    let out = t.flush();
    assert_ok(&out);
    assert_eq!(t.emu.message_count(), 1, "flush stderr: {}", stderr(&out));
    let m = &t.emu.messages()[0];
    assert_eq!(m.mailbox.as_deref(), Some(MAILBOX));
    assert_eq!(
        m.mail_from, MAILBOX,
        "the envelope sender is always the mailbox"
    );
    let mut rcpts = m.rcpts.clone();
    rcpts.sort();
    assert_eq!(
        rcpts,
        ["alice@example.org", "bob@example.org", "hidden@example.org"]
    );
    let text = String::from_utf8_lossy(&m.data).into_owned();
    assert!(
        text.contains("From: \"Web Shop\" <app@contoso.com>\r\n"),
        "{text}"
    );
    assert!(
        text.contains("Reply-To: <shop@web1.example.com>\r\n"),
        "{text}"
    );
    assert!(
        !text.contains("hidden"),
        "Bcc must not reach the server's copy: {text}"
    );
    assert!(
        text.ends_with("\r\n\r\nAll systems nominal.\r\n"),
        "{text:?}"
    );
    assert!(t.queued().is_empty(), "delivered mail leaves the queue");
    assert!(
        stderr(&out).contains("status=sent (250 2.0.0 OK"),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("deprecated"),
        "basic auth warns: {}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains(PASSWORD), "never log a secret");
}

#[test]
fn xoauth2_delivery_through_the_daemon_and_token_refresh() {
    let t = Tenant::new(Auth::Xoauth2);
    let d = Daemon::start(&t.spool);
    send(&t, &["-t"], MSG);
    assert!(
        t.emu.wait_for_messages(1, Duration::from_secs(15)),
        "daemon log: {}",
        d.log_text()
    );
    assert!(
        eventually(Duration::from_secs(10), || t.queued().is_empty()),
        "{}",
        d.log_text()
    );
    let tokens = t.emu.token().expect("token endpoint");
    assert_eq!(tokens.issued(), 1);
    // The token dies early on the server side: the next AUTH gets 535 5.7.3, relay365
    // refreshes once and succeeds; nothing is held or bounced.
    tokens.expire_all();
    t.emu.kill_connections();
    send(&t, &["-i", "carol@example.org"], b"Subject: second\n\nx\n");
    assert!(
        t.emu.wait_for_messages(2, Duration::from_secs(15)),
        "daemon log: {}",
        d.log_text()
    );
    assert_eq!(tokens.issued(), 2, "one refresh after the 535");
    let log = d.log_text();
    assert!(!log.contains(CLIENT_SECRET), "never log a secret");
    assert!(!log.contains("held"), "{log}");
    let status = d.stop();
    assert!(status.success(), "SIGTERM exits 0");
    assert!(t.queued().is_empty(), "{:?}\n{log}", t.queued());
}

/// What a reply should lead to.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// Still queued, nothing bounced, the account frozen (quota) — `relay365 quota` says so.
    Frozen,
    /// Still queued, nothing bounced, the account held with a fix in the log.
    Held,
    /// Still queued for a later retry; nothing bounced.
    Deferred,
    /// Bounced: a DSN went to the sender; the message left the queue.
    Bounced,
    /// Delivered after splitting the recipients into smaller transactions.
    Split,
}

fn reply_row(stage: Stage, reply: &str, expect: Expect) {
    let t = Tenant::new(Auth::Login);
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
    t.emu.inject(Fault::reply(stage.clone(), reply).times(1));
    let out = t.flush();
    // 0 when the queue is empty afterwards, 75 when mail is left (issue 17).
    let left = !t.queued().is_empty();
    assert_eq!(
        out.status.code(),
        Some(if left { 75 } else { 0 }),
        "{}",
        stderr(&out)
    );
    let log = stderr(&out);
    let queued = t.queued();
    let dsn_sent = t
        .emu
        .messages()
        .iter()
        .any(|m| String::from_utf8_lossy(&m.data).contains("multipart/report"));
    match expect {
        Expect::Frozen | Expect::Held | Expect::Deferred => {
            assert_eq!(queued.len(), 1, "{reply}: must stay queued; log: {log}");
            assert!(
                queued[0]
                    .recipients
                    .iter()
                    .all(|r| r.status == RcptStatus::Pending),
                "{reply}: {queued:?}"
            );
            assert!(!dsn_sent, "{reply}: must never bounce");
            let quota = stdout(&t.spool.relay365(&["quota"]));
            match expect {
                Expect::Frozen => assert!(quota.contains("frozen until"), "{reply}: {quota}"),
                Expect::Held => {
                    assert!(quota.contains("held"), "{reply}: {quota}");
                    assert!(log.contains("held until"), "{reply}: {log}");
                }
                _ => assert!(
                    !quota.contains("frozen") && !quota.contains("held"),
                    "{reply}: {quota}"
                ),
            }
            let mailq = stdout(&t.spool.sendmail_as("mailq", &[], b""));
            assert!(
                mailq.contains("a@example.org") && mailq.contains('('),
                "{reply}: mailq shows why: {mailq}"
            );
        }
        Expect::Bounced => {
            assert!(
                queued.is_empty(),
                "{reply}: bounced messages leave the queue: {queued:?}"
            );
            assert!(dsn_sent, "{reply}: a DSN must go to the sender; log: {log}");
            let dsn = t
                .emu
                .messages()
                .into_iter()
                .find(|m| String::from_utf8_lossy(&m.data).contains("multipart/report"))
                .unwrap();
            assert_eq!(dsn.rcpts, ["shop@contoso.com"]);
        }
        Expect::Split => {
            assert!(queued.is_empty(), "{reply}: log {log}");
            let got: usize = t.emu.messages().iter().map(|m| m.rcpts.len()).sum();
            assert_eq!(got, 2);
            assert!(
                t.emu.messages().len() >= 2,
                "{reply}: sent in two transactions"
            );
        }
    }
}

#[test]
fn reply_table_quota_replies_freeze_never_bounce() {
    reply_row(
        Stage::AfterDot,
        "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to process message due to a permanent exception with message [BeginDiagnosticData]Cannot submit message. 0.35250:0A00AC8B [Hostname=SYBP282MB2635.AUSP282.PROD.OUTLOOK.COM][EndDiagnosticData] [SY5P282CA0097.outlook.office365.com 2025-11-23T11:12:20.123Z 08DE2A6028D26C22]",
        Expect::Frozen,
    );
    reply_row(
        Stage::AfterDot,
        "550 5.7.233 Your message can't be sent because your organization has exceeded the external recipient limit [SY5P282CA0097 2025-11-23T11:12:20.123Z 08DE2A6028D26C22]",
        Expect::Frozen,
    );
    reply_row(
        Stage::AfterDot,
        "550 5.2.251 Sender throttled due to continuous invalid recipient errors [SY5P282CA0097 2025-11-23T11:12:20.123Z 08DE2A6028D26C22]",
        Expect::Frozen,
    );
}

#[test]
fn reply_table_account_problems_hold_never_bounce() {
    reply_row(
        Stage::Auth,
        "535 5.7.3 Authentication unsuccessful [SY5P282CA0097 2025-11-23T11:12:20.123Z 08DE2A6028D26C22]",
        Expect::Held,
    );
    reply_row(
        Stage::Auth,
        "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox. [SY5P282CA0097 2025-11-23T11:12:20.123Z 08DE2A6028D26C22]",
        Expect::Held,
    );
    reply_row(
        Stage::Mail,
        "530 5.7.57 Client not authenticated to send mail. [SY5P282CA0097 2025-11-23T11:12:20.123Z 08DE2A6028D26C22]",
        Expect::Held,
    );
    reply_row(
        Stage::AfterDot,
        "550 5.1.8 Access denied, bad outbound sender AS(42) [SY5P282CA0097 2025-11-23T11:12:20.123Z 08DE2A6028D26C22]",
        Expect::Held,
    );
    reply_row(
        Stage::AfterDot,
        "554 5.2.2 mailbox full; STOREDRV.Submission.Exception:QuotaExceededException [SY5P282CA0097 2025-11-23T11:12:20.123Z 08DE2A6028D26C22]",
        Expect::Held,
    );
}

/// Issue 15 item 1: direct send and connector refusals and the tenant blocks are
/// account-level wherever they come, at RCPT or after the final dot: hold with the fix,
/// bounce nothing.
#[test]
fn direct_send_connector_and_tenant_block_refusals_hold_the_account_at_rcpt_and_after_data() {
    for reply in [
        "550 5.7.68 TenantInboundAttribution; Direct Send not allowed for this organization from unauthorized sources [SY5P282CA0097 2025-11-23T11:12:20.123Z 08DE2A6028D26C22]",
        "550 5.7.64 TenantAttribution; Relay Access Denied [SY5P282CA0097 2025-11-23T11:12:20.123Z 08DE2A6028D26C22]",
        "550 5.7.705 Access denied, tenant has exceeded threshold. [SY5P282CA0097 2025-11-23T11:12:20.123Z 08DE2A6028D26C22]",
        "550 5.7.708 Service unavailable. Access denied, traffic not accepted from this IP. [SY5P282CA0097 2025-11-23T11:12:20.123Z 08DE2A6028D26C22]",
        "550 5.7.750 Service unavailable. Client blocked from sending from unregistered domains. [SY5P282CA0097 2025-11-23T11:12:20.123Z 08DE2A6028D26C22]",
    ] {
        for stage in [Stage::Rcpt(None), Stage::AfterDot] {
            reply_row(stage, reply, Expect::Held);
        }
    }
}

#[test]
fn reply_table_temporary_replies_defer() {
    reply_row(
        Stage::AfterDot,
        "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded [SY5P282CA0097 2025-11-23T11:12:20.123Z 08DE2A6028D26C22]",
        Expect::Deferred,
    );
    reply_row(
        Stage::AfterDot,
        "430 4.2.0 STOREDRV; mailbox logon failure; Failed to process message [SY5P282CA0097 2025-11-23T11:12:20.123Z 08DE2A6028D26C22]",
        Expect::Deferred,
    );
    reply_row(
        Stage::Greeting,
        "421 4.3.2 Service not active [SY5P282CA0097 2025-11-23T11:12:20.123Z 08DE2A6028D26C22]",
        Expect::Deferred,
    );
    reply_row(
        Stage::AfterDot,
        "451 4.7.0 Temporary server error. Please try again later. PRX4 [SY5P282CA0097 2025-11-23T11:12:20.123Z 08DE2A6028D26C22]",
        Expect::Deferred,
    );
}

#[test]
fn reply_table_permanent_replies_bounce() {
    reply_row(
        Stage::AfterDot,
        "554 5.2.252 SendAsDenied; app@contoso.com not allowed to send as shop@contoso.com; STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied [SY5P282CA0097 2025-11-23T11:12:20.123Z 08DE2A6028D26C22]",
        Expect::Bounced,
    );
    reply_row(
        Stage::AfterDot,
        "552 5.3.4 Message size exceeds fixed maximum message size MaxSubmissionExceeded [SY5P282CA0097 2025-11-23T11:12:20.123Z 08DE2A6028D26C22]",
        Expect::Bounced,
    );
    reply_row(
        Stage::AfterDot,
        "550 5.6.0 Some other permanent failure [SY5P282CA0097 2025-11-23T11:12:20.123Z 08DE2A6028D26C22]",
        Expect::Bounced,
    );
}

#[test]
fn reply_table_too_many_recipients_splits() {
    reply_row(
        Stage::AfterDot,
        "550 5.5.3 RESOLVER.ADR.RecipLimit; too many recipients [SY5P282CA0097 2025-11-23T11:12:20.123Z 08DE2A6028D26C22]",
        Expect::Split,
    );
}

#[test]
fn a_refused_recipient_does_not_sink_the_others_and_is_bounced() {
    let t = Tenant::new(Auth::Login);
    send(
        &t,
        &[
            "-i",
            "-f",
            "shop@contoso.com",
            "good@example.org",
            "bad@example.org",
            "fine@example.org",
        ],
        b"Subject: partial\n\nbody\n",
    );
    t.emu.inject(Fault::new(Stage::Rcpt(Some("bad@example.org".into())), FaultAction::Reply("550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient bad@example.org not found by SMTP address lookup".into())).times(1));
    assert_ok(&t.flush());
    let msgs = t.emu.messages();
    let original = msgs
        .iter()
        .find(|m| m.rcpts.contains(&"good@example.org".to_string()))
        .expect("delivered to the others");
    assert_eq!(original.rcpts, ["good@example.org", "fine@example.org"]);
    let dsn = msgs
        .iter()
        .find(|m| String::from_utf8_lossy(&m.data).contains("multipart/report"))
        .expect("a bounce");
    let text = String::from_utf8_lossy(&dsn.data);
    assert_eq!(dsn.rcpts, ["shop@contoso.com"]);
    assert!(
        text.contains("Final-Recipient: rfc822; bad@example.org"),
        "{text}"
    );
    assert!(text.contains("Action: failed"), "{text}");
    assert!(text.contains("Status: 5.1.10"), "{text}");
    assert!(text.contains("RecipientNotFound"), "{text}");
    assert!(
        !text.contains("Final-Recipient: rfc822; good@example.org"),
        "{text}"
    );
    assert!(t.queued().is_empty());
    // The emulator offers PIPELINING: MAIL, the RCPTs and DATA went out together.
    assert!(
        t.emu.pipelined_commands() >= 4,
        "pipelined commands: {}",
        t.emu.pipelined_commands()
    );
}

#[test]
fn pipelining_sends_mail_rcpt_and_data_in_one_go() {
    let t = Tenant::new(Auth::Login);
    for i in 0..3 {
        send(
            &t,
            &[
                "-i",
                "-f",
                "shop@contoso.com",
                "a@example.org",
                "b@example.org",
            ],
            format!("Subject: piped {i}\n\nbody\n").as_bytes(),
        );
    }
    // A recipient refused by a pipelined RCPT: the others of the batch still go.
    t.emu.inject(
        Fault::new(
            Stage::Rcpt(Some("a@example.org".into())),
            FaultAction::Reply("450 4.2.1 Mailbox busy, try later".into()),
        )
        .times(1),
    );
    let out = t.flush();
    assert_left(&out);
    let msgs = t.emu.messages();
    assert_eq!(msgs.len(), 3, "{}", stderr(&out));
    let first = msgs.iter().filter(|m| m.rcpts == ["b@example.org"]).count();
    assert_eq!(
        first, 1,
        "the batch with the refused RCPT still reached b: {msgs:?}"
    );
    // Per message: MAIL with 2 RCPTs and DATA behind it = 3 commands that came early.
    assert!(
        t.emu.pipelined_commands() >= 9,
        "pipelined commands: {}",
        t.emu.pipelined_commands()
    );
    // The refused recipient waits for its retry, then goes alone.
    let queued = t.queued();
    assert_eq!(queued.len(), 1, "{queued:?}");
    let out = t.flush();
    assert_ok(&out);
    assert!(t.queued().is_empty(), "{}", stderr(&out));
    assert_eq!(t.emu.messages().len(), 4);
}

#[test]
fn a_bounce_is_never_bounced() {
    let t = Tenant::new(Auth::Login);
    send(
        &t,
        &["-i", "-f", "<>", "bad@example.org"],
        b"Subject: from the null sender\n\nx\n",
    );
    t.emu.inject(
        Fault::new(
            Stage::Rcpt(None),
            FaultAction::Reply("550 5.1.10 RESOLVER.ADR.RecipientNotFound".into()),
        )
        .forever(),
    );
    let out = t.flush();
    assert_ok(&out);
    assert_eq!(t.emu.message_count(), 0, "no DSN for a null-sender message");
    assert!(t.queued().is_empty(), "and it is not kept either");
    assert!(stderr(&out).contains("status=bounced"), "{}", stderr(&out));
}

#[test]
fn account_hold_and_release() {
    let t = Tenant::new(Auth::Login);
    send(&t, &["-i", "x@example.org"], b"Subject: s\n\nx\n");
    t.emu
        .inject(Fault::reply(Stage::Auth, "535 5.7.3 Authentication unsuccessful").times(1));
    assert_left(&t.flush());
    assert_eq!(t.queued().len(), 1);
    assert!(stdout(&t.spool.relay365(&["quota"])).contains("held"));
    // Held accounts are not retried by the daemon's schedule until the probe time...
    let d = Daemon::start(&t.spool);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(t.emu.message_count(), 0);
    // ...and an administrator's release plus a queue run sends at once.
    assert_ok(&t.spool.relay365(&["account", "release", "app"]));
    assert_ok(&t.spool.relay365(&["flush", "--wake"]));
    assert!(
        t.emu.wait_for_messages(1, Duration::from_secs(10)),
        "{}",
        d.log_text()
    );
    assert!(!stdout(&t.spool.relay365(&["quota"])).contains("held"));
}

// Issue 18 item 1: any local user can run `sendmail -q`. It used to override the
// account's hold, so a loop of it drove an AUTH attempt with a refused password each
// time (what makes Entra ID lock the mailbox user out). Now only root's flush does.
#[test]
fn a_sendmail_q_loop_against_a_held_account_makes_no_extra_auth_attempt() {
    let t = Tenant::new(Auth::Login);
    t.emu
        .inject(Fault::reply(Stage::Auth, "535 5.7.3 Authentication unsuccessful").forever());
    let d = Daemon::start(&t.spool);
    send(&t, &["-i", "x@example.org"], b"Subject: s\n\nx\n");
    assert!(
        eventually(Duration::from_secs(10), || stdout(
            &t.spool.relay365(&["quota"])
        )
        .contains("held")),
        "{}",
        d.log_text()
    );
    let auths = t.emu.reply_count(535);
    let connections = t.emu.connections_opened();
    assert_eq!(auths, 1, "{}", d.log_text());
    for _ in 0..30 {
        assert_ok(&t.spool.sendmail(&["-q"], b""));
        std::thread::sleep(Duration::from_millis(50));
    }
    // Past the rate limit, so that the coalesced run has happened too.
    std::thread::sleep(relay365::daemon::engine::QUEUE_RUN_INTERVAL + Duration::from_secs(1));
    assert!(
        d.log_text().contains("queue run requested"),
        "{}",
        d.log_text()
    );
    assert_eq!(t.emu.reply_count(535), auths, "{}", d.log_text());
    assert_eq!(t.emu.connections_opened(), connections, "{}", d.log_text());
    assert_eq!(t.emu.message_count(), 0);
    // Root's flush --wake still overrides the hold: one more attempt, refused again.
    assert_ok(&t.spool.relay365(&["flush", "--wake"]));
    assert!(
        eventually(Duration::from_secs(10), || t.emu.reply_count(535)
            == auths + 1),
        "{}",
        d.log_text()
    );
}

#[test]
fn daemon_killed_mid_transaction_loses_nothing() {
    let t = Tenant::new(Auth::Login);
    let d = Daemon::start(&t.spool);
    // The server sits on DATA; the daemon dies before it could send the message.
    t.emu
        .inject(Fault::new(Stage::Data, FaultAction::Stall(Duration::from_secs(3))).times(1));
    send(&t, &["-i", "x@example.org"], b"Subject: survive\n\nx\n");
    assert!(eventually(Duration::from_secs(10), || t
        .emu
        .connections_current()
        > 0
        && !t.queued().is_empty()));
    std::thread::sleep(Duration::from_millis(300));
    drop(d); // SIGKILL in the middle of DATA
    assert_eq!(t.emu.message_count(), 0);
    assert_eq!(
        t.queued().len(),
        1,
        "the message is still queued after kill -9"
    );
    assert_ok(&t.flush());
    assert!(t.emu.wait_for_messages(1, Duration::from_secs(10)));
    std::thread::sleep(Duration::from_millis(3500));
    assert_eq!(t.emu.message_count(), 1, "delivered exactly once");
    assert!(t.queued().is_empty());
}

#[test]
fn two_flushers_never_deliver_a_message_twice() {
    let t = Tenant::with(
        tenant_config().over_rate(emu::OverRate::Throttle),
        Auth::Login,
        "message_rate = \"off\"",
    );
    for i in 0..20 {
        send(
            &t,
            &["-i", &format!("r{i}@example.org")],
            format!("Subject: n{i}\n\nx\n").as_bytes(),
        );
    }
    let a = std::thread::spawn({
        let cfg = t.spool.config.clone();
        move || {
            let mut c = std::process::Command::new(RELAY365);
            c.arg("--config").arg(cfg).args(["flush", "-v"]);
            run(c, b"")
        }
    });
    let b = t.flush();
    let a = a.join().unwrap();
    // Either may end while the other still holds mail: 75 (mail left) is right then.
    for o in [&a, &b] {
        assert!(matches!(o.status.code(), Some(0 | 75)), "{}", stderr(o));
    }
    let mut rcpts: Vec<String> = t
        .emu
        .messages()
        .iter()
        .flat_map(|m| m.rcpts.clone())
        .collect();
    rcpts.sort();
    let n = rcpts.len();
    rcpts.dedup();
    assert_eq!(n, 20, "each of 20 messages exactly once");
    assert_eq!(rcpts.len(), 20);
    assert!(t.queued().is_empty());
}

#[test]
fn a_bad_server_certificate_is_refused_and_nothing_is_sent() {
    for kind in [emu::CertKind::WrongName, emu::CertKind::Expired] {
        let t = Tenant::with(tenant_config().cert(kind.clone()), Auth::Login, "");
        send(&t, &["-i", "x@example.org"], b"Subject: s\n\nx\n");
        let out = t.flush();
        assert_left(&out);
        assert_eq!(t.emu.message_count(), 0, "{kind:?}");
        assert_eq!(
            t.queued().len(),
            1,
            "{kind:?}: deferred, not lost or bounced"
        );
        let log = stderr(&out);
        assert!(
            log.contains("certificate is not trusted"),
            "{kind:?}: {log}"
        );
        assert!(
            log.contains("held until"),
            "{kind:?}: the account is held, not bounced: {log}"
        );
    }
}

#[test]
fn messages_over_the_advertised_size_bounce_before_sending() {
    let t = Tenant::with(tenant_config().max_size(3000), Auth::Login, "");
    let big = format!("Subject: big\n\n{}\n", "y".repeat(5000));
    send(
        &t,
        &[
            "-i",
            "-R",
            "hdrs",
            "-f",
            "shop@contoso.com",
            "x@example.org",
        ],
        big.as_bytes(),
    );
    assert_ok(&t.flush());
    let msgs = t.emu.messages();
    assert!(
        msgs.iter().all(|m| m.rcpts != ["x@example.org"]),
        "the big one was never sent"
    );
    assert!(
        msgs.iter()
            .any(|m| String::from_utf8_lossy(&m.data).contains("exceeds the server's limit")),
        "{:?}",
        msgs.iter()
            .map(|m| String::from_utf8_lossy(&m.data).into_owned())
            .collect::<Vec<_>>()
    );
}

#[test]
fn local_recipients_go_through_aliases_and_admin() {
    let t = Tenant::new(Auth::Login);
    send(
        &t,
        &["-i", "root", "postmaster", "nosuchuser-xyz@localhost"],
        b"Subject: s\n\nx\n",
    );
    assert_ok(&t.flush());
    let mut rcpts: Vec<String> = t
        .emu
        .messages()
        .iter()
        .flat_map(|m| m.rcpts.clone())
        .collect();
    rcpts.sort();
    rcpts.dedup();
    assert_eq!(rcpts, ["admin@contoso.com", "ops@contoso.com"]);
}

#[test]
fn capture_transport_writes_a_maildir() {
    let dir = tempfile::tempdir().unwrap();
    let maildir = dir.path().join("Maildir");
    let s = Spool::new(&format!(
        "[[account]]\nname = \"staging\"\nmailbox = \"app@contoso.com\"\nauth = \"none\"\ntransport = \"maildir:{}\"\n",
        maildir.display()
    ));
    assert_ok(&s.sendmail(&["-t"], MSG));
    assert_ok(&s.relay365(&["flush", "-v"]));
    let files: Vec<_> = std::fs::read_dir(maildir.join("new"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(files.len(), 1);
    let text = std::fs::read_to_string(files[0].path()).unwrap();
    assert!(
        text.starts_with(
            "Return-Path: <app@contoso.com>\r\nX-Envelope-To: <alice@example.org>\r\n"
        ),
        "{text}"
    );
    assert!(text.contains("All systems nominal."));
    assert!(!text.contains("Bcc:"));
}

#[test]
fn daemon_picks_up_at_once_and_sigterm_stops_it() {
    let t = Tenant::new(Auth::Login);
    let d = Daemon::start(&t.spool);
    let started = std::time::Instant::now();
    send(&t, &["-i", "x@example.org"], b"Subject: quick\n\nx\n");
    assert!(
        t.emu.wait_for_messages(1, Duration::from_secs(5)),
        "{}",
        d.log_text()
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "inotify pickup, not the safety scan"
    );
    assert!(d.stop().success());
}

#[test]
fn sendmail_q_wakes_the_daemon_for_deferred_mail() {
    let t = Tenant::new(Auth::Login);
    let d = Daemon::start(&t.spool);
    t.emu
        .inject(Fault::reply(Stage::AfterDot, "451 4.7.0 Temporary server error").times(1));
    send(&t, &["-i", "x@example.org"], b"Subject: retry\n\nx\n");
    assert!(
        d.wait_log("status=deferred", Duration::from_secs(10)),
        "{}",
        d.log_text()
    );
    assert_eq!(t.emu.message_count(), 0);
    assert_ok(&t.spool.sendmail(&["-q"], b""));
    assert!(
        t.emu.wait_for_messages(1, Duration::from_secs(10)),
        "{}",
        d.log_text()
    );
}

#[test]
fn dsn_and_8bit_parameters_are_passed_when_offered() {
    let t = Tenant::new(Auth::Login);
    let body = "Subject: Grüße\n\nÄpfel und Birnen\n";
    send(
        &t,
        &[
            "-i",
            "-N",
            "failure,delay",
            "-R",
            "hdrs",
            "-V",
            "ENV+1",
            "root",
            "x@example.org",
        ],
        body.as_bytes(),
    );
    assert_ok(&t.flush());
    let m = &t.emu.messages()[0];
    assert!(
        m.mail_params.iter().any(|p| p == "BODY=8BITMIME"),
        "{:?}",
        m.mail_params
    );
    assert!(
        m.mail_params.iter().any(|p| p == "RET=HDRS"),
        "{:?}",
        m.mail_params
    );
    assert!(
        m.mail_params.iter().any(|p| p == "ENVID=ENV+2B1"),
        "xtext-encoded: {:?}",
        m.mail_params
    );
    let i = m
        .rcpts
        .iter()
        .position(|r| r == "ops@contoso.com")
        .expect("root via its alias");
    assert_eq!(m.rcpt_param(i, "NOTIFY"), Some("FAILURE,DELAY"));
    assert_eq!(m.rcpt_param(i, "ORCPT"), Some("rfc822;root@example.com"));
    assert!(String::from_utf8_lossy(&m.data).contains("Äpfel und Birnen"));
}

#[test]
fn undeliverable_mail_bounces_after_max_queue_lifetime() {
    let t = Tenant::with(tenant_config(), Auth::Login, "");
    std::fs::write(
        &t.spool.config,
        std::fs::read_to_string(&t.spool.config).unwrap().replacen(
            "[[account]]",
            "max_queue_lifetime = \"1s\"\n\n[[account]]",
            1,
        ),
    )
    .unwrap();
    send(
        &t,
        &["-i", "-f", "shop@contoso.com", "x@example.org"],
        b"Subject: doomed\n\nx\n",
    );
    t.emu
        .inject(Fault::reply(Stage::AfterDot, "451 4.7.0 Temporary server error").times(1));
    assert_left(&t.flush());
    assert_eq!(t.queued().len(), 1, "a temporary error defers");
    std::thread::sleep(Duration::from_millis(1200));
    let out = t.flush();
    assert_ok(&out);
    assert!(t.queued().is_empty(), "{}", stderr(&out));
    let dsn = t
        .emu
        .messages()
        .into_iter()
        .find(|m| String::from_utf8_lossy(&m.data).contains("multipart/report"))
        .expect("an expiry bounce");
    let text = String::from_utf8_lossy(&dsn.data);
    assert!(text.contains("4.4.7") && text.contains("expired"), "{text}");
    assert!(
        text.contains("Temporary server error"),
        "the last error is reported: {text}"
    );
}

#[test]
fn secrets_readable_by_others_stop_the_daemon_with_the_fix() {
    use std::os::unix::fs::PermissionsExt;
    let t = Tenant::new(Auth::Login);
    let secrets = t.spool.dir.path().join("secrets.toml");
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = t.spool.relay365(&["daemon"]);
    assert_fails(&out, 78, "chmod 600");
    assert!(!stderr(&out).contains(PASSWORD));
    let out = t.flush();
    assert_fails(&out, 78, "readable or writable by group or others");
}

#[test]
fn check_names_what_is_wrong_and_sends_nothing() {
    let t = Tenant::new(Auth::Login);
    let out = t.spool.relay365(&["check"]);
    assert_ok(&out);
    assert!(
        stdout(&out).contains("authenticated as app@contoso.com"),
        "{}",
        stdout(&out)
    );
    std::fs::write(
        t.spool.dir.path().join("secrets.toml"),
        "[app]\npassword = \"wrong\"\n",
    )
    .unwrap();
    let out = t.spool.relay365(&["check"]);
    assert_eq!(out.status.code(), Some(78));
    let text = stdout(&out);
    assert!(
        text.contains("FAIL")
            && text.contains("authentication failed")
            && text.contains("correct password in the [app] table"),
        "{text}"
    );
    assert!(!text.contains("wrong\""), "never print the secret");
    assert_eq!(t.emu.message_count(), 0);
    let t = Tenant::new(Auth::Xoauth2);
    std::fs::write(
        t.spool.dir.path().join("secrets.toml"),
        "[app]\nclient_secret = \"not-the-secret\"\n",
    )
    .unwrap();
    let out = t.spool.relay365(&["check"]);
    assert_eq!(out.status.code(), Some(78));
    assert!(
        stdout(&out).contains("AADSTS7000215") || stdout(&out).contains("client secret"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn sighup_reloads_the_configuration() {
    let t = Tenant::new(Auth::Login);
    let d = Daemon::start(&t.spool);
    let text = std::fs::read_to_string(&t.spool.config).unwrap();
    std::fs::write(
        &t.spool.config,
        text.replace("auth = \"login\"", "auth = \"login\"\nfrom = \"preserve\""),
    )
    .unwrap();
    d.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(
        d.wait_log("configuration reloaded", Duration::from_secs(10)),
        "{}",
        d.log_text()
    );
    let t2 = &t;
    send(
        t2,
        &["-i", "-f", "app@contoso.com", "x@example.org"],
        b"From: Custom <app@contoso.com>\nSubject: s\n\nx\n",
    );
    assert!(
        t.emu.wait_for_messages(1, Duration::from_secs(10)),
        "{}",
        d.log_text()
    );
    // A broken config is refused and the running one kept.
    std::fs::write(&t.spool.config, "this is not toml = = =").unwrap();
    d.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(
        d.wait_log("reload refused", Duration::from_secs(10)),
        "{}",
        d.log_text()
    );
    assert!(d.stop().success());
}

#[test]
fn xoauth2_with_a_certificate_client_assertion() {
    let cert = emu::test_certificate_pem().expect("test certificate");
    let cfg = emu::Config::default()
        .mailbox(emu::Mailbox::new(MAILBOX))
        .app(emu::App::with_certificate(
            TENANT, CLIENT_ID, &cert, MAILBOX,
        ));
    let t = Tenant::with(cfg, Auth::Xoauth2, "");
    let dir = t.spool.dir.path();
    let key = dir.join("app.key");
    let crt = dir.join("app.crt");
    std::fs::write(&key, emu::TEST_RSA_KEY_PEM).unwrap();
    std::fs::write(&crt, &cert).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    std::fs::write(
        dir.join("secrets.toml"),
        format!(
            "[app]\ncertificate_key = \"{}\"\ncertificate = \"{}\"\n",
            key.display(),
            crt.display()
        ),
    )
    .unwrap();
    send(&t, &["-i", "x@example.org"], b"Subject: cert\n\nx\n");
    let out = t.flush();
    assert_ok(&out);
    assert_eq!(t.emu.message_count(), 1, "{}", stderr(&out));
    assert_eq!(t.emu.token().unwrap().issued(), 1);
}

#[test]
fn the_connection_is_reused_between_messages() {
    let t = Tenant::new(Auth::Login);
    for i in 0..5 {
        send(
            &t,
            &["-i", &format!("r{i}@example.org")],
            b"Subject: s\n\nx\n",
        );
    }
    assert_ok(&t.flush());
    assert_eq!(t.emu.message_count(), 5);
    assert_eq!(
        t.emu.connections_opened(),
        1,
        "one connection (plus AUTH once) for the whole queue"
    );
}

// Regression: `sendmail -q` that arrived while the message's attempt was still in
// flight was dropped for that message: its deferral came back after the queue run
// and waited out the whole backoff (a minute) instead of being retried at once.
#[test]
fn sendmail_q_during_an_attempt_retries_it_when_it_is_deferred() {
    let t = Tenant::with(
        tenant_config().reply_delay(Duration::from_millis(150)),
        Auth::Login,
        "",
    );
    let d = Daemon::start(&t.spool);
    t.emu
        .inject(Fault::reply(Stage::AfterDot, "451 4.7.0 Temporary server error").times(1));
    send(&t, &["-i", "x@example.org"], b"Subject: retry\n\nx\n");
    assert!(
        eventually(Duration::from_secs(10), || t.emu.connections_current() > 0),
        "{}",
        d.log_text()
    );
    // The dialogue takes about a second (150 ms a reply): ask for a queue run in it.
    assert_ok(&t.spool.sendmail(&["-q"], b""));
    assert!(
        d.wait_log("queue run requested", Duration::from_secs(5)),
        "{}",
        d.log_text()
    );
    assert!(
        !d.log_text().contains("status=deferred"),
        "the request came during the attempt: {}",
        d.log_text()
    );
    assert!(
        t.emu.wait_for_messages(1, Duration::from_secs(10)),
        "retried at once, not after the backoff: {}",
        d.log_text()
    );
}

/// Sends one message through the running daemon and waits until it left the queue.
fn deliver_one(t: &Tenant, d: &Daemon, rcpt: &str, n: usize) {
    send(t, &["-i", rcpt], b"Subject: one of several\n\nx\n");
    assert!(
        t.emu.wait_for_messages(n, Duration::from_secs(15)),
        "{}",
        d.log_text()
    );
    assert!(
        eventually(Duration::from_secs(10), || t.queued().is_empty()),
        "{}",
        d.log_text()
    );
}

#[test]
fn a_connection_the_server_closed_is_replaced_at_once() {
    // Regression: a kept connection is no longer asked (RSET) before each message; one
    // the server closed meanwhile must still be noticed at MAIL and replaced at once,
    // not cost the message a retry.
    let t = Tenant::new(Auth::Login);
    let d = Daemon::start(&t.spool);
    deliver_one(&t, &d, "a@example.org", 1);
    t.emu.kill_connections();
    deliver_one(&t, &d, "b@example.org", 2);
    assert_eq!(t.emu.connections_opened(), 2);
    // Exchange closes an idle connection with a 421 before it hangs up.
    t.emu.inject(
        Fault::reply(
            Stage::Mail,
            "421 4.4.2 Connection dropped due to SocketTimeout [SY5P282CA0097]",
        )
        .times(1),
    );
    deliver_one(&t, &d, "c@example.org", 3);
    assert_eq!(t.emu.connections_opened(), 3);
    let log = d.log_text();
    assert!(!log.contains("status=deferred"), "{log}");
    assert_eq!(t.emu.reply_count(421), 1, "{log}");
    assert!(d.stop().success());
}

#[test]
fn a_421_on_a_new_connection_still_defers() {
    // The reconnect above is for kept connections only: a fresh one that gets 421 at
    // MAIL is the server refusing, and the message waits for its retry.
    let t = Tenant::new(Auth::Login);
    send(&t, &["-i", "a@example.org"], b"Subject: s\n\nx\n");
    t.emu
        .inject(Fault::reply(Stage::Mail, "421 4.3.2 Service not available").times(1));
    let out = t.flush();
    assert_eq!(t.emu.message_count(), 0, "{}", stderr(&out));
    assert_eq!(t.emu.connections_opened(), 1, "{}", stderr(&out));
    assert_eq!(t.queued().len(), 1);
}

#[test]
fn leading_dots_and_8bit_bodies_arrive_unchanged() {
    // The message and its final dot go out in one write, dot-stuffed as bytes, so a
    // body that is not UTF-8 takes the same path.
    let t = Tenant::new(Auth::Login);
    send(
        &t,
        &["-i", "dots@example.org"],
        b"Subject: dots\n\n.hidden\n..two\n.\nend.\n.",
    );
    send(
        &t,
        &["-i", "latin1@example.org"],
        b"Subject: latin-1\n\ncaf\xE9\n.au lait\n",
    );
    let out = t.flush();
    assert_ok(&out);
    let msgs = t.emu.messages();
    let body = |rcpt: &str| {
        msgs.iter()
            .find(|m| m.rcpts == [rcpt])
            .unwrap_or_else(|| panic!("no message for {rcpt}: {}", stderr(&out)))
            .data
            .clone()
    };
    let dots = body("dots@example.org");
    assert!(
        dots.ends_with(b"\r\n\r\n.hidden\r\n..two\r\n.\r\nend.\r\n.\r\n"),
        "{:?}",
        String::from_utf8_lossy(&dots)
    );
    let latin1 = body("latin1@example.org");
    assert!(
        latin1.ends_with(b"\r\n\r\ncaf\xE9\r\n.au lait\r\n"),
        "{:?}",
        String::from_utf8_lossy(&latin1)
    );
}

#[test]
fn an_entry_without_its_message_file_does_not_cost_the_incoming_copy() {
    // The pickup now syncs the queue directory once per pass, so a crash may keep an
    // entry's name and lose its message file's. The incoming copy must then be queued
    // again, not dropped as "already queued".
    use relay365::spool::envelope::Envelope;
    use relay365::spool::queue::{QueueEntry, Recipient};
    let t = Tenant::new(Auth::Login);
    send(&t, &["-i", "a@example.org"], b"Subject: survivor\n\nx\n");
    let incoming = std::fs::read_dir(t.spool.new_dir())
        .expect("new/")
        .next()
        .expect("one incoming file")
        .expect("entry")
        .path();
    let bytes = std::fs::read(&incoming).expect("read");
    let (env, _) = Envelope::from_file_bytes(&bytes).expect("valid");
    let rcpts = env
        .recipients
        .iter()
        .map(|a| Recipient {
            address: a.clone(),
            original: None,
            status: RcptStatus::Pending,
            reply: None,
        })
        .collect();
    let entry = QueueEntry::from_envelope(&env, 0, rcpts);
    let queue = t.spool.root().join("queue");
    std::fs::write(
        queue.join(format!("{}.env", env.id)),
        serde_json::to_vec(&entry).expect("json"),
    )
    .expect("plant the entry");
    let out = t.flush();
    assert_ok(&out);
    assert_eq!(t.emu.message_count(), 1, "{}", stderr(&out));
    assert!(t.queued().is_empty(), "{}", stderr(&out));
    assert!(!incoming.exists());
}

#[test]
fn delivery_starts_while_a_backlog_is_still_being_picked_up() {
    // The pickup takes a backlog in chunks and hands each to the workers at once; the
    // workers must not wait for the rest (nor for the log lock the pickup uses). The
    // capture transport keeps the first delivery quick, so the order is telling.
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Spool::new(&format!(
        "[[account]]\nname = \"staging\"\nmailbox = \"app@contoso.com\"\nauth = \"none\"\n\
         transport = \"maildir:{}\"\nmessage_rate = \"off\"\nrecipient_rate = \"off\"\n",
        dir.path().join("Maildir").display()
    ));
    let n = 700; // three chunks
    plant_incoming(&s, n);
    let out = s.relay365(&["flush", "-v"]);
    assert_ok(&out);
    let log = stderr(&out);
    assert_eq!(log.matches("status=sent").count(), n, "{log}");
    let first_sent = log.find("status=sent").expect("sent lines");
    let last_picked = log.rfind("(queue active)").expect("pickup lines");
    let picked_before = log[..first_sent].matches("(queue active)").count();
    assert!(
        first_sent < last_picked,
        "the first message went out only after the whole backlog was picked up \
         ({picked_before} before it)"
    );
}

// Issue 18 item 7: `senders` routes by addresses the caller chooses, so it is not
// access control; `allowed_uids` is. A caller routed by its sender to an account that
// does not allow it goes out through the default account instead.
#[test]
fn a_caller_not_in_an_accounts_allowed_uids_falls_back_to_the_default_account() {
    let t = Tenant::with_accounts(
        tenant_config(),
        Auth::Login,
        "",
        &[ExtraAccount {
            name: "billing",
            mailbox: "billing@contoso.com",
            extra: "senders = [\"*@billing.contoso.com\"]\nallowed_uids = [4242]\n".into(),
        }],
    );
    send(
        &t,
        &["-i", "-f", "inv@billing.contoso.com", "x@example.org"],
        b"Subject: borrow\n\nx\n",
    );
    assert_ok(&t.flush());
    let msgs = t.emu.messages();
    assert_eq!(msgs.len(), 1);
    assert_eq!(
        msgs[0].mailbox.as_deref(),
        Some(MAILBOX),
        "not billing's mailbox"
    );
    assert_eq!(msgs[0].rcpts, ["x@example.org"]);
}

// ...and a caller no account allows is refused with a DSN to its sender; nothing
// reaches the recipient.
#[test]
fn a_caller_no_account_allows_is_refused_with_a_dsn_to_the_sender() {
    let t = Tenant::with(tenant_config(), Auth::Login, "allowed_groups = [4242]\n");
    send(
        &t,
        &["-i", "-f", "shop@contoso.com", "x@example.org"],
        b"Subject: not yours\n\nx\n",
    );
    let out = t.flush();
    assert_ok(&out);
    let msgs = t.emu.messages();
    assert!(
        msgs.iter()
            .all(|m| !m.rcpts.contains(&"x@example.org".to_string())),
        "nothing for the recipient: {}",
        stderr(&out)
    );
    let dsn = msgs
        .iter()
        .find(|m| String::from_utf8_lossy(&m.data).contains("multipart/report"))
        .expect("a bounce");
    assert_eq!(dsn.rcpts, ["shop@contoso.com"]);
    let text = String::from_utf8_lossy(&dsn.data);
    assert!(text.contains("Status: 5.7.1"), "{text}");
    assert!(text.contains("allowed_uids or allowed_groups"), "{text}");
    assert!(t.queued().is_empty());
}
