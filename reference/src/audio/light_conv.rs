//! The light convolution block of a conformer layer (shared spec: multimodal §2.3,
//! §5 item 10).
//!
//! ```text
//! y = linear_start( RMSNorm_{pre}(x) )                  [T, 2Da]
//! y = y[:, :Da] · σ(y[:, Da:])                          GLU: the first half, gated by the second
//! y[t, c] = Σ_k w[c, k] · y[t − (K−1) + k, c]          depthwise, causal (left pad K−1), no bias
//! y = silu( RMSNorm_{conv_norm}( clip(y) ) )
//! out = x + linear_end(y)                               its own residual, no 0.5
//! ```

use ndarray::{Array1, Array2, Axis};

use crate::audio::feed_forward::{clip, silu};
use crate::rms_norm::rms_norm;
use crate::vision::clipped_linear::ClippedLinear;

/// The light convolution's weights.
pub struct LightConvWeights {
    pub pre_layer_norm: Array1<f32>,
    /// `[2Da, Da]`
    pub linear_start: ClippedLinear,
    /// `depthwise_conv1d.weight` as `[Da, K]`
    pub depthwise: Array2<f32>,
    pub conv_norm: Array1<f32>,
    /// `[Da, Da]`
    pub linear_end: ClippedLinear,
}

/// The block on `x` (`[T, Da]`): the residual stream after it.
pub fn light_conv(
    x: &Array2<f32>,
    weights: &LightConvWeights,
    clip_value: f32,
    eps: f64,
) -> Array2<f32> {
    let width = x.ncols();
    let projected = weights
        .linear_start
        .apply(rms_norm(x, &weights.pre_layer_norm, eps).view());
    // GLU over the last axis: a · σ(b) with a the first half.
    let (a, b) = projected.view().split_at(Axis(1), width);
    let gated = &a * &b.mapv(|v| 1.0 / (1.0 + (-v).exp()));
    // Causal depthwise convolution: output t sees inputs t − (K − 1) … t.
    let steps = gated.nrows();
    let kernel = weights.depthwise.ncols();
    let mut convolved = Array2::<f32>::zeros((steps, width));
    for t in 0..steps {
        for k in 0..kernel {
            let Some(source) = (t + k).checked_sub(kernel - 1) else {
                continue;
            };
            for c in 0..width {
                convolved[[t, c]] += weights.depthwise[[c, k]] * gated[[source, c]];
            }
        }
    }
    let normed = rms_norm(&clip(&convolved, clip_value), &weights.conv_norm, eps).mapv(silu);
    x + &weights.linear_end.apply(normed.view())
}
