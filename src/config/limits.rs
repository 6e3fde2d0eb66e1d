//! Sending limits of one mailbox as the configuration states them: [`Rate`] (a count per
//! sliding window, written `30/1m`) and [`Limits`] (the two rates, recipients per
//! transaction, connections and the reserve), with Exchange Online's limits as defaults.
//!
//! Trusted input: the world-readable configuration file, written by root. Every value
//! is still checked strictly ([`Limits::validate`]) and refused with its key named,
//! because a wrong limit either wastes the quota or costs a 24-hour block. The quota
//! ledger (`crate::quota`) enforces these limits; it calls `validate` on every
//! operation too.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

/// A sliding-window rate limit: at most `count` per `window`. A `count` of 0 means no
/// limit; it is written `off` (or `unlimited`). Parsed from `COUNT/DURATION` where
/// DURATION is a whole number with the unit `s`, `m`, `h` or `d` (a bare number means
/// seconds): `30/1m`, `10000/24h`, `30/3s`, `5/2d`, `30/60`. `0/1m` is rejected
/// rather than read as "off", because it could as well mean "send nothing".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    /// Sends allowed per window; 0 = no limit.
    pub count: u32,
    /// The sliding window, whole seconds from 1 s to [`Rate::MAX_WINDOW`].
    pub window: Duration,
}

/// Why a rate string was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error(
    "expected COUNT/DURATION such as 30/1m or 10000/24h (units s, m, h, d; `off` for no limit), got {input:?}: {problem}"
)]
pub struct RateError {
    input: String,
    problem: String,
}

impl RateError {
    fn new(input: &str, problem: impl Into<String>) -> Self {
        // The input is echoed into logs and terminals: bound it.
        let input = input.chars().take(64).collect();
        RateError {
            input,
            problem: problem.into(),
        }
    }
}

impl Rate {
    /// No limit.
    pub const UNLIMITED: Rate = Rate {
        count: 0,
        window: Duration::ZERO,
    };
    /// The longest window: the ledger keeps this much history, so it must stay small.
    pub const MAX_WINDOW: Duration = Duration::from_secs(7 * 86_400);

    /// A limited rate, checked like a parsed one.
    pub fn new(count: u32, window: Duration) -> Result<Rate, RateError> {
        let shown = format!("{count}/{}s", window.as_secs());
        if count == 0 {
            return Err(RateError::new(
                &shown,
                "a count of 0 would never send; write `off` for no limit",
            ));
        }
        if window.subsec_nanos() != 0 || window.is_zero() {
            return Err(RateError::new(
                &shown,
                "the duration must be a whole number of seconds, at least 1s",
            ));
        }
        if window > Self::MAX_WINDOW {
            return Err(RateError::new(&shown, "the longest supported window is 7d"));
        }
        Ok(Rate { count, window })
    }

    /// Whether this rate limits anything.
    pub fn is_limited(&self) -> bool {
        self.count > 0
    }

    /// How long one entry counts against this rate: the window, plus 1 ms for an
    /// inclusive boundary, plus a guard of a thousandth of the window against stamp
    /// jitter between us and the server (the quota ledger's window documentation,
    /// `src/quota/window.rs`, explains both).
    pub fn hold(&self) -> Duration {
        Duration::from_millis(self.hold_ms())
    }

    fn window_ms(&self) -> u64 {
        u64::try_from(self.window.as_millis()).unwrap_or(u64::MAX)
    }

    /// [`Rate::hold`] in milliseconds, the unit of the quota ledger's stamps.
    pub(crate) fn hold_ms(&self) -> u64 {
        let w = self.window_ms();
        w.saturating_add(1).saturating_add(w / 1000)
    }

    /// The window as written in a rate (`1m`, `24h`, `2d`, `90s`).
    pub fn window_text(&self) -> String {
        let s = self.window.as_secs();
        if s.is_multiple_of(86_400) && s >= 2 * 86_400 {
            format!("{}d", s / 86_400)
        } else if s.is_multiple_of(3600) && s > 0 {
            format!("{}h", s / 3600)
        } else if s.is_multiple_of(60) && s > 0 {
            format!("{}m", s / 60)
        } else {
            format!("{s}s")
        }
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_limited() {
            write!(f, "{}/{}", self.count, self.window_text())
        } else {
            f.write_str("off")
        }
    }
}

/// Whether `s` is a non-empty run of ASCII digits (no sign, no space): the strict
/// number syntax of rates and of the quota ledger's and freeze file's records.
pub(crate) fn all_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

impl FromStr for Rate {
    type Err = RateError;

    fn from_str(input: &str) -> Result<Rate, RateError> {
        let err = |problem: &str| RateError::new(input, problem);
        let s = input.trim();
        if s.eq_ignore_ascii_case("off") || s.eq_ignore_ascii_case("unlimited") {
            return Ok(Rate::UNLIMITED);
        }
        let Some((count, window)) = s.split_once('/') else {
            return Err(err("no `/` between the count and the duration"));
        };
        if !all_digits(count) {
            return Err(err("the count must be a whole number such as 30"));
        }
        let count: u32 = count
            .parse()
            .map_err(|_| err("the count is too large (at most 4294967295)"))?;
        if count == 0 {
            return Err(err(
                "a count of 0 would never send; write `off` for no limit",
            ));
        }
        let split = window
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(window.len());
        let (number, unit) = window.split_at(split);
        if !all_digits(number) {
            return Err(err("the duration must start with a whole number, as in 1m"));
        }
        let unit_secs: u64 = match unit {
            "" | "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            _ => return Err(err("the duration's unit must be s, m, h or d")),
        };
        let secs = number
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(unit_secs))
            .ok_or_else(|| err("the longest supported window is 7d"))?;
        if secs == 0 {
            return Err(err("the duration must be at least 1s"));
        }
        if secs > Rate::MAX_WINDOW.as_secs() {
            return Err(err("the longest supported window is 7d"));
        }
        Ok(Rate {
            count,
            window: Duration::from_secs(secs),
        })
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Parses a rate string; `field` names the configuration key in errors.
struct RateVisitor {
    field: Option<&'static str>,
}

impl Visitor<'_> for RateVisitor {
    type Value = Rate;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(field) = self.field {
            write!(f, "{field}: ")?;
        }
        f.write_str("a string COUNT/DURATION such as \"30/1m\", or \"off\"")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Rate, E> {
        v.parse::<Rate>().map_err(|e| match self.field {
            Some(field) => E::custom(format!("{field}: {e}")),
            None => E::custom(e),
        })
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Rate, D::Error> {
        d.deserialize_str(RateVisitor { field: None })
    }
}

fn de_message_rate<'de, D: Deserializer<'de>>(d: D) -> Result<Rate, D::Error> {
    d.deserialize_str(RateVisitor {
        field: Some("message_rate"),
    })
}

fn de_recipient_rate<'de, D: Deserializer<'de>>(d: D) -> Result<Rate, D::Error> {
    d.deserialize_str(RateVisitor {
        field: Some("recipient_rate"),
    })
}

// ---------------------------------------------------------------------------------------
// Limits

/// One mailbox's limits. Every field has a default (Exchange Online's), so a
/// configuration names only what differs. Deliberately without `deny_unknown_fields`:
/// serde can't combine it with `#[serde(flatten)]`, and the account table that embeds
/// these keys must be the one to reject unknown keys (see [`Limits::FIELDS`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    /// Transactions per window (Exchange Online: 30/1m).
    #[serde(deserialize_with = "de_message_rate")]
    pub message_rate: Rate,
    /// Recipients per window, every RCPT counted (Exchange Online: 10000/24h).
    #[serde(deserialize_with = "de_recipient_rate")]
    pub recipient_rate: Rate,
    /// Recipients per transaction (Exchange Online: 500, tenant-configurable 1–1000).
    pub max_recipients: u32,
    /// Concurrent connections the scheduler may open (Exchange Online allows 3).
    pub connections: u32,
    /// Recipients per recipient window left unused for other senders of the mailbox.
    pub reserve: u32,
}

/// Microsoft Graph's concurrent requests per app and mailbox.
pub const GRAPH_CONCURRENT: u32 = 4;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            message_rate: Rate {
                count: 30,
                window: Duration::from_secs(60),
            },
            recipient_rate: Rate {
                count: 10_000,
                window: Duration::from_secs(86_400),
            },
            max_recipients: 500,
            connections: 1,
            reserve: 0,
        }
    }
}

/// A limits combination that can't work, named by its configuration key.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LimitsError {
    #[error("{field}: {source}")]
    Rate {
        field: &'static str,
        #[source]
        source: RateError,
    },
    #[error(
        "max_recipients = {0}: must be 1 to {max} (Exchange Online allows 500, up to 1000 if the tenant raised it)",
        max = Limits::MAX_RECIPIENTS
    )]
    MaxRecipients(u32),
    #[error(
        "connections = {0}: must be 1 to {max} (Exchange Online allows 3 per mailbox)",
        max = Limits::MAX_CONNECTIONS
    )]
    Connections(u32),
    #[error(
        "reserve = {reserve} leaves no room in recipient_rate = {rate}; make reserve smaller than the count"
    )]
    ReserveTooBig { reserve: u32, rate: Rate },
    #[error(
        "reserve = {0} has no effect with recipient_rate = off; remove reserve or set a recipient_rate"
    )]
    ReserveWithoutRate(u32),
}

impl Limits {
    /// The keys these limits occupy in an account table.
    pub const FIELDS: &'static [&'static str] = &[
        "message_rate",
        "recipient_rate",
        "max_recipients",
        "connections",
        "reserve",
    ];
    /// The largest `max_recipients` accepted (Exchange Online's tenant maximum).
    pub const MAX_RECIPIENTS: u32 = 1000;
    /// The largest `connections` accepted.
    pub const MAX_CONNECTIONS: u32 = 16;

    /// Checks the combination; the ledger calls this on every operation too.
    pub fn validate(&self) -> Result<(), LimitsError> {
        for (field, rate) in [
            ("message_rate", self.message_rate),
            ("recipient_rate", self.recipient_rate),
        ] {
            if rate.is_limited() {
                Rate::new(rate.count, rate.window)
                    .map_err(|source| LimitsError::Rate { field, source })?;
            }
        }
        if !(1..=Self::MAX_RECIPIENTS).contains(&self.max_recipients) {
            return Err(LimitsError::MaxRecipients(self.max_recipients));
        }
        if !(1..=Self::MAX_CONNECTIONS).contains(&self.connections) {
            return Err(LimitsError::Connections(self.connections));
        }
        if self.recipient_rate.is_limited() {
            if self.reserve >= self.recipient_rate.count {
                return Err(LimitsError::ReserveTooBig {
                    reserve: self.reserve,
                    rate: self.recipient_rate,
                });
            }
        } else if self.reserve > 0 {
            return Err(LimitsError::ReserveWithoutRate(self.reserve));
        }
        Ok(())
    }

    /// Graph's own limits per app and mailbox (Microsoft Graph throttling limits,
    /// Outlook service): 4 concurrent requests and 10,000 requests per 10 minutes. The
    /// scheduler opens at most `connections` requests at once and the ledger stamps one
    /// request per message, so limits within these never meet Graph's 429.
    pub fn graph_problem(&self) -> Option<String> {
        if self.connections > GRAPH_CONCURRENT {
            return Some(format!(
                "connections = {}: Microsoft Graph allows {GRAPH_CONCURRENT} concurrent requests per mailbox",
                self.connections
            ));
        }
        let r = self.message_rate;
        // count / window <= 10,000 / 600 s, in integers.
        if !r.is_limited()
            || u128::from(r.count) * 600 > 10_000 * u128::from(r.window.as_secs().max(1))
        {
            return Some(
                "message_rate must stay within Microsoft Graph's 10,000 requests per 10 minutes per mailbox (e.g. 30/1m, the default)".to_owned(),
            );
        }
        None
    }

    /// Recipients per recipient window this account may use.
    pub(crate) fn capacity(&self) -> u64 {
        u64::from(self.recipient_rate.count.saturating_sub(self.reserve))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::BTreeMap;

    pub(crate) fn rate(s: &str) -> Rate {
        s.parse().unwrap()
    }

    /// Combinations [`Limits::validate`] refuses, each with the start of its message.
    /// The quota ledger's tests check that every operation refuses them too.
    pub(crate) fn invalid_limits() -> Vec<(Limits, &'static str)> {
        vec![
            (
                Limits {
                    max_recipients: 0,
                    ..Limits::default()
                },
                "max_recipients = 0",
            ),
            (
                Limits {
                    max_recipients: 1001,
                    ..Limits::default()
                },
                "max_recipients = 1001",
            ),
            (
                Limits {
                    connections: 0,
                    ..Limits::default()
                },
                "connections = 0",
            ),
            (
                Limits {
                    reserve: 10_000,
                    ..Limits::default()
                },
                "reserve = 10000",
            ),
            (
                Limits {
                    reserve: 5,
                    recipient_rate: Rate::UNLIMITED,
                    ..Limits::default()
                },
                "reserve = 5",
            ),
            (
                Limits {
                    message_rate: Rate {
                        count: 5,
                        window: Duration::ZERO,
                    },
                    ..Limits::default()
                },
                "message_rate:",
            ),
        ]
    }

    // -- Rate ---------------------------------------------------------------------------

    #[test]
    fn rate_parses_good_strings() {
        let cases = [
            ("30/1m", 30, 60),
            ("10000/24h", 10_000, 86_400),
            ("30/3s", 30, 3),
            ("5/2d", 5, 172_800),
            ("30/60", 30, 60),
            (" 500/10m ", 500, 600),
            ("1/7d", 1, 604_800),
        ];
        for (s, count, secs) in cases {
            let r = rate(s);
            assert_eq!(
                (r.count, r.window),
                (count, Duration::from_secs(secs)),
                "{s}"
            );
        }
        for s in ["off", "unlimited", "OFF", " Unlimited"] {
            assert_eq!(rate(s), Rate::UNLIMITED, "{s}");
            assert!(!rate(s).is_limited());
        }
    }

    #[test]
    fn rate_display_round_trips() {
        for (s, shown) in [
            ("30/1m", "30/1m"),
            ("10000/24h", "10000/24h"),
            ("1/1d", "1/24h"),
            ("5/2d", "5/2d"),
            ("30/3s", "30/3s"),
            ("30/60", "30/1m"),
            ("7/90s", "7/90s"),
            ("7/120m", "7/2h"),
            ("off", "off"),
            ("unlimited", "off"),
        ] {
            let r = rate(s);
            assert_eq!(r.to_string(), shown);
            assert_eq!(rate(&r.to_string()), r);
        }
    }

    #[test]
    fn rate_rejects_bad_strings() {
        for s in [
            "",
            "30",
            "30/",
            "/1m",
            "0/1m",
            "-1/1m",
            "+1/1m",
            "30/0s",
            "30/1w",
            "30/1.5m",
            "30/8d",
            "30/-1m",
            "30/m",
            "99999999999/1m",
            "30/1m/2",
            "30 /1m",
            "30/1 m",
            "3O/1m",
            "30/99999999999999999999d",
        ] {
            let e = s.parse::<Rate>().unwrap_err().to_string();
            assert!(
                e.starts_with("expected COUNT/DURATION such as 30/1m"),
                "{s:?}: {e}"
            );
        }
        let e = "0/1m".parse::<Rate>().unwrap_err().to_string();
        assert!(e.contains("`off` for no limit"), "{e}");
        let e = "30/8d".parse::<Rate>().unwrap_err().to_string();
        assert!(e.contains("7d"), "{e}");
        assert!(Rate::new(5, Duration::from_millis(1500)).is_err());
        assert!(Rate::new(0, Duration::from_secs(60)).is_err());
        assert_eq!(Rate::new(5, Duration::from_secs(60)).unwrap(), rate("5/1m"));
    }

    #[test]
    fn hold_is_window_plus_guard() {
        assert_eq!(rate("30/1m").hold(), Duration::from_millis(60_061));
        assert_eq!(rate("10000/24h").hold(), Duration::from_millis(86_486_401));
        assert_eq!(rate("30/3s").hold(), Duration::from_millis(3_004));
    }

    // -- Limits -------------------------------------------------------------------------

    #[test]
    fn limits_default_is_exchange_online() {
        let l = Limits::default();
        assert_eq!(l.message_rate, rate("30/1m"));
        assert_eq!(l.recipient_rate, rate("10000/24h"));
        assert_eq!((l.max_recipients, l.connections, l.reserve), (500, 1, 0));
        l.validate().unwrap();
        let empty: Limits = toml::from_str("").unwrap();
        assert_eq!(empty, l);
    }

    #[test]
    fn limits_deserialize_with_defaults_and_named_errors() {
        let l: Limits = toml::from_str("message_rate = \"20/1m\"\nreserve = 100\n").unwrap();
        assert_eq!(l.message_rate, rate("20/1m"));
        assert_eq!(l.reserve, 100);
        assert_eq!(l.recipient_rate, rate("10000/24h"));
        let off: Limits = toml::from_str("recipient_rate = \"off\"").unwrap();
        assert!(!off.recipient_rate.is_limited());

        let e = toml::from_str::<Limits>("message_rate = \"30x\"")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("message_rate: expected COUNT/DURATION such as 30/1m"),
            "{e}"
        );
        let e = toml::from_str::<Limits>("recipient_rate = 10000")
            .unwrap_err()
            .to_string();
        assert!(e.contains("recipient_rate"), "{e}");

        let text = toml::to_string(&Limits::default()).unwrap();
        assert!(text.contains("message_rate = \"30/1m\""), "{text}");
        assert_eq!(toml::from_str::<Limits>(&text).unwrap(), Limits::default());
    }

    /// The integrator's recipe: flatten the limits into the account table and catch
    /// unknown keys with a trailing flattened map.
    #[test]
    fn limits_flatten_into_an_account_table() {
        #[derive(Deserialize)]
        struct Account {
            name: String,
            #[serde(flatten)]
            limits: Limits,
            #[serde(flatten)]
            unknown: BTreeMap<String, toml::Value>,
        }
        #[derive(Deserialize)]
        struct Config {
            account: Vec<Account>,
        }
        let c: Config = toml::from_str(
            "[[account]]\nname = \"a\"\nrecipient_rate = \"5000/24h\"\nmax_recipients = 100\nbogus = 1\n",
        )
        .unwrap();
        let a = &c.account[0];
        assert_eq!(a.name, "a");
        assert_eq!(a.limits.recipient_rate, rate("5000/24h"));
        assert_eq!(a.limits.max_recipients, 100);
        assert_eq!(a.limits.message_rate, rate("30/1m"));
        assert_eq!(a.unknown.keys().collect::<Vec<_>>(), ["bogus"]);
        for key in Limits::FIELDS {
            assert!(!a.unknown.contains_key(*key));
        }
        let e = toml::from_str::<Config>("[[account]]\nname = \"a\"\nmessage_rate = \"x\"\n")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("message_rate: expected COUNT/DURATION"), "{e}");
    }

    #[test]
    fn limits_validation_names_the_key() {
        for (l, text) in invalid_limits() {
            let e = l.validate().unwrap_err().to_string();
            assert!(e.starts_with(text), "{e}");
        }
    }
}
