//! The engine shared by `relay365 daemon` and `relay365 flush`: loads config, aliases
//! and secrets, runs one worker thread per allowed connection of each account, keeps
//! an in-memory schedule of the queue (so an idle daemon with a large deferred queue
//! costs nothing), and dispatches each message when it is due.
//!
//! The daemon waits on inotify (incoming/new), the trigger FIFO (`sendmail -q`), a
//! signalfd (SIGTERM/SIGINT stop after the transaction in flight, SIGHUP reloads) and
//! its workers' completion pipe. Trusts the config and the queue; distrusts incoming/.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use crate::aliases::Aliases;
use crate::aliases::Locals;
use crate::config::{Config, ConfigError};
use crate::daemon::pickup;
use crate::daemon::stop::Stop;
use crate::daemon::worker::{AccountWorker, Outcome, Report};
use crate::logging::{Log, SharedLog};
use crate::secrets::{Secrets, SecretsError};
use crate::spool::QueueId;
use crate::spool::paths::Spool;
use crate::spool::queue::{Queue, micros};
use crate::sysexits::{Exit, ExitStatus};

/// How often the daemon rescans incoming/ even without an inotify event.
const SAFETY_SCAN: Duration = Duration::from_secs(60);
/// When a message was locked by another process, look again after this.
const LOCKED_RETRY: Duration = Duration::from_secs(5);
/// Crash leftovers in queue/ older than this are removed (an insert takes milliseconds).
const LEFTOVER_AGE: Duration = Duration::from_secs(3600);
/// Incoming messages picked up before the workers get them: small enough that the
/// first go out within a few hundred milliseconds of a large backlog, large enough
/// that the two directory syncs per chunk do not count.
const PICKUP_CHUNK: usize = 256;
/// How often the daemon merges its counters into state/ (what a cron-run `relay365
/// metrics` may lag behind by).
const COUNTERS_EVERY: Duration = Duration::from_secs(5);

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Secrets(#[from] SecretsError),
    #[error("{0}")]
    Aliases(String),
    #[error("{0}")]
    Setup(String),
    #[error("another relay365 daemon is already running on {0} (its lock is held)")]
    AlreadyRunning(PathBuf),
}

impl ExitStatus for EngineError {
    fn exit(&self) -> Exit {
        match self {
            EngineError::Config(_) | EngineError::Secrets(_) | EngineError::Aliases(_) => {
                Exit::Config
            }
            EngineError::Setup(_) => Exit::OsErr,
            EngineError::AlreadyRunning(_) => Exit::TempFail,
        }
    }
}

/// A job for a worker: a message, whether the run is explicit (a flush or `sendmail
/// -q`: the message's retry time is ignored) and whether it is forced (root's flush:
/// the account's hold and backoff are ignored too).
type Job = (QueueId, bool, bool);

pub use super::queue_run::QUEUE_RUN_INTERVAL;

#[derive(Default)]
struct Jobs {
    queue: Mutex<VecDeque<Job>>,
    cv: Condvar,
}

struct Pool {
    jobs: Arc<Jobs>,
    handles: Vec<JoinHandle<()>>,
}

/// Everything loaded from the config files.
struct Loaded {
    config: Arc<Config>,
    aliases: Arc<Aliases>,
    secrets: Secrets,
}

fn load(config_path: &Path) -> Result<Loaded, EngineError> {
    let config = Config::load(config_path)?;
    let aliases = Aliases::load_if_present(&config.aliases)
        .map_err(|e| EngineError::Aliases(e.to_string()))?;
    let needs_secrets = config
        .accounts
        .iter()
        .any(crate::config::Account::needs_secrets)
        || (config.quota_store.is_some() && config.secrets_file.exists());
    let secrets = if needs_secrets {
        let creds = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
        Secrets::load(&config.secrets_file, creds.as_deref())?
    } else {
        Secrets::default()
    };
    Ok(Loaded {
        config: Arc::new(config),
        aliases: Arc::new(aliases),
        secrets,
    })
}

/// The running engine.
pub struct Engine {
    loaded: Loaded,
    spool: Spool,
    queue: Queue,
    log: SharedLog,
    stop: Arc<Stop>,
    pools: HashMap<String, Pool>,
    /// The bounce harvesters (`harvest_bounces`), stopped with the workers.
    harvesters: Vec<JoinHandle<()>>,
    /// (due µs, id) for messages not in flight.
    schedule: BTreeSet<(u64, QueueId)>,
    due_of: HashMap<QueueId, u64>,
    /// Messages dispatched whose report has not come back.
    in_flight: HashSet<QueueId>,
    /// Messages in flight when a queue run was requested (`sendmail -q`): if their
    /// attempt ends deferred, they are retried at once, as the request asked, instead
    /// of waiting out the backoff that attempt set.
    rerun: HashSet<QueueId>,
    /// The run being dispatched is root's (`relay365 flush`, `flush --wake`): it
    /// overrides account holds and backoff.
    force: bool,
    /// The rate limit of `sendmail -q`.
    queue_runs: super::queue_run::QueueRuns,
    results_tx: mpsc::Sender<(QueueId, Report)>,
    results_rx: mpsc::Receiver<(QueueId, Report)>,
    wake_read: OwnedFd,
    wake_write: Arc<OwnedFd>,
    pub delivered: usize,
    pub deferred: usize,
    counters_saved: SystemTime,
}

impl Engine {
    /// Loads the configuration and starts the workers.
    pub fn start(config_path: &Path, log: Log) -> Result<Engine, EngineError> {
        let loaded = load(config_path)?;
        let spool = Spool::new(&loaded.config.spool_dir);
        let problems = crate::spool::init::verify(&spool);
        if let Some(p) = problems.iter().find(|p| p.contains("missing")) {
            return Err(EngineError::Setup(p.clone()));
        }
        let mut log = log;
        if let Some(path) = &loaded.config.log_file
            && let Err(e) = log.add_file(path)
        {
            log.warning(&format!(
                "cannot open the log_file {}: {e}; logging to syslog only",
                path.display()
            ));
        }
        for p in &problems {
            // Wrong modes still work for the daemon, but may let others in or keep
            // sendmail out: say so at every start.
            log.warning(&format!("spool: {p}"));
        }
        let (wake_read, wake_write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(|e| EngineError::Setup(format!("cannot create a pipe: {e}")))?;
        let (results_tx, results_rx) = mpsc::channel();
        let mut engine = Engine {
            queue: Queue::new(&spool),
            spool,
            loaded,
            log: SharedLog::new(log),
            stop: Arc::new(Stop::default()),
            pools: HashMap::new(),
            harvesters: Vec::new(),
            schedule: BTreeSet::new(),
            due_of: HashMap::new(),
            in_flight: HashSet::new(),
            rerun: HashSet::new(),
            force: false,
            queue_runs: Default::default(),
            results_tx,
            results_rx,
            wake_read,
            wake_write: Arc::new(wake_write),
            delivered: 0,
            deferred: 0,
            counters_saved: SystemTime::now(),
        };
        engine.start_workers()?;
        Ok(engine)
    }

    fn info(&self, line: &str) {
        self.log.info(line);
    }

    fn warn(&self, line: &str) {
        self.log.warning(line);
    }

    fn start_workers(&mut self) -> Result<(), EngineError> {
        let config = self.loaded.config.clone();
        for account in &config.accounts {
            let jobs = Arc::new(Jobs::default());
            let mut handles = Vec::new();
            for n in 0..account.limits.connections.max(1) {
                let mut account_worker = AccountWorker::new(
                    account.clone(),
                    config.clone(),
                    self.loaded.aliases.clone(),
                    self.loaded.secrets.for_account(&account.name).cloned(),
                    self.loaded
                        .secrets
                        .for_account(crate::config::store::STORE_SECRETS_TABLE)
                        .and_then(|s| s.password().cloned()),
                    self.log.clone(),
                    self.stop.clone(),
                )
                .map_err(|e| EngineError::Setup(e.to_string()))?;
                let waiting = jobs.clone();
                account_worker.others_waiting =
                    Box::new(move || waiting.queue.lock().is_ok_and(|q| !q.is_empty()));
                let jobs = jobs.clone();
                let tx = self.results_tx.clone();
                let wake = self.wake_write.clone();
                let stop = self.stop.clone();
                let handle = std::thread::Builder::new()
                    .name(format!("{}-{n}", account.name))
                    .spawn(move || worker(&mut account_worker, &jobs, &tx, &wake, &stop))
                    .map_err(|e| EngineError::Setup(format!("cannot start a worker: {e}")))?;
                handles.push(handle);
            }
            self.pools
                .insert(account.name.clone(), Pool { jobs, handles });
        }
        let secrets = &self.loaded.secrets;
        let tx = std::sync::Mutex::new(self.results_tx.clone());
        let wake = self.wake_write.clone();
        // A late NDR's DSN joins the schedule as a message that gave way would.
        let schedule: crate::daemon::harvest::Schedule = Arc::new(move |bid| {
            let report = Report {
                outcome: Outcome::Yielded(SystemTime::now()),
                spawned: Vec::new(),
            };
            if let Ok(tx) = tx.lock() {
                let _ = tx.send((bid, report));
            }
            let _ = nix::unistd::write(&*wake, b"r");
        });
        self.harvesters = crate::daemon::harvest::spawn_all(
            &config,
            &self.loaded.aliases,
            |name| secrets.for_account(name).cloned(),
            &self.log,
            &self.stop,
            &schedule,
        );
        Ok(())
    }

    fn stop_workers(&mut self) {
        self.stop.set();
        for pool in self.pools.values() {
            // Taking the lock orders this wake-up after a worker's check of the stop
            // flag: without it a worker between that check and its wait missed the
            // wake-up and slept out its 30 s idle timeout (flush and SIGTERM hung).
            let _held = pool.jobs.queue.lock();
            pool.jobs.cv.notify_all();
        }
        for (_, pool) in self.pools.drain() {
            for h in pool.handles {
                let _ = h.join();
            }
        }
        for h in self.harvesters.drain(..) {
            let _ = h.join();
        }
    }

    /// Moves incoming mail into the queue and schedules it, `PICKUP_CHUNK` messages at
    /// a time, handing each chunk to the workers (`explicit`: all of it, as a flush or
    /// `sendmail -q` does) before taking the next, so that delivery overlaps the pickup
    /// of a long backlog instead of waiting for all of it.
    pub fn pickup(&mut self, explicit: bool) {
        loop {
            let more = self.pickup_chunk();
            if !more {
                return;
            }
            self.dispatch(SystemTime::now(), explicit);
        }
    }

    /// One chunk of [`Engine::pickup`]; true if more is waiting in incoming/.
    fn pickup_chunk(&mut self) -> bool {
        let config = self.loaded.config.clone();
        let aliases = self.loaded.aliases.clone();
        let locals = Locals::new(&config, &aliases);
        let picked = pickup::pickup(
            &self.spool,
            &self.queue,
            &config,
            &locals,
            &self.log,
            PICKUP_CHUNK,
        );
        let more = picked.more;
        let fresh: HashSet<&QueueId> = picked.due.iter().map(|(id, _)| id).collect();
        let mut due = Vec::new();
        for id in &picked.queued {
            if fresh.contains(id) || self.in_flight.contains(id) || self.due_of.contains_key(id) {
                continue;
            }
            // Queued by an earlier pass that did not get to remove the incoming copy.
            // Also when no recipient is pending (all refused at pickup): the delivery
            // run settles it, which bounces and removes it.
            if let Ok(e) = self.queue.read(id)
                && !e.held
            {
                due.push((id.clone(), e.next_attempt_us));
            }
        }
        for (id, at) in picked.due.into_iter().chain(due) {
            if !self.in_flight.contains(&id) && !self.due_of.contains_key(&id) {
                self.schedule_at(id, at);
            }
        }
        more
    }

    /// Removes old crash leftovers from queue/.
    fn sweep(&self) {
        let n = self.queue.sweep(LEFTOVER_AGE);
        if n > 0 {
            self.info(&format!(
                "removed {n} file(s) left in the queue by an interrupted write"
            ));
        }
    }

    /// Reads every queued entry once into the schedule (start-up).
    pub fn load_schedule(&mut self) {
        let Ok(ids) = self.queue.ids() else { return };
        for id in ids {
            match self.queue.read(&id) {
                // An entry without pending recipients is still queued only because it
                // was never settled (its bounce failed, or it was refused at pickup).
                Ok(e) if !e.held => self.schedule_at(id, e.next_attempt_us),
                Ok(_) => {}
                Err(err) => self.warn(&format!("{id}: unreadable queue entry skipped: {err}")),
            }
        }
    }

    fn schedule_at(&mut self, id: QueueId, at_us: u64) {
        if let Some(old) = self.due_of.insert(id.clone(), at_us) {
            self.schedule.remove(&(old, id.clone()));
        }
        self.schedule.insert((at_us, id));
    }

    /// Hands every message due at `now` (all of them when `explicit`) to its account.
    fn dispatch(&mut self, now: SystemTime, explicit: bool) -> usize {
        let now_us = micros(now);
        let mut due = Vec::new();
        for (at, id) in &self.schedule {
            if !explicit && *at > now_us {
                break;
            }
            due.push((*at, id.clone()));
        }
        let mut n = 0;
        // With one account every message goes through it, so there is nothing to read
        // here: the worker reads the entry under its lock anyway (a message that is
        // gone by then comes back as skipped).
        let only = match self.pools.len() {
            1 => self.pools.keys().next().cloned(),
            _ => None,
        };
        for (at, id) in due {
            let account = match &only {
                Some(a) => Some(a.clone()),
                None => {
                    let entry = match self.queue.read(&id) {
                        Ok(e) => e,
                        Err(_) => {
                            self.schedule.remove(&(at, id.clone()));
                            self.due_of.remove(&id);
                            continue;
                        }
                    };
                    let route = self.route(&entry);
                    if route.is_none() && entry.reason.is_none() {
                        let mut e = entry;
                        e.reason = Some(
                            "no [[account]] is configured in relay365.toml; nothing can be sent"
                                .into(),
                        );
                        let _ = self.queue.update(&e);
                    }
                    route
                }
            };
            let Some(pool) = account.and_then(|a| self.pools.get(&a)) else {
                continue;
            };
            let explicit = self.rerun.remove(&id) || explicit;
            if let Ok(mut q) = pool.jobs.queue.lock() {
                q.push_back((id.clone(), explicit, explicit && self.force));
                pool.jobs.cv.notify_one();
            }
            self.schedule.remove(&(at, id.clone()));
            self.due_of.remove(&id);
            self.in_flight.insert(id);
            n += 1;
        }
        n
    }

    /// The account a queued message goes out through: the one it was routed to while
    /// that exists, else the first.
    fn route(&self, entry: &crate::spool::queue::QueueEntry) -> Option<String> {
        entry
            .account
            .as_deref()
            .filter(|a| self.pools.contains_key(*a))
            .map(str::to_string)
            .or_else(|| self.loaded.config.accounts.first().map(|a| a.name.clone()))
    }

    /// Applies the workers' reports; `reschedule`: put deferred messages back on the
    /// schedule (the daemon) or let them wait for the next run (a flush).
    fn collect(&mut self, reschedule: bool, explicit_spawn: bool) {
        let mut buf = [0u8; 256];
        while nix::unistd::read(std::os::fd::AsRawFd::as_raw_fd(&self.wake_read), &mut buf)
            .is_ok_and(|n| n > 0)
        {}
        while let Ok((id, report)) = self.results_rx.try_recv() {
            self.in_flight.remove(&id);
            if !matches!(report.outcome, Outcome::Deferred(_)) || !reschedule {
                self.rerun.remove(&id);
            }
            match report.outcome {
                Outcome::Finished => self.delivered += 1,
                Outcome::Deferred(t) => {
                    self.deferred += 1;
                    if reschedule {
                        // Kept in `rerun`, so dispatch sends it explicitly.
                        let at = if self.rerun.contains(&id) {
                            0
                        } else {
                            micros(t)
                        };
                        self.schedule_at(id, at);
                    }
                }
                // Even a flush takes it up again: it only gave way to other messages.
                Outcome::Yielded(t) => self.schedule_at(id, micros(t)),
                Outcome::Skipped => {
                    if reschedule && self.queue.contains(&id) {
                        self.schedule_at(id, micros(SystemTime::now() + LOCKED_RETRY));
                    }
                }
            }
            for b in report.spawned {
                let at = if explicit_spawn {
                    0
                } else {
                    micros(SystemTime::now())
                };
                self.schedule_at(b, at);
            }
        }
    }

    /// The error-level lines logged so far (each once), for a flush to report.
    pub fn problems(&self) -> Vec<String> {
        self.log.take_problems()
    }

    /// Merges this process's counters into `state/` for `relay365 metrics`, at most
    /// every few seconds unless `now` is asked for.
    fn save_counters(&mut self, force: bool) {
        let due = self
            .counters_saved
            .elapsed()
            .map_or(true, |d| d >= COUNTERS_EVERY);
        if force || due {
            if let Err(e) = crate::spool::counters::save(&self.spool) {
                self.warn(&format!("cannot save the metrics counters in state/: {e}"));
            }
            self.counters_saved = SystemTime::now();
        }
    }

    /// `relay365 flush`: pick up, deliver everything due once, wait for it, return.
    pub fn flush(&mut self) {
        // The queue as it stands first, then the new mail, which the pickup schedules
        // itself (in the other order every new entry would be read back once more).
        self.force = true;
        self.load_schedule();
        self.pickup(true);
        self.dispatch(SystemTime::now(), true);
        while !self.in_flight.is_empty() {
            let fd = self.wake_read.as_fd();
            let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
            let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(1000u16));
            self.collect(false, true);
            // Bounces created during this run go out in it too.
            self.dispatch(SystemTime::now(), true);
        }
        self.stop_workers();
        self.save_counters(true);
    }

    /// `relay365 daemon`: runs until SIGTERM or SIGINT.
    pub fn run(
        &mut self,
        config_path: &Path,
        signals: &nix::sys::signalfd::SignalFd,
    ) -> Result<(), EngineError> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|e| EngineError::Setup(format!("inotify: {e}")))?;
        inotify
            .add_watch(
                &self.spool.incoming_new(),
                AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_CLOSE_WRITE,
            )
            .map_err(|e| {
                EngineError::Setup(format!(
                    "cannot watch {}: {e}",
                    self.spool.incoming_new().display()
                ))
            })?;
        let trigger = open_trigger(&self.spool.trigger());
        if let Some(addr) = self.loaded.config.metrics_listen {
            // A taken port must not stop mail: say so and run without the listener.
            match crate::daemon::metrics::serve(addr, self.loaded.config.clone()) {
                Ok(bound) => self.info(&format!("metrics served on http://{bound}/metrics")),
                Err(e) => self.warn(&format!(
                    "cannot serve metrics on {addr} (metrics_listen): {e}; relay365 metrics still prints them"
                )),
            }
        }
        self.sweep();
        self.load_schedule();
        self.pickup(false);
        self.info(&format!(
            "daemon started: {} account(s), {} message(s) queued",
            self.loaded.config.accounts.len(),
            self.due_of.len()
        ));
        let mut last_scan = SystemTime::now();
        let mut explicit = false;
        loop {
            let now = SystemTime::now();
            self.dispatch(now, explicit);
            explicit = false;
            self.force = false;
            let next_due = self
                .schedule
                .iter()
                .next()
                .map(|(at, _)| Duration::from_micros(at.saturating_sub(micros(now))));
            let until_scan =
                SAFETY_SCAN.saturating_sub(now.duration_since(last_scan).unwrap_or_default());
            let mut wait = next_due.map_or(until_scan, |d| d.min(until_scan));
            if let Some(d) = self.queue_runs.wait() {
                wait = wait.min(d);
            }
            // Round up so we wake at or just after the due moment, never before it.
            let ms = wait
                .as_millis()
                .saturating_add(1)
                .min(u128::from(u16::MAX - 1)) as u16;
            let mut fds = vec![
                PollFd::new(signals.as_fd(), PollFlags::POLLIN),
                PollFd::new(inotify.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.wake_read.as_fd(), PollFlags::POLLIN),
            ];
            if let Some(t) = &trigger {
                fds.push(PollFd::new(t.as_fd(), PollFlags::POLLIN));
            }
            let _ = poll(&mut fds, PollTimeout::from(ms));
            let ready: Vec<bool> = fds
                .iter()
                .map(|f| f.revents().is_some_and(|r| r.contains(PollFlags::POLLIN)))
                .collect();
            drop(fds);
            if ready[0] {
                match signals.read_signal() {
                    Ok(Some(info)) if info.ssi_signo == nix::sys::signal::Signal::SIGHUP as u32 => {
                        self.reload(config_path);
                    }
                    Ok(Some(_)) => break,
                    _ => {}
                }
            }
            if ready[1] {
                let _ = inotify.read_events();
                self.pickup(false);
            }
            if ready[2] {
                self.collect(true, false);
                self.save_counters(false);
            }
            let mut run = None;
            if ready.get(3).copied().unwrap_or(false) {
                let mut forced = false;
                if let Some(t) = &trigger {
                    let mut buf = [0u8; 64];
                    let n = (&*t).read(&mut buf).unwrap_or(0);
                    forced = buf[..n].contains(&crate::spool::trigger::FORCED_RUN);
                }
                if forced {
                    run = Some(true);
                    self.queue_runs.forced();
                } else {
                    self.queue_runs.request();
                }
            }
            if run.is_none() && self.queue_runs.take_due() {
                run = Some(false);
            }
            if let Some(forced) = run {
                self.info(if forced {
                    "queue run requested (flush --wake: holds and backoff overridden)"
                } else {
                    "queue run requested"
                });
                self.force = forced;
                // What is in flight now may come back deferred after this run's
                // dispatch; it is part of the run too.
                self.rerun.extend(self.in_flight.iter().cloned());
                self.pickup(true);
                explicit = true;
            }
            if SystemTime::now()
                .duration_since(last_scan)
                .unwrap_or_default()
                >= SAFETY_SCAN
            {
                self.sweep();
                self.pickup(false);
                last_scan = SystemTime::now();
            }
        }
        self.info("stopping: finishing the transactions in flight");
        self.stop_workers();
        self.collect(false, false);
        self.save_counters(true);
        self.info("daemon stopped");
        Ok(())
    }

    /// SIGHUP: re-reads config, aliases and secrets; keeps the old ones on error.
    fn reload(&mut self, config_path: &Path) {
        match load(config_path) {
            Ok(loaded) => {
                self.stop_workers();
                self.collect(true, false);
                self.stop = Arc::new(Stop::default());
                self.loaded = loaded;
                self.in_flight.clear();
                self.rerun.clear();
                if let Err(e) = self.start_workers() {
                    self.warn(&format!("reload: cannot start workers: {e}"));
                }
                self.schedule.clear();
                self.due_of.clear();
                self.load_schedule();
                self.info("configuration reloaded");
            }
            Err(e) => self.warn(&format!(
                "reload refused, keeping the running configuration: {e}"
            )),
        }
    }
}

fn open_trigger(path: &Path) -> Option<File> {
    // O_RDWR keeps a writer open ourselves, so the FIFO never reports EOF.
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOFOLLOW)
        .open(path)
        .ok()
}

fn worker(
    account_worker: &mut AccountWorker,
    jobs: &Jobs,
    tx: &mpsc::Sender<(QueueId, Report)>,
    wake: &OwnedFd,
    stop: &Stop,
) {
    loop {
        let job = {
            let Ok(mut q) = jobs.queue.lock() else { return };
            loop {
                if stop.is_set() {
                    account_worker.close();
                    return;
                }
                if let Some(j) = q.pop_front() {
                    break Some(j);
                }
                // Idle: wait for work, and let an idle connection go after a while as
                // Exchange would drop it anyway.
                match jobs.cv.wait_timeout(q, Duration::from_secs(30)) {
                    Ok((g, t)) => {
                        q = g;
                        if t.timed_out() && q.is_empty() {
                            account_worker.close();
                        }
                    }
                    Err(_) => return,
                }
            }
        };
        let Some((id, explicit, force)) = job else {
            continue;
        };
        let report = account_worker.deliver(&id, explicit, force);
        let _ = tx.send((id, report));
        let _ = nix::unistd::write(wake, b"r");
    }
}

/// Whether a daemon runs on `spool`: whether its trigger FIFO has a reader (the
/// daemon holds it open for its whole run). `None` when this process may not open the
/// FIFO (run as root, or with the drop group). A probe of the daemon lock would be
/// as good, but a probe that takes the lock, even shared, could make a daemon starting
/// at that instant believe another one runs.
pub fn daemon_running(spool: &Spool) -> Option<bool> {
    crate::spool::trigger::has_reader(&spool.trigger()).ok()
}

/// Holds the daemon lock (`state/daemon.lock`) for the life of the process.
pub fn daemon_lock(spool: &Spool) -> Result<crate::spool::flock::Locked, EngineError> {
    let path = spool.state().join("daemon.lock");
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| {
            let fix = match e.raw_os_error() {
                Some(nix::libc::ENOENT) | Some(nix::libc::ENOTDIR) => {
                    ": the spool is missing or incomplete, create it with relay365 init (the package's postinst runs it)"
                }
                Some(nix::libc::ENOSPC) | Some(nix::libc::EDQUOT) => {
                    ": the file system holding the spool is full; free some space (queued mail is kept)"
                }
                _ => ": check that the spool has the owners and modes relay365 init gives it",
            };
            EngineError::Setup(format!("cannot open {}: {e}{fix}", path.display()))
        })?;
    match crate::spool::flock::try_exclusive(f) {
        Ok(Some(locked)) => Ok(locked),
        _ => Err(EngineError::AlreadyRunning(path)),
    }
}

/// Blocks the signals the daemon handles and returns a descriptor that reports them.
/// Must run before any thread starts, so every thread inherits the mask.
pub fn signal_fd() -> Result<nix::sys::signalfd::SignalFd, EngineError> {
    use nix::sys::signal::{SigSet, Signal};
    use nix::sys::signalfd::{SfdFlags, SignalFd};
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGTERM);
    mask.add(Signal::SIGINT);
    mask.add(Signal::SIGHUP);
    mask.thread_block()
        .map_err(|e| EngineError::Setup(format!("cannot block signals: {e}")))?;
    SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(|e| EngineError::Setup(format!("signalfd: {e}")))
}
