//! The patch embedder (shared spec: multimodal §1.2, §5 items 3 and 4).
//!
//! ```text
//! e[i] = input_proj(2·p[i] − 1) + T[0][x_i] + T[1][y_i]        [n, Dv]
//! ```
//!
//! `p[i]` is patch `i`'s 768 pixels in [0, 1] (row, column, channel order); the model maps them
//! to [−1, 1] itself (the processor does not normalise). The position embedding is factorised:
//! one row of the x (column) table plus one row of the y (row) table, looked up, never
//! interpolated. Only valid patches are given here, so the padding rule (zero position
//! embedding) never applies.

use ndarray::Array2;

use crate::error::{Error, Result};
use crate::faults::{fault_active, Fault};
use crate::linear::linear;
use crate::vision::weights::PatchEmbedderWeights;

/// Embeds `pixel_values` `[n, 3·p²]` at `positions` (`[x, y]` per patch). Returns `[n, Dv]`.
/// A position outside the tables is an error naming it.
pub fn patch_embedding(
    pixel_values: &Array2<f32>,
    positions: &[[usize; 2]],
    weights: &PatchEmbedderWeights,
) -> Result<Array2<f32>> {
    let table_size = weights.position_table.shape()[1];
    if let Some((i, &[x, y])) = positions
        .iter()
        .enumerate()
        .find(|(_, &[x, y])| x >= table_size || y >= table_size)
    {
        return Err(Error::input(format!(
            "image patch {i} is at (x, y) = ({x}, {y}), outside the vision tower's position tables of {table_size} entries (position_embedding_size)"
        )));
    }
    // 2·p − 1, computed as Hugging Face does: 2 · (p − 0.5).
    let pixels = if fault_active(Fault::VisionPixelsNotRescaled) {
        pixel_values.clone()
    } else {
        pixel_values.mapv(|p| 2.0 * (p - 0.5))
    };
    let mut embeddings = linear(pixels.view(), &weights.input_proj);
    for (mut row, &[x, y]) in embeddings.outer_iter_mut().zip(positions) {
        let (x, y) = if fault_active(Fault::VisionPositionTablesSwapped) {
            (y, x)
        } else {
            (x, y)
        };
        // T[0] is the x table and T[1] the y table; their rows are summed first.
        let position = &weights.position_table.slice(ndarray::s![0, x, ..])
            + &weights.position_table.slice(ndarray::s![1, y, ..]);
        row += &position;
    }
    Ok(embeddings)
}
