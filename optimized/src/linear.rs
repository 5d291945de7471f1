//! Linear layers, `y = x · Wᵀ` with HF weight layout `[out, in]` (shared spec: text, notation),
//! on weights in their storage dtype.
//!
//! Kernels, chosen by the number of token rows `T` and the CPU:
//! - `T ≤ SKINNY_MAX_TOKENS` (decode, small expert groups): the hand-written skinny kernel
//!   (`simd::skinny_rows`: AVX2, or AVX-512 for one token on Intel CPUs), which streams each
//!   weight row from memory once, widening bf16/f16 in registers. Memory-bound: this is what
//!   decode speed is made of.
//! - larger `T` (prefill) on an AVX-512 CPU: the packed AVX-512 GEMM of [`crate::gemm512`], which
//!   widens bf16/f16 weights while packing them into L2-resident panels (no separate widening
//!   pass) and runs an 8 × 48 f32 FMA micro-kernel; every output is one sequential f32 FMA chain
//!   over `k`. With [`Precision::Bf16Activations`] (opt-in, bf16 weights, AVX-512 BF16 CPUs),
//!   its `vdpbf16ps` sibling on activations rounded to bf16 (6 weight rows read in place ×
//!   64 tokens per tile) — twice the multiply-adds per instruction, not the reference's
//!   arithmetic — or, where the CPU has AMX, the same arithmetic on the tile unit
//!   ([`crate::amx`], 32 weight rows × 32 tokens per tile set).
//! - larger `T` on other CPUs: the `gemm` crate's f32 GEMM on blocks of `GEMM_ROW_BLOCK` weight
//!   rows; 16-bit blocks are widened to f32 into a per-thread staging buffer first.
//!
//! All split the work over output rows in **fixed** blocks, each computed by one thread in a
//! fixed order, so the result does not depend on the number of threads (bit for bit).

use std::cell::{Cell, RefCell};

use rayon::prelude::*;

use crate::checkpoint::{Elements, Matrix};
use gemma4_reference::checkpoint::WeightDtype;

use crate::gelu::geglu_in_place;
use crate::simd::{skinny_rows, widen, Element};

/// Up to this many token rows, the skinny (GEMV-like) kernel is used.
pub const SKINNY_MAX_TOKENS: usize = 8;
/// Output rows per parallel task in the skinny kernel.
const SKINNY_ROW_BLOCK: usize = 64;
/// Weight rows per GEMM call (and per parallel task) in the `gemm` crate fallback.
const GEMM_ROW_BLOCK: usize = 128;
/// Weight rows per parallel task in the AVX-512 f32 GEMM: two packed panels for products of up
/// to [`AVX512_WIDE_BLOCK_MAX_TOKENS`] token rows (the text prefill, as before), one panel for
/// longer ones. Measured on this project's Xeon, 2 threads (`xtask bench-engine`, medians of 3–5
/// runs): the 250 frames of a 10 s clip through the E2B audio tower took 1.02 s with two-panel
/// tasks and 0.79 s with one-panel tasks, the 2304 patches of a budget-280 image through the
/// vision tower 6.07 s and 5.89 s; a 128-token E2B prefill (10 layers) showed no difference
/// beyond this machine's ±5% run-to-run spread (492–556 tok/s either way), so it keeps its
/// tasks. Outputs do not depend on the blocking (every element is one FMA chain).
const AVX512_ROW_BLOCK: usize = 2 * crate::gemm512::NR;
/// See [`AVX512_ROW_BLOCK`].
const AVX512_WIDE_BLOCK_MAX_TOKENS: usize = 128;
/// Weight rows per parallel task in the bf16 GEMM: four row blocks of its tiles (whole blocks
/// only). Small tasks even out the two threads' shares at the end of each product: 24-row tasks
/// against 96-row ones made the whole fast E2B prefill ~3% faster (medians of three
/// `xtask bench-engine --engine optimized --precision bf16` runs each, alternated); a task still
/// holds 24 · 128 · K multiply-adds.
const BF16_ROW_BLOCK: usize = 4 * crate::gemm512::BF16_ROWS;

/// Weight rows per parallel task in the AMX GEMM: two blocks of 32 rows.
const AMX_ROW_BLOCK: usize = 2 * crate::amx::BLOCK_ROWS;

/// Token rows per pass of the packed kernels over a product's weights. Every kernel reads its
/// activations once per block of weight rows, so a product of thousands of rows (a vision tower's
/// patches, an audio clip's frames) would stream them from memory for every block: at 2304
/// patches × 768 columns that was 3.5 MB of bf16 pairs per 32 AMX rows, and the AMX products of
/// the E2B vision tower ran at a tenth of the unit's rate. Passes of 256 rows keep a pass's
/// activations in L2 (256 × 3072 columns of bf16 pairs is 1.5 MB; 256 × 512 f32 columns per
/// packed chunk 0.5 MB) and read the weights once per pass instead. A multiple of 32 (the token
/// groups of the bf16 kernels) and of 8 (the f32 micro-tile): every output element is computed
/// by the same chain as without passes, bit for bit (tested). Text prompts of up to 256 tokens
/// are one pass, as before.
pub const TOKEN_PASS_ROWS: usize = 256;

/// The arithmetic of the prefill matrix products (more than `SKINNY_MAX_TOKENS` token rows).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// f32 products of the exactly widened weights and the f32 activations, f32 sums: the
    /// reference's arithmetic up to summation order. The default, and what dumps use.
    #[default]
    F32,
    /// Opt-in fast prefill: activations rounded to bf16 (relative error ≤ 2⁻⁸, the bf16 unit roundoff) and multiplied by
    /// bf16 weights with f32 sums, as torch's bf16 CPU path does: on AMX tiles where the CPU has
    /// them ([`PrefillKernel::AmxBf16`]), else with AVX-512 BF16 `vdpbf16ps` (twice the f32
    /// multiply-add rate). Applies to bf16 weights on CPUs with AVX-512 BF16; other
    /// cases, and every product of at most `SKINNY_MAX_TOKENS` rows (decode), stay [`F32`].
    /// Not within the equivalence tolerance of the reference: never used for dumps.
    ///
    /// [`F32`]: Precision::F32
    Bf16Activations,
}

thread_local! {
    /// The precision of the matrix products started by this thread ([`with_precision`]).
    static PRECISION: Cell<Precision> = const { Cell::new(Precision::F32) };
}

/// Runs `f` with the matrix products it starts on this thread (and their parallel tasks) in
/// `precision`; restores the previous setting afterwards, even on panic.
pub fn with_precision<R>(precision: Precision, f: impl FnOnce() -> R) -> R {
    struct Restore(Precision);
    impl Drop for Restore {
        fn drop(&mut self) {
            PRECISION.with(|p| p.set(self.0));
        }
    }
    let _restore = Restore(PRECISION.with(|p| p.replace(precision)));
    f()
}

/// The precision set by the innermost enclosing [`with_precision`] on this thread.
pub fn current_precision() -> Precision {
    PRECISION.with(|p| p.get())
}

/// Which kernel computes a product of more than `SKINNY_MAX_TOKENS` token rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefillKernel {
    /// The `gemm` crate on widened blocks (any CPU).
    GemmCrate,
    /// The packed AVX-512 f32 GEMM.
    Avx512,
    /// The packed AVX-512 BF16 GEMM (bf16 weights and activations).
    Avx512Bf16,
    /// The AMX GEMM (bf16 weights and activations, the tile unit).
    AmxBf16,
}

impl PrefillKernel {
    /// The kernel `linear` picks for weights of `dtype` under `precision` on this CPU.
    pub fn select(dtype: WeightDtype, precision: Precision) -> PrefillKernel {
        let bf16_products = dtype == WeightDtype::BF16 && precision == Precision::Bf16Activations;
        if bf16_products && crate::amx::has_amx_bf16() {
            PrefillKernel::AmxBf16
        } else if bf16_products && crate::gemm512::has_avx512_bf16() {
            PrefillKernel::Avx512Bf16
        } else if crate::gemm512::has_avx512() {
            PrefillKernel::Avx512
        } else {
            PrefillKernel::GemmCrate
        }
    }

    /// Whether this kernel can run here on weights of `dtype`.
    pub fn available(self, dtype: WeightDtype) -> bool {
        match self {
            PrefillKernel::GemmCrate => true,
            PrefillKernel::Avx512 => crate::gemm512::has_avx512(),
            PrefillKernel::Avx512Bf16 => {
                crate::gemm512::has_avx512_bf16() && dtype == WeightDtype::BF16
            }
            PrefillKernel::AmxBf16 => crate::amx::has_amx_bf16() && dtype == WeightDtype::BF16,
        }
    }

    /// Whether this kernel multiplies activations rounded to bf16 (the fast prefill's kernels).
    pub fn rounds_activations(self) -> bool {
        matches!(self, PrefillKernel::Avx512Bf16 | PrefillKernel::AmxBf16)
    }
}

/// A raw pointer that may cross threads: each task writes a disjoint set of elements.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method call makes closures capture the whole `Send` wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }

    /// `column` floats further on (column `column` of row 0 of a row-major matrix).
    fn column(self, column: usize) -> SendPtr {
        SendPtr(self.0.wrapping_add(column))
    }
}

/// Whether a call may spread its work over the rayon pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Threads {
    /// Split over the current rayon pool.
    Pool,
    /// Run on the calling thread (callers that are already parallel, e.g. MoE experts).
    Current,
}

/// `x` `[tokens, in]` (row-major) times `weightᵀ` → `[tokens, out]`.
pub fn linear(x: &[f32], tokens: usize, weight: &Matrix) -> Vec<f32> {
    assert_eq!(x.len(), tokens * weight.cols, "x is [tokens, in]");
    let kernel = PrefillKernel::select(weight.dtype, current_precision());
    written_by(tokens * weight.rows, |y| {
        // SAFETY: `y` has room for [tokens, rows]; `kernel` was selected as available.
        unsafe { product_into(x, tokens, weight, y, Threads::Pool, kernel) }
    })
}

/// A new buffer of `len` floats, every one of which `write` writes: it is not zeroed first (on
/// the prefill's [128, 12288] products, zeroing on the calling thread while the other waited
/// took about 1% of the pass, measured with `perf`).
fn written_by(len: usize, write: impl FnOnce(SendPtr)) -> Vec<f32> {
    let mut y = Vec::with_capacity(len);
    write(SendPtr(y.as_mut_ptr()));
    // SAFETY: `write` wrote all `len` elements (`product_into` writes every column of every
    // token row; the tests fill outputs with NaN first to check that no element is skipped).
    unsafe { y.set_len(len) };
    y
}

/// Like [`linear`], writing into `y` (`[tokens, out]`), with a choice of threading.
pub fn linear_into(x: &[f32], tokens: usize, weight: &Matrix, y: &mut [f32], threads: Threads) {
    assert_eq!(x.len(), tokens * weight.cols, "x is [tokens, in]");
    assert_eq!(y.len(), tokens * weight.rows, "y is [tokens, out]");
    if tokens == 0 || weight.rows == 0 {
        return;
    }
    let kernel = PrefillKernel::select(weight.dtype, current_precision());
    linear_into_with(x, tokens, weight, y, threads, kernel);
}

/// Like [`linear_into`] with the kernel for more than `SKINNY_MAX_TOKENS` rows chosen by the
/// caller (tests and benchmarks; `kernel` must be [`PrefillKernel::available`]).
pub fn linear_into_with(
    x: &[f32],
    tokens: usize,
    weight: &Matrix,
    y: &mut [f32],
    threads: Threads,
    kernel: PrefillKernel,
) {
    assert_eq!(y.len(), tokens * weight.rows, "y is [tokens, out]");
    // SAFETY: `y` is [tokens, rows].
    unsafe { product_into(x, tokens, weight, SendPtr(y.as_mut_ptr()), threads, kernel) }
}

/// `y = x · weightᵀ`, every element of `y` written (never read).
///
/// # Safety
/// `y` is valid for writes of `tokens · weight.rows` floats that nothing else accesses.
unsafe fn product_into(
    x: &[f32],
    tokens: usize,
    weight: &Matrix,
    y: SendPtr,
    threads: Threads,
    kernel: PrefillKernel,
) {
    assert_eq!(x.len(), tokens * weight.cols, "x is [tokens, in]");
    if tokens == 0 || weight.rows == 0 {
        return;
    }
    assert!(
        tokens <= SKINNY_MAX_TOKENS || kernel.available(weight.dtype),
        "{kernel:?} cannot run on {:?} weights on this CPU",
        weight.dtype
    );
    let route = Route::of(tokens, weight.cols, kernel);
    for (first, count) in route.token_passes(tokens) {
        let x = &x[first * weight.cols..(first + count) * weight.cols];
        let input = Input::prepare(x, count, weight.cols, route);
        let y = y.column(first * weight.rows);
        for_each_row_block(weight.rows, route.block_rows(count), threads, |block| {
            // SAFETY: `y` is [tokens, rows] from this pass's first token row; this task writes
            // only the columns `block` of the pass's rows.
            unsafe {
                route.run(
                    weight,
                    &input,
                    count,
                    y.column(block.start),
                    weight.rows,
                    block,
                )
            }
        });
    }
}

/// `x` `[tokens, in]` times each of `weights` (all `[out_i, in]`, one storage dtype) → one
/// `[tokens, out_i]` per weight: the products of one input by several matrices (q/k/v, gate/up)
/// as one parallel loop over all their row blocks. Results are those of separate [`linear`]
/// calls, bit for bit; the grouping balances small matrices (a 256-row key projection is only
/// three GEMM tasks) over the threads and rounds `x` to bf16 once in the fast prefill.
pub fn linear_group(x: &[f32], tokens: usize, weights: &[&Matrix]) -> Vec<Vec<f32>> {
    let Some(first) = weights.first() else {
        return Vec::new();
    };
    let (cols, dtype) = (first.cols, first.dtype);
    if tokens == 0 || weights.iter().any(|w| w.cols != cols || w.dtype != dtype) {
        return weights.iter().map(|w| linear(x, tokens, w)).collect();
    }
    assert_eq!(x.len(), tokens * cols, "x is [tokens, in]");
    let route = Route::of(
        tokens,
        cols,
        PrefillKernel::select(dtype, current_precision()),
    );
    let mut outputs: Vec<Vec<f32>> = weights
        .iter()
        .map(|w| Vec::with_capacity(tokens * w.rows))
        .collect();
    let outs: Vec<SendPtr> = outputs
        .iter_mut()
        .map(|y| SendPtr(y.as_mut_ptr()))
        .collect();
    let block = route.block_rows(tokens.min(TOKEN_PASS_ROWS));
    let tasks: Vec<(usize, std::ops::Range<usize>)> = weights
        .iter()
        .enumerate()
        .flat_map(|(i, w)| {
            (0..w.rows.div_ceil(block)).map(move |b| (i, b * block..((b + 1) * block).min(w.rows)))
        })
        .collect();
    for (first, count) in route.token_passes(tokens) {
        let input = Input::prepare(&x[first * cols..(first + count) * cols], count, cols, route);
        tasks.par_iter().for_each(|(i, rows)| {
            let (i, rows) = (*i, rows.clone());
            let w = weights[i].rows;
            // SAFETY: output i has room for [tokens, w]; this task writes only its columns
            // `rows` of the pass's token rows.
            unsafe {
                route.run(
                    weights[i],
                    &input,
                    count,
                    outs[i].column(first * w + rows.start),
                    w,
                    rows,
                )
            }
        });
    }
    for (y, w) in outputs.iter_mut().zip(weights) {
        // SAFETY: the tasks cover rows 0..w.rows of every output and write each of their
        // columns for every token (as in `written_by`).
        unsafe { y.set_len(tokens * w.rows) };
    }
    outputs
}

/// GeGLU of two products of one input: `gelu_tanh(x · gateᵀ) ⊙ (x · upᵀ)` → `[tokens, F]`
/// (`gate`, `up`: `[F, in]`), the first half of the MLP.
///
/// In the fast prefill (the bf16 route) it is fused: each task computes its rows of both
/// products into a per-thread buffer and writes only their GeGLU, so neither `[T, F]` product
/// is written out whole and read back by a separate pass (on a 128-token E2B prefill that pass
/// took ~5 ms and writing the second product out ~3 ms). The products are the same bits as
/// [`linear_group`]'s; the GeGLU runs on each task's rows instead of on 4096-element chunks, so an
/// element may take `simd::geglu`'s scalar tail instead of its vector form (within 3e-7,
/// tested). Every other route is [`linear_group`] then [`geglu_in_place`], as before.
pub fn linear_geglu(x: &[f32], tokens: usize, gate: &Matrix, up: &Matrix) -> Vec<f32> {
    let route = Route::of(
        tokens,
        gate.cols,
        PrefillKernel::select(gate.dtype, current_precision()),
    );
    let fused = route.rounds_activations()
        && (up.rows, up.cols, up.dtype) == (gate.rows, gate.cols, gate.dtype);
    if !fused {
        let [mut gated, up]: [Vec<f32>; 2] = linear_group(x, tokens, &[gate, up])
            .try_into()
            .expect("two products");
        geglu_in_place(&mut gated, &up);
        return gated;
    }
    assert_eq!(x.len(), tokens * gate.cols, "x is [tokens, in]");
    let (width, cols) = (gate.rows, gate.cols);
    written_by(tokens * width, |y| {
        for (first, tokens) in route.token_passes(tokens) {
            let input = Input::prepare(
                &x[first * cols..(first + tokens) * cols],
                tokens,
                cols,
                route,
            );
            let y = y.column(first * width);
            geglu_pass(gate, up, &input, tokens, route, y);
        }
    })
}

/// One pass of [`linear_geglu`]'s fused route: `tokens` rows of `input` into `y` (`[tokens, F]`).
fn geglu_pass(gate: &Matrix, up: &Matrix, input: &Input, tokens: usize, route: Route, y: SendPtr) {
    let width = gate.rows;
    for_each_row_block(width, route.block_rows(tokens), Threads::Pool, |block| {
        let w = block.len();
        GEGLU_STAGING.with(|staging| {
            let mut staging = staging.borrow_mut();
            if staging.len() < 2 * tokens * w {
                staging.resize(2 * tokens * w, 0.0);
            }
            let (gated, rest) = staging.split_at_mut(tokens * w);
            let up_rows = &mut rest[..tokens * w];
            for (weight, rows) in [(gate, &mut *gated), (up, &mut *up_rows)] {
                // SAFETY: `rows` holds [tokens, w] (rows w apart); the route's kernel was
                // selected as available; `input` holds x.
                let y = SendPtr(rows.as_mut_ptr());
                unsafe { route.run(weight, input, tokens, y, w, block.clone()) };
            }
            for (t, (g, u)) in gated
                .chunks_exact_mut(w)
                .zip(up_rows.chunks_exact(w))
                .enumerate()
            {
                crate::simd::geglu(g, u);
                // SAFETY: `y` has room for [tokens, width]; this task writes only the
                // columns `block` (every one of them, for every token).
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        g.as_ptr(),
                        y.get().add(t * width + block.start),
                        w,
                    )
                };
            }
        });
    });
}

thread_local! {
    /// [`linear_geglu`]'s per-thread buffer: one task's rows of the two products.
    static GEGLU_STAGING: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `task` on the weight rows `0..rows` cut into blocks of `block` rows, each block on one
/// thread of the pool (or all here, for `Threads::Current` or a single block). The blocks do not
/// depend on the thread count, so neither does the result.
fn for_each_row_block(
    rows: usize,
    block: usize,
    threads: Threads,
    task: impl Fn(std::ops::Range<usize>) + Sync + Send,
) {
    let blocks = rows.div_ceil(block);
    let run = |b: usize| task(b * block..((b + 1) * block).min(rows));
    match threads {
        Threads::Pool if blocks > 1 => (0..blocks).into_par_iter().for_each(run),
        _ => (0..blocks).for_each(run),
    }
}

/// The kernel that computes a product, by its number of token rows and the prefill kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    /// At most `SKINNY_MAX_TOKENS` rows (or no columns): `simd::skinny_rows`.
    Skinny,
    Prefill(PrefillKernel),
}

/// The activations as a kernel reads them.
enum Input<'a> {
    F32(&'a [f32]),
    /// Rounded to bf16 pairs once ([`crate::gemm512::round_to_bf16_token_groups`]), with the
    /// f32 rows for the skinny kernel.
    Bf16Pairs(&'a [f32], Vec<u32>),
}

thread_local! {
    /// The rounded activations' buffer of this thread's last product, kept for its next one:
    /// a fresh 0.4–1.5 MB buffer per product was a fresh mapping each time, and its page faults
    /// took ~1.5% of `prefill_gemm` (`perf`, one thread).
    static SPARE_PAIRS: Cell<Vec<u32>> = const { Cell::new(Vec::new()) };
}

impl Drop for Input<'_> {
    fn drop(&mut self) {
        if let Input::Bf16Pairs(_, pairs) = self {
            SPARE_PAIRS.set(std::mem::take(pairs));
        }
    }
}

impl<'a> Input<'a> {
    fn prepare(x: &'a [f32], tokens: usize, cols: usize, route: Route) -> Input<'a> {
        #[cfg(target_arch = "x86_64")]
        if route.rounds_activations() {
            let mut pairs = SPARE_PAIRS.take();
            // SAFETY: the bf16 routes are only chosen where AVX-512 BF16 is available.
            unsafe { crate::gemm512::round_to_bf16_token_groups(x, tokens, cols, &mut pairs) };
            return Input::Bf16Pairs(x, pairs);
        }
        let _ = (tokens, cols, route);
        Input::F32(x)
    }

    fn f32(&self) -> &[f32] {
        match self {
            Input::F32(x) | Input::Bf16Pairs(x, _) => x,
        }
    }
}

impl Route {
    fn of(tokens: usize, cols: usize, kernel: PrefillKernel) -> Route {
        if tokens <= SKINNY_MAX_TOKENS || cols == 0 {
            Route::Skinny
        } else {
            Route::Prefill(kernel)
        }
    }

    /// The passes `(first token row, rows)` of a product of `tokens` rows: passes of
    /// [`TOKEN_PASS_ROWS`] for the packed AVX-512 and bf16 kernels (whose outputs do not depend
    /// on them), one pass for the others.
    fn token_passes(self, tokens: usize) -> impl Iterator<Item = (usize, usize)> {
        let pass = match self {
            Route::Prefill(
                PrefillKernel::Avx512 | PrefillKernel::Avx512Bf16 | PrefillKernel::AmxBf16,
            ) => TOKEN_PASS_ROWS,
            _ => tokens.max(1),
        };
        (0..tokens)
            .step_by(pass)
            .map(move |first| (first, pass.min(tokens - first)))
    }

    /// Whether the route's kernel reads the activations rounded to bf16 pairs.
    fn rounds_activations(self) -> bool {
        matches!(self, Route::Prefill(kernel) if kernel.rounds_activations())
    }

    /// Weight rows per parallel task, for a product of `tokens` token rows (per pass).
    fn block_rows(self, tokens: usize) -> usize {
        match self {
            Route::Prefill(PrefillKernel::Avx512) if tokens > AVX512_WIDE_BLOCK_MAX_TOKENS => {
                crate::gemm512::NR
            }
            Route::Skinny => SKINNY_ROW_BLOCK,
            Route::Prefill(PrefillKernel::GemmCrate) => GEMM_ROW_BLOCK,
            Route::Prefill(PrefillKernel::Avx512Bf16) => BF16_ROW_BLOCK,
            Route::Prefill(PrefillKernel::AmxBf16) => AMX_ROW_BLOCK,
            Route::Prefill(_) => AVX512_ROW_BLOCK,
        }
    }

    /// `y[:, block] = x · weight[block, :]ᵀ` on this thread, where `y` points at element
    /// `(0, block.start)` and its rows are `y_stride` floats apart.
    ///
    /// # Safety
    /// `y` is valid for writes of `tokens` rows of `block.len()` floats, `y_stride` apart, which
    /// no other task writes; `block` ⊆ `0..weight.rows`; `input` holds `tokens` rows of
    /// `weight.cols`; the route's kernel is available for `weight.dtype` on this CPU.
    #[allow(clippy::too_many_arguments)]
    unsafe fn run(
        self,
        weight: &Matrix,
        input: &Input,
        tokens: usize,
        y: SendPtr,
        y_stride: usize,
        block: std::ops::Range<usize>,
    ) {
        let (cols, b) = (weight.cols, block);
        match weight.elements() {
            Elements::F32(w) => self.run_typed(w, cols, input, tokens, y, y_stride, b),
            Elements::BF16(w) => self.run_typed(w, cols, input, tokens, y, y_stride, b),
            Elements::F16(w) => self.run_typed(w, cols, input, tokens, y, y_stride, b),
        }
    }

    #[allow(clippy::too_many_arguments)]
    unsafe fn run_typed<E: Element>(
        self,
        w: &[E],
        cols: usize,
        input: &Input,
        tokens: usize,
        y: SendPtr,
        y_stride: usize,
        block: std::ops::Range<usize>,
    ) {
        let x = input.f32();
        match (self, input) {
            (Route::Skinny, _) => skinny_rows(
                w.as_ptr(),
                cols,
                block,
                x.as_ptr(),
                tokens,
                y.get(),
                y_stride,
            ),
            #[cfg(target_arch = "x86_64")]
            (
                Route::Prefill(kernel @ (PrefillKernel::Avx512Bf16 | PrefillKernel::AmxBf16)),
                Input::Bf16Pairs(_, pairs),
            ) => {
                let product = if kernel == PrefillKernel::AmxBf16 {
                    crate::amx::gemm_rows_amx
                } else {
                    crate::gemm512::gemm_rows_bf16
                };
                // E is bf16 (the bf16 routes are chosen for bf16 weights only).
                product(
                    w.as_ptr() as *const half::bf16,
                    cols,
                    block,
                    pairs.as_ptr(),
                    tokens,
                    y.get(),
                    y_stride,
                )
            }
            #[cfg(target_arch = "x86_64")]
            (Route::Prefill(PrefillKernel::Avx512), _) => crate::gemm512::gemm_rows_f32(
                w.as_ptr(),
                cols,
                block,
                x.as_ptr(),
                tokens,
                y.get(),
                y_stride,
            ),
            _ => gemm_block(w, cols, block, x, tokens, y, y_stride),
        }
    }
}

thread_local! {
    /// Per-thread staging buffer for widened 16-bit weight blocks.
    static STAGING: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `y[:, rows] = x · W[rows, :]ᵀ` with one single-threaded f32 GEMM call (`y` points at
/// element `(0, rows.start)`, its rows `y_stride` apart).
fn gemm_block<E: Element>(
    w: &[E],
    cols: usize,
    rows: std::ops::Range<usize>,
    x: &[f32],
    tokens: usize,
    y: SendPtr,
    y_stride: usize,
) {
    let n = rows.len();
    let block = &w[rows.start * cols..rows.end * cols];
    let run = |wf: &[f32]| {
        // SAFETY: dst is y[:, rows] (from `y`, row stride y_stride, column stride 1), written
        // only by this task; lhs = x [tokens, cols]; rhs = W_blockᵀ: element (k, j) is wf[j·cols + k].
        unsafe {
            gemm::gemm(
                tokens,
                n,
                cols,
                y.get(),
                1,
                y_stride as isize,
                false,
                x.as_ptr(),
                1,
                cols as isize,
                wf.as_ptr(),
                cols as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
    };
    if std::any::TypeId::of::<E>() == std::any::TypeId::of::<f32>() {
        // SAFETY: E is f32 (checked above), same layout.
        let wf = unsafe { std::slice::from_raw_parts(block.as_ptr() as *const f32, block.len()) };
        run(wf);
    } else {
        STAGING.with(|staging| {
            let mut staging = staging.borrow_mut();
            staging.resize(block.len(), 0.0);
            widen(block, &mut staging);
            run(&staging);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gemma4_reference::linear::linear as reference_linear;
    use half::bf16;
    use ndarray::Array2;

    pub(crate) fn random(n: usize, seed: u64) -> Vec<f32> {
        crate::testing::random_values(n, seed, 1.0)
    }

    fn check(tokens: usize, rows: usize, cols: usize, dtype16: bool) {
        let mut w = random(rows * cols, 7 + rows as u64);
        if dtype16 {
            w.iter_mut().for_each(|v| *v = bf16::from_f32(*v).to_f32());
        }
        let x = random(tokens * cols, 11 + tokens as u64);
        let matrix = if dtype16 {
            Matrix::from_bf16(rows, cols, w.iter().map(|&v| bf16::from_f32(v)).collect())
        } else {
            Matrix::from_f32(rows, cols, w.clone())
        };
        let got = linear(&x, tokens, &matrix);
        let expected = reference_linear(
            Array2::from_shape_vec((tokens, cols), x).unwrap().view(),
            &Array2::from_shape_vec((rows, cols), w).unwrap(),
        );
        for t in 0..tokens {
            for r in 0..rows {
                let (g, e) = (got[t * rows + r], expected[[t, r]]);
                // Both are f32 sums of `cols` products of size <= 1 in different orders: the
                // difference is bounded by about 2·cols·2^-24 ≈ cols·1.2e-7.
                let bound = cols as f32 * 1.2e-7 + 1e-6;
                assert!(
                    (g - e).abs() <= bound,
                    "tokens={tokens} rows={rows} cols={cols} bf16={dtype16}: y[{t}, {r}] = {g}, reference {e}, |Δ| = {:.3e} > {bound:.3e}",
                    (g - e).abs()
                );
            }
        }
    }

    #[test]
    fn linear_skinny_and_gemm_match_reference_f32_and_bf16() {
        for &(tokens, rows, cols) in &[
            (1, 70, 33),
            (3, 130, 64),
            (8, 65, 100),
            (9, 257, 48),
            (40, 300, 96),
        ] {
            check(tokens, rows, cols, false);
            check(tokens, rows, cols, true);
        }
    }

    /// The three storage types of a weight, made from the same values (rounded to the type).
    fn matrices(rows: usize, cols: usize, seed: u64) -> Vec<(WeightDtype, Matrix, Vec<f32>)> {
        let w = random(rows * cols, seed);
        let bf: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let hf: Vec<half::f16> = w.iter().map(|&v| half::f16::from_f32(v)).collect();
        vec![
            (
                WeightDtype::F32,
                Matrix::from_f32(rows, cols, w.clone()),
                w.clone(),
            ),
            (
                WeightDtype::BF16,
                Matrix::from_bf16(rows, cols, bf.clone()),
                bf.iter().map(|v| v.to_f32()).collect(),
            ),
            (
                WeightDtype::F16,
                Matrix::from_f16(rows, cols, hf.clone()),
                hf.iter().map(|v| v.to_f32()).collect(),
            ),
        ]
    }

    /// Shapes that cross every blocking boundary of the prefill kernels: token counts around the
    /// 8-row micro-tile, weight rows around the 48-row panel and the 96-row task, columns odd,
    /// around the 16/32-column transposes and across the 512-column chunk.
    const AWKWARD_SHAPES: [(usize, usize, usize); 10] = [
        (9, 1, 1),
        (49, 13, 66),
        (64, 7, 129),
        (100, 25, 47),
        (9, 47, 31),
        (17, 49, 33),
        (16, 97, 64),
        (23, 130, 513),
        (33, 96, 1100),
        (10, 200, 1537),
    ];

    /// The plain sequential f32 dot product of the reference arithmetic: one FMA chain over `k`.
    fn sequential_fma(w: &[f32], x: &[f32], tokens: usize, rows: usize, cols: usize) -> Vec<f32> {
        let mut y = vec![0.0f32; tokens * rows];
        for t in 0..tokens {
            for r in 0..rows {
                let mut acc = 0.0f32;
                for k in 0..cols {
                    acc = w[r * cols + k].mul_add(x[t * cols + k], acc);
                }
                y[t * rows + r] = acc;
            }
        }
        y
    }

    #[test]
    fn every_f32_prefill_kernel_matches_the_sequential_dot_product_on_awkward_shapes() {
        for &(tokens, rows, cols) in &AWKWARD_SHAPES {
            let x = random(tokens * cols, 5 + cols as u64);
            for (dtype, matrix, widened) in matrices(rows, cols, 3 + rows as u64) {
                let expected = sequential_fma(&widened, &x, tokens, rows, cols);
                for kernel in [PrefillKernel::GemmCrate, PrefillKernel::Avx512] {
                    if !kernel.available(dtype) {
                        continue;
                    }
                    let mut got = vec![f32::NAN; tokens * rows];
                    linear_into_with(&x, tokens, &matrix, &mut got, Threads::Pool, kernel);
                    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
                        let exact = g.to_bits() == e.to_bits();
                        // The AVX-512 kernel *is* the sequential FMA chain (exact widening, one
                        // chain per output, chunks stored and reloaded exactly): bit for bit.
                        // The gemm crate sums in its own order: f32 reassociation of `cols`
                        // products of size <= 1, bounded by about cols·2^-23.
                        let close = (g - e).abs() <= cols as f32 * 1.2e-7 + 1e-6;
                        let ok = if kernel == PrefillKernel::Avx512 {
                            exact
                        } else {
                            close
                        };
                        assert!(
                            ok,
                            "{kernel:?} on {dtype:?} weights, tokens={tokens} rows={rows} cols={cols}: y[{}, {}] = {g}, sequential FMA {e}",
                            i / rows,
                            i % rows
                        );
                    }
                }
            }
        }
    }

    /// `vdpbf16ps` on one lane, as its specification orders it (DAZ/FTZ aside): the odd
    /// product, then the even one, each rounded as it is added to the f32 sum.
    fn dot_bf16_pairs(w: &[f32], x: &[f32]) -> f32 {
        let mut sum = 0.0f32;
        for (wp, xp) in w.chunks(2).zip(x.chunks(2)) {
            let odd = match (wp.get(1), xp.get(1)) {
                (Some(a), Some(b)) => a * b,
                _ => 0.0,
            };
            sum += odd;
            sum += wp[0] * xp[0];
        }
        sum
    }

    /// Random activations `x` (`[tokens, cols]`) and their bf16 rounding, a random bf16 matrix
    /// (`[rows, cols]`) as values, and `kernel`'s product of the two (its output filled with NaN
    /// first, so an element it does not write shows). The same shape gives the same inputs.
    struct Bf16Product {
        x: Vec<f32>,
        x_rounded: Vec<f32>,
        widened: Vec<f32>,
        got: Vec<f32>,
    }

    fn bf16_product(tokens: usize, rows: usize, cols: usize, kernel: PrefillKernel) -> Bf16Product {
        let x = random(tokens * cols, 5 + cols as u64);
        let x_rounded = x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
        let (_, matrix, widened) = matrices(rows, cols, 3 + rows as u64).remove(1);
        let mut got = vec![f32::NAN; tokens * rows];
        linear_into_with(&x, tokens, &matrix, &mut got, Threads::Pool, kernel);
        Bf16Product {
            x,
            x_rounded,
            widened,
            got,
        }
    }

    /// The bf16 kernel is exactly `vdpbf16ps`'s chain over the pairs (bit for bit against the
    /// scalar model [`dot_bf16_pairs`]), and so within the bf16 rounding of the activations of
    /// the f32 result.
    #[test]
    fn bf16_activation_kernel_is_the_vdpbf16ps_chain_within_the_activation_rounding() {
        if !PrefillKernel::Avx512Bf16.available(WeightDtype::BF16) {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            return;
        }
        for &(tokens, rows, cols) in &AWKWARD_SHAPES {
            let Bf16Product {
                x,
                x_rounded,
                widened,
                got,
                ..
            } = bf16_product(tokens, rows, cols, PrefillKernel::Avx512Bf16);
            let exact_inputs = sequential_fma(&widened, &x, tokens, rows, cols);
            for t in 0..tokens {
                for r in 0..rows {
                    let i = t * rows + r;
                    let chain = dot_bf16_pairs(
                        &widened[r * cols..][..cols],
                        &x_rounded[t * cols..][..cols],
                    );
                    assert_eq!(
                        got[i].to_bits(),
                        chain.to_bits(),
                        "tokens={tokens} rows={rows} cols={cols}: y[{t}, {r}] = {}, vdpbf16ps chain {chain}",
                        got[i]
                    );
                    let magnitude: f32 = (0..cols)
                        .map(|k| (widened[r * cols + k] * x[t * cols + k]).abs())
                        .sum();
                    // Against the f32 activations: each is rounded by at most 2^-8 relative (bf16
                    // unit roundoff), plus the f32 summation in another order (pairs, denormals
                    // flushed): cols·2^-23 of Σ|w·x|.
                    let rounding = magnitude * (2f32.powi(-8) + cols as f32 * 1.2e-7) + 1e-6;
                    assert!(
                        (got[i] - exact_inputs[i]).abs() <= rounding,
                        "tokens={tokens} rows={rows} cols={cols}: y[{t}, {r}] = {}, f32 {}, bound {rounding}",
                        got[i],
                        exact_inputs[i]
                    );
                }
            }
        }
    }

    /// The AMX kernel is the dot product of the bf16 values (weights, rounded activations) up to
    /// f32 summation error, on shapes crossing its 32-row blocks, 32-column steps, 16-row half
    /// blocks and 32-token groups; and so it is the `vdpbf16ps` kernel up to that error too.
    #[test]
    fn amx_kernel_is_the_bf16_dot_product_within_f32_summation_error() {
        if !PrefillKernel::AmxBf16.available(WeightDtype::BF16) {
            eprintln!("skipped: this CPU (or OS) has no AMX-BF16");
            return;
        }
        let amx_shapes = [
            (32, 32, 32),
            (64, 64, 64),
            (65, 17, 96),
            (31, 33, 100),
            (128, 160, 1024),
        ];
        for &(tokens, rows, cols) in AWKWARD_SHAPES.iter().chain(&amx_shapes) {
            let Bf16Product {
                x_rounded,
                widened,
                got,
                ..
            } = bf16_product(tokens, rows, cols, PrefillKernel::AmxBf16);
            // The same product by the `vdpbf16ps` kernel (NaN where it cannot run here).
            let vector_kernel = if PrefillKernel::Avx512Bf16.available(WeightDtype::BF16) {
                bf16_product(tokens, rows, cols, PrefillKernel::Avx512Bf16).got
            } else {
                vec![f32::NAN; tokens * rows]
            };
            for t in 0..tokens {
                for r in 0..rows {
                    let (w, xr) = (&widened[r * cols..][..cols], &x_rounded[t * cols..][..cols]);
                    let exact: f64 = w.iter().zip(xr).map(|(&a, &b)| a as f64 * b as f64).sum();
                    let magnitude: f64 = w
                        .iter()
                        .zip(xr)
                        .map(|(&a, &b)| (a as f64 * b as f64).abs())
                        .sum();
                    // Products of bf16 values are exact in f32 (8-bit significands), so the only
                    // error is the f32 additions': in any order, n additions err by at most
                    // n·2⁻²⁴·Σ|products| (Higham's γₙ, to first order). A product lost or
                    // misplaced errs by ~1/cols of the magnitude, far above it.
                    let bound = cols as f64 * 2f64.powi(-24) * magnitude + 1e-30;
                    let i = t * rows + r;
                    let error = (got[i] as f64 - exact).abs();
                    assert!(
                        error <= bound,
                        "tokens={tokens} rows={rows} cols={cols}: y[{t}, {r}] = {}, exact {exact}, |Δ| = {error:.3e} > {bound:.3e}",
                        got[i]
                    );
                    // The AVX-512 kernel's result is within the same bound of the exact sum.
                    let between = (got[i] - vector_kernel[i]).abs() as f64;
                    assert!(
                        vector_kernel[i].is_nan() || between <= 2.0 * bound,
                        "tokens={tokens} rows={rows} cols={cols}: y[{t}, {r}] = {}, vdpbf16ps {}",
                        got[i],
                        vector_kernel[i]
                    );
                }
            }
        }
    }

    #[test]
    fn every_prefill_kernel_is_independent_of_thread_count() {
        let (tokens, rows, cols) = (20, 700, 600);
        let x = random(tokens * cols, 4);
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let three = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        for (dtype, matrix, _) in matrices(rows, cols, 3) {
            for kernel in [
                PrefillKernel::GemmCrate,
                PrefillKernel::Avx512,
                PrefillKernel::Avx512Bf16,
                PrefillKernel::AmxBf16,
            ] {
                if !kernel.available(dtype) {
                    continue;
                }
                let run = |pool: &rayon::ThreadPool| {
                    let mut y = vec![0.0f32; tokens * rows];
                    pool.install(|| {
                        linear_into_with(&x, tokens, &matrix, &mut y, Threads::Pool, kernel)
                    });
                    y
                };
                let (a, b) = (run(&one), run(&three));
                assert!(
                    a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()),
                    "{kernel:?} on {dtype:?}: results differ between 1 and 3 threads"
                );
            }
        }
    }

    /// Token passes ([`TOKEN_PASS_ROWS`]) change no output: a 600-row product (passes of 256,
    /// 256, 88) equals, bit for bit, the products of its rows 300..600 alone (passes of 256, 44,
    /// starting elsewhere) and of its first 40 rows (one pass), for every packed kernel and
    /// weight dtype it runs on.
    #[test]
    fn token_passes_change_no_output() {
        let (tokens, rows, cols) = (600, 70, 96);
        assert!(tokens > 2 * TOKEN_PASS_ROWS);
        let x = random(tokens * cols, 41);
        for (dtype, matrix, _) in matrices(rows, cols, 42) {
            for kernel in [
                PrefillKernel::Avx512,
                PrefillKernel::Avx512Bf16,
                PrefillKernel::AmxBf16,
            ] {
                if !kernel.available(dtype) {
                    continue;
                }
                let product = |first: usize, count: usize| {
                    let mut y = vec![f32::NAN; count * rows];
                    let x = &x[first * cols..(first + count) * cols];
                    linear_into_with(x, count, &matrix, &mut y, Threads::Pool, kernel);
                    y
                };
                let whole = product(0, tokens);
                for (first, count) in [(300, 300), (0, 40)] {
                    let part = product(first, count);
                    let same = &whole[first * rows..(first + count) * rows];
                    if let Some(i) =
                        (0..part.len()).find(|&i| part[i].to_bits() != same[i].to_bits())
                    {
                        panic!(
                            "{kernel:?} on {dtype:?}: y[{}, {}] = {} in the whole product, {} in rows {first}..{}",
                            first + i / rows,
                            i % rows,
                            same[i],
                            part[i],
                            first + count
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn precision_selects_the_kernel_and_is_restored() {
        assert_eq!(current_precision(), Precision::F32);
        with_precision(Precision::Bf16Activations, || {
            assert_eq!(current_precision(), Precision::Bf16Activations);
            let expected = if crate::amx::has_amx_bf16() {
                PrefillKernel::AmxBf16
            } else if crate::gemm512::has_avx512_bf16() {
                PrefillKernel::Avx512Bf16
            } else {
                PrefillKernel::select(WeightDtype::BF16, Precision::F32)
            };
            assert_eq!(
                PrefillKernel::select(WeightDtype::BF16, current_precision()),
                expected
            );
            // f32 and f16 weights never take a bf16 path.
            for dtype in [WeightDtype::F32, WeightDtype::F16] {
                assert!(!PrefillKernel::select(dtype, current_precision()).rounds_activations());
            }
        });
        assert_eq!(current_precision(), Precision::F32);
    }

    /// The fused GeGLU of the bf16 route is the unfused one up to `simd::geglu`'s vector/scalar
    /// difference (3e-7 relative, its own test), and every other route is the unfused one, bit
    /// for bit.
    #[test]
    fn linear_geglu_equals_products_then_geglu() {
        for &(tokens, rows, cols) in &[
            (9, 13, 66),
            (64, 50, 129),
            (100, 24, 47),
            (3, 30, 20),
            (600, 40, 70),
        ] {
            let x = random(tokens * cols, 17 + cols as u64);
            let (_, gate, _) = matrices(rows, cols, 5 + rows as u64).remove(1);
            let (_, up, _) = matrices(rows, cols, 6 + rows as u64).remove(1);
            for precision in [Precision::F32, Precision::Bf16Activations] {
                let (fused, products) = with_precision(precision, || {
                    let products = linear_group(&x, tokens, &[&gate, &up]);
                    (linear_geglu(&x, tokens, &gate, &up), products)
                });
                let (g, u) = (&products[0], &products[1]);
                let mut unfused = g.clone();
                geglu_in_place(&mut unfused, u);
                let route = Route::of(tokens, cols, PrefillKernel::select(gate.dtype, precision));
                let exact = !route.rounds_activations();
                for (i, (f, e)) in fused.iter().zip(&unfused).enumerate() {
                    // Both forms of `simd::geglu` are within 3e-7·max(|g|, 1)·|u| of the
                    // reference's, so within twice that of each other.
                    let bound = 6e-7 * g[i].abs().max(1.0) * u[i].abs();
                    let ok = if exact {
                        f.to_bits() == e.to_bits()
                    } else {
                        (f - e).abs() <= bound
                    };
                    assert!(
                        ok,
                        "{tokens}x{rows}x{cols} {precision:?}: [{}, {}] fused {f} vs {e}",
                        i / rows,
                        i % rows
                    );
                }
            }
        }
    }

    /// `linear_group` = separate `linear` calls, bit for bit: for skinny and prefill token
    /// counts, in both precisions, on 1 and 3 threads, for matrices of one dtype (one parallel
    /// loop) and of mixed dtypes (the fallback), with row counts that leave partial blocks.
    #[test]
    fn linear_group_equals_separate_products() {
        let cols = 70;
        let shapes = [(300usize, 11u64), (50, 12), (97, 13)];
        let all = |seed_shift: u64| -> Vec<Vec<(WeightDtype, Matrix, Vec<f32>)>> {
            shapes
                .iter()
                .map(|&(rows, seed)| matrices(rows, cols, seed + seed_shift))
                .collect()
        };
        let by_dtype = all(0);
        let pools: Vec<rayon::ThreadPool> = [1, 3]
            .iter()
            .map(|&n| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .build()
                    .unwrap()
            })
            .collect();
        for tokens in [1, 5, 8, 9, 40] {
            let x = random(tokens * cols, 20 + tokens as u64);
            for precision in [Precision::F32, Precision::Bf16Activations] {
                for dtype_index in 0..3 {
                    let same: Vec<&Matrix> = by_dtype.iter().map(|m| &m[dtype_index].1).collect();
                    // Mixed: each matrix in another dtype.
                    let mixed: Vec<&Matrix> = by_dtype
                        .iter()
                        .enumerate()
                        .map(|(i, m)| &m[(dtype_index + i) % 3].1)
                        .collect();
                    for group in [&same, &mixed] {
                        let expected: Vec<Vec<f32>> = with_precision(precision, || {
                            group.iter().map(|w| linear(&x, tokens, w)).collect()
                        });
                        for pool in &pools {
                            let got = pool.install(|| {
                                with_precision(precision, || linear_group(&x, tokens, group))
                            });
                            for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
                                assert!(
                                    g.len() == e.len()
                                        && g.iter().zip(e).all(|(a, b)| a.to_bits() == b.to_bits()),
                                    "tokens={tokens} {precision:?} dtype #{dtype_index} matrix {i}: group result differs"
                                );
                            }
                        }
                    }
                }
            }
        }
        assert!(linear_group(&[], 0, &[]).is_empty());
    }
}
