//! Fuzzes the quota ledger and freeze-file readers (`quota::Ledger::open` and
//! the operations that read the file) on arbitrary file contents: a damaged ledger
//! must be refused with an error, never crash the daemon or under-count.
//!
//! Input: ledger bytes, optionally followed by a 0xFF byte and the freeze file's bytes.
//! Invariants: never panics; on a ledger it accepts, the usage it reports stays within
//! the limits' arithmetic and a reservation either goes or names a later moment.
#![no_main]

mod common;

use std::time::{Duration, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use relay365::config::limits::Limits;
use relay365::quota::{Ledger, Reservation};

fuzz_target!(|data: &[u8]| {
    let (ledger, freeze) = match data.iter().position(|&b| b == 0xFF) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    let path = common::dir().path().join("app.ledger");
    let freeze_path = common::dir().path().join("app.freeze");
    std::fs::write(&path, ledger).expect("write ledger");
    let _ = std::fs::remove_file(&freeze_path);
    if let Some(f) = freeze {
        std::fs::write(&freeze_path, f).expect("write freeze");
    }
    let Ok(mut l) = Ledger::open(&path) else {
        return;
    };
    // Around the time the seeds were written, so the records are in the windows.
    let now = UNIX_EPOCH + Duration::from_millis(1_700_000_100_000);
    let limits = Limits::default();
    if let Ok(u) = l.usage(now, &limits) {
        let _ = u.reason();
    }
    let _ = l.frozen(now);
    if let Ok(room) = l.room(now, &limits) {
        assert!(room <= limits.max_recipients);
        if room >= 1 {
            match l.reserve(now, 1, &limits) {
                Ok(Reservation::Go) | Err(_) => {}
                Ok(other) => panic!("room {room} but reserve said {other:?}"),
            }
        }
    }
    if let Ok(Reservation::WaitUntil(t)) = l.reserve(now, limits.max_recipients, &limits) {
        assert!(t > now, "wait until {t:?} is not later than now");
    }
});
