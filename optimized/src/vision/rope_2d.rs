//! Axial 2D RoPE of the vision encoder (shared spec: multimodal §1.4, §5 item 2).
//!
//! The first half of each head is rotated by the patch's x (column), the second by its y (row);
//! inside each half the pairs are rotate-half (`i`, `i + d/4`), with the reference's frequencies
//! (`gemma4_reference::vision::rope_2d::inverse_frequencies_2d`, `θ = 100`):
//!
//! ```text
//! half'[i]       = half[i] · cos(p·f_i) − half[i + d/4] · sin(p·f_i)
//! half'[i + d/4] = half[i + d/4] · cos(p·f_i) + half[i] · sin(p·f_i)      p = x or y
//! ```
//!
//! What is fast: the cos/sin of every patch are computed once per image ([`Rope2dTable`]) and
//! shared by every head of the queries and keys of every layer (the reference recomputes them
//! per head and layer); patches are rotated in parallel. The angle and the rotation are the
//! reference's f32 operations, so the results agree bit for bit.

use crate::parallel::for_each_row;

/// cos/sin of the x and y angles of every patch of one image.
#[derive(Clone, Debug)]
pub struct Rope2dTable {
    /// `d/4` frequencies.
    quarter: usize,
    /// `[n, 2, d/4]`: x angles then y angles of each patch.
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope2dTable {
    /// The table of `positions` (`[x, y]` per patch) for `inverse_frequencies` (`[d/4]`).
    pub fn new(inverse_frequencies: &[f32], positions: &[[usize; 2]]) -> Rope2dTable {
        let quarter = inverse_frequencies.len();
        let mut cos = Vec::with_capacity(positions.len() * 2 * quarter);
        let mut sin = Vec::with_capacity(positions.len() * 2 * quarter);
        for &[x, y] in positions {
            for position in [x, y] {
                for &frequency in inverse_frequencies {
                    let (s, c) = (position as f32 * frequency).sin_cos();
                    cos.push(c);
                    sin.push(s);
                }
            }
        }
        Rope2dTable { quarter, cos, sin }
    }

    /// Rotates `x` (`[n, heads, d]`, row-major, `d = 4 · quarter`) in place: every head of
    /// patch `t` by row `t` of the table.
    pub fn apply(&self, x: &mut [f32], heads: usize) {
        let quarter = self.quarter;
        let (half, head_dim) = (2 * quarter, 4 * quarter);
        for_each_row(x, heads * head_dim, |t, patch| {
            let angles = t * 2 * quarter;
            for head in patch.chunks_exact_mut(head_dim) {
                for (axis, offset) in [0, half].into_iter().enumerate() {
                    let cos = &self.cos[angles + axis * quarter..][..quarter];
                    let sin = &self.sin[angles + axis * quarter..][..quarter];
                    for j in 0..quarter {
                        let (a, b) = (head[offset + j], head[offset + j + quarter]);
                        head[offset + j] = a * cos[j] - b * sin[j];
                        head[offset + j + quarter] = b * cos[j] + a * sin[j];
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, random_values};
    use gemma4_reference::vision::rope_2d::{apply_rope_2d, inverse_frequencies_2d};
    use ndarray::Array3;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// Random patch counts (up to 700: the parallel row loop), heads, head dims (multiples
        /// of 4 up to 72, the large tower's) and positions up to 3360 (the largest grid side),
        /// against the reference's `apply_rope_2d`: the same f32 operations, so bit for bit.
        #[test]
        fn rope_2d_matches_reference_bitwise(
            n in 1usize..700,
            heads in 1usize..5,
            quarter in 1usize..19,
            seed in 0u64..1000,
        ) {
            let d = 4 * quarter;
            let frequencies = inverse_frequencies_2d(d, 100.0);
            let positions: Vec<[usize; 2]> = (0..n)
                .map(|i| [(i * 37 + seed as usize) % 3361, (i * 11) % 3361])
                .collect();
            let values = random_values(n * heads * d, seed, 2.0);
            let mut ours = values.clone();
            Rope2dTable::new(&frequencies, &positions).apply(&mut ours, heads);
            let mut reference = Array3::from_shape_vec((n, heads, d), values).unwrap();
            apply_rope_2d(&mut reference, &positions, &frequencies);
            assert_close("rope_2d", &ours, reference.as_slice().unwrap(), 0.0);
        }
    }
}
