//! `relay365-emulator`: runs the Exchange Online emulator as a process for demos, benchmarks and
//! the chroot install test, writing its ports, CA and every accepted message under `--dir`.
//!
//! Trusts its command line (the operator's); listens on 127.0.0.1 only. Runs until killed.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use clap::{Parser, ValueEnum};
use relay365_emulator::{App, CertKind, Config, Emulator, Mailbox, OverRate, Received, TlsMode};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum TlsArg {
    Starttls,
    Implicit,
    None,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum CertArg {
    Valid,
    WrongName,
    Expired,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum OverRateArg {
    Reject,
    Throttle,
}

/// Exchange Online SMTP submission + Entra ID token endpoint emulator on 127.0.0.1.
#[derive(Debug, Parser)]
#[command(name = "relay365-emulator", version)]
struct Args {
    /// Write ca.pem, smtp.port, token.port and messages/NNNNNN.{eml,json} here.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// SMTP port (0 = any free port).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Token endpoint port (0 = any free port).
    #[arg(long, default_value_t = 0)]
    token_port: u16,
    #[arg(long, value_enum, default_value = "starttls")]
    tls: TlsArg,
    /// Which leaf certificate the SMTP listener presents.
    #[arg(long, value_enum, default_value = "valid")]
    cert: CertArg,
    /// Frontend name in greeting, EHLO and reply tails.
    #[arg(long)]
    hostname: Option<String>,
    /// ADDRESS[:PASSWORD]; without a password only XOAUTH2 works. Repeatable.
    #[arg(long = "mailbox", value_name = "ADDR:PASSWORD")]
    mailboxes: Vec<String>,
    /// MAILBOX:ADDRESS — let MAILBOX send as ADDRESS. Repeatable.
    #[arg(long = "send-as", value_name = "MAILBOX:ADDR")]
    send_as: Vec<String>,
    /// TENANT:CLIENT_ID:SECRET:MAILBOX — an app registration with a client secret. Repeatable.
    #[arg(long = "app", value_name = "TENANT:CLIENT_ID:SECRET:MAILBOX")]
    apps: Vec<String>,
    /// TENANT:CLIENT_ID:CERT_PEM_FILE:MAILBOX — an app registration with a certificate. Repeatable.
    #[arg(long = "app-cert", value_name = "TENANT:CLIENT_ID:CERT_FILE:MAILBOX")]
    app_certs: Vec<String>,
    /// Plaintext, no AUTH, no limits, no SendAs check, no token endpoint (benchmarks).
    #[arg(long)]
    sink: bool,
    /// Accept MAIL without AUTH.
    #[arg(long)]
    no_auth: bool,
    /// Answer AUTH LOGIN with 535 5.7.139 (basic auth disabled for the tenant).
    #[arg(long)]
    basic_auth_disabled: bool,
    #[arg(long)]
    no_send_as_check: bool,
    /// Delay before every reply, in milliseconds (about 50 is Exchange-like); replies to
    /// a pipelined group of commands share one delay, as one round trip.
    #[arg(long, default_value_t = 0)]
    reply_delay_ms: u64,
    /// Extra time each Microsoft Graph request takes, in milliseconds (one round trip).
    #[arg(long, default_value_t = 0)]
    graph_delay_ms: u64,
    /// COUNT/WINDOW like 30/60s, 30/1m, or "off".
    #[arg(long)]
    message_rate: Option<String>,
    /// COUNT/WINDOW like 10000/24h, or "off".
    #[arg(long)]
    recipient_rate: Option<String>,
    #[arg(long)]
    max_recipients: Option<u32>,
    #[arg(long)]
    max_connections: Option<u32>,
    #[arg(long)]
    max_size: Option<u64>,
    #[arg(long, value_enum)]
    over_rate: Option<OverRateArg>,
    /// expires_in of issued tokens, in seconds.
    #[arg(long)]
    token_lifetime: Option<u64>,
    #[arg(long)]
    no_token_endpoint: bool,
    /// Keep only envelopes in memory (files under --dir still get the bytes).
    #[arg(long)]
    discard_bodies: bool,
}

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("{what} {value:?} is not valid: {why}")]
    Value {
        what: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("cannot read {path}: {source}; give a readable PEM certificate file")]
    ReadCert {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}; check that --dir exists and is writable")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot start the emulator: {0}; is the port already in use?")]
    Start(std::io::Error),
}

fn bad(what: &'static str, value: &str, why: &'static str) -> CliError {
    CliError::Value {
        what,
        value: value.to_owned(),
        why,
    }
}

/// `60s`, `1m`, `24h`, `500ms`, or bare seconds.
fn parse_duration(s: &str) -> Option<Duration> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, ""), |i| s.split_at(i));
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        "d" => Duration::from_secs(n * 86_400),
        _ => return None,
    })
}

/// `COUNT/WINDOW` or `off`.
fn parse_rate(what: &'static str, s: &str) -> Result<Option<(u32, Duration)>, CliError> {
    if s == "off" {
        return Ok(None);
    }
    let (n, w) = s
        .split_once('/')
        .ok_or_else(|| bad(what, s, "expected COUNT/WINDOW such as 30/60s, or off"))?;
    let n = n
        .parse()
        .map_err(|_| bad(what, s, "COUNT must be a number"))?;
    let w = parse_duration(w)
        .ok_or_else(|| bad(what, s, "WINDOW must look like 60s, 1m, 24h or 500ms"))?;
    Ok(Some((n, w)))
}

/// `TENANT:CLIENT_ID:MIDDLE:MAILBOX` where MIDDLE may itself contain colons.
fn split_app(s: &str) -> Result<(&str, &str, &str, &str), CliError> {
    let why = "expected TENANT:CLIENT_ID:SECRET_OR_CERT:MAILBOX";
    let (tenant, rest) = s.split_once(':').ok_or_else(|| bad("--app", s, why))?;
    let (client, rest) = rest.split_once(':').ok_or_else(|| bad("--app", s, why))?;
    let (middle, mailbox) = rest.rsplit_once(':').ok_or_else(|| bad("--app", s, why))?;
    if [tenant, client, middle, mailbox]
        .iter()
        .any(|p| p.is_empty())
    {
        return Err(bad("--app", s, why));
    }
    Ok((tenant, client, middle, mailbox))
}

fn config(args: &Args) -> Result<Config, CliError> {
    let mut cfg = if args.sink {
        Config::sink()
    } else {
        Config::default()
    };
    if !args.sink {
        cfg.tls = match args.tls {
            TlsArg::Starttls => TlsMode::StartTls,
            TlsArg::Implicit => TlsMode::Implicit,
            TlsArg::None => TlsMode::None,
        };
    }
    cfg.cert = match args.cert {
        CertArg::Valid => CertKind::Valid,
        CertArg::WrongName => CertKind::WrongName,
        CertArg::Expired => CertKind::Expired,
    };
    cfg.port = args.port;
    cfg.token_port = args.token_port;
    if let Some(h) = &args.hostname {
        cfg.hostname = h.clone();
    }
    for m in &args.mailboxes {
        let mailbox = match m.split_once(':') {
            Some((addr, pass)) => Mailbox::with_password(addr, pass),
            None => Mailbox::new(m),
        };
        if !mailbox.address.contains('@') {
            return Err(bad(
                "--mailbox",
                m,
                "expected ADDRESS[:PASSWORD] with an @ in the address",
            ));
        }
        cfg.mailboxes.push(mailbox);
    }
    for s in &args.send_as {
        let (owner, addr) = s
            .split_once(':')
            .ok_or_else(|| bad("--send-as", s, "expected MAILBOX:ADDRESS"))?;
        let mailbox = cfg
            .mailboxes
            .iter_mut()
            .find(|m| m.address.eq_ignore_ascii_case(owner))
            .ok_or_else(|| {
                bad(
                    "--send-as",
                    s,
                    "the MAILBOX must be given with --mailbox first",
                )
            })?;
        mailbox.send_as.push(addr.to_owned());
    }
    for a in &args.apps {
        let (tenant, client, secret, mailbox) = split_app(a)?;
        cfg.apps
            .push(App::with_secret(tenant, client, secret, mailbox));
    }
    for a in &args.app_certs {
        let (tenant, client, path, mailbox) = split_app(a)?;
        let pem = std::fs::read_to_string(path).map_err(|source| CliError::ReadCert {
            path: path.to_owned(),
            source,
        })?;
        cfg.apps
            .push(App::with_certificate(tenant, client, &pem, mailbox));
    }
    if args.no_auth {
        cfg.auth_required = false;
    }
    if args.basic_auth_disabled {
        cfg.basic_auth = false;
    }
    if args.no_send_as_check {
        cfg.check_send_as = false;
    }
    cfg.reply_delay = Duration::from_millis(args.reply_delay_ms);
    cfg.graph_delay = Duration::from_millis(args.graph_delay_ms);
    if let Some(r) = &args.message_rate {
        cfg.message_rate = parse_rate("--message-rate", r)?;
    }
    if let Some(r) = &args.recipient_rate {
        cfg.recipient_rate = parse_rate("--recipient-rate", r)?;
    }
    if let Some(n) = args.max_recipients {
        cfg.max_recipients_per_message = Some(n);
    }
    if let Some(n) = args.max_connections {
        cfg.max_connections_per_mailbox = Some(n);
    }
    if let Some(n) = args.max_size {
        cfg.max_size = n;
    }
    if let Some(o) = args.over_rate {
        cfg.over_rate = match o {
            OverRateArg::Reject => OverRate::Reject,
            OverRateArg::Throttle => OverRate::Throttle,
        };
    }
    if let Some(s) = args.token_lifetime {
        cfg.token_lifetime = Duration::from_secs(s);
    }
    cfg.token_endpoint = !(args.sink || args.no_token_endpoint) || !cfg.apps.is_empty();
    cfg.keep_bodies = !args.discard_bodies;
    Ok(cfg)
}

/// Writes via a temporary name and rename, so a watcher never sees half a file.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CliError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|source| CliError::Write {
            path: path.display().to_string(),
            source,
        })
}

fn envelope_json(m: &Received) -> String {
    let at = m.accepted_at.duration_since(UNIX_EPOCH).unwrap_or_default();
    serde_json::json!({
        "mailbox": m.mailbox,
        "mail_from": m.mail_from,
        "mail_params": m.mail_params,
        "rcpts": m.rcpts,
        "rcpt_params": m.rcpt_params,
        "accepted_at": at.as_secs_f64(),
        "connection_id": m.connection_id,
        "message_id": m.message_id,
        "size": m.data.len(),
    })
    .to_string()
}

fn run(args: &Args) -> Result<(), CliError> {
    let mut cfg = config(args)?;
    if let Some(dir) = &args.dir {
        let messages = dir.join("messages");
        std::fs::create_dir_all(&messages).map_err(|source| CliError::Write {
            path: messages.display().to_string(),
            source,
        })?;
        let counter = Arc::new(AtomicU64::new(0));
        cfg.on_message = Some(Arc::new(move |m: &Received| {
            let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
            let eml = messages.join(format!("{n:06}.eml"));
            let json = messages.join(format!("{n:06}.json"));
            // The .json comes last: its presence means the message is complete.
            let res = write_atomic(&eml, &m.data)
                .and_then(|_| write_atomic(&json, envelope_json(m).as_bytes()));
            if let Err(e) = res {
                eprintln!("relay365-emulator: {e}");
            }
        }));
    }
    let emu = Emulator::start(cfg).map_err(CliError::Start)?;
    if let Some(dir) = &args.dir {
        write_atomic(&dir.join("ca.pem"), emu.ca_pem().as_bytes())?;
        if let Some(p) = emu.token_port() {
            write_atomic(&dir.join("token.port"), format!("{p}\n").as_bytes())?;
        }
        // smtp.port last: once it exists, everything else is in place.
        write_atomic(
            &dir.join("smtp.port"),
            format!("{}\n", emu.port()).as_bytes(),
        )?;
    }
    println!(
        "relay365-emulator: smtp=127.0.0.1:{} token={}",
        emu.port(),
        emu.token_authority().unwrap_or_else(|| "off".into())
    );
    loop {
        std::thread::park();
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relay365-emulator: {e}");
            ExitCode::from(78)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rates_and_apps() {
        assert_eq!(
            parse_rate("r", "30/60s").unwrap(),
            Some((30, Duration::from_secs(60)))
        );
        assert_eq!(
            parse_rate("r", "10000/24h").unwrap(),
            Some((10000, Duration::from_secs(86400)))
        );
        assert_eq!(parse_rate("r", "off").unwrap(), None);
        assert!(parse_rate("r", "30").is_err());
        assert!(parse_rate("r", "x/1s").is_err());
        assert!(parse_rate("r", "3/1y").is_err());
        assert_eq!(
            split_app("t:c:s:e:cr:m@x").unwrap(),
            ("t", "c", "s:e:cr", "m@x")
        );
        assert!(split_app("t:c:m@x").is_err());
    }

    #[test]
    fn builds_a_config() {
        let args = Args::parse_from([
            "x",
            "--mailbox",
            "a@x:p:w",
            "--send-as",
            "a@x:b@x",
            "--app",
            "t:c:s:a@x",
            "--message-rate",
            "5/1s",
            "--tls",
            "implicit",
            "--over-rate",
            "throttle",
        ]);
        let cfg = config(&args).unwrap();
        assert_eq!(cfg.mailboxes[0].password.as_deref(), Some("p:w"));
        assert_eq!(cfg.mailboxes[0].send_as, vec!["b@x".to_owned()]);
        assert_eq!(cfg.message_rate, Some((5, Duration::from_secs(1))));
        assert_eq!(cfg.tls, TlsMode::Implicit);
        assert_eq!(cfg.over_rate, OverRate::Throttle);
        let sink = config(&Args::parse_from(["x", "--sink"])).unwrap();
        assert_eq!(sink.tls, TlsMode::None);
        assert!(!sink.token_endpoint);
    }
}
