//! Metrics in the Prometheus text format (version 0.0.4): what `relay365 metrics`
//! prints for node_exporter's textfile collector and what the daemon serves on
//! `metrics_listen` (`GET /metrics`, a minimal HTTP/1.0 responder on a std thread).
//!
//! Gauges are read when asked: the queue by state and the age of its oldest message,
//! each account's quota windows, freezes and holds, whether the daemon runs. Counters
//! and histograms come from [`crate::spool::counters`], which every process that
//! delivers feeds through the `count_*` functions here.
//!
//! Trusts the config and the spool as the admin commands do. The HTTP side trusts
//! nothing from the client: one request line read with a size bound and a timeout,
//! anything but `GET /metrics` gets 404, one connection at a time.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::Config;
use crate::daemon::hold::read_hold;
use crate::quota::Ledger;
use crate::spool::counters::{self, BOUNDS};
use crate::spool::listing;
use crate::spool::paths::Spool;

/// Counts a recipient's outcome (`sent`, `deferred`, `bounced`) for an account.
pub fn count_recipient(account: &str, status: &str) {
    counters::add(
        &format!("relay365_recipients_total{{account=\"{account}\",status=\"{status}\"}}"),
        1,
    );
}

/// Counts a freeze (a server quota verdict or a pause) of an account.
pub fn count_freeze(account: &str) {
    counters::add(
        &format!("relay365_account_freezes_total{{account=\"{account}\"}}"),
        1,
    );
}

/// Counts a hold of an account (credentials, permissions, policy).
pub fn count_hold(account: &str) {
    counters::add(
        &format!("relay365_account_holds_total{{account=\"{account}\"}}"),
        1,
    );
}

/// Counts an OAuth2 token request that failed.
pub fn count_token_failure(account: &str) {
    counters::add(
        &format!("relay365_token_failures_total{{account=\"{account}\"}}"),
        1,
    );
}

/// Time from `sendmail` to the queue (the pickup).
pub fn observe_pickup(seconds: f64) {
    counters::observe("relay365_pickup_latency_seconds", seconds);
}

/// Time from `sendmail` to the server's acceptance, per recipient.
pub fn observe_delivery(seconds: f64) {
    counters::observe("relay365_delivery_latency_seconds", seconds);
}

/// Help and type of every metric, in output order.
const FAMILIES: &[(&str, &str, &str)] = &[
    (
        "relay365_daemon_running",
        "gauge",
        "1 when the relay365 daemon holds its lock",
    ),
    (
        "relay365_queue_messages",
        "gauge",
        "Messages waiting, by state (incoming, deferred, active, hold)",
    ),
    (
        "relay365_queue_oldest_message_age_seconds",
        "gauge",
        "Age of the oldest waiting message (0 when none)",
    ),
    (
        "relay365_recipients_total",
        "counter",
        "Recipients by outcome per account: sent, deferred (attempts), bounced",
    ),
    (
        "relay365_quota_used",
        "gauge",
        "What the account used in its quota window (messages, recipients)",
    ),
    (
        "relay365_quota_limit",
        "gauge",
        "The account's quota per window (0: no limit)",
    ),
    (
        "relay365_quota_window_seconds",
        "gauge",
        "The length of the quota window",
    ),
    (
        "relay365_account_frozen",
        "gauge",
        "1 while a server quota verdict freezes the account",
    ),
    (
        "relay365_account_held",
        "gauge",
        "1 while the account is held for its credentials or permissions",
    ),
    (
        "relay365_account_freezes_total",
        "counter",
        "Freezes and pauses of the account",
    ),
    (
        "relay365_account_holds_total",
        "counter",
        "Holds of the account",
    ),
    (
        "relay365_token_failures_total",
        "counter",
        "OAuth2 token requests that failed",
    ),
    (
        "relay365_pickup_latency_seconds",
        "histogram",
        "From sendmail to the queue",
    ),
    (
        "relay365_delivery_latency_seconds",
        "histogram",
        "From sendmail to the server's acceptance, per recipient",
    ),
];

/// The metrics as Prometheus text, read now.
pub fn render(config: &Config, spool: &Spool, now: SystemTime) -> String {
    let mut series: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut put = |name: &'static str, line: String| series.entry(name).or_default().push(line);

    let running = crate::daemon::engine::daemon_running(spool).unwrap_or(false);
    put(
        "relay365_daemon_running",
        format!("relay365_daemon_running {}", u8::from(running)),
    );

    let entries = listing::list(spool);
    let mut by_state: BTreeMap<&str, u64> = ["incoming", "deferred", "active", "hold"]
        .into_iter()
        .map(|s| (s, 0))
        .collect();
    for e in &entries {
        *by_state.entry(e.state.queue_name()).or_default() += 1;
    }
    for (state, n) in by_state {
        put(
            "relay365_queue_messages",
            format!("relay365_queue_messages{{state=\"{state}\"}} {n}"),
        );
    }
    let now_us = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    let oldest = entries
        .iter()
        .map(|e| e.arrival_us)
        .min()
        .map_or(0.0, |a| now_us.saturating_sub(a) as f64 / 1e6);
    put(
        "relay365_queue_oldest_message_age_seconds",
        format!("relay365_queue_oldest_message_age_seconds {oldest:.3}"),
    );

    for a in &config.accounts {
        let name = &a.name;
        let usage = Ledger::open(&spool.ledger(name))
            .ok()
            .and_then(|mut l| l.usage(now, &a.limits).ok());
        let windows = [
            (
                "messages",
                &a.limits.message_rate,
                usage.as_ref().map(|u| u.messages_in_window),
            ),
            (
                "recipients",
                &a.limits.recipient_rate,
                usage.as_ref().map(|u| u.recipients_in_window),
            ),
        ];
        for (window, rate, used) in windows {
            let labels = format!("{{account=\"{name}\",window=\"{window}\"}}");
            if let Some(used) = used {
                put(
                    "relay365_quota_used",
                    format!("relay365_quota_used{labels} {used}"),
                );
            }
            put(
                "relay365_quota_limit",
                format!("relay365_quota_limit{labels} {}", rate.count),
            );
            put(
                "relay365_quota_window_seconds",
                format!(
                    "relay365_quota_window_seconds{labels} {}",
                    rate.window.as_secs()
                ),
            );
        }
        let frozen = usage.as_ref().is_some_and(|u| u.frozen.is_some());
        put(
            "relay365_account_frozen",
            format!(
                "relay365_account_frozen{{account=\"{name}\"}} {}",
                u8::from(frozen)
            ),
        );
        let held = read_hold(spool, name).is_some();
        put(
            "relay365_account_held",
            format!(
                "relay365_account_held{{account=\"{name}\"}} {}",
                u8::from(held)
            ),
        );
    }

    let counts = counters::load(spool);
    for (key, value) in &counts.counters {
        let metric = key.split('{').next().unwrap_or(key);
        if let Some((name, _, _)) = FAMILIES.iter().find(|(n, _, _)| *n == metric) {
            put(name, format!("{key} {value}"));
        }
    }
    for (name, _, kind) in FAMILIES.iter().map(|(n, k, h)| (n, h, k)) {
        if *kind != "histogram" {
            continue;
        }
        let h = counts.histograms.get(*name).cloned().unwrap_or_default();
        let mut lines = Vec::new();
        for (i, bound) in BOUNDS.iter().enumerate() {
            let n = h.buckets.get(i).copied().unwrap_or(0);
            lines.push(format!("{name}_bucket{{le=\"{bound}\"}} {n}"));
        }
        lines.push(format!("{name}_bucket{{le=\"+Inf\"}} {}", h.count));
        lines.push(format!("{name}_sum {}", h.sum));
        lines.push(format!("{name}_count {}", h.count));
        for l in lines {
            put(name, l);
        }
    }

    let mut out = String::new();
    for (name, kind, help) in FAMILIES {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for line in series.get(name).into_iter().flatten() {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// How long a scraper may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest request head read.
const MAX_REQUEST: u64 = 8192;

/// Binds `addr` and serves `GET /metrics` from a thread for the life of the process.
pub fn serve(addr: SocketAddr, config: Arc<Config>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    let spool = Spool::new(&config.spool_dir);
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                answer(stream, &config, &spool);
            }
        })?;
    Ok(bound)
}

fn answer(mut stream: TcpStream, config: &Config, spool: &Spool) {
    let _ = stream.set_read_timeout(Some(REQUEST_TIMEOUT));
    let _ = stream.set_write_timeout(Some(REQUEST_TIMEOUT));
    // SECURITY: the request is bounded in size and time and only its first line is
    // looked at; nothing of it is echoed back.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    let mut limited = (&stream).take(MAX_REQUEST);
    while limited.read(&mut byte).is_ok_and(|n| n == 1) {
        head.push(byte[0]);
        if head.ends_with(b"\r\n\r\n") || head.ends_with(b"\n\n") {
            break;
        }
    }
    let first = head.split(|&b| b == b'\n').next().unwrap_or(&[]);
    let mut words = first.split(|&b| b == b' ');
    let (method, target) = (words.next(), words.next());
    let response = if method == Some(b"GET") && target == Some(b"/metrics") {
        let body = render(config, spool, SystemTime::now());
        format!(
            "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    } else {
        let body = "only GET /metrics is served here\n";
        format!(
            "HTTP/1.0 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let _ = stream.write_all(response.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_has_help_and_type_and_histograms_are_complete() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::from_toml(
            &dir.path().join("relay365.toml"),
            &format!(
                "spool_dir = \"{}\"\ndomain = \"example.com\"\n[[account]]\nname = \"app\"\nmailbox = \"app@contoso.com\"\nauth = \"login\"\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let spool = Spool::new(&config.spool_dir);
        let text = render(&config, &spool, SystemTime::now());
        for (name, kind, _) in FAMILIES {
            assert!(text.contains(&format!("# TYPE {name} {kind}\n")), "{text}");
        }
        assert!(
            text.contains("relay365_queue_messages{state=\"incoming\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("relay365_quota_limit{account=\"app\",window=\"recipients\"} 10000\n"),
            "{text}"
        );
        assert!(
            text.contains("relay365_delivery_latency_seconds_bucket{le=\"+Inf\"} "),
            "{text}"
        );
        assert!(
            text.contains("relay365_account_held{account=\"app\"} 0\n"),
            "{text}"
        );
    }
}
