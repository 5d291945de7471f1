//! Bad input gets a clear error naming the file, tensor or field, and what was expected; never a
//! panic, never a silently wrong result. Each test damages one thing on purpose.

mod common;

use std::path::Path;
use std::process::Command;

use common::{copy_golden_model, read_json, write_json, RawSafetensors};
use gemma4_optimized::Gemma4Optimized;
use gemma4_reference::{Error, Gemma4TextModel, ModelConfig};
use serde_json::{json, Value};

const BASE: &str = "e2b_like";

/// Loads the model in `dir` and returns the error message (the test fails if loading succeeds).
/// The optimized engine must reject it too, with exactly the same message: it reuses the
/// reference's validation.
fn load_error(dir: &Path) -> String {
    let message = match Gemma4TextModel::load(dir) {
        Ok(_) => panic!("loading {} should have failed", dir.display()),
        Err(e) => e.to_string(),
    };
    match Gemma4Optimized::load(dir) {
        Ok(_) => panic!(
            "the optimized engine loaded {} that the reference rejects ({message})",
            dir.display()
        ),
        Err(e) => assert_eq!(
            e.to_string(),
            message,
            "the optimized engine's error differs from the reference's"
        ),
    }
    message
}

fn assert_mentions(message: &str, needles: &[&str]) {
    for needle in needles {
        assert!(
            message.contains(needle),
            "error message {message:?} should mention {needle:?}"
        );
    }
}

/// Rewrites the (text part of the) config of a copied golden model.
fn with_config(
    edit: impl FnOnce(&mut serde_json::Map<String, Value>),
) -> (tempfile::TempDir, String) {
    let dir = copy_golden_model(BASE);
    let path = dir.path().join("config.json");
    let mut config = read_json(&path);
    let object = config.as_object_mut().expect("object");
    edit(object);
    write_json(&path, &config);
    let message = match ModelConfig::from_dir(dir.path()) {
        Ok(_) => panic!("the edited config should be rejected"),
        Err(e) => e.to_string(),
    };
    // Both engines load through the same config check, so both reject with this message.
    match Gemma4Optimized::load(dir.path()) {
        Ok(_) => panic!("the optimized engine accepted a config the reference rejects ({message})"),
        Err(e) => assert_eq!(
            e.to_string(),
            message,
            "the optimized engine's error differs from the reference's"
        ),
    }
    (dir, message)
}

fn model_file(dir: &Path) -> std::path::PathBuf {
    dir.join("model.safetensors")
}

// ---------------------------------------------------------------------------------------
// config.json
// ---------------------------------------------------------------------------------------

#[test]
fn config_missing_required_field_is_named() {
    let (_dir, message) = with_config(|c| {
        c.remove("hidden_size");
    });
    assert_mentions(&message, &["config.json", "hidden_size", "missing"]);
}

#[test]
fn config_wrong_type_is_named() {
    let (_dir, message) = with_config(|c| {
        c.insert("num_hidden_layers".into(), json!("ten"));
    });
    assert_mentions(&message, &["num_hidden_layers", "integer", "\"ten\""]);
}

#[test]
fn config_heads_not_divisible_is_rejected() {
    let (_dir, message) = with_config(|c| {
        c.insert("num_key_value_heads".into(), json!(3));
    });
    assert_mentions(
        &message,
        &[
            "num_key_value_heads",
            "does not divide",
            "num_attention_heads",
        ],
    );
}

#[test]
fn config_layer_types_length_mismatch_is_rejected() {
    let (_dir, message) = with_config(|c| {
        c.insert(
            "layer_types".into(),
            json!(["sliding_attention", "full_attention"]),
        );
    });
    assert_mentions(&message, &["layer_types", "2 entries", "num_hidden_layers"]);
}

#[test]
fn config_unknown_layer_type_is_rejected() {
    let (_dir, message) = with_config(|c| {
        let types = c
            .get_mut("layer_types")
            .and_then(Value::as_array_mut)
            .expect("explicit layer types");
        types[1] = json!("chunked_attention");
    });
    assert_mentions(&message, &["layer_types[1]", "chunked_attention"]);
}

#[test]
fn config_zero_dimension_is_rejected() {
    let (_dir, message) = with_config(|c| {
        c.insert("head_dim".into(), json!(0));
    });
    assert_mentions(&message, &["head_dim", "positive"]);
}

#[test]
fn config_odd_head_dim_is_rejected() {
    let (_dir, message) = with_config(|c| {
        c.insert("head_dim".into(), json!(15));
    });
    assert_mentions(&message, &["head_dim", "even"]);
}

#[test]
fn config_kv_sharing_without_producer_is_rejected() {
    let (_dir, message) = with_config(|c| {
        let layers = c["num_hidden_layers"].as_u64().unwrap();
        c.insert("num_kv_shared_layers".into(), json!(layers));
    });
    assert_mentions(&message, &["num_kv_shared_layers"]);
}

#[test]
fn config_moe_without_expert_count_is_rejected() {
    let (_dir, message) = with_config(|c| {
        c.insert("enable_moe_block".into(), json!(true));
        c.insert("top_k_experts".into(), json!(2));
        c.insert("moe_intermediate_size".into(), json!(8));
    });
    assert_mentions(&message, &["num_experts", "missing"]);
}

#[test]
fn config_top_k_above_expert_count_is_rejected() {
    let (_dir, message) = with_config(|c| {
        c.insert("enable_moe_block".into(), json!(true));
        c.insert("num_experts".into(), json!(4));
        c.insert("top_k_experts".into(), json!(8));
        c.insert("moe_intermediate_size".into(), json!(8));
    });
    assert_mentions(&message, &["top_k_experts", "num_experts = 4"]);
}

#[test]
fn config_unknown_rope_type_is_rejected() {
    let (_dir, message) = with_config(|c| {
        c.insert(
            "rope_parameters".into(),
            json!({"sliding_attention": {"rope_type": "yarn", "rope_theta": 10000.0}}),
        );
    });
    assert_mentions(
        &message,
        &["rope_parameters.sliding_attention.rope_type", "yarn"],
    );
}

#[test]
fn config_per_layer_config_out_of_range_is_rejected() {
    let (_dir, message) = with_config(|c| {
        c.insert("per_layer_config".into(), json!({"99": {"head_dim": 32}}));
    });
    assert_mentions(&message, &["per_layer_config", "99"]);
}

#[test]
fn config_invalid_json_is_reported_with_the_file() {
    let dir = copy_golden_model(BASE);
    std::fs::write(dir.path().join("config.json"), b"{\"hidden_size\": 64,").unwrap();
    let message = ModelConfig::from_dir(dir.path()).unwrap_err().to_string();
    assert_mentions(&message, &["config.json", "invalid JSON"]);
}

#[test]
fn config_missing_file_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let message = ModelConfig::from_dir(dir.path()).unwrap_err().to_string();
    assert_mentions(&message, &["config.json"]);
}

// ---------------------------------------------------------------------------------------
// safetensors checkpoints
// ---------------------------------------------------------------------------------------

#[test]
fn checkpoint_missing_tensor_is_named_with_expected_shape() {
    let dir = copy_golden_model(BASE);
    let mut raw = RawSafetensors::read(&model_file(dir.path()));
    let name = raw.find("layers.2.self_attn.k_proj.weight");
    let shape = raw.shape(&name);
    raw.remove(&name);
    raw.write(&model_file(dir.path()));
    let message = load_error(dir.path());
    assert_mentions(&message, &[&name, "missing", &format!("{shape:?}")]);
}

#[test]
fn checkpoint_misshaped_tensor_is_named() {
    let dir = copy_golden_model(BASE);
    let mut raw = RawSafetensors::read(&model_file(dir.path()));
    let name = raw.find("layers.1.mlp.up_proj.weight");
    let shape = raw.shape(&name);
    let wrong = vec![shape[0] + 1, shape[1]];
    raw.replace(&name, "F32", &wrong, vec![0u8; 4 * wrong[0] * wrong[1]]);
    raw.write(&model_file(dir.path()));
    let message = load_error(dir.path());
    assert_mentions(
        &message,
        &[&name, &format!("{wrong:?}"), &format!("{shape:?}")],
    );
}

#[test]
fn checkpoint_integer_dtype_is_rejected() {
    let dir = copy_golden_model(BASE);
    let mut raw = RawSafetensors::read(&model_file(dir.path()));
    let name = raw.find("layers.0.input_layernorm.weight");
    let shape = raw.shape(&name);
    raw.replace(&name, "I32", &shape, vec![0u8; 4 * shape[0]]);
    raw.write(&model_file(dir.path()));
    let message = load_error(dir.path());
    assert_mentions(&message, &[&name, "I32", "not supported"]);
}

#[test]
fn checkpoint_truncated_file_is_rejected() {
    let dir = copy_golden_model(BASE);
    let path = model_file(dir.path());
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let message = load_error(dir.path());
    assert_mentions(&message, &["model.safetensors", "truncated"]);
}

#[test]
fn checkpoint_truncated_inside_header_is_rejected() {
    let dir = copy_golden_model(BASE);
    let path = model_file(dir.path());
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..40]).unwrap();
    let message = load_error(dir.path());
    assert_mentions(&message, &["model.safetensors", "header length"]);
}

#[test]
fn checkpoint_overlapping_offsets_are_rejected() {
    let dir = copy_golden_model(BASE);
    let mut raw = RawSafetensors::read(&model_file(dir.path()));
    let name = raw.find("layers.0.self_attn.q_norm.weight");
    let (start, end) = raw.offsets(&name);
    // Point the tensor one element earlier: it now overlaps its predecessor.
    raw.header.get_mut(&name).unwrap()["data_offsets"] = json!([start.saturating_sub(4), end - 4]);
    raw.write(&model_file(dir.path()));
    let message = load_error(dir.path());
    assert_mentions(&message, &["model.safetensors", "data_offsets"]);
}

#[test]
fn checkpoint_offsets_not_matching_shape_are_rejected() {
    let dir = copy_golden_model(BASE);
    let mut raw = RawSafetensors::read(&model_file(dir.path()));
    let name = raw.find("norm.weight");
    let shape = raw.shape(&name);
    raw.header.get_mut(&name).unwrap()["shape"] = json!([shape[0] * 2]);
    raw.write(&model_file(dir.path()));
    let message = load_error(dir.path());
    assert_mentions(&message, &["model.safetensors", "does not match its shape"]);
}

#[test]
fn checkpoint_huge_declared_shape_is_rejected_before_allocation() {
    let dir = copy_golden_model(BASE);
    let mut raw = RawSafetensors::read(&model_file(dir.path()));
    let name = raw.find("norm.weight");
    raw.header.get_mut(&name).unwrap()["shape"] = json!([u64::MAX / 2, 4]);
    raw.write(&model_file(dir.path()));
    let message = load_error(dir.path());
    assert_mentions(&message, &["model.safetensors"]);
}

#[test]
fn checkpoint_garbage_file_is_rejected() {
    let dir = copy_golden_model(BASE);
    std::fs::write(
        model_file(dir.path()),
        b"this is not a safetensors file at all",
    )
    .unwrap();
    let message = load_error(dir.path());
    assert_mentions(&message, &["model.safetensors"]);
}

#[test]
fn checkpoint_header_not_json_is_rejected() {
    let dir = copy_golden_model(BASE);
    let mut bytes = 16u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{not json at all");
    std::fs::write(model_file(dir.path()), bytes).unwrap();
    let message = load_error(dir.path());
    assert_mentions(&message, &["model.safetensors", "JSON"]);
}

#[test]
fn checkpoint_missing_weights_file_is_reported() {
    let dir = copy_golden_model(BASE);
    std::fs::remove_file(model_file(dir.path())).unwrap();
    let message = load_error(dir.path());
    assert_mentions(&message, &["model.safetensors"]);
}

#[test]
fn checkpoint_index_naming_missing_shard_is_reported() {
    let dir = copy_golden_model(BASE);
    let raw = RawSafetensors::read(&model_file(dir.path()));
    let mut weight_map = serde_json::Map::new();
    for name in raw.tensor_names() {
        weight_map.insert(name, json!("model-00001-of-00002.safetensors"));
    }
    std::fs::remove_file(model_file(dir.path())).unwrap();
    write_json(
        &dir.path().join("model.safetensors.index.json"),
        &json!({"metadata": {}, "weight_map": weight_map}),
    );
    let message = load_error(dir.path());
    assert_mentions(&message, &["model-00001-of-00002.safetensors"]);
}

#[test]
fn checkpoint_index_pointing_at_wrong_shard_is_reported() {
    let dir = copy_golden_model(BASE);
    let raw = RawSafetensors::read(&model_file(dir.path()));
    let names = raw.tensor_names();
    std::fs::rename(
        model_file(dir.path()),
        dir.path().join("shard-a.safetensors"),
    )
    .unwrap();
    // An (empty but valid) second shard, which the index wrongly names for one tensor.
    RawSafetensors {
        header: serde_json::Map::new(),
        data: Vec::new(),
    }
    .write(&dir.path().join("shard-b.safetensors"));
    let mut weight_map = serde_json::Map::new();
    for name in &names {
        weight_map.insert(name.clone(), json!("shard-a.safetensors"));
    }
    weight_map.insert(names[0].clone(), json!("shard-b.safetensors"));
    write_json(
        &dir.path().join("model.safetensors.index.json"),
        &json!({"weight_map": weight_map}),
    );
    let message = load_error(dir.path());
    assert_mentions(&message, &[&names[0], "shard-b.safetensors"]);
}

#[test]
fn checkpoint_index_path_escape_is_rejected() {
    let dir = copy_golden_model(BASE);
    write_json(
        &dir.path().join("model.safetensors.index.json"),
        &json!({"weight_map": {"model.norm.weight": "../model.safetensors"}}),
    );
    let message = load_error(dir.path());
    assert_mentions(&message, &["plain file name"]);
}

#[test]
fn checkpoint_config_disagreeing_with_weights_is_named() {
    // The config says a larger MLP than the weights hold: the first mis-shaped tensor is named.
    let dir = copy_golden_model(BASE);
    let path = dir.path().join("config.json");
    let mut config = read_json(&path);
    let width = config["intermediate_size"].as_u64().unwrap();
    config["intermediate_size"] = json!(width + 8);
    write_json(&path, &config);
    let message = load_error(dir.path());
    assert_mentions(
        &message,
        &["mlp.gate_proj.weight", "does not match the config"],
    );
}

// ---------------------------------------------------------------------------------------
// inputs
// ---------------------------------------------------------------------------------------

#[test]
fn input_token_id_out_of_range_is_rejected() {
    let model = Gemma4TextModel::load(&common::golden_model(BASE)).unwrap();
    let vocab = model.config.text.vocab_size;
    let expected = match model.dump(&[1, 2, vocab], 0) {
        Err(Error::Input { message }) => {
            assert_mentions(&message, &[&vocab.to_string(), "position 2", "vocab_size"]);
            message
        }
        other => panic!("expected an input error, got {:?}", other.map(|d| d.len())),
    };
    let optimized = Gemma4Optimized::load(&common::golden_model(BASE)).unwrap();
    match optimized.dump(&[1, 2, vocab], 0) {
        Err(Error::Input { message }) => assert_eq!(message, expected, "optimized engine"),
        other => panic!(
            "optimized: expected an input error, got {:?}",
            other.map(|d| d.len())
        ),
    }
}

#[test]
fn input_empty_token_list_is_rejected() {
    let model = Gemma4TextModel::load(&common::golden_model(BASE)).unwrap();
    match model.dump(&[], 0) {
        Err(Error::Input { message }) => assert_mentions(&message, &["empty"]),
        other => panic!("expected an input error, got {:?}", other.map(|d| d.len())),
    }
    let optimized = Gemma4Optimized::load(&common::golden_model(BASE)).unwrap();
    match optimized.dump(&[], 0) {
        Err(Error::Input { message }) => assert_mentions(&message, &["empty"]),
        other => panic!(
            "optimized: expected an input error, got {:?}",
            other.map(|d| d.len())
        ),
    }
}

#[test]
fn input_non_finite_weight_is_detected_and_named() {
    let dir = copy_golden_model(BASE);
    let mut raw = RawSafetensors::read(&model_file(dir.path()));
    let name = raw.find("layers.1.mlp.down_proj.weight");
    let (start, _) = raw.offsets(&name);
    raw.data[start..start + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    raw.write(&model_file(dir.path()));
    let model = Gemma4TextModel::load(dir.path()).unwrap();
    match model.dump(&[1, 2, 3], 0) {
        Err(Error::NonFinite { tensor, .. }) => assert_eq!(tensor, "layers.1.mlp.output"),
        other => panic!(
            "expected a non-finite error, got {:?}",
            other.map(|d| d.len())
        ),
    }
    let optimized = Gemma4Optimized::load(dir.path()).unwrap();
    match optimized.dump(&[1, 2, 3], 0) {
        Err(Error::NonFinite { tensor, .. }) => assert_eq!(tensor, "layers.1.mlp.output"),
        other => panic!(
            "optimized: expected a non-finite error, got {:?}",
            other.map(|d| d.len())
        ),
    }
}

// ---------------------------------------------------------------------------------------
// the command line: exit code 2, a message, never a panic
// ---------------------------------------------------------------------------------------

fn run_cli(args: &[&str]) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_gemma4"))
        .args(args)
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(
        !stderr.contains("panicked"),
        "the command panicked: {stderr}"
    );
    (output.status.code().unwrap_or(-1), stderr)
}

#[test]
fn cli_dump_with_bad_tokens_exits_2_with_message() {
    let model = common::golden_model(BASE);
    let out = tempfile::tempdir().unwrap();
    let out_file = out.path().join("dump.safetensors");
    let (code, stderr) = run_cli(&[
        "dump",
        "--model",
        model.to_str().unwrap(),
        "--tokens",
        "1,2,999999",
        "--out",
        out_file.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert_mentions(&stderr, &["999999", "vocab_size"]);
    assert!(!out_file.exists(), "no output file after a failure");
    let (code, stderr) = run_cli(&[
        "dump",
        "--model",
        model.to_str().unwrap(),
        "--tokens",
        "1,x",
        "--out",
        out_file.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert_mentions(&stderr, &["`x`"]);
}

#[test]
fn cli_inspect_on_damaged_checkpoint_exits_2_naming_tensor() {
    let dir = copy_golden_model(BASE);
    let mut raw = RawSafetensors::read(&model_file(dir.path()));
    let name = raw.find("layers.0.self_attn.o_proj.weight");
    raw.remove(&name);
    raw.write(&model_file(dir.path()));
    let (code, stderr) = run_cli(&["inspect", "--model", dir.path().to_str().unwrap()]);
    assert_eq!(code, 2, "{stderr}");
    assert_mentions(&stderr, &[&name, "missing"]);
}
