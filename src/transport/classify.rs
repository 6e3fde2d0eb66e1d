//! Reply classification: turns an SMTP reply from Exchange Online, plus the stage of the
//! dialogue it answered, into what the daemon must do (defer, bounce, freeze or hold the
//! account, ...), following the table in docs/exchange-online.md.
//!
//! Trust: reply text comes from the remote server and is untrusted. It is parsed strictly,
//! stripped of control characters and bounded in length before anything (logs, DSNs)
//! can see it. Matching uses substrings and status-code tokens, never whole lines, because
//! Exchange appends `[HOSTNAME timestamp id]` and `[BeginDiagnosticData]...` tails.

use std::fmt;
use std::time::Duration;

use super::reply::{MAX_REPLY_TEXT, Reply, sanitize};

/// First retry delay of the ordinary backoff.
pub const BACKOFF_START: Duration = Duration::from_secs(60);
/// Longest delay of the ordinary backoff.
pub const BACKOFF_CAP: Duration = Duration::from_secs(3600);
/// First pause after `Sender throttled`.
pub const PAUSE_START: Duration = Duration::from_secs(3600);
/// Longest pause after repeated `Sender throttled`.
pub const PAUSE_CAP: Duration = Duration::from_secs(24 * 3600);
/// Shortest wait after `432 4.3.2` (too many connections); the doc says 30–60 s.
pub const CONNECTION_RETRY_MIN: Duration = Duration::from_secs(30);
/// Longest wait after `432 4.3.2`; callers pick a point in between to spread retries.
pub const CONNECTION_RETRY_MAX: Duration = Duration::from_secs(60);
/// How often a held account is probed to see whether the admin fixed it.
pub const HOLD_PROBE_INTERVAL: Duration = Duration::from_secs(3600);

/// Where in the SMTP dialogue a reply came.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    Connect,
    Greeting,
    Ehlo,
    StartTls,
    Auth,
    Mail,
    Rcpt,
    Data,
    AfterDot,
}

impl Stage {
    /// Whether a reply at this stage concerns the session or account, not one message.
    fn is_session(self) -> bool {
        matches!(
            self,
            Stage::Connect | Stage::Greeting | Stage::Ehlo | Stage::StartTls | Stage::Auth
        )
    }
}

impl fmt::Display for Stage {
    /// Postfix's "(in reply to ... command)" wording.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Connect => "connect",
            Stage::Greeting => "initial greeting",
            Stage::Ehlo => "EHLO",
            Stage::StartTls => "STARTTLS",
            Stage::Auth => "AUTH",
            Stage::Mail => "MAIL FROM",
            Stage::Rcpt => "RCPT TO",
            Stage::Data => "DATA",
            Stage::AfterDot => "end of DATA",
        })
    }
}

/// Which quota froze an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quota {
    /// The mailbox's 10,000 recipients per rolling 24 hours.
    Daily,
    /// The tenant's external-recipient limit (`5.7.233`, trial tenants `5.7.232`).
    Tenant,
}

impl Quota {
    /// When to try again if the quota ledger cannot tell: 24 h for the daily mailbox
    /// quota, hourly for the tenant quota.
    pub fn fallback_retry(self) -> Duration {
        match self {
            Quota::Daily => Duration::from_secs(24 * 3600),
            Quota::Tenant => Duration::from_secs(3600),
        }
    }
}

/// How long a held account stays held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldUntil {
    /// Until an admin releases it; probe every [`HOLD_PROBE_INTERVAL`].
    Release,
    /// Until the next UTC midnight or an admin release, whichever is first.
    NextUtcDay,
}

/// What the daemon must do after a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// A 2xx or 3xx reply: the step succeeded.
    Accepted,
    /// Defer every message of the account until the quota frees room; never bounce.
    FreezeAccount(Quota),
    /// Close this connection and retry after 30–60 s with fewer connections.
    ReduceConnections,
    /// Pause the account for [`pause_for`] of the consecutive throttles; alert.
    PauseAccount,
    /// Credentials or token rejected: refresh the OAuth2 token once and retry, then hold
    /// the account and alert. Never bounce.
    AuthFailed,
    /// Stop sending from the account and alert with `fix`; never bounce.
    HoldAccount { until: HoldUntil, fix: String },
    /// Too many recipients in one transaction: resend in smaller batches.
    SplitRecipients,
    /// Permanent for this message: bounce it to its sender and never retry it.
    BounceMessage,
    /// Permanent for this recipient: bounce it, keep the others.
    BounceRecipient,
    /// Temporary: retry with [`backoff`]. `hint` is the alert to raise if it repeats.
    Defer { hint: Option<String> },
    /// The server asked for exactly this long without requests from the account (HTTP
    /// `429`/`503` with `Retry-After`): every message of the account waits, nothing is
    /// bounced, no backoff is added.
    WaitAccount(Duration),
}

impl Action {
    /// Whether the admin must be told now (the doc's "alert").
    pub fn alerts(&self) -> bool {
        matches!(
            self,
            Action::FreezeAccount(Quota::Tenant)
                | Action::PauseAccount
                | Action::HoldAccount { .. }
        )
    }

    /// Whether this verdict sends a DSN to the message's sender.
    pub fn bounces(&self) -> bool {
        matches!(self, Action::BounceMessage | Action::BounceRecipient)
    }

    /// Whether a refused recipient with this verdict ends the transaction: anything
    /// but a verdict on that recipient alone (bounce it, defer it, or send it in a
    /// smaller transaction) concerns the account, so the rest is not offered.
    pub fn ends_transaction(&self) -> bool {
        !matches!(
            self,
            Action::SplitRecipients
                | Action::BounceRecipient
                | Action::BounceMessage
                | Action::Defer { .. }
        )
    }
}

/// A classified reply: the action and a plain-words reason for logs, alerts and DSNs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub action: Action,
    pub reason: String,
}

impl Verdict {
    fn new(action: Action, reason: impl Into<String>) -> Verdict {
        Verdict {
            action,
            reason: reason.into(),
        }
    }
}

/// The fix for SMTP AUTH being off, per mailbox or tenant (`5.7.139`).
const SMTP_AUTH_FIX_MAILBOX: &str = "SMTP AUTH is disabled for this mailbox: an Exchange admin can run \
Set-CASMailbox -Identity <mailbox> -SmtpClientAuthenticationDisabled $false";
const SMTP_AUTH_FIX_TENANT: &str = "SMTP AUTH is disabled for the whole tenant: an Exchange admin can run \
Set-TransportConfig -SmtpClientAuthenticationDisabled $false, or enable it for this mailbox only with \
Set-CASMailbox -Identity <mailbox> -SmtpClientAuthenticationDisabled $false";
const SMTP_AUTH_FIX_DEFAULTS: &str = "SMTP AUTH can't be used while Security Defaults are on in \
Microsoft Entra ID: an admin must turn Security Defaults off for this tenant";
const SMTP_AUTH_FIX_ANY: &str = "SMTP AUTH is disabled or blocked for this mailbox or tenant: an Exchange \
admin can run Set-CASMailbox -Identity <mailbox> -SmtpClientAuthenticationDisabled $false (this mailbox) \
or Set-TransportConfig -SmtpClientAuthenticationDisabled $false (whole tenant); it also can't be used \
while Security Defaults are on";
const CONDITIONAL_ACCESS_FIX: &str = "Microsoft Entra ID refused the sign-in: a Conditional \
Access policy (or MFA, or a sign-in risk policy) blocks this mailbox or app from authenticating \
(\"did not meet the criteria to be authenticated successfully\"): an admin can find the failed \
sign-in and the policy that blocked it in the Entra admin center > Monitoring > Sign-in logs, \
then exclude this account or app from that Conditional Access policy (or allow this host's IP \
as a named location)";
const BASIC_AUTH_FIX: &str = "basic authentication (AUTH LOGIN) is turned off for SMTP AUTH: switch \
relay365 to OAuth2 (XOAUTH2, an app registration with SMTP.SendAsApp), or have an admin re-enable \
basic auth for SMTP AUTH while Microsoft still allows it";
const MECHANISM_FIX: &str = "Exchange Online rejected the authentication mechanism: it offers AUTH \
LOGIN and XOAUTH2 only (never PLAIN), and only after STARTTLS; configure one of those two on port 587 \
with STARTTLS";
const NOT_AUTHENTICATED_FIX: &str = "the server received MAIL before a successful AUTH: configure \
authentication (XOAUTH2 or LOGIN) with STARTTLS on smtp.office365.com:587, or for direct send or a \
connector on port 25 check that the connector matches this host";
const TLS_FIX: &str = "the server refused the TLS version: Exchange Online requires TLS 1.2 or later; \
relay365 never offers older versions, so something between this host and Microsoft (a proxy or \
middlebox) is downgrading the connection";
const SPAM_FIX: &str = "Microsoft blocked this mailbox from sending as a suspected spammer: find \
the mailbox under Restricted entities in the Microsoft Defender portal, check it for compromise and \
release it; otherwise sending resumes the next UTC day at the earliest";
const MAILBOX_FULL_FIX: &str = "the sending mailbox is full (the copies in its Sent Items count \
against its quota): empty Sent Items or Deleted Items or raise the mailbox quota, then release the \
hold";
/// The fix for a tenant-level block (5.7.705, 5.7.708, 5.7.750): nothing relay365 can
/// change; every account of the tenant is affected.
pub const TENANT_BLOCK_FIX: &str = "Microsoft blocks outbound mail of the whole tenant \
(5.7.705: the tenant exceeded its threshold or is suspected of spam; 5.7.708: traffic from this \
tenant's IPs is not accepted; 5.7.750: mail from unregistered domains): an admin must open a \
ticket with Microsoft 365 support or register the sending domain as an accepted domain, then \
run relay365 account release <account>";

/// The fix for direct send or a connector refusing this host (`5.7.68`, `5.7.64`): an
/// account-level setup problem, never one message's.
pub const DIRECT_SEND_FIX: &str = "Exchange Online refused mail from this host for the tenant \
(5.7.68 TenantInboundAttribution: direct send is turned off; 5.7.64 TenantAttribution: no inbound \
connector matches this host): for direct send an admin can run Set-OrganizationConfig \
-RejectDirectSend $false; for a connector, create or fix the inbound connector (Exchange admin \
center > Mail flow > Connectors) so it matches this host's public IP or its client certificate; \
or use SMTP AUTH client submission (smtp.office365.com:587); then run relay365 account release \
<account>";

const SENDAS_REASON: &str = "Exchange Online does not allow this mailbox to send as the message's \
sender (SendAs denied): set from = \"rewrite\" in relay365.toml so relay365 rewrites the sender to \
the mailbox, or have an admin grant Send As for this address (Add-RecipientPermission)";
const LOGON_HINT: &str = "the mailbox refused the app's logon: if this repeats, give the app's \
service principal access with Add-MailboxPermission -Identity <mailbox> -User <service principal> \
-AccessRights FullAccess";
/// After this many consecutive `430 4.2.0 mailbox logon failure` replies for an account,
/// the deferral becomes a hold with [`logon_fix`].
pub const LOGON_REPEATS_HOLD: u32 = 3;

/// Whether `v` is the deferral for `430 4.2.0 mailbox logon failure`, which holds the
/// account once it repeats [`LOGON_REPEATS_HOLD`] times.
pub fn is_logon_failure(v: &Verdict) -> bool {
    matches!(&v.action, Action::Defer { hint: Some(h) } if h == LOGON_HINT)
}

/// The hold after repeated mailbox logon failures: an app-only token without access to
/// the mailbox. The exact PowerShell, with the mailbox and app filled in.
pub fn logon_fix(mailbox: &str, client_id: &str, account: &str) -> String {
    format!(
        "the mailbox {mailbox} refused the app's logon {LOGON_REPEATS_HOLD} times in a row (430 \
         4.2.0 mailbox logon failure): the app's token has no access to the mailbox. An Exchange \
         admin can run, in Exchange Online PowerShell: New-ServicePrincipal -AppId {client_id} \
         -ObjectId <object id of the enterprise application> (once), then \
         Add-MailboxPermission -Identity {mailbox} -User <object id of the enterprise \
         application> -AccessRights FullAccess; then run relay365 account release {account}"
    )
}

/// Longest `Retry-After` honoured as given; a longer one (or a date) is cut to this,
/// so a broken proxy cannot park an account for days.
pub const RETRY_AFTER_CAP: Duration = Duration::from_secs(24 * 3600);
/// The wait after a `429`/`503` without a usable `Retry-After`.
pub const RETRY_AFTER_DEFAULT: Duration = Duration::from_secs(60);

/// One HTTP answer from Microsoft Graph: the status, the `error.code` and
/// `error.message` of its JSON body (empty when there was none) and `Retry-After`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpAnswer<'a> {
    pub status: u16,
    pub code: &'a str,
    pub message: &'a str,
    pub retry_after: Option<Duration>,
}

/// The fix for an app that Graph refuses (`403 ErrorAccessDenied`): the permission, its
/// consent, and the Exchange policy that limits it to some mailboxes.
pub const GRAPH_ACCESS_FIX: &str = "Microsoft Graph denied the app access to this mailbox: \
give the app registration the Mail.Send application permission with admin consent (Entra ID > \
App registrations > API permissions; Mail.ReadWrite too for harvest_bounces), and if access is \
limited to some mailboxes, include this one: New-ApplicationAccessPolicy -AppId <client_id> \
-PolicyScopeGroupId <group containing the mailbox> -AccessRight RestrictAccess (check with \
Test-ApplicationAccessPolicy -Identity <mailbox> -AppId <client_id>), or with RBAC for \
Applications New-ManagementRoleAssignment -App <service principal> -Role \"Application Mail.Send\" \
-CustomResourceScope <scope>; then run relay365 account release <account>";
const GRAPH_MAILBOX_FIX: &str = "Microsoft Graph does not know this mailbox (or it has no \
Exchange Online license or is not in the cloud): check mailbox = in relay365.toml and the \
mailbox's license";
const GRAPH_TOKEN_FIX: &str = "Microsoft Graph refused a freshly fetched token: check that the \
app registration has the Mail.Send application permission with admin consent, that the token is \
for https://graph.microsoft.com (the national cloud's Graph for GCC High, DoD or China: set \
[account.graph] url), then run relay365 account release <account>";

/// Classifies an answer of Microsoft Graph (`sendMail`, a draft or upload request) in
/// the same table as SMTP replies: Microsoft's error codes and texts first (the quota,
/// spam and Send As ones carry the SMTP status codes in their message), the HTTP status
/// last. Codes from "Microsoft Graph error responses" and the Outlook mail API.
pub fn classify_http(a: &HttpAnswer) -> Verdict {
    let code = a.code.to_ascii_lowercase();
    let text = a.message.to_ascii_lowercase();
    let has = |n: &str| text.contains(n) || code.contains(n);
    let shown = format!(
        "{} {}: {}",
        a.status,
        sanitize(a.code, 80),
        sanitize(a.message, MAX_REPLY_TEXT)
    );
    let shown = shown.trim_end_matches([':', ' ']).to_owned();
    if (200..300).contains(&a.status) {
        return Verdict::new(Action::Accepted, format!("accepted: {shown}"));
    }
    if a.status == 429 || a.status == 503 {
        let wait = a
            .retry_after
            .unwrap_or(RETRY_AFTER_DEFAULT)
            .min(RETRY_AFTER_CAP);
        return Verdict::new(
            Action::WaitAccount(wait),
            format!(
                "Microsoft Graph asked to wait {} s before the next request of this mailbox ({shown})",
                wait.as_secs()
            ),
        );
    }
    if has("submissionquotaexceeded") || has("submission quota") || has("5.1.90") {
        return Verdict::new(
            Action::FreezeAccount(Quota::Daily),
            "the mailbox reached its daily recipient quota (10,000 per rolling 24 hours): every \
             message of this mailbox waits until its 24-hour ledger frees room",
        );
    }
    if has("5.7.233") || has("5.7.232") {
        return Verdict::new(
            Action::FreezeAccount(Quota::Tenant),
            "the tenant reached its daily limit of external recipients: mail waits and is retried \
             hourly; an admin should check the tenant's outbound volume",
        );
    }
    if has("5.7.705") || has("5.7.708") || has("5.7.750") {
        return graph_hold(HoldUntil::Release, TENANT_BLOCK_FIX, &shown);
    }
    if has("messagesubmissionblocked") || has("5.1.8") || has("outboundspam") {
        return graph_hold(HoldUntil::NextUtcDay, SPAM_FIX, &shown);
    }
    if has("sendasdenied") || has("5.7.60") {
        return Verdict::new(Action::BounceMessage, format!("{SENDAS_REASON} ({shown})"));
    }
    if a.status == 401 || code == "invalidauthenticationtoken" {
        return Verdict::new(
            Action::AuthFailed,
            format!(
                "Microsoft Graph refused the token ({shown}): refreshing it once; if that fails the \
                 account is held: {GRAPH_TOKEN_FIX}"
            ),
        );
    }
    if code == "erroraccessdenied" || has("accesspolicy") || code == "authorization_requestdenied" {
        return graph_hold(HoldUntil::Release, GRAPH_ACCESS_FIX, &shown);
    }
    if code == "errorquotaexceeded" {
        return graph_hold(HoldUntil::Release, MAILBOX_FULL_FIX, &shown);
    }
    if code == "errorinvaliduser"
        || code == "mailboxnotenabledforrestapi"
        || code == "mailboxnothostedinexchangeonline"
    {
        return graph_hold(HoldUntil::Release, GRAPH_MAILBOX_FIX, &shown);
    }
    if code == "errormessagesizeexceeded" || has("maxsubmissionexceeded") || a.status == 413 {
        return Verdict::new(
            Action::BounceMessage,
            format!(
                "the message is larger than this mailbox may send (35 MB by default, at most 150 MB): \
                 send it smaller or ask an admin to raise the mailbox's maximum send size ({shown})"
            ),
        );
    }
    if code == "errorinvalidrecipients" || has("5.1.1") || has("not resolved") {
        return Verdict::new(
            Action::BounceRecipient,
            format!("Microsoft Graph rejected this recipient: {shown}"),
        );
    }
    if has("reciplimit") || code == "errortoomanyrecipients" {
        return Verdict::new(
            Action::SplitRecipients,
            "too many recipients in one message for this mailbox: sending in smaller batches",
        );
    }
    if a.status >= 500 || a.status == 408 {
        return Verdict::new(
            Action::Defer { hint: None },
            format!("temporary failure of Microsoft Graph, retrying later: {shown}"),
        );
    }
    if matches!(a.status, 400 | 415 | 422) {
        return Verdict::new(
            Action::BounceMessage,
            format!("Microsoft Graph refused the message: {shown}"),
        );
    }
    // 404 on the endpoint, 405, 409...: nothing about one message; bouncing would
    // bounce the queue.
    graph_hold(
        HoldUntil::Release,
        "Microsoft Graph refused the request for a reason that is not about one message: check \
         [account.graph] url, mailbox and the app's permissions in relay365.toml",
        &shown,
    )
}

fn graph_hold(until: HoldUntil, fix: &str, shown: &str) -> Verdict {
    Verdict::new(
        Action::HoldAccount {
            until,
            fix: fix.to_owned(),
        },
        format!("{fix} (Microsoft Graph said: {shown})"),
    )
}

/// Classifies `reply`, received at `stage`. Specific texts and codes first, the reply
/// class last, exactly in the order of the table in docs/exchange-online.md.
pub fn classify(reply: &Reply, stage: Stage) -> Verdict {
    let text = reply.text.to_ascii_lowercase();
    let has = |needle: &str| text.contains(needle);
    let code = reply.code;
    let permanent = reply.class() == 5;

    if reply.class() <= 3 {
        return Verdict::new(Action::Accepted, format!("accepted: {reply}"));
    }

    // Quota replies are 5xx and must never bounce.
    if has("submissionquotaexceededexception")
        || has("submission quota")
        || reply.mentions((5, 1, 90))
    {
        return Verdict::new(
            Action::FreezeAccount(Quota::Daily),
            "the mailbox reached its daily recipient quota (10,000 per rolling 24 hours): every \
             message of this mailbox waits until its 24-hour ledger frees room",
        );
    }
    if reply.mentions((5, 7, 233)) || reply.mentions((5, 7, 232)) {
        return Verdict::new(
            Action::FreezeAccount(Quota::Tenant),
            "the tenant reached its daily limit of external recipients: mail waits and is retried \
             hourly; an admin should check the tenant's outbound volume",
        );
    }

    // "Sender throttled" shares 5.2.252 with SendAsDenied, so the text decides first.
    if has("sender throttled") {
        return throttled();
    }
    if has("sendasdenied") || reply.mentions((5, 7, 60)) {
        return Verdict::new(Action::BounceMessage, SENDAS_REASON);
    }
    if reply.mentions_range(5, 2, 251, 255) {
        return throttled();
    }

    if (code == 432 && reply.enhanced.is_none_or(|e| e == (4, 3, 2)))
        || has("concurrent connections limit exceeded")
        || has("sender thread limit exceeded")
    {
        return Verdict::new(
            Action::ReduceConnections,
            "too many concurrent connections for this mailbox (Exchange Online allows 3): \
             closing this one and retrying in 30-60 s with fewer",
        );
    }

    // Auth-disabled codes before the generic 535, since 5.7.139 also comes as 535.
    if reply.mentions((5, 7, 139)) {
        if has("credentials were incorrect") {
            // A wrong password (or a refused token), not SMTP AUTH being off.
            return auth_failed(reply);
        }
        let fix = if has("did not meet the criteria") || has("conditional access") {
            CONDITIONAL_ACCESS_FIX
        } else if has("disabled for the tenant") {
            SMTP_AUTH_FIX_TENANT
        } else if has("disabled for the mailbox") {
            SMTP_AUTH_FIX_MAILBOX
        } else if has("security defaults") {
            SMTP_AUTH_FIX_DEFAULTS
        } else if has("basic authentication is disabled") {
            BASIC_AUTH_FIX
        } else {
            SMTP_AUTH_FIX_ANY
        };
        return hold(HoldUntil::Release, fix, reply);
    }
    if reply.mentions((5, 7, 30)) {
        return hold(HoldUntil::Release, BASIC_AUTH_FIX, reply);
    }
    if code == 504 && reply.mentions((5, 7, 4)) {
        return hold(HoldUntil::Release, MECHANISM_FIX, reply);
    }
    if code == 530 && reply.mentions((5, 7, 57)) {
        return hold(HoldUntil::Release, NOT_AUTHENTICATED_FIX, reply);
    }
    if reply.mentions((4, 7, 66)) {
        return hold(HoldUntil::Release, TLS_FIX, reply);
    }
    // High Volume Email refuses a token close to its expiry (5.5.127) or for the wrong
    // user (5.5.124) with 501 5.5.12x: refresh the token once, then hold.
    if code == 535 || (stage == Stage::Auth && code == 501 && reply.mentions_range(5, 5, 120, 129))
    {
        return auth_failed(reply);
    }

    // Account-level at any stage (RCPT and the end of DATA too): never bounce the queue.
    if reply.mentions((5, 7, 68))
        || reply.mentions((5, 7, 64))
        || has("tenantinboundattribution")
        || has("tenantattribution")
    {
        return hold(HoldUntil::Release, DIRECT_SEND_FIX, reply);
    }
    if reply.mentions((5, 7, 705)) || reply.mentions((5, 7, 708)) || reply.mentions((5, 7, 750)) {
        return hold(HoldUntil::Release, TENANT_BLOCK_FIX, reply);
    }

    if reply.mentions((5, 1, 8)) || has("outboundspamexception") {
        return hold(HoldUntil::NextUtcDay, SPAM_FIX, reply);
    }

    // At RCPT, 5.2.2 is the recipient's mailbox; after the envelope it is the sender's.
    if reply.mentions((5, 2, 2)) && (stage != Stage::Rcpt || has("storedrv")) {
        return hold(HoldUntil::Release, MAILBOX_FULL_FIX, reply);
    }

    if (permanent && reply.mentions((5, 3, 4))) || has("maxsubmissionexceeded") {
        return Verdict::new(
            Action::BounceMessage,
            "the message is larger than this mailbox may send (35 MB by default, at most 150 MB): \
             send it smaller or ask an admin to raise the mailbox's maximum send size",
        );
    }

    // X.5.3 is RFC 3463's "too many recipients".
    if has("resolver.adr.reciplimit") || reply.mentions((4, 5, 3)) || reply.mentions((5, 5, 3)) {
        return Verdict::new(
            Action::SplitRecipients,
            "too many recipients in one message for this mailbox: sending in smaller batches",
        );
    }

    if has("mailbox logon failure") || (code == 430 && reply.mentions((4, 2, 0))) {
        return Verdict::new(
            Action::Defer {
                hint: Some(LOGON_HINT.to_owned()),
            },
            format!("mailbox logon failed, retrying later: {reply}"),
        );
    }

    if !permanent {
        return Verdict::new(
            Action::Defer { hint: None },
            format!("temporary failure in reply to {stage}, retrying later: {reply}"),
        );
    }
    if stage.is_session() {
        // Not about any one message: bouncing here would bounce the whole queue.
        return hold(
            HoldUntil::Release,
            "the server refused the session before any message was sent: check host, port, TLS \
             and authentication settings in relay365.toml",
            reply,
        );
    }
    if stage == Stage::Rcpt {
        return Verdict::new(
            Action::BounceRecipient,
            format!("the server rejected this recipient: {reply}"),
        );
    }
    Verdict::new(
        Action::BounceMessage,
        format!("the server rejected the message in reply to {stage}: {reply}"),
    )
}

/// The verdict for a message larger than the server's advertised `SIZE` limit: it would
/// be refused at the end of DATA, so it is bounced without being sent.
pub fn too_big(size: usize, limit: u64) -> Verdict {
    Verdict::new(
        Action::BounceMessage,
        format!("552 5.3.4 message size {size} exceeds the server's limit of {limit} bytes"),
    )
}

/// The verdict for a server certificate that is not trusted: an account problem only
/// the administrator can fix (wrong host, a missing `ca_file`, an intercepting proxy),
/// so the account is held and probed hourly, never bounced.
pub fn untrusted_certificate(detail: &str) -> Verdict {
    let fix = format!(
        "the server's TLS certificate is not trusted ({detail}): check host, and set ca_file if the server uses a private CA"
    );
    Verdict {
        action: Action::HoldAccount {
            until: HoldUntil::Release,
            fix: fix.clone(),
        },
        reason: fix,
    }
}

/// The verdict for a failure with no reply at all: dropped connection, timeout, TLS error.
pub fn classify_no_reply(stage: Stage, what: &str) -> Verdict {
    Verdict::new(
        Action::Defer { hint: None },
        format!(
            "no reply in {stage} ({}), retrying later",
            sanitize(what, MAX_REPLY_TEXT)
        ),
    )
}

fn auth_failed(reply: &Reply) -> Verdict {
    Verdict::new(
        Action::AuthFailed,
        format!(
            "the server rejected the credentials or token ({reply}): refreshing the OAuth2 \
             token once; if that fails the account is held"
        ),
    )
}

fn throttled() -> Verdict {
    Verdict::new(
        Action::PauseAccount,
        "Microsoft throttled this mailbox for repeated errors: sending from it pauses for hours \
         (from 1 h, doubling); check the logs for the errors that caused it",
    )
}

fn hold(until: HoldUntil, fix: &str, reply: &Reply) -> Verdict {
    Verdict::new(
        Action::HoldAccount {
            until,
            fix: fix.to_owned(),
        },
        format!("{fix} (server said: {reply})"),
    )
}

/// Delay before retry number `attempt` (1 = the first retry): 1 min, doubling, capped at 1 h.
pub fn backoff(attempt: u32) -> Duration {
    doubling(BACKOFF_START, attempt, BACKOFF_CAP)
}

/// Pause after the `times`-th consecutive `Sender throttled` (1 = first): 1 h, doubling,
/// capped at 24 h.
pub fn pause_for(times: u32) -> Duration {
    doubling(PAUSE_START, times, PAUSE_CAP)
}

fn doubling(start: Duration, n: u32, cap: Duration) -> Duration {
    let shift = n.saturating_sub(1).min(31);
    start.saturating_mul(1u32 << shift).min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TAIL: &str =
        "[SY5P282MB2635.AUSP282.PROD.OUTLOOK.COM 2025-11-23T11:12:20.123Z 08DE2A6028D26C22]";

    fn reply(raw: &str) -> Reply {
        Reply::parse(&format!("{raw} {TAIL}\r\n")).unwrap()
    }

    fn verdict(raw: &str, stage: Stage) -> Verdict {
        classify(&reply(raw), stage)
    }

    fn action(raw: &str, stage: Stage) -> Action {
        verdict(raw, stage).action
    }

    fn held(raw: &str, stage: Stage) -> (HoldUntil, String) {
        match action(raw, stage) {
            Action::HoldAccount { until, fix } => (until, fix),
            other => panic!("expected hold for {raw:?}, got {other:?}"),
        }
    }

    fn http(status: u16, code: &str, message: &str, retry: Option<u64>) -> Verdict {
        classify_http(&HttpAnswer {
            status,
            code,
            message,
            retry_after: retry.map(Duration::from_secs),
        })
    }

    #[test]
    fn tenant_level_blocks_hold_the_account() {
        for raw in [
            "550 5.7.705 Access denied, tenant has exceeded threshold.",
            "550 5.7.708 Service unavailable. Access denied, traffic not accepted from this IP.",
            "550 5.7.750 Service unavailable. Client blocked from sending from unregistered domains.",
        ] {
            for stage in [Stage::Mail, Stage::Rcpt, Stage::AfterDot] {
                let v = verdict(raw, stage);
                assert!(!v.action.bounces() && v.action.alerts(), "{raw} at {stage}");
                let (until, fix) = held(raw, stage);
                assert_eq!(until, HoldUntil::Release);
                assert!(fix.contains("whole tenant"), "{fix}");
            }
        }
    }

    #[test]
    fn direct_send_and_connector_refusals_hold_at_any_stage() {
        for raw in [
            "550 5.7.68 TenantInboundAttribution; Direct Send not allowed for this organization from unauthorized sources",
            "550 5.7.64 TenantAttribution; Relay Access Denied",
        ] {
            for stage in [Stage::Mail, Stage::Rcpt, Stage::Data, Stage::AfterDot] {
                let v = verdict(raw, stage);
                assert!(!v.action.bounces(), "{raw} at {stage}");
                assert!(v.action.ends_transaction(), "{raw} at {stage}");
                let (until, fix) = held(raw, stage);
                assert_eq!(until, HoldUntil::Release);
                assert!(fix.contains("RejectDirectSend"), "{fix}");
                assert!(fix.contains("inbound connector"), "{fix}");
                assert!(v.reason.contains("server said: 550 5.7."), "{}", v.reason);
            }
        }
    }

    // --- the Graph rows, one test each ---

    #[test]
    fn graph_202_is_sent() {
        assert_eq!(http(202, "", "", None).action, Action::Accepted);
    }

    #[test]
    fn graph_429_and_503_wait_exactly_retry_after_for_the_account() {
        for status in [429, 503] {
            let v = http(
                status,
                "ApplicationThrottled",
                "Application is over its MailboxConcurrency limit.",
                Some(17),
            );
            assert_eq!(v.action, Action::WaitAccount(Duration::from_secs(17)));
            assert!(!v.action.bounces() && !v.action.alerts());
            assert!(v.action.ends_transaction());
        }
        assert_eq!(
            http(429, "", "", None).action,
            Action::WaitAccount(RETRY_AFTER_DEFAULT)
        );
        assert_eq!(
            http(503, "", "", Some(10 * 86_400)).action,
            Action::WaitAccount(RETRY_AFTER_CAP)
        );
    }

    #[test]
    fn graph_401_refreshes_the_token_then_holds() {
        let v = http(
            401,
            "InvalidAuthenticationToken",
            "Access token has expired or is not yet valid.",
            None,
        );
        assert_eq!(v.action, Action::AuthFailed);
        assert!(v.reason.contains("Mail.Send"), "{}", v.reason);
    }

    #[test]
    fn graph_403_access_denied_holds_with_the_powershell() {
        for (code, msg) in [
            (
                "ErrorAccessDenied",
                "Access is denied. Check credentials and try again.",
            ),
            (
                "ErrorAccessDenied",
                "Access to OData is disabled: [RAOP] : Blocked by tenant configured AppOnly AccessPolicy settings.",
            ),
        ] {
            let v = http(403, code, msg, None);
            let Action::HoldAccount { until, fix } = v.action else {
                panic!("{v:?}")
            };
            assert_eq!(until, HoldUntil::Release);
            assert!(fix.contains("New-ApplicationAccessPolicy"), "{fix}");
            assert!(fix.contains("Mail.Send"), "{fix}");
        }
    }

    #[test]
    fn graph_invalid_recipients_bounce_the_recipient_and_too_large_the_message() {
        let v = http(
            400,
            "ErrorInvalidRecipients",
            "At least one recipient isn't valid., Recipient 'x@y' isn't resolved.",
            None,
        );
        assert_eq!(v.action, Action::BounceRecipient);
        assert!(v.reason.contains("x@y"));
        assert_eq!(
            http(
                400,
                "ErrorMessageSizeExceeded",
                "The message exceeds the maximum supported size.",
                None
            )
            .action,
            Action::BounceMessage
        );
        assert_eq!(
            http(413, "RequestEntityTooLarge", "", None).action,
            Action::BounceMessage
        );
        assert_eq!(
            http(403, "ErrorSendAsDenied", "", None).action,
            Action::BounceMessage
        );
        assert_eq!(
            http(
                400,
                "ErrorMimeContentInvalidBase64String",
                "Invalid base64 string for MIME content.",
                None
            )
            .action,
            Action::BounceMessage
        );
    }

    #[test]
    fn graph_quota_errors_freeze_like_smtp() {
        assert_eq!(
            http(403, "ErrorSubmissionQuotaExceeded", "Cannot submit message. 554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException", None).action,
            Action::FreezeAccount(Quota::Daily)
        );
        assert_eq!(
            http(
                400,
                "ErrorMessageSubmissionBlocked",
                "5.7.233 tenant external recipient limit",
                None
            )
            .action,
            Action::FreezeAccount(Quota::Tenant)
        );
    }

    #[test]
    fn graph_account_level_refusals_hold_and_server_errors_defer() {
        assert!(matches!(
            http(
                403,
                "ErrorMessageSubmissionBlocked",
                "Cannot send mail.",
                None
            )
            .action,
            Action::HoldAccount {
                until: HoldUntil::NextUtcDay,
                ..
            }
        ));
        assert!(matches!(
            http(
                404,
                "ErrorInvalidUser",
                "The requested user 'x' is invalid.",
                None
            )
            .action,
            Action::HoldAccount { .. }
        ));
        assert!(matches!(
            http(404, "MailboxNotEnabledForRESTAPI", "", None).action,
            Action::HoldAccount { .. }
        ));
        assert!(matches!(
            http(
                403,
                "ErrorQuotaExceeded",
                "Mailbox has exceeded maximum mailbox size.",
                None
            )
            .action,
            Action::HoldAccount { .. }
        ));
        assert!(matches!(
            http(405, "", "", None).action,
            Action::HoldAccount { .. }
        ));
        for s in [500, 502, 504, 408] {
            assert!(
                matches!(http(s, "", "", None).action, Action::Defer { .. }),
                "{s}"
            );
        }
    }

    // --- one test per row of the doc's table ---

    #[test]
    fn daily_quota_freezes_and_never_bounces() {
        for raw in [
            "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to process message due to a permanent exception with message [BeginDiagnosticData]Cannot submit message. 0.35250:0A00C184, 1.36674:0A000000, 1.61250:00000000[EndDiagnosticData]",
            "550 5.1.90 Your message can't be sent because you've reached your daily limit for message recipients.",
            "554 5.2.0 Message rejected: submission quota reached for this mailbox",
        ] {
            let v = verdict(raw, Stage::AfterDot);
            assert_eq!(v.action, Action::FreezeAccount(Quota::Daily), "{raw}");
            assert!(!v.action.bounces());
            assert!(v.reason.contains("daily recipient quota"));
        }
        assert_eq!(Quota::Daily.fallback_retry(), Duration::from_secs(86400));
    }

    #[test]
    fn tenant_quota_freezes_hourly_and_alerts() {
        for raw in [
            "550 5.7.233 Your message can't be sent because your organization has exceeded its daily limit for sending to external recipients.",
            "550 5.7.232 Your message can't be sent because your trial tenant has exceeded its daily limit for sending email to external recipients (tenant external recipient rate limit).",
        ] {
            let a = action(raw, Stage::AfterDot);
            assert_eq!(a, Action::FreezeAccount(Quota::Tenant), "{raw}");
            assert!(a.alerts());
        }
        assert_eq!(Quota::Tenant.fallback_retry(), Duration::from_secs(3600));
    }

    #[test]
    fn only_verdicts_on_the_recipient_alone_let_a_transaction_go_on() {
        for goes_on in [
            Action::SplitRecipients,
            Action::BounceRecipient,
            Action::BounceMessage,
            Action::Defer { hint: None },
        ] {
            assert!(!goes_on.ends_transaction(), "{goes_on:?}");
        }
        for ends in [
            Action::Accepted,
            Action::FreezeAccount(Quota::Daily),
            Action::ReduceConnections,
            Action::PauseAccount,
            Action::AuthFailed,
            Action::HoldAccount {
                until: HoldUntil::Release,
                fix: String::new(),
            },
        ] {
            assert!(ends.ends_transaction(), "{ends:?}");
        }
    }

    #[test]
    fn an_oversized_message_bounces_and_an_untrusted_certificate_holds() {
        let v = too_big(200, 100);
        assert_eq!(v.action, Action::BounceMessage);
        assert_eq!(
            v.reason,
            "552 5.3.4 message size 200 exceeds the server's limit of 100 bytes"
        );
        let v = untrusted_certificate("unknown issuer");
        assert!(matches!(
            v.action,
            Action::HoldAccount {
                until: HoldUntil::Release,
                ..
            }
        ));
        assert!(v.reason.contains("(unknown issuer)"), "{}", v.reason);
        assert!(v.reason.contains("ca_file"), "{}", v.reason);
    }

    #[test]
    fn concurrent_connections_reduce() {
        for raw in [
            "432 4.3.2 Concurrent connections limit exceeded. Visit https://aka.ms/concurrent_sending for more information.",
            "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded [BeginDiagnosticData]Sender thread limit exceeded.[EndDiagnosticData]",
        ] {
            assert_eq!(
                action(raw, Stage::AfterDot),
                Action::ReduceConnections,
                "{raw}"
            );
        }
        // 421 4.3.2 is "Service not active": an ordinary deferral.
        assert_eq!(
            action("421 4.3.2 Service not active", Stage::Greeting),
            Action::Defer { hint: None }
        );
        assert!(CONNECTION_RETRY_MIN >= Duration::from_secs(30));
        assert!(CONNECTION_RETRY_MAX <= Duration::from_secs(60));
    }

    #[test]
    fn sender_throttled_pauses_and_alerts() {
        for detail in 251..=255 {
            let raw = format!(
                "550 5.2.{detail} Sender throttled due to continuous errors. [BeginDiagnosticData]Sender throttled[EndDiagnosticData]"
            );
            let a = action(&raw, Stage::Mail);
            assert_eq!(a, Action::PauseAccount, "{raw}");
            assert!(a.alerts());
        }
        // The range alone, without the words, still pauses.
        assert_eq!(
            action("550 5.2.254 Too many errors", Stage::AfterDot),
            Action::PauseAccount
        );
        // "send as denied" in words is the throttle, not the SendAs bounce.
        assert_eq!(
            action(
                "550 5.2.252 Sender throttled due to continuous send as denied errors.",
                Stage::AfterDot
            ),
            Action::PauseAccount
        );
    }

    #[test]
    fn send_as_denied_bounces_naming_the_rewrite_setting() {
        for raw in [
            "554 5.2.252 SendAsDenied; app@contoso.com not allowed to send as alice@example.org; STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; Failed to process message due to a permanent exception with message [BeginDiagnosticData]Cannot submit message. 0.35250:0A002484[EndDiagnosticData]",
            "550 5.7.60 SMTP; Client does not have permissions to send as this sender",
        ] {
            let v = verdict(raw, Stage::AfterDot);
            assert_eq!(v.action, Action::BounceMessage, "{raw}");
            assert!(v.reason.contains("from = \"rewrite\""), "{}", v.reason);
        }
    }

    #[test]
    fn bad_credentials_are_auth_failures() {
        let v = verdict("535 5.7.3 Authentication unsuccessful", Stage::Auth);
        assert_eq!(v.action, Action::AuthFailed);
        assert!(!v.action.bounces());
        assert!(v.reason.contains("refreshing the OAuth2 token once"));
    }

    #[test]
    fn auth_disabled_holds_with_fix() {
        let (until, fix) = held(
            "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox. Visit https://aka.ms/smtp_auth_disabled for more information.",
            Stage::Auth,
        );
        assert_eq!(until, HoldUntil::Release);
        assert!(fix.contains(
            "Set-CASMailbox -Identity <mailbox> -SmtpClientAuthenticationDisabled $false"
        ));
        let (_, fix) = held(
            "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information.",
            Stage::Auth,
        );
        assert!(fix.contains("Set-TransportConfig -SmtpClientAuthenticationDisabled $false"));
        let (_, fix) = held(
            "535 5.7.139 Authentication unsuccessful, user is locked by your organization's security defaults policy. Contact your administrator.",
            Stage::Auth,
        );
        assert!(fix.contains("Security Defaults"));
        let (_, fix) = held(
            "535 5.7.139 Authentication unsuccessful, basic authentication is disabled.",
            Stage::Auth,
        );
        assert!(fix.contains("XOAUTH2"));
        let (_, fix) = held(
            "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is blocked.",
            Stage::Auth,
        );
        assert!(fix.contains("Set-CASMailbox") && fix.contains("Set-TransportConfig"));
        let (_, fix) = held(
            "550 5.7.30 Basic authentication is not supported for Client Submission.",
            Stage::Mail,
        );
        assert!(fix.contains("XOAUTH2"));
        let (_, fix) = held("504 5.7.4 Unrecognized authentication type", Stage::Auth);
        assert!(fix.contains("never PLAIN"));
        let (_, fix) = held(
            "530 5.7.57 Client not authenticated to send mail. Error: 530 5.7.57 Client was not authenticated to send anonymous mail during MAIL FROM",
            Stage::Mail,
        );
        assert!(fix.contains("before a successful AUTH"));
        let (_, fix) = held(
            "421 4.7.66 TLS 1.0 and 1.1 are not supported. Please upgrade/update your client to support TLS 1.2. Visit https://aka.ms/smtp_auth_tls.",
            Stage::StartTls,
        );
        assert!(fix.contains("TLS 1.2"));
        let v = verdict("504 5.7.4 Unrecognized authentication type", Stage::Auth);
        assert!(v.action.alerts() && !v.action.bounces());
        assert!(v.reason.contains("server said: 504 5.7.4"));
    }

    #[test]
    fn wrong_password_5_7_139_is_an_auth_failure_not_smtp_auth_disabled() {
        let v = verdict(
            "535 5.7.139 Authentication unsuccessful, the user credentials were incorrect. [BeginDiagnosticData]x[EndDiagnosticData]",
            Stage::Auth,
        );
        assert_eq!(v.action, Action::AuthFailed);
        assert!(!v.reason.contains("SMTP AUTH is disabled"), "{}", v.reason);
        assert!(!v.action.bounces());
    }

    #[test]
    fn conditional_access_holds_naming_conditional_access() {
        let (until, fix) = held(
            "535 5.7.139 Authentication unsuccessful, the request did not meet the criteria to be authenticated successfully. Contact your administrator.",
            Stage::Auth,
        );
        assert_eq!(until, HoldUntil::Release);
        assert!(fix.contains("Conditional Access"), "{fix}");
        assert!(fix.contains("Sign-in logs"), "{fix}");
        assert!(!fix.contains("SMTP AUTH is disabled"), "{fix}");
    }

    #[test]
    fn high_volume_email_501_5_5_12x_at_auth_refreshes_the_token() {
        for raw in [
            "501 5.5.127 Invalid XOAUTH2 auth data - Token will expire soon",
            "501 5.5.124 Invalid XOAUTH2 auth data - User address provided is not valid",
        ] {
            let v = verdict(raw, Stage::Auth);
            assert_eq!(v.action, Action::AuthFailed, "{raw}");
            assert!(v.reason.contains("refreshing the OAuth2 token once"));
        }
        // Elsewhere a 501 5.5.12x is an ordinary syntax refusal of that message.
        assert_eq!(
            action("501 5.5.124 bad address", Stage::Mail),
            Action::BounceMessage
        );
    }

    #[test]
    fn outbound_spam_holds_until_next_utc_day() {
        for raw in [
            "550 5.1.8 Access denied, bad outbound sender. AS(42004)",
            "554 5.2.0 STOREDRV.Submission.Exception:OutboundSpamException; WASCL UserAction verdict is not None. Actual verdict is RefuseQuota, ShowTierUpgrade. OutboundSpamException: WASCL UserAction verdict is not None. [BeginDiagnosticData]Cannot submit message.[EndDiagnosticData]",
        ] {
            let (until, fix) = held(raw, Stage::AfterDot);
            assert_eq!(until, HoldUntil::NextUtcDay, "{raw}");
            assert!(fix.contains("Restricted entities"));
        }
    }

    #[test]
    fn sending_mailbox_full_holds() {
        let (until, fix) = held(
            "554 5.2.2 mailbox full; STOREDRV.Submission.Exception:QuotaExceededException.MapiExceptionQuotaExceeded; Failed to process message due to a permanent exception with message [BeginDiagnosticData]Cannot submit message.[EndDiagnosticData]",
            Stage::AfterDot,
        );
        assert_eq!(until, HoldUntil::Release);
        assert!(fix.contains("Sent Items"));
        // A full recipient mailbox at RCPT concerns only that recipient.
        assert_eq!(
            action("552 5.2.2 mailbox full", Stage::Rcpt),
            Action::BounceRecipient
        );
    }

    #[test]
    fn too_large_bounces_message() {
        for raw in [
            "552 5.3.4 Message size exceeds fixed maximum message size",
            "554 5.2.0 STOREDRV.Submission.Exception:MaxSubmissionExceededException; Failed to process message [BeginDiagnosticData]Cannot submit message.[EndDiagnosticData]",
        ] {
            let v = verdict(raw, Stage::AfterDot);
            assert_eq!(v.action, Action::BounceMessage, "{raw}");
            assert!(v.reason.contains("larger than"));
        }
    }

    #[test]
    fn too_many_recipients_split() {
        for (raw, stage) in [
            (
                "550 5.5.3 RESOLVER.ADR.RecipLimit; too many recipients",
                Stage::AfterDot,
            ),
            ("452 4.5.3 Too many recipients", Stage::Rcpt),
        ] {
            assert_eq!(action(raw, stage), Action::SplitRecipients, "{raw}");
        }
    }

    #[test]
    fn mailbox_logon_failure_defers_with_permission_hint() {
        let v = verdict(
            "430 4.2.0 STOREDRV; mailbox logon failure; Failed to process message due to a transient exception with message [BeginDiagnosticData]Cannot open mailbox.[EndDiagnosticData]",
            Stage::AfterDot,
        );
        match v.action {
            Action::Defer { hint: Some(h) } => {
                assert!(h.contains("Add-MailboxPermission -Identity <mailbox>"));
                assert!(h.contains("-AccessRights FullAccess"));
            }
            other => panic!("expected a deferral with hint, got {other:?}"),
        }
    }

    #[test]
    fn the_logon_failure_deferral_is_recognised_and_its_hold_names_the_powershell() {
        let v = verdict(
            "430 4.2.0 STOREDRV; mailbox logon failure; Failed to process message",
            Stage::AfterDot,
        );
        assert!(is_logon_failure(&v));
        assert!(!is_logon_failure(&verdict(
            "451 4.7.0 Temporary server error",
            Stage::AfterDot
        )));
        let fix = logon_fix("app@contoso.com", "1111-2222", "app");
        assert!(
            fix.contains(
                "Add-MailboxPermission -Identity app@contoso.com -User <object id of the enterprise application> -AccessRights FullAccess"
            ),
            "{fix}"
        );
        assert!(
            fix.contains("New-ServicePrincipal -AppId 1111-2222"),
            "{fix}"
        );
        assert!(fix.contains("relay365 account release app"), "{fix}");
    }

    #[test]
    fn temporary_failures_defer() {
        for (raw, stage) in [
            ("421 4.3.2 Service not active", Stage::Greeting),
            (
                "451 4.7.0 Temporary server error. Please try again later. PRX4",
                Stage::AfterDot,
            ),
            ("451 4.3.111 Some transient failure", Stage::Rcpt),
            ("450 4.2.1 Mailbox temporarily unavailable", Stage::Rcpt),
            ("421 4.4.2 Connection dropped due to timeout", Stage::Data),
        ] {
            let v = verdict(raw, stage);
            assert_eq!(v.action, Action::Defer { hint: None }, "{raw}");
            assert!(!v.action.alerts());
        }
        let v = classify_no_reply(Stage::AfterDot, "connection reset\r\nby peer");
        assert_eq!(v.action, Action::Defer { hint: None });
        assert!(!v.reason.contains('\n'));
    }

    #[test]
    fn other_permanent_failures_bounce_by_stage() {
        let v = verdict(
            "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
            Stage::Rcpt,
        );
        assert_eq!(v.action, Action::BounceRecipient);
        assert!(
            v.reason
                .contains("550 5.1.10 RESOLVER.ADR.RecipientNotFound")
        );
        assert_eq!(
            action("550 5.1.7 Invalid address", Stage::Mail),
            Action::BounceMessage
        );
        assert_eq!(
            action("554 5.6.0 Corrupt message content", Stage::AfterDot),
            Action::BounceMessage
        );
        assert_eq!(
            action("554 5.5.1 No valid recipients", Stage::Data),
            Action::BounceMessage
        );
    }

    #[test]
    fn permanent_session_failures_hold_instead_of_bouncing_the_queue() {
        for stage in [Stage::Greeting, Stage::Ehlo, Stage::StartTls, Stage::Auth] {
            let a = action("554 5.7.1 Service unavailable; client host blocked", stage);
            assert!(matches!(a, Action::HoldAccount { .. }), "{stage}: {a:?}");
        }
    }

    #[test]
    fn positive_replies_are_accepted() {
        assert_eq!(
            action(
                "250 2.0.0 OK <abc@contoso.com> [Hostname=SYBP282MB2635.AUSP282.PROD.OUTLOOK.COM]",
                Stage::AfterDot
            ),
            Action::Accepted
        );
        assert_eq!(
            action("354 Start mail input; end with <CRLF>.<CRLF>", Stage::Data),
            Action::Accepted
        );
    }

    #[test]
    fn diagnostic_tail_with_codes_does_not_confuse() {
        // An IP in the tail must not look like 5.2.251.
        assert_eq!(
            action(
                "550 5.1.1 User unknown [BeginDiagnosticData]relay 10.5.2.251 said no[EndDiagnosticData]",
                Stage::Rcpt
            ),
            Action::BounceRecipient
        );
    }

    // --- delays ---

    #[test]
    fn backoff_doubles_from_one_minute_to_one_hour() {
        let mins: Vec<u64> = (0..10).map(|n| backoff(n).as_secs() / 60).collect();
        assert_eq!(mins, vec![1, 1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backoff(u32::MAX), BACKOFF_CAP);
    }

    #[test]
    fn pause_doubles_from_one_hour_to_a_day() {
        let hours: Vec<u64> = (1..8).map(|n| pause_for(n).as_secs() / 3600).collect();
        assert_eq!(hours, vec![1, 2, 4, 8, 16, 24, 24]);
        assert_eq!(pause_for(u32::MAX), PAUSE_CAP);
    }
}
