//! Pooling the encoder's patches to soft tokens (shared spec: multimodal §1.6, §5 item 5).
//!
//! ```text
//! cell(x, y)  = ⌊x/k⌋ + (w/k)·⌊y/k⌋        k = 3, w = max x + 1
//! pooled[c]   = Σ_{patches in cell c, in patch order} h / k²
//! soft[c]     = pooled[c] · √Dv                          in f32, after pooling
//! soft[c]     = (soft[c] − std_bias) · std_scale         large tower only (standardize)
//! ```
//!
//! The reference adds each patch into its cell in patch order; here each cell (a task of the
//! rayon pool) sums its own members in the same order with the same f32 operations, so the
//! result is the reference's bit for bit.

use gemma4_reference::error::Error;
use gemma4_reference::Result;

use crate::parallel::for_each_row;
use crate::vision::weights::StandardizeWeights;

/// Pools `hidden` (`[n, Dv]`, the last encoder layer's valid patches) into soft tokens
/// `[n / k², Dv]`, scales by `√Dv` and standardizes when `standardize` is given. Positions that
/// do not form whole `k × k` cells are an error (the reference's messages).
pub fn pool_to_soft_tokens(
    hidden: &[f32],
    width: usize,
    positions: &[[usize; 2]],
    kernel: usize,
    standardize: Option<&StandardizeWeights>,
) -> Result<Vec<f32>> {
    let n = positions.len();
    assert_eq!(hidden.len(), n * width, "hidden is [n, Dv]");
    let cells_per_token = kernel * kernel;
    if n == 0 || !n.is_multiple_of(cells_per_token) {
        return Err(Error::Input {
 message: format!(
            "an image of {n} patches cannot be pooled into {kernel}x{kernel} cells: the patch count must be a positive multiple of {cells_per_token}"
        ),
 });
    }
    let soft_tokens = n / cells_per_token;
    let grid_width = positions.iter().map(|p| p[0]).max().unwrap_or(0) + 1;
    // Members of each cell, in patch order; the first misplaced patch is the reference's error.
    let mut members: Vec<Vec<usize>> = vec![Vec::with_capacity(cells_per_token); soft_tokens];
    for (i, &[x, y]) in positions.iter().enumerate() {
        let cell = x / kernel + (grid_width / kernel) * (y / kernel);
        if cell >= soft_tokens {
            return Err(Error::Input {
 message: format!(
                "image patch at (x, y) = ({x}, {y}) falls in pooled cell {cell}, but {n} patches make only {soft_tokens} cells: the positions do not form a grid of {kernel}x{kernel} cells"
            ),
 });
        }
        members[cell].push(i);
    }
    if let Some(cell) = members.iter().position(|m| m.len() != cells_per_token) {
        return Err(Error::Input {
 message: format!(
            "pooled cell {cell} holds {} patches instead of {cells_per_token}: the image positions do not form a grid of {kernel}x{kernel} cells",
            members[cell].len()
        ),
 });
    }
    // Each patch adds h / k² to its cell (Hugging Face's one-hot weights of 1/k²), then × √Dv
    // in f32 (the scaled values can exceed the f16 range), then standardize.
    let weight = 1.0 / cells_per_token as f32;
    let root = (width as f64).sqrt() as f32;
    let mut soft = vec![0.0f32; soft_tokens * width];
    for_each_row(&mut soft, width, |cell, sums| {
        for &patch in &members[cell] {
            let row = &hidden[patch * width..(patch + 1) * width];
            for (s, &h) in sums.iter_mut().zip(row) {
                *s += weight * h;
            }
        }
        sums.iter_mut().for_each(|v| *v *= root);
        if let Some(standardize) = standardize {
            for ((v, &bias), &scale) in sums
                .iter_mut()
                .zip(&standardize.bias)
                .zip(&standardize.scale)
            {
                *v = (*v - bias) * scale;
            }
        }
    });
    Ok(soft)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, random_values, row_major, to_array2};
    use gemma4_reference::vision::pooling::pool_to_soft_tokens as reference_pool;
    use gemma4_reference::vision::weights::StandardizeWeights as ReferenceStandardize;
    use ndarray::Array1;
    use proptest::prelude::*;

    /// The positions of a `rows × columns` patch grid, row-major, as preprocessing lists them.
    fn grid(rows: usize, columns: usize) -> Vec<[usize; 2]> {
        (0..rows * columns)
            .map(|i| [i % columns, i / columns])
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// Random grids of whole 3×3 cells (up to 30 × 36 patches: the parallel row loop),
        /// patches listed row-major or shuffled, widths, with or without standardize, against
        /// the reference: the same operations in the same order per cell, so bit for bit.
        #[test]
        fn pooling_matches_reference_bitwise_random_grids(
            cell_rows in 1usize..11,
            cell_columns in 1usize..13,
            width in 1usize..40,
            shuffle in any::<bool>(),
            standardize in any::<bool>(),
            seed in 0u64..1000,
        ) {
            let mut positions = grid(3 * cell_rows, 3 * cell_columns);
            if shuffle {
                let keys = random_values(positions.len(), seed + 7, 1.0);
                let mut order: Vec<usize> = (0..positions.len()).collect();
                order.sort_by(|&a, &b| keys[a].total_cmp(&keys[b]));
                positions = order.iter().map(|&i| positions[i]).collect();
            }
            let n = positions.len();
            let hidden = random_values(n * width, seed, 3.0);
            let bias = random_values(width, seed + 1, 0.5);
            let scale: Vec<f32> = random_values(width, seed + 2, 0.3).iter().map(|v| 1.0 + v).collect();
            let ours = StandardizeWeights { bias: bias.clone(), scale: scale.clone() };
            let reference = ReferenceStandardize { bias: Array1::from(bias), scale: Array1::from(scale) };
            let got = pool_to_soft_tokens(&hidden, width, &positions, 3, standardize.then_some(&ours)).unwrap();
            let expected = reference_pool(&to_array2(n, width, &hidden), &positions, 3, standardize.then_some(&reference)).unwrap();
            assert_close("pooling", &got, &row_major(&expected), 0.0);
        }
    }

    #[test]
    fn pooling_refuses_like_reference_bad_grids() {
        let width = 2;
        let mut positions_cases = vec![
            grid(3, 4), // 12 patches: not whole cells
            grid(2, 9), // 18 patches in 2 rows: 2 cells, but the patches reach cell 2
            Vec::new(), // no patch
        ];
        let mut doubled = grid(3, 6);
        doubled[5] = [0, 0]; // patch (5, 0) moved into cell 0: cells of 10 and 8
        positions_cases.push(doubled);
        for positions in positions_cases {
            let n = positions.len();
            let hidden = random_values(n * width, 1, 1.0);
            let got = pool_to_soft_tokens(&hidden, width, &positions, 3, None)
                .unwrap_err()
                .to_string();
            let expected = reference_pool(&to_array2(n, width, &hidden), &positions, 3, None)
                .unwrap_err()
                .to_string();
            assert_eq!(got, expected, "positions {positions:?}");
        }
    }
}
