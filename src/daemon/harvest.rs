//! Late bounces (`harvest_bounces = true`): Exchange Online accepts a message with `250`
//! (or `202`) and refuses it later for the tenant's external-recipient limit (5.7.233),
//! an IP or tenant block (5.7.705, 5.7.708), unregistered domains (5.7.750) or a remote
//! `5.1.1`, sending the NDR to the envelope sender, which is always the mailbox. This
//! task reads the mailbox's inbox through Microsoft Graph (`Mail.ReadWrite`), matches
//! each NDR to the transaction it reports through the Message-ID in the returned
//! headers and the sent log ([`sentlog`]), logs `status=bounced` with Microsoft's code,
//! queues the RFC 3464 DSN to the original sender, freezes or holds the account for
//! tenant-level codes exactly as the same reply in the session would (the decision
//! table in [`crate::transport::classify`]), and marks the NDR read or moves it.
//!
//! Progress lives in `state/<account>.harvest`: the `receivedDateTime` reached and the
//! ids already handled at or after it, written durably after every NDR, so a restart
//! neither misses one (the query starts at that time, inclusive) nor repeats one (the
//! ids at the boundary are skipped). An NDR that matches nothing relay365 sent is left
//! alone and counted.
//!
//! Trust: everything read from the mailbox is untrusted (see [`ndr`]); the sent log and
//! the state file are the daemon's own. Graph ids go into URLs only after a strict
//! character check.

pub mod ndr;
pub mod sentlog;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::aliases::Aliases;
use crate::config::graph::AfterHarvest;
use crate::config::{Account, Config};
use crate::daemon::bounce::queue::Bouncer;
use crate::daemon::bounce::{DsnAction, DsnRecipient};
use crate::daemon::hold::write_hold;
use crate::daemon::stop::Stop;
use crate::logging::SharedLog;
use crate::message::complete::rfc5322_date;
use crate::quota::Ledger;
use crate::secrets::AccountSecrets;
use crate::spool::durable;
use crate::spool::paths::Spool;
use crate::spool::queue::Queue;
use crate::transport::classify::{self, Action, HOLD_PROBE_INTERVAL, HoldUntil, Quota, Stage};
use crate::transport::graph::{GraphClient, Method};
use crate::transport::reply::Reply;

/// Inbox messages asked for per page.
const PAGE: u32 = 50;
/// Where a first run starts: NDRs come within hours of sending.
const FIRST_LOOKBACK: Duration = Duration::from_secs(24 * 3600);

/// The harvester's progress, `state/<account>.harvest`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// The newest `receivedDateTime` handled (Graph's `2026-12-03T18:00:00Z`).
    pub since: Option<String>,
    /// Ids handled whose `receivedDateTime` is `since` (the inclusive boundary).
    pub seen: Vec<String>,
    /// NDRs that matched nothing relay365 sent (left alone).
    pub unmatched: u64,
    /// NDRs acted on.
    pub matched: u64,
    /// The folder NDRs are moved to, once found or created.
    pub folder_id: Option<String>,
}

/// One inbox item as listed.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Item {
    id: String,
    #[serde(default)]
    received_date_time: String,
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    from: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct Page {
    #[serde(default)]
    value: Vec<Item>,
    #[serde(rename = "@odata.nextLink")]
    next: Option<String>,
}

/// Reads late NDRs for one account.
pub struct Harvester {
    pub account: Account,
    pub config: Arc<Config>,
    pub aliases: Arc<Aliases>,
    pub secrets: Option<AccountSecrets>,
    pub log: SharedLog,
    spool: Spool,
    client: Option<GraphClient>,
    host: String,
    /// Puts a DSN this harvester queued on the engine's schedule.
    schedule: Schedule,
}

/// How a harvester hands a queued DSN to the engine.
pub type Schedule = Arc<dyn Fn(crate::spool::QueueId) + Send + Sync>;

/// Runs the harvester of `account` every `harvest_interval` until `stop`.
pub fn run(mut h: Harvester, stop: &Stop) {
    loop {
        let now = SystemTime::now();
        if let Err(why) = h.round(now) {
            h.log.warning(&format!(
                "account {}: bounce harvest: {why}",
                h.account.name
            ));
        }
        if !stop.sleep_until(now + h.account.graph.harvest_interval) {
            break;
        }
    }
}

fn valid_id(id: &str) -> bool {
    // SECURITY: the id goes into a URL path.
    !id.is_empty()
        && id.len() <= 512
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_=".contains(&b))
}

/// `%`-encodes a query value.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~$".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Graph's `receivedDateTime` format for `t`.
fn iso(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (y, m, d) = crate::message::complete::civil_from_days((secs / 86_400) as i64);
    let r = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        r / 3600,
        r / 60 % 60,
        r % 60
    )
}

impl Harvester {
    pub fn new(
        account: Account,
        config: Arc<Config>,
        aliases: Arc<Aliases>,
        secrets: Option<AccountSecrets>,
        log: SharedLog,
        schedule: Schedule,
    ) -> Harvester {
        Harvester {
            schedule,
            spool: Spool::new(&config.spool_dir),
            host: crate::daemon::connect::host_name(),
            account,
            config,
            aliases,
            secrets,
            log,
            client: None,
        }
    }

    fn state_path(&self) -> PathBuf {
        self.spool.harvest(&self.account.name)
    }

    /// The progress file (missing or unreadable: a first run).
    pub fn progress(&self) -> Progress {
        std::fs::read(self.state_path())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn save(&self, p: &Progress) -> Result<(), String> {
        let path = self.state_path();
        let bytes = serde_json::to_vec(p).map_err(|e| e.to_string())?;
        durable::replace(
            &path,
            &path.with_extension("harvest.tmp"),
            &bytes,
            &durable::options(0o600),
        )
        .map(|_| ())
        .map_err(|e| format!("cannot record the progress in {}: {e}", path.display()))
    }

    /// One pass over the inbox: every new item since the last one handled.
    pub fn round(&mut self, now: SystemTime) -> Result<(), String> {
        if self.client.is_none() {
            let c = GraphClient::for_account(
                &self.account,
                self.secrets.as_ref(),
                &self.config.secrets_file,
            )
            .map_err(|v| v.reason)?;
            self.client = Some(c);
        }
        let _ = sentlog::compact(&self.spool.sent_log(&self.account.name), now);
        let mut p = self.progress();
        let since = p
            .since
            .clone()
            .unwrap_or_else(|| iso(now.checked_sub(FIRST_LOOKBACK).unwrap_or(UNIX_EPOCH)));
        let Some(client) = self.client.as_mut() else {
            return Ok(());
        };
        let mut url = client.url(&format!(
            "/mailFolders/inbox/messages?$filter={}&$orderby={}&$top={PAGE}&$select=id,receivedDateTime,subject,from",
            enc(&format!("receivedDateTime ge {since}")),
            enc("receivedDateTime asc")
        ));
        loop {
            let Some(client) = self.client.as_mut() else {
                return Ok(());
            };
            let answer = client
                .call(Method::Get, &url, None, b"", SystemTime::now())
                .map_err(|v| v.reason)?;
            if !answer.ok() {
                return Err(format!(
                    "reading the inbox failed: {} (the app needs the Mail.ReadWrite application permission)",
                    answer.text()
                ));
            }
            let page: Page = serde_json::from_slice(&answer.body)
                .map_err(|_| "Microsoft Graph sent an unreadable inbox page".to_owned())?;
            for item in page.value {
                if !valid_id(&item.id) || p.seen.contains(&item.id) {
                    continue;
                }
                // A failure to read it leaves it unseen, for the next round.
                self.handle(&item, &mut p, now)?;
                // Ids at the newest time reached stay remembered; older ones are
                // behind the inclusive `since` and can no longer come back.
                match &p.since {
                    Some(s) if *s == item.received_date_time => p.seen.push(item.id.clone()),
                    Some(s) if *s > item.received_date_time => p.seen.push(item.id.clone()),
                    _ => {
                        p.since = Some(item.received_date_time.clone());
                        p.seen = vec![item.id.clone()];
                    }
                }
                self.save(&p)?;
            }
            match page.next {
                Some(n) => url = n,
                None => return Ok(()),
            }
        }
    }

    /// One inbox item: an NDR relay365 can match is acted on; anything else is left.
    fn handle(&mut self, item: &Item, p: &mut Progress, now: SystemTime) -> Result<(), String> {
        let subject = item
            .subject
            .clone()
            .unwrap_or_default()
            .to_ascii_lowercase();
        let from = item
            .from
            .as_ref()
            .and_then(|f| f["emailAddress"]["address"].as_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        let looks = subject.starts_with("undeliverable")
            || subject.starts_with("delivery has failed")
            || subject.contains("delivery status notification (failure)")
            || from.starts_with("microsoftexchange")
            || from.starts_with("postmaster@")
            || from.starts_with("mailer-daemon@");
        if !looks {
            return Ok(());
        }
        let Some(client) = self.client.as_mut() else {
            return Ok(());
        };
        let url = client.url(&format!("/messages/{}/$value", item.id));
        let mime = match client.call(Method::Get, &url, None, b"", SystemTime::now()) {
            Ok(a) if a.ok() => a.body,
            // Deleted or moved meanwhile: nothing left to read.
            Ok(a) if a.status == 404 => return Ok(()),
            Ok(a) => return Err(format!("cannot read message {}: {}", item.id, a.text())),
            Err(v) => return Err(v.reason),
        };
        let Some(report) = ndr::parse(&mime) else {
            return Ok(());
        };
        let records = sentlog::read(&self.spool.sent_log(&self.account.name)).unwrap_or_default();
        let record = report
            .original_message_id
            .as_deref()
            .and_then(|id| sentlog::find(&records, id));
        let failed: Vec<&ndr::Failed> = report
            .failed
            .iter()
            .filter(|f| {
                record.is_some_and(|r| {
                    r.rcpts
                        .iter()
                        .any(|(a, _)| a.eq_ignore_ascii_case(&f.recipient))
                })
            })
            .collect();
        let (Some(record), false) = (record, failed.is_empty()) else {
            p.unmatched += 1;
            self.log.info(&format!(
                "account {}: an NDR in the inbox ({}) matches nothing relay365 sent; left alone ({} so far)",
                self.account.name, item.id, p.unmatched
            ));
            return Ok(());
        };
        p.matched += 1;
        let relay = self.account.graph.host().to_owned();
        let mut dsn_rcpts = Vec::new();
        for f in &failed {
            let text = f
                .diagnostic
                .clone()
                .unwrap_or_else(|| format!("5.0.0 {}", f.status));
            self.log.warning(&format!(
                "{}: to=<{}>, relay={relay}, status=bounced (late NDR from Microsoft: {} {})",
                record.queue_id, f.recipient, f.status, text
            ));
            let original = record
                .rcpts
                .iter()
                .find(|(a, _)| a.eq_ignore_ascii_case(&f.recipient))
                .and_then(|(_, o)| o.clone());
            dsn_rcpts.push(DsnRecipient {
                final_recipient: f.recipient.clone(),
                original_recipient: original.map(|o| format!("rfc822;{o}")),
                action: DsnAction::Failed,
                status: f.status.clone(),
                diagnostic: Some(format!("smtp; {text}")),
                remote_mta: Some(relay.clone()),
                last_attempt: Some(UNIX_EPOCH + Duration::from_micros(record.sent_us)),
                will_retry_until: None,
                reason: Some(format!(
                    "Microsoft returned the message after accepting it: {text}"
                )),
            });
            self.act_on_account(&text, now);
        }
        let queue = Queue::new(&self.spool);
        let bouncer = Bouncer {
            config: &self.config,
            aliases: &self.aliases,
            queue: &queue,
            log: &self.log,
            reporting_mta: &self.host,
            remote_mta: &relay,
        };
        match bouncer.late(record, dsn_rcpts, &report.original_headers, now) {
            Ok(Some(bid)) => (self.schedule)(bid),
            Ok(None) => {}
            Err(why) => self.log.error(&format!(
                "{}: the DSN for the late NDR could not be queued: {why}",
                record.queue_id
            )),
        }
        self.after(&item.id, p);
        Ok(())
    }

    /// Freezes or holds the account when the NDR's reply would in the session.
    fn act_on_account(&self, diagnostic: &str, now: SystemTime) {
        let Ok(reply) = Reply::parse(&format!("{}\r\n", diagnostic.trim())) else {
            return;
        };
        let v = classify::classify(&reply, Stage::AfterDot);
        let name = &self.account.name;
        match &v.action {
            Action::FreezeAccount(q) => {
                let Ok(mut ledger) = Ledger::open(&self.spool.ledger(name)) else {
                    return;
                };
                let until = match q {
                    Quota::Daily => ledger
                        .quota_reply_until(now, &self.account.limits)
                        .unwrap_or(now + q.fallback_retry()),
                    Quota::Tenant => now + q.fallback_retry(),
                };
                let _ = ledger.freeze(until, &v.reason);
                self.log.warning(&format!(
                    "account {name} frozen until {} after a late NDR; nothing more is bounced: {}",
                    rfc5322_date(until),
                    v.reason
                ));
            }
            Action::HoldAccount { until: kind, .. } => {
                let until = match kind {
                    HoldUntil::NextUtcDay => {
                        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
                        UNIX_EPOCH + Duration::from_secs((secs / 86_400 + 1) * 86_400)
                    }
                    HoldUntil::Release => now + HOLD_PROBE_INTERVAL,
                };
                let _ = write_hold(&self.spool, name, until, &v.reason);
                self.log.error(&format!(
                    "account {name} held until {} after a late NDR (relay365 account release {name} resumes): {}",
                    rfc5322_date(until),
                    v.reason
                ));
            }
            _ => {}
        }
    }

    /// Marks the NDR read or moves it, as configured.
    fn after(&mut self, id: &str, p: &mut Progress) {
        let Some(client) = self.client.as_mut() else {
            return;
        };
        let now = SystemTime::now();
        let result = match &self.account.graph.after_harvest {
            AfterHarvest::MarkRead => {
                let url = client.url(&format!("/messages/{id}"));
                client.call(
                    Method::Patch,
                    &url,
                    Some("application/json"),
                    br#"{"isRead":true}"#,
                    now,
                )
            }
            AfterHarvest::Move(folder) => {
                let folder_id = match p.folder_id.clone() {
                    Some(f) => Some(f),
                    None => folder_id(client, folder, now),
                };
                let Some(fid) = folder_id else {
                    self.log.warning(&format!(
                        "account {}: bounce harvest: cannot find or create the folder {folder:?}",
                        self.account.name
                    ));
                    return;
                };
                p.folder_id = Some(fid.clone());
                let url = client.url(&format!("/messages/{id}/move"));
                let body = serde_json::json!({ "destinationId": fid }).to_string();
                client.call(
                    Method::Post,
                    &url,
                    Some("application/json"),
                    body.as_bytes(),
                    now,
                )
            }
        };
        match result {
            Ok(a) if a.ok() => {}
            Ok(a) => self.log.warning(&format!(
                "account {}: bounce harvest: the NDR {id} stays as it was: {}",
                self.account.name,
                a.text()
            )),
            Err(v) => self.log.warning(&format!(
                "account {}: bounce harvest: {}",
                self.account.name, v.reason
            )),
        }
    }
}

/// The id of the mail folder named `name`, created when missing.
fn folder_id(client: &mut GraphClient, name: &str, now: SystemTime) -> Option<String> {
    let quoted = name.replace('\'', "''");
    let url = client.url(&format!(
        "/mailFolders?$filter={}",
        enc(&format!("displayName eq '{quoted}'"))
    ));
    let listed = client.call(Method::Get, &url, None, b"", now).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&listed.body).ok()?;
    if let Some(id) = v["value"][0]["id"].as_str().filter(|i| valid_id(i)) {
        return Some(id.to_owned());
    }
    let url = client.url("/mailFolders");
    let body = serde_json::json!({ "displayName": name }).to_string();
    let created = client
        .call(
            Method::Post,
            &url,
            Some("application/json"),
            body.as_bytes(),
            now,
        )
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&created.body).ok()?;
    v["id"].as_str().filter(|i| valid_id(i)).map(str::to_owned)
}

/// Starts the harvester thread of every account that asks for it.
pub fn spawn_all(
    config: &Arc<Config>,
    aliases: &Arc<Aliases>,
    secrets: impl Fn(&str) -> Option<AccountSecrets>,
    log: &SharedLog,
    stop: &Arc<Stop>,
    schedule: &Schedule,
) -> Vec<std::thread::JoinHandle<()>> {
    let mut handles = Vec::new();
    for a in config.accounts.iter().filter(|a| a.harvest_bounces) {
        let h = Harvester::new(
            a.clone(),
            Arc::clone(config),
            Arc::clone(aliases),
            secrets(&a.name),
            log.clone(),
            Arc::clone(schedule),
        );
        let stop = Arc::clone(stop);
        match std::thread::Builder::new()
            .name(format!("{}-harvest", a.name))
            .spawn(move || run(h, &stop))
        {
            Ok(t) => handles.push(t),
            Err(e) => log.error(&format!(
                "account {}: cannot start the bounce harvester: {e}",
                a.name
            )),
        }
    }
    handles
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_ids() {
        assert_eq!(
            iso(UNIX_EPOCH + Duration::from_secs(1_796_000_000)),
            "2026-11-30T00:53:20Z"
        );
        assert!(valid_id("AAMkAGI2THVSAAA="));
        assert!(!valid_id("../x"));
        assert!(!valid_id(""));
        assert_eq!(enc("a b'"), "a%20b%27");
    }
}
