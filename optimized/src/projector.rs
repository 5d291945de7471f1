//! The projector of soft tokens into the text model (Hugging Face `Gemma4MultimodalEmbedder`;
//! shared spec: multimodal §1.7, §5 item 6).
//!
//! ```text
//! soft_text = RMSNorm_∅(soft) · embedding_projectionᵀ        [S, Dt]
//! ```
//!
//! A weight-free RMSNorm over the tower's width (in place, parallel rows), then a bias-free
//! linear into the text width on the weights as stored. Soft tokens are **not** multiplied by
//! `√Dt`.

use crate::checkpoint::Matrix;
use crate::linear::linear;
use crate::rms_norm::rms_norm_in_place;

/// Projects soft tokens `soft` (`[S, Dv]`, row-major) into the text model: returns `[S, Dt]`.
/// `projection`: `embedding_projection.weight` `[Dt, Dv]`; `eps`: the tower's RMSNorm ε.
pub fn project_soft_tokens(soft: &[f32], tokens: usize, projection: &Matrix, eps: f64) -> Vec<f32> {
    let mut normed = soft.to_vec();
    rms_norm_in_place(&mut normed, projection.cols, None, eps);
    linear(&normed, tokens, projection)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, random_values, row_major, to_array2};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Random soft-token counts (1–40: skinny and GEMM products) and widths, soft tokens of
        /// the magnitude pooling gives them (× √Dv), against the reference's projector.
        #[test]
        fn projector_matches_reference_random_shapes(
            tokens in 1usize..40,
            vision_width in 1usize..64,
            text_width in 1usize..48,
            seed in 0u64..1000,
        ) {
            let soft = random_values(tokens * vision_width, seed, 20.0);
            let weight = random_values(text_width * vision_width, seed + 1, 1.7 / (vision_width as f32).sqrt());
            let got = project_soft_tokens(&soft, tokens, &Matrix::from_f32(text_width, vision_width, weight.clone()), 1e-6);
            let expected = gemma4_reference::projector::project_soft_tokens(
                &to_array2(tokens, vision_width, &soft),
                &to_array2(text_width, vision_width, &weight),
                1e-6,
            );
            // The norm is the reference's to 1 ulp; the product sums ≤ 63 terms in another
            // order: a few ulps of the ≈ 1 outputs. A missing norm scales outputs by ~10, a
            // √Dt scale by ≥ 1.
            assert_close("projector", &got, &row_major(&expected), 2e-6);
        }
    }
}
