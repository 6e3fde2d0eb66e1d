//! The capture transport (`transport = "maildir:/path"`): writes each transaction
//! into a local Maildir instead of sending it — for staging servers that must not
//! mail real people, and for the README demo.
//!
//! Trusts the configured path (root's config); creates `tmp`, `new`, `cur` as needed.

use std::fs;
use std::io;

use crate::spool::durable;
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
            .map(|r| r.address.to_string())
            .collect();
        match deliver(&self.dir, txn.id.as_str(), txn.sender, &rcpts, txn.message) {
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
    let mut head = format!("Return-Path: <{sender}>\r\n");
    for r in recipients {
        head.push_str(&format!("X-Envelope-To: <{r}>\r\n"));
    }
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(message);
    durable::replace(&new, &tmp, &bytes, &durable::options(0o640))?;
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::address::Address;
    use crate::spool::QueueId;
    use crate::spool::envelope::Dsn;
    use crate::transport::TxnRecipient;

    fn a(s: &str) -> &'static Address {
        Box::leak(Box::new(Address::parse(s).unwrap()))
    }

    fn txn<'a>(rcpts: &[TxnRecipient<'a>]) -> Transaction<'a> {
        Transaction {
            id: Box::leak(Box::new(
                QueueId::parse("0000000000001000001000AB").unwrap(),
            )),
            sender: "app@contoso.com",
            recipients: rcpts.to_vec(),
            message: b"Subject: x\r\n\r\nbody\r\n",
            declared_8bit: false,
            dsn: Box::leak(Box::new(Dsn::default())),
        }
    }

    fn rcpt_a() -> TxnRecipient<'static> {
        TxnRecipient {
            address: a("a@example.org"),
            original: None,
        }
    }

    fn rcpt_b() -> TxnRecipient<'static> {
        TxnRecipient {
            address: a("b@example.org"),
            original: Some(a("b-alias@host")),
        }
    }

    #[test]
    fn a_transaction_is_captured_for_every_recipient() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Capture::new(dir.path().join("maildir"));
        assert!(!t.connects());
        assert!(t.open(SystemTime::now()).is_ok());
        let r = t.send(&txn(&[rcpt_a(), rcpt_b()]), SystemTime::now());
        assert_eq!(
            r.relay,
            format!("maildir:{}", dir.path().join("maildir").display())
        );
        assert_eq!(r.recipients, [RcptResult::Accepted, RcptResult::Accepted]);
        let TxnEnd::Sent(text) = r.end else {
            panic!("not sent: {r:?}");
        };
        let path = text.strip_prefix("250 2.0.0 captured as ").unwrap();
        let written = std::fs::read_to_string(path).unwrap();
        assert_eq!(
            written,
            "Return-Path: <app@contoso.com>\r\nX-Envelope-To: <a@example.org>\r\nX-Envelope-To: <b@example.org>\r\nSubject: x\r\n\r\nbody\r\n"
        );
    }

    #[test]
    fn a_maildir_that_cannot_be_written_fails_the_transaction() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let mut t = Capture::new(file.path().join("maildir"));
        let r = t.send(&txn(&[rcpt_a()]), SystemTime::now());
        assert!(r.recipients.is_empty());
        assert!(
            matches!(&r.end, TxnEnd::Failed(text) if text.starts_with("cannot write to ")),
            "{r:?}"
        );
    }
}
