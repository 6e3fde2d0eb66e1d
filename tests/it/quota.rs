//! The quota governor end to end: the real daemon and `relay365 flush` against the
//! Exchange Online emulator enforcing the same limits, with windows scaled down to
//! seconds so a queue of several windows drains in a few seconds. The emulator refuses
//! anything over its limits with the real quota reply, so "no error reply" below means
//! the server never saw a window over the limit either.

use std::time::{Duration, SystemTime};

use crate::harness::*;
use emu::{Fault, Stage};

/// The scaled message limit used on both sides: 5 messages per 2 seconds.
const COUNT: u32 = 5;
const WINDOW: Duration = Duration::from_secs(2);

/// The reply Exchange Online sends when the mailbox's daily recipient quota is used up.
const QUOTA_REPLY: &str = "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to process message due to a permanent exception with message [BeginDiagnosticData]Cannot submit message. 0.35250:0A00AC8B [Hostname=SYBP282MB2635.AUSP282.PROD.OUTLOOK.COM][EndDiagnosticData] [SY5P282CA0097.outlook.office365.com 2025-11-23T11:12:20.123Z 08DE2A6028D26C22]";

/// The second mailbox of the tenant, routed by envelope sender.
const BILLING: &str = "billing@contoso.com";

fn rate_toml(count: u32) -> String {
    format!("message_rate = \"{count}/{}s\"\n", WINDOW.as_secs())
}

fn limited() -> emu::Config {
    tenant_config().message_rate(COUNT, WINDOW)
}

fn billing(extra: &str) -> ExtraAccount {
    ExtraAccount {
        name: "billing",
        mailbox: BILLING,
        extra: format!("senders = [\"*@billing.contoso.com\"]\n{extra}"),
    }
}

/// Queues `n` one-recipient messages with `sendmail -i`, named `<tag><i>@example.org`.
fn queue(spool: &Spool, n: usize, tag: &str, sender: Option<&str>) {
    for i in 0..n {
        let mut args = vec!["-i"];
        if let Some(s) = sender {
            args.extend(["-f", s]);
        }
        let rcpt = format!("{tag}{i}@example.org");
        args.push(&rcpt);
        assert_ok(&spool.sendmail(&args, format!("Subject: {tag} {i}\n\nx\n").as_bytes()));
    }
}

fn ledger_path(root: &std::path::Path, account: &str) -> std::path::PathBuf {
    root.join("state").join(format!("{account}.ledger"))
}

fn sorted(mut t: Vec<SystemTime>) -> Vec<SystemTime> {
    t.sort();
    t
}

fn secs(a: SystemTime, b: SystemTime) -> f64 {
    b.duration_since(a).unwrap_or_default().as_secs_f64()
}

/// The rate of a draining queue as a share of the limit, from the accepted times: a
/// queue that drains at exactly the limit sends message `i + count` one window after
/// message `i`, so the share is the window over the mean of those gaps.
fn achieved_share(times: &[SystemTime], count: u32) -> f64 {
    let t = sorted(times.to_vec());
    let n = count as usize;
    if t.len() <= n {
        return 0.0;
    }
    let gaps: f64 = (n..t.len()).map(|i| secs(t[i - n], t[i])).sum();
    WINDOW.as_secs_f64() * (t.len() - n) as f64 / gaps
}

/// Every delivered recipient, sorted, with duplicates.
fn delivered(t: &Tenant) -> Vec<String> {
    let mut r: Vec<String> = t
        .emu
        .messages()
        .iter()
        .flat_map(|m| m.rcpts.clone())
        .collect();
    r.sort();
    r
}

/// Asserts that the server never saw a window over the limit nor sent an error reply.
#[track_caller]
fn assert_within_limit(t: &Tenant, log: &str) {
    assert!(
        t.emu.max_in_window(WINDOW) <= COUNT,
        "a {WINDOW:?} window held {} messages (limit {COUNT}); accepted at {:?}\n{log}",
        t.emu.max_in_window(WINDOW),
        sorted(t.emu.accepted_times())
    );
    assert!(
        t.emu.error_replies().is_empty(),
        "the server never had to refuse: {:?}\n{log}",
        t.emu.error_replies()
    );
}

#[test]
fn a_queue_of_five_windows_drains_at_the_limit_and_never_over_it() {
    let t = Tenant::with(limited(), Auth::Login, &rate_toml(COUNT));
    let n = 5 * COUNT as usize;
    queue(&t.spool, n, "r", None);
    let d = Daemon::start(&t.spool);
    assert!(
        t.emu.wait_for_messages(n, Duration::from_secs(30)),
        "{}",
        d.log_text()
    );
    assert!(eventually(Duration::from_secs(5), || t.queued().is_empty()));
    assert_within_limit(&t, &d.log_text());
    assert_eq!(t.emu.max_in_window(WINDOW), COUNT, "the limit is used");
    // The share of the limit achieved depends on wall-clock time: a debug build's
    // transactions take ~50 ms on a busy machine, and the stamp lead that covers them
    // costs about that much of every 2 s window (a loaded 2-core machine measured
    // 89.9 %). So it is only reported here; bench/pacing measures the release build
    // against its goal of >= 97 % and records it in bench/RESULTS.md ("achieved share
    // of the limit").
    eprintln!(
        "achieved {:.1} % of the limit (not asserted); accepted at {:?}",
        achieved_share(&t.emu.accepted_times(), COUNT) * 100.0,
        sorted(t.emu.accepted_times())
    );
}

#[test]
fn kill_9_and_restart_in_the_middle_keeps_the_ledger() {
    let t = Tenant::with(limited(), Auth::Login, &rate_toml(COUNT));
    let n = 4 * COUNT as usize;
    queue(&t.spool, n, "k", None);
    let d = Daemon::start(&t.spool);
    // Into the second window: the first window's sends are only in the ledger now.
    assert!(
        t.emu
            .wait_for_messages(COUNT as usize + 2, Duration::from_secs(15)),
        "{}",
        d.log_text()
    );
    drop(d); // SIGKILL
    let d = Daemon::start(&t.spool);
    assert!(
        t.emu.wait_for_messages(n, Duration::from_secs(30)),
        "{}",
        d.log_text()
    );
    assert!(eventually(Duration::from_secs(5), || t.queued().is_empty()));
    assert_within_limit(&t, &d.log_text());
    let mut got = delivered(&t);
    got.dedup();
    assert_eq!(got.len(), n, "every message delivered");
    // A SIGTERM'd daemon and a flush after it keep to the same ledger.
    let d = d;
    assert!(d.stop().success());
    queue(&t.spool, COUNT as usize + 1, "f", None);
    let start = SystemTime::now();
    assert_ok(&t.flush());
    assert_within_limit(&t, "after the flush");
    assert!(t.queued().is_empty());
    assert!(
        secs(start, SystemTime::now()) < 10.0,
        "the flush waited for room, not for a backoff"
    );
}

#[test]
fn a_big_message_is_split_and_does_not_starve_small_ones() {
    // 10 recipients per 3 s and at most 4 per message, on both sides.
    let window = Duration::from_secs(3);
    let cfg = tenant_config()
        .recipient_rate(10, window)
        .max_recipients_per_message(4);
    let t = Tenant::with(
        cfg,
        Auth::Login,
        "recipient_rate = \"10/3s\"\nmax_recipients = 4\n",
    );
    queue(&t.spool, 1, "older", None);
    let big: Vec<String> = (0..22).map(|i| format!("big{i}@example.org")).collect();
    let mut args = vec!["-i"];
    args.extend(big.iter().map(String::as_str));
    assert_ok(&t.spool.sendmail(&args, b"Subject: newsletter\n\nx\n"));
    queue(&t.spool, 1, "newer", None);
    let d = Daemon::start(&t.spool);
    // Mail arriving while the big one is under way is not held up behind it either.
    assert!(eventually(Duration::from_secs(10), || t
        .emu
        .message_count()
        >= 2));
    queue(&t.spool, 1, "later", None);
    let total = 22 + 3;
    assert!(
        eventually(Duration::from_secs(30), || delivered(&t).len() >= total
            && t.queued().is_empty()),
        "{}",
        d.log_text()
    );
    let log = d.log_text();
    assert!(
        t.emu.error_replies().is_empty(),
        "{:?}\n{log}",
        t.emu.error_replies()
    );
    assert!(
        t.emu.max_recipients_in_window(window) <= 10,
        "{} recipients in a window\n{log}",
        t.emu.max_recipients_in_window(window)
    );
    let msgs = t.emu.messages();
    assert!(msgs.iter().all(|m| m.rcpts.len() <= 4));
    let mut got = delivered(&t);
    got.dedup();
    assert_eq!(got.len(), total, "every recipient exactly once: {got:?}");
    // The big one took at least three windows; the small ones did not wait for it.
    let when = |rcpt: &str| {
        msgs.iter()
            .find(|m| m.rcpts.iter().any(|r| r == rcpt))
            .map(|m| m.accepted_at)
            .unwrap()
    };
    let big_done = big.iter().map(|r| when(r)).max().unwrap();
    for small in [
        "older0@example.org",
        "newer0@example.org",
        "later0@example.org",
    ] {
        assert!(
            when(small) < big_done,
            "{small} waited for the whole big message\n{log}"
        );
    }
    assert!(when("older0@example.org") <= when("big0@example.org"));
}

#[test]
fn a_server_quota_reply_freezes_only_its_account() {
    let t = Tenant::with_accounts(tenant_config(), Auth::Login, "", &[billing("")]);
    let d = Daemon::start(&t.spool);
    t.emu.inject(Fault::reply(Stage::AfterDot, QUOTA_REPLY));
    queue(&t.spool, 1, "first", None);
    assert!(
        d.wait_log("frozen until", Duration::from_secs(10)),
        "{}",
        d.log_text()
    );
    queue(&t.spool, 3, "app", None);
    queue(&t.spool, 3, "bill", Some("invoices@billing.contoso.com"));
    assert!(
        eventually(Duration::from_secs(10), || t.emu.message_count() >= 3),
        "{}",
        d.log_text()
    );
    std::thread::sleep(Duration::from_millis(300));
    let msgs = t.emu.messages();
    assert_eq!(msgs.len(), 3, "only billing's mail went");
    assert!(msgs.iter().all(|m| m.mailbox.as_deref() == Some(BILLING)));
    assert_eq!(t.queued().len(), 4, "app's mail waits, nothing bounced");
    let quota = stdout(&t.spool.relay365(&["quota"]));
    let (app, bill) = quota.split_once("account billing").expect("both accounts");
    assert!(app.contains("frozen until"), "{quota}");
    assert!(!bill.contains("frozen"), "{quota}");
    let mailq = stdout(&t.spool.sendmail_as("mailq", &[], b""));
    assert!(
        mailq.contains("(quota: account app frozen") && mailq.contains("app0@example.org"),
        "{mailq}"
    );
    // The administrator's thaw lets it go at once.
    assert_ok(&t.spool.relay365(&["quota", "--thaw", "app"]));
    assert_ok(&t.spool.relay365(&["flush", "--wake"]));
    assert!(
        eventually(Duration::from_secs(10), || t.queued().is_empty()),
        "{}",
        d.log_text()
    );
    assert_eq!(t.emu.message_count(), 7);
}

#[test]
fn a_freeze_ends_by_itself_and_the_log_says_when_sending_resumes() {
    // A day scaled to 2 s: the server's quota reply, with a ledger that saw no such
    // count, freezes the account for one whole window.
    let t = Tenant::with(
        tenant_config(),
        Auth::Login,
        "recipient_rate = \"1000/2s\"\n",
    );
    let d = Daemon::start(&t.spool);
    t.emu
        .inject(Fault::reply(Stage::AfterDot, QUOTA_REPLY).times(1));
    queue(&t.spool, 1, "first", None);
    assert!(
        d.wait_log("frozen until", Duration::from_secs(10)),
        "{}",
        d.log_text()
    );
    queue(&t.spool, 1, "more", None);
    assert!(
        t.emu.wait_for_messages(2, Duration::from_secs(15)),
        "the account resumed by itself: {}",
        d.log_text()
    );
    let log = d.log_text();
    let resumed = "account app: the freeze until";
    assert_eq!(log.matches(resumed).count(), 1, "said once: {log}");
    let at = |needle: &str| log.find(needle).unwrap_or(usize::MAX);
    assert!(
        at("frozen until") < at(resumed) && at(resumed) < at("status=sent"),
        "frozen, then resumed, then sent: {log}"
    );
    assert!(
        log.contains("is over, sending resumes (it was: the mailbox reached its daily"),
        "{log}"
    );
    assert!(eventually(Duration::from_secs(5), || t.queued().is_empty()));
    let quota = stdout(&t.spool.relay365(&["quota"]));
    assert!(!quota.contains("frozen"), "{quota}");
}

#[test]
fn a_long_server_quota_reply_freezes_the_account_like_the_short_one() {
    // Real STOREDRV replies carry kilobytes of diagnostic text; lettre refused lines
    // over 1,000 bytes and so read this as "no reply" and only deferred.
    let mut long = QUOTA_REPLY.to_string();
    let diag = " Microsoft.Exchange.Data.Storage.SubmissionQuotaExceededException: Sender's submission quota was exceeded. at Microsoft.Exchange.Transport.Storage.Messaging.StoreDriverSubmission.SubmitMessage(MailItem item, SubmissionContext ctx) [Stage: CreateMessage] 0.35250:0A00AC8B, 1.36674:0A000000, 1.61250:00000000, 1.45378:02000000, 1.44866:0B000000, 1.36674:0A000000;";
    let at = long.find("[EndDiagnosticData]").unwrap_or(long.len());
    long.insert_str(at, &diag.repeat(6));
    assert!(long.len() > 1500, "{}", long.len());
    let t = Tenant::with(tenant_config(), Auth::Login, "");
    let d = Daemon::start(&t.spool);
    t.emu.inject(Fault::reply(Stage::AfterDot, &long));
    queue(&t.spool, 1, "first", None);
    assert!(
        d.wait_log("frozen until", Duration::from_secs(10)),
        "{}",
        d.log_text()
    );
    queue(&t.spool, 2, "more", None);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(t.emu.message_count(), 0, "{}", d.log_text());
    assert_eq!(t.queued().len(), 3, "the mail waits, nothing bounced");
    let quota = stdout(&t.spool.relay365(&["quota"]));
    assert!(quota.contains("frozen until"), "{quota}");
    // The reply was read, not taken for a dropped connection.
    let why: Vec<String> = t
        .queued()
        .iter()
        .flat_map(|e| {
            e.recipients
                .iter()
                .filter_map(|r| r.reply.clone())
                .chain(e.reason.clone())
        })
        .collect();
    assert!(!why.iter().any(|w| w.contains("no reply")), "{why:?}");
}

#[test]
fn two_accounts_drain_in_parallel_at_their_own_limits() {
    let t = Tenant::with_accounts(
        limited(),
        Auth::Login,
        &rate_toml(COUNT),
        &[billing(&rate_toml(3))],
    );
    queue(&t.spool, 3 * COUNT as usize, "app", None);
    queue(&t.spool, 9, "bill", Some("invoices@billing.contoso.com"));
    let d = Daemon::start(&t.spool);
    assert!(
        t.emu
            .wait_for_messages(3 * COUNT as usize + 9, Duration::from_secs(30)),
        "{}",
        d.log_text()
    );
    let log = d.log_text();
    assert!(
        t.emu.error_replies().is_empty(),
        "{:?}\n{log}",
        t.emu.error_replies()
    );
    assert_eq!(t.emu.max_in_window_for(MAILBOX, WINDOW), COUNT, "{log}");
    assert_eq!(t.emu.max_in_window_for(BILLING, WINDOW), 3, "{log}");
    let times = |mailbox: &str| {
        sorted(
            t.emu
                .messages()
                .iter()
                .filter(|m| m.mailbox.as_deref() == Some(mailbox))
                .map(|m| m.accepted_at)
                .collect(),
        )
    };
    let (app, bill) = (times(MAILBOX), times(BILLING));
    let t_spool = t.spool.root();
    // Each drains three windows' worth side by side, never faster than its limit
    // allows (two windows from the first send to the last). How close to two windows
    // it gets depends on wall-clock time and the machine's load, so that is only
    // reported; bench/pacing records the achieved share in bench/RESULTS.md.
    for (name, t, count) in [("app", &app, COUNT), ("billing", &bill, 3)] {
        let span = secs(t[0], t[t.len() - 1]);
        eprintln!(
            "{name}: three windows of {count} in {span:.2} s (2 windows = 4 s; not asserted)"
        );
        assert!(
            span >= 3.9,
            "{name} took {span:.2} s for three windows of {count}: {:?}\nledger {}\n{log}",
            t.iter()
                .map(|x| x
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap()
                    .as_millis())
                .collect::<Vec<_>>(),
            std::fs::read_to_string(crate::quota::ledger_path(&t_spool, name)).unwrap_or_default()
        );
    }
    assert!(
        bill[0] < app[COUNT as usize] && app[0] < bill[3],
        "in parallel, not one after the other: app {app:?} billing {bill:?}"
    );
}

#[test]
fn a_daemon_and_a_flush_together_stay_within_the_limit() {
    let t = Tenant::with(limited(), Auth::Login, &rate_toml(COUNT));
    let n = 4 * COUNT as usize;
    queue(&t.spool, n, "both", None);
    let d = Daemon::start(&t.spool);
    let out = t.flush();
    // The flush may end while the daemon still holds quota-deferred mail: 75 then.
    assert!(
        matches!(out.status.code(), Some(0 | 75)),
        "{}",
        stderr(&out)
    );
    assert!(
        eventually(Duration::from_secs(30), || t.queued().is_empty()),
        "{}",
        d.log_text()
    );
    let log = format!("{}\nflush: {}", d.log_text(), stderr(&out));
    assert_within_limit(&t, &log);
    let got = delivered(&t);
    let mut once = got.clone();
    once.dedup();
    assert_eq!(got.len(), n, "each exactly once: {got:?}");
    assert_eq!(once.len(), n);
    assert!(
        stderr(&out).contains("status=sent"),
        "the flush sent some itself: {log}"
    );
}

#[test]
fn quota_and_mailq_show_why_mail_waits() {
    // A long recipient window: the third message has to wait far longer than a
    // worker sleeps, so it is deferred with the reason.
    let t = Tenant::with(tenant_config(), Auth::Login, "recipient_rate = \"3/1h\"\n");
    assert_ok(&t.spool.sendmail(
        &["-i", "a@example.org", "b@example.org"],
        b"Subject: two\n\nx\n",
    ));
    queue(&t.spool, 1, "c", None);
    assert_ok(&t.flush());
    assert_eq!(t.emu.message_count(), 2);
    queue(&t.spool, 1, "waits", None);
    let out = t.flush();
    assert_left(&out);
    assert_eq!(t.emu.message_count(), 2, "{}", stderr(&out));
    let mailq = stdout(&t.spool.sendmail_as("mailq", &[], b""));
    assert!(
        mailq.contains("(quota: 3/3 recipients in 1h, room at ")
            && mailq.contains("UTC)")
            && mailq.contains("next attempt ")
            && mailq.contains("waits0@example.org"),
        "{mailq}"
    );
    let quota = stdout(&t.spool.relay365(&["quota"]));
    assert!(quota.contains("account app <app@contoso.com>"), "{quota}");
    assert!(
        quota.contains("messages:   2/30 in 1m window, 28 left"),
        "{quota}"
    );
    assert!(
        quota.contains("recipients: 3/3 in 1h window, 0 left, room at "),
        "{quota}"
    );
    assert!(t.emu.error_replies().is_empty());
}
