//! RMSNorm (shared spec: text, notation; §15.1), fused with what follows it.
//!
//! `RMSNorm_w(x) = x · (mean(x²) + ε)^(-1/2) ⊙ w` over the last axis; the weight multiplies as
//! stored (no `1 + w`). The mean of squares is accumulated in f64 (each f32 square is exact in
//! f64), then `inverse_rms = (f32(mean) + f32(ε))^(-1/2)` and `x · inverse_rms · w`, the
//! reference's exact sequence of f32 operations, so the two agree to the last bit except when
//! the two f64 summation orders round `mean` differently.
//!
//! Fused forms (one pass instead of two or three):
//! - [`add_normed`]: `h ← h + RMSNorm_w(branch)`, the sandwich post-norm and residual add;
//! - [`add_normed_scaled`]: `h ← (h + RMSNorm_w(branch)) · s`, the PLE residual and `layer_scalar`.

use crate::parallel::{for_each_row, for_each_row_pair};
use crate::simd::sum_of_squares_f64;

/// `1 / rms` of one row, exactly as the reference computes it.
#[inline]
pub fn inverse_rms(row: &[f32], eps: f64) -> f32 {
    let mean_square = sum_of_squares_f64(row) / row.len() as f64;
    ((mean_square as f32) + eps as f32).powf(-0.5)
}

/// In place, every row of `x` (`[rows, n]`, `n = x.len() / rows`): `x ← RMSNorm_w(x)`
/// (`weight = None`: the weight-free `RMSNorm_∅`).
pub fn rms_norm_in_place(x: &mut [f32], n: usize, weight: Option<&[f32]>, eps: f64) {
    for_each_row(x, n, |_, row| {
        let inv = inverse_rms(row, eps);
        match weight {
            Some(w) => row.iter_mut().zip(w).for_each(|(v, &s)| *v = *v * inv * s),
            None => row.iter_mut().for_each(|v| *v *= inv),
        }
    });
}

/// `RMSNorm_w(x)` of every row into a new buffer.
pub fn rms_norm(x: &[f32], n: usize, weight: &[f32], eps: f64) -> Vec<f32> {
    let mut out = x.to_vec();
    rms_norm_in_place(&mut out, n, Some(weight), eps);
    out
}

/// `h ← h + RMSNorm_w(branch)` row by row (`[rows, n]` both).
pub fn add_normed(h: &mut [f32], branch: &[f32], n: usize, weight: &[f32], eps: f64) {
    for_each_row_pair(h, branch, n, |hr, br| {
        let inv = inverse_rms(br, eps);
        for ((hv, &bv), &s) in hr.iter_mut().zip(br).zip(weight) {
            *hv += bv * inv * s;
        }
    });
}

/// `h ← (h + RMSNorm_w(branch)) · scale` row by row.
pub fn add_normed_scaled(
    h: &mut [f32],
    branch: &[f32],
    n: usize,
    weight: &[f32],
    eps: f64,
    scale: f32,
) {
    for_each_row_pair(h, branch, n, |hr, br| {
        let inv = inverse_rms(br, eps);
        for ((hv, &bv), &s) in hr.iter_mut().zip(br).zip(weight) {
            *hv = (*hv + bv * inv * s) * scale;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, random_values};
    use gemma4_reference::rms_norm::rms_norm_rows;
    use ndarray::{Array1, Array2};

    #[test]
    fn rms_norm_matches_reference_with_and_without_weight() {
        // 600 rows: above `PARALLEL_ELEMENTS`, the rows are split over the pool.
        for rows in [5, 600] {
            rms_norm_matches_reference(rows, 67);
        }
    }

    fn rms_norm_matches_reference(rows: usize, n: usize) {
        let x = random_values(rows * n, 1, 3.0);
        let w = random_values(n, 2, 1.0);
        let reference = rms_norm_rows(
            Array2::from_shape_vec((rows, n), x.clone()).unwrap().view(),
            Some(&Array1::from(w.clone())),
            1e-6,
        );
        // Same f32 operations after an f64 sum: equal up to one rounding of the mean (1 ulp).
        assert_close(
            "rms_norm",
            &rms_norm(&x, n, &w, 1e-6),
            reference.as_slice().unwrap(),
            2e-7,
        );
        let mut unweighted = x.clone();
        rms_norm_in_place(&mut unweighted, n, None, 1e-6);
        let reference = rms_norm_rows(
            Array2::from_shape_vec((rows, n), x).unwrap().view(),
            None,
            1e-6,
        );
        assert_close(
            "rms_norm_∅",
            &unweighted,
            reference.as_slice().unwrap(),
            2e-7,
        );
    }

    #[test]
    fn rms_norm_fused_residual_forms_match_unfused() {
        for rows in [3, 900] {
            fused_residual_forms_match_unfused(rows, 40);
        }
    }

    fn fused_residual_forms_match_unfused(rows: usize, n: usize) {
        let h = random_values(rows * n, 3, 1.0);
        let b = random_values(rows * n, 4, 5.0);
        let w = random_values(n, 5, 1.0);
        let normed = rms_norm(&b, n, &w, 1e-6);
        let mut fused = h.clone();
        add_normed(&mut fused, &b, n, &w, 1e-6);
        let unfused: Vec<f32> = h.iter().zip(&normed).map(|(a, b)| a + b).collect();
        assert_close("add_normed", &fused, &unfused, 0.0);
        let mut fused_scaled = h.clone();
        add_normed_scaled(&mut fused_scaled, &b, n, &w, 1e-6, 0.75);
        let unfused_scaled: Vec<f32> = unfused.iter().map(|v| v * 0.75).collect();
        assert_close("add_normed_scaled", &fused_scaled, &unfused_scaled, 0.0);
    }
}
