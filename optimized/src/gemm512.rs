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
//! (they are then used exactly). Its blocking is the other way round: the *activations* are
//! rearranged once per product (groups of 32 tokens side by side, [`round_to_bf16_token_groups`])
//! and the weights are read in place, each row's pair `(W[n, 2j], W[n, 2j+1])` broadcast to the
//! token lanes of a 64-token tile — no weight packing, which cost about 10% of the kernel's time when it packed
//! `[k/2][48]` panels like the f32 kernel. Each `y[t, n]` is one fixed chain (pairs in order,
//! `vdpbf16ps`'s odd product then even product per pair), so this mode is deterministic across
//! thread counts too, but it is *not* the reference's arithmetic: activations carry a relative
//! error up to 2⁻⁸ (see `docs/performance.md`).

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
/// Weight rows per block of the bf16 kernel: one broadcast each per pair.
pub const BF16_ROWS: usize = 6;
/// Tokens per group of the rounded activations: two zmm vectors of 16 lanes.
pub const TOKEN_GROUP: usize = 32;
/// Tokens per tile of the bf16 kernel: two groups, four zmm vectors.
pub const BF16_TILE_TOKENS: usize = 2 * TOKEN_GROUP;

/// Pairs per token in [`round_to_bf16_token_groups`]' layout: `⌈cols/2⌉` rounded up to a
/// multiple of 16, the extra pairs zero, so that the AMX kernel ([`crate::amx`]) reads whole
/// 16-pair tiles of activations at the end of a row too (the AVX-512 kernel reads only the first
/// `⌈cols/2⌉`).
pub fn group_pairs(cols: usize) -> usize {
    cols.div_ceil(32) * 16
}

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

/// Calls `kernel::<R, V>(args)` with the tile's weight rows `r` (1..=6) and token vectors `v`
/// (1..=4) as the const generics `R` and `V`.
macro_rules! with_tile_shape {
    ($r:expr, $v:expr, $kernel:ident($($arg:expr),* $(,)?)) => {
        match $r {
            6 => with_tile_shape!(@vectors 6, $v, $kernel($($arg),*)),
            5 => with_tile_shape!(@vectors 5, $v, $kernel($($arg),*)),
            4 => with_tile_shape!(@vectors 4, $v, $kernel($($arg),*)),
            3 => with_tile_shape!(@vectors 3, $v, $kernel($($arg),*)),
            2 => with_tile_shape!(@vectors 2, $v, $kernel($($arg),*)),
            _ => with_tile_shape!(@vectors 1, $v, $kernel($($arg),*)),
        }
    };
    (@vectors $r:literal, $v:expr, $kernel:ident($($arg:expr),*)) => {
        match $v {
            4 => $kernel::<$r, 4>($($arg),*),
            3 => $kernel::<$r, 3>($($arg),*),
            2 => $kernel::<$r, 2>($($arg),*),
            _ => $kernel::<$r, 1>($($arg),*),
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
    /// Per-thread pack buffer: one panel chunk, `[KC][NR]` f32.
    static PACK: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
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
        pack.resize(KC * NR, 0.0);
        let packed = pack.as_mut_ptr();
        let bytes = std::mem::size_of::<E>();
        let mut r0 = rows.start;
        while r0 < rows.end {
            let n = (rows.end - r0).min(NR);
            let masks = lane_masks(n);
            let mut k0 = 0;
            while k0 < cols {
                let kc = (cols - k0).min(KC);
                pack_f32(w, cols, r0, n, k0, kc, packed);
                // While this chunk computes, bring the next one's weights into L2.
                let next = next_chunk(&rows, r0, k0, cols, KC);
                let mut prefetch = Prefetch::new(w as *const u8, cols * bytes, next, bytes, tokens);
                let mut t = 0;
                while t < tokens {
                    prefetch.step();
                    let m = (tokens - t).min(MR);
                    let a = x.add(t * cols + k0);
                    let c = y.add(t * y_stride + (r0 - rows.start));
                    with_tile_height!(m, tile_f32(kc, packed, a, cols, c, y_stride, k0 > 0, masks));
                    t += MR;
                }
                prefetch.finish();
                k0 += KC;
            }
            r0 += NR;
        }
    });
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

/// Like [`gemm_rows_f32`] for bf16 weights, on activations already rounded to bf16 by
/// [`round_to_bf16_token_groups`] (`xg`): `vdpbf16ps`, two exact products per lane added in
/// turn to an f32 sum (denormals flushed). Weights are read where they are stored, never packed.
///
/// Blocking: for each block of [`BF16_ROWS`] = 6 weight rows, for each tile of
/// [`BF16_TILE_TOKENS`] = 64 tokens (two groups), `tile_bf16` keeps the `6 × 64` sums in 24 zmm
/// accumulators (tokens along the lanes) for the whole reduction: per pair `j` it loads the four
/// activation vectors of the tile and broadcasts each row's pair `(W[n, 2j], W[n, 2j+1])` straight
/// from the weight row, 24 `vdpbf16ps`. The block's rows (6 · K · 2 bytes) are read from memory by
/// the first tile and from cache by the others.
///
/// Why 6 rows × 64 tokens and not 12 × 32 (same 24 accumulators): when a row is a multiple of
/// 4 KiB long (K = 2048, 4096, 6144: the E2B output and down projections), all rows of a block
/// fall in the same L1 set, and 12 of them do not fit its 8 ways; measured in isolation (one
/// core, rows in L3), 12 × 32 ran at 215 GFLOP/s on those widths against 229–231 for 6 × 64, and
/// both at 230–232 on other widths.
///
/// # Safety
/// As [`gemm_rows_f32`]; `xg` holds the `⌈tokens/32⌉ · 32 · group_pairs(cols)` words of
/// [`round_to_bf16_token_groups`]; the CPU has AVX-512 BF16 ([`has_avx512_bf16`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
pub unsafe fn gemm_rows_bf16(
    w: *const half::bf16,
    cols: usize,
    rows: std::ops::Range<usize>,
    xg: *const u32,
    tokens: usize,
    y: *mut f32,
    y_stride: usize,
) {
    let pairs = group_pairs(cols);
    let width = rows.len();
    TILE_OUTPUTS.with(|outputs| {
        let mut outputs = outputs.borrow_mut();
        if outputs.len() < tokens * width {
            outputs.resize(tokens * width, 0.0);
        }
        let out = outputs.as_mut_ptr();
        let mut r0 = rows.start;
        while r0 < rows.end {
            let n = (rows.end - r0).min(BF16_ROWS);
            let block = BlockOfRows {
                first: (w as *const u16).add(r0 * cols),
                cols,
            };
            // The next block's rows, fetched into cache while the first tile computes; after
            // the task's last block, the rows that follow it (the next task's, which this
            // thread usually takes next: rayon hands each thread a run of consecutive tasks).
            // Past the matrix's end, at most one block of addresses is prefetched for nothing.
            let mut ahead = NextRows {
                next: (w as *const u8).wrapping_add((r0 + BF16_ROWS) * cols * 2),
                end: (w as *const u8).wrapping_add((r0 + 2 * BF16_ROWS) * cols * 2),
            };
            for tile_start in (0..tokens).step_by(BF16_TILE_TOKENS) {
                let m = (tokens - tile_start).min(BF16_TILE_TOKENS);
                let a = xg.add(tile_start * pairs);
                let c = out.add(tile_start * width + (r0 - rows.start));
                // One activation vector per 16 tokens left in the tile.
                with_tile_shape!(
                    n,
                    m.div_ceil(16),
                    tile_bf16(block, a, m, c, width, &mut ahead)
                );
            }
            r0 += BF16_ROWS;
        }
        for t in 0..tokens {
            std::ptr::copy_nonoverlapping(out.add(t * width), y.add(t * y_stride), width);
        }
    });
}

thread_local! {
    /// The bf16 kernel's `[tokens, rows of the task]` results before they are copied to `y`.
    ///
    /// Storing each tile straight into `y` (`[tokens, rows]`, one partial line per token, token
    /// rows 24 KiB apart on E2B's 6144-wide products, so all in one L1 set) cost about 4% in
    /// isolation (one core: 231 → 222 GFLOP/s with such stores after each tile); here a task's
    /// tiles write a few KiB that stay in L1, then each token's row goes to `y` in one copy.
    static TILE_OUTPUTS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Consecutive bf16 weight rows of `cols` elements from `first`.
#[derive(Clone, Copy)]
struct BlockOfRows {
    first: *const u16,
    cols: usize,
}

/// The bytes `next..end` of the weight rows the next block will read, not yet prefetched.
///
/// Without it the first tile of each block waits for its rows to come from memory: in
/// isolation (one core, rows beyond L2) the tile ran at 222–225 GFLOP/s, with one line of the
/// next block prefetched every second pair at 229–231, of the 233 the core can do. One line per
/// two pairs always covers the next block within a tile: a block of `R ≤ 6` rows holds
/// `R · ⌈K/2⌉ / 16 ≤ ⌈K/2⌉ / 2` lines.
struct NextRows {
    next: *const u8,
    end: *const u8,
}

impl NextRows {
    /// Prefetches the next line into L1, if any is left.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn step(&mut self) {
        if self.next < self.end {
            // SAFETY: a prefetch never faults, whatever the address (it may lie past the rows).
            unsafe { _mm_prefetch::<_MM_HINT_T0>(self.next as *const i8) };
            self.next = self.next.wrapping_add(64);
        }
    }
}

/// One tile of [`gemm_rows_bf16`]: `c[t, r] = Σ_j pair_j(x[t]) · pair_j(W[r])` for the `R`
/// rows of `block` and the `m ≤ 16·V` tokens from `a` (the pairs of the tile's first group; a
/// second group follows `32 · group_pairs(cols)` words later), over all pairs in order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile_bf16<const R: usize, const V: usize>(
    block: BlockOfRows,
    a: *const u32,
    m: usize,
    c: *mut f32,
    ldc: usize,
    ahead: &mut NextRows,
) {
    let cols = block.cols;
    let group_words = TOKEN_GROUP * group_pairs(cols);
    let rows: [*const u16; R] = std::array::from_fn(|r| block.first.add(r * cols));
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    let whole_pairs = cols / 2;
    for j in 0..whole_pairs {
        if j % 2 == 0 {
            ahead.step();
        }
        // Columns 2j and 2j+1 as one (possibly unaligned) 32-bit word, low half first.
        pair_step(&mut acc, a.add(j * TOKEN_GROUP), group_words, |r| {
            (rows[r].add(2 * j) as *const u32).read_unaligned()
        });
    }
    if cols % 2 == 1 {
        // The last column alone (its missing partner counts as zero, as in the activations).
        pair_step(
            &mut acc,
            a.add(whole_pairs * TOKEN_GROUP),
            group_words,
            |r| *rows[r].add(cols - 1) as u32,
        );
    }
    // Store: transpose each vector column (16 tokens × R rows) to one row per token.
    let row_lanes: u16 = (1u16 << R) - 1; // R ≤ 6
    for v in 0..V {
        let tokens = m.saturating_sub(16 * v).min(16);
        let mut by_token = [_mm512_setzero_si512(); 16];
        for (row, row_sums) in by_token.iter_mut().zip(&acc) {
            *row = _mm512_castps_si512(row_sums[v]);
        }
        transpose16(&mut by_token);
        for (l, sums) in by_token.iter().enumerate().take(tokens) {
            _mm512_mask_storeu_ps(
                c.add((16 * v + l) * ldc),
                row_lanes,
                _mm512_castsi512_ps(*sums),
            );
        }
    }
}

/// One pair step of [`tile_bf16`]: `acc[r][v] += pair · pair_of_row(r)` for the tile's
/// activation pairs at `aj` (vector `v`: tokens `16v..16v+16`, in group `v / 2`, which starts
/// `group_words` words after the one before).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
unsafe fn pair_step<const R: usize, const V: usize>(
    acc: &mut [[__m512; V]; R],
    aj: *const u32,
    group_words: usize,
    pair_of_row: impl Fn(usize) -> u32,
) {
    let activations: [__m512bh; V] = std::array::from_fn(|v| {
        let vector = aj.add((v / 2) * group_words + (v % 2) * 16);
        std::mem::transmute(_mm512_loadu_si512(vector as *const __m512i))
    });
    for (r, row_sums) in acc.iter_mut().enumerate() {
        let weights: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair_of_row(r) as i32));
        for (sum, &activation) in row_sums.iter_mut().zip(&activations) {
            *sum = _mm512_dpbf16_ps(*sum, activation, weights);
        }
    }
}

/// Rounds `x` (`[tokens, cols]`) to bf16 (round to nearest even) for [`gemm_rows_bf16`], in
/// groups of [`TOKEN_GROUP`] tokens: with `kp` = [`group_pairs`]`(cols)` (`⌈cols/2⌉` rounded up
/// to a multiple of 16), the word at `(g·kp + j)·32 + l` is the pair `(x[t, 2j], x[t, 2j+1])` of
/// token `t = 32g + l` (low half first), so a tile reads pair `j` of a group's 32 tokens as two
/// consecutive vectors. The tokens padding the last group, the missing half of the last pair
/// when `cols` is odd and the pairs past `⌈cols/2⌉` are zero. `out` gets `⌈tokens/32⌉ · 32 · kp`
/// words. The groups are rounded in parallel (on the
/// calling thread alone this took about 0.5% of a fast prefill while the other thread waited).
///
/// # Safety
/// The CPU has AVX-512 BF16.
#[cfg(target_arch = "x86_64")]
pub unsafe fn round_to_bf16_token_groups(
    x: &[f32],
    tokens: usize,
    cols: usize,
    out: &mut Vec<u32>,
) {
    use rayon::prelude::*;
    assert_eq!(x.len(), tokens * cols, "x is [tokens, cols]");
    let group_words = TOKEN_GROUP * group_pairs(cols);
    let groups = tokens.div_ceil(TOKEN_GROUP);
    out.clear();
    out.reserve(groups * group_words);
    out.spare_capacity_mut()[..groups * group_words]
        .par_chunks_mut(group_words.max(1))
        .enumerate()
        .for_each(|(g, words)| {
            let words = words.as_mut_ptr() as *mut u32;
            // SAFETY: `words` holds this group's `group_words` words (zeroed first, so padding
            // is written too); AVX-512 BF16 is available (the caller's contract).
            unsafe {
                std::ptr::write_bytes(words, 0, group_words);
                round_token_group(x, tokens, cols, g, words);
            }
        });
    // SAFETY: every group's words were written above.
    out.set_len(groups * group_words);
}

/// [`round_to_bf16_token_groups`] on the calling thread alone (for callers that are already one
/// task of a parallel loop, such as each query block of the vision attention: a nested parallel
/// loop per block cost more in scheduling than the rounding itself).
///
/// # Safety
/// The CPU has AVX-512 BF16.
#[cfg(target_arch = "x86_64")]
pub unsafe fn round_to_bf16_token_groups_here(
    x: &[f32],
    tokens: usize,
    cols: usize,
    out: &mut Vec<u32>,
) {
    assert_eq!(x.len(), tokens * cols, "x is [tokens, cols]");
    let group_words = TOKEN_GROUP * group_pairs(cols);
    let groups = tokens.div_ceil(TOKEN_GROUP);
    out.clear();
    out.resize(groups * group_words, 0);
    for g in 0..groups {
        // SAFETY: group g's words are in `out` (zeroed above); AVX-512 BF16 is available.
        round_token_group(x, tokens, cols, g, out.as_mut_ptr().add(g * group_words));
    }
}

/// `x` rounded to bf16 (round to nearest even: [`bf16_bits_rne`] for every normal value, zero,
/// infinity; denormal inputs become zero, as `vcvtne2ps2bf16` makes them for the token groups
/// too), into `out` (`x.len()` values, row-major like `x`): the "weight" operand of the AMX
/// kernel when it is an activation (the fast vision attention's queries and softmax weights),
/// 32 values per `vcvtne2ps2bf16` (a scalar loop took 10% of the fast tower's time, `perf`).
///
/// # Safety
/// The CPU has AVX-512 BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
pub unsafe fn round_to_bf16(x: &[f32], out: &mut Vec<half::bf16>) {
    out.clear();
    out.reserve(x.len());
    let dst = out.as_mut_ptr() as *mut __m512i;
    let whole = x.len() / 32;
    for b in 0..whole {
        let at = x.as_ptr().add(32 * b);
        let pair = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(at.add(16)), _mm512_loadu_ps(at));
        _mm512_storeu_si512(dst.add(b), std::mem::transmute::<__m512bh, __m512i>(pair));
    }
    let words = out.as_mut_ptr() as *mut u16;
    for (i, &v) in x.iter().enumerate().skip(32 * whole) {
        *words.add(i) = bf16_bits_rne(v);
    }
    // SAFETY: every one of the `x.len()` values was written above.
    out.set_len(x.len());
}

/// The softmax of one row of attention scores, written rounded to bf16 into `out` (`row.len()`
/// values) — the fast vision attention's `P` for its AMX product, in one pass over a row that is
/// still in L1/L2: `exp(s − max)` summed in 16 lanes and kept in `row`
/// (`simd::exp_shifted_in_place_avx512`, as the f32 softmax), then each value times
/// `1/Σ` rounded to nearest even. The separate softmax and rounding passes over a whole
/// `[128, 9801]` score block (5 MB, past L2) took 35% of the fast tower's time at budget 1120
/// (`perf`). Multiplying by the reciprocal (instead of dividing) moves a weight by at most one
/// f32 ulp, far below the bf16 rounding that follows.
///
/// # Safety
/// The CPU has AVX-512 BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
pub unsafe fn softmax_row_to_bf16(row: &mut [f32], out: &mut [half::bf16]) {
    assert_eq!(row.len(), out.len(), "one bf16 weight per score");
    let n = row.len();
    let total = crate::simd::exp_shifted_in_place_avx512(row.as_mut_ptr(), n);
    let inverse = 1.0 / total;
    let scale = _mm512_set1_ps(inverse);
    let dst = out.as_mut_ptr() as *mut __m512i;
    let x = row.as_ptr();
    let whole = n / 32;
    for b in 0..whole {
        let at = x.add(32 * b);
        let pair = _mm512_cvtne2ps_pbh(
            _mm512_mul_ps(_mm512_loadu_ps(at.add(16)), scale),
            _mm512_mul_ps(_mm512_loadu_ps(at), scale),
        );
        _mm512_storeu_si512(dst.add(b), std::mem::transmute::<__m512bh, __m512i>(pair));
    }
    for j in 32 * whole..n {
        out[j] = half::bf16::from_bits(bf16_bits_rne(row[j] * inverse));
    }
}

/// Token group `g` of [`round_to_bf16_token_groups`], into `group` (its zeroed words).
///
/// # Safety
/// The CPU has AVX-512 BF16; `group` is valid for `TOKEN_GROUP · group_pairs(cols)` words.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn round_token_group(x: &[f32], tokens: usize, cols: usize, g: usize, group: *mut u32) {
    let kp = cols.div_ceil(2); // the pairs that hold columns; the padding stays zero
    let whole_blocks = cols / 32; // blocks of 16 whole pairs
    let group_tokens = (tokens - g * TOKEN_GROUP).min(TOKEN_GROUP);
    // 16 pairs × 16 tokens at a time: round 16 tokens' 32 columns, transpose, store.
    for half in 0..group_tokens.div_ceil(16) {
        let first_token = g * TOKEN_GROUP + 16 * half;
        let lanes = (tokens - first_token).min(16);
        for b in 0..whole_blocks {
            let mut v = [_mm512_setzero_si512(); 16];
            for (l, vl) in v.iter_mut().enumerate().take(lanes) {
                let row = x.as_ptr().add((first_token + l) * cols + 32 * b);
                // cvtne2ps_pbh(a, b): b's 16 values in the low half, a's in the high half.
                *vl = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(
                    _mm512_loadu_ps(row.add(16)),
                    _mm512_loadu_ps(row),
                ));
            }
            transpose16(&mut v);
            for (i, vi) in v.iter().enumerate() {
                let j = 16 * b + i;
                _mm512_storeu_si512(group.add(j * TOKEN_GROUP + 16 * half) as *mut __m512i, *vi);
            }
        }
        // The last pairs, one by one.
        for l in 0..lanes {
            let row = &x[(first_token + l) * cols..][..cols];
            for j in 16 * whole_blocks..kp {
                let low = bf16_bits_rne(row[2 * j]) as u32;
                let high = row.get(2 * j + 1).map_or(0, |&v| bf16_bits_rne(v) as u32);
                *group.add(j * TOKEN_GROUP + 16 * half + l) = low | (high << 16);
            }
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

/// Transposes a 16 × 16 matrix of 32-bit elements held as 16 rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn transpose16(r: &mut [__m512i; 16]) {
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

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// `softmax_row_to_bf16` against the f64 softmax: each weight within one bf16 rounding
    /// (relative 2⁻⁸, plus the f32 exp and sum error far below it), for lengths around the
    /// 16- and 32-value blocks and a 9801-key row; the weights sum to 1 within bf16 rounding.
    #[test]
    fn softmax_row_to_bf16_is_the_softmax_rounded_to_bf16() {
        if !has_avx512_bf16() {
            return;
        }
        for n in [1usize, 15, 16, 31, 33, 100, 9801] {
            let scores = crate::testing::random_values(n, n as u64 + 3, 9.0);
            let max = scores
                .iter()
                .fold(f64::NEG_INFINITY, |m, &s| m.max(s as f64));
            let total: f64 = scores.iter().map(|&s| (s as f64 - max).exp()).sum();
            let mut row = scores.clone();
            let mut out = vec![half::bf16::ZERO; n];
            // SAFETY: AVX-512 BF16 checked above.
            unsafe { softmax_row_to_bf16(&mut row, &mut out) };
            let mut sum = 0.0f64;
            for (i, (&s, w)) in scores.iter().zip(&out).enumerate() {
                let expected = (s as f64 - max).exp() / total;
                let got = w.to_f64();
                sum += got;
                assert!(
                    (got - expected).abs() <= expected * (2f64.powi(-8) + 1e-6),
                    "n = {n}, weight {i}: {got} vs {expected}"
                );
            }
            assert!(
                (sum - 1.0).abs() <= 2f64.powi(-8),
                "n = {n}: weights sum to {sum}"
            );
        }
    }

    /// `round_to_bf16` is [`bf16_bits_rne`] on normal values, zeros and infinities, in the
    /// 32-value vector blocks and in the scalar tail, for every length up to 100; ties round to
    /// even.
    #[test]
    fn round_to_bf16_is_round_to_nearest_even() {
        if !has_avx512_bf16() {
            return;
        }
        let mut values = crate::testing::random_values(100, 3, 1e3);
        // Ties: 1 + 2⁻⁸ (round down to 1, even) and 1 + 3·2⁻⁸ (round up), infinities, zeros.
        values[1] = 1.0 + 2f32.powi(-8);
        values[2] = 1.0 + 3.0 * 2f32.powi(-8);
        values[33] = f32::INFINITY;
        values[34] = -0.0;
        values[97] = f32::NEG_INFINITY;
        values[98] = 1.0 + 2f32.powi(-8);
        for len in 0..=values.len() {
            let mut out = Vec::new();
            // SAFETY: AVX-512 BF16 checked above.
            unsafe { round_to_bf16(&values[..len], &mut out) };
            assert_eq!(out.len(), len);
            for (i, (got, &v)) in out.iter().zip(&values).enumerate() {
                assert_eq!(
                    got.to_bits(),
                    bf16_bits_rne(v),
                    "len {len}, value {i} = {v}"
                );
            }
        }
        let mut ties = Vec::new();
        unsafe { round_to_bf16(&values[..3], &mut ties) };
        assert_eq!(
            (ties[1].to_f32(), ties[2].to_f32()),
            (1.0, 1.0 + 4.0 * 2f32.powi(-8))
        );
    }
}
