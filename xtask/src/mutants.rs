//! `cargo xtask mutants [--fault ID]... [--out FILE]`: the mutation score of the test suite.
//!
//! Every fault of the reference's catalogue (`reference/src/faults.rs`, shared contracts §4) is
//! a plausible porting bug compiled into the reference behind a switch. This task
//!
//! 1. builds the workspace's test binaries once (`cargo test --workspace --release --no-run`);
//! 2. runs every test binary without faults: the suite must be green, or a failure under a
//!    fault would mean nothing;
//! 3. runs every test binary once per fault with `GEMMA4_FAULTS=<id>` (the reference reads it
//!    at start-up) and records which tests fail: those tests *catch* the fault;
//! 4. prints the table fault × caught-by, writes it to `docs/mutation-score.md`, and fails if
//!    any fault survives (no test fails with it on).
//!
//! Running the binaries directly (not through `cargo test` once per fault) attributes every
//! failure to its binary and saves cargo's start-up per run.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

use gemma4_reference::faults::Fault;
use serde_json::Value;

use crate::process::{io_err, repo_root, CommandFailure, IoFailure};

/// Arguments of `cargo xtask mutants`.
#[derive(Debug, clap::Args)]
pub struct MutantsArgs {
    /// Only these fault ids (repeatable; default: the whole catalogue).
    #[arg(long, value_name = "ID")]
    fault: Vec<String>,

    /// Where to write the markdown table, relative to the repository root.
    #[arg(long, value_name = "FILE", default_value = "docs/mutation-score.md")]
    out: PathBuf,
}

/// What can go wrong in `cargo xtask mutants`.
#[derive(Debug)]
pub enum MutantsError {
    /// A program could not be started, or `cargo` failed.
    Command(CommandFailure),
    /// An unknown fault id was asked for.
    UnknownFault(String),
    /// Tests fail with no fault on.
    RedBaseline { failing: Vec<String> },
    /// The report could not be written.
    Io(IoFailure),
    /// Some faults are caught by no test.
    Survivors { faults: Vec<String> },
}

impl fmt::Display for MutantsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Command(failure) => failure.fmt(f),
            Self::UnknownFault(id) => write!(
                f,
                "unknown fault id `{id}` (see reference/src/faults.rs for the catalogue)"
            ),
            Self::RedBaseline { failing } => write!(
                f,
                "{} test(s) fail with no fault on, so the mutation score would mean nothing: {}",
                failing.len(),
                failing.join(", ")
            ),
            Self::Io(failure) => failure.fmt(f),
            Self::Survivors { faults } => write!(
                f,
                "{} fault(s) survive the test suite (no test fails with them on): {}",
                faults.len(),
                faults.join(", ")
            ),
        }
    }
}

impl std::error::Error for MutantsError {}

impl From<IoFailure> for MutantsError {
    fn from(failure: IoFailure) -> Self {
        Self::Io(failure)
    }
}

impl From<CommandFailure> for MutantsError {
    fn from(failure: CommandFailure) -> Self {
        Self::Command(failure)
    }
}

type Result<T, E = MutantsError> = std::result::Result<T, E>;

/// One test binary of the workspace.
struct TestBinary {
    /// The test target's name, e.g. `conformance`, or the crate's name for unit tests.
    name: String,
    executable: PathBuf,
    /// The package directory (test binaries run from there, as under `cargo test`).
    package_dir: PathBuf,
}

/// The tests one run of the suite saw fail, as `binary::test`.
struct RunResult {
    failing: Vec<String>,
    /// Tests that ran in total.
    ran: usize,
}

pub fn run(args: &MutantsArgs) -> Result<()> {
    let root = repo_root();
    let faults: Vec<Fault> = if args.fault.is_empty() {
        Fault::ALL.to_vec()
    } else {
        args.fault
            .iter()
            .map(|id| Fault::from_id(id).ok_or_else(|| MutantsError::UnknownFault(id.clone())))
            .collect::<Result<_>>()?
    };

    eprintln!("xtask mutants: building the test binaries");
    let binaries = build_test_binaries(&root)?;
    eprintln!(
        "xtask mutants: {} test binaries; baseline run without faults",
        binaries.len()
    );
    let baseline = run_suite(&binaries, None)?;
    if !baseline.failing.is_empty() {
        return Err(MutantsError::RedBaseline {
            failing: baseline.failing,
        });
    }

    let mut rows: Vec<(Fault, Vec<String>)> = Vec::with_capacity(faults.len());
    for (index, fault) in faults.iter().enumerate() {
        let result = run_suite(&binaries, Some(*fault))?;
        eprintln!(
            "xtask mutants: [{:>2}/{}] {:<34} caught by {:>3} of {} tests",
            index + 1,
            faults.len(),
            fault.id(),
            result.failing.len(),
            result.ran
        );
        rows.push((*fault, result.failing));
    }
    let markdown = format_markdown(&rows, baseline.ran);
    print!("{}", format_table(&rows));
    let out = root.join(&args.out);
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent).map_err(io_err(parent.display().to_string()))?;
    }
    std::fs::write(&out, markdown).map_err(io_err(out.display().to_string()))?;
    eprintln!("xtask mutants: wrote {}", out.display());

    let survivors: Vec<String> = rows
        .iter()
        .filter(|(_, tests)| tests.is_empty())
        .map(|(f, _)| f.id().to_string())
        .collect();
    if survivors.is_empty() {
        Ok(())
    } else {
        Err(MutantsError::Survivors { faults: survivors })
    }
}

/// `cargo test --workspace --release --no-run --message-format=json`, keeping the test
/// executables it reports.
fn build_test_binaries(root: &Path) -> Result<Vec<TestBinary>> {
    let command = "cargo test --workspace --release --no-run --message-format=json";
    let output = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "test",
            "--workspace",
            "--release",
            "--no-run",
            "--message-format=json",
        ])
        .current_dir(root)
        .output()
        .map_err(|e| CommandFailure::could_not_start(command, e))?;
    if !output.status.success() {
        return Err(CommandFailure {
            command: command.into(),
            detail: format!(
                "failed ({}):\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ),
        }
        .into());
    }
    let mut binaries = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let is_test =
            message["reason"] == "compiler-artifact" && message["profile"]["test"] == true;
        let (Some(executable), Some(manifest)) = (
            message["executable"].as_str(),
            message["manifest_path"].as_str(),
        ) else {
            continue;
        };
        if !is_test {
            continue;
        }
        let name = message["target"]["name"]
            .as_str()
            .unwrap_or("?")
            .to_string();
        let kind = message["target"]["kind"][0].as_str().unwrap_or("");
        binaries.push(TestBinary {
            name: if kind == "test" {
                name
            } else {
                format!("{name} ({kind})")
            },
            executable: PathBuf::from(executable),
            package_dir: Path::new(manifest)
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| root.to_path_buf()),
        });
    }
    binaries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(binaries)
}

/// Runs every test binary (with `fault` switched on for the whole process, if any) and
/// collects the failing tests.
fn run_suite(binaries: &[TestBinary], fault: Option<Fault>) -> Result<RunResult> {
    let mut result = RunResult {
        failing: Vec::new(),
        ran: 0,
    };
    for binary in binaries {
        let mut command = Command::new(&binary.executable);
        command.current_dir(&binary.package_dir);
        command.env_remove("GEMMA4_FAULTS");
        // A failing snapshot test must not leave `.snap.new` files behind.
        command.env("INSTA_UPDATE", "no");
        if let Some(fault) = fault {
            command.env("GEMMA4_FAULTS", fault.id());
        }
        let output = command.output().map_err(|e| {
            CommandFailure::could_not_start(binary.executable.display().to_string(), e)
        })?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let mut failed_here = 0;
        for line in stdout.lines() {
            // libtest: `test <name> ... ok` / `... FAILED` / `... ignored`
            let Some(rest) = line.strip_prefix("test ") else {
                continue;
            };
            let Some((name, outcome)) = rest.rsplit_once(" ... ") else {
                continue;
            };
            if outcome.starts_with("ignored") {
                continue;
            }
            result.ran += 1;
            if outcome.starts_with("FAILED") {
                failed_here += 1;
                result.failing.push(format!("{}::{name}", binary.name));
            }
        }
        // A binary that crashed before reporting (e.g. a panic in a static initialiser) fails
        // as a whole.
        if !output.status.success() && failed_here == 0 {
            result
                .failing
                .push(format!("{} (whole binary)", binary.name));
        }
    }
    Ok(result)
}

/// Failing tests grouped by test function: `conformance::e2b_like::mlp_matches_oracle` and
/// `conformance::e4b_like::mlp_matches_oracle` become
/// `conformance::mlp_matches_oracle [e2b_like, e4b_like]`. Sorted, so the report is stable.
fn grouped(tests: &[String]) -> Vec<String> {
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for test in tests {
        let parts: Vec<&str> = test.split("::").collect();
        match parts.as_slice() {
            [binary, module, function] => groups
                .entry(format!("{binary}::{function}"))
                .or_default()
                .push(module.to_string()),
            _ => {
                groups.entry(test.clone()).or_default();
            }
        }
    }
    groups
        .into_iter()
        .map(|(name, mut modules)| {
            modules.sort();
            if modules.is_empty() {
                name
            } else {
                format!("{name} [{}]", modules.join(", "))
            }
        })
        .collect()
}

/// At most `shown` names, then "and N more".
fn abbreviate(tests: &[String], shown: usize) -> String {
    if tests.len() <= shown {
        tests.join(", ")
    } else {
        format!(
            "{}, and {} more",
            tests[..shown].join(", "),
            tests.len() - shown
        )
    }
}

fn score_line(rows: &[(Fault, Vec<String>)]) -> String {
    let caught = rows.iter().filter(|(_, t)| !t.is_empty()).count();
    format!(
        "{caught} of {} faults caught ({:.0}%)",
        rows.len(),
        100.0 * caught as f64 / rows.len().max(1) as f64
    )
}

fn format_table(rows: &[(Fault, Vec<String>)]) -> String {
    let mut out = format!("\n{:<34} {:>6}  caught by\n", "fault", "tests");
    for (fault, tests) in rows {
        out.push_str(&format!(
            "{:<34} {:>6}  {}\n",
            fault.id(),
            tests.len(),
            if tests.is_empty() {
                "SURVIVES".to_string()
            } else {
                abbreviate(&grouped(tests), 2)
            }
        ));
    }
    out.push_str(&format!("\nmutation score: {}\n", score_line(rows)));
    out
}

fn format_markdown(rows: &[(Fault, Vec<String>)], baseline_tests: usize) -> String {
    let mut out = String::from(
        "# Mutation score\n\n\
         Written by `cargo xtask mutants`; do not edit by hand.\n\n\
         Every fault of the catalogue (`reference/src/faults.rs`, shared contracts §4) is a\n\
         plausible porting bug compiled into the reference behind a switch. The task ran every\n\
         test binary of `cargo test --workspace --release` once per fault, with\n\
         `GEMMA4_FAULTS=<id>`; a fault is *caught* when at least one test fails. The same check\n\
         runs in CI, in process, as `tests/mutation.rs`.\n\n",
    );
    out.push_str(&format!(
        "**Score: {}.** {} tests run per fault (none failing without faults).\n\n",
        score_line(rows),
        baseline_tests
    ));
    out.push_str("| fault | what the bug does | spec | failing tests | caught by |\n");
    out.push_str("|---|---|---|---:|---|\n");
    for (fault, tests) in rows {
        out.push_str(&format!(
            "| `{}` | {} | {} | {} | {} |\n",
            fault.id(),
            fault.description(),
            fault.spec_section(),
            tests.len(),
            if tests.is_empty() {
                "**survives**".to_string()
            } else {
                grouped(tests)
                    .iter()
                    .map(|t| format!("`{t}`"))
                    .collect::<Vec<_>>()
                    .join("<br>")
            }
        ));
    }
    out
}
