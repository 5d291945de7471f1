//! Linear layers with Hugging Face weight layout.
//!
//! Every projection in Gemma 4's decoder is bias-free and stored `[out, in]`, so
//! `y = x · Wᵀ` (shared spec: text, notation).

use ndarray::{Array2, ArrayView2};

/// `y = x · Wᵀ`. `x`: `[T, in]`, `weight`: `[out, in]`, result `[T, out]`.
pub fn linear(x: ArrayView2<f32>, weight: &Array2<f32>) -> Array2<f32> {
    x.dot(&weight.t())
}
