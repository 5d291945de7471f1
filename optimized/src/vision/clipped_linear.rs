//! Clipped linears of the on-device vision tower (shared spec: multimodal §1.5, §5 item 7).
//!
//! ```text
//! y = clamp( clamp(x, input_min, input_max) · Wᵀ, output_min, output_max )
//! ```
//!
//! Weights as stored ([`Matrix`]), products through [`linear`](crate::linear::linear)/[`linear_group`] on the rayon
//! pool; the clamps are parallel passes over the activations. The products of one input by
//! several linears (q/k/v, gate/up) share one clamped copy of the input when their input bounds
//! agree (k/v and gate/up always do in the released towers) and run as one parallel loop.

use gemma4_reference::vision::clipped_linear::ClipBounds;
use rayon::prelude::*;

use crate::checkpoint::Matrix;
use crate::linear::linear_group;

/// A bias-free linear `[out, in]`, clipped on both sides when it has bounds.
#[derive(Clone, Debug)]
pub struct ClippedLinear {
    /// `[out, in]`, Hugging Face layout, as stored.
    pub weight: Matrix,
    /// `None` on towers without clipped linears.
    pub bounds: Option<ClipBounds>,
}

impl ClippedLinear {
    /// `clamp(clamp(x, in_min, in_max) · Wᵀ, out_min, out_max)`. `x`: `[tokens, in]`, result
    /// `[tokens, out]`.
    pub fn apply(&self, x: &[f32], tokens: usize) -> Vec<f32> {
        ClippedLinear::apply_group(&[self], x, tokens)
            .pop()
            .expect("one output")
    }

    /// [`ClippedLinear::apply`] of each of `linears` (all `[out_i, in]`) to the same `x`
    /// `[tokens, in]`: one `[tokens, out_i]` per linear, the same values as separate calls.
    pub fn apply_group(linears: &[&ClippedLinear], x: &[f32], tokens: usize) -> Vec<Vec<f32>> {
        let input_bounds = |l: &ClippedLinear| l.bounds.map(|b| (b.input_min, b.input_max));
        let mut outputs: Vec<Option<Vec<f32>>> = vec![None; linears.len()];
        // Linears with the same input clamp share one clamped input and one parallel loop.
        for first in 0..linears.len() {
            if outputs[first].is_some() {
                continue;
            }
            let bounds = input_bounds(linears[first]);
            let members: Vec<usize> = (first..linears.len())
                .filter(|&i| outputs[i].is_none() && input_bounds(linears[i]) == bounds)
                .collect();
            let weights: Vec<&Matrix> = members.iter().map(|&i| &linears[i].weight).collect();
            let products = match bounds {
                None => linear_group(x, tokens, &weights),
                Some((lo, hi)) => linear_group(&clamped_copy(x, lo, hi), tokens, &weights),
            };
            for (&i, mut product) in members.iter().zip(products) {
                if let Some(b) = linears[i].bounds {
                    clamp_in_place(&mut product, b.output_min, b.output_max);
                }
                outputs[i] = Some(product);
            }
        }
        outputs
            .into_iter()
            .map(|o| o.expect("every linear computed"))
            .collect()
    }
}

/// `torch.clamp(v, lo, hi)` on every element, in parallel chunks: `min(max(v, lo), hi)`, NaN
/// stays NaN, bounds may be infinite (the reference's `clamp`).
pub fn clamp_in_place(values: &mut [f32], lo: f32, hi: f32) {
    const CHUNK: usize = 16 * 1024;
    values
        .par_chunks_mut(CHUNK)
        .for_each(|chunk| crate::simd::clamp_in_place(chunk, lo, hi));
}

/// A clamped copy of `values` ([`clamp_in_place`] without first copying the input).
pub fn clamped_copy(values: &[f32], lo: f32, hi: f32) -> Vec<f32> {
    const CHUNK: usize = 16 * 1024;
    let mut out = vec![0.0f32; values.len()];
    out.par_chunks_mut(CHUNK)
        .zip(values.par_chunks(CHUNK))
        .for_each(|(out, values)| crate::simd::clamp_into(values, out, lo, hi));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, random_values, row_major, to_array2};
    use gemma4_reference::vision::clipped_linear::ClippedLinear as ReferenceLinear;
    use proptest::prelude::*;

    fn bounds(seed: u64) -> ClipBounds {
        let r = random_values(4, seed, 0.5);
        ClipBounds {
            input_min: -1.0 + r[0],
            input_max: 1.0 + r[1],
            output_min: -0.6 + r[2],
            output_max: 0.6 + r[3],
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Random shapes (1–40 tokens: the skinny and the GEMM kernels), clipped or plain, one
        /// linear and a group of three where two share their input bounds (k/v), against the
        /// reference's `ClippedLinear::apply`. Inputs of amplitude 2 and bounds near ±1 / ±0.6,
        /// so both clamps bite on many elements.
        #[test]
        fn clipped_linear_matches_reference_random_shapes(
            tokens in 1usize..40,
            inputs in 1usize..70,
            outputs in 1usize..50,
            clipped in any::<bool>(),
            seed in 0u64..1000,
        ) {
            let x = random_values(tokens * inputs, seed, 2.0);
            let weights: Vec<Vec<f32>> = (0..3)
                .map(|i| random_values(outputs * inputs, seed + 10 + i, 1.0 / (inputs as f32).sqrt() * 1.7))
                .collect();
            let shared = bounds(seed + 20);
            let own_bounds = [bounds(seed + 21), shared, shared];
            let ours: Vec<ClippedLinear> = (0..3)
                .map(|i| ClippedLinear {
                    weight: Matrix::from_f32(outputs, inputs, weights[i].clone()),
                    bounds: clipped.then_some(own_bounds[i]),
                })
                .collect();
            let references: Vec<ReferenceLinear> = (0..3)
                .map(|i| ReferenceLinear {
                    weight: to_array2(outputs, inputs, &weights[i]),
                    bounds: clipped.then_some(own_bounds[i]),
                })
                .collect();
            let group = ClippedLinear::apply_group(&[&ours[0], &ours[1], &ours[2]], &x, tokens);
            for i in 0..3 {
                let expected = references[i].apply(to_array2(tokens, inputs, &x).view());
                // Same clamps (exact), then f32 dot products of ≤ 69 terms of |w·x| ≤ 0.4 in
                // another summation order: a few ulps of the largest output; a wrong or
                // missing clamp moves outputs by ≥ 1e-2.
                assert_close(&format!("linear {i} (clipped {clipped})"), &group[i], &row_major(&expected), 2e-6);
                assert_close(&format!("single linear {i}"), &ours[i].apply(&x, tokens), &row_major(&expected), 2e-6);
            }
        }
    }

    #[test]
    fn clipped_linear_clamps_input_then_output_nan_kept() {
        let layer = ClippedLinear {
            weight: Matrix::from_f32(2, 2, vec![1.0, 1.0, 2.0, -1.0]),
            bounds: Some(ClipBounds {
                input_min: -1.0,
                input_max: 1.0,
                output_min: -1.5,
                output_max: 1.5,
            }),
        };
        // x = (3, -0.5) → clamped (1, -0.5) → (0.5, 2.5) → clamped (0.5, 1.5)
        assert_eq!(layer.apply(&[3.0, -0.5], 1), vec![0.5, 1.5]);
        let mut v = [f32::NAN, 5.0, -5.0, f32::INFINITY];
        clamp_in_place(&mut v, -1.0, 2.0);
        assert!(v[0].is_nan());
        assert_eq!(&v[1..], &[2.0, -1.0, 2.0]);
    }
}
