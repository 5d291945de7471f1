//! Derived facts of the four released Gemma 4 models, from their `config.json` alone:
//! the layer plan (insta snapshots), exact parameter counts (checked against the Hugging Face
//! meta-device counts in `tests/data/released/param_counts.json` and the published totals), and
//! the text tensor inventory (checked against the meta model's `state_dict`).

mod common;

use std::collections::BTreeMap;

use gemma4_reference::checkpoint::{full_name, text_tensor_specs};
use gemma4_reference::config::AttentionType;
use gemma4_reference::kv_cache::cache_footprint;
use gemma4_reference::layer_plan::KvSource;
use gemma4_reference::parameter_count::count_parameters;
use gemma4_reference::{ModelConfig, ModelPlan};
use serde_json::Value;

const VARIANTS: [&str; 4] = ["e2b", "e4b", "31b", "26b-a4b"];

fn released_config(variant: &str) -> ModelConfig {
    ModelConfig::from_dir(&common::test_data_dir().join("released").join(variant))
        .expect("released config parses")
}

/// One line per layer: `index type head_dim kv_heads K=V kv-source mlp_width ple moe`.
fn plan_table(plan: &ModelPlan) -> String {
    let mut out = format!("pattern: {}\n", plan.pattern());
    for layer in &plan.layers {
        let source = match layer.kv_source {
            KvSource::Own {
                shared_with_consumers: true,
            } => "own, shared".to_string(),
            KvSource::Own { .. } => "own".to_string(),
            KvSource::SharedFrom { producer } => format!("from {producer}"),
        };
        out.push_str(&format!(
            "{:>2} {:<7} d={:<3} kv={:<2} k_eq_v={:<5} {:<12} window={:<5} mlp={:<5} ple={:<5} moe={}\n",
            layer.index,
            match layer.attention_type {
                AttentionType::Sliding => "sliding",
                AttentionType::Full => "full",
            },
            layer.head_dim,
            layer.num_kv_heads,
            layer.key_equals_value,
            source,
            layer.sliding_window.map_or("-".into(), |w| w.to_string()),
            layer.mlp_width,
            layer.has_per_layer_embedding,
            layer.has_moe,
        ));
    }
    out
}

#[test]
fn layer_plan_snapshots_released() {
    for variant in VARIANTS {
        let config = released_config(variant);
        let plan = ModelPlan::from_config(&config.text);
        insta::assert_snapshot!(format!("layer_plan_{variant}"), plan_table(&plan));
    }
}

#[test]
fn layer_plan_e2b_kv_sharing_and_double_wide_mlp() {
    // The facts the text issue states about E2B, checked directly (not only by snapshot).
    let plan = ModelPlan::from_config(&released_config("e2b").text);
    assert_eq!(plan.layers.len(), 35);
    assert_eq!(plan.first_kv_shared_layer, 15);
    for layer in &plan.layers {
        let full = [4, 9, 14, 19, 24, 29, 34].contains(&layer.index);
        assert_eq!(
            layer.attention_type == AttentionType::Full,
            full,
            "layer {} type",
            layer.index
        );
        assert_eq!(
            layer.head_dim,
            if full { 512 } else { 256 },
            "layer {} head dim",
            layer.index
        );
        if layer.index >= 15 {
            let producer = if full { 14 } else { 13 };
            assert_eq!(
                layer.kv_source,
                KvSource::SharedFrom { producer },
                "layer {}",
                layer.index
            );
            assert_eq!(layer.mlp_width, 12288, "layer {} MLP width", layer.index);
        } else {
            assert!(
                layer.computes_own_kv(),
                "layer {} computes its own K/V",
                layer.index
            );
            assert_eq!(layer.mlp_width, 6144, "layer {} MLP width", layer.index);
        }
    }
}

#[test]
fn layer_plan_large_models_use_global_kv_heads_only_with_k_eq_v() {
    for (variant, sliding_kv, full_kv) in [("31b", 16, 4), ("26b-a4b", 8, 2), ("e4b", 2, 2)] {
        let plan = ModelPlan::from_config(&released_config(variant).text);
        for layer in &plan.layers {
            let (expected_kv, expected_k_eq_v) = match layer.attention_type {
                AttentionType::Sliding => (sliding_kv, false),
                AttentionType::Full => (full_kv, variant != "e4b"),
            };
            assert_eq!(
                layer.num_kv_heads, expected_kv,
                "{variant} layer {}",
                layer.index
            );
            assert_eq!(
                layer.key_equals_value, expected_k_eq_v,
                "{variant} layer {}",
                layer.index
            );
        }
        assert_eq!(
            plan.layers.last().unwrap().attention_type,
            AttentionType::Full,
            "{variant}: last layer full"
        );
    }
}

fn hf_counts() -> Value {
    common::read_json(
        &common::test_data_dir()
            .join("released")
            .join("param_counts.json"),
    )
}

#[test]
fn parameter_counts_match_hugging_face_meta_model_released() {
    let hf = hf_counts();
    for variant in VARIANTS {
        let counts = count_parameters(&released_config(variant));
        let p = &hf[variant]["parameters"];
        let get = |key: &str| {
            p[key]
                .as_u64()
                .unwrap_or_else(|| panic!("{variant}: no {key}"))
        };
        assert_eq!(counts.total, get("total"), "{variant}: total");
        assert_eq!(counts.text, get("text"), "{variant}: text");
        assert_eq!(
            counts.embeddings,
            get("text_embed_tokens"),
            "{variant}: embeddings"
        );
        assert_eq!(
            counts.per_layer_embedding_table,
            get("text_ple_table"),
            "{variant}: PLE table"
        );
        assert_eq!(
            counts.vision,
            get("vision_tower") + get("embed_vision"),
            "{variant}: vision"
        );
        assert_eq!(
            counts.audio,
            get("audio_tower") + get("embed_audio"),
            "{variant}: audio"
        );
        assert_eq!(
            counts.buffers,
            hf[variant]["persistent_buffer_total"].as_u64().unwrap(),
            "{variant}: persistent buffers"
        );
    }
}

#[test]
fn parameter_counts_e2b_published_totals() {
    // Published: E2B 5,104,297,504 with vision and audio; text alone 4,628,569,344, of which the
    // PLE table 2,348,810,240.
    let counts = count_parameters(&released_config("e2b"));
    assert_eq!(counts.total, 5_104_297_504);
    assert_eq!(counts.text, 4_628_569_344);
    assert_eq!(counts.per_layer_embedding_table, 2_348_810_240);
}

#[test]
fn parameter_count_snapshots_released() {
    let mut all = BTreeMap::new();
    for variant in VARIANTS {
        all.insert(variant, count_parameters(&released_config(variant)));
    }
    insta::assert_json_snapshot!("parameter_counts_released", all);
}

#[test]
fn kv_cache_bytes_per_token_match_the_spec_table() {
    // shared spec text §12, bf16: (full-layer growth per token, sliding footprint at full window)
    let expected = [
        ("e2b", 6 * 1024, 6 * 1024 * 1024),
        ("e4b", 16 * 1024, 20 * 1024 * 1024),
        ("31b", 80 * 1024, 800 * 1024 * 1024),
        ("26b-a4b", 20 * 1024, 200 * 1024 * 1024),
    ];
    for (variant, full, sliding) in expected {
        let config = released_config(variant);
        let plan = ModelPlan::from_config(&config.text);
        let footprint = cache_footprint(&plan, config.text.sliding_window, 2);
        assert_eq!(
            footprint.full_bytes_per_token, full,
            "{variant}: full-layer bytes per token"
        );
        assert_eq!(
            footprint.sliding_bytes_at_full_window, sliding,
            "{variant}: sliding footprint"
        );
    }
    // K=V layers holding a single tensor halve the full-layer growth (31B 80 -> 40 KiB).
    let config = released_config("31b");
    let footprint = cache_footprint(
        &ModelPlan::from_config(&config.text),
        config.text.sliding_window,
        2,
    );
    assert_eq!(
        footprint.full_bytes_per_token_single_tensor_k_eq_v,
        40 * 1024
    );
}

#[test]
fn text_tensor_inventory_matches_hugging_face_state_dict_released() {
    for variant in VARIANTS {
        let config = released_config(variant);
        let plan = ModelPlan::from_config(&config.text);
        let hf = common::read_json(
            &common::test_data_dir()
                .join("released")
                .join(variant)
                .join("tensors.json"),
        );
        let hf_text: BTreeMap<String, Vec<u64>> = hf["tensors"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(name, _)| name.starts_with("model.language_model."))
            .map(|(name, shape)| {
                (
                    name.clone(),
                    shape
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|d| d.as_u64().unwrap())
                        .collect(),
                )
            })
            .collect();
        let ours: BTreeMap<String, Vec<u64>> = text_tensor_specs(&config.text, &plan)
            .into_iter()
            .map(|s| {
                (
                    full_name("model.language_model.", &s.name),
                    s.shape.iter().map(|&d| d as u64).collect(),
                )
            })
            .collect();
        let missing: Vec<_> = hf_text.keys().filter(|k| !ours.contains_key(*k)).collect();
        let extra: Vec<_> = ours.keys().filter(|k| !hf_text.contains_key(*k)).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{variant}: missing {missing:?}, extra {extra:?}"
        );
        for (name, shape) in &hf_text {
            assert_eq!(&ours[name], shape, "{variant}: {name}");
        }
    }
}
