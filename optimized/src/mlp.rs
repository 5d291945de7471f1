//! The dense feed-forward block: GeGLU with tanh GELU (shared spec: text §8).
//!
//! `mlp(x) = (gelu_tanh(x · gate_projᵀ) ⊙ (x · up_projᵀ)) · down_projᵀ`, width `F` (or `2F` on
//! E2B's double-wide KV-shared layers). The activation and the product are one fused pass.

use crate::checkpoint::MlpWeights;
use crate::linear::{linear, linear_geglu};

/// `x`: `[T, D]` → `[T, D]`.
pub fn mlp(x: &[f32], tokens: usize, weights: &MlpWeights) -> Vec<f32> {
    let gated = linear_geglu(x, tokens, &weights.gate_proj, &weights.up_proj);
    linear(&gated, tokens, &weights.down_proj)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::Matrix;
    use crate::testing::{assert_close, random_values, to_array2};

    #[test]
    fn mlp_matches_reference_random_weights() {
        let (tokens, d, f) = (5, 24, 40);
        let gate = random_values(f * d, 1, 0.2);
        let up = random_values(f * d, 2, 0.2);
        let down = random_values(d * f, 3, 0.15);
        let x = random_values(tokens * d, 4, 1.0);
        let ours = MlpWeights {
            gate_proj: Matrix::from_f32(f, d, gate.clone()),
            up_proj: Matrix::from_f32(f, d, up.clone()),
            down_proj: Matrix::from_f32(d, f, down.clone()),
        };
        let reference = gemma4_reference::checkpoint::MlpWeights {
            gate_proj: to_array2(f, d, &gate),
            up_proj: to_array2(f, d, &up),
            down_proj: to_array2(d, f, &down),
        };
        let expected = gemma4_reference::mlp::mlp(&to_array2(tokens, d, &x), &reference);
        // f32 dot products of 24–40 terms in another order: a few ulps of the outputs (≈ 1).
        assert_close(
            "mlp",
            &mlp(&x, tokens, &ours),
            expected.as_slice().unwrap(),
            1e-6,
        );
    }
}
