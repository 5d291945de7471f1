//! Rotary position embeddings: default RoPE on sliding layers, proportional p-RoPE on full
//! layers (shared spec: text §6, §15.4).
//!
//! Layout is **rotate-half**: coordinate `k` is paired with `k + d/2` (not `(2k, 2k+1)`). With
//! `θ_k = pos · inv[k]`, for `k < d/2`:
//!
//! ```text
//! x'[k]       = x[k]·cos θ_k − x[k + d/2]·sin θ_k
//! x'[k + d/2] = x[k + d/2]·cos θ_k + x[k]·sin θ_k
//! ```
//!
//! Frequencies:
//! - default (sliding, θ = 1e4): `inv[k] = θ^(−2k/d)` for all `d/2` pairs;
//! - proportional (full, θ = 1e6, ρ = 0.25): the first `r = floor(ρ·d/2)` pairs use
//!   `inv[k] = θ^(−2k/d)` — **the exponent's denominator is the full head dim** — and the other
//!   `d/2 − r` pairs have `inv[k] = 0`, so they pass through unchanged. For `d = 512` the rotated
//!   coordinates are `{0..63} ∪ {256..319}`.
//!
//! All arithmetic is float32 exactly as Hugging Face does it: the exponent `f32(2k)/f32(d)`,
//! `θ^e` in f32, `1/θ^e` in f32, then the angle `f32(pos) · inv[k]` as one f32 multiply. An f64
//! angle would differ by up to 5e-3 in cos at positions near 1e5.

use ndarray::Array3;

use crate::config::{RopeKind, RopeParameters};
use crate::faults::{fault_active, Fault};

/// Entries where torch 2.11's vectorised `pow` (x86-64, AVX2) is one ulp away from the correctly
/// rounded value, measured in the shared spec (text §6): `(head_dim, theta, pair k, torch's bits)`.
/// Hugging Face's tables contain torch's value, so we use it too; this matters only at long
/// positions (2e-3 rad at position 131071).
const TORCH_POW_TABLE_OVERRIDES: [(usize, f64, usize, u32); 2] = [
    (256, 10_000.0, 111, 0x39b2_29fb),
    (512, 1_000_000.0, 29, 0x3e56_1912),
];

/// The inverse frequencies `inv[k]`, `k < head_dim / 2`, of one layer type (zeros for
/// pairs that do not rotate).
pub fn inverse_frequencies(rope: &RopeParameters, head_dim: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let theta = rope.theta as f32;
    // How many pairs rotate, and the denominator of the exponent.
    // Hugging Face divides by `factor` only in the proportional initialiser.
    let (rotated_pairs, exponent_denominator, factor) = match rope.kind {
        RopeKind::Default => (half, head_dim, 1.0),
        RopeKind::Proportional {
            partial_rotary_factor,
        } => {
            let rotated = ((partial_rotary_factor * head_dim as f64) / 2.0).floor() as usize;
            if fault_active(Fault::RopeFullOnGlobal) {
                // Bug: every pair rotates, as in plain RoPE.
                (half, head_dim, rope.factor)
            } else if fault_active(Fault::RopeExponentOverRotatedWidth) {
                // Bug: exponent over the rotated width 2r instead of the head dim.
                (rotated, 2 * rotated, rope.factor)
            } else {
                (rotated, head_dim, rope.factor)
            }
        }
    };
    let mut inverse = vec![0.0f32; half];
    for (k, value) in inverse.iter_mut().enumerate().take(rotated_pairs.min(half)) {
        let exponent = (2 * k) as f32 / exponent_denominator as f32;
        *value = 1.0 / theta.powf(exponent);
        for (d, t, pair, bits) in TORCH_POW_TABLE_OVERRIDES {
            if d == exponent_denominator && t == rope.theta && pair == k {
                *value = f32::from_bits(bits);
            }
        }
        *value /= factor as f32;
    }
    inverse
}

/// Rotates `x` (`[T, heads, d]`) in place: token `t` by angle `positions[t] · inv[k]` on pair `k`.
pub fn apply_rope(x: &mut Array3<f32>, positions: &[usize], inverse_frequencies: &[f32]) {
    let (tokens, heads, head_dim) = x.dim();
    assert_eq!(tokens, positions.len(), "one position per token");
    let half = head_dim / 2;
    let interleaved = fault_active(Fault::RopeInterleavedPairs);
    for (t, &position) in positions.iter().enumerate() {
        for (k, &frequency) in inverse_frequencies.iter().enumerate().take(half) {
            let angle = position as f32 * frequency;
            let (sin, cos) = (angle.sin(), angle.cos());
            // Rotate-half pairs (k, k + d/2); the bug pairs (2k, 2k + 1).
            let (a, b) = if interleaved {
                (2 * k, 2 * k + 1)
            } else {
                (k, k + half)
            };
            for h in 0..heads {
                let (xa, xb) = (x[[t, h, a]], x[[t, h, b]]);
                x[[t, h, a]] = xa * cos - xb * sin;
                x[[t, h, b]] = xb * cos + xa * sin;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proportional() -> RopeParameters {
        RopeParameters {
            kind: RopeKind::Proportional {
                partial_rotary_factor: 0.25,
            },
            theta: 1e6,
            factor: 1.0,
        }
    }

    #[test]
    fn rope_proportional_released_full_layer_rotates_64_of_256_pairs() {
        let inv = inverse_frequencies(&proportional(), 512);
        assert_eq!(inv.len(), 256);
        assert!(inv[..64].iter().all(|&f| f > 0.0));
        assert!(inv[64..].iter().all(|&f| f == 0.0));
        // The slowest used frequency is 1e6^(-126/512) = 0.0333762... (text §6).
        assert!(
            (inv[63] - 0.033_376_2).abs() < 1e-7,
            "inv[63] = {}",
            inv[63]
        );
    }

    #[test]
    fn rope_proportional_unrotated_coordinates_pass_through() {
        let inv = inverse_frequencies(&proportional(), 512);
        let mut x = Array3::from_shape_fn((1, 1, 512), |(_, _, i)| i as f32 + 1.0);
        let before = x.clone();
        apply_rope(&mut x, &[1000], &inv);
        for i in 0..512 {
            let rotated = i < 64 || (256..320).contains(&i);
            assert_eq!(x[[0, 0, i]] != before[[0, 0, i]], rotated, "coordinate {i}");
        }
    }

    #[test]
    fn rope_default_sliding_frequencies() {
        let rope = RopeParameters {
            kind: RopeKind::Default,
            theta: 1e4,
            factor: 1.0,
        };
        let inv = inverse_frequencies(&rope, 256);
        assert_eq!(inv[0], 1.0);
        assert_eq!(inv[111].to_bits(), 0x39b2_29fb, "torch's table value");
        assert!((inv[127] - 1e4f32.powf(-254.0 / 256.0)).abs() < 1e-9);
    }
}
