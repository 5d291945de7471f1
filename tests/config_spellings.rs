//! Both config spellings and both checkpoint layouts describe the same model.
//!
//! The released `config.json` files carry `global_head_dim` / `num_global_key_value_heads`;
//! `transformers` 5.23 writes a `per_layer_config` map with (zero-padded) layer keys instead.
//! `Gemma4ForConditionalGeneration` nests the decoder under `text_config` and its weights under
//! `model.language_model.`; `Gemma4ForCausalLM` is flat with `model.`. Converting a golden model
//! from one form to the other must give the same plan and bit-identical outputs.

mod common;

use common::{copy_golden_model, read_json, write_json, RawSafetensors};
use gemma4_reference::config::AttentionType;
use gemma4_reference::{Gemma4TextModel, ModelConfig, ModelPlan};
use serde_json::{json, Value};

fn dump_bytes(dir: &std::path::Path, tokens: &[usize]) -> Vec<(String, Vec<f32>)> {
    let model = Gemma4TextModel::load(dir).unwrap();
    let dump = model.dump(tokens, 2).unwrap();
    dump.names_in_model_order()
        .into_iter()
        .filter_map(|n| {
            dump.get(n)
                .unwrap()
                .as_f32()
                .map(|a| (n.to_string(), a.iter().copied().collect()))
        })
        .collect()
}

/// Rewrites the released spelling of a flat text config into the per_layer_config spelling.
fn to_per_layer_config(text: &mut serde_json::Map<String, Value>, key_width: usize) {
    let global_head_dim = text
        .remove("global_head_dim")
        .and_then(|v| v.as_u64())
        .unwrap_or(512);
    let global_kv = text
        .remove("num_global_key_value_heads")
        .and_then(|v| v.as_u64());
    let k_eq_v = text
        .get("attention_k_eq_v")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let config =
        ModelConfig::from_json(&Value::Object(text.clone()), std::path::Path::new("inline"))
            .unwrap();
    let mut map = serde_json::Map::new();
    for (i, kind) in config.text.layer_types.iter().enumerate() {
        if *kind == AttentionType::Full {
            let mut overrides = json!({"head_dim": global_head_dim});
            if let (true, Some(k)) = (k_eq_v, global_kv) {
                overrides["num_key_value_heads"] = json!(k);
            }
            map.insert(format!("{i:0key_width$}"), overrides);
        }
    }
    text.insert("per_layer_config".into(), Value::Object(map));
}

#[test]
fn config_released_and_per_layer_spellings_give_identical_outputs_e2b_like() {
    let released = common::golden_model("e2b_like");
    let converted = copy_golden_model("e2b_like");
    let path = converted.path().join("config.json");
    let mut config = read_json(&path);
    to_per_layer_config(config.as_object_mut().unwrap(), 2); // zero-padded keys: "04", "09"
    assert!(config["per_layer_config"].get("04").is_some());
    write_json(&path, &config);

    let plan_a = ModelPlan::from_config(&ModelConfig::from_dir(&released).unwrap().text);
    let plan_b = ModelPlan::from_config(&ModelConfig::from_dir(converted.path()).unwrap().text);
    assert_eq!(plan_a, plan_b);
    let tokens = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7];
    assert_eq!(
        dump_bytes(&released, &tokens),
        dump_bytes(converted.path(), &tokens)
    );
}

#[test]
fn config_per_layer_spelling_to_released_gives_identical_outputs_31b_like_k_eq_v() {
    // 31b_like is released-spelling with K=V and num_global_key_value_heads = 1: the per-layer
    // override must carry the KV-head count too.
    let original = common::golden_model("31b_like");
    let converted = copy_golden_model("31b_like");
    let path = converted.path().join("config.json");
    let mut config = read_json(&path);
    to_per_layer_config(config["text_config"].as_object_mut().unwrap(), 1);
    write_json(&path, &config);
    let plan = ModelPlan::from_config(&ModelConfig::from_dir(converted.path()).unwrap().text);
    let full = plan.layers.last().unwrap();
    assert_eq!(
        (full.head_dim, full.num_kv_heads, full.key_equals_value),
        (32, 1, true)
    );
    let tokens = [7, 7, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11];
    assert_eq!(
        dump_bytes(&original, &tokens),
        dump_bytes(converted.path(), &tokens)
    );
}

#[test]
fn config_global_kv_heads_ignored_without_k_eq_v() {
    // num_global_key_value_heads applies only with attention_k_eq_v (text §1).
    let mut config = read_json(&common::golden_model("e2b_like").join("config.json"));
    config["num_global_key_value_heads"] = json!(4);
    let parsed = ModelConfig::from_json(&config, std::path::Path::new("inline")).unwrap();
    assert!(parsed
        .text
        .layer_geometry
        .iter()
        .all(|g| g.num_key_value_heads == 1));
}

#[test]
fn config_global_head_dim_defaults_to_512() {
    let mut config = read_json(&common::golden_model("e2b_like").join("config.json"));
    config.as_object_mut().unwrap().remove("global_head_dim");
    let parsed = ModelConfig::from_json(&config, std::path::Path::new("inline")).unwrap();
    let plan = ModelPlan::from_config(&parsed.text);
    for layer in &plan.layers {
        let expected = if layer.attention_type == AttentionType::Full {
            512
        } else {
            16
        };
        assert_eq!(layer.head_dim, expected, "layer {}", layer.index);
    }
}

#[test]
fn config_last_layer_is_forced_full() {
    let mut config = read_json(&common::golden_model("e2b_like").join("config.json"));
    let layers = config["layer_types"].as_array_mut().unwrap();
    let last = layers.len() - 1;
    layers[last] = json!("sliding_attention");
    let parsed = ModelConfig::from_json(&config, std::path::Path::new("inline")).unwrap();
    assert_eq!(parsed.text.layer_types[last], AttentionType::Full);
    // And with no layer_types at all: the default 5:1 pattern, last layer forced full.
    config.as_object_mut().unwrap().remove("layer_types");
    config["num_hidden_layers"] = json!(7);
    config["num_kv_shared_layers"] = json!(0);
    let parsed = ModelConfig::from_json(&config, std::path::Path::new("inline")).unwrap();
    let kinds: String = parsed
        .text
        .layer_types
        .iter()
        .map(|k| if *k == AttentionType::Full { 'F' } else { 'S' })
        .collect();
    assert_eq!(kinds, "SSSSSFF");
}

#[test]
fn checkpoint_causal_lm_layout_as_conditional_generation_gives_identical_outputs() {
    // Nest the flat e2b_like config under text_config and rename its tensors
    // model.* -> model.language_model.*: the same model in the other layout.
    let original = common::golden_model("e2b_like");
    let converted = copy_golden_model("e2b_like");
    let config_path = converted.path().join("config.json");
    let text = read_json(&config_path);
    write_json(
        &config_path,
        &json!({"architectures": ["Gemma4ForConditionalGeneration"], "model_type": "gemma4", "text_config": text}),
    );
    let file = converted.path().join("model.safetensors");
    let mut raw = RawSafetensors::read(&file);
    let renamed: serde_json::Map<String, Value> = raw
        .header
        .iter()
        .map(|(k, v)| match k.strip_prefix("model.") {
            Some(rest) => (format!("model.language_model.{rest}"), v.clone()),
            None => (k.clone(), v.clone()),
        })
        .collect();
    raw.header = renamed;
    raw.write(&file);
    let tokens = [5, 4, 3, 2, 1, 100, 200, 300, 400, 500, 11, 12, 13, 14];
    assert_eq!(
        dump_bytes(&original, &tokens),
        dump_bytes(converted.path(), &tokens)
    );
}

#[test]
fn checkpoint_untied_lm_head_is_loaded_from_lm_head_weight() {
    // tie_word_embeddings = false: the head comes from `lm_head.weight`. With a copy of the
    // embedding table the outputs are unchanged; with a scaled copy the logits scale (before the
    // softcap), which proves the head is really read from that tensor.
    let original = common::golden_model("e2b_like");
    let converted = copy_golden_model("e2b_like");
    let config_path = converted.path().join("config.json");
    let mut config = read_json(&config_path);
    config["tie_word_embeddings"] = json!(false);
    write_json(&config_path, &config);
    let file = converted.path().join("model.safetensors");
    let mut raw = RawSafetensors::read(&file);
    let (start, end) = raw.offsets("model.embed_tokens.weight");
    let shape = raw.shape("model.embed_tokens.weight");
    let table = raw.data[start..end].to_vec();
    raw.replace("lm_head.weight", "F32", &shape, table.clone());
    raw.write(&file);
    let tokens = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 10, 20, 30, 40];
    assert_eq!(
        dump_bytes(&original, &tokens),
        dump_bytes(converted.path(), &tokens)
    );

    let doubled: Vec<u8> = table
        .chunks_exact(4)
        .flat_map(|b| (2.0 * f32::from_le_bytes(b.try_into().unwrap())).to_le_bytes())
        .collect();
    raw.replace("lm_head.weight", "F32", &shape, doubled);
    raw.write(&file);
    let a = Gemma4TextModel::load(&original)
        .unwrap()
        .dump(&tokens, 0)
        .unwrap();
    let b = Gemma4TextModel::load(converted.path())
        .unwrap()
        .dump(&tokens, 0)
        .unwrap();
    let (la, lb) = (
        a.get("logits").unwrap().as_f32().unwrap(),
        b.get("logits").unwrap().as_f32().unwrap(),
    );
    // softcap: 30·tanh(z/30); doubling z changes every non-zero logit.
    let cap = 30.0f32;
    for (x, y) in la.iter().zip(lb.iter()).take(50) {
        let z = cap * (x / cap).atanh();
        assert!(
            (cap * (2.0 * z / cap).tanh() - y).abs() < 1e-3 * cap,
            "{x} -> {y}"
        );
    }
}
