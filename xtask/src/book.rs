//! `cargo xtask book`: builds the Gemma 4 book (`docs/`, mdBook) together with the API pages its
//! function links point to, and checks it as a reader would see it, in headless Chromium.
//!
//! Steps: the figures and generated tables must be fresh (`cargo xtask figures --check`);
//! `cargo doc --workspace --no-deps --document-private-items` writes the API pages;
//! `mdbook build docs` writes the chapters to `target/book/`; the API pages are copied to
//! `target/book/api/`; then `xtask/book-check/check.mjs` (playwright-core, pinned in its
//! `package-lock.json`, driving Debian's `/usr/bin/chromium`) opens every chapter and fails on a
//! console error, an image without a size, or a broken link or anchor.

use std::error::Error;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Args;

use crate::process::{repo_root, run as run_command};

/// The mdBook version the book is built with (`.ci/run` installs exactly this one).
pub const MDBOOK_VERSION: &str = "0.5.4";

/// Arguments of `cargo xtask book`.
#[derive(Debug, Args)]
pub struct BookArgs {
    /// The mdbook program (default: `mdbook` on PATH, installed with
    /// `cargo install --locked mdbook@0.5.4 --no-default-features --features search`).
    #[arg(long, default_value = "mdbook")]
    mdbook: PathBuf,
    /// The Chromium the check drives.
    #[arg(long, default_value = "/usr/bin/chromium")]
    chromium: PathBuf,
    /// Build only; do not open the book in Chromium.
    #[arg(long)]
    no_browser: bool,
}

pub fn run(args: &BookArgs) -> Result<(), Box<dyn Error>> {
    let root = repo_root();
    check_mdbook_version(&args.mdbook)?;
    crate::figures::run(&crate::figures::FiguresArgs::check_only())?;

    let target = root.join("target");
    eprintln!("xtask book: API pages (cargo doc --document-private-items)");
    run_command(
        Command::new(env_or("CARGO", "cargo"))
            .current_dir(&root)
            // A broken intra-doc link is a broken link of the book too.
            .env("RUSTDOCFLAGS", "-D warnings")
            .args([
                "doc",
                "--release",
                "--workspace",
                "--no-deps",
                "--document-private-items",
                "--exclude",
                "xtask",
            ]),
    )?;
    eprintln!("xtask book: chapters (mdbook build docs)");
    run_command(
        Command::new(&args.mdbook)
            .current_dir(&root)
            .args(["build", "docs"]),
    )?;
    let book = target.join("book");
    let api = book.join("api");
    if api.exists() {
        fs::remove_dir_all(&api)?;
    }
    copy_tree(&target.join("doc"), &api)?;
    eprintln!("xtask book: built {}", book.display());
    if args.no_browser {
        return Ok(());
    }
    if !args.chromium.exists() {
        return Err(format!(
            "{} not found: install Debian's chromium package (as .ci/run does), pass --chromium, or build only with --no-browser",
            args.chromium.display()
        )
        .into());
    }
    let checker = root.join("xtask/book-check");
    if !checker.join("node_modules/playwright-core").exists() {
        eprintln!("xtask book: npm ci in {}", checker.display());
        run_command(Command::new("npm").current_dir(&checker).args([
            "ci",
            "--no-audit",
            "--no-fund",
        ]))?;
    }
    run_command(
        Command::new("node")
            .current_dir(&checker)
            .arg("check.mjs")
            .arg(&book)
            .arg(&args.chromium),
    )?;
    Ok(())
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// Refuses an mdbook other than the pinned version: the book's layout and the check depend on it.
fn check_mdbook_version(mdbook: &Path) -> Result<(), Box<dyn Error>> {
    let output = Command::new(mdbook).arg("--version").output().map_err(|e| {
        format!(
            "cannot run {} ({e}): install it with `cargo install --locked mdbook@{MDBOOK_VERSION} --no-default-features --features search`",
            mdbook.display()
        )
    })?;
    let version = String::from_utf8_lossy(&output.stdout);
    if !version.contains(MDBOOK_VERSION) {
        return Err(format!(
            "{} is `{}`; the book is built with mdbook {MDBOOK_VERSION}",
            mdbook.display(),
            version.trim()
        )
        .into());
    }
    Ok(())
}

fn copy_tree(from: &Path, to: &Path) -> Result<(), Box<dyn Error>> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from).map_err(|e| format!("cannot read {}: {e}", from.display()))? {
        let entry = entry?;
        let destination = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &destination)?;
        } else {
            fs::copy(entry.path(), &destination)?;
        }
    }
    Ok(())
}
