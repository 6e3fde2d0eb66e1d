//! Resource faults: the spool on a tiny tmpfs (root only; skipped with a notice
//! elsewhere, a failure in CI), filled to the last block or the last inode during
//! enqueue and during delivery (pickup, quota ledger, queue updates, DSN creation):
//! clear errors, EX_TEMPFAIL for callers, nothing half-written, nothing lost, and the
//! daemon carries on once space returns. And a spool that is missing or has wrong
//! modes: every program names the fix.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::harness::*;
use crate::stress::*;
use emu::{Action as FaultAction, Fault, Stage};

/// A tmpfs mounted over a directory for the life of the value.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str, inodes: u32) -> Tmpfs {
        std::fs::create_dir_all(at).expect("mount point");
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size},nr_inodes={inodes},mode=0755"))
            .arg("tmpfs")
            .arg(at)
            .status()
            .expect("mount");
        assert!(st.success(), "mount tmpfs on {}", at.display());
        Tmpfs(at.to_path_buf())
    }

    /// Uses up every free block with one file.
    fn fill_blocks(&self) -> PathBuf {
        let p = self.0.join("filler");
        let mut f = std::fs::File::create(&p).expect("filler");
        let chunk = vec![0u8; 4096];
        while f.write_all(&chunk).is_ok() {}
        // The last partial chunk may have filled only part of a page; finish it.
        while f.write_all(&[0u8]).is_ok() {}
        p
    }

    /// Uses up every free inode with empty files.
    fn fill_inodes(&self) -> PathBuf {
        let d = self.0.join("inodes");
        std::fs::create_dir(&d).expect("inode dir");
        let mut n = 0;
        while std::fs::File::create(d.join(n.to_string())).is_ok() {
            n += 1;
        }
        d
    }

    fn free(&self, filler: &Path) {
        if filler.is_dir() {
            std::fs::remove_dir_all(filler).expect("free inodes");
        } else {
            std::fs::remove_file(filler).expect("free blocks");
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Mounts a small tmpfs over an existing spool and recreates it there.
fn spool_on_tmpfs(spool: &Spool, size: &str, inodes: u32) -> Tmpfs {
    let fs = Tmpfs::mount(&spool.root(), size, inodes);
    assert_ok(&spool.relay365(&["init", "--private"]));
    fs
}

#[test]
fn enqueue_on_a_full_spool_is_tempfail_and_leaves_nothing() {
    const T: &str = "resources_enqueue";
    if !need_root(T) {
        return;
    }
    for what in ["blocks", "inodes"] {
        let s = Spool::new("");
        let fs = spool_on_tmpfs(&s, "256k", 64);
        let filler = if what == "blocks" {
            fs.fill_blocks()
        } else {
            fs.fill_inodes()
        };
        let out = s.sendmail(&["-i", "a@example.org"], b"Subject: s\n\nsmall\n");
        assert_fails(&out, 75, "full");
        assert!(stderr(&out).contains("not queued"), "{}", stderr(&out));
        assert_eq!(
            (s.count_files("incoming/new"), s.count_files("incoming/tmp")),
            (0, 0),
            "{what}: nothing half-written"
        );
        report(T, &format!("{what}_full_exit"), 75);
        report(
            T,
            &format!("{what}_full_message"),
            stderr(&out).trim().replace('\n', " "),
        );
        fs.free(&filler);
        assert_ok(&s.sendmail(&["-i", "a@example.org"], b"Subject: s\n\nsmall\n"));
        assert_eq!(s.incoming().len(), 1, "{what}: works again once freed");
    }
}

/// Pads the ledger with valid records (at its last stamp) up to a page boundary, so
/// that the next append needs a new block.
fn pad_ledger_to_page(path: &Path) {
    let text = std::fs::read_to_string(path).expect("ledger");
    let last_ms = text
        .lines()
        .skip(1)
        .filter_map(|l| l.split(' ').next())
        .filter_map(|m| m.parse::<u64>().ok())
        .last()
        .unwrap_or_else(|| relay365::spool::queue::micros(std::time::SystemTime::now()) / 1000);
    let len = text.len();
    let mut need = 4096 - len % 4096;
    if need < 512 {
        need += 4096;
    }
    // Lines "<13 digits> 1\n" are 16 bytes; "<13 digits> 10\n" 17.
    let k = need / 16;
    let extra = need - 16 * k;
    let mut pad = String::new();
    for i in 0..k {
        pad.push_str(&format!(
            "{last_ms} {}\n",
            if i < extra { "10" } else { "1" }
        ));
    }
    assert_eq!(pad.len(), need);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .expect("ledger");
    f.write_all(pad.as_bytes()).expect("pad ledger");
}

#[test]
fn delivery_on_a_full_spool_loses_nothing_and_recovers() {
    const T: &str = "resources_delivery";
    if !need_root(T) {
        return;
    }
    // The ledger padding below adds records; only the recipient window counts them.
    let t = Tenant::with(tenant_config(), Auth::Login, "message_rate = \"off\"");
    let fs = spool_on_tmpfs(&t.spool, "1m", 256);
    let root = t.spool.root();
    let ledger = root.join("state/app.ledger");
    let send = |n: usize| {
        let tag = tag("full", n as u64);
        let (code, err) = send_tagged(
            &t.spool.config,
            &["x@example.org".to_string()],
            tagged_message(&tag, 2000),
        );
        assert_eq!(code, Some(0), "{err}");
    };
    // A first delivery creates the ledger.
    send(0);
    assert_ok(&t.flush());
    assert_eq!(t.emu.message_count(), 1);

    // 1. Pickup cannot copy into the queue (blocks full): the files stay in incoming/.
    for n in 1..=3 {
        send(n);
    }
    let filler = fs.fill_blocks();
    let out = t.flush();
    let log = stderr(&out);
    assert!(
        log.contains("cannot queue") && log.contains("No space left"),
        "pickup says why: {log}"
    );
    assert_eq!(count(&root, "incoming/new"), 3, "still in incoming/: {log}");
    assert_eq!(t.emu.message_count(), 1);
    report(
        T,
        "pickup_error",
        log.lines()
            .find(|l| l.contains("cannot queue"))
            .unwrap_or(""),
    );
    fs.free(&filler);
    assert_ok(&t.flush());
    assert_eq!(t.emu.message_count(), 4, "delivered once space returned");

    // 2. The quota ledger cannot record the send: nothing is sent, all stays queued.
    t.emu
        .inject(Fault::reply(Stage::Greeting, "421 4.3.2 Service not active").times(1));
    send(4);
    assert_left(&t.flush()); // picked up, deferred
    assert_eq!(t.queued().len(), 1);
    pad_ledger_to_page(&ledger);
    let filler = fs.fill_blocks();
    let out = t.flush();
    let log = stderr(&out);
    assert!(
        log.contains("quota ledger") && log.contains("No space left"),
        "the ledger error is logged: {log}"
    );
    assert_eq!(
        t.emu.message_count(),
        4,
        "no send without its ledger record"
    );
    assert_eq!(t.queued().len(), 1, "nothing lost: {log}");
    report(
        T,
        "ledger_error",
        log.lines()
            .find(|l| l.contains("quota ledger"))
            .unwrap_or(""),
    );
    fs.free(&filler);
    assert_ok(&t.flush());
    assert_eq!(t.emu.message_count(), 5);
    assert!(t.queued().is_empty());

    // 3. Inodes exhausted while the daemon runs: new mail is refused with EX_TEMPFAIL,
    // queued mail still goes (updates fail, removal works), and the daemon recovers.
    t.emu
        .inject(Fault::reply(Stage::Greeting, "421 4.3.2 Service not active").times(1));
    send(5);
    assert_left(&t.flush());
    assert_eq!(t.queued().len(), 1);
    let d = KillableDaemon::start_ready(&t.spool.config, &t.spool.dir.path().join("daemon.log"));
    let filler = fs.fill_inodes();
    let (code, err) = send_tagged(
        &t.spool.config,
        &["x@example.org".to_string()],
        tagged_message(&tag("full", 99), 100),
    );
    assert_eq!(code, Some(75), "EX_TEMPFAIL while the spool is full: {err}");
    assert_ok(&t.spool.sendmail(&["-q"], b""));
    assert!(
        t.emu.wait_for_messages(6, Duration::from_secs(20)),
        "{}",
        d.log_text()
    );
    fs.free(&filler);
    for n in 6..=8 {
        send(n);
    }
    assert!(
        t.emu.wait_for_messages(9, Duration::from_secs(20)),
        "the daemon recovered: {}",
        d.log_text()
    );
    assert!(d.stop());
    let got = deliveries(&t.emu);
    for n in 0..=8 {
        assert!(got.contains_key(&tag("full", n)), "message {n} lost");
    }
    assert!(!got.contains_key(&tag("full", 99)));
    let twice = got.values().filter(|&&n| n > 1).count();
    report(T, "messages", 9);
    report(T, "lost", 0);
    report(T, "delivered_twice", twice);
    assert!(t.queued().is_empty());
    assert_eq!(count(&root, "quarantine"), 0);
}

#[test]
fn a_bounce_that_cannot_be_queued_keeps_the_message_until_it_can() {
    const T: &str = "resources_dsn";
    if !need_root(T) {
        return;
    }
    let t = Tenant::new(Auth::Login);
    let fs = spool_on_tmpfs(&t.spool, "1m", 256);
    assert_ok(&t.spool.sendmail(
        &["-i", "-f", "shop@contoso.com", "bad@example.org"],
        b"Subject: doomed\n\nx\n",
    ));
    t.emu
        .inject(Fault::reply(Stage::Greeting, "421 4.3.2 Service not active").times(1));
    assert_left(&t.flush()); // picked up and deferred
    assert_eq!(t.queued().len(), 1);
    t.emu.inject(
        Fault::new(
            Stage::Rcpt(Some("bad@example.org".into())),
            FaultAction::Reply("550 5.1.10 RESOLVER.ADR.RecipientNotFound".into()),
        )
        .forever(),
    );
    let filler = fs.fill_inodes();
    let out = t.flush();
    let log = stderr(&out);
    assert!(
        log.contains("cannot queue the bounce"),
        "the DSN failure is logged: {log}"
    );
    assert_eq!(
        t.queued().len(),
        1,
        "the message stays until its bounce is queued: {log}"
    );
    report(
        T,
        "dsn_error",
        log.lines()
            .find(|l| l.contains("cannot queue the bounce"))
            .unwrap_or(""),
    );
    fs.free(&filler);
    let out = t.flush();
    let dsn = t
        .emu
        .messages()
        .into_iter()
        .find(|m| String::from_utf8_lossy(&m.data).contains("multipart/report"));
    assert!(dsn.is_some(), "the bounce went out: {}", stderr(&out));
    assert_eq!(dsn.unwrap().rcpts, ["shop@contoso.com"]);
    assert!(t.queued().is_empty(), "{:?}", t.queued());
}

#[test]
fn a_message_refused_at_pickup_for_every_recipient_is_bounced_not_kept_forever() {
    // Regression: a message whose every recipient failed at pickup (an unknown local
    // user with no admin address) was never scheduled: no bounce, queued forever.
    let dir = tempfile::tempdir().unwrap();
    let maildir = dir.path().join("Maildir");
    let aliases = dir.path().join("aliases");
    std::fs::write(&aliases, "root: ops@contoso.com\n").unwrap();
    let s = Spool::new_in(
        dir,
        &format!(
            "aliases = \"{}\"\n[[account]]\nname = \"staging\"\nmailbox = \"app@contoso.com\"\nauth = \"none\"\ntransport = \"maildir:{}\"\n",
            aliases.display(),
            maildir.display()
        ),
    );
    assert_ok(&s.sendmail(
        &["-i", "-f", "shop@contoso.com", "nosuchuser-xyz@localhost"],
        b"Subject: s\n\nx\n",
    ));
    let out = s.relay365(&["flush", "-v"]);
    assert_ok(&out);
    let files: Vec<_> = std::fs::read_dir(maildir.join("new"))
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    assert_eq!(files.len(), 1, "one bounce: {}", stderr(&out));
    let text = std::fs::read_to_string(files[0].path()).unwrap();
    assert!(
        text.contains("X-Envelope-To: <shop@contoso.com>") && text.contains("multipart/report"),
        "{text}"
    );
    assert_eq!(s.count_files("queue"), 0, "{}", stderr(&out));
}

#[test]
fn a_full_spool_with_a_long_backlog_stops_the_pickup_and_the_daemon_still_answers() {
    // Regression: with more than one chunk (256) waiting and the queue unwritable, the
    // pickup re-read the same chunk forever: a million log lines, a busy CPU, SIGTERM
    // ignored (the daemon never got back to its poll).
    const T: &str = "resources_backlog";
    if !need_root(T) {
        return;
    }
    let s = Spool::new("");
    let fs = spool_on_tmpfs(&s, "4m", 2048);
    let n = 300;
    plant_incoming(&s, n);
    let filler = fs.fill_blocks();
    let d = Daemon::start(&s);
    assert_ok(&s.sendmail(&["-q"], b""));
    assert!(
        d.wait_log("queue run requested", Duration::from_secs(2)),
        "the daemon answers a trigger: {}",
        d.log_text()
    );
    // The new file and the trigger each start a pass; the fault is logged once.
    std::thread::sleep(Duration::from_millis(500));
    let log = d.log_text();
    let faults = log.matches("cannot queue").count();
    assert_eq!(faults, 1, "the fault is logged once: {log}");
    assert!(
        log.contains("No space left") && log.contains("wait in incoming/"),
        "{log}"
    );
    assert!(log.lines().count() < 20, "log lines bounded: {log}");
    assert_eq!(count(&s.root(), "incoming/new"), n, "nothing lost: {log}");
    report(T, "backlog", n);
    report(T, "fault_lines", faults);
    let asked = std::time::Instant::now();
    let status = d.stop();
    let took = asked.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(
        took < Duration::from_secs(1),
        "SIGTERM answered in {took:?}"
    );
    report(T, "sigterm_ms", took.as_millis());

    // Space returns: the whole backlog is picked up.
    fs.free(&filler);
    let d = Daemon::start(&s);
    assert!(
        eventually(Duration::from_secs(20), || count(&s.root(), "incoming/new")
            == 0),
        "the backlog was picked up: {}",
        d.log_text()
    );
    assert_eq!(count(&s.root(), "quarantine"), 0, "{}", d.log_text());
    drop(d);
}

#[test]
fn a_missing_spool_names_the_fix_everywhere() {
    const T: &str = "resources_missing";
    for sub in ["state", "queue", "incoming/new"] {
        let t = Tenant::new(Auth::Login);
        std::fs::remove_dir_all(t.spool.root().join(sub)).unwrap();
        let daemon = t.spool.relay365(&["daemon"]);
        assert!(!daemon.status.success(), "{sub}");
        assert!(
            stderr(&daemon).contains("relay365 init"),
            "daemon without {sub}: {}",
            stderr(&daemon)
        );
        let flush = t.flush();
        assert!(
            !flush.status.success() && stderr(&flush).contains("relay365 init"),
            "flush without {sub}: {}",
            stderr(&flush)
        );
        let check = t.spool.relay365(&["check"]);
        assert_eq!(check.status.code(), Some(78), "{sub}");
        assert!(
            stdout(&check).contains("missing: run relay365 init"),
            "check without {sub}: {}",
            stdout(&check)
        );
        report(
            T,
            &format!("daemon_without_{}", sub.replace('/', "_")),
            stderr(&daemon).trim(),
        );
    }
    let t = Tenant::new(Auth::Login);
    std::fs::remove_dir_all(t.spool.root().join("incoming")).unwrap();
    let out = t
        .spool
        .sendmail(&["-i", "x@example.org"], b"Subject: s\n\nx\n");
    assert_fails(&out, 73, "relay365 init");
    report(T, "sendmail_without_incoming", stderr(&out).trim());
}

#[test]
fn wrong_spool_modes_are_reported_with_the_fix() {
    use std::os::unix::fs::PermissionsExt;
    const T: &str = "resources_modes";
    let t = Tenant::new(Auth::Login);
    let new = t.spool.root().join("incoming/new");
    std::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o777)).unwrap();
    let check = t.spool.relay365(&["check"]);
    assert_eq!(check.status.code(), Some(78));
    assert!(
        stdout(&check).contains("has mode 0777, expected 1770: run relay365 init"),
        "{}",
        stdout(&check)
    );
    let d = KillableDaemon::start_ready(&t.spool.config, &t.spool.dir.path().join("daemon.log"));
    let log = d.log_text();
    assert!(
        log.contains("spool:") && log.contains("expected 1770: run relay365 init"),
        "the daemon warns at start: {log}"
    );
    assert!(d.stop());
    report(
        T,
        "daemon_warning",
        log.lines().find(|l| l.contains("spool:")).unwrap_or(""),
    );
    assert_ok(&t.spool.relay365(&["init", "--private"]));
    assert!(stdout(&t.spool.relay365(&["check"])).contains("matches the path table"));
}
