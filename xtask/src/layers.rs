//! The host's layering rule, checked: every module of `kiln-host` imports only from modules
//! below it in [`LAYERS`] (the order `host/src/lib.rs` documents), and `http` reaches the
//! inference stack only through `infer`. `cargo xtask test` runs it before building anything, so
//! an upward import fails in seconds with the file and line.
//!
//! What counts as an import: a `crate::<module>` path anywhere in a module's files (a `use` or
//! an inline path), and in a `use crate::{a, b::c}` group each name. `super::` paths stay inside
//! the module's own folder, except from a top-level file, where they are checked the same way.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Top to bottom: a module may import only from those after it.
const LAYERS: &[&str] = &[
    "cli",
    "http",
    "infer",
    "runtime",
    "registry",
    "nn",
    "config",
    "tenancy",
    "fetch",
    "scaffold",
    "signing",
    "plugin_tools",
    "os",
];

/// Imports below a module that it must still not make: (from, to, why).
const SKIPS: &[(&str, &str, &str)] = &[
    (
        "http",
        "runtime",
        "http reaches the inference stack only through infer",
    ),
    (
        "http",
        "nn",
        "http reaches the inference stack only through infer",
    ),
];

/// One import that breaks the rule.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Violation {
    pub file: PathBuf,
    pub line: usize,
    pub from: String,
    pub to: String,
    pub why: String,
}

/// Checks `host/src` of the repository at `root`.
pub fn check(root: &Path) -> Result<()> {
    let src = root.join("host/src");
    let declared = declared_modules(&src.join("lib.rs"))?;
    let listed: BTreeSet<String> = LAYERS.iter().map(|m| m.to_string()).collect();
    if declared != listed {
        bail!(
            "host/src/lib.rs declares the modules {declared:?} but xtask/src/layers.rs orders \
             {listed:?}: put every module in LAYERS (and in lib.rs's list)"
        );
    }
    let mut violations = Vec::new();
    for module in LAYERS {
        for file in module_files(&src, module)? {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let top_level = file.parent() == Some(src.as_path());
            for (line, to) in imports(&text, top_level) {
                if let Some(why) = breaks_rule(module, &to) {
                    violations.push(Violation {
                        file: file.strip_prefix(root).unwrap_or(&file).to_path_buf(),
                        line,
                        from: module.to_string(),
                        to,
                        why,
                    });
                }
            }
        }
    }
    if violations.is_empty() {
        println!(
            "host modules import only downward ({} layers)",
            LAYERS.len()
        );
        return Ok(());
    }
    violations.sort();
    violations.dedup();
    for v in &violations {
        eprintln!(
            "{}:{}: `{}` imports `{}`: {}",
            v.file.display(),
            v.line,
            v.from,
            v.to,
            v.why
        );
    }
    bail!(
        "{} import(s) break the layering rule of host/src/lib.rs",
        violations.len()
    )
}

/// Why `from` may not import `to`, or None when it may.
fn breaks_rule(from: &str, to: &str) -> Option<String> {
    if from == to {
        return None;
    }
    let rank = |m: &str| LAYERS.iter().position(|l| *l == m);
    let (Some(a), Some(b)) = (rank(from), rank(to)) else {
        return None;
    };
    if b < a {
        return Some(format!(
            "`{to}` is above `{from}`: layers import only downward"
        ));
    }
    SKIPS
        .iter()
        .find(|(f, t, _)| *f == from && *t == to)
        .map(|(_, _, why)| why.to_string())
}

/// `pub mod x;` / `mod x;` lines of lib.rs.
fn declared_modules(lib: &Path) -> Result<BTreeSet<String>> {
    let text =
        std::fs::read_to_string(lib).with_context(|| format!("reading {}", lib.display()))?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            let rest = line
                .strip_prefix("pub mod ")
                .or_else(|| line.strip_prefix("mod "))?;
            Some(rest.strip_suffix(';')?.trim().to_string())
        })
        .collect())
}

/// The files of module `name`: `name.rs`, or every `.rs` under `name/`.
fn module_files(src: &Path, name: &str) -> Result<Vec<PathBuf>> {
    let file = src.join(format!("{name}.rs"));
    if file.is_file() {
        return Ok(vec![file]);
    }
    let mut files = Vec::new();
    let mut dirs = vec![src.join(name)];
    while let Some(dir) = dirs.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// (line, module) of every `crate::<module>` a file names (and `super::<module>` in a
/// top-level file, where `super` is the crate), comments excluded.
fn imports(text: &str, top_level: bool) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    // `use crate::{...}` groups may span lines: track the braces after `crate::{`.
    let mut in_group = false;
    let mut depth = 0usize;
    for (index, raw) in text.lines().enumerate() {
        let line_no = index + 1;
        let line = raw.split("//").next().unwrap_or("");
        if in_group {
            collect_group_names(line, depth, &mut found, line_no);
            depth = brace_depth(line, depth);
            in_group = depth > 0;
            continue;
        }
        let mut rest = line;
        let prefixes: &[&str] = if top_level {
            &["crate::", "super::"]
        } else {
            &["crate::"]
        };
        while let Some((at, prefix)) = prefixes
            .iter()
            .filter_map(|p| rest.find(p).map(|at| (at, *p)))
            .min()
        {
            let after = &rest[at + prefix.len()..];
            if let Some(inner) = after.strip_prefix('{') {
                // A group: the names at its top level are modules.
                collect_group_names(inner, 1, &mut found, line_no);
                depth = brace_depth(inner, 1);
                in_group = depth > 0;
                break;
            }
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.push((line_no, name));
            }
            rest = after;
        }
    }
    found
}

/// The brace depth after `line`, starting at `depth`.
fn brace_depth(line: &str, mut depth: usize) -> usize {
    for c in line.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    depth
}

/// Names that start a path at depth 1 of a `crate::{...}` group.
fn collect_group_names(line: &str, mut depth: usize, found: &mut Vec<(usize, String)>, at: usize) {
    let mut word = String::new();
    let mut word_starts_path = true;
    let mut previous = ' ';
    for c in line.chars() {
        if c.is_ascii_alphanumeric() || c == '_' {
            if word.is_empty() {
                word_starts_path = depth == 1 && matches!(previous, '{' | ',' | ' ' | '\t');
            }
            word.push(c);
        } else {
            if !word.is_empty() && word_starts_path && depth == 1 && word != "self" {
                found.push((at, std::mem::take(&mut word)));
            }
            word.clear();
            match c {
                '{' => depth += 1,
                '}' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        if !c.is_whitespace() {
            previous = c;
        }
    }
    if !word.is_empty() && word_starts_path && depth == 1 {
        found.push((at, word));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(text: &str) -> Vec<String> {
        imports(text, false).into_iter().map(|(_, m)| m).collect()
    }

    #[test]
    fn finds_paths_and_groups() {
        assert_eq!(names("use crate::nn::Tensor;"), ["nn"]);
        assert_eq!(
            names("let x = crate::os::thread_cpu_time(); crate::infer::X"),
            ["os", "infer"]
        );
        assert_eq!(
            names("use crate::{config::Limits, nn::{self, A}, media};"),
            ["config", "nn", "media"]
        );
        assert_eq!(
            names("use crate::{\n    config::Limits,\n    runtime::{a, b},\n};"),
            ["config", "runtime"]
        );
        assert_eq!(names("// crate::http in a comment"), Vec::<String>::new());
    }

    #[test]
    fn upward_and_skipping_imports_break_the_rule() {
        assert!(breaks_rule("nn", "runtime").is_some());
        assert!(breaks_rule("config", "infer").is_some());
        assert!(breaks_rule("http", "nn").is_some());
        assert!(breaks_rule("http", "infer").is_none());
        assert!(breaks_rule("runtime", "nn").is_none());
        assert!(breaks_rule("nn", "os").is_none());
    }
}
