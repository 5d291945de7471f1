//! Times prefill passes of a checkpoint (for `perf record`): loads the model, warms up with one
//! pass, then runs `--runs` prefills of a random prompt and prints each pass's time.
//!
//! `cargo run --release -p gemma4-optimized --example prefill_profile -- MODEL_DIR [PROMPT] [RUNS] [THREADS] [f32|bf16]`

use std::time::Instant;

use gemma4_optimized::linear::Precision;
use gemma4_optimized::{Gemma4Optimized, Logits};
use gemma4_reference::dump::Recorder;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(&args[1]);
    let prompt: usize = args.get(2).map_or(128, |s| s.parse().unwrap());
    let runs: usize = args.get(3).map_or(3, |s| s.parse().unwrap());
    let threads: usize = args.get(4).map_or(2, |s| s.parse().unwrap());
    let precision = match args.get(5).map(String::as_str) {
        Some("bf16") => Precision::Bf16Activations,
        _ => Precision::F32,
    };
    let model = Gemma4Optimized::load_with_threads(&dir, Some(threads))
        .unwrap()
        .with_precision(precision);
    let vocab = model.config.text.vocab_size;
    let ids: Vec<usize> = gemma4_optimized::synthetic::random_values(prompt, 2026, 1.0)
        .iter()
        .map(|v| 3 + ((v.abs() * (vocab - 3) as f32) as usize).min(vocab - 4))
        .collect();
    for run in 0..=runs {
        let mut cache = model.new_cache();
        let t0 = Instant::now();
        let logits = model
            .forward(
                &ids,
                &mut cache,
                &mut Recorder::checking_only(),
                Logits::Last,
            )
            .unwrap();
        let s = t0.elapsed().as_secs_f64();
        println!(
            "{} {run}: prefill {:.4} s = {:.1} tok/s (argmax {})",
            if run == 0 { "warm-up" } else { "run" },
            s,
            prompt as f64 / s,
            gemma4_optimized::model::argmax(&logits)
        );
    }
}
