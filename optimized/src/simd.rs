//! Hand-written AVX2/FMA kernels, with portable fallbacks (not a model component: the
//! arithmetic under `linear`, `rms_norm` and `attention`).
//!
//! Weights stay in their storage dtype (f32, bf16, f16) and are widened to f32 *in registers*:
//! - bf16 → f32: zero-extend 8 × u16 to 8 × u32 and shift left by 16 (bf16 is the top half of
//!   an f32, so this is exact);
//! - f16 → f32: `vcvtph2ps` (F16C), exact.
//!
//! Every AVX2 function is `#[target_feature(enable = "avx2,fma,f16c")]` and is only called after
//! [`has_avx2`] confirmed the CPU has those features (`is_x86_feature_detected!`); every kernel has
//! a scalar twin used otherwise. Summation order is fixed by the code (never by the thread count),
//! so results are reproducible bit for bit on one machine.

use gemma4_reference::checkpoint::WeightDtype;
use half::{bf16, f16};

/// True when the AVX2 + FMA + F16C kernels may run on this CPU (checked once).
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static DETECTED: OnceLock<bool> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            std::env::var_os("GEMMA4_NO_SIMD").is_none()
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// True when one-token products (decode) use the AVX-512 GEMV (`gemv_avx512`) rather than the
/// AVX2 one: an Intel CPU with AVX-512F (and `GEMMA4_NO_AVX512` unset). Measured on the decode
/// of the E2B-dims checkpoint (`cargo xtask bench`, docs/performance.md): on an Intel Xeon with
/// AMX (512-bit units, 48 KiB L1d) it streams the weights faster than the AVX2 loop; on a Zen 4
/// (512-bit instructions run as two 256-bit halves) the AVX2 loop was the faster one.
pub fn prefers_avx512_gemv() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static DETECTED: OnceLock<bool> = OnceLock::new();
        *DETECTED.get_or_init(|| crate::gemm512::has_avx512() && is_intel())
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the CPU's vendor string (CPUID leaf 0) is `GenuineIntel`.
#[cfg(target_arch = "x86_64")]
fn is_intel() -> bool {
    let leaf = std::arch::x86_64::__cpuid(0);
    let mut vendor = [0u8; 12];
    for (chunk, register) in vendor.chunks_mut(4).zip([leaf.ebx, leaf.edx, leaf.ecx]) {
        chunk.copy_from_slice(&register.to_le_bytes());
    }
    &vendor == b"GenuineIntel"
}

/// An element type a weight can be stored in: f32, bf16 (as raw `u16` bits) or f16.
pub trait Element: Copy + Send + Sync + 'static {
    /// The storage type, for kernels that handle the bits themselves.
    const DTYPE: WeightDtype;
    /// Widens one element to f32 (exact for all three types).
    fn to_f32(self) -> f32;
    /// Loads 8 consecutive elements widened to f32 (unaligned load).
    ///
    /// # Safety
    /// `p..p+8` must be readable and the CPU must support AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl Element for f32 {
    const DTYPE: WeightDtype = WeightDtype::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl Element for bf16 {
    const DTYPE: WeightDtype = WeightDtype::BF16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        let raw = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16))
    }
}

impl Element for f16 {
    const DTYPE: WeightDtype = WeightDtype::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn horizontal_sum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let low = _mm256_castps256_ps128(v);
    let high = _mm256_extractf128_ps(v, 1);
    let sum4 = _mm_add_ps(low, high);
    let sum2 = _mm_add_ps(sum4, _mm_movehl_ps(sum4, sum4));
    let sum1 = _mm_add_ss(sum2, _mm_shuffle_ps(sum2, sum2, 1));
    _mm_cvtss_f32(sum1)
}

/// `Σ_i w[i]·x[i]` with `w` in any storage dtype and `x` in f32 (`w.len() == x.len()`).
pub fn dot<E: Element>(w: &[E], x: &[f32]) -> f32 {
    assert_eq!(w.len(), x.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: features checked; both slices have `len` elements.
        return unsafe { dot_avx2(w.as_ptr(), x.as_ptr(), w.len()) };
    }
    dot_scalar(w, x)
}

fn dot_scalar<E: Element>(w: &[E], x: &[f32]) -> f32 {
    // Eight interleaved partial sums, the same grouping as the AVX2 kernel's lanes.
    let mut lanes = [0.0f32; 8];
    let chunks = w.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            lanes[l] = w[c * 8 + l].to_f32().mul_add(x[c * 8 + l], lanes[l]);
        }
    }
    let mut total: f32 = lanes.iter().sum();
    for i in chunks * 8..w.len() {
        total += w[i].to_f32() * x[i];
    }
    total
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_avx2<E: Element>(w: *const E, x: *const f32, n: usize) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (u, a) in acc.iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(
                E::load8(w.add(i + 8 * u)),
                _mm256_loadu_ps(x.add(i + 8 * u)),
                *a,
            );
        }
        i += 32;
    }
    while i + 8 <= n {
        acc[0] = _mm256_fmadd_ps(E::load8(w.add(i)), _mm256_loadu_ps(x.add(i)), acc[0]);
        i += 8;
    }
    let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut total = horizontal_sum(sum);
    while i < n {
        total += (*w.add(i)).to_f32() * *x.add(i);
        i += 1;
    }
    total
}

/// The skinny matrix product behind decode and small batches:
/// `y[t·y_stride + r − r0] = Σ_i w[r, i]·x[t, i]` for rows `r0..r1` of `w` (`[rows, cols]`,
/// row-major) and `tokens` rows of `x` (`[tokens, cols]`). Each weight row is read from memory
/// once and used for up to four tokens while it sits in L1.
///
/// # Safety
/// `w` holds rows `r0..r1` of `cols` elements; `x` holds `tokens · cols` floats; `y` is valid
/// for writes at every index written above.
pub unsafe fn skinny_rows<E: Element>(
    w: *const E,
    cols: usize,
    rows: std::ops::Range<usize>,
    x: *const f32,
    tokens: usize,
    y: *mut f32,
    y_stride: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if tokens == 1 && prefers_avx512_gemv() {
        gemv_avx512(w, cols, rows, x, y);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        let mut t = 0;
        while t < tokens {
            let group = (tokens - t).min(4);
            let xg = x.add(t * cols);
            let yg = y.add(t * y_stride);
            match group {
                1 => skinny_avx2::<E, 1>(w, cols, rows.clone(), xg, yg, y_stride),
                2 => skinny_avx2::<E, 2>(w, cols, rows.clone(), xg, yg, y_stride),
                3 => skinny_avx2::<E, 3>(w, cols, rows.clone(), xg, yg, y_stride),
                _ => skinny_avx2::<E, 4>(w, cols, rows.clone(), xg, yg, y_stride),
            }
            t += group;
        }
        return;
    }
    for r in rows.clone() {
        let row = std::slice::from_raw_parts(w.add(r * cols), cols);
        for t in 0..tokens {
            let xt = std::slice::from_raw_parts(x.add(t * cols), cols);
            *y.add(t * y_stride + r - rows.start) = dot_scalar(row, xt);
        }
    }
}

/// Bytes ahead of the current position that [`dot_avx512`] prefetches: one core's stream from
/// memory keeps more lines in flight with it (C microbenchmark over 3 GB of bf16 rows, 2
/// threads: 21.0 GB/s without prefetch, 22.0 at 4 KiB ahead, 23.7 at 2 KiB; plain reads 25–26).
#[cfg(target_arch = "x86_64")]
const PREFETCH_AHEAD: usize = 2048;

/// One token's product `y[r − r0] = Σ_i w[r, i]·x[i]` for `r` in `rows`, one row after another,
/// each by [`dot_avx512`] (the rows of a block are contiguous, so its prefetches run on into the
/// next row).
///
/// # Safety
/// As [`skinny_rows`] with one token; the CPU has AVX-512F, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn gemv_avx512<E: Element>(
    w: *const E,
    cols: usize,
    rows: std::ops::Range<usize>,
    x: *const f32,
    y: *mut f32,
) {
    for r in rows.clone() {
        *y.add(r - rows.start) = dot_avx512(w.add(r * cols), x, cols);
    }
}

/// `Σ_i w[i]·x[i]` over `n` elements: four accumulators of 16 lanes (64 elements per step),
/// weights widened exactly in registers, the weights [`PREFETCH_AHEAD`] bytes ahead prefetched.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[inline]
unsafe fn dot_avx512<E: Element>(w: *const E, x: *const f32, n: usize) -> f32 {
    use std::arch::x86_64::*;
    let load16 = |p: *const E| -> __m512 {
        match E::DTYPE {
            WeightDtype::F32 => _mm512_loadu_ps(p as *const f32),
            WeightDtype::BF16 => {
                let raw = _mm256_loadu_si256(p as *const __m256i);
                _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16))
            }
            WeightDtype::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
        }
    };
    let step_bytes = 64 * std::mem::size_of::<E>();
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    while i + 64 <= n {
        let ahead = (w.add(i) as *const i8).wrapping_add(PREFETCH_AHEAD);
        for line in (0..step_bytes).step_by(64) {
            // A prefetch never faults (the address may lie past the rows).
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line));
        }
        for (u, a) in acc.iter_mut().enumerate() {
            *a = _mm512_fmadd_ps(
                load16(w.add(i + 16 * u)),
                _mm512_loadu_ps(x.add(i + 16 * u)),
                *a,
            );
        }
        i += 64;
    }
    while i + 16 <= n {
        acc[0] = _mm512_fmadd_ps(load16(w.add(i)), _mm512_loadu_ps(x.add(i)), acc[0]);
        i += 16;
    }
    let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    let mut total = _mm512_reduce_add_ps(sum);
    while i < n {
        total += (*w.add(i)).to_f32() * *x.add(i);
        i += 1;
    }
    total
}

/// Rows at least this long (elements) are processed four at a time by the one-token kernel.
#[cfg(target_arch = "x86_64")]
const LONG_ROW: usize = 4096;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn skinny_avx2<E: Element, const T: usize>(
    w: *const E,
    cols: usize,
    rows: std::ops::Range<usize>,
    x: *const f32,
    y: *mut f32,
    y_stride: usize,
) {
    use std::arch::x86_64::*;
    let r0 = rows.start;
    let mut rows = rows;
    if T == 1 && cols >= LONG_ROW {
        // One token, long rows: four rows at a time. x of a long row (12288 floats of E2B's
        // double-wide down projection) does not fit in L1; loading each x chunk once for four
        // weight streams instead of once per row measured 1.6x faster on a down projection
        // (11.8 → 19.2 GB/s on one thread), while rows that fit (D = 1536) stream faster with
        // the one-row, four-accumulator loop below.
        while rows.len() >= 4 {
            let r = rows.start;
            let base = [
                w.add(r * cols),
                w.add((r + 1) * cols),
                w.add((r + 2) * cols),
                w.add((r + 3) * cols),
            ];
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i + 8 <= cols {
                let xv = _mm256_loadu_ps(x.add(i));
                for (a, b) in acc.iter_mut().zip(&base) {
                    *a = _mm256_fmadd_ps(E::load8(b.add(i)), xv, *a);
                }
                i += 8;
            }
            let mut totals = [0.0f32; 4];
            for (total, a) in totals.iter_mut().zip(&acc) {
                *total = horizontal_sum(*a);
            }
            while i < cols {
                let xi = *x.add(i);
                for (total, b) in totals.iter_mut().zip(&base) {
                    *total += (*b.add(i)).to_f32() * xi;
                }
                i += 1;
            }
            for (k, total) in totals.iter().enumerate() {
                *y.add(r + k - r0) = *total;
            }
            rows.start += 4;
        }
    }
    for r in rows {
        let row = w.add(r * cols);
        if T == 1 {
            // One token: the dot product's four independent accumulators hide the FMA latency.
            *y.add(r - r0) = dot_avx2(row, x, cols);
            continue;
        }
        // Several tokens: each widened weight vector feeds T accumulators.
        let mut i = 0;
        let mut acc = [_mm256_setzero_ps(); T];
        while i + 8 <= cols {
            let wv = E::load8(row.add(i));
            for (t, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.add(t * cols + i)), *a);
            }
            i += 8;
        }
        let mut totals = [0.0f32; T];
        for t in 0..T {
            totals[t] = horizontal_sum(acc[t]);
        }
        while i < cols {
            let wi = (*row.add(i)).to_f32();
            for (t, total) in totals.iter_mut().enumerate() {
                *total += wi * *x.add(t * cols + i);
            }
            i += 1;
        }
        for (t, total) in totals.iter().enumerate() {
            *y.add(t * y_stride + r - r0) = *total;
        }
    }
}

/// Widens `src` into `dst` (same length): the staging step before an f32 GEMM.
pub fn widen<E: Element>(src: &[E], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: features checked; equal lengths.
        unsafe { widen_avx2(src.as_ptr(), dst.as_mut_ptr(), src.len()) };
        return;
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn widen_avx2<E: Element>(src: *const E, dst: *mut f32, n: usize) {
    use std::arch::x86_64::*;
    let mut i = 0;
    while i + 8 <= n {
        _mm256_storeu_ps(dst.add(i), E::load8(src.add(i)));
        i += 8;
    }
    while i < n {
        *dst.add(i) = (*src.add(i)).to_f32();
        i += 1;
    }
}

/// `Σ x[i]²` accumulated in f64 (each square is exact in f64; only the additions round), the
/// same quantity the reference's RMSNorm computes.
pub fn sum_of_squares_f64(x: &[f32]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: features checked.
        return unsafe { sum_of_squares_avx2(x.as_ptr(), x.len()) };
    }
    x.iter().map(|&v| (v as f64) * (v as f64)).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn sum_of_squares_avx2(x: *const f32, n: usize) -> f64 {
    use std::arch::x86_64::*;
    let mut acc0 = _mm256_setzero_pd();
    let mut acc1 = _mm256_setzero_pd();
    let mut i = 0;
    while i + 8 <= n {
        let a = _mm256_cvtps_pd(_mm_loadu_ps(x.add(i)));
        let b = _mm256_cvtps_pd(_mm_loadu_ps(x.add(i + 4)));
        acc0 = _mm256_fmadd_pd(a, a, acc0);
        acc1 = _mm256_fmadd_pd(b, b, acc1);
        i += 8;
    }
    let sum = _mm256_add_pd(acc0, acc1);
    let mut lanes = [0.0f64; 4];
    _mm256_storeu_pd(lanes.as_mut_ptr(), sum);
    let mut total = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
    while i < n {
        let v = *x.add(i) as f64;
        total += v * v;
        i += 1;
    }
    total
}

/// `y[i] += a · x[i]`, the weighted accumulation of attention values and expert outputs
/// (one rounding per element for the product and one for the sum, like the reference).
pub fn scaled_add(y: &mut [f32], a: f32, x: &[f32]) {
    assert_eq!(y.len(), x.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: features checked; both slices have `len` elements.
        return unsafe { scaled_add_avx2(y.as_mut_ptr(), a, x.as_ptr(), y.len()) };
    }
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// [`scaled_add`], eight lanes at a time (a product rounded, then a sum rounded: not fused).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn scaled_add_avx2(y: *mut f32, a: f32, x: *const f32, n: usize) {
    use std::arch::x86_64::*;
    let av = _mm256_set1_ps(a);
    let mut i = 0;
    while i + 8 <= n {
        let product = _mm256_mul_ps(av, _mm256_loadu_ps(x.add(i)));
        _mm256_storeu_ps(y.add(i), _mm256_add_ps(_mm256_loadu_ps(y.add(i)), product));
        i += 8;
    }
    while i < n {
        *y.add(i) += a * *x.add(i);
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn clamp_matches_the_scalar_clamp_nan_and_infinities_included() {
        let mut x = random(1000, 3);
        for (i, v) in x.iter_mut().enumerate().step_by(37) {
            *v = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.75][i % 4];
        }
        for (lo, hi) in [
            (-0.5, 0.25),
            (f32::NAN, 0.1),
            (-0.1, f32::NAN),
            (-f32::INFINITY, 0.3),
        ] {
            let mut out = vec![0.0; x.len()];
            clamp_into(&x, &mut out, lo, hi);
            let mut in_place = x.clone();
            clamp_in_place(&mut in_place, lo, hi);
            for (i, &v) in x.iter().enumerate() {
                let want = clamp_scalar(v, lo, hi);
                for got in [out[i], in_place[i]] {
                    assert!(
                        got == want || (got.is_nan() && want.is_nan()),
                        "x[{i}] = {v}, bounds [{lo}, {hi}]: got {got}, want {want}"
                    );
                }
            }
        }
        // The scalar rule itself: NaN stays, bounds apply, a NaN bound is no bound.
        assert!(clamp_scalar(f32::NAN, -1.0, 1.0).is_nan());
        assert_eq!(clamp_scalar(5.0, -1.0, 1.0), 1.0);
        assert_eq!(clamp_scalar(-5.0, -1.0, 1.0), -1.0);
        assert_eq!(clamp_scalar(5.0, f32::NAN, f32::NAN), 5.0);
    }

    #[test]
    fn simd_dot_matches_f64_sum_every_dtype() {
        for n in [1, 7, 8, 31, 32, 33, 100, 1536] {
            let x = random(n, 1);
            let w = random(n, 2);
            let exact: f64 = w.iter().zip(&x).map(|(&a, &b)| a as f64 * b as f64).sum();
            let got = dot(&w, &x) as f64;
            // f32 dot of n terms of size <= 1: error <= n * 2^-24 * sum|w x|, bounded by n * 6e-8.
            assert!(
                (got - exact).abs() <= n as f64 * 6e-8 + 1e-7,
                "f32 n={n}: {got} vs {exact}"
            );
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let exact_b: f64 = wb.iter().zip(&x).map(|(a, &b)| a.to_f64() * b as f64).sum();
            let got_b = dot(&wb, &x) as f64;
            assert!(
                (got_b - exact_b).abs() <= n as f64 * 6e-8 + 1e-7,
                "bf16 n={n}: {got_b} vs {exact_b}"
            );
            let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            let exact_h: f64 = wh.iter().zip(&x).map(|(a, &b)| a.to_f64() * b as f64).sum();
            let got_h = dot(&wh, &x) as f64;
            assert!(
                (got_h - exact_h).abs() <= n as f64 * 6e-8 + 1e-7,
                "f16 n={n}: {got_h} vs {exact_h}"
            );
        }
    }

    #[test]
    fn simd_skinny_rows_equal_single_dots() {
        // Every token count 1..=9 (groups of 4 plus remainders), odd widths for the tails, and
        // rows long enough (>= LONG_ROW) for the one-token kernel's four-rows-at-a-time path.
        for (rows, cols) in [(13, 45), (7, 4100)] {
            let w: Vec<bf16> = random(rows * cols, 3)
                .iter()
                .map(|&v| bf16::from_f32(v))
                .collect();
            for tokens in 1..=9 {
                let x = random(tokens * cols, 4 + tokens as u64);
                let mut y = vec![0.0f32; tokens * rows];
                unsafe {
                    skinny_rows(
                        w.as_ptr(),
                        cols,
                        0..rows,
                        x.as_ptr(),
                        tokens,
                        y.as_mut_ptr(),
                        rows,
                    )
                };
                for t in 0..tokens {
                    for r in 0..rows {
                        let expected: f64 = (0..cols)
                            .map(|i| w[r * cols + i].to_f64() * x[t * cols + i] as f64)
                            .sum();
                        let got = y[t * rows + r] as f64;
                        // f32 sums of `cols` products of size <= 1: |error| <= cols · 2^-23.
                        assert!(
                            (got - expected).abs() < cols as f64 * 1.2e-7,
                            "cols={cols} tokens={tokens} y[{t}, {r}] = {got}, expected {expected}"
                        );
                    }
                }
            }
        }
    }

    /// The AVX-512 GEMV (decode on Intel CPUs; run directly here on any AVX-512 CPU) is the f32
    /// dot product of each row for all three weight dtypes, on widths around its 16- and
    /// 64-element steps.
    #[test]
    fn avx512_gemv_matches_f64_sums_every_dtype() {
        if !crate::gemm512::has_avx512() {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        fn check<E: Element>(name: &str, convert: impl Fn(f32) -> E) {
            for (rows, cols) in [
                (3, 1),
                (5, 15),
                (4, 16),
                (3, 63),
                (2, 64),
                (6, 65),
                (3, 130),
                (9, 1537),
            ] {
                let w: Vec<E> = random(rows * cols, 3).iter().map(|&v| convert(v)).collect();
                let x = random(cols, 4);
                let mut y = vec![f32::NAN; rows + 1];
                // SAFETY: AVX-512F checked above (it implies AVX2, FMA and F16C here: has_avx512
                // requires has_avx2); w holds rows × cols, x cols, y rows (+1 left untouched).
                unsafe { gemv_avx512(w.as_ptr(), cols, 0..rows, x.as_ptr(), y.as_mut_ptr()) };
                for r in 0..rows {
                    let expected: f64 = (0..cols)
                        .map(|i| w[r * cols + i].to_f32() as f64 * x[i] as f64)
                        .sum();
                    // f32 sums of `cols` products of size <= 1: |error| <= cols · 2^-23.
                    assert!(
                        (y[r] as f64 - expected).abs() < cols as f64 * 1.2e-7 + 1e-7,
                        "{name} cols={cols}: y[{r}] = {}, expected {expected}",
                        y[r]
                    );
                }
                assert!(y[rows].is_nan(), "{name} cols={cols}: wrote past the rows");
            }
        }
        check("f32", |v| v);
        check("bf16", bf16::from_f32);
        check("f16", f16::from_f32);
    }

    #[test]
    fn simd_widen_bf16_and_f16_are_exact() {
        let values = random(77, 9);
        let b: Vec<bf16> = values.iter().map(|&v| bf16::from_f32(v)).collect();
        let mut out = vec![0.0; 77];
        widen(&b, &mut out);
        for i in 0..77 {
            assert_eq!(out[i], b[i].to_f32(), "bf16 element {i}");
        }
        let h: Vec<f16> = values.iter().map(|&v| f16::from_f32(v)).collect();
        widen(&h, &mut out);
        for i in 0..77 {
            assert_eq!(out[i], h[i].to_f32(), "f16 element {i}");
        }
    }

    #[test]
    fn simd_sum_of_squares_matches_sequential_f64() {
        let x = random(1001, 5);
        let sequential: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let got = sum_of_squares_f64(&x);
        // Two f64 summation orders of n = 1001 positive terms differ by at most n·2^-53 relative.
        assert!(
            ((got - sequential) / sequential).abs() < 1001.0 * 1.2e-16,
            "{got} vs {sequential}"
        );
    }
}

/// `out[i] = gelu_tanh(gate[i]) · up[i]` (GeGLU), vectorised: `tanh(y) = (e^{2y} − 1)/(e^{2y} + 1)`
/// with a Cephes-style `exp` (range reduction by `ln 2`, degree-6 polynomial, ~1 ulp). Against the
/// scalar `f32::tanh` of the reference the GELU differs by at most ~3e-7·max(1, |x|) absolute
/// (unit test); everything downstream compares with relative tolerances far above that.
pub fn geglu(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: features checked; equal lengths.
        unsafe { geglu_avx2(gate.as_mut_ptr(), up.as_ptr(), gate.len()) };
        return;
    }
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = crate::gelu::gelu_tanh(*g) * u;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn geglu_avx2(gate: *mut f32, up: *const f32, n: usize) {
    use std::arch::x86_64::*;
    let mut i = 0;
    while i + 8 <= n {
        let x = _mm256_loadu_ps(gate.add(i));
        let g = gelu8(x);
        _mm256_storeu_ps(gate.add(i), _mm256_mul_ps(g, _mm256_loadu_ps(up.add(i))));
        i += 8;
    }
    while i < n {
        *gate.add(i) = crate::gelu::gelu_tanh(*gate.add(i)) * *up.add(i);
        i += 1;
    }
}

/// `gelu_tanh` of 8 lanes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn gelu8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let half = _mm256_set1_ps(0.5);
    let one = _mm256_set1_ps(1.0);
    // y = √(2/π)·(x + 0.044715·x³), clamped to ±9 (tanh(±9) = ±1 in f32).
    let x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
    let inner = _mm256_fmadd_ps(_mm256_set1_ps(0.044_715), x3, x);
    let y = _mm256_mul_ps(_mm256_set1_ps(0.797_884_6), inner);
    let y = _mm256_max_ps(_mm256_min_ps(y, _mm256_set1_ps(9.0)), _mm256_set1_ps(-9.0));
    let e = exp8(_mm256_add_ps(y, y));
    let t = _mm256_div_ps(_mm256_sub_ps(e, one), _mm256_add_ps(e, one));
    _mm256_mul_ps(_mm256_mul_ps(half, x), _mm256_add_ps(one, t))
}

/// `out[i] = clamp(x[i], lo, hi)` keeping NaN (the clipped linears' and the audio tower's clamps:
/// `x` where it is NaN, else `min(max(x, lo), hi)`, as the reference's `if !x.is_nan()` guard).
/// `out` may be `x` itself (pass the same slice through [`clamp_in_place`]). Vectorised with
/// `maxps`/`minps` in the operand order that returns the activation on a NaN activation and on a
/// NaN bound alike, which is what the scalar `f32::max`/`f32::min` chain does: the same values
/// as the scalar loop (unit test; a zero equal to a zero bound may come out with the other sign). The scalar loop's NaN branch kept the compiler from vectorising
/// it: on the E2B vision tower (fast mode, budget 280) it took 11% of the time (`perf`).
pub fn clamp_into(x: &[f32], out: &mut [f32], lo: f32, hi: f32) {
    assert_eq!(x.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    if crate::gemm512::has_avx512() {
        // SAFETY: features checked; both pointers cover `len` elements.
        return unsafe { clamp_avx512(x.as_ptr(), out.as_mut_ptr(), x.len(), lo, hi) };
    }
    for (o, &v) in out.iter_mut().zip(x) {
        *o = clamp_scalar(v, lo, hi);
    }
}

/// [`clamp_into`] in place.
pub fn clamp_in_place(x: &mut [f32], lo: f32, hi: f32) {
    #[cfg(target_arch = "x86_64")]
    if crate::gemm512::has_avx512() {
        let n = x.len();
        let p = x.as_mut_ptr();
        // SAFETY: features checked; reading and writing the same element in one lane is fine.
        return unsafe { clamp_avx512(p, p, n, lo, hi) };
    }
    for v in x.iter_mut() {
        *v = clamp_scalar(*v, lo, hi);
    }
}

/// One element of [`clamp_into`]: NaN stays NaN.
#[inline(always)]
fn clamp_scalar(v: f32, lo: f32, hi: f32) -> f32 {
    if v.is_nan() {
        v
    } else {
        v.max(lo).min(hi)
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn clamp_avx512(x: *const f32, out: *mut f32, n: usize, lo: f32, hi: f32) {
    use std::arch::x86_64::*;
    let (low, high) = (_mm512_set1_ps(lo), _mm512_set1_ps(hi));
    let mut i = 0;
    while i + 16 <= n {
        // maxps/minps return their second operand when either is NaN: with the activation
        // second, a NaN activation comes through both and a NaN bound leaves it as it is.
        let v = _mm512_loadu_ps(x.add(i));
        _mm512_storeu_ps(out.add(i), _mm512_min_ps(high, _mm512_max_ps(low, v)));
        i += 16;
    }
    while i < n {
        *out.add(i) = clamp_scalar(*x.add(i), lo, hi);
        i += 1;
    }
}

/// `x[i] ← exp(x[i])` for the softmax of attention (arguments `s − max s ≤ 0`): the AVX2
/// Cephes-style `exp8` (within 2 ulp of `f32::exp`, tested) on arguments clamped to
/// `[−87, 88]`: below −87 the result is `e^−87` ≈ 1.6·10⁻³⁸ instead of a smaller denormal or
/// zero, which no softmax sum (at least 1, from its maximum) can register.
pub fn exp_in_place(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: features checked; the pointer covers `len` elements.
        return unsafe { exp_in_place_avx2(x.as_mut_ptr(), x.len()) };
    }
    for v in x.iter_mut() {
        *v = v.clamp(-87.0, 88.0).exp();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_in_place_avx2(x: *mut f32, n: usize) {
    use std::arch::x86_64::*;
    let (low, high) = (_mm256_set1_ps(-87.0), _mm256_set1_ps(88.0));
    let mut i = 0;
    while i + 8 <= n {
        // Operand order keeps a NaN (maxps/minps return the second operand on NaN), so a NaN
        // score still poisons its softmax row instead of weighing e^−87.
        let v = _mm256_min_ps(high, _mm256_max_ps(low, _mm256_loadu_ps(x.add(i))));
        _mm256_storeu_ps(x.add(i), exp8(v));
        i += 8;
    }
    while i < n {
        *x.add(i) = (*x.add(i)).clamp(-87.0, 88.0).exp();
        i += 1;
    }
}

/// `w_j = exp(s_j − max s) / Σ exp(s − max s)` in place (the softmax of attention rows). The
/// maximum ignores NaN scores as `f32::max` does (a NaN score still makes its row NaN through its
/// own `exp` and the sum); the `exp` is [`exp_in_place`]'s; the sum runs in 8 interleaved partial
/// sums (AVX2) instead of key order, which moves it by a few ulp at most (the reference sums in
/// key order; the engines agree to f32 rounding, not bit for bit). On a [64, 2304] vision score
/// block the scalar passes (max, subtract, sum, divide) took about 11% of the tower's time
/// (`perf`), as much as the `exp`.
pub fn softmax_in_place(scores: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::gemm512::has_avx512() {
        // SAFETY: features checked; the pointer covers `len` elements.
        return unsafe { softmax_avx512(scores.as_mut_ptr(), scores.len()) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: features checked; the pointer covers `len` elements.
        return unsafe { softmax_avx2(scores.as_mut_ptr(), scores.len()) };
    }
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for s in scores.iter_mut() {
        *s = (*s - max).clamp(-87.0, 88.0).exp();
    }
    let total: f32 = scores.iter().sum();
    for s in scores.iter_mut() {
        *s /= total;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_avx2(x: *mut f32, n: usize) {
    use std::arch::x86_64::*;
    // Maximum: `maxps(v, m)` returns `m` when `v` is NaN, so NaN scores are skipped.
    let mut max = _mm256_set1_ps(f32::NEG_INFINITY);
    let mut i = 0;
    while i + 8 <= n {
        max = _mm256_max_ps(_mm256_loadu_ps(x.add(i)), max);
        i += 8;
    }
    let mut lanes = [0.0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), max);
    let mut m = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    while i < n {
        m = m.max(*x.add(i));
        i += 1;
    }
    // exp(s − max), clamped as in `exp_in_place_avx2`, summed in 8 lanes.
    let (low, high, shift) = (
        _mm256_set1_ps(-87.0),
        _mm256_set1_ps(88.0),
        _mm256_set1_ps(m),
    );
    let mut sum = _mm256_setzero_ps();
    i = 0;
    while i + 8 <= n {
        let v = _mm256_sub_ps(_mm256_loadu_ps(x.add(i)), shift);
        let e = exp8(_mm256_min_ps(high, _mm256_max_ps(low, v)));
        _mm256_storeu_ps(x.add(i), e);
        sum = _mm256_add_ps(sum, e);
        i += 8;
    }
    _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
    let mut total: f32 = lanes.iter().sum();
    while i < n {
        let e = (*x.add(i) - m).clamp(-87.0, 88.0).exp();
        *x.add(i) = e;
        total += e;
        i += 1;
    }
    // Division (not a multiplication by 1/total): the reference's rounding per element.
    let divisor = _mm256_set1_ps(total);
    i = 0;
    while i + 8 <= n {
        _mm256_storeu_ps(x.add(i), _mm256_div_ps(_mm256_loadu_ps(x.add(i)), divisor));
        i += 8;
    }
    while i < n {
        *x.add(i) /= total;
        i += 1;
    }
}

/// [`softmax_in_place`] on 16 lanes: the same steps as `softmax_avx2` (maximum skipping NaN,
/// clamped `exp` — [`exp16`], the same polynomial — summed in 16 partial sums, then a division),
/// at twice the width: the softmax was 14% of the fast vision tower's time on 8 lanes (`perf`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_avx512(x: *mut f32, n: usize) {
    use std::arch::x86_64::*;
    let total = exp_shifted_in_place_avx512(x, n);
    let divisor = _mm512_set1_ps(total);
    let mut i = 0;
    while i + 16 <= n {
        _mm512_storeu_ps(x.add(i), _mm512_div_ps(_mm512_loadu_ps(x.add(i)), divisor));
        i += 16;
    }
    while i < n {
        *x.add(i) /= total;
        i += 1;
    }
}

/// `x ← silu(x) = x / (1 + e^{−x})` on every element (the audio tower's Swish), with
/// `exp16` on AVX-512 (the scalar `expf` loop was 17% of the fast audio tower's time, `perf`):
/// within 3 ulp of the reference's scalar form (`exp` within 2 ulp, the division exact) on
/// `−x ∈ [−87, 88]`; beyond, the argument is clamped, which changes results by less than 1e-36
/// absolute (`x·e^{x}` for x < −88 is that small; for x > 87, `1 + e^{−87}` is 1 as in the
/// reference). A NaN stays NaN; −∞ gives NaN as in the reference.
pub fn silu_in_place(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::gemm512::has_avx512() {
        // SAFETY: features checked; the pointer covers `len` elements.
        return unsafe { silu_avx512(x.as_mut_ptr(), x.len()) };
    }
    for v in x.iter_mut() {
        *v /= 1.0 + (-*v).exp();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn silu_avx512(x: *mut f32, n: usize) {
    use std::arch::x86_64::*;
    let (low, high, one) = (
        _mm512_set1_ps(-87.0),
        _mm512_set1_ps(88.0),
        _mm512_set1_ps(1.0),
    );
    let mut i = 0;
    while i + 16 <= n {
        let v = _mm512_loadu_ps(x.add(i));
        // −v clamped; the operand order keeps a NaN (it then propagates through the division).
        let minus = _mm512_min_ps(
            high,
            _mm512_max_ps(low, _mm512_sub_ps(_mm512_setzero_ps(), v)),
        );
        let e = exp16(minus);
        let y = _mm512_div_ps(v, _mm512_add_ps(one, e));
        // −∞ gives NaN in the reference (−∞ / (1 + ∞)); the clamp would give −∞.
        let minus_infinity = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(v, _mm512_set1_ps(f32::NEG_INFINITY));
        let y = _mm512_mask_mov_ps(y, minus_infinity, _mm512_set1_ps(f32::NAN));
        _mm512_storeu_ps(x.add(i), y);
        i += 16;
    }
    while i < n {
        *x.add(i) /= 1.0 + (-*x.add(i)).exp();
        i += 1;
    }
}

/// The first steps of a softmax on 16 lanes, shared by `softmax_avx512` and the fast vision
/// attention's `gemm512::softmax_row_to_bf16`: `x[i] ← exp(x[i] − max x)` (the maximum skips
/// NaN scores; arguments clamped to [−87, 88] as in `exp_in_place`), returning the sum of the
/// new values (16 partial sums, then the tail in order).
///
/// # Safety
/// `x` is valid for reads and writes of `n` floats; the CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn exp_shifted_in_place_avx512(x: *mut f32, n: usize) -> f32 {
    use std::arch::x86_64::*;
    let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut i = 0;
    while i + 16 <= n {
        // `maxps(v, m)` returns `m` when `v` is NaN.
        max = _mm512_max_ps(_mm512_loadu_ps(x.add(i)), max);
        i += 16;
    }
    let mut lanes = [0.0f32; 16];
    _mm512_storeu_ps(lanes.as_mut_ptr(), max);
    let mut m = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    while i < n {
        m = m.max(*x.add(i));
        i += 1;
    }
    let (low, high, shift) = (
        _mm512_set1_ps(-87.0),
        _mm512_set1_ps(88.0),
        _mm512_set1_ps(m),
    );
    let mut sum = _mm512_setzero_ps();
    i = 0;
    while i + 16 <= n {
        let v = _mm512_sub_ps(_mm512_loadu_ps(x.add(i)), shift);
        let e = exp16(_mm512_min_ps(high, _mm512_max_ps(low, v)));
        _mm512_storeu_ps(x.add(i), e);
        sum = _mm512_add_ps(sum, e);
        i += 16;
    }
    _mm512_storeu_ps(lanes.as_mut_ptr(), sum);
    let mut total: f32 = lanes.iter().sum();
    while i < n {
        let e = (*x.add(i) - m).clamp(-87.0, 88.0).exp();
        *x.add(i) = e;
        total += e;
        i += 1;
    }
    total
}

/// [`exp8`] on 16 lanes (the same reduction and polynomial; the power of two by `vscalefps`).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn exp16(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let r2 = _mm512_mul_ps(r, r);
    let p = _mm512_add_ps(_mm512_fmadd_ps(p, r2, r), _mm512_set1_ps(1.0));
    // p · 2ⁿ in one `vscalefps` (n is integral and 2ⁿ normal for x in [−87, 88]: the same
    // product as building 2ⁿ's exponent bits and multiplying, in one instruction instead of four).
    _mm512_scalef_ps(p, n)
}

/// `exp` of 8 lanes for x in [−87, 88] (Cephes `expf`: x = n·ln2 + r, e^r by polynomial, 2^n by
/// exponent arithmetic, 2^n a normal number).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn exp8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let n = _mm256_round_ps(
        _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
    );
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm256_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let r2 = _mm256_mul_ps(r, r);
    let p = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
    let pow2n = _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
        23,
    ));
    _mm256_mul_ps(p, pow2n)
}

#[cfg(test)]
mod geglu_tests {
    use super::*;

    /// The softmax on every path this CPU has (AVX-512, AVX2, scalar) against the f64
    /// definition, for lengths around the 8- and 16-lane blocks and a vision row of 2304 keys,
    /// and a NaN score poisoning its row on every path.
    #[test]
    fn softmax_matches_the_f64_definition_on_every_path() {
        type Softmax = fn(&mut [f32]);
        let mut paths: Vec<(&str, Softmax)> = vec![("scalar", |x: &mut [f32]| {
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            for s in x.iter_mut() {
                *s = (*s - max).clamp(-87.0, 88.0).exp();
            }
            let total: f32 = x.iter().sum();
            x.iter_mut().for_each(|s| *s /= total);
        })];
        paths.push(("dispatch", softmax_in_place));
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            paths.push(("AVX2", |x: &mut [f32]| unsafe {
                softmax_avx2(x.as_mut_ptr(), x.len())
            }));
        }
        #[cfg(target_arch = "x86_64")]
        if crate::gemm512::has_avx512() {
            paths.push(("AVX-512", |x: &mut [f32]| unsafe {
                softmax_avx512(x.as_mut_ptr(), x.len())
            }));
        }
        for n in [1usize, 5, 8, 15, 16, 17, 33, 100, 2304] {
            // Scores up to ±12 (peaked rows, weights down to e⁻²⁴).
            let scores = crate::testing::random_values(n, n as u64, 12.0);
            let max = scores
                .iter()
                .copied()
                .fold(f64::NEG_INFINITY, |m, s| m.max(s as f64));
            let exps: Vec<f64> = scores.iter().map(|&s| (s as f64 - max).exp()).collect();
            let total: f64 = exps.iter().sum();
            for (name, softmax) in &paths {
                let mut got = scores.clone();
                softmax(&mut got);
                for (i, (&g, e)) in got.iter().zip(&exps).enumerate() {
                    let expected = e / total;
                    // Each exp within 2 ulp (2.4e-7 relative), the division 0.5 ulp, and the
                    // sum of n terms in partial sums at most n·2⁻²⁴ relative (6e-8·n).
                    let bound = expected * (4e-7 + 6e-8 * n as f64);
                    assert!(
                        (g as f64 - expected).abs() <= bound,
                        "{name} softmax, n = {n}: w[{i}] = {g}, f64 {expected}"
                    );
                }
                let mut poisoned = scores.clone();
                poisoned[n / 2] = f32::NAN;
                softmax(&mut poisoned);
                assert!(
                    poisoned.iter().all(|w| w.is_nan()),
                    "{name}, n = {n}: a NaN score must poison the row"
                );
            }
        }
    }

    /// `silu_in_place` against the reference's scalar `x / (1 + e^{−x})` over −100..100 (the
    /// clamped ends included), every length mod 16 (the vector tail), and NaN.
    #[test]
    fn silu_matches_the_scalar_form_within_3_ulp() {
        let reference = |x: f32| x / (1.0 + (-x).exp());
        let mut x: Vec<f32> = (0..20_011).map(|i| -100.0 + i as f32 * 0.01).collect();
        x.extend([f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 1e-30, -1e-30]);
        let mut got = x.clone();
        silu_in_place(&mut got);
        for (i, (&g, &v)) in got.iter().zip(&x).enumerate() {
            let e = reference(v);
            // 3 ulp: exp within 2, the division 0.5, the sum 1 + e^{−x} 0.5 (relative to the
            // result); beyond the clamp (|x| > 87) the difference is below 1e-36 absolute.
            let ok = g == e
                || (g - e).abs() <= 3.0 * f32::EPSILON * e.abs() + 1e-36
                || (g.is_nan() && e.is_nan());
            assert!(ok, "silu({v}) = {g}, reference {e} (element {i})");
        }
        for len in [16, 5] {
            let mut nan = vec![1.0f32; len];
            nan[2] = f32::NAN;
            silu_in_place(&mut nan);
            assert!(nan[2].is_nan() && nan[0].is_finite());
        }
    }

    #[test]
    fn simd_exp_matches_libm_within_2_ulp() {
        // Softmax arguments: 0 down to −87, plus a few below (clamped) and a tail of 5 lanes.
        let mut x: Vec<f32> = (0..20_003).map(|i| -(i as f32) * 87.0 / 20_000.0).collect();
        x.extend([-87.5, -100.0, -1e30, f32::NEG_INFINITY, 1.5, 88.0]);
        let mut ours = x.clone();
        exp_in_place(&mut ours);
        // A NaN stays NaN, in a vector lane and in the scalar tail.
        for len in [8, 3] {
            let mut nan = vec![-1.0f32; len];
            nan[1] = f32::NAN;
            exp_in_place(&mut nan);
            assert!(nan[1].is_nan() && nan[0].is_finite(), "{nan:?}");
        }
        for (i, (&got, &v)) in ours.iter().zip(&x).enumerate() {
            let expected = v.max(-87.0).exp();
            // 2 ulp (2 · 2⁻²³ relative): Cephes' polynomial is within 1 ulp of e^r, the
            // reduction and the final product add at most one more rounding.
            assert!(
                (got - expected).abs() <= 2.0 * f32::EPSILON * expected,
                "exp({v}) = {got}, libm {expected} (lane {i})"
            );
        }
    }

    #[test]
    fn simd_geglu_matches_reference_gelu_within_3e_7() {
        let n = 4003;
        let gate: Vec<f32> = (0..n).map(|i| (i as f32 - 2000.0) * 0.006).collect(); // [-12, 12]
        let up: Vec<f32> = (0..n).map(|i| 1.0 + (i % 7) as f32 * 0.1).collect();
        let mut ours = gate.clone();
        geglu(&mut ours, &up);
        for i in 0..n {
            let expected = gemma4_reference::gelu::gelu_tanh(gate[i]) * up[i];
            let bound = 3e-7 * gate[i].abs().max(1.0) * up[i];
            assert!(
                (ours[i] - expected).abs() <= bound,
                "x = {}: geglu {} vs reference {} (|Δ| = {:.3e} > {bound:.3e})",
                gate[i],
                ours[i],
                expected,
                (ours[i] - expected).abs()
            );
        }
    }
}
