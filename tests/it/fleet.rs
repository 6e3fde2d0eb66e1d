//! Many servers, one mailbox: relay365 daemons with separate spools sharing one quota
//! ledger through a real `redis-server` on loopback (started here, with its own port,
//! config and directory), against one Exchange Online emulator that counts the
//! mailbox's sends. Limits are scaled down ("30/6s") on both sides; the emulator
//! refuses anything over them with the real reply, so "no error reply" means the
//! server never saw a window over the limit.
//!
//! Under CI a missing `redis-server` fails these tests; elsewhere they are skipped.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use crate::harness::*;
use emu::{Fault, Stage};

const COUNT: u32 = 30;
const WINDOW: Duration = Duration::from_secs(6);

/// The reply Exchange Online sends when the mailbox's daily recipient quota is used up.
const QUOTA_REPLY: &str = "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to process message due to a permanent exception";

fn emulator() -> emu::Emulator {
    emu::Emulator::start(tenant_config().message_rate(COUNT, WINDOW)).expect("emulator")
}

/// One host of the fleet: its spool, named `host` in the shared ledger.
fn host(emu: &emu::Emulator, redis: &Redis, host: &str, hosts: u32) -> Spool {
    spool_for(
        emu,
        &redis.store_toml(host, hosts),
        &format!(
            "message_rate = \"{COUNT}/{}s\"\nconnections = 1\n",
            WINDOW.as_secs()
        ),
        &redis.secrets_toml(),
    )
}

/// Queues `n` messages to `<tag>-<i>@example.org`.
fn queue(spool: &Spool, n: usize, tag: &str) {
    for i in 0..n {
        let rcpt = format!("{tag}-{i}@example.org");
        assert_ok(&spool.sendmail(
            &["-i", &rcpt],
            format!("Subject: {tag} {i}\n\nx\n").as_bytes(),
        ));
    }
}

/// Accepted messages by tag (the part of the recipient before `-`), in order.
fn by_tag(emu: &emu::Emulator) -> BTreeMap<String, Vec<SystemTime>> {
    let mut out: BTreeMap<String, Vec<SystemTime>> = BTreeMap::new();
    for m in emu.messages() {
        for r in &m.rcpts {
            let tag = r.split('-').next().unwrap_or_default().to_owned();
            out.entry(tag).or_default().push(m.accepted_at);
        }
    }
    for v in out.values_mut() {
        v.sort();
    }
    out
}

fn delivered_once(emu: &emu::Emulator) -> (usize, usize) {
    let mut all: Vec<String> = emu
        .messages()
        .iter()
        .flat_map(|m| m.rcpts.clone())
        .collect();
    let n = all.len();
    all.sort();
    all.dedup();
    (n, all.len())
}

#[track_caller]
fn assert_never_over(emu: &emu::Emulator, logs: &str) {
    assert!(
        emu.max_in_window(WINDOW) <= COUNT,
        "a {WINDOW:?} window held {} messages (limit {COUNT})\n{logs}",
        emu.max_in_window(WINDOW)
    );
    assert!(
        emu.error_replies().is_empty(),
        "the server had to refuse: {:?}\n{logs}",
        emu.error_replies()
    );
}

fn logs(daemons: &[&Daemon]) -> String {
    daemons
        .iter()
        .enumerate()
        .map(|(i, d)| format!("--- host {i} ---\n{}", d.log_text()))
        .collect()
}

/// The share of the limit used while the queue drained, from the accepted times.
fn achieved_share(emu: &emu::Emulator) -> f64 {
    let mut t = emu.accepted_times();
    t.sort();
    let n = COUNT as usize;
    if t.len() <= n {
        return 0.0;
    }
    let gaps: f64 = (n..t.len())
        .map(|i| {
            t[i].duration_since(t[i - n])
                .unwrap_or_default()
                .as_secs_f64()
        })
        .sum();
    WINDOW.as_secs_f64() * (t.len() - n) as f64 / gaps
}

#[test]
fn three_hosts_share_one_mailbox_never_over_its_limit_and_none_starves() {
    let Some(redis) = Redis::start(None, false) else {
        return;
    };
    let emu = emulator();
    let spools: Vec<Spool> = ["web1", "web2", "web3"]
        .iter()
        .map(|h| host(&emu, &redis, h, 3))
        .collect();
    for (s, tag) in spools.iter().zip(["a", "b", "c"]) {
        queue(s, 100, tag);
    }
    let daemons: Vec<Daemon> = spools.iter().map(Daemon::start).collect();
    let refs: Vec<&Daemon> = daemons.iter().collect();
    assert!(
        emu.wait_for_messages(300, Duration::from_secs(180)),
        "{} of 300 delivered\n{}",
        emu.message_count(),
        logs(&refs)
    );
    assert_never_over(&emu, &logs(&refs));
    assert_eq!(
        delivered_once(&emu),
        (300, 300),
        "each message exactly once"
    );
    assert_eq!(emu.max_in_window(WINDOW), COUNT, "the limit is used");
    // No host starves: while all three have mail, each gets about a third of the room.
    let tags = by_tag(&emu);
    let first_done = tags
        .values()
        .filter_map(|v| v.last())
        .min()
        .copied()
        .unwrap();
    let mut all = emu.accepted_times();
    all.retain(|t| *t <= first_done);
    for (tag, times) in &tags {
        let mine = times.iter().filter(|t| **t <= first_done).count();
        assert!(
            mine * 4 >= all.len(),
            "host {tag} sent {mine} of the {} sent while all had mail\n{}",
            all.len(),
            logs(&refs)
        );
    }
    // Wall-clock share: reported, not asserted (a shared 2-core machine); bench/run
    // fleet measures it on the release build.
    eprintln!(
        "fleet of 3: {:.1} % of the limit used in aggregate (not asserted)",
        achieved_share(&emu) * 100.0
    );
    // `relay365 quota` on any host shows the fleet and each host's share.
    let out = spools[0].relay365(&["quota"]);
    assert_ok(&out);
    let text = stdout(&out);
    for h in ["web1", "web2", "web3"] {
        assert!(text.contains(h), "{text}");
    }
    assert!(text.contains(&redis.url()), "{text}");
}

#[test]
fn redis_killed_and_restarted_midway_loses_nothing_and_never_goes_over() {
    let Some(mut redis) = Redis::start(None, false) else {
        return;
    };
    let emu = emulator();
    let spools: Vec<Spool> = ["k1", "k2", "k3"]
        .iter()
        .map(|h| host(&emu, &redis, h, 3))
        .collect();
    for (s, tag) in spools.iter().zip(["a", "b", "c"]) {
        queue(s, 40, tag);
    }
    let daemons: Vec<Daemon> = spools.iter().map(Daemon::start).collect();
    let refs: Vec<&Daemon> = daemons.iter().collect();
    assert!(
        emu.wait_for_messages(40, Duration::from_secs(60)),
        "{}",
        logs(&refs)
    );
    redis.kill();
    let at_kill = emu.message_count();
    assert!(
        daemons
            .iter()
            .all(|d| d.wait_log("keeps to 1/3 of each limit", Duration::from_secs(20))),
        "{}",
        logs(&refs)
    );
    // Every host falls back; the outage is logged once per host.
    for d in &daemons {
        assert_eq!(
            d.log_text().matches("keeps to 1/3 of each limit").count(),
            1
        );
    }
    std::thread::sleep(WINDOW);
    redis.restart();
    assert!(
        emu.wait_for_messages(120, Duration::from_secs(120)),
        "{} of 120\n{}",
        emu.message_count(),
        logs(&refs)
    );
    assert_never_over(&emu, &logs(&refs));
    let (n, unique) = delivered_once(&emu);
    assert_eq!(unique, 120, "nothing lost");
    assert_eq!(n, 120, "nothing sent twice");
    assert!(
        daemons
            .iter()
            .any(|d| d.log_text().contains("answers again")),
        "reconciled\n{}",
        logs(&refs)
    );
    // The restarted server lost its data; every send since the kill is in its ledger
    // again: the fallback sends were pushed, the later ones reserved there.
    let entries: usize = redis
        .cli(&["ZCARD", "relay365:{app@contoso.com}:t"])
        .trim()
        .parse()
        .unwrap_or(0);
    assert!(
        entries >= 120 - at_kill,
        "{entries} entries in the store, {} sends since the kill\n{}",
        120 - at_kill,
        logs(&refs)
    );
}

#[test]
fn a_quota_reply_on_one_host_freezes_all_three() {
    let Some(redis) = Redis::start(None, false) else {
        return;
    };
    let emu = emulator();
    let spools: Vec<Spool> = ["f1", "f2", "f3"]
        .iter()
        .map(|h| host(&emu, &redis, h, 3))
        .collect();
    let daemons: Vec<Daemon> = spools.iter().map(Daemon::start).collect();
    let refs: Vec<&Daemon> = daemons.iter().collect();
    emu.inject(Fault::reply(Stage::AfterDot, QUOTA_REPLY));
    queue(&spools[0], 1, "first");
    assert!(
        daemons[0].wait_log("frozen until", Duration::from_secs(15)),
        "{}",
        logs(&refs)
    );
    let before = emu.message_count();
    for (s, tag) in spools.iter().zip(["a", "b", "c"]) {
        queue(s, 2, tag);
    }
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        emu.message_count(),
        before,
        "nothing sent while frozen\n{}",
        logs(&refs)
    );
    for s in &spools {
        let out = s.relay365(&["quota"]);
        assert!(stdout(&out).contains("frozen until"), "{}", stdout(&out));
        assert!(
            t_queued(s)
                .iter()
                .all(|e| e.reason.as_deref().is_some_and(|r| r.contains("frozen"))),
            "every host defers with the freeze: {:?}",
            t_queued(s)
                .iter()
                .map(|e| e.reason.clone())
                .collect::<Vec<_>>()
        );
    }
    // An administrator's thaw on one host releases all of them.
    assert_ok(&spools[1].relay365(&["quota", "--thaw", "app"]));
    for s in &spools {
        assert_ok(&s.relay365(&["flush", "--wake"]));
    }
    assert!(
        emu.wait_for_messages(before + 6 + 1, Duration::from_secs(30)),
        "{}",
        logs(&refs)
    );
}

/// The queue entries of a spool.
fn t_queued(s: &Spool) -> Vec<relay365::spool::queue::QueueEntry> {
    let q = relay365::spool::queue::Queue::new(&relay365::spool::paths::Spool::new(s.root()));
    q.ids()
        .unwrap_or_default()
        .iter()
        .filter_map(|id| q.read(id).ok())
        .collect()
}

#[test]
fn a_wrong_redis_password_is_named_and_mail_goes_within_the_local_share() {
    let Some(redis) = Redis::start(Some("right-pass-7"), false) else {
        return;
    };
    let emu = emulator();
    let spool = spool_for(
        &emu,
        &redis.store_toml("w1", 3),
        &format!(
            "message_rate = \"{COUNT}/{}s\"\nconnections = 1\n",
            WINDOW.as_secs()
        ),
        "[quota_store]\npassword = \"wrong-pass-9\"\n",
    );
    let out = spool.relay365(&["check"]);
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("authentication failed"), "{text}");
    assert!(text.contains("[quota_store]"), "{text}");
    assert!(
        !text.contains("wrong-pass-9"),
        "the password is never shown: {text}"
    );
    queue(&spool, 12, "p");
    let d = Daemon::start(&spool);
    assert!(
        emu.wait_for_messages(12, Duration::from_secs(60)),
        "{}",
        d.log_text()
    );
    let log = d.log_text();
    assert!(log.contains("authentication failed"), "{log}");
    assert!(!log.contains("wrong-pass-9"), "{log}");
    // `relay365 quota` says why the store does not answer and shows the local share.
    let out = spool.relay365(&["quota"]);
    let text = stdout(&out);
    assert!(
        text.contains("UNREACHABLE") && text.contains("authentication failed"),
        "{text}"
    );
    assert!(
        text.contains("1/3 of each limit") && text.contains("/10 in 6s window"),
        "{text}"
    );
    assert!(!text.contains("wrong-pass-9"), "{text}");
    // 1/3 of 30 per window: the first window holds at most 10 of them.
    assert!(emu.max_in_window(WINDOW) <= COUNT / 3, "{log}");
}

#[test]
fn a_tls_store_named_with_its_ca_file_is_shared() {
    let Some(redis) = Redis::start(Some("tls-pass-3"), true) else {
        return;
    };
    let emu = emulator();
    let spools: Vec<Spool> = ["t1", "t2"]
        .iter()
        .map(|h| host(&emu, &redis, h, 2))
        .collect();
    let out = spools[0].relay365(&["check"]);
    let text = stdout(&out);
    assert!(text.contains("quota store"), "{text}{}", stderr(&out));
    assert!(
        !text.contains("FAIL quota store") && text.contains("script"),
        "{text}"
    );
    for (s, tag) in spools.iter().zip(["a", "b"]) {
        queue(s, 20, tag);
    }
    let daemons: Vec<Daemon> = spools.iter().map(Daemon::start).collect();
    let refs: Vec<&Daemon> = daemons.iter().collect();
    assert!(
        emu.wait_for_messages(40, Duration::from_secs(60)),
        "{}",
        logs(&refs)
    );
    assert_never_over(&emu, &logs(&refs));
    assert!(!logs(&refs).contains("keeps to 1/2"), "{}", logs(&refs));
    let out = spools[1].relay365(&["quota"]);
    assert!(
        stdout(&out).contains("t1") && stdout(&out).contains("t2"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn kill_9_of_a_host_between_reservation_and_send_over_counts_and_loses_nothing() {
    let Some(redis) = Redis::start(None, false) else {
        return;
    };
    let emu = emulator();
    let a = host(&emu, &redis, "x1", 2);
    let b = host(&emu, &redis, "x2", 2);
    // The next transaction stalls after its reservation: MAIL gets no answer for a while.
    emu.inject(Fault::new(
        Stage::Mail,
        emu::Action::Stall(Duration::from_secs(30)),
    ));
    queue(&a, 1, "killed");
    let d = Daemon::start(&a);
    assert!(
        eventually(Duration::from_secs(15), || emu.connections_current() > 0),
        "{}",
        d.log_text()
    );
    std::thread::sleep(Duration::from_millis(500));
    drop(d); // SIGKILL with the reservation made and nothing sent
    emu.clear_faults();
    // The reservation still counts for the fleet: never given back early.
    let out = b.relay365(&["quota"]);
    let text = stdout(&out);
    assert!(text.contains("messages:   1/30"), "{text}");
    assert_eq!(emu.message_count(), 0);
    // The other host and the restarted one deliver everything, never over.
    queue(&b, 35, "other");
    let db = Daemon::start(&b);
    let da = Daemon::start(&a);
    assert!(
        emu.wait_for_messages(36, Duration::from_secs(60)),
        "{}\n{}",
        da.log_text(),
        db.log_text()
    );
    assert_never_over(&emu, &logs(&[&da, &db]));
    // 29 fit the first window beside the dead reservation: it over-counted, never under.
    let first = by_tag(&emu);
    assert_eq!(first.get("killed").map(Vec::len), Some(1));
}

#[test]
fn a_store_found_through_sentinel_is_shared() {
    let Some(redis) = Redis::start(Some("sentinel-pass-1"), false) else {
        return;
    };
    let sentinel = Sentinel::start(&redis);
    let emu = emulator();
    let spools: Vec<Spool> = ["s1", "s2"]
        .iter()
        .map(|h| {
            spool_for(
                &emu,
                &sentinel.store_toml(h, 2),
                &format!(
                    "message_rate = \"{COUNT}/{}s\"\nconnections = 1\n",
                    WINDOW.as_secs()
                ),
                &redis.secrets_toml(),
            )
        })
        .collect();
    let out = spools[0].relay365(&["check"]);
    assert!(
        stdout(&out).contains("ok:   quota store redis+sentinel://"),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    for (s, tag) in spools.iter().zip(["a", "b"]) {
        queue(s, 20, tag);
    }
    let daemons: Vec<Daemon> = spools.iter().map(Daemon::start).collect();
    let refs: Vec<&Daemon> = daemons.iter().collect();
    assert!(
        emu.wait_for_messages(40, Duration::from_secs(60)),
        "{}",
        logs(&refs)
    );
    assert_never_over(&emu, &logs(&refs));
    assert!(!logs(&refs).contains("keeps to 1/2"), "{}", logs(&refs));
    let text = stdout(&spools[0].relay365(&["quota"]));
    assert!(text.contains("s1") && text.contains("s2"), "{text}");
}
