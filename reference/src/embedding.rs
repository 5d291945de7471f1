//! The scaled token embedding (shared spec: text §4, §15.14).
//!
//! `x⁰ = embed_tokens.weight[ids] · s_D` with `s_D = √D` **rounded to the compute dtype**:
//! Hugging Face casts its float32 `√D` buffer to the dtype of the (loaded) weights before
//! multiplying. A model run in bf16 therefore uses 39.25 / 50.5 / 73.5 / 53.0 for E2B / E4B /
//! 31B / 26B-A4B, while the same bf16 checkpoint loaded in float32 uses the unrounded 39.1918
//! / 50.596 / 73.321 / 53.066 ([`ComputeDtype`]). The tied LM head uses the table unscaled.

use ndarray::{Array2, ArrayView2};

use crate::compute_dtype::ComputeDtype;
use crate::faults::{fault_active, Fault};

/// `√n` as Hugging Face applies it in a model computing in `compute`: Python's double
/// `n ** 0.5`, stored as float32, then cast to the compute dtype (a no-op in float32).
pub fn embedding_scale(n: usize, compute: ComputeDtype) -> f32 {
    let scale = (n as f64).sqrt() as f32;
    if fault_active(Fault::EmbedScaleNotRounded) {
        return scale;
    }
    compute.round(scale)
}

/// The embedding table's rows of the tokens, `rows` `[T, D]` (looked up by the loader:
/// `weight_stream::DecoderWeights::embedding_rows`), each multiplied by `scale`. Returns `[T, D]`.
pub fn scaled_embedding(rows: ArrayView2<f32>, scale: f32) -> Array2<f32> {
    rows.mapv(|v| v * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedding_scale_released_values_per_compute_dtype() {
        // text §4: sqrt(D) in bf16 for E2B, E4B, 31B, 26B-A4B.
        let expected = [(1536, 39.25), (2560, 50.5), (5376, 73.5), (2816, 53.0)];
        for (d, value) in expected {
            assert_eq!(embedding_scale(d, ComputeDtype::BFloat16), value, "D = {d}");
        }
        assert_eq!(embedding_scale(1536, ComputeDtype::Float32), 39.191_837);
    }
}
