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
//! (golden configs shrunk to a handful of weights) for the forward-pass target; for the image and
//! WAV decoders, the small golden PNGs and WAVs (cut short) and tiny files of every encoding,
//! written byte by byte here (PNG, GIF, WAV) or embedded (JPEG, WebP).

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
    "image_decode",
    "wav_decode",
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

/// The memory the code under test may allocate while fuzzed (`GEMMA4_MEMORY_LIMIT`, 1 GiB): a
/// quarter of libFuzzer's malloc limit (`-rss_limit_mb=4096`), so that an input declaring more
/// than the limit takes the code's own "needs more memory than available" error path, which the
/// harness checks, instead of an allocation libFuzzer reports (the image decoders allocate the
/// declared pixel buffer before reading the pixels; a 60-byte PNG can declare gigabytes).
const FUZZ_MEMORY_LIMIT: u64 = 1 << 30;

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
        .env("GEMMA4_MEMORY_LIMIT", FUZZ_MEMORY_LIMIT.to_string())
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
    for (name, bytes) in image_seeds(&golden)? {
        put("image_decode", &name, &bytes)?;
    }
    for (name, bytes) in wav_seeds(&golden)? {
        put("wav_decode", &name, &bytes)?;
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

// ---------------------------------------------------------------------------------------------
// Image seeds: golden PNGs, and tiny PNG / GIF / JPEG / WebP files of every pixel layout
// ---------------------------------------------------------------------------------------------

/// Largest golden image or WAV taken whole as a seed, in bytes.
const SEED_FILE_BYTES: usize = 16 * 1024;

/// The golden files under `golden/*/<folder>/` ending in `.<extension>`, sorted and without
/// duplicates (several cases share a file), as `(file name, bytes)`.
fn golden_files(golden: &Path, folder: &str, extension: &str) -> Result<Vec<(String, Vec<u8>)>> {
    let mut paths = Vec::new();
    for case in fs::read_dir(golden).map_err(io_err(format!("listing {}", golden.display())))? {
        let dir = case
            .map_err(io_err(format!("listing {}", golden.display())))?
            .path()
            .join(folder);
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry
                .map_err(io_err(format!("listing {}", dir.display())))?
                .path();
            if path.extension().is_some_and(|e| e == extension) {
                paths.push(path);
            }
        }
    }
    paths.sort_by_key(|p| p.file_name().map(|n| n.to_os_string()));
    paths.dedup_by_key(|p| p.file_name().map(|n| n.to_os_string()));
    paths
        .into_iter()
        .map(|path| {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            Ok((name, read(&path)?))
        })
        .collect()
}

/// CRC-32 (ISO-HDLC, as PNG chunks use), bit by bit.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A zlib stream of stored (uncompressed) deflate blocks.
fn zlib_stored(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x78, 0x01];
    let mut blocks = data.chunks(65_535).peekable();
    if blocks.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(block) = blocks.next() {
        out.push(u8::from(blocks.peek().is_none()));
        let length = block.len() as u16;
        out.extend_from_slice(&length.to_le_bytes());
        out.extend_from_slice(&(!length).to_le_bytes());
        out.extend_from_slice(block);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &byte in data {
        a = (a + u32::from(byte)) % 65_521;
        b = (b + a) % 65_521;
    }
    out.extend_from_slice(&((b << 16) | a).to_be_bytes());
    out
}

/// A PNG chunk: length, type, data, CRC.
fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut chunk = (data.len() as u32).to_be_bytes().to_vec();
    chunk.extend_from_slice(kind);
    chunk.extend_from_slice(data);
    chunk.extend_from_slice(&crc32(&chunk[4..]).to_be_bytes());
    chunk
}

/// A PNG of `width × height` pixels, `color_type` (0 grey, 2 RGB, 3 palette, 4 grey+alpha,
/// 6 RGBA) at `bit_depth`, whose pixel `(x, y)` has the samples `pixel(x, y)` (one per channel);
/// `extra` chunks (PLTE, tRNS) go before the image data; `interlaced` writes Adam7 passes.
/// Scanlines use filter type `y mod 5` (every filter), stored in uncompressed deflate blocks.
fn png_bytes(
    (width, height): (u32, u32),
    (color_type, bit_depth): (u8, u8),
    interlaced: bool,
    extra: &[(&[u8; 4], Vec<u8>)],
    pixel: impl Fn(u32, u32) -> Vec<u16>,
) -> Vec<u8> {
    let channels = match color_type {
        0 | 3 => 1,
        4 => 2,
        2 => 3,
        _ => 4,
    };
    let bits_per_pixel = channels * usize::from(bit_depth);
    let passes: &[(u32, u32, u32, u32)] = if interlaced {
        &[
            (0, 0, 8, 8),
            (4, 0, 8, 8),
            (0, 4, 4, 8),
            (2, 0, 4, 4),
            (0, 2, 2, 4),
            (1, 0, 2, 2),
            (0, 1, 1, 2),
        ]
    } else {
        &[(0, 0, 1, 1)]
    };
    let mut raw = Vec::new();
    for &(x0, y0, dx, dy) in passes {
        let columns: Vec<u32> = (x0..width).step_by(dx as usize).collect();
        if columns.is_empty() {
            continue;
        }
        let line_bytes = (columns.len() * bits_per_pixel).div_ceil(8);
        let bytes_per_pixel = bits_per_pixel.div_ceil(8);
        let mut previous = vec![0u8; line_bytes];
        for y in (y0..height).step_by(dy as usize) {
            // The unfiltered scanline.
            let mut line = vec![0u8; line_bytes];
            let mut bit = 0;
            for &x in &columns {
                for sample in pixel(x, y) {
                    if bit_depth == 16 {
                        line[bit / 8..bit / 8 + 2].copy_from_slice(&sample.to_be_bytes());
                    } else if bit_depth == 8 {
                        line[bit / 8] = sample as u8;
                    } else {
                        let shift = 8 - usize::from(bit_depth) - bit % 8;
                        line[bit / 8] |= ((sample as u8) & ((1 << bit_depth) - 1)) << shift;
                    }
                    bit += usize::from(bit_depth);
                }
            }
            // Filtered with type y mod 5 (none, sub, up, average, Paeth).
            let filter = (y % 5) as u8;
            raw.push(filter);
            for i in 0..line_bytes {
                let left = if i >= bytes_per_pixel {
                    line[i - bytes_per_pixel]
                } else {
                    0
                };
                let up = previous[i];
                let up_left = if i >= bytes_per_pixel {
                    previous[i - bytes_per_pixel]
                } else {
                    0
                };
                let predictor = match filter {
                    0 => 0,
                    1 => left,
                    2 => up,
                    3 => ((u16::from(left) + u16::from(up)) / 2) as u8,
                    _ => {
                        let p = i16::from(left) + i16::from(up) - i16::from(up_left);
                        let (pa, pb, pc) = (
                            (p - i16::from(left)).abs(),
                            (p - i16::from(up)).abs(),
                            (p - i16::from(up_left)).abs(),
                        );
                        if pa <= pb && pa <= pc {
                            left
                        } else if pb <= pc {
                            up
                        } else {
                            up_left
                        }
                    }
                };
                raw.push(line[i].wrapping_sub(predictor));
            }
            previous = line;
        }
    }
    let mut header = width.to_be_bytes().to_vec();
    header.extend_from_slice(&height.to_be_bytes());
    header.extend_from_slice(&[bit_depth, color_type, 0, 0, u8::from(interlaced)]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(png_chunk(b"IHDR", &header));
    for (kind, data) in extra {
        png.extend(png_chunk(kind, data));
    }
    png.extend(png_chunk(b"IDAT", &zlib_stored(&raw)));
    png.extend(png_chunk(b"IEND", &[]));
    png
}

/// A GIF89a of `width × height` pixels with a global palette of `2^bits` colours, an optional
/// transparent index (graphic control extension) and the pixel indices `index(x, y)`, LZW-coded
/// without compression (a clear code before the code width would grow).
fn gif_bytes(
    (width, height): (u16, u16),
    bits: u8,
    transparent: Option<u8>,
    index: impl Fn(u16, u16) -> u8,
) -> Vec<u8> {
    let colours = 1usize << bits;
    let mut gif = b"GIF89a".to_vec();
    gif.extend_from_slice(&width.to_le_bytes());
    gif.extend_from_slice(&height.to_le_bytes());
    gif.extend_from_slice(&[0x80 | (bits - 1), 0, 0]);
    for i in 0..colours {
        let level = (i * 255 / (colours - 1)) as u8;
        gif.extend_from_slice(&[level, 255 - level, level / 2]);
    }
    if let Some(t) = transparent {
        gif.extend_from_slice(&[0x21, 0xf9, 4, 1, 0, 0, t, 0]);
    }
    gif.push(0x2c);
    for value in [0, 0, width, height] {
        gif.extend_from_slice(&value.to_le_bytes());
    }
    gif.push(0);
    // LZW: minimum code size max(bits, 2), codes of one more bit; a clear code every
    // 2^min − 3 literals keeps the decoder's table below the next code width.
    let min_code = bits.max(2);
    let (clear, end) = (1u32 << min_code, (1u32 << min_code) + 1);
    let width_bits = u32::from(min_code) + 1;
    let mut codes = Vec::new();
    let pixels: Vec<u32> = (0..height)
        .flat_map(|y| (0..width).map(move |x| (x, y)))
        .map(|(x, y)| u32::from(index(x, y)))
        .collect();
    for run in pixels.chunks((1 << min_code) - 3) {
        codes.push(clear);
        codes.extend_from_slice(run);
    }
    codes.push(end);
    let mut data = Vec::new();
    let (mut accumulator, mut filled) = (0u64, 0u32);
    for code in codes {
        accumulator |= u64::from(code) << filled;
        filled += width_bits;
        while filled >= 8 {
            data.push(accumulator as u8);
            accumulator >>= 8;
            filled -= 8;
        }
    }
    if filled > 0 {
        data.push(accumulator as u8);
    }
    gif.push(min_code);
    for block in data.chunks(255) {
        gif.push(block.len() as u8);
        gif.extend_from_slice(block);
    }
    gif.extend_from_slice(&[0, 0x3b]);
    gif
}

/// Bytes from a hexadecimal string.
fn from_hex(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hexadecimal"))
        .collect()
}

/// An 8×8 RGB gradient (R = 32x, G = 32y, B = 128) as the `image` 0.25.10 crate's `JpegEncoder`
/// writes it (quality 75, 4:2:0).
const JPEG_RGB_8X8: &str = "ffd8ffe000104a46494600010200000100010000ffc00011080008000803011100021101031101ffdb004300080606070605080707070909080a0c140d0c0b0b0c1912130f141d1a1f1e1d1a1c1c20242e2720222c231c1c2837292c30313434341f27393d38323c2e333432ffdb0043010909090c0b0c180d0d1832211c213232323232323232323232323232323232323232323232323232323232323232323232323232323232323232323232323232ffc4001f0000010501010101010100000000000000000102030405060708090a0bffc400b5100002010303020403050504040000017d01020300041105122131410613516107227114328191a1082342b1c11552d1f02433627282090a161718191a25262728292a3435363738393a434445464748494a535455565758595a636465666768696a737475767778797a838485868788898a92939495969798999aa2a3a4a5a6a7a8a9aab2b3b4b5b6b7b8b9bac2c3c4c5c6c7c8c9cad2d3d4d5d6d7d8d9dae1e2e3e4e5e6e7e8e9eaf1f2f3f4f5f6f7f8f9faffc4001f0100030101010101010101010000000000000102030405060708090a0bffc400b51100020102040403040705040400010277000102031104052131061241510761711322328108144291a1b1c109233352f0156272d10a162434e125f11718191a262728292a35363738393a434445464748494a535455565758595a636465666768696a737475767778797a82838485868788898a92939495969798999aa2a3a4a5a6a7a8a9aab2b3b4b5b6b7b8b9bac2c3c4c5c6c7c8c9cad2d3d4d5d6d7d8d9dae2e3e4e5e6e7e8e9eaf2f3f4f5f6f7f8f9faffda000c03010002110311003f00a3a1781beefeebf4adf179af98b87f3bdb53ffd9";

/// An 8×8 greyscale gradient (16·(x + y)), same encoder.
const JPEG_GREY_8X8: &str = "ffd8ffe000104a46494600010200000100010000ffc0000b080008000801011100ffdb004300080606070605080707070909080a0c140d0c0b0b0c1912130f141d1a1f1e1d1a1c1c20242e2720222c231c1c2837292c30313434341f27393d38323c2e333432ffc4001f0000010501010101010100000000000000000102030405060708090a0bffc400b5100002010303020403050504040000017d01020300041105122131410613516107227114328191a1082342b1c11552d1f02433627282090a161718191a25262728292a3435363738393a434445464748494a535455565758595a636465666768696a737475767778797a838485868788898a92939495969798999aa2a3a4a5a6a7a8a9aab2b3b4b5b6b7b8b9bac2c3c4c5c6c7c8c9cad2d3d4d5d6d7d8d9dae1e2e3e4e5e6e7e8e9eaf1f2f3f4f5f6f7f8f9faffda0008010100003f00cff07783bfd5feeff4afffd9";

/// A 4×4 RGBA image (60x, 60y, 200, alpha 16xy) as the `image` 0.25.10 crate's lossless WebP
/// encoder writes it.
const WEBP_RGBA_4X4: &str = "52494646ca000000574542505650384cbe0000002f03c00010cd552022021e8804000000008001000000000000100000000000000000000000000000000000000000000000000c00007820120000000000e73f00000000000000060000000000000000000000000000000004000000000000000f440200000000e0fc0700000000000000000000000000000000000000000000004018000000000000e0814002000000009c7f0300030002000400000000000000000000000000000000000000000000000000c87a1d031c22804304708800";

/// A 4×4 RGB image (60x, 60y, 10), same encoder.
const WEBP_RGB_4X4: &str = "524946469a000000574542505650384c8d0000002f03c00000cd552022021ec82600000000800100000000000020000000000000000000000000000000000000000000000000080e00c00391000000000038ff01000000000000300000000000000000000000000000000020000000000000007820120000000000e73f800100000000000000000000000000000000000000000000040000000000008048ed3e1200";

/// The `image_decode` seeds. Files named `damaged-*` must be refused; every other one decodes
/// (`tests/fuzz_regressions.rs` checks both); `*-preprocessed-*` ones are also preprocessed.
fn image_seeds(golden: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let mut seeds: Vec<(String, Vec<u8>)> = golden_files(golden, "images", "png")?
        .into_iter()
        .filter(|(_, bytes)| bytes.len() <= SEED_FILE_BYTES)
        .map(|(name, bytes)| (format!("golden-{name}"), bytes))
        .collect();
    let level = |x: u32, y: u32, max: u32| ((x * 7 + y * 13) % (max + 1)) as u16;
    for bits in [1u8, 2, 4, 8, 16] {
        let max = (1u32 << bits) - 1;
        seeds.push((
            format!("grey{bits}-9x7.png"),
            png_bytes((9, 7), (0, bits), false, &[], |x, y| vec![level(x, y, max)]),
        ));
    }
    // Grey with a tRNS colour key; 16-bit grey above 255 (Pillow clips it).
    seeds.push((
        "grey8-trns-6x6.png".into(),
        png_bytes((6, 6), (0, 8), false, &[(b"tRNS", vec![0, 40])], |x, y| {
            vec![(x * 40 + y) as u16 % 256]
        }),
    ));
    seeds.push((
        "grey2-trns-5x5.png".into(),
        png_bytes((5, 5), (0, 2), false, &[(b"tRNS", vec![0, 2])], |x, y| {
            vec![((x + y) % 4) as u16]
        }),
    ));
    for bits in [8u8, 16] {
        let max = (1u32 << bits) - 1;
        seeds.push((
            format!("grey-alpha{bits}-5x4.png"),
            png_bytes((5, 4), (4, bits), false, &[], |x, y| {
                vec![level(x, y, max), level(y, x, max)]
            }),
        ));
        seeds.push((
            format!("rgb{bits}-7x5.png"),
            png_bytes((7, 5), (2, bits), false, &[], |x, y| {
                vec![level(x, y, max), level(y, x, max), level(x + y, 3, max)]
            }),
        ));
        seeds.push((
            format!("rgba{bits}-6x6.png"),
            png_bytes((6, 6), (6, bits), false, &[], |x, y| {
                vec![
                    level(x, y, max),
                    level(y, x, max),
                    level(x + y, 3, max),
                    level(x * y, 1, max),
                ]
            }),
        ));
    }
    seeds.push((
        "rgb8-trns-4x4.png".into(),
        png_bytes(
            (4, 4),
            (2, 8),
            false,
            &[(b"tRNS", vec![0, 10, 0, 20, 0, 30])],
            |x, y| vec![(x * 10) as u16, (y * 20) as u16, 30],
        ),
    ));
    seeds.push((
        "rgba8-interlaced-11x9.png".into(),
        png_bytes((11, 9), (6, 8), true, &[], |x, y| {
            vec![level(x, y, 255), level(y, x, 255), 9, level(x, 1, 255)]
        }),
    ));
    seeds.push((
        "grey1-interlaced-10x10.png".into(),
        png_bytes((10, 10), (0, 1), true, &[], |x, y| {
            vec![((x ^ y) & 1) as u16]
        }),
    ));
    for bits in [1u8, 2, 4, 8] {
        let colours = 1u32 << bits;
        // A palette one entry short of the indices used (Pillow: black), part of it transparent.
        let entries = (colours - 1).max(1);
        let palette: Vec<u8> = (0..entries)
            .flat_map(|i| [(i * 37) as u8, (i * 91) as u8, (255 - i * 13) as u8])
            .collect();
        let alphas: Vec<u8> = (0..entries.min(3)).map(|i| (i * 100) as u8).collect();
        seeds.push((
            format!("palette{bits}-8x6.png"),
            png_bytes(
                (8, 6),
                (3, bits),
                false,
                &[(b"PLTE", palette), (b"tRNS", alphas)],
                |x, y| vec![((x + 3 * y) % colours) as u16],
            ),
        ));
    }
    seeds.push((
        "wide-48x1.png".into(),
        png_bytes((48, 1), (2, 8), false, &[], |x, _| {
            vec![(x * 5) as u16, 0, 255]
        }),
    ));
    seeds.push((
        "tall-1x40.png".into(),
        png_bytes((1, 40), (0, 8), false, &[], |_, y| vec![(y * 6) as u16]),
    ));
    seeds.push((
        "gif-4colours-trns-5x4.gif".into(),
        gif_bytes((5, 4), 2, Some(1), |x, y| ((x + y) % 4) as u8),
    ));
    seeds.push((
        "gif-256colours-16x3.gif".into(),
        gif_bytes((16, 3), 8, None, |x, y| (x * 16 + y * 5) as u8),
    ));
    seeds.push((
        "gif-2colours-3x3.gif".into(),
        gif_bytes((3, 3), 1, None, |x, y| ((x + y) % 2) as u8),
    ));
    for (name, hex) in [
        ("jpeg-rgb-8x8.jpg", JPEG_RGB_8X8),
        ("jpeg-grey-8x8.jpg", JPEG_GREY_8X8),
        ("webp-lossless-rgba-4x4.webp", WEBP_RGBA_4X4),
        ("webp-lossless-rgb-4x4.webp", WEBP_RGB_4X4),
    ] {
        seeds.push((name.into(), from_hex(hex)));
    }
    // Inputs ending in [b, 0xff] are also preprocessed at budget SUPPORTED_BUDGETS[b mod 5]
    // (decoders ignore trailing bytes): one seed per budget.
    let with_budget = |mut bytes: Vec<u8>, budget_index: u8| {
        bytes.extend_from_slice(&[budget_index, 0xff]);
        bytes
    };
    let preprocessed = [
        ("rgba8-6x6.png", 0),
        ("gif-4colours-trns-5x4.gif", 1),
        ("jpeg-rgb-8x8.jpg", 2),
        ("webp-lossless-rgba-4x4.webp", 3),
        ("tall-1x40.png", 4),
    ];
    for (name, budget_index) in preprocessed {
        let bytes = seeds
            .iter()
            .find(|(seed, _)| seed == name)
            .map(|(_, bytes)| bytes.clone())
            .expect("written above");
        let (stem, extension) = name.rsplit_once('.').expect("an extension");
        seeds.push((
            format!("{stem}-preprocessed-budget{budget_index}.{extension}"),
            with_budget(bytes, budget_index),
        ));
    }
    // Refused: a header declaring 65535 × 65535 16-bit RGBA (34 GB) with one row of data; a
    // JPEG cut before its end; a GIF cut inside its image data.
    seeds.push(("damaged-png-declares-65535x65535.png".into(), {
        let mut png = png_bytes((1, 1), (6, 16), false, &[], |_, _| vec![1, 2, 3, 4]);
        png[16..24].copy_from_slice(&[0, 0, 0xff, 0xff, 0, 0, 0xff, 0xff]);
        let crc = crc32(&png[12..29]);
        png[29..33].copy_from_slice(&crc.to_be_bytes());
        png
    }));
    let jpeg = from_hex(JPEG_RGB_8X8);
    seeds.push((
        "damaged-jpeg-truncated.jpg".into(),
        jpeg[..jpeg.len() - 12].to_vec(),
    ));
    let gif = gif_bytes((16, 3), 8, None, |x, y| (x * 16 + y * 5) as u8);
    seeds.push((
        "damaged-gif-truncated.gif".into(),
        gif[..gif.len() - 20].to_vec(),
    ));
    Ok(seeds)
}

// ---------------------------------------------------------------------------------------------
// WAV seeds: golden WAVs cut short, and tiny WAVs of every encoding
// ---------------------------------------------------------------------------------------------

/// A WAV file: `format` tag 1 (PCM), 3 (float) or 0xfffe (extensible, then `sub_format` 1 or 3
/// and `valid_bits`), `data` the data chunk's bytes and `declared` its declared length (the
/// actual one when `None`). A `LIST` chunk sits between `fmt ` and `data`, as many tools write.
fn wav_bytes(
    format: u16,
    (channels, rate, bits): (u16, u32, u16),
    extensible: Option<(u16, u16)>,
    data: &[u8],
    declared: Option<u32>,
) -> Vec<u8> {
    let block = channels * bits.div_ceil(8);
    let mut fmt = Vec::new();
    fmt.extend_from_slice(&format.to_le_bytes());
    fmt.extend_from_slice(&channels.to_le_bytes());
    fmt.extend_from_slice(&rate.to_le_bytes());
    fmt.extend_from_slice(&(rate * u32::from(block)).to_le_bytes());
    fmt.extend_from_slice(&block.to_le_bytes());
    fmt.extend_from_slice(&bits.to_le_bytes());
    if let Some((sub_format, valid_bits)) = extensible {
        fmt.extend_from_slice(&22u16.to_le_bytes());
        fmt.extend_from_slice(&valid_bits.to_le_bytes());
        fmt.extend_from_slice(&4u32.to_le_bytes()); // channel mask: front centre
        fmt.extend_from_slice(&sub_format.to_le_bytes());
        fmt.extend_from_slice(&[
            0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x80, 0x00, 0x00, 0xaa, 0x00, 0x38, 0x9b, 0x71,
        ]);
    }
    let mut body = b"WAVEfmt ".to_vec();
    body.extend_from_slice(&(fmt.len() as u32).to_le_bytes());
    body.extend_from_slice(&fmt);
    body.extend_from_slice(b"LIST\x0c\x00\x00\x00INFOISFT\x00\x00\x00\x00");
    body.extend_from_slice(b"data");
    body.extend_from_slice(&declared.unwrap_or(data.len() as u32).to_le_bytes());
    body.extend_from_slice(data);
    let mut file = b"RIFF".to_vec();
    file.extend_from_slice(&(body.len() as u32).to_le_bytes());
    file.extend_from_slice(&body);
    file
}

/// `count` samples of a deterministic two-tone signal in [−0.9, 0.9].
fn tone(count: usize) -> Vec<f64> {
    (0..count)
        .map(|n| {
            let t = n as f64 / 16_000.0;
            0.6 * (2.0 * std::f64::consts::PI * 440.0 * t).sin()
                + 0.3 * (2.0 * std::f64::consts::PI * 3_000.0 * t).sin()
        })
        .collect()
}

/// Samples as integer PCM of `bits` bits in `container` bytes (8-bit unsigned, others signed,
/// little-endian, left in the low bytes).
fn pcm(samples: &[f64], bits: u32, container: usize) -> Vec<u8> {
    let full = (1i64 << (bits - 1)) as f64;
    samples
        .iter()
        .flat_map(|&s| {
            let value = (s * full).round() as i64;
            let value = if bits == 8 { value + 128 } else { value };
            value.to_le_bytes()[..container].to_vec()
        })
        .collect()
}

/// The `wav_decode` seeds. Files named `damaged-*` or `refused-*` must be refused; every other
/// one decodes (`tests/fuzz_regressions.rs` checks both).
fn wav_seeds(golden: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let mut seeds = Vec::new();
    // Golden WAVs cut to their first 2000 samples, headers fixed to the new length.
    for (name, bytes) in golden_files(golden, "audio", "wav")? {
        let seed_error = |message: &str| FuzzError::Seed {
            file: golden.join(&name),
            message: message.to_string(),
        };
        let data_at = bytes
            .windows(4)
            .position(|w| w == b"data")
            .ok_or_else(|| seed_error("no data chunk"))?;
        let mut cut = bytes[..data_at + 8].to_vec();
        let data = &bytes[data_at + 8..];
        let kept = data.len().min(4000);
        cut.extend_from_slice(&data[..kept]);
        cut[data_at + 4..data_at + 8].copy_from_slice(&(kept as u32).to_le_bytes());
        let riff = (cut.len() - 8) as u32;
        cut[4..8].copy_from_slice(&riff.to_le_bytes());
        if cut.len() <= SEED_FILE_BYTES {
            seeds.push((format!("golden-{name}"), cut));
        }
    }
    let signal = tone(400);
    let float32: Vec<u8> = signal
        .iter()
        .flat_map(|&s| (s as f32).to_le_bytes())
        .collect();
    seeds.push((
        "pcm8.wav".into(),
        wav_bytes(1, (1, 16_000, 8), None, &pcm(&signal, 8, 1), None),
    ));
    seeds.push((
        "pcm16.wav".into(),
        wav_bytes(1, (1, 16_000, 16), None, &pcm(&signal, 16, 2), None),
    ));
    seeds.push((
        "pcm24.wav".into(),
        wav_bytes(1, (1, 16_000, 24), None, &pcm(&signal, 24, 3), None),
    ));
    seeds.push((
        "pcm32.wav".into(),
        wav_bytes(1, (1, 16_000, 32), None, &pcm(&signal, 32, 4), None),
    ));
    seeds.push((
        "float32.wav".into(),
        wav_bytes(3, (1, 16_000, 32), None, &float32, None),
    ));
    seeds.push((
        "extensible-pcm24-in-32.wav".into(),
        wav_bytes(
            0xfffe,
            (1, 16_000, 32),
            Some((1, 24)),
            &pcm(&signal, 32, 4),
            None,
        ),
    ));
    seeds.push((
        "extensible-float32.wav".into(),
        wav_bytes(0xfffe, (1, 16_000, 32), Some((3, 32)), &float32, None),
    ));
    seeds.push((
        "pcm16-short-100-samples.wav".into(),
        wav_bytes(1, (1, 16_000, 16), None, &pcm(&signal[..100], 16, 2), None),
    ));
    let stereo: Vec<f64> = signal.iter().flat_map(|&s| [s, -s]).collect();
    seeds.push((
        "refused-stereo-pcm16.wav".into(),
        wav_bytes(1, (2, 16_000, 16), None, &pcm(&stereo, 16, 2), None),
    ));
    seeds.push((
        "refused-44100hz-pcm16.wav".into(),
        wav_bytes(1, (1, 44_100, 16), None, &pcm(&signal, 16, 2), None),
    ));
    seeds.push((
        "refused-float64.wav".into(),
        wav_bytes(
            3,
            (1, 16_000, 64),
            None,
            &signal
                .iter()
                .flat_map(|s| s.to_le_bytes())
                .collect::<Vec<_>>(),
            None,
        ),
    ));
    seeds.push((
        "refused-pcm12.wav".into(),
        wav_bytes(1, (1, 16_000, 12), None, &pcm(&signal, 12, 2), None),
    ));
    let mut not_finite = float32.clone();
    not_finite[40..44].copy_from_slice(&f32::NAN.to_le_bytes());
    seeds.push((
        "refused-float32-nan.wav".into(),
        wav_bytes(3, (1, 16_000, 32), None, &not_finite, None),
    ));
    seeds.push((
        "damaged-declares-4-gib.wav".into(),
        wav_bytes(
            1,
            (1, 16_000, 16),
            None,
            &pcm(&signal, 16, 2),
            Some(u32::MAX - 1),
        ),
    ));
    seeds.push((
        "refused-empty-data.wav".into(),
        wav_bytes(1, (1, 16_000, 16), None, &[], None),
    ));
    Ok(seeds)
}
