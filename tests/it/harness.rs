//! A private relay365 installation for one test: a temp spool, a config naming it,
//! and helpers that run the real `sendmail`/`relay365` binaries against it.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use relay365::spool::envelope::Envelope;

pub struct Spool {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
}

pub const SENDMAIL: &str = env!("CARGO_BIN_EXE_sendmail");
pub const RELAY365: &str = env!("CARGO_BIN_EXE_relay365");

impl Spool {
    /// A fresh spool created with `relay365 init`, configured with `extra` TOML.
    pub fn new(extra: &str) -> Spool {
        Spool::new_in(tempfile::tempdir().expect("tempdir"), extra)
    }

    /// The same inside an existing directory (which the spool then owns).
    pub fn new_in(dir: tempfile::TempDir, extra: &str) -> Spool {
        let config = dir.path().join("relay365.toml");
        let text = format!(
            "spool_dir = \"{}\"\ndomain = \"example.com\"\n{extra}\n",
            dir.path().join("spool").display()
        );
        std::fs::write(&config, text).expect("write config");
        let s = Spool { dir, config };
        let out = s.relay365(&["init", "--private"]);
        assert!(
            out.status.success(),
            "init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        s
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("spool")
    }

    pub fn new_dir(&self) -> PathBuf {
        self.root().join("incoming/new")
    }

    /// Runs `sendmail -C <config> args...` with `stdin`.
    pub fn sendmail(&self, args: &[&str], stdin: &[u8]) -> Output {
        self.sendmail_as(SENDMAIL, args, stdin)
    }

    /// Runs the binary under another argv[0] (mailq, newaliases).
    pub fn sendmail_as(&self, argv0: &str, args: &[&str], stdin: &[u8]) -> Output {
        let mut cmd = Command::new(SENDMAIL);
        {
            use std::os::unix::process::CommandExt;
            cmd.arg0(argv0);
        }
        cmd.arg("-C").arg(&self.config).args(args);
        run(cmd, stdin)
    }

    pub fn relay365(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(RELAY365);
        cmd.arg("--config").arg(&self.config).args(args);
        run(cmd, b"")
    }

    /// Every message in incoming/new, parsed.
    pub fn incoming(&self) -> Vec<(Envelope, Vec<u8>)> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(self.new_dir()).expect("read new/") {
            let bytes = std::fs::read(e.expect("entry").path()).expect("read file");
            let (env, msg) =
                Envelope::from_file_bytes(&bytes).expect("complete, valid incoming file");
            out.push((env, msg.to_vec()));
        }
        out.sort_by_key(|(e, _)| e.arrival_us);
        out
    }

    /// The single queued message.
    pub fn only(&self) -> (Envelope, String) {
        let mut all = self.incoming();
        assert_eq!(all.len(), 1, "expected exactly one queued message");
        let (e, m) = all.remove(0);
        (e, String::from_utf8_lossy(&m).into_owned())
    }

    pub fn count_files(&self, sub: &str) -> usize {
        std::fs::read_dir(self.root().join(sub))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

pub fn run(mut cmd: Command, stdin: &[u8]) -> Output {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    if let Some(mut i) = child.stdin.take() {
        // The child may exit early (bad option) and close its end; that is fine.
        let _ = i.write_all(stdin);
    }
    child.wait_with_output().expect("wait")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Asserts the exit status and that stderr mentions `needle`.
#[track_caller]
pub fn assert_fails(o: &Output, code: i32, needle: &str) {
    assert_eq!(o.status.code(), Some(code), "stderr: {}", stderr(o));
    assert!(
        stderr(o).contains(needle),
        "stderr {:?} should mention {needle:?}",
        stderr(o)
    );
}

#[track_caller]
pub fn assert_ok(o: &Output) {
    assert!(
        o.status.success(),
        "exit {:?}, stderr: {}",
        o.status.code(),
        stderr(o)
    );
}

/// Asserts a `relay365 flush` that left mail in the queue: EX_TEMPFAIL (75).
pub fn assert_left(o: &Output) {
    assert_eq!(
        o.status.code(),
        Some(75),
        "a flush that leaves mail exits 75; stderr: {}",
        stderr(o)
    );
}

/// A flush's exit status matches what it left: 0 for an empty queue, 75 otherwise.
#[track_caller]
pub fn assert_flush_status(o: &Output, t: &Tenant) {
    if t.queued().is_empty() {
        assert_ok(o);
    } else {
        assert_left(o);
    }
}

pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

pub use relay365_emulator as emu;

/// The mailbox every delivery test sends as.
pub const MAILBOX: &str = "app@contoso.com";
pub const PASSWORD: &str = "correct horse battery staple";
pub const TENANT: &str = "contoso.onmicrosoft.com";
pub const CLIENT_ID: &str = "11111111-2222-3333-4444-555555555555";
pub const CLIENT_SECRET: &str = "s3cr3t~value-that-must-never-be-logged";

/// How the test account authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    Login,
    Xoauth2,
}

/// A further account for `Tenant::with_accounts`: AUTH LOGIN as `mailbox`, with `extra`
/// TOML (limits, `senders = [...]`) inside its `[[account]]` table.
pub struct ExtraAccount {
    pub name: &'static str,
    pub mailbox: &'static str,
    pub extra: String,
}

/// A spool whose one account points at an Exchange Online emulator on 127.0.0.1.
pub struct Tenant {
    pub emu: emu::Emulator,
    pub spool: Spool,
}

/// The emulator's default tenant: one mailbox with a password and an app registration.
pub fn tenant_config() -> emu::Config {
    emu::Config::default()
        .mailbox(emu::Mailbox::with_password(MAILBOX, PASSWORD))
        .app(emu::App::with_secret(
            TENANT,
            CLIENT_ID,
            CLIENT_SECRET,
            MAILBOX,
        ))
}

impl Tenant {
    pub fn new(auth: Auth) -> Tenant {
        Tenant::with(tenant_config(), auth, "")
    }

    /// `account_extra` is appended inside the `[[account]]` table.
    pub fn with(cfg: emu::Config, auth: Auth, account_extra: &str) -> Tenant {
        Tenant::with_accounts(cfg, auth, account_extra, &[])
    }

    /// As `with`, plus further AUTH LOGIN accounts after the first, each with its own
    /// mailbox (added to the emulator with the test password) and `[[account]]` table.
    pub fn with_accounts(
        mut cfg: emu::Config,
        auth: Auth,
        account_extra: &str,
        more: &[ExtraAccount],
    ) -> Tenant {
        for a in more {
            cfg = cfg.mailbox(emu::Mailbox::with_password(a.mailbox, PASSWORD));
        }
        let emu = emu::Emulator::start(cfg).expect("start emulator");
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca.pem");
        emu.write_ca(&ca).expect("write ca");
        let secrets = dir.path().join("secrets.toml");
        let secret_line = match auth {
            Auth::Login => format!("password = \"{PASSWORD}\""),
            Auth::Xoauth2 => format!("client_secret = \"{CLIENT_SECRET}\""),
        };
        let mut secrets_text = format!("[app]\n{secret_line}\n");
        for a in more {
            secrets_text.push_str(&format!("[{}]\npassword = \"{PASSWORD}\"\n", a.name));
        }
        std::fs::write(&secrets, secrets_text).expect("secrets");
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o600))
                .expect("chmod");
        }
        let aliases = dir.path().join("aliases");
        std::fs::write(&aliases, "postmaster: root\nroot: ops@contoso.com\n").expect("aliases");
        let auth_block = match auth {
            Auth::Login => "auth = \"login\"\n".to_string(),
            Auth::Xoauth2 => format!(
                "auth = \"xoauth2\"\n{account_extra}\n[account.oauth]\ntenant = \"{TENANT}\"\nclient_id = \"{CLIENT_ID}\"\ntoken_url = \"{}\"\n",
                emu.token_url(TENANT).expect("token endpoint")
            ),
        };
        let extra = if auth == Auth::Login {
            account_extra
        } else {
            ""
        };
        let mut toml = format!(
            "secrets_file = \"{}\"\naliases = \"{}\"\nadmin = \"admin@contoso.com\"\n\n[[account]]\nname = \"app\"\nmailbox = \"{MAILBOX}\"\nhost = \"localhost\"\nport = {}\nca_file = \"{}\"\ntimeout = \"10s\"\n{extra}\n{auth_block}",
            secrets.display(),
            aliases.display(),
            emu.port(),
            ca.display(),
        );
        for a in more {
            toml.push_str(&format!(
                "\n[[account]]\nname = \"{}\"\nmailbox = \"{}\"\nhost = \"localhost\"\nport = {}\nca_file = \"{}\"\ntimeout = \"10s\"\nauth = \"login\"\n{}\n",
                a.name,
                a.mailbox,
                emu.port(),
                ca.display(),
                a.extra
            ));
        }
        let spool = Spool::new_in(dir, &toml);
        Tenant { emu, spool }
    }

    /// A spool whose one account sends through the emulator's Microsoft Graph
    /// (`transport = "graph"`) with an app secret. `top` goes before the account
    /// (`proxy = ...`), `account_extra` inside `[[account]]`, `graph_extra` inside
    /// `[account.graph]`; `secrets_extra` inside the account's secrets table.
    pub fn graph(
        cfg: emu::Config,
        top: &str,
        account_extra: &str,
        graph_extra: &str,
        secrets_extra: &str,
    ) -> Tenant {
        let emu = emu::Emulator::start(cfg).expect("start emulator");
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca.pem");
        emu.write_ca(&ca).expect("write ca");
        let secrets = dir.path().join("secrets.toml");
        std::fs::write(
            &secrets,
            format!("[app]\nclient_secret = \"{CLIENT_SECRET}\"\n{secrets_extra}\n"),
        )
        .expect("secrets");
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o600))
                .expect("chmod");
        }
        let aliases = dir.path().join("aliases");
        std::fs::write(&aliases, "postmaster: root\nroot: ops@contoso.com\n").expect("aliases");
        let toml = format!(
            "secrets_file = \"{}\"\naliases = \"{}\"\nadmin = \"admin@contoso.com\"\n{top}\n\n[[account]]\nname = \"app\"\nmailbox = \"{MAILBOX}\"\ntransport = \"graph\"\nca_file = \"{}\"\ntimeout = \"10s\"\n{account_extra}\n[account.graph]\nurl = \"{}\"\n{graph_extra}\n[account.oauth]\ntenant = \"{TENANT}\"\nclient_id = \"{CLIENT_ID}\"\ntoken_url = \"{}\"\n",
            secrets.display(),
            aliases.display(),
            ca.display(),
            emu.graph_url().expect("graph"),
            emu.token_url(TENANT).expect("token endpoint"),
        );
        let spool = Spool::new_in(dir, &toml);
        Tenant { emu, spool }
    }

    /// `relay365 flush -v`: the log on stderr, as the tests read it. The exit status
    /// is 75 when mail is left in the queue: see [`assert_left`].
    pub fn flush(&self) -> Output {
        self.spool.relay365(&["flush", "-v"])
    }

    /// Messages still in the daemon's queue.
    pub fn queued(&self) -> Vec<relay365::spool::queue::QueueEntry> {
        let q = relay365::spool::queue::Queue::new(&relay365::spool::paths::Spool::new(
            self.spool.root(),
        ));
        q.ids()
            .unwrap_or_default()
            .iter()
            .filter_map(|id| q.read(id).ok())
            .collect()
    }
}

/// A running `relay365 daemon`; killed on drop.
pub struct Daemon {
    pub child: std::process::Child,
    pub log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Daemon {
    pub fn start(spool: &Spool) -> Daemon {
        // stderr is a pipe named in JOURNAL_STREAM, as systemd does for a service
        // whose stderr is the journal: the daemon writes each line there once, with no
        // syslog copy (issue 17), whether or not this machine has /dev/log.
        let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
        let st =
            nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&write_end)).expect("fstat pipe");
        let child = Command::new(RELAY365)
            .arg("--config")
            .arg(&spool.config)
            .arg("daemon")
            .env("JOURNAL_STREAM", format!("{}:{}", st.st_dev, st.st_ino))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(write_end))
            .spawn()
            .expect("spawn daemon");
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let stderr = std::fs::File::from(read_end);
        let sink = log.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if let Ok(mut l) = sink.lock() {
                    l.push_str(&line);
                    l.push('\n');
                }
            }
        });
        let d = Daemon { child, log };
        assert!(
            d.wait_log("daemon started", std::time::Duration::from_secs(10)),
            "daemon did not start: {}",
            d.log_text()
        );
        d
    }

    pub fn log_text(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub fn wait_log(&self, needle: &str, timeout: std::time::Duration) -> bool {
        let end = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < end {
            if self.log_text().contains(needle) {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        false
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig);
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.child.wait().expect("wait daemon")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `f` holds or the timeout passes.
pub fn eventually(timeout: std::time::Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    f()
}

/// A spool whose one account `app` (AUTH LOGIN as [`MAILBOX`]) points at an emulator
/// that other spools share: one host of a fleet. `top` goes at the top of the config
/// (`quota_store = ...`), `account_extra` inside the account's table, `secrets_extra`
/// into the secrets file (`[quota_store]`).
pub fn spool_for(
    emu: &emu::Emulator,
    top: &str,
    account_extra: &str,
    secrets_extra: &str,
) -> Spool {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca.pem");
    emu.write_ca(&ca).expect("write ca");
    let secrets = dir.path().join("secrets.toml");
    std::fs::write(
        &secrets,
        format!("[app]\npassword = \"{PASSWORD}\"\n{secrets_extra}"),
    )
    .expect("secrets");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    let aliases = dir.path().join("aliases");
    std::fs::write(&aliases, "postmaster: root\nroot: ops@contoso.com\n").expect("aliases");
    let toml = format!(
        "secrets_file = \"{}\"\naliases = \"{}\"\nadmin = \"admin@contoso.com\"\n{top}\n\n[[account]]\nname = \"app\"\nmailbox = \"{MAILBOX}\"\nhost = \"localhost\"\nport = {}\nca_file = \"{}\"\ntimeout = \"10s\"\nauth = \"login\"\n{account_extra}\n",
        secrets.display(),
        aliases.display(),
        emu.port(),
        ca.display(),
    );
    Spool::new_in(dir, &toml)
}

/// The TLS files of a Redis server: a CA, and a leaf for localhost and 127.0.0.1 it signed.
pub struct RedisTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl RedisTls {
    pub fn new(dir: &std::path::Path) -> RedisTls {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
        let ca_key = KeyPair::generate().expect("key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key).expect("ca");
        let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        leaf.subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        leaf.use_authority_key_identifier_extension = true;
        leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let leaf_key = KeyPair::generate().expect("key");
        let leaf_cert = leaf.signed_by(&leaf_key, &ca_cert, &ca_key).expect("leaf");
        let t = RedisTls {
            ca: dir.join("redis-ca.pem"),
            cert: dir.join("redis.pem"),
            key: dir.join("redis.key"),
        };
        std::fs::write(&t.ca, ca_cert.pem()).expect("ca");
        std::fs::write(&t.cert, leaf_cert.pem()).expect("cert");
        std::fs::write(&t.key, leaf_key.serialize_pem()).expect("key");
        t
    }
}

/// A private `redis-server` on loopback (its own port, config and directory, no
/// persistence), stopped on drop.
pub struct Redis {
    child: Option<std::process::Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub password: Option<String>,
    pub tls: Option<RedisTls>,
}

impl Redis {
    /// Starts one, or returns `None` (the caller skips) when `redis-server` is not
    /// installed; under CI (`CI` set) a missing server fails the test instead.
    pub fn start(password: Option<&str>, tls: bool) -> Option<Redis> {
        if Command::new("redis-server")
            .arg("--version")
            .output()
            .is_err()
        {
            assert!(
                std::env::var_os("CI").is_none(),
                "redis-server is missing: apt-get install redis-server (.ci/run installs it)"
            );
            eprintln!("skipped: redis-server is not installed (apt-get install redis-server)");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let dir = tempfile::tempdir().expect("tempdir");
        let tls = tls.then(|| RedisTls::new(dir.path()));
        let mut r = Redis {
            child: None,
            port,
            dir,
            password: password.map(str::to_owned),
            tls,
        };
        r.restart();
        Some(r)
    }

    /// The URL for `quota_store`.
    pub fn url(&self) -> String {
        match self.tls {
            Some(_) => format!("rediss://localhost:{}/0", self.port),
            None => format!("redis://127.0.0.1:{}/0", self.port),
        }
    }

    /// The `quota_store` lines for a host named `host` of `fleet_size` hosts.
    pub fn store_toml(&self, host: &str, fleet_size: u32) -> String {
        let ca = self
            .tls
            .as_ref()
            .map(|t| format!("quota_store_ca_file = \"{}\"\n", t.ca.display()))
            .unwrap_or_default();
        format!(
            "quota_store = \"{}\"\nfleet_size = {fleet_size}\nfleet_host = \"{host}\"\nquota_store_timeout = \"1s\"\n{ca}",
            self.url()
        )
    }

    /// The secrets file's `[quota_store]` table, if a password is set.
    pub fn secrets_toml(&self) -> String {
        self.password
            .as_ref()
            .map(|p| format!("[quota_store]\npassword = \"{p}\"\n"))
            .unwrap_or_default()
    }

    /// Starts the server (again, on the same port, with no data).
    pub fn restart(&mut self) {
        self.kill();
        let conf = self.dir.path().join("redis.conf");
        let mut text = format!(
            "bind 127.0.0.1\nprotected-mode no\ndir {}\nsave \"\"\nappendonly no\ndaemonize no\nlogfile {}\n",
            self.dir.path().display(),
            self.dir.path().join("redis.log").display()
        );
        match &self.tls {
            Some(t) => text.push_str(&format!(
                "port 0\ntls-port {}\ntls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\ntls-auth-clients no\n",
                self.port,
                t.cert.display(),
                t.key.display(),
                t.ca.display()
            )),
            None => text.push_str(&format!("port {}\n", self.port)),
        }
        if let Some(p) = &self.password {
            text.push_str(&format!("requirepass \"{p}\"\n"));
        }
        std::fs::write(&conf, text).expect("redis.conf");
        let child = Command::new("redis-server")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let up = eventually(std::time::Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
        });
        assert!(
            up,
            "redis-server did not start: {}",
            std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
        );
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `redis-cli` against it (plain servers only).
    pub fn cli(&self, args: &[&str]) -> String {
        let mut cmd = Command::new("redis-cli");
        cmd.args(["-p", &self.port.to_string()]);
        if let Some(p) = &self.password {
            cmd.env("REDISCLI_AUTH", p);
        }
        let out = cmd.args(args).output().expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Sentinel (`redis-server --sentinel`) watching a [`Redis`] as `mymaster`.
pub struct Sentinel {
    child: std::process::Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Sentinel {
    pub fn start(master: &Redis) -> Sentinel {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = dir.path().join("sentinel.conf");
        let mut text = format!(
            "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {}\nlogfile {}\nsentinel monitor mymaster 127.0.0.1 {} 1\n",
            dir.path().display(),
            dir.path().join("sentinel.log").display(),
            master.port
        );
        if let Some(p) = &master.password {
            text.push_str(&format!("sentinel auth-pass mymaster \"{p}\"\n"));
        }
        std::fs::write(&conf, text).expect("sentinel.conf");
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server --sentinel");
        let up = eventually(std::time::Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(up, "sentinel did not start");
        Sentinel {
            child,
            port,
            _dir: dir,
        }
    }

    /// The `quota_store` lines for a host of a fleet found through this sentinel.
    pub fn store_toml(&self, host: &str, fleet_size: u32) -> String {
        format!(
            "quota_store = \"redis+sentinel://127.0.0.1:{}/mymaster/0\"\nfleet_size = {fleet_size}\nfleet_host = \"{host}\"\n",
            self.port
        )
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Plants `n` valid incoming files, as `sendmail` would have left them.
pub fn plant_incoming(s: &Spool, n: usize) {
    use relay365::message::address::{Address, Sender};
    use relay365::spool::QueueId;
    use relay365::spool::envelope::Envelope;
    let address = |a: &str| Address::parse(a).expect("valid address");
    for i in 0..n {
        let now = std::time::SystemTime::now();
        let id = QueueId::generate(now);
        let msg = format!("Subject: backlog {i}\r\n\r\nx\r\n").into_bytes();
        let env = Envelope {
            id: id.clone(),
            sender: Sender::Address(address("shop@contoso.com")),
            recipients: vec![address(&format!("r{i}@example.org"))],
            uid: 0,
            arrival_us: relay365::spool::queue::micros(now),
            size: msg.len() as u64,
            dsn: Default::default(),
            queue_only: false,
            client: None,
            sasl_username: None,
            account: None,
        };
        std::fs::write(s.new_dir().join(id.as_str()), env.to_file_bytes(&msg))
            .expect("write an incoming file");
    }
}
