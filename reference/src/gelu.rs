//! The one activation of the Gemma 4 decoder: GELU with the tanh approximation
//! (shared spec: text, notation). HF calls it `gelu_pytorch_tanh`; flax's `nn.gelu` default.
//! It is used in the dense MLP, in every expert and in the Per-Layer Embedding gate.

use crate::faults::{fault_active, Fault};
use crate::precision::gelu_from_f16_table;

/// `gelu_tanh(x) = 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
pub fn gelu_tanh(x: f32) -> f32 {
    if fault_active(Fault::GeluExact) {
        // Bug: the exact (erf) GELU, `0.5·x·(1 + erf(x/√2))`.
        return 0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2));
    }
    // Precision choice: read from ggml's float16 table (crate::precision).
    if let Some(y) = gelu_from_f16_table(x, gelu_tanh_float32) {
        return y;
    }
    gelu_tanh_float32(x)
}

/// The float32 formula itself.
fn gelu_tanh_float32(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)).tanh())
}
