//! Transport: how the daemon hands queued mail to Microsoft 365 and how it reads the
//! answers. Trusts nothing it receives from the network until TLS has verified the
//! peer, and treats every byte of a server reply as untrusted.
//!
//! [`Transport`] is the seam between the account worker and a way of sending: SMTP
//! submission ([`smtp::Submission`]) and the capture Maildir ([`capture::Capture`])
//! implement it. A transport reports what each recipient's answer means as a
//! [`Verdict`] from [`classify`]'s decision table; the worker applies it (quota, holds,
//! bounces, retries), so a new transport changes none of that.
pub mod capture;
pub mod classify;
pub mod graph;
pub mod http;
pub mod oauth;
pub mod proxy;
pub mod reply;
pub mod smtp;
pub mod tls;

use std::time::SystemTime;

use classify::Verdict;

use crate::message::address::Address;
use crate::spool::QueueId;
use crate::spool::envelope::Dsn;

/// One way of sending an account's mail: one instance per account worker.
pub trait Transport: Send {
    /// Whether the transport keeps a connection to a server. For one that does, the
    /// worker calls [`Transport::open`] before it reserves quota, and the reservation
    /// leads the server's stamp by the time its transactions take.
    fn connects(&self) -> bool;
    /// Makes the transport ready for a transaction: opens (and authenticates) a
    /// connection unless a kept one is not known to be broken. `Err` is the verdict
    /// for the transaction's recipients.
    fn open(&mut self, now: SystemTime) -> Result<(), Verdict>;
    /// Sends one transaction, opening a connection first if there is none.
    fn send(&mut self, txn: &Transaction, now: SystemTime) -> TxnResult;
    /// Closes the connection, if there is one, politely.
    fn close(&mut self);
}

/// One message for some of its recipients, as the worker hands it over.
#[derive(Debug, Clone)]
pub struct Transaction<'a> {
    /// The queue ID, for file names and log lines.
    pub id: &'a QueueId,
    /// The envelope sender: the account's mailbox.
    pub sender: &'a str,
    /// In the order their results come back.
    pub recipients: Vec<TxnRecipient<'a>>,
    /// The message as it goes out (rewritten), ending in CRLF.
    pub message: &'a [u8],
    /// The caller declared an 8-bit body (`-B8BITMIME`, `BODY=8BITMIME`).
    pub declared_8bit: bool,
    /// What the caller asked of delivery status notifications (RFC 3461).
    pub dsn: &'a Dsn,
}

/// One recipient of a [`Transaction`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnRecipient<'a> {
    pub address: &'a Address,
    /// The address as the caller gave it, before alias expansion (`ORCPT`).
    pub original: Option<&'a Address>,
}

/// What became of a transaction: the recipients answered, in order, then how it ended.
/// Recipients after the last one answered were not offered to the server.
#[derive(Debug, Clone)]
pub struct TxnResult {
    /// Who answered, for log lines (`host[address]:port`, `maildir:/path`).
    pub relay: String,
    pub recipients: Vec<RcptResult>,
    pub end: TxnEnd,
}

impl TxnResult {
    /// A transaction that ended before any recipient was answered.
    pub fn ended(relay: String, end: TxnEnd) -> TxnResult {
        TxnResult {
            relay,
            recipients: Vec::new(),
            end,
        }
    }
}

/// One recipient's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptResult {
    /// Accepted; whether the message went out is in [`TxnEnd`].
    Accepted,
    /// Refused: the verdict, and the server's answer as logged and kept in the queue.
    /// A verdict for which [`classify::Action::ends_transaction`] holds ended the
    /// transaction at this recipient ([`TxnEnd::Stopped`]).
    Refused { verdict: Verdict, text: String },
}

/// How a transaction ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnEnd {
    /// A kept connection turned out dead before anything was sent: open another and
    /// try again.
    Stale,
    /// The verdict concerns every recipient of the transaction: the message was refused
    /// whole, or the connection failed.
    All(Verdict),
    /// A refused recipient's verdict ended the transaction (the last in `recipients`).
    Stopped,
    /// No recipient was accepted, so the message was not sent.
    NoneAccepted,
    /// The message went out to every accepted recipient; the server's answer.
    Sent(String),
    /// The message was refused after the accepted recipients: the verdict concerns them.
    Refused(Verdict),
    /// The transport could not take the message (a local failure, with no server's
    /// answer): the text for every recipient; the message waits for the next attempt.
    Failed(String),
}
