//! The queue listing behind `mailq`, `sendmail -bp` and `relay365 queue list`:
//! Postfix's format, envelope data only — never a message body.
//!
//! Reads `queue/` envelopes (world-readable by design) and, where this process may
//! list it (root, the daemon, a test's own spool), `incoming/new`. Every file is
//! distrusted: unreadable or malformed entries are skipped, never fatal.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::QueueId;
use super::envelope::{Envelope, MAGIC, MAX_ENVELOPE_LINE};
use super::paths::Spool;
use super::queue::{LockTable, Queue};
use crate::message::complete::short_date;

/// Where a listed message stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Waiting for the daemon's pickup.
    Incoming,
    /// In the queue, waiting for its next attempt.
    Deferred,
    /// Being delivered now.
    Active,
    /// Held by an administrator or because its account is held.
    Held,
}

/// One recipient line of the listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedRecipient {
    pub address: String,
    /// Why it waits (the last error, a quota), if known.
    pub reason: Option<String>,
}

/// One message of the listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub id: QueueId,
    pub size: u64,
    pub arrival_us: u64,
    pub sender: String,
    pub state: State,
    pub recipients: Vec<ListedRecipient>,
    /// When the next attempt is due, as text, if known.
    pub next_attempt: Option<String>,
    /// The same in microseconds since the epoch (`--json`).
    pub next_attempt_us: Option<u64>,
}

/// An incoming file larger than this cannot be a message any configuration accepts
/// (`max_message_size` is bounded far below it); it is not even opened for reading.
pub const MAX_INCOMING_FILE: u64 = 4 << 30;

/// Reads the envelope line of an incoming file without reading the message: the
/// magic line and at most [`MAX_ENVELOPE_LINE`] bytes, validated by
/// [`Envelope::parse_line`]. `None` for anything that is not a plain file of ours.
/// The setgid `mailq` runs this with the drop group raised.
pub fn read_incoming_envelope(path: &Path) -> Option<Envelope> {
    use std::os::unix::fs::MetadataExt;
    // SECURITY: O_NOFOLLOW: a planted symlink is not followed, even by root's mailq;
    // O_NONBLOCK: a planted FIFO does not hang the open.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK | nix::libc::O_CLOEXEC)
        .open(path)
        .ok()?;
    let meta = file.metadata().ok()?;
    // SECURITY: a regular file with one link (a hard link to another file would show
    // that file's first line) and of a size a message can have.
    if !meta.file_type().is_file() || meta.nlink() != 1 || meta.len() > MAX_INCOMING_FILE {
        return None;
    }
    let mut r = BufReader::new(file.take(MAGIC.len() as u64 + MAX_ENVELOPE_LINE as u64));
    let mut magic = vec![0u8; MAGIC.len()];
    r.read_exact(&mut magic).ok()?;
    if magic != MAGIC {
        return None;
    }
    let mut line = Vec::new();
    r.read_until(b'\n', &mut line).ok()?;
    Envelope::parse_line(line.strip_suffix(b"\n")?).ok()
}

/// A listed incoming message from its id and envelope.
pub fn incoming_entry(id: QueueId, env: Envelope) -> Listed {
    Listed {
        id,
        size: env.size,
        arrival_us: env.arrival_us,
        sender: env.sender.as_str().to_string(),
        state: State::Incoming,
        recipients: env
            .recipients
            .into_iter()
            .map(|address| ListedRecipient {
                address: address.to_string(),
                reason: None,
            })
            .collect(),
        next_attempt: None,
        next_attempt_us: None,
    }
}

/// Messages waiting in `incoming/new`, or why this process may not list it.
pub fn incoming_checked(spool: &Spool) -> std::io::Result<Vec<Listed>> {
    let dir = std::fs::read_dir(spool.incoming_new())?;
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(id) = name.to_str().and_then(|n| QueueId::parse(n).ok()) else {
            continue;
        };
        let Some(env) = read_incoming_envelope(&entry.path()) else {
            continue;
        };
        out.push(incoming_entry(id, env));
    }
    Ok(out)
}

/// Messages waiting in `incoming/new`, if this process may list it.
pub fn incoming(spool: &Spool) -> Vec<Listed> {
    incoming_checked(spool).unwrap_or_default()
}

/// Sorts a listing oldest first, as `mailq` shows it.
pub fn sort(entries: &mut [Listed]) {
    entries.sort_by(|a, b| {
        a.arrival_us
            .cmp(&b.arrival_us)
            .then_with(|| a.id.cmp(&b.id))
    });
}

/// Messages in the daemon's queue that still have recipients to deliver.
pub fn queued(spool: &Spool) -> Vec<Listed> {
    let queue = Queue::new(spool);
    let Ok(ids) = queue.scan() else {
        return Vec::new();
    };
    let locks = LockTable::read(queue.dir());
    let now = SystemTime::now();
    let mut out = Vec::new();
    for (id, msg_inode) in ids {
        let Ok(entry) = queue.read(&id) else {
            continue;
        };
        if !entry.has_pending() {
            continue;
        }
        let locked = match (&locks, msg_inode) {
            (Some(table), Some(inode)) => table.holds(inode),
            _ => queue.is_locked(&id),
        };
        let state = if entry.held {
            State::Held
        } else if locked {
            State::Active
        } else {
            State::Deferred
        };
        let next_attempt = (entry.next_attempt() > now && !entry.held)
            .then(|| crate::message::complete::rfc5322_date(entry.next_attempt()));
        let next_attempt_us =
            (entry.next_attempt() > now && !entry.held).then_some(entry.next_attempt_us);
        let recipients = entry
            .pending()
            .map(|r| ListedRecipient {
                address: r.address.to_string(),
                reason: r.reply.clone().or_else(|| entry.reason.clone()),
            })
            .collect();
        out.push(Listed {
            id,
            size: entry.size,
            arrival_us: entry.arrival_us,
            sender: entry.sender.to_string(),
            state,
            recipients,
            next_attempt,
            next_attempt_us,
        });
    }
    out
}

/// Everything waiting, oldest first: what `mailq` shows.
pub fn list(spool: &Spool) -> Vec<Listed> {
    let mut entries = incoming(spool);
    entries.extend(queued(spool));
    sort(&mut entries);
    entries
}

/// Formats a listing the way Postfix's `mailq` does.
pub fn format(entries: &[Listed]) -> String {
    if entries.is_empty() {
        return "Mail queue is empty\n".to_string();
    }
    // The indent of the lines under a message, written as one string: `{:>45}` pads
    // a character at a time, which was a visible part of listing 100,000 messages.
    const INDENT: &str = "                                             ";
    let mut out = String::with_capacity(entries.len() * 192);
    out.push_str(
        "-Queue ID-------------- --Size-- ----Arrival Time---- -Sender/Recipient-------\n",
    );
    let mut total = 0u64;
    for e in entries {
        total += e.size;
        let mark = match e.state {
            State::Active => '*',
            State::Held => '!',
            State::Incoming | State::Deferred => ' ',
        };
        let arrival = short_date(UNIX_EPOCH + Duration::from_micros(e.arrival_us));
        let sender = if e.sender.is_empty() {
            "MAILER-DAEMON"
        } else {
            &e.sender
        };
        out.push_str(&format!(
            "{}{mark}{:>8} {arrival}  {sender}\n",
            e.id, e.size
        ));
        if e.state == State::Incoming {
            out.push_str(INDENT);
            out.push_str("(waiting for pickup by the relay365 daemon)\n");
        }
        if let Some(next) = &e.next_attempt {
            out.push_str(INDENT);
            out.push_str("next attempt ");
            out.push_str(next);
            out.push('\n');
        }
        let mut last_reason: Option<&str> = None;
        for r in &e.recipients {
            if let Some(reason) = r.reason.as_deref()
                && last_reason != Some(reason)
            {
                out.push_str(INDENT);
                out.push('(');
                out.push_str(reason);
                out.push_str(")\n");
                last_reason = Some(reason);
            }
            out.push_str(INDENT);
            out.push_str(&r.address);
            out.push('\n');
        }
        out.push('\n');
    }
    let kb = total.div_ceil(1024);
    let n = entries.len();
    out.push_str(&format!(
        "-- {kb} Kbytes in {n} Request{}.\n",
        if n == 1 { "" } else { "s" }
    ));
    out
}

impl State {
    /// The `queue_name` of `--json`: Postfix's queue names where one applies.
    pub fn queue_name(&self) -> &'static str {
        match self {
            State::Incoming => "incoming",
            State::Deferred => "deferred",
            State::Active => "active",
            State::Held => "hold",
        }
    }
}

/// The listing as JSON Lines, one object per message, with the fields of Postfix's
/// `postqueue -j` (queue_name, queue_id, arrival_time, message_size, sender,
/// recipients with address and delay_reason) plus relay365's `next_attempt` (seconds
/// since the epoch, or null when due now or unknown) and each recipient's `state`
/// (the message's queue_name: relay365 schedules whole messages). Times are whole
/// seconds since the epoch, as in Postfix; the schema is documented in relay365(8)
/// and only grows.
pub fn json_lines(entries: &[Listed]) -> String {
    let mut out = String::new();
    for e in entries {
        let next = e.next_attempt_us.map(|us| us / 1_000_000);
        let recipients: Vec<serde_json::Value> = e
            .recipients
            .iter()
            .map(|r| {
                let mut o = serde_json::json!({
                    "address": r.address,
                    "state": e.state.queue_name(),
                    "next_attempt": next,
                });
                if let (Some(reason), Some(map)) = (&r.reason, o.as_object_mut()) {
                    map.insert("delay_reason".into(), reason.clone().into());
                }
                o
            })
            .collect();
        let o = serde_json::json!({
            "queue_name": e.state.queue_name(),
            "queue_id": e.id.as_str(),
            "arrival_time": e.arrival_us / 1_000_000,
            "message_size": e.size,
            "sender": e.sender,
            "recipients": recipients,
            "next_attempt": next,
        });
        out.push_str(&o.to_string());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_queue() {
        assert_eq!(format(&[]), "Mail queue is empty\n");
    }

    #[test]
    fn postfix_style_rows() {
        let e = Listed {
            id: QueueId::parse("0000000000000000000000AB").unwrap(),
            size: 3072,
            arrival_us: 1_795_734_105_000_000,
            sender: "alice@example.com".into(),
            state: State::Deferred,
            recipients: vec![ListedRecipient {
                address: "bob@example.org".into(),
                reason: Some("quota: 10000/10000 recipients in 24h, room at 14:02:11".into()),
            }],
            next_attempt: None,
            next_attempt_us: Some(1_795_734_165_000_000),
        };
        let json = json_lines(std::slice::from_ref(&e));
        let v: serde_json::Value = serde_json::from_str(json.trim_end()).unwrap();
        assert_eq!(v["queue_name"], "deferred");
        assert_eq!(v["queue_id"], "0000000000000000000000AB");
        assert_eq!(v["arrival_time"], 1_795_734_105u64);
        assert_eq!(v["message_size"], 3072);
        assert_eq!(v["sender"], "alice@example.com");
        assert_eq!(v["next_attempt"], 1_795_734_165u64);
        assert_eq!(v["recipients"][0]["address"], "bob@example.org");
        assert_eq!(v["recipients"][0]["state"], "deferred");
        assert!(
            v["recipients"][0]["delay_reason"]
                .as_str()
                .unwrap()
                .starts_with("quota:")
        );
        let text = format(&[e]);
        assert!(
            text.contains(
                "0000000000000000000000AB     3072 Thu Nov 26 23:01:45  alice@example.com\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("(quota: 10000/10000 recipients in 24h, room at 14:02:11)\n"),
            "{text}"
        );
        assert!(text.ends_with("-- 3 Kbytes in 1 Request.\n"), "{text}");
    }
}
