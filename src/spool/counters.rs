//! Counters and latency histograms for the metrics (`relay365 metrics`, the daemon's
//! `metrics_listen`): recipients sent, deferred and bounced per account, freezes,
//! holds, token failures, pickup and delivery latency.
//!
//! A process counts into memory (one mutex, a few map updates per recipient) and
//! [`save`] merges what it counted into `state/counters.json` under a lock, so that the
//! daemon, a flush and a `relay365 metrics` run by cron all see the same totals and a
//! restart loses at most the last few seconds. Counters only grow, as Prometheus
//! expects; a damaged file restarts them from zero (Prometheus treats that as a reset).
//!
//! Trusts the file only as numbers: it is the daemon's own, in the daemon-only state/,
//! and is parsed as JSON with bounded size.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::durable;
use super::paths::Spool;

/// Histogram bucket bounds in seconds (Prometheus `le`), from a fast pickup to a
/// message that waited out a quota window.
pub const BOUNDS: [f64; 12] = [
    0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 86_400.0,
];

/// The file in state/.
pub const FILE: &str = "counters.json";
/// A counters file is a few KB; anything bigger is not ours.
const MAX_FILE: u64 = 1 << 20;

/// A cumulative histogram: `buckets[i]` counts observations up to `BOUNDS[i]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    pub buckets: Vec<u64>,
    pub count: u64,
    pub sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        self.buckets.resize(BOUNDS.len(), 0);
        for (b, bound) in self.buckets.iter_mut().zip(BOUNDS) {
            if seconds <= bound {
                *b += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }

    fn merge(&mut self, other: &Histogram) {
        self.buckets.resize(BOUNDS.len(), 0);
        for (b, o) in self.buckets.iter_mut().zip(&other.buckets) {
            *b += o;
        }
        self.count += other.count;
        self.sum += other.sum;
    }
}

/// Counters keyed by their Prometheus series (`relay365_recipients_total{account="app",
/// status="sent"}`), histograms by metric name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    pub counters: BTreeMap<String, u64>,
    pub histograms: BTreeMap<String, Histogram>,
}

impl Counts {
    fn merge(&mut self, other: &Counts) {
        for (k, v) in &other.counters {
            *self.counters.entry(k.clone()).or_default() += v;
        }
        for (k, h) in &other.histograms {
            self.histograms.entry(k.clone()).or_default().merge(h);
        }
    }

    fn is_empty(&self) -> bool {
        self.counters.is_empty() && self.histograms.is_empty()
    }
}

/// What this process counted since its last [`save`].
static UNSAVED: Mutex<Counts> = Mutex::new(Counts {
    counters: BTreeMap::new(),
    histograms: BTreeMap::new(),
});

fn unsaved<T>(f: impl FnOnce(&mut Counts) -> T) -> T {
    // A thread that panicked while counting leaves the numbers usable.
    let mut c = UNSAVED.lock().unwrap_or_else(|p| p.into_inner());
    f(&mut c)
}

/// Adds `n` to the counter `series` (a metric name with its labels).
pub fn add(series: &str, n: u64) {
    unsaved(|c| *c.counters.entry(series.to_string()).or_default() += n);
}

/// Adds one observation of `seconds` to the histogram `metric`.
pub fn observe(metric: &str, seconds: f64) {
    unsaved(|c| {
        c.histograms
            .entry(metric.to_string())
            .or_default()
            .observe(seconds)
    });
}

fn read(spool: &Spool) -> Counts {
    let path = spool.state().join(FILE);
    let mut text = String::new();
    let ok = std::fs::File::open(&path)
        .and_then(|f| f.take(MAX_FILE).read_to_string(&mut text))
        .is_ok();
    if !ok {
        return Counts::default();
    }
    serde_json::from_str(&text).unwrap_or_default()
}

/// The totals: the file plus what this process has not saved yet.
pub fn load(spool: &Spool) -> Counts {
    let mut c = read(spool);
    unsaved(|u| c.merge(u));
    c
}

/// Merges what this process counted into the file (under `state/counters.lock`, so
/// that a flush and the daemon do not lose each other's counts).
pub fn save(spool: &Spool) -> io::Result<()> {
    let delta = unsaved(std::mem::take);
    if delta.is_empty() {
        return Ok(());
    }
    let result = (|| {
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(spool.state().join("counters.lock"))?;
        // Held until the closure returns.
        let _held = crate::spool::flock::exclusive(lock)?;
        let mut c = read(spool);
        c.merge(&delta);
        let text = serde_json::to_vec(&c).map_err(io::Error::other)?;
        let path = spool.state().join(FILE);
        durable::replace_unsynced(
            &path,
            &spool.state().join("counters.json.tmp"),
            &text,
            &durable::options(0o600),
        )?;
        Ok(())
    })();
    if result.is_err() {
        // Keep the counts for the next try rather than lose them.
        unsaved(|u| u.merge(&delta));
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_merge_into_the_file_and_histograms_are_cumulative() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path());
        std::fs::create_dir(spool.state()).unwrap();
        let series = "relay365_test_total{account=\"unit\"}";
        add(series, 2);
        observe("relay365_test_seconds", 0.3);
        observe("relay365_test_seconds", 7.0);
        save(&spool).unwrap();
        add(series, 1);
        let c = load(&spool);
        assert_eq!(c.counters[series], 3);
        let h = &c.histograms["relay365_test_seconds"];
        assert_eq!(h.count, 2);
        assert_eq!(h.buckets[0], 0, "0.3 > 0.1");
        assert_eq!(h.buckets[1], 1, "0.3 <= 0.5");
        assert_eq!(h.buckets[5], 2, "both <= 10");
        save(&spool).unwrap();
        assert_eq!(read(&spool).counters[series], 3);
    }
}
