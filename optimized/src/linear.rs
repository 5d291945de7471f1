//! Linear layers, `y = x · Wᵀ` with HF weight layout `[out, in]` (shared spec: text, notation),
//! on weights in their storage dtype.
//!
//! Two kernels, chosen by the number of token rows `T`:
//! - `T ≤ SKINNY_MAX_TOKENS` (decode, small expert groups): the hand-written AVX2 skinny kernel
//!   (`simd::skinny_rows`), which streams each weight row from memory once, widening bf16/f16 in
//!   registers. Memory-bound: this is what decode speed is made of.
//! - larger `T` (prefill): the `gemm` crate's f32 GEMM on blocks of `GEMM_ROW_BLOCK` weight rows;
//!   16-bit blocks are widened to f32 into a per-thread staging buffer first (the widening costs
//!   one pass over the block, amortised over `T` tokens).
//!
//! Both split the work over output rows in **fixed** blocks, each computed by one thread in a
//! fixed order, so the result does not depend on the number of threads (bit for bit).

use std::cell::RefCell;

use rayon::prelude::*;

use crate::checkpoint::{Elements, Matrix};
use crate::simd::{skinny_rows, widen, Element};

/// Up to this many token rows, the skinny (GEMV-like) kernel is used.
pub const SKINNY_MAX_TOKENS: usize = 8;
/// Output rows per parallel task in the skinny kernel.
const SKINNY_ROW_BLOCK: usize = 64;
/// Weight rows per GEMM call (and per parallel task) in the prefill kernel.
const GEMM_ROW_BLOCK: usize = 128;

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
    let mut y = vec![0.0f32; tokens * weight.rows];
    linear_into(x, tokens, weight, &mut y, Threads::Pool);
    y
}

/// Like [`linear`], writing into `y` (`[tokens, out]`), with a choice of threading.
pub fn linear_into(x: &[f32], tokens: usize, weight: &Matrix, y: &mut [f32], threads: Threads) {
    assert_eq!(x.len(), tokens * weight.cols, "x is [tokens, in]");
    assert_eq!(y.len(), tokens * weight.rows, "y is [tokens, out]");
    if tokens == 0 || weight.rows == 0 {
        return;
    }
    match weight.elements() {
        Elements::F32(w) => dispatch(w, weight.rows, weight.cols, x, tokens, y, threads),
        Elements::BF16(w) => dispatch(w, weight.rows, weight.cols, x, tokens, y, threads),
        Elements::F16(w) => dispatch(w, weight.rows, weight.cols, x, tokens, y, threads),
    }
}

fn dispatch<E: Element>(
    w: &[E],
    rows: usize,
    cols: usize,
    x: &[f32],
    tokens: usize,
    y: &mut [f32],
    threads: Threads,
) {
    let out = SendPtr(y.as_mut_ptr());
    if tokens <= SKINNY_MAX_TOKENS || cols == 0 {
        let blocks = rows.div_ceil(SKINNY_ROW_BLOCK);
        let task = |b: usize| {
            let start = b * SKINNY_ROW_BLOCK;
            let end = (start + SKINNY_ROW_BLOCK).min(rows);
            // SAFETY: rows start..end of w exist; x is [tokens, cols]; this task writes only
            // columns start..end of y, which no other task writes.
            unsafe {
                skinny_rows(
                    w.as_ptr(),
                    cols,
                    start..end,
                    x.as_ptr(),
                    tokens,
                    out.get().add(start),
                    rows,
                )
            };
        };
        match threads {
            Threads::Pool if blocks > 1 => (0..blocks).into_par_iter().for_each(task),
            _ => (0..blocks).for_each(task),
        }
        return;
    }
    let blocks = rows.div_ceil(GEMM_ROW_BLOCK);
    let task = |b: usize| {
        let start = b * GEMM_ROW_BLOCK;
        let end = (start + GEMM_ROW_BLOCK).min(rows);
        gemm_block(w, cols, start..end, x, tokens, out, rows);
    };
    match threads {
        Threads::Pool if blocks > 1 => (0..blocks).into_par_iter().for_each(task),
        _ => (0..blocks).for_each(task),
    }
}

thread_local! {
    /// Per-thread staging buffer for widened 16-bit weight blocks.
    static STAGING: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `y[:, rows] = x · W[rows, :]ᵀ` with one single-threaded f32 GEMM call.
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
        // SAFETY: dst is y[:, rows] (row stride y_stride, column stride 1), written only by this
        // task; lhs = x [tokens, cols]; rhs = W_blockᵀ: element (k, j) is wf[j·cols + k].
        unsafe {
            gemm::gemm(
                tokens,
                n,
                cols,
                y.get().add(rows.start),
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

    #[test]
    fn linear_result_is_independent_of_thread_count() {
        let (tokens, rows, cols) = (20, 700, 96);
        let w = Matrix::from_f32(rows, cols, random(rows * cols, 3));
        let x = random(tokens * cols, 4);
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let three = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let a = one.install(|| linear(&x, tokens, &w));
        let b = three.install(|| linear(&x, tokens, &w));
        assert!(
            a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()),
            "results differ between 1 and 3 threads"
        );
    }
}
