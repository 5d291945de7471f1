//! The light convolution block of a conformer layer (shared spec: multimodal §2.3,
//! §5 item 10).
//!
//! ```text
//! y = linear_start( RMSNorm_{pre}(x) )                  [T, 2Da]
//! y = y[:, :Da] · σ(y[:, Da:])                          GLU: the first half, gated by the second   [T, Da]
//! y[t, c] = Σ_k w[c, k] · y[t − (K−1) + k, c]          depthwise, causal (left pad K−1), no bias
//! y = silu( RMSNorm_{conv_norm}( clip(y) ) )
//! out = x + linear_end(y)                               its own residual, no 0.5
//! ```
//!
//! Fast: the two products through the crate's GEMM on the weights as stored; the GLU, the
//! causal depthwise convolution (taps stored `[K, Da]`, so each tap is one vectorisable
//! multiply-add over a row of channels) and the clip + norm + SiLU are parallel passes over
//! the rows; the residual add is fused into the last one.

use crate::audio::feed_forward::{clip_in_place, silu};
use crate::audio::weights::LightConvWeights;
use crate::parallel::{for_each_row, for_each_row_pair};
use crate::rms_norm::{inverse_rms, rms_norm};

/// The block on `hidden` (`[T, Da]`, the residual stream, updated in place).
pub fn light_conv(
    hidden: &mut [f32],
    steps: usize,
    weights: &LightConvWeights,
    clip: f32,
    eps: f64,
) {
    let width = weights.pre_layer_norm.len();
    let normed = rms_norm(hidden, width, &weights.pre_layer_norm, eps);
    let projected = weights.linear_start.apply(&normed, steps);
    // GLU over each row: a · σ(b) with a the first half.
    let mut gated = vec![0.0f32; steps * width];
    for_each_row(&mut gated, width, |t, row| {
        let (a, b) = projected[t * 2 * width..][..2 * width].split_at(width);
        for ((g, &a), &b) in row.iter_mut().zip(a).zip(b) {
            *g = a * (1.0 / (1.0 + (-b).exp()));
        }
    });
    // Causal depthwise convolution: output t sees inputs t − (K − 1) … t.
    let kernel = weights.kernel_size;
    let mut convolved = vec![0.0f32; steps * width];
    for_each_row(&mut convolved, width, |t, row| {
        for k in 0..kernel {
            let Some(source) = (t + k).checked_sub(kernel - 1) else {
                continue;
            };
            let taps = &weights.depthwise[k * width..][..width];
            let input = &gated[source * width..][..width];
            for ((y, &w), &g) in row.iter_mut().zip(taps).zip(input) {
                *y += w * g;
            }
        }
    });
    // silu(RMSNorm_conv(clip(y))), then linear_end, then the residual add.
    clip_in_place(&mut convolved, clip);
    let conv_norm = &weights.conv_norm;
    for_each_row(&mut convolved, width, |_, row| {
        let inverse = inverse_rms(row, eps);
        for (v, &s) in row.iter_mut().zip(conv_norm) {
            *v = silu(*v * inverse * s);
        }
    });
    let out = weights.linear_end.apply(&convolved, steps);
    for_each_row_pair(hidden, &out, width, |h, branch| {
        for (hv, &bv) in h.iter_mut().zip(branch) {
            *hv += bv;
        }
    });
}
