//! The scaled token embedding (shared spec: text §4, §15.14), read from the table as stored.
//!
//! `x⁰ = embed_tokens.weight[ids] · s_D`, `s_D = √D` rounded to the table's dtype (the
//! reference's `embedding_scale`). Only the `T` rows looked up are read from the mapped table.

use crate::checkpoint::Matrix;

/// Rows `ids` of `table` (`[V, D]`) times `scale` → `[T, D]` row-major.
pub fn scaled_embedding(table: &Matrix, ids: &[usize], scale: f32) -> Vec<f32> {
    let d = table.cols;
    let mut out = vec![0.0f32; ids.len() * d];
    for (row, &id) in out.chunks_exact_mut(d).zip(ids) {
        table.row_scaled_into(id, scale, row);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, random_values};
    use half::bf16;
    use ndarray::Array2;

    #[test]
    fn embedding_matches_reference_bf16_table() {
        let (v, d) = (11, 24);
        let values: Vec<bf16> = random_values(v * d, 3, 1.0)
            .iter()
            .map(|&x| bf16::from_f32(x))
            .collect();
        let table = Matrix::from_bf16(v, d, values.clone());
        let ids = [3, 0, 10, 3];
        let got = scaled_embedding(&table, &ids, 4.8984375);
        let reference_table =
            Array2::from_shape_vec((v, d), values.iter().map(|x| x.to_f32()).collect()).unwrap();
        let rows = reference_table.select(ndarray::Axis(0), &ids);
        let expected = gemma4_reference::embedding::scaled_embedding(rows.view(), 4.8984375);
        assert_close("embedding", &got, expected.as_slice().unwrap(), 0.0);
    }
}
