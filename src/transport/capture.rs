//! The capture transport (`transport = "maildir:/path"`): writes each transaction
//! into a local Maildir instead of sending it — for staging servers that must not
//! mail real people, and for the README demo.
//!
//! Trusts the configured path (root's config); creates `tmp`, `new`, `cur` as needed.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

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
