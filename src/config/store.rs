//! Where the quota ledger lives: `quota_store` and its companions in relay365.toml.
//! Without `quota_store` each host keeps its own ledger file (the default); with it,
//! every host naming the same store and the same mailbox shares one ledger in Redis
//! (or Valkey), so a fleet of servers sending as one mailbox stays within its limits.
//!
//! Trusted input: the world-readable configuration file, written by root. The URL is
//! checked here for its scheme and shape only; it must not carry a password (the file is
//! world-readable: the password goes in the secrets file's `[quota_store]` table), and a
//! TLS store names its CA by file. Reaching the store is `crate::quota`'s business.
//!
//! ```toml
//! quota_store = "rediss://redis.internal:6379/0"   # or redis://, or
//! # quota_store = "redis+sentinel://s1:26379,s2:26379/mymaster/0"
//! quota_store_ca_file = "/etc/relay365/redis-ca.pem"
//! fleet_size = 3            # hosts sharing the mailbox: each gets 1/3 when Redis is down
//! fleet_host = "web1"       # this host's name in the ledger (default: the host name)
//! quota_store_timeout = "2s"
//! ```

use std::path::PathBuf;
use std::time::Duration;

/// The secrets file's table (and systemd credential prefix) holding the store's password.
pub const STORE_SECRETS_TABLE: &str = "quota_store";

/// The longest a host waits for the store before it falls back to its local share.
pub const DEFAULT_STORE_TIMEOUT: Duration = Duration::from_secs(2);

/// How the store is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreAddress {
    /// One Redis server: the URL as written (`redis://` or `rediss://`).
    Direct { url: String },
    /// Redis Sentinel: ask these sentinels (`host:port`) for the master named `master`.
    Sentinel {
        sentinels: Vec<String>,
        master: String,
        db: i64,
        /// `redis+sentinels://`: TLS to the sentinels and to the master.
        tls: bool,
    },
}

/// A validated shared quota store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreSettings {
    pub address: StoreAddress,
    /// The URL as written, for messages (it holds no password).
    pub url: String,
    /// How many hosts share each mailbox: while the store is unreachable each host
    /// keeps to 1/`fleet_size` of every limit.
    pub fleet_size: u32,
    /// This host's name in the shared ledger (shown by `relay365 quota`).
    pub host: String,
    /// The CA that signed a TLS store's certificate; `None`: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Bound on connecting to and every answer of the store.
    pub timeout: Duration,
}

impl StoreSettings {
    /// Whether the store is reached over TLS.
    pub fn tls(&self) -> bool {
        match &self.address {
            StoreAddress::Direct { url } => url.starts_with("rediss://"),
            StoreAddress::Sentinel { tls, .. } => *tls,
        }
    }
}

/// Checks `quota_store` and builds the settings; the error names the key.
pub fn parse(
    url: &str,
    fleet_size: Option<u32>,
    host: Option<String>,
    ca_file: Option<PathBuf>,
    timeout: Option<Duration>,
) -> Result<StoreSettings, (&'static str, String)> {
    let address = parse_url(url).map_err(|m| ("quota_store", m))?;
    let fleet_size = fleet_size.unwrap_or(1);
    if !(1..=1000).contains(&fleet_size) {
        return Err((
            "fleet_size",
            format!("{fleet_size}: must be 1 to 1000, the number of hosts sharing a mailbox"),
        ));
    }
    let host = match host {
        Some(h) => h,
        None => nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "localhost".into()),
    };
    let host_ok = !host.is_empty()
        && host.len() <= 64
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !host_ok {
        // SECURITY: the name goes into Redis members separated by ':'.
        return Err((
            "fleet_host",
            format!("{host:?}: use 1 to 64 letters, digits, '-', '_' and '.'"),
        ));
    }
    if let Some(ca) = &ca_file
        && !ca.is_absolute()
    {
        return Err((
            "quota_store_ca_file",
            format!("{} is not an absolute path", ca.display()),
        ));
    }
    let timeout = timeout.unwrap_or(DEFAULT_STORE_TIMEOUT);
    if timeout.is_zero() || timeout > Duration::from_secs(60) {
        return Err((
            "quota_store_timeout",
            "must be from 1s to 60s (a host waits this long before it falls back to its local share)"
                .into(),
        ));
    }
    let settings = StoreSettings {
        address,
        url: url.to_owned(),
        fleet_size,
        host,
        ca_file,
        timeout,
    };
    if settings.ca_file.is_some() && !settings.tls() {
        return Err((
            "quota_store_ca_file",
            "is set but quota_store is not a TLS URL: use rediss:// (or redis+sentinels://)".into(),
        ));
    }
    Ok(settings)
}

fn parse_url(url: &str) -> Result<StoreAddress, String> {
    let bad = |why: &str| {
        // SECURITY: a password written in the URL is not echoed into logs and terminals.
        let shown = match (url.split_once("://"), url.rfind('@')) {
            (Some((scheme, _)), Some(at)) => format!("{scheme}://<redacted>{}", &url[at..]),
            _ => url.to_owned(),
        };
        let shown: String = shown.chars().take(100).collect();
        format!("{shown:?}: {why}")
    };
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| bad("expected redis://host:6379/0, rediss://host:6379/0 or redis+sentinel://host:26379/master/0"))?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    if authority.contains('@') && authority.split('@').next().is_some_and(|u| u.contains(':')) {
        // SECURITY: the config file is world-readable; a password in it is a leak.
        return Err(bad(
            "the URL carries a password, but relay365.toml is world-readable: remove it from the URL and put password = \"...\" in the [quota_store] table of the secrets file",
        ));
    }
    let hosts = authority.rsplit('@').next().unwrap_or_default();
    if hosts.is_empty() {
        return Err(bad("no host: write redis://host:6379/0"));
    }
    let db = |s: &str| -> Result<i64, String> {
        if s.is_empty() {
            Ok(0)
        } else {
            s.parse::<i64>()
                .ok()
                .filter(|d| (0..=1_000_000).contains(d))
                .ok_or_else(|| bad("the database must be a number such as /0"))
        }
    };
    match scheme {
        "redis" | "rediss" => {
            if hosts.contains(',') {
                return Err(bad(
                    "one host only; for several, use Sentinel: redis+sentinel://s1:26379,s2:26379/master/0",
                ));
            }
            db(path)?;
            Ok(StoreAddress::Direct {
                url: url.to_owned(),
            })
        }
        "redis+sentinel" | "redis+sentinels" => {
            let (master, d) = path.split_once('/').unwrap_or((path, ""));
            if master.is_empty() {
                return Err(bad(
                    "name the master: redis+sentinel://s1:26379,s2:26379/mymaster/0",
                ));
            }
            let sentinels: Vec<String> = hosts.split(',').map(str::to_owned).collect();
            if sentinels.iter().any(|s| s.is_empty()) {
                return Err(bad("an empty sentinel address"));
            }
            Ok(StoreAddress::Sentinel {
                sentinels,
                master: master.to_owned(),
                db: db(d)?,
                tls: scheme == "redis+sentinels",
            })
        }
        _ => Err(bad(
            "the scheme must be redis://, rediss://, redis+sentinel:// or redis+sentinels://",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(url: &str) -> StoreSettings {
        parse(url, Some(3), Some("web1".into()), None, None).unwrap()
    }

    #[test]
    fn urls_parse() {
        assert_eq!(
            ok("redis://127.0.0.1:6379/0").address,
            StoreAddress::Direct {
                url: "redis://127.0.0.1:6379/0".into()
            }
        );
        assert!(ok("rediss://r.example:6380/2").tls());
        assert!(!ok("redis://relay365@r.example/2").tls());
        assert_eq!(
            ok("redis+sentinel://s1:26379,s2:26379/mymaster/1").address,
            StoreAddress::Sentinel {
                sentinels: vec!["s1:26379".into(), "s2:26379".into()],
                master: "mymaster".into(),
                db: 1,
                tls: false
            }
        );
    }

    #[test]
    fn bad_settings_name_the_key_and_the_fix() {
        let e = |url: &str| parse(url, None, None, None, None).unwrap_err();
        assert!(e("redis://:hunter2@r:6379/0").1.contains("[quota_store]"));
        assert!(!e("redis://:hunter2@r:6379/0").1.contains("hunter2"));
        assert!(e("http://r/0").1.contains("scheme"));
        assert!(e("redis://a,b/0").1.contains("Sentinel"));
        assert!(e("redis://r/x").1.contains("database"));
        assert!(e("redis+sentinel://s1/").1.contains("master"));
        assert_eq!(
            parse("redis://r/0", Some(0), None, None, None)
                .unwrap_err()
                .0,
            "fleet_size"
        );
        assert_eq!(
            parse("redis://r/0", None, Some("a:b".into()), None, None)
                .unwrap_err()
                .0,
            "fleet_host"
        );
        let ca = Some(PathBuf::from("/etc/ca.pem"));
        assert_eq!(
            parse("redis://r/0", None, None, ca, None).unwrap_err().0,
            "quota_store_ca_file"
        );
    }
}
