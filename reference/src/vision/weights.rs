//! The vision tower's checkpoint tensors (shared spec: multimodal §1.8): the only place that
//! knows their Hugging Face names, and the loader that checks every one before converting any.
//!
//! Names are under `model.vision_tower.` (the tower) and `model.embed_vision.` (its projector
//! into the text model); only `Gemma4ForConditionalGeneration` checkpoints hold them.

use ndarray::{Array1, Array2, Array3};

use crate::checkpoint::{check_text_headers, check_total_allocation, Checkpoint, TensorSpec};
use crate::config::{CheckpointLayout, ModelConfig, VisionConfig};
use crate::error::{Error, Result};
use crate::vision::clipped_linear::{ClipBounds, ClippedLinear};

/// Prefix of every vision tensor name.
const PREFIX: &str = "model.";

/// The seven clipped linears of an encoder layer, with their names under the layer.
const LINEARS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// The four scalar buffers of a clipped linear.
const BOUNDS: [&str; 4] = ["input_min", "input_max", "output_min", "output_max"];

/// The name of encoder layer `i`'s tensor `part` (without [`PREFIX`]).
fn layer_name(i: usize, part: &str) -> String {
    format!("vision_tower.encoder.layers.{i}.{part}")
}

/// Names and shapes of every vision tensor `config` implies (without the `model.` prefix), in
/// the order of the architecture; `text_hidden_size` is the width of the projector's output.
pub fn vision_tensor_specs(config: &VisionConfig, text_hidden_size: usize) -> Vec<TensorSpec> {
    let d = config.hidden_size;
    let (heads, kv_heads, head_dim) = (
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
    );
    let patch_pixels = 3 * config.patch_size * config.patch_size;
    let mut specs = Vec::new();
    let mut push = |name: String, shape: &[usize]| {
        specs.push(TensorSpec {
            name,
            shape: shape.to_vec(),
        })
    };
    push(
        "vision_tower.patch_embedder.input_proj.weight".into(),
        &[d, patch_pixels],
    );
    push(
        "vision_tower.patch_embedder.position_embedding_table".into(),
        &[2, config.position_embedding_size, d],
    );
    let linear_shapes = [
        [heads * head_dim, d],
        [kv_heads * head_dim, d],
        [kv_heads * head_dim, d],
        [d, heads * head_dim],
        [config.intermediate_size, d],
        [config.intermediate_size, d],
        [d, config.intermediate_size],
    ];
    for i in 0..config.num_hidden_layers {
        push(layer_name(i, "input_layernorm.weight"), &[d]);
        for (linear, shape) in LINEARS.iter().zip(&linear_shapes) {
            push(layer_name(i, &format!("{linear}.linear.weight")), shape);
            if config.use_clipped_linears {
                for bound in BOUNDS {
                    push(layer_name(i, &format!("{linear}.{bound}")), &[]);
                }
            }
        }
        push(layer_name(i, "self_attn.q_norm.weight"), &[head_dim]);
        push(layer_name(i, "self_attn.k_norm.weight"), &[head_dim]);
        push(layer_name(i, "post_attention_layernorm.weight"), &[d]);
        push(layer_name(i, "pre_feedforward_layernorm.weight"), &[d]);
        push(layer_name(i, "post_feedforward_layernorm.weight"), &[d]);
    }
    if config.standardize {
        push("vision_tower.std_bias".into(), &[d]);
        push("vision_tower.std_scale".into(), &[d]);
    }
    push(
        "embed_vision.embedding_projection.weight".into(),
        &[text_hidden_size, d],
    );
    specs
}

/// The patch embedder: a bias-free projection of the pixels and the factorised position
/// tables (multimodal §1.2).
pub struct PatchEmbedderWeights {
    /// `[Dv, 3·p²]`
    pub input_proj: Array2<f32>,
    /// `[2, position_embedding_size, Dv]`: `[0]` the x (column) table, `[1]` the y (row) table.
    pub position_table: Array3<f32>,
}

/// One encoder layer (multimodal §1.3).
pub struct EncoderLayerWeights {
    pub input_layernorm: Array1<f32>,
    /// `[H·d, Dv]`
    pub q_proj: ClippedLinear,
    /// `[K·d, Dv]`
    pub k_proj: ClippedLinear,
    /// `[K·d, Dv]`
    pub v_proj: ClippedLinear,
    /// `[Dv, H·d]`
    pub o_proj: ClippedLinear,
    /// `[d]`
    pub q_norm: Array1<f32>,
    /// `[d]`
    pub k_norm: Array1<f32>,
    pub post_attention_layernorm: Array1<f32>,
    pub pre_feedforward_layernorm: Array1<f32>,
    /// `[F, Dv]`
    pub gate_proj: ClippedLinear,
    /// `[F, Dv]`
    pub up_proj: ClippedLinear,
    /// `[Dv, F]`
    pub down_proj: ClippedLinear,
    pub post_feedforward_layernorm: Array1<f32>,
}

/// The large tower's standardize buffers (multimodal §1.6 step 8).
pub struct StandardizeWeights {
    /// `[Dv]`
    pub bias: Array1<f32>,
    /// `[Dv]`
    pub scale: Array1<f32>,
}

/// Every weight of the vision tower and its projector, as f32.
pub struct VisionWeights {
    pub patch_embedder: PatchEmbedderWeights,
    pub layers: Vec<EncoderLayerWeights>,
    pub standardize: Option<StandardizeWeights>,
    /// `embed_vision.embedding_projection`: `[Dt, Dv]`
    pub projection: Array2<f32>,
}

impl VisionWeights {
    /// Loads the vision tower of `config` from `checkpoint`: every header checked first (present,
    /// shaped as the config implies, a float dtype), then the memory for all of them, then the
    /// values (finite). A checkpoint without a vision tower is an error naming what is missing.
    pub fn load(checkpoint: &Checkpoint, config: &ModelConfig) -> Result<Self> {
        let vision = config.vision.as_ref().ok_or_else(|| {
            Error::config(
                &config.path,
                "vision_config",
                "the checkpoint has no vision tower (no vision_config), so it cannot take an image",
            )
        })?;
        if config.layout != CheckpointLayout::ConditionalGeneration {
            return Err(Error::config(
                &config.path,
                "architectures",
                "a vision tower is only stored by Gemma4ForConditionalGeneration checkpoints",
            ));
        }
        let specs = vision_tensor_specs(vision, config.text.hidden_size);
        let tensors = check_text_headers(checkpoint, PREFIX, &specs)?;
        check_total_allocation(checkpoint, &specs, PREFIX, "vision tower")?;

        let linear = |i: usize, name: &str| -> Result<ClippedLinear> {
            let weight = tensors.load(&layer_name(i, &format!("{name}.linear.weight")))?;
            let bounds = if vision.use_clipped_linears {
                let bound = |b: &str| tensors.load_bound(&layer_name(i, &format!("{name}.{b}")));
                Some(ClipBounds {
                    input_min: bound("input_min")?,
                    input_max: bound("input_max")?,
                    output_min: bound("output_min")?,
                    output_max: bound("output_max")?,
                })
            } else {
                None
            };
            Ok(ClippedLinear { weight, bounds })
        };
        let layers = (0..vision.num_hidden_layers)
            .map(|i| {
                Ok(EncoderLayerWeights {
                    input_layernorm: tensors.load(&layer_name(i, "input_layernorm.weight"))?,
                    q_proj: linear(i, "self_attn.q_proj")?,
                    k_proj: linear(i, "self_attn.k_proj")?,
                    v_proj: linear(i, "self_attn.v_proj")?,
                    o_proj: linear(i, "self_attn.o_proj")?,
                    q_norm: tensors.load(&layer_name(i, "self_attn.q_norm.weight"))?,
                    k_norm: tensors.load(&layer_name(i, "self_attn.k_norm.weight"))?,
                    post_attention_layernorm: tensors
                        .load(&layer_name(i, "post_attention_layernorm.weight"))?,
                    pre_feedforward_layernorm: tensors
                        .load(&layer_name(i, "pre_feedforward_layernorm.weight"))?,
                    gate_proj: linear(i, "mlp.gate_proj")?,
                    up_proj: linear(i, "mlp.up_proj")?,
                    down_proj: linear(i, "mlp.down_proj")?,
                    post_feedforward_layernorm: tensors
                        .load(&layer_name(i, "post_feedforward_layernorm.weight"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let standardize = if vision.standardize {
            Some(StandardizeWeights {
                bias: tensors.load("vision_tower.std_bias")?,
                scale: tensors.load("vision_tower.std_scale")?,
            })
        } else {
            None
        };
        Ok(VisionWeights {
            patch_embedder: PatchEmbedderWeights {
                input_proj: tensors.load("vision_tower.patch_embedder.input_proj.weight")?,
                position_table: tensors
                    .load("vision_tower.patch_embedder.position_embedding_table")?,
            },
            layers,
            standardize,
            projection: tensors.load("embed_vision.embedding_projection.weight")?,
        })
    }
}
