//! Late bounces (`harvest_bounces = true`): the emulator accepts a message (Graph `202`
//! or SMTP `250`) and a moment later drops an NDR into the mailbox's inbox, as Exchange
//! does; the daemon's harvester reads it through Graph, logs `status=bounced` with
//! Microsoft's code, queues the DSN to the original sender, freezes the account for
//! 5.7.233, and marks the NDR read (or moves it). A restart neither misses nor repeats
//! an NDR; one that matches nothing is left alone and counted.

use std::time::Duration;

use crate::harness::*;

const NOT_FOUND: &str = "550 5.1.1 RESOLVER.ADR.RecipNotFound; not found";
const TENANT_LIMIT: &str = "550 5.7.233 Your message can't be sent because your organization has exceeded its daily limit for sending to external recipients";

fn send(t: &Tenant, rcpts: &[&str]) {
    let mut args = vec!["-i", "-f", "shop@contoso.com"];
    args.extend_from_slice(rcpts);
    assert_ok(&t.spool.sendmail(&args, b"Subject: order 42\n\nthanks\n"));
}

fn dsns_to_sender(t: &Tenant) -> Vec<String> {
    t.emu
        .messages()
        .into_iter()
        .filter(|m| m.rcpts == ["shop@contoso.com"])
        .map(|m| String::from_utf8_lossy(&m.data).into_owned())
        .filter(|d| d.contains("multipart/report"))
        .collect()
}

fn late_bounces(log: &str, rcpt: &str) -> usize {
    log.lines()
        .filter(|l| l.contains(&format!("to=<{rcpt}>")) && l.contains("status=bounced (late NDR"))
        .count()
}

/// An NDR for a message relay365 never sent.
const STRANGER: &[u8] = b"From: Microsoft Outlook <MicrosoftExchange329e71ec88ae4615bbc36ab6ce41109e@contoso.com>\r\nTo: <app@contoso.com>\r\nSubject: Undeliverable: something else\r\nMIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns;x\r\n\r\nFinal-Recipient: rfc822;who@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n--b\r\nContent-Type: text/rfc822-headers\r\n\r\nMessage-ID: <not-ours@elsewhere.example>\r\n\r\n--b--\r\n";

#[test]
fn a_late_5_1_1_through_graph_becomes_a_dsn_and_a_restart_neither_misses_nor_repeats_it() {
    let mut cfg = tenant_config();
    cfg.ndr_delay = Duration::from_secs(2);
    let t = Tenant::graph(
        cfg,
        "",
        "harvest_bounces = true",
        "harvest_interval = \"1s\"",
        "",
    );
    t.emu.ndr_for("nobody@example.org", "5.1.1", NOT_FOUND);
    t.emu.ndr_for("gone@example.org", "5.1.1", NOT_FOUND);
    t.emu.deliver_to_inbox(MAILBOX, STRANGER).unwrap();
    let d = Daemon::start(&t.spool);
    send(&t, &["nobody@example.org", "ok@example.org"]);
    assert!(
        eventually(Duration::from_secs(20), || dsns_to_sender(&t).len() == 1),
        "{}",
        d.log_text()
    );
    let log = d.log_text();
    assert!(
        log.contains("to=<nobody@example.org>, relay=localhost, delay="),
        "sent first: {log}"
    );
    assert_eq!(late_bounces(&log, "nobody@example.org"), 1, "{log}");
    assert!(
        log.contains("late NDR from Microsoft: 5.1.1 550 5.1.1 RESOLVER.ADR.RecipNotFound"),
        "{log}"
    );
    assert_eq!(late_bounces(&log, "ok@example.org"), 0, "{log}");
    assert!(log.contains("matches nothing relay365 sent"), "{log}");
    let dsn = &dsns_to_sender(&t)[0];
    assert!(
        dsn.contains("Final-Recipient: rfc822; nobody@example.org")
            || dsn.contains("Final-Recipient: rfc822;nobody@example.org"),
        "{dsn}"
    );
    assert!(dsn.contains("Status: 5.1.1"), "{dsn}");
    assert!(
        dsn.contains("Subject: order 42"),
        "the original headers come back: {dsn}"
    );
    let items = t.emu.mailbox_items(MAILBOX);
    assert!(
        items
            .iter()
            .any(|i| i.subject.starts_with("Undeliverable: order 42") && i.is_read),
        "the NDR is marked read: {items:?}"
    );
    assert!(
        items
            .iter()
            .any(|i| i.subject.contains("something else") && !i.is_read),
        "the stranger is left alone: {items:?}"
    );

    // The next NDR arrives while the daemon is down.
    let sent = t.emu.message_count();
    send(&t, &["gone@example.org"]);
    assert!(
        t.emu.wait_for_messages(sent + 1, Duration::from_secs(15)),
        "{}",
        d.log_text()
    );
    assert!(d.stop().success());
    assert!(
        eventually(Duration::from_secs(10), || t
            .emu
            .mailbox_items(MAILBOX)
            .iter()
            .any(|i| i.subject.starts_with("Undeliverable")
                && !i.is_read
                && !i.subject.contains("something else"))),
        "the NDR landed"
    );
    let d = Daemon::start(&t.spool);
    assert!(
        eventually(Duration::from_secs(20), || dsns_to_sender(&t).len() == 2),
        "not missed: {}",
        d.log_text()
    );
    std::thread::sleep(Duration::from_secs(2));
    let log = d.log_text();
    assert_eq!(late_bounces(&log, "gone@example.org"), 1, "{log}");
    assert_eq!(
        late_bounces(&log, "nobody@example.org"),
        0,
        "not repeated: {log}"
    );
    assert_eq!(dsns_to_sender(&t).len(), 2, "{log}");
    assert!(d.stop().success());
}

#[test]
fn a_late_5_7_233_after_smtp_freezes_the_account_and_the_ndr_is_moved() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let mut cfg = tenant_config();
    cfg.token_port = port;
    let t = Tenant::with(
        cfg,
        Auth::Xoauth2,
        &format!(
            "harvest_bounces = true\n[account.graph]\nurl = \"https://localhost:{port}\"\nharvest_interval = \"1s\"\nafter_harvest = \"move:relay365 bounces\"\n"
        ),
    );
    t.emu.ndr_for("ext@example.org", "5.7.233", TENANT_LIMIT);
    let d = Daemon::start(&t.spool);
    send(&t, &["ext@example.org"]);
    // The account is frozen, so the DSN waits in the queue with everything else.
    assert!(
        eventually(Duration::from_secs(20), || t.queued().iter().any(|e| e
            .is_bounce
            && e.recipients[0].address.as_str() == "shop@contoso.com")),
        "{}",
        d.log_text()
    );
    let log = d.log_text();
    assert!(
        log.contains("status=sent (250"),
        "sent over SMTP first: {log}"
    );
    assert_eq!(late_bounces(&log, "ext@example.org"), 1, "{log}");
    assert!(
        log.contains("frozen until") && log.contains("after a late NDR"),
        "{log}"
    );
    let quota = stdout(&t.spool.relay365(&["quota"]));
    assert!(quota.contains("frozen until"), "{quota}");
    assert!(
        eventually(Duration::from_secs(5), || t
            .emu
            .mailbox_items(MAILBOX)
            .iter()
            .any(
                |i| i.subject.starts_with("Undeliverable") && i.folder != "inbox"
            )),
        "moved: {:?}",
        t.emu.mailbox_items(MAILBOX)
    );
    assert!(d.stop().success());
}

#[test]
fn the_harvester_pages_through_a_full_inbox_and_counts_what_it_cannot_match() {
    let t = Tenant::graph(
        tenant_config(),
        "",
        "harvest_bounces = true",
        "harvest_interval = \"1s\"",
        "",
    );
    // More strangers than one page (50) holds, all before the real NDR.
    for _ in 0..60 {
        t.emu.deliver_to_inbox(MAILBOX, STRANGER).unwrap();
    }
    t.emu.ndr_for("nobody@example.org", "5.1.1", NOT_FOUND);
    let d = Daemon::start(&t.spool);
    send(&t, &["nobody@example.org"]);
    assert!(
        eventually(Duration::from_secs(30), || dsns_to_sender(&t).len() == 1),
        "{}",
        d.log_text()
    );
    let log = d.log_text();
    assert!(log.contains("left alone (60 so far)"), "{log}");
    assert_eq!(late_bounces(&log, "nobody@example.org"), 1, "{log}");
    assert!(d.stop().success());
}
