//! The subsampling convolutions of the audio tower (shared spec: multimodal §2.2, §5 item 9).
//!
//! The log-mel frames `[F, 128]` are an image of one channel (time × mel). Two identical
//! stages halve both axes:
//!
//! ```text
//! x ← Conv2d_{3×3, stride 2, pad 1, no bias}(x)        [C_out, ⌈T/2⌉, ⌈M/2⌉]
//! x ← LayerNorm_over_channels(x) · w                     (no bias, ε from the config)
//! x ← ReLU(x)
//! ```
//!
//! Channels go 1 → C₀ → C₁ (128 → 32), time `F → ⌈⌈F/2⌉/2⌉`, mel 128 → 64 → 32. The result is
//! flattened per time step in **(frequency, channel)** order (`f·C₁ + c`) and projected by
//! `input_proj_linear` (bias-free) to the tower's width. Only valid frames are given here: Hugging
//! Face zeroes invalid frames (and invalid first-stage outputs) before each convolution, which
//! is exactly the zero padding past the last valid frame.

use ndarray::{Array2, Array3, Array4};

use crate::linear::linear;

/// The weights of the two stages and the projection.
pub struct SubsamplingWeights {
    /// `[C₀, 1, 3, 3]` and `[C₁, C₀, 3, 3]`.
    pub conv: [Array4<f32>; 2],
    /// LayerNorm weights `[C₀]` and `[C₁]`.
    pub norm: [ndarray::Array1<f32>; 2],
    /// `input_proj_linear`: `[Da, (M/4)·C₁]`.
    pub input_proj: Array2<f32>,
}

/// Subsamples log-mel frames `[F, M]` into `[⌈⌈F/2⌉/2⌉, Da]`.
pub fn subsample(features: &Array2<f32>, weights: &SubsamplingWeights, eps: f64) -> Array2<f32> {
    let (frames, mel) = features.dim();
    let mut x = features
        .clone()
        .into_shape_with_order((1, frames, mel))
        .expect("one channel");
    for (conv, norm) in weights.conv.iter().zip(&weights.norm) {
        x = conv_stage(&x, conv, norm, eps);
    }
    // [C₁, T, M'] → [T, M', C₁] → [T, M'·C₁]: frequency-major, channel-minor.
    let (channels, steps, bins) = x.dim();
    let flat = x
        .permuted_axes([1, 2, 0])
        .as_standard_layout()
        .into_owned()
        .into_shape_with_order((steps, bins * channels))
        .expect("contiguous");
    linear(flat.view(), &weights.input_proj)
}

/// One stage: 3×3 convolution with stride 2 and zero padding 1, LayerNorm over the channels of
/// every (time, mel) position (weight, no bias), ReLU. `x`: `[C_in, T, M]`.
fn conv_stage(
    x: &Array3<f32>,
    conv: &Array4<f32>,
    norm: &ndarray::Array1<f32>,
    eps: f64,
) -> Array3<f32> {
    let (in_channels, steps, bins) = x.dim();
    let out_channels = conv.shape()[0];
    let (out_steps, out_bins) = (steps.div_ceil(2), bins.div_ceil(2));
    let mut y = Array3::<f32>::zeros((out_channels, out_steps, out_bins));
    for o in 0..out_channels {
        for t in 0..out_steps {
            for m in 0..out_bins {
                let mut sum = 0.0f32;
                for c in 0..in_channels {
                    for dt in 0..3 {
                        // Input row 2t − 1 + dt (padding 1 on each side).
                        let Some(row) = (2 * t + dt).checked_sub(1).filter(|&r| r < steps) else {
                            continue;
                        };
                        for dm in 0..3 {
                            let Some(col) = (2 * m + dm).checked_sub(1).filter(|&c| c < bins)
                            else {
                                continue;
                            };
                            sum += conv[[o, c, dt, dm]] * x[[c, row, col]];
                        }
                    }
                }
                y[[o, t, m]] = sum;
            }
        }
    }
    // LayerNorm over channels (population variance), then the weight, then ReLU.
    for t in 0..out_steps {
        for m in 0..out_bins {
            let values: Vec<f32> = (0..out_channels).map(|o| y[[o, t, m]]).collect();
            let mean = values.iter().sum::<f32>() / out_channels as f32;
            let variance =
                values.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / out_channels as f32;
            let inverse = 1.0 / (variance + eps as f32).sqrt();
            for (o, v) in values.iter().enumerate() {
                y[[o, t, m]] = ((v - mean) * inverse * norm[o]).max(0.0);
            }
        }
    }
    y
}
