//! How an account worker acts on what a transaction brought: each recipient's answer
//! and the transaction's end ([`TxnResult`]), and each [`Verdict`] of the decision table
//! (bounce, defer, freeze, pause or hold the account, fewer connections), with the
//! Postfix-style log line for every recipient.
//!
//! Trusts the verdicts (built by [`crate::transport::classify`] from sanitised replies)
//! and the locked queue entry; nothing here reads the network.

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{AccountWorker, Flow};
use crate::config::Transport as Kind;
use crate::daemon::hold::{clear_logon_failures, count_logon_failure, write_hold};
use crate::spool::queue::{Locked, QueueEntry, RcptStatus};
use crate::transport::classify::{
    self, Action, HOLD_PROBE_INTERVAL, HoldUntil, Quota, Verdict, pause_for,
};
use crate::transport::reply::log_dsn;
use crate::transport::{RcptResult, TxnEnd, TxnResult};

impl AccountWorker {
    pub(super) fn mark_sent(&mut self, locked: &mut Locked, i: usize, relay: &str, reply: &str) {
        let delay = SystemTime::now()
            .duration_since(locked.entry.arrival())
            .unwrap_or_default();
        let r = &mut locked.entry.recipients[i];
        r.status = RcptStatus::Sent;
        r.reply = Some(reply.to_string());
        let orig = r
            .original
            .as_ref()
            .map(|o| format!(", orig_to=<{o}>"))
            .unwrap_or_default();
        let line = format!(
            "{}: to=<{}>{orig}, relay={relay}, delay={:.2}, dsn={}, status=sent ({reply})",
            locked.entry.id,
            r.address,
            delay.as_secs_f64(),
            log_dsn(reply, 2)
        );
        crate::daemon::metrics::count_recipient(&self.account.name, "sent");
        crate::daemon::metrics::observe_delivery(delay.as_secs_f64());
        self.log(crate::logging::Level::Info, &line);
    }

    /// Applies a transaction's results to `batch`, recipient by recipient in order, then
    /// its end.
    pub(super) fn conclude(
        &mut self,
        locked: &mut Locked,
        batch: &[usize],
        result: TxnResult,
        tried: &mut HashSet<usize>,
        batch_cap: &mut usize,
        now: SystemTime,
    ) -> Flow {
        let relay = result.relay;
        let mut accepted = Vec::new();
        for (&i, answer) in batch.iter().zip(result.recipients) {
            let RcptResult::Refused { verdict, text } = answer else {
                accepted.push(i);
                continue;
            };
            match verdict.action {
                Action::SplitRecipients => {
                    // Not tried yet: it goes in the next, smaller transaction.
                    tried.remove(&i);
                    *batch_cap = accepted.len().max(1);
                }
                Action::BounceRecipient | Action::BounceMessage => {
                    self.fail(locked, i, &text, &relay);
                }
                Action::Defer { .. } => {
                    locked.entry.recipients[i].reply = Some(text.clone());
                    self.log_deferred(locked, i, &relay, &text);
                }
                // The transaction ended here (`Action::ends_transaction`).
                _ => return self.apply(locked, &[i], &verdict, now),
            }
        }
        match result.end {
            TxnEnd::Stale | TxnEnd::Stopped => Flow::Stop,
            TxnEnd::All(v) => self.apply(locked, batch, &v, now),
            TxnEnd::NoneAccepted => Flow::Continue,
            TxnEnd::Sent(text) => {
                clear_logon_failures(&self.spool, &self.account.name);
                for &i in &accepted {
                    self.mark_sent(locked, i, &relay, &text);
                }
                self.record_sent(locked, &accepted);
                Flow::Continue
            }
            TxnEnd::Refused(v) if v.action == Action::SplitRecipients => {
                for i in &accepted {
                    tried.remove(i);
                }
                *batch_cap = (accepted.len() / 2).max(1);
                Flow::Continue
            }
            TxnEnd::Refused(v) => self.apply(locked, &accepted, &v, now),
            TxnEnd::Failed(text) => {
                for &i in batch {
                    locked.entry.recipients[i].reply = Some(text.clone());
                }
                Flow::Stop
            }
        }
    }

    /// Appends the transaction to the sent log, for late NDRs (`harvest_bounces` only).
    fn record_sent(&self, locked: &Locked, accepted: &[usize]) {
        let (true, Some(mid)) = (self.account.harvest_bounces, self.message_id.clone()) else {
            return;
        };
        let e = &locked.entry;
        let record = crate::daemon::harvest::sentlog::SentRecord {
            message_id: mid,
            queue_id: e.id.to_string(),
            sender: e.sender.clone(),
            notify: e.notify,
            ret: e.ret,
            envid: e.envid.clone(),
            arrival_us: e.arrival_us,
            sent_us: crate::spool::queue::micros(SystemTime::now()),
            is_bounce: e.is_bounce,
            rcpts: accepted
                .iter()
                .map(|&i| {
                    let r = &e.recipients[i];
                    (
                        r.address.to_string(),
                        r.original.as_ref().map(ToString::to_string),
                    )
                })
                .collect(),
        };
        let path = self.spool.sent_log(&self.account.name);
        if let Err(err) = crate::daemon::harvest::sentlog::append(&path, &record) {
            self.log(
                crate::logging::Level::Error,
                &format!(
                    "{}: cannot record it in {} (a late NDR for it will not be matched): {err}",
                    e.id,
                    path.display()
                ),
            );
        }
    }

    pub(super) fn fail(&mut self, locked: &mut Locked, i: usize, text: &str, relay: &str) {
        let delay = SystemTime::now()
            .duration_since(locked.entry.arrival())
            .unwrap_or_default();
        let r = &mut locked.entry.recipients[i];
        r.status = RcptStatus::Failed;
        r.reply = Some(text.to_string());
        // delay= is what pflogsumm needs to count the line (Postfix always writes it).
        let line = format!(
            "{}: to=<{}>, relay={relay}, delay={:.2}, dsn={}, status=bounced ({text})",
            locked.entry.id,
            r.address,
            delay.as_secs_f64(),
            log_dsn(text, 5)
        );
        crate::daemon::metrics::count_recipient(&self.account.name, "bounced");
        // Info, as Postfix logs it: a "warning: " prefix would hide the queue id from
        // log tools (pflogsumm counted the line as a warning, not a bounce).
        self.log(crate::logging::Level::Info, &line);
    }

    pub(super) fn log_deferred(&self, locked: &Locked, i: usize, relay: &str, text: &str) {
        crate::daemon::metrics::count_recipient(&self.account.name, "deferred");
        let r = &locked.entry.recipients[i];
        let delay = SystemTime::now()
            .duration_since(locked.entry.arrival())
            .unwrap_or_default();
        self.log(
            crate::logging::Level::Info,
            &format!(
                "{}: to=<{}>, relay={relay}, delay={:.2}, dsn={}, status=deferred ({text})",
                locked.entry.id,
                r.address,
                delay.as_secs_f64(),
                log_dsn(text, 4)
            ),
        );
    }

    pub(super) fn hold_account(&mut self, until: SystemTime, reason: &str) {
        crate::daemon::metrics::count_hold(&self.account.name);
        if let Err(path) = write_hold(&self.spool, &self.account.name, until, reason) {
            self.log(
                crate::logging::Level::Error,
                &format!(
                    "account {}: cannot record the hold in {}",
                    self.account.name,
                    path.display()
                ),
            );
        }
    }

    /// Applies a verdict to `indices` (the recipients it concerns).
    pub(super) fn apply(
        &mut self,
        locked: &mut Locked,
        indices: &[usize],
        v: &Verdict,
        now: SystemTime,
    ) -> Flow {
        let id = locked.entry.id.clone();
        let relay = match self.account.transport {
            Kind::Graph => self.account.graph.host().to_owned(),
            _ => format!("{}:{}", self.account.host, self.account.port),
        };
        let name = self.account.name.clone();
        let note = |e: &mut QueueEntry, text: &str| {
            for &i in indices {
                e.recipients[i].reply = Some(text.to_string());
            }
        };
        // `430 4.2.0 mailbox logon failure` looks temporary, but repeated it is a missing
        // mailbox permission: hold with the PowerShell instead of deferring forever.
        if classify::is_logon_failure(v)
            && count_logon_failure(&self.spool, &name) >= classify::LOGON_REPEATS_HOLD
        {
            clear_logon_failures(&self.spool, &name);
            let client_id = self
                .account
                .oauth
                .as_ref()
                .map_or("<client_id>", |o| o.client_id.as_str());
            let fix = classify::logon_fix(&self.account.mailbox, client_id, &name);
            let held = Verdict {
                action: Action::HoldAccount {
                    until: HoldUntil::Release,
                    fix: fix.clone(),
                },
                reason: format!("{fix} (server said: {})", v.reason),
            };
            return self.apply(locked, indices, &held, now);
        }
        match &v.action {
            Action::Accepted => Flow::Continue,
            Action::BounceRecipient => {
                for &i in indices {
                    self.fail(locked, i, &v.reason, &relay);
                }
                Flow::Continue
            }
            Action::BounceMessage => {
                let pending: Vec<usize> = locked
                    .entry
                    .recipients
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.status == RcptStatus::Pending)
                    .map(|(i, _)| i)
                    .collect();
                for i in pending {
                    self.fail(locked, i, &v.reason, &relay);
                }
                Flow::Stop
            }
            Action::Defer { hint } => {
                note(&mut locked.entry, &v.reason);
                for &i in indices {
                    self.log_deferred(locked, i, &relay, &v.reason);
                }
                if let Some(h) = hint {
                    self.log(
                        crate::logging::Level::Warning,
                        &format!("account {name}: {h}"),
                    );
                }
                Flow::Stop
            }
            Action::SplitRecipients => Flow::Continue,
            Action::FreezeAccount(q) => {
                let until = match q {
                    Quota::Daily => self
                        .ledger
                        .quota_reply_until(now, &self.account.limits)
                        .unwrap_or(now + q.fallback_retry()),
                    Quota::Tenant => now + q.fallback_retry(),
                };
                let _ = self.ledger.freeze(until, &v.reason, &self.account.limits);
                crate::daemon::metrics::count_freeze(&name);
                note(&mut locked.entry, &v.reason);
                locked.entry.set_next_attempt(until);
                locked.entry.reason = Some(format!(
                    "quota: account {name} frozen by the server: {}",
                    v.reason
                ));
                self.log(
                    crate::logging::Level::Warning,
                    &format!("{id}: account {name} frozen until {} after a quota reply; nothing is bounced: {}", crate::message::complete::rfc5322_date(until), v.reason),
                );
                Flow::Stop
            }
            Action::ReduceConnections => {
                self.close();
                let until = now + classify::CONNECTION_RETRY_MIN + Duration::from_secs(15);
                self.retry_after = Some((until, v.reason.clone()));
                note(&mut locked.entry, &v.reason);
                locked.entry.set_next_attempt(until);
                self.log(crate::logging::Level::Warning, &format!("account {name}: too many connections, closing this one and retrying later: {}", v.reason));
                Flow::Stop
            }
            Action::WaitAccount(wait) => {
                // The ledger's freeze stops every worker and `relay365 flush` alike.
                let until = now + *wait;
                let _ = self.ledger.freeze(until, &v.reason, &self.account.limits);
                self.retry_after = Some((until, v.reason.clone()));
                note(&mut locked.entry, &v.reason);
                locked.entry.set_next_attempt(until);
                self.log(
                    crate::logging::Level::Warning,
                    &format!(
                        "account {name}: waiting until {} as the server asked: {}",
                        crate::message::complete::rfc5322_date(until),
                        v.reason
                    ),
                );
                Flow::Stop
            }
            Action::PauseAccount => {
                self.pauses += 1;
                let until = now + pause_for(self.pauses);
                let _ = self.ledger.freeze(until, &v.reason, &self.account.limits);
                crate::daemon::metrics::count_freeze(&name);
                note(&mut locked.entry, &v.reason);
                locked.entry.set_next_attempt(until);
                self.log(
                    crate::logging::Level::Error,
                    &format!(
                        "account {name} paused until {}: {}",
                        crate::message::complete::rfc5322_date(until),
                        v.reason
                    ),
                );
                Flow::Stop
            }
            Action::AuthFailed | Action::HoldAccount { .. } => {
                let until = match &v.action {
                    Action::HoldAccount {
                        until: HoldUntil::NextUtcDay,
                        ..
                    } => {
                        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
                        UNIX_EPOCH + Duration::from_secs((secs / 86_400 + 1) * 86_400)
                    }
                    _ => now + HOLD_PROBE_INTERVAL,
                };
                self.close();
                self.hold_account(until, &v.reason);
                note(&mut locked.entry, &v.reason);
                locked.entry.set_next_attempt(until);
                locked.entry.reason = Some(format!("account {name} held: {}", v.reason));
                self.log(
                    crate::logging::Level::Error,
                    &format!("account {name} held until {} (nothing is bounced; relay365 flush retries at once): {}", crate::message::complete::rfc5322_date(until), v.reason),
                );
                Flow::Stop
            }
        }
    }
}
