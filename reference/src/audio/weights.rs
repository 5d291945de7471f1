//! The audio tower's checkpoint tensors (shared spec: multimodal §2.7): the only place that
//! knows their Hugging Face names, and the loader that checks every one before converting any.
//!
//! Names are under `model.audio_tower.` (the tower) and `model.embed_audio.` (its projector);
//! only `Gemma4ForConditionalGeneration` checkpoints of E2B/E4B hold them.

use ndarray::{Array1, Array2};

use crate::audio::attention::AudioAttentionWeights;
use crate::audio::conformer_layer::ConformerLayerWeights;
use crate::audio::feed_forward::FeedForwardWeights;
use crate::audio::light_conv::LightConvWeights;
use crate::audio::subsampling::SubsamplingWeights;
use crate::checkpoint::{
    check_text_headers, check_total_allocation, Checkpoint, TensorSpec, TextTensors,
};
use crate::config::{AudioConfig, CheckpointLayout, ModelConfig};
use crate::error::{Error, Result};
use crate::vision::clipped_linear::{ClipBounds, ClippedLinear};

/// Prefix of every audio tensor name.
const PREFIX: &str = "model.";

/// The four scalar buffers of a clipped linear.
const BOUNDS: [&str; 4] = ["input_min", "input_max", "output_min", "output_max"];

/// The mel bins of the features (the subsampling's input width).
pub const MEL_BINS: usize = 128;

fn layer_name(i: usize, part: &str) -> String {
    format!("audio_tower.layers.{i}.{part}")
}

/// The clipped linears of a conformer layer and their shapes `[out, in]`.
fn clipped_linears(d: usize) -> [(&'static str, [usize; 2]); 9] {
    [
        ("feed_forward1.ffw_layer_1", [4 * d, d]),
        ("feed_forward1.ffw_layer_2", [d, 4 * d]),
        ("self_attn.q_proj", [d, d]),
        ("self_attn.k_proj", [d, d]),
        ("self_attn.v_proj", [d, d]),
        ("self_attn.post", [d, d]),
        ("lconv1d.linear_start", [2 * d, d]),
        ("lconv1d.linear_end", [d, d]),
        ("feed_forward2.ffw_layer_1", [4 * d, d]),
    ]
}

/// Names and shapes of every audio tensor `config` implies (without the `model.` prefix).
pub fn audio_tensor_specs(config: &AudioConfig, text_hidden_size: usize) -> Vec<TensorSpec> {
    let d = config.hidden_size;
    let [c0, c1] = [
        config.subsampling_conv_channels[0],
        config.subsampling_conv_channels[1],
    ];
    let mut specs = Vec::new();
    let mut push = |name: String, shape: &[usize]| {
        specs.push(TensorSpec {
            name,
            shape: shape.to_vec(),
        })
    };
    let sub = "audio_tower.subsample_conv_projection";
    push(format!("{sub}.layer0.conv.weight"), &[c0, 1, 3, 3]);
    push(format!("{sub}.layer0.norm.weight"), &[c0]);
    push(format!("{sub}.layer1.conv.weight"), &[c1, c0, 3, 3]);
    push(format!("{sub}.layer1.norm.weight"), &[c1]);
    // Hugging Face sizes the projection (channels[0] / 4) · channels[1]; the flattened width is
    // (128 mel bins / 4) · channels[1]: the two agree only for channels[0] = 128.
    push(
        format!("{sub}.input_proj_linear.weight"),
        &[d, (c0 / 4) * c1],
    );
    let mut linears: Vec<(&str, [usize; 2])> = clipped_linears(d).to_vec();
    linears.push(("feed_forward2.ffw_layer_2", [d, 4 * d]));
    for i in 0..config.num_hidden_layers {
        for (linear, shape) in &linears {
            push(layer_name(i, &format!("{linear}.linear.weight")), shape);
            if config.use_clipped_linears {
                for bound in BOUNDS {
                    push(layer_name(i, &format!("{linear}.{bound}")), &[]);
                }
            }
        }
        for ffw in ["feed_forward1", "feed_forward2"] {
            push(layer_name(i, &format!("{ffw}.pre_layer_norm.weight")), &[d]);
            push(
                layer_name(i, &format!("{ffw}.post_layer_norm.weight")),
                &[d],
            );
        }
        push(layer_name(i, "self_attn.relative_k_proj.weight"), &[d, d]);
        push(
            layer_name(i, "self_attn.per_dim_scale"),
            &[d / config.num_attention_heads],
        );
        push(
            layer_name(i, "lconv1d.depthwise_conv1d.weight"),
            &[d, 1, config.conv_kernel_size],
        );
        push(layer_name(i, "lconv1d.pre_layer_norm.weight"), &[d]);
        push(layer_name(i, "lconv1d.conv_norm.weight"), &[d]);
        for norm in ["norm_pre_attn", "norm_post_attn", "norm_out"] {
            push(layer_name(i, &format!("{norm}.weight")), &[d]);
        }
    }
    push(
        "audio_tower.output_proj.weight".into(),
        &[config.output_proj_dims, d],
    );
    push(
        "audio_tower.output_proj.bias".into(),
        &[config.output_proj_dims],
    );
    push(
        "embed_audio.embedding_projection.weight".into(),
        &[text_hidden_size, config.output_proj_dims],
    );
    specs
}

/// Every weight of the audio tower and its projector, as f32.
pub struct AudioWeights {
    pub subsampling: SubsamplingWeights,
    pub layers: Vec<ConformerLayerWeights>,
    /// `[O, Da]` and `[O]`
    pub output_proj: Array2<f32>,
    pub output_bias: Array1<f32>,
    /// `embed_audio.embedding_projection`: `[Dt, O]`
    pub projection: Array2<f32>,
}

impl AudioWeights {
    /// Loads the audio tower of `config` from `checkpoint`: headers first, then the memory, then
    /// the values. A checkpoint without an audio tower is an error naming what is missing.
    pub fn load(checkpoint: &Checkpoint, config: &ModelConfig) -> Result<Self> {
        let audio = config.audio.as_ref().ok_or_else(|| {
            Error::config(
                &config.path,
                "audio_config",
                "the checkpoint has no audio tower (no audio_config), so it cannot take audio",
            )
        })?;
        if config.layout != CheckpointLayout::ConditionalGeneration {
            return Err(Error::config(
                &config.path,
                "architectures",
                "an audio tower is only stored by Gemma4ForConditionalGeneration checkpoints",
            ));
        }
        if audio.subsampling_conv_channels[0] != MEL_BINS {
            return Err(Error::config(
                &config.path,
                "audio_config.subsampling_conv_channels",
                format!(
                    "the first channel count must be {MEL_BINS} (Hugging Face sizes the input projection with it where it means the {MEL_BINS} mel bins), found {}",
                    audio.subsampling_conv_channels[0]
                ),
            ));
        }
        let specs = audio_tensor_specs(audio, config.text.hidden_size);
        let tensors = check_text_headers(checkpoint, PREFIX, &specs)?;
        check_total_allocation(checkpoint, &specs, PREFIX, "audio tower")?;
        let sub = "audio_tower.subsample_conv_projection";
        let subsampling = SubsamplingWeights {
            conv: [
                tensors.load(&format!("{sub}.layer0.conv.weight"))?,
                tensors.load(&format!("{sub}.layer1.conv.weight"))?,
            ],
            norm: [
                tensors.load(&format!("{sub}.layer0.norm.weight"))?,
                tensors.load(&format!("{sub}.layer1.norm.weight"))?,
            ],
            input_proj: tensors.load(&format!("{sub}.input_proj_linear.weight"))?,
        };
        let layers = (0..audio.num_hidden_layers)
            .map(|i| load_layer(&tensors, audio, i))
            .collect::<Result<Vec<_>>>()?;
        Ok(AudioWeights {
            subsampling,
            layers,
            output_proj: tensors.load("audio_tower.output_proj.weight")?,
            output_bias: tensors.load("audio_tower.output_proj.bias")?,
            projection: tensors.load("embed_audio.embedding_projection.weight")?,
        })
    }
}

fn load_layer(
    tensors: &TextTensors,
    audio: &AudioConfig,
    i: usize,
) -> Result<ConformerLayerWeights> {
    let linear = |name: &str| -> Result<ClippedLinear> {
        let weight = tensors.load(&layer_name(i, &format!("{name}.linear.weight")))?;
        let bounds = if audio.use_clipped_linears {
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
    let norm = |name: &str| -> Result<Array1<f32>> {
        tensors.load(&layer_name(i, &format!("{name}.weight")))
    };
    let feed_forward = |ffw: &str| -> Result<FeedForwardWeights> {
        Ok(FeedForwardWeights {
            pre_layer_norm: norm(&format!("{ffw}.pre_layer_norm"))?,
            ffw_layer_1: linear(&format!("{ffw}.ffw_layer_1"))?,
            ffw_layer_2: linear(&format!("{ffw}.ffw_layer_2"))?,
            post_layer_norm: norm(&format!("{ffw}.post_layer_norm"))?,
        })
    };
    let depthwise: ndarray::Array3<f32> =
        tensors.load(&layer_name(i, "lconv1d.depthwise_conv1d.weight"))?;
    let (width, _, kernel) = depthwise.dim();
    Ok(ConformerLayerWeights {
        feed_forward1: feed_forward("feed_forward1")?,
        norm_pre_attn: norm("norm_pre_attn")?,
        attention: AudioAttentionWeights {
            q_proj: linear("self_attn.q_proj")?,
            k_proj: linear("self_attn.k_proj")?,
            v_proj: linear("self_attn.v_proj")?,
            post: linear("self_attn.post")?,
            relative_k_proj: tensors.load(&layer_name(i, "self_attn.relative_k_proj.weight"))?,
            per_dim_scale: tensors.load(&layer_name(i, "self_attn.per_dim_scale"))?,
        },
        norm_post_attn: norm("norm_post_attn")?,
        light_conv: LightConvWeights {
            pre_layer_norm: norm("lconv1d.pre_layer_norm")?,
            linear_start: linear("lconv1d.linear_start")?,
            depthwise: depthwise
                .into_shape_with_order((width, kernel))
                .expect("[Da, 1, K]"),
            conv_norm: norm("lconv1d.conv_norm")?,
            linear_end: linear("lconv1d.linear_end")?,
        },
        feed_forward2: feed_forward("feed_forward2")?,
        norm_out: norm("norm_out")?,
    })
}
