//! `config.json` of a Gemma 4 checkpoint, parsed and checked.
//!
//! Two checkpoint layouts exist (shared spec: text §3):
//! - `Gemma4ForConditionalGeneration` (the released checkpoints): the decoder's fields live under
//!   `text_config`, next to `vision_config`, `audio_config` and the special token ids;
//! - `Gemma4ForCausalLM` / `Gemma4TextConfig`: the decoder's fields are at the top level.
//!
//! Two spellings of the per-layer geometry exist (shared spec: text §1):
//! - the released one: `global_head_dim` (default 512) and `num_global_key_value_heads` (used only
//!   when `attention_k_eq_v`), applied to every `full_attention` layer;
//! - the one `transformers` 5.23 writes: `"per_layer_config": {"5": {"head_dim": 32, ...}}`, a map
//!   from layer index (possibly zero-padded, e.g. `"04"`) to overrides of `head_dim` and
//!   `num_key_value_heads`.
//!
//! Fields that Hugging Face gives a default to get the same default here (most importantly
//! `hidden_size_per_layer_input` = 256: PLE is on unless disabled). The fields that fix the
//! shapes of the weights (`vocab_size`, `hidden_size`, `intermediate_size`, `num_hidden_layers`,
//! `num_attention_heads`, `num_key_value_heads`, `head_dim`) are required: a config without them
//! describes no particular model.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::memory::{read_bounded, MAX_JSON_FILE_BYTES};

/// Largest `num_hidden_layers` accepted (text, vision and audio). Released models have at most
/// 60 layers; the limit keeps a typo such as `1e12` from sizing the per-layer tables (layer
/// types, geometry, the layer plan) before any weight is looked at.
pub const MAX_LAYERS: usize = 4096;

/// Largest value of any size field (widths, head counts, head dims, vocabularies, the sliding
/// window), and of the attention width `heads x head_dim` and the PLE width `layers x P`:
/// 2^24. Released models stay below 2^19.
pub const MAX_DIMENSION: usize = 1 << 24;

/// Largest number of elements of any weight tensor a config implies: 2^40 (4 TiB as f32).
/// With [`MAX_LAYERS`] and [`MAX_DIMENSION`] this keeps every size, parameter count and byte
/// count derived from a config inside `u64` arithmetic.
pub const MAX_TENSOR_ELEMENTS: u64 = 1 << 40;

/// Attention type of one decoder layer (shared spec: text §1, §5.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum AttentionType {
    /// Local attention over the last `sliding_window` positions (the query's own included).
    Sliding,
    /// Causal attention over every earlier position ("global" layer).
    Full,
}

impl AttentionType {
    /// The name Hugging Face uses in `layer_types` and `rope_parameters`.
    pub fn hf_name(self) -> &'static str {
        match self {
            AttentionType::Sliding => "sliding_attention",
            AttentionType::Full => "full_attention",
        }
    }
}

/// The last layer of type `kind` among `types[..before]`, if any. With `before` the first
/// KV-shared layer, this is the KV producer that the shared layers of type `kind` read (shared
/// spec: text §7); the config validation and the layer plan both use it.
pub fn last_layer_of(types: &[AttentionType], before: usize, kind: AttentionType) -> Option<usize> {
    types[..before].iter().rposition(|&t| t == kind)
}

/// How a layer type's rotary frequencies are built (shared spec: text §6).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub enum RopeKind {
    /// Every frequency pair rotates: `inv[k] = theta^(-2k/d)`, `k < d/2`.
    Default,
    /// Proportional p-RoPE: only the first `floor(partial_rotary_factor * d / 2)` pairs rotate,
    /// with the exponent still over the full head dim; the other pairs have frequency 0.
    Proportional { partial_rotary_factor: f64 },
}

/// RoPE parameters of one layer type (`rope_parameters[layer_type]`).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct RopeParameters {
    pub kind: RopeKind,
    /// Base wavelength theta (1e4 sliding, 1e6 full in every released model).
    pub theta: f64,
    /// Frequencies are divided by this factor (1.0 unless the config says otherwise).
    pub factor: f64,
}

/// The decoder's configuration, with every default resolved.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TextConfig {
    /// `V`: rows of `embed_tokens` and width of the logits.
    pub vocab_size: usize,
    /// `D`: width of the residual stream.
    pub hidden_size: usize,
    /// `F`: width of the dense MLP (the shared MLP next to the experts in MoE models).
    pub intermediate_size: usize,
    /// `L`: number of decoder layers.
    pub num_hidden_layers: usize,
    /// `H`: query heads, the same on every layer.
    pub num_attention_heads: usize,
    /// Key/value heads of sliding layers (and of full layers unless overridden).
    pub num_key_value_heads: usize,
    /// Head dim of sliding layers (and of full layers unless overridden).
    pub head_dim: usize,
    /// Per layer, the resolved `(head_dim, num_key_value_heads)` after the released spelling or
    /// `per_layer_config` was applied.
    pub layer_geometry: Vec<LayerGeometry>,
    /// Full layers have no `v_proj`: V comes from the `k_proj` output (shared spec: text §5.3).
    pub attention_k_eq_v: bool,
    /// Type of every layer; the last one is always `Full` (Hugging Face forces it).
    pub layer_types: Vec<AttentionType>,
    /// `W`: keys a sliding-layer query sees, itself included.
    pub sliding_window: usize,
    /// RoPE of sliding layers.
    pub rope_sliding: RopeParameters,
    /// RoPE of full layers.
    pub rope_full: RopeParameters,
    /// `P`: width of each layer's Per-Layer Embedding; 0 means no PLE at all.
    pub hidden_size_per_layer_input: usize,
    /// Rows of the PLE table.
    pub vocab_size_per_layer_input: usize,
    /// The last `num_kv_shared_layers` layers reuse K/V of earlier layers.
    pub num_kv_shared_layers: usize,
    /// KV-consumer layers get a `2F`-wide MLP.
    pub use_double_wide_mlp: bool,
    /// Mixture-of-experts block next to the dense MLP on every layer.
    pub moe: Option<MoeConfig>,
    /// `c` of the final `c * tanh(logits / c)`; `None` means no softcapping.
    pub final_logit_softcapping: Option<f64>,
    /// The LM head is `embed_tokens.weight` (no `lm_head.weight` tensor needed).
    pub tie_word_embeddings: bool,
    /// Epsilon of every RMSNorm.
    pub rms_norm_eps: f64,
    /// `None`, or `"vision"` (bidirectional image blocks on sliding layers).
    pub use_bidirectional_attention: Option<String>,
    /// Id whose PLE row multimodal placeholders use, and the HF padding id.
    pub pad_token_id: usize,
    /// Not used by the math (RoPE is not scaled); kept for `inspect`.
    pub max_position_embeddings: usize,
}

/// Head geometry of one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LayerGeometry {
    pub head_dim: usize,
    pub num_key_value_heads: usize,
}

/// Mixture-of-experts settings (26B-A4B; shared spec: text §9).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MoeConfig {
    /// `E`: experts per layer (128 in 26B-A4B).
    pub num_experts: usize,
    /// `k`: experts chosen per token (8 in 26B-A4B).
    pub top_k_experts: usize,
    /// `I`: width of one expert's GeGLU (704 in 26B-A4B).
    pub moe_intermediate_size: usize,
}

/// The vision tower's configuration (only what fixes its parameter count; multimodal spec §0).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub patch_size: usize,
    pub position_embedding_size: usize,
    pub pooling_kernel_size: usize,
    pub use_clipped_linears: bool,
    pub standardize: bool,
    /// ε of every RMSNorm of the tower and of its projector (1e-6).
    pub rms_norm_eps: f64,
    /// θ of the axial 2D RoPE (`rope_parameters.rope_theta`, 100).
    pub rope_theta: f64,
}

/// The audio tower's configuration (only what fixes its parameter count; multimodal spec §0, §2).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct AudioConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub subsampling_conv_channels: Vec<usize>,
    pub conv_kernel_size: usize,
    pub output_proj_dims: usize,
    pub use_clipped_linears: bool,
    /// Queries per block of Hugging Face's blocked attention (12).
    pub attention_chunk_size: usize,
    /// `L`: keys per query are `L − 1` (13 → 12, distances 0…11).
    pub attention_context_left: usize,
    /// Keys after the query (0: causal).
    pub attention_context_right: usize,
    /// The attention logits' soft-cap (50).
    pub attention_logit_cap: f64,
    /// The macaron feed-forward halves' residual weight (0.5).
    pub residual_weight: f64,
    /// The clamp of the residual stream (1e10: a no-op in practice).
    pub gradient_clipping: f64,
    /// ε of every norm of the tower and of its projector (1e-6).
    pub rms_norm_eps: f64,
}

/// Which checkpoint class wrote the directory: decides the tensor-name prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum CheckpointLayout {
    /// `Gemma4ForConditionalGeneration`: text weights under `model.language_model.`.
    ConditionalGeneration,
    /// `Gemma4ForCausalLM`: text weights under `model.`.
    CausalLm,
}

impl CheckpointLayout {
    /// The prefix of the text weights' tensor names in a checkpoint of this layout (shared
    /// spec: text §3).
    pub const fn text_prefix(self) -> &'static str {
        match self {
            CheckpointLayout::ConditionalGeneration => "model.language_model.",
            CheckpointLayout::CausalLm => "model.",
        }
    }
}

/// Special token ids of the multimodal model (read from config.json, never hard-coded).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SpecialTokens {
    pub image_token_id: Option<usize>,
    pub audio_token_id: Option<usize>,
    pub video_token_id: Option<usize>,
    pub boi_token_id: Option<usize>,
    pub eoi_token_id: Option<usize>,
    pub boa_token_id: Option<usize>,
    pub eoa_token_id: Option<usize>,
    pub bos_token_id: Option<usize>,
    pub eos_token_ids: Vec<usize>,
    pub pad_token_id: usize,
}

/// A whole `config.json`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ModelConfig {
    /// Where the config was read from (for error messages).
    pub path: PathBuf,
    pub layout: CheckpointLayout,
    pub text: TextConfig,
    pub vision: Option<VisionConfig>,
    pub audio: Option<AudioConfig>,
    pub special_tokens: SpecialTokens,
}

impl ModelConfig {
    /// Reads and checks `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join("config.json"))
    }

    /// Reads and checks one `config.json` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = read_bounded(path, MAX_JSON_FILE_BYTES)?;
        let value: Value = serde_json::from_slice(&bytes).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::from_json(&value, path)
    }

    /// Checks an already-parsed `config.json`; `path` only labels errors.
    pub fn from_json(value: &Value, path: &Path) -> Result<Self> {
        let top = Fields::new(value, path, "")?;
        if let Some(model_type) = top.opt_string("model_type")? {
            if !model_type.starts_with("gemma4") {
                return Err(Error::config(
                    path,
                    "model_type",
                    format!("expected a Gemma 4 model type (`gemma4`, `gemma4_text`), found `{model_type}`"),
                ));
            }
        }
        let (layout, text_fields) = match top.get("text_config") {
            Some(text) if !text.is_null() => (
                CheckpointLayout::ConditionalGeneration,
                Fields::new(text, path, "text_config.")?,
            ),
            _ => (CheckpointLayout::CausalLm, top.clone()),
        };
        let mut text = parse_text_config(&text_fields)?;
        // The conditional-generation wrapper decides whether the LM head is tied.
        if layout == CheckpointLayout::ConditionalGeneration {
            if let Some(tie) = top.opt_bool("tie_word_embeddings")? {
                text.tie_word_embeddings = tie;
            }
        }
        let vision = match top.get("vision_config") {
            Some(v) if !v.is_null() => Some(parse_vision_config(
                &Fields::new(v, path, "vision_config.")?,
                text.hidden_size,
            )?),
            _ => None,
        };
        let audio = match top.get("audio_config") {
            Some(v) if !v.is_null() => Some(parse_audio_config(
                &Fields::new(v, path, "audio_config.")?,
                text.hidden_size,
            )?),
            _ => None,
        };
        let special_tokens = parse_special_tokens(&top, &text_fields, text.pad_token_id)?;
        Ok(ModelConfig {
            path: path.to_path_buf(),
            layout,
            text,
            vision,
            audio,
            special_tokens,
        })
    }
}

fn parse_text_config(f: &Fields) -> Result<TextConfig> {
    let vocab_size = f.req_positive("vocab_size")?;
    let hidden_size = f.req_positive("hidden_size")?;
    let intermediate_size = f.req_positive("intermediate_size")?;
    let num_hidden_layers = f.req_layer_count("num_hidden_layers")?;
    let num_attention_heads = f.req_positive("num_attention_heads")?;
    let num_key_value_heads = f.req_positive("num_key_value_heads")?;
    let head_dim = f.req_positive("head_dim")?;
    let attention_k_eq_v = f.opt_bool("attention_k_eq_v")?.unwrap_or(false);
    let sliding_window = f.opt_positive("sliding_window")?.unwrap_or(512);
    let rms_norm_eps = f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6);
    if !(rms_norm_eps.is_finite() && rms_norm_eps > 0.0) {
        return Err(f.error(
            "rms_norm_eps",
            format!("expected a positive number, found {rms_norm_eps}"),
        ));
    }

    let use_bidirectional_attention = f.opt_string("use_bidirectional_attention")?;
    match use_bidirectional_attention.as_deref() {
        None | Some("vision") => {}
        Some("all") => {
            return Err(f.error(
                "use_bidirectional_attention",
                "\"all\" (encoder mode, non-causal) is not supported: it is not a decoder; use null or \"vision\"",
            ))
        }
        Some(other) => {
            return Err(f.error(
                "use_bidirectional_attention",
                format!("expected null, \"vision\" or \"all\", found \"{other}\""),
            ))
        }
    }

    if let Some(activation) = f.opt_string("hidden_activation")? {
        if activation != "gelu_pytorch_tanh" {
            return Err(f.error(
                "hidden_activation",
                format!("Gemma 4 uses \"gelu_pytorch_tanh\" everywhere; \"{activation}\" is not supported"),
            ));
        }
    }
    if f.opt_bool("attention_bias")?.unwrap_or(false) {
        return Err(f.error(
            "attention_bias",
            "Gemma 4 has no attention biases; `true` is not supported",
        ));
    }

    // --- layer types: default 5:1 pattern, last layer forced to full (text §1) ---
    let mut layer_types = match f.get("layer_types") {
        None | Some(Value::Null) => (0..num_hidden_layers)
            .map(|i| {
                if (i + 1) % 6 == 0 {
                    AttentionType::Full
                } else {
                    AttentionType::Sliding
                }
            })
            .collect::<Vec<_>>(),
        Some(Value::Array(items)) => {
            let mut types = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                types.push(match item.as_str() {
                    Some("sliding_attention") => AttentionType::Sliding,
                    Some("full_attention") => AttentionType::Full,
                    _ => {
                        return Err(f.error(
                            &format!("layer_types[{i}]"),
                            format!(
                            "expected \"sliding_attention\" or \"full_attention\", found {item}"
                        ),
                        ))
                    }
                });
            }
            types
        }
        Some(other) => {
            return Err(f.error(
                "layer_types",
                format!("expected a list of layer types, found {other}"),
            ))
        }
    };
    if layer_types.len() != num_hidden_layers {
        return Err(f.error(
            "layer_types",
            format!(
                "has {} entries but num_hidden_layers is {num_hidden_layers}",
                layer_types.len()
            ),
        ));
    }
    if let Some(last) = layer_types.last_mut() {
        // Hugging Face overwrites a non-full last layer with a warning; so do we.
        *last = AttentionType::Full;
    }

    // --- per-layer geometry: released spelling or per_layer_config (text §1) ---
    let mut layer_geometry = vec![
        LayerGeometry {
            head_dim,
            num_key_value_heads,
        };
        num_hidden_layers
    ];
    match f.get("per_layer_config") {
        Some(Value::Object(map)) => {
            for (key, overrides) in map {
                let layer: usize = key.trim().parse().map_err(|_| {
                    f.error(
                        "per_layer_config",
                        format!("key \"{key}\" is not a layer index"),
                    )
                })?;
                if layer >= num_hidden_layers {
                    return Err(f.error(
                        "per_layer_config",
                        format!("key \"{key}\" names layer {layer}, but there are only {num_hidden_layers} layers"),
                    ));
                }
                let prefix = format!("{}per_layer_config.{key}.", f.prefix);
                let overrides = Fields::new(overrides, f.path, &prefix)?;
                for (name, value) in overrides.object {
                    match name.as_str() {
                        "head_dim" | "num_key_value_heads" => {}
                        "skip" if value.as_array().is_some_and(|a| a.is_empty()) => {}
                        _ => {
                            return Err(overrides.error(
                                name,
                                "only `head_dim` and `num_key_value_heads` may be overridden per layer in Gemma 4",
                            ))
                        }
                    }
                }
                if let Some(d) = overrides.opt_positive("head_dim")? {
                    layer_geometry[layer].head_dim = d;
                }
                if let Some(k) = overrides.opt_positive("num_key_value_heads")? {
                    layer_geometry[layer].num_key_value_heads = k;
                }
            }
        }
        None | Some(Value::Null) => {
            // Released spelling. `global_head_dim` defaults to 512 even for tiny configs, exactly
            // as in Hugging Face; `num_global_key_value_heads` applies only with K=V.
            let global_head_dim = f.opt_positive("global_head_dim")?.unwrap_or(512);
            let global_kv_heads = f.opt_positive("num_global_key_value_heads")?;
            for (layer, kind) in layer_types.iter().enumerate() {
                if *kind == AttentionType::Full {
                    layer_geometry[layer].head_dim = global_head_dim;
                    if let (true, Some(k)) = (attention_k_eq_v, global_kv_heads) {
                        layer_geometry[layer].num_key_value_heads = k;
                    }
                }
            }
        }
        Some(other) => {
            return Err(f.error(
                "per_layer_config",
                format!("expected an object keyed by layer index, found {other}"),
            ))
        }
    }
    for (layer, geometry) in layer_geometry.iter().enumerate() {
        if num_attention_heads % geometry.num_key_value_heads != 0 {
            return Err(f.error(
                "num_key_value_heads",
                format!(
                    "layer {layer} has {} key/value heads, which does not divide num_attention_heads = {num_attention_heads}",
                    geometry.num_key_value_heads
                ),
            ));
        }
        if geometry.head_dim % 2 != 0 {
            return Err(f.error(
                "head_dim",
                format!(
                    "layer {layer} has head_dim {}, but rotate-half RoPE needs an even head dim",
                    geometry.head_dim
                ),
            ));
        }
    }

    // --- RoPE per layer type (text §6) ---
    let (rope_sliding, rope_full) = parse_rope_parameters(f)?;

    // --- Per-Layer Embeddings (text §4) ---
    let hidden_size_per_layer_input = match f.get("hidden_size_per_layer_input") {
        None => 256,
        Some(Value::Null) => 0,
        Some(_) => f.opt_dimension("hidden_size_per_layer_input")?.unwrap_or(0),
    };
    let vocab_size_per_layer_input = f
        .opt_dimension("vocab_size_per_layer_input")?
        .unwrap_or(262_144);
    if hidden_size_per_layer_input > 0 && vocab_size_per_layer_input == 0 {
        return Err(f.error(
            "vocab_size_per_layer_input",
            "must be positive when PLE is on",
        ));
    }

    // --- KV sharing (text §7) ---
    let num_kv_shared_layers = f.opt_usize("num_kv_shared_layers")?.unwrap_or(0);
    if num_kv_shared_layers >= num_hidden_layers && num_kv_shared_layers > 0 {
        return Err(f.error(
            "num_kv_shared_layers",
            format!("{num_kv_shared_layers} shared layers leave no layer to produce K/V (num_hidden_layers = {num_hidden_layers})"),
        ));
    }
    let use_double_wide_mlp = f.opt_bool("use_double_wide_mlp")?.unwrap_or(false);

    // --- MoE (text §9) ---
    let moe = if f.opt_bool("enable_moe_block")?.unwrap_or(false) {
        let num_experts = f.req_positive("num_experts")?;
        let top_k_experts = f.req_positive("top_k_experts")?;
        let moe_intermediate_size = f.req_positive("moe_intermediate_size")?;
        if top_k_experts > num_experts {
            return Err(f.error(
                "top_k_experts",
                format!(
                    "{top_k_experts} experts per token, but only num_experts = {num_experts} exist"
                ),
            ));
        }
        Some(MoeConfig {
            num_experts,
            top_k_experts,
            moe_intermediate_size,
        })
    } else {
        None
    };

    let final_logit_softcapping = f.opt_f64("final_logit_softcapping")?;
    if let Some(cap) = final_logit_softcapping {
        if !(cap.is_finite() && cap > 0.0) {
            return Err(f.error(
                "final_logit_softcapping",
                format!("expected null or a positive number, found {cap}"),
            ));
        }
    }
    let tie_word_embeddings = f.opt_bool("tie_word_embeddings")?.unwrap_or(true);
    let pad_token_id = f.opt_usize("pad_token_id")?.unwrap_or(0);
    if pad_token_id >= vocab_size {
        return Err(f.error(
            "pad_token_id",
            format!("{pad_token_id} is outside the vocabulary of {vocab_size}"),
        ));
    }
    let max_position_embeddings = f.opt_usize("max_position_embeddings")?.unwrap_or(131_072);

    let config = TextConfig {
        vocab_size,
        hidden_size,
        intermediate_size,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        layer_geometry,
        attention_k_eq_v,
        layer_types,
        sliding_window,
        rope_sliding,
        rope_full,
        hidden_size_per_layer_input,
        vocab_size_per_layer_input,
        num_kv_shared_layers,
        use_double_wide_mlp,
        moe,
        final_logit_softcapping,
        tie_word_embeddings,
        rms_norm_eps,
        use_bidirectional_attention,
        pad_token_id,
        max_position_embeddings,
    };
    check_text_sizes(f, &config)?;
    // KV sharing needs a producer of every layer type that a consumer uses (text §1).
    if num_kv_shared_layers > 0 {
        let first_shared = num_hidden_layers - num_kv_shared_layers;
        for kind in [AttentionType::Sliding, AttentionType::Full] {
            let consumed = config.layer_types[first_shared..].contains(&kind);
            let produced = config.layer_types[..first_shared].contains(&kind);
            if consumed && !produced {
                return Err(f.error(
                    "num_kv_shared_layers",
                    format!(
                        "the KV-shared layers {first_shared}..{num_hidden_layers} include {} layers, but no earlier layer of that type produces K/V for them",
                        kind.hf_name()
                    ),
                ));
            }
        }
        // A KV-shared layer attends over its producer's cached keys and values, so their head
        // geometry must agree (the producer is the last non-shared layer of the same type, §7).
        for consumer in first_shared..num_hidden_layers {
            let kind = config.layer_types[consumer];
            let producer =
                last_layer_of(&config.layer_types, first_shared, kind).expect("checked just above");
            let (mine, theirs) = (
                config.layer_geometry[consumer],
                config.layer_geometry[producer],
            );
            if mine != theirs {
                let field = if f.get("per_layer_config").is_some_and(Value::is_object) {
                    "per_layer_config"
                } else {
                    "num_kv_shared_layers"
                };
                return Err(f.error(
                    field,
                    format!(
                        "KV-shared layer {consumer} (head_dim {}, {} KV heads) reads the K/V cache of layer {producer} (head_dim {}, {} KV heads): their geometry must match",
                        mine.head_dim, mine.num_key_value_heads, theirs.head_dim, theirs.num_key_value_heads
                    ),
                ));
            }
        }
    }
    Ok(config)
}

/// Refuses configs whose weights would be absurdly large: every weight tensor has at most
/// [`MAX_TENSOR_ELEMENTS`] elements, and the attention and PLE widths at most [`MAX_DIMENSION`].
/// Errors name the field whose value makes the product too large.
fn check_text_sizes(f: &Fields, config: &TextConfig) -> Result<()> {
    let d = config.hidden_size;
    let p = config.hidden_size_per_layer_input;
    let l = config.num_hidden_layers;
    check_width(
        f,
        "hidden_size_per_layer_input",
        &[("num_hidden_layers", l), ("hidden_size_per_layer_input", p)],
    )?;
    check_elements(
        f,
        "vocab_size",
        "embed_tokens",
        &[("vocab_size", config.vocab_size), ("hidden_size", d)],
    )?;
    if p > 0 {
        check_elements(
            f,
            "vocab_size_per_layer_input",
            "embed_tokens_per_layer",
            &[
                (
                    "vocab_size_per_layer_input",
                    config.vocab_size_per_layer_input,
                ),
                ("num_hidden_layers x hidden_size_per_layer_input", l * p),
            ],
        )?;
        check_elements(
            f,
            "hidden_size_per_layer_input",
            "per_layer_model_projection",
            &[
                ("num_hidden_layers x hidden_size_per_layer_input", l * p),
                ("hidden_size", d),
            ],
        )?;
    }
    let mlp_width = config.intermediate_size * if config.use_double_wide_mlp { 2 } else { 1 };
    check_elements(
        f,
        "intermediate_size",
        "mlp.gate_proj",
        &[
            ("intermediate_size (doubled on KV-shared layers)", mlp_width),
            ("hidden_size", d),
        ],
    )?;
    for (layer, geometry) in config.layer_geometry.iter().enumerate() {
        let field = format!("head_dim (layer {layer})");
        check_width(
            f,
            &field,
            &[
                ("num_attention_heads", config.num_attention_heads),
                ("head_dim", geometry.head_dim),
            ],
        )?;
        check_elements(
            f,
            &field,
            "self_attn.q_proj",
            &[
                (
                    "num_attention_heads x head_dim",
                    config.num_attention_heads * geometry.head_dim,
                ),
                ("hidden_size", d),
            ],
        )?;
    }
    if let Some(moe) = &config.moe {
        check_elements(
            f,
            "num_experts",
            "experts.gate_up_proj",
            &[
                ("num_experts", moe.num_experts),
                ("2 x moe_intermediate_size", 2 * moe.moe_intermediate_size),
                ("hidden_size", d),
            ],
        )?;
    }
    Ok(())
}

/// Refuses a product of size fields above [`MAX_DIMENSION`] (an attention or PLE width).
fn check_width(f: &Fields, field: &str, factors: &[(&str, usize)]) -> Result<()> {
    let product = factors
        .iter()
        .try_fold(1u64, |acc, (_, n)| acc.checked_mul(*n as u64));
    if product.is_some_and(|n| n <= MAX_DIMENSION as u64) {
        return Ok(());
    }
    let names: Vec<&str> = factors.iter().map(|(name, _)| *name).collect();
    Err(f.error(
        field,
        format!(
            "{} = {} exceeds the largest width accepted, {MAX_DIMENSION}",
            names.join(" x "),
            product.map_or("more than 2^64".to_string(), |n| n.to_string()),
        ),
    ))
}

/// Refuses a weight `tensor` whose element count (the product of `factors`) exceeds
/// [`MAX_TENSOR_ELEMENTS`]; `field` is named in the error.
fn check_elements(f: &Fields, field: &str, tensor: &str, factors: &[(&str, usize)]) -> Result<()> {
    let product = factors
        .iter()
        .try_fold(1u64, |acc, (_, n)| acc.checked_mul(*n as u64));
    if product.is_some_and(|n| n <= MAX_TENSOR_ELEMENTS) {
        return Ok(());
    }
    let names: Vec<String> = factors
        .iter()
        .map(|(name, n)| format!("{name} ({n})"))
        .collect();
    Err(f.error(
        field,
        format!(
            "the weight `{tensor}` would have {} = {} elements, more than the {MAX_TENSOR_ELEMENTS} accepted",
            names.join(" x "),
            product.map_or("more than 2^64".to_string(), |n| n.to_string()),
        ),
    ))
}

fn parse_rope_parameters(f: &Fields) -> Result<(RopeParameters, RopeParameters)> {
    let default_sliding = RopeParameters {
        kind: RopeKind::Default,
        theta: 10_000.0,
        factor: 1.0,
    };
    let default_full = RopeParameters {
        kind: RopeKind::Proportional {
            partial_rotary_factor: 0.25,
        },
        theta: 1_000_000.0,
        factor: 1.0,
    };
    let rope = match f.get("rope_parameters") {
        None | Some(Value::Null) => return Ok((default_sliding, default_full)),
        Some(value) => Fields::new(value, f.path, &format!("{}rope_parameters.", f.prefix))?,
    };
    let parse_one = |kind: AttentionType, default: RopeParameters| -> Result<RopeParameters> {
        let name = kind.hf_name();
        let entry = match rope.get(name) {
            None | Some(Value::Null) => return Ok(default),
            Some(v) => Fields::new(v, f.path, &format!("{}{name}.", rope.prefix))?,
        };
        let theta = entry.opt_f64("rope_theta")?.unwrap_or(default.theta);
        // RoPE runs in f32: both numbers must survive the conversion (no inf, no 0).
        if !(theta > 1.0 && theta <= f64::from(f32::MAX)) {
            return Err(entry.error(
                "rope_theta",
                format!("expected a number > 1 that fits in float32, found {theta}"),
            ));
        }
        let factor = entry.opt_f64("factor")?.unwrap_or(1.0);
        if !(factor >= f64::from(f32::MIN_POSITIVE) && factor <= f64::from(f32::MAX)) {
            return Err(entry.error(
                "factor",
                format!("expected a positive number that fits in float32, found {factor}"),
            ));
        }
        let rope_type = entry
            .opt_string("rope_type")?
            .unwrap_or_else(|| "default".to_string());
        let kind = match rope_type.as_str() {
            "default" => RopeKind::Default,
            "proportional" => {
                let partial_rotary_factor = entry.opt_f64("partial_rotary_factor")?.unwrap_or(1.0);
                if !(partial_rotary_factor > 0.0 && partial_rotary_factor <= 1.0) {
                    return Err(entry.error(
                        "partial_rotary_factor",
                        format!("expected a number in (0, 1], found {partial_rotary_factor}"),
                    ));
                }
                RopeKind::Proportional {
                    partial_rotary_factor,
                }
            }
            other => {
                return Err(entry.error(
                    "rope_type",
                    format!(
                    "Gemma 4 uses \"default\" and \"proportional\"; \"{other}\" is not supported"
                ),
                ))
            }
        };
        Ok(RopeParameters {
            kind,
            theta,
            factor,
        })
    };
    let sliding = parse_one(AttentionType::Sliding, default_sliding)?;
    let full = parse_one(AttentionType::Full, default_full)?;
    Ok((sliding, full))
}

fn parse_vision_config(f: &Fields, text_hidden_size: usize) -> Result<VisionConfig> {
    let hidden_size = f.opt_positive("hidden_size")?.unwrap_or(768);
    let num_attention_heads = f.opt_positive("num_attention_heads")?.unwrap_or(12);
    let config = VisionConfig {
        hidden_size,
        intermediate_size: f.opt_positive("intermediate_size")?.unwrap_or(3072),
        num_hidden_layers: f.opt_layer_count("num_hidden_layers")?.unwrap_or(16),
        num_attention_heads,
        num_key_value_heads: f.opt_positive("num_key_value_heads")?.unwrap_or(12),
        head_dim: f.opt_positive("head_dim")?.unwrap_or(64),
        patch_size: f.opt_positive("patch_size")?.unwrap_or(16),
        position_embedding_size: f
            .opt_positive("position_embedding_size")?
            .unwrap_or(10 * 1024),
        pooling_kernel_size: f.opt_positive("pooling_kernel_size")?.unwrap_or(3),
        use_clipped_linears: f.opt_bool("use_clipped_linears")?.unwrap_or(false),
        standardize: f.opt_bool("standardize")?.unwrap_or(false),
        rms_norm_eps: positive_eps(f, "rms_norm_eps")?,
        rope_theta: vision_rope_theta(f)?,
    };
    if let Some(activation) = f.opt_string("hidden_activation")? {
        if activation != "gelu_pytorch_tanh" {
            return Err(f.error(
                "hidden_activation",
                format!("the Gemma 4 vision tower uses \"gelu_pytorch_tanh\"; \"{activation}\" is not supported"),
            ));
        }
    }
    if !config.head_dim.is_multiple_of(4) {
        return Err(f.error(
            "head_dim",
            format!(
                "the 2D RoPE splits each head in two halves of rotate-half pairs, so head_dim must be a multiple of 4, found {}",
                config.head_dim
            ),
        ));
    }
    if !config
        .num_attention_heads
        .is_multiple_of(config.num_key_value_heads)
    {
        return Err(f.error(
            "num_key_value_heads",
            format!(
                "{} query heads cannot share {} KV heads evenly",
                config.num_attention_heads, config.num_key_value_heads
            ),
        ));
    }
    // The tower's weights, as counted by `parameter_count` (multimodal spec §1.8).
    let d = ("hidden_size", config.hidden_size);
    let head_dim = ("head_dim", config.head_dim);
    check_elements(
        f,
        "num_attention_heads",
        "q_proj",
        &[
            d,
            ("num_attention_heads", config.num_attention_heads),
            head_dim,
        ],
    )?;
    check_elements(
        f,
        "num_key_value_heads",
        "k_proj",
        &[
            d,
            ("num_key_value_heads", config.num_key_value_heads),
            head_dim,
        ],
    )?;
    check_elements(
        f,
        "intermediate_size",
        "mlp.gate_proj",
        &[d, ("intermediate_size", config.intermediate_size)],
    )?;
    check_elements(
        f,
        "patch_size",
        "patch_embedder.input_proj",
        &[
            d,
            ("3 x patch_size", 3 * config.patch_size),
            ("patch_size", config.patch_size),
        ],
    )?;
    check_elements(
        f,
        "position_embedding_size",
        "patch_embedder.position_embedding_table",
        &[
            d,
            ("position_embedding_size", config.position_embedding_size),
        ],
    )?;
    check_elements(
        f,
        "hidden_size",
        "embed_vision",
        &[d, ("text hidden_size", text_hidden_size)],
    )?;
    Ok(config)
}

/// A positive, finite number (`default` when absent).
fn positive_number(f: &Fields, name: &str, default: f64) -> Result<f64> {
    let value = f.opt_f64(name)?.unwrap_or(default);
    if !(value.is_finite() && value > 0.0) {
        return Err(f.error(name, format!("expected a positive number, found {value}")));
    }
    Ok(value)
}

/// A positive, finite RMSNorm ε (default 1e-6).
fn positive_eps(f: &Fields, name: &str) -> Result<f64> {
    let eps = f.opt_f64(name)?.unwrap_or(1e-6);
    if !(eps.is_finite() && eps > 0.0) {
        return Err(f.error(name, format!("expected a positive number, found {eps}")));
    }
    Ok(eps)
}

/// θ of the vision tower's axial RoPE: `rope_parameters.rope_theta` (default 100); any other
/// `rope_type` than `axial` is refused, as Hugging Face does.
fn vision_rope_theta(f: &Fields) -> Result<f64> {
    let Some(rope) = f.get("rope_parameters").filter(|v| !v.is_null()) else {
        return Ok(100.0);
    };
    let rope = Fields::new(rope, f.path, &format!("{}rope_parameters.", f.prefix))?;
    if let Some(kind) = rope.opt_string("rope_type")? {
        if kind != "axial" {
            return Err(rope.error(
                "rope_type",
                format!("the vision tower's RoPE is \"axial\" (2D); \"{kind}\" is not supported"),
            ));
        }
    }
    let theta = rope.opt_f64("rope_theta")?.unwrap_or(100.0);
    if !(theta.is_finite() && theta > 0.0) {
        return Err(rope.error(
            "rope_theta",
            format!("expected a positive number, found {theta}"),
        ));
    }
    Ok(theta)
}

fn parse_audio_config(f: &Fields, text_hidden_size: usize) -> Result<AudioConfig> {
    let subsampling_conv_channels = match f.get("subsampling_conv_channels") {
        None | Some(Value::Null) => vec![128, 32],
        Some(Value::Array(items)) => {
            let mut channels = Vec::new();
            for (i, item) in items.iter().enumerate() {
                match item.as_u64() {
                    Some(c) if c > 0 && c <= MAX_DIMENSION as u64 => channels.push(c as usize),
                    _ => {
                        return Err(f.error(
                            &format!("subsampling_conv_channels[{i}]"),
                            format!(
                            "expected a positive integer of at most {MAX_DIMENSION}, found {item}"
                        ),
                        ))
                    }
                }
            }
            if channels.len() != 2 {
                return Err(f.error(
                    "subsampling_conv_channels",
                    format!("expected two channel counts, found {}", channels.len()),
                ));
            }
            channels
        }
        Some(other) => {
            return Err(f.error(
                "subsampling_conv_channels",
                format!("expected a list of two integers, found {other}"),
            ))
        }
    };
    let config = AudioConfig {
        hidden_size: f.opt_positive("hidden_size")?.unwrap_or(1024),
        num_hidden_layers: f.opt_layer_count("num_hidden_layers")?.unwrap_or(12),
        num_attention_heads: f.opt_positive("num_attention_heads")?.unwrap_or(8),
        subsampling_conv_channels,
        conv_kernel_size: f.opt_positive("conv_kernel_size")?.unwrap_or(5),
        output_proj_dims: f.opt_positive("output_proj_dims")?.unwrap_or(1536),
        use_clipped_linears: f.opt_bool("use_clipped_linears")?.unwrap_or(true),
        attention_chunk_size: f.opt_positive("attention_chunk_size")?.unwrap_or(12),
        attention_context_left: f.opt_positive("attention_context_left")?.unwrap_or(13),
        attention_context_right: f.opt_dimension("attention_context_right")?.unwrap_or(0),
        attention_logit_cap: positive_number(f, "attention_logit_cap", 50.0)?,
        residual_weight: positive_number(f, "residual_weight", 0.5)?,
        gradient_clipping: positive_number(f, "gradient_clipping", 1e10)?,
        rms_norm_eps: positive_eps(f, "rms_norm_eps")?,
    };
    if let Some(activation) = f.opt_string("hidden_act")? {
        if activation != "silu" {
            return Err(f.error(
                "hidden_act",
                format!("the Gemma 4 audio tower uses \"silu\"; \"{activation}\" is not supported"),
            ));
        }
    }
    if !config.hidden_size.is_multiple_of(2) {
        return Err(f.error(
            "hidden_size",
            format!(
                "{} is odd: the relative position rows are sin and cos halves of the audio width (multimodal §2.4), so it must be even",
                config.hidden_size
            ),
        ));
    }
    if config.attention_context_right != 0 {
        return Err(f.error(
            "attention_context_right",
            format!(
                "{} future keys per query are not supported: the released audio towers are causal (0)",
                config.attention_context_right
            ),
        ));
    }
    if config.attention_context_left < 2 {
        return Err(f.error(
            "attention_context_left",
            "must be at least 2 (a query sees attention_context_left - 1 keys, itself included)",
        ));
    }
    if !config
        .hidden_size
        .is_multiple_of(config.num_attention_heads)
    {
        return Err(f.error(
            "num_attention_heads",
            format!(
                "hidden_size {} is not a multiple of {} heads",
                config.hidden_size, config.num_attention_heads
            ),
        ));
    }
    // The tower's weights, as counted by `parameter_count` (multimodal spec §2.7).
    let d = ("hidden_size", config.hidden_size);
    let [c0, c1] = [0, 1].map(|i| config.subsampling_conv_channels[i]);
    check_elements(f, "hidden_size", "self_attn.q_proj", &[d, d])?;
    check_elements(
        f,
        "subsampling_conv_channels",
        "subsample_conv_projection",
        &[
            ("subsampling_conv_channels[0]", c0),
            ("subsampling_conv_channels[1]", c1),
            ("9", 9),
            d,
        ],
    )?;
    check_elements(
        f,
        "conv_kernel_size",
        "lconv1d.depthwise_conv1d",
        &[d, ("conv_kernel_size", config.conv_kernel_size)],
    )?;
    check_elements(
        f,
        "output_proj_dims",
        "output_proj",
        &[d, ("output_proj_dims", config.output_proj_dims)],
    )?;
    check_elements(
        f,
        "output_proj_dims",
        "embed_audio",
        &[
            ("output_proj_dims", config.output_proj_dims),
            ("text hidden_size", text_hidden_size),
        ],
    )?;
    Ok(config)
}

fn parse_special_tokens(top: &Fields, text: &Fields, pad_token_id: usize) -> Result<SpecialTokens> {
    // Multimodal ids live at the top level of a conditional-generation config; the
    // bos/eos ids may be on either level.
    let either = |name: &str| -> Result<Option<usize>> {
        match top.opt_usize(name)? {
            Some(v) => Ok(Some(v)),
            None => text.opt_usize(name),
        }
    };
    let eos_token_ids = match top.get("eos_token_id").or_else(|| text.get("eos_token_id")) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| match item.as_u64() {
                Some(id) => Ok(id as usize),
                None => Err(Error::config(
                    top.path,
                    format!("eos_token_id[{i}]"),
                    format!("expected a non-negative integer token id, found {item}"),
                )),
            })
            .collect::<Result<Vec<_>>>()?,
        Some(v) => match v.as_u64() {
            Some(id) => vec![id as usize],
            None => {
                return Err(Error::config(
                    top.path,
                    "eos_token_id",
                    format!("expected a token id or a list of token ids, found {v}"),
                ))
            }
        },
    };
    Ok(SpecialTokens {
        image_token_id: top.opt_usize("image_token_id")?,
        audio_token_id: top.opt_usize("audio_token_id")?,
        video_token_id: top.opt_usize("video_token_id")?,
        boi_token_id: top.opt_usize("boi_token_id")?,
        eoi_token_id: top.opt_usize("eoi_token_id")?,
        boa_token_id: top.opt_usize("boa_token_id")?,
        // The released configs spell the end-of-audio id `eoa_token_index`.
        eoa_token_id: match top.opt_usize("eoa_token_index")? {
            Some(v) => Some(v),
            None => top.opt_usize("eoa_token_id")?,
        },
        bos_token_id: either("bos_token_id")?,
        eos_token_ids,
        pad_token_id,
    })
}

/// A JSON object plus the context needed to name its fields in errors.
#[derive(Clone)]
struct Fields<'a> {
    object: &'a Map<String, Value>,
    path: &'a Path,
    /// Dotted prefix of this object inside config.json, e.g. `text_config.`.
    prefix: String,
}

impl<'a> Fields<'a> {
    fn new(value: &'a Value, path: &'a Path, prefix: &str) -> Result<Self> {
        match value {
            Value::Object(object) => Ok(Fields {
                object,
                path,
                prefix: prefix.to_string(),
            }),
            other => Err(Error::config(
                path,
                prefix.trim_end_matches('.'),
                format!("expected a JSON object, found {other}"),
            )),
        }
    }

    fn get(&self, name: &str) -> Option<&'a Value> {
        self.object.get(name)
    }

    fn error(&self, name: &str, message: impl Into<String>) -> Error {
        Error::config(self.path, format!("{}{name}", self.prefix), message)
    }

    fn opt_usize(&self, name: &str) -> Result<Option<usize>> {
        match self.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n <= (1u64 << 40) => Ok(Some(n as usize)),
                // Integers written as floats (e.g. `4.0`) are accepted when exact.
                _ => match v.as_f64() {
                    Some(x) if x >= 0.0 && x.fract() == 0.0 && x <= (1u64 << 40) as f64 => {
                        Ok(Some(x as usize))
                    }
                    _ => {
                        Err(self.error(name, format!("expected a non-negative integer, found {v}")))
                    }
                },
            },
        }
    }

    /// A size field: a non-negative integer of at most [`MAX_DIMENSION`].
    fn opt_dimension(&self, name: &str) -> Result<Option<usize>> {
        match self.opt_usize(name)? {
            Some(n) if n > MAX_DIMENSION => Err(self.error(
                name,
                format!("{n} is larger than the largest size accepted, {MAX_DIMENSION}"),
            )),
            other => Ok(other),
        }
    }

    fn opt_positive(&self, name: &str) -> Result<Option<usize>> {
        match self.opt_dimension(name)? {
            Some(0) => Err(self.error(name, "must be positive, found 0")),
            other => Ok(other),
        }
    }

    /// A layer count: positive and at most [`MAX_LAYERS`].
    fn opt_layer_count(&self, name: &str) -> Result<Option<usize>> {
        match self.opt_usize(name)? {
            Some(0) => Err(self.error(name, "must be positive, found 0")),
            Some(n) if n > MAX_LAYERS => Err(self.error(
                name,
                format!("{n} layers is more than the {MAX_LAYERS} accepted (released Gemma 4 models have at most 60)"),
            )),
            other => Ok(other),
        }
    }

    fn req_layer_count(&self, name: &str) -> Result<usize> {
        self.opt_layer_count(name)?
            .ok_or_else(|| self.error(name, "is required but missing"))
    }

    fn req_positive(&self, name: &str) -> Result<usize> {
        self.opt_positive(name)?
            .ok_or_else(|| self.error(name, "is required but missing"))
    }

    fn opt_f64(&self, name: &str) -> Result<Option<f64>> {
        match self.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.error(name, format!("expected a number, found {v}"))),
        }
    }

    fn opt_bool(&self, name: &str) -> Result<Option<bool>> {
        match self.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.error(name, format!("expected true or false, found {v}"))),
        }
    }

    fn opt_string(&self, name: &str) -> Result<Option<String>> {
        match self.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.error(name, format!("expected a string, found {v}"))),
        }
    }
}
