//! Fuzzes the queue-file reader (`spool::queue::read_entry`, a `.env` file of JSON
//! holding a queued message's envelope and per-recipient state) on arbitrary bytes.
//!
//! Invariants: never panics; an accepted entry has version 1 and a valid queue id,
//! and writing it back and reading it again gives the same entry.
#![no_main]

mod common;

use std::io::Write;

use libfuzzer_sys::fuzz_target;
use relay365::spool::QueueId;
use relay365::spool::queue::{self, QueueEntry};

fuzz_target!(|data: &[u8]| {
    let path = common::dir().path().join("entry.env");
    let mut f = std::fs::File::create(&path).expect("create");
    f.write_all(data).expect("write");
    drop(f);
    let Ok(entry) = queue::read_entry(&path) else {
        // The reader is serde over the bytes; it must agree that they are no entry.
        return;
    };
    assert_eq!(entry.version, queue::VERSION);
    assert!(QueueId::parse(entry.id.as_str()).is_ok());
    for r in &entry.recipients {
        assert!(!r.address.as_str().chars().any(char::is_control));
    }
    let json = serde_json::to_vec(&entry).expect("serialise");
    let again: QueueEntry = serde_json::from_slice(&json).expect("round trip");
    assert_eq!(again, entry);
    let _ = entry.pending().count();
    let _ = entry.arrival();
    let _ = entry.next_attempt();
    let _ = entry.is_due(std::time::SystemTime::now(), false);
});
