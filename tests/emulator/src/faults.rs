//! Scripted faults: at a dialogue stage, answer with a given reply, drop, stall, send garbage or
//! an oversized reply, for a number of occurrences.
//!
//! Faults come from the test and are trusted; they exist to reproduce each row of the reply
//! table in docs/exchange-online.md without a real tenant.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Where in the dialogue a fault fires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stage {
    /// Right after accept, before the greeting.
    Connect,
    /// The 220 greeting.
    Greeting,
    /// EHLO/HELO on a connection that did not (yet) upgrade with STARTTLS.
    Ehlo,
    /// The reply to STARTTLS.
    StartTls,
    /// The EHLO/HELO after STARTTLS.
    AfterTls,
    /// The outcome of AUTH, once the credentials are in.
    Auth,
    Mail,
    /// RCPT; `Some(address)` fires only for that recipient (case-insensitive).
    Rcpt(Option<String>),
    /// The 354 reply to DATA.
    Data,
    /// While the message body is arriving (after its first line).
    MidData,
    /// The reply after the final dot (or BDAT LAST).
    AfterDot,
    Quit,
}

/// What a fault does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send this raw reply (lines separated by `\n`; CRLF is added). A 4xx/5xx reply makes the
    /// command fail (a `421` also closes the connection); a 2xx/3xx reply only replaces the
    /// text the emulator would have sent, and the command proceeds.
    Reply(String),
    /// Close the socket without a reply.
    Drop,
    /// Send nothing for this long, then carry on normally.
    Stall(Duration),
    /// Send a line that is not SMTP instead of the reply.
    Garbage,
    /// Send a multi-line 451 reply of about 1 MiB instead of the reply.
    LongReply,
    /// At AfterDot: accept and record the message, then close without a reply (the client
    /// cannot know it was delivered). Elsewhere the same as `Drop`.
    AcceptThenDrop,
}

/// One scripted fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub stage: Stage,
    pub action: Action,
    /// How many occurrences of the stage it applies to; `None` = forever.
    pub times: Option<u32>,
}

impl Fault {
    /// A fault that fires once.
    pub fn new(stage: Stage, action: Action) -> Fault {
        Fault {
            stage,
            action,
            times: Some(1),
        }
    }

    pub fn times(mut self, n: u32) -> Fault {
        self.times = Some(n);
        self
    }

    pub fn forever(mut self) -> Fault {
        self.times = None;
        self
    }

    /// A reply fault, the common case: `Fault::reply(Stage::AfterDot, "550 5.2.251 ...")`.
    pub fn reply(stage: Stage, text: &str) -> Fault {
        Fault::new(stage, Action::Reply(text.to_owned()))
    }

    fn matches(&self, stage: &Stage, rcpt: Option<&str>) -> bool {
        match (&self.stage, stage) {
            (Stage::Rcpt(None), Stage::Rcpt(_)) => true,
            (Stage::Rcpt(Some(want)), Stage::Rcpt(_)) => {
                rcpt.is_some_and(|r| r.eq_ignore_ascii_case(want))
            }
            (a, b) => a == b,
        }
    }
}

/// The set of pending faults. A lock-free flag keeps the no-fault path (benchmarks) cheap.
#[derive(Default)]
pub(crate) struct Faults {
    any: AtomicBool,
    list: Mutex<Vec<Fault>>,
}

impl Faults {
    pub(crate) fn inject(&self, fault: Fault) {
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        list.push(fault);
        self.any.store(true, Ordering::Release);
    }

    pub(crate) fn clear(&self) {
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        list.clear();
        self.any.store(false, Ordering::Release);
    }

    /// The action of the first pending fault for this stage, consuming one occurrence.
    pub(crate) fn take(&self, stage: &Stage, rcpt: Option<&str>) -> Option<Action> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        let i = list.iter().position(|f| f.matches(stage, rcpt))?;
        let action = list[i].action.clone();
        match &mut list[i].times {
            Some(n) if *n <= 1 => {
                list.remove(i);
            }
            Some(n) => *n -= 1,
            None => {}
        }
        if list.is_empty() {
            self.any.store(false, Ordering::Release);
        }
        Some(action)
    }

    /// Faults not yet used up (for tests asserting a fault actually fired).
    pub(crate) fn pending(&self) -> Vec<Fault> {
        self.list.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_occurrences_and_matches_recipients() {
        let f = Faults::default();
        assert_eq!(f.take(&Stage::Mail, None), None);
        f.inject(Fault::new(Stage::Rcpt(Some("B@x".into())), Action::Drop).times(2));
        f.inject(Fault::new(Stage::Quit, Action::Garbage).forever());
        assert_eq!(f.take(&Stage::Rcpt(None), Some("a@x")), None);
        assert_eq!(f.take(&Stage::Rcpt(None), Some("b@x")), Some(Action::Drop));
        assert_eq!(f.take(&Stage::Rcpt(None), Some("b@X")), Some(Action::Drop));
        assert_eq!(f.take(&Stage::Rcpt(None), Some("b@x")), None);
        for _ in 0..3 {
            assert_eq!(f.take(&Stage::Quit, None), Some(Action::Garbage));
        }
        assert_eq!(f.pending().len(), 1);
        f.clear();
        assert_eq!(f.take(&Stage::Quit, None), None);
    }
}
