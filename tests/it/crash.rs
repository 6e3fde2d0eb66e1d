//! Crash tests: continuous load through the real `sendmail` into a real daemon that
//! delivers to the Exchange Online emulator, while `sendmail` processes and the daemon
//! are SIGKILLed at random instants (the daemon restarted each time). Afterwards every
//! message whose `sendmail` exited 0 reached the server exactly once — or once more for
//! each kill that fell between the server's final reply and the queue update recording
//! it (counted by Message-ID at the emulator and reported) — and the queue never held a
//! corrupt entry, an entry without its message, or a quarantined (partial) file.
//!
//! Sizes: ~100 sendmail and ~30 daemon kills by default (CI); 1,000 of each with
//! `RELAY365_FULL=1`; or `RELAY365_SENDMAIL_KILLS` / `RELAY365_DAEMON_KILLS`.

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::*;
use crate::stress::*;

/// How a `sendmail` run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// Exit 0: the message must be delivered.
    Queued,
    /// A refusal with an exit status (must not be delivered... nor is it lost: the
    /// caller was told).
    Refused(i32),
    /// SIGKILLed before it could exit: either outcome is allowed, but never twice.
    Killed,
}

/// Connections (so transactions in flight at once) of the daemon's account.
const CONNECTIONS: u64 = 3;

#[test]
fn kill9_of_sendmail_and_daemon_under_load_loses_and_corrupts_nothing() {
    const T: &str = "crash";
    let sendmail_kills = size("RELAY365_SENDMAIL_KILLS", 100, 1000);
    let daemon_kills = size("RELAY365_DAEMON_KILLS", 30, 1000);
    let mut rng = Rng::new(T);
    let mut cfg = tenant_config();
    cfg.message_rate = None;
    cfg.recipient_rate = None;
    cfg.max_connections_per_mailbox = None;
    let t = Tenant::with(
        cfg,
        Auth::Login,
        &format!("message_rate = \"off\"\nrecipient_rate = \"off\"\nconnections = {CONNECTIONS}"),
    );
    let config = t.spool.config.clone();
    let root = t.spool.root();
    let log = t.spool.dir.path().join("daemon.log");
    let started = Instant::now();

    let outcomes: Arc<Mutex<HashMap<String, Ended>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let counter = Arc::new(AtomicU64::new(0));
    let ended = |status: std::process::ExitStatus| match (status.code(), status.signal()) {
        (Some(0), _) => Ended::Queued,
        (Some(c), _) => Ended::Refused(c),
        (None, _) => Ended::Killed,
    };

    // Continuous load: three callers sending back to back.
    let loaders: Vec<_> = (0..3u64)
        .map(|k| {
            let (outcomes, stop, counter, config) = (
                outcomes.clone(),
                stop.clone(),
                counter.clone(),
                config.clone(),
            );
            let mut rng = Rng(rng.next() ^ k);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let n = counter.fetch_add(1, Ordering::Relaxed);
                    let tag = tag("load", n);
                    let rcpts: Vec<String> = (0..1 + rng.below(3))
                        .map(|i| format!("r{n}-{i}@example.org"))
                        .collect();
                    let msg = tagged_message(&tag, 200 + rng.below(20_000) as usize);
                    let child = spawn_sendmail(&config, &rcpts, msg);
                    let out = child.wait_with_output().expect("wait");
                    outcomes.lock().unwrap().insert(tag, ended(out.status));
                    // About 20 messages a second from the three: a steady load that a
                    // daemon killed every few hundred milliseconds still works off.
                    std::thread::sleep(Duration::from_millis(100 + rng.below(100)));
                }
            })
        })
        .collect();

    // The sendmail killer: random instants over a sendmail's whole life (start-up,
    // reading stdin, writing tmp/, fsync, rename, directory fsync).
    let killer = {
        let (outcomes, config) = (outcomes.clone(), config.clone());
        let mut rng = Rng(rng.next());
        std::thread::spawn(move || {
            let mut killed = 0;
            for n in 0..sendmail_kills {
                let tag = tag("victim", n);
                let msg = tagged_message(&tag, 100 + rng.below(300_000) as usize);
                let mut child = spawn_sendmail(&config, &[format!("v{n}@example.org")], msg);
                std::thread::sleep(Duration::from_micros(rng.below(12_000)));
                let _ = child.kill();
                let status = child.wait().expect("wait");
                let e = ended(status);
                if e == Ended::Killed {
                    killed += 1;
                }
                outcomes.lock().unwrap().insert(tag, e);
            }
            killed
        })
    };

    // The daemon killer: start, let it run a random while, kill -9, check the queue.
    let mut worst_orphans = 0;
    let mut worst_tmp = 0;
    let started_count = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("daemon started")
            .count()
    };
    let mut while_running = 0;
    for k in 0..daemon_kills {
        let before = started_count();
        let d = KillableDaemon::start(&config, &log);
        if k % 2 == 1 {
            // Half the kills land while the daemon works (picking up, delivering,
            // recording), whatever its start-up costs on a busy machine...
            if eventually(Duration::from_secs(10), || started_count() > before) {
                while_running += 1;
            }
            std::thread::sleep(Duration::from_micros(rng.below(250_000)));
        } else {
            // ...the other half anywhere from exec on, start-up included.
            std::thread::sleep(Duration::from_micros(rng.below(400_000)));
        }
        d.kill9();
        let scan = scan_queue(&root);
        assert!(
            scan.corrupt.is_empty() && scan.without_message.is_empty(),
            "after daemon kill {k}: {scan:?}"
        );
        worst_orphans = worst_orphans.max(scan.orphan_messages);
        worst_tmp = worst_tmp.max(scan.temporaries);
    }
    let sendmail_killed: u64 = killer.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    for l in loaders {
        l.join().unwrap();
    }
    let kill_phase = started.elapsed();

    // Let a daemon finish the work; `sendmail -q` skips any backoff a kill caused.
    let outcomes = outcomes.lock().unwrap().clone();
    let must: Vec<&String> = outcomes
        .iter()
        .filter(|(_, e)| **e == Ended::Queued)
        .map(|(t, _)| t)
        .collect();
    // Ready before the first check: when the kill phase left nothing to do, the SIGTERM
    // below follows at once and must not land before the daemon handles it.
    let d = KillableDaemon::start_ready(&config, &log);
    let done = eventually(Duration::from_secs(300 + must.len() as u64 / 20), || {
        let got = deliveries(&t.emu);
        if must.iter().all(|t| got.contains_key(*t)) && t.queued().is_empty() {
            return true;
        }
        let _ = t.spool.sendmail(&["-q"], b"");
        std::thread::sleep(Duration::from_millis(500));
        false
    });
    let stopped = d.stop();
    let got = deliveries(&t.emu);
    let missing: Vec<&&String> = must.iter().filter(|t| !got.contains_key(**t)).collect();
    // A kill after the final dot left the client and before the queue update recording
    // the reply costs one extra copy of each message in that window (the retry cannot
    // know the server took it): at most one per connection per kill. A message caught
    // that way by two kills in a row is sent three times.
    let twice: Vec<(&String, &usize)> = got.iter().filter(|(_, n)| **n > 1).collect();
    let extra: u64 = twice.iter().map(|(_, n)| **n as u64 - 1).sum();
    let unknown: Vec<&String> = got.keys().filter(|t| !outcomes.contains_key(*t)).collect();
    let scan = scan_queue(&root);
    let killed_delivered = outcomes
        .iter()
        .filter(|(t, e)| **e == Ended::Killed && got.contains_key(*t))
        .count();
    let refused = outcomes
        .values()
        .filter(|e| matches!(e, Ended::Refused(_)))
        .count();
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();

    // The numbers first, so that a failing run still reports them.
    report(T, "sendmail_runs", outcomes.len());
    report(T, "sendmail_exit0", must.len());
    report(T, "sendmail_refused", refused);
    report(T, "sendmail_sigkilled", sendmail_killed);
    report(T, "sigkilled_but_delivered", killed_delivered);
    report(T, "daemon_sigkills", daemon_kills);
    report(T, "daemon_sigkills_after_startup", while_running);
    report(
        T,
        "daemon_starts_logged",
        log_text.matches("daemon started").count(),
    );
    report(T, "messages_at_server", got.values().sum::<usize>());
    report(T, "lost", missing.len());
    report(
        T,
        "delivered_twice",
        twice.iter().filter(|(_, n)| **n == 2).count(),
    );
    report(
        T,
        "delivered_three_times_or_more",
        twice.iter().filter(|(_, n)| **n > 2).count(),
    );
    report(T, "extra_copies", extra);
    report(
        T,
        "delivered_twice_ids",
        twice
            .iter()
            .take(20)
            .map(|(t, n)| format!("{t}x{n}"))
            .collect::<Vec<_>>()
            .join(","),
    );
    report(T, "corrupt_entries", scan.corrupt.len());
    report(T, "entries_without_message", scan.without_message.len());
    report(T, "max_orphan_msg_after_kill", worst_orphans);
    report(T, "max_tmp_files_after_kill", worst_tmp);
    report(T, "orphan_msg_at_end", scan.orphan_messages);
    report(T, "incoming_tmp_leftovers", count(&root, "incoming/tmp"));
    report(T, "quarantined", count(&root, "quarantine"));
    report(T, "kill_phase_seconds", kill_phase.as_secs());
    report(T, "total_seconds", started.elapsed().as_secs());

    if std::env::var_os("RELAY365_CRASH_DEBUG").is_some() {
        for (tag, n) in &twice {
            let ids: std::collections::HashSet<&str> = log_text
                .lines()
                .filter(|l| l.contains(tag.as_str()))
                .filter_map(|l| l.split(": ").nth(1))
                .collect();
            eprintln!("== {tag} x{n}: {ids:?}");
            for l in log_text.lines() {
                if ids.iter().any(|id| l.contains(id)) || l.contains("daemon started") {
                    eprintln!("   {l}");
                }
            }
        }
    }
    assert!(stopped, "the last daemon stops cleanly on SIGTERM");
    assert!(
        done && missing.is_empty(),
        "{} of {} messages whose sendmail exited 0 were never delivered: {:?}",
        missing.len(),
        must.len(),
        missing.iter().take(10).collect::<Vec<_>>()
    );
    assert!(
        extra <= daemon_kills * CONNECTIONS,
        "every extra copy needs a daemon kill in the window: {extra} extra copies, {daemon_kills} kills"
    );
    assert!(unknown.is_empty(), "deliveries nobody sent: {unknown:?}");
    assert!(
        scan.corrupt.is_empty() && scan.without_message.is_empty() && scan.entries == 0,
        "{scan:?}"
    );
    assert_eq!(count(&root, "incoming/new"), 0);
    assert_eq!(
        count(&root, "quarantine"),
        0,
        "a killed sendmail never leaves a partial file for the pickup"
    );
    assert_eq!(refused, 0, "no sendmail refused a message: {outcomes:?}");
}
