//! Fuzzes the incoming-file reader (`spool::envelope::Envelope::from_file_bytes`): any
//! local user in the drop group could plant these bytes in `incoming/`.
//!
//! Invariants: never panics; an accepted file has a valid queue id, sender and
//! recipients, a message of exactly the declared size, and writing the envelope back
//! and reading it again gives the same envelope and message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay365::message::address::{Address, Sender};
use relay365::spool::QueueId;
use relay365::spool::envelope::Envelope;

fuzz_target!(|data: &[u8]| {
    let Ok((env, message)) = Envelope::from_file_bytes(data) else {
        return;
    };
    assert!(QueueId::parse(env.id.as_str()).is_ok());
    assert!(Sender::parse(env.sender.as_str()).is_ok());
    assert!(!env.recipients.is_empty());
    for r in &env.recipients {
        let a = Address::parse(r.as_str()).expect("accepted recipient is valid");
        assert!(!a.as_str().chars().any(char::is_control));
    }
    assert_eq!(message.len() as u64, env.size);
    let bytes = env.to_file_bytes(message);
    let (again, msg_again) = Envelope::from_file_bytes(&bytes).expect("round trip");
    assert_eq!(again, env);
    assert_eq!(msg_again, message);
    let line_end = bytes.len() - message.len() - 1;
    let line = &bytes[relay365::spool::envelope::MAGIC.len()..line_end];
    assert_eq!(Envelope::parse_line(line).expect("line alone"), env);
});
