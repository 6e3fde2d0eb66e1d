//! The administrator's second day (issue 17): a cron-safe `relay365 flush` (silent when
//! all went well, an exit status that says whether mail is left), log lines that
//! Debian's pflogsumm counts as the server saw them, `--json` listings, metrics a
//! real Prometheus parser reads, and `relay365 health` for Nagios-style monitors.

use std::time::Duration;

use crate::harness::*;
use emu::{Action as FaultAction, Fault, Stage};

/// Whether a Debian tool is installed; outside CI a missing one skips the test, in
/// CI it fails it (`.ci/run` installs them).
pub fn have_tool(cmd: &str, package: &str) -> bool {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{cmd} is missing: apt-get install {package} (CI must run this test)"
        );
        eprintln!("skipped: {cmd} is missing (apt-get install {package})");
    }
    found
}

/// Prepends top-level `lines` to the tenant's config (its tables come last).
pub fn add_top_level(t: &Tenant, lines: &str) {
    let old = std::fs::read_to_string(&t.spool.config).expect("config");
    std::fs::write(&t.spool.config, format!("{lines}\n{old}")).expect("config");
}

#[test]
fn a_flush_that_went_normally_prints_nothing_and_exits_0() {
    let t = Tenant::new(Auth::Login);
    assert_ok(
        &t.spool
            .sendmail(&["-i", "x@example.org"], b"Subject: cron\n\nok\n"),
    );
    let out = t.spool.relay365(&["flush"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), "", "cron would mail any output");
    assert_eq!(stderr(&out), "", "cron would mail any output");
    assert_eq!(t.emu.message_count(), 1);
    // -v: the summary and the log.
    assert_ok(
        &t.spool
            .sendmail(&["-i", "y@example.org"], b"Subject: v\n\nok\n"),
    );
    let out = t.spool.relay365(&["flush", "-v"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        stdout(&out).contains("1 message(s) finished, 0 deferred, 0 left"),
        "{}",
        stdout(&out)
    );
    assert!(stderr(&out).contains("status=sent"), "{}", stderr(&out));
}

#[test]
fn a_flush_that_leaves_mail_exits_75_and_stays_quiet() {
    let t = Tenant::new(Auth::Login);
    assert_ok(
        &t.spool
            .sendmail(&["-i", "x@example.org"], b"Subject: later\n\nx\n"),
    );
    t.emu
        .inject(Fault::reply(Stage::AfterDot, "451 4.7.0 Temporary server error").times(1));
    let out = t.spool.relay365(&["flush"]);
    assert_eq!(
        out.status.code(),
        Some(75),
        "EX_TEMPFAIL: mail is left; stderr: {}",
        stderr(&out)
    );
    assert_eq!(stdout(&out), "");
    assert_eq!(stderr(&out), "", "a deferral is normal: nothing to act on");
    assert_eq!(t.queued().len(), 1);
    let out = t.spool.relay365(&["flush"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(t.queued().is_empty());
}

#[test]
fn a_flush_prints_a_problem_the_administrator_must_fix_once() {
    // The server refuses the credentials: the account is held, which needs the
    // administrator; it is said once, not on every later flush.
    let t = Tenant::new(Auth::Login);
    assert_ok(
        &t.spool
            .sendmail(&["-i", "x@example.org"], b"Subject: held\n\nx\n"),
    );
    t.emu
        .inject(Fault::reply(Stage::Auth, "535 5.7.3 Authentication unsuccessful").forever());
    let out = t.spool.relay365(&["flush"]);
    assert_eq!(
        out.status.code(),
        Some(75),
        "{} / {}",
        stderr(&out),
        stdout(&t.spool.relay365(&["queue", "list"]))
    );
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains("account app"), "{err}");
    let out = t.spool.relay365(&["flush"]);
    assert_eq!(out.status.code(), Some(75));
    assert_eq!(stderr(&out), "", "said once already");
}

/// pflogsumm's Grand Totals: (delivered, deferrals, bounced).
fn pflogsumm_totals(log: &std::path::Path) -> (u64, u64, u64) {
    let out = std::process::Command::new("pflogsumm")
        .args(["--syslog-name=relay365", "--problems-first"])
        .arg(log)
        .output()
        .expect("run pflogsumm");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let total = |word: &str| -> u64 {
        text.lines()
            .find_map(|l| {
                let mut it = l.split_whitespace();
                let n = it.next()?;
                (it.next() == Some(word)).then(|| n.parse::<u64>().ok())?
            })
            .unwrap_or_else(|| panic!("no {word} total in {text}"))
    };
    let deferrals = text
        .lines()
        .find(|l| l.contains(" deferred ") && l.contains("deferrals"))
        .and_then(|l| l.split('(').nth(1))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no deferrals in {text}"));
    (total("delivered"), deferrals, total("bounced"))
}

#[test]
fn pflogsumm_counts_what_the_emulator_saw() {
    if !have_tool("pflogsumm", "pflogsumm") {
        return;
    }
    let t = Tenant::new(Auth::Login);
    let log = t.spool.dir.path().join("mail.log");
    add_top_level(&t, &format!("log_file = \"{}\"", log.display()));
    assert_ok(&t.spool.sendmail(
        &[
            "-i",
            "-f",
            "shop@contoso.com",
            "a@example.org",
            "b@example.org",
        ],
        b"Subject: two\n\nx\n",
    ));
    assert_ok(&t.spool.sendmail(
        &["-i", "-f", "shop@contoso.com", "bad@example.org"],
        b"Subject: bounce\n\nx\n",
    ));
    assert_ok(&t.spool.sendmail(
        &["-i", "-f", "shop@contoso.com", "later@example.org"],
        b"Subject: later\n\nx\n",
    ));
    t.emu.inject(
        Fault::new(
            Stage::Rcpt(Some("bad@example.org".into())),
            FaultAction::Reply("550 5.1.10 RESOLVER.ADR.RecipientNotFound".into()),
        )
        .times(1),
    );
    t.emu.inject(
        Fault::new(
            Stage::Rcpt(Some("later@example.org".into())),
            FaultAction::Reply("451 4.7.500 Server busy, please try again later".into()),
        )
        .times(1),
    );
    let first = t.flush();
    assert_eq!(first.status.code(), Some(75), "{}", stderr(&first));
    assert_ok(&t.flush());
    assert!(t.queued().is_empty());
    let text = std::fs::read_to_string(&log).expect("log_file written");
    assert!(text.contains(", dsn=2.0.0, status=sent"), "{text}");
    assert!(text.contains(", dsn=4.7.500, status=deferred"), "{text}");
    assert!(text.contains(", dsn=5.1.10, status=bounced"), "{text}");
    let delivered: usize = t.emu.messages().iter().map(|m| m.rcpts.len()).sum();
    let (d, deferrals, bounced) = pflogsumm_totals(&log);
    assert_eq!(
        (d, deferrals, bounced),
        (
            delivered as u64,
            t.emu.reply_count(451),
            t.emu.reply_count(550)
        ),
        "pflogsumm against the emulator; log:\n{text}"
    );
    // a, b, later and the bounce to shop@contoso.com.
    assert_eq!(delivered, 4);
    let _ = Duration::ZERO;
}

fn json_lines(out: &std::process::Output) -> Vec<serde_json::Value> {
    assert_ok(out);
    stdout(out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn queue_list_and_quota_speak_json() {
    let t = Tenant::with(tenant_config(), Auth::Login, "recipient_rate = \"100/24h\"");
    assert_ok(&t.spool.sendmail(
        &[
            "-i",
            "-f",
            "shop@contoso.com",
            "x@example.org",
            "y@example.org",
        ],
        b"Subject: later\n\nx\n",
    ));
    t.emu
        .inject(Fault::reply(Stage::AfterDot, "451 4.7.0 Temporary server error").times(1));
    assert_left(&t.flush());
    assert_ok(
        &t.spool
            .sendmail(&["-i", "z@example.org"], b"Subject: new\n\nx\n"),
    );
    let all = json_lines(&t.spool.relay365(&["queue", "list", "--json"]));
    assert_eq!(all.len(), 2, "{all:?}");
    let deferred = &all[0];
    assert_eq!(deferred["queue_name"], "deferred");
    assert_eq!(deferred["queue_id"], t.queued()[0].id.to_string().as_str());
    assert_eq!(deferred["sender"], "shop@contoso.com");
    assert!(deferred["arrival_time"].as_u64().unwrap() > 1_700_000_000);
    assert!(deferred["message_size"].as_u64().unwrap() > 0);
    assert!(
        deferred["next_attempt"].as_u64().unwrap() > deferred["arrival_time"].as_u64().unwrap()
    );
    let rcpts = deferred["recipients"].as_array().unwrap();
    assert_eq!(rcpts.len(), 2);
    assert_eq!(rcpts[0]["address"], "x@example.org");
    assert_eq!(rcpts[0]["state"], "deferred");
    assert!(
        rcpts[0]["delay_reason"].as_str().unwrap().contains("4.7.0"),
        "{rcpts:?}"
    );
    let incoming = &all[1];
    assert_eq!(incoming["queue_name"], "incoming");
    assert_eq!(incoming["recipients"][0]["address"], "z@example.org");
    assert!(incoming["next_attempt"].is_null());

    let quota = json_lines(&t.spool.relay365(&["quota", "--json"]));
    assert_eq!(quota.len(), 1);
    let q = &quota[0];
    assert_eq!(q["account"], "app");
    assert_eq!(q["mailbox"], MAILBOX);
    assert_eq!(q["recipients"]["limit"], 100);
    assert_eq!(q["recipients"]["window_seconds"], 86_400);
    assert_eq!(q["recipients"]["used"], 2, "{q}");
    assert_eq!(q["messages"]["limit"], 30);
    assert!(q["frozen"].is_null() && q["held"].is_null(), "{q}");
}

/// Parses Prometheus text with python3-prometheus-client's own parser: every sample
/// as `name{label="v",...}` (labels sorted) to its value.
fn prometheus_samples(text: &str) -> std::collections::BTreeMap<String, f64> {
    const SCRIPT: &str = r#"
import sys, json
from prometheus_client.parser import text_string_to_metric_families
out = {}
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        labels = ",".join('%s="%s"' % (k, v) for k, v in sorted(s.labels.items()))
        out[s.name + ("{" + labels + "}" if labels else "")] = s.value
print(json.dumps(out))
"#;
    let mut cmd = std::process::Command::new(DEBIAN_PYTHON);
    cmd.args(["-c", SCRIPT]);
    let out = run(cmd, text.as_bytes());
    assert!(
        out.status.success(),
        "the Prometheus parser refused the text: {}\n{text}",
        stderr(&out)
    );
    serde_json::from_str(&stdout(&out)).expect("parser output")
}

/// Debian's interpreter, which python3-prometheus-client installs into: the `python3`
/// first on PATH may be another one (pyenv on the CI machine) without the module.
const DEBIAN_PYTHON: &str = "/usr/bin/python3";

fn have_prometheus_parser() -> bool {
    let ok = std::process::Command::new(DEBIAN_PYTHON)
        .args(["-c", "import prometheus_client.parser"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "python3-prometheus-client is missing (CI must run this test)"
        );
        eprintln!("skipped: apt-get install python3-prometheus-client");
    }
    ok
}

fn scrape(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to metrics_listen");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .expect("request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("response");
    text
}

#[test]
fn metrics_are_served_and_printed_in_a_format_prometheus_parses() {
    if !have_prometheus_parser() {
        return;
    }
    let t = Tenant::new(Auth::Login);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let addr = format!("127.0.0.1:{port}");
    add_top_level(&t, &format!("metrics_listen = \"{addr}\""));
    t.emu.inject(
        Fault::new(
            Stage::Rcpt(Some("bad@example.org".into())),
            FaultAction::Reply("550 5.1.10 RESOLVER.ADR.RecipientNotFound".into()),
        )
        .times(1),
    );
    let d = Daemon::start(&t.spool);
    assert!(
        d.wait_log("metrics served on", Duration::from_secs(5)),
        "{}",
        d.log_text()
    );
    assert_ok(&t.spool.sendmail(
        &[
            "-i",
            "-f",
            "shop@contoso.com",
            "good@example.org",
            "bad@example.org",
        ],
        b"Subject: m\n\nx\n",
    ));
    // The message and the bounce to shop@contoso.com.
    assert!(
        t.emu.wait_for_messages(2, Duration::from_secs(10)),
        "{}",
        d.log_text()
    );
    assert!(eventually(Duration::from_secs(5), || t.queued().is_empty()));

    let response = scrape(&addr, "/metrics");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    let m = prometheus_samples(body);
    let get = |k: &str| *m.get(k).unwrap_or_else(|| panic!("no {k} in {body}"));
    assert_eq!(get("relay365_daemon_running"), 1.0);
    assert_eq!(
        get(r#"relay365_recipients_total{account="app",status="sent"}"#),
        2.0
    );
    assert_eq!(
        get(r#"relay365_recipients_total{account="app",status="bounced"}"#),
        1.0
    );
    assert_eq!(get(r#"relay365_queue_messages{state="deferred"}"#), 0.0);
    assert_eq!(get("relay365_queue_oldest_message_age_seconds"), 0.0);
    assert_eq!(
        get(r#"relay365_quota_limit{account="app",window="recipients"}"#),
        10_000.0
    );
    // Counted before sending, as the ledger does: both recipients of the message
    // (the refused one too) and the bounce's one.
    assert_eq!(
        get(r#"relay365_quota_used{account="app",window="recipients"}"#),
        3.0
    );
    assert_eq!(get(r#"relay365_account_held{account="app"}"#), 0.0);
    assert_eq!(get("relay365_delivery_latency_seconds_count"), 2.0);
    assert_eq!(
        get(r#"relay365_delivery_latency_seconds_bucket{le="+Inf"}"#),
        2.0
    );
    // Only what came through incoming/: the bounce is queued by the daemon itself.
    assert_eq!(
        get("relay365_pickup_latency_seconds_count"),
        1.0,
        "the message, picked up once"
    );
    assert!(scrape(&addr, "/other").starts_with("HTTP/1.0 404"));
    // Under the journal (JOURNAL_STREAM names its stderr, as the harness sets it up
    // like systemd) each line is written there once, with its syslog priority.
    let log = d.log_text();
    assert!(log.lines().all(|l| l.starts_with('<')), "{log}");
    assert!(log.contains("<6>daemon started"), "{log}");
    assert!(log.contains(", dsn=5.1.10, status=bounced"), "{log}");

    // Stopped, the counters stay for `relay365 metrics` run by cron.
    assert!(d.stop().success());
    let out = t.spool.relay365(&["metrics"]);
    assert_ok(&out);
    let m = prometheus_samples(&stdout(&out));
    assert_eq!(m["relay365_daemon_running"], 0.0);
    assert_eq!(
        m[r#"relay365_recipients_total{account="app",status="sent"}"#],
        2.0
    );
    assert_eq!(
        m[r#"relay365_recipients_total{account="app",status="bounced"}"#],
        1.0
    );
}

fn health(t: &Tenant, args: &[&str]) -> (i32, String) {
    let mut all = vec!["health"];
    all.extend_from_slice(args);
    let out = t.spool.relay365(&all);
    let line = stdout(&out);
    assert_eq!(line.lines().count(), 1, "one line: {line}{}", stderr(&out));
    let (_, perf) = line.split_once(" | ").expect("perfdata after |");
    assert!(
        perf.contains("oldest_age=") && perf.contains("queued="),
        "{perf}"
    );
    (out.status.code().unwrap_or(-1), line.trim_end().to_string())
}

fn date_in(days: i64) -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "-d", &format!("{days} days"), "+%F"])
        .output()
        .expect("date");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn health_reports_each_state_for_a_monitoring_plugin() {
    let t = Tenant::new(Auth::Login);
    // No daemon: CRITICAL, unless the host runs none.
    let (code, line) = health(&t, &[]);
    assert_eq!(code, 2, "{line}");
    assert!(
        line.starts_with("RELAY365 CRITICAL - daemon not running"),
        "{line}"
    );
    let (code, line) = health(&t, &["--no-daemon"]);
    assert_eq!(code, 0, "{line}");
    assert!(
        line.starts_with("RELAY365 OK - 0 message(s) queued"),
        "{line}"
    );
    {
        let d = Daemon::start(&t.spool);
        let (code, line) = health(&t, &[]);
        assert_eq!(code, 0, "{line}");
        assert!(
            line.contains("daemon running") && line.contains("daemon=1"),
            "{line}"
        );
        drop(d);
    }
    // The oldest message's age against --warn and --crit.
    assert_ok(
        &t.spool
            .sendmail(&["-i", "x@example.org"], b"Subject: w\n\nx\n"),
    );
    std::thread::sleep(Duration::from_millis(1100));
    let (code, line) = health(&t, &["--no-daemon", "--warn", "1s", "--crit", "1h"]);
    assert_eq!(code, 1, "{line}");
    assert!(
        line.starts_with("RELAY365 WARNING - oldest message waits"),
        "{line}"
    );
    assert!(
        line.contains(";1;3600;0"),
        "thresholds in the perfdata: {line}"
    );
    let (code, line) = health(&t, &["--no-daemon", "--warn", "1s", "--crit", "1s"]);
    assert_eq!(code, 2, "{line}");
    // A held account needs the administrator: CRITICAL, with the reason.
    t.emu
        .inject(Fault::reply(Stage::Auth, "535 5.7.3 Authentication unsuccessful").forever());
    assert_left(&t.spool.relay365(&["flush"]));
    let (code, line) = health(&t, &["--no-daemon"]);
    assert_eq!(code, 2, "{line}");
    assert!(line.contains("account app held: "), "{line}");
    assert!(line.contains("held=1;;1;0"), "{line}");

    // Credential expiry: WARNING within --expiry-warn, CRITICAL within --expiry-crit.
    let t = Tenant::with(
        tenant_config(),
        Auth::Login,
        &format!("credential_expires = \"{}\"", date_in(12)),
    );
    let (code, line) = health(&t, &["--no-daemon"]);
    assert_eq!(code, 1, "{line}");
    assert!(
        line.contains("credential expires in 11 days")
            || line.contains("credential expires in 12 days"),
        "{line}"
    );
    assert!(line.contains("credential_days="), "{line}");
    let (code, line) = health(&t, &["--no-daemon", "--expiry-crit", "20d"]);
    assert_eq!(code, 2, "{line}");

    // A config that cannot be read: UNKNOWN.
    std::fs::write(&t.spool.config, "this is not toml").expect("write");
    let out = t.spool.relay365(&["health"]);
    assert_eq!(out.status.code(), Some(3), "{}", stdout(&out));
    assert!(
        stdout(&out).starts_with("RELAY365 UNKNOWN - "),
        "{}",
        stdout(&out)
    );
}
