//! `cargo xtask fuzz [--seconds N] [--target NAME]... [--parallel J] [--seeds]`: coverage-guided
//! fuzzing of every parser of user files (docs/robustness.md).
//!
//! 1. Makes sure `cargo fuzz` is installed (`cargo install cargo-fuzz --locked` from crates.io
//!    when it is missing).
//! 2. Builds the targets of `fuzz/` on the machine's stable toolchain: `cargo fuzz` needs
//!    nightly-only compiler flags (sanitizer coverage, AddressSanitizer), which stable rustc
//!    accepts when `RUSTC_BOOTSTRAP=1` is set.
//! 3. Runs each target for N seconds over its committed seeds (`fuzz/seeds/<target>/`, read only)
//!    and its working corpus (`fuzz/corpus/<target>/`, not committed), with the shared
//!    dictionary `fuzz/dict/gemma4.dict`; logs go to `fuzz/target/logs/<target>.log`.
//! 4. Prints executions and findings per target; a crash, leak, timeout or out-of-memory input
//!    is saved by libFuzzer under `fuzz/artifacts/<target>/` and makes the task fail. Turn each
//!    one into a regression test: copy it to `tests/data/fuzz_regressions/<target>/` (replayed
//!    by `tests/fuzz_regressions.rs`) and fix the bug.
//!
//! With `--seeds`, regenerates `fuzz/seeds/` deterministically from `golden/` instead: configs,
//! the shard index, small slices of golden weight files and dumps, and tiny whole checkpoints
//! (golden configs shrunk to a handful of weights) for the forward-pass target.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use gemma4_reference::checkpoint::{full_name, text_tensor_specs};
use gemma4_reference::{ModelConfig, ModelPlan};
use serde_json::{json, Map, Value};

use crate::process::{io_err, read, repo_root, CommandFailure, IoFailure};

/// Every fuzz target (a `[[bin]]` of `fuzz/Cargo.toml` and a function of `fuzz/harness.rs`).
pub const TARGETS: &[&str] = &[
    "safetensors_file",
    "config_json",
    "shard_index",
    "activation_dump",
    "checkpoint_forward",
    "forward_generated",
];

/// Arguments of `cargo xtask fuzz`.
#[derive(Debug, clap::Args)]
pub struct FuzzArgs {
    /// Seconds to fuzz each target.
    #[arg(long, default_value_t = 60)]
    seconds: u64,

    /// Only these targets (repeatable; default: all).
    #[arg(long = "target", value_name = "NAME")]
    targets: Vec<String>,

    /// Targets run at the same time (each uses one core).
    #[arg(long, default_value_t = 1)]
    parallel: usize,

    /// Regenerate the committed seed corpus `fuzz/seeds/` from `golden/`, and fuzz nothing.
    #[arg(long)]
    seeds: bool,
}

/// What can go wrong in `cargo xtask fuzz`.
#[derive(Debug)]
pub enum FuzzError {
    /// A file-system operation failed.
    Io(IoFailure),
    /// A program could not be started or exited unsuccessfully.
    Command(CommandFailure),
    /// An unknown target was asked for.
    UnknownTarget(String),
    /// A golden file could not be turned into seeds.
    Seed { file: PathBuf, message: String },
    /// Fuzzing found inputs that crash, hang or exhaust memory.
    Findings { targets: Vec<String> },
}

impl fmt::Display for FuzzError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(failure) => failure.fmt(f),
            Self::Command(failure) => failure.fmt(f),
            Self::UnknownTarget(name) => {
                write!(f, "no fuzz target `{name}` (known: {})", TARGETS.join(", "))
            }
            Self::Seed { file, message } => write!(f, "{}: {message}", file.display()),
            Self::Findings { targets } => write!(
                f,
                "fuzzing found crashing inputs in {} (see fuzz/artifacts/)",
                targets.join(", ")
            ),
        }
    }
}

impl std::error::Error for FuzzError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io(failure) => Some(&failure.source),
            _ => None,
        }
    }
}

impl From<IoFailure> for FuzzError {
    fn from(failure: IoFailure) -> Self {
        Self::Io(failure)
    }
}

impl From<CommandFailure> for FuzzError {
    fn from(failure: CommandFailure) -> Self {
        Self::Command(failure)
    }
}

type Result<T> = std::result::Result<T, FuzzError>;

/// Entry point of `cargo xtask fuzz`.
pub fn run(args: &FuzzArgs) -> Result<()> {
    let repo = repo_root();
    if args.seeds {
        return write_seeds(&repo);
    }
    let targets: Vec<&str> = if args.targets.is_empty() {
        TARGETS.to_vec()
    } else {
        args.targets
            .iter()
            .map(|t| {
                TARGETS
                    .iter()
                    .copied()
                    .find(|known| known == t)
                    .ok_or_else(|| FuzzError::UnknownTarget(t.clone()))
            })
            .collect::<Result<_>>()?
    };
    ensure_cargo_fuzz()?;
    eprintln!("xtask: building the fuzz targets (stable toolchain, RUSTC_BOOTSTRAP=1)");
    crate::process::run(cargo_fuzz(&repo).arg("build"))?;

    let logs = repo.join("fuzz/target/logs");
    fs::create_dir_all(&logs).map_err(io_err(format!("creating {}", logs.display())))?;
    let mut outcomes = Vec::new();
    for chunk in targets.chunks(args.parallel.max(1)) {
        let running = chunk
            .iter()
            .map(|target| start_target(&repo, target, args.seconds, &logs))
            .collect::<Result<Vec<_>>>()?;
        for (target, mut child, log) in running {
            let status = child
                .wait()
                .map_err(io_err(format!("waiting for the {target} fuzzer")))?;
            let text = fs::read_to_string(&log).unwrap_or_default();
            outcomes.push(Outcome::read(target, status.success(), &text, &log));
        }
    }

    eprintln!(
        "\n{:<20} {:>14} {:>10} {:>9}  findings",
        "target", "executions", "exec/s", "coverage"
    );
    for outcome in &outcomes {
        eprintln!(
            "{:<20} {:>14} {:>10} {:>9}  {}",
            outcome.target,
            outcome.executions,
            outcome.executions_per_second,
            outcome.coverage,
            outcome.findings
        );
    }
    let failed: Vec<String> = outcomes
        .iter()
        .filter(|o| !o.clean)
        .map(|o| o.target.to_string())
        .collect();
    if failed.is_empty() {
        eprintln!("\nxtask: no findings");
        Ok(())
    } else {
        Err(FuzzError::Findings { targets: failed })
    }
}

/// `cargo fuzz` with the flags every invocation needs.
fn cargo_fuzz(repo: &Path) -> Command {
    let mut command = Command::new("cargo");
    command
        .current_dir(repo)
        .env("RUSTC_BOOTSTRAP", "1")
        .args(["fuzz"]);
    command
}

/// Installs cargo-fuzz from crates.io when `cargo fuzz` is not available.
fn ensure_cargo_fuzz() -> Result<()> {
    let installed = Command::new("cargo")
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !installed {
        eprintln!("xtask: installing cargo-fuzz (cargo install cargo-fuzz --locked)");
        crate::process::run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    Ok(())
}

/// Starts one target in the background, its output going to `logs/<target>.log`.
fn start_target(
    repo: &Path,
    target: &'static str,
    seconds: u64,
    logs: &Path,
) -> Result<(&'static str, std::process::Child, PathBuf)> {
    let corpus = repo.join("fuzz/corpus").join(target);
    let seeds = repo.join("fuzz/seeds").join(target);
    fs::create_dir_all(&corpus).map_err(io_err(format!("creating {}", corpus.display())))?;
    let log = logs.join(format!("{target}.log"));
    let log_file = fs::File::create(&log).map_err(io_err(format!("creating {}", log.display())))?;
    let log_err = log_file
        .try_clone()
        .map_err(io_err(format!("opening {}", log.display())))?;
    eprintln!(
        "xtask: fuzzing {target} for {seconds} s (log: {})",
        log.display()
    );
    let child = cargo_fuzz(repo)
        .arg("run")
        .arg(target)
        .arg(&corpus)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!(
            "-dict={}",
            repo.join("fuzz/dict/gemma4.dict").display()
        ))
        .arg("-timeout=10")
        .arg("-rss_limit_mb=4096")
        .arg("-print_final_stats=1")
        .stdout(log_file)
        .stderr(log_err)
        .spawn()
        .map_err(|e| CommandFailure::could_not_start(format!("cargo fuzz run {target}"), e))?;
    Ok((target, child, log))
}

/// What one target's run found, read from libFuzzer's output.
struct Outcome {
    target: &'static str,
    clean: bool,
    executions: String,
    executions_per_second: String,
    coverage: String,
    findings: String,
}

impl Outcome {
    fn read(target: &'static str, success: bool, log: &str, log_path: &Path) -> Outcome {
        let stat = |name: &str| {
            log.lines()
                .rev()
                .find_map(|l| l.strip_prefix(name))
                .map_or("?".to_string(), |v| v.trim().to_string())
        };
        let coverage = log
            .lines()
            .rev()
            .find_map(|l| l.split_once(" cov: ").map(|(_, rest)| rest))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or("?")
            .to_string();
        let artifacts: Vec<&str> = log
            .lines()
            .filter_map(|l| l.split_once("Test unit written to ").map(|(_, p)| p.trim()))
            .collect();
        let findings = if success && artifacts.is_empty() {
            "none".to_string()
        } else if artifacts.is_empty() {
            format!("the fuzzer failed; see {}", log_path.display())
        } else {
            artifacts.join(", ")
        };
        Outcome {
            target,
            clean: success && artifacts.is_empty(),
            executions: stat("stat::number_of_executed_units:"),
            executions_per_second: stat("stat::average_exec_per_sec:"),
            coverage,
            findings,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The seed corpus, derived from golden/
// ---------------------------------------------------------------------------------------------

/// Largest golden tensor copied whole into a seed, in bytes; larger ones are cut to fewer rows.
const SEED_TENSOR_BYTES: usize = 1024;

/// Regenerates `fuzz/seeds/<target>/` from `golden/` (deterministic; every seed under 16 KB).
fn write_seeds(repo: &Path) -> Result<()> {
    let golden = repo.join("golden");
    let seeds = repo.join("fuzz/seeds");
    if seeds.exists() {
        fs::remove_dir_all(&seeds).map_err(io_err(format!("removing {}", seeds.display())))?;
    }
    let cases = [
        "e2b_like",
        "e2b_bf16",
        "e4b_like",
        "31b_like",
        "26b_a4b_like",
    ];
    let mut written = 0;
    let mut put = |target: &str, name: &str, bytes: &[u8]| -> Result<()> {
        let dir = seeds.join(target);
        fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        let path = dir.join(name);
        fs::write(&path, bytes).map_err(io_err(format!("writing {}", path.display())))?;
        written += 1;
        Ok(())
    };

    for case in cases {
        let model = golden.join(case).join("model");
        let config_path = model.join("config.json");
        let config = read(&config_path)?;
        put("config_json", &format!("{case}.json"), &config)?;

        // The smallest tensors of the weight file and of the expected dump.
        let weights = if model.join("model.safetensors").exists() {
            model.join("model.safetensors")
        } else {
            model.join("model-00001-of-00003.safetensors")
        };
        let (header, data) = split_safetensors(&weights)?;
        put(
            "safetensors_file",
            &format!("{case}.safetensors"),
            &subset(&header, &data, |_| true),
        )?;
        let (header, data) = split_safetensors(&golden.join(case).join("expected.safetensors"))?;
        put(
            "activation_dump",
            &format!("{case}.safetensors"),
            &subset(&header, &data, |_| true),
        )?;
        put(
            "activation_dump",
            &format!("{case}-layer0.safetensors"),
            &subset(&header, &data, |name| name.starts_with("layers.0.")),
        )?;

        // A tiny whole checkpoint with this case's architecture.
        let (tiny_config, weights) = tiny_checkpoint(&config_path, &config, case)?;
        let mut input = (tiny_config.len() as u32).to_le_bytes().to_vec();
        input.extend_from_slice(&tiny_config);
        input.extend_from_slice(&weights);
        put("checkpoint_forward", &format!("{case}-tiny.bin"), &input)?;
    }
    for released in ["e2b", "e4b", "31b", "26b-a4b"] {
        let config = read(
            &repo
                .join("tests/data/released")
                .join(released)
                .join("config.json"),
        )?;
        put("config_json", &format!("released-{released}.json"), &config)?;
    }
    let index = read(&golden.join("26b_a4b_like/model/model.safetensors.index.json"))?;
    put("shard_index", "26b_a4b_like.json", &index)?;
    put(
        "shard_index",
        "two-shards.json",
        br#"{"metadata": {"total_size": 12}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors", "model.norm.weight": "model-00001-of-00002.safetensors", "model.layers.0.input_layernorm.weight": "model-00002-of-00002.safetensors"}}"#,
    )?;
    // Generated checkpoints: the bytes choose the geometry and the weights.
    for (name, seed) in [
        ("zeros.bin", vec![0u8; 64]),
        ("ones.bin", vec![1u8; 256]),
        ("counting.bin", (0..=255u8).collect::<Vec<_>>()),
        (
            "counting-down.bin",
            (0..=255u8).rev().cycle().take(2048).collect(),
        ),
    ] {
        put("forward_generated", name, &seed)?;
    }
    eprintln!("xtask: wrote {written} seeds under {}", seeds.display());
    Ok(())
}

/// A safetensors file's header (as JSON) and data section.
fn split_safetensors(path: &Path) -> Result<(Map<String, Value>, Vec<u8>)> {
    let bytes = read(path)?;
    let seed_error = |message: &str| FuzzError::Seed {
        file: path.to_path_buf(),
        message: message.to_string(),
    };
    let length = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
        .ok_or_else(|| seed_error("shorter than 8 bytes"))?;
    let header = bytes
        .get(8..8 + length)
        .and_then(|h| serde_json::from_slice::<Value>(h).ok())
        .and_then(|v| v.as_object().cloned())
        .ok_or_else(|| seed_error("header is not a JSON object"))?;
    Ok((header, bytes[8 + length..].to_vec()))
}

/// A new safetensors file with (at most 12 of) the tensors of `header` that `keep` selects, in
/// name order, with the golden metadata; a tensor larger than [`SEED_TENSOR_BYTES`] is cut to
/// its first rows (at least one).
fn subset(header: &Map<String, Value>, data: &[u8], keep: impl Fn(&str) -> bool) -> Vec<u8> {
    let mut tensors = Vec::new();
    for (name, info) in header {
        if name == "__metadata__" || !keep(name) || tensors.len() == 12 {
            continue;
        }
        let offsets = &info["data_offsets"];
        let (start, end) = (
            offsets[0].as_u64().unwrap_or(0) as usize,
            offsets[1].as_u64().unwrap_or(0) as usize,
        );
        let mut shape: Vec<u64> = info["shape"]
            .as_array()
            .map(|dims| dims.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default();
        let mut length = end - start;
        if let Some(rows) = shape.first_mut().filter(|rows| **rows > 1) {
            let row_bytes = length / *rows as usize;
            let kept = (SEED_TENSOR_BYTES / row_bytes.max(1)).clamp(1, *rows as usize);
            *rows = kept as u64;
            length = kept * row_bytes;
        }
        tensors.push((
            name.clone(),
            info["dtype"].clone(),
            json!(shape),
            data[start..start + length].to_vec(),
        ));
    }
    let metadata = header.get("__metadata__").cloned();
    safetensors_bytes(metadata, tensors)
}

/// Serialises tensors `(name, dtype, shape, bytes)` as a safetensors file.
fn safetensors_bytes(
    metadata: Option<Value>,
    tensors: Vec<(String, Value, Value, Vec<u8>)>,
) -> Vec<u8> {
    let mut header = Map::new();
    if let Some(metadata) = metadata {
        header.insert("__metadata__".into(), metadata);
    }
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        header.insert(
            name,
            json!({"dtype": dtype, "shape": shape, "data_offsets": [data.len(), data.len() + bytes.len()]}),
        );
        data.extend_from_slice(&bytes);
    }
    let mut json = serde_json::to_vec(&Value::Object(header)).expect("serialisable");
    json.resize(json.len().div_ceil(8) * 8, b' ');
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&json);
    bytes.extend_from_slice(&data);
    bytes
}

/// Shrinks a golden config to a few hundred weights (keeping its layout, spelling, PLE, KV
/// sharing, K=V and MoE settings) and makes deterministic pseudo-random weights for it, stored
/// as F32, BF16 or F16 depending on the case. `config_bytes` is the golden config (read from
/// `config_path`, which labels errors). Returns `(config.json, model.safetensors)`.
fn tiny_checkpoint(
    config_path: &Path,
    config_bytes: &[u8],
    case: &str,
) -> Result<(Vec<u8>, Vec<u8>)> {
    let seed_error = |message: String| FuzzError::Seed {
        file: config_path.to_path_buf(),
        message,
    };
    let mut config: Value =
        serde_json::from_slice(config_bytes).map_err(|e| seed_error(format!("not JSON: {e}")))?;
    let nested = config.get("text_config").is_some_and(Value::is_object);
    let text = if nested {
        &mut config["text_config"]
    } else {
        &mut config
    };
    let text = text
        .as_object_mut()
        .ok_or_else(|| seed_error("not an object".into()))?;
    let shared = text
        .get("num_kv_shared_layers")
        .and_then(Value::as_u64)
        .is_some_and(|n| n > 0);
    let layers = if shared { 4 } else { 2 };
    let layer_types: Vec<&str> = (0..layers)
        .map(|i| {
            if i % 2 == 0 {
                "sliding_attention"
            } else {
                "full_attention"
            }
        })
        .collect();
    for (key, value) in [
        ("vocab_size", json!(8)),
        ("hidden_size", json!(8)),
        ("intermediate_size", json!(4)),
        ("num_hidden_layers", json!(layers)),
        ("num_attention_heads", json!(2)),
        ("num_key_value_heads", json!(1)),
        ("head_dim", json!(4)),
        ("layer_types", json!(layer_types)),
        ("sliding_window", json!(2)),
        ("num_kv_shared_layers", json!(if shared { 2 } else { 0 })),
        ("pad_token_id", json!(0)),
    ] {
        text.insert(key.to_string(), value);
    }
    if text.contains_key("global_head_dim") {
        text.insert("global_head_dim".into(), json!(8));
    }
    if text.contains_key("per_layer_config") {
        // Every full layer gets the wider head (a KV-shared layer must match its producer).
        let overrides: Map<String, Value> = (0..layers)
            .filter(|i| i % 2 == 1)
            .map(|i| {
                let key = if case == "e4b_like" {
                    format!("{i:02}")
                } else {
                    i.to_string()
                };
                (key, json!({"head_dim": 8}))
            })
            .collect();
        text.insert("per_layer_config".into(), Value::Object(overrides));
    }
    if text
        .get("hidden_size_per_layer_input")
        .and_then(Value::as_u64)
        .unwrap_or(0)
        > 0
    {
        text.insert("hidden_size_per_layer_input".into(), json!(2));
        text.insert("vocab_size_per_layer_input".into(), json!(8));
    }
    if text.get("enable_moe_block").and_then(Value::as_bool) == Some(true) {
        text.insert("num_experts".into(), json!(4));
        text.insert("top_k_experts".into(), json!(2));
        text.insert("moe_intermediate_size".into(), json!(2));
    }
    let config_bytes = serde_json::to_vec_pretty(&config).expect("serialisable");

    let parsed = ModelConfig::from_json(&config, config_path)
        .map_err(|e| seed_error(format!("the shrunk config is invalid: {e}")))?;
    let plan = ModelPlan::from_config(&parsed.text);
    let prefix = parsed.layout.text_prefix();
    let dtype = match case {
        "e2b_bf16" | "26b_a4b_like" => "BF16",
        "e4b_like" => "F16",
        _ => "F32",
    };
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut tensors = Vec::new();
    for spec in text_tensor_specs(&parsed.text, &plan) {
        let elements: usize = spec.shape.iter().product();
        let is_norm = spec.name.ends_with("norm.weight")
            || spec.name.ends_with("layer_scalar")
            || spec.name.ends_with("scale");
        let mut bytes = Vec::new();
        for _ in 0..elements {
            // xorshift64*: uniform in [-1, 1); norms and scales around 1.
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let unit =
                (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32 / (1u64 << 24) as f32;
            let value = if is_norm {
                0.5 + unit
            } else {
                2.0 * unit - 1.0
            };
            match dtype {
                "BF16" => bytes.extend_from_slice(&((value.to_bits() >> 16) as u16).to_le_bytes()),
                "F16" => bytes.extend_from_slice(&f32_to_f16_bits(value).to_le_bytes()),
                _ => bytes.extend_from_slice(&value.to_le_bytes()),
            }
        }
        tensors.push((
            full_name(prefix, &spec.name),
            json!(dtype),
            json!(spec.shape),
            bytes,
        ));
    }
    Ok((config_bytes, safetensors_bytes(None, tensors)))
}

/// IEEE half-precision bits of a value in [-2, 2] (round toward zero; enough for seeds).
fn f32_to_f16_bits(value: f32) -> u16 {
    let bits = value.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exponent = ((bits >> 23) & 0xff) as i32 - 127 + 15;
    if exponent <= 0 {
        return sign;
    }
    sign | ((exponent as u16) << 10) | ((bits >> 13) & 0x3ff) as u16
}
