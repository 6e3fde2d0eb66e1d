//! Who may send through the listener: the AUTH users file (argon2 hashes, never a
//! clear password), the anvil that slows and then refuses an address that keeps
//! failing AUTH (Postfix's anvil and `smtpd_error_sleep_time`), and the per-client
//! message rate (`client_rate`). Relay access by address is `[listener] allow`
//! (`crate::config::listener`).
//!
//! Trusts the users file (root's, written by `relay365 listener-user`) for its format
//! only: every line is parsed strictly and a bad line is skipped with a warning.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};

use crate::config::limits::Rate;

/// The users file is read whole: refuse anything larger than this.
pub const MAX_USERS_FILE: u64 = 1 << 20;
/// Failed AUTHs from one address within [`ANVIL_WINDOW`] before it is refused.
pub const ANVIL_FAILURES: u32 = 3;
/// How long failures are remembered, and how long an address is then refused.
pub const ANVIL_WINDOW: Duration = Duration::from_secs(600);
/// The pause before answering a failed AUTH (Postfix's `smtpd_error_sleep_time`).
pub const AUTH_FAILURE_SLEEP: Duration = Duration::from_secs(1);
/// Clients remembered by the anvil and the rate table; beyond it the oldest go.
const MAX_TRACKED: usize = 100_000;

/// One listener user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    /// An argon2 PHC string.
    pub hash: String,
    /// Envelope senders this user may use (patterns as in `senders`); empty: any.
    pub allowed_senders: Vec<String>,
    /// The account that sends this user's mail.
    pub account: Option<String>,
}

/// A user name: what SMTP AUTH and the file can carry safely.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._@+-".contains(&b))
}

impl User {
    /// `name:$argon2id$...[:allowed_senders=a@b,*@c][:account=app]`.
    pub fn parse(line: &str) -> Result<User, String> {
        let mut parts = line.split(':');
        let name = parts.next().unwrap_or("");
        if !valid_name(name) {
            return Err("the user name must be 1-64 letters, digits or ._@+-".into());
        }
        let hash = parts.next().unwrap_or("");
        PasswordHash::new(hash).map_err(|e| format!("user {name}: not a password hash: {e}"))?;
        let mut user = User {
            name: name.to_string(),
            hash: hash.to_string(),
            allowed_senders: Vec::new(),
            account: None,
        };
        for field in parts {
            match field.split_once('=') {
                Some(("allowed_senders", v)) => {
                    user.allowed_senders = v
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(String::from)
                        .collect();
                }
                Some(("account", v)) if !v.is_empty() => user.account = Some(v.to_string()),
                _ => return Err(format!("user {name}: unknown field {field:?}")),
            }
        }
        Ok(user)
    }

    /// The line for the file.
    pub fn line(&self) -> String {
        let mut s = format!("{}:{}", self.name, self.hash);
        if !self.allowed_senders.is_empty() {
            s.push_str(&format!(
                ":allowed_senders={}",
                self.allowed_senders.join(",")
            ));
        }
        if let Some(a) = &self.account {
            s.push_str(&format!(":account={a}"));
        }
        s
    }
}

/// Parses a users file's text: the users, and one warning per bad line.
pub fn parse_users(text: &str) -> (Vec<User>, Vec<String>) {
    let mut users = Vec::new();
    let mut warnings = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match User::parse(line) {
            Ok(u) => users.push(u),
            Err(e) => warnings.push(format!("line {}: {e}; the line is ignored", n + 1)),
        }
    }
    (users, warnings)
}

/// Reads the users file; a missing file is no users.
pub fn read_users(path: &Path) -> std::io::Result<(Vec<User>, Vec<String>)> {
    use std::io::Read;
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), Vec::new())),
        Err(e) => return Err(e),
    };
    let mut text = String::new();
    // SECURITY: bounded read, whatever the file holds.
    file.take(MAX_USERS_FILE).read_to_string(&mut text)?;
    Ok(parse_users(&text))
}

/// Hashes a password (argon2id, a fresh random salt).
pub fn hash_password(password: &str) -> Result<String, String> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| format!("no randomness for the salt: {e}"))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Whether `password` matches the PHC `hash`.
pub fn verify_password(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| {
        Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

/// A hash of a random password, verified against when the user does not exist so that
/// a wrong name costs as long as a wrong password.
pub fn decoy_hash() -> String {
    hash_password("relay365 decoy").unwrap_or_default()
}

/// Failed AUTHs per address.
#[derive(Debug, Default)]
pub struct Anvil {
    failures: HashMap<IpAddr, VecDeque<Instant>>,
    blocked: HashMap<IpAddr, Instant>,
}

impl Anvil {
    /// Until when `ip` is refused, if it is.
    pub fn blocked_until(&mut self, ip: IpAddr, now: Instant) -> Option<Instant> {
        match self.blocked.get(&ip) {
            Some(until) if *until > now => Some(*until),
            Some(_) => {
                self.blocked.remove(&ip);
                None
            }
            None => None,
        }
    }

    /// Records a failure; returns the failures in the window, and whether the address
    /// is now blocked.
    pub fn fail(&mut self, ip: IpAddr, now: Instant) -> (u32, bool) {
        if self.failures.len() >= MAX_TRACKED {
            // SECURITY: bounded memory under a spray of addresses.
            self.failures.retain(|_, v| {
                v.back()
                    .is_some_and(|t| now.duration_since(*t) < ANVIL_WINDOW)
            });
            if self.failures.len() >= MAX_TRACKED {
                self.failures.clear();
            }
        }
        let list = self.failures.entry(ip).or_default();
        while list
            .front()
            .is_some_and(|t| now.duration_since(*t) >= ANVIL_WINDOW)
        {
            list.pop_front();
        }
        list.push_back(now);
        let n = list.len() as u32;
        if n >= ANVIL_FAILURES {
            self.failures.remove(&ip);
            if self.blocked.len() >= MAX_TRACKED {
                self.blocked.retain(|_, until| *until > now);
            }
            self.blocked.insert(ip, now + ANVIL_WINDOW);
            return (n, true);
        }
        (n, false)
    }
}

/// Messages queued per client key (address or AUTH user) within `client_rate`.
#[derive(Debug, Default)]
pub struct RateTable {
    sent: HashMap<String, VecDeque<Instant>>,
}

impl RateTable {
    /// `None` if `key` may send another message now, else how long until it may.
    pub fn check(&mut self, rate: &Rate, key: &str, now: Instant) -> Option<Duration> {
        if !rate.is_limited() {
            return None;
        }
        let list = self.sent.get_mut(key)?;
        while list
            .front()
            .is_some_and(|t| now.duration_since(*t) >= rate.window)
        {
            list.pop_front();
        }
        if list.len() < rate.count as usize {
            return None;
        }
        list.front()
            .map(|first| rate.window.saturating_sub(now.duration_since(*first)))
    }

    /// Counts a queued message.
    pub fn record(&mut self, rate: &Rate, key: &str, now: Instant) {
        if !rate.is_limited() {
            return;
        }
        if self.sent.len() >= MAX_TRACKED && !self.sent.contains_key(key) {
            // SECURITY: bounded memory: forget clients whose window has passed.
            self.sent.retain(|_, v| {
                v.back()
                    .is_some_and(|t| now.duration_since(*t) < rate.window)
            });
        }
        let list = self.sent.entry(key.to_string()).or_default();
        list.push_back(now);
        // SECURITY: never more stamps than the rate can need.
        while list.len() > rate.count as usize {
            list.pop_front();
        }
    }

    /// Each client's messages in the current window, for `relay365 quota`.
    pub fn usage(&self, now: Instant, rate: &Rate) -> Vec<(String, usize)> {
        let mut out: Vec<(String, usize)> = self
            .sent
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.iter()
                        .filter(|t| now.duration_since(**t) < rate.window)
                        .count(),
                )
            })
            .filter(|(_, n)| *n > 0)
            .collect();
        out.sort();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_lines_round_trip_and_bad_lines_are_named() {
        let hash = hash_password("s3cret").unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(!hash.contains("s3cret"));
        assert!(verify_password(&hash, "s3cret"));
        assert!(!verify_password(&hash, "s3cret "));
        let u = User {
            name: "scanner".into(),
            hash,
            allowed_senders: vec!["scanner@example.com".into(), "*@scan.example.com".into()],
            account: Some("app".into()),
        };
        assert_eq!(User::parse(&u.line()).unwrap(), u);
        let text = format!("# users\n\n{}\nbad user:x\nbob:notahash\n", u.line());
        let (users, warnings) = parse_users(&text);
        assert_eq!(users, [u]);
        assert_eq!(warnings.len(), 2);
        assert!(warnings[0].starts_with("line 4:"), "{warnings:?}");
    }

    #[test]
    fn the_anvil_blocks_after_repeated_failures_and_forgets() {
        let mut a = Anvil::default();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let t = Instant::now();
        assert_eq!(a.fail(ip, t), (1, false));
        assert_eq!(a.fail(ip, t), (2, false));
        assert_eq!(a.blocked_until(ip, t), None);
        assert_eq!(a.fail(ip, t), (3, true));
        assert!(a.blocked_until(ip, t + Duration::from_secs(1)).is_some());
        assert_eq!(a.blocked_until(ip, t + ANVIL_WINDOW), None);
        // Failures older than the window do not count.
        let mut a = Anvil::default();
        a.fail(ip, t);
        a.fail(ip, t);
        assert_eq!(a.fail(ip, t + ANVIL_WINDOW), (1, false));
    }

    #[test]
    fn the_client_rate_is_a_sliding_window() {
        let rate = Rate::new(2, Duration::from_secs(60)).unwrap();
        let mut r = RateTable::default();
        let t = Instant::now();
        assert_eq!(r.check(&rate, "a", t), None);
        r.record(&rate, "a", t);
        r.record(&rate, "a", t + Duration::from_secs(10));
        assert_eq!(r.check(&rate, "b", t), None);
        assert_eq!(
            r.check(&rate, "a", t + Duration::from_secs(20)),
            Some(Duration::from_secs(40))
        );
        assert_eq!(
            r.usage(t + Duration::from_secs(30), &rate),
            [("a".to_string(), 2)]
        );
        assert_eq!(r.check(&rate, "a", t + Duration::from_secs(60)), None);
        assert_eq!(r.check(&Rate::UNLIMITED, "a", t), None);
    }
}
