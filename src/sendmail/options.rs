//! sendmail's command line, parsed into a typed [`Options`].
//!
//! Trusts nothing: argv comes from any local program. Follows Postfix's sendmail(1):
//! values glued (`-fme@x`) or separate (`-f me@x`), flags clustered (`-ti`), options
//! anywhere before `--`, unknown options warned about and ignored so that programs
//! with odd flags still get their mail out. Never opens a file named on the command
//! line (`-X`, `-D`, `-oA` are accepted and ignored).

use std::ffi::OsString;
use std::path::PathBuf;

use crate::spool::envelope::{BodyType, Dsn, EnvId, Notify, Ret};

/// What the invocation asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// `-bm`, the default: read a message and queue it.
    Enqueue,
    /// `-bp`, `mailq`.
    ListQueue,
    /// `-bs`: SMTP on stdin/stdout.
    Smtp,
    /// `-bi`, `-I`, `newaliases`: nothing to rebuild.
    RebuildAliases,
    /// `-bv`: show how recipients resolve, send nothing.
    Verify,
    /// `-q...`: ask the daemon for a queue run.
    QueueRun,
    /// A mode relay365 refuses (`-bd`, `-bt`, ...), with the option as written.
    Refused(String),
}

impl Mode {
    /// Whether the mode writes into the spool and so keeps the setgid group (saved)
    /// for the deposit or the trigger FIFO. Every other mode gives it up for good
    /// before reading anything but the command line.
    pub fn needs_group(&self) -> bool {
        matches!(self, Mode::Enqueue | Mode::Smtp | Mode::QueueRun)
    }
}

/// The parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub mode: Mode,
    /// `-t`: take recipients from the headers.
    pub extract: bool,
    /// `-i`/`-oi`: a lone dot does not end the message.
    pub ignore_dots: bool,
    /// `-f`/`-r` as written (the last one wins, since PHP may pass two).
    pub sender: Option<String>,
    /// `-F`: the full name for a generated From.
    pub full_name: Option<String>,
    /// `-odq`: queue without waking the daemon.
    pub queue_only: bool,
    /// `-N`, `-R`, `-V` and `-B`: passed on as NOTIFY, RET, ENVID and BODY.
    pub dsn: Dsn,
    /// `-v`: progress on stderr.
    pub verbose: bool,
    /// `-C`: an alternative config file.
    pub config: Option<PathBuf>,
    /// `-L`: the syslog tag.
    pub log_tag: Option<String>,
    /// Recipient arguments as written.
    pub recipients: Vec<String>,
    /// Warnings for stderr: unknown options, ignored values.
    pub warnings: Vec<String>,
}

/// Why a command line is unusable (EX_USAGE).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionsError {
    #[error("option -{0} needs a value")]
    MissingValue(char),
    #[error("argument {0} is not valid UTF-8")]
    NotUtf8(usize),
    #[error("-N {0:?}: use never, or a comma-separated list of success, failure and delay")]
    BadNotify(String),
    #[error("-R {0:?}: use full or hdrs")]
    BadRet(String),
    #[error("-B {0:?}: use 7BIT or 8BITMIME")]
    BadBody(String),
    #[error("-V {0:?}: an envelope id is 1 to 100 printable ASCII characters")]
    BadEnvid(String),
    #[error("-b{0}: unknown mode (relay365 knows -bm, -bp, -bs, -bi, -bv)")]
    BadMode(String),
}

/// Flags that take no value; the rest of a cluster continues after them.
const FLAGS: &str = "tiIvnmGUc";
/// Options whose value is the rest of the argument or the next argument.
const WITH_VALUE: &str = "fFrBNRVCLpXDdhoOeAb";

impl Options {
    fn new(mode: Mode) -> Options {
        Options {
            mode,
            extract: false,
            ignore_dots: false,
            sender: None,
            full_name: None,
            queue_only: false,
            dsn: Dsn::default(),
            verbose: false,
            config: None,
            log_tag: None,
            recipients: Vec::new(),
            warnings: Vec::new(),
        }
    }
}

/// The mode an invocation name implies: `mailq` lists, `newaliases` rebuilds.
fn mode_for_name(argv0: &str) -> Mode {
    match argv0.rsplit('/').next().unwrap_or(argv0) {
        "mailq" => Mode::ListQueue,
        "newaliases" => Mode::RebuildAliases,
        _ => Mode::Enqueue,
    }
}

/// Parses `args` (without argv\[0\]) for the program invoked as `argv0`.
pub fn parse(argv0: &str, args: &[OsString]) -> Result<Options, OptionsError> {
    let mut o = Options::new(mode_for_name(argv0));
    let mut i = 0;
    let mut only_recipients = false;
    while i < args.len() {
        let index = i + 1;
        let arg = args[i].to_str().ok_or(OptionsError::NotUtf8(index));
        i += 1;
        // -F may carry a Latin-1 name from old scripts; take it lossily, nothing else.
        let arg = match arg {
            Ok(a) => a.to_string(),
            Err(_) if !only_recipients && args[i - 1].as_encoded_bytes().starts_with(b"-F") => {
                args[i - 1].to_string_lossy().into_owned()
            }
            Err(e) => return Err(e),
        };
        if only_recipients || !arg.starts_with('-') || arg == "-" {
            o.recipients.push(arg);
            continue;
        }
        if arg == "--" {
            only_recipients = true;
            continue;
        }
        let body: Vec<char> = arg[1..].chars().collect();
        let mut k = 0;
        while k < body.len() {
            let c = body[k];
            k += 1;
            if c == 'q' {
                // -q takes only a glued argument (-q, -q30m, -qIid, -qRsite, -qSsender).
                o.mode = Mode::QueueRun;
                break;
            }
            if FLAGS.contains(c) {
                match c {
                    't' => o.extract = true,
                    'i' => o.ignore_dots = true,
                    'I' => o.mode = Mode::RebuildAliases,
                    'v' => o.verbose = true,
                    _ => {} // -n, -m, -G, -U, -c: legacy, nothing to do
                }
                continue;
            }
            if !WITH_VALUE.contains(c) {
                o.warnings.push(format!("-{c}: unknown option ignored"));
                continue;
            }
            let value: String = if k < body.len() {
                let v: String = body[k..].iter().collect();
                k = body.len();
                v
            } else if i < args.len() {
                i += 1;
                match args[i - 1].to_str() {
                    Some(v) => v.to_string(),
                    None if c == 'F' => args[i - 1].to_string_lossy().into_owned(),
                    None => return Err(OptionsError::NotUtf8(i)),
                }
            } else {
                return Err(OptionsError::MissingValue(c));
            };
            apply(&mut o, c, value, args, &mut i)?;
        }
    }
    Ok(o)
}

fn apply(
    o: &mut Options,
    c: char,
    value: String,
    args: &[OsString],
    i: &mut usize,
) -> Result<(), OptionsError> {
    match c {
        'f' | 'r' => o.sender = Some(value),
        'F' => o.full_name = Some(value),
        'C' => o.config = Some(PathBuf::from(value)),
        'L' => o.log_tag = Some(value),
        'B' => o.dsn.body = Some(BodyType::parse(&value).ok_or(OptionsError::BadBody(value))?),
        'N' => o.dsn.notify = Some(Notify::parse(&value).ok_or(OptionsError::BadNotify(value))?),
        'R' => o.dsn.ret = Some(Ret::parse(&value).ok_or(OptionsError::BadRet(value))?),
        'V' => o.dsn.envid = Some(EnvId::parse(&value).ok_or(OptionsError::BadEnvid(value))?),
        'b' => {
            o.mode = match value.as_str() {
                "m" => Mode::Enqueue,
                "p" => Mode::ListQueue,
                "s" => Mode::Smtp,
                "i" => Mode::RebuildAliases,
                "v" => Mode::Verify,
                "a" => {
                    o.warnings
                        .push("-ba: ARPANET mode is not supported; ignored".into());
                    o.mode.clone()
                }
                "d" | "D" | "t" | "h" | "H" | "P" => Mode::Refused(format!("-b{value}")),
                _ => return Err(OptionsError::BadMode(value)),
            }
        }
        'o' => apply_o(o, &value, args, i),
        'O' | 'e' | 'A' | 'p' | 'h' | 'd' | 'X' | 'D' => {
            // Accepted for compatibility; -X and -D name files that are never opened.
        }
        _ => o.warnings.push(format!("-{c}: unknown option ignored")),
    }
    Ok(())
}

/// `-o` takes exactly one value: `-oi`, `-odq`, `-oem`, `-o7`, `-oA file`.
fn apply_o(o: &mut Options, value: &str, args: &[OsString], i: &mut usize) {
    match value {
        "i" => o.ignore_dots = true,
        "dq" => o.queue_only = true,
        "db" | "di" | "dd" | "d" => o.queue_only = false,
        "m" | "7" | "8" => {}
        "A" => {
            // Sendmail's alias file option; the file name may be separate. Never opened.
            if *i < args.len() {
                *i += 1;
            }
        }
        v if v.starts_with('e') || v.starts_with('A') => {}
        v => o.warnings.push(format!("-o{v}: unknown option ignored")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Options {
        try_p("sendmail", args).unwrap()
    }

    fn try_p(argv0: &str, args: &[&str]) -> Result<Options, OptionsError> {
        let a: Vec<OsString> = args.iter().map(OsString::from).collect();
        parse(argv0, &a)
    }

    #[test]
    fn php_mail_with_a_repeated_sender() {
        let o = p(&["-t", "-i", "-f", "a@x", "-fb@y"]);
        assert!(o.extract && o.ignore_dots);
        assert_eq!(o.sender.as_deref(), Some("b@y"));
        assert!(o.recipients.is_empty());
    }

    #[test]
    fn debian_cron() {
        let o = p(&["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "user"]);
        assert_eq!(o.full_name.as_deref(), Some("CronDaemon"));
        assert_eq!(o.dsn.body, Some(BodyType::EightBitMime));
        assert_eq!(o.recipients, ["user"]);
        assert!(o.warnings.is_empty(), "{:?}", o.warnings);
    }

    #[test]
    fn cronie_and_anacron() {
        let o = p(&[
            "-FCronDaemon",
            "-i",
            "-odi",
            "-oem",
            "-oi",
            "-t",
            "-f",
            "root",
        ]);
        assert!(o.extract && !o.queue_only);
        assert_eq!(o.sender.as_deref(), Some("root"));
        let o = p(&["-FAnacron", "-odi", "root"]);
        assert_eq!(o.recipients, ["root"]);
        let o = p(&["-i", "-B", "8BITMIME", "user"]);
        assert_eq!(o.dsn.body, Some(BodyType::EightBitMime));
    }

    #[test]
    fn glued_and_separate_values_and_clusters() {
        let o = p(&["-tifraid@host"]);
        assert!(o.extract && o.ignore_dots);
        assert_eq!(o.sender.as_deref(), Some("raid@host"));
        let o = p(&["-t", "-fraid@host"]);
        assert_eq!(o.sender.as_deref(), Some("raid@host"));
        let o = p(&["-F", "Full Name", "-r", "me@x", "a@b"]);
        assert_eq!(o.full_name.as_deref(), Some("Full Name"));
        assert_eq!(o.sender.as_deref(), Some("me@x"));
    }

    #[test]
    fn double_dash_ends_options() {
        let o = p(&["-i", "--", "-weird@x", "b@y"]);
        assert_eq!(o.recipients, ["-weird@x", "b@y"]);
        let o = p(&["-i", "-f", "from@x", "--", "r@y"]);
        assert_eq!(o.recipients, ["r@y"]);
    }

    #[test]
    fn options_after_recipients_still_count() {
        let o = p(&["user", "-f", "x@y"]);
        assert_eq!(o.recipients, ["user"]);
        assert_eq!(o.sender.as_deref(), Some("x@y"));
    }

    #[test]
    fn null_sender_forms() {
        assert_eq!(p(&["-f", ""]).sender.as_deref(), Some(""));
        assert_eq!(p(&["-f<>"]).sender.as_deref(), Some("<>"));
    }

    #[test]
    fn o_takes_exactly_one_value() {
        let o = p(&["-o", "i", "r@x"]);
        assert!(o.ignore_dots);
        assert_eq!(o.recipients, ["r@x"]);
        let o = p(&["-oA", "/etc/aliases", "r@x"]);
        assert_eq!(o.recipients, ["r@x"]);
        let o = p(&["-odq", "r@x"]);
        assert!(o.queue_only);
        let o = p(&["-O", "DeliveryMode=b", "r@x"]);
        assert_eq!(o.recipients, ["r@x"]);
    }

    #[test]
    fn modes() {
        assert_eq!(p(&["-bp"]).mode, Mode::ListQueue);
        assert_eq!(try_p("/usr/bin/mailq", &[]).unwrap().mode, Mode::ListQueue);
        assert_eq!(try_p("newaliases", &[]).unwrap().mode, Mode::RebuildAliases);
        assert_eq!(p(&["-I"]).mode, Mode::RebuildAliases);
        assert_eq!(p(&["-bs"]).mode, Mode::Smtp);
        assert_eq!(p(&["-bv", "root"]).mode, Mode::Verify);
        assert_eq!(p(&["-bd"]).mode, Mode::Refused("-bd".into()));
        assert_eq!(p(&["-bt"]).mode, Mode::Refused("-bt".into()));
        assert_eq!(p(&["-q"]).mode, Mode::QueueRun);
        assert_eq!(p(&["-q30m"]).mode, Mode::QueueRun);
        assert_eq!(p(&["-qIabc"]).mode, Mode::QueueRun);
        assert!(matches!(
            try_p("sendmail", &["-bz"]),
            Err(OptionsError::BadMode(_))
        ));
    }

    #[test]
    fn dsn_options() {
        let o = p(&["-N", "Failure,DELAY", "-R", "hdrs", "-V", "env-1", "r@x"]);
        assert_eq!(o.dsn.notify, Notify::parse("failure,delay"));
        assert_eq!(o.dsn.ret, Some(Ret::Hdrs));
        assert_eq!(o.dsn.envid.as_ref().map(EnvId::as_str), Some("env-1"));
        assert_eq!(p(&["-Nnever"]).dsn.notify, Some(Notify::Never));
        assert!(matches!(
            try_p("sendmail", &["-N", "sometimes"]),
            Err(OptionsError::BadNotify(_))
        ));
        assert!(matches!(
            try_p("sendmail", &["-R", "all"]),
            Err(OptionsError::BadRet(_))
        ));
        assert!(matches!(
            try_p("sendmail", &["-B", "binary"]),
            Err(OptionsError::BadBody(_))
        ));
        assert!(matches!(
            try_p("sendmail", &["-V", "a b"]),
            Err(OptionsError::BadEnvid(_))
        ));
    }

    #[test]
    fn unknown_options_warn_and_carry_on() {
        let o = p(&["-Z", "-oQ", "r@x"]);
        assert_eq!(o.recipients, ["r@x"]);
        assert_eq!(o.warnings.len(), 2, "{:?}", o.warnings);
    }

    #[test]
    fn legacy_options_are_accepted_silently() {
        let o = p(&[
            "-n", "-m", "-om", "-G", "-h5", "-U", "-Ac", "-p", "smtp", "-X", "/tmp/log", "-o7",
            "-o8", "-D", "/tmp/d", "-d", "0.1", "r@x",
        ]);
        assert_eq!(o.recipients, ["r@x"]);
        assert!(o.warnings.is_empty(), "{:?}", o.warnings);
    }

    #[test]
    fn missing_values_are_errors() {
        assert_eq!(
            try_p("sendmail", &["-f"]),
            Err(OptionsError::MissingValue('f'))
        );
        assert_eq!(
            try_p("sendmail", &["-t", "-C"]),
            Err(OptionsError::MissingValue('C'))
        );
    }

    #[test]
    fn verbose_and_config_and_tag() {
        let o = p(&["-v", "-C/tmp/r.toml", "-L", "myapp", "r@x"]);
        assert!(o.verbose);
        assert_eq!(o.config, Some(PathBuf::from("/tmp/r.toml")));
        assert_eq!(o.log_tag.as_deref(), Some("myapp"));
    }

    #[test]
    fn non_utf8_recipient_after_double_dash_is_refused_even_if_it_looks_like_f() {
        // Found by fuzzing (fuzz/ options): the lossy -F exception also turned a
        // recipient argument after `--` into a mangled address.
        use std::os::unix::ffi::OsStringExt;
        let args = [
            OsString::from("--"),
            OsString::from_vec(b"-F\xe9t".to_vec()),
        ];
        assert_eq!(parse("sendmail", &args), Err(OptionsError::NotUtf8(2)));
        let args = [
            OsString::from_vec(b"-F\xe9t\xe9".to_vec()),
            OsString::from("x"),
        ];
        assert_eq!(
            parse("sendmail", &args).unwrap().full_name.as_deref(),
            Some("\u{fffd}t\u{fffd}")
        );
    }
}
