//! The book's generated tables: worked numbers computed by the reference code, written between
//! `<!-- generated:NAME -->` markers of the chapters so that the prose cannot drift from them.

use std::path::Path;

use gemma4_reference::audio::features::{soft_token_count, valid_frame_count};
use gemma4_reference::config::AttentionType;
use gemma4_reference::faults::Fault;
use gemma4_reference::parameter_count::count_parameters;
use gemma4_reference::rope::inverse_frequencies;
use gemma4_reference::vision::preprocessing::{resized_size, SUPPORTED_BUDGETS};
use gemma4_reference::{ModelConfig, ModelPlan};

use gemma4::inspect::thousands;

use super::draw::binary_size;
use super::kv_cache::ModelCache;
use super::{GeneratedBlock, Result};

/// Sample image sizes (width × height) of the `image-budgets` table.
const IMAGE_SIZES: [(usize, usize); 5] = [
    (640, 427),
    (1024, 1024),
    (1920, 1080),
    (224, 224),
    (400, 1600),
];
/// Sample clip lengths (seconds) of the `audio-soft-tokens` table.
const CLIP_SECONDS: [f64; 8] = [0.01, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0, 45.0];
const SAMPLE_RATE: f64 = 16_000.0;

pub fn all(released: &[(&str, ModelConfig)], root: &Path) -> Result<Vec<GeneratedBlock>> {
    Ok(vec![
        block(
            "models.md",
            "released-configs",
            released_configs(released, root)?,
        ),
        block("models.md", "layer-plans", layer_plans(released)),
        block("models.md", "parameter-counts", parameter_counts(released)),
        block("rope.md", "rope-pairs", rope_pairs(released)),
        block("kv-cache.md", "kv-sharing", kv_sharing(released)),
        block("kv-cache.md", "kv-cache-sizes", kv_cache_sizes(released)),
        block("vision.md", "vision-towers", vision_towers(root)?),
        block("vision.md", "image-budgets", image_budgets()?),
        block("audio.md", "audio-soft-tokens", audio_soft_tokens()),
        block("faults.md", "fault-catalogue", fault_catalogue()),
        block("faults.md", "precision-choices", precision_choices()),
        block(
            "fault-signatures.md",
            "fault-signatures",
            super::fault_signatures::table(root)?,
        ),
    ])
}

fn block(chapter: &'static str, name: &'static str, markdown: String) -> GeneratedBlock {
    GeneratedBlock {
        chapter,
        name,
        markdown,
    }
}

fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut out = format!(
        "| {} |\n|{}\n",
        header.join(" | "),
        "---|".repeat(header.len())
    );
    for row in rows {
        out.push_str(&format!("| {} |\n", row.join(" | ")));
    }
    out
}

/// The released `config.json` values, read from the files themselves (`text_config`).
fn released_configs(released: &[(&str, ModelConfig)], root: &Path) -> Result<String> {
    let texts: Vec<serde_json::Value> = super::released_json(root)?
        .into_iter()
        .map(|json| json.get("text_config").cloned().unwrap_or(json))
        .collect();
    let show = |value: Option<&serde_json::Value>| match value {
        None | Some(serde_json::Value::Null) => "null".to_string(),
        Some(serde_json::Value::String(text)) => format!("`\"{text}\"`"),
        Some(other) => other.to_string(),
    };
    let field = |name: &str, label: &str| {
        let mut row = vec![label.to_string()];
        row.extend(texts.iter().map(|t| show(t.get(name))));
        row
    };
    let mut rows = vec![
        field("hidden_size", "`hidden_size` (`D`)"),
        field("num_hidden_layers", "`num_hidden_layers` (`L`)"),
    ];
    let mut pattern = vec!["`layer_types` (S sliding, F full)".to_string()];
    for (_, config) in released {
        let plan = ModelPlan::from_config(&config.text);
        let full = plan.pattern().replace(' ', "");
        let period = full.find('F').map_or(full.len(), |i| i + 1);
        let unit = &full[..period];
        pattern.push(if unit.repeat(full.len() / period) == full {
            format!("`{unit}` × {}", full.len() / period)
        } else {
            format!("`{full}`")
        });
    }
    rows.push(pattern);
    rows.extend([
        field("num_attention_heads", "`num_attention_heads` (`H`)"),
        field(
            "num_key_value_heads",
            "`num_key_value_heads` (sliding layers)",
        ),
        field("num_global_key_value_heads", "`num_global_key_value_heads`"),
    ]);
    let mut head_dims = vec!["`head_dim` / `global_head_dim`".to_string()];
    head_dims.extend(texts.iter().map(|t| {
        format!(
            "{} / {}",
            show(t.get("head_dim")),
            show(t.get("global_head_dim"))
        )
    }));
    rows.push(head_dims);
    rows.extend([
        field("attention_k_eq_v", "`attention_k_eq_v`"),
        field("sliding_window", "`sliding_window` (`W`)"),
        field(
            "use_bidirectional_attention",
            "`use_bidirectional_attention`",
        ),
        field(
            "intermediate_size",
            "`intermediate_size` (`F`; the shared MLP on 26B-A4B)",
        ),
        field("use_double_wide_mlp", "`use_double_wide_mlp`"),
        field("num_kv_shared_layers", "`num_kv_shared_layers`"),
        field(
            "hidden_size_per_layer_input",
            "`hidden_size_per_layer_input` (`P`)",
        ),
    ]);
    let mut experts = vec!["experts / top-k / `moe_intermediate_size`".to_string()];
    experts.extend(released.iter().map(|(_, c)| {
        c.text.moe.as_ref().map_or("–".to_string(), |m| {
            format!(
                "{} / {} / {}",
                m.num_experts, m.top_k_experts, m.moe_intermediate_size
            )
        })
    }));
    rows.push(experts);
    rows.extend([
        field("vocab_size", "`vocab_size`"),
        field("final_logit_softcapping", "`final_logit_softcapping`"),
        field("max_position_embeddings", "`max_position_embeddings`"),
    ]);
    let mut header = vec!["`config.json` field"];
    header.extend(released.iter().map(|(label, _)| *label));
    Ok(table(&header, rows))
}

fn layer_plans(released: &[(&str, ModelConfig)]) -> String {
    let rows = released
        .iter()
        .map(|(label, config)| {
            let plan = ModelPlan::from_config(&config.text);
            let of = |kind| plan.layers.iter().find(|l| l.attention_type == kind);
            let describe = |layer: Option<&gemma4_reference::LayerPlan>| {
                layer.map_or("—".to_string(), |l| {
                    format!(
                        "{} / {}{}",
                        l.head_dim,
                        l.num_kv_heads,
                        if l.key_equals_value { ", K=V" } else { "" }
                    )
                })
            };
            let full_count = plan
                .layers
                .iter()
                .filter(|l| l.attention_type == AttentionType::Full)
                .count();
            let shared = plan.layers.len() - plan.first_kv_shared_layer;
            let mut widths: Vec<usize> = plan.layers.iter().map(|l| l.mlp_width).collect();
            widths.sort_unstable();
            widths.dedup();
            let moe = config.text.moe.as_ref().map_or("—".to_string(), |m| {
                format!(
                    "{} experts, top-{}, width {}",
                    m.num_experts, m.top_k_experts, m.moe_intermediate_size
                )
            });
            vec![
                label.to_string(),
                plan.layers.len().to_string(),
                format!("`{}`", plan.pattern()),
                format!("{} full", full_count),
                config.text.sliding_window.to_string(),
                describe(of(AttentionType::Sliding)),
                describe(of(AttentionType::Full)),
                if shared > 0 {
                    format!("last {shared} (from layer {})", plan.first_kv_shared_layer)
                } else {
                    "—".into()
                },
                widths
                    .iter()
                    .map(usize::to_string)
                    .collect::<Vec<_>>()
                    .join(" / "),
                moe,
                if config.text.hidden_size_per_layer_input > 0 {
                    config.text.hidden_size_per_layer_input.to_string()
                } else {
                    "—".into()
                },
            ]
        })
        .collect();
    table(
        &[
            "model",
            "layers",
            "pattern (S sliding, F full)",
            "full layers",
            "window",
            "sliding: head dim / KV heads",
            "full: head dim / KV heads",
            "KV-shared layers",
            "MLP width",
            "MoE",
            "PLE width P",
        ],
        rows,
    )
}

fn parameter_counts(released: &[(&str, ModelConfig)]) -> String {
    let rows = released
        .iter()
        .map(|(label, config)| {
            let counts = count_parameters(config);
            vec![
                label.to_string(),
                thousands(counts.total),
                thousands(counts.text),
                thousands(counts.embeddings),
                thousands(counts.per_layer_embedding_table),
                thousands(counts.vision),
                thousands(counts.audio),
                thousands(counts.active_per_token),
            ]
        })
        .collect();
    table(
        &[
            "model",
            "total",
            "text (with embeddings and PLE)",
            "embeddings (= tied LM head)",
            "PLE table",
            "vision tower + projector",
            "audio tower + projector",
            "text parameters active per token",
        ],
        rows,
    )
}

fn rope_pairs(released: &[(&str, ModelConfig)]) -> String {
    let rows = released
        .iter()
        .flat_map(|(label, config)| {
            let plan = ModelPlan::from_config(&config.text);
            [AttentionType::Sliding, AttentionType::Full]
                .into_iter()
                .filter_map(|kind| plan.layers.iter().find(|l| l.attention_type == kind))
                .map(|layer| {
                    let frequencies = inverse_frequencies(&layer.rope, layer.head_dim);
                    let rotating = frequencies.iter().filter(|&&f| f > 0.0).count();
                    let kind = match layer.attention_type {
                        AttentionType::Sliding => "sliding",
                        AttentionType::Full => "full",
                    };
                    vec![
                        label.to_string(),
                        kind.to_string(),
                        layer.head_dim.to_string(),
                        format!("{}", layer.rope.theta),
                        format!("{rotating} of {}", frequencies.len()),
                        (frequencies.len() - rotating).to_string(),
                        format!(
                            "{:.3e}",
                            frequencies
                                .iter()
                                .copied()
                                .filter(|&f| f > 0.0)
                                .fold(f32::MAX, f32::min)
                        ),
                    ]
                })
                .collect::<Vec<_>>()
        })
        .collect();
    table(
        &[
            "model",
            "layer type",
            "head dim d",
            "theta",
            "rotating pairs",
            "pairs with frequency 0",
            "slowest rotating frequency",
        ],
        rows,
    )
}

fn kv_sharing(released: &[(&str, ModelConfig)]) -> String {
    let rows = released
        .iter()
        .map(|(label, config)| {
            let plan = ModelPlan::from_config(&config.text);
            let consumers: Vec<usize> = plan
                .layers
                .iter()
                .filter(|l| !l.computes_own_kv())
                .map(|l| l.index)
                .collect();
            let producer = |kind: AttentionType| {
                plan.layers
                    .iter()
                    .filter(|l| l.attention_type == kind && !l.computes_own_kv())
                    .map(|l| l.kv_layer())
                    .next()
                    .map_or("–".to_string(), |p| p.to_string())
            };
            let owners = |kind: AttentionType| {
                plan.layers
                    .iter()
                    .filter(|l| l.attention_type == kind && l.computes_own_kv())
                    .count()
            };
            vec![
                label.to_string(),
                config.text.num_kv_shared_layers.to_string(),
                match (consumers.first(), consumers.last()) {
                    (Some(first), Some(last)) => format!("{first}–{last}"),
                    _ => "none".to_string(),
                },
                producer(AttentionType::Sliding),
                producer(AttentionType::Full),
                format!(
                    "{} sliding + {} full",
                    owners(AttentionType::Sliding),
                    owners(AttentionType::Full)
                ),
            ]
        })
        .collect();
    table(
        &[
            "model",
            "`num_kv_shared_layers`",
            "consumers",
            "sliding producer",
            "full producer",
            "layers that own a cache",
        ],
        rows,
    )
}

fn kv_cache_sizes(released: &[(&str, ModelConfig)]) -> String {
    let rows = released
        .iter()
        .map(|(label, config)| {
            let cache = ModelCache::of(label, config);
            let [unshared, shared, single] = cache.per_token();
            let long = cache.max_context;
            vec![
                label.to_string(),
                format!(
                    "{} + {}",
                    cache.shared.sliding_layers_with_cache, cache.shared.full_layers_with_cache
                ),
                binary_size(unshared as f64),
                binary_size(shared as f64),
                binary_size(single as f64),
                binary_size(cache.shared.sliding_bytes_at_full_window as f64),
                format!(
                    "{} tokens: {}",
                    thousands(long as u64),
                    binary_size(cache.bytes_at(long, &cache.shared, true))
                ),
            ]
        })
        .collect();
    table(
        &[
            "model",
            "layers with a cache (sliding + full)",
            "per token, every layer its own K/V",
            "per token, KV sharing (HF)",
            "per token, sharing + one tensor on K=V layers",
            "sliding layers at a full window",
            "at the longest context (optimized engine)",
        ],
        rows,
    )
}

/// The two vision towers, from the released `vision_config`s (E2B's is E4B's, 31B's is 26B-A4B's).
fn vision_towers(root: &Path) -> Result<String> {
    let towers: Vec<serde_json::Value> = super::released_json(root)?
        .into_iter()
        .zip(super::RELEASED.iter().map(|(label, _)| label))
        .map(|(json, label)| {
            json.get("vision_config")
                .cloned()
                .ok_or_else(|| format!("the released {label} config has no vision_config"))
        })
        .collect::<std::result::Result<_, _>>()?;
    if towers[0] != towers[1] || towers[2] != towers[3] {
        return Err("E2B/E4B or 31B/26B-A4B no longer share a vision tower: the chapter's two columns are wrong".into());
    }
    let labels = [
        "width `Dv`, encoder layers",
        "heads × head dim",
        "MLP width (gated GELU-tanh)",
        "clipped linears / standardize",
        "patch, pooling kernel, position tables, 2D RoPE θ",
    ];
    let (small, large) = (tower_facts(&towers[0]), tower_facts(&towers[2]));
    let body = labels
        .iter()
        .zip(small.into_iter().zip(large))
        .map(|(label, (small, large))| vec![label.to_string(), small, large])
        .collect();
    Ok(table(
        &[
            "",
            "on-device tower (E2B, E4B)",
            "large tower (31B, 26B-A4B)",
        ],
        body,
    ))
}

/// The rows of the `vision-towers` table for one `vision_config`.
fn tower_facts(tower: &serde_json::Value) -> [String; 5] {
    let get = |key: &str| tower.get(key).map_or("?".to_string(), |v| v.to_string());
    let yes_no = |key: &str| match tower.get(key).and_then(|v| v.as_bool()) {
        Some(true) => "yes",
        _ => "no",
    };
    let theta = tower
        .pointer("/rope_parameters/rope_theta")
        .map_or("?".to_string(), |v| v.to_string());
    [
        format!("{}, {}", get("hidden_size"), get("num_hidden_layers")),
        format!("{} × {}", get("num_attention_heads"), get("head_dim")),
        get("intermediate_size"),
        format!(
            "{} / {}",
            yes_no("use_clipped_linears"),
            yes_no("standardize")
        ),
        format!(
            "{}, {}, {}, {}",
            get("patch_size"),
            get("pooling_kernel_size"),
            get("position_embedding_size"),
            theta
        ),
    ]
}

fn image_budgets() -> Result<String> {
    let mut header = vec!["image (width × height)".to_string()];
    header.extend(SUPPORTED_BUDGETS.iter().map(|b| format!("budget {b}")));
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    let rows = IMAGE_SIZES
        .iter()
        .map(|&(width, height)| {
            let mut row = vec![format!("{width} × {height}")];
            for &budget in &SUPPORTED_BUDGETS {
                let (h, w) = resized_size(height, width, budget)?;
                row.push(format!("{w} × {h} → {}", (h / 48) * (w / 48)));
            }
            Ok(row)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(format!(
        "{}\nEach cell: the resized width × height, then the soft tokens (`(H'/48)·(W'/48)`).\n",
        table(&header, rows)
    ))
}

fn audio_soft_tokens() -> String {
    let rows = CLIP_SECONDS
        .iter()
        .map(|&seconds| {
            let samples = (seconds * SAMPLE_RATE).round() as usize;
            vec![
                format!("{seconds} s"),
                thousands(samples as u64),
                valid_frame_count(samples).to_string(),
                soft_token_count(samples).to_string(),
            ]
        })
        .collect();
    table(
        &["clip", "samples at 16 kHz", "valid frames", "soft tokens"],
        rows,
    )
}

fn fault_catalogue() -> String {
    let rows = Fault::ALL
        .iter()
        .map(|fault| {
            vec![
                format!("`{}`", fault.id()),
                fault.description().replace('|', "\\|"),
                fault.spec_section().to_string(),
            ]
        })
        .collect();
    format!(
        "{}\n{} faults.\n",
        table(&["id", "the bug", "shared spec"], rows),
        Fault::ALL.len()
    )
}

/// The precision choices (reference/src/precision.rs) and the runtimes' profiles.
fn precision_choices() -> String {
    use gemma4_reference::precision::{PrecisionChoice, PROFILES};
    let choices = PrecisionChoice::ALL
        .iter()
        .map(|choice| {
            vec![
                format!("`{}`", choice.id()),
                choice.description().replace('|', "\\|"),
            ]
        })
        .collect();
    let profiles = PROFILES
        .iter()
        .map(|profile| {
            vec![
                format!("`{}`", profile.name),
                profile
                    .choices
                    .iter()
                    .map(|c| format!("`{}`", c.id()))
                    .collect::<Vec<_>>()
                    .join(", "),
                profile.about.replace('|', "\\|"),
            ]
        })
        .collect();
    format!(
        "{}\n{}",
        table(&["id", "what is held in fewer bits, and where"], choices),
        table(&["profile", "choices", "the runtime"], profiles)
    )
}
