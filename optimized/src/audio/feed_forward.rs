//! The macaron feed-forward halves of a conformer layer (shared spec: multimodal §2.3,
//! §5 item 10).
//!
//! ```text
//! y = x + w · RMSNorm_{post}( clip( ffw_layer_2( silu( ffw_layer_1( RMSNorm_{pre}( clip(x) ) ) ) ) ) )
//! ```
//!
//! `x`: `[T, Da]`, the hidden width `4Da`; `w` is the residual weight (0.5), applied **after**
//! the post-norm; `clip` is a clamp to ±`gradient_clipping` (1e10); the two projections are
//! clipped linears (not gated, SiLU). Fast: both products through the crate's GEMM on the
//! weights as stored, SiLU and the clamps as parallel passes, the post-norm, the weight and
//! the residual add fused into one pass over the rows.

use rayon::prelude::*;

use crate::audio::weights::FeedForwardWeights;
use crate::parallel::for_each_row_pair;
use crate::rms_norm::{inverse_rms, rms_norm_in_place};
use crate::vision::clipped_linear::clamp_in_place;

/// Elements per parallel task of the element-wise passes.
const CHUNK: usize = 16 * 1024;

/// `silu(x) = x · σ(x)`, as the reference computes it (`x / (1 + e^{−x})`).
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `x ← silu(x)` on every element, in parallel chunks ([`crate::simd::silu_in_place`]: vectorised
/// `exp`, within 3 ulp of [`silu`]).
pub fn silu_in_place(x: &mut [f32]) {
    x.par_chunks_mut(CHUNK).for_each(crate::simd::silu_in_place);
}

/// `clamp(x, −c, c)` on every element (the tower's "gradient clipping", a no-op in practice at
/// c = 1e10, kept for parity), in place.
pub fn clip_in_place(x: &mut [f32], c: f32) {
    clamp_in_place(x, -c, c);
}

/// `RMSNorm_w(clip(x))` of every row of `x` (`[T, width]`) into a new buffer.
pub fn clipped_rms_norm(x: &[f32], width: usize, weight: &[f32], clip: f32, eps: f64) -> Vec<f32> {
    let mut out = x.to_vec();
    clip_in_place(&mut out, clip);
    rms_norm_in_place(&mut out, width, Some(weight), eps);
    out
}

/// The feed-forward half on `hidden` (`[T, Da]`, the residual stream, updated in place).
pub fn feed_forward(
    hidden: &mut [f32],
    steps: usize,
    weights: &FeedForwardWeights,
    residual_weight: f32,
    clip: f32,
    eps: f64,
) {
    let width = weights.pre_layer_norm.len();
    let normed = clipped_rms_norm(hidden, width, &weights.pre_layer_norm, clip, eps);
    let mut inner = weights.ffw_layer_1.apply(&normed, steps);
    silu_in_place(&mut inner);
    let mut out = weights.ffw_layer_2.apply(&inner, steps);
    clip_in_place(&mut out, clip);
    // h ← h + w · RMSNorm_post(out), one pass (the reference's f32 operations in its order).
    let post = &weights.post_layer_norm;
    for_each_row_pair(hidden, &out, width, |h, branch| {
        let inverse = inverse_rms(branch, eps);
        for ((hv, &bv), &s) in h.iter_mut().zip(branch).zip(post) {
            *hv += bv * inverse * s * residual_weight;
        }
    });
}
