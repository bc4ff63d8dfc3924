//! The module layout is a one-way street: every module of `src/` imports only modules of its own
//! layer or of layers below it, and no group of modules imports itself around a cycle (neither
//! between the top-level modules nor between the files of one folder). Adding a module means
//! placing it in [`LAYERS`]; adding an upward import means a reviewed change of this table.
//!
//! Imports are read from the source text: every `crate::name` and `use crate::{a, b}`, and
//! `super::name` inside a folder. Comments are left out; test modules count like the rest.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level modules from the bottom up, in the order a record meets them. A module may import
/// modules of its own layer (without a cycle) and of every layer before it.
const LAYERS: &[&[&str]] = &[
    // Leaf data and helpers.
    &["families", "labels", "secret", "series", "time", "tokens"],
    // Sources: HTTP and RESP pops, management reads, the splitter the pops stream into.
    &["cpa"],
    &["pricing"],
    // Elements -> records -> per-series increments of a batch.
    &["ingest"],
    // SQLite: plan and commit a batch, caps, retirement, budgets.
    &["store"],
    // Stored state and live gauges -> the exposition.
    &["metrics"],
    &["http"],
    // The loops: drain, management poller, backoff, gap detection.
    &["pipeline"],
    &["config"],
    &["app", "check"],
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("read src/")
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module path of a file: `src/ingest/mod.rs` -> ["ingest"], `src/cpa/resp.rs` -> ["cpa", "resp"].
fn module_of(path: &Path) -> Vec<String> {
    let rel = path.strip_prefix(src()).expect("under src/");
    let mut parts: Vec<String> = rel
        .with_extension("")
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// The text without `//` comments (doc comments included): a path named in prose is no import.
fn without_comments(text: &str) -> String {
    text.lines()
        .map(|line| {
            // `//` inside a string ("http://...") ends the scan early; the rest of such a line
            // holds no import in this code base.
            line.find("//").map_or(line, |i| &line[..i])
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The first path segments after every `prefix::`, with `prefix::{a, b::c}` giving `a` and `b`.
fn segments_after(text: &str, prefix: &str) -> Vec<(String, Option<String>)> {
    let needle = format!("{prefix}::");
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(&needle) {
        let before = rest[..i].chars().next_back();
        rest = &rest[i + needle.len()..];
        if before.is_some_and(is_ident) {
            continue; // `foo_crate::`, not `crate::`
        }
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level items of a (possibly nested) group.
            let mut depth = 0usize;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.push(first_two(&item));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
            out.push(first_two(&item));
        } else {
            out.push(first_two(rest));
        }
    }
    out.retain(|(first, _)| !first.is_empty());
    out
}

/// `a::b::c` -> (`a`, Some(`b`)); `a` -> (`a`, None).
fn first_two(path: &str) -> (String, Option<String>) {
    let path = path.trim_start();
    let first: String = path.chars().take_while(|c| is_ident(*c)).collect();
    let second = path[first.len()..]
        .strip_prefix("::")
        .map(|r| r.chars().take_while(|c| is_ident(*c)).collect::<String>())
        .filter(|s| !s.is_empty());
    (first, second)
}

struct Graph {
    /// Top-level module -> top-level modules it imports.
    top: BTreeMap<String, BTreeSet<String>>,
    /// Folder -> (file module -> sibling file modules it imports).
    folders: BTreeMap<String, BTreeMap<String, BTreeSet<String>>>,
}

fn graph() -> Graph {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let folders_on_disk: BTreeSet<String> = files
        .iter()
        .map(|f| module_of(f))
        .filter(|m| m.len() > 1)
        .map(|m| m[0].clone())
        .collect();
    let mut graph = Graph {
        top: BTreeMap::new(),
        folders: BTreeMap::new(),
    };
    for file in &files {
        let module = module_of(file);
        let Some(top) = module.first() else { continue };
        if top == "lib" || top == "main" {
            continue;
        }
        let text = without_comments(&std::fs::read_to_string(file).expect("read source"));
        let imports = graph.top.entry(top.clone()).or_default();
        let mut siblings = BTreeSet::new();
        for (first, second) in segments_after(&text, "crate") {
            if first != *top {
                imports.insert(first);
            } else if let Some(second) = second {
                siblings.insert(second);
            }
        }
        if module.len() == 2 {
            for (first, _) in segments_after(&text, "super") {
                siblings.insert(first);
            }
        }
        if folders_on_disk.contains(top) {
            let own = module.get(1).cloned().unwrap_or_else(|| "mod".to_owned());
            let files_here: BTreeSet<String> = files
                .iter()
                .map(|f| module_of(f))
                .filter(|m| m.len() == 2 && m[0] == *top)
                .map(|m| m[1].clone())
                .collect();
            siblings.retain(|s| files_here.contains(s) && *s != own);
            graph
                .folders
                .entry(top.clone())
                .or_default()
                .entry(own)
                .or_default()
                .extend(siblings);
        }
    }
    graph
}

/// Groups of two or more nodes that reach each other (Tarjan's strongly connected components).
fn cycles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct Walk<'a> {
        edges: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        found: Vec<Vec<String>>,
    }
    impl<'a> Walk<'a> {
        fn visit(&mut self, v: &'a str) {
            let i = self.index.len();
            self.index.insert(v, i);
            self.low.insert(v, i);
            self.stack.push(v);
            self.on_stack.insert(v);
            let edges = self.edges;
            for w in edges.get(v).into_iter().flatten() {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let low = self.low[v].min(self.low[w]);
                    self.low.insert(v, low);
                } else if self.on_stack.contains(w) {
                    let low = self.low[v].min(self.index[w]);
                    self.low.insert(v, low);
                }
            }
            if self.low[v] == self.index[v] {
                let mut group = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(w);
                    group.push(w.to_owned());
                    if w == v {
                        break;
                    }
                }
                if group.len() > 1 {
                    group.sort();
                    self.found.push(group);
                }
            }
        }
    }
    let mut walk = Walk {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in edges.keys() {
        if !walk.index.contains_key(v.as_str()) {
            walk.visit(v);
        }
    }
    walk.found
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// `cargo test --test layout -- --nocapture` prints the graph.
fn print(edges: &BTreeMap<String, BTreeSet<String>>, indent: &str) {
    for (module, imports) in edges {
        let list: Vec<&str> = imports.iter().map(String::as_str).collect();
        println!("{indent}{module} -> {}", list.join(" "));
    }
}

#[test]
fn every_module_has_a_layer() {
    let graph = graph();
    let unplaced: Vec<&String> = graph.top.keys().filter(|m| layer_of(m).is_none()).collect();
    assert!(
        unplaced.is_empty(),
        "place {unplaced:?} in LAYERS of tests/layout.rs"
    );
    for layer in LAYERS {
        for module in *layer {
            assert!(
                graph.top.contains_key(*module),
                "{module} is in LAYERS but not in src/"
            );
        }
    }
}

#[test]
fn imports_point_down_or_sideways() {
    let graph = graph();
    print(&graph.top, "");
    let mut upward = Vec::new();
    for (module, imports) in &graph.top {
        let Some(own) = layer_of(module) else {
            continue;
        };
        for import in imports {
            // Names that are no module of ours (`crate::SomeType` re-exports) have no layer.
            if layer_of(import).is_some_and(|l| l > own) {
                upward.push(format!("{module} -> {import}"));
            }
        }
    }
    assert!(upward.is_empty(), "imports pointing up: {upward:?}");
}

#[test]
fn no_import_cycle_between_modules() {
    let graph = graph();
    assert_eq!(cycles(&graph.top), Vec::<Vec<String>>::new());
}

#[test]
fn no_import_cycle_inside_a_folder() {
    let graph = graph();
    for (folder, edges) in &graph.folders {
        println!("{folder}/");
        print(edges, "  ");
        assert_eq!(cycles(edges), Vec::<Vec<String>>::new(), "in src/{folder}/");
    }
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let edges: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec!["a"]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.into_iter().map(str::to_owned).collect()))
    .collect();
    assert_eq!(cycles(&edges), vec![vec!["a", "b", "c"]]);
    let groups = segments_after(
        "use crate::{a::{X, Y}, b, c::d}; crate::e::f; my_crate::g",
        "crate",
    );
    let firsts: Vec<&str> = groups.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(firsts, ["a", "b", "c", "e"]);
}
