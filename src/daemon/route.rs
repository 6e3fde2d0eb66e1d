//! Routing: which account a message goes out through. By envelope sender or From
//! address against each account's `senders` patterns, then by caller uid against
//! `uids`, else the first account — Microsoft's advice is one mailbox per application.
//! Only accounts whose `allowed_uids` / `allowed_groups` allow the caller count: a
//! caller routed to an account it may not use falls back to the default (first)
//! account, else to any account that allows it, else it has none (issue 18 item 7).
//!
//! Inputs: the daemon's queue entry and the message's own headers (caller-written,
//! used only to choose among the administrator's accounts).

use crate::config::{Account, Config};
use crate::message::{address, header};

/// Whether `address` matches `pattern`: `*` matches any run of characters, case is
/// ignored; a pattern without `@` names a local user (the sender's local part in the
/// configured domain).
pub fn matches(pattern: &str, address: &str, domain: &str) -> bool {
    let p = pattern.to_ascii_lowercase();
    let a = address.to_ascii_lowercase();
    if !p.contains('@') {
        return match a.rsplit_once('@') {
            Some((local, d)) if d == domain.to_ascii_lowercase() => glob(&p, local),
            Some(_) => false,
            None => glob(&p, &a),
        };
    }
    glob(&p, &a)
}

fn glob(p: &str, s: &str) -> bool {
    let parts: Vec<&str> = p.split('*').collect();
    if parts.len() == 1 {
        return p == s;
    }
    let mut rest = s;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            let Some(r) = rest.strip_prefix(part) else {
                return false;
            };
            rest = r;
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            let Some(at) = rest.find(part) else {
                return false;
            };
            rest = &rest[at + part.len()..];
        }
    }
    true
}

/// The From header's first address, if the message has a parsable one.
pub fn from_address(message: &[u8]) -> Option<String> {
    let msg = header::parse(message).ok()?;
    let h = msg.get("From")?;
    address::parse_list(h.raw())
        .ok()?
        .into_iter()
        .next()
        .map(|a| a.to_string())
}

/// The account for a message, or `None` when no account is configured or none allows
/// the caller `uid` ([`refused`] tells the two apart).
pub fn route<'a>(
    config: &'a Config,
    sender: &str,
    from: Option<&str>,
    uid: u32,
) -> Option<&'a Account> {
    let by_address = |a: &Account| {
        a.senders.iter().any(|p| {
            matches(p, sender, &config.domain)
                || from.is_some_and(|f| matches(p, f, &config.domain))
        })
    };
    let allowed = || config.accounts.iter().filter(|a| a.access.allows(uid));
    allowed()
        .find(|a| by_address(a))
        .or_else(|| allowed().find(|a| a.uids.contains(&uid)))
        .or_else(|| config.accounts.first().filter(|a| a.access.allows(uid)))
        .or_else(|| allowed().next())
}

/// Why the caller `uid` has no account although accounts are configured, if so: the
/// reply its recipients fail with (a DSN goes to the sender).
pub fn refused(config: &Config, uid: u32) -> Option<String> {
    (!config.accounts.is_empty() && !config.accounts.iter().any(|a| a.access.allows(uid))).then(
        || {
            format!(
                "550 5.7.1 uid {uid} may not send mail from this host: no account's \
                 allowed_uids or allowed_groups in relay365.toml names it"
            )
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn patterns() {
        assert!(matches(
            "*@billing.contoso.com",
            "inv@billing.contoso.com",
            "x.org"
        ));
        assert!(!matches(
            "*@billing.contoso.com",
            "inv@contoso.com",
            "x.org"
        ));
        assert!(matches("www-data", "www-data@web1.example", "web1.example"));
        assert!(!matches("www-data", "www-data@elsewhere", "web1.example"));
        assert!(matches("app-*@X.ORG", "app-7@x.org", "y"));
    }

    #[test]
    fn routing_order() {
        let c = Config::from_toml(
            Path::new("t"),
            "domain = \"web1.example\"\n[[account]]\nname = \"default\"\nmailbox = \"a@c.com\"\nauth = \"none\"\nhost = \"127.0.0.1\"\ntls = \"none\"\n\
             [[account]]\nname = \"billing\"\nmailbox = \"b@c.com\"\nauth = \"none\"\nhost = \"127.0.0.1\"\ntls = \"none\"\nsenders = [\"*@billing.c.com\", \"www-data\"]\n\
             [[account]]\nname = \"backup\"\nmailbox = \"k@c.com\"\nauth = \"none\"\nhost = \"127.0.0.1\"\ntls = \"none\"\nuids = [34]\n",
        )
        .unwrap();
        let name = |s: &str, f: Option<&str>, uid| route(&c, s, f, uid).map(|a| a.name.clone());
        assert_eq!(name("x@billing.c.com", None, 0).as_deref(), Some("billing"));
        assert_eq!(
            name("root@web1.example", Some("www-data@web1.example"), 0).as_deref(),
            Some("billing")
        );
        assert_eq!(
            name("backup@web1.example", None, 34).as_deref(),
            Some("backup")
        );
        assert_eq!(
            name("root@web1.example", None, 0).as_deref(),
            Some("default")
        );
    }

    #[test]
    fn a_caller_not_allowed_falls_back_to_the_default_account_or_is_refused() {
        let c = Config::from_toml(
            Path::new("t"),
            "domain = \"web1.example\"\n[[account]]\nname = \"default\"\nmailbox = \"a@c.com\"\nauth = \"none\"\nhost = \"127.0.0.1\"\ntls = \"none\"\nallowed_uids = [33, 34]\n\
             [[account]]\nname = \"billing\"\nmailbox = \"b@c.com\"\nauth = \"none\"\nhost = \"127.0.0.1\"\ntls = \"none\"\nsenders = [\"*@billing.c.com\"]\nallowed_uids = [33]\n",
        )
        .unwrap();
        let name = |s: &str, uid| route(&c, s, None, uid).map(|a| a.name.clone());
        assert_eq!(name("x@billing.c.com", 33).as_deref(), Some("billing"));
        // 34 names billing's address but may not use it: the default account.
        assert_eq!(name("x@billing.c.com", 34).as_deref(), Some("default"));
        assert!(refused(&c, 34).is_none());
        // 1000 may use neither: refused, with a reason for the DSN.
        assert_eq!(name("x@billing.c.com", 1000), None);
        assert!(refused(&c, 1000).is_some_and(|r| r.starts_with("550 5.7.1 uid 1000 ")));
        // Root is not special: it is named nowhere.
        assert!(refused(&c, 0).is_some());
    }
}
