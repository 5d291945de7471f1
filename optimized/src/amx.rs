//! The fast prefill's matrix product on AMX, Intel's tile unit (Sapphire Rapids and later):
//! `y[T, N] = x[T, K] · W[N, K]ᵀ` with bf16 weights as stored and the activations rounded to
//! bf16, f32 sums — the arithmetic of `Precision::Bf16Activations`, on a unit that does many times
//! the multiply-adds per cycle of `vdpbf16ps` (one core of this project's Intel Xeon: 3.0 TFLOP/s
//! for back-to-back `tdpbf16ps` on tiles in registers, a C microbenchmark; our `vdpbf16ps` kernel
//! ~95 GFLOP/s per core there) (not a model component: the arithmetic under `linear` for more
//! than `SKINNY_MAX_TOKENS` token rows).
//!
//! AMX has eight tile registers `tmm0..tmm7` of up to 16 rows × 64 bytes, shaped by a
//! configuration loaded with `ldtilecfg`. `tdpbf16ps C, A, B` adds to the 16 × 16 f32 tile `C`
//! the products of `A` (16 rows × 32 bf16) and `B` (16 rows of 16 bf16 pairs):
//!
//! `C[m, n] += Σ_p A[m, 2p]·B[p, 2n] + A[m, 2p+1]·B[p, 2n+1]`  (p = 0..16),
//!
//! 8192 multiply-adds per instruction; products of bf16 values are exact in f32, sums are f32
//! (round to nearest even, denormals flushed).
//!
//! How the product maps onto tiles:
//! - `A` = 16 **weight rows** × 32 columns, loaded where the weights are stored (row stride
//!   `K · 2` bytes): the weights are neither packed nor copied;
//! - `B` = 16 **pairs of columns** × 16 tokens, from the activations as
//!   [`crate::gemm512::round_to_bf16_token_groups`] lays them out for the AVX-512 kernel already:
//!   per group of 32 tokens, pair `j` of the 32 tokens is 32 consecutive words, so one load with a
//!   row stride of 128 bytes reads pairs `j..j+16` of 16 tokens;
//! - `C` = four tiles, 32 weight rows × 32 tokens (one group): per 32-column step, two `A` and two
//!   `B` loads feed four `tdpbf16ps` (`tmm0..3` = C, `tmm4, 5` = A, `tmm6, 7` = B).
//!
//! Blocking: a task's rows are cut into blocks of [`BLOCK_ROWS`] = 32; each token group computes
//! its 32 × 32 results over the whole reduction, then stores them (16 × 16 transposes into the
//! `[tokens, rows]` output; a row-major output takes whole groups straight from the tiles). The
//! block's weights come from memory for the first group and from L2 for the others; the next
//! block's are prefetched into L2 meanwhile, and each step's operands into L1 two steps ahead.
//!
//! What limits it on this project's Xeon (a C microbenchmark): `tdpbf16ps` on tiles in registers
//! runs at 3.1 TFLOP/s per core, but one `tileloadd` takes about as long as four products, and
//! the 2 × 2 arrangement needs one load per product; so the kernel runs at 650–720 GFLOP/s per
//! core on the towers' shapes (from 400–560 before the load order and the L1 prefetches).
//!
//! Exactness: each `y[t, n]` is one fixed chain — per 32-column step, the hardware's sum of the
//! step's 32 products added to the running f32 sum — so it does not depend on the blocking or the
//! thread count, but the order within a step is the hardware's: results agree with the
//! `vdpbf16ps` kernel to f32 summation error (tested), not bit for bit.
//!
//! The kernel runs only where the CPU has AMX-TILE and AMX-BF16 and Linux grants the process the
//! tile data state ([`has_amx_bf16`]); `GEMMA4_NO_AMX` (or `GEMMA4_NO_AVX512`, `GEMMA4_NO_SIMD`)
//! in the environment turns it off.
//!
//! The tile registers are not registers Rust allocates: the compiler never reads or writes them,
//! so they keep their contents between the `asm!` blocks of one kernel call, which loads the
//! configuration first and releases the tiles (`tilerelease`) before returning.

#[cfg(target_arch = "x86_64")]
use std::arch::{asm, x86_64::*};
use std::cell::RefCell;

use crate::gemm512::{group_pairs, TOKEN_GROUP};

/// Weight rows per block: two `A` tiles.
pub const BLOCK_ROWS: usize = 32;
/// Columns per step: one `A` tile row (64 bytes of bf16).
const STEP_COLUMNS: usize = 32;
/// Bytes from one pair of a token group to the next in the rounded activations (32 words).
const PAIR_STRIDE: usize = TOKEN_GROUP * 4;

/// True when the AMX kernel may run: the CPU has AMX-TILE and AMX-BF16 (and AVX-512 BF16, used
/// to round the activations), the environment does not turn it off, and the kernel granted this
/// process the tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`, asked once, on first use).
pub fn has_amx_bf16() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        use std::sync::OnceLock;
        static DETECTED: OnceLock<bool> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            std::env::var_os("GEMMA4_NO_AMX").is_none()
                && crate::gemm512::has_avx512_bf16()
                && cpu_has_amx_bf16()
                && request_tile_data()
        })
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        false
    }
}

/// CPUID leaf 7: EDX bit 24 is AMX-TILE, bit 22 AMX-BF16 (Intel SDM, vol. 2A, CPUID).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn cpu_has_amx_bf16() -> bool {
    // (Leaf 7 exists on every x86-64 CPU with AVX-512, checked before this.)
    let leaf = __cpuid_count(7, 0);
    leaf.edx & (1 << 24) != 0 && leaf.edx & (1 << 22) != 0
}

/// Asks Linux for permission to use the tile data state (XFEATURE 18, `XTILEDATA`); without it
/// the first tile instruction kills the process with SIGILL. True when granted.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_data() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only changes the process's permitted xstate.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

/// The 64-byte operand of `ldtilecfg` (palette 1): bytes per row and rows of each tile.
#[repr(C, align(64))]
#[derive(Clone, Copy, PartialEq, Eq)]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

impl TileConfig {
    /// The tiles for a block of `weight_rows` (1..=32) rows: `C` tiles 0, 1 and `A` tile 4
    /// hold its first ≤ 16 rows, `C` tiles 2, 3 and `A` tile 5 the rest (unconfigured when there
    /// is none: the kernel then never touches them); `B` tiles 6, 7 are 16 pairs × 16 tokens.
    fn for_block(weight_rows: usize) -> TileConfig {
        let first = weight_rows.min(16) as u8;
        let second = weight_rows.saturating_sub(16) as u8;
        let mut config = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            bytes_per_row: [0; 16],
            rows: [0; 16],
        };
        for (tile, rows) in [
            (0, first),
            (1, first),
            (2, second),
            (3, second),
            (4, first),
            (5, second),
            (6, 16),
            (7, 16),
        ] {
            if rows > 0 {
                config.rows[tile] = rows;
                config.bytes_per_row[tile] = 64;
            }
        }
        config
    }
}

thread_local! {
    /// Per-thread scratch: the last (partial) 32-column step of a block's rows, zero-padded
    /// (`[32 rows][32 bf16]`), and one group's results as the tiles store them (`[32 rows][32 tokens]`
    /// f32).
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch {
        tail: vec![0; BLOCK_ROWS * STEP_COLUMNS],
        results: vec![0.0; BLOCK_ROWS * TOKEN_GROUP],
    });
}

struct Scratch {
    tail: Vec<u16>,
    results: Vec<f32>,
}

/// `y[t·y_stride + (r − rows.start)] = Σ_k W[r, k]·x[t, k]` for `r` in `rows`, `t < tokens`,
/// with `x` rounded to bf16 (`xg`, from [`crate::gemm512::round_to_bf16_token_groups`]) and f32
/// sums on the tile unit.
///
/// # Safety
/// `w` holds rows `rows` of `cols` bf16 (row-major); `xg` holds the
/// `⌈tokens/32⌉ · 32 · group_pairs(cols)` words of the rounded activations; `y` is valid for
/// writes at every index written above; [`has_amx_bf16`] is true.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub unsafe fn gemm_rows_amx(
    w: *const half::bf16,
    cols: usize,
    rows: std::ops::Range<usize>,
    xg: *const u32,
    tokens: usize,
    y: *mut f32,
    y_stride: usize,
) {
    gemm_rows_amx_into::<false>(w, cols, rows, xg, tokens, y, y_stride)
}

/// [`gemm_rows_amx`] with the output the other way round: `y[(r − rows.start)·y_stride + t]`,
/// one row per weight row. The attention of the fast vision tower multiplies two activations:
/// with the queries (softmax weights) as the "weight" rows and the keys (`Vᵀ`) as the rounded
/// "tokens", scores (outputs) come out query-major as they are needed, stored row by row from
/// the result tiles instead of through 16 × 16 transposes (10% of the fast tower's time went to
/// those transposes, `perf`).
///
/// # Safety
/// As [`gemm_rows_amx`], with `y` valid for writes at every index written above.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub unsafe fn gemm_rows_amx_row_major(
    w: *const half::bf16,
    cols: usize,
    rows: std::ops::Range<usize>,
    xg: *const u32,
    tokens: usize,
    y: *mut f32,
    y_stride: usize,
) {
    gemm_rows_amx_into::<true>(w, cols, rows, xg, tokens, y, y_stride)
}

/// The kernel of [`gemm_rows_amx`] (`ROW_MAJOR` false) and [`gemm_rows_amx_row_major`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gemm_rows_amx_into<const ROW_MAJOR: bool>(
    w: *const half::bf16,
    cols: usize,
    rows: std::ops::Range<usize>,
    xg: *const u32,
    tokens: usize,
    y: *mut f32,
    y_stride: usize,
) {
    let row_bytes = cols * 2;
    let group_bytes = PAIR_STRIDE * group_pairs(cols);
    let groups = tokens.div_ceil(TOKEN_GROUP);
    let whole_steps = cols / STEP_COLUMNS;
    let tail_columns = cols % STEP_COLUMNS;
    let steps_per_block = groups * (whole_steps + usize::from(tail_columns > 0));
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        let Scratch { tail, results } = &mut *scratch;
        // The tail buffer's padding columns stay zero for the whole call (each block overwrites
        // only the first `tail_columns` of its rows; rows past a block's `n` are not loaded).
        tail.fill(0);
        let mut loaded: Option<TileConfig> = None;
        for r0 in rows.clone().step_by(BLOCK_ROWS) {
            let n = (rows.end - r0).min(BLOCK_ROWS);
            let config = TileConfig::for_block(n);
            if loaded != Some(config) {
                // (Loading a configuration also zeroes every tile.)
                asm!("ldtilecfg [{}]", in(reg) &config as *const TileConfig, options(nostack, readonly));
                loaded = Some(config);
            }
            let a = (w as *const u8).add(r0 * row_bytes);
            if tail_columns > 0 {
                // The last columns of each row, zero-padded to a whole step: loading them in
                // place would read past the row (past the matrix, for its last row).
                for r in 0..n {
                    std::ptr::copy_nonoverlapping(
                        (a as *const u16).add(r * cols + whole_steps * STEP_COLUMNS),
                        tail.as_mut_ptr().add(r * STEP_COLUMNS),
                        tail_columns,
                    );
                }
            }
            // The next block (32 rows, contiguous), spread over this block's steps.
            let mut ahead = Ahead {
                next: a.wrapping_add(BLOCK_ROWS * row_bytes),
                end: a.wrapping_add(2 * BLOCK_ROWS * row_bytes),
                per_step: (BLOCK_ROWS * row_bytes / 64).div_ceil(steps_per_block.max(1)),
            };
            for g in 0..groups {
                let b = (xg as *const u8).add(g * group_bytes);
                zero_results(n);
                for s in 0..whole_steps {
                    ahead.step();
                    if s + PREFETCH_STEPS < whole_steps {
                        prefetch_step(n, a, row_bytes, b, s + PREFETCH_STEPS);
                    }
                    step(
                        n,
                        a.add(s * STEP_COLUMNS * 2),
                        row_bytes,
                        b.add(s * 16 * PAIR_STRIDE),
                    );
                }
                if tail_columns > 0 {
                    ahead.step();
                    step(
                        n,
                        tail.as_ptr() as *const u8,
                        STEP_COLUMNS * 2,
                        b.add(whole_steps * 16 * PAIR_STRIDE),
                    );
                }
                let group_tokens = (tokens - g * TOKEN_GROUP).min(TOKEN_GROUP);
                if ROW_MAJOR && group_tokens == TOKEN_GROUP {
                    // A whole group: the tiles store straight into the output rows.
                    store_results(
                        n,
                        y.add((r0 - rows.start) * y_stride + g * TOKEN_GROUP),
                        y_stride,
                    );
                    continue;
                }
                store_results(n, results.as_mut_ptr(), TOKEN_GROUP);
                if ROW_MAJOR {
                    for r in 0..n {
                        std::ptr::copy_nonoverlapping(
                            results.as_ptr().add(r * TOKEN_GROUP),
                            y.add((r0 - rows.start + r) * y_stride + g * TOKEN_GROUP),
                            group_tokens,
                        );
                    }
                } else {
                    let c = y.add(g * TOKEN_GROUP * y_stride + (r0 - rows.start));
                    write_transposed(results, n, group_tokens, c, y_stride);
                }
            }
        }
        asm!("tilerelease", options(nostack, nomem));
    });
}

/// The bytes `next..end` of the next block's weight rows not yet prefetched (into L2), `per_step`
/// lines per step so that they are all asked for within the block.
struct Ahead {
    next: *const u8,
    end: *const u8,
    per_step: usize,
}

impl Ahead {
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn step(&mut self) {
        for _ in 0..self.per_step {
            if self.next >= self.end {
                return;
            }
            // SAFETY: a prefetch never faults, whatever the address (it may lie past the rows).
            unsafe { _mm_prefetch::<_MM_HINT_T1>(self.next as *const i8) };
            self.next = self.next.wrapping_add(64);
        }
    }
}

/// How many 32-column steps ahead [`prefetch_step`] asks for a step's operands.
const PREFETCH_STEPS: usize = 2;

/// Asks for step `s`'s operands in L1: the block's `n` weight rows' 64 bytes at column `32·s`
/// and the token group's 2 KB of pairs. On this project's Xeon a `tileloadd` is the kernel's
/// limit (four loads alone took 68 ns per step even from L1, four `tdpbf16ps` alone 21 ns; a C
/// microbenchmark), and a load that misses L1 waits longer still: with these prefetches a
/// 64-row × 256-token task went from 560 to 650–680 GFLOP/s on one core at 4304 columns and
/// from 668 to 690–716 at 1152.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn prefetch_step(n: usize, a: *const u8, row_bytes: usize, b: *const u8, s: usize) {
    let a = a.add(s * STEP_COLUMNS * 2);
    for r in 0..n {
        _mm_prefetch::<_MM_HINT_T0>(a.add(r * row_bytes) as *const i8);
    }
    let b = b.add(s * 16 * PAIR_STRIDE);
    for line in 0..(16 * PAIR_STRIDE) / 64 {
        _mm_prefetch::<_MM_HINT_T0>(b.add(line * 64) as *const i8);
    }
}

/// Zeroes the `C` tiles of a block of `n` rows.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn zero_results(n: usize) {
    asm!("tilezero tmm0", "tilezero tmm1", options(nostack, nomem));
    if n > 16 {
        asm!("tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
    }
}

/// One 32-column step: `C += A · B` for the block's rows from `a` (rows `lda` bytes apart) and
/// the group's 16 pairs × 32 tokens from `b`. Each tile load comes just before the first
/// product that needs it, so the products on the tiles already loaded run while the next one
/// loads (tiles are not renamed: a load cannot start before the products that still read the
/// tile's old contents): 987 against 860 GFLOP/s for all four loads first (C microbenchmark).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn step(n: usize, a: *const u8, lda: usize, b: *const u8) {
    if n > 16 {
        asm!(
            "tileloadd tmm4, [{a} + {lda}*1]",
            "tileloadd tmm6, [{b} + {ldb}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tileloadd tmm7, [{b} + {ldb}*1 + 64]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm5, [{a_second} + {lda}*1]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            a = in(reg) a,
            a_second = in(reg) a.add(16 * lda),
            lda = in(reg) lda,
            b = in(reg) b,
            ldb = in(reg) PAIR_STRIDE,
            options(nostack, readonly),
        );
    } else {
        asm!(
            "tileloadd tmm4, [{a} + {lda}*1]",
            "tileloadd tmm6, [{b} + {ldb}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tileloadd tmm7, [{b} + {ldb}*1 + 64]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            a = in(reg) a,
            lda = in(reg) lda,
            b = in(reg) b,
            ldb = in(reg) PAIR_STRIDE,
            options(nostack, readonly),
        );
    }
}

/// Stores the `C` tiles (the block's `n` rows × 32 tokens, f32) to `results`, rows `row_stride`
/// floats apart (the scratch's 32, or the output's own stride when a whole group goes straight
/// into a row-major output): tile `2h + v` holds rows `16h..`, tokens `16v..`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn store_results(n: usize, results: *mut f32, row_stride: usize) {
    let stride = row_stride * 4;
    asm!(
        "tilestored [{p} + {s}*1], tmm0",
        "tilestored [{p} + {s}*1 + 64], tmm1",
        p = in(reg) results,
        s = in(reg) stride,
        options(nostack),
    );
    if n > 16 {
        asm!(
            "tilestored [{p} + {s}*1], tmm2",
            "tilestored [{p} + {s}*1 + 64], tmm3",
            p = in(reg) results.add(16 * row_stride),
            s = in(reg) stride,
            options(nostack),
        );
    }
}

/// `c[t·ldc + r] = results[r][t]` for the block's `n` rows and the group's `tokens` tokens, by
/// 16 × 16 transposes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn write_transposed(results: &[f32], n: usize, tokens: usize, c: *mut f32, ldc: usize) {
    for half in 0..n.div_ceil(16) {
        let half_rows = (n - 16 * half).min(16);
        let row_lanes: u16 = if half_rows == 16 {
            u16::MAX
        } else {
            (1 << half_rows) - 1
        };
        for v in 0..tokens.div_ceil(16) {
            let mut by_row = [_mm512_setzero_si512(); 16];
            for (r, row) in by_row.iter_mut().enumerate().take(half_rows) {
                let sums = results.as_ptr().add((16 * half + r) * TOKEN_GROUP + 16 * v);
                *row = _mm512_loadu_si512(sums as *const __m512i);
            }
            crate::gemm512::transpose16(&mut by_row);
            for (l, by_token) in by_row.iter().enumerate().take(tokens - 16 * v) {
                _mm512_mask_storeu_ps(
                    c.add((16 * v + l) * ldc + 16 * half),
                    row_lanes,
                    _mm512_castsi512_ps(*by_token),
                );
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::gemm512::round_to_bf16_token_groups;

    /// The row-major output is the token-major one transposed, bit for bit (the same tiles, only
    /// stored another way), for shapes with partial row blocks, partial token groups and a
    /// column tail, and a row range that does not start at 0.
    #[test]
    fn row_major_output_is_the_token_major_output_transposed() {
        if !has_amx_bf16() {
            return;
        }
        for (rows, tokens, cols) in [(45usize, 70usize, 77usize), (32, 32, 64), (7, 3, 5)] {
            let w: Vec<half::bf16> = crate::testing::random_values(rows * cols, 5, 1.0)
                .into_iter()
                .map(half::bf16::from_f32)
                .collect();
            let x = crate::testing::random_values(tokens * cols, 6, 1.0);
            let mut groups = Vec::new();
            let range = 2.min(rows - 1)..rows;
            let n = range.len();
            let (mut token_major, mut row_major) =
                (vec![f32::NAN; tokens * n], vec![f32::NAN; n * tokens]);
            // SAFETY: AMX (with AVX-512 BF16) checked above; the buffers hold the products.
            unsafe {
                round_to_bf16_token_groups(&x, tokens, cols, &mut groups);
                let w = w.as_ptr();
                gemm_rows_amx(
                    w,
                    cols,
                    range.clone(),
                    groups.as_ptr(),
                    tokens,
                    token_major.as_mut_ptr(),
                    n,
                );
                gemm_rows_amx_row_major(
                    w,
                    cols,
                    range.clone(),
                    groups.as_ptr(),
                    tokens,
                    row_major.as_mut_ptr(),
                    tokens,
                );
            }
            for r in 0..n {
                for t in 0..tokens {
                    let (a, b) = (row_major[r * tokens + t], token_major[t * n + r]);
                    assert!(
                        a.to_bits() == b.to_bits(),
                        "{rows}x{tokens}x{cols}: row {r}, token {t}: row-major {a}, token-major {b}"
                    );
                }
            }
        }
    }
}
