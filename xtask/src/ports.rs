//! `cargo xtask ports [--ports ID,...] [--venv DIR] [--work DIR] [--out docs/ports.md]`: the
//! conformance table of real Gemma 4 ports, judged by `gemma4 compare`.
//!
//! For every port of [`PORTS`] and every text-only golden case, the port's driver
//! (`xtask/scripts/ports/driver_<port>.py`) runs the port on the case's checkpoint and prompt and
//! writes an activation dump (shared contracts §2): the tensors the port exposes through forward
//! hooks, the logits of every prompt position and the decode rows through the port's own KV
//! cache. `gemma4 compare --model <checkpoint> --tokens <ids> --candidate <dump> --json` then
//! judges the dump against the reference. A driver that cannot run a case (an unsupported
//! layout, a checkpoint the port's loader refuses) says why and the table reports it, apart from
//! divergences.
//!
//! Each port is a pinned release from PyPI, checked against its sha256 (`pip install
//! --require-hashes --no-deps --target`), installed outside the repository under `--work`
//! (default `~/.cache/gemma4/ports/<port>-<version>/`); the Python ports run on the oracle
//! virtualenv's torch (`cargo xtask golden` makes it). It needs the package registry, so it is
//! not part of CI: `docs/ports.md` is its committed output, with the date it ran.
//!
//! What the port's source shows for each divergence is kept in [`FINDINGS`]; a finding that a
//! run no longer observes fails the task (the table and its explanations cannot drift apart), and
//! a divergence without a finding is listed as not yet located.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use gemma4::golden::{load_cases, GoldenCase};
use serde_json::Value;

use crate::golden::{ensure_venv, venv_dir};
use crate::process::{io_err, repo_root, CommandFailure, IoFailure};

#[derive(Debug, clap::Args)]
pub struct PortsArgs {
    /// Only these ports (ids of the table, comma-separated) [default: every port].
    #[arg(long, value_delimiter = ',')]
    pub ports: Vec<String>,
    /// The oracle virtualenv whose Python and torch run the Python ports
    /// [default: $GEMMA4_ORACLE_VENV, else ~/.cache/gemma4/oracle-venv].
    #[arg(long)]
    pub venv: Option<PathBuf>,
    /// Where the ports are installed and their dumps written [default: ~/.cache/gemma4/ports].
    #[arg(long)]
    pub work: Option<PathBuf>,
    /// The report.
    #[arg(long, default_value = "docs/ports.md")]
    pub out: PathBuf,
}

/// A port of the table.
pub struct Port {
    /// The table's id (also the driver's name: `driver_<id with - as _>.py`).
    pub id: &'static str,
    /// The PyPI package whose later releases the report looks up (`None`: the control).
    pub package: Option<&'static str>,
    pub version: &'static str,
    /// Pinned requirements with their sha256, installed with `--no-deps` (the port's own
    /// dependencies that the oracle virtualenv lacks included); empty: nothing to install.
    pub requirements: &'static [&'static str],
    /// One sentence for the report.
    pub about: &'static str,
}

/// The ports, in the table's order.
pub const PORTS: &[Port] = &[
    Port {
        id: "hf-transformers",
        package: None,
        version: "5.23.0",
        requirements: &[],
        about: "Hugging Face transformers, the oracle's library (golden/requirements.txt), driven by the hook recipe of the conformance guide: the control, which must be conformant everywhere",
    },
    Port {
        id: "gemma4-pt-claude",
        package: Some("gemma4-pt-claude"),
        version: "0.2.0",
        requirements: &[
            "gemma4-pt-claude==0.2.0 --hash=sha256:5e3819762a9f74f15005a4ffc13dab133a9f693e25c5dc2f8e0eaae45de3178b",
        ],
        about: "an independent PyTorch port on PyPI; its own Hugging Face loader, its config classes filled from the checkpoint's config",
    },
    Port {
        id: "gemma4-pytorch-codex",
        package: Some("gemma4-pytorch-codex"),
        version: "0.2.0",
        requirements: &[
            "gemma4-pytorch-codex==0.2.0 --hash=sha256:81a4da81dfe2dafffb5bfcd6cd3ed6fa6ed88be4959c9b5416f85e8a1707320c",
            "torchaudio==2.11.0 --hash=sha256:1a07ec72fd6f26a588c39b5f029e0130d16bb40bc4221635580bf8fb18fcbc80",
            "sentencepiece==0.2.1 --hash=sha256:4f5a3e0d9f445ed9d66c0fec47d4b23d12cfc858b407a03c194c1b26c2ac2a63",
        ],
        about: "an independent PyTorch port on PyPI (module `gemma4_pt_codex`); its own config translation and weight conversion from the Hugging Face checkpoint",
    },
];

/// What a run observed, for matching [`FINDINGS`].
#[derive(Clone, Copy, Debug)]
pub enum Observed {
    /// `compare` named this fault.
    Diagnosis(&'static str),
    /// The driver reported the case unsupported with a reason containing this text.
    Unsupported(&'static str),
    /// Not conformant, no known fault, first divergence at this tensor.
    Unexplained(&'static str),
}

/// A divergence located in a port's source.
pub struct Finding {
    pub port: &'static str,
    pub observed: Observed,
    /// Where in the port's source, and what it does.
    pub text: &'static str,
}

/// The port source behind each divergence the table shows (read in the pinned releases).
pub const FINDINGS: &[Finding] = &[
    Finding {
        port: "gemma4-pt-claude",
        observed: Observed::Diagnosis("router_on_normed_input"),
        text: "`gemma4_pt_claude/transformer.py`, `TransformerBlock.forward`: the MoE branch passes `self.pre_ffw_norm(x)` to `self.moe`, and `moe.py`, `MoELayer.forward`, routes on that input (`self.router(x)`); the router reads the residual stream itself (shared spec: text §9 step 2). A bug, not a precision choice: on the 26B-A4B-like model the first layer's output is already off by half of its largest element.",
    },
    Finding {
        port: "gemma4-pytorch-codex",
        observed: Observed::Unsupported("hard-coded producer rule"),
        text: "`gemma4_pt_codex/config.py`, `create_kv_sharing_patterns`: a KV-shared full layer reads layer `num_unshared − 1` and a shared sliding layer `num_unshared − 2`, instead of the last unshared layer of its own type (shared spec: text §7). Harmless on the released E2B/E4B layouts (where the last unshared layer is full and the one before it sliding), wrong on `e2b_like`, whose last unshared layer is sliding.",
    },
    Finding {
        port: "gemma4-pytorch-codex",
        observed: Observed::Unsupported("size mismatch"),
        text: "`gemma4_pt_codex/convert.py`, `_native_text_config_from_hf`: the full layers' head dim and KV heads are read only from `global_head_dim` / `num_global_key_value_heads`, not from `per_layer_config`, the spelling transformers 5.23 writes when it saves a Gemma 4 checkpoint; the model is then built with the sliding layers' head dim on every layer and the converted weights do not fit. Checkpoints saved in the released spelling load.",
    },
    Finding {
        port: "gemma4-pytorch-codex",
        observed: Observed::Unexplained("per_layer_inputs"),
        text: "`gemma4_pt_codex/convert.py`, `_convert_hf_text_entry`: the D^-1/2 of the PLE context projection is folded into the projection's weights in the checkpoint's dtype (`value * value.new_tensor(hidden_size**-0.5)`). On a bf16 checkpoint that rounds every weight a second time (relative error up to 2^-9): `per_layer_inputs` is off by 4e-4 relative and the logits by 9e-4. The formula is right; the precision is the converter's, not the checkpoint's (the fault catalogue has no entry for it: the names of precision choices are the next step of this table).",
    },
    Finding {
        port: "gemma4-pytorch-codex",
        observed: Observed::Unsupported("NoneType"),
        text: "`gemma4_pt_codex/convert.py`, `_native_text_config_from_hf`: `layer_types: null` (valid in transformers, which then derives the default pattern) is iterated as a list. Only configs with explicit `layer_types` load; the released ones have them.",
    },
];

/// Errors of the task.
#[derive(Debug)]
pub enum PortsError {
    Io(IoFailure),
    Command(CommandFailure),
    Golden(String),
    /// `--ports` names a port that is not in the table.
    UnknownPort(String),
    /// A [`FINDINGS`] entry that no run observed any more.
    StaleFinding {
        port: String,
        observed: String,
    },
    /// `gemma4 compare` printed something that is not its JSON report.
    CompareOutput {
        case: String,
        port: String,
        detail: String,
    },
}

impl std::fmt::Display for PortsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PortsError::Io(e) => write!(f, "{e}"),
            PortsError::Command(e) => write!(f, "{e}"),
            PortsError::Golden(e) => write!(f, "golden cases: {e}"),
            PortsError::UnknownPort(id) => write!(
                f,
                "--ports: unknown port `{id}` (known: {})",
                PORTS.iter().map(|p| p.id).collect::<Vec<_>>().join(", ")
            ),
            PortsError::StaleFinding { port, observed } => write!(
                f,
                "the finding {observed} of {port} (xtask/src/ports.rs, FINDINGS) was not observed in this run: update or remove it"
            ),
            PortsError::CompareOutput { case, port, detail } => {
                write!(f, "gemma4 compare on {port}'s dump of {case}: {detail}")
            }
        }
    }
}

impl std::error::Error for PortsError {}

impl From<IoFailure> for PortsError {
    fn from(e: IoFailure) -> Self {
        PortsError::Io(e)
    }
}

impl From<CommandFailure> for PortsError {
    fn from(e: CommandFailure) -> Self {
        PortsError::Command(e)
    }
}

/// How a port did on a case.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// `compare` judged the port's dump.
    Judged {
        conformant: bool,
        first_divergence: Option<String>,
        diagnosis: Option<String>,
        /// The worst `max_rel` of the prompt's logits.
        logits_max_rel: Option<f64>,
        /// Tensors compared.
        compared: usize,
    },
    /// The driver could not run the port on the case (its reason).
    Unsupported(String),
    /// The driver failed for another reason (its last lines of stderr).
    Failed(String),
}

/// One row of the table.
pub struct Row {
    pub port: &'static Port,
    pub case: String,
    pub family: String,
    pub outcome: Outcome,
}

pub fn run(args: &PortsArgs) -> Result<(), PortsError> {
    let repo = repo_root();
    let ports: Vec<&'static Port> = if args.ports.is_empty() {
        PORTS.iter().collect()
    } else {
        args.ports
            .iter()
            .map(|id| {
                PORTS
                    .iter()
                    .find(|p| p.id == id)
                    .ok_or_else(|| PortsError::UnknownPort(id.clone()))
            })
            .collect::<Result<_, _>>()?
    };
    let venv = venv_dir(args.venv.as_deref());
    let python = ensure_venv(&repo, &venv).map_err(|e| PortsError::Golden(e.to_string()))?;
    let work = args.work.clone().unwrap_or_else(|| {
        let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
        home.join(".cache/gemma4/ports")
    });
    crate::process::run(Command::new(env!("CARGO")).current_dir(&repo).args([
        "build",
        "--release",
        "--package",
        "gemma4",
        "--bin",
        "gemma4",
    ]))?;
    let gemma4 = repo.join("target/release/gemma4");
    let cases: Vec<GoldenCase> = load_cases(&repo.join("golden"))
        .map_err(PortsError::Golden)?
        .into_iter()
        .filter(|c| c.images.is_empty() && c.audio.is_empty())
        .collect();

    // Each case's layer plan, once for every port.
    let plans: Vec<PathBuf> = cases
        .iter()
        .map(|case| write_plan(case, &gemma4, &work))
        .collect::<Result<_, _>>()?;
    let mut rows = Vec::new();
    let mut latest = Vec::new();
    for port in &ports {
        let site = install(port, &python, &work)?;
        latest.push((port.id, later_release(port, &python)));
        for (case, plan) in cases.iter().zip(&plans) {
            eprintln!("xtask ports: {} on {}", port.id, case.name);
            let outcome = run_case(port, case, plan, &python, &site, &gemma4, &work)?;
            rows.push(Row {
                port,
                case: case.name.clone(),
                family: case.family.clone(),
                outcome,
            });
        }
    }
    let findings = match_findings(&rows, &ports)?;
    let report = render(&rows, &ports, &latest, &findings);
    let out = repo.join(&args.out);
    fs::write(&out, report).map_err(io_err(format!("writing {}", out.display())))?;
    eprintln!("xtask ports: wrote {}", out.display());
    Ok(())
}

/// Installs the port's pinned requirements (hash-checked) under `work`; returns the directory
/// to put on PYTHONPATH (`None`-like empty path for the control, which needs nothing).
fn install(port: &Port, python: &Path, work: &Path) -> Result<PathBuf, PortsError> {
    let site = work.join(format!("{}-{}", port.id, port.version));
    if port.requirements.is_empty() || site.join(".installed").exists() {
        return Ok(site);
    }
    if site.exists() {
        fs::remove_dir_all(&site).map_err(io_err(format!("emptying {}", site.display())))?;
    }
    fs::create_dir_all(&site).map_err(io_err(format!("creating {}", site.display())))?;
    let requirements = site.join("requirements.txt");
    fs::write(&requirements, port.requirements.join("\n") + "\n")
        .map_err(io_err(format!("writing {}", requirements.display())))?;
    crate::process::run(
        Command::new(python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--require-hashes",
            ])
            .arg("--target")
            .arg(&site)
            .arg("-r")
            .arg(&requirements),
    )?;
    fs::write(site.join(".installed"), b"")
        .map_err(io_err(format!("marking {}", site.display())))?;
    Ok(site)
}

/// The newest release of the port's package on PyPI when it is not the pinned one, or a note.
fn later_release(port: &Port, python: &Path) -> String {
    let Some(package) = port.package else {
        return "pinned by golden/requirements.txt".to_string();
    };
    let output = Command::new(python)
        .args(["-m", "pip", "index", "versions", package])
        .output();
    let Ok(output) = output else {
        return "PyPI not reachable".to_string();
    };
    let text = String::from_utf8_lossy(&output.stdout);
    let newest = text
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{package} (")))
        .and_then(|rest| rest.strip_suffix(')'))
        .map(str::to_string);
    match newest {
        Some(v) if v == port.version => "no later release on PyPI".to_string(),
        Some(v) => format!("a later release exists on PyPI: {v} (not judged here)"),
        None => "PyPI not reachable".to_string(),
    }
}

/// The driver on one case, then `compare` on its dump.
/// `gemma4 inspect --json` of the case's checkpoint (the normalised config and layer plan the
/// drivers translate into each port's configuration), written under `work/plans/`.
fn write_plan(case: &GoldenCase, gemma4: &Path, work: &Path) -> Result<PathBuf, PortsError> {
    let plans = work.join("plans");
    fs::create_dir_all(&plans).map_err(io_err(format!("creating {}", plans.display())))?;
    let path = plans.join(format!("{}.plan.json", case.name));
    let mut command = Command::new(gemma4);
    command
        .args(["inspect", "--json", "--model"])
        .arg(case.model_dir());
    let shown = format!("{command:?}");
    let output = command
        .output()
        .map_err(|e| CommandFailure::could_not_start(shown.clone(), e))?;
    if !output.status.success() {
        return Err(PortsError::Command(CommandFailure {
            command: shown,
            detail: format!(
                "failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        }));
    }
    fs::write(&path, &output.stdout).map_err(io_err(format!("writing {}", path.display())))?;
    Ok(path)
}

#[allow(clippy::too_many_arguments)]
fn run_case(
    port: &Port,
    case: &GoldenCase,
    plan_path: &Path,
    python: &Path,
    site: &Path,
    gemma4: &Path,
    work: &Path,
) -> Result<Outcome, PortsError> {
    let model = case.model_dir();
    let dumps = work.join("dumps").join(port.id);
    fs::create_dir_all(&dumps).map_err(io_err(format!("creating {}", dumps.display())))?;
    let dump = dumps.join(format!("{}.safetensors", case.name));
    let _ = fs::remove_file(&dump);
    let scripts = repo_root().join("xtask/scripts/ports");
    let driver = scripts.join(format!("driver_{}.py", port.id.replace('-', "_")));
    let python_path = std::env::join_paths([site, scripts.as_path()])
        .map_err(|e| PortsError::Golden(e.to_string()))?;
    let output = Command::new(python)
        .arg(&driver)
        .arg("--case")
        .arg(&case.dir)
        .arg("--plan")
        .arg(plan_path)
        .arg("--out")
        .arg(&dump)
        .env("PYTHONPATH", python_path)
        .output()
        .map_err(|e| CommandFailure::could_not_start(format!("{}", driver.display()), e))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let last_lines = |n: usize| {
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        lines[lines.len().saturating_sub(n)..].join(" / ")
    };
    match output.status.code() {
        Some(0) => {}
        Some(3) => {
            let reason = stderr
                .lines()
                .find_map(|l| l.strip_prefix("UNSUPPORTED: "))
                .map_or_else(|| last_lines(1), str::to_string);
            return Ok(Outcome::Unsupported(reason));
        }
        _ => return Ok(Outcome::Failed(last_lines(3))),
    }
    let tokens: Vec<String> = case.tokens.iter().map(usize::to_string).collect();
    let compared = Command::new(gemma4)
        .args(["compare", "--json", "--model"])
        .arg(&model)
        .args(["--tokens", &tokens.join(",")])
        .arg("--candidate")
        .arg(&dump)
        .output()
        .map_err(|e| CommandFailure::could_not_start("gemma4 compare", e))?;
    let report: Value =
        serde_json::from_slice(&compared.stdout).map_err(|e| PortsError::CompareOutput {
            case: case.name.clone(),
            port: port.id.to_string(),
            detail: format!("{e}; stderr: {}", String::from_utf8_lossy(&compared.stderr)),
        })?;
    let text = |key: &str| report.get(key).and_then(Value::as_str).map(str::to_string);
    let logits_max_rel = report
        .get("tensors")
        .and_then(Value::as_array)
        .and_then(|tensors| tensors.iter().find(|t| t["name"] == "logits"))
        .and_then(|t| t["max_rel"].as_f64());
    Ok(Outcome::Judged {
        conformant: report["conformant"].as_bool().unwrap_or(false),
        first_divergence: text("first_divergence"),
        diagnosis: text("diagnosis"),
        logits_max_rel,
        compared: report["compared"].as_u64().unwrap_or(0) as usize,
    })
}

fn observes(row: &Row, observed: Observed) -> bool {
    match (&row.outcome, observed) {
        (
            Outcome::Judged {
                diagnosis: Some(d), ..
            },
            Observed::Diagnosis(id),
        ) => d == id,
        (Outcome::Unsupported(reason), Observed::Unsupported(text)) => reason.contains(text),
        (
            Outcome::Judged {
                conformant: false,
                diagnosis: None,
                first_divergence: Some(tensor),
                ..
            },
            Observed::Unexplained(at),
        ) => tensor == at,
        _ => false,
    }
}

/// The findings observed in this run (a finding of a port that ran but was not observed is an
/// error: it describes a behaviour the table no longer shows).
fn match_findings(rows: &[Row], ports: &[&Port]) -> Result<Vec<&'static Finding>, PortsError> {
    let mut observed = Vec::new();
    for finding in FINDINGS {
        if !ports.iter().any(|p| p.id == finding.port) {
            continue;
        }
        if rows
            .iter()
            .any(|r| r.port.id == finding.port && observes(r, finding.observed))
        {
            observed.push(finding);
        } else {
            return Err(PortsError::StaleFinding {
                port: finding.port.to_string(),
                observed: format!("{:?}", finding.observed),
            });
        }
    }
    Ok(observed)
}

fn verdict(outcome: &Outcome) -> (String, String, String, String) {
    match outcome {
        Outcome::Judged {
            conformant,
            first_divergence,
            diagnosis,
            logits_max_rel,
            compared,
        } => (
            if *conformant {
                format!("**conformant** ({compared} tensors)")
            } else {
                format!("**NOT conformant** ({compared} tensors)")
            },
            first_divergence
                .clone()
                .map_or("—".into(), |t| format!("`{t}`")),
            match (conformant, diagnosis) {
                (true, _) => "—".into(),
                (false, Some(d)) => format!("`{d}`"),
                (false, None) => "no known fault explains this".into(),
            },
            logits_max_rel.map_or("—".into(), |e| format!("{e:.1e}")),
        ),
        Outcome::Unsupported(reason) => (
            "cannot run this case".into(),
            "—".into(),
            table_cell(reason),
            "—".into(),
        ),
        Outcome::Failed(detail) => (
            "driver failed".into(),
            "—".into(),
            table_cell(detail),
            "—".into(),
        ),
    }
}

/// A reason as a table cell: `|` escaped, cut after [`CELL_CHARS`] characters.
fn table_cell(text: &str) -> String {
    let mut cell: String = text.chars().take(CELL_CHARS).collect();
    if cell.len() < text.len() {
        cell.push('…');
    }
    cell.replace('|', "\\|")
}

/// The longest reason a table cell shows (the rest is in the driver's output).
const CELL_CHARS: usize = 200;

fn render(
    rows: &[Row],
    ports: &[&Port],
    latest: &[(&str, String)],
    findings: &[&Finding],
) -> String {
    let mut out = String::new();
    let date = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    out.push_str("# Real ports, judged\n\n");
    out.push_str(&format!(
        "<!-- Written by `cargo xtask ports` (xtask/src/ports.rs) on {date}; do not edit by hand. -->\n\n"
    ));
    out.push_str(
        "Each port below ran on the text-only golden models (tiny Hugging Face-made checkpoints of \
         all four families, every parameter random; [the golden cases](conformance.md)) with the \
         case's prompt, recording its tensors with forward hooks (its own modules, unmodified), the \
         logits of every prompt position and the greedy decode rows through its own KV cache. \
         `gemma4 compare --model <checkpoint> --tokens <ids> --candidate <dump>` judged each dump \
         with the float32 tolerances of [the conformance guide](conformance.md). The drivers are \
         `xtask/scripts/ports/driver_<port>.py`; each port is a pinned release installed with its \
         sha256 outside the repository. Rerun: `cargo xtask ports` (it needs the package registry \
         and the oracle virtualenv of `cargo xtask golden`).\n\n",
    );
    out.push_str(
        "## The ports\n\n| port | version | what it is | later releases |\n|---|---|---|---|\n",
    );
    for port in ports {
        let later = latest
            .iter()
            .find(|(id, _)| *id == port.id)
            .map_or("", |(_, text)| text.as_str());
        let _ = writeln!(
            out,
            "| `{}` | {} | {} | {later} |",
            port.id, port.version, port.about
        );
    }
    out.push_str(
        "\n## The table\n\nVerdict: `compare`'s, over the tensors the port's dump holds. First \
         divergence: the first tensor in model order outside its tolerance. Diagnosis: the \
         catalogue fault that reproduces the port's dump (see [the fault catalogue](faults.md)), or \
         why the port could not run the case. Logits error: the largest relative error of the \
         prompt's logits (to the largest logit).\n\n\
         | port | case | family | verdict | first divergence | diagnosis | logits error |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for row in rows {
        let (verdict, first, diagnosis, logits) = verdict(&row.outcome);
        let _ = writeln!(
            out,
            "| `{}` | `{}` | {} | {verdict} | {first} | {diagnosis} | {logits} |",
            row.port.id, row.case, row.family
        );
    }
    out.push_str("\n## What the ports' sources show\n\n");
    for port in ports {
        let port_findings: Vec<&&Finding> = findings.iter().filter(|f| f.port == port.id).collect();
        let unlocated: Vec<&Row> = rows
            .iter()
            .filter(|r| r.port.id == port.id)
            .filter(|r| match &r.outcome {
                Outcome::Judged { conformant, .. } => !conformant,
                _ => true,
            })
            .filter(|r| {
                !FINDINGS
                    .iter()
                    .any(|f| f.port == port.id && observes(r, f.observed))
            })
            .collect();
        if port_findings.is_empty() && unlocated.is_empty() {
            let _ = writeln!(out, "- `{}`: conformant on every case it ran.", port.id);
            continue;
        }
        for finding in port_findings {
            let cases: Vec<String> = rows
                .iter()
                .filter(|r| r.port.id == port.id && observes(r, finding.observed))
                .map(|r| format!("`{}`", r.case))
                .collect();
            let _ = writeln!(
                out,
                "- `{}` ({}): {}",
                port.id,
                cases.join(", "),
                finding.text
            );
        }
        for row in unlocated {
            let (_, first, diagnosis, _) = verdict(&row.outcome);
            let _ = writeln!(
                out,
                "- `{}` (`{}`): not yet located in the port's source — first divergence {first}, {diagnosis}.",
                port.id, row.case
            );
        }
    }
    out.push_str(
        "\nNot yet in the table: llama.cpp (its converter to an F32 GGUF and its C API), DeepMind's \
         `gemma` (JAX; its 4.0.1 release needs Python 3.12, newer than this machine's), and the \
         image and audio cases.\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(port: &'static Port, case: &str, outcome: Outcome) -> Row {
        Row {
            port,
            case: case.to_string(),
            family: "e2b".to_string(),
            outcome,
        }
    }

    fn claude() -> &'static Port {
        PORTS.iter().find(|p| p.id == "gemma4-pt-claude").unwrap()
    }

    fn judged(conformant: bool, first: Option<&str>, diagnosis: Option<&str>) -> Outcome {
        Outcome::Judged {
            conformant,
            first_divergence: first.map(str::to_string),
            diagnosis: diagnosis.map(str::to_string),
            logits_max_rel: Some(1e-6),
            compared: 10,
        }
    }

    #[test]
    fn every_finding_names_a_port_of_the_table() {
        for finding in FINDINGS {
            assert!(
                PORTS.iter().any(|p| p.id == finding.port),
                "finding of unknown port {}",
                finding.port
            );
        }
        for port in PORTS {
            for requirement in port.requirements {
                assert!(
                    requirement.contains("==") && requirement.contains("--hash=sha256:"),
                    "{}: unpinned requirement {requirement}",
                    port.id
                );
            }
        }
    }

    #[test]
    fn a_finding_no_run_observes_is_an_error() {
        let claude = claude();
        // The router bug observed: its finding matches.
        let rows = vec![row(
            claude,
            "26b_a4b_like",
            judged(
                false,
                Some("layers.0.output"),
                Some("router_on_normed_input"),
            ),
        )];
        let found = match_findings(&rows, &[claude]).unwrap();
        assert_eq!(found.len(), 1);
        // The port fixed (conformant everywhere): the finding is stale and the task fails.
        let rows = vec![row(claude, "26b_a4b_like", judged(true, None, None))];
        assert!(matches!(
            match_findings(&rows, &[claude]),
            Err(PortsError::StaleFinding { .. })
        ));
    }

    #[test]
    fn divergences_without_a_finding_are_listed_as_not_located() {
        let claude = claude();
        let rows = vec![
            row(
                claude,
                "26b_a4b_like",
                judged(
                    false,
                    Some("layers.0.output"),
                    Some("router_on_normed_input"),
                ),
            ),
            row(claude, "e2b_like", judged(false, Some("logits"), None)),
        ];
        let findings = match_findings(&rows, &[claude]).unwrap();
        let report = render(&rows, &[claude], &[], &findings);
        assert!(report.contains("MoELayer.forward"), "{report}");
        assert!(
            report.contains("(`e2b_like`): not yet located in the port's source"),
            "{report}"
        );
        assert!(report.contains("| `gemma4-pt-claude` | `e2b_like` | e2b | **NOT conformant** (10 tensors) | `logits` | no known fault explains this |"), "{report}");
    }
}
