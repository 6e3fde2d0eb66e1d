//! relay365: a drop-in `sendmail` that queues mail durably, and a daemon that
//! submits the queue to Microsoft 365 (Exchange Online) within the mailbox's quotas.
//!
//! ```text
//! caller (any uid) ─► sendmail (setgid relay365-drop; no secrets; small)
//!                       sendmail::deposit: incoming/tmp/<id>, fsync, rename → incoming/new/, fsync dir
//! incoming/{tmp,new}    written by the drop group only
//! relay365 daemon       owns queue/, state/ and the secrets
//!    pickup → queue → scheduler (backoff, quota) → account worker → Transport → sent / bounce / hold
//! ```
//!
//! # Who runs what
//! Two binaries link this library; the module graph keeps the setgid one small
//! (`tests/it/layers.rs` fails if anything `sendmail` reaches names `daemon`,
//! `transport`, `quota`, `secrets`, `listen` or `admin`).
//!
//! | module | binary | user / group | trusts |
//! |---|---|---|---|
//! | [`sendmail`] ([`sendmail::cli`], [`sendmail::options`], [`sendmail::intake`], [`sendmail::bs`], [`sendmail::deposit`], [`sendmail::privilege`]) | `sendmail`, `mailq`, `newaliases` | any caller's uid; setgid `relay365-drop`, held only around the deposit | nothing: argv, stdin, environment, fds |
//! | [`daemon`] (pickup, engine, worker, connect, hold, stop, bounce, route, check) | `relay365 daemon`, `relay365 flush` | `relay365` (group `relay365`, member of `relay365-drop` to read `incoming/`) | incoming files: nothing; the network: only after TLS |
//! | [`listen`] (sockets, access, users, tls) | `relay365 listen` | `relay365-listen`, group `relay365-drop` (writes only `incoming/`, never the secrets) | no client: allow list, AUTH after STARTTLS, per-client bounds; drives `sendmail`'s dialogue, intake and deposit |
//! | [`admin`] | `relay365` | root (or `relay365` for `daemon`) | the command line |
//! | [`transport`] (smtp, capture, oauth, tls, reply, classify) | `relay365` | `relay365` | servers only after TLS verification; every reply byte is untrusted |
//! | [`quota`] (ledger file, windows, freezes; the fleet's store in Redis) | `relay365` | `relay365`, root for `relay365 quota` | its own state files and the store's answers to its own script, parsed strictly |
//! | [`secrets`] | `relay365` | `relay365` (the only module that reads secrets) | the secrets file's owner and mode |
//! | [`aliases`] | both | the caller's uid (`sendmail -bv`), `relay365` | `/etc/aliases`: intent yes, syntax no |
//! | [`config`] ([`config::limits`], [`config::oauth`]) | both | any | the world-readable config, written by root; validated strictly |
//! | [`spool`] (paths, envelope, queue, listing, durable, flock, trigger, init) | both | any; writes only as the daemon or through the deposit | every file it reads |
//! | [`message`] (header, address, qualify, complete, rewrite, text) | both | any | nothing: pure parsing of caller-written text |
//! | [`logging`], [`sysexits`] | both | any | — |
//!
//! # Layers
//! Imports run one way, top to bottom (`tests/it/layers.rs` checks it from the source):
//! `admin` → `listen` → `sendmail`, `daemon` → `aliases`, `quota`, `transport`
//! → `secrets` → `config` → `spool` → `message`, `logging`, `sysexits`.
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
