//! The shared ledger of a fleet: every host that names the same `quota_store` and the
//! same mailbox reserves in one ledger in Redis, so together they never exceed the
//! mailbox's limits; when Redis can't be reached each host keeps to its local share.
//!
//! Trusted input: the settings (validated config), the password (`secrets`), the
//! answers of the script (checked in `script.rs`) and the fallback ledger file (the
//! daemon's own, parsed strictly by `file.rs`).
//!
//! # Model
//! - **Reserve before sending, atomically, on the store's clock.** One EVALSHA of
//!   `ledger.lua` per reservation decides with the rules of `window.rs` on the
//!   server's `TIME` (hosts' clocks never enter a decision) and records the
//!   transaction before it starts. A reservation whose send never happened (the host
//!   died) is never given back: it expires with its window (over-count, never under).
//! - **Room in turn.** A reserver told to wait joins a line (a ticket per reserver:
//!   host, process, worker); room goes to the line in ticket order, so no host
//!   starves. The answer is the exact moment room frees for *this* reserver's place in
//!   the line, so a host sleeps until then instead of polling. A reserver that does
//!   not come back within 2 s of its moment leaves the line.
//! - **A freeze is everyone's.** A freeze (a quota reply, a pause) is written to the
//!   store and every reservation checks it; each answer carries the freeze in force, so
//!   [`Fleet::check_freeze`] and [`Fleet::frozen`] cost no round trip.
//! - **Times.** Answers are on the server's clock; they are turned into ours with the
//!   offset measured on the same call, rounded so that we wake late rather than early.
//!
//! # When the store is unreachable
//! The host falls back to a local ledger (`state/<account>.fleet.ledger`) with
//! 1/`fleet_size` of every limit, shared by all the host's workers through the file's
//! lock. It first counts in it, stamped now, what the fleet had in its windows at the
//! last answer (the *seed*), so the windows that straddle the outage stay within the
//! limit whichever host sent what before it. The outage is logged once a process, and
//! the store is tried again every [`RETRY`]. When it answers again, the sends made
//! meanwhile are pushed into it (stamped no earlier than the last entry, so they count
//! a little longer than they must, never shorter) before anything else is reserved;
//! if the store lost its data (its running count went down: a restart without
//! persistence) the seed is pushed too. Mail is only ever deferred by all this.
//! A process that dies while in fallback pushes the fallback ledger's recent entries
//! (seed included) at its next start: over-counting, as always after a crash.
//!
//! Known limit: a host that has not reached the store since it started has no last
//! answer to seed from. It counts the message window full (it waits one window), but
//! not the recipient window, which would stop it for a day: for the daily recipients
//! such a host relies on the 1/N split alone, so if the fleet had used more than
//! (N-1)/N of them in the hours before, the day's windows can go over by up to its
//! share. A host that was connected when the store went away has the seed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

mod script;

pub use script::StoreError;
use script::{Answer, Args, Remote};

use super::window::{floor_ms, from_ms};
use super::{Freeze, FreezeCheck, Grant, Ledger, MAX_LEAD, QuotaError, Usage};
use crate::config::limits::{Limits, Rate};
use crate::config::store::StoreSettings;
use crate::logging::{Level, SharedLog};
use crate::secrets::Secret;

/// How often a host in fallback tries the store again.
pub const RETRY: Duration = Duration::from_secs(3);

/// One host's use of the shared windows, for `relay365 quota`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostShare {
    pub host: String,
    /// Transactions in the message window.
    pub messages: u64,
    /// Recipients in the recipient window.
    pub recipients: u64,
}

/// The fleet's view for `relay365 quota`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetUsage {
    pub usage: Usage,
    pub hosts: Vec<HostShare>,
    /// Reservers waiting in line.
    pub waiting: u64,
    /// The store's clock minus ours, in ms.
    pub offset_ms: i64,
}

/// What `relay365 check` learns of the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreProbe {
    pub script_was_loaded: bool,
    pub offset_ms: i64,
    pub round_trip: Duration,
    pub script_hash: String,
}

/// What every worker of this process shares about one mailbox's store.
#[derive(Debug, Default)]
struct HostState {
    /// Since when the store has been unreachable, and why.
    outage: Option<(SystemTime, String)>,
    /// No new attempt at the store before this.
    next_try: Option<SystemTime>,
    /// Fallback sends not yet pushed into the store (stamp ms on our clock, recipients).
    pending: Vec<(u64, u32)>,
    /// What the fallback ledger was seeded with.
    seeds: Vec<(u64, u32)>,
    /// The fleet's windows at the last answer (messages, recipients).
    last_windows: Option<(u64, u64)>,
    /// The highest running count the store showed.
    max_total: u64,
}

/// Outages are logged once per process.
static OUTAGE_LOGGED: AtomicBool = AtomicBool::new(false);
/// Makes each reserver's id unique within the process.
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

fn host_states() -> &'static Mutex<HashMap<PathBuf, Arc<Mutex<HostState>>>> {
    static STATES: OnceLock<Mutex<HashMap<PathBuf, Arc<Mutex<HostState>>>>> = OnceLock::new();
    STATES.get_or_init(|| Mutex::new(HashMap::new()))
}

/// `limits` cut to 1/`n`: what one host of `n` may use alone.
pub fn share(limits: &Limits, n: u32) -> Limits {
    let n = n.max(1);
    let cut = |r: Rate| {
        if r.is_limited() {
            Rate {
                count: (r.count / n).max(1),
                window: r.window,
            }
        } else {
            r
        }
    };
    let recipient_rate = cut(limits.recipient_rate);
    let reserve = if recipient_rate.is_limited() {
        limits
            .reserve
            .div_ceil(n)
            .min(recipient_rate.count.saturating_sub(1))
    } else {
        0
    };
    Limits {
        message_rate: cut(limits.message_rate),
        recipient_rate,
        reserve,
        ..*limits
    }
}

/// One reserver's handle on a mailbox's shared ledger.
#[derive(Debug)]
pub struct Fleet {
    remote: Remote,
    /// The fallback ledger, `state/<account>.fleet.ledger`.
    local: Ledger,
    fleet_size: u32,
    host: Arc<Mutex<HostState>>,
    log: Option<SharedLog>,
    /// The freeze in force at the last answer (our clock).
    freeze: Option<Freeze>,
    /// When the last answer said to wait until (our clock): `room` is 0 before it.
    wait_until: Option<SystemTime>,
    /// The last answer's offset (server minus us, ms), rounded to wake late.
    offset_late: i64,
    offset_early: i64,
    /// Round trips of this reserver's reservations, in µs (the last [`MAX_SAMPLES`]),
    /// logged when it is dropped (the daemon stopping).
    round_trips: Vec<u32>,
}

/// How many reservation round trips a reserver keeps for its closing log line.
const MAX_SAMPLES: usize = 100_000;

impl Drop for Fleet {
    fn drop(&mut self) {
        let mut t = std::mem::take(&mut self.round_trips);
        if t.is_empty() {
            return;
        }
        t.sort_unstable();
        let at = |q: usize| f64::from(t[(t.len() - 1) * q / 100]) / 1000.0;
        self.note(
            Level::Info,
            &format!(
                "quota store {}: {} reservations by this worker, round trip p50 {:.2} ms, p99 {:.2} ms",
                self.remote.url(),
                t.len(),
                at(50),
                at(99)
            ),
        );
    }
}

/// The fallback ledger's path for the account ledger `path`.
pub fn fallback_path(path: &Path) -> PathBuf {
    path.with_extension("fleet.ledger")
}

impl Fleet {
    /// Opens the fallback ledger beside `ledger_path` and prepares (without connecting)
    /// the store for `mailbox`.
    pub fn open(
        ledger_path: &Path,
        settings: &StoreSettings,
        password: Option<Secret>,
        mailbox: &str,
        log: Option<SharedLog>,
    ) -> Result<Fleet, QuotaError> {
        let path = fallback_path(ledger_path);
        let local = Ledger::open(&path)?;
        let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}:{}:{n}", settings.host, std::process::id());
        let host = {
            let mut states = host_states().lock().unwrap_or_else(|p| p.into_inner());
            states.entry(path.clone()).or_default().clone()
        };
        let mut fleet = Fleet {
            remote: Remote::new(settings, password, mailbox, id),
            local,
            fleet_size: settings.fleet_size,
            host,
            log,
            freeze: None,
            wait_until: None,
            offset_late: 0,
            offset_early: 0,
            round_trips: Vec::new(),
        };
        fleet.recover_pending()?;
        Ok(fleet)
    }

    /// At the process's first open: the fallback ledger's entries newer than the last
    /// push (`<fallback>.pushed`) are pending, in case the last process died in fallback.
    fn recover_pending(&mut self) -> Result<(), QuotaError> {
        let mut host = self.host.lock().unwrap_or_else(|p| p.into_inner());
        if host.max_total > 0 || host.outage.is_some() || !host.pending.is_empty() {
            return Ok(());
        }
        let mark = std::fs::read_to_string(self.pushed_path())
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
        let day = Limits::default();
        host.pending = self
            .local
            .recent(SystemTime::now(), &day)?
            .into_iter()
            .filter(|&(ms, _)| ms > mark)
            .collect();
        Ok(())
    }

    fn pushed_path(&self) -> PathBuf {
        self.local.path().with_extension("pushed")
    }

    fn note(&self, level: Level, line: &str) {
        if let Some(log) = &self.log {
            log.log(level, line);
        }
    }

    /// The store's URL, for messages.
    pub fn url(&self) -> &str {
        self.remote.url()
    }

    /// Since when this host has been on its local share, if it is.
    pub fn outage(&self) -> Option<(SystemTime, String)> {
        self.host
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .outage
            .clone()
    }

    fn to_local(&self, server_ms: u64) -> SystemTime {
        from_ms(server_ms.saturating_add_signed(-self.offset_late))
    }

    fn to_server(&self, t: SystemTime) -> u64 {
        floor_ms(t).saturating_add_signed(self.offset_early)
    }

    /// Takes in an answer: offsets, freeze, running count, and the windows unless they
    /// were counted for other limits (`state` is asked with the defaults).
    fn learn(&mut self, a: &Answer, windows: bool) {
        self.offset_late = a.offset_late();
        self.offset_early = a.offset_early();
        self.freeze = (a.freeze_until_ms > 0).then(|| Freeze {
            until: self.to_local(a.freeze_until_ms),
            reason: a.freeze_reason.clone(),
        });
        let mut host = self.host.lock().unwrap_or_else(|p| p.into_inner());
        if windows {
            host.last_windows = Some((a.messages, a.recipients));
        }
        host.max_total = host.max_total.max(a.total);
    }

    /// Runs `mode` on the store unless this host is in fallback and not due to retry;
    /// `None` means "use the local share". Coming back from an outage (or starting with
    /// sends to push), it pushes them first.
    fn remote(&mut self, mode: &str, limits: &Limits, args: &Args) -> Option<Answer> {
        let now = SystemTime::now();
        let (due, must_push) = {
            let host = self.host.lock().unwrap_or_else(|p| p.into_inner());
            let due = host.next_try.is_none_or(|t| t <= now);
            (due, host.outage.is_some() || !host.pending.is_empty())
        };
        if !due {
            return None;
        }
        if must_push && let Err(e) = self.reconcile(limits) {
            self.fall_back(limits, &e);
            return None;
        }
        match self.remote.call(mode, limits, args) {
            Ok(a) => {
                self.learn(&a, mode != "state");
                Some(a)
            }
            Err(e) => {
                self.fall_back(limits, &e);
                None
            }
        }
    }

    /// Enters (or stays in) fallback after `e`: seeds the fallback ledger with the
    /// fleet's last known windows on entry, logs once, schedules the next try.
    fn fall_back(&mut self, limits: &Limits, e: &StoreError) {
        let now = SystemTime::now();
        let mut host = self.host.lock().unwrap_or_else(|p| p.into_inner());
        host.next_try = Some(now + RETRY);
        if host.outage.is_some() {
            return;
        }
        host.outage = Some((now, e.to_string()));
        // Never answered since this process started: the message window is counted
        // full (one window's wait); the fleet's daily recipients can't be known, and
        // counting them full would stop the host for a day, so the recipient window
        // relies on the 1/N split alone (see "When the store is unreachable").
        let (m, r) = host
            .last_windows
            .unwrap_or((u64::from(limits.message_rate.count), 0));
        let mut seeds = Vec::new();
        let msgs = m.max(u64::from(r > 0));
        for i in 0..msgs {
            let rcpts = if i + 1 == msgs {
                r.saturating_sub(msgs - 1).max(1)
            } else {
                1
            };
            let rcpts = u32::try_from(rcpts).unwrap_or(u32::MAX);
            seeds.push((floor_ms(now), rcpts));
            if let Err(err) = self.local.record_external(now, rcpts) {
                drop(host);
                self.note(Level::Error, &format!("quota: fallback ledger: {err}"));
                return self.fall_back_done(e);
            }
        }
        host.seeds = seeds;
        drop(host);
        self.fall_back_done(e);
    }

    fn fall_back_done(&self, e: &StoreError) {
        if !OUTAGE_LOGGED.swap(true, Ordering::SeqCst) {
            self.note(
                Level::Error,
                &format!(
                    "{e}; until it answers, this host keeps to 1/{} of each limit in its local ledger {} (mail waits, nothing is bounced) and tries again every {} s",
                    self.fleet_size,
                    self.local.path().display(),
                    RETRY.as_secs()
                ),
            );
        }
    }

    /// Pushes the fallback sends (and the seed, if the store lost its data) into the
    /// store; on success the outage is over.
    fn reconcile(&mut self, limits: &Limits) -> Result<(), StoreError> {
        let probe = self.remote.call("state", limits, &Args::default())?;
        self.offset_early = probe.offset_early();
        let (pending, seeds, lost) = {
            let host = self.host.lock().unwrap_or_else(|p| p.into_inner());
            (
                host.pending.clone(),
                host.seeds.clone(),
                probe.total < host.max_total,
            )
        };
        let mut push = pending.clone();
        if lost {
            push.extend(seeds.iter().copied());
            push.sort_unstable();
        }
        for &(ms, rcpts) in &push {
            let stamp = ms.saturating_add_signed(self.offset_early);
            let args = Args {
                extra: Some((rcpts.to_string(), stamp.to_string())),
                ..Args::default()
            };
            self.remote.call("add", limits, &args)?;
        }
        let mark = push.iter().map(|p| p.0).max().unwrap_or(0);
        if mark > 0 {
            // Best effort: without the mark a restart pushes them again (over-counting).
            let _ = std::fs::write(self.pushed_path(), format!("{mark}\n"));
        }
        let was = {
            let mut host = self.host.lock().unwrap_or_else(|p| p.into_inner());
            host.pending.retain(|p| !pending.contains(p));
            host.seeds.clear();
            host.next_try = None;
            host.max_total = 0;
            host.outage.take()
        };
        if let Some((since, _)) = was {
            OUTAGE_LOGGED.store(false, Ordering::SeqCst);
            let secs = SystemTime::now()
                .duration_since(since)
                .unwrap_or_default()
                .as_secs();
            self.note(
                Level::Info,
                &format!(
                    "quota store {} answers again after {secs} s: {} sends made meanwhile pushed into it{}; the fleet shares the ledger again",
                    self.remote.url(),
                    pending.len(),
                    if lost {
                        " (it had lost its data: this host's last view of the windows was pushed too)"
                    } else {
                        ""
                    }
                ),
            );
        }
        Ok(())
    }

    // -- the Ledger API -----------------------------------------------------------------

    /// [`Ledger::reserve_some_ahead`] on the fleet's ledger (one round trip), or on the
    /// local share while the store is unreachable.
    pub fn reserve_some_ahead(
        &mut self,
        now: SystemTime,
        lead: Duration,
        wanted: u32,
        limits: &Limits,
    ) -> Result<Grant, QuotaError> {
        limits.validate()?;
        if wanted == 0 {
            return Err(QuotaError::NoRecipients);
        }
        let args = Args {
            lead_ms: u64::try_from(lead.min(MAX_LEAD).as_millis()).unwrap_or(0),
            wanted: wanted.min(limits.max_recipients),
            extra: None,
        };
        if let Some(a) = self.remote("reserve", limits, &args) {
            if self.round_trips.len() < MAX_SAMPLES {
                let took = a.got_at.duration_since(a.sent_at).unwrap_or_default();
                self.round_trips
                    .push(u32::try_from(took.as_micros()).unwrap_or(u32::MAX));
            }
            if a.go {
                self.wait_until = None;
                return Ok(Grant::Go(u32::try_from(a.value).unwrap_or(1)));
            }
            let at = self.to_local(a.value).max(now + Duration::from_millis(1));
            self.wait_until = Some(at);
            return Ok(Grant::WaitUntil(at));
        }
        let grant =
            self.local
                .reserve_some_ahead(now, lead, wanted, &share(limits, self.fleet_size))?;
        if let Grant::Go(n) = grant {
            let stamp = floor_ms(now + lead.min(MAX_LEAD)).saturating_add(1);
            let mut host = self.host.lock().unwrap_or_else(|p| p.into_inner());
            host.pending.push((stamp, n));
        }
        Ok(grant)
    }

    /// A hint, without a round trip: 0 while the last answer's moment has not come or
    /// a freeze is known, else `max_recipients` (the reservation decides). On the local
    /// share, the local ledger's answer.
    pub fn room(&mut self, now: SystemTime, limits: &Limits) -> Result<u32, QuotaError> {
        if self.outage().is_some() {
            return self.local.room(now, &share(limits, self.fleet_size));
        }
        let blocked = self.wait_until.is_some_and(|t| t > now)
            || self.freeze.as_ref().is_some_and(|f| f.until > now);
        Ok(if blocked { 0 } else { limits.max_recipients })
    }

    /// The fleet's windows (one round trip), or the local share's.
    pub fn usage(&mut self, now: SystemTime, limits: &Limits) -> Result<Usage, QuotaError> {
        match self.fleet_usage(now, limits) {
            Ok(u) => Ok(u.usage),
            Err(_) => self.local.usage(now, &share(limits, self.fleet_size)),
        }
    }

    /// The fleet's windows and each host's share, for `relay365 quota`.
    pub fn fleet_usage(
        &mut self,
        now: SystemTime,
        limits: &Limits,
    ) -> Result<FleetUsage, StoreError> {
        limits.validate().map_err(|e| StoreError::Answer {
            url: self.remote.url().to_owned(),
            detail: e.to_string(),
        })?;
        let a = self.remote.call("usage", limits, &Args::default())?;
        self.learn(&a, true);
        let num = |i: usize| {
            a.rest
                .get(i)
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let (mnext, rnext, waiting) = (num(0), num(1), num(2));
        let mut hosts = Vec::new();
        for chunk in a.rest.get(3..).unwrap_or_default().chunks(3) {
            if let [h, m, r] = chunk {
                hosts.push(HostShare {
                    host: h.clone(),
                    messages: m.parse().unwrap_or(0),
                    recipients: r.parse().unwrap_or(0),
                });
            }
        }
        let room_at = |ms: u64| (ms > a.now_ms).then(|| self.to_local(ms));
        let m = limits.message_rate;
        let usage = Usage {
            now,
            message_rate: m,
            recipient_rate: limits.recipient_rate,
            reserve: limits.reserve,
            messages_in_window: if m.is_limited() { a.messages } else { 0 },
            recipients_in_window: if limits.recipient_rate.is_limited() {
                a.recipients
            } else {
                0
            },
            messages_left: m
                .is_limited()
                .then(|| u64::from(m.count).saturating_sub(a.messages)),
            recipients_left: limits
                .recipient_rate
                .is_limited()
                .then(|| limits.capacity().saturating_sub(a.recipients)),
            next_message_room: if m.is_limited() { room_at(mnext) } else { None },
            next_recipient_room: if limits.recipient_rate.is_limited() {
                room_at(rnext)
            } else {
                None
            },
            frozen: self.freeze.clone(),
        };
        Ok(FleetUsage {
            usage,
            hosts,
            waiting,
            offset_ms: a.offset_late(),
        })
    }

    /// The local share's windows, for `relay365 quota` while the store is down.
    pub fn local_usage(&mut self, now: SystemTime, limits: &Limits) -> Result<Usage, QuotaError> {
        self.local.usage(now, &share(limits, self.fleet_size))
    }

    /// Counts a transaction sent without a reservation.
    pub fn record_external(
        &mut self,
        now: SystemTime,
        rcpts: u32,
        limits: &Limits,
    ) -> Result<(), QuotaError> {
        if rcpts == 0 {
            return Ok(());
        }
        let args = Args {
            extra: Some((rcpts.to_string(), String::new())),
            ..Args::default()
        };
        if self.remote("add", limits, &args).is_some() {
            return Ok(());
        }
        self.local.record_external(now, rcpts)?;
        let mut host = self.host.lock().unwrap_or_else(|p| p.into_inner());
        host.pending.push((floor_ms(now).saturating_add(1), rcpts));
        Ok(())
    }

    /// [`Ledger::quota_reply_until`] on the fleet's ledger.
    pub fn quota_reply_until(
        &mut self,
        now: SystemTime,
        limits: &Limits,
    ) -> Result<SystemTime, QuotaError> {
        limits.validate()?;
        match self.remote("until", limits, &Args::default()) {
            Some(a) => Ok(self.to_local(a.value).max(now)),
            None => self
                .local
                .quota_reply_until(now, &share(limits, self.fleet_size)),
        }
    }

    /// Freezes every host of the mailbox (and this host's fallback ledger, so the
    /// freeze holds through an outage too).
    pub fn freeze(
        &mut self,
        until: SystemTime,
        reason: &str,
        limits: &Limits,
    ) -> Result<Freeze, QuotaError> {
        let local = self.local.freeze(until, reason)?;
        let args = Args {
            extra: Some((self.to_server(until).to_string(), local.reason.clone())),
            ..Args::default()
        };
        if self.remote("freeze", limits, &args).is_some()
            && let Some(f) = &self.freeze
        {
            return Ok(f.clone());
        }
        Ok(local)
    }

    /// The freeze in force, from the last answer (no round trip) or the local file.
    pub fn frozen(&self, now: SystemTime) -> Result<Option<Freeze>, QuotaError> {
        if let Some(f) = self.freeze.as_ref().filter(|f| f.until > now) {
            return Ok(Some(f.clone()));
        }
        self.local.frozen(now)
    }

    /// [`Ledger::check_freeze`]: free costs nothing (a freeze set elsewhere comes with
    /// the next reservation's answer); a known freeze is confirmed with the store (one
    /// round trip, only while frozen), so another host's thaw is seen. A freeze that
    /// was in force and is now over is reported ended once.
    pub fn check_freeze(&mut self, now: SystemTime) -> Result<FreezeCheck, QuotaError> {
        if let Some(f) = self.freeze.clone() {
            if f.until > now {
                let limits = Limits::default();
                if self.remote("state", &limits, &Args::default()).is_none() {
                    return Ok(FreezeCheck::Frozen(f));
                }
                if let Some(g) = self.freeze.clone() {
                    return Ok(FreezeCheck::Frozen(g));
                }
            }
            self.freeze = None;
            let _ = self.local.thaw();
            return Ok(FreezeCheck::Ended(f));
        }
        self.local.check_freeze(now)
    }

    /// Ends the freeze of every host (an admin's release).
    pub fn thaw(&mut self, limits: &Limits) -> Result<(), QuotaError> {
        self.local.thaw()?;
        self.freeze = None;
        self.remote
            .call("thaw", limits, &Args::default())
            .map(|_| ())
            .map_err(|e| QuotaError::Store(e.to_string()))
    }

    /// The script's SHA1, for messages.
    pub fn script_hash(&self) -> &str {
        self.remote.script_hash()
    }

    /// Whether a connection to the store is open.
    pub fn connected(&self) -> bool {
        self.remote.connected()
    }
}

/// For `relay365 check`: whether the store is reachable and takes the password, whether
/// the script was already loaded (this call loads it), and the clock offset. Touches no
/// file (check may run as root, and a ledger it created would be root's).
pub fn probe(
    settings: &StoreSettings,
    password: Option<Secret>,
    mailbox: &str,
    limits: &Limits,
) -> Result<StoreProbe, StoreError> {
    let id = format!("{}:check:{}", settings.host, std::process::id());
    let mut remote = Remote::new(settings, password, mailbox, id);
    let start = std::time::Instant::now();
    let loaded = remote.script_loaded()?;
    let a = remote.call("state", limits, &Args::default())?;
    Ok(StoreProbe {
        script_was_loaded: loaded,
        offset_ms: (a.offset_late() + a.offset_early()) / 2,
        round_trip: start.elapsed(),
        script_hash: remote.script_hash().to_owned(),
    })
}

#[cfg(test)]
mod tests {
    //! The script against the pure window functions on the same entries and instants
    //! (a private `redis-server` on loopback; skipped if it is not installed, except
    //! under CI), the line of waiters, and the local share.
    use std::collections::VecDeque;
    use std::process::{Child, Command, Stdio};

    use super::script::{Args, Remote};
    use super::*;
    use crate::config::limits::tests::rate;
    use crate::config::store;
    use crate::quota::window::{self, Entry};

    struct TestRedis {
        child: Child,
        port: u16,
        _dir: tempfile::TempDir,
    }

    impl Drop for TestRedis {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn redis() -> Option<TestRedis> {
        if Command::new("redis-server")
            .arg("--version")
            .output()
            .is_err()
        {
            assert!(std::env::var_os("CI").is_none(), "redis-server is missing");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        Some(TestRedis {
            child,
            port,
            _dir: dir,
        })
    }

    fn remote(r: &TestRedis, id: &str) -> Remote {
        let url = format!("redis://127.0.0.1:{}/0", r.port);
        let s = store::parse(&url, Some(2), Some("h".into()), None, None).unwrap();
        Remote::new(&s, None, "app@contoso.com", id.into())
    }

    fn limits(message: &str, recipient: &str) -> Limits {
        Limits {
            message_rate: rate(message),
            recipient_rate: rate(recipient),
            ..Limits::default()
        }
    }

    /// The store's entries as the ledger holds them in memory.
    fn entries(r: &TestRedis) -> VecDeque<Entry> {
        let client = ::redis::Client::open(format!("redis://127.0.0.1:{}/0", r.port)).unwrap();
        let mut con = client.get_connection().unwrap();
        let members: Vec<String> = ::redis::cmd("ZRANGE")
            .arg("relay365:{app@contoso.com}:t")
            .arg(0)
            .arg(-1)
            .query(&mut con)
            .unwrap();
        members
            .iter()
            .map(|m| {
                let f: Vec<&str> = m.split(':').collect();
                Entry {
                    cum: f[0].parse().unwrap(),
                    ms: f[1].parse().unwrap(),
                    rcpts: f[2].parse().unwrap(),
                }
            })
            .collect()
    }

    #[test]
    fn the_script_decides_as_window_rs_does() {
        let Some(r) = redis() else { return };
        let mut one = remote(&r, "h:1:0");
        let l = limits("3/1s", "8/2s");
        let sizes = [1, 3, 2, 4, 1, 1, 5, 2, 1, 3, 2, 2, 1, 4];
        let (mut go, mut waits) = (0, 0);
        for (i, &wanted) in sizes.iter().cycle().take(40).enumerate() {
            let before = entries(&r);
            let args = Args {
                wanted,
                ..Args::default()
            };
            let a = one.call("reserve", &l, &args).unwrap();
            let now = a.now_ms;
            let room = window::room_now(&before, now, &l, None);
            if room >= 1 {
                assert!(a.go, "call {i}: room {room} at {now} but told to wait");
                assert_eq!(a.value, u64::from(room.min(wanted)), "call {i}");
                assert_eq!(entries(&r).back().map(|e| e.ms), Some(now), "stamped now");
                go += 1;
            } else {
                assert!(!a.go, "call {i}: no room at {now} but granted");
                let at = window::earliest(&before, now, 1, &l, None);
                assert_eq!(a.value, at, "call {i}: the moment room frees");
                waits += 1;
                std::thread::sleep(Duration::from_millis(a.value - now));
            }
            // The windows after the call, as the answer tells them.
            let after = entries(&r);
            let m = window::in_window(&after, now, &l.message_rate) as u64;
            let first = window::first_in_window(&after, now, &l.recipient_rate);
            assert_eq!(
                (a.messages, a.recipients),
                (m, window::sum_from(&after, first))
            );
        }
        assert!(go > 10 && waits > 5, "{go} {waits}");
    }

    #[test]
    fn the_reserver_that_waited_first_gets_the_room_first() {
        let Some(r) = redis() else { return };
        let (mut a, mut b) = (remote(&r, "h:1:0"), remote(&r, "h:1:1"));
        // A window of seconds, not one: the calls below must land inside it even when
        // the test machine is busy (with 1/1s a loaded CI run saw the room free already).
        let l = limits("1/5s", "off");
        let args = Args {
            wanted: 1,
            ..Args::default()
        };
        assert!(a.call("reserve", &l, &args).unwrap().go);
        let wait_b = b.call("reserve", &l, &args).unwrap();
        assert!(!wait_b.go);
        // A comes back before B for the same room: B is ahead in line, so A is told
        // the moment after B's turn, not the same moment.
        let wait_a = a.call("reserve", &l, &args).unwrap();
        assert!(!wait_a.go && wait_a.value > wait_b.value);
        std::thread::sleep(Duration::from_millis(wait_b.value - wait_b.now_ms));
        let early_a = a.call("reserve", &l, &args).unwrap();
        assert!(!early_a.go, "A may not take B's room");
        assert!(b.call("reserve", &l, &args).unwrap().go, "B's turn");
        // A waiter that never comes back leaves the line after its grace.
        let mut c = remote(&r, "h:1:2");
        let c_wait = c.call("reserve", &l, &args).unwrap();
        assert!(!c_wait.go);
        std::thread::sleep(Duration::from_millis(c_wait.value - c_wait.now_ms + 2100));
        assert!(a.call("reserve", &l, &args).unwrap().go);
    }

    #[test]
    fn a_quota_reply_and_a_freeze_are_the_fleets() {
        let Some(r) = redis() else { return };
        let (mut a, mut b) = (remote(&r, "h:1:0"), remote(&r, "h:2:0"));
        let l = limits("off", "100/1h");
        let add = |n: u32| Args {
            extra: Some((n.to_string(), String::new())),
            ..Args::default()
        };
        let first = a.call("add", &l, &add(40)).unwrap();
        b.call("add", &l, &add(60)).unwrap();
        // The ledger holds the full count: room comes back when the first 40 leave.
        let until = b.call("until", &l, &Args::default()).unwrap();
        assert_eq!(until.value, first.value + l.recipient_rate.hold_ms());
        let end = until.now_ms + 60_000;
        let freeze = Args {
            extra: Some((end.to_string(), "554 5.2.0 quota".into())),
            ..Args::default()
        };
        a.call("freeze", &l, &freeze).unwrap();
        let seen = b.call("state", &l, &Args::default()).unwrap();
        assert_eq!(
            (seen.freeze_until_ms, seen.freeze_reason.as_str()),
            (end, "554 5.2.0 quota")
        );
        let one = Args {
            wanted: 1,
            ..Args::default()
        };
        let w = b.call("reserve", &l, &one).unwrap();
        assert!(!w.go && w.value >= end);
        b.call("thaw", &l, &Args::default()).unwrap();
        assert_eq!(
            a.call("state", &l, &Args::default())
                .unwrap()
                .freeze_until_ms,
            0
        );
    }

    #[test]
    fn a_hosts_share_is_a_fleet_size_th_of_each_limit() {
        let l = Limits {
            reserve: 100,
            ..limits("30/1m", "10000/24h")
        };
        let s = share(&l, 3);
        assert_eq!(s.message_rate, rate("10/1m"));
        assert_eq!(s.recipient_rate, rate("3333/24h"));
        assert_eq!(s.reserve, 34);
        assert!(s.validate().is_ok());
        assert_eq!(share(&l, 1), l);
        let off = share(&limits("off", "off"), 4);
        assert!(!off.message_rate.is_limited() && !off.recipient_rate.is_limited());
        assert_eq!(share(&limits("2/1m", "3/1h"), 5).message_rate, rate("1/1m"));
    }
}
