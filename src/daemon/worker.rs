//! Delivery of one queued message through one account: quota reservation, the SMTP
//! transaction (or the capture Maildir), per-recipient results, the verdict for each
//! reply (exchange-online.md's table), retries, account holds and bounces.
//!
//! Trusts the queue (the daemon's own files, locked while in use) and the config.
//! Every reply from the server goes through [`classify`](crate::transport::classify).
//! Secrets are only touched to build the AUTH exchange and never appear in a log line.
//!
//! The transaction itself goes through the account's [`Transport`] (made by
//! [`transport_for`]); this worker applies what it reports (see `apply`).

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::aliases::Aliases;
use crate::config::{Account, AuthMode, Config, Transport as Kind};
use crate::daemon::bounce::queue::Bouncer;
use crate::daemon::connect::{host_name, transport_for};
use crate::daemon::hold::read_hold;
use crate::daemon::stop::Stop;
use crate::logging::SharedLog;
use crate::message::rewrite;
use crate::quota::{FreezeCheck, Grant, Store};
use crate::secrets::{AccountSecrets, Secret};
use crate::spool::QueueId;
use crate::spool::envelope::{BodyType, Dsn};
use crate::spool::paths::Spool;
use crate::spool::queue::{Locked, Queue, QueueEntry, RcptStatus, micros};
use crate::transport::classify::{Verdict, backoff};
use crate::transport::{Transaction, Transport, TxnEnd, TxnRecipient};

mod apply;

/// Longest the worker sleeps for the quota window inside one delivery; longer waits
/// defer the message and free the worker for other work (SIGTERM, other messages).
const PACE_WAIT_MAX: Duration = Duration::from_secs(120);
/// The stamp lead before any transaction was timed: MAIL, RCPT, DATA and the dot at
/// Exchange Online's ~50 ms a reply (see [`AccountWorker::lead`]).
const FIRST_LEAD: Duration = Duration::from_millis(250);
/// How many recent transaction times the lead is taken from.
const LEAD_SAMPLES: usize = 16;

/// What happened to a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every recipient is final; the message left the queue.
    Finished,
    /// Some recipients wait until then.
    Deferred(SystemTime),
    /// Part was sent; the rest gave way to other messages and may go at that moment.
    Yielded(SystemTime),
    /// Not attempted: locked by another process, not due, or gone.
    Skipped,
}

/// A delivery's outcome plus any bounce it queued.
#[derive(Debug)]
pub struct Report {
    pub outcome: Outcome,
    pub spawned: Vec<QueueId>,
}

/// Logged once per process: Microsoft's basic-auth timeline.
static BASIC_AUTH_WARNED: AtomicBool = AtomicBool::new(false);

/// An account worker: everything needed to deliver through one account; one per
/// worker thread (an account has as many as it may open connections).
pub struct AccountWorker {
    pub account: Account,
    config: Arc<Config>,
    aliases: Arc<Aliases>,
    spool: Spool,
    queue: Queue,
    /// The account's quota ledger: this host's file, or the fleet's in Redis.
    ledger: Store,
    /// How this account sends: the only way out for a transaction.
    transport: Box<dyn Transport>,
    log: SharedLog,
    host: String,
    pauses: u32,
    /// After a failed connection: no new attempt before this (one error line a retry).
    retry_after: Option<(SystemTime, String)>,
    /// Whether other messages wait for this account's workers (set by the engine).
    pub others_waiting: Box<dyn Fn() -> bool + Send>,
    /// The message in hand gave way to others with recipients still to send.
    gave_way: bool,
    /// The transport was made ready (see [`AccountWorker::ready`]) for the transaction about
    /// to start.
    checked: bool,
    /// How long recent transactions took from reservation to the reply after the dot.
    took: VecDeque<Duration>,
    /// The Message-ID of the message in hand, for the sent log (`harvest_bounces`).
    message_id: Option<String>,
    pub stop: Arc<Stop>,
}

/// Why an account worker could not be built.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("account {account}: {message}")]
    Setup { account: String, message: String },
}

/// What one transaction attempt ended with.
enum Flow {
    /// Go on with the next batch.
    Continue,
    /// Stop working on this message now.
    Stop,
}

impl AccountWorker {
    pub fn new(
        account: Account,
        config: Arc<Config>,
        aliases: Arc<Aliases>,
        secrets: Option<AccountSecrets>,
        store_password: Option<Secret>,
        log: SharedLog,
        stop: Arc<Stop>,
    ) -> Result<AccountWorker, WorkerError> {
        let spool = Spool::new(&config.spool_dir);
        let ledger_path = spool.ledger(&account.name);
        let ledger = Store::open(
            &ledger_path,
            config.quota_store.as_ref(),
            store_password,
            &account.mailbox,
            Some(log.clone()),
        )
        .map_err(|e| WorkerError::Setup {
            account: account.name.clone(),
            message: e.to_string(),
        })?;
        if matches!(account.auth, AuthMode::Login | AuthMode::Plain)
            && account.transport == Kind::Smtp
            && !BASIC_AUTH_WARNED.swap(true, Ordering::SeqCst)
        {
            log.warning(&format!(
                "account {}: basic authentication (AUTH {}) is deprecated: Microsoft disables it by default for existing tenants at the end of December 2026 and will remove it in 2027; switch to auth = \"xoauth2\"",
                account.name,
                if account.auth == AuthMode::Login { "LOGIN" } else { "PLAIN" }
            ));
        }
        Ok(AccountWorker {
            transport: transport_for(&account, &config, secrets),
            queue: Queue::new(&spool),
            spool,
            ledger,
            log,
            host: host_name(),
            pauses: 0,
            retry_after: None,
            others_waiting: Box::new(|| false),
            gave_way: false,
            checked: false,
            took: VecDeque::new(),
            message_id: None,
            stop,
            account,
            config,
            aliases,
        })
    }

    fn log(&self, level: crate::logging::Level, line: &str) {
        self.log.log(level, line);
    }

    /// Closes the transport's connection politely.
    pub fn close(&mut self) {
        self.transport.close();
    }

    /// Why the account cannot send now, if it cannot, and until when.
    /// `force`: root's `relay365 flush` (or `flush --wake`) overrides a hold and backoff.
    fn blocked(&mut self, now: SystemTime, force: bool) -> Option<(SystemTime, String)> {
        if !force {
            if let Some((until, why)) = &self.retry_after
                && *until > now
            {
                return Some((*until, why.clone()));
            }
            if let Some(h) = read_hold(&self.spool, &self.account.name) {
                let until = UNIX_EPOCH + Duration::from_micros(h.until_us);
                if until > now {
                    return Some((
                        until,
                        format!("account {} held: {}", self.account.name, h.reason),
                    ));
                }
            }
        }
        match self.ledger.check_freeze(now) {
            Ok(FreezeCheck::Frozen(f)) => Some((
                f.until,
                format!("quota: account {} frozen: {}", self.account.name, f.reason),
            )),
            Ok(FreezeCheck::Ended(f)) => {
                self.log(
                    crate::logging::Level::Info,
                    &format!(
                        "account {}: the freeze until {} is over, sending resumes (it was: {})",
                        self.account.name,
                        crate::message::complete::rfc5322_date(f.until),
                        f.reason
                    ),
                );
                None
            }
            // An unreadable freeze file does not stop the account: the server's next
            // quota reply would freeze it again (the same as before this check).
            Ok(FreezeCheck::Free) | Err(_) => None,
        }
    }

    /// Delivers what is pending of message `id`. `explicit`: a flush or `sendmail -q`,
    /// which ignores the message's own retry time; `force`: root's flush, which also
    /// ignores the account's hold and backoff (never a quota freeze). A `sendmail -q`
    /// is never `force`: any local user may run it (issue 18 item 1).
    pub fn deliver(&mut self, id: &QueueId, explicit: bool, force: bool) -> Report {
        let now = SystemTime::now();
        self.gave_way = false;
        let mut spawned = Vec::new();
        let mut locked = match self.queue.lock(id) {
            Ok(Some(l)) => l,
            Ok(None) => {
                return Report {
                    outcome: Outcome::Skipped,
                    spawned,
                };
            }
            Err(e) => {
                self.log(
                    crate::logging::Level::Error,
                    &format!("{id}: cannot lock: {e}"),
                );
                return Report {
                    outcome: Outcome::Skipped,
                    spawned,
                };
            }
        };
        if !locked.entry.is_due(now, explicit) {
            let e = &locked.entry;
            let outcome = if e.held || (e.queue_only && e.attempts == 0) {
                // Waits for an administrator's release or an explicit queue run (-odq),
                // not for a moment: rescheduling it at its (past) next attempt made the
                // daemon spin on it.
                Outcome::Deferred(UNIX_EPOCH + Duration::from_micros(u64::MAX))
            } else {
                Outcome::Deferred(e.next_attempt())
            };
            return Report { outcome, spawned };
        }
        if !locked.entry.has_pending() {
            // Left finished by an earlier run whose bounce or removal failed.
            let outcome = self.settle(&mut locked, now, &mut spawned);
            return Report { outcome, spawned };
        }
        let age = now
            .duration_since(locked.entry.arrival())
            .unwrap_or_default();
        if age > self.config.max_queue_lifetime {
            let days = self.config.max_queue_lifetime.as_secs_f64() / 86_400.0;
            for r in locked
                .entry
                .recipients
                .iter_mut()
                .filter(|r| r.status == RcptStatus::Pending)
            {
                let last = r
                    .reply
                    .take()
                    .unwrap_or_else(|| "no attempt succeeded".into());
                r.reply = Some(format!(
                    "4.4.7 message expired after {days:.1} days in the queue: {last}"
                ));
                r.status = RcptStatus::Failed;
            }
        } else if let Some((until, why)) = self.blocked(now, force) {
            let e = &mut locked.entry;
            if e.reason.as_deref() != Some(why.as_str()) || e.next_attempt_us != micros(until) {
                e.reason = Some(why);
                e.set_next_attempt(until);
                e.account = Some(self.account.name.clone());
                let _ = self.queue.update(e);
            }
            return Report {
                outcome: Outcome::Deferred(until),
                spawned,
            };
        } else {
            self.attempt(&mut locked);
        }
        let outcome = self.settle(&mut locked, now, &mut spawned);
        Report { outcome, spawned }
    }

    /// Works through the pending recipients in batches until done or stopped.
    fn attempt(&mut self, locked: &mut Locked) {
        let message = match locked.message() {
            Ok(m) => m,
            Err(e) => {
                self.log(
                    crate::logging::Level::Error,
                    &format!("{}: cannot read the queued message: {e}", locked.entry.id),
                );
                return;
            }
        };
        let outgoing = rewrite::apply(
            &message,
            &self.account.mailbox,
            self.account.from,
            &self.config.domain,
        );
        locked.entry.account = Some(self.account.name.clone());
        locked.entry.reason = None;
        self.message_id = crate::message::header::parse(&outgoing).ok().and_then(|m| {
            m.get("Message-ID").map(|h| {
                String::from_utf8_lossy(&h.raw()[h.value_offset()..])
                    .trim()
                    .to_owned()
            })
        });
        let mut tried: HashSet<usize> = HashSet::new();
        let mut batch_cap = self.account.limits.max_recipients.max(1) as usize;
        loop {
            if self.stop.is_set() {
                break;
            }
            let mut batch: Vec<usize> = locked
                .entry
                .recipients
                .iter()
                .enumerate()
                .filter(|(i, r)| r.status == RcptStatus::Pending && !tried.contains(i))
                .map(|(i, _)| i)
                .take(batch_cap)
                .collect();
            if batch.is_empty() {
                break;
            }
            let connects = self.transport.connects();
            self.checked = false;
            // Connect (or check the kept connection) before the reservation, so its
            // stamp need only lead the server's by the transaction itself; not when
            // the reservation is bound to wait, lest a connection idle for nothing.
            if connects
                && self
                    .ledger
                    .room(SystemTime::now(), &self.account.limits)
                    .is_ok_and(|r| r > 0)
            {
                let now = SystemTime::now();
                if let Err(v) = self.ready(now) {
                    tried.extend(batch.iter().copied());
                    let flow = self.apply(locked, &batch, &v, now);
                    self.record(locked);
                    if let Flow::Stop = flow {
                        break;
                    }
                    continue;
                }
            }
            let now = SystemTime::now();
            let lead = if connects {
                self.lead()
            } else {
                Duration::ZERO
            };
            match self.ledger.reserve_some_ahead(
                now,
                lead,
                batch.len() as u32,
                &self.account.limits,
            ) {
                Ok(Grant::Go(n)) => batch.truncate(n as usize),
                Ok(Grant::WaitUntil(t)) => {
                    let wait = t.duration_since(now).unwrap_or_default();
                    // Having sent part of its recipients, a message gives way to the
                    // others waiting for this account rather than take all the room as
                    // it frees: the engine's schedule then takes them in turn.
                    let give_way = !tried.is_empty() && (self.others_waiting)();
                    if wait <= PACE_WAIT_MAX
                        && !give_way
                        && self.ledger.frozen(now).ok().flatten().is_none()
                    {
                        if self.stop.sleep_until(t) {
                            continue;
                        }
                        break;
                    }
                    self.gave_way = give_way;
                    let reason = self
                        .ledger
                        .usage(now, &self.account.limits)
                        .ok()
                        .and_then(|u| u.reason())
                        .unwrap_or_else(|| "quota: waiting for room".to_string());
                    locked.entry.reason = Some(reason);
                    locked.entry.set_next_attempt(t);
                    break;
                }
                Err(e) => {
                    self.log(
                        crate::logging::Level::Error,
                        &format!("{}: quota ledger: {e}", locked.entry.id),
                    );
                    locked.entry.reason = Some(format!("quota ledger error: {e}"));
                    break;
                }
            }
            tried.extend(batch.iter().copied());
            let flow = self.transaction(locked, &batch, &outgoing, &mut tried, &mut batch_cap);
            if connects {
                self.learn(now, lead, batch.len() as u32);
            }
            // A message whose every recipient went out leaves the queue in `settle` at
            // once; recording that first would cost two fsyncs and a rename without
            // narrowing the window in which a crash could send it again.
            let finished = locked
                .entry
                .recipients
                .iter()
                .all(|r| r.status == RcptStatus::Sent);
            if !finished {
                self.record(locked);
            }
            if let Flow::Stop = flow {
                break;
            }
        }
    }

    /// Writes the entry's per-recipient state back; a failure is logged (the attempt
    /// is then repeated from the old state, which may send some recipients twice).
    fn record(&self, locked: &Locked) {
        if let Err(e) = self.queue.update(&locked.entry) {
            self.log(
                crate::logging::Level::Error,
                &format!("{}: cannot record the result: {e}", locked.entry.id),
            );
        }
    }

    /// Makes the transport ready (opens the account's connection unless a kept one is
    /// not known to be broken); after a failure, no new attempt for a minute.
    fn ready(&mut self, now: SystemTime) -> Result<(), Verdict> {
        match self.transport.open(now) {
            Ok(()) => {
                self.retry_after = None;
                self.checked = true;
                Ok(())
            }
            Err(v) => {
                self.retry_after = Some((now + Duration::from_secs(60), v.reason.clone()));
                Err(v)
            }
        }
    }

    /// How far ahead to stamp a reservation: twice the longest recent transaction
    /// (reservation to the reply after the dot), since the server stamps the message
    /// somewhere in between (see [`Ledger::reserve_some_ahead`]). Twice, because a
    /// transaction that overruns its lead costs a whole slot for a window (see
    /// [`AccountWorker::learn`]), while the margin costs only itself once a window: 0.5 s
    /// a minute at Exchange Online's latency.
    fn lead(&self) -> Duration {
        match self.took.iter().max() {
            Some(&longest) => longest * 2 + Duration::from_millis(5),
            None => FIRST_LEAD,
        }
    }

    /// Records how long the transaction reserved at `reserved` took. If it took longer
    /// than its `lead` plus a window's guard, the server may have stamped it after its
    /// entry stops counting; a second entry stamped now covers the rest (over-counting
    /// a little, never under-counting). Recipients only go in it when the recipient
    /// window's guard was overrun too, which a 24-hour window's 86 s guard never is.
    fn learn(&mut self, reserved: SystemTime, lead: Duration, rcpts: u32) {
        let now = SystemTime::now();
        let took = now.duration_since(reserved).unwrap_or_default();
        if self.took.len() == LEAD_SAMPLES {
            self.took.pop_front();
        }
        self.took.push_back(took);
        let limits = &self.account.limits;
        let overran =
            |r: &crate::config::limits::Rate| r.is_limited() && took > lead + (r.hold() - r.window);
        let extra = if overran(&limits.recipient_rate) {
            rcpts
        } else if overran(&limits.message_rate) {
            1
        } else {
            return;
        };
        if let Err(e) = self
            .ledger
            .record_external(now, extra, &self.account.limits)
        {
            self.log(
                crate::logging::Level::Error,
                &format!("account {}: quota ledger: {e}", self.account.name),
            );
        }
    }

    /// One transaction for `batch` through the transport (its connection opened if
    /// needed).
    fn transaction(
        &mut self,
        locked: &mut Locked,
        batch: &[usize],
        outgoing: &[u8],
        tried: &mut HashSet<usize>,
        batch_cap: &mut usize,
    ) -> Flow {
        let now = SystemTime::now();
        // A kept connection the server closed while idle shows up as MAIL failing
        // without a reply (`Stale`): then reconnect once rather than defer the message.
        for _ in 0..2 {
            if self.transport.connects()
                && !self.checked
                && let Err(v) = self.ready(now)
            {
                return self.apply(locked, batch, &v, now);
            }
            self.checked = false;
            let dsn = locked.entry.dsn();
            let txn = transaction(&locked.entry, batch, &self.account.mailbox, outgoing, &dsn);
            let result = self.transport.send(&txn, now);
            if result.end == TxnEnd::Stale {
                continue;
            }
            return self.conclude(locked, batch, result, tried, batch_cap, now);
        }
        Flow::Stop
    }

    /// After an attempt: finish the message or schedule its next attempt.
    fn settle(
        &mut self,
        locked: &mut Locked,
        now: SystemTime,
        spawned: &mut Vec<QueueId>,
    ) -> Outcome {
        let id = locked.entry.id.clone();
        if locked.entry.has_pending() {
            if locked.entry.next_attempt_us <= micros(now) {
                locked.entry.attempts += 1;
                locked
                    .entry
                    .set_next_attempt(now + backoff(locked.entry.attempts));
            }
            if let Err(e) = self.queue.update(&locked.entry) {
                self.log(
                    crate::logging::Level::Error,
                    &format!("{id}: cannot record the result: {e}"),
                );
            }
            if self.gave_way {
                return Outcome::Yielded(locked.entry.next_attempt());
            }
            return Outcome::Deferred(locked.entry.next_attempt());
        }
        if locked
            .entry
            .recipients
            .iter()
            .any(|r| r.status == RcptStatus::Failed)
        {
            let bouncer = Bouncer {
                config: &self.config,
                aliases: &self.aliases,
                queue: &self.queue,
                log: &self.log,
                reporting_mta: &self.host,
                remote_mta: match self.account.transport {
                    Kind::Graph => self.account.graph.host(),
                    _ => &self.account.host,
                },
            };
            match bouncer.bounce(locked, now) {
                Ok(Some(b)) => spawned.push(b),
                Ok(None) => {}
                Err(why) => {
                    // The sender must hear of the failure: keep the message (every
                    // recipient final) until its bounce can be queued.
                    locked.entry.attempts += 1;
                    locked
                        .entry
                        .set_next_attempt(now + backoff(locked.entry.attempts));
                    locked.entry.reason = Some(format!("bounce not queued yet: {why}"));
                    if let Err(e) = self.queue.update(&locked.entry) {
                        self.log(
                            crate::logging::Level::Error,
                            &format!("{id}: cannot record the result: {e}"),
                        );
                    }
                    return Outcome::Deferred(locked.entry.next_attempt());
                }
            }
        }
        if let Err(e) = self.queue.remove(&id) {
            self.log(
                crate::logging::Level::Error,
                &format!("{id}: cannot remove the finished message: {e}"),
            );
        } else {
            self.log(crate::logging::Level::Info, &format!("{id}: removed"));
        }
        Outcome::Finished
    }
}

/// The transaction for `batch` of the entry's recipients, from `sender`.
fn transaction<'a>(
    e: &'a QueueEntry,
    batch: &[usize],
    sender: &'a str,
    message: &'a [u8],
    dsn: &'a Dsn,
) -> Transaction<'a> {
    Transaction {
        id: &e.id,
        sender,
        recipients: batch
            .iter()
            .map(|&i| TxnRecipient {
                address: &e.recipients[i].address,
                original: e.recipients[i].original.as_ref(),
            })
            .collect(),
        message,
        declared_8bit: e.body == Some(BodyType::EightBitMime),
        dsn,
    }
}
