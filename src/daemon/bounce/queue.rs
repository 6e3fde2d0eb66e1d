//! Queueing a bounce: for a message whose recipients are all final and some failed,
//! builds the DSN ([`super::build_dsn`]) to its sender (resolved through the aliases, as
//! pickup does) and inserts it into the queue as a message of its own.
//!
//! Trusts the locked queue entry (the daemon's own file, locked by the caller) and the
//! config; the failed recipients' reply texts came from the server and are re-parsed
//! with [`Reply::parse`] before they reach the DSN.

use std::time::SystemTime;

use super::{DsnAction, DsnInput, DsnRecipient, Return};
use crate::aliases::Aliases;
use crate::aliases::Locals;
use crate::config::Config;
use crate::logging::{Level, SharedLog};
use crate::message::address::{Address, Sender};
use crate::spool::QueueId;
use crate::spool::envelope::{EnvId, Notify, Ret};
use crate::spool::queue::{Locked, Queue, QueueEntry, RcptStatus, Recipient};
use crate::transport::reply::Reply;

/// What a bounce is built and queued with.
pub struct Bouncer<'a> {
    pub config: &'a Config,
    pub aliases: &'a Aliases,
    pub queue: &'a Queue,
    pub log: &'a SharedLog,
    /// This host, the DSN's reporting MTA.
    pub reporting_mta: &'a str,
    /// The server that refused the recipients.
    pub remote_mta: &'a str,
}

impl Bouncer<'_> {
    fn log(&self, level: Level, line: &str) {
        self.log.log(level, line);
    }

    /// Queues a DSN for the failed recipients, unless the message is a bounce itself,
    /// has the null sender, or asked for no failure notices. `Err` when it is needed
    /// but cannot be queued now (full or failing spool): the caller keeps the message.
    pub fn bounce(&self, locked: &mut Locked, now: SystemTime) -> Result<Option<QueueId>, String> {
        let e = &locked.entry;
        let Sender::Address(sender) = e.sender.clone() else {
            return Ok(None);
        };
        if e.is_bounce || !Notify::on_failure(e.notify) {
            return Ok(None);
        }
        let original = locked.message().map_err(|err| {
            let why = format!("cannot read the queued message: {err}");
            self.log(
                Level::Error,
                &format!("{}: cannot queue the bounce: {why}", locked.entry.id),
            );
            why
        })?;
        let e = &locked.entry;
        let recipients: Vec<DsnRecipient> = e
            .recipients
            .iter()
            .filter(|r| r.status == RcptStatus::Failed)
            .map(|r| {
                let text = r.reply.clone().unwrap_or_default();
                let reply = Reply::parse(&text).ok();
                DsnRecipient {
                    final_recipient: r.address.to_string(),
                    original_recipient: r.original.as_ref().map(Address::to_string),
                    action: DsnAction::Failed,
                    status: reply
                        .as_ref()
                        .map_or_else(|| "5.0.0".to_string(), Reply::dsn_status),
                    diagnostic: reply.as_ref().map(Reply::diagnostic_code),
                    remote_mta: Some(self.remote_mta.to_string()),
                    last_attempt: Some(now),
                    will_retry_until: None,
                    reason: Some(text),
                }
            })
            .collect();
        let locals = Locals::new(self.config, self.aliases);
        let to: Vec<Recipient> = locals.resolve(&sender);
        let dsn = super::build_dsn(&DsnInput {
            reporting_mta: self.reporting_mta.to_string(),
            from: format!("MAILER-DAEMON@{}", self.config.domain),
            to: sender.to_string(),
            envid: e.envid.as_ref().map(EnvId::to_string),
            arrival: e.arrival(),
            queue_id: e.id.to_string(),
            recipients,
            original: &original,
            ret: if e.ret == Some(Ret::Hdrs) {
                Return::Headers
            } else {
                Return::Full
            },
            return_limit: super::DEFAULT_RETURN_LIMIT,
            now,
        });
        self.queue_dsn(&e.id.to_string(), &e.sender.to_string(), to, &dsn, now)
    }

    /// Inserts a DSN for `to` (resolved recipients) into the queue, for message `id` of
    /// `sender`; logs both ways.
    fn queue_dsn(
        &self,
        id: &str,
        sender: &str,
        to: Vec<Recipient>,
        dsn: &[u8],
        now: SystemTime,
    ) -> Result<Option<QueueId>, String> {
        let bid = QueueId::generate(SystemTime::now());
        let mut entry = QueueEntry::new(
            &bid,
            &Sender::Null,
            nix::unistd::getuid().as_raw(),
            now,
            dsn.len() as u64,
            to,
        );
        entry.is_bounce = true;
        if !entry.has_pending() {
            self.log(
                Level::Warning,
                &format!("{id}: the bounce to <{sender}> has nowhere to go; dropped"),
            );
            return Ok(None);
        }
        match self.queue.insert(&entry, dsn) {
            Ok(()) => {
                self.log(
                    Level::Info,
                    &format!("{id}: sender non-delivery notification: {bid}"),
                );
                Ok(Some(bid))
            }
            Err(err) => {
                // Take back a half-written bounce so the next try starts clean.
                let _ = self.queue.remove(&bid);
                self.log(
                    Level::Error,
                    &format!(
                        "{id}: cannot queue the bounce, keeping the message to try again: {err}"
                    ),
                );
                Err(err.to_string())
            }
        }
    }

    /// Queues the DSN for recipients an NDR reported after the message left the queue
    /// (see [`crate::daemon::harvest`]): to the original sender from the sent log, with
    /// the original headers the NDR returned. Nothing for a bounce, the null sender or
    /// `NOTIFY` without `FAILURE`.
    pub fn late(
        &self,
        sent: &crate::daemon::harvest::sentlog::SentRecord,
        recipients: Vec<DsnRecipient>,
        original_headers: &[u8],
        now: SystemTime,
    ) -> Result<Option<QueueId>, String> {
        let Sender::Address(sender) = sent.sender.clone() else {
            return Ok(None);
        };
        if sent.is_bounce || !Notify::on_failure(sent.notify) {
            return Ok(None);
        }
        let mut original = original_headers.to_vec();
        original.extend_from_slice(b"\r\n");
        let locals = Locals::new(self.config, self.aliases);
        let to: Vec<Recipient> = locals.resolve(&sender);
        let dsn = super::build_dsn(&DsnInput {
            reporting_mta: self.reporting_mta.to_string(),
            from: format!("MAILER-DAEMON@{}", self.config.domain),
            to: sender.to_string(),
            envid: sent.envid.as_ref().map(EnvId::to_string),
            arrival: std::time::UNIX_EPOCH + std::time::Duration::from_micros(sent.arrival_us),
            queue_id: sent.queue_id.clone(),
            recipients,
            original: &original,
            ret: Return::Headers,
            return_limit: super::DEFAULT_RETURN_LIMIT,
            now,
        });
        self.queue_dsn(&sent.queue_id, &sender.to_string(), to, &dsn, now)
    }
}
