//! Load: 20 callers send continuously through the real `sendmail` while one daemon
//! drains the queue into the emulator under Exchange Online's quotas scaled 30 times
//! (30 messages per 2 s instead of per minute, enforced by the emulator with the
//! quota reply), for 30 s by default and 10 minutes with `RELAY365_FULL=1`
//! (`RELAY365_LOAD_SECS` overrides). Nothing may be lost, sent twice or bounced, the
//! server may refuse for quota at most 1 % of the messages (counted and reported), and
//! the daemon's memory (VmRSS) and open descriptors must stay flat.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::*;
use crate::stress::*;

const CALLERS: u64 = 20;

/// Each message's tag and its sendmail's exit code.
type Sent = Arc<Mutex<Vec<(String, Option<i32>)>>>;

#[test]
fn twenty_callers_against_scaled_quotas_lose_nothing_and_stay_flat() {
    const T: &str = "load";
    let secs = size("RELAY365_LOAD_SECS", 30, 600);
    let mut cfg = tenant_config().max_connections_per_mailbox(3);
    cfg.message_rate = Some((30, Duration::from_secs(2)));
    cfg.recipient_rate = Some((10_000, Duration::from_secs(2880)));
    let t = Tenant::with(
        cfg,
        Auth::Login,
        "message_rate = \"30/2s\"\nrecipient_rate = \"10000/48m\"\nconnections = 3",
    );
    let config = t.spool.config.clone();
    let root = t.spool.root();
    let d = KillableDaemon::start_ready(&config, &t.spool.dir.path().join("daemon.log"));
    let pid = d.pid();
    let stop = Arc::new(AtomicBool::new(false));
    let counter = Arc::new(AtomicU64::new(0));
    let sent: Sent = Arc::default();
    let mut seed = Rng::new(T);
    let started = Instant::now();
    let callers: Vec<_> = (0..CALLERS)
        .map(|k| {
            let (stop, counter, sent, config) =
                (stop.clone(), counter.clone(), sent.clone(), config.clone());
            let mut rng = Rng(seed.next() ^ k);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let n = counter.fetch_add(1, Ordering::Relaxed);
                    let tag = tag("load", n);
                    let (code, _) = send_tagged(
                        &config,
                        &[format!("r{n}@example.org")],
                        tagged_message(&tag, 300 + rng.below(8000) as usize),
                    );
                    sent.lock().unwrap().push((tag, code));
                    // About 10 messages a second from the 20 callers: two thirds of
                    // the scaled quota, so the queue drains while it fills.
                    std::thread::sleep(Duration::from_millis(1000 + rng.below(2000)));
                }
            })
        })
        .collect();

    // Samples of the daemon: (seconds, VmRSS KiB, open fds, queue depth).
    let mut samples: Vec<(u64, u64, usize, usize)> = Vec::new();
    while started.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_secs(2));
        let (rss, fds) = proc_usage(pid).expect("the daemon is alive");
        samples.push((
            started.elapsed().as_secs(),
            rss,
            fds,
            scan_queue(&root).entries,
        ));
    }
    stop.store(true, Ordering::Relaxed);
    for c in callers {
        c.join().unwrap();
    }
    let sent = sent.lock().unwrap().clone();
    let must: Vec<&String> = sent
        .iter()
        .filter(|(_, c)| *c == Some(0))
        .map(|(t, _)| t)
        .collect();
    let drained = eventually(Duration::from_secs(180), || {
        t.emu.message_count() >= must.len() && t.queued().is_empty()
    });
    let drain_secs = started.elapsed().as_secs().saturating_sub(secs);
    let (rss_end, fds_end) = proc_usage(pid).expect("the daemon is alive");
    let log = d.log_text();
    let stopped = d.stop();
    let got = deliveries(&t.emu);
    let lost: Vec<&&String> = must.iter().filter(|t| !got.contains_key(**t)).collect();
    let twice = got.values().filter(|&&n| n > 1).count();
    // A quota refusal must only ever delay (freeze), never bounce or lose. At this
    // time scale the ledger's jitter guard is W/1000 = 2 ms, which a starved CPU can
    // exceed, so refusals are counted and reported rather than forbidden.
    let refusals = t.emu.reply_count(554) + t.emu.reply_count(550);
    let bounces = t
        .emu
        .messages()
        .iter()
        .filter(|m| String::from_utf8_lossy(&m.data).contains("multipart/report"))
        .count();

    // Flatness: after a warm-up of a fifth of the run, the highest of the last third
    // stays within the first third's highest plus a margin.
    let warm = samples.len() / 5;
    let steady = &samples[warm..];
    let third = (steady.len() / 3).max(1);
    let first = &steady[..third];
    let last = &steady[steady.len() - third..];
    let max = |s: &[(u64, u64, usize, usize)], f: fn(&(u64, u64, usize, usize)) -> u64| {
        s.iter().map(f).max().unwrap_or(0)
    };
    let rss_first = max(first, |s| s.1);
    let rss_last = max(last, |s| s.1);
    let fds_first = max(first, |s| s.2 as u64);
    let fds_last = max(last, |s| s.2 as u64);
    report(T, "seconds", secs);
    report(T, "callers", CALLERS);
    report(T, "messages_sent", must.len());
    report(T, "messages_delivered", got.values().sum::<usize>());
    report(T, "lost", lost.len());
    report(T, "delivered_twice", twice);
    report(T, "quota_refusals", refusals);
    report(
        T,
        "error_replies",
        t.emu
            .error_replies()
            .iter()
            .map(|r| r.chars().take(80).collect::<String>())
            .collect::<Vec<_>>()
            .join(" | "),
    );
    report(
        T,
        "quota_freezes_logged",
        log.matches("frozen until").count(),
    );
    report(
        T,
        "rate_per_second",
        format!("{:.1}", must.len() as f64 / secs as f64),
    );
    report(T, "max_queue_depth", max(&samples, |s| s.3 as u64));
    report(T, "drain_after_stop_seconds", drain_secs);
    report(T, "rss_kib_first_third_max", rss_first);
    report(T, "rss_kib_last_third_max", rss_last);
    report(T, "rss_kib_end", rss_end);
    report(T, "fds_first_third_max", fds_first);
    report(T, "fds_last_third_max", fds_last);
    report(T, "fds_end", fds_end);
    report(
        T,
        "rss_samples_kib",
        samples
            .iter()
            .step_by((samples.len() / 20).max(1))
            .map(|s| format!("{}s:{}", s.0, s.1))
            .collect::<Vec<_>>()
            .join(","),
    );
    assert!(stopped, "clean SIGTERM");
    assert_eq!(sent.len(), must.len(), "every sendmail exited 0");
    assert!(
        drained && lost.is_empty(),
        "lost {} of {}",
        lost.len(),
        must.len()
    );
    assert_eq!(twice, 0, "nothing twice without a crash");
    assert_eq!(bounces, 0, "no bounce: {:?}", t.emu.error_replies());
    assert!(
        refusals <= (must.len() as u64 / 100).max(2),
        "the ledger keeps within the quota: {refusals} refusals: {:?}",
        t.emu.error_replies().iter().take(3).collect::<Vec<_>>()
    );
    assert!(
        rss_last <= rss_first + rss_first / 4 + 4096,
        "daemon memory grew: {rss_first} KiB -> {rss_last} KiB"
    );
    assert!(
        fds_last <= fds_first + 3,
        "daemon descriptors grew: {fds_first} -> {fds_last}"
    );
}

/// CPU time (user + system, in clock ticks) a process has used.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
}

#[test]
fn a_queue_only_message_does_not_make_the_daemon_spin() {
    // Regression: a `sendmail -odq` message (and a message held while scheduled) was
    // rescheduled at its past next-attempt time after every "not due", so the daemon
    // re-dispatched it in a loop at full CPU until a queue run.
    const T: &str = "idle";
    let t = Tenant::new(Auth::Login);
    let d = KillableDaemon::start_ready(&t.spool.config, &t.spool.dir.path().join("daemon.log"));
    assert_ok(
        &t.spool
            .sendmail(&["-odq", "-i", "x@example.org"], b"Subject: later\n\nx\n"),
    );
    assert!(eventually(Duration::from_secs(10), || t.queued().len() == 1));
    let before = cpu_ticks(d.pid());
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_ticks(d.pid()) - before;
    report(T, "daemon_cpu_ticks_in_3s_with_an_odq_message", used);
    assert!(
        used < 50,
        "the daemon used {used} ticks of CPU in 3 s while idle"
    );
    assert_eq!(t.emu.message_count(), 0, "-odq waits for a queue run");
    assert_ok(&t.spool.sendmail(&["-q"], b""));
    assert!(
        t.emu.wait_for_messages(1, Duration::from_secs(10)),
        "{}",
        d.log_text()
    );
    assert!(d.stop());
}
