//! The `[listener]` table: where `relay365 listen` binds, who may relay through it
//! without AUTH, its TLS certificate and users file, and the bounds on each client.
//! Parsed and validated here; the listener (`src/listen/`) only reads the result.
//!
//! Trusts the config file as far as its owner (root) goes; refuses unknown keys and
//! bad values with the key named.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use serde::Deserialize;

use super::limits::Rate;
use crate::spool::paths;

/// The table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListener {
    listen: Option<Vec<String>>,
    allow: Option<Vec<String>>,
    users_file: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    #[serde(default)]
    require_tls: bool,
    account: Option<String>,
    max_connections: Option<u32>,
    max_connections_per_client: Option<u32>,
    client_rate: Option<Rate>,
}

/// An address block such as `192.168.10.0/24` or `::1/128`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub network: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// `a.b.c.d/n`, `x::y/n`, or a bare address (one host).
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let network: IpAddr = addr
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| format!("{s:?} is not an address or address/prefix"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix must be 0 to {max}"))?,
            None => max,
        };
        let c = Cidr { network, prefix };
        if !c.contains(network) || c.masked(network) != network {
            return Err(format!(
                "{s:?} has host bits set: write the network address of the block"
            ));
        }
        Ok(c)
    }

    fn masked(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(a) => {
                let bits = u32::from(a);
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4((bits & mask).into())
            }
            IpAddr::V6(a) => {
                let bits = u128::from(a);
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6((bits & mask).into())
            }
        }
    }

    /// Whether `ip` is in the block; an IPv4-mapped IPv6 client (`::ffff:a.b.c.d`, as a
    /// dual-stack socket reports it) is compared as the IPv4 address it is.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        match (self.network, ip) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                self.masked(ip) == self.network
            }
            _ => false,
        }
    }
}

/// IPv4-mapped IPv6 addresses as IPv4.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// The validated `[listener]` table.
#[derive(Debug, Clone)]
pub struct Listener {
    /// Where to bind when not socket-activated.
    pub listen: Vec<SocketAddr>,
    /// Clients that may relay without AUTH.
    pub allow: Vec<Cidr>,
    /// The AUTH users (hashed passwords); AUTH is offered when it names any user.
    pub users_file: PathBuf,
    /// Certificate chain and key for STARTTLS; no STARTTLS without them.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// No MAIL before STARTTLS, except from `allow`.
    pub require_tls: bool,
    /// The account that sends the listener's mail (else the usual routing).
    pub account: Option<String>,
    pub max_connections: usize,
    pub max_connections_per_client: usize,
    /// Messages per client (address, or AUTH user) per sliding window.
    pub client_rate: Rate,
}

pub const DEFAULT_MAX_CONNECTIONS: u32 = 200;
pub const DEFAULT_MAX_CONNECTIONS_PER_CLIENT: u32 = 20;

impl Listener {
    /// The defaults: loopback only, on port 25.
    pub fn loopback() -> Listener {
        Listener {
            listen: vec![
                SocketAddr::from(([127, 0, 0, 1], 25)),
                SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 25)),
            ],
            allow: vec![
                Cidr {
                    network: IpAddr::from([127, 0, 0, 0]),
                    prefix: 8,
                },
                Cidr {
                    network: IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
                    prefix: 128,
                },
            ],
            users_file: PathBuf::from(paths::LISTENER_USERS_FILE),
            tls: None,
            require_tls: false,
            account: None,
            max_connections: DEFAULT_MAX_CONNECTIONS as usize,
            max_connections_per_client: DEFAULT_MAX_CONNECTIONS_PER_CLIENT as usize,
            client_rate: Rate::UNLIMITED,
        }
    }

    /// Whether `ip` may relay without AUTH.
    pub fn allows(&self, ip: IpAddr) -> bool {
        self.allow.iter().any(|c| c.contains(ip))
    }

    /// Validates the table; errors name the key.
    pub(super) fn validate(
        r: RawListener,
        accounts: &[String],
    ) -> Result<Listener, (&'static str, String)> {
        let mut l = Listener::loopback();
        if let Some(list) = r.listen {
            l.listen = list
                .iter()
                .map(|s| {
                    s.parse::<SocketAddr>().map_err(|_| {
                        (
                            "listener.listen",
                            format!(
                                "{s:?} is not ADDRESS:PORT such as \"0.0.0.0:25\" or \"[::]:587\""
                            ),
                        )
                    })
                })
                .collect::<Result<_, _>>()?;
        }
        if let Some(list) = r.allow {
            l.allow = list
                .iter()
                .map(|s| Cidr::parse(s).map_err(|m| ("listener.allow", m)))
                .collect::<Result<_, _>>()?;
        }
        if let Some(u) = r.users_file {
            if !u.is_absolute() {
                return Err((
                    "listener.users_file",
                    format!("{} is not an absolute path", u.display()),
                ));
            }
            l.users_file = u;
        }
        l.tls = match (r.tls_cert, r.tls_key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => {
                return Err((
                    "listener.tls_cert",
                    "set both tls_cert and tls_key, or neither".into(),
                ));
            }
        };
        if r.require_tls && l.tls.is_none() {
            return Err((
                "listener.require_tls",
                "needs tls_cert and tls_key: without a certificate no client could send".into(),
            ));
        }
        l.require_tls = r.require_tls;
        if let Some(a) = r.account {
            if !accounts.contains(&a) {
                return Err((
                    "listener.account",
                    format!("{a:?} names no [[account]] of this file"),
                ));
            }
            l.account = Some(a);
        }
        let max = r.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
        let per = r
            .max_connections_per_client
            .unwrap_or(DEFAULT_MAX_CONNECTIONS_PER_CLIENT.min(max));
        if max == 0 || max > 100_000 {
            return Err((
                "listener.max_connections",
                format!("{max}: use 1 to 100000"),
            ));
        }
        if per == 0 || per > max {
            return Err((
                "listener.max_connections_per_client",
                format!("{per}: use 1 to max_connections ({max})"),
            ));
        }
        l.max_connections = max as usize;
        l.max_connections_per_client = per as usize;
        if let Some(rate) = r.client_rate {
            l.client_rate = rate;
        }
        Ok(l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_blocks() {
        let c = Cidr::parse("192.168.10.0/24").unwrap();
        assert!(c.contains("192.168.10.77".parse().unwrap()));
        assert!(!c.contains("192.168.11.1".parse().unwrap()));
        assert!(c.contains("::ffff:192.168.10.5".parse().unwrap()));
        assert!(!c.contains("::1".parse().unwrap()));
        let one = Cidr::parse("127.0.0.1").unwrap();
        assert_eq!(one.prefix, 32);
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        assert!(
            Cidr::parse("::1/128")
                .unwrap()
                .contains("::1".parse().unwrap())
        );
        assert!(
            Cidr::parse("0.0.0.0/0")
                .unwrap()
                .contains("8.8.8.8".parse().unwrap())
        );
        assert!(
            Cidr::parse("192.168.10.1/24")
                .unwrap_err()
                .contains("host bits")
        );
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("printer").is_err());
    }

    #[test]
    fn the_documented_example_parses_when_uncommented() {
        let example = include_str!("../../etc/relay365.toml");
        let at = example.find("#[listener]").unwrap();
        let mut text = String::from(
            "domain = \"example.com\"\n[[account]]\nname = \"app\"\nmailbox = \"app@example.com\"\nauth = \"login\"\n[listener]\n",
        );
        for line in example[at..].lines().skip(1) {
            if let Some(kv) = line.strip_prefix('#').filter(|l| l.contains(" = ")) {
                text.push_str(kv);
                text.push('\n');
            }
        }
        let c = crate::config::Config::from_toml(std::path::Path::new("example"), &text).unwrap();
        let l = c.listener.unwrap();
        assert!(l.allows("192.168.10.7".parse().unwrap()));
        assert_eq!(l.client_rate.count, 200);
        assert_eq!(l.account.as_deref(), Some("app"));
    }

    #[test]
    fn defaults_are_loopback_only() {
        let l = Listener::loopback();
        assert!(l.allows("127.0.0.1".parse().unwrap()));
        assert!(l.allows("::1".parse().unwrap()));
        assert!(!l.allows("192.168.1.1".parse().unwrap()));
        assert!(l.listen.iter().all(|a| a.ip().is_loopback()));
    }
}
