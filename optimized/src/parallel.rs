//! Row loops split over the rayon pool when they are large enough to pay for it.
//!
//! The per-token steps between the matrix products (RMSNorms, the residual adds, RoPE) each
//! take a fraction of a millisecond on a 128-token prompt, but run on one thread they leave
//! the other idle: together about 2% of a fast prefill (measured with `perf`, samples per
//! thread). Rows are independent, so splitting them changes no result bit.

use rayon::prelude::*;

/// Loops over at least this many elements are split (a 128-token prompt's `[128, 1536]`
/// residual is 196,608; one decode token's is 1,536 and stays on the calling thread).
pub const PARALLEL_ELEMENTS: usize = 32 * 1024;

/// Rows per task: at least `PARALLEL_ELEMENTS / 4` elements, so a task outweighs its dispatch.
fn rows_per_task(row_len: usize) -> usize {
    (PARALLEL_ELEMENTS / 4).div_ceil(row_len.max(1))
}

/// `f(index, row)` for each row of `x` (`[rows, row_len]`, row-major).
pub fn for_each_row(x: &mut [f32], row_len: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    if row_len == 0 {
        return;
    }
    if x.len() >= PARALLEL_ELEMENTS {
        x.par_chunks_exact_mut(row_len)
            .with_min_len(rows_per_task(row_len))
            .enumerate()
            .for_each(|(i, row)| f(i, row));
    } else {
        x.chunks_exact_mut(row_len)
            .enumerate()
            .for_each(|(i, row)| f(i, row));
    }
}

/// `f(row of x, row of y)` for each pair of rows of `x` and `y` (both `[rows, row_len]`).
pub fn for_each_row_pair(
    x: &mut [f32],
    y: &[f32],
    row_len: usize,
    f: impl Fn(&mut [f32], &[f32]) + Sync + Send,
) {
    assert_eq!(x.len(), y.len(), "both are [rows, row_len]");
    if row_len == 0 {
        return;
    }
    if x.len() >= PARALLEL_ELEMENTS {
        x.par_chunks_exact_mut(row_len)
            .zip(y.par_chunks_exact(row_len))
            .with_min_len(rows_per_task(row_len))
            .for_each(|(a, b)| f(a, b));
    } else {
        x.chunks_exact_mut(row_len)
            .zip(y.chunks_exact(row_len))
            .for_each(|(a, b)| f(a, b));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_loops_visit_every_row_once_with_its_index_small_and_large() {
        for rows in [1, 3, 100, 1000] {
            let row_len = 67;
            let mut x = vec![0.0f32; rows * row_len];
            for_each_row(&mut x, row_len, |i, row| {
                row.iter_mut().for_each(|v| *v += i as f32)
            });
            let y: Vec<f32> = (0..rows * row_len).map(|k| k as f32).collect();
            for_each_row_pair(&mut x, &y, row_len, |a, b| {
                a.iter_mut().zip(b).for_each(|(a, b)| *a += 2.0 * b)
            });
            for (k, v) in x.iter().enumerate() {
                assert_eq!(
                    *v,
                    (k / row_len) as f32 + 2.0 * k as f32,
                    "rows {rows}, element {k}"
                );
            }
        }
    }
}
