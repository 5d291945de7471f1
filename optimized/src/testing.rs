//! Helpers for the unit tests that compare each optimized function with its reference twin.

use ndarray::Array2;

/// `n` values uniform in `[-amplitude, amplitude)`, reproducible from `seed`.
pub fn random_values(n: usize, seed: u64, amplitude: f32) -> Vec<f32> {
    crate::synthetic::random_values(n, seed, amplitude)
}

/// A row-major buffer as an `[rows, cols]` array.
pub fn to_array2(rows: usize, cols: usize, values: &[f32]) -> Array2<f32> {
    Array2::from_shape_vec((rows, cols), values.to_vec()).expect("rows·cols values")
}

/// Asserts `max|got − expected| ≤ tolerance · max|expected|` (0 demands bit equality of values),
/// naming the worst element and both values.
pub fn assert_close(what: &str, got: &[f32], expected: &[f32], tolerance: f32) {
    assert_eq!(got.len(), expected.len(), "{what}: lengths differ");
    let scale = expected.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let (mut worst, mut at) = (0.0f32, 0);
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        let error = (g - e).abs();
        if error > worst || error.is_nan() {
            worst = error;
            at = i;
        }
    }
    assert!(
        worst <= tolerance * scale && !worst.is_nan(),
        "{what}: element {at} differs by {worst:.3e} (relative to max|expected| = {scale:.3e}: {:.3e} > tolerance {tolerance:.1e}): got {}, expected {}",
        worst / scale,
        got[at],
        expected[at]
    );
}
