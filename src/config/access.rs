//! An account's access list: `allowed_uids` / `allowed_groups` (issue 18 item 7).
//!
//! `senders` routes by addresses the caller chooses, so it cannot say who may use an
//! account; this list can. Names are looked up when a message is picked up (not when
//! the config is read, so that `sendmail` never fails on a name that is not there
//! yet); a name that names nobody matches nobody.
//!
//! Trusts the config (root's) and the passwd and group databases.

use serde::Deserialize;

/// A user or group as written: a name or a number.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum IdOrName {
    Id(u32),
    Name(String),
}

/// Who may send through an account. Unrestricted (both lists absent) allows everyone,
/// as before the lists existed. Root is not special: list `0` (or `"root"`) for root's
/// own mail (cron, alerts) to use a restricted account.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    pub uids: Option<Vec<IdOrName>>,
    pub groups: Option<Vec<IdOrName>>,
}

impl Access {
    /// Whether the lists are set at all.
    pub fn is_restricted(&self) -> bool {
        self.uids.is_some() || self.groups.is_some()
    }

    /// Whether the caller `uid` may send through the account.
    pub fn allows(&self, uid: u32) -> bool {
        if !self.is_restricted() {
            return true;
        }
        let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten();
        let uid_listed = self.uids.iter().flatten().any(|u| match u {
            IdOrName::Id(n) => *n == uid,
            IdOrName::Name(name) => user.as_ref().is_some_and(|p| &p.name == name),
        });
        if uid_listed {
            return true;
        }
        let Some(user) = user else {
            return false;
        };
        self.groups.iter().flatten().any(|g| {
            let group = match g {
                IdOrName::Id(n) => nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(*n)),
                IdOrName::Name(name) => nix::unistd::Group::from_name(name),
            }
            .ok()
            .flatten();
            group.is_some_and(|gr| gr.gid == user.gid || gr.mem.iter().any(|m| m == &user.name))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unrestricted_allows_everyone_and_a_list_allows_only_whom_it_names() {
        assert!(Access::default().allows(12345));
        let only_33 = Access {
            uids: Some(vec![IdOrName::Id(33)]),
            groups: None,
        };
        assert!(only_33.allows(33));
        assert!(!only_33.allows(0));
        assert!(!only_33.allows(34));
        let nobody = Access {
            uids: Some(vec![]),
            groups: Some(vec![]),
        };
        assert!(!nobody.allows(1000));
        assert!(!nobody.allows(0));
    }

    #[test]
    fn names_and_groups_are_looked_up() {
        let me = nix::unistd::getuid();
        let Some(user) = nix::unistd::User::from_uid(me).ok().flatten() else {
            return;
        };
        let by_name = Access {
            uids: Some(vec![IdOrName::Name(user.name.clone())]),
            groups: None,
        };
        assert!(by_name.allows(me.as_raw()));
        let by_primary_group = Access {
            uids: None,
            groups: Some(vec![IdOrName::Id(user.gid.as_raw())]),
        };
        assert!(by_primary_group.allows(me.as_raw()));
        let unknown = Access {
            uids: Some(vec![IdOrName::Name("no-such-user-relay365".into())]),
            groups: Some(vec![IdOrName::Name("no-such-group-relay365".into())]),
        };
        assert!(!unknown.allows(me.as_raw()));
    }
}
