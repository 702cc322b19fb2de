//! The structure of the code, checked: imports only go down the layers of the data path
//!
//! ```text
//! main, cli  ->  ops, engine, proxy  ->  plan  ->  catalog  ->  db
//!                engine  ->  replication  ->  wire  ->  tls
//!                                             db  ->  tls
//! ```
//!
//! and no two modules (files) import each other in a circle. Reads `use` lines and
//! `crate::`/`super::`/`self::` paths of every file under `src/` (comments and strings left out),
//! resolves each to the file that defines it, and fails naming the offending imports.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level modules each layer may import (besides itself).
fn allowed(layer: &str) -> &'static [&'static str] {
    match layer {
        "main" | "cli" => &[
            "cli",
            "ops",
            "engine",
            "proxy",
            "plan",
            "catalog",
            "db",
            "replication",
            "wire",
            "tls",
            "names",
            "sql",
            "units",
            "progress",
        ],
        "ops" => &[
            "engine", "plan", "catalog", "db", "names", "sql", "units", "progress",
        ],
        "engine" => &[
            "plan",
            "catalog",
            "db",
            "replication",
            "wire",
            "tls",
            "names",
            "sql",
            "units",
            "progress",
        ],
        "proxy" => &["wire", "tls", "names", "sql", "units", "progress"],
        "plan" => &["catalog", "db", "names", "sql", "units", "progress"],
        "catalog" => &["db", "names", "sql", "units"],
        "db" => &["sql", "tls", "units"],
        "replication" => &["wire", "tls", "sql", "units"],
        "names" => &["sql", "units"],
        "wire" => &["tls"],
        "tls" | "sql" | "units" | "progress" => &[],
        _ => &[],
    }
}

fn src() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `dir`.
fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read src") {
        let p = e.expect("dir entry").path();
        if p.is_dir() {
            files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The module path of a file: `src/engine/follow/mod.rs` -> ["engine", "follow"].
fn module_of(file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src()).expect("under src");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|c| c.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts.last().is_some_and(|l| l == "mod") {
        parts.pop();
    }
    if parts == ["lib"] {
        parts.clear();
    }
    parts
}

/// The code without comments, string and char literals (their contents could look like paths).
fn strip(code: &str) -> String {
    let b = code.as_bytes();
    let mut out = String::with_capacity(code.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
            i += 2;
            while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                i += 1;
            }
            i += 2;
        } else if b[i] == b'r' && (b.get(i + 1) == Some(&b'"') || b.get(i + 1) == Some(&b'#')) {
            // raw string r"..." / r#"..."#
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&b'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&b'"') {
                out.push(b[i] as char);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= b.len() {
                    break;
                }
                if b[j] == b'"' && (0..hashes).all(|h| b.get(j + 1 + h) == Some(&b'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            out.push_str("\"\"");
            i = j;
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i] == b'\'' && b.get(i + 2) == Some(&b'\'') {
            i += 3;
        } else if b[i] == b'\'' && b.get(i + 1) == Some(&b'\\') {
            // an escaped char literal: '\n', '\'', '\u{..}'
            let mut j = i + 3;
            while j < b.len() && b[j] != b'\'' {
                j += 1;
            }
            i = j + 1;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// Expand `use a::{b, c::{d, e}};` trees into paths.
fn expand(prefix: &str, tree: &str, out: &mut Vec<String>) {
    let tree = tree.trim();
    if let Some(open) = tree.find('{') {
        let head = tree[..open].trim().trim_end_matches("::");
        let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
        let base = join(prefix, head);
        let mut depth = 0;
        let mut start = 0;
        for (i, ch) in inner.char_indices() {
            match ch {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expand(&base, &inner[start..i], out);
                    start = i + 1;
                }
                _ => {}
            }
        }
        expand(&base, &inner[start..], out);
    } else {
        let item = tree.split(" as ").next().unwrap_or("").trim();
        if !item.is_empty() {
            out.push(join(prefix, item));
        }
    }
}

fn join(a: &str, b: &str) -> String {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b.to_string(),
        (_, true) => a.to_string(),
        _ => format!("{a}::{b}"),
    }
}

/// Every path a file names: use trees, and `crate::`/`super::`/`self::` paths in the code.
fn paths(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("use ") {
        let before = rest[..at].chars().last();
        let tail = &rest[at + 4..];
        if before.is_none_or(|c| !c.is_alphanumeric() && c != '_') {
            if let Some(end) = tail.find(';') {
                expand("", &tail[..end], &mut out);
            }
        }
        rest = tail;
    }
    let bytes = code.as_bytes();
    for start in ["crate::", "super::", "self::"] {
        let mut from = 0;
        while let Some(i) = code[from..].find(start) {
            let at = from + i;
            let prev = if at == 0 { b' ' } else { bytes[at - 1] };
            if !(prev.is_ascii_alphanumeric() || prev == b'_' || prev == b':') {
                let end = code[at..]
                    .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                    .map(|e| at + e)
                    .unwrap_or(code.len());
                out.push(code[at..end].trim_end_matches(':').to_string());
            }
            from = at + start.len();
        }
    }
    out
}

/// The file a path leads to, from the file `module` it is written in.
fn resolve(module: &[String], path: &str, known: &BTreeSet<Vec<String>>) -> Option<Vec<String>> {
    let mut segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
    let mut base: Vec<String> = match segs.first().copied() {
        Some("crate") => {
            segs.remove(0);
            Vec::new()
        }
        Some("super") => {
            let mut b = module.to_vec();
            while segs.first() == Some(&"super") {
                segs.remove(0);
                b.pop();
            }
            b
        }
        Some("self") => {
            segs.remove(0);
            module.to_vec()
        }
        _ => return None,
    };
    // the longest known module along the path
    let mut found = None;
    for s in segs {
        base.push(s.to_string());
        if known.contains(&base) {
            found = Some(base.clone());
        } else {
            break;
        }
    }
    found
}

struct Graph {
    /// file module -> (imported module, the path written)
    edges: BTreeMap<Vec<String>, BTreeSet<(Vec<String>, String)>>,
}

fn graph() -> Graph {
    let mut list = Vec::new();
    files(&src(), &mut list);
    let known: BTreeSet<Vec<String>> = list.iter().map(|f| module_of(f)).collect();
    let mut edges = BTreeMap::new();
    for f in &list {
        let module = module_of(f);
        let code = strip(&std::fs::read_to_string(f).expect("read a source file"));
        // tests inside a file may reach anywhere below it
        let code = code.split("#[cfg(test)]").next().unwrap_or("").to_string();
        let mut to = BTreeSet::new();
        for p in paths(&code) {
            if let Some(target) = resolve(&module, &p, &known) {
                // a module's own children and itself are not imports of another module
                if target != module && !target.starts_with(&module) && !module.starts_with(&target)
                {
                    to.insert((target, p));
                }
            }
        }
        edges.insert(module, to);
    }
    Graph { edges }
}

fn show(m: &[String]) -> String {
    if m.is_empty() {
        "lib".into()
    } else {
        m.join("::")
    }
}

#[test]
fn imports_only_go_down_the_layers() {
    let g = graph();
    let mut wrong = Vec::new();
    for (from, to) in &g.edges {
        let layer = from.first().map(String::as_str).unwrap_or("main");
        for (target, path) in to {
            let Some(t) = target.first() else { continue };
            if t != layer && !allowed(layer).contains(&t.as_str()) {
                wrong.push(format!("{} imports {} ({path})", show(from), show(target)));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports going up or sideways:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn no_two_modules_import_each_other_in_a_circle() {
    let g = graph();
    // Tarjan's strongly connected components
    let nodes: Vec<&Vec<String>> = g.edges.keys().collect();
    let index_of: BTreeMap<&Vec<String>, usize> =
        nodes.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    let adj: Vec<Vec<usize>> = nodes
        .iter()
        .map(|n| {
            g.edges[*n]
                .iter()
                .filter_map(|(t, _)| index_of.get(t).copied())
                .collect()
        })
        .collect();
    struct T {
        index: Vec<Option<usize>>,
        low: Vec<usize>,
        on: Vec<bool>,
        stack: Vec<usize>,
        next: usize,
        out: Vec<Vec<usize>>,
    }
    fn visit(v: usize, adj: &[Vec<usize>], t: &mut T) {
        t.index[v] = Some(t.next);
        t.low[v] = t.next;
        t.next += 1;
        t.stack.push(v);
        t.on[v] = true;
        for &w in &adj[v] {
            match t.index[w] {
                None => {
                    visit(w, adj, t);
                    t.low[v] = t.low[v].min(t.low[w]);
                }
                Some(i) if t.on[w] => t.low[v] = t.low[v].min(i),
                _ => {}
            }
        }
        if Some(t.low[v]) == t.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on[w] = false;
                comp.push(w);
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                t.out.push(comp);
            }
        }
    }
    let n = nodes.len();
    let mut t = T {
        index: vec![None; n],
        low: vec![0; n],
        on: vec![false; n],
        stack: Vec::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in 0..n {
        if t.index[v].is_none() {
            visit(v, &adj, &mut t);
        }
    }
    let nodes = &nodes;
    let index_of = &index_of;
    let circles: Vec<String> = t
        .out
        .iter()
        .map(|c| {
            let members: BTreeSet<usize> = c.iter().copied().collect();
            let ties: Vec<String> = c
                .iter()
                .flat_map(|&v| {
                    g.edges[nodes[v]]
                        .iter()
                        .filter(|(to, _)| index_of.get(to).is_some_and(|i| members.contains(i)))
                        .map(move |(to, p)| format!("  {} -> {} ({p})", show(nodes[v]), show(to)))
                })
                .collect();
            ties.join("\n")
        })
        .collect();
    assert!(
        circles.is_empty(),
        "import circles:\n{}",
        circles.join("\n\n")
    );
}

#[test]
fn the_checker_sees_a_circle_and_an_upward_import() {
    // the parser itself: a use tree, a path in code, and what is left out
    let code = strip("use crate::engine::{error::EngineError, shadow::{self, Mapping}};\n// crate::ops::x\nlet s = \"crate::proxy\"; crate::db::connect(x);");
    let p = paths(&code);
    assert!(
        p.contains(&"crate::engine::error::EngineError".to_string()),
        "{p:?}"
    );
    assert!(
        p.contains(&"crate::engine::shadow::Mapping".to_string()),
        "{p:?}"
    );
    assert!(p.contains(&"crate::db::connect".to_string()), "{p:?}");
    assert!(
        !p.iter().any(|x| x.contains("ops") || x.contains("proxy")),
        "{p:?}"
    );
    let known: BTreeSet<Vec<String>> = [
        vec!["engine".into()],
        vec!["engine".into(), "shadow".into()],
    ]
    .into_iter()
    .collect();
    assert_eq!(
        resolve(
            &["engine".into(), "copy".into()],
            "super::shadow::Mapping",
            &known
        ),
        Some(vec!["engine".to_string(), "shadow".to_string()])
    );
    assert!(!allowed("db").contains(&"engine"));
    assert!(allowed("engine").contains(&"replication"));
}
