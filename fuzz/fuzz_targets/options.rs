//! Fuzzes sendmail's option parser (`sendmail::options::parse`) on an arbitrary argv
//! (NUL-separated arguments, the first one argv[0], not necessarily UTF-8), then the
//! envelope decisions taken from it (`envelope_sender`, `argument_recipients`).
//!
//! Invariants: never panics; every recipient kept is one of the arguments; -V and -N
//! values are the validated forms; addresses that come out carry no control character.
#![no_main]

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

use libfuzzer_sys::fuzz_target;
use relay365::sendmail::intake::{self, Caller};
use relay365::sendmail::options;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|&b| b == 0);
    let argv0 = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let args: Vec<OsString> = parts.map(|p| OsString::from_vec(p.to_vec())).collect();
    let Ok(o) = options::parse(&argv0, &args) else {
        return;
    };
    for r in &o.recipients {
        assert!(
            args.iter().any(|a| a.to_str() == Some(r.as_str())),
            "{r:?} not an argument"
        );
    }
    if let Some(v) = &o.dsn.envid {
        let v = v.as_str();
        assert!(!v.is_empty() && v.len() <= 100 && v.bytes().all(|b| (33..=126).contains(&b)));
    }
    if let Some(n) = &o.dsn.notify {
        let n = n.to_string();
        assert!(
            n == "never"
                || n.split(',')
                    .all(|w| matches!(w, "success" | "failure" | "delay")),
            "{n:?}"
        );
    }
    let caller = Caller {
        uid: 1000,
        login: "www-data".into(),
        full_name: None,
    };
    if let Ok(s) = intake::envelope_sender(&o, &caller, "example.com") {
        assert!(!s.as_str().chars().any(char::is_control), "{s:?}");
    }
    if let Ok(rcpts) = intake::argument_recipients(&o, "example.com") {
        for a in rcpts {
            assert!(a.is_qualified());
            assert!(!a.as_str().chars().any(char::is_control), "{a:?}");
        }
    }
});
