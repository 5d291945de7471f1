//! The book (`docs/`, an mdBook) cannot name what does not exist: every API link of a chapter
//! (`api/gemma4_reference/rope/fn.apply_rope.html`, `...struct.X.html#method.y`) must point to
//! an item that is declared, with that name and kind, in the source file of that module; every
//! link between chapters must reach a chapter of `SUMMARY.md` (and a heading there when it has
//! an anchor); every figure a chapter shows must be committed. The figures' and tables'
//! freshness is checked by `cargo xtask figures --check` (a unit test of xtask), and the built
//! book in Chromium by `cargo xtask book` (run by `.ci/run`).

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

fn docs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs")
}

/// The chapter files listed in `SUMMARY.md`, in order.
fn summary_chapters() -> Vec<String> {
    let summary = fs::read_to_string(docs().join("SUMMARY.md")).expect("docs/SUMMARY.md");
    summary
        .lines()
        .filter_map(|line| {
            let start = line.find("](")? + 2;
            let end = line[start..].find(')')? + start;
            Some(line[start..end].to_string())
        })
        .collect()
}

/// Every `[text](target)` link target of a markdown text, outside code blocks and code spans.
fn link_targets(markdown: &str) -> Vec<String> {
    let mut targets = Vec::new();
    let mut in_code_block = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            in_code_block = !in_code_block;
            continue;
        }
        if in_code_block {
            continue;
        }
        let mut rest = line;
        while let Some(index) = rest.find("](") {
            let after = &rest[index + 2..];
            match after.find(')') {
                Some(end) => {
                    targets.push(after[..end].trim().to_string());
                    rest = &after[end..];
                }
                None => break,
            }
        }
    }
    targets
}

/// mdBook's id of a heading: lower case, spaces to dashes, other punctuation dropped.
fn heading_ids(markdown: &str) -> BTreeSet<String> {
    let mut in_code_block = false;
    let mut ids = BTreeSet::new();
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            in_code_block = !in_code_block;
        }
        if in_code_block || !line.starts_with('#') {
            continue;
        }
        let title = line.trim_start_matches('#').trim();
        let id: String = title
            .to_lowercase()
            .chars()
            .filter_map(|c| match c {
                c if c.is_alphanumeric() || c == '_' || c == '-' => Some(c),
                ' ' => Some('-'),
                _ => None,
            })
            .collect();
        ids.insert(id);
    }
    ids
}

/// The source file of module `path` (e.g. `["vision", "pooling"]`) of a crate, if any.
fn module_file(crate_dir: &Path, path: &[&str]) -> Option<PathBuf> {
    if path.is_empty() {
        return Some(crate_dir.join("lib.rs"));
    }
    let joined: PathBuf = path.iter().collect();
    let file = crate_dir.join(&joined).with_extension("rs");
    let folder = crate_dir.join(&joined).join("mod.rs");
    [file, folder].into_iter().find(|f| f.exists())
}

/// Does `source` declare `name` as a `kind` item (`fn`, `struct`, `enum`, ...)?
fn declares(source: &str, keyword: &str, name: &str) -> bool {
    source
        .match_indices(&format!("{keyword} {name}"))
        .any(|(at, matched)| {
            let before_ok =
                at == 0 || !source[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_');
            let after = &source[at + matched.len()..];
            let after_ok = !after.starts_with(|c: char| c.is_alphanumeric() || c == '_');
            before_ok && after_ok
        })
}

/// Checks one `api/...` link; returns why it is broken, if it is.
fn check_api_link(root: &Path, target: &str) -> Option<String> {
    let (page, anchor) = match target.split_once('#') {
        Some((page, anchor)) => (page, Some(anchor)),
        None => (target, None),
    };
    let parts: Vec<&str> = page.trim_start_matches("api/").split('/').collect();
    let crate_dir = match parts.first().copied() {
        Some("gemma4_reference") => root.join("reference/src"),
        Some("gemma4_optimized") => root.join("optimized/src"),
        Some("gemma4") => root.join("src"),
        other => return Some(format!("unknown crate {other:?}")),
    };
    let file_name = parts.last().copied().unwrap_or_default();
    let modules = &parts[1..parts.len() - 1];
    let Some(file) = module_file(&crate_dir, modules) else {
        return Some(format!("no source file for module {}", modules.join("::")));
    };
    let source = fs::read_to_string(&file).ok()?;
    if file_name == "index.html" {
        return None;
    }
    let Some((kind, rest)) = file_name
        .strip_suffix(".html")
        .and_then(|s| s.split_once('.'))
    else {
        return Some(format!("`{file_name}` is not a rustdoc item page"));
    };
    let keyword = match kind {
        "fn" => "fn",
        "struct" => "struct",
        "enum" => "enum",
        "trait" => "trait",
        "type" => "type",
        "constant" => "const",
        "static" => "static",
        "macro" => "macro_rules!",
        other => return Some(format!("unknown item kind `{other}`")),
    };
    if !declares(&source, keyword, rest) {
        return Some(format!("{} declares no `{keyword} {rest}`", file.display()));
    }
    match anchor.and_then(|a| a.split_once('.')) {
        None => None,
        Some(("method" | "tymethod", method)) if !declares(&source, "fn", method) => {
            Some(format!("{} declares no `fn {method}`", file.display()))
        }
        Some(("variant" | "structfield", member))
            if !source.contains(&format!("{member}("))
                && !source.contains(&format!("{member} "))
                && !source.contains(&format!("{member},"))
                && !source.contains(&format!("{member}:")) =>
        {
            Some(format!("{} has no `{member}`", file.display()))
        }
        _ => None,
    }
}

fn chapters() -> Vec<(String, String)> {
    summary_chapters()
        .into_iter()
        .map(|name| {
            let text = fs::read_to_string(docs().join(&name))
                .unwrap_or_else(|e| panic!("SUMMARY.md lists {name}, which cannot be read: {e}"));
            (name, text)
        })
        .collect()
}

#[test]
fn book_lists_at_least_twelve_chapters_that_exist() {
    let chapters = chapters();
    assert!(
        chapters.len() >= 12,
        "the book has {} chapters",
        chapters.len()
    );
}

#[test]
fn book_api_links_name_items_that_exist() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut broken = Vec::new();
    let mut checked = 0;
    for (chapter, text) in chapters() {
        for target in link_targets(&text)
            .into_iter()
            .filter(|t| t.starts_with("api/"))
        {
            checked += 1;
            if let Some(reason) = check_api_link(root, &target) {
                broken.push(format!("{chapter}: {target}: {reason}"));
            }
        }
    }
    assert!(checked >= 50, "only {checked} API links in the book: chapters should link the reference functions they explain");
    assert!(
        broken.is_empty(),
        "{} broken API link(s):\n{}",
        broken.len(),
        broken.join("\n")
    );
}

#[test]
fn book_chapter_links_and_figures_resolve() {
    let chapters = chapters();
    let listed: BTreeSet<&str> = chapters.iter().map(|(name, _)| name.as_str()).collect();
    let mut broken = Vec::new();
    for (chapter, text) in &chapters {
        for target in link_targets(text) {
            if target.starts_with("api/") || target.contains("://") || target.starts_with("mailto:")
            {
                continue;
            }
            let (page, anchor) = target.split_once('#').unwrap_or((target.as_str(), ""));
            if page.starts_with("figures/") {
                if !docs().join(page).exists() {
                    broken.push(format!("{chapter}: figure {page} is not committed"));
                }
                continue;
            }
            let page = if page.is_empty() {
                chapter.as_str()
            } else {
                page
            };
            if !listed.contains(page) {
                broken.push(format!(
                    "{chapter}: link to {target}, which is not a chapter of SUMMARY.md"
                ));
                continue;
            }
            if !anchor.is_empty() {
                let (_, target_text) = chapters
                    .iter()
                    .find(|(name, _)| name == page)
                    .expect("listed");
                if !heading_ids(target_text).contains(anchor) {
                    broken.push(format!(
                        "{chapter}: link to {target}: {page} has no heading with id `{anchor}`"
                    ));
                }
            }
        }
    }
    assert!(
        broken.is_empty(),
        "{} broken link(s):\n{}",
        broken.len(),
        broken.join("\n")
    );
}

#[test]
fn book_link_checker_catches_a_missing_function() {
    // The checks above must be able to fail: a link to a function that does not exist.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    assert!(check_api_link(
        root,
        "api/gemma4_reference/rope/fn.inverse_frequencies.html"
    )
    .is_none());
    assert!(check_api_link(root, "api/gemma4_reference/rope/fn.no_such_function.html").is_some());
    assert!(check_api_link(root, "api/gemma4_reference/no_such_module/fn.x.html").is_some());
    assert!(check_api_link(
        root,
        "api/gemma4_reference/model/struct.Gemma4TextModel.html#method.no_such_method"
    )
    .is_some());
}
