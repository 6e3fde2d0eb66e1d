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
//! - [`quota`]: the per-account send ledger and freezes, on this host or shared by a
//!   fleet through Redis (`quota_store`) (run in the `relay365` binary
//!   by the daemon user `relay365`, and by root's admin commands); trusts only its own
//!   state files and the store's answers to its own script, and parses both strictly.
//! - [`transport`]: SMTP submission, OAuth2 tokens and reply classification; trusts
//!   the server only after TLS verification.
//!   - [`config::oauth`]: an app registration's OAuth2 settings and their checks.
//! - [`daemon`]: pickup, queue runs, bounces and aliases; distrusts incoming files.
//!   - [`daemon::worker`]: the account worker (delivery through one account); applies verdicts.
//!   - [`daemon::connect`]: connection set-up and login; the one factory of a transport.
//!   - [`daemon::hold`]: account holds, shared with the admin commands.
//!   - [`daemon::stop`]: the workers' stop signal.
//!   - [`daemon::bounce::queue`]: building and queueing a bounce for failed recipients.
//! - [`transport`]: the [`transport::Transport`] trait, SMTP submission, OAuth2 tokens and
//!   reply classification; trusts the server only after TLS verification.
//!   - [`transport::reply`]: the SMTP reply parser; untrusted server bytes.
//!   - [`transport::smtp::params`]: MAIL FROM and RCPT TO parameters, a pure function.
//!   - `transport::smtp::conn` and `submit`: the connection; SMTP as a [`transport::Transport`].
//!   - `transport::oauth::assertion`: the certificate credential's signed JWT.
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
pub mod logging;
pub mod message;
pub mod quota;
pub mod secrets;
pub mod sendmail;
pub mod spool;
pub mod sysexits;
pub mod transport;
