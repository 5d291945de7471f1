//! Linear layers with Hugging Face weight layout.
//!
//! Every projection in Gemma 4's decoder is bias-free and stored `[out, in]`, so
//! `y = x · Wᵀ` (shared spec: text, notation).

use ndarray::{Array2, ArrayView2};

use crate::precision::{precision_active, round_bf16, PrecisionChoice};

/// `y = x · Wᵀ`. `x`: `[T, in]`, `weight`: `[out, in]`, result `[T, out]`.
pub fn linear(x: ArrayView2<f32>, weight: &Array2<f32>) -> Array2<f32> {
    if precision_active(PrecisionChoice::Bf16Activations) {
        // Precision choice: the activations enter the product as bfloat16 (crate::precision).
        return x.mapv(round_bf16).dot(&weight.t());
    }
    x.dot(&weight.t())
}
