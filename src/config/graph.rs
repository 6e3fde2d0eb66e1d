//! The settings of the Microsoft Graph transport and of late-bounce harvesting
//! (`[account.graph]`), and of the HTTP proxy (`proxy`, top level or per account).
//!
//! Trust: read from root's world-readable config file, so nothing here is secret except
//! a proxy password written into the URL (allowed, but the secrets file's
//! `proxy_password` is the place for it). Every value ends up in a URL or a TCP
//! connection, so each is checked strictly.

use std::time::Duration;

use serde::Deserialize;

/// Microsoft Graph, global cloud.
pub const DEFAULT_GRAPH_URL: &str = "https://graph.microsoft.com";
/// The application-permission scope for Graph in the global cloud.
pub const GRAPH_SCOPE: &str = "https://graph.microsoft.com/.default";
/// How often the harvester reads the inbox for new NDRs.
pub const DEFAULT_HARVEST_INTERVAL: Duration = Duration::from_secs(60);
/// The national clouds' Graph hosts (exchange-online.md, "Endpoints by profile and cloud"):
/// their scope is the host's own `.default`.
const SOVEREIGN_GRAPH_HOSTS: [&str; 3] = [
    "graph.microsoft.us",
    "dod-graph.microsoft.us",
    "microsoftgraph.chinacloudapi.cn",
];

/// What the harvester does with an NDR it has matched and acted on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterHarvest {
    /// Mark it read (it stays in the inbox; the harvester skips read NDRs it already saw).
    MarkRead,
    /// Move it into this mail folder (created when missing), by display name.
    Move(String),
}

/// `[account.graph]` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGraph {
    pub url: Option<String>,
    /// `"read"` (default) or `"move:Folder name"`.
    pub after_harvest: Option<String>,
    pub harvest_interval: Option<super::Span>,
}

/// The validated Graph settings of an account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphSettings {
    /// `https://graph.microsoft.com` or a national cloud's (or a test's) root, without a
    /// trailing slash.
    pub url: String,
    pub after_harvest: AfterHarvest,
    pub harvest_interval: Duration,
}

impl Default for GraphSettings {
    fn default() -> Self {
        GraphSettings {
            url: DEFAULT_GRAPH_URL.to_owned(),
            after_harvest: AfterHarvest::MarkRead,
            harvest_interval: DEFAULT_HARVEST_INTERVAL,
        }
    }
}

impl GraphSettings {
    /// Validates `[account.graph]`; `Err` is (key, problem).
    pub fn from_raw(raw: RawGraph) -> Result<GraphSettings, (&'static str, String)> {
        let url = raw
            .url
            .unwrap_or_else(|| DEFAULT_GRAPH_URL.to_owned())
            .trim_end_matches('/')
            .to_owned();
        // SECURITY: the bearer token travels to this URL: https only, nothing that could
        // smuggle a path, query or credentials into it.
        let rest = url
            .get(..8)
            .filter(|s| s.eq_ignore_ascii_case("https://"))
            .map(|_| &url[8..]);
        let ok = rest.is_some_and(|r| {
            !r.is_empty()
                && r.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        });
        if !ok {
            return Err((
                "account.graph.url",
                format!(
                    "{url:?} must be https://host[:port] without a path, e.g. {DEFAULT_GRAPH_URL} (graph.microsoft.us for GCC High)"
                ),
            ));
        }
        let after_harvest = match raw.after_harvest.as_deref() {
            None | Some("read") => AfterHarvest::MarkRead,
            Some(s) => match s.strip_prefix("move:").map(str::trim) {
                Some(f) if !f.is_empty() && f.len() <= 255 && !f.chars().any(char::is_control) => {
                    AfterHarvest::Move(f.to_owned())
                }
                _ => {
                    return Err((
                        "account.graph.after_harvest",
                        format!("{s:?}: use \"read\" or \"move:Folder name\""),
                    ));
                }
            },
        };
        let harvest_interval = raw
            .harvest_interval
            .map_or(DEFAULT_HARVEST_INTERVAL, |s| s.0);
        if harvest_interval < Duration::from_secs(1) {
            return Err((
                "account.graph.harvest_interval",
                "must be at least 1s".to_owned(),
            ));
        }
        Ok(GraphSettings {
            url,
            after_harvest,
            harvest_interval,
        })
    }

    /// The host of [`GraphSettings::url`].
    pub fn host(&self) -> &str {
        let rest = self.url.get(8..).unwrap_or("");
        match rest.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => rest,
        }
    }

    /// The token scope for this Graph: a national cloud's host's `.default`, else the
    /// global one (also for a test's loopback URL, which stands in for the global cloud).
    pub fn scope(&self) -> String {
        let host = self.host().to_ascii_lowercase();
        if SOVEREIGN_GRAPH_HOSTS.contains(&host.as_str()) {
            format!("https://{host}/.default")
        } else {
            GRAPH_SCOPE.to_owned()
        }
    }
}

/// An HTTP proxy: `http://[user[:password]@]host:port`.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxySettings {
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    /// Only when written into the URL; the secrets file's `proxy_password` wins.
    pub password: Option<String>,
}

impl std::fmt::Debug for ProxySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // SECURITY: hand-written so a password in the URL never shows.
        write!(f, "ProxySettings({})", self.display())
    }
}

impl ProxySettings {
    /// Parses a proxy URL. Only `http://` proxies (the CONNECT method) are supported.
    pub fn parse(url: &str) -> Result<ProxySettings, String> {
        let bad = |why: &str| format!("{why}: write http://[user[:password]@]host:port");
        let rest = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("HTTP://"))
            .ok_or_else(|| bad("only http:// proxies are supported (the CONNECT method)"))?;
        let rest = rest.trim_end_matches('/');
        let (auth, hostport) = match rest.rsplit_once('@') {
            Some((a, h)) => (Some(a), h),
            None => (None, rest),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h,
                p.parse::<u16>()
                    .ok()
                    .filter(|&p| p != 0)
                    .ok_or_else(|| bad("the port is not a number"))?,
            ),
            _ => return Err(bad("the port is missing")),
        };
        // SECURITY: the host goes into a CONNECT line and a TCP connect; no spaces, no paths.
        if host.is_empty()
            || !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-_[]:".contains(&b))
        {
            return Err(bad("the host is not a host name or address"));
        }
        let (user, password) = match auth {
            None => (None, None),
            Some(a) => {
                let (u, p) = match a.split_once(':') {
                    Some((u, p)) => (u, Some(percent_decode(p))),
                    None => (a, None),
                };
                (Some(percent_decode(u)), p)
            }
        };
        if user
            .iter()
            .chain(password.iter())
            .any(|s| s.chars().any(char::is_control))
        {
            return Err(bad("the user or password holds control characters"));
        }
        Ok(ProxySettings {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port,
            user,
            password,
        })
    }

    /// `http://user@host:port`, never the password.
    pub fn display(&self) -> String {
        match &self.user {
            Some(u) => format!("http://{u}@{}:{}", self.host, self.port),
            None => format!("http://{}:{}", self.host, self.port),
        }
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where the proxy comes from when the config names none: the service's environment
/// (`HTTPS_PROXY`, `https_proxy`, then `ALL_PROXY`), unless `NO_PROXY` exempts `host`.
/// A value that does not parse is ignored (as curl does) and reported by `relay365 check`.
pub fn proxy_from_env(host: &str) -> Option<ProxySettings> {
    let var = |n: &str| std::env::var(n).ok().filter(|v| !v.trim().is_empty());
    let no_proxy = var("NO_PROXY").or_else(|| var("no_proxy"));
    if no_proxy.is_some_and(|list| exempt(&list, host)) {
        return None;
    }
    ["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"]
        .iter()
        .find_map(|n| var(n))
        .and_then(|v| ProxySettings::parse(v.trim()).ok())
}

/// Whether a `NO_PROXY` list exempts `host`: `*`, an exact name, or a domain suffix
/// (`.example.com` or `example.com` both cover `a.example.com`).
pub fn exempt(list: &str, host: &str) -> bool {
    let host = host.trim_matches(['[', ']']).to_ascii_lowercase();
    list.split(',').map(str::trim).any(|e| {
        if e == "*" {
            return true;
        }
        let e = e.to_ascii_lowercase();
        let e = e.trim_start_matches('*').trim_start_matches('.');
        !e.is_empty() && (host == e || host.ends_with(&format!(".{e}")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn graph_url_scope_and_harvest_options() {
        let g = GraphSettings::from_raw(RawGraph::default()).unwrap();
        assert_eq!(g.url, DEFAULT_GRAPH_URL);
        assert_eq!(g.scope(), GRAPH_SCOPE);
        assert_eq!(g.after_harvest, AfterHarvest::MarkRead);
        let g = GraphSettings::from_raw(RawGraph {
            url: Some("https://graph.microsoft.us/".into()),
            after_harvest: Some("move:Bounces".into()),
            ..RawGraph::default()
        })
        .unwrap();
        assert_eq!(g.scope(), "https://graph.microsoft.us/.default");
        assert_eq!(g.after_harvest, AfterHarvest::Move("Bounces".into()));
        let g = GraphSettings::from_raw(RawGraph {
            url: Some("https://localhost:4443".into()),
            ..RawGraph::default()
        })
        .unwrap();
        assert_eq!(g.host(), "localhost");
        assert_eq!(g.scope(), GRAPH_SCOPE);
        for bad in [
            "http://graph.microsoft.com",
            "https://graph.microsoft.com/v1.0",
            "https://x@evil",
            "https://",
        ] {
            let r = GraphSettings::from_raw(RawGraph {
                url: Some(bad.into()),
                ..RawGraph::default()
            });
            assert!(r.is_err(), "{bad}");
        }
        assert!(
            GraphSettings::from_raw(RawGraph {
                after_harvest: Some("delete".into()),
                ..RawGraph::default()
            })
            .is_err()
        );
    }

    #[test]
    fn proxy_urls_parse_and_never_show_the_password() {
        let p = ProxySettings::parse("http://user:p%40ss@proxy.corp:3128").unwrap();
        assert_eq!(p.host, "proxy.corp");
        assert_eq!(p.port, 3128);
        assert_eq!(p.user.as_deref(), Some("user"));
        assert_eq!(p.password.as_deref(), Some("p@ss"));
        assert_eq!(p.display(), "http://user@proxy.corp:3128");
        assert!(!format!("{p:?}").contains("p@ss"));
        let p = ProxySettings::parse("http://127.0.0.1:8888/").unwrap();
        assert_eq!((p.host.as_str(), p.port, p.user), ("127.0.0.1", 8888, None));
        for bad in [
            "https://proxy:3128",
            "socks5://proxy:1080",
            "http://proxy",
            "http://proxy:0",
            "http://pro xy:80",
            "http://a:b@:80",
        ] {
            assert!(ProxySettings::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn no_proxy_lists() {
        assert!(exempt("localhost,.corp", "localhost"));
        assert!(exempt("localhost,.corp", "smtp.corp"));
        assert!(exempt("example.com", "a.example.com"));
        assert!(exempt("*", "graph.microsoft.com"));
        assert!(!exempt("example.com", "notexample.com"));
        assert!(!exempt("", "graph.microsoft.com"));
    }
}
