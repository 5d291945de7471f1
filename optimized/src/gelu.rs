//! GELU with the tanh approximation (shared spec: text, notation), and the fused GeGLU.
//!
//! `gelu_tanh(x) = 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`. The scalar [`gelu_tanh`] is the
//! reference's f32 expression (bit for bit); the GeGLU used on whole rows ([`geglu_in_place`],
//! `simd::geglu`) computes `tanh` from a vectorised `exp` and stays within 3e-7·max(1, |x|) of it.

/// `gelu_tanh(x)`.
#[inline]
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)).tanh())
}

/// GeGLU, fused: `out[i] = gelu_tanh(gate[i]) · up[i]`, written over `gate` (vectorised:
/// `simd::geglu`, within 3e-7 of the scalar form), in parallel chunks.
pub fn geglu_in_place(gate: &mut [f32], up: &[f32]) {
    use rayon::prelude::*;
    const CHUNK: usize = 4096;
    gate.par_chunks_mut(CHUNK)
        .zip(up.par_chunks(CHUNK))
        .for_each(|(g, u)| crate::simd::geglu(g, u));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_tanh_matches_reference_bitwise() {
        for i in -400..400 {
            let x = i as f32 * 0.037;
            assert_eq!(
                gelu_tanh(x).to_bits(),
                gemma4_reference::gelu::gelu_tanh(x).to_bits(),
                "gelu_tanh({x})"
            );
        }
    }
}
