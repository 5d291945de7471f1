//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// The text-only golden cases, one or two per family: Hugging Face's dumps made in float32
/// except `e2b_bf16` (a bf16 computation) and `e4b_bf16_as_f32` (a bf16 checkpoint loaded in
/// float32).
pub const TEXT_CASES: [&str; 6] = [
    "e2b_like",
    "e4b_like",
    "31b_like",
    "26b_a4b_like",
    "e2b_bf16",
    "e4b_bf16_as_f32",
];

/// Only `logits`, `decode_logits` and `greedy_continuation` of a dump: what most runtimes
/// expose.
pub fn logits_only(dump: &gemma4_reference::ActivationDump) -> gemma4_reference::ActivationDump {
    let mut partial = gemma4_reference::ActivationDump::new();
    for name in ["logits", "decode_logits", "greedy_continuation"] {
        if let Some(tensor) = dump.get(name) {
            partial.insert(name, tensor.clone());
        }
    }
    partial
}

/// The bundled golden case called `name` (panics naming it if there is none).
pub fn golden_case(name: &str) -> gemma4::golden::GoldenCase {
    gemma4::golden::load_cases(&golden_dir())
        .expect("golden manifest and fixtures are intact")
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no golden case {name}"))
}

/// `golden/` next to the sources.
pub fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("golden")
}

/// `tests/data/` next to the sources.
pub fn test_data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("data")
}

/// The model directory of a golden case.
pub fn golden_model(case: &str) -> PathBuf {
    golden_dir().join(case).join("model")
}

/// Copies a golden model directory into a fresh temporary directory.
pub fn copy_golden_model(case: &str) -> tempfile::TempDir {
    let temporary = tempfile::tempdir().expect("temporary directory");
    for entry in std::fs::read_dir(golden_model(case)).expect("golden model exists") {
        let entry = entry.expect("directory entry");
        std::fs::copy(entry.path(), temporary.path().join(entry.file_name())).expect("copy");
    }
    temporary
}

/// Reads a JSON file.
pub fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).expect("readable")).expect("valid JSON")
}

/// Writes a JSON value.
pub fn write_json(path: &Path, value: &Value) {
    std::fs::write(
        path,
        serde_json::to_vec_pretty(value).expect("serialisable"),
    )
    .expect("writable");
}

/// A safetensors file taken apart: its header JSON and its data section, to be damaged on purpose.
pub struct RawSafetensors {
    pub header: Map<String, Value>,
    pub data: Vec<u8>,
}

impl RawSafetensors {
    pub fn read(path: &Path) -> Self {
        let bytes = std::fs::read(path).expect("readable");
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: Value = serde_json::from_slice(&bytes[8..8 + n]).expect("valid header");
        RawSafetensors {
            header: header.as_object().expect("object").clone(),
            data: bytes[8 + n..].to_vec(),
        }
    }

    /// The bytes of the file (header padded with spaces to a multiple of 8, like the writer).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut header =
            serde_json::to_vec(&Value::Object(self.header.clone())).expect("serialisable");
        while !header.len().is_multiple_of(8) {
            header.push(b' ');
        }
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&header);
        bytes.extend_from_slice(&self.data);
        bytes
    }

    pub fn write(&self, path: &Path) {
        std::fs::write(path, self.to_bytes()).expect("writable");
    }

    pub fn tensor_names(&self) -> Vec<String> {
        self.header
            .keys()
            .filter(|k| *k != "__metadata__")
            .cloned()
            .collect()
    }

    /// The first tensor name ending with `suffix`.
    pub fn find(&self, suffix: &str) -> String {
        self.tensor_names()
            .into_iter()
            .find(|n| n.ends_with(suffix))
            .unwrap_or_else(|| panic!("no tensor ending with {suffix}"))
    }

    pub fn offsets(&self, name: &str) -> (usize, usize) {
        let offsets = self.header[name]["data_offsets"].as_array().unwrap();
        (
            offsets[0].as_u64().unwrap() as usize,
            offsets[1].as_u64().unwrap() as usize,
        )
    }

    /// Removes a tensor and its bytes, shifting later offsets (a well-formed file without it).
    pub fn remove(&mut self, name: &str) {
        let (start, end) = self.offsets(name);
        self.header.remove(name);
        self.data.drain(start..end);
        let removed = end - start;
        for (key, info) in self.header.iter_mut() {
            if key == "__metadata__" {
                continue;
            }
            let offsets = info["data_offsets"].as_array_mut().unwrap();
            for offset in offsets.iter_mut() {
                let value = offset.as_u64().unwrap() as usize;
                if value >= end {
                    *offset = Value::from(value - removed);
                }
            }
        }
    }

    /// Replaces (or adds) a tensor with this dtype, shape and bytes, keeping the file well formed.
    pub fn replace(&mut self, name: &str, dtype: &str, shape: &[usize], bytes: Vec<u8>) {
        if self.header.contains_key(name) {
            self.remove(name);
        }
        let start = self.data.len();
        self.data.extend_from_slice(&bytes);
        self.header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [start, start + bytes.len()]}),
        );
    }

    pub fn shape(&self, name: &str) -> Vec<usize> {
        self.header[name]["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect()
    }
}

/// Asserts that `incremental` (rows of `columns` values) equals `full` within `tolerance` of the
/// largest magnitude in `full`; on failure names the worst element as `[row, column]`. A NaN on
/// either side fails.
pub fn assert_rows_close(
    what: &str,
    tolerance: f32,
    columns: usize,
    full: &[f32],
    incremental: &[f32],
) {
    assert_eq!(full.len(), incremental.len(), "{what}: lengths differ");
    let scale = full.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let mut worst = (0.0f32, 0usize);
    for (i, (a, b)) in full.iter().zip(incremental).enumerate() {
        if (a - b).abs() > worst.0 || (a - b).is_nan() {
            worst = ((a - b).abs(), i);
        }
    }
    assert!(
        worst.0 <= tolerance * scale,
        "{what}: incremental differs from the full forward by {:.3e} (relative {:.3e}) at [{}, {}]: full {}, incremental {}",
        worst.0,
        worst.0 / scale,
        worst.1 / columns,
        worst.1 % columns,
        full[worst.1],
        incremental[worst.1]
    );
}

/// Runs the `gemma4` binary with `args` and the extra environment variables `env`; returns its
/// exit code (-1 if a signal ended it), stdout and stderr.
pub fn run_gemma4(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_gemma4"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("gemma4 runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The shortest prefill of `tokens` after which feeding the rest one token at a time splits no
/// bidirectional image block (multimodal spec §3.3): a block attends to its own later tokens,
/// so a prefill that cuts one computes something else than the full forward (Hugging Face
/// too). 1 for models without bidirectional blocks.
pub fn smallest_unsplit_prefill(config: &gemma4_reference::ModelConfig, tokens: &[usize]) -> usize {
    let bidirectional = config.text.use_bidirectional_attention.as_deref() == Some("vision");
    let last_block_end = config
        .special_tokens
        .image_token_id
        .filter(|_| bidirectional)
        .and_then(|id| {
            gemma4_reference::merge::placeholder_runs(tokens, id)
                .last()
                .map(|r| r.end)
        });
    last_block_end.unwrap_or(1).max(1)
}

/// `split` moved to the end of the bidirectional image block it cuts, if it cuts one (see
/// [`smallest_unsplit_prefill`]); unchanged otherwise and for models without such blocks.
pub fn split_outside_image_blocks(
    config: &gemma4_reference::ModelConfig,
    tokens: &[usize],
    split: usize,
) -> usize {
    if config.text.use_bidirectional_attention.as_deref() != Some("vision") {
        return split;
    }
    let Some(id) = config.special_tokens.image_token_id else {
        return split;
    };
    gemma4_reference::merge::placeholder_runs(tokens, id)
        .into_iter()
        .find(|run| run.start < split && split < run.end)
        .map_or(split, |run| run.end)
}
