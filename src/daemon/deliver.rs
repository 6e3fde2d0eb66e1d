//! Delivery of one queued message through one account: quota reservation, the SMTP
//! transaction (or the capture Maildir), per-recipient results, the verdict for each
//! reply (exchange-online.md's table), retries, account holds and bounces.
//!
//! Trusts the queue (the daemon's own files, locked while in use) and the config.
//! Every reply from the server goes through [`classify`]. Secrets are only touched
//! to build the AUTH exchange and never appear in a log line.

use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::{Account, AuthMode, Config, Transport};
use crate::daemon::aliases::Aliases;
use crate::daemon::bounce::{self, DsnAction, DsnInput, DsnRecipient, Return};
use crate::daemon::pickup::Locals;
use crate::daemon::quota::{FreezeCheck, Grant, Ledger};
use crate::logging::Log;
use crate::message::rewrite;
use crate::secrets::{AccountSecrets, Secret};
use crate::sendmail::options::Ret;
use crate::spool::QueueId;
use crate::spool::paths::Spool;
use crate::spool::queue::{Locked, Queue, QueueEntry, RcptStatus, Recipient, micros};
use crate::transport::capture;
use crate::transport::classify::{
    self, Action, HOLD_PROBE_INTERVAL, HoldUntil, Quota, Verdict, backoff, pause_for,
};
use crate::transport::oauth::{ClientCredential, TokenSource};
use crate::transport::reply::Reply;
use crate::transport::smtp::{Endpoint, Failure, Login, Session, xtext};

/// Longest the worker sleeps for the quota window inside one delivery; longer waits
/// defer the message and free the worker for other work (SIGTERM, other messages).
const PACE_WAIT_MAX: Duration = Duration::from_secs(120);
/// The stamp lead before any transaction was timed: MAIL, RCPT, DATA and the dot at
/// Exchange Online's ~50 ms a reply (see [`Runner::lead`]).
const FIRST_LEAD: Duration = Duration::from_millis(250);
/// How many recent transaction times the lead is taken from.
const LEAD_SAMPLES: usize = 16;

/// Shared stop signal with an interruptible sleep.
#[derive(Debug, Default)]
pub struct Stop {
    flag: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
}

impl Stop {
    pub fn set(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.cv.notify_all();
    }
    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
    /// Sleeps until `t` (exactly, not past it) unless stopped; true if `t` was reached.
    pub fn sleep_until(&self, t: SystemTime) -> bool {
        let Ok(mut guard) = self.lock.lock() else {
            return false;
        };
        loop {
            if self.is_set() {
                return false;
            }
            let Ok(left) = t.duration_since(SystemTime::now()) else {
                return true;
            };
            if left.is_zero() {
                return true;
            }
            match self.cv.wait_timeout(guard, left) {
                Ok((g, _)) => guard = g,
                Err(_) => return false,
            }
        }
    }
}

/// An account held for a problem only an administrator can fix (bad credentials,
/// SMTP AUTH disabled, mailbox blocked): persisted so flush and daemon agree.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hold {
    pub until_us: u64,
    pub reason: String,
}

/// Where an account's hold is kept.
pub fn hold_path(spool: &Spool, account: &str) -> PathBuf {
    spool.state().join(format!("{account}.hold"))
}

/// Reads an account's hold, if any.
pub fn read_hold(spool: &Spool, account: &str) -> Option<Hold> {
    let text = std::fs::read(hold_path(spool, account)).ok()?;
    serde_json::from_slice(&text).ok()
}

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

/// Everything needed to deliver through one account; one per worker thread.
pub struct Runner {
    pub account: Account,
    config: Arc<Config>,
    aliases: Arc<Aliases>,
    spool: Spool,
    queue: Queue,
    ledger: Ledger,
    secrets: Option<AccountSecrets>,
    tokens: Option<TokenSource>,
    session: Option<Session>,
    log: Arc<Mutex<Log>>,
    host: String,
    pauses: u32,
    /// After a failed connection: no new attempt before this (one error line a retry).
    retry_after: Option<(SystemTime, String)>,
    /// Set by a verdict that closes the connection while a transaction holds it.
    discard_session: bool,
    /// Whether other messages wait for this account's workers (set by the engine).
    pub others_waiting: Box<dyn Fn() -> bool + Send>,
    /// The message in hand gave way to others with recipients still to send.
    gave_way: bool,
    /// The session was made ready (see [`Runner::ready`]) for the transaction about
    /// to start.
    checked: bool,
    /// How long recent transactions took from reservation to the reply after the dot.
    took: VecDeque<Duration>,
    pub stop: Arc<Stop>,
}

/// Why a runner could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("account {account}: {message}")]
    Setup { account: String, message: String },
}

/// The short host name, for display names and the DSN's reporting MTA.
pub fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".to_string())
}

/// The name given in EHLO: the account's `helo_name`, else this host's fully
/// qualified name (servers may refuse a bare one), else the short name.
pub fn helo_name(account: &Account) -> String {
    account
        .helo_name
        .clone()
        .or_else(crate::config::host_fqdn)
        .unwrap_or_else(host_name)
}

/// How a conversation on a connection ended.
enum Conversed {
    /// The flow for the message, and whether the connection may be kept.
    Done(Flow, bool),
    /// A reused connection was dead before MAIL got an answer: nothing happened yet.
    Stale,
}

/// What one transaction attempt ended with.
enum Flow {
    /// Go on with the next batch.
    Continue,
    /// Stop working on this message now.
    Stop,
}

impl Runner {
    pub fn new(
        account: Account,
        config: Arc<Config>,
        aliases: Arc<Aliases>,
        secrets: Option<AccountSecrets>,
        log: Arc<Mutex<Log>>,
        stop: Arc<Stop>,
    ) -> Result<Runner, RunnerError> {
        let spool = Spool::new(&config.spool_dir);
        let ledger_path = spool.state().join(format!("{}.ledger", account.name));
        let ledger = Ledger::open(&ledger_path).map_err(|e| RunnerError::Setup {
            account: account.name.clone(),
            message: e.to_string(),
        })?;
        if matches!(account.auth, AuthMode::Login | AuthMode::Plain)
            && account.transport == Transport::Smtp
            && !BASIC_AUTH_WARNED.swap(true, Ordering::SeqCst)
        {
            if let Ok(mut l) = log.lock() {
                l.warning(&format!(
                    "account {}: basic authentication (AUTH {}) is deprecated: Microsoft disables it by default for existing tenants at the end of December 2026 and will remove it in 2027; switch to auth = \"xoauth2\"",
                    account.name,
                    if account.auth == AuthMode::Login { "LOGIN" } else { "PLAIN" }
                ));
            }
        }
        Ok(Runner {
            queue: Queue::new(&spool),
            spool,
            ledger,
            secrets,
            tokens: None,
            session: None,
            log,
            host: host_name(),
            pauses: 0,
            retry_after: None,
            discard_session: false,
            others_waiting: Box::new(|| false),
            gave_way: false,
            checked: false,
            took: VecDeque::new(),
            stop,
            account,
            config,
            aliases,
        })
    }

    fn log(&self, level: crate::logging::Level, line: &str) {
        if let Ok(mut l) = self.log.lock() {
            l.log(level, line);
        }
    }

    /// Closes the SMTP connection politely.
    pub fn close(&mut self) {
        self.discard_session = true;
        if let Some(s) = self.session.take() {
            s.quit();
        }
    }

    /// Why the account cannot send now, if it cannot, and until when.
    fn blocked(&mut self, now: SystemTime, explicit: bool) -> Option<(SystemTime, String)> {
        if !explicit {
            if let Some((until, why)) = &self.retry_after {
                if *until > now {
                    return Some((*until, why.clone()));
                }
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
    /// which ignores backoff and account holds (but never a quota freeze).
    pub fn deliver(&mut self, id: &QueueId, explicit: bool) -> Report {
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
        } else if let Some((until, why)) = self.blocked(now, explicit) {
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
            &self.host,
        );
        locked.entry.account = Some(self.account.name.clone());
        locked.entry.reason = None;
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
            let smtp = self.account.transport == Transport::Smtp;
            self.checked = false;
            // Connect (or check the kept connection) before the reservation, so its
            // stamp need only lead the server's by the transaction itself; not when
            // the reservation is bound to wait, lest a connection idle for nothing.
            if smtp
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
            let lead = if smtp { self.lead() } else { Duration::ZERO };
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
            let flow = match &self.account.transport {
                Transport::Maildir(dir) => self.capture(locked, &batch, &outgoing, dir.clone()),
                Transport::Smtp => {
                    let flow =
                        self.transaction(locked, &batch, &outgoing, &mut tried, &mut batch_cap);
                    self.learn(now, lead, batch.len() as u32);
                    flow
                }
            };
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

    fn capture(
        &mut self,
        locked: &mut Locked,
        batch: &[usize],
        outgoing: &[u8],
        dir: PathBuf,
    ) -> Flow {
        let rcpts: Vec<String> = batch
            .iter()
            .map(|&i| locked.entry.recipients[i].address.clone())
            .collect();
        match capture::deliver(
            &dir,
            &locked.entry.id,
            &self.account.mailbox,
            &rcpts,
            outgoing,
        ) {
            Ok(path) => {
                let text = format!("250 2.0.0 captured as {}", path.display());
                for &i in batch {
                    self.mark_sent(locked, i, &format!("maildir:{}", dir.display()), &text);
                }
                Flow::Continue
            }
            Err(e) => {
                let text = format!("cannot write to {}: {e}", dir.display());
                for &i in batch {
                    locked.entry.recipients[i].reply = Some(text.clone());
                }
                Flow::Stop
            }
        }
    }

    fn mark_sent(&mut self, locked: &mut Locked, i: usize, relay: &str, reply: &str) {
        let delay = SystemTime::now()
            .duration_since(locked.entry.arrival())
            .unwrap_or_default();
        let r = &mut locked.entry.recipients[i];
        r.status = RcptStatus::Sent;
        r.reply = Some(reply.to_string());
        let orig = r
            .original
            .as_deref()
            .map(|o| format!(", orig_to=<{o}>"))
            .unwrap_or_default();
        let line = format!(
            "{}: to=<{}>{orig}, relay={relay}, delay={:.2}, status=sent ({reply})",
            locked.entry.id,
            r.address,
            delay.as_secs_f64()
        );
        self.log(crate::logging::Level::Info, &line);
    }

    /// The credential for AUTH, fetching an OAuth2 token when needed.
    fn login_secret(&mut self, now: SystemTime) -> Result<Option<Secret>, Verdict> {
        let hold = |fix: String| Verdict {
            action: Action::HoldAccount {
                until: HoldUntil::Release,
                fix: fix.clone(),
            },
            reason: fix,
        };
        match self.account.auth {
            AuthMode::None => Ok(None),
            AuthMode::Login | AuthMode::Plain => self
                .secrets
                .as_ref()
                .and_then(|s| s.password())
                .cloned()
                .map(Some)
                .ok_or_else(|| hold(format!("no password for account {} in the secrets file: add [{}] password = \"...\" to {}", self.account.name, self.account.name, self.config.secrets_file.display()))),
            AuthMode::Xoauth2 => {
                if self.tokens.is_none() {
                    let Some(settings) = self.account.oauth.clone() else {
                        return Err(hold(format!("account {} has no [account.oauth] settings", self.account.name)));
                    };
                    let Some(cred) = self.secrets.as_ref().and_then(ClientCredential::from_account) else {
                        return Err(hold(format!("no client_secret or certificate for account {} in the secrets file: add [{}] client_secret = \"...\" to {}", self.account.name, self.account.name, self.config.secrets_file.display())));
                    };
                    let ts = TokenSource::new(settings, cred, self.account.ca_file.as_deref(), self.account.timeout)
                        .map_err(|e| hold(e.to_string()))?;
                    self.tokens = Some(ts);
                }
                let Some(ts) = self.tokens.as_mut() else {
                    return Ok(None);
                };
                match ts.token(now) {
                    Ok(t) => Ok(Some(t.secret().clone())),
                    Err(e) if e.is_temporary() => Err(Verdict {
                        action: Action::Defer { hint: None },
                        reason: format!("cannot get an OAuth2 token: {e}"),
                    }),
                    Err(e) => Err(hold(format!("cannot get an OAuth2 token: {e}"))),
                }
            }
        }
    }

    /// Opens and authenticates a session, refreshing an OAuth2 token once on 535.
    fn open_session(&mut self, now: SystemTime) -> Result<(), Verdict> {
        let helo = helo_name(&self.account);
        let host = self.account.host.clone();
        let ca_file = self.account.ca_file.clone();
        let ep = Endpoint {
            host: &host,
            port: self.account.port,
            tls: self.account.tls,
            ca_file: ca_file.as_deref(),
            timeout: self.account.timeout,
            helo_name: &helo,
        };
        let mut refreshed = false;
        loop {
            let secret = self.login_secret(now)?;
            let mut session = Session::open(&ep).map_err(|f| verdict_for(&f))?;
            let user = self.account.mailbox.clone();
            let login = match (&self.account.auth, &secret) {
                (AuthMode::Login, Some(s)) => Login::Login {
                    user: &user,
                    password: s,
                },
                (AuthMode::Plain, Some(s)) => Login::Plain {
                    user: &user,
                    password: s,
                },
                (AuthMode::Xoauth2, Some(s)) => Login::Xoauth2 {
                    user: &user,
                    token: s,
                },
                _ => Login::None,
            };
            match session.authenticate(&login) {
                Ok(()) => {
                    self.session = Some(session);
                    return Ok(());
                }
                Err(f) => {
                    let v = verdict_for(&f);
                    if v.action == Action::AuthFailed
                        && self.account.auth == AuthMode::Xoauth2
                        && !refreshed
                    {
                        refreshed = true;
                        if let Some(t) = self.tokens.as_mut() {
                            t.invalidate();
                        }
                        continue;
                    }
                    if v.action == Action::AuthFailed {
                        return Err(auth_rejected(&self.account, &self.config.secrets_file, &f));
                    }
                    return Err(v);
                }
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

    /// Opens the account's connection unless a kept one is not known to be broken.
    fn ready(&mut self, now: SystemTime) -> Result<(), Verdict> {
        if self.session.as_ref().is_some_and(|s| !s.is_usable()) {
            self.session = None;
        }
        // A kept connection that the server closed while idle is found at MAIL
        // (see `Runner::transaction`), which costs nothing when it is alive, unlike a
        // probe.
        if self.session.is_some() {
            self.checked = true;
            return Ok(());
        }
        match self.open_session(now) {
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
    /// [`Runner::learn`]), while the margin costs only itself once a window: 0.5 s
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
            |r: &crate::daemon::quota::Rate| r.is_limited() && took > lead + (r.hold() - r.window);
        let extra = if overran(&limits.recipient_rate) {
            rcpts
        } else if overran(&limits.message_rate) {
            1
        } else {
            return;
        };
        if let Err(e) = self.ledger.record_external(now, extra) {
            self.log(
                crate::logging::Level::Error,
                &format!("account {}: quota ledger: {e}", self.account.name),
            );
        }
    }

    /// One SMTP transaction for `batch`, on the account's connection (opened if needed).
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
            if !self.checked {
                if let Err(v) = self.ready(now) {
                    return self.apply(locked, batch, &v, now);
                }
            }
            self.checked = false;
            let Some(mut session) = self.session.take() else {
                return Flow::Stop;
            };
            self.discard_session = false;
            let result =
                self.converse(&mut session, locked, batch, outgoing, tried, batch_cap, now);
            let (flow, keep) = match result {
                Conversed::Stale => {
                    session.quit();
                    continue;
                }
                Conversed::Done(flow, keep) => (flow, keep),
            };
            if keep && !self.discard_session {
                self.session = Some(session);
            } else {
                session.quit();
            }
            self.discard_session = false;
            return flow;
        }
        Flow::Stop
    }

    /// MAIL, RCPT for each recipient, DATA: the flow and whether the connection can
    /// carry another transaction, or `Stale` when a reused connection turned out dead.
    #[allow(clippy::too_many_arguments)]
    fn converse(
        &mut self,
        session: &mut Session,
        locked: &mut Locked,
        batch: &[usize],
        outgoing: &[u8],
        tried: &mut HashSet<usize>,
        batch_cap: &mut usize,
        now: SystemTime,
    ) -> Conversed {
        let relay = session.relay.clone();
        if let Some(limit) = session.offer.size {
            if outgoing.len() as u64 > limit {
                let v = Verdict {
                    action: Action::BounceMessage,
                    reason: format!(
                        "552 5.3.4 message size {} exceeds the server's limit of {limit} bytes",
                        outgoing.len()
                    ),
                };
                return Conversed::Done(self.apply(locked, batch, &v, now), true);
            }
        }
        let e = &locked.entry;
        let mut params = vec![format!("SIZE={}", outgoing.len())];
        let eight_bit = !outgoing.is_ascii()
            || e.body == Some(crate::sendmail::options::BodyType::EightBitMime);
        if eight_bit && session.offer.eight_bit {
            params.push("BODY=8BITMIME".into());
        }
        let utf8 = !self.account.mailbox.is_ascii()
            || batch.iter().any(|&i| !e.recipients[i].address.is_ascii());
        if utf8 && session.offer.smtputf8 {
            params.push("SMTPUTF8".into());
        }
        if session.offer.dsn {
            if let Some(ret) = e.ret {
                params.push(format!(
                    "RET={}",
                    if ret == Ret::Full { "FULL" } else { "HDRS" }
                ));
            }
            if let Some(envid) = &e.envid {
                params.push(format!("ENVID={}", xtext(envid)));
            }
        }
        // Each recipient's RCPT parameters, built once for either path.
        let rcpts: Vec<(String, Vec<String>)> = batch
            .iter()
            .map(|&i| {
                let r = &e.recipients[i];
                let mut rp = Vec::new();
                if session.offer.dsn {
                    if let Some(n) = &e.notify {
                        rp.push(format!("NOTIFY={}", n.to_ascii_uppercase()));
                    }
                    if let Some(o) = &r.original {
                        rp.push(format!("ORCPT=rfc822;{}", xtext(o)));
                    }
                }
                (r.address.clone(), rp)
            })
            .collect();
        // With PIPELINING, MAIL, the RCPTs and DATA go out together and their replies
        // are then taken in order exactly as the one-by-one path would get them.
        // Reused: a transaction was begun on it before, whatever became of it.
        let reused = session.mails > 0;
        let (mail, mut piped) = if session.offer.pipelining {
            let env = session.envelope(&self.account.mailbox, &params, &rcpts);
            (env.mail, Some(env.rcpts.into_iter()))
        } else {
            (session.mail(&self.account.mailbox, &params), None)
        };
        if let Err(f) = mail {
            // An idle connection the server closed answers nothing, or the 421 it
            // sent when it timed us out (Postfix does): reconnect, nothing was sent.
            let closed = f.reply.as_ref().is_none_or(|r| r.code == 421);
            if closed && reused {
                return Conversed::Stale;
            }
            let keep = f.reply.is_some() && session.rset();
            return Conversed::Done(self.apply(locked, batch, &verdict_for(&f), now), keep);
        }
        let mut accepted = Vec::new();
        for (&i, (address, rp)) in batch.iter().zip(&rcpts) {
            let reply = match piped.as_mut().and_then(Iterator::next) {
                Some(reply) => reply,
                None => session.rcpt(address, rp),
            };
            match reply {
                Ok(_) => accepted.push(i),
                Err(f) if f.reply.is_none() => {
                    return Conversed::Done(
                        self.apply(locked, batch, &verdict_for(&f), now),
                        false,
                    );
                }
                Err(f) => {
                    let v = verdict_for(&f);
                    match v.action {
                        Action::SplitRecipients => {
                            // Not tried yet: it goes in the next, smaller transaction.
                            tried.remove(&i);
                            *batch_cap = accepted.len().max(1);
                        }
                        Action::BounceRecipient | Action::BounceMessage => {
                            self.fail(locked, i, &f.to_string(), &relay);
                        }
                        Action::Defer { .. } => {
                            locked.entry.recipients[i].reply = Some(f.to_string());
                            self.log_deferred(locked, i, &relay, &f.to_string());
                        }
                        _ => {
                            let keep = session.rset();
                            return Conversed::Done(self.apply(locked, &[i], &v, now), keep);
                        }
                    }
                }
            }
        }
        if accepted.is_empty() {
            return Conversed::Done(Flow::Continue, session.rset());
        }
        match session.data(outgoing) {
            Ok(reply) => {
                let text = reply.to_string();
                for &i in &accepted {
                    self.mark_sent(locked, i, &relay, &text);
                }
                Conversed::Done(Flow::Continue, true)
            }
            Err(f) => {
                let keep = f.reply.is_some();
                let v = verdict_for(&f);
                if v.action == Action::SplitRecipients {
                    for i in &accepted {
                        tried.remove(i);
                    }
                    *batch_cap = (accepted.len() / 2).max(1);
                    return Conversed::Done(Flow::Continue, keep);
                }
                Conversed::Done(self.apply(locked, &accepted, &v, now), keep)
            }
        }
    }

    fn fail(&mut self, locked: &mut Locked, i: usize, text: &str, relay: &str) {
        let r = &mut locked.entry.recipients[i];
        r.status = RcptStatus::Failed;
        r.reply = Some(text.to_string());
        let line = format!(
            "{}: to=<{}>, relay={relay}, status=bounced ({text})",
            locked.entry.id, r.address
        );
        self.log(crate::logging::Level::Warning, &line);
    }

    fn log_deferred(&self, locked: &Locked, i: usize, relay: &str, text: &str) {
        let r = &locked.entry.recipients[i];
        let delay = SystemTime::now()
            .duration_since(locked.entry.arrival())
            .unwrap_or_default();
        self.log(
            crate::logging::Level::Info,
            &format!(
                "{}: to=<{}>, relay={relay}, delay={:.2}, status=deferred ({text})",
                locked.entry.id,
                r.address,
                delay.as_secs_f64()
            ),
        );
    }

    fn hold_account(&mut self, until: SystemTime, reason: &str) {
        let hold = Hold {
            until_us: micros(until),
            reason: reason.to_string(),
        };
        let path = hold_path(&self.spool, &self.account.name);
        let tmp = path.with_extension("hold.tmp");
        let ok = serde_json::to_vec(&hold)
            .ok()
            .map(|b| {
                std::fs::write(&tmp, b)
                    .and_then(|_| std::fs::rename(&tmp, &path))
                    .is_ok()
            })
            .unwrap_or(false);
        if !ok {
            self.log(
                crate::logging::Level::Error,
                &format!(
                    "account {}: cannot record the hold in {}",
                    self.account.name,
                    path.display()
                ),
            );
        }
    }

    /// Applies a verdict to `indices` (the recipients it concerns).
    fn apply(
        &mut self,
        locked: &mut Locked,
        indices: &[usize],
        v: &Verdict,
        now: SystemTime,
    ) -> Flow {
        let id = locked.entry.id.clone();
        let relay = format!("{}:{}", self.account.host, self.account.port);
        let name = self.account.name.clone();
        let note = |e: &mut QueueEntry, text: &str| {
            for &i in indices {
                e.recipients[i].reply = Some(text.to_string());
            }
        };
        match &v.action {
            Action::Accepted => Flow::Continue,
            Action::BounceRecipient => {
                for &i in indices {
                    self.fail(locked, i, &v.reason, &relay);
                }
                Flow::Continue
            }
            Action::BounceMessage => {
                let pending: Vec<usize> = locked
                    .entry
                    .recipients
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.status == RcptStatus::Pending)
                    .map(|(i, _)| i)
                    .collect();
                for i in pending {
                    self.fail(locked, i, &v.reason, &relay);
                }
                Flow::Stop
            }
            Action::Defer { hint } => {
                note(&mut locked.entry, &v.reason);
                for &i in indices {
                    self.log_deferred(locked, i, &relay, &v.reason);
                }
                if let Some(h) = hint {
                    self.log(
                        crate::logging::Level::Warning,
                        &format!("account {name}: {h}"),
                    );
                }
                Flow::Stop
            }
            Action::SplitRecipients => Flow::Continue,
            Action::FreezeAccount(q) => {
                let until = match q {
                    Quota::Daily => self
                        .ledger
                        .quota_reply_until(now, &self.account.limits)
                        .unwrap_or(now + q.fallback_retry()),
                    Quota::Tenant => now + q.fallback_retry(),
                };
                let _ = self.ledger.freeze(until, &v.reason);
                note(&mut locked.entry, &v.reason);
                locked.entry.set_next_attempt(until);
                locked.entry.reason = Some(format!(
                    "quota: account {name} frozen by the server: {}",
                    v.reason
                ));
                self.log(
                    crate::logging::Level::Warning,
                    &format!("{id}: account {name} frozen until {} after a quota reply; nothing is bounced: {}", crate::message::complete::rfc5322_date(until), v.reason),
                );
                Flow::Stop
            }
            Action::ReduceConnections => {
                self.close();
                let until = now + classify::CONNECTION_RETRY_MIN + Duration::from_secs(15);
                self.retry_after = Some((until, v.reason.clone()));
                note(&mut locked.entry, &v.reason);
                locked.entry.set_next_attempt(until);
                self.log(crate::logging::Level::Warning, &format!("account {name}: too many connections, closing this one and retrying later: {}", v.reason));
                Flow::Stop
            }
            Action::PauseAccount => {
                self.pauses += 1;
                let until = now + pause_for(self.pauses);
                let _ = self.ledger.freeze(until, &v.reason);
                note(&mut locked.entry, &v.reason);
                locked.entry.set_next_attempt(until);
                self.log(
                    crate::logging::Level::Error,
                    &format!(
                        "account {name} paused until {}: {}",
                        crate::message::complete::rfc5322_date(until),
                        v.reason
                    ),
                );
                Flow::Stop
            }
            Action::AuthFailed | Action::HoldAccount { .. } => {
                let until = match &v.action {
                    Action::HoldAccount {
                        until: HoldUntil::NextUtcDay,
                        ..
                    } => {
                        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
                        UNIX_EPOCH + Duration::from_secs((secs / 86_400 + 1) * 86_400)
                    }
                    _ => now + HOLD_PROBE_INTERVAL,
                };
                self.close();
                self.hold_account(until, &v.reason);
                note(&mut locked.entry, &v.reason);
                locked.entry.set_next_attempt(until);
                locked.entry.reason = Some(format!("account {name} held: {}", v.reason));
                self.log(
                    crate::logging::Level::Error,
                    &format!("account {name} held until {} (nothing is bounced; relay365 flush retries at once): {}", crate::message::complete::rfc5322_date(until), v.reason),
                );
                Flow::Stop
            }
        }
    }

    /// After an attempt: finish the message or schedule its next attempt.
    fn settle(
        &mut self,
        locked: &mut Locked,
        now: SystemTime,
        spawned: &mut Vec<QueueId>,
    ) -> Outcome {
        let Some(id) = locked.entry.queue_id() else {
            return Outcome::Skipped;
        };
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
            match self.bounce(locked, now) {
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

    /// Queues a DSN for the failed recipients, unless the message is a bounce itself,
    /// has the null sender, or asked for no failure notices. `Err` when it is needed
    /// but cannot be queued now (full or failing spool): the caller keeps the message.
    fn bounce(&mut self, locked: &mut Locked, now: SystemTime) -> Result<Option<QueueId>, String> {
        let e = &locked.entry;
        let wants = e
            .notify
            .as_deref()
            .is_none_or(|n| n.split(',').any(|w| w == "failure"));
        if e.is_bounce || bounce::is_bounce_sender(&e.sender) || !wants {
            return Ok(None);
        }
        let original = locked.message().map_err(|err| {
            let why = format!("cannot read the queued message: {err}");
            self.log(
                crate::logging::Level::Error,
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
                    final_recipient: r.address.clone(),
                    original_recipient: r.original.clone(),
                    action: DsnAction::Failed,
                    status: reply
                        .as_ref()
                        .map_or_else(|| "5.0.0".to_string(), Reply::dsn_status),
                    diagnostic: reply.as_ref().map(Reply::diagnostic_code),
                    remote_mta: Some(self.account.host.clone()),
                    last_attempt: Some(now),
                    will_retry_until: None,
                    reason: Some(text),
                }
            })
            .collect();
        let locals = Locals::new(&self.config, &self.aliases);
        let to: Vec<Recipient> = locals.resolve(&e.sender);
        let dsn = bounce::build_dsn(&DsnInput {
            reporting_mta: self.host.clone(),
            from: format!("MAILER-DAEMON@{}", self.config.domain),
            to: e.sender.clone(),
            envid: e.envid.clone(),
            arrival: e.arrival(),
            queue_id: e.id.clone(),
            recipients,
            original: &original,
            ret: if e.ret == Some(Ret::Hdrs) {
                Return::Headers
            } else {
                Return::Full
            },
            return_limit: bounce::DEFAULT_RETURN_LIMIT,
            now,
        });
        let bid = QueueId::generate(SystemTime::now());
        let mut entry = QueueEntry::new(
            &bid,
            "",
            nix::unistd::getuid().as_raw(),
            now,
            dsn.len() as u64,
            to,
        );
        entry.is_bounce = true;
        if !entry.has_pending() {
            self.log(
                crate::logging::Level::Warning,
                &format!(
                    "{}: the bounce to <{}> has nowhere to go; dropped",
                    e.id, e.sender
                ),
            );
            return Ok(None);
        }
        match self.queue.insert(&entry, &dsn) {
            Ok(()) => {
                self.log(
                    crate::logging::Level::Info,
                    &format!("{}: sender non-delivery notification: {bid}", e.id),
                );
                Ok(Some(bid))
            }
            Err(err) => {
                // Take back a half-written bounce so the next try starts clean.
                let _ = self.queue.remove(&bid);
                self.log(
                    crate::logging::Level::Error,
                    &format!(
                        "{}: cannot queue the bounce, keeping the message to try again: {err}",
                        e.id
                    ),
                );
                Err(err.to_string())
            }
        }
    }
}

/// The hold for credentials the server refused for good: a password is wrong, or a
/// token was refused even after one refresh. The classifier's generic reason promises
/// a token refresh, which here has already happened or does not apply, and names no
/// fix; this one says what to change and how to resume.
pub fn auth_rejected(account: &Account, secrets_file: &std::path::Path, f: &Failure) -> Verdict {
    let name = &account.name;
    let fix = match account.auth {
        AuthMode::Xoauth2 => format!(
            "the server refused a freshly fetched OAuth2 token for {}: check that the app \
             registration has SMTP.SendAsApp with admin consent, that its service principal \
             exists (New-ServicePrincipal) and has FullAccess on the mailbox \
             (Add-MailboxPermission), then run relay365 account release {name}",
            account.mailbox
        ),
        _ => format!(
            "the server refused the password of {}: correct password in the [{name}] table \
             of {}, then run relay365 account release {name}",
            account.mailbox,
            secrets_file.display()
        ),
    };
    Verdict {
        action: Action::AuthFailed,
        reason: format!("{fix} (server said: {f})"),
    }
}

/// The verdict for a failed step. An untrusted server certificate is an account
/// problem only the administrator can fix (wrong host, a missing `ca_file`, an
/// intercepting proxy): the account is held and probed hourly, never bounced.
fn verdict_for(f: &Failure) -> Verdict {
    match &f.reply {
        Some(r) => classify::classify(r, f.stage),
        None if f.is_certificate_error() => {
            let fix = format!(
                "the server's TLS certificate is not trusted ({}): check host, and set ca_file if the server uses a private CA",
                f.detail
            );
            Verdict {
                action: Action::HoldAccount {
                    until: HoldUntil::Release,
                    fix: fix.clone(),
                },
                reason: fix,
            }
        }
        None => classify::classify_no_reply(f.stage, &f.detail),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::classify::Stage;

    fn account(auth: &str) -> Account {
        let oauth = "[account.oauth]\ntenant = \"contoso.onmicrosoft.com\"\nclient_id = \"x\"\n";
        let text = format!(
            "domain = \"a.b\"\n[[account]]\nname = \"app\"\nmailbox = \"app@contoso.com\"\nauth = \"{auth}\"\n{oauth}"
        );
        crate::config::Config::from_toml(std::path::Path::new("/t.toml"), &text)
            .unwrap()
            .accounts
            .remove(0)
    }

    fn refused() -> Failure {
        Failure {
            stage: Stage::Auth,
            reply: Reply::parse("535 5.7.8 Error: authentication failed: authentication failure")
                .ok(),
            detail: String::new(),
        }
    }

    // Regression: a wrong password held the account with "refreshing the OAuth2 token
    // once" as the reason, which neither applies to passwords nor says what to fix.
    #[test]
    fn a_refused_password_holds_with_the_fix() {
        let v = auth_rejected(
            &account("login"),
            std::path::Path::new("/etc/relay365/secrets.toml"),
            &refused(),
        );
        assert_eq!(v.action, Action::AuthFailed);
        assert!(!v.reason.contains("OAuth2"), "{}", v.reason);
        assert!(
            v.reason
                .contains("[app] table of /etc/relay365/secrets.toml"),
            "{}",
            v.reason
        );
        assert!(
            v.reason.contains("relay365 account release app"),
            "{}",
            v.reason
        );
        assert!(v.reason.contains("535 5.7.8"), "{}", v.reason);
    }

    #[test]
    fn a_refused_fresh_token_holds_with_the_permissions_to_check() {
        let v = auth_rejected(
            &account("xoauth2"),
            std::path::Path::new("/etc/relay365/secrets.toml"),
            &refused(),
        );
        assert!(!v.reason.contains("refreshing"), "{}", v.reason);
        assert!(v.reason.contains("SMTP.SendAsApp"), "{}", v.reason);
        assert!(v.reason.contains("Add-MailboxPermission"), "{}", v.reason);
        assert!(
            v.reason.contains("relay365 account release app"),
            "{}",
            v.reason
        );
    }
}
