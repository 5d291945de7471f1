//! Running the programs xtask tasks drive (pip, python, cargo fuzz, ...).

use std::process::Command;

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
