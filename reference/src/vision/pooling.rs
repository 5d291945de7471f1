//! Pooling the encoder's patches to soft tokens (shared spec: multimodal §1.6, §5 item 5).
//!
//! ```text
//! cell(x, y)  = ⌊x/k⌋ + (w/k)·⌊y/k⌋        k = 3, w = max x + 1: a row-major grid of k×k cells
//! pooled[c]   = Σ_{patches in cell c} h / k²            (a plain 3×3 mean)
//! soft[c]     = pooled[c] · √Dv                          in f32, after pooling
//! soft[c]     = (soft[c] − std_bias) · std_scale         large tower only (standardize)
//! ```
//!
//! Cells are taken by the patches' positions, not by runs of 9 consecutive patches, and come out
//! in cell order (row-major over the pooled grid). Only cells holding patches are kept.

use ndarray::Array2;

use crate::error::{Error, Result};
use crate::faults::{fault_active, Fault};
use crate::vision::weights::StandardizeWeights;

/// Pools `hidden` (`[n, Dv]`, the last encoder layer's valid patches) into soft tokens
/// `[n / k², Dv]`, scales by `√Dv` and standardizes when `standardize` is given.
/// Positions that do not form whole `k × k` cells are an error.
pub fn pool_to_soft_tokens(
    hidden: &Array2<f32>,
    positions: &[[usize; 2]],
    kernel: usize,
    standardize: Option<&StandardizeWeights>,
) -> Result<Array2<f32>> {
    let (n, width) = hidden.dim();
    let cells_per_token = kernel * kernel;
    if n == 0 || !n.is_multiple_of(cells_per_token) {
        return Err(Error::input(format!(
            "an image of {n} patches cannot be pooled into {kernel}x{kernel} cells: the patch count must be a positive multiple of {cells_per_token}"
        )));
    }
    let soft_tokens = n / cells_per_token;
    let grid_width = positions.iter().map(|p| p[0]).max().unwrap_or(0) + 1;
    let mut sums = Array2::<f32>::zeros((soft_tokens, width));
    let mut members = vec![0usize; soft_tokens];
    // Each patch adds h / k² to its cell (Hugging Face's one-hot weights of 1/k²).
    let weight = 1.0 / cells_per_token as f32;
    for (row, &[x, y]) in hidden.outer_iter().zip(positions) {
        let cell = x / kernel + (grid_width / kernel) * (y / kernel);
        if cell >= soft_tokens {
            return Err(Error::input(format!(
                "image patch at (x, y) = ({x}, {y}) falls in pooled cell {cell}, but {n} patches make only {soft_tokens} cells: the positions do not form a grid of {kernel}x{kernel} cells"
            )));
        }
        sums.row_mut(cell).scaled_add(weight, &row);
        members[cell] += 1;
    }
    if let Some(cell) = members.iter().position(|&m| m != cells_per_token) {
        return Err(Error::input(format!(
            "pooled cell {cell} holds {} patches instead of {cells_per_token}: the image positions do not form a grid of {kernel}x{kernel} cells",
            members[cell]
        )));
    }
    // × √Dv in f32, after pooling (the scaled values can exceed the f16 range).
    if !fault_active(Fault::VisionPoolScaleMissing) {
        let root = (width as f64).sqrt() as f32;
        sums.mapv_inplace(|v| v * root);
    }
    if let Some(standardize) =
        standardize.filter(|_| !fault_active(Fault::VisionStandardizeMissing))
    {
        for mut row in sums.outer_iter_mut() {
            for ((v, &bias), &scale) in row
                .iter_mut()
                .zip(&standardize.bias)
                .zip(&standardize.scale)
            {
                *v = (*v - bias) * scale;
            }
        }
    }
    Ok(sums)
}
