//! The fuzz entry points: one function per parser of user files, shared by the `cargo fuzz`
//! targets (`fuzz/fuzz_targets/*.rs`) and by the regression tests (`tests/fuzz_regressions.rs`),
//! which replay every committed seed and every input that once crashed, on stable Rust.
//!
//! Each function takes arbitrary bytes and must return without panicking, hanging or allocating
//! absurdly. Beyond "no panic", each checks the properties that make the tool trustworthy:
//! errors name the file they are about, accepted inputs are internally consistent, and a
//! non-finite candidate is never judged conformant.

#![allow(dead_code)]

use std::path::Path;

use gemma4::comparison::{
    compare_dumps, depth_of, layers_in_dump, tolerance_for, Precision, Status,
};
use gemma4::inspect::{format_inspection, inspect_config};
use gemma4_reference::checkpoint::{text_tensor_specs, Checkpoint, SafetensorsFile, ShardIndex};
use gemma4_reference::config::MAX_TENSOR_ELEMENTS;
use gemma4_reference::dump::{ActivationDump, DumpTensor};
use gemma4_reference::{Gemma4TextModel, ModelConfig, ModelPlan};

/// The label every in-memory input carries, so that errors can be checked for naming it.
const SAFETENSORS_PATH: &str = "fuzz-input.safetensors";
const CONFIG_PATH: &str = "fuzz-input/config.json";
const INDEX_PATH: &str = "fuzz-input/model.safetensors.index.json";

/// A golden activation dump, the "expected" side when fuzzing candidate dumps.
const EXPECTED_DUMP: &[u8] = include_bytes!("../golden/e2b_bf16/expected.safetensors");

/// The bytes of a safetensors file: its little-endian `u64` header length, the header JSON
/// (padded with spaces to a multiple of 8 bytes), then the data section.
fn safetensors_bytes(header: serde_json::Map<String, serde_json::Value>, data: &[u8]) -> Vec<u8> {
    let mut json = serde_json::to_vec(&serde_json::Value::Object(header)).expect("json");
    json.resize(json.len().div_ceil(8) * 8, b' ');
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&json);
    bytes.extend_from_slice(data);
    bytes
}

/// Asserts that an error message names the file it is about.
fn assert_names(message: &str, what: &str) {
    assert!(
        message.contains(what),
        "error message {message:?} does not name {what:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// safetensors files (weights and dumps share the parser)
// ---------------------------------------------------------------------------------------------

/// A safetensors file: header validation, then every tensor's bytes and its f32 conversion.
pub fn safetensors_file(data: &[u8]) {
    let path = Path::new(SAFETENSORS_PATH);
    let file = match SafetensorsFile::from_bytes(path, data.to_vec()) {
        Ok(file) => file,
        Err(e) => return assert_names(&e.to_string(), SAFETENSORS_PATH),
    };
    let mut tensors: Vec<(String, Vec<usize>)> = Vec::new();
    for name in file.names() {
        let (dtype, shape) = file.info(name).expect("a listed tensor has info");
        let bytes = file.bytes(name).expect("a validated tensor has bytes");
        let elements = shape.iter().map(|&n| n as u128).product::<u128>();
        assert_eq!(
            bytes.len() as u128 * 8,
            elements * dtype.bitsize() as u128,
            "tensor {name}: byte range disagrees with shape {shape:?} x {dtype:?}"
        );
        tensors.push((name.to_string(), shape.to_vec()));
    }
    // Every tensor through the weight loader, with its own shape.
    let checkpoint = Checkpoint::from_files(Path::new("fuzz-input"), vec![file])
        .expect("one file has no duplicate names");
    for (name, shape) in tensors {
        match checkpoint.load_f32(&name, &shape) {
            Ok((array, _)) => {
                assert_eq!(array.shape(), shape.as_slice());
                assert!(
                    array.iter().all(|v| v.is_finite()),
                    "{name}: non-finite weight accepted"
                );
            }
            Err(e) => assert_names(&e.to_string(), &name),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// config.json
// ---------------------------------------------------------------------------------------------

/// `config.json`: parsing and validation, then everything `gemma4 inspect` derives from it.
pub fn config_json(data: &[u8]) {
    let path = Path::new(CONFIG_PATH);
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let config = match ModelConfig::from_json(&value, path) {
        Ok(config) => config,
        Err(e) => return assert_names(&e.to_string(), CONFIG_PATH),
    };
    let text = &config.text;
    let plan = ModelPlan::from_config(text);
    assert_eq!(plan.layers.len(), text.num_hidden_layers);
    for layer in &plan.layers {
        assert!(
            layer.kv_layer() <= layer.index,
            "layer {} reads a later layer's cache",
            layer.index
        );
        assert_eq!(
            plan.layers[layer.kv_layer()].attention_type,
            layer.attention_type
        );
    }
    for spec in text_tensor_specs(text, &plan) {
        let elements = spec.shape.iter().map(|&n| n as u128).product::<u128>();
        assert!(
            elements <= MAX_TENSOR_ELEMENTS as u128,
            "{}: {:?} passed validation",
            spec.name,
            spec.shape
        );
    }
    let inspection = inspect_config(config.clone());
    let _ = format_inspection(&inspection);
    serde_json::to_string(&inspection).expect("an inspection serialises");
}

// ---------------------------------------------------------------------------------------------
// model.safetensors.index.json
// ---------------------------------------------------------------------------------------------

/// Two tiny shards the fuzzed index is checked against.
fn fixed_shards() -> Vec<SafetensorsFile> {
    let shard = |name: &str, tensors: &[&str]| {
        let mut header = serde_json::Map::new();
        for (i, tensor) in tensors.iter().enumerate() {
            header.insert(
                tensor.to_string(),
                serde_json::json!({"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}),
            );
        }
        let bytes = safetensors_bytes(header, &vec![0u8; 4 * tensors.len()]);
        SafetensorsFile::from_bytes(Path::new(name), bytes).expect("a valid shard")
    };
    vec![
        shard(
            "model-00001-of-00002.safetensors",
            &["model.embed_tokens.weight", "model.norm.weight"],
        ),
        shard(
            "model-00002-of-00002.safetensors",
            &["model.layers.0.input_layernorm.weight"],
        ),
    ]
}

/// `model.safetensors.index.json`: parsing, then the cross-check against two fixed shards.
pub fn shard_index(data: &[u8]) {
    let path = Path::new(INDEX_PATH);
    let index = match ShardIndex::parse(data, path) {
        Ok(index) => index,
        Err(e) => return assert_names(&e.to_string(), INDEX_PATH),
    };
    let shards = index.shard_names();
    assert!(!shards.is_empty(), "an accepted index names a shard");
    for shard in shards {
        assert!(
            !shard.is_empty() && !shard.contains('/') && !shard.contains('\\') && shard != "..",
            "shard name {shard:?} escapes the checkpoint directory"
        );
    }
    let checkpoint = Checkpoint::from_files(Path::new("fuzz-input"), fixed_shards())
        .expect("the fixed shards are disjoint");
    if let Err(e) = checkpoint.check_shard_index(&index, path) {
        assert_names(&e.to_string(), INDEX_PATH);
    }
}

// ---------------------------------------------------------------------------------------------
// activation dumps given to `gemma4 compare`
// ---------------------------------------------------------------------------------------------

/// A candidate dump: reading, comparison with a golden dump and with itself, and a round trip.
pub fn activation_dump(data: &[u8]) {
    let path = Path::new(SAFETENSORS_PATH);
    let candidate = match ActivationDump::from_bytes(path, data.to_vec()) {
        Ok(dump) => dump,
        Err(e) => return assert_names(&e.to_string(), SAFETENSORS_PATH),
    };
    static EXPECTED: std::sync::OnceLock<ActivationDump> = std::sync::OnceLock::new();
    let expected = EXPECTED.get_or_init(|| {
        ActivationDump::from_bytes(Path::new("expected"), EXPECTED_DUMP.to_vec())
            .expect("the golden dump reads")
    });
    for (reference, against) in [(expected, &candidate), (&candidate, &candidate)] {
        let layers = layers_in_dump(reference).unwrap_or(0);
        let reports = compare_dumps(reference, against, |name| {
            tolerance_for(name, Precision::Float32, depth_of(name, layers))
        });
        for report in &reports {
            let Some(tensor) = against.get(&report.name) else {
                assert_eq!(report.status, Status::Missing);
                continue;
            };
            let finite = match tensor {
                DumpTensor::F32(a) => a.iter().all(|v| v.is_finite()),
                DumpTensor::I64(_) => true,
            };
            if !finite && report.status != Status::ShapeMismatch {
                assert_eq!(
                    report.status,
                    Status::NonFinite,
                    "{}: NaN/inf judged {:?}",
                    report.name,
                    report.status
                );
            }
            if std::ptr::eq(reference, against) && finite {
                assert_eq!(
                    report.status,
                    Status::Pass,
                    "{}: a dump differs from itself",
                    report.name
                );
            }
        }
    }
    // What `dump` would write reads back unchanged.
    let bytes = candidate.to_bytes(&[]).expect("a dump serialises");
    let again = ActivationDump::from_bytes(path, bytes).expect("a written dump reads back");
    assert_eq!(again.len(), candidate.len());
    for name in candidate.names_in_model_order() {
        let (a, b) = (
            candidate.get(name).expect("listed"),
            again.get(name).expect("written"),
        );
        assert_eq!(a.shape(), b.shape(), "{name}");
        let bits = |t: &DumpTensor| -> Vec<u64> {
            match t {
                DumpTensor::F32(a) => a.iter().map(|v| v.to_bits() as u64).collect(),
                DumpTensor::I64(a) => a.iter().map(|&v| v as u64).collect(),
            }
        };
        assert_eq!(
            bits(a),
            bits(b),
            "{name}: changed by a write/read round trip"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// a whole damaged checkpoint, loaded and run
// ---------------------------------------------------------------------------------------------

/// Splits a checkpoint input: a little-endian `u32` length, that many bytes of `config.json`,
/// then the bytes of `model.safetensors`.
pub fn split_checkpoint_input(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let length = u32::from_le_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let config = data.get(4..4usize.checked_add(length)?)?;
    Some((config, &data[4 + length..]))
}

/// A whole checkpoint (config + weights): load, then a 3-token forward pass and one greedy
/// decode step. It must end in `Ok` with finite logits or in an error, never a panic.
pub fn checkpoint_forward(data: &[u8]) {
    let Some((config_bytes, weights)) = split_checkpoint_input(data) else {
        return;
    };
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(config_bytes) else {
        return;
    };
    let config = match ModelConfig::from_json(&value, Path::new(CONFIG_PATH)) {
        Ok(config) => config,
        Err(e) => return assert_names(&e.to_string(), CONFIG_PATH),
    };
    let file = match SafetensorsFile::from_bytes(Path::new(SAFETENSORS_PATH), weights.to_vec()) {
        Ok(file) => file,
        Err(e) => return assert_names(&e.to_string(), SAFETENSORS_PATH),
    };
    let checkpoint = Checkpoint::from_files(Path::new("fuzz-input"), vec![file])
        .expect("one file has no duplicate names");
    let model = match Gemma4TextModel::from_checkpoint(
        config.clone(),
        checkpoint,
        gemma4_reference::weight_stream::Residence::InMemory,
    ) {
        Ok(model) => model,
        Err(e) => {
            let message = e.to_string();
            assert!(
                message.contains("fuzz-input"),
                "error {message:?} names no file"
            );
            return;
        }
    };
    let vocab = model.config.text.vocab_size;
    let tokens = [1 % vocab, 2 % vocab, 3 % vocab];
    match model.dump(&tokens, 1) {
        Ok(dump) => {
            let logits = dump
                .get("logits")
                .and_then(DumpTensor::as_f32)
                .expect("logits recorded");
            assert_eq!(logits.shape(), &[3, vocab]);
            assert!(
                logits.iter().all(|v| v.is_finite()),
                "non-finite logits returned as Ok"
            );
            // The same checkpoint streamed layer by layer: the same dump, bit for bit.
            let file = SafetensorsFile::from_bytes(Path::new(SAFETENSORS_PATH), weights.to_vec())
                .expect("parsed once already");
            let checkpoint = Checkpoint::from_files(Path::new("fuzz-input"), vec![file])
                .expect("one file has no duplicate names");
            let streamed = Gemma4TextModel::from_checkpoint(
                config,
                checkpoint,
                gemma4_reference::weight_stream::Residence::Streamed,
            )
            .expect("loads in memory, so opens for streaming");
            let streamed_dump = streamed
                .dump(&tokens, 1)
                .expect("runs in memory, so streamed");
            assert_eq!(
                format!("{:?}", dump.names_in_model_order()),
                format!("{:?}", streamed_dump.names_in_model_order())
            );
            for name in dump.names_in_model_order() {
                let bits = |d: &gemma4_reference::ActivationDump| match d.get(name) {
                    Some(DumpTensor::F32(a)) => a.iter().map(|v| v.to_bits() as i64).collect(),
                    Some(DumpTensor::I64(a)) => a.iter().copied().collect::<Vec<i64>>(),
                    None => Vec::new(),
                };
                assert!(
                    bits(&dump) == bits(&streamed_dump),
                    "`{name}` differs when streamed"
                );
            }
        }
        Err(gemma4_reference::Error::NonFinite { tensor, .. }) => assert!(!tensor.is_empty()),
        Err(gemma4_reference::Error::Input { .. }) => {}
        Err(other) => panic!("a loaded model failed with an unexpected error: {other}"),
    }
}

// ---------------------------------------------------------------------------------------------
// a generated, valid-by-construction checkpoint with odd geometry and wild weights
// ---------------------------------------------------------------------------------------------

/// Reads small numbers from fuzz bytes; zeros once they run out.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&first, rest)) => {
                self.0 = rest;
                first
            }
            None => 0,
        }
    }

    /// A number in `low..=high`.
    fn int(&mut self, low: usize, high: usize) -> usize {
        low + self.byte() as usize % (high - low + 1)
    }

    fn flag(&mut self) -> bool {
        self.byte() & 1 == 1
    }

    fn f32_bits(&mut self) -> f32 {
        f32::from_le_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }
}

/// Builds a config from the fuzz bytes (any layout, spelling, KV sharing, K=V, PLE, MoE,
/// window, RoPE and softcap the validation accepts), weights of exactly the shapes it implies
/// (small values, or, per tensor, raw f32 bit patterns: huge, tiny, subnormal, NaN, inf),
/// then loads it and runs 1-5 tokens and 0-2 decode steps. Loading may refuse non-finite
/// weights; the forward pass may refuse non-finite activations; nothing may panic, and an `Ok`
/// holds finite logits of the right shape.
pub fn forward_generated(data: &[u8]) {
    let mut bytes = Bytes(data);
    let layers = bytes.int(1, 4);
    let heads = bytes.int(1, 4);
    let kv_heads = [1, 2, 4]
        .into_iter()
        .filter(|k| heads % k == 0)
        .nth(bytes.int(0, 2))
        .unwrap_or(1);
    let head_dim = 2 * bytes.int(1, 4);
    let hidden = 2 * bytes.int(1, 8);
    let vocab = bytes.int(1, 12);
    let layer_types: Vec<&str> = (0..layers)
        .map(|_| {
            if bytes.flag() {
                "full_attention"
            } else {
                "sliding_attention"
            }
        })
        .collect();
    let mut text = serde_json::json!({
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": bytes.int(1, 8),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "layer_types": layer_types,
        "sliding_window": bytes.int(1, 5),
        "attention_k_eq_v": bytes.flag(),
        "num_kv_shared_layers": bytes.int(0, layers - 1),
        "use_double_wide_mlp": bytes.flag(),
        "tie_word_embeddings": bytes.flag(),
        "rms_norm_eps": ([1e-6, 1e-2, 1e-30][bytes.int(0, 2)]),
        "final_logit_softcapping": ([serde_json::Value::Null, 30.0.into(), 0.5.into()][bytes.int(0, 2)].clone()),
        "pad_token_id": bytes.int(0, vocab - 1),
        "hidden_size_per_layer_input": ([serde_json::Value::Null, 1.into(), 2.into(), 3.into()][bytes.int(0, 3)].clone()),
        "vocab_size_per_layer_input": bytes.int(1, 12),
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": ([10_000.0, 1.5, 1e30][bytes.int(0, 2)])},
            "full_attention": {
                "rope_type": (["default", "proportional"][bytes.int(0, 1)]),
                "partial_rotary_factor": ([0.25, 1.0, 0.01][bytes.int(0, 2)]),
                "rope_theta": 1_000_000.0,
                "factor": ([1.0, 8.0, 1e-3][bytes.int(0, 2)]),
            },
        },
    });
    let object = text.as_object_mut().expect("an object");
    if bytes.flag() {
        object.insert("global_head_dim".into(), (2 * bytes.int(1, 4)).into());
        object.insert("num_global_key_value_heads".into(), kv_heads.into());
    } else {
        let mut overrides = serde_json::Map::new();
        for layer in 0..layers {
            if bytes.flag() {
                overrides.insert(
                    layer.to_string(),
                    serde_json::json!({"head_dim": 2 * bytes.int(1, 4)}),
                );
            }
        }
        object.insert("per_layer_config".into(), overrides.into());
    }
    if bytes.flag() {
        let experts = bytes.int(1, 4);
        object.insert("enable_moe_block".into(), true.into());
        object.insert("num_experts".into(), experts.into());
        object.insert("top_k_experts".into(), bytes.int(1, experts).into());
        object.insert("moe_intermediate_size".into(), bytes.int(1, 4).into());
    }
    let nested = bytes.flag();
    let config_json = if nested {
        serde_json::json!({"model_type": "gemma4", "text_config": text})
    } else {
        text
    };
    let Ok(config) = ModelConfig::from_json(&config_json, Path::new(CONFIG_PATH)) else {
        return; // a combination the validation refuses (checked by config_json)
    };

    // Weights of exactly the planned shapes.
    let plan = ModelPlan::from_config(&config.text);
    let prefix = config.layout.text_prefix();
    let mut header = serde_json::Map::new();
    let mut weights = Vec::new();
    for spec in text_tensor_specs(&config.text, &plan) {
        let elements: usize = spec.shape.iter().product();
        let wild = bytes.byte() == 0xff;
        let start = weights.len();
        for _ in 0..elements {
            let value = if wild {
                bytes.f32_bits()
            } else {
                f32::from(bytes.byte() as i8) / 32.0
            };
            weights.extend_from_slice(&value.to_le_bytes());
        }
        header.insert(
            gemma4_reference::checkpoint::full_name(prefix, &spec.name),
            serde_json::json!({"dtype": "F32", "shape": spec.shape, "data_offsets": [start, weights.len()]}),
        );
    }
    let file = SafetensorsFile::from_bytes(
        Path::new(SAFETENSORS_PATH),
        safetensors_bytes(header, &weights),
    )
    .expect("a generated file is valid");
    let checkpoint = Checkpoint::from_files(Path::new("fuzz-input"), vec![file]).expect("one file");
    let model = match Gemma4TextModel::from_checkpoint(
        config,
        checkpoint,
        gemma4_reference::weight_stream::Residence::InMemory,
    ) {
        Ok(model) => model,
        Err(e) => {
            let message = e.to_string();
            assert!(
                message.contains("non-finite"),
                "a generated checkpoint failed to load: {message}"
            );
            return;
        }
    };
    let tokens: Vec<usize> = (0..bytes.int(1, 5))
        .map(|_| bytes.int(0, vocab - 1))
        .collect();
    let decode = bytes.int(0, 2);
    match model.dump(&tokens, decode) {
        Ok(dump) => {
            let logits = dump
                .get("logits")
                .and_then(DumpTensor::as_f32)
                .expect("logits recorded");
            assert_eq!(logits.shape(), &[tokens.len(), vocab]);
            assert!(
                logits.iter().all(|v| v.is_finite()),
                "non-finite logits returned as Ok"
            );
            if decode > 0 {
                let continuation = dump
                    .get("greedy_continuation")
                    .and_then(DumpTensor::as_i64)
                    .expect("decoded");
                assert!(continuation.iter().all(|&t| (0..vocab as i64).contains(&t)));
            }
        }
        Err(gemma4_reference::Error::NonFinite { tensor, .. }) => assert!(!tensor.is_empty()),
        Err(gemma4_reference::Error::Input { message }) => {
            // Only the PLE vocabulary can be smaller than a generated token id.
            assert!(
                message.contains("Per-Layer Embedding"),
                "unexpected input error: {message}"
            );
        }
        Err(other) => panic!("a loaded model failed with an unexpected error: {other}"),
    }
}

// ---------------------------------------------------------------------------------------------
// image files given to `--image` (PNG, JPEG, WebP, GIF)
// ---------------------------------------------------------------------------------------------

/// The label an image input carries (decoding guesses the format from the bytes, not the name).
const IMAGE_PATH: &str = "fuzz-input.png";

/// Decoded images up to this many pixels are also sized and preprocessed (resized and cut into
/// patches): more would spend the fuzzer's time in the resize rather than the decoders.
const PREPROCESSED_PIXELS: usize = 128 * 128;

/// An image file: decoding (never a panic nor an allocation past the memory limit; errors are
/// `Error::Image` naming the file), then, for a small image, the target size at every budget and,
/// when the input ends in `[b, 0xff]`, the whole preprocessing at `SUPPORTED_BUDGETS[b mod 5]`:
/// at most `9·B` patches in a grid of sides multiple of 48, values in [0, 1], positions on the
/// grid. The choice sits at the end because decoders ignore trailing bytes while the first bytes
/// are the format's magic; it is rare because a preprocessing resizes to 0.16-2.6 M pixels (0.1-1.5
/// s under AddressSanitizer, where a decoding takes milliseconds).
pub fn image_decode(data: &[u8]) {
    use gemma4_reference::vision::preprocessing::{
        decode_image, preprocess, resized_size, PATCH_SIZE, PATCH_VALUES, SUPPORTED_BUDGETS,
    };
    let path = Path::new(IMAGE_PATH);
    let image = match decode_image(data, path) {
        Ok(image) => image,
        Err(e @ gemma4_reference::Error::Image { .. }) => {
            return assert_names(&e.to_string(), IMAGE_PATH)
        }
        Err(other) => panic!("an image decoding error of the wrong kind: {other:?}"),
    };
    assert!(
        image.width > 0 && image.height > 0,
        "an empty image decoded"
    );
    assert_eq!(
        image.pixels.len(),
        image.width * image.height * 3,
        "a {}x{} image holds the wrong number of bytes",
        image.width,
        image.height
    );
    if image.width * image.height > PREPROCESSED_PIXELS {
        return;
    }
    for budget in SUPPORTED_BUDGETS {
        let (height, width) = resized_size(image.height, image.width, budget).unwrap_or_else(|e| {
            panic!(
                "no target size for a {}x{} image at budget {budget}: {e}",
                image.width, image.height
            )
        });
        assert!(
            height > 0 && width > 0 && height % 48 == 0 && width % 48 == 0,
            "{}x{} resized to {height}x{width} at budget {budget}",
            image.width,
            image.height
        );
        assert!(
            (height / PATCH_SIZE) * (width / PATCH_SIZE) <= 9 * budget,
            "{}x{} resized to {height}x{width}: too many patches for budget {budget}",
            image.width,
            image.height
        );
    }
    let budget = match data {
        [.., choice, 0xff] => SUPPORTED_BUDGETS[usize::from(*choice) % 5],
        _ => return,
    };
    let patches = preprocess(&image, budget).unwrap_or_else(|e| {
        panic!(
            "a decoded {}x{} image failed preprocessing at budget {budget}: {e}",
            image.width, image.height
        )
    });
    let (height, width) = (patches.resized_height, patches.resized_width);
    assert!(
        height > 0 && width > 0 && height % 48 == 0 && width % 48 == 0,
        "resized to {height}x{width}, not multiples of 48"
    );
    let count = (height / PATCH_SIZE) * (width / PATCH_SIZE);
    assert!(count <= 9 * budget, "{count} patches at budget {budget}");
    assert_eq!(patches.pixel_values.shape(), &[count, PATCH_VALUES]);
    assert_eq!(patches.positions.len(), count);
    assert_eq!(patches.soft_tokens, count / 9);
    assert!(
        patches.pixel_values.iter().all(|v| (0.0..=1.0).contains(v)),
        "a pixel value outside [0, 1]"
    );
    for (i, &[x, y]) in patches.positions.iter().enumerate() {
        assert_eq!(
            y * (width / PATCH_SIZE) + x,
            i,
            "patch {i} at position ({x}, {y})"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// WAV files given to `--audio`
// ---------------------------------------------------------------------------------------------

/// The label a WAV input carries.
const WAV_PATH: &str = "fuzz-input.wav";

/// Decoded clips up to this many samples (2 s) also go through the log-mel front end.
const FEATURE_SAMPLES: usize = 32_000;

/// A WAV file: decoding (never a panic, and never an allocation sized by the header's claimed
/// length: a sample takes at least one byte of the input; errors are `Error::Audio` naming the
/// file), then, for a short clip, the log-mel features: `[F, 128]` finite values with `F` and the
/// soft-token count the clip's length implies, or, below one frame, an input error saying so.
pub fn wav_decode(data: &[u8]) {
    use gemma4_reference::audio::features::{
        log_mel_features, soft_token_count, valid_frame_count, MEL_BINS, SAMPLE_RATE,
    };
    use gemma4_reference::audio::wav::decode_wav;
    let path = Path::new(WAV_PATH);
    let wave = match decode_wav(data, path) {
        Ok(wave) => wave,
        Err(e @ gemma4_reference::Error::Audio { .. }) => {
            return assert_names(&e.to_string(), WAV_PATH)
        }
        Err(other) => panic!("a WAV decoding error of the wrong kind: {other:?}"),
    };
    assert_eq!(wave.sample_rate, SAMPLE_RATE, "a waveform not at 16 kHz");
    assert!(!wave.samples.is_empty(), "an empty waveform decoded");
    assert!(
        wave.samples.len() <= data.len(),
        "{} samples from {} bytes",
        wave.samples.len(),
        data.len()
    );
    assert!(
        wave.samples.iter().all(|s| s.is_finite()),
        "a non-finite sample decoded"
    );
    if wave.samples.len() > FEATURE_SAMPLES {
        return;
    }
    let frames = valid_frame_count(wave.samples.len());
    match log_mel_features(&wave.samples) {
        Ok(features) => {
            assert_eq!(features.features.shape(), &[frames, MEL_BINS]);
            assert_eq!(features.soft_tokens, soft_token_count(wave.samples.len()));
            assert!(
                features.features.iter().all(|v| v.is_finite()),
                "non-finite log-mel features"
            );
        }
        Err(gemma4_reference::Error::Input { message }) => assert!(
            frames == 0 && message.contains("shorter than one frame"),
            "{} samples ({frames} frames) refused: {message}",
            wave.samples.len()
        ),
        Err(other) => panic!("log-mel features failed with an unexpected error: {other}"),
    }
}
