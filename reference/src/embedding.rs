//! The scaled token embedding (shared spec: text §4, §15.14).
//!
//! `x⁰ = embed_tokens.weight[ids] · s_D` with `s_D = √D` **rounded to the embedding table's
//! dtype** (Hugging Face casts its float32 `√D` buffer to the weight dtype before multiplying):
//! in bf16 that is 39.25 / 50.5 / 73.5 / 53.0 for E2B / E4B / 31B / 26B-A4B. The tied LM head
//! uses the table unscaled.

use ndarray::Array2;

use crate::checkpoint::WeightDtype;
use crate::faults::{fault_active, Fault};

/// `√n` as Hugging Face applies it to a table of dtype `dtype`: Python's double `n ** 0.5`,
/// stored as float32, then cast to the table's dtype.
pub fn embedding_scale(n: usize, dtype: WeightDtype) -> f32 {
    let scale = (n as f64).sqrt() as f32;
    if fault_active(Fault::EmbedScaleNotRounded) {
        return scale;
    }
    dtype.round(scale)
}

/// Rows `ids` of `table` (`[V, D]`), each multiplied by `scale`. Returns `[T, D]`.
/// The ids were checked against the table size by the caller.
pub fn scaled_embedding(table: &Array2<f32>, ids: &[usize], scale: f32) -> Array2<f32> {
    let mut out = Array2::<f32>::zeros((ids.len(), table.ncols()));
    for (t, &id) in ids.iter().enumerate() {
        out.row_mut(t).assign(&table.row(id).mapv(|v| v * scale));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedding_scale_bf16_released_values() {
        // text §4: sqrt(D) in bf16 for E2B, E4B, 31B, 26B-A4B.
        let expected = [(1536, 39.25), (2560, 50.5), (5376, 73.5), (2816, 53.0)];
        for (d, value) in expected {
            assert_eq!(embedding_scale(d, WeightDtype::BF16), value, "D = {d}");
        }
        assert_eq!(embedding_scale(1536, WeightDtype::F32), 39.191_837);
    }
}
