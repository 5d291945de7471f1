//! The fuzz targets' entry points (`fuzz/harness.rs`), replayed on stable Rust by `cargo test`:
//! every committed seed (`fuzz/seeds/<target>/`) and every input that once crashed a target
//! (`tests/data/fuzz_regressions/<target>/`, one file per finding, named after the bug).
//! Fuzzing itself never runs here (`cargo xtask fuzz`, docs/robustness.md).

#[path = "../fuzz/harness.rs"]
mod harness;

use std::path::{Path, PathBuf};

/// A fuzz target: its name and its entry point.
type Target = (&'static str, fn(&[u8]));

const TARGETS: [Target; 8] = [
    ("safetensors_file", harness::safetensors_file),
    ("config_json", harness::config_json),
    ("shard_index", harness::shard_index),
    ("activation_dump", harness::activation_dump),
    ("checkpoint_forward", harness::checkpoint_forward),
    ("forward_generated", harness::forward_generated),
    ("image_decode", harness::image_decode),
    ("wav_decode", harness::wav_decode),
];

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(|e| Some(e.ok()?.path())).collect())
        .unwrap_or_default();
    files.sort();
    files
}

/// Runs every file of `<root>/<target>/` through its target; returns how many ran.
fn replay(root: &Path) -> usize {
    let mut count = 0;
    for (target, entry_point) in TARGETS {
        for file in files_in(&root.join(target)) {
            let bytes = std::fs::read(&file).expect("readable");
            let outcome = std::panic::catch_unwind(|| entry_point(&bytes));
            assert!(
                outcome.is_ok(),
                "{target}: {} panicked (see the message above)",
                file.display()
            );
            count += 1;
        }
    }
    count
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn fuzz_seeds_replay_without_panic() {
    let count = replay(&repo().join("fuzz/seeds"));
    assert!(count >= 25, "only {count} seeds found under fuzz/seeds");
}

#[test]
fn fuzz_findings_replay_without_panic() {
    let count = replay(&repo().join("tests/data/fuzz_regressions"));
    assert!(count > 0, "no finding under tests/data/fuzz_regressions");
}

#[test]
fn fuzz_seeds_tiny_checkpoints_load_and_run() {
    // The forward-pass seeds must reach the forward pass, or fuzzing it mutates nothing useful.
    for file in files_in(&repo().join("fuzz/seeds/checkpoint_forward")) {
        let bytes = std::fs::read(&file).expect("readable");
        let (config, weights) = harness::split_checkpoint_input(&bytes).expect("a split input");
        let value: serde_json::Value = serde_json::from_slice(config).expect("config JSON");
        let config = gemma4_reference::ModelConfig::from_json(&value, Path::new("config.json"))
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let safetensors = gemma4_reference::checkpoint::SafetensorsFile::from_bytes(
            Path::new("model.safetensors"),
            weights.to_vec(),
        )
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let checkpoint = gemma4_reference::checkpoint::Checkpoint::from_files(
            Path::new("tiny"),
            vec![safetensors],
        )
        .expect("one file");
        let model = gemma4_reference::Gemma4TextModel::from_checkpoint(
            config,
            checkpoint,
            gemma4_reference::weight_stream::Residence::InMemory,
        )
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let dump = model
            .dump(&[1, 2, 3], 1)
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(
            dump.get("logits").is_some(),
            "{}: no logits",
            file.display()
        );
    }
}

#[test]
fn fuzz_seeds_images_and_wavs_decode_unless_named_refused() {
    // The decoder seeds must reach the pixels and samples (and the preprocessing and features
    // behind them), or fuzzing mutates only headers; the damaged ones must be refused.
    let refused = |file: &Path| {
        let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
        name.starts_with("damaged-") || name.starts_with("refused-")
    };
    let mut decoded = 0;
    for file in files_in(&repo().join("fuzz/seeds/image_decode")) {
        let bytes = std::fs::read(&file).expect("readable");
        let outcome = gemma4_reference::vision::preprocessing::decode_image(&bytes, &file);
        match (outcome, refused(&file)) {
            (Ok(_), false) | (Err(_), true) => decoded += 1,
            (Ok(image), true) => panic!(
                "{}: decoded ({}x{}), expected an error",
                file.display(),
                image.width,
                image.height
            ),
            (Err(e), false) => panic!("{}: {e}", file.display()),
        }
    }
    for file in files_in(&repo().join("fuzz/seeds/wav_decode")) {
        let bytes = std::fs::read(&file).expect("readable");
        match (
            gemma4_reference::audio::wav::decode_wav(&bytes, &file),
            refused(&file),
        ) {
            (Ok(_), false) | (Err(_), true) => decoded += 1,
            (Ok(wave), true) => panic!(
                "{}: decoded {} samples, expected an error",
                file.display(),
                wave.samples.len()
            ),
            (Err(e), false) => panic!("{}: {e}", file.display()),
        }
    }
    assert!(decoded >= 40, "only {decoded} image and WAV seeds found");
}
