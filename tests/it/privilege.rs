//! Privilege tests, as root (CI is root; elsewhere skipped with a notice): a real
//! installation in miniature — the accounts `relay365`, `relay365-drop`, and two
//! unprivileged users `r365test` and `r365other`, a copy of the built `sendmail`
//! installed setgid `relay365-drop`, the real `/etc/relay365/relay365.toml` (any
//! existing `/etc/relay365` is moved aside and restored) naming a spool made by
//! `relay365 init` with the path table's owners — and then, as the unprivileged users:
//! no secrets, no token, no other user's mail, no file of the caller's choosing, no
//! effect from the environment, and a pickup that quarantines what an attacker with
//! the drop group could plant (symlinks, hard links, FIFOs, malformed files, spoofed
//! uids) instead of following or bouncing it. Everything created is removed afterwards.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::harness::*;
use crate::stress::*;
use relay365::spool::queue::{Queue, read_entry};

const T: &str = "privilege";
const ETC: &str = "/etc/relay365";
const BACKUP: &str = "/etc/relay365.reliability-test-backup";

/// The test installation; undone on drop, also when an assertion fails.
struct Install {
    base: tempfile::TempDir,
    created_users: Vec<&'static str>,
    created_groups: Vec<&'static str>,
    moved_etc: bool,
}

fn sh(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn exists(db: &str, name: &str) -> bool {
    sh("getent", &[db, name])
}

fn id_of(db: &str, name: &str) -> u32 {
    let out = Command::new("getent").args([db, name]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split(':')
        .nth(2)
        .and_then(|n| n.trim().parse().ok())
        .expect("id")
}

impl Install {
    fn new() -> Install {
        let base = tempfile::tempdir().unwrap();
        std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut i = Install {
            base,
            created_users: Vec::new(),
            created_groups: Vec::new(),
            moved_etc: false,
        };
        if !exists("group", "relay365-drop") {
            assert!(sh("groupadd", &["--system", "relay365-drop"]));
            i.created_groups.push("relay365-drop");
        }
        if !exists("passwd", "relay365") {
            assert!(sh(
                "useradd",
                &[
                    "--system",
                    "--user-group",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    "relay365"
                ]
            ));
            i.created_users.push("relay365");
            i.created_groups.push("relay365");
        }
        // The daemon reads incoming files through the drop group.
        assert!(sh("usermod", &["-a", "-G", "relay365-drop", "relay365"]));
        for u in ["r365test", "r365other"] {
            if !exists("passwd", u) {
                assert!(sh(
                    "useradd",
                    &["--user-group", "--no-create-home", "--shell", "/bin/sh", u]
                ));
                i.created_users.push(u);
                i.created_groups.push(u);
            }
        }
        if Path::new(ETC).exists() {
            std::fs::rename(ETC, BACKUP).expect("move /etc/relay365 aside");
            i.moved_etc = true;
        }
        i
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.base.path().join(rel)
    }
}

impl Drop for Install {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(ETC);
        if self.moved_etc {
            let _ = std::fs::rename(BACKUP, ETC);
        }
        for u in &self.created_users {
            let _ = sh("userdel", &[u]);
        }
        for g in &self.created_groups {
            if exists("group", g) {
                let _ = sh("groupdel", &[g]);
            }
        }
    }
}

/// Runs a program as `user` (real and effective ids, that user's groups), keeping the
/// environment given.
fn as_user(
    user: &str,
    program: &Path,
    args: &[&str],
    stdin: &[u8],
    env: &[(&str, &str)],
) -> Output {
    let mut c = Command::new("setpriv");
    c.args(["--reuid", user, "--regid", user, "--init-groups", "--"])
        .arg(program)
        .args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    run(c, stdin)
}

fn shell_as(user: &str, script: &str) -> Output {
    as_user(user, Path::new("/bin/sh"), &["-c", script], b"", &[])
}

#[test]
fn unprivileged_users_get_nothing_they_should_not() {
    if !need_root(T) {
        return;
    }
    let inst = Install::new();
    let spool = inst.path("spool");
    let bin = inst.path("bin");
    std::fs::create_dir(&bin).unwrap();
    let sendmail = bin.join("sendmail");
    let relay365 = bin.join("relay365");
    std::fs::copy(SENDMAIL, &sendmail).unwrap();
    std::fs::copy(RELAY365, &relay365).unwrap();
    // Installed as the package does: setgid to the drop group, never setuid.
    let drop_gid = id_of("group", "relay365-drop");
    nix::unistd::chown(&sendmail, Some(0.into()), Some(drop_gid.into())).unwrap();
    std::fs::set_permissions(&sendmail, std::fs::Permissions::from_mode(0o2755)).unwrap();
    std::fs::create_dir(ETC).unwrap();
    std::fs::write(
        format!("{ETC}/relay365.toml"),
        format!(
            "spool_dir = \"{}\"\ndomain = \"example.com\"\naliases = \"{}\"\n",
            spool.display(),
            inst.path("aliases").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        format!("{ETC}/relay365.toml"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let secret_text = "[app]\nclient_secret = \"reliability-test-secret-do-not-leak\"\n";
    let secrets = format!("{ETC}/secrets.toml");
    std::fs::write(&secrets, secret_text).unwrap();
    let daemon_uid = id_of("passwd", "relay365");
    let daemon_gid = id_of("group", "relay365");
    nix::unistd::chown(
        Path::new(&secrets),
        Some(daemon_uid.into()),
        Some(daemon_gid.into()),
    )
    .unwrap();
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o600)).unwrap();
    let init = Command::new(&relay365).args(["init"]).output().unwrap();
    assert_ok(&init);
    assert!(relay365::spool::init::verify(&relay365::spool::paths::Spool::new(&spool)).is_empty());
    let test_uid = id_of("passwd", "r365test");
    let sp = |rel: &str| spool.join(rel).display().to_string();

    // 1. Secrets: unreadable by callers.
    let out = shell_as("r365test", &format!("cat {secrets}"));
    assert!(!out.status.success() && !stdout(&out).contains("reliability-test-secret"));
    report(T, "caller_reads_secrets", stderr(&out).trim());

    // 2. A caller queues through the setgid sendmail; the file is theirs, group-readable
    //    by the drop group only.
    let msg = b"Subject: private\n\nthe contents only r365test and the daemon may read\n";
    let out = as_user("r365test", &sendmail, &["-i", "a@example.org"], msg, &[]);
    assert_ok(&out);
    let new_files: Vec<_> = std::fs::read_dir(spool.join("incoming/new"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(new_files.len(), 1);
    let own = new_files[0].path();
    let own_id = own.file_name().unwrap().to_string_lossy().into_owned();
    let meta = std::fs::metadata(&own).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777),
        (test_uid, drop_gid, 0o640)
    );

    // 3. Another user cannot list, read, change or delete it.
    for (what, script) in [
        ("list incoming/new", format!("ls {}", sp("incoming/new"))),
        ("read", format!("cat {}", own.display())),
        ("append", format!("echo x >> {}", own.display())),
        ("delete", format!("rm -f {}", own.display())),
        (
            "plant in incoming/new",
            format!("echo x > {}/000000000000000000000000", sp("incoming/new")),
        ),
        ("list incoming/tmp", format!("ls {}", sp("incoming/tmp"))),
    ] {
        let out = shell_as("r365other", &script);
        assert!(
            !out.status.success(),
            "r365other could {what}: {}",
            stdout(&out)
        );
        report(
            T,
            &format!("other_user_{}", what.replace([' ', '/'], "_")),
            stderr(&out).trim(),
        );
    }
    assert!(own.exists());
    assert_eq!(
        std::fs::read_dir(spool.join("incoming/new"))
            .unwrap()
            .count(),
        1
    );

    // 4. -C: honoured only after the group is dropped, so it cannot reach the spool.
    let evil = inst.path("evil.toml");
    std::fs::write(
        &evil,
        format!(
            "spool_dir = \"{}\"\ndomain = \"example.com\"\n",
            spool.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&evil, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = as_user(
        "r365test",
        &sendmail,
        &["-C", &evil.display().to_string(), "-i", "a@example.org"],
        msg,
        &[],
    );
    assert_eq!(out.status.code(), Some(73), "{}", stderr(&out));
    assert!(stderr(&out).contains("relay365 init"), "{}", stderr(&out));
    assert_eq!(
        std::fs::read_dir(spool.join("incoming/new"))
            .unwrap()
            .count(),
        1
    );
    report(T, "caller_config_into_real_spool", stderr(&out).trim());
    // -C naming a file only root may read: not read, nothing of it printed.
    let shadow = std::fs::read_to_string("/etc/shadow").unwrap_or_default();
    let out = as_user(
        "r365test",
        &sendmail,
        &["-C", "/etc/shadow", "-i", "a@example.org"],
        msg,
        &[],
    );
    assert!(!out.status.success());
    let first = shadow.lines().next().unwrap_or("root:");
    assert!(!stderr(&out).contains(first), "{}", stderr(&out));
    report(T, "caller_config_etc_shadow", stderr(&out).trim());

    // 4b. Read-only modes give the group up for good (real, effective and saved)
    //     before they read the config; the enqueue modes keep it saved for the
    //     deposit. (-bp holds it before that, for the installed spool's incoming/
    //     only: step 4c.) The config is made a FIFO, so each sendmail blocks inside its
    //     open: the gids it holds at that instant are read from /proc.
    let conf = format!("{ETC}/relay365.toml");
    let conf_text = std::fs::read(&conf).unwrap();
    std::fs::remove_file(&conf).unwrap();
    nix::unistd::mkfifo(
        Path::new(&conf),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    for (mode, args, keeps_group) in [
        ("-bp", vec!["-bp"], false),
        ("-bi", vec!["-bi"], false),
        ("-bv", vec!["-bv", "root"], false),
        ("enqueue", vec!["-i", "a@example.org"], true),
    ] {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid",
            "r365test",
            "--regid",
            "r365test",
            "--init-groups",
            "--",
        ])
        .arg(&sendmail)
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        // A non-blocking writer opens only once a reader is inside its open.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut fifo = loop {
            use std::os::unix::fs::OpenOptionsExt;
            match std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(nix::libc::O_NONBLOCK)
                .open(&conf)
            {
                Ok(f) => break f,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                Err(e) => panic!("{mode}: sendmail never opened the config: {e}"),
            }
        };
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
        let gids: Vec<u32> = status
            .lines()
            .find_map(|l| l.strip_prefix("Gid:"))
            .unwrap()
            .split_whitespace()
            .map(|g| g.parse().unwrap())
            .collect();
        let test_gid = id_of("group", "r365test");
        // Gid: real, effective, saved, filesystem.
        let want_saved = if keeps_group { drop_gid } else { test_gid };
        assert_eq!(
            gids,
            [test_gid, test_gid, want_saved, test_gid],
            "{mode}: the gids while reading the config"
        );
        use std::io::Write as _;
        fifo.write_all(&conf_text).unwrap();
        drop(fifo);
        if let Some(mut i) = child.stdin.take() {
            let _ = i.write_all(msg);
        }
        let out = child.wait_with_output().unwrap();
        // -bv of a local name with no alias and no admin address says undeliverable.
        let ok = if mode == "-bv" { [0, 67] } else { [0, 0] };
        assert!(
            ok.contains(&out.status.code().unwrap_or(-1)),
            "{mode}: {}",
            stderr(&out)
        );
        report(
            T,
            &format!("gids_reading_config_{mode}"),
            format!("{gids:?}"),
        );
    }
    std::fs::remove_file(&conf).unwrap();
    std::fs::write(&conf, &conf_text).unwrap();
    std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o644)).unwrap();
    for f in std::fs::read_dir(spool.join("incoming/new"))
        .unwrap()
        .flatten()
    {
        if f.path() != own {
            std::fs::remove_file(f.path()).unwrap();
        }
    }

    // 4c. mailq as an ordinary user, with the installed layout: see the function.
    mailq_shows_the_installed_spools_incoming_to_anyone(&inst, &sendmail, &relay365);
    // With this test's own spool_dir, mailq cannot read incoming/ and says so.
    let out = as_user("r365other", &sendmail, &["-bp"], b"", &[]);
    assert_ok(&out);
    assert!(
        stderr(&out).contains("cannot be shown") && stderr(&out).contains("run mailq as root"),
        "{}",
        stderr(&out)
    );
    report(T, "mailq_other_spool", stderr(&out).trim());

    // 5. -X, -oA and the environment name files sendmail must never open.
    let canary_dir = inst.path("canary");
    std::fs::create_dir(&canary_dir).unwrap();
    std::fs::set_permissions(&canary_dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
    std::fs::write(canary_dir.join("existing"), "canary\n").unwrap();
    std::fs::set_permissions(
        canary_dir.join("existing"),
        std::fs::Permissions::from_mode(0o666),
    )
    .unwrap();
    let c = |n: &str| canary_dir.join(n).display().to_string();
    let inotify =
        nix::sys::inotify::Inotify::init(nix::sys::inotify::InitFlags::IN_NONBLOCK).unwrap();
    inotify
        .add_watch(&canary_dir, nix::sys::inotify::AddWatchFlags::IN_ALL_EVENTS)
        .unwrap();
    let evil_config = inst.path("env.toml");
    std::fs::write(
        &evil_config,
        format!(
            "spool_dir = \"{}\"\ndomain = \"evil.example\"\n",
            c("spool")
        ),
    )
    .unwrap();
    let env: Vec<(&str, String)> = vec![
        ("HOME", c("")),
        ("TMPDIR", c("")),
        ("MAILRC", c("existing")),
        ("RELAY365_CONFIG", evil_config.display().to_string()),
        ("RELAY365_SPOOL", c("spool")),
        ("SENDMAIL_CONFIG", c("existing")),
        ("LOGNAME", "root".into()),
        ("USER", "root".into()),
        ("NAME", "Evil Impostor".into()),
        ("MAILHOST", "evil.example".into()),
        ("LD_PRELOAD", c("existing")),
        ("LD_LIBRARY_PATH", c("")),
        ("MALLOC_CHECK_", "3".into()),
    ];
    // Set by `env` running as the caller, so that only sendmail (setgid, so the loader
    // runs it in secure-execution mode) sees them, not setpriv.
    let mut args: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    args.push(sendmail.display().to_string());
    for a in [
        "-X",
        &c("traffic.log"),
        &format!("-oA{}", c("existing")),
        "-oA",
        &c("aliases.db"),
        "-i",
        "b@example.org",
    ] {
        args.push(a.to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = as_user(
        "r365test",
        Path::new("/usr/bin/env"),
        &args,
        b"Subject: env\n\nx\n",
        &[],
    );
    assert_ok(&out);
    let mut buf = Vec::new();
    while let Ok(events) = inotify.read_events() {
        if events.is_empty() {
            break;
        }
        buf.extend(
            events
                .into_iter()
                .map(|e| format!("{:?} {:?}", e.mask, e.name)),
        );
    }
    assert!(
        buf.is_empty(),
        "sendmail touched the canary directory: {buf:?}"
    );
    assert_eq!(
        std::fs::read_dir(&canary_dir).unwrap().count(),
        1,
        "nothing created"
    );
    report(T, "x_oa_env_canary_events", buf.len());
    let env_file = std::fs::read_dir(spool.join("incoming/new"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p != &own)
        .expect("the -X/-oA/environment message was queued in the real spool");
    let text = String::from_utf8_lossy(&std::fs::read(&env_file).unwrap()).into_owned();
    assert!(
        text.contains("From: r365test@example.com") || text.contains("<r365test@example.com>"),
        "{text}"
    );
    assert!(
        !text.contains("Evil") && !text.contains("root@") && !text.contains("evil.example"),
        "{text}"
    );

    // 6. What an attacker holding the drop group could plant in incoming/new.
    let new = spool.join("incoming/new");
    let fresh = || relay365::spool::QueueId::generate(std::time::SystemTime::now()).to_string();
    let symlink_id = fresh();
    std::os::unix::fs::symlink(&secrets, new.join(&symlink_id)).unwrap();
    let hardlink_id = fresh();
    std::fs::hard_link(&secrets, new.join(&hardlink_id)).unwrap();
    let fifo_id = fresh();
    nix::unistd::mkfifo(
        &new.join(&fifo_id),
        nix::sys::stat::Mode::from_bits_truncate(0o660),
    )
    .unwrap();
    let garbage_id = fresh();
    std::fs::write(
        new.join(&garbage_id),
        "hello, this is not an incoming file\n",
    )
    .unwrap();
    nix::unistd::chown(
        &new.join(&garbage_id),
        Some(test_uid.into()),
        Some(drop_gid.into()),
    )
    .unwrap();
    std::fs::write(new.join("not-a-queue-id"), "x").unwrap();
    // A valid file whose envelope claims uid 0, owned by r365test.
    let spoof_id = fresh();
    let own_bytes = std::fs::read(&own).unwrap();
    let own_text = String::from_utf8_lossy(&own_bytes);
    let spoofed = own_text
        .replacen(&format!("\"uid\":{test_uid}"), "\"uid\":0", 1)
        .replacen(&own_id, &spoof_id, 1);
    assert!(spoofed.contains("\"uid\":0"));
    std::fs::write(new.join(&spoof_id), spoofed).unwrap();
    nix::unistd::chown(
        &new.join(&spoof_id),
        Some(test_uid.into()),
        Some(drop_gid.into()),
    )
    .unwrap();

    // 7. The daemon's pickup, as the daemon's user.
    let out = as_user("relay365", &relay365, &["flush", "-v"], b"", &[]);
    assert_left(&out);
    let log = stderr(&out);
    let queue = Queue::new(&relay365::spool::paths::Spool::new(&spool));
    let ids: Vec<String> = queue.ids().unwrap().iter().map(|i| i.to_string()).collect();
    for planted in [&symlink_id, &hardlink_id, &fifo_id, &garbage_id] {
        assert!(!ids.contains(planted), "{planted} was queued: {log}");
    }
    let quarantined = count(&spool, "quarantine");
    assert_eq!(
        quarantined, 5,
        "symlink, hard link, FIFO, garbage, bad name: {log}"
    );
    assert_eq!(count(&spool, "incoming/new"), 0, "{log}");
    for l in log.lines().filter(|l| l.contains("quarantined")) {
        report(T, "quarantine", l);
    }
    // Quarantine moves directory entries: the symlink was not followed, the secret
    // did not move or change.
    assert_eq!(std::fs::read_to_string(&secrets).unwrap(), secret_text);
    for id in &ids {
        let body = std::fs::read(spool.join(format!("queue/{id}.msg"))).unwrap();
        assert!(!String::from_utf8_lossy(&body).contains("reliability-test-secret"));
    }
    // Not bounced: the three real messages are queued, no bounce was made.
    assert_eq!(ids.len(), 3, "own, env and spoofed: {ids:?}\n{log}");
    for id in &ids {
        let e = read_entry(&spool.join(format!("queue/{id}.env"))).unwrap();
        assert!(!e.is_bounce, "{log}");
        // The recorded caller is the file's owner, whatever the envelope said.
        assert_eq!(e.uid, test_uid, "{id}: {e:?}");
    }
    report(T, "spoofed_uid_recorded_as", test_uid);
    report(T, "quarantined_files", quarantined);

    // 8. Queued mail: message bodies are the daemon's alone; envelopes are readable
    //    (mailq) but nobody else may change or remove anything.
    let qid = ids
        .iter()
        .find(|i| **i == own_id)
        .expect("own message queued");
    let m = std::fs::metadata(spool.join(format!("queue/{qid}.msg"))).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o777), (daemon_uid, 0o600));
    for (what, script) in [
        ("read the message", format!("cat {}/{qid}.msg", sp("queue"))),
        (
            "change the envelope",
            format!("echo x >> {}/{qid}.env", sp("queue")),
        ),
        (
            "delete the envelope",
            format!("rm -f {}/{qid}.env", sp("queue")),
        ),
        (
            "delete the message",
            format!("rm -f {}/{qid}.msg", sp("queue")),
        ),
        (
            "plant an entry",
            format!("echo x > {}/AAAAAAAAAAAAAAAAAAAAAAAA.env", sp("queue")),
        ),
        ("list the state", format!("ls {}", sp("state"))),
        ("list the quarantine", format!("ls {}", sp("quarantine"))),
    ] {
        for user in ["r365other", "r365test"] {
            let out = shell_as(user, &script);
            assert!(!out.status.success(), "{user} could {what}");
        }
        report(T, &format!("queue_{}", what.replace(' ', "_")), "refused");
    }
    assert!(spool.join(format!("queue/{qid}.msg")).exists());
    assert!(read_entry(&spool.join(format!("queue/{qid}.env"))).is_ok());

    // 9. The token cache lives only in the daemon's memory: a caller cannot read the
    //    process (its memory, environment or descriptors).
    let daemon = Command::new("setpriv")
        .args([
            "--reuid",
            "relay365",
            "--regid",
            "relay365",
            "--init-groups",
            "--",
        ])
        .arg(&relay365)
        .arg("daemon")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = daemon.id();
    let mut daemon = daemon;
    assert!(eventually(std::time::Duration::from_secs(10), || {
        std::fs::metadata(format!("/proc/{pid}")).is_ok_and(|m| m.uid() == daemon_uid)
    }));
    for file in ["mem", "environ", "fd/0", "maps"] {
        let out = shell_as(
            "r365test",
            &format!("head -c 16 /proc/{pid}/{file} > /dev/null"),
        );
        assert!(!out.status.success(), "r365test read /proc/{pid}/{file}");
    }
    report(T, "caller_reads_daemon_memory", "refused");
    let _ = daemon.kill();
    let _ = daemon.wait();
}

#[test]
fn a_log_tag_from_a_user_is_not_honoured_and_roots_is_one_line() {
    // `-L` names the syslog tag of every line the run logs: from a local user it would
    // pass their lines off as the daemon's, and a newline in it would start a forged
    // line. A user's `-L` is refused with a warning (the message still goes); root's
    // is kept, one line (unit test: sendmail::cli::tests).
    const T: &str = "privilege_log_tag";
    if !need_root(T) {
        return;
    }
    let s = Spool::new("");
    // The spool belongs to the caller, as with `-C` for a user (the group is dropped).
    assert!(sh(
        "chown",
        &["-R", "nobody:nogroup", &s.dir.path().display().to_string()]
    ));
    let forged = "app\nDec  3 12:00:00 host relay365/daemon[1]: 0A: status=sent";
    let mut c = Command::new("setpriv");
    c.args([
        "--reuid",
        "nobody",
        "--regid",
        "nogroup",
        "--clear-groups",
        "--",
    ])
    .arg(SENDMAIL)
    .arg("-C")
    .arg(&s.config)
    .args(["-L", forged, "-i", "a@example.org"]);
    let out = run(c, b"Subject: tag\n\nx\n");
    assert_ok(&out);
    let err = stderr(&out);
    assert!(
        err.contains("warning: -L is honoured for root only; logging as relay365/sendmail"),
        "{err}"
    );
    assert_eq!(s.incoming().len(), 1, "the message still went: {err}");
    report(T, "user_warning", err.trim());
    let out = s.sendmail(
        &["-L", forged, "-i", "a@example.org"],
        b"Subject: tag\n\nx\n",
    );
    assert_ok(&out);
    assert!(!stderr(&out).contains("-L"), "{}", stderr(&out));
}

/// Step 4c: with the layout the package installs (the config without spool_dir, the
/// spool at /var/spool/relay365), another user's `mailq` lists a message waiting in
/// incoming/ (addresses and state, never the body) and says the daemon is not running;
/// a symlink and a FIFO planted there are neither followed nor waited on. Runs in a
/// mount namespace: a tmpfs over /var/spool holds the bind-mounted test spool and the
/// test config is bound over /etc/relay365/relay365.toml, so the host is untouched.
fn mailq_shows_the_installed_spools_incoming_to_anyone(
    inst: &Install,
    sendmail: &Path,
    relay365: &Path,
) {
    let spool = inst.path("installed-spool");
    let init_conf = inst.path("installed-init.toml");
    std::fs::write(
        &init_conf,
        format!(
            "spool_dir = \"{}\"\ndomain = \"example.com\"\n",
            spool.display()
        ),
    )
    .unwrap();
    assert_ok(
        &Command::new(relay365)
            .args(["-c", &init_conf.display().to_string(), "init"])
            .output()
            .unwrap(),
    );
    // The installed config names no spool_dir: the default one.
    let conf = inst.path("installed.toml");
    std::fs::write(
        &conf,
        format!(
            "domain = \"example.com\"\naliases = \"{}\"\n",
            inst.path("aliases").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o644)).unwrap();
    let msg = inst.path("installed-msg");
    std::fs::write(&msg, "Subject: waits\n\nthe body nobody else may read\n").unwrap();
    std::fs::set_permissions(&msg, std::fs::Permissions::from_mode(0o644)).unwrap();
    let new = spool.join("incoming/new");
    let out_dir = inst.path("installed-out");
    std::fs::create_dir(&out_dir).unwrap();
    std::fs::set_permissions(&out_dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let as_user = |u: &str| format!("setpriv --reuid {u} --regid {u} --init-groups --");
    let script = format!(
        "set -e
mount --make-rprivate /
mount -t tmpfs -o mode=0755 tmpfs /var/spool
mkdir /var/spool/relay365
mount --bind {spool} /var/spool/relay365
mount --bind {conf} /etc/relay365/relay365.toml
{as_test} {sendmail} -i a@example.org < {msg}
ln -s /etc/shadow /var/spool/relay365/incoming/new/000000000000000000000001
mkfifo /var/spool/relay365/incoming/new/000000000000000000000002
{as_other} {sendmail} -bp > {out}/stdout 2> {out}/stderr
",
        spool = spool.display(),
        conf = conf.display(),
        as_test = as_user("r365test"),
        as_other = as_user("r365other"),
        sendmail = sendmail.display(),
        msg = msg.display(),
        out = out_dir.display(),
    );
    let out = Command::new("unshare")
        .args(["--mount", "--", "sh", "-c", &script])
        .output()
        .unwrap();
    assert!(out.status.success(), "namespace script: {}", stderr(&out));
    let listing = std::fs::read_to_string(out_dir.join("stdout")).unwrap();
    let warnings = std::fs::read_to_string(out_dir.join("stderr")).unwrap();
    let ids: Vec<String> = std::fs::read_dir(&new)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with("00000000000000000000000"))
        .collect();
    assert_eq!(
        ids.len(),
        1,
        "r365test's message reached the installed spool"
    );
    assert!(
        listing.contains(&ids[0])
            && listing.contains("a@example.org")
            && listing.contains("(waiting for pickup by the relay365 daemon)")
            && listing.contains("1 Request."),
        "the waiting message is listed, and only it: {listing}"
    );
    assert!(!listing.contains("the body"), "never the body: {listing}");
    let shadow = std::fs::read_to_string("/etc/shadow").unwrap_or_default();
    let first = shadow.lines().next().unwrap_or("root:");
    assert!(!listing.contains(first) && !warnings.contains(first));
    assert!(
        warnings.contains("the relay365 daemon is not running"),
        "{warnings}"
    );
    report(T, "mailq_installed_spool", listing.trim());
}
