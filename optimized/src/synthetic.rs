//! Random-weight checkpoints of any Gemma 4 shape, written to disk as HF would
//! (`config.json` + `model.safetensors`), for tests and benchmarks (not a model component).
//!
//! - [`TinyConfig`] describes a tiny model of any variant family (head counts, head dims,
//!   windows, layer patterns, PLE / K=V / MoE / KV sharing on or off); the property tests draw
//!   them at random and compare the optimized engine with the reference on them.
//! - [`released_text_config`] turns a released `config.json` (`tests/data/released/<variant>/`)
//!   into a `Gemma4ForCausalLM` config with the real dimensions, optionally fewer layers;
//!   `cargo xtask synth` writes it with bf16 weights (about 10 GB for E2B, mostly the PLE table).
//! - [`TinyMultimodalConfig`] wraps a [`TinyConfig`] into a `Gemma4ForConditionalGeneration`
//!   config with a tiny vision tower ([`TinyVisionTower`]: clipped linears and/or standardize,
//!   any widths) and, optionally, `use_bidirectional_attention = "vision"`;
//!   [`released_config_with_towers`] does the same with the real dimensions of a released model
//!   (on-device tower for E2B/E4B: 768 wide, 16 layers, 12 heads × 64, MLP 3072, clipped; large
//!   tower for 31B/26B-A4B: 1152 wide, 27 layers, 16 heads × 72, MLP 4304, standardize; and
//!   E2B/E4B's audio tower: 1024 wide, 12 conformer layers, output 1536).
//!
//! - [`TinyAudioTower`] (in [`TinyMultimodalConfig::audio`], ids audio `V − 5`, BOA `V − 6`,
//!   EOA `V − 7`) adds a tiny audio tower of any width, depth, kernel and chunking; its
//!   tensors are the reference's `audio_tensor_specs`, drawn as the golden generator draws
//!   them (linears and kernels `1/√fan_in`, norms `1 ± 0.3`, `per_dim_scale` 0.3, the output
//!   bias 0.5) with clip bounds that really clip ([`audio_clip_bound`]).
//!
//! [`write_checkpoint`] streams the tensors to disk in blocks (never the whole model in memory),
//! generating values in parallel from a counter-based generator (same bytes for any thread count),
//! into a temporary file that is renamed into place at the end.
//!
//! Values follow the golden generator's recipe (golden/README.md): linear weights with standard
//! deviation `1/√fan_in`, the embedding `1/√D` (so `√D`-scaled embeddings have unit variance),
//! the PLE table 1, norm weights and router scales `1 ± 0.3`, `layer_scalar` and
//! `per_expert_scale` in `[0.5, 1.5)` — nothing at a neutral value that would hide a bug. The
//! vision tower (written when the config has a `vision_config`): linears `1/√fan_in`, the
//! position tables 0.5 (comparable to the pixel projection, so a swapped or misindexed table
//! shows), norms and `std_scale` `1 ± 0.3`, `std_bias` 0.5, and clip bounds that really clip
//! (see [`clip_bound`]), asymmetric, shared by k/v and by gate/up as in the released towers.

use std::io::Write;
use std::path::Path;

use gemma4_reference::audio::weights::audio_tensor_specs;
use gemma4_reference::checkpoint::{full_name, text_tensor_specs, TensorSpec, WeightDtype};
use gemma4_reference::config::CheckpointLayout;
use gemma4_reference::config::{AttentionType, RopeKind, RopeParameters};
use gemma4_reference::error::Error;
use gemma4_reference::faults::with_faults;
use gemma4_reference::layer_plan::{KvSource, LayerPlan};
use gemma4_reference::vision::weights::vision_tensor_specs;
use gemma4_reference::{ModelConfig, ModelPlan, Result};
use rayon::prelude::*;
use serde_json::{json, Value};

/// A one-layer attention plan for tests and benchmarks: layer 0 with its own keys and values,
/// default RoPE (θ = 10⁴), no PLE, no MoE; sliding with window `W` for `Some(W)`, full for
/// `None`. Other settings by struct update: `LayerPlan { key_equals_value: true, ..layer }`.
pub fn attention_layer(
    head_dim: usize,
    heads: usize,
    kv_heads: usize,
    window: Option<usize>,
) -> LayerPlan {
    LayerPlan {
        index: 0,
        attention_type: if window.is_some() {
            AttentionType::Sliding
        } else {
            AttentionType::Full
        },
        head_dim,
        num_query_heads: heads,
        num_kv_heads: kv_heads,
        key_equals_value: false,
        kv_source: KvSource::Own {
            shared_with_consumers: false,
        },
        sliding_window: window,
        rope: RopeParameters {
            kind: RopeKind::Default,
            theta: 1e4,
            factor: 1.0,
        },
        mlp_width: 8,
        has_per_layer_embedding: false,
        has_moe: false,
    }
}

/// SplitMix64: a counter-based generator (the value at index `i` needs no state before it).
#[inline]
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Uniform in `[-1, 1)` from stream `stream`, element `index`.
#[inline]
fn uniform(stream: u64, index: u64) -> f32 {
    let bits = splitmix64(stream ^ splitmix64(index));
    ((bits >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

/// `n` values uniform in `[-amplitude, amplitude)`, reproducible from `seed`.
pub fn random_values(n: usize, seed: u64, amplitude: f32) -> Vec<f32> {
    let stream = splitmix64(seed.wrapping_mul(0x2545_F491_4F6C_DD1D));
    (0..n)
        .map(|i| amplitude * uniform(stream, i as u64))
        .collect()
}

/// A tiny Gemma 4 text model of any family.
#[derive(Clone, Debug, PartialEq)]
pub struct TinyConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    /// KV heads of sliding layers.
    pub num_key_value_heads: usize,
    /// KV heads of full layers when `attention_k_eq_v` (else ignored, as in HF).
    pub num_global_key_value_heads: usize,
    pub head_dim: usize,
    pub global_head_dim: usize,
    /// `true` = full attention; the last layer is forced full by the config loader.
    pub full_layers: Vec<bool>,
    pub sliding_window: usize,
    /// `P`; 0 = no PLE.
    pub hidden_size_per_layer_input: usize,
    pub num_kv_shared_layers: usize,
    pub use_double_wide_mlp: bool,
    pub attention_k_eq_v: bool,
    /// `(experts, top_k, expert width)`
    pub moe: Option<(usize, usize, usize)>,
    pub tie_word_embeddings: bool,
    pub final_logit_softcapping: Option<f64>,
}

impl TinyConfig {
    /// The `config.json` of this model (`Gemma4ForCausalLM`, released spelling).
    pub fn config_json(&self) -> Value {
        let layer_types: Vec<&str> = self
            .full_layers
            .iter()
            .map(|&full| {
                if full {
                    "full_attention"
                } else {
                    "sliding_attention"
                }
            })
            .collect();
        let (enable_moe, experts, top_k, moe_width) = match self.moe {
            Some((e, k, i)) => (true, json!(e), json!(k), json!(i)),
            None => (false, Value::Null, Value::Null, Value::Null),
        };
        json!({
            "architectures": ["Gemma4ForCausalLM"],
            "model_type": "gemma4_text",
            "vocab_size": self.vocab_size,
            "vocab_size_per_layer_input": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.full_layers.len(),
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "num_global_key_value_heads": if self.attention_k_eq_v { json!(self.num_global_key_value_heads) } else { Value::Null },
            "head_dim": self.head_dim,
            "global_head_dim": self.global_head_dim,
            "attention_k_eq_v": self.attention_k_eq_v,
            "layer_types": layer_types,
            "sliding_window": self.sliding_window,
            "hidden_size_per_layer_input": self.hidden_size_per_layer_input,
            "num_kv_shared_layers": self.num_kv_shared_layers,
            "use_double_wide_mlp": self.use_double_wide_mlp,
            "enable_moe_block": enable_moe,
            "num_experts": experts,
            "top_k_experts": top_k,
            "moe_intermediate_size": moe_width,
            "final_logit_softcapping": self.final_logit_softcapping,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rms_norm_eps": 1e-6,
            "hidden_activation": "gelu_pytorch_tanh",
            "pad_token_id": 0,
            "bos_token_id": 2,
            "eos_token_id": 1,
            "rope_parameters": {
                "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0, "rope_type": "proportional"},
                "sliding_attention": {"rope_theta": 10_000.0, "rope_type": "default"}
            }
        })
    }
}

/// A tiny vision tower (shared spec: multimodal §1); patch 16, pooling 3, θ = 100.
#[derive(Clone, Debug, PartialEq)]
pub struct TinyVisionTower {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// A multiple of 4 (2D RoPE).
    pub head_dim: usize,
    pub position_embedding_size: usize,
    pub use_clipped_linears: bool,
    pub standardize: bool,
}

impl TinyVisionTower {
    /// The `vision_config` of this tower.
    pub fn config_json(&self) -> Value {
        json!({
            "model_type": "gemma4_vision",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "patch_size": 16,
            "pooling_kernel_size": 3,
            "position_embedding_size": self.position_embedding_size,
            "rms_norm_eps": 1e-6,
            "hidden_activation": "gelu_pytorch_tanh",
            "rope_parameters": {"rope_theta": 100.0, "rope_type": "axial"},
            "use_clipped_linears": self.use_clipped_linears,
            "standardize": self.standardize,
        })
    }
}

/// A tiny `Gemma4ForConditionalGeneration` model: a text decoder, optionally a vision tower,
/// optionally bidirectional image blocks (`use_bidirectional_attention = "vision"`). The special
/// ids are the last of the vocabulary: image placeholder `V − 1`, video `V − 2`, BOI `V − 3`,
/// EOI `V − 4` ([`TinyMultimodalConfig::image_token_id`], ...).
#[derive(Clone, Debug, PartialEq)]
pub struct TinyMultimodalConfig {
    pub text: TinyConfig,
    pub vision: Option<TinyVisionTower>,
    pub bidirectional_vision: bool,
    /// An audio tower (E2B/E4B-like); its ids are audio `V − 5`, BOA `V − 6`, EOA `V − 7`.
    pub audio: Option<TinyAudioTower>,
}

impl TinyMultimodalConfig {
    /// A small ready-made model for tests: 4 text layers (sliding window 4, one full, PLE), a
    /// 2-layer tower 32 wide with 2 heads × 16 (GQA-free) and an MLP of 48, clipped and/or
    /// standardized, bidirectional image blocks when `standardize` (as on the large models).
    pub fn small(clipped: bool, standardize: bool) -> Self {
        TinyMultimodalConfig {
            text: TinyConfig {
                vocab_size: 64,
                hidden_size: 32,
                intermediate_size: 48,
                num_attention_heads: 2,
                num_key_value_heads: 1,
                num_global_key_value_heads: 1,
                head_dim: 16,
                global_head_dim: 32,
                full_layers: vec![false, false, true, false],
                sliding_window: 4,
                hidden_size_per_layer_input: 4,
                num_kv_shared_layers: 0,
                use_double_wide_mlp: false,
                attention_k_eq_v: false,
                moe: None,
                tie_word_embeddings: true,
                final_logit_softcapping: Some(30.0),
            },
            vision: Some(TinyVisionTower {
                hidden_size: 32,
                intermediate_size: 48,
                num_hidden_layers: 2,
                num_attention_heads: 2,
                num_key_value_heads: 2,
                head_dim: 16,
                position_embedding_size: 64,
                use_clipped_linears: clipped,
                standardize,
            }),
            bidirectional_vision: standardize,
            audio: None,
        }
    }

    /// [`TinyMultimodalConfig::small`] (on-device-like: clipped vision tower, causal) with the
    /// audio tower `audio`.
    pub fn small_with_audio(audio: TinyAudioTower) -> Self {
        TinyMultimodalConfig {
            audio: Some(audio),
            ..TinyMultimodalConfig::small(true, false)
        }
    }

    /// The audio soft-token placeholder id, `V − 5`.
    pub fn audio_token_id(&self) -> usize {
        self.text.vocab_size - 5
    }

    /// The begin-of-audio id, `V − 6`.
    pub fn boa_token_id(&self) -> usize {
        self.text.vocab_size - 6
    }

    /// The end-of-audio id, `V − 7`.
    pub fn eoa_token_id(&self) -> usize {
        self.text.vocab_size - 7
    }

    /// The image soft-token placeholder id, `V − 1`.
    pub fn image_token_id(&self) -> usize {
        self.text.vocab_size - 1
    }

    /// The video placeholder id, `V − 2`.
    pub fn video_token_id(&self) -> usize {
        self.text.vocab_size - 2
    }

    /// The begin-of-image id, `V − 3`.
    pub fn boi_token_id(&self) -> usize {
        self.text.vocab_size - 3
    }

    /// The end-of-image id, `V − 4`.
    pub fn eoi_token_id(&self) -> usize {
        self.text.vocab_size - 4
    }

    /// The `config.json` of this model (conditional-generation layout, released spelling).
    pub fn config_json(&self) -> Value {
        let mut text = self.text.config_json();
        if self.bidirectional_vision {
            text["use_bidirectional_attention"] = json!("vision");
        }
        let mut config = json!({
            "architectures": ["Gemma4ForConditionalGeneration"],
            "model_type": "gemma4",
            "text_config": text,
            "vision_config": self.vision.as_ref().map(TinyVisionTower::config_json),
            "audio_config": self.audio.as_ref().map(TinyAudioTower::config_json),
            "image_token_id": self.image_token_id(),
            "video_token_id": self.video_token_id(),
            "boi_token_id": self.boi_token_id(),
            "eoi_token_id": self.eoi_token_id(),
            "tie_word_embeddings": self.text.tie_word_embeddings,
        });
        if self.audio.is_some() {
            // The released spelling of the end-of-audio id.
            config["audio_token_id"] = json!(self.audio_token_id());
            config["boa_token_id"] = json!(self.boa_token_id());
            config["eoa_token_index"] = json!(self.eoa_token_id());
        }
        config
    }
}

/// A tiny audio tower (shared spec: multimodal §2): 128 mel bins into `C₀ = 128` channels (the
/// only first channel count Hugging Face sizes right), then `subsampling_channels`; any width,
/// heads, depth, light-conv kernel, output width and attention chunking.
#[derive(Clone, Debug, PartialEq)]
pub struct TinyAudioTower {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// `C₁` (32 in the released towers).
    pub subsampling_channels: usize,
    pub conv_kernel_size: usize,
    pub output_proj_dims: usize,
    pub use_clipped_linears: bool,
    /// Queries per block (12 released).
    pub attention_chunk_size: usize,
    /// `L` (13 released): `L − 1` keys per query.
    pub attention_context_left: usize,
    /// The logits' soft cap (50 released).
    pub attention_logit_cap: f64,
}

impl TinyAudioTower {
    /// A small tower: 32 wide, 2 layers, 2 heads × 16, 4 subsampling channels, kernel 5,
    /// output 24, clipped, with the released chunking (12 queries, 12 keys each) and cap 50 —
    /// the golden E2B-like tower's shape.
    pub fn small() -> Self {
        TinyAudioTower {
            hidden_size: 32,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            subsampling_channels: 4,
            conv_kernel_size: 5,
            output_proj_dims: 24,
            use_clipped_linears: true,
            attention_chunk_size: 12,
            attention_context_left: 13,
            attention_logit_cap: 50.0,
        }
    }

    /// The `audio_config` of this tower (released spelling).
    pub fn config_json(&self) -> Value {
        json!({
            "model_type": "gemma4_audio",
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "subsampling_conv_channels": [128, self.subsampling_channels],
            "conv_kernel_size": self.conv_kernel_size,
            "output_proj_dims": self.output_proj_dims,
            "use_clipped_linears": self.use_clipped_linears,
            "attention_chunk_size": self.attention_chunk_size,
            "attention_context_left": self.attention_context_left,
            "attention_context_right": 0,
            "attention_logit_cap": self.attention_logit_cap,
            "attention_invalid_logits_value": -1e9,
            "residual_weight": 0.5,
            "gradient_clipping": 1e10,
            "rms_norm_eps": 1e-6,
            "hidden_act": "silu",
        })
    }
}

/// How many layers of each tower [`released_config_with_towers`] keeps (`None`: all).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TowerLayers {
    pub vision: Option<usize>,
    pub audio: Option<usize>,
}

/// A `Gemma4ForConditionalGeneration` config with the real dimensions of a released
/// `config.json`: its text decoder as [`released_text_config`] cuts it (`layers`), its vision
/// tower (on-device for E2B/E4B, large for 31B/26B-A4B) and, where the model has one (E2B/E4B),
/// its audio tower, each cut to `towers`' layer count if given, with the released special ids
/// and `use_bidirectional_attention`. [`write_checkpoint`] writes the towers next to the decoder.
pub fn released_config_with_towers(
    released: &Value,
    layers: Option<usize>,
    towers: TowerLayers,
) -> Value {
    let mut config = released.clone();
    let object = config.as_object_mut().expect("a config object");
    let mut text = released_text_config(released, layers);
    // Inside a conditional-generation config the decoder keeps its own model type only.
    if let Some(text) = text.as_object_mut() {
        text.remove("architectures");
    }
    object.insert("text_config".into(), text);
    object.insert(
        "architectures".into(),
        json!(["Gemma4ForConditionalGeneration"]),
    );
    for (key, cut) in [
        ("vision_config", towers.vision),
        ("audio_config", towers.audio),
    ] {
        let Some(tower) = object.get_mut(key).and_then(Value::as_object_mut) else {
            continue;
        };
        if let Some(layers) = cut.filter(|&l| l > 0) {
            let total = tower["num_hidden_layers"].as_u64().unwrap_or(0) as usize;
            tower.insert("num_hidden_layers".into(), json!(layers.min(total)));
        }
    }
    config
}

/// A `Gemma4ForCausalLM` config with the real dimensions of a released `config.json`, cut to
/// `layers` layers if given: the first `layers` entries of the layer pattern (the last forced to
/// full attention) and the released fraction of KV-shared layers, rounded down, provided both
/// layer types still have a producer (otherwise no sharing).
pub fn released_text_config(released: &Value, layers: Option<usize>) -> Value {
    let mut text = released
        .get("text_config")
        .cloned()
        .unwrap_or_else(|| released.clone());
    let object = text.as_object_mut().expect("a config object");
    object.insert("architectures".into(), json!(["Gemma4ForCausalLM"]));
    object.insert("model_type".into(), json!("gemma4_text"));
    if let Some(tie) = released.get("tie_word_embeddings") {
        object.insert("tie_word_embeddings".into(), tie.clone());
    }
    let total = object["num_hidden_layers"]
        .as_u64()
        .expect("num_hidden_layers") as usize;
    let Some(layers) = layers.filter(|&l| l > 0 && l < total) else {
        return text;
    };
    let mut types: Vec<Value> =
        object["layer_types"].as_array().expect("layer_types")[..layers].to_vec();
    types[layers - 1] = json!("full_attention");
    let shared = object
        .get("num_kv_shared_layers")
        .and_then(Value::as_u64)
        .unwrap_or(0) as usize
        * layers
        / total;
    let first_shared = layers - shared;
    let producers_ok = ["sliding_attention", "full_attention"].iter().all(|kind| {
        !types[first_shared..].iter().any(|t| t == kind)
            || types[..first_shared].iter().any(|t| t == kind)
    });
    object.insert("num_hidden_layers".into(), json!(layers));
    object.insert("layer_types".into(), Value::Array(types));
    object.insert(
        "num_kv_shared_layers".into(),
        json!(if producers_ok { shared } else { 0 }),
    );
    text
}

/// How a text tensor's values are drawn: `(offset, amplitude)` of a uniform distribution (the
/// amplitude is `√3 ·` the standard deviation).
fn distribution(spec: &TensorSpec, hidden_size: usize) -> (f32, f32) {
    let name = spec.name.as_str();
    let sqrt3 = 3f32.sqrt();
    if name == "embed_tokens.weight" || name == "lm_head.weight" {
        (0.0, sqrt3 / (hidden_size as f32).sqrt())
    } else if name == "embed_tokens_per_layer.weight" {
        (0.0, sqrt3)
    } else if name.ends_with("layer_scalar") || name.ends_with("per_expert_scale") {
        (1.0, 0.5)
    } else if spec.shape.len() == 1 {
        // Norm weights and the router scale.
        (1.0, 0.3 * sqrt3)
    } else {
        let fan_in = *spec.shape.last().expect("matrix") as f32;
        (0.0, sqrt3 / fan_in.sqrt())
    }
}

/// How a vision tensor's values are drawn (spec name without `model.`): the position tables
/// with standard deviation 0.5, `std_bias` 0.5, vectors (norms, `std_scale`) `1 ± 0.3`,
/// matrices `1/√fan_in`. Clip bounds are not drawn here ([`clip_bound`]).
fn vision_distribution(spec: &TensorSpec) -> (f32, f32) {
    let name = spec.name.as_str();
    let sqrt3 = 3f32.sqrt();
    if name.ends_with("position_embedding_table") || name.ends_with("std_bias") {
        (0.0, 0.5 * sqrt3)
    } else if spec.shape.len() == 1 {
        (1.0, 0.3 * sqrt3)
    } else {
        let fan_in = *spec.shape.last().expect("matrix") as f32;
        (0.0, sqrt3 / fan_in.sqrt())
    }
}

/// A clip bound of a vision linear (`{input,output}_{min,max}` of
/// `vision_tower.encoder.layers.{i}.{linear}`), or `None` for any other tensor.
///
/// Bounds that really clip, asymmetric (a swapped min/max or input/output shows): the inputs of
/// q/k/v and gate/up are RMS-normed (|x| ~ 1), bounded near ±1; o_proj reads attention outputs
/// and down_proj GeGLU products (both smaller), bounded near ±0.4 and ±0.3; outputs near ±0.8,
/// down_proj's (a sum of small products) near ±0.2.
/// Each bound is `base · (1 + u/2)` with `u ∈ [0, 1)` drawn from (seed, layer, group, bound),
/// where k/v share a group, and so do gate/up: their bounds are equal, as in the released towers
/// (fused JAX einsums).
pub fn clip_bound(spec_name: &str, seed: u64) -> Option<f32> {
    let rest = spec_name.strip_prefix("vision_tower.encoder.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: u64 = layer.parse().ok()?;
    let (linear, bound) = rest.rsplit_once('.')?;
    let (group, input_base, output_base) = match linear {
        "self_attn.q_proj" => (0, 1.0, 0.8),
        "self_attn.k_proj" | "self_attn.v_proj" => (1, 1.0, 0.8),
        "self_attn.o_proj" => (2, 0.4, 0.8),
        "mlp.gate_proj" | "mlp.up_proj" => (3, 1.0, 0.8),
        "mlp.down_proj" => (4, 0.3, 0.2),
        _ => return None,
    };
    let (index, base): (u64, f32) = match bound {
        "input_min" => (0, -input_base),
        "input_max" => (1, input_base),
        "output_min" => (2, -output_base),
        "output_max" => (3, output_base),
        _ => return None,
    };
    let stream = splitmix64(seed ^ splitmix64(0xC11B ^ (layer << 8) ^ (group << 4) ^ index));
    let u = 0.5 * (uniform(stream, 0) + 1.0);
    Some(base * (1.0 + 0.5 * u))
}

/// How an audio tensor's values are drawn (spec name without `model.`): `per_dim_scale` with
/// standard deviation 0.3 around 0 (as the golden generator: softplus then spreads the query
/// scale over 0.55–0.85), the output bias 0.5, other vectors (norms) `1 ± 0.3`, kernels and
/// matrices `1/√fan_in` (fan-in: every axis but the first, `C_in·3·3` for the convolutions and
/// `K` for the depthwise kernel). Clip bounds are not drawn here ([`audio_clip_bound`]).
fn audio_distribution(spec: &TensorSpec) -> (f32, f32) {
    let name = spec.name.as_str();
    let sqrt3 = 3f32.sqrt();
    if name.ends_with("per_dim_scale") {
        (0.0, 0.3 * sqrt3)
    } else if name.ends_with("output_proj.bias") {
        (0.0, 0.5 * sqrt3)
    } else if spec.shape.len() == 1 {
        (1.0, 0.3 * sqrt3)
    } else {
        let fan_in = spec.shape[1..].iter().product::<usize>() as f32;
        (0.0, sqrt3 / fan_in.sqrt())
    }
}

/// A clip bound of an audio linear (`{input,output}_{min,max}` of
/// `audio_tower.layers.{i}.{linear}`), or `None` for any other tensor.
///
/// Bounds that really clip, asymmetric, drawn as [`clip_bound`] draws the vision tower's: the
/// RMS-normed inputs of `ffw_layer_1`, q/k/v and `linear_start` near ±1; `ffw_layer_2` reads
/// SiLU outputs of clamped products (in [−0.28, 0.92]), `post` attention outputs and
/// `linear_end` SiLU outputs of normed values, near ±0.3, ±0.4 and ±0.8; outputs near ±0.8, those of the second products (sums of small terms, normed
/// right after) near ±0.3. q/k/v share one group (their bounds are equal, as in the released
/// towers: one fused JAX projection).
pub fn audio_clip_bound(spec_name: &str, seed: u64) -> Option<f32> {
    let rest = spec_name.strip_prefix("audio_tower.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: u64 = layer.parse().ok()?;
    let (linear, bound) = rest.rsplit_once('.')?;
    let (group, input_base, output_base) = match linear {
        "feed_forward1.ffw_layer_1" => (0, 1.0, 0.8),
        "feed_forward1.ffw_layer_2" => (1, 0.3, 0.3),
        "self_attn.q_proj" | "self_attn.k_proj" | "self_attn.v_proj" => (2, 1.0, 0.8),
        "self_attn.post" => (3, 0.4, 0.3),
        "lconv1d.linear_start" => (4, 1.0, 0.8),
        "lconv1d.linear_end" => (5, 0.8, 0.3),
        "feed_forward2.ffw_layer_1" => (6, 1.0, 0.8),
        "feed_forward2.ffw_layer_2" => (7, 0.3, 0.3),
        _ => return None,
    };
    let (index, base): (u64, f32) = match bound {
        "input_min" => (0, -input_base),
        "input_max" => (1, input_base),
        "output_min" => (2, -output_base),
        "output_max" => (3, output_base),
        _ => return None,
    };
    let stream = splitmix64(seed ^ splitmix64(0xA0D1 ^ (layer << 8) ^ (group << 4) ^ index));
    let u = 0.5 * (uniform(stream, 0) + 1.0);
    Some(base * (1.0 + 0.5 * u))
}

/// One tensor to write: full name, shape, and how its values are drawn.
struct Planned {
    name: String,
    shape: Vec<usize>,
    values: Values,
}

enum Values {
    /// `center + amplitude · uniform(stream, i)`.
    Uniform {
        center: f32,
        amplitude: f32,
        stream: u64,
    },
    /// One scalar (a clip bound).
    Scalar(f32),
}

/// Elements generated per parallel task, and tasks per write.
const CHUNK: usize = 1 << 16;
const CHUNKS_PER_WRITE: usize = 256;

/// Writes `config` to `dir/config.json` and random weights of `dtype` for every text tensor it
/// implies to `dir/model.safetensors` (streamed; temporary names renamed at the end), then, for a
/// conditional-generation config with a `vision_config`, every vision tensor (the reference's
/// `vision_tensor_specs`, under `model.`). Text tensors are drawn from the same streams whatever
/// the layout. Returns the size of the safetensors file.
pub fn write_checkpoint(dir: &Path, config: &Value, dtype: WeightDtype, seed: u64) -> Result<u64> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let config_path = dir.join("config.json");
    let parsed = ModelConfig::from_json(config, &config_path)?;
    let plan = with_faults(&[], || ModelPlan::from_config(&parsed.text));
    let prefix = parsed.layout.text_prefix();
    let text_specs = text_tensor_specs(&parsed.text, &plan);
    let stream_of = |index: usize| splitmix64(seed ^ splitmix64(index as u64 + 1));
    let mut planned: Vec<Planned> = text_specs
        .iter()
        .enumerate()
        .map(|(index, spec)| {
            let (center, amplitude) = distribution(spec, parsed.text.hidden_size);
            Planned {
                name: full_name(prefix, &spec.name),
                shape: spec.shape.clone(),
                values: Values::Uniform {
                    center,
                    amplitude,
                    stream: stream_of(index),
                },
            }
        })
        .collect();
    if let (Some(vision), CheckpointLayout::ConditionalGeneration) = (&parsed.vision, parsed.layout)
    {
        let first = planned.len();
        for (index, spec) in vision_tensor_specs(vision, parsed.text.hidden_size)
            .iter()
            .enumerate()
        {
            let values = match clip_bound(&spec.name, seed) {
                Some(bound) => Values::Scalar(bound),
                None => {
                    let (center, amplitude) = vision_distribution(spec);
                    Values::Uniform {
                        center,
                        amplitude,
                        stream: stream_of(first + index),
                    }
                }
            };
            planned.push(Planned {
                name: format!("model.{}", spec.name),
                shape: spec.shape.clone(),
                values,
            });
        }
    }
    if let (Some(audio), CheckpointLayout::ConditionalGeneration) = (&parsed.audio, parsed.layout) {
        let first = planned.len();
        for (index, spec) in audio_tensor_specs(audio, parsed.text.hidden_size)
            .iter()
            .enumerate()
        {
            let values = match audio_clip_bound(&spec.name, seed) {
                Some(bound) => Values::Scalar(bound),
                None => {
                    let (center, amplitude) = audio_distribution(spec);
                    Values::Uniform {
                        center,
                        amplitude,
                        stream: stream_of(first + index),
                    }
                }
            };
            planned.push(Planned {
                name: format!("model.{}", spec.name),
                shape: spec.shape.clone(),
                values,
            });
        }
    }
    let element_size = dtype.size();

    // Header: every tensor, in spec order, contiguous.
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0usize;
    for spec in &planned {
        let bytes = spec.shape.iter().product::<usize>() * element_size;
        header.insert(
            spec.name.clone(),
            // A `WeightDtype` serialises as its safetensors name (`F32`, `BF16`, `F16`).
            json!({"dtype": dtype, "shape": spec.shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut header_bytes = serde_json::to_vec(&Value::Object(header)).expect("serialisable");
    while !header_bytes.len().is_multiple_of(8) {
        header_bytes.push(b' ');
    }

    let final_path = dir.join("model.safetensors");
    let temporary = dir.join(format!(".model.safetensors.{}.partial", std::process::id()));
    let file = std::fs::File::create(&temporary).map_err(io(&temporary))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 22, file);
    let write_result = (|| -> std::io::Result<()> {
        out.write_all(&(header_bytes.len() as u64).to_le_bytes())?;
        out.write_all(&header_bytes)?;
        let mut buffer = Vec::new();
        for spec in &planned {
            let (center, amplitude, stream) = match spec.values {
                Values::Uniform {
                    center,
                    amplitude,
                    stream,
                } => (center, amplitude, stream),
                // A scalar: `center` with no spread.
                Values::Scalar(value) => (value, 0.0, 0),
            };
            let count = spec.shape.iter().product::<usize>();
            let mut done = 0;
            while done < count {
                let batch = (count - done).min(CHUNK * CHUNKS_PER_WRITE);
                buffer.resize(batch * element_size, 0u8);
                buffer
                    .par_chunks_mut(CHUNK * element_size)
                    .enumerate()
                    .for_each(|(c, bytes)| {
                        let first = (done + c * CHUNK) as u64;
                        for (i, slot) in bytes.chunks_exact_mut(element_size).enumerate() {
                            let value = center + amplitude * uniform(stream, first + i as u64);
                            match dtype {
                                WeightDtype::F32 => slot.copy_from_slice(&value.to_le_bytes()),
                                WeightDtype::BF16 => {
                                    slot.copy_from_slice(&half::bf16::from_f32(value).to_le_bytes())
                                }
                                WeightDtype::F16 => {
                                    slot.copy_from_slice(&half::f16::from_f32(value).to_le_bytes())
                                }
                            }
                        }
                    });
                out.write_all(&buffer)?;
                done += batch;
            }
        }
        out.flush()?;
        out.get_ref().sync_all()
    })();
    if let Err(source) = write_result {
        let _ = std::fs::remove_file(&temporary);
        return Err(Error::Io {
            path: temporary,
            source,
        });
    }
    drop(out);
    std::fs::rename(&temporary, &final_path).map_err(io(&final_path))?;
    let config_temporary = dir.join(".config.json.partial");
    std::fs::write(
        &config_temporary,
        serde_json::to_vec_pretty(config).expect("serialisable"),
    )
    .map_err(io(&config_temporary))?;
    std::fs::rename(&config_temporary, &config_path).map_err(io(&config_path))?;
    Ok((8 + header_bytes.len() + offset) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gemma4_reference::config::CheckpointLayout;

    fn released(variant: &str) -> Value {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/data/released")
            .join(variant)
            .join("config.json");
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    #[test]
    fn synthetic_released_configs_cut_to_any_layer_count_stay_valid_every_variant() {
        for variant in ["e2b", "e4b", "31b", "26b-a4b"] {
            let full = released(variant);
            let total = full["text_config"]["num_hidden_layers"].as_u64().unwrap() as usize;
            for layers in 1..=total {
                let config = released_text_config(&full, Some(layers));
                let parsed = ModelConfig::from_json(&config, Path::new("synthetic"))
                    .unwrap_or_else(|e| panic!("{variant} cut to {layers} layers: {e}"));
                assert_eq!(parsed.text.num_hidden_layers, layers, "{variant}");
                assert_eq!(parsed.layout, CheckpointLayout::CausalLm, "{variant}");
                let released_text = ModelConfig::from_json(&full, Path::new("released"))
                    .unwrap()
                    .text;
                assert_eq!(
                    parsed.text.hidden_size, released_text.hidden_size,
                    "{variant}: real dims"
                );
                if layers == total {
                    assert_eq!(
                        parsed.text.num_kv_shared_layers,
                        released_text.num_kv_shared_layers
                    );
                }
            }
        }
    }

    /// The released configs with their towers: conditional-generation layout, the text
    /// decoder cut as `released_text_config` cuts it, the vision tower at the real dimensions
    /// (cut to `vision_layers`), the audio tower of E2B/E4B (cut to `audio_layers`) and none for
    /// 31B/26B-A4B; the tensors `write_checkpoint` would write for it are the reference's
    /// inventory at those dimensions.
    #[test]
    fn synthetic_released_configs_with_towers_real_dimensions_every_variant() {
        for (variant, width, layers, heads, head_dim, mlp, clipped) in [
            ("e2b", 768, 16, 12, 64, 3072, true),
            ("e4b", 768, 16, 12, 64, 3072, true),
            ("31b", 1152, 27, 16, 72, 4304, false),
            ("26b-a4b", 1152, 27, 16, 72, 4304, false),
        ] {
            let full = released(variant);
            for (text_layers, vision_layers, audio_layers) in
                [(None, None, None), (Some(2), Some(3), Some(1))]
            {
                let towers = TowerLayers {
                    vision: vision_layers,
                    audio: audio_layers,
                };
                let config = released_config_with_towers(&full, text_layers, towers);
                let parsed = ModelConfig::from_json(&config, Path::new("synthetic"))
                    .unwrap_or_else(|e| panic!("{variant}: {e}"));
                assert_eq!(parsed.layout, CheckpointLayout::ConditionalGeneration);
                // E2B/E4B hear (spec multimodal §2): 1024 wide, 12 conformer layers, 8 heads,
                // output 1536; 31B/26B-A4B have no audio tower.
                match &parsed.audio {
                    Some(audio) => {
                        assert!(clipped, "{variant}: only the on-device models hear");
                        assert_eq!(
                            (
                                audio.hidden_size,
                                audio.num_hidden_layers,
                                audio.num_attention_heads,
                                audio.output_proj_dims
                            ),
                            (1024, audio_layers.unwrap_or(12), 8, 1536),
                            "{variant}"
                        );
                        let specs = audio_tensor_specs(audio, parsed.text.hidden_size);
                        assert!(
                            specs.iter().any(|s| s.name.ends_with("output_proj.bias")),
                            "{variant}: the audio inventory"
                        );
                    }
                    None => assert!(!clipped, "{variant}: E2B/E4B have an audio tower"),
                }
                let text = ModelConfig::from_json(
                    &released_text_config(&full, text_layers),
                    Path::new("text"),
                )
                .unwrap()
                .text;
                assert_eq!(parsed.text, text, "{variant}: the text decoder as cut");
                let vision = parsed.vision.as_ref().unwrap();
                assert_eq!(
                    (
                        vision.hidden_size,
                        vision.num_hidden_layers,
                        vision.num_attention_heads,
                        vision.num_key_value_heads,
                        vision.head_dim,
                        vision.intermediate_size,
                        vision.position_embedding_size,
                    ),
                    (
                        width,
                        vision_layers.unwrap_or(layers),
                        heads,
                        heads,
                        head_dim,
                        mlp,
                        10240
                    ),
                    "{variant}"
                );
                assert_eq!(vision.use_clipped_linears, clipped, "{variant}");
                assert_eq!(vision.standardize, !clipped, "{variant}");
                let specs = vision_tensor_specs(vision, parsed.text.hidden_size);
                let per_layer = if clipped { 41 } else { 13 };
                assert_eq!(
                    specs.len(),
                    3 + per_layer * vision.num_hidden_layers + 2 * usize::from(!clipped),
                    "{variant}: spec §1.8 tensor count"
                );
                for spec in &specs {
                    let bound = clip_bound(&spec.name, 4);
                    assert_eq!(bound.is_some(), spec.shape.is_empty(), "{}", spec.name);
                }
            }
        }
    }

    /// Text tensors are drawn from the same streams in both layouts: a tiny model written as a
    /// causal LM and with a vision tower (conditional generation) holds the same text bytes.
    #[test]
    fn synthetic_text_tensors_same_with_or_without_vision_tower() {
        let model = TinyMultimodalConfig::small(true, false);
        let (text_dir, vision_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        write_checkpoint(
            text_dir.path(),
            &model.text.config_json(),
            WeightDtype::F32,
            9,
        )
        .unwrap();
        write_checkpoint(vision_dir.path(), &model.config_json(), WeightDtype::F32, 9).unwrap();
        let open = |dir: &tempfile::TempDir| {
            gemma4_reference::checkpoint::Checkpoint::open(dir.path()).unwrap()
        };
        let (text, vision) = (open(&text_dir), open(&vision_dir));
        let names: Vec<String> = text.names().map(str::to_string).collect();
        assert!(names.len() > 10);
        for name in names {
            let tail = name.strip_prefix("model.").unwrap_or(&name);
            let moved = format!("model.language_model.{tail}");
            assert_eq!(
                text.file_of(&name).unwrap().bytes(&name),
                vision.file_of(&moved).unwrap().bytes(&moved),
                "{name}"
            );
        }
        assert!(vision
            .names()
            .any(|n| n.starts_with("model.vision_tower.encoder.layers.1.")));
    }

    #[test]
    fn synthetic_checkpoint_loads_with_every_tensor_and_is_reproducible() {
        let config = TinyConfig {
            vocab_size: 40,
            hidden_size: 16,
            intermediate_size: 12,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            num_global_key_value_heads: 1,
            head_dim: 8,
            global_head_dim: 16,
            full_layers: vec![false, true, false],
            sliding_window: 3,
            hidden_size_per_layer_input: 4,
            num_kv_shared_layers: 1,
            use_double_wide_mlp: true,
            attention_k_eq_v: true,
            moe: Some((4, 2, 6)),
            tie_word_embeddings: false,
            final_logit_softcapping: Some(30.0),
        };
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        for (dir, dtype) in [(&a, WeightDtype::BF16), (&b, WeightDtype::BF16)] {
            write_checkpoint(dir.path(), &config.config_json(), dtype, 7).unwrap();
        }
        let bytes =
            |d: &tempfile::TempDir| std::fs::read(d.path().join("model.safetensors")).unwrap();
        assert_eq!(bytes(&a), bytes(&b), "same seed, same bytes");
        // Every tensor the plan needs is present with its shape (the reference's own loader).
        let model = gemma4_reference::Gemma4TextModel::load(a.path()).unwrap();
        let scalar = model.weights.in_memory().expect("loaded in memory").layers[0].layer_scalar;
        assert!(
            (0.5..1.5).contains(&scalar),
            "layer_scalar drawn in [0.5, 1.5): {scalar}"
        );
        assert!(!a.path().read_dir().unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains("partial")));
    }
}
