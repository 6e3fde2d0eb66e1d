//! relay365: a drop-in `sendmail` that queues mail durably and a daemon that
//! submits the queue to Microsoft 365 (Exchange Online) within the mailbox quotas.
pub mod daemon;
pub mod sysexits;
