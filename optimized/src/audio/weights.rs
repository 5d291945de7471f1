//! The audio tower's weights **as stored** (shared spec: multimodal §2.7): memory-mapped
//! matrices ([`Matrix`]), vectors, clip bounds and the small convolution kernels copied to f32.
//!
//! Names and shapes are the reference's (`gemma4_reference::audio::weights::audio_tensor_specs`),
//! and so is the validation: the same config checks (no `audio_config`, a causal-LM layout, a
//! first channel count other than the 128 mel bins), every header first (`check_text_headers`:
//! present, shaped as the config implies, a float dtype), then the values in the reference
//! loader's order (per layer the depthwise kernel first, then the fields in declaration order;
//! matrices scanned for NaN/inf, vectors and kernels loaded by the reference's own loader, bounds
//! any float but NaN), so a damaged tower fails here with exactly the reference's error. The one
//! check the reference makes that this does not: memory for the whole tower as f32
//! (`check_total_allocation`), since the matrices are not converted here (the text and vision
//! loaders skip it for the same reason).

use gemma4_reference::audio::weights::{audio_tensor_specs, MEL_BINS};
use gemma4_reference::checkpoint::{check_text_headers, Checkpoint};
use gemma4_reference::config::{AudioConfig, CheckpointLayout, ModelConfig};
use gemma4_reference::error::Error;
use gemma4_reference::vision::clipped_linear::ClipBounds;
use gemma4_reference::Result;
use ndarray::{Ix1, Ix3, Ix4};

use crate::checkpoint::{Loader, Matrix};
use crate::vision::clipped_linear::ClippedLinear;

/// Prefix of every audio tensor name (`model.audio_tower.…`, `model.embed_audio.…`).
const PREFIX: &str = "model.";

/// The name of conformer layer `i`'s tensor `part` (without [`PREFIX`]), as the reference
/// spells it.
fn layer_name(i: usize, part: &str) -> String {
    format!("audio_tower.layers.{i}.{part}")
}

/// The subsampling convolutions and their projection (multimodal §2.2).
pub struct SubsamplingWeights {
    /// The two 3×3 kernels `[C_out, C_in, 3, 3]` (C_in = 1, then C₀) rearranged for im2col
    /// products: `[C_out, 3·3·C_in]` with the columns in `(dt, dm, c)` order (channel-minor,
    /// the layout of the activations).
    pub conv: [Matrix; 2],
    /// LayerNorm weights `[C₀]` and `[C₁]`.
    pub norm: [Vec<f32>; 2],
    /// `input_proj_linear`: `[Da, (M/4)·C₁]`.
    pub input_proj: Matrix,
}

/// One macaron feed-forward half (multimodal §2.3).
pub struct FeedForwardWeights {
    /// `[Da]`
    pub pre_layer_norm: Vec<f32>,
    /// `[4Da, Da]`
    pub ffw_layer_1: ClippedLinear,
    /// `[Da, 4Da]`
    pub ffw_layer_2: ClippedLinear,
    /// `[Da]`
    pub post_layer_norm: Vec<f32>,
}

/// The chunked local attention block (multimodal §2.4).
pub struct AudioAttentionWeights {
    /// `[Da, Da]` each (q/k/v share their clip bounds in the released checkpoints).
    pub q_proj: ClippedLinear,
    pub k_proj: ClippedLinear,
    pub v_proj: ClippedLinear,
    /// The output projection `[Da, Da]`.
    pub post: ClippedLinear,
    /// `[Da, Da]`, not clipped.
    pub relative_k_proj: Matrix,
    /// `[H]`
    pub per_dim_scale: Vec<f32>,
}

/// The light convolution block (multimodal §2.3).
pub struct LightConvWeights {
    /// `[Da]`
    pub pre_layer_norm: Vec<f32>,
    /// `[2Da, Da]`
    pub linear_start: ClippedLinear,
    /// `depthwise_conv1d.weight` `[Da, 1, K]` transposed to `[K, Da]` (tap-major: one tap
    /// multiplies a whole row of channels).
    pub depthwise: Vec<f32>,
    /// `K`
    pub kernel_size: usize,
    /// `[Da]`
    pub conv_norm: Vec<f32>,
    /// `[Da, Da]`
    pub linear_end: ClippedLinear,
}

/// One conformer layer's weights.
pub struct ConformerLayerWeights {
    pub feed_forward1: FeedForwardWeights,
    /// `[Da]`
    pub norm_pre_attn: Vec<f32>,
    pub attention: AudioAttentionWeights,
    /// `[Da]`
    pub norm_post_attn: Vec<f32>,
    pub light_conv: LightConvWeights,
    pub feed_forward2: FeedForwardWeights,
    /// `[Da]`
    pub norm_out: Vec<f32>,
}

/// Every weight of the audio tower and its projector, as stored.
pub struct AudioWeights {
    pub subsampling: SubsamplingWeights,
    pub layers: Vec<ConformerLayerWeights>,
    /// `[O, Da]`
    pub output_proj: Matrix,
    /// `[O]`
    pub output_bias: Vec<f32>,
    /// `embed_audio.embedding_projection`: `[Dt, O]`
    pub projection: Matrix,
}

impl AudioWeights {
    /// Maps the audio tower of `config` from `checkpoint`, validating it exactly as the
    /// reference's `AudioWeights::load` does (same errors, same order). The matrices point into
    /// `checkpoint`'s maps: they must not outlive it.
    pub fn load(checkpoint: &Checkpoint, config: &ModelConfig) -> Result<Self> {
        let config_error = |field: &str, message: String| Error::Config {
            path: config.path.clone(),
            field: field.into(),
            message,
        };
        let audio = config.audio.as_ref().ok_or_else(|| {
            config_error(
                "audio_config",
                "the checkpoint has no audio tower (no audio_config), so it cannot take audio"
                    .into(),
            )
        })?;
        if config.layout != CheckpointLayout::ConditionalGeneration {
            return Err(config_error(
                "architectures",
                "an audio tower is only stored by Gemma4ForConditionalGeneration checkpoints"
                    .into(),
            ));
        }
        if audio.subsampling_conv_channels[0] != MEL_BINS {
            return Err(config_error(
                "audio_config.subsampling_conv_channels",
                format!(
                    "the first channel count must be {MEL_BINS} (Hugging Face sizes the input projection with it where it means the {MEL_BINS} mel bins), found {}",
                    audio.subsampling_conv_channels[0]
                ),
            ));
        }
        let specs = audio_tensor_specs(audio, config.text.hidden_size);
        let loader = Loader {
            checkpoint,
            tensors: check_text_headers(checkpoint, PREFIX, &specs)?,
        };
        // Values in the reference loader's order: the two kernels, the two norms, the
        // projection, the layers, the output projection and its bias, the projector.
        let sub = "audio_tower.subsample_conv_projection";
        let kernel = |name: &str| -> Result<Matrix> {
            let weight = loader
                .tensors
                .load::<Ix4>(&format!("{sub}.{name}.conv.weight"))?;
            Ok(im2col_kernel(&weight))
        };
        let conv = [kernel("layer0")?, kernel("layer1")?];
        let norm = [
            loader.vector(&format!("{sub}.layer0.norm.weight"))?,
            loader.vector(&format!("{sub}.layer1.norm.weight"))?,
        ];
        let subsampling = SubsamplingWeights {
            conv,
            norm,
            input_proj: loader.matrix(&format!("{sub}.input_proj_linear.weight"))?,
        };
        let layers = (0..audio.num_hidden_layers)
            .map(|i| load_layer(&loader, audio, i))
            .collect::<Result<Vec<_>>>()?;
        Ok(AudioWeights {
            subsampling,
            layers,
            output_proj: loader.matrix("audio_tower.output_proj.weight")?,
            output_bias: loader
                .tensors
                .load::<Ix1>("audio_tower.output_proj.bias")?
                .into_raw_vec_and_offset()
                .0,
            projection: loader.matrix("embed_audio.embedding_projection.weight")?,
        })
    }
}

/// A conv kernel `[C_out, C_in, 3, 3]` as the `[C_out, 9·C_in]` matrix of an im2col product
/// whose columns run `(dt, dm, c)`: column `(dt·3 + dm)·C_in + c` holds `w[o, c, dt, dm]`.
pub fn im2col_kernel(weight: &ndarray::Array4<f32>) -> Matrix {
    let (out_channels, in_channels, kh, kw) = weight.dim();
    let mut values = Vec::with_capacity(out_channels * in_channels * kh * kw);
    for o in 0..out_channels {
        for dt in 0..kh {
            for dm in 0..kw {
                for c in 0..in_channels {
                    values.push(weight[[o, c, dt, dm]]);
                }
            }
        }
    }
    Matrix::from_f32(out_channels, kh * kw * in_channels, values)
}

/// A depthwise kernel `[Da, 1, K]` as `[K, Da]` (tap-major).
pub fn tap_major_depthwise(weight: &ndarray::Array3<f32>) -> Vec<f32> {
    let (width, _, kernel) = weight.dim();
    let mut values = Vec::with_capacity(width * kernel);
    for k in 0..kernel {
        values.extend((0..width).map(|c| weight[[c, 0, k]]));
    }
    values
}

/// Layer `i`, read in the reference's order (the depthwise kernel first, then the fields).
fn load_layer(loader: &Loader, audio: &AudioConfig, i: usize) -> Result<ConformerLayerWeights> {
    let linear = |name: &str| -> Result<ClippedLinear> {
        let weight = loader.matrix(&layer_name(i, &format!("{name}.linear.weight")))?;
        let bounds = if audio.use_clipped_linears {
            let bound = |b: &str| loader.bound(&layer_name(i, &format!("{name}.{b}")));
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
    let norm = |name: &str| loader.vector(&layer_name(i, &format!("{name}.weight")));
    let feed_forward = |ffw: &str| -> Result<FeedForwardWeights> {
        Ok(FeedForwardWeights {
            pre_layer_norm: norm(&format!("{ffw}.pre_layer_norm"))?,
            ffw_layer_1: linear(&format!("{ffw}.ffw_layer_1"))?,
            ffw_layer_2: linear(&format!("{ffw}.ffw_layer_2"))?,
            post_layer_norm: norm(&format!("{ffw}.post_layer_norm"))?,
        })
    };
    let depthwise = loader
        .tensors
        .load::<Ix3>(&layer_name(i, "lconv1d.depthwise_conv1d.weight"))?;
    let kernel_size = depthwise.dim().2;
    Ok(ConformerLayerWeights {
        feed_forward1: feed_forward("feed_forward1")?,
        norm_pre_attn: norm("norm_pre_attn")?,
        attention: AudioAttentionWeights {
            q_proj: linear("self_attn.q_proj")?,
            k_proj: linear("self_attn.k_proj")?,
            v_proj: linear("self_attn.v_proj")?,
            post: linear("self_attn.post")?,
            relative_k_proj: loader.matrix(&layer_name(i, "self_attn.relative_k_proj.weight"))?,
            per_dim_scale: loader.vector(&layer_name(i, "self_attn.per_dim_scale"))?,
        },
        norm_post_attn: norm("norm_post_attn")?,
        light_conv: LightConvWeights {
            pre_layer_norm: norm("lconv1d.pre_layer_norm")?,
            linear_start: linear("lconv1d.linear_start")?,
            depthwise: tap_major_depthwise(&depthwise),
            kernel_size,
            conv_norm: norm("lconv1d.conv_norm")?,
            linear_end: linear("lconv1d.linear_end")?,
        },
        feed_forward2: feed_forward("feed_forward2")?,
        norm_out: norm("norm_out")?,
    })
}
