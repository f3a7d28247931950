//! The top-level modules of `src/` import each other without cycles: dependencies point one
//! way (wiring → connection → publish pipeline → router / session / storage → vocabulary).
//!
//! The graph is read from the code itself (every `crate::<module>` path outside test modules),
//! not from a list kept by hand. Run alone with `cargo test --test layering -- --nocapture` to
//! see the graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

/// Every `.rs` file under `dir`, except the binaries' own sources.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            if path.file_name().is_some_and(|name| name != "bin") {
                sources(&path, out);
            }
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to: `src/a.rs` and `src/a/...` are `a`; the crate root
/// and `main.rs` are none.
fn top_module(src: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src).ok()?;
    let first = relative.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (name != "lib" && name != "main").then(|| name.to_owned())
}

/// The code of a file without its test module: by this crate's convention a file's tests are
/// its last item, `#[cfg(test)] mod tests`. Test code may import any module.
fn without_tests(code: &str) -> &str {
    let mut end = code.len();
    for marker in [
        "#[cfg(test)]\nmod tests",
        "#[cfg(test)]\npub(crate) mod tests",
    ] {
        if let Some(at) = code.find(marker) {
            end = end.min(at);
        }
    }
    &code[..end]
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The top-level modules named by `crate::` paths in `code`, including those inside a
/// `crate::{a::b, c}` group.
fn referenced_modules(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let preceded_by = rest[..at].chars().next_back();
        rest = &rest[at + "crate::".len()..];
        if preceded_by.is_some_and(|c| c == '$' || is_ident_char(c)) {
            // `$crate::` in a macro, or an identifier ending in `crate`.
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            // Names at the first level of the group, each at the start of a segment.
            let mut depth = 1;
            let mut at_segment_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => at_segment_start = true,
                    c if at_segment_start && depth == 1 && is_ident_char(c) => {
                        let name: String = group[i..]
                            .chars()
                            .take_while(|&c| is_ident_char(c))
                            .collect();
                        found.insert(name);
                        at_segment_start = false;
                    }
                    c if c.is_whitespace() => {}
                    _ => at_segment_start = false,
                }
            }
        } else {
            let name: String = rest.chars().take_while(|&c| is_ident_char(c)).collect();
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found
}

fn module_graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut modules = BTreeSet::new();
    let mut edges: Vec<(String, BTreeSet<String>)> = Vec::new();
    for file in &files {
        let Some(module) = top_module(&src, file) else {
            continue;
        };
        let code = std::fs::read_to_string(file).expect("read source");
        modules.insert(module.clone());
        edges.push((module, referenced_modules(without_tests(&code))));
    }
    let mut graph: Graph = modules
        .iter()
        .map(|m| (m.clone(), BTreeSet::new()))
        .collect();
    for (from, to) in edges {
        let targets = graph.entry(from.clone()).or_default();
        // Names that are not modules (`crate::Config`, re-exports) are not edges.
        targets.extend(to.into_iter().filter(|m| *m != from && modules.contains(m)));
    }
    graph
}

/// A cycle in `graph`, as the modules along it (first repeated last), if there is one.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }
    fn visit(
        graph: &Graph,
        node: &str,
        marks: &mut BTreeMap<String, Mark>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        marks.insert(node.to_owned(), Mark::OnPath);
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            match marks.get(next).copied().unwrap_or(Mark::New) {
                Mark::OnPath => {
                    let start = path.iter().position(|m| m == next).unwrap_or(0);
                    let mut cycle = path[start..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Mark::New => {
                    if let Some(cycle) = visit(graph, next, marks, path) {
                        return Some(cycle);
                    }
                }
                Mark::Done => {}
            }
        }
        path.pop();
        marks.insert(node.to_owned(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for node in graph.keys() {
        if marks.get(node).copied().unwrap_or(Mark::New) == Mark::New {
            if let Some(cycle) = visit(graph, node, &mut marks, &mut Vec::new()) {
                return Some(cycle);
            }
        }
    }
    None
}

#[test]
fn top_level_modules_import_each_other_without_cycles() {
    let graph = module_graph();
    for (module, imports) in &graph {
        let imports: Vec<&str> = imports.iter().map(String::as_str).collect();
        println!("{module} -> {}", imports.join(", "));
    }
    assert!(
        graph.len() > 10,
        "found only {} modules: is src/ where this test looks?",
        graph.len()
    );
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "import cycle between top-level modules: {}\n(move the shared item down, or pass what is needed in)",
            cycle.join(" -> ")
        );
    }
}

/// The check itself must be able to fail.
#[test]
fn the_cycle_check_finds_cycles_and_grouped_imports() {
    let mut graph = Graph::new();
    let edge = |graph: &mut Graph, from: &str, to: &str| {
        graph.entry(from.into()).or_default().insert(to.into());
        graph.entry(to.into()).or_default();
    };
    edge(&mut graph, "broker", "connection");
    edge(&mut graph, "connection", "publish");
    edge(&mut graph, "publish", "router");
    assert_eq!(find_cycle(&graph), None);
    edge(&mut graph, "router", "connection");
    assert_eq!(
        find_cycle(&graph),
        Some(vec![
            "connection".to_owned(),
            "publish".into(),
            "router".into(),
            "connection".into()
        ])
    );

    let code = "use crate::{a::{b, c}, d, e::F};\nlet x = crate::g::h();\n$crate::not_me\n";
    let found: Vec<String> = referenced_modules(code).into_iter().collect();
    assert_eq!(found, ["a", "d", "e", "g"]);
    assert_eq!(
        without_tests("fn a() {}\n#[cfg(test)]\nmod tests { use crate::x; }"),
        "fn a() {}\n"
    );
}
