//! `cargo xtask figures`: the book's figures and worked numbers, computed by the reference code.
//!
//! Every figure of `docs/figures/*.svg` and every table between a pair of
//! `<!-- generated:NAME -->` / `<!-- end generated:NAME -->` lines of a chapter is produced here
//! from the reference crate (layer plans, RoPE frequencies, cache footprints, parameter counts,
//! image resizing, audio features) or from a golden fixture (the oracle's MoE routing). The
//! figures are deterministic SVG (no fonts are read: text stays text), so
//! `cargo xtask figures --check` — and the unit test below, which `cargo test --workspace` runs —
//! can regenerate everything in memory and fail when a committed figure or number is stale.

mod audio;
mod draw;
mod fault_signatures;
mod image;
mod kv_cache;
mod layer_plans;
mod masks;
mod moe;
mod ple;
mod rope;
mod softcap;
mod tables;

use std::error::Error;
use std::fs;
use std::path::{Path, PathBuf};

use clap::Args;
use gemma4_reference::ModelConfig;

use crate::process::repo_root;

/// Arguments of `cargo xtask figures`.
#[derive(Debug, Args)]
pub struct FiguresArgs {
    /// Write nothing; fail if a committed figure or generated table differs from what the code
    /// computes now.
    #[arg(long)]
    check: bool,
}

impl FiguresArgs {
    /// `--check`: verify, write nothing.
    pub fn check_only() -> FiguresArgs {
        FiguresArgs { check: true }
    }
}

/// One SVG figure of the book: `docs/figures/{name}.svg`.
pub struct Figure {
    pub name: &'static str,
    pub svg: String,
}

/// One generated table: the lines between the markers named `name` in `docs/{chapter}`.
pub struct GeneratedBlock {
    pub chapter: &'static str,
    pub name: &'static str,
    pub markdown: String,
}

type Result<T> = std::result::Result<T, Box<dyn Error>>;

/// Every figure of the book, drawn now.
pub fn figures(root: &Path, released: &[(&'static str, ModelConfig)]) -> Result<Vec<Figure>> {
    let drawn = [
        ("layer-plans", layer_plans::draw(released)),
        ("ple-data-flow", ple::draw(released)),
        ("attention-masks", masks::draw(root)),
        ("rope-frequencies", rope::draw(released)),
        ("kv-cache-per-token", kv_cache::draw_per_token(released)),
        ("kv-cache-vs-context", kv_cache::draw_vs_context(released)),
        ("moe-routing", moe::draw(root)),
        ("softcap", softcap::draw(released)),
        ("image-budgets", image::draw_budgets()),
        ("image-pooling", image::draw_pooling()),
        ("audio-front-end", audio::draw(root)),
    ];
    drawn
        .into_iter()
        .map(|(name, svg)| Ok(Figure { name, svg: svg? }))
        .collect()
}

/// Every generated table of the book, computed now.
pub fn generated_blocks(
    root: &Path,
    released: &[(&'static str, ModelConfig)],
) -> Result<Vec<GeneratedBlock>> {
    tables::all(released, root)
}

/// The released models: their labels and folders under `tests/data/released/`.
const RELEASED: [(&str, &str); 4] = [
    ("E2B", "e2b"),
    ("E4B", "e4b"),
    ("31B", "31b"),
    ("26B-A4B", "26b-a4b"),
];

/// The four released `config.json` files as published, unparsed (for the tables that quote
/// their fields).
pub fn released_json(root: &Path) -> Result<Vec<serde_json::Value>> {
    RELEASED
        .iter()
        .map(|(_, folder)| {
            let path = root
                .join("tests/data/released")
                .join(folder)
                .join("config.json");
            let text = fs::read_to_string(&path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            Ok(serde_json::from_str(&text)?)
        })
        .collect()
}

/// The four released models' configs (`tests/data/released/*/config.json`, as published).
pub fn released_models(root: &Path) -> Result<Vec<(&'static str, ModelConfig)>> {
    let dir = root.join("tests/data/released");
    RELEASED
        .into_iter()
        .map(|(label, folder)| Ok((label, ModelConfig::from_dir(&dir.join(folder))?)))
        .collect()
}

/// Runs `cargo xtask figures [--check]`.
pub fn run(args: &FiguresArgs) -> Result<()> {
    let root = repo_root();
    let stale = stale_outputs(&root, !args.check)?;
    if args.check && !stale.is_empty() {
        return Err(format!(
            "{} book output(s) are stale (run `cargo xtask figures`): {}",
            stale.len(),
            stale.join(", ")
        )
        .into());
    }
    if !args.check {
        eprintln!("xtask figures: {} file(s) rewritten", stale.len());
    }
    Ok(())
}

/// The figures and chapters whose committed text differs from what the code computes now;
/// with `write`, rewrites them.
fn stale_outputs(root: &Path, write: bool) -> Result<Vec<String>> {
    let docs = root.join("docs");
    let mut stale = Vec::new();
    let released = released_models(root)?;
    for figure in figures(root, &released)? {
        let path = docs.join("figures").join(format!("{}.svg", figure.name));
        if fs::read_to_string(&path).ok().as_deref() != Some(figure.svg.as_str()) {
            stale.push(display(root, &path));
            if write {
                fs::create_dir_all(path.parent().expect("figures folder"))?;
                fs::write(&path, &figure.svg)?;
            }
        }
    }
    for block in generated_blocks(root, &released)? {
        let path = docs.join(block.chapter);
        let text = fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let updated = replace_block(&text, block.name, &block.markdown)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if updated != text {
            stale.push(format!(
                "{} (generated:{})",
                display(root, &path),
                block.name
            ));
            if write {
                fs::write(&path, updated)?;
            }
        }
    }
    Ok(stale)
}

fn display(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .map(Path::to_path_buf)
        .unwrap_or_else(|_| PathBuf::from(path))
        .display()
        .to_string()
}

/// `text` with the lines between `<!-- generated:NAME -->` and `<!-- end generated:NAME -->`
/// replaced by `markdown` (framed by blank lines). Both markers must be there, once each.
pub fn replace_block(
    text: &str,
    name: &str,
    markdown: &str,
) -> std::result::Result<String, String> {
    let open = format!("<!-- generated:{name} -->");
    let close = format!("<!-- end generated:{name} -->");
    let start = text
        .find(&open)
        .ok_or_else(|| format!("no `{open}` marker"))?;
    if text[start + open.len()..].contains(&open) {
        return Err(format!("`{open}` appears twice"));
    }
    let end = text[start..]
        .find(&close)
        .map(|offset| start + offset)
        .ok_or_else(|| format!("no `{close}` marker after `{open}`"))?;
    Ok(format!(
        "{}{open}\n\n{}\n\n{}",
        &text[..start],
        markdown.trim_end(),
        &text[end..]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regenerates every figure and table in memory: a committed one that differs (the code or
    /// a released config changed, or someone edited an SVG or a number by hand) fails here.
    #[test]
    fn book_figures_and_generated_tables_are_fresh() {
        let root = repo_root();
        let stale = stale_outputs(&root, false).expect("figures and tables can be computed");
        assert!(
            stale.is_empty(),
            "stale book outputs (run `cargo xtask figures` and commit): {stale:?}"
        );
    }

    #[test]
    fn replace_block_keeps_the_surroundings_and_needs_both_markers() {
        let text = "a\n<!-- generated:x -->\nold\n<!-- end generated:x -->\nb\n";
        let updated = replace_block(text, "x", "new").unwrap();
        assert_eq!(
            updated,
            "a\n<!-- generated:x -->\n\nnew\n\n<!-- end generated:x -->\nb\n"
        );
        assert_eq!(replace_block(&updated, "x", "new").unwrap(), updated);
        assert!(replace_block("a <!-- generated:x --> b", "x", "new").is_err());
        assert!(replace_block("a b", "x", "new").is_err());
    }

    #[test]
    fn every_figure_is_embedded_in_a_chapter() {
        let root = repo_root();
        let chapters: String = fs::read_dir(root.join("docs"))
            .unwrap()
            .filter_map(|entry| entry.ok())
            .filter(|entry| entry.path().extension().is_some_and(|e| e == "md"))
            .map(|entry| fs::read_to_string(entry.path()).unwrap())
            .collect();
        let released = released_models(&root).unwrap();
        for figure in figures(&root, &released).unwrap() {
            let reference = format!("(figures/{}.svg)", figure.name);
            assert!(
                chapters.contains(&reference),
                "no chapter embeds {reference}"
            );
        }
    }
}
