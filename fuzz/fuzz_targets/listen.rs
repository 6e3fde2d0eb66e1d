//! Fuzzes the listener's network dialogue: the `-bs` state machine driven as
//! `relay365 listen` drives it (`Session::network`), with a gate whose answers the
//! first byte picks (client in `allow` or not, users present, passwords right or
//! wrong, rate exceeded) and a channel that delivers the input in packets split at
//! 0xFF bytes, as TCP segments would, and whose STARTTLS drops the rest of the
//! packet (what a real handshake does to pipelined plaintext).
//!
//! Invariants: never panics; the output is whole SMTP replies; AUTH is never checked
//! before STARTTLS and never offered before it; a client that is neither allowed
//! nor authenticated never gets a message queued; nothing is queued while the gate
//! refuses MAIL; nothing sent in the packet of a STARTTLS is read after it.
#![no_main]

use std::ffi::OsString;
use std::io::{self, BufRead, Read, Write};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use relay365::message::address::{Address, Sender};
use relay365::sendmail::bs::network::{AuthVerdict, Channel, Client, Gate};
use relay365::sendmail::bs::{Session, Settings, Spooler};
use relay365::sendmail::deposit::SpoolError;
use relay365::sendmail::intake::{Caller, Submission};
use relay365::sendmail::options::{self, Options};

fn base() -> &'static Options {
    static O: OnceLock<Options> = OnceLock::new();
    O.get_or_init(|| options::parse("sendmail", &[OsString::from("-bs")]).expect("-bs parses"))
}

struct Packets<'a> {
    packets: Vec<&'a [u8]>,
    current: &'a [u8],
    out: Vec<u8>,
    tls: bool,
}

impl Read for Packets<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = avail.len().min(buf.len());
        buf[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for Packets<'_> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.current.is_empty() && !self.packets.is_empty() {
            self.current = self.packets.remove(0);
        }
        Ok(self.current)
    }
    fn consume(&mut self, amt: usize) {
        self.current = &self.current[amt.min(self.current.len())..];
    }
}

impl Write for Packets<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Channel for Packets<'_> {
    fn start_tls(&mut self) -> io::Result<()> {
        // The rest of the packet was plaintext pipelined behind STARTTLS.
        self.current = &[];
        self.tls = true;
        Ok(())
    }
    fn tls(&self) -> Option<String> {
        self.tls.then(|| "TLSv1.3 with cipher TLS13_AES_128_GCM_SHA256".to_string())
    }
}

struct FuzzGate {
    allowed: bool,
    users: bool,
    password_ok: bool,
    refuse_mail: bool,
}

impl Gate for FuzzGate {
    fn offers_tls(&self) -> bool {
        true
    }
    fn offers_auth(&self) -> bool {
        self.users
    }
    fn authenticate(&mut self, client: &Client, _m: &str, user: &str, _p: &str) -> AuthVerdict {
        assert!(client.tls.is_some(), "AUTH checked before STARTTLS");
        assert!(self.users, "AUTH checked without users");
        assert!(!user.is_empty());
        if self.password_ok {
            AuthVerdict::Accept
        } else {
            AuthVerdict::Reject("535 5.7.8 Error: authentication failed".into())
        }
    }
    fn mail(&mut self, _c: &Client, _s: &Sender) -> Result<(), String> {
        if self.refuse_mail {
            Err("451 4.7.1 Error: too many messages".into())
        } else {
            Ok(())
        }
    }
    fn rcpt(&mut self, client: &Client, _s: &Sender, r: &Address) -> Result<(), String> {
        if self.allowed || client.user.is_some() {
            Ok(())
        } else {
            Err(format!("554 5.7.1 <{r}>: Relay access denied"))
        }
    }
    fn queued(&mut self, _c: &Client) {}
}

#[derive(Default)]
struct Memory {
    queued: Vec<Submission>,
}

impl Spooler for &mut Memory {
    fn deposit(&mut self, s: &Submission) -> Result<(), SpoolError> {
        self.queued.push(Submission {
            envelope: s.envelope.clone(),
            message: s.message.clone(),
        });
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, input)) = data.split_first() else {
        return;
    };
    let mut gate = FuzzGate {
        allowed: flags & 1 != 0,
        users: flags & 2 != 0,
        password_ok: flags & 4 != 0,
        refuse_mail: flags & 8 != 0,
    };
    let caller = Caller {
        uid: 0,
        login: "MAILER-DAEMON".into(),
        full_name: None,
    };
    let settings = Settings {
        domain: "example.com",
        max_message_size: 1 << 16,
        max_recipients: 10,
    };
    let mut channel = Packets {
        packets: input.split(|&b| b == 0xFF).collect(),
        current: &[],
        out: Vec::new(),
        tls: false,
    };
    let mut memory = Memory::default();
    let report = Session::new(settings, base(), &caller, &mut memory)
        .network(&mut gate, Client::new("192.0.2.1".parse().expect("ip")))
        .run_on(&mut channel);

    let text = String::from_utf8(channel.out).expect("replies are UTF-8");
    assert!(text.starts_with("220 "));
    assert!(text.is_empty() || text.ends_with("\r\n"));
    let mut tls_seen = false;
    for line in text.split("\r\n").filter(|l| !l.is_empty()) {
        let b = line.as_bytes();
        assert!(b.len() >= 4 && b[..3].iter().all(u8::is_ascii_digit), "{line:?}");
        assert!(!line.chars().any(char::is_control), "{line:?}");
        if line.starts_with("220 2.0.0 Ready to start TLS") {
            tls_seen = true;
        }
        if line.starts_with("250-AUTH") || line.starts_with("250 AUTH") {
            assert!(tls_seen, "AUTH offered before STARTTLS");
        }
    }
    if !gate.allowed && !(gate.users && gate.password_ok) {
        assert!(memory.queued.is_empty(), "queued for a client that may not relay");
    }
    if gate.refuse_mail {
        assert!(memory.queued.is_empty(), "queued though MAIL was refused");
    }
    assert_eq!(report.queued.len(), memory.queued.len());
    for s in &memory.queued {
        assert_eq!(s.envelope.client, Some("192.0.2.1".parse().expect("ip")));
        assert!(s.message.starts_with(b"Received: from "));
    }
});
