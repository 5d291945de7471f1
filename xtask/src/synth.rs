//! `cargo xtask synth --variant e2b|e4b|31b|26b-a4b [--layers N] [--towers] --out DIR [--dtype bf16]`:
//! a random-weight checkpoint with the real dimensions of a released model, for benchmarks.
//!
//! The config comes from `tests/data/released/<variant>/config.json` (as a `Gemma4ForCausalLM`
//! config, optionally cut to `N` layers; with `--towers` a `Gemma4ForConditionalGeneration` with
//! the vision tower and, for E2B/E4B, the audio tower at their real dimensions, optionally cut to
//! `--vision-layers` / `--audio-layers`; the tower benchmarks use `--towers --layers 1`); the weights are streamed to disk by
//! `gemma4_optimized::synthetic::write_checkpoint` (never the whole model in memory; temporary
//! names renamed into place). Full E2B is about 10 GB, mostly the PLE table: write it outside the
//! repository (e.g. `/work/bench-data/e2b` or `~/.cache/gemma4/e2b`).

use std::path::PathBuf;

use gemma4_optimized::synthetic::{
    released_config_with_towers, released_text_config, write_checkpoint, TowerLayers,
};
use gemma4_reference::checkpoint::WeightDtype;

use crate::process::repo_root;

/// Arguments of `cargo xtask synth`.
#[derive(Debug, clap::Args)]
pub struct SynthArgs {
    /// Which released model's dimensions: e2b, e4b, 31b or 26b-a4b.
    #[arg(long)]
    pub variant: String,
    /// Keep only the first N layers (default: all).
    #[arg(long)]
    pub layers: Option<usize>,
    /// Also write the vision tower and, for E2B/E4B, the audio tower (a
    /// `Gemma4ForConditionalGeneration` checkpoint).
    #[arg(long)]
    pub towers: bool,
    /// With --towers: keep only the first N vision layers (default: all).
    #[arg(long, requires = "towers")]
    pub vision_layers: Option<usize>,
    /// With --towers: keep only the first N audio layers (default: all).
    #[arg(long, requires = "towers")]
    pub audio_layers: Option<usize>,
    /// Output directory (config.json + model.safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Weight dtype: bf16 (default), f16 or f32.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 4)]
    pub seed: u64,
}

pub fn run(args: &SynthArgs) -> Result<(), String> {
    let variants = ["e2b", "e4b", "31b", "26b-a4b"];
    if !variants.contains(&args.variant.as_str()) {
        return Err(format!(
            "--variant {}: expected one of {}",
            args.variant,
            variants.join(", ")
        ));
    }
    let dtype = match args.dtype.as_str() {
        "bf16" => WeightDtype::BF16,
        "f16" => WeightDtype::F16,
        "f32" => WeightDtype::F32,
        other => return Err(format!("--dtype {other}: expected bf16, f16 or f32")),
    };
    let path = repo_root()
        .join("tests/data/released")
        .join(&args.variant)
        .join("config.json");
    let released: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?,
    )
    .map_err(|e| format!("{}: {e}", path.display()))?;
    let config = if args.towers {
        let towers = TowerLayers {
            vision: args.vision_layers,
            audio: args.audio_layers,
        };
        released_config_with_towers(&released, args.layers, towers)
    } else {
        released_text_config(&released, args.layers)
    };
    let layers =
        |c: &serde_json::Value| c.get("text_config").unwrap_or(c)["num_hidden_layers"].clone();
    let started = std::time::Instant::now();
    eprintln!(
        "xtask synth: writing {} ({} layers{}, {:?}) to {}",
        args.variant,
        layers(&config),
        if args.towers { " and the towers" } else { "" },
        dtype,
        args.out.display()
    );
    let bytes =
        write_checkpoint(&args.out, &config, dtype, args.seed).map_err(|e| e.to_string())?;
    eprintln!(
        "xtask synth: wrote {:.2} GB in {:.1} s",
        bytes as f64 / 1e9,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
