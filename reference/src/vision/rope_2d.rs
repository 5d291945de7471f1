//! Axial 2D RoPE of the vision encoder (shared spec: multimodal §1.4, §5 item 2).
//!
//! Each head vector of dim `d` is split in two halves: **the first half is rotated by the
//! patch's x (column), the second by its y (row)**. Inside each half the pairing is
//! rotate-half: channel `i` with `i + d/4`. The frequencies are shared by both halves:
//!
//! ```text
//! f_j = θ^(−2j / (d/2)),  j = 0 … d/4 − 1,  θ = 100
//! half' [i]       = half[i] · cos(p·f_i) − half[i + d/4] · sin(p·f_i)
//! half' [i + d/4] = half[i + d/4] · cos(p·f_i) + half[i] · sin(p·f_i)      p = x or y
//! ```
//!
//! (Hugging Face names the x half `freq_h`; the values are x.)

use ndarray::Array3;

use crate::faults::{fault_active, Fault};

/// `f_j = 1 / θ^(2j / (d/2))` for `j < d/4`, in f32 as Hugging Face computes them.
pub fn inverse_frequencies_2d(head_dim: usize, theta: f64) -> Vec<f32> {
    let half = head_dim / 2;
    (0..head_dim / 4)
        .map(|j| 1.0 / (theta as f32).powf((2 * j) as f32 / half as f32))
        .collect()
}

/// Rotates every head of `x` (`[n, heads, d]`) in place by its patch's position: the first
/// half of each head by x, the second by y.
pub fn apply_rope_2d(x: &mut Array3<f32>, positions: &[[usize; 2]], inverse_frequencies: &[f32]) {
    let head_dim = x.shape()[2];
    let (half, quarter) = (head_dim / 2, head_dim / 4);
    for (mut patch, &[px, py]) in x.outer_iter_mut().zip(positions) {
        let (first, second) = if fault_active(Fault::VisionRopeAxesSwapped) {
            (py, px)
        } else {
            (px, py)
        };
        for mut head in patch.outer_iter_mut() {
            for (offset, position) in [(0, first), (half, second)] {
                for (j, &frequency) in inverse_frequencies.iter().enumerate() {
                    let angle = position as f32 * frequency;
                    let (sin, cos) = angle.sin_cos();
                    let (a, b) = (head[offset + j], head[offset + j + quarter]);
                    head[offset + j] = a * cos + -b * sin;
                    head[offset + j + quarter] = b * cos + a * sin;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_2d_first_half_follows_x_second_half_y() {
        let frequencies = inverse_frequencies_2d(8, 100.0);
        assert_eq!(frequencies.len(), 2);
        assert_eq!(frequencies[0], 1.0);
        assert!((frequencies[1] - 0.1).abs() < 1e-7, "100^(-2/4) = 0.1");
        // x = 5, y = 0: the second half (y) is untouched, the first rotates.
        let mut x = Array3::from_shape_fn((1, 1, 8), |(_, _, c)| c as f32 + 1.0);
        let before = x.clone();
        apply_rope_2d(&mut x, &[[5, 0]], &frequencies);
        assert_eq!(
            x.slice(ndarray::s![0, 0, 4..]),
            before.slice(ndarray::s![0, 0, 4..])
        );
        let (sin, cos) = 5f32.sin_cos();
        assert!((x[[0, 0, 0]] - (1.0 * cos - 3.0 * sin)).abs() < 1e-6);
        assert!((x[[0, 0, 2]] - (3.0 * cos + 1.0 * sin)).abs() < 1e-6);
    }
}
