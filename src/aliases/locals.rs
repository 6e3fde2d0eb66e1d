//! Local recipients: which envelope recipients are users of this host (unqualified,
//! in a local domain, or an alias or passwd account in the configured domain), and
//! the queue recipients they become through the aliases and the admin address.
//! Shared by the daemon's pickup and `sendmail -bv`, so both say the same.
//!
//! Trusts the config and the parsed aliases; the addresses come from the intake,
//! already validated.

use crate::config::Config;
use crate::message::address::Address;
use crate::spool::queue::{RcptStatus, Recipient};

use super::{Aliases, Domains};

/// What it takes to resolve local recipients.
#[derive(Debug)]
pub struct Locals<'a> {
    pub aliases: &'a Aliases,
    pub admin: Option<&'a str>,
    pub domains: Domains,
}

impl<'a> Locals<'a> {
    pub fn new(config: &'a Config, aliases: &'a Aliases) -> Locals<'a> {
        Locals {
            aliases,
            admin: config.admin.as_deref(),
            domains: Domains {
                qualify: config.domain.clone(),
                local: config.local_domains.clone(),
            },
        }
    }

    /// Whether `address` is a user of this host: unqualified, in a local domain, or in
    /// the configured domain with a local part that is an alias or a passwd account
    /// (intake qualified `root` to `root@<domain>`).
    pub fn is_local(&self, address: &str) -> bool {
        if self.domains.is_local(address) {
            return true;
        }
        match address.rsplit_once('@') {
            Some((local, domain)) if domain.eq_ignore_ascii_case(&self.domains.qualify) => {
                self.aliases.get(local).is_some()
                    || nix::unistd::User::from_name(local).ok().flatten().is_some()
            }
            _ => false,
        }
    }

    /// The queue recipients for one envelope recipient.
    pub fn resolve(&self, address: &Address) -> Vec<Recipient> {
        let pending = |a: Address, original: Option<Address>| Recipient {
            address: a,
            original,
            status: RcptStatus::Pending,
            reply: None,
        };
        let failed = |reply: String| Recipient {
            address: address.clone(),
            original: None,
            status: RcptStatus::Failed,
            reply: Some(reply),
        };
        let text = address.as_str();
        if !self.is_local(text) {
            return vec![pending(address.clone(), None)];
        }
        let local = address.local_part();
        match super::resolve(local, self.aliases, self.admin, &self.domains) {
            Ok(res) => res
                .recipients
                .into_iter()
                .map(|r| match Address::parse(&r) {
                    Ok(a) if a == *address => pending(a, None),
                    Ok(a) => pending(a, Some(address.clone())),
                    // The resolver only yields valid addresses; should one slip
                    // through, the recipient bounces with the reason instead.
                    Err(e) => failed(format!("550 5.1.3 alias target {r:?}: {e}")),
                })
                .collect(),
            Err(e) => vec![failed(format!("550 5.1.1 {e}"))],
        }
    }
}
