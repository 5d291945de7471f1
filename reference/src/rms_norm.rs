//! RMSNorm, the only normalisation in Gemma 4 (shared spec: text, notation; §15.1).
//!
//! `RMSNorm_w(x) = x · (mean(x²) + ε)^(-1/2) ⊙ w` over the last axis, computed in float32.
//! **The weight multiplies as stored: there is no `1 + w`** (unlike Gemma 1–3). The weight-free
//! variant `RMSNorm_∅` (used for V and the MoE router input) is the same without `⊙ w`.

use ndarray::{Array1, Array2, Array3, ArrayView2, Axis};

use crate::faults::{fault_active, Fault};

/// RMSNorm of every row of `x` (`[rows, n]`), times `weight` (`[n]`) when given.
///
/// The mean of squares is accumulated in f64 and rounded once, which is at least as accurate
/// as any float32 summation order (Hugging Face's included).
pub fn rms_norm_rows(x: ArrayView2<f32>, weight: Option<&Array1<f32>>, eps: f64) -> Array2<f32> {
    let mut out = x.to_owned();
    for mut row in out.axis_iter_mut(Axis(0)) {
        let mean_square =
            row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / row.len() as f64;
        let inverse_rms = ((mean_square as f32) + eps as f32).powf(-0.5);
        match weight {
            Some(w) => {
                let one_plus = fault_active(Fault::RmsnormOnePlusWeight);
                for (value, &scale) in row.iter_mut().zip(w.iter()) {
                    let scale = if one_plus { 1.0 + scale } else { scale };
                    *value = *value * inverse_rms * scale;
                }
            }
            None => row.mapv_inplace(|v| v * inverse_rms),
        }
    }
    out
}

/// `RMSNorm_w(x)` for activations `[T, D]`.
pub fn rms_norm(x: &Array2<f32>, weight: &Array1<f32>, eps: f64) -> Array2<f32> {
    rms_norm_rows(x.view(), Some(weight), eps)
}

/// Per-head RMSNorm of `[T, heads, d]` over `d` (q_norm, k_norm with a weight; v_norm without).
pub fn rms_norm_heads(x: &Array3<f32>, weight: Option<&Array1<f32>>, eps: f64) -> Array3<f32> {
    let (t, heads, d) = x.dim();
    let rows = x.to_shape((t * heads, d)).expect("contiguous reshape");
    rms_norm_rows(rows.view(), weight, eps)
        .into_shape_with_order((t, heads, d))
        .expect("same element count")
}
