//! Fuzzes the `sendmail -bs` SMTP dialogue (`sendmail::bs::Session::run`): the input
//! is everything the client sends on stdin, read through a buffer of a size the first
//! byte picks (so CR/LF pairs and long lines straddle read boundaries), and messages
//! go through the real `deposit::write` into a throwaway spool under /dev/shm
//! (never the system spool).
//!
//! Invariants: never panics; the output is whole SMTP replies only (`ddd[ -]text\r\n`,
//! printable text, continuation lines sharing the code, starting with the 220
//! greeting); it stays within a bound per input line; a message is queued only after
//! a 354 and a line holding a single dot ended by CRLF (no LF-only or CR-only variant
//! ends the data: SMTP smuggling), a `550 5.5.2 ... bare <LF>` only for input that
//! holds a bare LF; every queued id is announced in its `250` and
//! lies in the spool as a file that reads back to a valid envelope; nothing else is
//! left in the spool.
#![no_main]

use std::ffi::OsString;
use std::fs;
use std::io::BufReader;
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use relay365::sendmail::intake::{Caller, Submission};
use relay365::sendmail::options::{self, Options};
use relay365::sendmail::privilege::DropGroup;
use relay365::sendmail::bs::{Ending, MAX_COMMAND_LINE, Session, Settings, Spooler};
use relay365::sendmail::deposit::{self, SpoolError};
use relay365::spool::QueueId;
use relay365::spool::envelope::Envelope;
use relay365::spool::paths::Spool;

struct Fixture {
    // Held so the directory lives as long as the process. A static is never dropped,
    // so the (empty, unless an input crashed) directory stays behind in /dev/shm.
    _dir: tempfile::TempDir,
    spool: Spool,
    group: DropGroup,
    base: Options,
    caller: Caller,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        // tmpfs when there is one: deposit fsyncs every message.
        let shm = PathBuf::from("/dev/shm");
        let dir = if shm.is_dir() {
            tempfile::Builder::new()
                .prefix("relay365-fuzz-bs")
                .tempdir_in(shm)
        } else {
            tempfile::Builder::new()
                .prefix("relay365-fuzz-bs")
                .tempdir()
        }
        .expect("temporary spool");
        let spool = Spool::new(dir.path());
        fs::create_dir_all(spool.incoming_tmp()).expect("incoming/tmp");
        fs::create_dir_all(spool.incoming_new()).expect("incoming/new");
        let base = options::parse("sendmail", &[OsString::from("-bs")]).expect("-bs parses");
        Fixture {
            _dir: dir,
            spool,
            group: DropGroup::acquire().expect("not setgid: a no-op"),
            base,
            caller: Caller {
                uid: 33,
                login: "www-data".into(),
                full_name: Some("www-data".into()),
            },
        }
    })
}

struct TempSpool<'a>(&'a Fixture);

impl Spooler for TempSpool<'_> {
    fn deposit(&mut self, s: &Submission) -> Result<(), SpoolError> {
        let bytes = s.envelope.to_file_bytes(&s.message);
        deposit::write(&self.0.spool, &self.0.group, &s.envelope.id, &bytes).map(|_| ())
    }
}

fn is_reply_line(l: &[u8]) -> bool {
    l.len() >= 4
        && l[..3].iter().all(u8::is_ascii_digit)
        && (b'2'..=b'5').contains(&l[0])
        && (l[3] == b' ' || l[3] == b'-')
        && std::str::from_utf8(&l[4..]).is_ok_and(|t| !t.chars().any(char::is_control))
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, input)) = data.split_first() else {
        return;
    };
    let f = fixture();
    // Reads of 1, 7, 64 or 8192 bytes.
    let chunk = [1, 7, 64, 8192][usize::from(flags & 3)];
    // A small size limit sometimes, so 552 is reached.
    let max_message_size = if flags & 4 != 0 {
        u64::from(flags >> 3) * 32
    } else {
        1 << 20
    };
    let max_recipients = if flags & 0x80 != 0 { 2 } else { 1000 };
    let settings = Settings {
        domain: "example.com",
        max_message_size,
        max_recipients,
    };
    let mut out = Vec::new();
    let report = Session::new(settings, &f.base, &f.caller, TempSpool(f))
        .run(BufReader::with_capacity(chunk, input), &mut out);

    // Whole reply lines only.
    let lines: Vec<&[u8]> = out
        .split_inclusive(|&b| b == b'\n')
        .map(|l| {
            l.strip_suffix(b"\r\n")
                .expect("reply line not ended by CRLF")
        })
        .collect();
    let mut pending_code: Option<&[u8]> = None;
    for l in &lines {
        assert!(!l.contains(&b'\r'), "bare CR in a reply");
        assert!(
            is_reply_line(l),
            "bad reply line {:?}",
            String::from_utf8_lossy(l)
        );
        if let Some(code) = pending_code {
            assert_eq!(code, &l[..3], "continuation with another code");
        }
        pending_code = (l[3] == b'-').then(|| &l[..3]);
    }
    assert!(
        pending_code.is_none(),
        "reply ends with a continuation line"
    );
    assert!(lines[0].starts_with(b"220 "), "no greeting first");

    // Bounded: at most one reply per input line (EHLO's is the longest multi-line
    // one), and a reply quotes at most one command line.
    let input_lines = input.iter().filter(|&&b| b == b'\n').count() + 1;
    assert!(
        out.len() <= 64 + input_lines * (MAX_COMMAND_LINE + 512),
        "{} bytes of output for {input_lines} input lines",
        out.len()
    );
    assert!(
        lines.len() <= 1 + input_lines * 7,
        "more replies than commands"
    );

    // Queued only after a 354 and a terminating dot, and always announced.
    let announced: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix(b"250 2.0.0 Ok: queued as "))
        .map(|id| std::str::from_utf8(id).unwrap_or(""))
        .collect();
    let ids: Vec<&str> = report.queued.iter().map(QueueId::as_str).collect();
    assert_eq!(announced, ids, "queued and announced ids differ");
    let go_aheads = lines.iter().filter(|l| l.starts_with(b"354 ")).count();
    // Only `.` CRLF can end the data (smuggling: `.` LF and the like never do).
    let dots = input
        .split(|&b| b == b'\n')
        .filter(|l| *l == b".\r")
        .count();
    let bare_lf = input
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (i == 0 || input[i - 1] != b'\r'));
    assert!(
        bare_lf || !lines.iter().any(|l| l.starts_with(b"550 5.5.2 ")),
        "bare <LF> refused in input without one"
    );
    assert!(
        ids.len() <= go_aheads && ids.len() <= dots,
        "queued without a whole DATA"
    );
    let mut go_ahead_open = false;
    for l in &lines {
        if l.starts_with(b"354 ") {
            go_ahead_open = true;
        } else if l.starts_with(b"250 2.0.0 Ok: queued as ") {
            assert!(go_ahead_open, "queued reply without a 354 before it");
            go_ahead_open = false;
        } else if l.len() > 3 && l[3] == b' ' {
            // Any other final reply ends the DATA phase (552, 554, 451 ...) or is a
            // command reply outside it.
            go_ahead_open = false;
        }
    }
    if let Ending::Abandoned { in_data: true } = report.ending {
        assert!(lines.last().is_some_and(|l| l.starts_with(b"354 ")));
    }

    // The spool holds exactly the queued messages, each a valid incoming file.
    let mut found: Vec<String> = fs::read_dir(f.spool.incoming_new())
        .expect("read new/")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    found.sort();
    let mut want: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(found, want, "spool holds other files than the queued ones");
    for id in &found {
        let path = f.spool.incoming_new().join(id);
        let bytes = fs::read(&path).expect("read queued file");
        let (env, _message) = Envelope::from_file_bytes(&bytes).expect("queued file reads back");
        assert!(!env.recipients.is_empty());
        assert!(env.recipients.len() <= max_recipients);
        for r in &env.recipients {
            assert!(r.is_qualified(), "unqualified recipient {r}");
        }
        fs::remove_file(&path).expect("clean the spool");
    }
    assert!(
        fs::read_dir(f.spool.incoming_tmp())
            .expect("read tmp/")
            .next()
            .is_none(),
        "a temporary file was left in incoming/tmp"
    );
});
