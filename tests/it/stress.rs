//! Shared machinery of the reliability tests (crash, resources, server faults,
//! privilege, load): run sizes (the CI subset or the full run), a seeded random
//! source, a sender that tags each message with a unique Message-ID, a daemon that can
//! be SIGKILLed and restarted, queue integrity checks, and the `[reliability]` lines
//! that `tests/system/reliability/run` collects into the numbers of tests/RELIABILITY.md.
//!
//! Trusts the test's own processes; everything it reads from the spool is checked.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::*;

/// Whether the full (long) versions run: `RELAY365_FULL=1` (set by `tests/system/reliability/run --full`).
pub fn full() -> bool {
    std::env::var_os("RELAY365_FULL").is_some_and(|v| !v.is_empty() && v != "0")
}

/// `ci` in the default (CI) run, `full` with `RELAY365_FULL=1`; either can be
/// overridden with the environment variable `name` (e.g. `RELAY365_DAEMON_KILLS=200`).
pub fn size(name: &str, ci: u64, full_size: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full() { full_size } else { ci })
}

/// Prints one result line; `tests/system/reliability/run` collects them.
pub fn report(test: &str, key: &str, value: impl std::fmt::Display) {
    let line = format!("[reliability] {test}: {key}={value}");
    println!("{line}");
    if let Some(path) = std::env::var_os("RELAY365_RELIABILITY_OUT")
        && let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    {
        let _ = writeln!(f, "{line}");
    }
}

/// Whether a test that needs root may be skipped here: not root and not in CI.
/// In CI (`CI` set) a missing privilege is a failure, never a silent skip.
pub fn need_root(test: &str) -> bool {
    if is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test} needs root, and CI must run it"
    );
    eprintln!("skipped {test}: needs root (CI runs it as root)");
    false
}

/// xorshift64*: reproducible random instants; the seed is printed with the results.
pub struct Rng(pub u64);

impl Rng {
    pub fn new(test: &str) -> Rng {
        let seed = std::env::var("RELAY365_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
                    | 1
            });
        report(test, "seed", seed);
        Rng(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
}

/// The Message-ID tag of message `n` of a run.
pub fn tag(prefix: &str, n: u64) -> String {
    format!("{prefix}-{n}@reliability.test")
}

/// A message carrying `Message-ID: <tag>` with a body of `body_len` bytes.
pub fn tagged_message(tag: &str, body_len: usize) -> Vec<u8> {
    let mut m = format!("Message-ID: <{tag}>\nSubject: {tag}\n\n").into_bytes();
    let line = b"0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz\n";
    while m.len() < body_len {
        m.extend_from_slice(line);
    }
    m
}

/// Starts `sendmail -C config -i -f shop@contoso.com rcpt...` with the message on
/// stdin (written by a thread so a kill never blocks the test).
pub fn spawn_sendmail(config: &Path, rcpts: &[String], message: Vec<u8>) -> Child {
    let mut child = Command::new(SENDMAIL)
        .arg("-C")
        .arg(config)
        .args(["-i", "-f", "shop@contoso.com"])
        .args(rcpts)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sendmail");
    if let Some(mut stdin) = child.stdin.take() {
        std::thread::spawn(move || {
            let _ = stdin.write_all(&message);
        });
    }
    child
}

/// Runs one sendmail to completion; returns its exit code (`None` if killed) and stderr.
pub fn send_tagged(config: &Path, rcpts: &[String], message: Vec<u8>) -> (Option<i32>, String) {
    let child = spawn_sendmail(config, rcpts, message);
    let out = child.wait_with_output().expect("wait sendmail");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// How often each Message-ID reached the emulator.
pub fn deliveries(emu: &emu::Emulator) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for m in emu.messages() {
        if let Some(id) = m.header("Message-ID") {
            let id = id.trim().trim_start_matches('<').trim_end_matches('>');
            *seen.entry(id.to_string()).or_insert(0) += 1;
        }
    }
    seen
}

/// A `relay365 daemon` whose stderr goes to a file; SIGKILLed on drop.
pub struct KillableDaemon {
    pub child: Child,
    pub log: PathBuf,
}

impl KillableDaemon {
    pub fn start(config: &Path, log: &Path) -> KillableDaemon {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("daemon log");
        // The file stands for the journal (JOURNAL_STREAM names it, as systemd names
        // a service's stderr): the daemon writes its lines there and not to syslog,
        // whether or not this machine has /dev/log.
        let st = nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&file)).expect("fstat");
        let child = Command::new(RELAY365)
            .arg("--config")
            .arg(config)
            .arg("daemon")
            .env("JOURNAL_STREAM", format!("{}:{}", st.st_dev, st.st_ino))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn daemon");
        KillableDaemon {
            child,
            log: log.to_path_buf(),
        }
    }

    /// Starts it and waits (bounded) until it says it started, so that a SIGTERM sent
    /// next finds the signal handling in place. The log may be shared with daemons
    /// started (and killed) before, so it waits for one more start line than it saw.
    pub fn start_ready(config: &Path, log: &Path) -> KillableDaemon {
        let starts = |text: String| text.matches("daemon started").count();
        let before = starts(std::fs::read_to_string(log).unwrap_or_default());
        let d = KillableDaemon::start(config, log);
        assert!(
            eventually(Duration::from_secs(10), || starts(d.log_text()) > before),
            "{}",
            d.log_text()
        );
        d
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait (bounded); true on a clean exit 0.
    pub fn stop(mut self) -> bool {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGTERM,
        );
        let end = Instant::now() + Duration::from_secs(30);
        while Instant::now() < end {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for KillableDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What is in a spool's queue directory, checked.
#[derive(Debug, Default)]
pub struct QueueScan {
    pub entries: usize,
    /// `.env` files that do not parse (must always be zero).
    pub corrupt: Vec<String>,
    /// `.env` without its `.msg` (must always be zero: an entry must never lose its message).
    pub without_message: Vec<String>,
    /// `.msg` without `.env`: a crash between the two writes of an insert or remove.
    pub orphan_messages: usize,
    /// Leftover temporary entry files of a crashed update.
    pub temporaries: usize,
}

/// Reads every file of `queue/`: every `.env` must parse and have its `.msg`.
pub fn scan_queue(spool_root: &Path) -> QueueScan {
    let dir = spool_root.join("queue");
    let mut scan = QueueScan::default();
    let names: Vec<String> = std::fs::read_dir(&dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    for name in &names {
        if let Some(stem) = name.strip_suffix(".env") {
            if name.starts_with('.') {
                continue;
            }
            scan.entries += 1;
            if relay365::spool::queue::read_entry(&dir.join(name)).is_err() {
                scan.corrupt.push(name.clone());
            }
            if !dir.join(format!("{stem}.msg")).exists() {
                scan.without_message.push(name.clone());
            }
        } else if let Some(stem) = name.strip_suffix(".msg") {
            if !dir.join(format!("{stem}.env")).exists() {
                scan.orphan_messages += 1;
            }
        } else if name.ends_with(".tmp") {
            scan.temporaries += 1;
        }
    }
    scan
}

/// Files directly in `spool_root/sub`.
pub fn count(spool_root: &Path, sub: &str) -> usize {
    std::fs::read_dir(spool_root.join(sub))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// VmRSS in KiB and the number of open descriptors of a process.
pub fn proc_usage(pid: i32) -> Option<(u64, usize)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    Some((rss, fds))
}

/// Replaces the account's `timeout = "10s"` the harness writes.
pub fn set_timeout(spool: &Spool, timeout: &str) {
    let text = std::fs::read_to_string(&spool.config).expect("config");
    std::fs::write(
        &spool.config,
        text.replace("timeout = \"10s\"", &format!("timeout = \"{timeout}\"")),
    )
    .expect("config");
}
