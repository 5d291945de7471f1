//! `cargo xtask memory --variant e2b|e4b|31b|26b-a4b [--layers N] [--in-memory-too]`: verifies
//! a real-dimension checkpoint the way a port author would on a workstation, and records what it
//! cost.
//!
//! 1. `cargo xtask synth` writes the variant at real dimensions (random bf16 weights) into
//!    `--dir` (default `target/memory/<variant>[-<N>l]`), unless a checkpoint is already there;
//! 2. `gemma4 dump --weights streamed` (the layer-streamed reference) dumps a `--tokens`-token
//!    prompt (default 128) with `--decode` greedy steps (default 4); its wall time and peak
//!    resident memory (the `VmHWM` it prints) are recorded, with the plan's predicted peak;
//! 3. `gemma4 dump --engine optimized` dumps the same, and `gemma4 compare` judges it against
//!    the reference's dump with the conformance tolerances;
//! 4. with `--in-memory-too`, the in-memory reference dumps it too, and the two reference dumps
//!    must be equal bit for bit;
//! 5. the row of this run replaces the variant's row in docs/performance.md (after the marker
//!    `<!-- cargo xtask memory: rows below -->`).
//!
//! Too big for CI (tens of GB of disk, minutes to hours); CI tests the same path on the golden
//! models and a synthetic model whose memory limit forces streaming (`tests/streaming.rs`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use gemma4_reference::ActivationDump;

use crate::process::repo_root;
use crate::synth::{self, SynthArgs};

/// Arguments of `cargo xtask memory`.
#[derive(Debug, clap::Args)]
pub struct MemoryArgs {
    /// e2b, e4b, 31b or 26b-a4b.
    #[arg(long)]
    pub variant: String,
    /// Keep only the first N layers (default: all; the disk must hold the bf16 checkpoint).
    #[arg(long)]
    pub layers: Option<usize>,
    /// Where the checkpoint is (or is written). Default: target/memory/VARIANT[-Nl] (e.g. target/memory/31b-30l).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Prompt length.
    #[arg(long, default_value_t = 128)]
    pub tokens: usize,
    /// Greedy decode steps.
    #[arg(long, default_value_t = 4)]
    pub decode: usize,
    /// Also dump with the weights in memory and check the two reference dumps are identical.
    #[arg(long)]
    pub in_memory_too: bool,
    /// Skip the optimized engine's dump and the comparison.
    #[arg(long)]
    pub no_optimized: bool,
    /// Delete the checkpoint afterwards (it is tens of GB).
    #[arg(long)]
    pub delete: bool,
}

/// One measured dump.
struct Run {
    seconds: f64,
    peak: String,
    planned: Option<String>,
}

pub fn run(args: &MemoryArgs) -> Result<(), String> {
    let root = repo_root();
    let name = match args.layers {
        Some(layers) => format!("{}-{layers}l", args.variant),
        None => args.variant.clone(),
    };
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| root.join("target/memory").join(&name));
    if !dir.join("config.json").exists() {
        synth::run(&SynthArgs {
            variant: args.variant.clone(),
            layers: args.layers,
            towers: false,
            vision_layers: None,
            audio_layers: None,
            out: dir.clone(),
            dtype: "bf16".into(),
            seed: 4,
        })?;
    }
    build_cli(&root)?;
    let binary = root.join("target/release/gemma4");
    let scratch = dir.join("dumps");
    std::fs::create_dir_all(&scratch).map_err(|e| format!("{}: {e}", scratch.display()))?;
    let tokens = prompt_tokens(&dir, args.tokens)?;

    let reference_out = scratch.join("reference_streamed.safetensors");
    let streamed = dump(
        &binary,
        &dir,
        &tokens,
        args.decode,
        &["--weights", "streamed"],
        &reference_out,
    )?;
    let checkpoint_bytes = checkpoint_bytes(&dir)?;
    let mut notes = Vec::new();

    let optimized = if args.no_optimized {
        None
    } else {
        let out = scratch.join("optimized.safetensors");
        let run = dump(
            &binary,
            &dir,
            &tokens,
            args.decode,
            &["--engine", "optimized"],
            &out,
        )?;
        let verdict = compare(&binary, &dir, &tokens, &out)?;
        notes.push(verdict);
        Some(run)
    };
    let in_memory = if args.in_memory_too {
        let out = scratch.join("reference_in_memory.safetensors");
        let run = dump(
            &binary,
            &dir,
            &tokens,
            args.decode,
            &["--weights", "in-memory"],
            &out,
        )?;
        notes.push(identical(&reference_out, &out)?);
        Some(run)
    } else {
        None
    };

    let row = format!(
        "| {name} | {:.1} GB | {} | {:.0} s | {} | {} | {} | {} |",
        checkpoint_bytes as f64 / 1e9,
        streamed.peak,
        streamed.seconds,
        streamed.planned.as_deref().unwrap_or("?"),
        in_memory
            .as_ref()
            .map_or("not run".to_string(), |r| format!(
                "{} in {:.0} s",
                r.peak, r.seconds
            )),
        optimized
            .as_ref()
            .map_or("not run".to_string(), |r| format!(
                "{} in {:.0} s",
                r.peak, r.seconds
            )),
        notes.join("; "),
    );
    eprintln!("{row}");
    write_row(&root.join("docs/performance.md"), &name, &row)?;
    if args.delete {
        std::fs::remove_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    Ok(())
}

/// `cargo build --release --bin gemma4`.
fn build_cli(root: &Path) -> Result<(), String> {
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "--bin", "gemma4"])
        .current_dir(root)
        .status()
        .map_err(|e| format!("cargo build: {e}"))?;
    status
        .success()
        .then_some(())
        .ok_or_else(|| format!("cargo build --release --bin gemma4: {status}"))
}

/// A deterministic prompt: BOS, then ids spread over the vocabulary (a linear congruential
/// sequence, so that the embedding and PLE rows read are scattered over the tables).
fn prompt_tokens(dir: &Path, count: usize) -> Result<String, String> {
    let config = gemma4_reference::ModelConfig::from_dir(dir).map_err(|e| e.to_string())?;
    let vocab = config.text.vocab_size as u64;
    let mut state = 12345u64;
    let mut ids = vec![2u64];
    while ids.len() < count {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ids.push(3 + (state >> 33) % (vocab - 3));
    }
    Ok(ids.iter().map(u64::to_string).collect::<Vec<_>>().join(","))
}

/// Runs one `gemma4 dump` and reads its peak memory and plan from stderr.
fn dump(
    binary: &Path,
    dir: &Path,
    tokens: &str,
    decode: usize,
    extra: &[&str],
    out: &Path,
) -> Result<Run, String> {
    let started = Instant::now();
    let decode = decode.to_string();
    let mut command = Command::new(binary);
    command
        .arg("dump")
        .arg("--model")
        .arg(dir)
        .args(["--tokens", tokens, "--decode", &decode])
        .args(extra)
        .arg("--out")
        .arg(out);
    eprintln!("xtask memory: gemma4 dump {}", extra.join(" "));
    let output = command.output().map_err(|e| format!("{binary:?}: {e}"))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprint!("{stderr}");
    if !output.status.success() {
        return Err(format!("gemma4 dump {} failed: {stderr}", extra.join(" ")));
    }
    let after = |marker: &str| {
        stderr.lines().find_map(|l| {
            l.split_once(marker)
                .map(|(_, rest)| rest.trim().to_string())
        })
    };
    Ok(Run {
        seconds: started.elapsed().as_secs_f64(),
        peak: after("peak resident memory").unwrap_or_else(|| "?".into()),
        planned: after("planned peak")
            .map(|rest| rest.split(" (").next().unwrap_or(&rest).to_string()),
    })
}

/// `gemma4 compare --model DIR --weights streamed --candidate optimized` (the streamed reference
/// recomputes the expected dump, with its float-noise probes): the verdict in words.
fn compare(binary: &Path, dir: &Path, tokens: &str, candidate: &Path) -> Result<String, String> {
    eprintln!("xtask memory: gemma4 compare --model --weights streamed");
    let output = Command::new(binary)
        .arg("compare")
        .arg("--model")
        .arg(dir)
        .args(["--tokens", tokens, "--weights", "streamed"])
        .arg("--candidate")
        .arg(candidate)
        .arg("--json")
        .output()
        .map_err(|e| format!("{binary:?}: {e}"))?;
    eprint!("{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).map_err(|e| {
        format!(
            "gemma4 compare printed no report ({e}): {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })?;
    let logits = report["tensors"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["name"] == "logits"))
        .and_then(|t| t["max_rel"].as_f64())
        .map_or(String::new(), |r| format!(", logits max rel {r:.1e}"));
    let within_noise = report["tensors"].as_array().map_or(0, |tensors| {
        tensors
            .iter()
            .filter(|t| t["status"] == "within_noise")
            .count()
    });
    Ok(if report["conformant"] == true {
        format!(
            "optimized conformant to the streamed reference ({} tensors, {within_noise} of them \
             beyond the fixed tolerance but within the model's float-noise envelope{logits})",
            report["compared"]
        )
    } else {
        format!(
            "optimized NOT conformant: first divergence {}{logits}",
            report["first_divergence"]
        )
    })
}

/// Are two dumps equal bit for bit? The verdict in words (an error if they are not).
fn identical(a: &Path, b: &Path) -> Result<String, String> {
    let read = |p: &Path| ActivationDump::read(p).map_err(|e| e.to_string());
    let (a, b) = (read(a)?, read(b)?);
    if a.names_in_model_order() != b.names_in_model_order() {
        return Err("the streamed and in-memory dumps hold different tensors".into());
    }
    for name in a.names_in_model_order() {
        let same = match (a.get(name).unwrap().as_f32(), b.get(name).unwrap().as_f32()) {
            (Some(x), Some(y)) => {
                x.shape() == y.shape()
                    && x.iter()
                        .zip(y.iter())
                        .all(|(p, q)| p.to_bits() == q.to_bits())
            }
            _ => a.get(name) == b.get(name),
        };
        if !same {
            return Err(format!(
                "`{name}` differs between the streamed and in-memory reference dumps"
            ));
        }
    }
    Ok(format!(
        "streamed = in-memory bit for bit ({} tensors)",
        a.len()
    ))
}

/// Bytes of the checkpoint's safetensors files.
fn checkpoint_bytes(dir: &Path) -> Result<u64, String> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let entry = entry.map_err(|e| e.to_string())?;
        if entry.path().extension().is_some_and(|e| e == "safetensors") {
            total += entry.metadata().map_err(|e| e.to_string())?.len();
        }
    }
    Ok(total)
}

const MARKER: &str = "<!-- cargo xtask memory: rows below -->";
const HEADER: &str = "| checkpoint | size (bf16) | reference streamed: peak RSS | time | planned peak | reference in memory | optimized (mapped) | verdicts |\n|---|---|---|---|---|---|---|---|";

/// Replaces (or adds) the row of `name` under the marker of `doc`.
fn write_row(doc: &Path, name: &str, row: &str) -> Result<(), String> {
    let text = std::fs::read_to_string(doc).map_err(|e| format!("{}: {e}", doc.display()))?;
    let (before, after) = match text.split_once(MARKER) {
        Some((before, after)) => (before.to_string(), after.to_string()),
        None => (text.clone() + "\n", String::new()),
    };
    let mut rows: Vec<String> = after
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| checkpoint"))
        .map(str::to_string)
        .collect();
    let rest: String = after
        .lines()
        .skip_while(|l| l.trim().is_empty() || l.starts_with('|'))
        .map(|l| format!("{l}\n"))
        .collect();
    let prefix = format!("| {name} |");
    rows.retain(|r| !r.starts_with(&prefix));
    rows.push(row.to_string());
    let table = format!("{MARKER}\n\n{HEADER}\n{}\n", rows.join("\n"));
    let text = format!(
        "{before}{table}{}{rest}",
        if rest.is_empty() { "" } else { "\n" }
    );
    std::fs::write(doc, text).map_err(|e| format!("{}: {e}", doc.display()))
}
