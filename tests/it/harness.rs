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
        let dir = tempfile::tempdir().expect("tempdir");
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

pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}
