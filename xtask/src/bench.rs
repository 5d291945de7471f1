//! `cargo xtask bench`: prefill and decode speed and peak memory of the engines, on 2 threads,
//! written to `docs/performance.md` with the command that reproduces it.
//!
//! Every engine runs in its own process (`cargo xtask bench-engine ...`, or the peers' scripts
//! in the oracle virtualenv: `xtask/scripts/bench_hf.py` for Hugging Face transformers,
//! `xtask/scripts/bench_llama_cpp.py` for llama.cpp, which builds a pinned llama.cpp and converts
//! the checkpoint to GGUF once, outside the measurement), so that its peak resident memory is
//! its own. Each measurement waits (up to `--max-wait` seconds) for the
//! 1-minute load average to fall below `--max-load`, and the load it ran under is reported:
//! other processes on a 2-core machine change decode speed several-fold.
//!
//! Workload (the same for every engine): a prompt of `--prompt` random token ids (seeded), three
//! prefill passes from an empty cache producing the last position's logits (the median time is
//! reported: one pass on a shared 2-core machine varies by ±10%), then `--decode` greedy
//! single-token steps through the KV cache. A warm-up pass of the same workload (the prompt + 1 step) runs first, so
//! mapped weights and the prompt's PLE rows are paged in before timing (llama.cpp's
//! `llama-bench` warms up likewise; the HF script does the same).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use gemma4_optimized::linear::{Precision, PrefillKernel};
use gemma4_optimized::model::argmax;
use gemma4_optimized::{Gemma4Optimized, Logits};
use gemma4_reference::checkpoint::WeightDtype;
use gemma4_reference::dump::Recorder;
use gemma4_reference::Gemma4TextModel;
use serde_json::{json, Value};

use crate::golden::venv_dir;
use crate::process::repo_root;

/// Arguments of `cargo xtask bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// The full-size checkpoint (`cargo xtask synth --variant e2b --out DIR`).
    #[arg(long, default_value = "/work/bench-data/e2b")]
    pub model: PathBuf,
    /// A reduced-layer checkpoint of the same variant, for the (slow, f32, all-in-RAM)
    /// reference (`cargo xtask synth --variant e2b --layers 10 --out DIR`).
    #[arg(long, default_value = "/work/bench-data/e2b-10l")]
    pub reduced_model: PathBuf,
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    #[arg(long, default_value_t = 128)]
    pub prompt: usize,
    #[arg(long, default_value_t = 32)]
    pub decode: usize,
    /// Skip the Hugging Face transformers run.
    #[arg(long)]
    pub skip_hf: bool,
    /// Skip the llama.cpp run.
    #[arg(long)]
    pub skip_llama_cpp: bool,
    /// Rounds of measurements: every engine but the reference runs once per round, in
    /// rotation, and the table reports the median over the rounds (this machine's memory
    /// bandwidth varies between runs by ±15%, which moves decode speeds as much).
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Where llama.cpp is built and the checkpoint's GGUF is kept (`xtask/scripts/bench_llama_cpp.py`
    /// downloads the pinned source there on first use) [default: ~/.cache/gemma4/llama-cpp].
    #[arg(long)]
    pub llama_cpp_cache: Option<PathBuf>,
    /// The oracle virtualenv with torch + transformers [default: $GEMMA4_ORACLE_VENV, else
    /// ~/.cache/gemma4/oracle-venv].
    #[arg(long)]
    pub venv: Option<PathBuf>,
    /// Wait for the 1-minute load average to drop below this before each measurement.
    #[arg(long, default_value_t = 0.5)]
    pub max_load: f64,
    /// Give up waiting for a quiet machine after this many seconds (and report the load).
    #[arg(long, default_value_t = 300)]
    pub max_wait: u64,
    /// Also run the reference on the full model (converts every weight to f32 in RAM: about
    /// 23 GB peak for E2B; needs a machine with that much memory).
    #[arg(long)]
    pub reference_full: bool,
    /// Where to write the report.
    #[arg(long, default_value = "docs/performance.md")]
    pub out: PathBuf,
    /// Which rows to measure: `text` (prefill and decode), `towers` (vision and audio towers,
    /// `crate::bench_towers`) or `all`. The report's other part is kept as it was.
    #[arg(long, default_value = "all", value_parser = ["text", "towers", "all"])]
    pub part: String,
    /// The E2B checkpoint with its towers for the tower rows
    /// (`cargo xtask synth --variant e2b --towers --layers 1 --out DIR`).
    #[arg(long, default_value = "/work/bench-data/e2b-towers")]
    pub towers_model: PathBuf,
    /// The 31B checkpoint with its vision tower for the large-tower row
    /// (`cargo xtask synth --variant 31b --towers --layers 1 --out DIR`).
    #[arg(long, default_value = "/work/bench-data/31b-towers")]
    pub large_towers_model: PathBuf,
}

/// Arguments of the per-engine child process.
#[derive(Debug, clap::Args)]
pub struct BenchEngineArgs {
    /// reference or optimized
    #[arg(long)]
    pub engine: String,
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    #[arg(long, default_value_t = 128)]
    pub prompt: usize,
    #[arg(long, default_value_t = 32)]
    pub decode: usize,
    /// Prefill passes (each from an empty cache); the median is reported.
    #[arg(long, default_value_t = 3)]
    pub prefill_runs: usize,
    /// Optimized engine: arithmetic of the prompt's matrix products, `f32` (the default, the
    /// reference's) or `bf16` (`--fast-prefill`: bf16-rounded activations, AMX or AVX-512 BF16).
    #[arg(long, default_value = "f32")]
    pub precision: String,
    /// Tower workload: this image through the vision tower (instead of the text workload).
    #[arg(long, conflicts_with = "audio")]
    pub image: Option<PathBuf>,
    /// The image's soft-token budget.
    #[arg(long, default_value_t = 280)]
    pub budget: usize,
    /// Tower workload: this WAV clip through the audio tower.
    #[arg(long)]
    pub audio: Option<PathBuf>,
    /// Tower workload: timed passes (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
}

/// The prompt: `n` token ids in `[3, vocab)`, reproducible.
fn prompt_ids(n: usize, vocab: usize) -> Vec<usize> {
    gemma4_optimized::synthetic::random_values(n, 2026, 1.0)
        .iter()
        .map(|v| 3 + ((v.abs() * (vocab - 3) as f32) as usize).min(vocab - 4))
        .collect()
}

/// Peak resident set size of this process (`VmHWM`), in bytes.
pub(crate) fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// The median of `times` (not empty).
pub(crate) fn median(times: &[f64]) -> f64 {
    let mut sorted = times.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// Times of the workload on one engine.
struct Timings {
    /// The median prefill pass, seconds.
    prefill_s: f64,
    prefill_runs_s: Vec<f64>,
    /// All decode steps, seconds.
    decode_s: f64,
}

/// The workload: (a warm-up prompt + one step, if `warm_up`), `--prefill-runs` prefills of `ids`
/// from an empty cache, then `--decode` greedy steps after the last one. `run(cache, ids)` runs
/// `ids` after the cache's contents and returns the last position's logits.
fn timed_workload<C>(
    ids: &[usize],
    args: &BenchEngineArgs,
    warm_up: bool,
    new_cache: impl Fn() -> C,
    run: impl Fn(&mut C, &[usize]) -> Result<Vec<f32>, String>,
) -> Result<Timings, String> {
    if warm_up {
        let mut cache = new_cache();
        let logits = run(&mut cache, ids)?;
        run(&mut cache, &[argmax(&logits)])?;
    }
    let mut prefill_runs_s = Vec::new();
    let mut prefilled = None;
    for _ in 0..args.prefill_runs.max(1) {
        let mut cache = new_cache();
        let t0 = Instant::now();
        let logits = run(&mut cache, ids)?;
        prefill_runs_s.push(t0.elapsed().as_secs_f64());
        prefilled = Some((logits, cache));
    }
    let (logits, mut cache) = prefilled.expect("at least one prefill");
    let mut next = argmax(&logits);
    let t0 = Instant::now();
    for _ in 0..args.decode {
        next = argmax(&run(&mut cache, &[next])?);
    }
    Ok(Timings {
        prefill_s: median(&prefill_runs_s),
        prefill_runs_s,
        decode_s: t0.elapsed().as_secs_f64(),
    })
}

/// The child process: one engine, one workload, one JSON line on stdout.
pub fn run_engine(args: &BenchEngineArgs) -> Result<(), String> {
    if cfg!(debug_assertions) {
        return Err("bench-engine needs a release build (`cargo run --release -p xtask -- bench-engine ...`)".into());
    }
    if args.image.is_some() || args.audio.is_some() {
        return crate::bench_towers::run_engine(args);
    }
    let err = |e: gemma4_reference::Error| e.to_string();
    let started = Instant::now();
    let result = match args.engine.as_str() {
        "optimized" => {
            let precision = match args.precision.as_str() {
                "f32" => Precision::F32,
                "bf16" => Precision::Bf16Activations,
                other => return Err(format!("--precision {other}: expected f32 or bf16")),
            };
            let model = Gemma4Optimized::load_with_threads(&args.model, Some(args.threads))
                .map_err(err)?
                .with_precision(precision);
            let load_s = started.elapsed().as_secs_f64();
            let ids = prompt_ids(args.prompt, model.config.text.vocab_size);
            // Warm-up: pages the mapped weights and the prompt's PLE rows in.
            let timings = timed_workload(
                &ids,
                args,
                true,
                || model.new_cache(),
                |cache, ids| {
                    model
                        .forward(ids, cache, &mut Recorder::checking_only(), Logits::Last)
                        .map_err(err)
                },
            )?;
            json!({
                "load_s": load_s, "prefill_s": timings.prefill_s, "prefill_runs_s": timings.prefill_runs_s,
                "decode_s": timings.decode_s,
                "decode_weight_bytes": model.decode_weight_bytes(),
                "threads": model.threads(),
                "precision": args.precision,
                "bf16_kernel": gemma4_optimized::gemm512::has_avx512_bf16(),
                "fast_prefill_kernel": format!("{:?}", fast_prefill_kernel()),
            })
        }
        "reference" => {
            let model = Gemma4TextModel::load(&args.model).map_err(err)?;
            let load_s = started.elapsed().as_secs_f64();
            let ids = prompt_ids(args.prompt, model.config.text.vocab_size);
            // No warm-up: the reference holds every weight in RAM from the load on.
            let timings = timed_workload(
                &ids,
                args,
                false,
                || model.new_cache(),
                |cache, ids| {
                    let logits = model
                        .forward(ids, cache, &mut Recorder::checking_only())
                        .map_err(err)?;
                    Ok(logits.row(logits.nrows() - 1).to_vec())
                },
            )?;
            json!({
                "load_s": load_s, "prefill_s": timings.prefill_s, "prefill_runs_s": timings.prefill_runs_s,
                "decode_s": timings.decode_s, "threads": 1,
            })
        }
        other => return Err(format!("--engine {other}: expected reference or optimized")),
    };
    let mut result = result;
    let object = result.as_object_mut().expect("object");
    let prefill_s = object["prefill_s"].as_f64().unwrap_or(f64::NAN);
    let decode_s = object["decode_s"].as_f64().unwrap_or(f64::NAN);
    object.insert("engine".into(), json!(args.engine));
    object.insert("prompt".into(), json!(args.prompt));
    object.insert("decode".into(), json!(args.decode));
    object.insert(
        "prefill_tok_s".into(),
        json!(args.prompt as f64 / prefill_s),
    );
    object.insert("decode_tok_s".into(), json!(args.decode as f64 / decode_s));
    object.insert("peak_rss_bytes".into(), json!(peak_rss()));
    if let Some(weight_bytes) = object.get("decode_weight_bytes").and_then(Value::as_f64) {
        // This machine's read bandwidth moves between moments (33 to 69 GB/s within minutes,
        // from other tenants), so the decode is also set against the bandwidth measured right
        // after it, in the same process (after the peak RSS was read: the test allocates 2 GiB).
        let bandwidth = memory_bandwidth(args.threads);
        object.insert("bandwidth_after_gb_s".into(), json!(bandwidth));
        object.insert(
            "decode_bound_fraction".into(),
            json!(args.decode as f64 / decode_s * weight_bytes / (bandwidth * 1e9)),
        );
    }
    println!("{result}");
    Ok(())
}

/// Read bandwidth of this machine on `threads` threads, GB/s (best of 5 passes over 2 GiB).
fn memory_bandwidth(threads: usize) -> f64 {
    use rayon::prelude::*;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("pool");
    let words = (2usize << 30) / 8;
    let data: Vec<u64> = (0..words as u64).collect();
    let mut best = 0.0f64;
    for _ in 0..5 {
        let t0 = Instant::now();
        let sum: u64 = pool.install(|| {
            data.par_chunks(1 << 20)
                .map(|c| c.iter().fold(0u64, |a, &b| a.wrapping_add(b)))
                .reduce(|| 0, |a, b| a.wrapping_add(b))
        });
        std::hint::black_box(sum);
        best = best.max((words * 8) as f64 / t0.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// Waits (up to `max_wait` s) for the 1-minute load average to drop below `max_load`; returns
/// the load average when the measurement starts.
fn wait_for_quiet(max_load: f64, max_wait: u64) -> f64 {
    let t0 = Instant::now();
    loop {
        let load = load_average();
        if load < max_load || t0.elapsed().as_secs() >= max_wait {
            return load;
        }
        eprintln!("xtask bench: load average {load:.2} >= {max_load}; waiting for a quiet machine");
        std::thread::sleep(std::time::Duration::from_secs(10));
    }
}

/// Runs one measurement in a child process; returns its JSON plus the load it started under.
pub(crate) fn measure(
    mut command: Command,
    args: &BenchArgs,
    label: &str,
) -> Result<Value, String> {
    let load_before = wait_for_quiet(args.max_load, args.max_wait);
    eprintln!("xtask bench: {label} (load {load_before:.2})");
    let output = command
        .output()
        .map_err(|e| format!("{label}: cannot start: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "{label}: failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .ok_or_else(|| format!("{label}: no JSON in output: {stdout}"))?;
    let mut value: Value =
        serde_json::from_str(line).map_err(|e| format!("{label}: {e}: {line}"))?;
    value["load_before"] = json!(load_before);
    value["load_after"] = json!(load_average());
    eprintln!("xtask bench: {label}: {value}");
    Ok(value)
}

/// A peer engine, measured on the full model by its script in `xtask/scripts`, run by the
/// oracle virtualenv's Python.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Peer {
    HuggingFace,
    LlamaCpp,
}

impl Peer {
    fn label(self) -> &'static str {
        match self {
            Peer::HuggingFace => "Hugging Face transformers, full model",
            Peer::LlamaCpp => "llama.cpp, full model",
        }
    }

    fn wanted(self, args: &BenchArgs) -> bool {
        match self {
            Peer::HuggingFace => !args.skip_hf,
            Peer::LlamaCpp => !args.skip_llama_cpp,
        }
    }

    /// The script's command for this workload; `prepare`: only its one-time preparation.
    fn command(self, args: &BenchArgs, prepare: bool) -> Command {
        let script = match self {
            Peer::HuggingFace => "bench_hf.py",
            Peer::LlamaCpp => "bench_llama_cpp.py",
        };
        let mut command = Command::new(venv_dir(args.venv.as_deref()).join("bin/python"));
        command
            .arg(repo_root().join("xtask/scripts").join(script))
            .arg("--model")
            .arg(&args.model)
            .args(["--threads", &args.threads.to_string()])
            .args(["--prompt", &args.prompt.to_string()])
            .args(["--decode", &args.decode.to_string()]);
        if self == Peer::LlamaCpp {
            if let Some(cache) = &args.llama_cpp_cache {
                command.arg("--cache").arg(cache);
            }
            if prepare {
                command.arg("--prepare");
            }
        }
        command
    }

    /// Whether the peer can be measured here: wanted, and its one-time preparation (llama.cpp:
    /// build it, convert the checkpoint; cached) succeeded. Runs before any measurement, so that
    /// a build never overlaps one; the reason is printed when not.
    fn ready(self, args: &BenchArgs) -> bool {
        if !self.wanted(args) {
            return false;
        }
        if self != Peer::LlamaCpp {
            return true;
        }
        let label = self.label();
        eprintln!("xtask bench: {label}: preparing (build llama.cpp and convert the checkpoint once; cached)");
        match self.command(args, true).status() {
            Ok(status) if status.success() => true,
            Ok(status) => {
                eprintln!("xtask bench: {label}: preparation failed ({status})");
                false
            }
            Err(e) => {
                eprintln!("xtask bench: {label}: cannot start: {e}");
                false
            }
        }
    }

    /// One measurement; `None` (with the reason on stderr) when it fails: the table says so.
    fn measure(self, args: &BenchArgs) -> Option<Value> {
        measure(self.command(args, false), args, self.label())
            .map_err(|e| eprintln!("xtask bench: {e}"))
            .ok()
    }
}

/// Measures one engine (`reference` or `optimized`) on `model` in a child process, its prefill
/// products in `precision` (`f32` or `bf16`; the reference is f32 throughout).
fn measure_engine(
    engine: &str,
    model: &Path,
    precision: &str,
    args: &BenchArgs,
    label: &str,
) -> Result<Value, String> {
    let mut command = Command::new(std::env::current_exe().expect("own path"));
    command
        .arg("bench-engine")
        .args(["--engine", engine])
        .arg("--model")
        .arg(model)
        .args(["--precision", precision])
        .args(["--threads", &args.threads.to_string()])
        .args(["--prompt", &args.prompt.to_string()])
        .args(["--decode", &args.decode.to_string()])
        .env("RAYON_NUM_THREADS", args.threads.to_string());
    measure(command, args, label)
}

fn layers_of(model: &Path) -> usize {
    gemma4_reference::ModelConfig::from_dir(model).map_or(0, |c| c.text.num_hidden_layers)
}

/// One row of the table: how to measure it.
enum Job<'a> {
    /// One of our engines on a model, in a precision, with a label.
    Engine(&'static str, &'a Path, &'static str, &'static str),
    /// The reference (measured in the first round only), if wanted.
    Reference(bool, &'a Path, &'static str),
    /// A peer, if it is ready ([`Peer::ready`]).
    Peer(bool, Peer),
}

/// For each of `rows` (one engine's combined runs): the decode against the bandwidth measured
/// right after it, run by run — "the f32 runs at 89%, 93%, 61% of the bandwidth measured after
/// them (median 89%; bandwidths 35.9, 36.7, 65.4 GB/s)"; rows joined by "; ".
fn bound_fractions(rows: &[&Value]) -> String {
    let percent = |v: f64| format!("{:.0}%", 100.0 * v);
    rows.iter()
        .map(|row| {
            let runs: Vec<String> = per_run(row, "decode_bound_fraction")
                .into_iter()
                .map(percent)
                .collect();
            let bandwidths: Vec<String> = per_run(row, "bandwidth_after_gb_s")
                .iter()
                .map(|b| format!("{b:.1}"))
                .collect();
            format!(
                "the {} runs at {} of the bandwidth measured after them (median {}; bandwidths {} GB/s)",
                row["precision"].as_str().unwrap_or("?"),
                runs.join(", "),
                percent(row["decode_bound_fraction"].as_f64().unwrap_or(f64::NAN)),
                bandwidths.join(", "),
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// A combined row's value of `key` in each of its runs (`runs_{key}`, or the one value of a
/// single run).
fn per_run(row: &Value, key: &str) -> Vec<f64> {
    match row[format!("runs_{key}")].as_array() {
        Some(runs) => runs.iter().filter_map(Value::as_f64).collect(),
        None => row[key].as_f64().into_iter().collect(),
    }
}

/// One result from several runs of the same measurement: the first run's fields, with
/// `prefill_tok_s`, `decode_tok_s`, `peak_rss_bytes`, `decode_bound_fraction` and
/// `bandwidth_after_gb_s` replaced by their medians over the runs and every run's values (but
/// the peak RSS) kept in `runs_<key>`.
fn combine_runs(runs: &[Value]) -> Option<Value> {
    let mut combined = runs.first()?.clone();
    if runs.len() == 1 {
        return Some(combined);
    }
    for key in [
        "prefill_tok_s",
        "decode_tok_s",
        "peak_rss_bytes",
        "decode_bound_fraction",
        "bandwidth_after_gb_s",
    ] {
        let values: Vec<f64> = runs.iter().filter_map(|v| v[key].as_f64()).collect();
        if values.is_empty() {
            continue;
        }
        combined[key] = json!(median(&values));
        if key != "peak_rss_bytes" {
            combined[format!("runs_{key}")] = json!(values);
        }
    }
    combined["runs"] = json!(runs.len());
    Some(combined)
}

pub fn run(args: &BenchArgs) -> Result<(), String> {
    if cfg!(debug_assertions) {
        // The dev profile builds this workspace's crates at opt-level 1: the engines would run
        // about 2.5x slower than what users get.
        return Err("the benchmark needs a release build: run `cargo xtask bench` (the alias builds --release) or `cargo run --release -p xtask -- bench`".into());
    }
    let out = repo_root().join(&args.out);
    let existing = std::fs::read_to_string(&out).unwrap_or_default();
    let (old_text, old_towers, rest) = crate::bench_towers::split_report(&existing);
    let text = match args.part.as_str() {
        "towers" => old_text,
        _ => run_text(args)?,
    };
    let towers = match args.part.as_str() {
        "text" => old_towers,
        _ => crate::bench_towers::run(args)?,
    };
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    let separator = if text.is_empty() || text.ends_with("\n\n") || towers.is_empty() {
        ""
    } else {
        "\n"
    };
    let towers = if rest.is_empty() || towers.ends_with("\n\n") {
        towers
    } else {
        towers + "\n"
    };
    std::fs::write(&out, format!("{text}{separator}{towers}{rest}"))
        .map_err(|e| format!("{}: {e}", out.display()))?;
    eprintln!("xtask bench: wrote {}", out.display());
    Ok(())
}

/// The prefill and decode rows: measures them and returns their report.
fn run_text(args: &BenchArgs) -> Result<String, String> {
    for dir in [&args.model, &args.reduced_model] {
        if !dir.join("config.json").exists() {
            return Err(format!(
                "{} has no checkpoint: make it with `cargo xtask synth --variant e2b [--layers 10] --out {}`",
                dir.display(),
                dir.display()
            ));
        }
    }
    let bandwidth_load = wait_for_quiet(args.max_load, args.max_wait);
    let bandwidth = memory_bandwidth(args.threads);
    let bandwidth_one = memory_bandwidth(1);
    eprintln!("xtask bench: read bandwidth {bandwidth:.1} GB/s on {} threads, {bandwidth_one:.1} GB/s on 1 (load {bandwidth_load:.2})", args.threads);

    let full_layers = layers_of(&args.model);
    let reduced_layers = layers_of(&args.reduced_model);
    let (full, reduced) = (args.model.as_path(), args.reduced_model.as_path());
    // Every measurement of the table, run `--rounds` times in rotation (so that a slow spell of
    // the machine hits every engine alike); the reference runs once (its spread is small, its
    // runs long). Engines of ours must succeed; a peer that cannot run is left out.
    let jobs = [
        Job::Engine("optimized", full, "f32", "optimized, full model"),
        Job::Engine(
            "optimized",
            full,
            "bf16",
            "optimized fast prefill, full model",
        ),
        Job::Peer(Peer::LlamaCpp.ready(args), Peer::LlamaCpp),
        Job::Peer(Peer::HuggingFace.ready(args), Peer::HuggingFace),
        Job::Engine("optimized", reduced, "f32", "optimized, reduced model"),
        Job::Engine(
            "optimized",
            reduced,
            "bf16",
            "optimized fast prefill, reduced model",
        ),
        Job::Reference(true, reduced, "reference, reduced model"),
        Job::Reference(args.reference_full, full, "reference, full model"),
    ];
    let mut runs: Vec<Vec<Value>> = vec![Vec::new(); jobs.len()];
    for round in 0..args.rounds.max(1) {
        for (job, results) in jobs.iter().zip(&mut runs) {
            let result = match *job {
                Job::Engine(engine, model, precision, label) => {
                    Some(measure_engine(engine, model, precision, args, label)?)
                }
                Job::Reference(wanted, model, label) if wanted && round == 0 => {
                    Some(measure_engine("reference", model, "f32", args, label)?)
                }
                Job::Peer(ready, peer) if ready => peer.measure(args),
                _ => None,
            };
            results.extend(result);
        }
    }
    let [optimized_full, fast_full, llama_cpp, hf, optimized_reduced, fast_reduced, reference_reduced, reference_full]: [Option<Value>; 8] = runs
        .into_iter()
        .map(|results| combine_runs(&results))
        .collect::<Vec<_>>()
        .try_into()
        .expect("one result per job");
    let required =
        |v: Option<Value>| v.ok_or_else(|| "an engine of ours produced no result".to_string());
    let (optimized_full, fast_full) = (required(optimized_full)?, required(fast_full)?);
    let (optimized_reduced, fast_reduced) = (required(optimized_reduced)?, required(fast_reduced)?);
    let reference_reduced = required(reference_reduced)?;

    let report = report(
        args,
        bandwidth,
        bandwidth_one,
        bandwidth_load,
        full_layers,
        reduced_layers,
        Measured {
            optimized_full: &optimized_full,
            fast_full: &fast_full,
            optimized_reduced: &optimized_reduced,
            fast_reduced: &fast_reduced,
            reference_reduced: &reference_reduced,
            reference_full: reference_full.as_ref(),
            hf: hf.as_ref(),
            llama_cpp: llama_cpp.as_ref(),
        },
    );
    Ok(report)
}

fn gib(bytes: f64) -> String {
    format!("{:.2} GiB", bytes / (1u64 << 30) as f64)
}

/// The child processes' results.
struct Measured<'a> {
    optimized_full: &'a Value,
    /// `--precision bf16`
    fast_full: &'a Value,
    optimized_reduced: &'a Value,
    fast_reduced: &'a Value,
    reference_reduced: &'a Value,
    reference_full: Option<&'a Value>,
    hf: Option<&'a Value>,
    llama_cpp: Option<&'a Value>,
}

fn report(
    args: &BenchArgs,
    bandwidth: f64,
    bandwidth_one: f64,
    bandwidth_load: f64,
    full_layers: usize,
    reduced_layers: usize,
    measured: Measured,
) -> String {
    let Measured {
        optimized_full,
        fast_full,
        optimized_reduced,
        fast_reduced,
        reference_reduced,
        reference_full,
        hf,
        llama_cpp,
    } = measured;
    let f = |v: &Value, key: &str| v[key].as_f64().unwrap_or(f64::NAN);
    let row = |name: &str, model: &str, v: &Value| {
        format!(
            "| {name} | {model} | {:.2} | {:.2} | {} | {:.2} / {:.2} |\n",
            f(v, "prefill_tok_s"),
            f(v, "decode_tok_s"),
            gib(f(v, "peak_rss_bytes")),
            f(v, "load_before"),
            f(v, "load_after"),
        )
    };
    let weight_bytes = f(optimized_full, "decode_weight_bytes");
    let bound = bandwidth * 1e9 / weight_bytes;
    let decode = f(optimized_full, "decode_tok_s");
    let mut out = String::new();
    out.push_str("# Performance\n\n");
    out.push_str(&format!(
        "Measured by `cargo xtask bench` on this project's machine ({}), {} threads, random-weight bf16 \
         checkpoints with the real E2B dimensions made by `cargo xtask synth`. Workload: a {}-token prompt \
         (three prefill passes from an empty cache, logits of the last position; the median is reported), \
         then {} greedy decode steps through the KV cache, after one warm-up run of the same workload. {} \
         Load = 1-minute load average before / after each run \
         (each run waits up to {} s for < {}); the benchmark ran at niceness {}.\n\n",
        cpu_description(),
        args.threads,
        args.prompt,
        args.decode,
        if args.rounds > 1 {
            format!(
                "Every engine but the reference ran {} times, in rotation (`--rounds {}`); the table gives the median \
                 run (all runs under Raw results).",
                args.rounds, args.rounds
            )
        } else {
            "Each engine ran once.".to_string()
        },
        args.max_wait,
        args.max_load,
        own_niceness(),
    ));
    out.push_str("| engine | model | prefill tok/s | decode tok/s | peak RSS | load |\n|---|---|---|---|---|---|\n");
    let full = format!("E2B, {full_layers} layers (full)");
    let reduced = format!("E2B dims, first {reduced_layers} layers");
    const OPTIMIZED: &str = "gemma4-optimized (f32 arithmetic, the default)";
    const FAST: &str = "gemma4-optimized `--fast-prefill` (bf16 activations in prefill)";
    const REFERENCE: &str = "gemma4-reference (f32, 1 thread)";
    out.push_str(&row(OPTIMIZED, &full, optimized_full));
    out.push_str(&row(FAST, &full, fast_full));
    if let Some(reference_full) = reference_full {
        out.push_str(&row(REFERENCE, &full, reference_full));
    }
    if let Some(hf) = hf {
        out.push_str(&row(
            "HF transformers (torch CPU, bf16, `logits_to_keep=1`)",
            &full,
            hf,
        ));
    } else {
        out.push_str(
            "| HF transformers | E2B (full) | not run (`--skip-hf`, or it failed here: the bench printed why) | | | |\n",
        );
    }
    if let Some(llama_cpp) = llama_cpp {
        out.push_str(&row(
            &format!(
                "llama.cpp ({}; bf16 GGUF, `llama-bench -t {} -p {} -n {} -r 3`)",
                llama_cpp["build"].as_str().unwrap_or("?"),
                args.threads,
                args.prompt,
                args.decode
            ),
            &full,
            llama_cpp,
        ));
    } else {
        out.push_str(
            "| llama.cpp | E2B (full) | not run (`--skip-llama-cpp`, or it failed here: the bench printed why) | | | |\n",
        );
    }
    out.push_str(&row(OPTIMIZED, &reduced, optimized_reduced));
    out.push_str(&row(FAST, &reduced, fast_reduced));
    out.push_str(&row(REFERENCE, &reduced, reference_reduced));
    let ratio = |a: &Value, b: &Value, key: &str| f(a, key) / f(b, key);
    out.push_str("\n| optimized / reference | prefill, f32 | prefill, `--fast-prefill` | decode |\n|---|---|---|---|\n");
    let mut ratios = vec![(
        reduced.clone(),
        optimized_reduced,
        fast_reduced,
        reference_reduced,
    )];
    if let Some(reference_full) = reference_full {
        ratios.insert(0, (full.clone(), optimized_full, fast_full, reference_full));
    }
    for (model, optimized, fast, reference) in ratios {
        out.push_str(&format!(
            "| {model} | **{:.1}x** | **{:.1}x** | **{:.1}x** |\n",
            ratio(optimized, reference, "prefill_tok_s"),
            ratio(fast, reference, "prefill_tok_s"),
            ratio(optimized, reference, "decode_tok_s"),
        ));
    }
    let peers: Vec<(&str, &Value)> = [("llama.cpp", llama_cpp), ("HF transformers", hf)]
        .into_iter()
        .filter_map(|(name, v)| v.map(|v| (name, v)))
        .collect();
    if !peers.is_empty() {
        out.push_str("\n| optimized / peer (full model) | prefill, f32 | prefill, `--fast-prefill` | decode |\n|---|---|---|---|\n");
        for (name, peer) in peers {
            out.push_str(&format!(
                "| {name} | {:.2}x | {:.2}x | {:.2}x |\n",
                ratio(optimized_full, peer, "prefill_tok_s"),
                ratio(fast_full, peer, "prefill_tok_s"),
                ratio(optimized_full, peer, "decode_tok_s"),
            ));
        }
    }
    out.push_str(&format!(
        "\nThe reference converts every weight (the PLE table included) to f32 in RAM (about 23 GB peak for the \
         full E2B: run with `--reference-full` only on a machine with that much memory{}). It runs on one thread \
         (plain `ndarray`) and computes every position's logits and every layer's positions; the optimized engine's \
         prefill runs the KV-shared layers, the LM head and the last cache-writing layer's queries, attention output \
         and MLP for the last position only (as HF's `logits_to_keep=1`). \
         `--fast-prefill` rounds the prompt's matrix-product inputs to bf16 and multiplies them by the bf16 weights \
         with f32 sums (what torch and llama.cpp do for bf16 weights), on AMX tiles where the CPU has them, else with \
         AVX-512 BF16 `vdpbf16ps`; on this CPU: {}. Decode steps are f32 \
         in both modes. llama.cpp is built here from source with `GGML_NATIVE=ON` (every SIMD extension of this \
         CPU, AVX-512 BF16 included) and runs a bf16 GGUF converted from the same checkpoint; its decode test starts \
         from an empty context (ours after the prompt: 128 more positions to attend over, under 1% of a step).\n\n",
        if reference_full.is_some() { "; this run did" } else { "; this run did not" },
        match fast_prefill_kernel() {
            PrefillKernel::AmxBf16 => "AMX",
            PrefillKernel::Avx512Bf16 => "AVX-512 BF16",
            _ => "neither, so `--fast-prefill` changes nothing",
        },
    ));
    out.push_str(&format!(
        "## Decode bound\n\nMeasured read bandwidth: **{bandwidth:.1} GB/s** on {} threads ({bandwidth_one:.1} GB/s on one; load {bandwidth_load:.2}). \
         One decode step of E2B reads {:.2} GB of bf16 weights (every layer matrix, the PLE projection and the tied \
         LM head; the PLE table only one row per layer), so decode is bounded by **{bound:.2} tok/s**. \
         Measured {decode:.2} tok/s = **{:.0}%** of the bound. Both optimized rows decode with the same f32 code \
         ({decode:.2} and {:.2} tok/s here): their difference is how much this shared machine's memory bandwidth varies \
         between runs, which also bounds how finely the decode speeds of different engines can be ranked.\n\n\
         Because of that, every optimized run also measures the bandwidth right after its decode steps, in the same \
         process, and sets the decode against it: {}.\n\n",
        args.threads,
        weight_bytes / 1e9,
        100.0 * decode / bound,
        f(fast_full, "decode_tok_s"),
        bound_fractions(&[optimized_full, fast_full]),
    ));
    out.push_str(&format!(
        "Peak resident memory of the optimized engine on the full model: {} while the checkpoint is {} on disk: \
         weights are memory-mapped and the PLE table ({}) is read one row per token, so it stays on disk.\n\n",
        gib(f(optimized_full, "peak_rss_bytes")),
        gib(dir_size(&args.model) as f64),
        gib(ple_table_bytes(&args.model) as f64),
    ));
    out.push_str("## Raw results\n\n```\n");
    for v in [
        Some(optimized_full),
        Some(fast_full),
        reference_full,
        Some(optimized_reduced),
        Some(fast_reduced),
        Some(reference_reduced),
        hf,
        llama_cpp,
    ]
    .into_iter()
    .flatten()
    {
        out.push_str(&format!("{v}\n"));
    }
    out.push_str("```\n\n");
    out.push_str(&format!(
        "## Rerun\n\n```sh\ncargo xtask synth --variant e2b --out {}\ncargo xtask synth --variant e2b --layers {reduced_layers} --out {}\ncargo xtask bench --model {} --reduced-model {}{}{}\n```\n\n\
         The Hugging Face and llama.cpp rows need the oracle virtualenv (`~/.cache/gemma4/oracle-venv`, made by `cargo xtask golden`); \
         their scripts are `xtask/scripts/bench_hf.py` and `xtask/scripts/bench_llama_cpp.py` (the latter downloads the pinned \
         `llama-cpp-python` 0.3.36 source package, builds its vendored llama.cpp with `GGML_NATIVE=ON` and converts the checkpoint \
         to a bf16 GGUF, all under `~/.cache/gemma4/llama-cpp`, once). Kernel micro-benchmarks: `cargo bench -p gemma4-optimized`.\n",
        args.model.display(),
        args.reduced_model.display(),
        args.model.display(),
        args.reduced_model.display(),
        if reference_full.is_some() { " --reference-full" } else { "" },
        if args.rounds > 1 { format!(" --rounds {}", args.rounds) } else { String::new() },
    ));
    out
}

/// CPU model, core count and the SIMD extensions that matter here, from /proc/cpuinfo.
pub(crate) fn cpu_description() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = info.lines().filter(|l| l.starts_with("processor")).count();
    let flags: Vec<&str> = info
        .lines()
        .find_map(|l| l.strip_prefix("flags"))
        .map(|f| f.split_whitespace().collect())
        .unwrap_or_default();
    let has = |f: &str| flags.contains(&f);
    let extensions: Vec<&str> = ["avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_bf16"]
        .into_iter()
        .filter(|f| has(f))
        .collect();
    let decode = if gemma4_optimized::simd::prefers_avx512_gemv() {
        "AVX-512F"
    } else {
        "AVX2 + FMA + F16C"
    };
    let prefill = match fast_prefill_kernel() {
        PrefillKernel::AmxBf16 => "AVX-512F prefill GEMM (AMX with `--fast-prefill`)",
        PrefillKernel::Avx512Bf16 => "AVX-512F prefill GEMM (AVX-512 BF16 with `--fast-prefill`)",
        PrefillKernel::Avx512 => "AVX-512F prefill GEMM",
        PrefillKernel::GemmCrate => "the `gemm` crate's prefill GEMM",
    };
    format!(
        "{cores} vCPU {model}, {}; the engine uses its {decode} decode kernel and the {prefill}",
        extensions.join(" ")
    )
}

/// This process's nice value (field 19 of /proc/self/stat).
pub(crate) fn own_niceness() -> i64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let after = s.rsplit_once(')')?.1.to_string();
            after.split_whitespace().nth(16)?.parse().ok()
        })
        .unwrap_or(0)
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn ple_table_bytes(dir: &Path) -> u64 {
    gemma4_reference::ModelConfig::from_dir(dir).map_or(0, |c| {
        (c.text.vocab_size_per_layer_input
            * c.text.num_hidden_layers
            * c.text.hidden_size_per_layer_input
            * 2) as u64
    })
}

/// The kernel that `--fast-prefill` products of bf16 weights run on here.
fn fast_prefill_kernel() -> PrefillKernel {
    PrefillKernel::select(WeightDtype::BF16, Precision::Bf16Activations)
}
