//! Local recipients: which envelope recipients are users of this host (unqualified,
//! in a local domain, or an alias or passwd account in the configured domain), and
//! the queue recipients they become through the aliases and the admin address.
//! Shared by the daemon's pickup and `sendmail -bv`, so both say the same.
//!
//! Trusts the config and the parsed aliases; the addresses come from the intake,
//! already validated.

use crate::config::Config;
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
    pub fn resolve(&self, address: &str) -> Vec<Recipient> {
        if !self.is_local(address) {
            return vec![Recipient {
                address: address.to_string(),
                original: None,
                status: RcptStatus::Pending,
                reply: None,
            }];
        }
        let local = address.rsplit_once('@').map_or(address, |(l, _)| l);
        match super::resolve(local, self.aliases, self.admin, &self.domains) {
            Ok(res) => res
                .recipients
                .into_iter()
                .map(|r| Recipient {
                    original: (r != address).then(|| address.to_string()),
                    address: r,
                    status: RcptStatus::Pending,
                    reply: None,
                })
                .collect(),
            Err(e) => vec![Recipient {
                address: address.to_string(),
                original: None,
                status: RcptStatus::Failed,
                reply: Some(format!("550 5.1.1 {e}")),
            }],
        }
    }
}
