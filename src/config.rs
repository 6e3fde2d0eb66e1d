//! The configuration file `/etc/relay365/relay365.toml`: typed with serde, every key
//! documented in `etc/relay365.toml`. World-readable and free of secrets.
//!
//! Trusts the file as far as its owner (root) goes, but refuses any unknown key or bad
//! value with the file, line and key named, so a typo never silently changes behaviour.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use crate::spool::paths;

/// Errors loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "cannot read the config file {path}: {source} (check that it exists and is readable; another file can be named with -C)"
    )]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        message: String,
    },
    #[error(
        "no mail domain: set domain = \"example.com\" in {path}, or write the domain into /etc/mailname"
    )]
    NoDomain { path: PathBuf },
}

/// A byte size, written as a number of bytes or with a K, M or G suffix ("35M").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses "35M", "1024", "64K", "1G" (powers of 1000, as Microsoft states its limits).
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let (digits, mult) = match t.char_indices().last() {
            Some((i, c)) if c.is_ascii_alphabetic() => {
                let mult = match c.to_ascii_uppercase() {
                    'K' => 1_000,
                    'M' => 1_000_000,
                    'G' => 1_000_000_000,
                    _ => return Err(format!("unknown size suffix in {s:?}: use K, M or G")),
                };
                (&t[..i], mult)
            }
            _ => (t, 1),
        };
        let n: u64 = digits
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not a size such as 35M or 1048576"))?;
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("{s:?} is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        if n >= 1_000_000 && n % 1_000_000 == 0 {
            write!(f, "{}M", n / 1_000_000)
        } else if n >= 1_000 && n % 1_000 == 0 {
            write!(f, "{}K", n / 1_000)
        } else {
            write!(f, "{n} bytes")
        }
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size in bytes, or a string such as \"35M\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    spool_dir: Option<PathBuf>,
    domain: Option<String>,
    max_message_size: Option<ByteSize>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the config was read from (for messages).
    pub path: PathBuf,
    pub spool_dir: PathBuf,
    /// The domain that qualifies bare local names and ends Message-IDs.
    pub domain: String,
    pub max_message_size: ByteSize,
}

/// Microsoft's default mailbox limit for a message (35 MB).
pub const DEFAULT_MAX_MESSAGE_SIZE: ByteSize = ByteSize(35_000_000);

impl Config {
    /// Reads and validates a config file. A missing file at the default path is not an
    /// error (every key has a default), so a fresh install still queues mail.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = match fs::read_to_string(path) {
            Ok(t) => t,
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    && path == Path::new(paths::CONFIG_FILE) =>
            {
                String::new()
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        Self::from_toml(path, &text)
    }

    /// Parses config text; `path` only names the file in errors.
    pub fn from_toml(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let domain = match raw.domain {
            Some(d) => validate_domain(&d).map_err(|message| ConfigError::Invalid {
                path: path.to_path_buf(),
                key: "domain",
                message,
            })?,
            None => default_domain().ok_or_else(|| ConfigError::NoDomain {
                path: path.to_path_buf(),
            })?,
        };
        let spool_dir = raw
            .spool_dir
            .unwrap_or_else(|| PathBuf::from(paths::SPOOL_DIR));
        if !spool_dir.is_absolute() {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                key: "spool_dir",
                message: format!("{} is not an absolute path", spool_dir.display()),
            });
        }
        let max_message_size = raw.max_message_size.unwrap_or(DEFAULT_MAX_MESSAGE_SIZE);
        if max_message_size.0 < 1024 {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                key: "max_message_size",
                message: format!("{max_message_size} is too small to hold a message (at least 1K)"),
            });
        }
        Ok(Config {
            path: path.to_path_buf(),
            spool_dir,
            domain,
            max_message_size,
        })
    }
}

fn validate_domain(d: &str) -> Result<String, String> {
    let d = d.trim().trim_end_matches('.').to_ascii_lowercase();
    let ok = !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if ok {
        Ok(d)
    } else {
        Err(format!("{d:?} is not a domain name such as example.com"))
    }
}

/// `/etc/mailname`, then the host's fully qualified name: what Debian's MTAs use.
fn default_domain() -> Option<String> {
    if let Ok(s) = fs::read_to_string(paths::MAILNAME_FILE) {
        if let Some(line) = s
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
        {
            if let Ok(d) = validate_domain(line) {
                return Some(d);
            }
        }
    }
    host_fqdn()
}

fn host_fqdn() -> Option<String> {
    let name = nix::unistd::gethostname().ok()?.into_string().ok()?;
    if name.contains('.') {
        return validate_domain(&name).ok();
    }
    // A bare host name: look for its qualified form in /etc/hosts, as hostname -f would.
    let hosts = fs::read_to_string("/etc/hosts").unwrap_or_default();
    for line in hosts.lines() {
        let line = line.split('#').next().unwrap_or("");
        let names: Vec<&str> = line.split_whitespace().skip(1).collect();
        if names.iter().any(|n| n.eq_ignore_ascii_case(&name)) {
            if let Some(fq) = names.iter().find(|n| n.contains('.')) {
                return validate_domain(fq).ok();
            }
        }
    }
    validate_domain(&name).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(Path::new("/t/relay365.toml"), text)
    }

    #[test]
    fn defaults_apply() {
        let c = load("domain = \"Example.COM.\"").unwrap();
        assert_eq!(c.domain, "example.com");
        assert_eq!(c.spool_dir, PathBuf::from("/var/spool/relay365"));
        assert_eq!(c.max_message_size, ByteSize(35_000_000));
    }

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(ByteSize::parse("35M"), Ok(ByteSize(35_000_000)));
        assert_eq!(ByteSize::parse("64k"), Ok(ByteSize(64_000)));
        assert_eq!(ByteSize::parse("2048"), Ok(ByteSize(2048)));
        assert!(ByteSize::parse("35X").is_err());
        assert!(ByteSize::parse("lots").is_err());
        let c = load("domain = \"a.b\"\nmax_message_size = 2048").unwrap();
        assert_eq!(c.max_message_size, ByteSize(2048));
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let e = load("domain = \"a.b\"\n\nspool_dri = \"/x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/t/relay365.toml"), "{e}");
        assert!(e.contains("line 3"), "{e}");
        assert!(e.contains("spool_dri"), "{e}");
    }

    #[test]
    fn bad_values_are_refused() {
        let e = load("domain = \"not a domain\"").unwrap_err().to_string();
        assert!(e.contains("domain"), "{e}");
        let e = load("domain = \"a.b\"\nspool_dir = \"relative\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("spool_dir") && e.contains("absolute"), "{e}");
        let e = load("domain = \"a.b\"\nmax_message_size = \"1\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_message_size"), "{e}");
        let e = load("domain = \"a.b\"\nmax_message_size = -5")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("negative"), "{e}");
    }
}
