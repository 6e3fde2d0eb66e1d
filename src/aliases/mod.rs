//! Aliases: parses an /etc/aliases-format file and maps local recipients (root,
//! www-data, ...) to real addresses. relay365 is a null client and delivers nothing
//! locally, so whatever stays local after alias expansion goes to the admin address
//! (nullmailer's `adminaddr`), and `:include:`, `|command` and `/file` targets are skipped
//! with a warning.
//!
//! Trust: the file is root's configuration, trusted for intent but not for syntax; parse
//! errors carry line numbers, and expansion is bounded in depth and size so a mistaken or
//! hostile file can neither loop nor blow up. Nothing here runs commands or opens the
//! files an alias names.
//!
//! Used by the daemon's pickup and by `sendmail -bv` (`locals`); it names neither.

use std::collections::HashMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};

mod locals;
pub use locals::Locals;

/// Deepest alias chain followed (`root` → `ops` → ... ).
pub const MAX_DEPTH: usize = 16;
/// Most targets visited while resolving one recipient; stops fan-out blow-ups.
pub const MAX_EXPANSION: usize = 1000;
/// Largest aliases file read.
pub const MAX_FILE: u64 = 4 * 1024 * 1024;

/// What went wrong reading an aliases file or resolving a recipient.
#[derive(Debug, thiserror::Error)]
pub enum AliasError {
    #[error("cannot read {}: {source}; check that it exists and relay365 may read it", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is larger than {MAX_FILE} bytes; an aliases file that big is a mistake", path.display())]
    TooLarge { path: PathBuf },
    #[error("{} line {line}: {message}", origin.display())]
    Syntax {
        origin: PathBuf,
        line: usize,
        message: String,
    },
    #[error(
        "no alias for {name}{} and no admin address: set admin = \"you@example.org\" in relay365.toml or add an alias in /etc/aliases",
        reached_from(name, root)
    )]
    NoRoute { name: String, root: String },
    #[error(
        "alias loop {}: edit /etc/aliases so the chain ends in a real address",
        chain.join(" -> ")
    )]
    Loop { chain: Vec<String> },
    #[error(
        "alias chain from {} is deeper than {MAX_DEPTH} ({}): shorten it in /etc/aliases",
        chain.first().map_or("?", String::as_str),
        chain.join(" -> ")
    )]
    TooDeep { chain: Vec<String> },
    #[error(
        "alias {root} expands to more than {MAX_EXPANSION} targets: use a mailing list instead"
    )]
    TooMany { root: String },
    #[error(
        "admin address {admin} is local to this host, so mail to it would loop: set admin in relay365.toml to a mailbox elsewhere, e.g. you@example.org"
    )]
    AdminNotRemote { admin: String },
    #[error("cannot resolve an empty or malformed local name {name:?}")]
    BadName { name: String },
}

fn reached_from(name: &str, root: &str) -> String {
    if name == root {
        String::new()
    } else {
        format!(" (reached from {root})")
    }
}

/// One target of an alias, as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A mail address, qualified or not. `no_expand` is sendmail's `\name`: deliver to the
    /// local name without expanding it again (for a null client: the admin address).
    Address { address: String, no_expand: bool },
    /// `:include:/path` — unsupported in a null client.
    Include(String),
    /// `|command` — unsupported in a null client.
    Command(String),
    /// `/path/to/file` — unsupported in a null client.
    File(String),
}

/// One alias: its name (lower case) and targets, with the line it starts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub targets: Vec<Target>,
    pub line: usize,
}

/// A parsed aliases file. Names are matched case-insensitively.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Aliases {
    entries: HashMap<String, Entry>,
    warnings: Vec<String>,
}

impl Aliases {
    /// Reads and parses `path`.
    /// Like [`Aliases::load`], but a missing file is an empty table: relay365 needs no
    /// aliases file (the admin address catches local mail).
    pub fn load_if_present(path: &Path) -> Result<Aliases, AliasError> {
        match Aliases::load(path) {
            Err(AliasError::Read { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok(Aliases::default())
            }
            other => other,
        }
    }

    pub fn load(path: &Path) -> Result<Aliases, AliasError> {
        let file = std::fs::File::open(path).map_err(|source| AliasError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut text = String::new();
        // SECURITY: bounds memory even if the path points somewhere unexpected.
        file.take(MAX_FILE + 1)
            .read_to_string(&mut text)
            .map_err(|source| AliasError::Read {
                path: path.to_owned(),
                source,
            })?;
        if text.len() as u64 > MAX_FILE {
            return Err(AliasError::TooLarge {
                path: path.to_owned(),
            });
        }
        Aliases::parse(&text, path)
    }

    /// Parses aliases text; `origin` names it in error messages.
    pub fn parse(text: &str, origin: &Path) -> Result<Aliases, AliasError> {
        let mut aliases = Aliases::default();
        let err = |line: usize, message: String| AliasError::Syntax {
            origin: origin.to_owned(),
            line,
            message,
        };
        // A logical line: its text and, per piece, (offset in text, physical line number).
        let mut logical: Option<(String, Vec<(usize, usize)>)> = None;
        let mut finished = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let n = i + 1;
            let raw = raw.strip_suffix('\r').unwrap_or(raw);
            // SECURITY: control characters have no place in names or addresses.
            if raw.chars().any(|c| c.is_control() && c != '\t') {
                return Err(err(n, "contains a control character; remove it".to_owned()));
            }
            let trimmed = raw.trim_start();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            if trimmed.len() != raw.len() {
                match logical.as_mut() {
                    Some((buf, map)) => {
                        map.push((buf.len(), n));
                        buf.push(' ');
                        buf.push_str(trimmed);
                    }
                    None => {
                        return Err(err(
                            n,
                            "continuation line (starts with whitespace) with no alias before it: \
                             remove the leading whitespace or the line"
                                .to_owned(),
                        ));
                    }
                }
            } else {
                if let Some(done) = logical.take() {
                    finished.push(done);
                }
                logical = Some((raw.to_owned(), vec![(0, n)]));
            }
        }
        finished.extend(logical);
        for (buf, map) in finished {
            let line_at = |offset: usize| {
                map.iter()
                    .rev()
                    .find(|(o, _)| *o <= offset)
                    .map_or(0, |(_, l)| *l)
            };
            let entry = parse_entry(&buf, &line_at).map_err(|(off, m)| err(line_at(off), m))?;
            match aliases.entries.get(&entry.name) {
                Some(first) => aliases.warnings.push(format!(
                    "{} line {}: duplicate alias {} (first on line {}) is ignored; remove one of them",
                    origin.display(),
                    entry.line,
                    entry.name,
                    first.line
                )),
                None => {
                    aliases.entries.insert(entry.name.clone(), entry);
                }
            }
        }
        Ok(aliases)
    }

    /// The alias named `name`, case-insensitively.
    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.entries.get(&name.to_lowercase())
    }

    /// Warnings found while parsing (duplicates), for the log.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Parses `name: target, target`; errors carry the byte offset for the line number.
fn parse_entry(buf: &str, line_at: &dyn Fn(usize) -> usize) -> Result<Entry, (usize, String)> {
    let (name, after_name) = if let Some(rest) = buf.strip_prefix('"') {
        let (inner, used) = quoted(rest).ok_or((
            0,
            "the quoted alias name has no closing quote; add one".to_owned(),
        ))?;
        (inner, 1 + used)
    } else {
        let end = buf
            .find(|c: char| c == ':' || c.is_whitespace())
            .unwrap_or(buf.len());
        (buf[..end].to_owned(), end)
    };
    let rest = &buf[after_name..];
    let colon_pos = after_name + (rest.len() - rest.trim_start().len());
    let Some(targets_text) = rest.trim_start().strip_prefix(':') else {
        return Err((
            colon_pos,
            format!(
                "expected `name: target, ...` but found no colon after {name:?}; add a colon after the alias name"
            ),
        ));
    };
    if name.is_empty() {
        return Err((
            0,
            "the alias name is empty; write `name: target`".to_owned(),
        ));
    }
    if name.contains('@') {
        return Err((
            0,
            format!("alias name {name:?} contains @; aliases name local users only, e.g. `root:`"),
        ));
    }
    let base = colon_pos + 1;
    let mut targets = Vec::new();
    for (off, item) in split_targets(targets_text).map_err(|off| {
        (
            base + off,
            "a quoted target has no closing quote; add one".to_owned(),
        )
    })? {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        targets.push(parse_target(item).map_err(|m| (base + off, m))?);
    }
    if targets.is_empty() {
        return Err((
            colon_pos,
            format!(
                "alias {name} has no targets; add an address after the colon or remove the line"
            ),
        ));
    }
    Ok(Entry {
        name: name.to_lowercase(),
        targets,
        line: line_at(0),
    })
}

/// Reads a quoted string after its opening quote: the unescaped text and the bytes used
/// including the closing quote.
fn quoted(s: &str) -> Option<(String, usize)> {
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => out.push(chars.next()?.1),
            '"' => return Some((out, i + 1)),
            c => out.push(c),
        }
    }
    None
}

/// Splits at commas outside double quotes; yields (offset, item). Err(offset) on an
/// unterminated quote.
fn split_targets(s: &str) -> Result<Vec<(usize, &str)>, usize> {
    let mut items = Vec::new();
    let mut start = 0;
    let mut in_quote = None;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match (c, in_quote) {
            ('\\', Some(_)) => escaped = true,
            ('"', None) => in_quote = Some(i),
            ('"', Some(_)) => in_quote = None,
            (',', None) => {
                items.push((start, &s[start..i]));
                start = i + 1;
            }
            _ => {}
        }
    }
    if let Some(q) = in_quote {
        return Err(q);
    }
    items.push((start, &s[start..]));
    Ok(items)
}

/// Classifies one trimmed target.
fn parse_target(item: &str) -> Result<Target, String> {
    // A target that is entirely one quoted string is its unquoted content.
    let text = match item.strip_prefix('"').and_then(quoted) {
        Some((inner, used)) if used + 1 == item.len() => inner,
        _ => item.to_owned(),
    };
    if let Some(path) = text
        .get(..9)
        .filter(|p| p.eq_ignore_ascii_case(":include:"))
        .and_then(|_| text.get(9..))
    {
        return Ok(Target::Include(path.trim().to_owned()));
    }
    if let Some(cmd) = text.strip_prefix('|') {
        return Ok(Target::Command(cmd.trim().to_owned()));
    }
    if text.starts_with('/') {
        return Ok(Target::File(text));
    }
    let (no_expand, addr) = match text.strip_prefix('\\') {
        Some(rest) => (true, rest),
        None => (false, text.as_str()),
    };
    let addr = addr
        .strip_prefix('<')
        .and_then(|a| a.strip_suffix('>'))
        .unwrap_or(addr)
        .trim();
    if addr.is_empty() {
        return Err(format!("target {item:?} is empty"));
    }
    // Whitespace is only legal inside a quoted local part.
    if !addr.starts_with('"') && addr.contains(char::is_whitespace) {
        return Err(format!(
            "target {item:?} contains whitespace; separate targets with commas or quote them"
        ));
    }
    // Quotes allow blanks, but a tab passed the line's control check and no address
    // (RFC 5321 quoted string, or our Address type) may carry one.
    if addr.contains(char::is_control) {
        return Err(format!(
            "target {item:?} contains a tab or other control character; use spaces or remove it"
        ));
    }
    if let Some((local, domain)) = addr.rsplit_once('@')
        && (local.is_empty() || domain.is_empty() || domain.contains(char::is_whitespace))
    {
        return Err(format!(
            "target {item:?} is not a valid address; write user@example.org"
        ));
    }
    Ok(Target::Address {
        address: addr.to_owned(),
        no_expand,
    })
}

/// Which domains are this host's own, and the domain for unqualified targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domains {
    /// Appended to unqualified alias targets that have no alias of their own (nullmailer's
    /// `defaultdomain`), e.g. `example.org`.
    pub qualify: String,
    /// This host's name and any configured local domains (`localhost` only if listed).
    pub local: Vec<String>,
}

impl Domains {
    /// Whether `address` is local: unqualified, or its domain is one of `local`.
    pub fn is_local(&self, address: &str) -> bool {
        match address.rsplit_once('@') {
            None => true,
            Some((_, domain)) => self.is_local_domain(domain),
        }
    }

    fn is_local_domain(&self, domain: &str) -> bool {
        let d = domain.trim_end_matches('.');
        self.local
            .iter()
            .any(|l| l.trim_end_matches('.').eq_ignore_ascii_case(d))
    }
}

/// Where a local recipient goes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolution {
    /// Remote addresses to send to, deduplicated, in file order.
    pub recipients: Vec<String>,
    /// Local names that had no alias and went to the admin address.
    pub via_admin: Vec<String>,
    /// Skipped targets and other oddities, each naming its alias, for the log.
    pub warnings: Vec<String>,
}

/// Resolves the local recipient `local_part` (`root`, or `root@<local domain>`): alias
/// expansion first, then `admin` for anything still local, else [`AliasError::NoRoute`].
/// An address in a remote domain comes back unchanged.
pub fn resolve(
    local_part: &str,
    aliases: &Aliases,
    admin: Option<&str>,
    domains: &Domains,
) -> Result<Resolution, AliasError> {
    let input = local_part.trim();
    let name = match input.rsplit_once('@') {
        Some((_, d)) if !domains.is_local_domain(d) => {
            return Ok(Resolution {
                recipients: vec![input.to_owned()],
                ..Resolution::default()
            });
        }
        Some((l, _)) => l,
        None => input,
    };
    if name.is_empty() || name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(AliasError::BadName {
            name: local_part.to_owned(),
        });
    }
    let root = name.to_lowercase();
    let mut walk = Walk {
        aliases,
        domains,
        root: &root,
        out: Resolution::default(),
        visited: 0,
    };
    let mut path = Vec::new();
    walk.expand(&root, &mut path)?;
    let mut res = walk.out;
    if !res.via_admin.is_empty() {
        let Some(admin) = admin.map(str::trim).filter(|a| !a.is_empty()) else {
            let name = res.via_admin.swap_remove(0);
            return Err(AliasError::NoRoute { name, root });
        };
        // SECURITY: a local admin address would route back into this resolver forever.
        if domains.is_local(admin) {
            return Err(AliasError::AdminNotRemote {
                admin: admin.to_owned(),
            });
        }
        push_unique(&mut res.recipients, admin.to_owned());
    }
    Ok(res)
}

struct Walk<'a> {
    aliases: &'a Aliases,
    domains: &'a Domains,
    root: &'a str,
    out: Resolution,
    visited: usize,
}

impl Walk<'_> {
    /// Expands local `name` (lower case); `path` holds the aliases being expanded.
    fn expand(&mut self, name: &str, path: &mut Vec<String>) -> Result<(), AliasError> {
        let Some(entry) = self.aliases.get(name) else {
            push_unique(&mut self.out.via_admin, name.to_owned());
            return Ok(());
        };
        if path.len() >= MAX_DEPTH {
            let mut chain = path.clone();
            chain.push(name.to_owned());
            return Err(AliasError::TooDeep { chain });
        }
        path.push(name.to_owned());
        let produced_before = self.out.recipients.len() + self.out.via_admin.len();
        for target in &entry.targets {
            self.visited += 1;
            if self.visited > MAX_EXPANSION {
                return Err(AliasError::TooMany {
                    root: self.root.to_owned(),
                });
            }
            let (kind, what) = match target {
                Target::Include(p) => ("an :include: file", format!(":include:{p}")),
                Target::Command(c) => ("a command", format!("|{c}")),
                Target::File(f) => ("a file", f.clone()),
                Target::Address { address, no_expand } => {
                    self.address(name, address, *no_expand, path)?;
                    continue;
                }
            };
            self.out.warnings.push(format!(
                "alias {name} (line {}): target {what} is {kind}; relay365 is a null client and \
                 delivers nothing locally, so it is skipped",
                entry.line
            ));
        }
        // An alias that yields nothing leaves its name local.
        if self.out.recipients.len() + self.out.via_admin.len() == produced_before {
            push_unique(&mut self.out.via_admin, name.to_owned());
        }
        path.pop();
        Ok(())
    }

    fn address(
        &mut self,
        alias: &str,
        address: &str,
        no_expand: bool,
        path: &mut Vec<String>,
    ) -> Result<(), AliasError> {
        let (local, domain) = match address.rsplit_once('@') {
            Some((l, d)) => (l, Some(d)),
            None => (address, None),
        };
        if domain.is_some_and(|d| !self.domains.is_local_domain(d)) {
            push_unique(&mut self.out.recipients, address.to_owned());
            return Ok(());
        }
        let lname = local.to_lowercase();
        if no_expand {
            push_unique(&mut self.out.via_admin, lname);
            return Ok(());
        }
        if lname == alias {
            // sendmail's "also keep a local copy" idiom; there is no local copy here.
            self.out.warnings.push(format!(
                "alias {alias} lists itself; relay365 delivers nothing locally, so that copy is skipped"
            ));
            return Ok(());
        }
        if path.contains(&lname) {
            let mut chain = path.clone();
            chain.push(lname);
            return Err(AliasError::Loop { chain });
        }
        if self.aliases.get(&lname).is_some() {
            return self.expand(&lname, path);
        }
        match domain {
            None if !self.domains.is_local_domain(&self.domains.qualify) => {
                push_unique(
                    &mut self.out.recipients,
                    format!("{local}@{}", self.domains.qualify),
                );
            }
            _ => push_unique(&mut self.out.via_admin, lname),
        }
        Ok(())
    }
}

/// Appends unless an ASCII-case-insensitive equal is already there.
fn push_unique(list: &mut Vec<String>, item: String) {
    if !list.iter().any(|x| x.eq_ignore_ascii_case(&item)) {
        list.push(item);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Aliases {
        Aliases::parse(text, Path::new("/etc/aliases")).unwrap()
    }

    fn parse_err(text: &str) -> (usize, String) {
        match Aliases::parse(text, Path::new("/etc/aliases")) {
            Err(AliasError::Syntax { line, message, .. }) => (line, message),
            other => panic!("expected a syntax error, got {other:?}"),
        }
    }

    fn domains() -> Domains {
        Domains {
            qualify: "example.org".to_owned(),
            local: vec!["web1.example.org".to_owned(), "localhost".to_owned()],
        }
    }

    fn resolve_ok(name: &str, a: &Aliases, admin: Option<&str>) -> Resolution {
        resolve(name, a, admin, &domains()).unwrap()
    }

    const DEBIAN: &str = "\
# /etc/aliases
mailer-daemon: postmaster
postmaster: root
nobody: root
hostmaster: root
usenet: root
news: root
webmaster: root
www: root
ftp: root
abuse: root
noc: root
security: root
root: ops@example.org
";

    #[test]
    fn parses_debian_default_file() {
        let a = parse(DEBIAN);
        assert_eq!(a.len(), 13);
        assert!(a.warnings().is_empty());
        let r = resolve_ok("MAILER-DAEMON", &a, None);
        assert_eq!(r.recipients, vec!["ops@example.org"]);
        assert!(r.warnings.is_empty());
    }

    #[test]
    fn continuation_lines_comments_and_quotes() {
        let a = parse(
            "root: alice@example.org,\n\
             \tbob@example.org\n\
             \x20 # an indented comment is ignored\n\
             \x20 , \"carol smith\"@example.org\n\
             \n\
             \"Web Master\": \"dave@example.org\", <erin@example.org>\n",
        );
        let root = a.get("ROOT").unwrap();
        assert_eq!(root.line, 1);
        assert_eq!(root.targets.len(), 3);
        assert_eq!(
            resolve_ok("root", &a, None).recipients,
            vec![
                "alice@example.org",
                "bob@example.org",
                "\"carol smith\"@example.org"
            ]
        );
        let wm = a.get("web master").unwrap();
        assert_eq!(wm.line, 6);
        assert_eq!(
            wm.targets,
            vec![
                Target::Address {
                    address: "dave@example.org".to_owned(),
                    no_expand: false
                },
                Target::Address {
                    address: "erin@example.org".to_owned(),
                    no_expand: false
                },
            ]
        );
    }

    #[test]
    fn crlf_files_parse() {
        let a = parse("root: a@example.org,\r\n b@example.org\r\n");
        assert_eq!(a.get("root").unwrap().targets.len(), 2);
    }

    #[test]
    fn names_are_case_insensitive() {
        let a = parse("Root: a@example.org\n");
        assert!(a.get("root").is_some());
        assert!(a.get("ROOT").is_some());
        assert_eq!(
            resolve_ok("rOOt", &a, None).recipients,
            vec!["a@example.org"]
        );
    }

    #[test]
    fn classifies_unsupported_targets() {
        let a = parse(
            "list: :include:/etc/mail/list, \"|/usr/bin/procmail -a x\", /var/mail/archive, \
             |/bin/true, ops@example.org\n",
        );
        assert_eq!(
            a.get("list").unwrap().targets[..4],
            [
                Target::Include("/etc/mail/list".to_owned()),
                Target::Command("/usr/bin/procmail -a x".to_owned()),
                Target::File("/var/mail/archive".to_owned()),
                Target::Command("/bin/true".to_owned()),
            ]
        );
        let r = resolve_ok("list", &a, None);
        assert_eq!(r.recipients, vec!["ops@example.org"]);
        assert_eq!(r.warnings.len(), 4);
        for w in &r.warnings {
            assert!(w.starts_with("alias list (line 1): target "), "{w}");
            assert!(w.contains("null client") && w.contains("skipped"), "{w}");
        }
        assert!(r.warnings[1].contains("|/usr/bin/procmail -a x is a command"));
    }

    #[test]
    fn only_unsupported_targets_fall_back_to_admin() {
        let a = parse("root: |/usr/bin/mailer\n");
        let r = resolve_ok("root", &a, Some("admin@example.org"));
        assert_eq!(r.recipients, vec!["admin@example.org"]);
        assert_eq!(r.via_admin, vec!["root"]);
        assert_eq!(r.warnings.len(), 1);
    }

    #[test]
    fn syntax_errors_carry_line_numbers() {
        let (line, m) = parse_err("root: a@example.org\n\nnocolon here\n");
        assert_eq!(line, 3);
        assert!(m.contains("no colon"), "{m}");
        let (line, m) = parse_err("# c\n  b@example.org\n");
        assert_eq!(line, 2);
        assert!(m.contains("continuation"), "{m}");
        let (line, m) = parse_err("root:\n");
        assert_eq!(line, 1);
        assert!(m.contains("no targets"), "{m}");
        let (line, m) = parse_err("a: x@example.org\nroot: a@example.org,\n  \"unterminated\n");
        assert_eq!(line, 3);
        assert!(m.contains("closing quote"), "{m}");
        let (line, _) = parse_err("\"open: x\n");
        assert_eq!(line, 1);
        let (line, m) = parse_err("root: bob alice\n");
        assert_eq!(line, 1);
        assert!(m.contains("whitespace"), "{m}");
        let (line, m) = parse_err("root@host: a@example.org\n");
        assert_eq!(line, 1);
        assert!(m.contains("local users only"), "{m}");
        let (line, m) = parse_err("ok: a@example.org\nroot: a@\n");
        assert_eq!(line, 2);
        assert!(m.contains("not a valid address"), "{m}");
        let (line, m) = parse_err("root: a\x07@example.org\n");
        assert_eq!(line, 1);
        assert!(m.contains("control character"), "{m}");
        let (line, m) = parse_err(": a@example.org\n");
        assert_eq!(line, 1);
        assert!(m.contains("empty"), "{m}");
        let err = Aliases::parse("x\n", Path::new("/etc/aliases")).unwrap_err();
        assert!(err.to_string().starts_with("/etc/aliases line 1: "));
    }

    #[test]
    fn duplicates_warn_and_keep_the_first() {
        let a = parse("root: a@example.org\nROOT: b@example.org\n");
        assert_eq!(
            resolve_ok("root", &a, None).recipients,
            vec!["a@example.org"]
        );
        assert_eq!(a.warnings().len(), 1);
        assert!(a.warnings()[0].contains("line 2: duplicate alias root (first on line 1)"));
    }

    #[test]
    fn recursive_expansion_dedupes() {
        let a = parse(
            "root: ops, dev\n\
             ops: alice@example.net, bob@example.net\n\
             dev: Bob@example.net, carol@example.net\n",
        );
        assert_eq!(
            resolve_ok("root", &a, None).recipients,
            vec!["alice@example.net", "bob@example.net", "carol@example.net"]
        );
    }

    #[test]
    fn unqualified_targets_without_alias_get_the_domain() {
        let a =
            parse("root: alice, ops@web1.example.org, carol@LOCALHOST.\nops: dave@example.net\n");
        let r = resolve_ok("root", &a, Some("admin@example.net"));
        // alice has no alias: alice@example.org; ops@<host> is local and expands; carol@localhost
        // is local without an alias, so it goes to the admin.
        assert_eq!(
            r.recipients,
            vec!["alice@example.org", "dave@example.net", "admin@example.net"]
        );
        assert_eq!(r.via_admin, vec!["carol"]);
    }

    #[test]
    fn qualify_domain_that_is_local_goes_to_admin() {
        let a = parse("root: alice\n");
        let d = Domains {
            qualify: "web1.example.org".to_owned(),
            local: vec!["web1.example.org".to_owned()],
        };
        let r = resolve("root", &a, Some("admin@example.net"), &d).unwrap();
        assert_eq!(r.recipients, vec!["admin@example.net"]);
        assert_eq!(r.via_admin, vec!["alice"]);
    }

    #[test]
    fn unaliased_local_name_goes_to_admin_or_errors() {
        let a = parse(DEBIAN);
        let r = resolve_ok("www-data", &a, Some("admin@example.net"));
        assert_eq!(r.recipients, vec!["admin@example.net"]);
        assert_eq!(r.via_admin, vec!["www-data"]);
        let err = resolve("www-data", &a, None, &domains()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no alias for www-data and no admin address: set admin = \"you@example.org\" in \
             relay365.toml or add an alias in /etc/aliases"
        );
        let empty = Aliases::default();
        assert!(matches!(
            resolve("root", &empty, None, &domains()),
            Err(AliasError::NoRoute { .. })
        ));
    }

    #[test]
    fn nested_unresolved_name_is_named_with_its_root() {
        let a = parse("root: bob@web1.example.org\n");
        let err = resolve("root", &a, None, &domains()).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("no alias for bob (reached from root) and")
        );
    }

    #[test]
    fn backslash_target_is_not_expanded() {
        let a = parse("root: \\root, ops@example.net\n");
        let r = resolve_ok("root", &a, Some("admin@example.net"));
        assert_eq!(r.recipients, vec!["ops@example.net", "admin@example.net"]);
        assert_eq!(r.via_admin, vec!["root"]);
    }

    #[test]
    fn self_reference_is_skipped_with_a_warning() {
        let a = parse("root: root, ops@example.net\n");
        let r = resolve_ok("root", &a, None);
        assert_eq!(r.recipients, vec!["ops@example.net"]);
        assert!(r.warnings[0].contains("alias root lists itself"));
        // Alone, it leaves root local.
        let a = parse("root: root\n");
        let r = resolve_ok("root", &a, Some("admin@example.net"));
        assert_eq!(r.recipients, vec!["admin@example.net"]);
    }

    #[test]
    fn loops_are_detected() {
        let a = parse("a: b\nb: c\nc: a\n");
        let err = resolve("a", &a, Some("admin@example.net"), &domains()).unwrap_err();
        assert!(matches!(&err, AliasError::Loop { chain } if chain == &["a", "b", "c", "a"]));
        assert!(err.to_string().contains("alias loop a -> b -> c -> a"));
    }

    #[test]
    fn depth_is_bounded() {
        let mut text = String::new();
        for i in 0..=MAX_DEPTH {
            text.push_str(&format!("a{i}: a{}\n", i + 1));
        }
        text.push_str(&format!("a{}: end@example.net\n", MAX_DEPTH + 1));
        let a = parse(&text);
        let err = resolve("a0", &a, None, &domains()).unwrap_err();
        assert!(matches!(err, AliasError::TooDeep { .. }), "{err}");
        // A chain just within the bound resolves.
        assert_eq!(
            resolve_ok("a2", &a, None).recipients,
            vec!["end@example.net"]
        );
    }

    #[test]
    fn fan_out_is_bounded() {
        // Each level doubles: 2^12 leaf visits without a bound.
        let mut text = String::new();
        for i in 0..12 {
            text.push_str(&format!("l{i}: l{n}, l{n}x\nl{i}x: l{n}\n", n = i + 1));
        }
        text.push_str("l12: end@example.net\n");
        let a = parse(&text);
        let err = resolve("l0", &a, None, &domains()).unwrap_err();
        assert!(matches!(err, AliasError::TooMany { .. }), "{err}");
    }

    #[test]
    fn admin_must_be_remote() {
        let a = Aliases::default();
        for admin in ["root", "root@web1.example.org", "root@LocalHost"] {
            let err = resolve("www-data", &a, Some(admin), &domains()).unwrap_err();
            assert!(matches!(err, AliasError::AdminNotRemote { .. }), "{admin}");
        }
    }

    #[test]
    fn qualified_input() {
        let a = parse(DEBIAN);
        assert_eq!(
            resolve_ok("root@web1.example.org", &a, None).recipients,
            vec!["ops@example.org"]
        );
        assert_eq!(
            resolve_ok("someone@example.net", &a, None).recipients,
            vec!["someone@example.net"]
        );
        assert!(matches!(
            resolve("", &a, None, &domains()),
            Err(AliasError::BadName { .. })
        ));
        assert!(matches!(
            resolve("a b", &a, None, &domains()),
            Err(AliasError::BadName { .. })
        ));
    }

    #[test]
    fn is_local_rules() {
        let d = domains();
        assert!(d.is_local("root"));
        assert!(d.is_local("root@web1.example.org"));
        assert!(d.is_local("root@WEB1.EXAMPLE.ORG."));
        assert!(d.is_local("root@localhost"));
        assert!(!d.is_local("root@example.org"));
        assert!(!d.is_local("root@mail.web1.example.org"));
    }

    #[test]
    fn load_reads_files_and_reports_missing_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("aliases");
        std::fs::write(&path, DEBIAN).unwrap();
        assert_eq!(Aliases::load(&path).unwrap().len(), 13);
        let missing = dir.path().join("nope");
        let err = Aliases::load(&missing).unwrap_err();
        assert!(matches!(err, AliasError::Read { .. }));
        assert!(err.to_string().contains("nope"));
    }

    #[test]
    fn tab_inside_a_quoted_target_is_refused() {
        // Found by fuzzing (fuzz/ aliases): the tab passed the control-character check
        // (tabs fold lines) and reached the queue as a recipient address.
        let (line, message) = parse_err("q: \"a\tb\"@x.example\n");
        assert_eq!(line, 1);
        assert!(message.contains("tab"), "{message}");
        assert_eq!(parse("q: \"a b\"@x.example\n").len(), 1);
    }
}
