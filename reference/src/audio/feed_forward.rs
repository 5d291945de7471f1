//! The macaron feed-forward halves of a conformer layer (shared spec: multimodal §2.3,
//! §5 item 10).
//!
//! ```text
//! y = x + w · RMSNorm_{post}( clip( ffw_layer_2( silu( ffw_layer_1( RMSNorm_{pre}( clip(x) ) ) ) ) ) )
//! ```
//!
//! `w` is the residual weight (0.5), applied **after** the post-norm; `clip` is a clamp to
//! ±`gradient_clipping` (1e10); the two projections are clipped linears (not gated, SiLU).

use ndarray::{Array1, Array2};

use crate::rms_norm::rms_norm;
use crate::vision::clipped_linear::ClippedLinear;

/// One feed-forward half's weights.
pub struct FeedForwardWeights {
    pub pre_layer_norm: Array1<f32>,
    /// `[4Da, Da]`
    pub ffw_layer_1: ClippedLinear,
    /// `[Da, 4Da]`
    pub ffw_layer_2: ClippedLinear,
    pub post_layer_norm: Array1<f32>,
}

/// `silu(x) = x · σ(x)`.
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `clamp(x, −c, c)` on every element (the tower's "gradient clipping", a no-op in practice at
/// c = 1e10, kept for parity).
pub fn clip(x: &Array2<f32>, c: f32) -> Array2<f32> {
    x.mapv(|v| v.clamp(-c, c))
}

/// The feed-forward half on `x` (`[T, Da]`): the residual stream after it.
pub fn feed_forward(
    x: &Array2<f32>,
    weights: &FeedForwardWeights,
    residual_weight: f32,
    clip_value: f32,
    eps: f64,
) -> Array2<f32> {
    let normed = rms_norm(&clip(x, clip_value), &weights.pre_layer_norm, eps);
    let hidden = weights.ffw_layer_1.apply(normed.view()).mapv(silu);
    let out = clip(&weights.ffw_layer_2.apply(hidden.view()), clip_value);
    let out = rms_norm(&out, &weights.post_layer_norm, eps);
    x + &(out * residual_weight)
}
