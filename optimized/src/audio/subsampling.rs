//! The subsampling convolutions of the audio tower, as im2col products (shared spec:
//! multimodal §2.2, §5 item 9).
//!
//! ```text
//! x ← Conv2d_{3×3, stride 2, pad 1, no bias}(x)        [⌈T/2⌉, ⌈M/2⌉, C_out]
//! x ← LayerNorm_over_channels(x) · w                     (no bias, ε from the config)
//! x ← ReLU(x)
//! ```
//!
//! twice (channels 1 → C₀ → C₁, time `F → ⌈⌈F/2⌉/2⌉`, mel 128 → 64 → 32), then the result,
//! flattened per time step in **(frequency, channel)** order (`f·C₁ + c`), through
//! `input_proj_linear` (bias-free) into the tower's width: `[F, 128] → [⌈⌈F/2⌉/2⌉, Da]`.
//!
//! Activations are kept `[time, mel, channel]` (channel-minor), so each convolution is one
//! matrix product per block of output positions: the block's 3×3 input patches gathered into
//! rows of `9·C_in` values in `(dt, dm, c)` order (im2col; out-of-range taps are the zero
//! padding, and the frames past the last valid one are exactly HF's masked zeros) times the
//! kernel rearranged to `[C_out, 9·C_in]` ([`crate::audio::weights::im2col_kernel`]). The
//! product's rows are the positions, its columns the channels: the LayerNorm and ReLU then run
//! on contiguous rows, in the reference's order of f32 operations. Blocks of output time steps
//! run in parallel, each with its own patch buffer (never the whole `[positions, 9·C₀]` matrix:
//! 110 MB for a 30 s clip).

use rayon::prelude::*;

use crate::audio::weights::SubsamplingWeights;
use crate::checkpoint::Matrix;
use crate::linear::{linear, linear_into, Threads};

/// Output positions per parallel task (the GEMM's row count): about 128.
const POSITIONS_PER_TASK: usize = 128;

/// Subsamples log-mel frames `features` (`[F, M]`, row-major) into `[⌈⌈F/2⌉/2⌉, Da]`.
pub fn subsample(
    features: &[f32],
    frames: usize,
    mel: usize,
    weights: &SubsamplingWeights,
    eps: f64,
) -> Vec<f32> {
    assert_eq!(features.len(), frames * mel, "features are [F, M]");
    // One channel: [F, M] is already [T, M, 1].
    let (mut x, mut steps, mut bins, mut channels) = (features.to_vec(), frames, mel, 1);
    for (kernel, norm) in weights.conv.iter().zip(&weights.norm) {
        x = conv_stage(&x, [steps, bins, channels], kernel, norm, eps);
        (steps, bins, channels) = (steps.div_ceil(2), bins.div_ceil(2), kernel.rows);
    }
    // [T', M', C₁] row-major is [T', M'·C₁] in (frequency, channel) order.
    linear(&x, steps, &weights.input_proj)
}

/// One stage on `x` (`[T, M, C_in]`): 3×3 convolution with stride 2 and zero padding 1 as an
/// im2col product with `kernel` (`[C_out, 9·C_in]`), LayerNorm over the channels of every
/// position (population variance, weight `norm`, no bias), ReLU. Returns `[⌈T/2⌉, ⌈M/2⌉, C_out]`.
pub fn conv_stage(
    x: &[f32],
    [steps, bins, in_channels]: [usize; 3],
    kernel: &Matrix,
    norm: &[f32],
    eps: f64,
) -> Vec<f32> {
    assert_eq!(x.len(), steps * bins * in_channels, "x is [T, M, C_in]");
    assert_eq!(kernel.cols, 9 * in_channels, "kernel is [C_out, 9·C_in]");
    let out_channels = kernel.rows;
    let (out_steps, out_bins) = (steps.div_ceil(2), bins.div_ceil(2));
    let mut y = vec![0.0f32; out_steps * out_bins * out_channels];
    if y.is_empty() {
        return y;
    }
    let steps_per_task = POSITIONS_PER_TASK.div_ceil(out_bins).max(1);
    let patch_width = 9 * in_channels;
    y.par_chunks_mut(steps_per_task * out_bins * out_channels)
        .enumerate()
        .for_each_init(Vec::new, |patches: &mut Vec<f32>, (task, out)| {
            let first_step = task * steps_per_task;
            let positions = out.len() / out_channels;
            // im2col: one row of (dt, dm, c) values per output position of this block.
            patches.clear();
            patches.resize(positions * patch_width, 0.0);
            for (p, patch) in patches.chunks_exact_mut(patch_width).enumerate() {
                let (t, m) = (first_step + p / out_bins, p % out_bins);
                for dt in 0..3 {
                    // Input row 2t − 1 + dt (padding 1 on each side).
                    let Some(row) = (2 * t + dt).checked_sub(1).filter(|&r| r < steps) else {
                        continue;
                    };
                    for dm in 0..3 {
                        let Some(col) = (2 * m + dm).checked_sub(1).filter(|&c| c < bins) else {
                            continue;
                        };
                        let source = (row * bins + col) * in_channels;
                        patch[(dt * 3 + dm) * in_channels..][..in_channels]
                            .copy_from_slice(&x[source..source + in_channels]);
                    }
                }
            }
            linear_into(patches, positions, kernel, out, Threads::Current);
            for position in out.chunks_exact_mut(out_channels) {
                layer_norm_relu(position, norm, eps);
            }
        });
    y
}

/// LayerNorm over one position's channels (population variance, weight, no bias), then ReLU,
/// in the reference's order of f32 operations.
fn layer_norm_relu(values: &mut [f32], weight: &[f32], eps: f64) {
    let n = values.len() as f32;
    let mean = values.iter().sum::<f32>() / n;
    let variance = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    let inverse = 1.0 / (variance + eps as f32).sqrt();
    for (v, &w) in values.iter_mut().zip(weight) {
        *v = ((*v - mean) * inverse * w).max(0.0);
    }
}
