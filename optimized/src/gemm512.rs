//! The prefill matrix product on AVX-512: `y[T, N] = x[T, K] · W[N, K]ᵀ`, with the weights as
//! stored (bf16, f16 or f32) and no separate widening pass (not a model component: the arithmetic
//! under `linear` for more than `SKINNY_MAX_TOKENS` token rows).
//!
//! Structure (BLIS-like, sized for Zen 4: 32 KiB L1d, 1 MiB L2 per core):
//! - the weight rows of one task are cut into **panels of [`NR`] = 48 rows** and the reduction
//!   axis into **chunks of [`KC`] columns**; each (panel, chunk) is *packed* once into a per-thread
//!   buffer, transposed to `[k][48]` so that one `k` step of the kernel reads three consecutive
//!   zmm vectors. Packing widens bf16/f16 to f32 on the way (16 × 16 in-register transposes), so
//!   the weights are read from memory once per chunk and never exist as f32 outside the
//!   L2-resident pack buffer;
//! - the **micro-kernel** holds an `[MR = 8 tokens] × [48 rows]` tile of `y` in 24 zmm
//!   accumulators; per `k` it loads three weight vectors and broadcasts eight activations from
//!   `x` (row-major, read in place: `x` is never packed), 24 FMAs. It is FMA-bound: the loads fit
//!   the load ports with room to spare.
//!
//! Exactness: every `y[t, n]` is one f32 FMA chain over `k = 0, 1, …, K−1` in order, starting from
//! 0 (the chain is stored to `y` and reloaded between `k` chunks, which is exact). Weights are
//! widened exactly. So the result depends neither on the blocking nor on the thread count, and
//! it is the plain sequential f32 dot product of each row — no rounding other than f32 FMA.
//!
//! The opt-in **bf16 mode** ([`gemm_rows_bf16`], `Precision::Bf16Activations`) replaces the FMAs
//! by `vdpbf16ps` (AVX-512 BF16): two bf16 products per lane per instruction, twice the f32
//! rate, on activations rounded to bf16 (round to nearest even). The weights must be bf16
//! (they are then used exactly). The packing keeps bf16 pairs `(W[n, 2j], W[n, 2j+1])` together
//! as one 32-bit lane, `[k/2][48]`. Each `y[t, n]` is still one fixed chain (pairs in order), so
//! this mode is deterministic across thread counts too, but it is *not* the reference's
//! arithmetic: activations carry a relative error up to 2⁻⁸ (see `docs/performance.md`).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;
use std::cell::RefCell;

use gemma4_reference::checkpoint::WeightDtype;

use crate::simd::Element;

/// Output rows (weight rows) per packed panel: three zmm vectors.
pub const NR: usize = 48;
/// Tokens per micro-tile: one broadcast each per `k` step.
pub const MR: usize = 8;
/// Reduction columns per packed chunk (a panel chunk is `KC · NR · 4` = 48 KiB).
pub const KC: usize = 512;

/// Calls `kernel::<M>(args)` with the tile height `m` (1..=8) as the const generic `M`.
macro_rules! with_tile_height {
    ($m:expr, $kernel:ident($($arg:expr),* $(,)?)) => {
        match $m {
            8 => $kernel::<8>($($arg),*),
            7 => $kernel::<7>($($arg),*),
            6 => $kernel::<6>($($arg),*),
            5 => $kernel::<5>($($arg),*),
            4 => $kernel::<4>($($arg),*),
            3 => $kernel::<3>($($arg),*),
            2 => $kernel::<2>($($arg),*),
            _ => $kernel::<1>($($arg),*),
        }
    };
}

/// True when the AVX-512 (F) kernels may run (checked once; `GEMMA4_NO_AVX512` or
/// `GEMMA4_NO_SIMD` in the environment turn them off).
pub fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static DETECTED: OnceLock<bool> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            std::env::var_os("GEMMA4_NO_AVX512").is_none()
                && crate::simd::has_avx2()
                && is_x86_feature_detected!("avx512f")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// True when the AVX-512 BF16 kernel (`vdpbf16ps`) may run (implies [`has_avx512`]).
pub fn has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static DETECTED: OnceLock<bool> = OnceLock::new();
        *DETECTED.get_or_init(|| has_avx512() && is_x86_feature_detected!("avx512bf16"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

thread_local! {
    /// Per-thread pack buffer: one panel chunk, `[KC][NR]` f32 (or `[KC/2][NR]` bf16 pairs).
    static PACK: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// `y[t·y_stride + (r − rows.start)] = Σ_k W[r, k]·x[t, k]` for `r` in `rows`, `t < tokens`,
/// in f32 (exact widening, one sequential FMA chain per element).
///
/// # Safety
/// `w` holds rows `rows` of `cols` elements (row-major, row stride `cols`); `x` holds
/// `tokens · cols` floats; `y` is valid for writes at every index written above; the CPU has
/// AVX-512F ([`has_avx512`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub unsafe fn gemm_rows_f32<E: Element>(
    w: *const E,
    cols: usize,
    rows: std::ops::Range<usize>,
    x: *const f32,
    tokens: usize,
    y: *mut f32,
    y_stride: usize,
) {
    PACK.with(|pack| {
        let mut pack = pack.borrow_mut();
        pack.resize(KC * NR, 0);
        let packed = pack.as_mut_ptr() as *mut f32;
        for_each_panel_chunk(
            w as *const u8,
            cols,
            std::mem::size_of::<E>(),
            1,
            &rows,
            KC,
            tokens,
            |r0, n, k0, kc| pack_f32(w, cols, r0, n, k0, kc, packed),
            |t, m, r0, k0, kc, masks| {
                let a = x.add(t * cols + k0);
                let c = y.add(t * y_stride + (r0 - rows.start));
                with_tile_height!(m, tile_f32(kc, packed, a, cols, c, y_stride, k0 > 0, masks));
            },
        );
    });
}

/// The loop both packed GEMMs share: for each panel of at most `NR` weight rows of `rows` and
/// each chunk of at most `chunk` reduction steps, `pack(r0, n, k0, kc)`, then
/// `tile(t, m, r0, k0, kc, masks)` for each tile of `m ≤ MR` tokens from token `t`, while the
/// next chunk's weights are prefetched into L2. A step is `elements_per_step` weight elements of
/// `element_bytes` each (f32 kernel: one element of any dtype; bf16 kernel: a pair).
///
/// # Safety
/// `w` holds rows `rows` of `cols` elements of `element_bytes`; `pack` and `tile` are safe to
/// call with the arguments given.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn for_each_panel_chunk(
    w: *const u8,
    cols: usize,
    element_bytes: usize,
    elements_per_step: usize,
    rows: &std::ops::Range<usize>,
    chunk: usize,
    tokens: usize,
    mut pack: impl FnMut(usize, usize, usize, usize),
    mut tile: impl FnMut(usize, usize, usize, usize, usize, [u16; 3]),
) {
    let steps = cols.div_ceil(elements_per_step);
    let mut r0 = rows.start;
    while r0 < rows.end {
        let n = (rows.end - r0).min(NR);
        let masks = lane_masks(n);
        let mut k0 = 0;
        while k0 < steps {
            let kc = (steps - k0).min(chunk);
            pack(r0, n, k0, kc);
            let next = next_chunk(
                rows,
                r0,
                k0 * elements_per_step,
                cols,
                chunk * elements_per_step,
            );
            let mut prefetch = Prefetch::new(w, cols * element_bytes, next, element_bytes, tokens);
            let mut t = 0;
            while t < tokens {
                prefetch.step();
                tile(t, (tokens - t).min(MR), r0, k0, kc, masks);
                t += MR;
            }
            prefetch.finish();
            k0 += chunk;
        }
        r0 += NR;
    }
}

/// The chunk after (`r0`, `k0`) in the loop order of the kernels (`k` chunks of `kc` within a
/// panel, then the next panel of `rows`): `(first row, rows, first column, columns)`, in
/// elements; `None` after the last.
fn next_chunk(
    rows: &std::ops::Range<usize>,
    r0: usize,
    k0: usize,
    cols: usize,
    kc: usize,
) -> Option<(usize, usize, usize, usize)> {
    if k0 + kc < cols {
        Some((
            r0,
            (rows.end - r0).min(NR),
            k0 + kc,
            (cols - k0 - kc).min(kc),
        ))
    } else if r0 + NR < rows.end {
        Some((r0 + NR, (rows.end - r0 - NR).min(NR), 0, cols.min(kc)))
    } else {
        None
    }
}

/// Software prefetch (to L2) of one chunk of weight rows, spread over the token tiles that
/// compute the previous chunk: the next chunk's 48 short row segments are too many concurrent
/// streams for the hardware prefetchers, and packing them straight from DRAM cost ~8% of the
/// GEMM.
struct Prefetch {
    /// First byte of the chunk's first row.
    start: *const u8,
    row_bytes: usize,
    rows: usize,
    lines_per_row: usize,
    /// Next line to fetch: (row, line within the row).
    row: usize,
    line: usize,
    per_step: usize,
}

impl Prefetch {
    fn new(
        base: *const u8,
        row_bytes: usize,
        chunk: Option<(usize, usize, usize, usize)>,
        element_bytes: usize,
        tokens: usize,
    ) -> Prefetch {
        let (r, rows, first, len) = chunk.map_or((0, 0, 0, 0), |(r, n, k, kc)| {
            (r, n, k * element_bytes, kc * element_bytes)
        });
        let lines_per_row = (first + len).div_ceil(64) - first / 64;
        Prefetch {
            start: base.wrapping_add(r * row_bytes + first / 64 * 64),
            row_bytes,
            rows,
            lines_per_row,
            row: 0,
            line: 0,
            per_step: (rows * lines_per_row).div_ceil(tokens.div_ceil(MR).max(1)),
        }
    }

    /// Issues the next share of prefetches.
    #[inline]
    fn step(&mut self) {
        self.issue(self.per_step);
    }

    /// Issues whatever is left.
    fn finish(&mut self) {
        self.issue(usize::MAX);
    }

    #[inline]
    fn issue(&mut self, count: usize) {
        #[cfg(target_arch = "x86_64")]
        for _ in 0..count {
            if self.row >= self.rows {
                return;
            }
            let address = self
                .start
                .wrapping_add(self.row * self.row_bytes + self.line * 64);
            // SAFETY: a prefetch never faults (and the address is inside the weight rows).
            unsafe { _mm_prefetch::<_MM_HINT_T1>(address as *const i8) };
            self.line += 1;
            if self.line == self.lines_per_row {
                self.line = 0;
                self.row += 1;
            }
        }
    }
}

/// Like [`gemm_rows_f32`] for bf16 weights, on activations `xb` already rounded to bf16 and
/// stored as pairs: `xb[t·kp + j]` = `(x[t, 2j], x[t, 2j+1])` as one `u32` (low half first),
/// `kp = ⌈cols/2⌉`, an odd `cols` padded with a zero. Products are exact, sums are f32
/// (`vdpbf16ps`: two products added in turn per lane, denormals flushed).
///
/// # Safety
/// As [`gemm_rows_f32`]; `xb` holds `tokens · kp` pairs; the CPU has AVX-512 BF16
/// ([`has_avx512_bf16`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx2,fma,f16c")]
pub unsafe fn gemm_rows_bf16(
    w: *const half::bf16,
    cols: usize,
    rows: std::ops::Range<usize>,
    xb: *const u32,
    tokens: usize,
    y: *mut f32,
    y_stride: usize,
) {
    let kp = cols.div_ceil(2);
    PACK.with(|pack| {
        let mut pack = pack.borrow_mut();
        pack.resize(KC / 2 * NR, 0);
        let packed = pack.as_mut_ptr();
        for_each_panel_chunk(
            w as *const u8,
            cols,
            2,
            2,
            &rows,
            KC / 2,
            tokens,
            |r0, n, k0, kc| pack_pairs(w as *const u16, cols, r0, n, k0, kc, packed),
            |t, m, r0, k0, kc, masks| {
                let a = xb.add(t * kp + k0);
                let c = y.add(t * y_stride + (r0 - rows.start));
                with_tile_height!(m, tile_bf16(kc, packed, a, kp, c, y_stride, k0 > 0, masks));
            },
        );
    });
}

/// Rounds `x` (`[tokens, cols]`) to bf16 pairs for [`gemm_rows_bf16`]: `out` gets
/// `tokens · ⌈cols/2⌉` words.
///
/// # Safety
/// The CPU has AVX-512 BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
pub unsafe fn round_to_bf16_pairs(x: &[f32], tokens: usize, cols: usize, out: &mut Vec<u32>) {
    let kp = cols.div_ceil(2);
    out.clear();
    out.resize(tokens * kp, 0);
    for t in 0..tokens {
        let row = x.as_ptr().add(t * cols);
        let dst = out.as_mut_ptr().add(t * kp) as *mut u16;
        let mut i = 0;
        while i + 32 <= cols {
            // cvtne2ps_pbh(a, b): b's 16 values in the low half, a's in the high half.
            let v = _mm512_cvtne2ps_pbh(
                _mm512_loadu_ps(row.add(i + 16)),
                _mm512_loadu_ps(row.add(i)),
            );
            _mm512_storeu_si512(
                dst.add(i) as *mut __m512i,
                std::mem::transmute::<__m512bh, __m512i>(v),
            );
            i += 32;
        }
        while i < cols {
            *dst.add(i) = bf16_bits_rne(*row.add(i));
            i += 1;
        }
    }
}

/// bf16 bits of `v`, rounded to nearest even (finite inputs; what `vcvtne2ps2bf16` does).
pub fn bf16_bits_rne(v: f32) -> u16 {
    half::bf16::from_f32(v).to_bits()
}

/// Write masks of the three zmm columns of a panel of `n` (≤ 48) valid rows.
#[inline]
fn lane_masks(n: usize) -> [u16; 3] {
    let mut masks = [0u16; 3];
    for (v, mask) in masks.iter_mut().enumerate() {
        let lanes = n.saturating_sub(16 * v).min(16);
        *mask = if lanes == 16 {
            0xFFFF
        } else {
            (1u16 << lanes) - 1
        };
    }
    masks
}

/// Packs rows `r0..r0+n` (n ≤ 48), columns `k0..k0+kc` of `w` into `out[k·48 + j]` =
/// `W[r0 + j, k0 + k]` as f32; rows `n..48` are zero.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn pack_f32<E: Element>(
    w: *const E,
    cols: usize,
    r0: usize,
    n: usize,
    k0: usize,
    kc: usize,
    out: *mut f32,
) {
    for g in 0..NR / 16 {
        let first = g * 16;
        // Columns packed by the vector loop (16 full rows only); the rest, one by one below.
        let mut k = 0;
        if first + 16 <= n {
            // Blocks of 16 (f32) or 32 (16-bit) columns by in-register transposes.
            let base = w.add((r0 + first) * cols + k0);
            match E::DTYPE {
                WeightDtype::F32 => {
                    while k + 16 <= kc {
                        let mut v = [_mm512_setzero_si512(); 16];
                        for (i, vi) in v.iter_mut().enumerate() {
                            *vi = _mm512_loadu_si512(base.add(i * cols + k) as *const __m512i);
                        }
                        transpose16(&mut v);
                        for (i, vi) in v.iter().enumerate() {
                            _mm512_storeu_si512(out.add((k + i) * NR + first) as *mut __m512i, *vi);
                        }
                        k += 16;
                    }
                }
                WeightDtype::BF16 | WeightDtype::F16 => {
                    while k + 32 <= kc {
                        let mut v = [_mm512_setzero_si512(); 16];
                        for (i, vi) in v.iter_mut().enumerate() {
                            *vi = _mm512_loadu_si512(base.add(i * cols + k) as *const __m512i);
                        }
                        transpose16(&mut v);
                        // v[j] holds the pair (k + 2j, k + 2j + 1) of the 16 rows.
                        for (j, vj) in v.iter().enumerate() {
                            let (even, odd) = if E::DTYPE == WeightDtype::BF16 {
                                (
                                    _mm512_slli_epi32(*vj, 16),
                                    _mm512_and_si512(*vj, _mm512_set1_epi32(0xFFFF_0000u32 as i32)),
                                )
                            } else {
                                (
                                    _mm512_castps_si512(_mm512_cvtph_ps(_mm512_cvtepi32_epi16(
                                        *vj,
                                    ))),
                                    _mm512_castps_si512(_mm512_cvtph_ps(_mm512_cvtepi32_epi16(
                                        _mm512_srli_epi32(*vj, 16),
                                    ))),
                                )
                            };
                            _mm512_storeu_si512(
                                out.add((k + 2 * j) * NR + first) as *mut __m512i,
                                even,
                            );
                            _mm512_storeu_si512(
                                out.add((k + 2 * j + 1) * NR + first) as *mut __m512i,
                                odd,
                            );
                        }
                        k += 32;
                    }
                }
            }
        }
        for kk in k..kc {
            for j in first..first + 16 {
                *out.add(kk * NR + j) = if j < n {
                    (*w.add((r0 + j) * cols + k0 + kk)).to_f32()
                } else {
                    0.0
                };
            }
        }
    }
}

/// Packs bf16 pairs: rows `r0..r0+n`, pair columns `k0..k0+kc` (pair `j` = columns `2j, 2j+1`)
/// into `out[k·48 + j]`; a missing odd last column and rows `n..48` are zero.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_pairs(
    w: *const u16,
    cols: usize,
    r0: usize,
    n: usize,
    k0: usize,
    kc: usize,
    out: *mut u32,
) {
    let pair = |row: usize, p: usize| -> u32 {
        let c = 2 * p;
        let lo = *w.add(row * cols + c) as u32;
        let hi = if c + 1 < cols {
            *w.add(row * cols + c + 1) as u32
        } else {
            0
        };
        lo | (hi << 16)
    };
    for g in 0..NR / 16 {
        let first = g * 16;
        // Pairs packed by the vector loop (16 full rows only); the rest, one by one below.
        let mut k = 0;
        if first + 16 <= n {
            // Whole pairs only (2·(k0 + k + 16) ≤ cols), 16 pairs per transpose.
            while k + 16 <= kc && 2 * (k0 + k + 16) <= cols {
                let mut v = [_mm512_setzero_si512(); 16];
                for (i, vi) in v.iter_mut().enumerate() {
                    *vi = _mm512_loadu_si512(
                        w.add((r0 + first + i) * cols + 2 * (k0 + k)) as *const __m512i
                    );
                }
                transpose16(&mut v);
                for (i, vi) in v.iter().enumerate() {
                    _mm512_storeu_si512(out.add((k + i) * NR + first) as *mut __m512i, *vi);
                }
                k += 16;
            }
        }
        for kk in k..kc {
            for j in first..first + 16 {
                *out.add(kk * NR + j) = if j < n { pair(r0 + j, k0 + kk) } else { 0 };
            }
        }
    }
}

/// Transposes a 16 × 16 matrix of 32-bit elements held as 16 rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose16(r: &mut [__m512i; 16]) {
    // 1. Interleave 32-bit elements of row pairs.
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    // 2. Interleave 64-bit elements: u[4g + j] holds, in 128-bit lane L, column 4L + j of rows
    //    4g..4g+3.
    let mut u = [_mm512_setzero_si512(); 16];
    for g in 0..4 {
        u[4 * g] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
        u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
    }
    // 3. 4 × 4 transpose of 128-bit lanes across u[j], u[4 + j], u[8 + j], u[12 + j].
    for j in 0..4 {
        let p = _mm512_shuffle_i32x4::<0x44>(u[j], u[4 + j]);
        let q = _mm512_shuffle_i32x4::<0xEE>(u[j], u[4 + j]);
        let s = _mm512_shuffle_i32x4::<0x44>(u[8 + j], u[12 + j]);
        let z = _mm512_shuffle_i32x4::<0xEE>(u[8 + j], u[12 + j]);
        r[j] = _mm512_shuffle_i32x4::<0x88>(p, s);
        r[4 + j] = _mm512_shuffle_i32x4::<0xDD>(p, s);
        r[8 + j] = _mm512_shuffle_i32x4::<0x88>(q, z);
        r[12 + j] = _mm512_shuffle_i32x4::<0xDD>(q, z);
    }
}

/// The `M × 48` accumulators of a tile: the partial sums stored in `c` by the previous `k`
/// chunk (`accumulate`), else zero.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn load_tile<const M: usize>(
    c: *const f32,
    ldc: usize,
    accumulate: bool,
    masks: [u16; 3],
) -> [[__m512; 3]; M] {
    let mut acc = [[_mm512_setzero_ps(); 3]; M];
    if accumulate {
        for (i, row) in acc.iter_mut().enumerate() {
            for (v, value) in row.iter_mut().enumerate() {
                *value = _mm512_maskz_loadu_ps(masks[v], c.add(i * ldc + 16 * v));
            }
        }
    }
    acc
}

/// Stores the tile's accumulators to `c` (the valid rows of the panel only).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn store_tile<const M: usize>(
    acc: &[[__m512; 3]; M],
    c: *mut f32,
    ldc: usize,
    masks: [u16; 3],
) {
    for (i, row) in acc.iter().enumerate() {
        for (v, value) in row.iter().enumerate() {
            _mm512_mask_storeu_ps(c.add(i * ldc + 16 * v), masks[v], *value);
        }
    }
}

/// Pointers to the `M` token rows of a tile's activations, `lda` elements apart.
#[inline(always)]
unsafe fn token_rows<T, const M: usize>(a: *const T, lda: usize) -> [*const T; M] {
    std::array::from_fn(|i| a.add(i * lda))
}

/// One `M × 48` tile (M ≤ 8 tokens) of `c` over `kc` packed columns, f32 FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_f32<const M: usize>(
    kc: usize,
    b: *const f32,
    a: *const f32,
    lda: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    masks: [u16; 3],
) {
    let mut acc = load_tile::<M>(c, ldc, accumulate, masks);
    let rows = token_rows::<_, M>(a, lda);
    for k in 0..kc {
        let bk = b.add(k * NR);
        let b0 = _mm512_loadu_ps(bk);
        let b1 = _mm512_loadu_ps(bk.add(16));
        let b2 = _mm512_loadu_ps(bk.add(32));
        for i in 0..M {
            let av = _mm512_set1_ps(*rows[i].add(k));
            acc[i][0] = _mm512_fmadd_ps(av, b0, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(av, b1, acc[i][1]);
            acc[i][2] = _mm512_fmadd_ps(av, b2, acc[i][2]);
        }
    }
    store_tile(&acc, c, ldc, masks);
}

/// One `M × 48` tile (M ≤ 8 tokens) over `kc` packed bf16 pairs, `vdpbf16ps`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_bf16<const M: usize>(
    kc: usize,
    b: *const u32,
    a: *const u32,
    lda: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    masks: [u16; 3],
) {
    let mut acc = load_tile::<M>(c, ldc, accumulate, masks);
    let rows = token_rows::<_, M>(a, lda);
    for k in 0..kc {
        let bk = b.add(k * NR);
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bk as *const __m512i));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bk.add(16) as *const __m512i));
        let b2: __m512bh = std::mem::transmute(_mm512_loadu_si512(bk.add(32) as *const __m512i));
        for i in 0..M {
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*rows[i].add(k) as i32));
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], av, b0);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], av, b1);
            acc[i][2] = _mm512_dpbf16_ps(acc[i][2], av, b2);
        }
    }
    store_tile(&acc, c, ldc, masks);
}
