//! The module graph as the architecture draws it, checked from the source: layers run
//! one way (a module names only modules of lower layers), and the setgid `sendmail`
//! reaches nothing of the daemon, the transports, the quota ledger or the secrets.
//!
//! The graph is read from `src/` itself: every `crate::a::b` and `super::` path in a
//! file's production code (comments, strings and `#[cfg(test)]` modules left out),
//! resolved to the module file it names. A newcomer's forbidden import fails here with
//! the file, the line and the rule (to see it: add `use crate::secrets::Secrets;` to
//! `src/sendmail/intake.rs`, or `use crate::daemon::stop::Stop;` to `src/spool/queue.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level modules by layer; a module may name only modules of a lower layer (and
/// its own). `None` for the binaries, which sit on top.
const LAYERS: &[(&str, u8)] = &[
    ("message", 0),
    ("sysexits", 0),
    ("logging", 1),
    ("spool", 1),
    ("config", 2),
    ("secrets", 3),
    ("aliases", 4),
    ("quota", 4),
    ("transport", 4),
    ("sendmail", 5),
    ("daemon", 5),
    // The listener drives sendmail's dialogue, deposit and intake: one way, above it.
    ("listen", 6),
    ("admin", 7),
];

/// What the setgid program must never reach.
const FENCED_OFF: &[&str] = &["daemon", "transport", "secrets", "quota", "admin", "listen"];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// A module path (`["spool", "queue"]`) for a file under `src/`; empty for lib.rs,
/// `None` for the binaries.
fn module_of(rel: &Path) -> Option<Vec<String>> {
    let parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if parts.first().map(String::as_str) == Some("bin") {
        return None;
    }
    let mut m: Vec<String> = parts;
    let last = m.pop().unwrap_or_default();
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" {
        m.push(stem.to_string());
    }
    Some(m)
}

/// The production part of a source file: up to the first `#[cfg(test)]`, with
/// comments and string literals blanked so that prose cannot look like an import.
fn production_code(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut in_block = false;
    let lines: Vec<&str> = text.lines().collect();
    for (n, line) in lines.iter().enumerate() {
        // The unit-test module (`#[cfg(test)]` then `mod …`) closes a file by convention.
        let next = lines.get(n + 1).map_or("", |l| l.trim_start());
        if line.trim_start().starts_with("#[cfg(test)]") && next.starts_with("mod ") {
            break;
        }
        let mut kept = String::new();
        let mut chars = line.chars().peekable();
        let mut in_str = false;
        while let Some(c) = chars.next() {
            if in_block {
                if c == '*' && chars.peek() == Some(&'/') {
                    chars.next();
                    in_block = false;
                }
                continue;
            }
            if in_str {
                if c == '\\' {
                    chars.next();
                } else if c == '"' {
                    in_str = false;
                }
                continue;
            }
            match c {
                '/' if chars.peek() == Some(&'/') => break,
                '/' if chars.peek() == Some(&'*') => {
                    chars.next();
                    in_block = true;
                }
                '"' => in_str = true,
                _ => kept.push(c),
            }
        }
        out.push((n + 1, kept));
    }
    out
}

/// Every module path a line names: `crate::a::b…` and `super::…` (relative to `here`),
/// and `relay365::…` in the binaries.
fn named_paths(line: &str, here: &[String]) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let bytes = line.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    for start in 0..line.len() {
        if start > 0 && (ident(bytes[start - 1]) || bytes[start - 1] == b':') {
            continue;
        }
        let rest = &line[start..];
        let (mut base, tail) = if let Some(t) = rest.strip_prefix("crate::") {
            (Vec::new(), t)
        } else if let Some(t) = rest.strip_prefix("relay365::") {
            (Vec::new(), t)
        } else if rest.starts_with("super::") {
            // `here` is the module itself (a mod.rs is its directory's module), so
            // each `super` is one step up.
            let mut b = here.to_vec();
            let mut t = rest;
            while let Some(next) = t.strip_prefix("super::") {
                b.pop();
                t = next;
            }
            (b, t)
        } else {
            continue;
        };
        for seg in tail.split("::") {
            let name: String = seg
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if name.is_empty() || name.starts_with(|c: char| c.is_ascii_uppercase()) {
                break;
            }
            base.push(name.clone());
            if name.len() != seg.len() {
                break;
            }
        }
        if !base.is_empty() {
            found.push(base);
        }
    }
    found
}

/// One import: the line number, the module it names, the source line.
type Edge = (usize, Vec<String>, String);

struct Graph {
    /// Module path → its imports.
    edges: BTreeMap<Vec<String>, Vec<Edge>>,
    files: BTreeMap<Vec<String>, PathBuf>,
    bins: BTreeMap<String, Vec<Edge>>,
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read src/").flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn graph() -> Graph {
    let root = src();
    let mut paths = Vec::new();
    walk(&root, &mut paths);
    let mut g = Graph {
        edges: BTreeMap::new(),
        files: BTreeMap::new(),
        bins: BTreeMap::new(),
    };
    for p in &paths {
        let rel = p.strip_prefix(&root).expect("under src/");
        if let Some(m) = module_of(rel) {
            g.files.insert(m, p.clone());
        }
    }
    for p in &paths {
        let rel = p.strip_prefix(&root).expect("under src/");
        let text = std::fs::read_to_string(p).expect("read a source file");
        let here = module_of(rel);
        let mut edges = Vec::new();
        for (n, line) in production_code(&text) {
            for target in named_paths(&line, here.as_deref().unwrap_or(&[])) {
                // The longest prefix that is a module file.
                let mut t = target.clone();
                while !t.is_empty() && !g.files.contains_key(&t) {
                    t.pop();
                }
                if !t.is_empty() {
                    edges.push((n, t, line.trim().to_string()));
                }
            }
        }
        match here {
            Some(m) => {
                g.edges.insert(m, edges);
            }
            None => {
                g.bins.insert(rel.display().to_string(), edges);
            }
        }
    }
    g
}

fn layer(top: &str) -> u8 {
    LAYERS
        .iter()
        .find(|(n, _)| *n == top)
        .map(|(_, l)| *l)
        .unwrap_or_else(|| {
            panic!("src/{top}: a top-level module with no layer in tests/it/layers.rs: give it one")
        })
}

#[test]
fn no_module_names_a_module_of_its_own_or_a_higher_layer() {
    let g = graph();
    let mut wrong = Vec::new();
    for (from, edges) in &g.edges {
        let Some(top) = from.first() else { continue };
        let own = layer(top);
        for (line, to, text) in edges {
            let to_top = &to[0];
            if to_top == top {
                continue;
            }
            let theirs = layer(to_top);
            if theirs >= own {
                wrong.push(format!(
                    "src/{}: line {line}: {} (layer {own}) names {} (layer {theirs}): `{text}`",
                    g.files[from]
                        .strip_prefix(src())
                        .unwrap_or(&g.files[from])
                        .display(),
                    from.join("::"),
                    to.join("::"),
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports that run up or across the layers (see LAYERS here and lib.rs):\n{}",
        wrong.join("\n")
    );
}

#[test]
fn nothing_the_setgid_sendmail_reaches_names_the_daemon_transports_quota_or_secrets() {
    let g = graph();
    let start = &g.bins["bin/sendmail.rs"];
    let mut seen: BTreeSet<Vec<String>> = BTreeSet::new();
    // (module, how it was reached) for the error message.
    let mut todo: Vec<(Vec<String>, String)> = start
        .iter()
        .map(|(n, m, t)| (m.clone(), format!("src/bin/sendmail.rs:{n} `{t}`")))
        .collect();
    let mut wrong = Vec::new();
    while let Some((m, via)) = todo.pop() {
        if FENCED_OFF.contains(&m[0].as_str()) {
            wrong.push(format!("{} reached through {via}", m.join("::")));
            continue;
        }
        if !seen.insert(m.clone()) {
            continue;
        }
        for (n, to, text) in g.edges.get(&m).into_iter().flatten() {
            let file = g.files[&m]
                .strip_prefix(src())
                .unwrap_or(&g.files[&m])
                .display()
                .to_string();
            todo.push((to.clone(), format!("src/{file}:{n} `{text}`")));
        }
    }
    assert!(
        wrong.is_empty(),
        "the setgid sendmail must not reach the daemon, the transports, the quota ledger, the listener or the secrets:\n{}",
        wrong.join("\n")
    );
    // The fence is real: sendmail does reach the modules it needs.
    for needed in [["sendmail", "deposit"], ["spool", "envelope"]] {
        let needed: Vec<String> = needed.iter().map(|s| s.to_string()).collect();
        assert!(
            seen.contains(&needed),
            "{needed:?} not reached: the graph reader is broken"
        );
    }
}

#[test]
fn the_graph_reader_resolves_super_and_skips_prose() {
    let here = vec!["sendmail".to_string(), "cli".to_string()];
    assert_eq!(
        named_paths("use super::deposit::{Depositor, Origin};", &here),
        [vec!["sendmail".to_string(), "deposit".to_string()]]
    );
    let lib_mod = vec!["aliases".to_string()];
    assert_eq!(
        named_paths("use super::Aliases;", &["aliases".into(), "locals".into()]),
        [lib_mod]
    );
    let code = production_code(
        "// use crate::daemon::x;\nlet s = \"crate::secrets\"; use crate::spool::QueueId;\n#[cfg(test)]\nmod tests {\nuse crate::daemon::y;",
    );
    let named: Vec<_> = code
        .iter()
        .flat_map(|(_, l)| named_paths(l, &here))
        .collect();
    assert_eq!(named, [vec!["spool".to_string()]]);
}
