//! The seam between the daemon and where a mailbox's ledger lives: [`Store::Local`], the
//! ledger file of this host (the default), or [`Store::Fleet`], the ledger shared by
//! every host of a fleet in Redis (`quota_store`, see `redis/mod.rs`). The daemon calls
//! the same operations either way, with the same meaning: reserve before sending, wait
//! until the moment named, freeze on a quota reply.
//!
//! Trusted input: the validated configuration and the store password from `secrets`.

use std::path::Path;
use std::time::{Duration, SystemTime};

use super::redis::Fleet;
use super::{Freeze, FreezeCheck, Grant, Ledger, QuotaError, Usage};
use crate::config::limits::Limits;
use crate::config::store::StoreSettings;
use crate::logging::SharedLog;
use crate::secrets::Secret;

/// An account's quota ledger, local or shared.
#[derive(Debug)]
pub enum Store {
    Local(Ledger),
    Fleet(Box<Fleet>),
}

impl Store {
    /// The account's ledger at `path` (`state/<account>.ledger`), or, with a
    /// `quota_store`, the fleet's ledger of `mailbox` (with its fallback ledger beside
    /// `path`). Opening does not connect: an unreachable store is found, and logged on
    /// `log`, at the first reservation.
    pub fn open(
        path: &Path,
        store: Option<&StoreSettings>,
        password: Option<Secret>,
        mailbox: &str,
        log: Option<SharedLog>,
    ) -> Result<Store, QuotaError> {
        Ok(match store {
            None => Store::Local(Ledger::open(path)?),
            Some(s) => Store::Fleet(Box::new(Fleet::open(path, s, password, mailbox, log)?)),
        })
    }

    /// See [`Ledger::reserve_some_ahead`].
    pub fn reserve_some_ahead(
        &mut self,
        now: SystemTime,
        lead: Duration,
        wanted: u32,
        limits: &Limits,
    ) -> Result<Grant, QuotaError> {
        match self {
            Store::Local(l) => l.reserve_some_ahead(now, lead, wanted, limits),
            Store::Fleet(f) => f.reserve_some_ahead(now, lead, wanted, limits),
        }
    }

    /// See [`Ledger::room`]; for a fleet, a hint without a round trip (the reservation
    /// decides).
    pub fn room(&mut self, now: SystemTime, limits: &Limits) -> Result<u32, QuotaError> {
        match self {
            Store::Local(l) => l.room(now, limits),
            Store::Fleet(f) => f.room(now, limits),
        }
    }

    /// See [`Ledger::usage`]; for a fleet, the whole fleet's windows.
    pub fn usage(&mut self, now: SystemTime, limits: &Limits) -> Result<Usage, QuotaError> {
        match self {
            Store::Local(l) => l.usage(now, limits),
            Store::Fleet(f) => f.usage(now, limits),
        }
    }

    /// See [`Ledger::record_external`].
    pub fn record_external(
        &mut self,
        now: SystemTime,
        rcpts: u32,
        limits: &Limits,
    ) -> Result<(), QuotaError> {
        match self {
            Store::Local(l) => l.record_external(now, rcpts),
            Store::Fleet(f) => f.record_external(now, rcpts, limits),
        }
    }

    /// See [`Ledger::quota_reply_until`].
    pub fn quota_reply_until(
        &mut self,
        now: SystemTime,
        limits: &Limits,
    ) -> Result<SystemTime, QuotaError> {
        match self {
            Store::Local(l) => l.quota_reply_until(now, limits),
            Store::Fleet(f) => f.quota_reply_until(now, limits),
        }
    }

    /// See [`Ledger::freeze`]; a fleet's freeze stops every host of the mailbox.
    pub fn freeze(
        &mut self,
        until: SystemTime,
        reason: &str,
        limits: &Limits,
    ) -> Result<Freeze, QuotaError> {
        match self {
            Store::Local(l) => l.freeze(until, reason),
            Store::Fleet(f) => f.freeze(until, reason, limits),
        }
    }

    /// See [`Ledger::frozen`].
    pub fn frozen(&self, now: SystemTime) -> Result<Option<Freeze>, QuotaError> {
        match self {
            Store::Local(l) => l.frozen(now),
            Store::Fleet(f) => f.frozen(now),
        }
    }

    /// See [`Ledger::check_freeze`].
    pub fn check_freeze(&mut self, now: SystemTime) -> Result<FreezeCheck, QuotaError> {
        match self {
            Store::Local(l) => l.check_freeze(now),
            Store::Fleet(f) => f.check_freeze(now),
        }
    }

    /// See [`Ledger::thaw`]; a fleet's thaw releases every host.
    pub fn thaw(&mut self, limits: &Limits) -> Result<(), QuotaError> {
        match self {
            Store::Local(l) => l.thaw(),
            Store::Fleet(f) => f.thaw(limits),
        }
    }
}
