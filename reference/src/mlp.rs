//! The dense feed-forward block: GeGLU with tanh GELU (shared spec: text §8).
//!
//! `mlp(x) = (gelu_tanh(x · gate_projᵀ) ⊙ (x · up_projᵀ)) · down_projᵀ`, width `F` (or `2F` on
//! E2B's double-wide KV-shared layers). Gate first, then up.

use ndarray::{Array2, Zip};

use crate::checkpoint::MlpWeights;
use crate::faults::{fault_active, Fault};
use crate::gelu::gelu_tanh;
use crate::linear::linear;

/// `x`: `[T, D]` → `[T, D]`.
pub fn mlp(x: &Array2<f32>, weights: &MlpWeights) -> Array2<f32> {
    let (mut gate, mut up) = (
        linear(x.view(), &weights.gate_proj),
        linear(x.view(), &weights.up_proj),
    );
    if fault_active(Fault::MlpGateUpSwapped) {
        std::mem::swap(&mut gate, &mut up);
    }
    let hidden = Zip::from(&gate)
        .and(&up)
        .map_collect(|&g, &u| gelu_tanh(g) * u);
    linear(hidden.view(), &weights.down_proj)
}
