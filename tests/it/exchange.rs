//! Exchange Online as it really answers (issue 15): replies relay365 used to misread,
//! each injected by the emulator at the stage Microsoft sends it, and the outcome
//! checked: nothing bounced, the mail still queued, and the account refreshed,
//! deferred or held with the fix that matches what Microsoft meant.

use crate::harness::*;
use emu::{Fault, Stage};
use relay365::spool::queue::RcptStatus;

const TAIL: &str =
    "[SY5P282CA0097.outlook.office365.com 2025-11-23T11:12:20.123Z 08DE2A6028D26C22]";

fn dsn_sent(t: &Tenant) -> bool {
    t.emu
        .messages()
        .iter()
        .any(|m| String::from_utf8_lossy(&m.data).contains("multipart/report"))
}

fn queue_one(t: &Tenant) {
    assert_ok(&t.spool.sendmail(
        &["-i", "-f", "shop@contoso.com", "a@example.org"],
        b"Subject: issue 15\n\nbody\n",
    ));
}

/// Still queued, pending, never bounced, and `relay365 quota` says held; returns the log.
#[track_caller]
fn assert_held(t: &Tenant, out: &std::process::Output) -> String {
    assert_left(out);
    let log = stderr(out);
    let queued = t.queued();
    assert_eq!(queued.len(), 1, "{log}");
    assert!(
        queued[0]
            .recipients
            .iter()
            .all(|r| r.status == RcptStatus::Pending),
        "{queued:?}"
    );
    assert!(!dsn_sent(t), "never a bounce: {log}");
    assert!(log.contains("held until"), "{log}");
    let quota = stdout(&t.spool.relay365(&["quota"]));
    assert!(quota.contains("held"), "{quota}");
    log
}

/// Issue 15 item 2: `535 5.7.139 ... the user credentials were incorrect` is a wrong
/// password: the hold names the secrets file, not SMTP AUTH being disabled.
#[test]
fn a_5_7_139_wrong_password_holds_with_the_password_fix_not_smtp_auth_disabled() {
    let t = Tenant::new(Auth::Login);
    queue_one(&t);
    t.emu.inject(
        Fault::reply(
            Stage::Auth,
            &format!("535 5.7.139 Authentication unsuccessful, the user credentials were incorrect. {TAIL}"),
        )
        .forever(),
    );
    let log = assert_held(&t, &t.flush());
    assert!(log.contains("refused the password"), "{log}");
    assert!(log.contains("relay365 account release app"), "{log}");
    assert!(!log.contains("SMTP AUTH is disabled"), "{log}");
}

/// Issue 15 item 2: Conditional Access ("did not meet the criteria") is named as such,
/// for LOGIN and for XOAUTH2 alike.
#[test]
fn conditional_access_holds_with_advice_naming_conditional_access() {
    for auth in [Auth::Login, Auth::Xoauth2] {
        let t = Tenant::new(auth);
        queue_one(&t);
        t.emu.inject(
            Fault::reply(
                Stage::Auth,
                &format!("535 5.7.139 Authentication unsuccessful, the request did not meet the criteria to be authenticated successfully. Contact your administrator. {TAIL}"),
            )
            .forever(),
        );
        let log = assert_held(&t, &t.flush());
        assert!(log.contains("Conditional Access"), "{log}");
        assert!(log.contains("Sign-in logs"), "{log}");
        assert!(!log.contains("SMTP AUTH is disabled"), "{log}");
    }
}

/// Issue 15 item 3: High Volume Email's `501 5.5.127 ... Token will expire soon` at AUTH
/// refreshes the token once and delivers, instead of holding the account for an hour.
#[test]
fn a_high_volume_email_501_at_auth_refreshes_the_token_once_and_delivers() {
    let t = Tenant::new(Auth::Xoauth2);
    queue_one(&t);
    t.emu.inject(Fault::reply(
        Stage::Auth,
        &format!("501 5.5.127 Invalid XOAUTH2 auth data - Token will expire soon {TAIL}"),
    ));
    let out = t.flush();
    assert_ok(&out);
    let log = stderr(&out);
    assert!(t.queued().is_empty(), "{log}");
    assert!(!log.contains("held"), "{log}");
    assert_eq!(t.emu.messages().len(), 1, "{log}");
    let tokens = t.emu.token().expect("token endpoint");
    assert_eq!(tokens.issued(), 2, "one refresh after the 501: {log}");
}

/// Issue 15 item 3: a `501 5.5.12x` again after the refresh holds the account with the
/// fix for that code.
#[test]
fn a_high_volume_email_501_repeated_after_the_refresh_holds_with_the_fix() {
    for (reply, fix) in [
        (
            "501 5.5.127 Invalid XOAUTH2 auth data - Token will expire soon",
            "clock",
        ),
        (
            "501 5.5.124 Invalid XOAUTH2 auth data - User address provided is not valid",
            "Add-HVEAppAccess",
        ),
    ] {
        let t = Tenant::new(Auth::Xoauth2);
        queue_one(&t);
        t.emu
            .inject(Fault::reply(Stage::Auth, &format!("{reply} {TAIL}")).times(2));
        let log = assert_held(&t, &t.flush());
        assert!(log.contains(fix), "{reply}: {log}");
        let tokens = t.emu.token().expect("token endpoint");
        assert_eq!(tokens.issued(), 2, "refreshed exactly once: {log}");
        assert!(t.emu.messages().is_empty());
    }
}

/// Issue 15 item 4: `430 4.2.0 STOREDRV; mailbox logon failure` (an app-only token
/// without access to the mailbox) defers, and the third in a row for the account holds
/// it and alerts with the exact `Add-MailboxPermission` command; nothing is bounced.
#[test]
fn a_repeated_mailbox_logon_failure_defers_twice_then_holds_naming_add_mailboxpermission() {
    let t = Tenant::new(Auth::Xoauth2);
    queue_one(&t);
    t.emu.inject(
        Fault::reply(
            Stage::AfterDot,
            &format!("430 4.2.0 STOREDRV; mailbox logon failure; Failed to process message due to a transient exception with message [BeginDiagnosticData]Cannot open mailbox.[EndDiagnosticData] {TAIL}"),
        )
        .forever(),
    );
    for attempt in 1..=2 {
        let out = t.flush();
        assert_left(&out);
        let log = stderr(&out);
        assert!(log.contains("status=deferred"), "attempt {attempt}: {log}");
        assert!(!log.contains("held until"), "attempt {attempt}: {log}");
        let quota = stdout(&t.spool.relay365(&["quota"]));
        assert!(!quota.contains("held"), "attempt {attempt}: {quota}");
    }
    let log = assert_held(&t, &t.flush());
    assert!(
        log.contains(&format!(
            "Add-MailboxPermission -Identity {MAILBOX} -User <object id of the enterprise application> -AccessRights FullAccess"
        )),
        "{log}"
    );
    assert!(log.contains("New-ServicePrincipal -AppId"), "{log}");
    assert!(log.contains("relay365 account release app"), "{log}");
    // Released and fixed, the message goes out and the count starts again.
    t.emu.clear_faults();
    assert_ok(&t.spool.relay365(&["account", "release", "app"]));
    let out = t.flush();
    assert_ok(&out);
    assert!(t.queued().is_empty(), "{}", stderr(&out));
    assert!(!dsn_sent(&t));
}

/// Issue 15 item 1: the hold for a direct-send or connector refusal at RCPT, and for a
/// tenant block after the final dot, puts the fix in the log.
#[test]
fn direct_send_refused_at_rcpt_and_a_tenant_block_after_data_hold_with_the_fix_in_the_log() {
    for (stage, reply, fix) in [
        (
            Stage::Rcpt(None),
            "550 5.7.68 TenantInboundAttribution; Direct Send not allowed for this organization from unauthorized sources",
            "RejectDirectSend",
        ),
        (
            Stage::Rcpt(None),
            "550 5.7.64 TenantAttribution; Relay Access Denied",
            "inbound connector",
        ),
        (
            Stage::AfterDot,
            "550 5.7.708 Service unavailable. Access denied, traffic not accepted from this IP.",
            "whole tenant",
        ),
    ] {
        let t = Tenant::new(Auth::Login);
        queue_one(&t);
        t.emu
            .inject(Fault::reply(stage, &format!("{reply} {TAIL}")).forever());
        let log = assert_held(&t, &t.flush());
        assert!(log.contains(fix), "{reply}: {log}");
        assert!(log.contains("relay365 account release"), "{reply}: {log}");
    }
}
