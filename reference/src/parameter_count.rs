//! Exact parameter counts from `config.json` alone (what `gemma4 inspect` prints).
//!
//! Parameters are counted the way Hugging Face's `num_parameters()` counts them: every
//! `nn.Parameter`, the tied LM head once. Persistent buffers that are stored in the checkpoint
//! but are not parameters (`layer_scalar`, the clip bounds of clipped linears, the vision
//! `std_bias`/`std_scale`) are counted separately in [`ParameterCounts::buffers`].
//! The text part follows the tensor inventory of the shared spec (text §3); the towers follow
//! the multimodal spec (§1.8 vision, §2.7 audio).

use crate::checkpoint::text_tensor_specs;
use crate::config::{AudioConfig, ModelConfig, VisionConfig};
use crate::layer_plan::ModelPlan;

/// Parameter counts of a whole checkpoint, as exact integers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ParameterCounts {
    /// Everything: text + vision + audio (tied LM head counted once).
    pub total: u64,
    /// The text decoder, embedding and PLE tables included.
    pub text: u64,
    /// `embed_tokens` (`V x D`), also the tied LM head.
    pub embeddings: u64,
    /// The Per-Layer Embedding table (`V_ple x L·P`); 0 without PLE.
    pub per_layer_embedding_table: u64,
    /// Vision tower plus its projector into the text model (`embed_vision`).
    pub vision: u64,
    /// Audio tower plus its projector (`embed_audio`).
    pub audio: u64,
    /// Text parameters used to compute one token: all of them except the experts not chosen
    /// (only `k` of `E` run) and the PLE table, of which one row (`L·P` values) is read.
    pub active_per_token: u64,
    /// Persistent buffers stored in the checkpoint that are not parameters.
    pub buffers: u64,
}

/// Counts the parameters a config implies.
pub fn count_parameters(config: &ModelConfig) -> ParameterCounts {
    let text_config = &config.text;
    let plan = ModelPlan::from_config(text_config);
    let mut counts = ParameterCounts::default();
    let mut text_buffers = 0u64;
    for spec in text_tensor_specs(text_config, &plan) {
        let elements: u64 = spec.shape.iter().map(|&n| n as u64).product();
        if spec.name.ends_with("layer_scalar") {
            text_buffers += elements;
            continue;
        }
        counts.text += elements;
        match spec.name.as_str() {
            "embed_tokens.weight" => counts.embeddings = elements,
            "embed_tokens_per_layer.weight" => counts.per_layer_embedding_table = elements,
            _ => {}
        }
    }
    counts.active_per_token = counts.text - counts.per_layer_embedding_table
        + (text_config.num_hidden_layers * text_config.hidden_size_per_layer_input) as u64;
    if let Some(moe) = &text_config.moe {
        let per_expert = 3 * (moe.moe_intermediate_size * text_config.hidden_size) as u64;
        let unused = (moe.num_experts - moe.top_k_experts) as u64 * per_expert;
        counts.active_per_token -= unused * text_config.num_hidden_layers as u64;
    }
    let text_hidden = text_config.hidden_size as u64;
    let (vision_parameters, vision_buffers) = config
        .vision
        .as_ref()
        .map_or((0, 0), |v| vision_parameters(v, text_hidden));
    let (audio_parameters, audio_buffers) = config
        .audio
        .as_ref()
        .map_or((0, 0), |a| audio_parameters(a, text_hidden));
    counts.vision = vision_parameters;
    counts.audio = audio_parameters;
    counts.total = counts.text + counts.vision + counts.audio;
    counts.buffers = text_buffers + vision_buffers + audio_buffers;
    counts
}

/// Vision tower + `embed_vision` (multimodal spec §1.8): `(parameters, buffers)`.
fn vision_parameters(v: &VisionConfig, text_hidden: u64) -> (u64, u64) {
    let d = v.hidden_size as u64;
    let head_dim = v.head_dim as u64;
    let (heads, kv_heads) = (v.num_attention_heads as u64, v.num_key_value_heads as u64);
    let patch_pixels = 3 * (v.patch_size as u64).pow(2);
    let patch_embedder = d * patch_pixels + 2 * v.position_embedding_size as u64 * d;
    let attention = d * heads * head_dim // q_proj
        + 2 * d * kv_heads * head_dim // k_proj, v_proj
        + heads * head_dim * d // o_proj
        + 2 * head_dim; // q_norm, k_norm
    let mlp = 3 * d * v.intermediate_size as u64;
    let norms = 4 * d;
    let layer = attention + mlp + norms;
    let parameters = patch_embedder + v.num_hidden_layers as u64 * layer + text_hidden * d;
    // Clip bounds: 4 scalars on each of the 7 linears of a layer; standardize: bias + scale.
    let clip = if v.use_clipped_linears {
        7 * 4 * v.num_hidden_layers as u64
    } else {
        0
    };
    let standardize = if v.standardize { 2 * d } else { 0 };
    (parameters, clip + standardize)
}

/// Audio tower + `embed_audio` (multimodal spec §2.7): `(parameters, buffers)`.
fn audio_parameters(a: &AudioConfig, text_hidden: u64) -> (u64, u64) {
    let d = a.hidden_size as u64;
    let (c0, c1) = (
        a.subsampling_conv_channels[0] as u64,
        a.subsampling_conv_channels[1] as u64,
    );
    let head_dim = d / a.num_attention_heads as u64;
    // Two 3x3 convolutions (no bias) with bias-free LayerNorms, then the input projection whose
    // input width Hugging Face computes as (channels[0] / 4) * channels[1].
    let subsample = c0 * 9 + c0 + c1 * c0 * 9 + c1 + (c0 / 4) * c1 * d;
    let feed_forward = 2 * (4 * d * d) + 2 * d; // ffw_layer_1, ffw_layer_2, pre/post norms
    let attention = 4 * d * d + d * d + head_dim; // q, k, v, post; relative_k_proj; per_dim_scale
    let light_conv = 2 * d * d + d * d + d * a.conv_kernel_size as u64 + 2 * d;
    let norms = 3 * d; // norm_pre_attn, norm_post_attn, norm_out
    let layer = 2 * feed_forward + attention + light_conv + norms;
    let output = a.output_proj_dims as u64;
    let parameters =
        subsample + a.num_hidden_layers as u64 * layer + output * d + output + text_hidden * output;
    // Clip bounds: 4 scalars on 2 + 2 (the two FFNs) + 4 (q, k, v, post) + 2 (lconv) linears.
    let clip = if a.use_clipped_linears {
        10 * 4 * a.num_hidden_layers as u64
    } else {
        0
    };
    (parameters, clip)
}
