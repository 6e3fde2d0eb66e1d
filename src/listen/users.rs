//! `relay365 listener-user add|remove|list NAME`: manages the listener's AUTH users
//! file. Passwords are read from standard input, hashed with argon2id and never
//! written, shown or logged in clear; the file is replaced atomically, owned by root
//! and readable by the listener's group only.
//!
//! Trusts its caller (root, or a test with its own config); parses the file strictly.

use std::io::{BufRead, Write};
use std::path::Path;

use crate::config::Config;
use crate::spool::durable;
use crate::spool::paths;
use crate::sysexits::{Exit, ExitStatus};

use super::access::{self, User};

/// Why a users command failed.
#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    #[error("{0:?} is not a user name: use 1-64 letters, digits or ._@+-")]
    Name(String),
    #[error(
        "no password on standard input: pipe it in, e.g. `printf '%s\\n' \"$PW\" | relay365 listener-user add NAME`"
    )]
    NoPassword,
    #[error("cannot read the password from standard input: {0}")]
    Stdin(std::io::Error),
    #[error("{0}")]
    Hash(String),
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source} (run as root)")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no listener user {0:?} in the users file")]
    Unknown(String),
    #[error("{0:?} names no [[account]] of the config")]
    Account(String),
}

impl ExitStatus for UsersError {
    fn exit(&self) -> Exit {
        match self {
            UsersError::Name(_) | UsersError::NoPassword | UsersError::Account(_) => Exit::Usage,
            UsersError::Unknown(_) => Exit::NoUser,
            UsersError::Stdin(_) | UsersError::Read { .. } => Exit::IoErr,
            UsersError::Write { .. } => Exit::CantCreat,
            UsersError::Hash(_) => Exit::Software,
        }
    }
}

/// The users file this config names.
fn users_file(config: &Config) -> std::path::PathBuf {
    config.listener.as_ref().map_or_else(
        || paths::LISTENER_USERS_FILE.into(),
        |l| l.users_file.clone(),
    )
}

fn load(path: &Path) -> Result<Vec<User>, UsersError> {
    access::read_users(path)
        .map(|(u, _)| u)
        .map_err(|source| UsersError::Read {
            path: path.display().to_string(),
            source,
        })
}

fn save(path: &Path, users: &[User]) -> Result<(), UsersError> {
    let mut text = String::from(
        "# relay365 listener users: NAME:ARGON2-HASH[:allowed_senders=...][:account=...]\n# Managed with `relay365 listener-user`; see relay365-listen(8).\n",
    );
    for u in users {
        text.push_str(&u.line());
        text.push('\n');
    }
    let err = |source| UsersError::Write {
        path: path.display().to_string(),
        source,
    };
    let tmp = path.with_extension("tmp");
    // SECURITY: readable by root and the listener's group only; hashes are still secrets.
    let file = durable::replace(
        path,
        &tmp,
        text.as_bytes(),
        &durable::options(paths::LISTENER_USERS_MODE),
    )
    .map_err(err)?;
    if nix::unistd::Uid::effective().is_root()
        && let Ok(Some(g)) = nix::unistd::Group::from_name(paths::LISTEN_USER)
    {
        nix::unistd::fchown(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            Some(nix::unistd::Uid::from_raw(0)),
            Some(g.gid),
        )
        .map_err(|e| err(e.into()))?;
    }
    Ok(())
}

/// `add NAME`: the password is the first line of standard input.
pub fn add(
    config: &Config,
    name: &str,
    allowed_senders: Vec<String>,
    account: Option<String>,
    stdin: impl BufRead,
) -> Result<String, UsersError> {
    if !access::valid_name(name) {
        return Err(UsersError::Name(name.to_string()));
    }
    if let Some(a) = &account
        && !config.accounts.iter().any(|x| &x.name == a)
    {
        return Err(UsersError::Account(a.clone()));
    }
    let mut line = zeroize::Zeroizing::new(String::new());
    let mut stdin = stdin;
    stdin.read_line(&mut line).map_err(UsersError::Stdin)?;
    let password = line.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        return Err(UsersError::NoPassword);
    }
    let hash = access::hash_password(password).map_err(UsersError::Hash)?;
    let path = users_file(config);
    let mut users = load(&path)?;
    users.retain(|u| u.name != name);
    users.push(User {
        name: name.to_string(),
        hash,
        allowed_senders,
        account,
    });
    save(&path, &users)?;
    Ok(format!("listener user {name} saved in {}", path.display()))
}

/// `remove NAME`.
pub fn remove(config: &Config, name: &str) -> Result<String, UsersError> {
    let path = users_file(config);
    let mut users = load(&path)?;
    let before = users.len();
    users.retain(|u| u.name != name);
    if users.len() == before {
        return Err(UsersError::Unknown(name.to_string()));
    }
    save(&path, &users)?;
    Ok(format!(
        "listener user {name} removed from {}",
        path.display()
    ))
}

/// `list`: names and restrictions, never the hashes.
pub fn list(config: &Config, out: &mut impl Write) -> Result<(), UsersError> {
    for u in load(&users_file(config))? {
        let senders = if u.allowed_senders.is_empty() {
            "any sender".to_string()
        } else {
            format!("senders {}", u.allowed_senders.join(","))
        };
        let account = u
            .account
            .map(|a| format!(" account {a}"))
            .unwrap_or_default();
        let _ = writeln!(out, "{}\t{senders}{account}", u.name);
    }
    Ok(())
}
