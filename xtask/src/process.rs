//! Running the programs xtask tasks drive (pip, python, cargo fuzz, ...), and where they run.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository root (the parent of `xtask/`).
pub fn repo_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// A program that could not be started or exited unsuccessfully.
#[derive(Debug)]
pub struct CommandFailure {
    /// The command line, as `Command`'s Debug shows it.
    pub command: String,
    /// What went wrong ("could not start: ...", "failed with exit status: 1").
    pub detail: String,
}

/// Runs `command` with inherited stdio; an unsuccessful exit is an error.
pub fn run(command: &mut Command) -> Result<(), CommandFailure> {
    let shown = format!("{command:?}");
    let status = command.status().map_err(|e| CommandFailure {
        command: shown.clone(),
        detail: format!("could not start: {e}"),
    })?;
    if status.success() {
        Ok(())
    } else {
        Err(CommandFailure {
            command: shown,
            detail: format!("failed ({status})"),
        })
    }
}
