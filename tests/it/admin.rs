//! The administrator's queue commands: show, hold, release, retry, delete, and their
//! errors (exit code and message).

use std::time::Duration;

use crate::harness::*;
use emu::{Fault, Stage};

fn only_id(t: &Tenant) -> String {
    let q = t.queued();
    assert_eq!(q.len(), 1);
    q[0].id.to_string()
}

#[test]
fn show_hold_release_retry_delete() {
    let t = Tenant::new(Auth::Login);
    assert_ok(
        &t.spool
            .sendmail(&["-i", "x@example.org"], b"Subject: managed\n\nbody text\n"),
    );
    t.emu
        .inject(Fault::reply(Stage::AfterDot, "451 4.7.0 Temporary server error").times(1));
    assert_left(&t.flush());
    let id = only_id(&t);

    let out = t.spool.relay365(&["queue", "show", &id]);
    assert_ok(&out);
    let text = stdout(&out);
    assert!(
        text.contains("\"address\": \"x@example.org\"") && text.contains("Subject: managed"),
        "{text}"
    );
    assert!(
        text.contains("Temporary server error"),
        "the last error is shown: {text}"
    );

    assert_ok(&t.spool.relay365(&["queue", "hold", &id]));
    assert!(
        stdout(&t.spool.sendmail(&["-bp"], b"")).contains(&format!("{id}!")),
        "held messages are marked"
    );
    assert_left(&t.flush());
    assert_eq!(
        t.emu.message_count(),
        0,
        "a held message is not delivered, even by flush"
    );

    assert_ok(&t.spool.relay365(&["queue", "release", &id]));
    assert_ok(&t.flush());
    assert!(t.emu.wait_for_messages(1, Duration::from_secs(5)));
    assert!(t.queued().is_empty());

    assert_ok(
        &t.spool
            .sendmail(&["-i", "y@example.org"], b"Subject: doomed\n\nx\n"),
    );
    t.emu
        .inject(Fault::reply(Stage::AfterDot, "451 4.7.0 Temporary server error").times(1));
    assert_left(&t.flush());
    let id = only_id(&t);
    assert_ok(&t.spool.relay365(&["queue", "retry", &id]));
    assert_eq!(t.queued()[0].next_attempt_us, 0);
    let out = t.spool.relay365(&["queue", "delete", &id]);
    assert_ok(&out);
    assert!(t.queued().is_empty());
    assert_eq!(
        t.emu.message_count(),
        1,
        "deleted, neither delivered nor bounced"
    );
}

#[test]
fn queue_commands_refuse_bad_or_unknown_ids() {
    let s = Spool::new("");
    assert_fails(
        &s.relay365(&["queue", "show", "../../etc/passwd"]),
        64,
        "not a relay365 queue id",
    );
    assert_fails(
        &s.relay365(&["queue", "hold", "0123456789ABCDEF01234567"]),
        66,
        "no message",
    );
    assert_fails(
        &s.relay365(&["queue", "delete", "0123456789ABCDEF01234567"]),
        66,
        "no message",
    );
    assert_fails(
        &s.relay365(&["account", "release", "nope"]),
        64,
        "no account named",
    );
    assert_fails(&s.relay365(&["frobnicate"]), 64, "unrecognized subcommand");
}

#[test]
fn no_account_configured_keeps_mail_queued_and_says_why() {
    let s = Spool::new("");
    assert_ok(&s.sendmail(&["-i", "x@example.org"], b"Subject: s\n\nx\n"));
    assert_left(&s.relay365(&["flush", "-v"]));
    let text = stdout(&s.sendmail_as("mailq", &[], b""));
    assert!(text.contains("no [[account]] is configured"), "{text}");
    let out = s.relay365(&["check"]);
    assert_eq!(out.status.code(), Some(78));
    assert!(stdout(&out).contains("no [[account]]"));
}
