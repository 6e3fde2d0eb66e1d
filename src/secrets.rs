//! Secrets: the mailbox passwords, OAuth2 client secrets and certificate keys the daemon
//! authenticates with, read from `/etc/relay365/secrets.toml` and/or systemd credentials
//! (`LoadCredential=`, whose directory the caller takes from `$CREDENTIALS_DIRECTORY`).
//!
//! Trust: a secrets file or certificate key is read only if it is a regular file (never
//! through a symlink), owned by the daemon's effective uid or root, and closed to group and
//! others; anything else is refused before a byte is read. Its content is parsed as TOML but
//! never echoed: every error names the file, line and key, never a value, because the bad line
//! may be the one holding the secret. Each secret lives in a [`Secret`], whose `Debug` and
//! `Display` print `<redacted>` and whose bytes are zeroed on drop. This is the only module
//! that reads secrets (architecture rule 2); the setgid `sendmail` never calls it.
//!
//! Zeroing is best effort: the TOML parser and the HTTP and SMTP libraries keep short-lived
//! copies of their own that nobody zeroes. What this module guarantees is that no secret
//! reaches a log line, an error message or a `{:?}` through its types.
//!
//! File format, one table per account name used in relay365.toml:
//! ```toml
//! [app]
//! client_secret = "..."                       # OAuth2 client credentials, or
//! # password = "..."                          # AUTH LOGIN (legacy basic auth), or
//! # certificate_key = "/etc/relay365/app.key" # PEM key for the JWT client assertion
//! # certificate = "/etc/relay365/app.crt"     # with the certificate uploaded to Entra ID
//! # proxy_password = "..."                    # the HTTP proxy's, for the user in `proxy`
//! ```
//! systemd credentials named `<account>.password`, `<account>.client_secret`,
//! `<account>.certificate_key` (the PEM key itself) and `<account>.certificate` (the
//! certificate PEM) supply or override the same values; a trailing newline is trimmed.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::OpenOptions;
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use toml::Spanned;
use zeroize::{Zeroize, Zeroizing};

/// Largest secrets file, key or credential read; a real one is a few KB.
pub const MAX_SECRET_FILE: u64 = 64 * 1024;

/// The user the packaged daemon runs as, named in the fix-it hints.
const DAEMON_USER: &str = "relay365";

/// A secret string: printing it in any way shows `<redacted>`, dropping it zeroes its bytes.
///
/// [`Secret::expose`] is the only way to read it, so every place that handles the plain
/// value is easy to find.
pub struct Secret(String);

impl Secret {
    /// Wraps a value; the `String` is moved in, so no unzeroed copy is made here.
    pub fn new(value: String) -> Self {
        Secret(value)
    }

    /// The plain value, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the value is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Clone for Secret {
    fn clone(&self) -> Self {
        // Each copy is its own Secret and zeroes itself on drop.
        Secret(self.0.clone())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // SECURITY: a Secret never prints its value, not even in debug output.
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // SECURITY: a Secret never prints its value.
        f.write_str("<redacted>")
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        // SECURITY: wipe the whole allocation so a core dump or a reused page shows no secret.
        self.0.zeroize();
    }
}

/// The secrets of one account (a `[name]` table or its systemd credentials).
#[derive(Debug, Clone, Default)]
pub struct AccountSecrets {
    password: Option<Secret>,
    client_secret: Option<Secret>,
    certificate_key: Option<Secret>,
    certificate_key_path: Option<PathBuf>,
    certificate: Option<PathBuf>,
    proxy_password: Option<Secret>,
}

impl AccountSecrets {
    /// The password for the HTTP proxy's user (`proxy = "http://user@host:port"`).
    pub fn proxy_password(&self) -> Option<&Secret> {
        self.proxy_password.as_ref()
    }

    /// These secrets with a proxy password.
    pub fn with_proxy_password(mut self, password: Secret) -> Self {
        self.proxy_password = Some(password);
        self
    }

    /// The password for AUTH LOGIN (legacy basic authentication).
    pub fn password(&self) -> Option<&Secret> {
        self.password.as_ref()
    }

    /// The OAuth2 client secret of the app registration.
    pub fn client_secret(&self) -> Option<&Secret> {
        self.client_secret.as_ref()
    }

    /// The PEM text of the private key that signs the OAuth2 client assertion.
    pub fn certificate_key(&self) -> Option<&Secret> {
        self.certificate_key.as_ref()
    }

    /// Where the certificate key was read from (secrets.toml's `certificate_key` or the
    /// credential file), for messages.
    pub fn certificate_key_path(&self) -> Option<&Path> {
        self.certificate_key_path.as_deref()
    }

    /// The PEM certificate uploaded to the app registration (public; read by the OAuth2 client).
    pub fn certificate_path(&self) -> Option<&Path> {
        self.certificate.as_deref()
    }

    /// These secrets with a password, for tests and callers that build secrets by hand.
    pub fn with_password(mut self, password: Secret) -> Self {
        self.password = Some(password);
        self
    }

    /// These secrets with an OAuth2 client secret.
    pub fn with_client_secret(mut self, client_secret: Secret) -> Self {
        self.client_secret = Some(client_secret);
        self
    }

    /// These secrets with a certificate key (PEM text) and the certificate's path.
    pub fn with_certificate(mut self, key_pem: Secret, certificate: PathBuf) -> Self {
        self.certificate_key = Some(key_pem);
        self.certificate = Some(certificate);
        self
    }

    fn has_any_secret(&self) -> bool {
        self.password.is_some()
            || self.client_secret.is_some()
            || self.certificate_key.is_some()
            || self.certificate_key_path.is_some()
            || self.proxy_password.is_some()
    }
}

/// All accounts' secrets, as loaded at daemon start.
#[derive(Debug, Clone, Default)]
pub struct Secrets {
    accounts: BTreeMap<String, AccountSecrets>,
}

/// Where a problem was found: a file and, when known, a line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub path: PathBuf,
    pub line: Option<usize>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{} line {}", self.path.display(), line),
            None => write!(f, "{}", self.path.display()),
        }
    }
}

/// Why secrets could not be loaded. No variant ever holds a secret value.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error(
        "{what} {} does not exist: create it (chmod 600, chown {DAEMON_USER}) or supply the secrets as systemd credentials (LoadCredential=)",
        path.display()
    )]
    Missing { what: &'static str, path: PathBuf },
    #[error(
        "{what} {} is a symbolic link, which relay365 refuses because it could point anywhere: put the file itself there (chmod 600, chown {DAEMON_USER})",
        path.display()
    )]
    Symlink { what: &'static str, path: PathBuf },
    #[error(
        "{what} {} is not a regular file: point to a regular file (chmod 600, chown {DAEMON_USER})",
        path.display()
    )]
    NotRegular { what: &'static str, path: PathBuf },
    #[error(
        "{what} {p} is readable or writable by group or others (mode {mode:04o}): run chmod 600 {p} && chown {DAEMON_USER} {p}",
        p = path.display()
    )]
    Permissions {
        what: &'static str,
        path: PathBuf,
        mode: u32,
    },
    #[error(
        "{what} {p} is accessible by others (mode {mode:04o}): run chmod o= {p}, or let systemd's LoadCredential= create it",
        p = path.display()
    )]
    OpenToOthers {
        what: &'static str,
        path: PathBuf,
        mode: u32,
    },
    #[error(
        "{what} {p} is owned by uid {uid}, not by the daemon's user (uid {euid}) or root: run chown {DAEMON_USER} {p} && chmod 600 {p}",
        p = path.display()
    )]
    Owner {
        what: &'static str,
        path: PathBuf,
        uid: u32,
        euid: u32,
    },
    #[error(
        "cannot read {what} {p}: {source}: make it readable by the daemon's user (chown {DAEMON_USER} {p} && chmod 600 {p})",
        p = path.display()
    )]
    Unreadable {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{what} {} is larger than {limit} bytes: is it the right file?", path.display())]
    TooLarge {
        what: &'static str,
        path: PathBuf,
        limit: u64,
    },
    #[error("{what} {} is not UTF-8 text: write it as UTF-8 (PEM or TOML)", path.display())]
    NotUtf8 { what: &'static str, path: PathBuf },
    #[error(
        "{at}: not valid TOML (the line is not shown because it may hold a secret): check the quoting and the key = \"value\" form, e.g. client_secret = \"...\""
    )]
    Syntax { at: Location },
    #[error(
        "{at}: {key} must be a table: write [{key}] on its own line and its secrets below it, e.g. client_secret = \"...\""
    )]
    NotATable { at: Location, key: String },
    #[error(
        "{at}: unknown key {key} in [{account}]: the keys are password, client_secret, certificate_key, certificate and proxy_password"
    )]
    UnknownKey {
        at: Location,
        account: String,
        key: String,
    },
    #[error("{at}: {key} in [{account}] must be a quoted string, e.g. {key} = \"...\"")]
    NotAString {
        at: Location,
        account: String,
        key: String,
    },
    #[error("{at}: {key} in [{account}] is empty: put the value between the quotes")]
    Empty {
        at: Location,
        account: String,
        key: String,
    },
    #[error(
        "{at}: {key} in [{account}] must be an absolute path, e.g. /etc/relay365/{account}.pem"
    )]
    RelativePath {
        at: Location,
        account: String,
        key: String,
    },
    #[error("account {account} ({origin}): {problem}")]
    Incomplete {
        account: String,
        origin: String,
        problem: &'static str,
    },
    #[error(
        "cannot list the systemd credentials directory {}: {source}: check LoadCredential= in the unit and $CREDENTIALS_DIRECTORY",
        dir.display()
    )]
    CredentialsDir { dir: PathBuf, source: io::Error },
}

/// How strictly a file's mode is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Policy {
    /// Our own files: no access at all for group or others.
    OwnerOnly,
    /// systemd credentials: systemd grants the service user read access with an ACL, which
    /// shows in the group bits, so only the "others" bits must be zero.
    Credential,
}

/// What `fstat` told about an opened file; split out so the checks are unit-testable.
#[derive(Debug, Clone, Copy)]
struct FileFacts {
    is_file: bool,
    mode: u32,
    uid: u32,
}

fn check_facts(
    what: &'static str,
    path: &Path,
    policy: Policy,
    facts: FileFacts,
    euid: u32,
) -> Result<(), SecretsError> {
    let path = path.to_path_buf();
    if !facts.is_file {
        // SECURITY: devices, FIFOs and directories are never read as secrets.
        return Err(SecretsError::NotRegular { what, path });
    }
    // Root (relay365 check, relay365 flush run by the administrator) may also read
    // the daemon user's file, which is how the package installs it.
    let daemon_file_read_by_root = euid == 0 && Some(facts.uid) == daemon_uid();
    if facts.uid != euid && facts.uid != 0 && !daemon_file_read_by_root {
        // SECURITY: someone else's file could be swapped for theirs at any time.
        return Err(SecretsError::Owner {
            what,
            path,
            uid: facts.uid,
            euid,
        });
    }
    let mode = facts.mode & 0o7777;
    match policy {
        // SECURITY: a secret that group or others can read is already leaked; refuse it loudly.
        Policy::OwnerOnly if mode & 0o077 != 0 => {
            Err(SecretsError::Permissions { what, path, mode })
        }
        // SECURITY: systemd credentials may carry an ACL in the group bits, but never "others".
        Policy::Credential if mode & 0o007 != 0 => {
            Err(SecretsError::OpenToOthers { what, path, mode })
        }
        _ => Ok(()),
    }
}

/// Opens `path` without following a symlink, checks it with `fstat` on the opened descriptor
/// (so nothing can be swapped between check and read) and reads it into a [`Secret`].
fn read_protected(
    what: &'static str,
    path: &Path,
    policy: Policy,
    euid: u32,
) -> Result<Secret, SecretsError> {
    let file = OpenOptions::new()
        .read(true)
        // SECURITY: O_NOFOLLOW refuses a planted symlink; O_NONBLOCK keeps a FIFO from hanging us.
        .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY).bits())
        .open(path)
        .map_err(|source| open_error(what, path, source))?;
    let meta = file.metadata().map_err(|source| SecretsError::Unreadable {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    let facts = FileFacts {
        is_file: meta.file_type().is_file(),
        mode: meta.mode(),
        uid: meta.uid(),
    };
    check_facts(what, path, policy, facts, euid)?;
    if meta.len() > MAX_SECRET_FILE {
        return Err(SecretsError::TooLarge {
            what,
            path: path.to_path_buf(),
            limit: MAX_SECRET_FILE,
        });
    }
    // Reserve the whole size up front so reading never reallocates and leaves a stale copy.
    let capacity = usize::try_from(meta.len()).unwrap_or(0).saturating_add(64);
    let mut buf = Zeroizing::new(Vec::with_capacity(capacity));
    file.take(MAX_SECRET_FILE + 1)
        .read_to_end(&mut buf)
        .map_err(|source| SecretsError::Unreadable {
            what,
            path: path.to_path_buf(),
            source,
        })?;
    if buf.len() as u64 > MAX_SECRET_FILE {
        return Err(SecretsError::TooLarge {
            what,
            path: path.to_path_buf(),
            limit: MAX_SECRET_FILE,
        });
    }
    match String::from_utf8(std::mem::take(&mut *buf)) {
        Ok(text) => Ok(Secret::new(text)),
        Err(e) => {
            // SECURITY: the error owns the bytes; wipe them before they are dropped.
            e.into_bytes().zeroize();
            Err(SecretsError::NotUtf8 {
                what,
                path: path.to_path_buf(),
            })
        }
    }
}

fn open_error(what: &'static str, path: &Path, source: io::Error) -> SecretsError {
    let path = path.to_path_buf();
    match source.raw_os_error() {
        // Linux answers O_NOFOLLOW on a symlink with ELOOP, the BSDs with EMLINK.
        Some(code) if code == Errno::ELOOP as i32 || code == Errno::EMLINK as i32 => {
            SecretsError::Symlink { what, path }
        }
        _ if source.kind() == io::ErrorKind::NotFound => SecretsError::Missing { what, path },
        _ => SecretsError::Unreadable { what, path, source },
    }
}

/// 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// A key name as shown in messages: it comes from the file, so quote and shorten it.
fn shown_key(key: &str) -> String {
    let mut shown: String = key.chars().take(64).collect();
    if shown.len() < key.len() {
        shown.push_str("...");
    }
    format!("`{}`", shown.escape_debug())
}

/// An account while loading, with where it was defined for messages.
struct Pending {
    origin: String,
    secrets: AccountSecrets,
}

/// Parses the secrets file's text. Never lets toml's or serde's message text out: those may
/// quote the offending line or value, which may be the secret.
fn parse_file(
    path: &Path,
    text: &str,
    accounts: &mut BTreeMap<String, Pending>,
) -> Result<(), SecretsError> {
    let at = |offset: Option<usize>| Location {
        path: path.to_path_buf(),
        line: offset.map(|o| line_of(text, o)),
    };
    // First pass: the shape of the top level, so a non-table gets its own message.
    let top: BTreeMap<Spanned<String>, toml::Value> = toml::from_str(text).map_err(|e| {
        // SECURITY: only the position of toml's error is used, never its message.
        SecretsError::Syntax {
            at: at(e.span().map(|s| s.start)),
        }
    })?;
    for (key, value) in &top {
        if !value.is_table() {
            return Err(SecretsError::NotATable {
                at: at(Some(key.span().start)),
                key: shown_key(key.get_ref()),
            });
        }
    }
    drop(top);
    // Second pass: the same document with each key's position.
    type Tables = BTreeMap<Spanned<String>, BTreeMap<Spanned<String>, toml::Value>>;
    let tables: Tables = toml::from_str(text).map_err(|e| SecretsError::Syntax {
        // SECURITY: as above, position only.
        at: at(e.span().map(|s| s.start)),
    })?;
    for (account_key, entries) in tables {
        let account = account_key.get_ref().clone();
        let account_at = at(Some(account_key.span().start));
        let mut secrets = AccountSecrets::default();
        for (key, value) in entries {
            let key_at = at(Some(key.span().start));
            let name = key.get_ref().as_str();
            let string = |value: toml::Value| match value {
                toml::Value::String(s) if s.is_empty() => Err(SecretsError::Empty {
                    at: key_at.clone(),
                    account: account.clone(),
                    key: shown_key(name),
                }),
                toml::Value::String(s) => Ok(s),
                _ => Err(SecretsError::NotAString {
                    at: key_at.clone(),
                    account: account.clone(),
                    key: shown_key(name),
                }),
            };
            let absolute = |value: toml::Value| {
                let p = PathBuf::from(string(value)?);
                if p.is_absolute() {
                    Ok(p)
                } else {
                    Err(SecretsError::RelativePath {
                        at: key_at.clone(),
                        account: account.clone(),
                        key: shown_key(name),
                    })
                }
            };
            match name {
                "password" => secrets.password = Some(Secret::new(string(value)?)),
                "client_secret" => secrets.client_secret = Some(Secret::new(string(value)?)),
                "certificate_key" => secrets.certificate_key_path = Some(absolute(value)?),
                "certificate" => secrets.certificate = Some(absolute(value)?),
                "proxy_password" => {
                    secrets.proxy_password = Some(Secret::new(string(value)?));
                }
                _ => {
                    return Err(SecretsError::UnknownKey {
                        at: key_at,
                        account,
                        key: shown_key(name),
                    });
                }
            }
        }
        accounts.insert(
            account,
            Pending {
                origin: account_at.to_string(),
                secrets,
            },
        );
    }
    Ok(())
}

/// The credential file suffixes systemd's `LoadCredential=` names are matched against.
const CREDENTIAL_KINDS: [&str; 4] = [
    ".password",
    ".client_secret",
    ".certificate_key",
    ".certificate",
];

/// Drops one trailing newline (`echo` and editors add one; systemd keeps it).
fn trim_newline(secret: Secret) -> Secret {
    let value = secret.expose();
    let trimmed = value
        .strip_suffix('\n')
        .map(|v| v.strip_suffix('\r').unwrap_or(v));
    match trimmed {
        Some(t) => Secret::new(t.to_owned()),
        None => secret,
    }
}

fn merge_credentials(
    dir: &Path,
    euid: u32,
    accounts: &mut BTreeMap<String, Pending>,
) -> Result<(), SecretsError> {
    let entries = std::fs::read_dir(dir).map_err(|source| SecretsError::CredentialsDir {
        dir: dir.to_path_buf(),
        source,
    })?;
    for entry in entries {
        let entry = entry.map_err(|source| SecretsError::CredentialsDir {
            dir: dir.to_path_buf(),
            source,
        })?;
        let file_name = entry.file_name();
        // The unit may load other credentials too; names that are not ours are skipped.
        let Some(name) = file_name.to_str() else {
            continue;
        };
        let Some((account, kind)) = CREDENTIAL_KINDS.iter().find_map(|kind| {
            name.strip_suffix(kind)
                .filter(|a| !a.is_empty())
                .map(|a| (a, *kind))
        }) else {
            continue;
        };
        let path = dir.join(name);
        let pending = accounts
            .entry(account.to_owned())
            .or_insert_with(|| Pending {
                origin: format!("systemd credentials in {}", dir.display()),
                secrets: AccountSecrets::default(),
            });
        let secrets = &mut pending.secrets;
        match kind {
            ".certificate" => secrets.certificate = Some(path),
            ".certificate_key" => {
                secrets.certificate_key = Some(read_protected(
                    "credential",
                    &path,
                    Policy::Credential,
                    euid,
                )?);
                secrets.certificate_key_path = Some(path);
            }
            _ => {
                let value = trim_newline(read_protected(
                    "credential",
                    &path,
                    Policy::Credential,
                    euid,
                )?);
                if value.is_empty() {
                    return Err(SecretsError::Incomplete {
                        account: account.to_owned(),
                        origin: path.display().to_string(),
                        problem: "the credential file is empty: put the secret in it",
                    });
                }
                if kind == ".password" {
                    secrets.password = Some(value);
                } else {
                    secrets.client_secret = Some(value);
                }
            }
        }
    }
    Ok(())
}

/// Checks an account is usable and reads its certificate key if only its path is known.
fn finish(name: &str, pending: Pending, euid: u32) -> Result<AccountSecrets, SecretsError> {
    let Pending {
        origin,
        mut secrets,
    } = pending;
    let incomplete = |problem| SecretsError::Incomplete {
        account: name.to_owned(),
        origin: origin.clone(),
        problem,
    };
    let has_key = secrets.certificate_key.is_some() || secrets.certificate_key_path.is_some();
    if has_key && secrets.certificate.is_none() {
        return Err(incomplete(
            "certificate_key is set but certificate is not: add certificate = \"/path/cert.pem\", the certificate uploaded to the app registration",
        ));
    }
    if !has_key && secrets.certificate.is_some() {
        return Err(incomplete(
            "certificate is set but certificate_key is not: add certificate_key = \"/path/key.pem\", its private key",
        ));
    }
    if !secrets.has_any_secret() {
        return Err(incomplete(
            "no secret: add password, client_secret, or certificate_key with certificate",
        ));
    }
    if secrets.certificate_key.is_none()
        && let Some(path) = &secrets.certificate_key_path
    {
        secrets.certificate_key = Some(read_protected(
            "certificate key",
            path,
            Policy::OwnerOnly,
            euid,
        )?);
    }
    Ok(secrets)
}

impl Secrets {
    /// Loads the secrets file at `path` and, if given, the systemd credentials directory.
    ///
    /// A missing file is fine when `credentials_dir` supplies at least one account's
    /// secrets; credentials override the file's values for the same account. Call this only
    /// when some account needs authentication.
    pub fn load(path: &Path, credentials_dir: Option<&Path>) -> Result<Secrets, SecretsError> {
        Self::load_as(path, credentials_dir, nix::unistd::geteuid().as_raw())
    }

    fn load_as(
        path: &Path,
        credentials_dir: Option<&Path>,
        euid: u32,
    ) -> Result<Secrets, SecretsError> {
        let mut pending = BTreeMap::new();
        let mut missing = None;
        match read_protected("secrets file", path, Policy::OwnerOnly, euid) {
            Ok(text) => parse_file(path, text.expose(), &mut pending)?,
            Err(e @ SecretsError::Missing { .. }) if credentials_dir.is_some() => missing = Some(e),
            Err(e) => return Err(e),
        }
        if let Some(dir) = credentials_dir {
            merge_credentials(dir, euid, &mut pending)?;
        }
        if let Some(e) = missing
            && pending.is_empty()
        {
            return Err(e);
        }
        let mut accounts = BTreeMap::new();
        for (name, p) in pending {
            let secrets = finish(&name, p, euid)?;
            accounts.insert(name, secrets);
        }
        Ok(Secrets { accounts })
    }

    /// The secrets of the account named `name` in relay365.toml.
    pub fn for_account(&self, name: &str) -> Option<&AccountSecrets> {
        self.accounts.get(name)
    }

    /// The account names that have secrets, for `relay365 check`.
    pub fn account_names(&self) -> impl Iterator<Item = &str> {
        self.accounts.keys().map(String::as_str)
    }

    /// Secrets built by hand, for tests of the modules that use them.
    pub fn from_accounts(accounts: impl IntoIterator<Item = (String, AccountSecrets)>) -> Self {
        Secrets {
            accounts: accounts.into_iter().collect(),
        }
    }
}

/// The uid of the daemon's user, if it exists on this system.
fn daemon_uid() -> Option<u32> {
    nix::unistd::User::from_name(DAEMON_USER)
        .ok()
        .flatten()
        .map(|u| u.uid.as_raw())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    const SECRET: &str = "s3cr3t-Value~42";

    fn write(dir: &Path, name: &str, content: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, content).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    fn euid() -> u32 {
        nix::unistd::geteuid().as_raw()
    }

    #[test]
    fn secret_redacts_everywhere() {
        let s = Secret::new(SECRET.to_owned());
        assert_eq!(format!("{s:?}"), "<redacted>");
        assert_eq!(format!("{s}"), "<redacted>");
        assert_eq!(s.expose(), SECRET);
        let acct = AccountSecrets::default()
            .with_password(s.clone())
            .with_client_secret(s);
        let all = Secrets::from_accounts([("app".to_owned(), acct)]);
        let shown = format!("{all:?} {all:#?}");
        assert!(!shown.contains(SECRET), "{shown}");
        assert!(shown.contains("<redacted>"));
    }

    #[test]
    fn loads_all_kinds() {
        let dir = tempfile::tempdir().unwrap();
        let key = write(
            dir.path(),
            "app.key",
            "-----BEGIN PRIVATE KEY-----\n",
            0o600,
        );
        let text = format!(
            "# comment\n[basic]\npassword = \"{SECRET}\"\n\n[app]\nclient_secret = \"cs\"\n\n[cert]\ncertificate_key = \"{}\"\ncertificate = \"/etc/relay365/app.crt\"\n",
            key.display()
        );
        let path = write(dir.path(), "secrets.toml", &text, 0o600);
        let s = Secrets::load(&path, None).unwrap();
        assert_eq!(
            s.for_account("basic").unwrap().password().unwrap().expose(),
            SECRET
        );
        assert_eq!(
            s.for_account("app")
                .unwrap()
                .client_secret()
                .unwrap()
                .expose(),
            "cs"
        );
        let cert = s.for_account("cert").unwrap();
        assert!(
            cert.certificate_key()
                .unwrap()
                .expose()
                .starts_with("-----BEGIN")
        );
        assert_eq!(cert.certificate_key_path(), Some(key.as_path()));
        assert_eq!(
            cert.certificate_path(),
            Some(Path::new("/etc/relay365/app.crt"))
        );
        assert!(s.for_account("nobody").is_none());
        assert_eq!(
            s.account_names().collect::<Vec<_>>(),
            ["app", "basic", "cert"]
        );
    }

    #[test]
    fn refuses_group_or_world_access() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o644, 0o640, 0o604, 0o620, 0o602, 0o660] {
            let path = write(
                dir.path(),
                "secrets.toml",
                &format!("[a]\npassword = \"{SECRET}\"\n"),
                mode,
            );
            let err = Secrets::load(&path, None).unwrap_err();
            assert!(
                matches!(err, SecretsError::Permissions { .. }),
                "{mode:o}: {err}"
            );
            let msg = err.to_string();
            assert!(msg.contains("chmod 600"), "{msg}");
            assert!(msg.contains(&format!("mode {mode:04o}")), "{msg}");
            assert!(msg.contains(&path.display().to_string()), "{msg}");
        }
    }

    #[test]
    fn refuses_symlink_and_non_regular() {
        let dir = tempfile::tempdir().unwrap();
        let real = write(dir.path(), "real.toml", "[a]\npassword = \"x\"\n", 0o600);
        let link = dir.path().join("secrets.toml");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let err = Secrets::load(&link, None).unwrap_err();
        assert!(matches!(err, SecretsError::Symlink { .. }), "{err}");

        let sub = dir.path().join("adir");
        fs::create_dir(&sub).unwrap();
        fs::set_permissions(&sub, fs::Permissions::from_mode(0o700)).unwrap();
        let err = Secrets::load(&sub, None).unwrap_err();
        assert!(matches!(err, SecretsError::NotRegular { .. }), "{err}");

        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let err = Secrets::load(&fifo, None).unwrap_err();
        assert!(matches!(err, SecretsError::NotRegular { .. }), "{err}");
    }

    #[test]
    fn owner_check_logic() {
        let p = Path::new("/etc/relay365/secrets.toml");
        let facts = |uid: u32, mode: u32| FileFacts {
            is_file: true,
            mode: 0o100000 | mode,
            uid,
        };
        // Ours or root's, closed to others: fine.
        assert!(check_facts("f", p, Policy::OwnerOnly, facts(998, 0o600), 998).is_ok());
        assert!(check_facts("f", p, Policy::OwnerOnly, facts(0, 0o400), 998).is_ok());
        // Someone else's: refused whatever the mode.
        let err = check_facts(
            "secrets file",
            p,
            Policy::OwnerOnly,
            facts(1000, 0o600),
            998,
        )
        .unwrap_err();
        assert!(matches!(
            err,
            SecretsError::Owner {
                uid: 1000,
                euid: 998,
                ..
            }
        ));
        let msg = err.to_string();
        assert!(
            msg.contains("uid 1000") && msg.contains("chown relay365"),
            "{msg}"
        );
        // Root daemon: a file of another user is refused too.
        assert!(check_facts("f", p, Policy::OwnerOnly, facts(998, 0o600), 0).is_err());
        // Group bits: refused for our files, tolerated (ACL) for systemd credentials.
        assert!(check_facts("f", p, Policy::OwnerOnly, facts(0, 0o440), 998).is_err());
        assert!(check_facts("f", p, Policy::Credential, facts(0, 0o440), 998).is_ok());
        let err = check_facts("f", p, Policy::Credential, facts(0, 0o444), 998).unwrap_err();
        assert!(matches!(err, SecretsError::OpenToOthers { .. }));
        // Not a regular file comes first.
        let dir = FileFacts {
            is_file: false,
            mode: 0o40700,
            uid: 998,
        };
        assert!(matches!(
            check_facts("f", p, Policy::OwnerOnly, dir, 998),
            Err(SecretsError::NotRegular { .. })
        ));
    }

    #[test]
    fn load_as_other_euid_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "secrets.toml", "[a]\npassword = \"x\"\n", 0o600);
        let other = euid().wrapping_add(4242);
        // Our file is not owned by `other`; only root's files pass for everyone.
        let result = Secrets::load_as(&path, None, other);
        if euid() == 0 {
            assert!(result.is_ok());
        } else {
            assert!(matches!(result, Err(SecretsError::Owner { .. })));
        }
    }

    /// Every error for a malformed file, built with the secret on the bad line.
    #[test]
    fn errors_never_contain_the_secret() {
        let dir = tempfile::tempdir().unwrap();
        let cases: &[(&str, usize)] = &[
            // Unterminated string.
            ("[a]\npassword = \"SECRET\n", 2),
            // Missing quotes.
            ("[a]\n\npassword = SECRET\n", 3),
            // Wrong key, with the secret as its value.
            ("[a]\npasword = \"SECRET\"\n", 2),
            // A top-level string instead of a table.
            ("a = \"SECRET\"\n", 1),
            // Wrong type.
            ("[a]\npassword = [\"SECRET\"]\n", 2),
            // Duplicate key.
            ("[a]\npassword = \"SECRET\"\npassword = \"SECRET\"\n", 3),
            // Secret pasted as a bare line.
            ("[a]\nSECRET\n", 2),
            // Secret as a key.
            ("[a]\n\"SECRET\" = 1\n", 2),
            // Secret in a relative path.
            (
                "[a]\ncertificate_key = \"SECRET\"\ncertificate = \"/c\"\n",
                2,
            ),
        ];
        for (template, line) in cases {
            let text = template.replace("SECRET", SECRET);
            let path = write(dir.path(), "secrets.toml", &text, 0o600);
            let err = Secrets::load(&path, None).unwrap_err();
            let shown = format!("{err} {err:?}");
            if template.contains("\"SECRET\" = 1") {
                // A key name is shown, by design: it names what to fix. Still it must be that
                // case alone that shows it.
                assert!(matches!(err, SecretsError::UnknownKey { .. }), "{shown}");
                continue;
            }
            assert!(!shown.contains(SECRET), "{template:?} leaked: {shown}");
            assert!(
                err.to_string().contains(&format!("line {line}")),
                "{template:?}: {err}"
            );
        }
    }

    #[test]
    fn key_errors_name_the_key_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "secrets.toml",
            "[a]\npassword = \"x\"\n\n[b]\nclient_secrett = \"y\"\n",
            0o600,
        );
        let msg = Secrets::load(&path, None).unwrap_err().to_string();
        assert!(msg.contains("line 5"), "{msg}");
        assert!(
            msg.contains("`client_secrett`") && msg.contains("[b]"),
            "{msg}"
        );

        let path = write(dir.path(), "secrets.toml", "[a]\n", 0o600);
        let msg = Secrets::load(&path, None).unwrap_err().to_string();
        assert!(msg.contains("no secret") && msg.contains("line 1"), "{msg}");

        let path = write(
            dir.path(),
            "secrets.toml",
            "[a]\ncertificate = \"/c.pem\"\n",
            0o600,
        );
        let msg = Secrets::load(&path, None).unwrap_err().to_string();
        assert!(msg.contains("certificate_key is not"), "{msg}");

        let path = write(dir.path(), "secrets.toml", "[a]\npassword = \"\"\n", 0o600);
        let err = Secrets::load(&path, None).unwrap_err();
        assert!(matches!(err, SecretsError::Empty { .. }), "{err}");
    }

    #[test]
    fn certificate_key_file_is_checked_too() {
        let dir = tempfile::tempdir().unwrap();
        let key = write(dir.path(), "app.key", "KEY", 0o644);
        let text = format!(
            "[a]\ncertificate_key = \"{}\"\ncertificate = \"/c.pem\"\n",
            key.display()
        );
        let path = write(dir.path(), "secrets.toml", &text, 0o600);
        let err = Secrets::load(&path, None).unwrap_err();
        assert!(
            matches!(
                err,
                SecretsError::Permissions {
                    what: "certificate key",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn missing_file_needs_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.toml");
        let err = Secrets::load(&path, None).unwrap_err();
        assert!(matches!(err, SecretsError::Missing { .. }), "{err}");
        let creds = dir.path().join("creds");
        fs::create_dir(&creds).unwrap();
        let err = Secrets::load(&path, Some(&creds)).unwrap_err();
        assert!(matches!(err, SecretsError::Missing { .. }), "{err}");
    }

    #[test]
    fn credentials_directory() {
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("creds");
        fs::create_dir(&creds).unwrap();
        write(&creds, "app.client_secret", &format!("{SECRET}\n"), 0o400);
        write(&creds, "basic.password", "pw\r\n", 0o440);
        write(
            &creds,
            "cert.certificate_key",
            "-----BEGIN PRIVATE KEY-----\n",
            0o400,
        );
        write(
            &creds,
            "cert.certificate",
            "-----BEGIN CERTIFICATE-----\n",
            0o444,
        );
        write(&creds, "unrelated-credential", "whatever", 0o400);
        let missing = dir.path().join("secrets.toml");
        let s = Secrets::load(&missing, Some(&creds)).unwrap();
        assert_eq!(
            s.for_account("app")
                .unwrap()
                .client_secret()
                .unwrap()
                .expose(),
            SECRET
        );
        assert_eq!(
            s.for_account("basic").unwrap().password().unwrap().expose(),
            "pw"
        );
        let cert = s.for_account("cert").unwrap();
        assert_eq!(
            cert.certificate_key().unwrap().expose(),
            "-----BEGIN PRIVATE KEY-----\n"
        );
        assert_eq!(
            cert.certificate_path(),
            Some(creds.join("cert.certificate").as_path())
        );
        assert_eq!(s.account_names().count(), 3);

        // Credentials override the file's value for the same account.
        let file = write(
            dir.path(),
            "secrets.toml",
            "[app]\nclient_secret = \"old\"\n[other]\npassword = \"p\"\n",
            0o600,
        );
        let s = Secrets::load(&file, Some(&creds)).unwrap();
        assert_eq!(
            s.for_account("app")
                .unwrap()
                .client_secret()
                .unwrap()
                .expose(),
            SECRET
        );
        assert_eq!(
            s.for_account("other").unwrap().password().unwrap().expose(),
            "p"
        );

        // A credential open to others is refused.
        write(&creds, "app.client_secret", SECRET, 0o404);
        let err = Secrets::load(&file, Some(&creds)).unwrap_err();
        assert!(matches!(err, SecretsError::OpenToOthers { .. }), "{err}");
        assert!(!err.to_string().contains(SECRET));
    }

    #[test]
    fn too_large_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let big = "#".repeat(MAX_SECRET_FILE as usize + 1);
        let path = write(dir.path(), "secrets.toml", &big, 0o600);
        let err = Secrets::load(&path, None).unwrap_err();
        assert!(matches!(err, SecretsError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn newline_trimming() {
        assert_eq!(trim_newline(Secret::new("a\n".into())).expose(), "a");
        assert_eq!(trim_newline(Secret::new("a\r\n".into())).expose(), "a");
        assert_eq!(trim_newline(Secret::new("a\n\n".into())).expose(), "a\n");
        assert_eq!(trim_newline(Secret::new("a".into())).expose(), "a");
    }
}
