//! The patch embedder (shared spec: multimodal §1.2, §5 items 3 and 4).
//!
//! ```text
//! e[i] = input_proj(2·p[i] − 1) + (T[0][x_i] + T[1][y_i])        [n, Dv]
//! ```
//!
//! The projection through [`linear`] (weights as stored, on the pool); the two table rows are
//! widened from the mapped table, summed, and added to the row, in the reference's order.

use gemma4_reference::error::Error;
use gemma4_reference::Result;

use crate::linear::linear;
use crate::parallel::for_each_row;
use crate::vision::weights::PatchEmbedderWeights;

/// Embeds `pixel_values` `[n, 3·p²]` (row-major) at `positions` (`[x, y]` per patch). Returns
/// `[n, Dv]`. A position outside the tables is an error naming it (the reference's message).
pub fn patch_embedding(
    pixel_values: &[f32],
    positions: &[[usize; 2]],
    weights: &PatchEmbedderWeights,
) -> Result<Vec<f32>> {
    let table_size = weights.table_size;
    if let Some((i, &[x, y])) = positions
        .iter()
        .enumerate()
        .find(|(_, &[x, y])| x >= table_size || y >= table_size)
    {
        return Err(Error::Input {
 message: format!(
            "image patch {i} is at (x, y) = ({x}, {y}), outside the vision tower's position tables of {table_size} entries (position_embedding_size)"
        ),
 });
    }
    let n = positions.len();
    // 2·p − 1, computed as Hugging Face does: 2 · (p − 0.5).
    let mut pixels = pixel_values.to_vec();
    for_each_row(&mut pixels, weights.input_proj.cols, |_, row| {
        row.iter_mut().for_each(|p| *p = 2.0 * (*p - 0.5));
    });
    let mut embeddings = linear(&pixels, n, &weights.input_proj);
    let width = weights.input_proj.rows;
    for_each_row(&mut embeddings, width, |i, row| {
        let [x, y] = positions[i];
        // T[0] is the x table and T[1] the y table; their rows are summed first.
        let mut position = vec![0.0f32; width];
        let mut y_row = vec![0.0f32; width];
        weights
            .position_table
            .row_scaled_into(x, 1.0, &mut position);
        weights
            .position_table
            .row_scaled_into(table_size + y, 1.0, &mut y_row);
        for ((e, p), q) in row.iter_mut().zip(&position).zip(&y_row) {
            *e += p + q;
        }
    });
    Ok(embeddings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::Matrix;
    use crate::testing::{assert_close, random_values, row_major, to_array2};
    use gemma4_reference::vision::patch_embedding::patch_embedding as reference_patch_embedding;
    use gemma4_reference::vision::weights::PatchEmbedderWeights as ReferenceWeights;
    use half::bf16;
    use ndarray::Array3;
    use proptest::prelude::*;

    /// Both engines' weights from the same random values; the optimized table in bf16 when
    /// `bf16` (the reference gets the widened values: weights as stored vs converted).
    fn weights(
        width: usize,
        pixels: usize,
        table: usize,
        seed: u64,
        bf16_table: bool,
    ) -> (PatchEmbedderWeights, ReferenceWeights) {
        let projection = random_values(width * pixels, seed, 0.06);
        let mut tables = random_values(2 * table * width, seed + 1, 0.8);
        if bf16_table {
            tables
                .iter_mut()
                .for_each(|v| *v = bf16::from_f32(*v).to_f32());
        }
        let position_table = if bf16_table {
            Matrix::from_bf16(
                2 * table,
                width,
                tables.iter().map(|&v| bf16::from_f32(v)).collect(),
            )
        } else {
            Matrix::from_f32(2 * table, width, tables.clone())
        };
        (
            PatchEmbedderWeights {
                input_proj: Matrix::from_f32(width, pixels, projection.clone()),
                position_table,
                table_size: table,
            },
            ReferenceWeights {
                input_proj: to_array2(width, pixels, &projection),
                position_table: Array3::from_shape_vec((2, table, width), tables).unwrap(),
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Random patch counts (1–40: skinny and GEMM products), widths, positions anywhere in
        /// the tables, f32 or bf16 tables, against the reference.
        #[test]
        fn patch_embedding_matches_reference_random_shapes(
            n in 1usize..40,
            width in 1usize..40,
            table in 1usize..20,
            seed in 0u64..1000,
            bf16_table in any::<bool>(),
        ) {
            let pixels_per_patch = 48; // 3 · 4²: any width works for the embedder itself
            let (ours, reference) = weights(width, pixels_per_patch, table, seed, bf16_table);
            let pixels: Vec<f32> = random_values(n * pixels_per_patch, seed + 2, 0.5).iter().map(|v| v + 0.5).collect();
            let positions: Vec<[usize; 2]> = (0..n)
                .map(|i| [(i * 7 + seed as usize) % table, (i * 3 + 1) % table])
                .collect();
            let got = patch_embedding(&pixels, &positions, &ours).unwrap();
            let expected = reference_patch_embedding(&to_array2(n, pixels_per_patch, &pixels), &positions, &reference).unwrap();
            // The projection is a 48-term f32 dot product summed in another order (a few ulps
            // of its ≈ 1 outputs); the position rows are added in the same order (exact). A
            // swapped or misindexed table moves elements by ≈ 0.5.
            assert_close("patch_embedding", &got, &row_major(&expected), 2e-6);
        }
    }

    #[test]
    fn patch_embedding_position_outside_tables_refused_like_reference() {
        let (ours, reference) = weights(4, 48, 5, 1, false);
        let pixels = vec![0.5f32; 2 * 48];
        let positions = [[1, 2], [3, 5]];
        let got = patch_embedding(&pixels, &positions, &ours)
            .unwrap_err()
            .to_string();
        let expected =
            reference_patch_embedding(&to_array2(2, 48, &pixels), &positions, &reference)
                .unwrap_err()
                .to_string();
        assert_eq!(got, expected);
    }
}
