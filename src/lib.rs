//! relay365: a drop-in `sendmail` that queues mail durably, and a daemon that
//! submits the queue to Microsoft 365 (Exchange Online) within the mailbox's quotas.
//!
//! ```text
//! caller (any uid) ─► sendmail (setgid relay365-drop; no secrets; small)
//!                       writes incoming/tmp/<id>, fsync, rename → incoming/new/, fsync dir
//! incoming/{tmp,new}    written by the drop group only
//! relay365 daemon       owns queue/, state/ and the secrets
//!    pickup → queue → scheduler (backoff, quota) → transport → sent / bounce / hold
//! ```
//!
//! Modules and what each trusts:
//! - [`sendmail`]: argv, stdin, and the process state a caller hands a setgid program —
//!   all untrusted. [`sendmail::privilege`] holds the group only around file operations.
//! - [`message`]: pure parsing of caller-written headers and addresses; untrusted input.
//! - [`spool`]: the path table, the incoming maildir and the envelope format; readers
//!   distrust every file.
//! - [`config`]: the world-readable config file, written by root; validated strictly.
//!   [`config::limits`] holds the rates and limits the quota enforces.
//! - [`daemon`]: pickup, queue runs, bounces and aliases; distrusts incoming files.
//! - [`listen`]: the network SMTP listener (`relay365 listen`), above `sendmail`, whose
//!   dialogue, intake and deposit it drives; trusts no client, never reads the secrets.
//! - [`quota`]: the per-account send ledger and freezes (run in the `relay365` binary
//!   by the daemon user `relay365`, and by root's admin commands); trusts only its own
//!   state files, and parses even those strictly.
//! - [`transport`]: SMTP submission, OAuth2 tokens and reply classification; trusts
//!   the server only after TLS verification.
//! - [`secrets`]: the only module that reads secrets; redacts them everywhere.
//! - [`sysexits`]: the one mapping of errors to exit codes.
#![deny(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod admin;
pub mod aliases;
pub mod config;
pub mod daemon;
pub mod listen;
pub mod logging;
pub mod message;
pub mod quota;
pub mod secrets;
pub mod sendmail;
pub mod spool;
pub mod sysexits;
pub mod transport;
