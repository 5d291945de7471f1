//! Running the programs xtask tasks drive (pip, python, cargo fuzz, ...), where they run, and
//! the file-system failures the tasks report.

use std::fmt;
use std::fs;
use std::io;
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

impl CommandFailure {
    /// `command` could not be started at all.
    pub fn could_not_start(command: impl Into<String>, error: io::Error) -> CommandFailure {
        CommandFailure {
            command: command.into(),
            detail: format!("could not start: {error}"),
        }
    }
}

impl fmt::Display for CommandFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` {}", self.command, self.detail)
    }
}

impl std::error::Error for CommandFailure {}

/// A file-system operation that failed: what was being done ("reading golden/...") and why.
/// Each task's error type holds it as its `Io` variant (`From`).
#[derive(Debug)]
pub struct IoFailure {
    pub what: String,
    pub source: io::Error,
}

impl fmt::Display for IoFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.what, self.source)
    }
}

impl std::error::Error for IoFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// A `map_err` adapter naming the operation an `io::Error` comes from.
pub fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> IoFailure {
    let what = what.into();
    move |source| IoFailure { what, source }
}

/// Reads a whole file; the error names it.
pub fn read(path: &Path) -> Result<Vec<u8>, IoFailure> {
    fs::read(path).map_err(io_err(format!("reading {}", path.display())))
}

/// Runs `command` with inherited stdio; an unsuccessful exit is an error.
pub fn run(command: &mut Command) -> Result<(), CommandFailure> {
    let shown = format!("{command:?}");
    let status = command
        .status()
        .map_err(|e| CommandFailure::could_not_start(shown.clone(), e))?;
    if status.success() {
        Ok(())
    } else {
        Err(CommandFailure {
            command: shown,
            detail: format!("failed ({status})"),
        })
    }
}
