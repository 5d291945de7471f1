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

/// Where a port's driver runs.
pub enum Runtime {
    /// The oracle virtualenv's Python and torch, with the port's pinned requirements (sha256
    /// checked) installed with `pip install --no-deps --require-hashes --target` under `--work`;
    /// empty: nothing to install (the driver fetches and checks what it needs itself).
    OracleVenv {
        requirements: &'static [&'static str],
    },
    /// Its own virtualenv under `--work`, made with a CPython 3.`minor` (found on PATH as
    /// `python3.<minor>`, under pyenv, or given as `$GEMMA4_PYTHON_3_<minor>`), installed with
    /// `pip install --no-deps --require-hashes -r xtask/scripts/ports/<requirements_file>`.
    OwnVenv {
        minor: u32,
        requirements_file: &'static str,
    },
}

/// The media a port's driver takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Media {
    /// Text-only cases.
    Text,
    /// Image cases too.
    Images,
    /// Image and audio cases too.
    ImagesAndAudio,
}

impl Media {
    /// Does a driver taking these media run `case`?
    pub fn takes(self, case: &GoldenCase) -> bool {
        (case.images.is_empty() || self != Media::Text)
            && (case.audio.is_empty() || self == Media::ImagesAndAudio)
    }
}

/// A port of the table.
pub struct Port {
    /// The table's id (also the driver's name: `driver_<id with - as _>.py`).
    pub id: &'static str,
    /// The PyPI package whose later releases the report looks up (`None`: the control).
    pub package: Option<&'static str>,
    pub version: &'static str,
    pub runtime: Runtime,
    /// The precision profile the port runs at by design (`gemma4 compare --precision`), judged
    /// in a second column; `None`: float32 only.
    pub precision: Option<&'static str>,
    /// Which golden cases its driver runs beyond the text-only ones.
    pub media: Media,
    /// One sentence for the report.
    pub about: &'static str,
}

/// The ports, in the table's order.
pub const PORTS: &[Port] = &[
    Port {
        id: "hf-transformers",
        package: None,
        version: "5.23.0",
        runtime: Runtime::OracleVenv { requirements: &[] },
        precision: None,
        media: Media::ImagesAndAudio,
        about: "Hugging Face transformers, the oracle's library (golden/requirements.txt), driven by the hook recipe of the conformance guide (on the image and audio cases, the golden generator's own recording, `golden/generate.py`): the control, which must be conformant everywhere",
    },
    Port {
        id: "gemma4-pt-claude",
        package: Some("gemma4-pt-claude"),
        version: "0.2.0",
        runtime: Runtime::OracleVenv {
            requirements: &[
                "gemma4-pt-claude==0.2.0 --hash=sha256:5e3819762a9f74f15005a4ffc13dab133a9f693e25c5dc2f8e0eaae45de3178b",
            ],
        },
        precision: None,
        media: Media::Text,
        about: "an independent PyTorch port on PyPI; its own Hugging Face loader, its config classes filled from the checkpoint's config",
    },
    Port {
        id: "gemma4-pytorch-codex",
        package: Some("gemma4-pytorch-codex"),
        version: "0.2.0",
        runtime: Runtime::OracleVenv {
            requirements: &[
                "gemma4-pytorch-codex==0.2.0 --hash=sha256:81a4da81dfe2dafffb5bfcd6cd3ed6fa6ed88be4959c9b5416f85e8a1707320c",
                "torchaudio==2.11.0 --hash=sha256:1a07ec72fd6f26a588c39b5f029e0130d16bb40bc4221635580bf8fb18fcbc80",
                "sentencepiece==0.2.1 --hash=sha256:4f5a3e0d9f445ed9d66c0fec47d4b23d12cfc858b407a03c194c1b26c2ac2a63",
            ],
        },
        precision: None,
        media: Media::Text,
        about: "an independent PyTorch port on PyPI (module `gemma4_pt_codex`); its own config translation and weight conversion from the Hugging Face checkpoint",
    },
    Port {
        id: "deepmind-gemma",
        package: Some("gemma"),
        version: "4.0.1",
        runtime: Runtime::OwnVenv {
            minor: 12,
            requirements_file: "requirements-deepmind-gemma.txt",
        },
        precision: None,
        media: Media::Images,
        about: "Google DeepMind's JAX library (`gemma.gm.nn.gemma4`), float32 on the CPU, in its own Python 3.12 virtualenv; the Hugging Face weights mapped into its parameter tree by the documented table of `driver_deepmind_gemma.py`, tensors read with flax `capture_intermediates`, decode rows through its own KV cache; images through its own multimodal path (`Transformer.__call__(images=...)`) on the oracle's preprocessed patches",
    },
    Port {
        id: "llama-cpp",
        package: Some("llama-cpp-python"),
        version: "0.3.36",
        runtime: Runtime::OracleVenv { requirements: &[] },
        precision: Some("llama-cpp-cpu"),
        media: Media::Text,
        about: "llama.cpp as vendored by `llama-cpp-python` 0.3.36 (the source package, sha256-checked, built here as a shared library with `GGML_NATIVE=ON`), the checkpoint converted by its own `convert_hf_to_gguf.py --outtype f32`, run through its C API with `llama_context_default_params()` (its CPU defaults: F16 KV cache, flash attention `auto`); tensors from its graph callback, logits of every position, decode rows by single-token steps through its cache",
    },
    Port {
        id: "llama-cpp-no-flash-attention",
        package: Some("llama-cpp-python"),
        version: "0.3.36",
        runtime: Runtime::OracleVenv { requirements: &[] },
        precision: Some("llama-cpp-cpu-no-flash-attention"),
        media: Media::Text,
        about: "the same llama.cpp with flash attention disabled (`-fa off`), its F16 cache kept: attention as F16 matrix products; a check of the reference's imitation of that path",
    },
    Port {
        id: "llama-cpp-f32",
        package: Some("llama-cpp-python"),
        version: "0.3.36",
        runtime: Runtime::OracleVenv { requirements: &[] },
        precision: None,
        media: Media::Text,
        about: "the same llama.cpp with its precision shortcuts off: F32 K/V cache, flash attention disabled, and a second build with `#define GGML_GELU_FP16` (ggml-cpu/vec.h) removed, so that GELU is computed, not read from the float16 table",
    },
];

/// What a run observed, for matching [`FINDINGS`]. A divergence that neither a fault nor a
/// precision choice names is listed as "not yet located"; once its cause is found in the port,
/// it joins the fault catalogue (docs/faults.md, "Adding a fault") and its finding names that
/// diagnosis, unless the reference cannot imitate it ([`Observed::Unexplained`]).
#[derive(Clone, Copy, Debug)]
pub enum Observed {
    /// `compare` named this fault.
    Diagnosis(&'static str),
    /// The driver reported the case unsupported with a reason containing this text.
    Unsupported(&'static str),
    /// Not conformant at float32, explained by this precision profile (or choice ids).
    PrecisionChoice(&'static str),
    /// Not conformant, no fault or precision choice names it, first divergence at this tensor:
    /// a bug located in the port that the catalogue cannot imitate (its behaviour depends on
    /// the port's own internals).
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
        observed: Observed::Diagnosis("ple_projection_scale_folded_bf16"),
        text: "`gemma4_pt_codex/convert.py`, `_convert_hf_text_entry`: the D^-1/2 of the PLE context projection is folded into the projection's weights in the checkpoint's dtype (`value * value.new_tensor(hidden_size**-0.5)`). On a bf16 checkpoint that rounds every weight a second time (relative error up to 2^-9): `per_layer_inputs` is off by 4e-4 relative and the logits by 9e-4. Found by this table as \"no known fault explains this\"; it joined the catalogue as `ple_projection_scale_folded_bf16` (reference/src/ple.rs), so `compare` now names it in any port that does the same.",
    },
    Finding {
        port: "gemma4-pytorch-codex",
        observed: Observed::Unsupported("NoneType"),
        text: "`gemma4_pt_codex/convert.py`, `_native_text_config_from_hf`: `layer_types: null` (valid in transformers, which then derives the default pattern) is iterated as a list. Only configs with explicit `layer_types` load; the released ones have them.",
    },
    Finding {
        port: "deepmind-gemma",
        observed: Observed::Diagnosis("router_on_normed_input"),
        text: "`gemma/gm/nn/gemma4/_modules.py`, `Block._forward_moe`: the MoE input is `self.pre_ffw_norm(attn_output)`, and `_moe.py`, `MoERagged.__call__`, routes on it (`self.router_norm(x)`) instead of on the residual stream (shared spec: text §9 step 2). A bug: the expert choices and weights differ from the first MoE layer on, and the greedy continuation from its first token. (The same mistake as `gemma4-pt-claude`'s.) Fixed in DeepMind's repository by commit `ab5a660`, \"Avoid double normalisation in MoE router\" (2026-05-21, the day after the 4.0.1 release): the MoE takes `unnormalized_x=attn_output` for its router. Not released: 4.0.1 is still the newest on PyPI.",
    },
    Finding {
        port: "deepmind-gemma",
        observed: Observed::Unsupported("KV-sharing producers"),
        text: "`gemma/gm/nn/gemma4/_config.py`, `create_kv_cache_sharing_patterns`: a KV-shared full layer reads layer `num_unshared − 1` and a shared sliding layer `num_unshared − 2`, the same hard-coded rule as `gemma4-pytorch-codex`'s; harmless on the released layouts, wrong on `e2b_like` and `e4b_like`, whose last unshared layer is sliding (forced past the check, gemma fails in its attention einsum: a sliding layer would read a full layer's K/V of another head dim).",
    },
    Finding {
        port: "deepmind-gemma",
        observed: Observed::Unsupported("clip bounds"),
        text: "`gemma/gm/nn/gemma4/vision/_modules.py`, `Attention.setup` and `FeedForward.setup`: k and v, and gate and up, are one `ClippedEinsum` each (`gemma4/_layers.py`) with one set of clip bounds, where the checkpoint has a pair per projection. The released on-device towers happen to have equal bounds within each pair; the tiny E2B tower's differ (layer 0: k_proj input_min −1.0004, v_proj −1.5551), so the driver cannot load it without changing a bound.",
    },
    Finding {
        port: "deepmind-gemma",
        observed: Observed::Unexplained("vision.layers.0.output"),
        text: DEEPMIND_VISION_BUGS,
    },
    Finding {
        port: "deepmind-gemma",
        observed: Observed::Unexplained("vision.0.layers.0.output"),
        text: DEEPMIND_VISION_BUGS,
    },
    Finding {
        port: "llama-cpp",
        observed: Observed::PrecisionChoice("llama-cpp-cpu"),
        text: "llama.cpp's CPU defaults, each located in the pinned tree and imitated by the reference's `llama-cpp-cpu` profile (reference/src/precision.rs): (1) an F16 KV cache, `src/llama-context.cpp` `llama_context_default_params` (`type_k`/`type_v` = `GGML_TYPE_F16`), rounded on store by `llama_kv_cache::cpy_k`/`cpy_v`; (2) flash attention `auto`, enabled on the CPU by `llama_context::resolve_fused_ops`, whose kernel for fewer than 64 query rows (every golden prompt and every decode step), `ggml-cpu/ops.cpp` `ggml_compute_forward_flash_attn_ext_f16_one_chunk`, converts the query to F16 and accumulates the values in an F16 accumulator rounded after every key (`build_attn_mha` in `src/llama-graph.cpp` also casts an F32 cache to F16 for it); (3) GELU through a float16 table, `ggml-cpu/vec.h` `#define GGML_GELU_FP16` (unconditional), used by `ggml_vec_gelu_f32` and `ggml_vec_geglu_f32` in the dense MLP, the experts and the PLE gate. Not bugs: with the three off (`llama-cpp-f32`) it is conformant at float32, and judged at `--precision llama-cpp-cpu` its default run is conformant.",
    },
    Finding {
        port: "llama-cpp",
        observed: Observed::Unsupported("hard-coded producer rule"),
        text: LLAMA_CPP_PRODUCER_RULE,
    },
    Finding {
        port: "llama-cpp-f32",
        observed: Observed::Unsupported("hard-coded producer rule"),
        text: LLAMA_CPP_PRODUCER_RULE,
    },
    Finding {
        port: "llama-cpp-no-flash-attention",
        observed: Observed::Unsupported("hard-coded producer rule"),
        text: LLAMA_CPP_PRODUCER_RULE,
    },
    Finding {
        port: "llama-cpp-no-flash-attention",
        observed: Observed::PrecisionChoice("llama-cpp-cpu-no-flash-attention"),
        text: "llama.cpp's F16 cache and GELU table as in `llama-cpp`, and, with flash attention off, `build_attn_mha` (`src/llama-graph.cpp`) multiplies the F16 K and V caches with `ggml_mul_mat`, whose CPU kernel (`ggml-cpu/ggml-cpu.c`, `ggml_compute_forward_mul_mat`) converts the F32 operand to the cache's F16 `vec_dot_type`: the queries and the softmax probabilities are rounded to F16. The diagnosis names exactly this profile, not the flash-attention one: an independent check that the reference imitates both attention paths where llama.cpp rounds.",
    },
];

/// The two bugs of DeepMind's vision path (both 31B-family image cases).
const DEEPMIND_VISION_BUGS: &str = "two bugs, each located and checked by switching it off in a diagnostic run (`GEMMA4_DM_VISION_UNPADDED=1` in the driver and a lower-bound-only sliding mask): (1) `gemma/gm/nn/gemma4/vision/_modules.py`, `Attention._qkv`: `attn_logits += attn_mask` adds the boolean padding mask (1 for a real patch, 0 for a padded slot) to the logits, so the padded slots every image carries (`patchify_and_pad` pads each image to 9 × budget) are only down-weighted, not excluded: the first layer's output is off by 0.61 relative, and with the padding removed the whole tower is conformant (soft tokens 1.0e-6). The catalogue cannot imitate it: what a padded slot holds is the port's own. (2) `gemma/gm/nn/gemma4/_modules.py`, `_create_sliding_mask`: the sliding window also bounds keys ahead (k < q + W), so inside a bidirectional image block a token does not see its image's tokens W or more positions ahead; this one joined the catalogue as `sliding_window_two_sided`. With both off, `31b_vision` is conformant (logits 2.5e-5). Harmless on the released 31B (W = 1024) below budget 1120; not fixed in DeepMind's repository as fetched here.";

/// llama.cpp's KV-sharing rule (both llama.cpp rows).
const LLAMA_CPP_PRODUCER_RULE: &str = "`src/llama-model.cpp`, `llama_model::create_memory`: a layer at or after `n_layer_kv_from_start` (set in `src/models/gemma4.cpp`) reads layer `n_layer_kv_from_start − 2` if it is sliding and `− 1` if it is full, the rule of DeepMind's library; harmless on the released E2B/E4B layouts, wrong where the last unshared layer is sliding (`e2b_like`, `e4b_like`), where llama.cpp aborts at a `GGML_ASSERT` of `src/llama-kv-cache.cpp` (the driver checks the rule first and reports the layout unsupported).";

/// Errors of the task.
#[derive(Debug)]
pub enum PortsError {
    Io(IoFailure),
    Command(CommandFailure),
    Golden(String),
    /// `--ports` names a port that is not in the table.
    UnknownPort(String),
    /// A port's runtime needs an interpreter this machine lacks (reported in its rows).
    NoInterpreter(String),
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
            PortsError::NoInterpreter(e) => write!(f, "{e}"),
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
        /// Not conformant at float32, explained by these precision choices (their name).
        precision_choice: Option<String>,
        /// Judged again at the port's own precision ([`Port::precision`]): conformant there?
        at_own_precision: Option<bool>,
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
    // Every golden case; a port that does not take images or audio runs the text-only ones.
    let cases: Vec<GoldenCase> = load_cases(&repo.join("golden")).map_err(PortsError::Golden)?;
    let takes = |port: &Port, case: &GoldenCase| port.media.takes(case);

    // Each case's layer plan, once for every port.
    let plans: Vec<PathBuf> = cases
        .iter()
        .map(|case| write_plan(case, &gemma4, &work))
        .collect::<Result<_, _>>()?;
    let mut rows = Vec::new();
    let mut latest = Vec::new();
    for port in &ports {
        let installed = match install(port, &python, &work) {
            Ok(installed) => Ok(installed),
            // Every case of this port reports why it could not run.
            Err(PortsError::NoInterpreter(why)) => Err(why),
            Err(e) => return Err(e),
        };
        // Asked with the port's own Python where it has one: pip lists the releases that
        // install on it.
        let asking = installed.as_ref().map_or(python.as_path(), |(own, _)| own);
        latest.push((port.id, later_release(port, asking)));
        for (case, plan) in cases.iter().zip(&plans) {
            if !takes(port, case) {
                continue;
            }
            let outcome = match &installed {
                Ok((port_python, site)) => {
                    eprintln!("xtask ports: {} on {}", port.id, case.name);
                    run_case(port, case, plan, port_python, site, &gemma4, &work)?
                }
                Err(why) => Outcome::Failed(why.clone()),
            };
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

/// Installs the port under `work` ([`Runtime`]); returns the Python that runs its driver and
/// the directory to put on PYTHONPATH (nothing installed there for a port without
/// requirements).
fn install(port: &Port, python: &Path, work: &Path) -> Result<(PathBuf, PathBuf), PortsError> {
    let site = work.join(format!("{}-{}", port.id, port.version));
    match &port.runtime {
        Runtime::OracleVenv { requirements } => {
            install_target(requirements, python, &site)?;
            Ok((python.to_path_buf(), site))
        }
        Runtime::OwnVenv {
            minor,
            requirements_file,
        } => {
            let venv = site.join("venv");
            let own = venv.join("bin/python");
            if !site.join(".installed").exists() {
                let interpreter = find_python(*minor).ok_or_else(|| {
                    PortsError::NoInterpreter(format!(
                        "needs CPython 3.{minor}: none found (python3.{minor} on PATH, ~/.pyenv/versions/3.{minor}.*, or $GEMMA4_PYTHON_3_{minor})"
                    ))
                })?;
                if venv.exists() {
                    fs::remove_dir_all(&venv)
                        .map_err(io_err(format!("emptying {}", venv.display())))?;
                }
                crate::process::run(Command::new(&interpreter).args(["-m", "venv"]).arg(&venv))?;
                let requirements = repo_root()
                    .join("xtask/scripts/ports")
                    .join(requirements_file);
                crate::process::run(pip_install_pinned(&own).arg("-r").arg(&requirements))?;
                fs::write(site.join(".installed"), b"")
                    .map_err(io_err(format!("marking {}", site.display())))?;
            }
            Ok((own, site))
        }
    }
}

/// A CPython 3.`minor` interpreter: `$GEMMA4_PYTHON_3_<minor>`, else `python3.<minor>` on PATH,
/// else the newest `~/.pyenv/versions/3.<minor>.*/bin/python3`; each checked by running it.
fn find_python(minor: u32) -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(path) = std::env::var_os(format!("GEMMA4_PYTHON_3_{minor}")) {
        candidates.push(PathBuf::from(path));
    }
    candidates.push(PathBuf::from(format!("python3.{minor}")));
    if let Some(home) = std::env::var_os("HOME") {
        let versions = PathBuf::from(home).join(".pyenv/versions");
        if let Ok(entries) = fs::read_dir(&versions) {
            let mut found: Vec<PathBuf> = entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&format!("3.{minor}.")))
                })
                .map(|p| p.join("bin/python3"))
                .collect();
            found.sort();
            candidates.extend(found.into_iter().rev());
        }
    }
    candidates.into_iter().find(|candidate| {
        Command::new(candidate)
            .args([
                "-c",
                &format!("import sys; sys.exit(sys.version_info[:2] != (3, {minor}))"),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    })
}

/// `python -m pip install --quiet --no-deps --require-hashes`: every requirement pinned with its
/// sha256, nothing resolved beyond them.
fn pip_install_pinned(python: &Path) -> Command {
    let mut command = Command::new(python);
    command.args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-deps",
        "--require-hashes",
    ]);
    command
}

/// `pip install --no-deps --require-hashes --target site` of pinned requirements, once.
fn install_target(requirements: &[&str], python: &Path, site: &Path) -> Result<(), PortsError> {
    if requirements.is_empty() || site.join(".installed").exists() {
        return Ok(());
    }
    if site.exists() {
        fs::remove_dir_all(site).map_err(io_err(format!("emptying {}", site.display())))?;
    }
    fs::create_dir_all(site).map_err(io_err(format!("creating {}", site.display())))?;
    let listing = site.join("requirements.txt");
    fs::write(&listing, requirements.join("\n") + "\n")
        .map_err(io_err(format!("writing {}", listing.display())))?;
    crate::process::run(
        pip_install_pinned(python)
            .arg("--target")
            .arg(site)
            .arg("-r")
            .arg(&listing),
    )?;
    fs::write(site.join(".installed"), b"")
        .map_err(io_err(format!("marking {}", site.display())))?;
    Ok(())
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
        Some(v) if is_newer(&v, port.version) => {
            format!("a later release exists on PyPI: {v} (not judged here)")
        }
        Some(_) => "no later release on PyPI".to_string(),
        None => "PyPI not reachable".to_string(),
    }
}

/// Is release `candidate` newer than `pinned`? Dotted numbers compared part by part (a part
/// that is not a number, as in `1.0rc1`, counts as newer when it differs: reported, not
/// hidden).
fn is_newer(candidate: &str, pinned: &str) -> bool {
    let parts = |v: &str| -> Option<Vec<u64>> { v.split('.').map(|p| p.parse().ok()).collect() };
    match (parts(candidate), parts(pinned)) {
        (Some(c), Some(p)) => c > p,
        _ => candidate != pinned,
    }
}

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

/// The driver on one case, then `compare` on its dump: at float32, and again at the port's own
/// precision if it has one.
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
    let judge = |precision: &str| -> Result<Value, PortsError> {
        let mut command = Command::new(gemma4);
        command
            .args(["compare", "--json", "--precision", precision, "--model"])
            .arg(&model)
            .args(["--tokens", &tokens.join(",")]);
        // The oracle's preprocessed pixels and log-mel features: the port is judged on its
        // towers, the merge and the text model, not on its image resizing or front end.
        if let Some(pixels) = &case.pixel_values {
            command.arg("--pixel-values").arg(pixels);
        }
        if let Some(features) = &case.audio_features {
            command.arg("--audio-features").arg(features);
        }
        let compared = command
            .arg("--candidate")
            .arg(&dump)
            .output()
            .map_err(|e| CommandFailure::could_not_start("gemma4 compare", e))?;
        serde_json::from_slice(&compared.stdout).map_err(|e| PortsError::CompareOutput {
            case: case.name.clone(),
            port: port.id.to_string(),
            detail: format!("{e}; stderr: {}", String::from_utf8_lossy(&compared.stderr)),
        })
    };
    let report = judge("float32")?;
    let at_own_precision = match port.precision {
        Some(precision) => Some(judge(precision)?["conformant"].as_bool().unwrap_or(false)),
        None => None,
    };
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
        precision_choice: report["precision_choice"]["name"]
            .as_str()
            .map(str::to_string),
        at_own_precision,
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
                precision_choice: Some(name),
                ..
            },
            Observed::PrecisionChoice(profile),
        ) => name == profile,
        (
            Outcome::Judged {
                conformant: false,
                diagnosis: None,
                precision_choice: None,
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

/// The table's cells of an outcome: verdict, first divergence, diagnosis, logits error, and the
/// verdict at the port's own precision.
fn verdict(outcome: &Outcome) -> [String; 5] {
    match outcome {
        Outcome::Judged {
            conformant,
            first_divergence,
            diagnosis,
            logits_max_rel,
            compared,
            precision_choice,
            at_own_precision,
        } => [
            if *conformant {
                format!("**conformant** ({compared} tensors)")
            } else {
                format!("**NOT conformant** ({compared} tensors)")
            },
            first_divergence
                .clone()
                .map_or("—".into(), |t| format!("`{t}`")),
            match (conformant, diagnosis, precision_choice) {
                (true, _, _) => "—".into(),
                (false, Some(d), _) => format!("`{d}`"),
                (false, None, Some(p)) => format!("precision choice `{p}`, not a bug"),
                (false, None, None) => "no known fault explains this".into(),
            },
            logits_max_rel.map_or("—".into(), |e| format!("{e:.1e}")),
            match at_own_precision {
                Some(true) => "**conformant**".into(),
                Some(false) => "**NOT conformant**".into(),
                None => "—".into(),
            },
        ],
        Outcome::Unsupported(reason) => [
            "cannot run this case".into(),
            "—".into(),
            table_cell(reason),
            "—".into(),
            "—".into(),
        ],
        Outcome::Failed(detail) => [
            "driver failed".into(),
            "—".into(),
            table_cell(detail),
            "—".into(),
            "—".into(),
        ],
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
        "Each port below ran on the golden models (tiny Hugging Face-made checkpoints of all four \
         families, every parameter random; [the golden cases](conformance.md)): the text-only ones, \
         and the image and audio ones for a port that takes them (judged on the oracle's \
         preprocessed pixels and log-mel features, `--pixel-values` / `--audio-features`), with the \
         case's prompt, recording the tensors it exposes without changing its code (forward hooks, \
         flax intermediates, llama.cpp's graph callback), the logits of every prompt position and \
         the greedy decode rows through its own KV cache. \
         `gemma4 compare --model <checkpoint> --tokens <ids> --candidate <dump>` judged each dump \
         with the float32 tolerances of [the conformance guide](conformance.md), and a port that \
         rounds on purpose again with `--precision <its profile>` \
         ([precision choices](conformance.md#precision-choices)). The drivers are \
         `xtask/scripts/ports/driver_<port>.py`; each port is a pinned release (PyPI, sha256-checked) \
         installed or built outside the repository. Rerun: `cargo xtask ports` (it needs the package \
         registry, the oracle virtualenv of `cargo xtask golden`, a CPython 3.12 for DeepMind's \
         library, and about ten minutes the first time to build llama.cpp twice).\n\n",
    );
    out.push_str(
        "## The ports\n\n| port | version | what it is | its precision | later releases |\n|---|---|---|---|---|\n",
    );
    for port in ports {
        let later = latest
            .iter()
            .find(|(id, _)| *id == port.id)
            .map_or("", |(_, text)| text.as_str());
        let _ = writeln!(
            out,
            "| `{}` | {} | {} | {} | {later} |",
            port.id,
            port.version,
            port.about,
            port.precision
                .map_or_else(|| "float32".to_string(), |p| format!("`{p}`"))
        );
    }
    out.push_str(
        "\n## The table\n\nVerdict: `compare`'s, over the tensors the port's dump holds. First \
         divergence: the first tensor in model order outside its tolerance. Diagnosis: the \
         catalogue fault that reproduces the port's dump (see [the fault catalogue](faults.md)), \
         the precision choices that do (a port right at a runtime's precision: [precision \
         choices](conformance.md#precision-choices)), or why the port could not run the case. \
         Logits error: the largest relative error of the prompt's logits (to the largest logit). \
         At its precision: the verdict of `compare --precision <the port's profile>`, for a port \
         that rounds on purpose.\n\n\
         | port | case | family | verdict (float32) | first divergence | diagnosis | logits error | at its precision |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for row in rows {
        let [verdict, first, diagnosis, logits, own] = verdict(&row.outcome);
        let _ = writeln!(
            out,
            "| `{}` | `{}` | {} | {verdict} | {first} | {diagnosis} | {logits} | {own} |",
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
            let [_, first, diagnosis, _, _] = verdict(&row.outcome);
            let _ = writeln!(
                out,
                "- `{}` (`{}`): not yet located in the port's source — first divergence {first}, {diagnosis}.",
                port.id, row.case
            );
        }
    }
    out.push_str(
        "\nNot yet in the table: the image and audio cases for the ports other than the control \
         (their drivers run the text-only golden models).\n",
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
            precision_choice: None,
            at_own_precision: None,
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
            let requirements: Vec<String> = match &port.runtime {
                Runtime::OracleVenv { requirements } => {
                    requirements.iter().map(|r| r.to_string()).collect()
                }
                Runtime::OwnVenv {
                    requirements_file, ..
                } => {
                    let path = repo_root()
                        .join("xtask/scripts/ports")
                        .join(requirements_file);
                    fs::read_to_string(&path)
                        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
                        .lines()
                        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
                        .map(str::to_string)
                        .collect()
                }
            };
            for requirement in requirements {
                assert!(
                    requirement.contains("==") && requirement.contains("--hash=sha256:"),
                    "{}: unpinned requirement {requirement}",
                    port.id
                );
            }
            if let Some(precision) = port.precision {
                assert!(
                    precision
                        .parse::<gemma4_reference::precision::PrecisionSet>()
                        .is_ok(),
                    "{}: unknown precision {precision}",
                    port.id
                );
            }
        }
    }

    #[test]
    fn only_a_newer_release_is_reported_as_later() {
        assert!(is_newer("4.0.2", "4.0.1"));
        assert!(is_newer("4.1", "4.0.1"));
        assert!(!is_newer("3.3.0", "4.0.1"));
        assert!(!is_newer("0.3.36", "0.3.36"));
        assert!(is_newer("0.4.0rc1", "0.3.36"));
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
        assert!(report.contains("| `gemma4-pt-claude` | `e2b_like` | e2b | **NOT conformant** (10 tensors) | `logits` | no known fault explains this | 1.0e-6 | — |"), "{report}");
    }

    #[test]
    fn a_precision_choice_is_shown_as_not_a_bug() {
        let llama = PORTS.iter().find(|p| p.id == "llama-cpp").unwrap();
        let mut outcome = judged(false, Some("layers.0.attn.output"), None);
        if let Outcome::Judged {
            precision_choice,
            at_own_precision,
            ..
        } = &mut outcome
        {
            *precision_choice = Some("llama-cpp-cpu".to_string());
            *at_own_precision = Some(true);
        }
        let rows = vec![
            row(llama, "31b_like", outcome),
            row(
                llama,
                "e2b_like",
                Outcome::Unsupported("unsupported layout: hard-coded producer rule (...)".into()),
            ),
        ];
        let findings = match_findings(&rows, &[llama]).unwrap();
        assert_eq!(findings.len(), 2);
        let report = render(&rows, &[llama], &[], &findings);
        assert!(
            report.contains("| `llama-cpp` | `31b_like` | e2b | **NOT conformant** (10 tensors) | `layers.0.attn.output` | precision choice `llama-cpp-cpu`, not a bug | 1.0e-6 | **conformant** |"),
            "{report}"
        );
        assert!(report.contains("GGML_GELU_FP16"), "{report}");
        // The same divergence without the precision's name is not that finding.
        let rows = vec![row(
            llama,
            "31b_like",
            judged(false, Some("layers.0.attn.output"), None),
        )];
        assert!(matches!(
            match_findings(&rows, &[llama]),
            Err(PortsError::StaleFinding { .. })
        ));
    }
}
