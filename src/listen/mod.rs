//! `relay365 listen`: the network SMTP listener for scanners, printers and
//! applications on the local network. It drives the same dialogue as `sendmail -bs`
//! ([`crate::sendmail::bs`]) over TCP and STARTTLS, and queues through the same
//! [`Depositor`] into `incoming/`, where the daemon's pickup distrusts its files as it
//! distrusts sendmail's. It runs as user `relay365-listen` in group `relay365-drop`
//! and never reads the secrets file.
//!
//! One thread per connection, with every client's cost bounded: `max_connections`
//! in all and `max_connections_per_client` per address (the excess gets `421` at
//! once), 300 s per command (Postfix's `smtpd_timeout`), command lines, message size
//! and the hard error limit in the dialogue, an 8 KiB read buffer, and AUTH hashing
//! one at a time.
//!
//! Trusts nothing a client sends. Relay access: a client in `[listener] allow`, or
//! authenticated (AUTH only inside TLS); anyone else is refused at RCPT.

pub mod access;
pub mod sockets;
pub mod tls;
pub mod users;

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{self, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::config::listener::{Listener, canonical};
use crate::logging::Log;
use crate::message::address::{Address, Sender};
use crate::message::text;
use crate::sendmail::bs::network::{AuthVerdict, Client, Gate};
use crate::sendmail::bs::{self, Ending, Session};
use crate::sendmail::deposit::{Depositor, Origin, Protocol};
use crate::sendmail::intake::Caller;
use crate::sendmail::options;
use crate::sendmail::privilege::DropGroup;
use crate::spool::paths::Spool;
use crate::sysexits::{Exit, ExitStatus};

use access::{Anvil, RateTable};

/// Postfix's `smtpd_timeout`: a client silent this long is disconnected.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);
/// Stack of a connection thread: the dialogue is shallow; TLS and hashing use the heap.
const THREAD_STACK: usize = 256 * 1024;
/// The syslog tag, as Postfix's `postfix/smtpd`.
pub const LOG_TAG: &str = "relay365/smtpd";

/// What every connection thread shares.
struct Shared {
    config: Config,
    listener: Listener,
    tls: Option<Arc<rustls::ServerConfig>>,
    spool: Spool,
    group: DropGroup,
    log: Mutex<Log>,
    conns: Mutex<Conns>,
    anvil: Mutex<Anvil>,
    rate: Mutex<RateTable>,
    /// SECURITY: one argon2 verification at a time (each takes 19 MiB), so AUTH
    /// attempts on every connection at once cannot exhaust memory.
    hashing: Mutex<String>,
}

#[derive(Default)]
struct Conns {
    total: usize,
    per_client: HashMap<IpAddr, usize>,
}

/// A poisoned lock only means another connection's thread panicked; the data (counts,
/// stamps) stays usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    fn log(&self, level: crate::logging::Level, line: &str) {
        lock(&self.log).log(level, line);
    }
    fn info(&self, line: &str) {
        self.log(crate::logging::Level::Info, line);
    }
    fn warning(&self, line: &str) {
        self.log(crate::logging::Level::Warning, line);
    }
}

/// Why the listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Socket(#[from] sockets::SocketError),
    #[error(transparent)]
    Privilege(#[from] crate::sendmail::privilege::PrivilegeError),
}

impl ExitStatus for ListenError {
    fn exit(&self) -> Exit {
        match self {
            ListenError::Config(_) | ListenError::Tls(_) => Exit::Config,
            ListenError::Socket(_) | ListenError::Privilege(_) => Exit::OsErr,
        }
    }
}

/// `relay365 listen`: serves until killed.
pub fn main(config_path: &Path) -> Exit {
    match run(config_path) {
        Ok(()) => Exit::Ok,
        Err(e) => {
            let mut log = Log::open(LOG_TAG, true);
            log.error(&format!("fatal: {e}"));
            e.exit()
        }
    }
}

fn run(config_path: &Path) -> Result<(), ListenError> {
    let config = Config::load(config_path)?;
    let listener = config.listener.clone().unwrap_or_else(Listener::loopback);
    let tls = match &listener.tls {
        Some((cert, key)) => Some(tls::server_config(cert, key)?),
        None => None,
    };
    let mut log = Log::open(LOG_TAG, true);
    raise_file_limit(&mut log);
    let (socks, activated, warnings) = sockets::sockets(&listener.listen)?;
    for w in warnings {
        log.warning(&w);
    }
    for s in &socks {
        if let Ok(a) = s.local_addr() {
            let how = if activated {
                " (socket activation)"
            } else {
                ""
            };
            log.info(&format!("listening on {a}{how}"));
        }
    }
    let spool = Spool::new(&config.spool_dir);
    let group = DropGroup::acquire()?;
    let shared = Arc::new(Shared {
        spool,
        group,
        listener,
        tls,
        log: Mutex::new(log),
        conns: Mutex::new(Conns::default()),
        anvil: Mutex::new(Anvil::default()),
        rate: Mutex::new(RateTable::default()),
        hashing: Mutex::new(access::decoy_hash()),
        config,
    });
    let mut threads = Vec::new();
    for sock in socks {
        let shared = shared.clone();
        threads.push(std::thread::spawn(move || accept_loop(&shared, &sock)));
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// Each connection holds a socket (and, while it queues, a file): the soft limit of
/// open files is raised to the hard one, so `max_connections` and not a default of
/// 1024 bounds the listener.
fn raise_file_limit(log: &mut Log) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_err()
    {
        log.warning(&format!(
            "cannot raise the open files limit from {soft} to {hard}"
        ));
    }
}

fn accept_loop(shared: &Arc<Shared>, sock: &TcpListener) {
    loop {
        match sock.accept() {
            Ok((stream, peer)) => admit(shared, stream, canonical(peer.ip())),
            Err(e) => {
                shared.warning(&format!("accept: {e}"));
                // EMFILE and the like: back off instead of spinning.
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Counts a connection against the limits, or refuses it at once.
fn admit(shared: &Arc<Shared>, mut stream: TcpStream, ip: IpAddr) {
    let refuse = |stream: &mut TcpStream, why: &str, reply: &str| {
        shared.warning(&format!("{why}: refusing connection from unknown[{ip}]"));
        let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
        let _ = stream.write_all(format!("{reply}\r\n").as_bytes());
    };
    let domain = shared.config.domain.clone();
    if let Some(until) = lock(&shared.anvil).blocked_until(ip, Instant::now()) {
        let secs = until.saturating_duration_since(Instant::now()).as_secs();
        return refuse(
            &mut stream,
            "anvil: too many authentication failures",
            &format!(
                "421 4.7.0 {domain} Error: too many authentication failures from {ip}; try again in {secs} s"
            ),
        );
    }
    {
        let mut c = lock(&shared.conns);
        // SECURITY: every client's cost is bounded: connections in all and per address.
        if c.total >= shared.listener.max_connections {
            drop(c);
            return refuse(
                &mut stream,
                "max_connections reached",
                &format!("421 4.3.2 {domain} Error: too many connections; try again later"),
            );
        }
        let mine = c.per_client.get(&ip).copied().unwrap_or(0);
        if mine >= shared.listener.max_connections_per_client {
            drop(c);
            return refuse(
                &mut stream,
                "max_connections_per_client reached",
                &format!("421 4.7.0 {domain} Error: too many connections from {ip}"),
            );
        }
        c.total += 1;
        c.per_client.insert(ip, mine + 1);
    }
    let guard = Slot {
        shared: shared.clone(),
        ip,
    };
    let spawned = std::thread::Builder::new()
        .stack_size(THREAD_STACK)
        .spawn(move || {
            let guard = guard;
            serve(&guard.shared, stream, ip);
        });
    if let Err(e) = spawned {
        // The guard went with the closure and was dropped with it.
        shared.warning(&format!("cannot start a connection thread: {e}"));
    }
}

/// A connection's place in the counts, given back when it ends.
struct Slot {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = lock(&self.shared.conns);
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_client.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.per_client.remove(&self.ip);
            }
        }
    }
}

/// One client's session.
fn serve(shared: &Shared, stream: TcpStream, ip: IpAddr) {
    shared.info(&format!("connect from unknown[{ip}]"));
    // SECURITY: a silent or slow client is cut off after COMMAND_TIMEOUT per read or write.
    let _ = stream.set_read_timeout(Some(COMMAND_TIMEOUT));
    let _ = stream.set_write_timeout(Some(COMMAND_TIMEOUT));
    let _ = stream.set_nodelay(true);
    let mut conn = tls::Conn::new(stream, shared.tls.clone());
    let args: Vec<OsString> = vec!["-bs".into()];
    let Ok(opts) = options::parse("sendmail", &args) else {
        return;
    };
    let caller = Caller {
        uid: nix::unistd::getuid().as_raw(),
        // The From of a message with neither From header nor envelope sender.
        login: "MAILER-DAEMON".to_string(),
        full_name: None,
    };
    let depositor = Depositor::new(
        &shared.spool,
        &shared.group,
        Log::open(LOG_TAG, true),
        Origin::Network {
            client: ip,
            helo: None,
            user: None,
            method: None,
        },
        Protocol::Esmtp,
    );
    let settings = bs::Settings {
        domain: &shared.config.domain,
        max_message_size: shared.config.max_message_size.0,
        max_recipients: bs::DEFAULT_MAX_RECIPIENTS,
    };
    let mut gate = ListenGate { shared };
    let report = Session::new(settings, &opts, &caller, depositor)
        .network(&mut gate, Client::new(ip))
        .run_on(&mut conn);
    match &report.ending {
        Ending::Io(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            shared.info(&format!(
                "timeout after {}s from unknown[{ip}]",
                COMMAND_TIMEOUT.as_secs()
            ));
            let _ = conn.write_all(
                format!(
                    "421 4.4.2 {} Error: timeout exceeded\r\n",
                    shared.config.domain
                )
                .as_bytes(),
            );
        }
        Ending::Io(e) => shared.info(&format!("lost connection from unknown[{ip}]: {e}")),
        Ending::Abandoned { in_data: true } => {
            shared.info(&format!(
                "lost connection after DATA from unknown[{ip}]: nothing queued"
            ));
        }
        Ending::Abandoned { in_data: false } | Ending::Quit | Ending::EndOfInput => {}
        Ending::Closed(why) => shared.warning(&format!("unknown[{ip}]: disconnected: {why}")),
    }
    conn.close();
    shared.info(&format!(
        "disconnect from unknown[{ip}] {}",
        report.counters.summary()
    ));
}

/// The listener's policy for one connection.
struct ListenGate<'a> {
    shared: &'a Shared,
}

impl ListenGate<'_> {
    /// The key `client_rate` counts under: the AUTH user, else the address.
    fn rate_key(client: &Client) -> String {
        match &client.user {
            Some(u) => format!("user {u}"),
            None => client.address.to_string(),
        }
    }

    /// Logs a refusal the way Postfix's smtpd does.
    fn reject(
        &self,
        stage: &str,
        client: &Client,
        reply: &str,
        from: &Sender,
        to: Option<&Address>,
    ) {
        let helo = client
            .helo
            .as_deref()
            .map(|h| format!(" helo=<{}>", text::one_line_max(h, 255)))
            .unwrap_or_default();
        let to = to.map(|t| format!(" to=<{t}>")).unwrap_or_default();
        self.shared.info(&format!(
            "NOQUEUE: reject: {stage} from unknown[{}]: {reply}; from=<{from}>{to} proto=ESMTP{helo}",
            client.address
        ));
    }
}

impl Gate for ListenGate<'_> {
    fn offers_tls(&self) -> bool {
        self.shared.tls.is_some()
    }

    fn offers_auth(&self) -> bool {
        self.shared.listener.users_file.exists()
    }

    fn authenticate(
        &mut self,
        client: &Client,
        mechanism: &str,
        user: &str,
        password: &str,
    ) -> AuthVerdict {
        let shared = self.shared;
        let ip = client.address;
        let users = match access::read_users(&shared.listener.users_file) {
            Ok((users, warnings)) => {
                for w in warnings {
                    shared.warning(&format!("{}: {w}", shared.listener.users_file.display()));
                }
                users
            }
            Err(e) => {
                shared.warning(&format!(
                    "cannot read {}: {e}",
                    shared.listener.users_file.display()
                ));
                return AuthVerdict::Reject("454 4.7.0 Temporary authentication failure".into());
            }
        };
        let found = users.iter().find(|u| u.name == user);
        let good = {
            let decoy = lock(&shared.hashing);
            match found {
                Some(u) => access::verify_password(&u.hash, password),
                // The same work for an unknown name: no telling names from timing.
                None => {
                    let _ = access::verify_password(&decoy, password);
                    false
                }
            }
        };
        if good {
            return AuthVerdict::Accept;
        }
        // SECURITY: the name is client text: one line, bounded; the password is never logged.
        let shown = text::one_line_max(user, 64);
        shared.warning(&format!(
            "unknown[{ip}]: SASL {mechanism} authentication failed: user=<{shown}>"
        ));
        let (failures, blocked) = lock(&shared.anvil).fail(ip, Instant::now());
        // SECURITY: each failure costs the client time (Postfix's smtpd_error_sleep_time).
        std::thread::sleep(access::AUTH_FAILURE_SLEEP);
        if blocked {
            shared.warning(&format!(
                "anvil: unknown[{ip}]: {failures} authentication failures in {} s: refused for {} s",
                access::ANVIL_WINDOW.as_secs(),
                access::ANVIL_WINDOW.as_secs()
            ));
            return AuthVerdict::Close(format!(
                "421 4.7.0 {} Error: too many authentication failures",
                shared.config.domain
            ));
        }
        AuthVerdict::Reject("535 5.7.8 Error: authentication failed".into())
    }

    fn mail(&mut self, client: &Client, sender: &Sender) -> Result<(), String> {
        let shared = self.shared;
        let allowed = shared.listener.allows(client.address);
        // SECURITY: with require_tls, only `allow`ed devices may send in plain text.
        if shared.listener.require_tls && client.tls.is_none() && !allowed {
            let r = "530 5.7.0 Must issue a STARTTLS command first".to_string();
            self.reject("MAIL", client, &r, sender, None);
            return Err(r);
        }
        if let Some(user) = &client.user {
            let users = access::read_users(&shared.listener.users_file)
                .map(|(u, _)| u)
                .unwrap_or_default();
            let patterns = users
                .iter()
                .find(|u| &u.name == user)
                .map(|u| u.allowed_senders.clone())
                .unwrap_or_default();
            // SECURITY: a user limited to some senders cannot send as anyone else.
            if !patterns.is_empty()
                && !patterns.iter().any(|p| {
                    crate::daemon::route::matches(p, sender.as_str(), &shared.config.domain)
                })
            {
                let r = format!(
                    "553 5.7.1 <{sender}>: Sender address rejected: not owned by user {user}"
                );
                self.reject("MAIL", client, &r, sender, None);
                return Err(r);
            }
        }
        let rate = shared.listener.client_rate;
        let key = Self::rate_key(client);
        if let Some(wait) = lock(&shared.rate).check(&rate, &key, Instant::now()) {
            let secs = wait.as_secs().max(1);
            let at = crate::message::complete::rfc5322_date(
                std::time::SystemTime::now() + Duration::from_secs(secs),
            );
            let r = format!(
                "451 4.7.1 Error: too many messages from {key} (client_rate {}/{}); retry in {secs} s, after {at}",
                rate.count,
                rate.window_text()
            );
            self.reject("MAIL", client, &r, sender, None);
            return Err(r);
        }
        Ok(())
    }

    fn rcpt(&mut self, client: &Client, sender: &Sender, rcpt: &Address) -> Result<(), String> {
        // SECURITY: never an open relay: only `allow`ed addresses and authenticated users.
        if client.user.is_some() || self.shared.listener.allows(client.address) {
            return Ok(());
        }
        let r = format!("554 5.7.1 <{rcpt}>: Relay access denied");
        self.reject("RCPT", client, &r, sender, Some(rcpt));
        Err(r)
    }

    fn account(&mut self, client: &Client) -> Option<String> {
        let user = client.user.as_ref()?;
        let (users, _) = access::read_users(&self.shared.listener.users_file).ok()?;
        users.into_iter().find(|u| &u.name == user)?.account
    }

    fn queued(&mut self, client: &Client) {
        let rate = self.shared.listener.client_rate;
        lock(&self.shared.rate).record(&rate, &Self::rate_key(client), Instant::now());
    }
}
