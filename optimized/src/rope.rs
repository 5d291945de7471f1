//! Rotary position embeddings, with the cos/sin table computed once per forward pass and
//! attention type (shared spec: text §6, §15.4).
//!
//! Rotate-half layout: pair `k` is `(k, k + d/2)`; `θ_k = f32(pos) · inv[k]`:
//!
//! ```text
//! x'[k]       = x[k]·cos θ_k − x[k + d/2]·sin θ_k
//! x'[k + d/2] = x[k + d/2]·cos θ_k + x[k]·sin θ_k
//! ```
//!
//! The inverse frequencies come from the reference (`gemma4_reference::rope::inverse_frequencies`,
//! HF's float32 table, torch `pow` quirks included). Pairs with `inv[k] = 0` (the NoPE pairs of
//! proportional RoPE: 192 of 256 on full layers) are skipped: `cos 0 = 1`, `sin 0 = 0` leave
//! them exactly unchanged, so skipping them is exact and saves three quarters of the work there.
//! The angle and its sin/cos are the same f32 operations as the reference's, so the rotated
//! values agree bit for bit.

/// cos/sin of every (position, rotated pair) for a run of positions: row `r` holds the angles
/// of one position (the pass's `r`-th token, or, in a K=V layer's cache, the position stored in
/// slot `r`).
#[derive(Clone, Debug)]
pub struct RopeTable {
    /// Pairs that rotate (`inv[k] ≠ 0`).
    pairs: Vec<usize>,
    /// `inv[k]` of those pairs.
    frequencies: Vec<f32>,
    /// `[rows, pairs.len()]`
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// `d/2`
    half: usize,
}

impl RopeTable {
    /// The table for `positions` with the inverse frequencies `inv` (`[d/2]`).
    pub fn new(inverse_frequencies: &[f32], positions: &[usize]) -> RopeTable {
        let mut table = RopeTable::empty(inverse_frequencies);
        table.reserve_rows(positions.len());
        for (row, &position) in positions.iter().enumerate() {
            table.set_row(row, position);
        }
        table
    }

    /// A table without rows, for the inverse frequencies `inv` (`[d/2]`).
    pub fn empty(inverse_frequencies: &[f32]) -> RopeTable {
        let pairs: Vec<usize> = (0..inverse_frequencies.len())
            .filter(|&k| inverse_frequencies[k] != 0.0)
            .collect();
        RopeTable {
            frequencies: pairs.iter().map(|&k| inverse_frequencies[k]).collect(),
            pairs,
            cos: Vec::new(),
            sin: Vec::new(),
            half: inverse_frequencies.len(),
        }
    }

    /// Sets row `row` to the angles of `position` (`θ_k = f32(position) · inv[k]`), adding rows
    /// up to it if the table is shorter.
    pub fn set_row(&mut self, row: usize, position: usize) {
        let n = self.pairs.len();
        if self.cos.len() < (row + 1) * n {
            self.cos.resize((row + 1) * n, 0.0);
            self.sin.resize((row + 1) * n, 0.0);
        }
        let angles = self.frequencies.iter().map(|&f| position as f32 * f);
        let cells = self.cos[row * n..(row + 1) * n]
            .iter_mut()
            .zip(&mut self.sin[row * n..(row + 1) * n]);
        for (angle, (cos, sin)) in angles.zip(cells) {
            *cos = angle.cos();
            *sin = angle.sin();
        }
    }

    /// Makes room for exactly `rows` rows (the new rows are zero until [`RopeTable::set_row`]).
    pub fn reserve_rows(&mut self, rows: usize) {
        let cells = rows * self.pairs.len();
        if cells > self.cos.len() {
            for v in [&mut self.cos, &mut self.sin] {
                v.reserve_exact(cells - v.len());
                v.resize(cells, 0.0);
            }
        }
    }

    /// Bytes held by the cos/sin rows.
    pub fn allocated_bytes(&self) -> usize {
        (self.cos.capacity() + self.sin.capacity()) * std::mem::size_of::<f32>()
    }

    /// Bytes one row costs: a cos and a sin per rotated pair.
    pub fn bytes_per_row(&self) -> usize {
        2 * self.pairs.len() * std::mem::size_of::<f32>()
    }

    /// Rotates one head vector `x` (`[d]`) by the angles of table row `row`.
    #[inline]
    pub fn rotate(&self, x: &mut [f32], row: usize) {
        let n = self.pairs.len();
        let (cos, sin) = (
            &self.cos[row * n..(row + 1) * n],
            &self.sin[row * n..(row + 1) * n],
        );
        for (i, &k) in self.pairs.iter().enumerate() {
            let (a, b) = (x[k], x[k + self.half]);
            x[k] = a * cos[i] - b * sin[i];
            x[k + self.half] = b * cos[i] + a * sin[i];
        }
    }

    /// Rotates `x` (`[T, heads, d]`, row-major): token `t` by table row `t`.
    pub fn apply(&self, x: &mut [f32], heads: usize) {
        self.rows_from(0).apply(x, heads);
    }

    /// The table's rows from `first_row` on, for a chunk of tokens that starts there.
    pub fn rows_from(&self, first_row: usize) -> RopeRows<'_> {
        RopeRows {
            table: self,
            first_row,
        }
    }
}

/// The rows of a [`RopeTable`] that belong to a chunk of tokens: token `t` of the chunk is at
/// table row `first_row + t` (the table covers the whole pass; a layer may see a later part).
#[derive(Clone, Copy, Debug)]
pub struct RopeRows<'a> {
    table: &'a RopeTable,
    first_row: usize,
}

impl<'a> RopeRows<'a> {
    /// The rows of the chunk's tokens from `tokens` on.
    pub fn skip(self, tokens: usize) -> RopeRows<'a> {
        self.table.rows_from(self.first_row + tokens)
    }

    /// Rotates `x` (`[T, heads, d]`, row-major): token `t` by the angles of row `first_row + t`.
    pub fn apply(&self, x: &mut [f32], heads: usize) {
        let d = 2 * self.table.half;
        crate::parallel::for_each_row(x, heads * d, |t, token| {
            for head in token.chunks_exact_mut(d) {
                self.table.rotate(head, self.first_row + t);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, random_values};
    use gemma4_reference::config::{RopeKind, RopeParameters};
    use gemma4_reference::rope::{apply_rope, inverse_frequencies};
    use ndarray::Array3;

    #[test]
    fn rope_matches_reference_bitwise_default_and_proportional() {
        let kinds = [
            (RopeKind::Default, 1e4, 16),
            (
                RopeKind::Proportional {
                    partial_rotary_factor: 0.25,
                },
                1e6,
                32,
            ),
            (
                RopeKind::Proportional {
                    partial_rotary_factor: 0.25,
                },
                1e6,
                512,
            ),
        ];
        for (kind, theta, d) in kinds {
            let inv = inverse_frequencies(
                &RopeParameters {
                    kind,
                    theta,
                    factor: 1.0,
                },
                d,
            );
            // Five awkward positions, then a run long enough (≥ `PARALLEL_ELEMENTS` at d = 512)
            // for the tokens to be split over the pool.
            let positions: Vec<usize> = [0usize, 1, 7, 1000, 131_071]
                .into_iter()
                .chain(2000..2040)
                .collect();
            let heads = 3;
            let x = random_values(positions.len() * heads * d, d as u64, 2.0);
            let mut ours = x.clone();
            RopeTable::new(&inv, &positions).apply(&mut ours, heads);
            let mut reference = Array3::from_shape_vec((positions.len(), heads, d), x).unwrap();
            apply_rope(&mut reference, &positions, &inv);
            assert_close(
                &format!("rope d={d}"),
                &ours,
                reference.as_slice().unwrap(),
                0.0,
            );
        }
    }
}
