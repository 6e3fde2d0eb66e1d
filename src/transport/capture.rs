//! The capture transport (`transport = "maildir:/path"`): writes each transaction
//! into a local Maildir instead of sending it — for staging servers that must not
//! mail real people, and for the README demo.
//!
//! Trusts the configured path (root's config); creates `tmp`, `new`, `cur` as needed.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::classify::Verdict;
use super::{RcptResult, Transaction, Transport, TxnEnd, TxnResult};

/// The capture transport of one account: every transaction is written to `dir`.
#[derive(Debug, Clone)]
pub struct Capture {
    dir: PathBuf,
}

impl Capture {
    pub fn new(dir: PathBuf) -> Capture {
        Capture { dir }
    }
}

impl Transport for Capture {
    fn connects(&self) -> bool {
        false
    }

    fn open(&mut self, _now: SystemTime) -> Result<(), Verdict> {
        Ok(())
    }

    fn send(&mut self, txn: &Transaction, _now: SystemTime) -> TxnResult {
        let relay = format!("maildir:{}", self.dir.display());
        let rcpts: Vec<String> = txn
            .recipients
            .iter()
            .map(|r| r.address.to_owned())
            .collect();
        match deliver(&self.dir, txn.id, txn.sender, &rcpts, txn.message) {
            Ok(path) => TxnResult {
                relay,
                recipients: vec![RcptResult::Accepted; rcpts.len()],
                end: TxnEnd::Sent(format!("250 2.0.0 captured as {}", path.display())),
            },
            Err(e) => TxnResult::ended(
                relay,
                TxnEnd::Failed(format!("cannot write to {}: {e}", self.dir.display())),
            ),
        }
    }

    fn close(&mut self) {}
}

/// Delivers `message` for `recipients` into the Maildir at `dir`; returns the file.
/// The envelope is recorded in `Return-Path` and `X-Envelope-To` header lines.
pub fn deliver(
    dir: &Path,
    id: &str,
    sender: &str,
    recipients: &[String],
    message: &[u8],
) -> io::Result<PathBuf> {
    for sub in ["tmp", "new", "cur"] {
        fs::create_dir_all(dir.join(sub))?;
    }
    let mut rand = [0u8; 4];
    let _ = getrandom::fill(&mut rand);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    let name = format!("{now}.{id}.{:08x}.relay365", u32::from_le_bytes(rand));
    let tmp = dir.join("tmp").join(&name);
    let new = dir.join("new").join(&name);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&tmp)?;
    let mut head = format!("Return-Path: <{sender}>\r\n");
    for r in recipients {
        head.push_str(&format!("X-Envelope-To: <{r}>\r\n"));
    }
    f.write_all(head.as_bytes())?;
    f.write_all(message)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, &new)?;
    File::open(dir.join("new"))?.sync_all()?;
    Ok(new)
}
