//! SMTP submission as a [`Transport`]: one kept, authenticated [`Session`] per account
//! worker, and a transaction's MAIL, RCPT for each recipient and DATA on it (pipelined
//! when the server offers it), with every failure's [`Verdict`] from the decision table.
//!
//! Trusts the transaction (the daemon's queue) and nothing the server says: replies
//! reach the worker only as verdicts and sanitised text. Opening and authenticating a
//! session is the [`Dial`] the daemon hands in (credentials and OAuth2 tokens).

use std::time::SystemTime;

use super::params::{mail_params, rcpt_params};
use super::{Failure, Session};
use crate::transport::classify::{self, Verdict};
use crate::transport::{RcptResult, Transaction, Transport, TxnEnd, TxnResult};

/// Opens and authenticates a session for an account, or says what to do instead.
pub trait Dial: Send {
    fn dial(&mut self, now: SystemTime) -> Result<Session, Verdict>;
}

/// SMTP submission through one account.
pub struct Submission {
    dial: Box<dyn Dial>,
    session: Option<Session>,
}

impl Submission {
    pub fn new(dial: Box<dyn Dial>) -> Submission {
        Submission {
            dial,
            session: None,
        }
    }
}

impl Transport for Submission {
    fn connects(&self) -> bool {
        true
    }

    fn open(&mut self, now: SystemTime) -> Result<(), Verdict> {
        if self.session.as_ref().is_some_and(|s| !s.is_usable()) {
            self.session = None;
        }
        // A kept connection that the server closed while idle is found at MAIL (see
        // `converse`), which costs nothing when it is alive, unlike a probe.
        if self.session.is_none() {
            self.session = Some(self.dial.dial(now)?);
        }
        Ok(())
    }

    fn send(&mut self, txn: &Transaction, now: SystemTime) -> TxnResult {
        if self.session.is_none()
            && let Err(v) = self.open(now)
        {
            return TxnResult::ended(String::new(), TxnEnd::All(v));
        }
        let Some(mut session) = self.session.take() else {
            return TxnResult::ended(String::new(), TxnEnd::Stale);
        };
        let (result, keep) = converse(&mut session, txn);
        if keep && result.end != TxnEnd::Stale {
            self.session = Some(session);
        } else {
            session.quit();
        }
        result
    }

    fn close(&mut self) {
        if let Some(s) = self.session.take() {
            s.quit();
        }
    }
}

/// MAIL, RCPT for each recipient, DATA: the results and whether the connection can
/// carry another transaction. A reused connection found dead ends it as `Stale`.
fn converse(session: &mut Session, txn: &Transaction) -> (TxnResult, bool) {
    let relay = session.relay.clone();
    if let Some(limit) = session.offer.size
        && txn.message.len() as u64 > limit
    {
        let v = classify::too_big(txn.message.len(), limit);
        return (TxnResult::ended(relay, TxnEnd::All(v)), true);
    }
    let params = mail_params(txn, &session.offer);
    // Each recipient's RCPT parameters, built once for either path.
    let rcpts: Vec<(String, Vec<String>)> = txn
        .recipients
        .iter()
        .map(|r| (r.address.to_string(), rcpt_params(txn, r, &session.offer)))
        .collect();
    // With PIPELINING, MAIL, the RCPTs and DATA go out together and their replies
    // are then taken in order exactly as the one-by-one path would get them.
    // Reused: a transaction was begun on it before, whatever became of it.
    let reused = session.mails > 0;
    let (mail, mut piped) = if session.offer.pipelining {
        let env = session.envelope(txn.sender, &params, &rcpts);
        (env.mail, Some(env.rcpts.into_iter()))
    } else {
        (session.mail(txn.sender, &params), None)
    };
    if let Err(f) = mail {
        // An idle connection the server closed answers nothing, or the 421 it
        // sent when it timed us out (Postfix does): reconnect, nothing was sent.
        let closed = f.reply.as_ref().is_none_or(|r| r.code == 421);
        if closed && reused {
            return (TxnResult::ended(relay, TxnEnd::Stale), false);
        }
        let keep = f.reply.is_some() && session.rset();
        return (TxnResult::ended(relay, TxnEnd::All(f.verdict())), keep);
    }
    let mut recipients = Vec::with_capacity(rcpts.len());
    let mut accepted = false;
    for (address, rp) in &rcpts {
        let reply = match piped.as_mut().and_then(Iterator::next) {
            Some(reply) => reply,
            None => session.rcpt(address, rp),
        };
        match reply {
            Ok(_) => {
                accepted = true;
                recipients.push(RcptResult::Accepted);
            }
            Err(f) if f.reply.is_none() => {
                let end = TxnEnd::All(f.verdict());
                return (
                    TxnResult {
                        relay,
                        recipients,
                        end,
                    },
                    false,
                );
            }
            Err(f) => {
                let verdict = f.verdict();
                let ends = verdict.action.ends_transaction();
                recipients.push(refused(verdict, &f));
                if ends {
                    let keep = session.rset();
                    let end = TxnEnd::Stopped;
                    return (
                        TxnResult {
                            relay,
                            recipients,
                            end,
                        },
                        keep,
                    );
                }
            }
        }
    }
    if !accepted {
        let keep = session.rset();
        let end = TxnEnd::NoneAccepted;
        return (
            TxnResult {
                relay,
                recipients,
                end,
            },
            keep,
        );
    }
    let (end, keep) = match session.data(txn.message) {
        Ok(reply) => (TxnEnd::Sent(reply.to_string()), true),
        Err(f) => (TxnEnd::Refused(f.verdict()), f.reply.is_some()),
    };
    (
        TxnResult {
            relay,
            recipients,
            end,
        },
        keep,
    )
}

fn refused(verdict: Verdict, f: &Failure) -> RcptResult {
    RcptResult::Refused {
        verdict,
        text: f.to_string(),
    }
}
