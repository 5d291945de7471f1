//! Clipped linears of the on-device vision tower (and of the audio tower) (shared spec:
//! multimodal §1.5, §5 item 7).
//!
//! ```text
//! y = clamp( clamp(x, input_min, input_max) · Wᵀ, output_min, output_max )
//! ```
//!
//! The four bounds are scalar buffers stored in the checkpoint next to the weight
//! (`….q_proj.input_min`, …). Only the on-device towers have them (`use_clipped_linears`); the
//! large tower's linears are plain. Fused JAX einsums share bounds (k/v, gate/up; audio q/k/v),
//! which the checkpoint repeats per linear: each linear reads its own four scalars.

use ndarray::{Array2, ArrayView2};

use crate::faults::{fault_active, Fault};
use crate::linear::linear;

/// The four bounds of a clipped linear.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClipBounds {
    pub input_min: f32,
    pub input_max: f32,
    pub output_min: f32,
    pub output_max: f32,
}

/// A bias-free linear `[out, in]`, clipped on both sides when it has bounds.
#[derive(Clone, Debug)]
pub struct ClippedLinear {
    /// `[out, in]`, Hugging Face layout.
    pub weight: Array2<f32>,
    /// `None` on towers without clipped linears.
    pub bounds: Option<ClipBounds>,
}

impl ClippedLinear {
    /// `clamp(clamp(x, in_min, in_max) · Wᵀ, out_min, out_max)`. `x`: `[rows, in]`, result
    /// `[rows, out]`.
    pub fn apply(&self, x: ArrayView2<f32>) -> Array2<f32> {
        let bounds = self
            .bounds
            .filter(|_| !fault_active(Fault::VisionClipIgnored));
        match bounds {
            None => linear(x, &self.weight),
            Some(b) => {
                let clamped = x.mapv(|v| clamp(v, b.input_min, b.input_max));
                linear(clamped.view(), &self.weight).mapv(|v| clamp(v, b.output_min, b.output_max))
            }
        }
    }
}

/// `torch.clamp(v, lo, hi)`: `min(max(v, lo), hi)` (NaN stays NaN; bounds may be infinite).
fn clamp(v: f32, lo: f32, hi: f32) -> f32 {
    if v.is_nan() {
        v
    } else {
        v.max(lo).min(hi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn clipped_linear_clamps_input_then_output() {
        let layer = ClippedLinear {
            weight: array![[1.0, 1.0], [2.0, -1.0]],
            bounds: Some(ClipBounds {
                input_min: -1.0,
                input_max: 1.0,
                output_min: -1.5,
                output_max: 1.5,
            }),
        };
        // x = (3, -0.5) → clamped (1, -0.5) → (0.5, 2.5) → clamped (0.5, 1.5)
        let y = layer.apply(array![[3.0, -0.5]].view());
        assert_eq!(y, array![[0.5, 1.5]]);
        let plain = ClippedLinear {
            bounds: None,
            ..layer
        };
        assert_eq!(plain.apply(array![[3.0, -0.5]].view()), array![[2.5, 6.5]]);
    }
}
