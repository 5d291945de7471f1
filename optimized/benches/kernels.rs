//! Kernel benchmarks (criterion): the matrix products that make up a forward pass, at E2B sizes.
//!
//! - decode GEMV, `[1, 1536] x [6144, 1536]ᵀ`: the skinny kernel (AVX2, or AVX-512 on Intel
//!   CPUs) on bf16 and f32 weights;
//! - prefill GEMM, `[128, 1536] x [6144, 1536]ᵀ` (and `[128, 6144] x [1536, 6144]ᵀ`, the down
//!   projection): every prefill kernel of `linear` on bf16 weights — the `gemm` crate on widened
//!   blocks (the fallback), the packed AVX-512 f32 GEMM (the default on AVX-512 CPUs), the
//!   opt-in fast-prefill GEMMs (AVX-512 BF16 `vdpbf16ps`, and AMX where the CPU has it) — and the
//!   `gemm` crate / AVX-512 f32 on f32 weights.
//!
//! - K=V key rebuild: one decode step's keys of a K=V layer (31B's global layers: 4 KV heads of
//!   512, p-RoPE 0.25) rebuilt from a cache of 4096 positions (`KvCache::segments`);
//! - decode attention: one token's 32 query heads over 4096 cached positions of 4 KV heads of
//!   512 (31B's global layers; `attention::attend`);
//! - vision attention: the 2520 patches of one image at budget 280 through the on-device
//!   tower's 12 heads × 64 (`vision::encoder_layer::attend_patches`).
//!
//! With `--features openblas-bench` (needs `apt-get install libopenblas-dev`), the same shapes
//! through OpenBLAS `cblas_sgemm` / `cblas_sgemv` (f32 only: OpenBLAS has no bf16 GEMM here),
//! on OpenBLAS's own 2-thread pool, for the BLAS choice documented in the README.
//!
//! Run: `RAYON_NUM_THREADS=2 cargo bench -p gemma4-optimized [--features openblas-bench]`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use gemma4_optimized::checkpoint::Matrix;
use gemma4_optimized::kv_cache::KvCache;
use gemma4_optimized::linear::{linear, linear_into_with, PrefillKernel, Threads};
use gemma4_optimized::mask::ImageBlocks;
use gemma4_optimized::synthetic::{attention_layer, random_values};
use gemma4_reference::checkpoint::WeightDtype;
use half::bf16;

const D: usize = 1536;
const F: usize = 6144;
const T: usize = 128;

#[cfg(feature = "openblas-bench")]
mod openblas {
    #[link(name = "openblas")]
    extern "C" {
        pub fn cblas_sgemm(
            layout: i32,
            trans_a: i32,
            trans_b: i32,
            m: i32,
            n: i32,
            k: i32,
            alpha: f32,
            a: *const f32,
            lda: i32,
            b: *const f32,
            ldb: i32,
            beta: f32,
            c: *mut f32,
            ldc: i32,
        );
        pub fn cblas_sgemv(
            layout: i32,
            trans: i32,
            m: i32,
            n: i32,
            alpha: f32,
            a: *const f32,
            lda: i32,
            x: *const f32,
            incx: i32,
            beta: f32,
            y: *mut f32,
            incy: i32,
        );
        pub fn openblas_set_num_threads(n: i32);
    }
    pub const ROW_MAJOR: i32 = 101;
    pub const NO_TRANS: i32 = 111;
    pub const TRANS: i32 = 112;
}

fn matrices() -> (Vec<f32>, Matrix, Matrix) {
    let w = random_values(F * D, 1, 0.05);
    let f32_matrix = Matrix::from_f32(F, D, w.clone());
    let bf16_matrix = Matrix::from_bf16(F, D, w.iter().map(|&v| bf16::from_f32(v)).collect());
    (w, f32_matrix, bf16_matrix)
}

fn decode_gemv(c: &mut Criterion) {
    let (_w, f32_matrix, bf16_matrix) = matrices();
    let x = random_values(D, 2, 1.0);
    let mut group = c.benchmark_group("decode_gemv_1x1536x6144");
    group.throughput(Throughput::Bytes((F * D * 2) as u64));
    group.bench_function("skinny_bf16", |b| b.iter(|| linear(&x, 1, &bf16_matrix)));
    group.throughput(Throughput::Bytes((F * D * 4) as u64));
    group.bench_function("skinny_f32", |b| b.iter(|| linear(&x, 1, &f32_matrix)));
    #[cfg(feature = "openblas-bench")]
    {
        let mut y = vec![0.0f32; F];
        unsafe { openblas::openblas_set_num_threads(2) };
        group.bench_function("openblas_sgemv_f32", |b| {
            b.iter(|| unsafe {
                openblas::cblas_sgemv(
                    openblas::ROW_MAJOR,
                    openblas::NO_TRANS,
                    F as i32,
                    D as i32,
                    1.0,
                    _w.as_ptr(),
                    D as i32,
                    x.as_ptr(),
                    1,
                    0.0,
                    y.as_mut_ptr(),
                    1,
                )
            })
        });
    }
    group.finish();
}

fn prefill_gemm(c: &mut Criterion) {
    let (_w, f32_matrix, bf16_matrix) = matrices();
    let x = random_values(T * D, 3, 1.0);
    let mut group = c.benchmark_group("prefill_gemm_128x1536x6144");
    group.throughput(Throughput::Elements((2 * T * D * F) as u64)); // FLOPs
    group.sample_size(20);
    let mut y = vec![0.0f32; T * F];
    for (name, matrix, kind, kernel) in [
        (
            "gemm_crate_bf16_widened",
            &bf16_matrix,
            WeightDtype::BF16,
            PrefillKernel::GemmCrate,
        ),
        (
            "avx512_f32_bf16",
            &bf16_matrix,
            WeightDtype::BF16,
            PrefillKernel::Avx512,
        ),
        (
            "avx512_bf16_dot",
            &bf16_matrix,
            WeightDtype::BF16,
            PrefillKernel::Avx512Bf16,
        ),
        (
            "amx_bf16",
            &bf16_matrix,
            WeightDtype::BF16,
            PrefillKernel::AmxBf16,
        ),
        (
            "gemm_crate_f32",
            &f32_matrix,
            WeightDtype::F32,
            PrefillKernel::GemmCrate,
        ),
        (
            "avx512_f32_f32",
            &f32_matrix,
            WeightDtype::F32,
            PrefillKernel::Avx512,
        ),
    ] {
        if kernel.available(kind) {
            group.bench_function(name, |b| {
                b.iter(|| linear_into_with(&x, T, matrix, &mut y, Threads::Pool, kernel))
            });
        }
    }
    #[cfg(feature = "openblas-bench")]
    {
        let mut y = vec![0.0f32; T * F];
        unsafe { openblas::openblas_set_num_threads(2) };
        group.bench_function("openblas_sgemm_f32", |b| {
            b.iter(|| unsafe {
                openblas::cblas_sgemm(
                    openblas::ROW_MAJOR,
                    openblas::NO_TRANS,
                    openblas::TRANS,
                    T as i32,
                    F as i32,
                    D as i32,
                    1.0,
                    x.as_ptr(),
                    D as i32,
                    _w.as_ptr(),
                    D as i32,
                    0.0,
                    y.as_mut_ptr(),
                    F as i32,
                )
            })
        });
    }
    group.finish();

    // The down projection: K = 6144, N = 1536.
    let down: Vec<bf16> = random_values(D * F, 4, 0.05)
        .iter()
        .map(|&v| bf16::from_f32(v))
        .collect();
    let down = Matrix::from_bf16(D, F, down);
    let x = random_values(T * F, 5, 1.0);
    let mut y = vec![0.0f32; T * D];
    let mut group = c.benchmark_group("prefill_gemm_128x6144x1536");
    group.throughput(Throughput::Elements((2 * T * D * F) as u64));
    group.sample_size(20);
    for (name, kernel) in [
        ("gemm_crate_bf16_widened", PrefillKernel::GemmCrate),
        ("avx512_f32_bf16", PrefillKernel::Avx512),
        ("avx512_bf16_dot", PrefillKernel::Avx512Bf16),
        ("amx_bf16", PrefillKernel::AmxBf16),
    ] {
        if kernel.available(WeightDtype::BF16) {
            group.bench_function(name, |b| {
                b.iter(|| linear_into_with(&x, T, &down, &mut y, Threads::Pool, kernel))
            });
        }
    }
    group.finish();
}

fn kv_rebuild(c: &mut Criterion) {
    use gemma4_reference::config::{RopeKind, RopeParameters};
    use gemma4_reference::layer_plan::{LayerPlan, ModelPlan};
    const POSITIONS: usize = 4096;
    let (kv_heads, head_dim) = (4, 512);
    let rope = RopeParameters {
        kind: RopeKind::Proportional {
            partial_rotary_factor: 0.25,
        },
        theta: 1e6,
        factor: 1.0,
    };
    let layer = LayerPlan {
        key_equals_value: true,
        rope: rope.clone(),
        ..attention_layer(head_dim, 32, kv_heads, None)
    };
    let plan = ModelPlan {
        layers: vec![layer],
        first_kv_shared_layer: 1,
    };
    let inverse = gemma4_reference::rope::inverse_frequencies(&rope, head_dim);
    let mut cache = KvCache::new(
        &plan,
        |_| random_values(head_dim, 5, 1.0),
        |_| inverse.clone(),
    );
    let values = random_values(POSITIONS * kv_heads * head_dim, 6, 1.0);
    cache.stage(0, values.clone(), values);
    cache.commit();
    let mut group = c.benchmark_group("kv_rebuild_keys_4096x4x512");
    group.sample_size(20);
    group.bench_function("segments", |b| b.iter(|| cache.segments(0, 0).len()));
    group.finish();
}

/// A cache for the one attention layer `layer` (separate keys and values), with random keys and
/// values for `positions` positions staged (not committed).
fn one_layer_cache(layer: &gemma4_reference::layer_plan::LayerPlan, positions: usize) -> KvCache {
    let plan = gemma4_reference::layer_plan::ModelPlan {
        layers: vec![layer.clone()],
        first_kv_shared_layer: 1,
    };
    let mut cache = KvCache::new(&plan, |_| Vec::new(), |_| Vec::new());
    let n = positions * layer.num_kv_heads * layer.head_dim;
    cache.stage(0, random_values(n, 7, 1.0), random_values(n, 8, 1.0));
    cache
}

fn attend_decode(c: &mut Criterion) {
    use gemma4_optimized::attention::attend;
    const POSITIONS: usize = 4096;
    let (heads, kv_heads, head_dim) = (32, 4, 512);
    let layer = attention_layer(head_dim, heads, kv_heads, None);
    let mut cache = one_layer_cache(&layer, POSITIONS);
    cache.commit();
    let queries = random_values(heads * head_dim, 9, 0.05);
    let mut output = vec![0.0f32; heads * head_dim];
    let segments = cache.segments(0, 0);
    let none = ImageBlocks::none();
    let mut group = c.benchmark_group("attend_decode_4096x32x512");
    group.sample_size(20);
    group.bench_function("attend", |b| {
        b.iter(|| {
            attend(
                &queries,
                &[POSITIONS],
                &layer,
                &segments,
                &none,
                &mut output,
            )
        })
    });
    group.finish();
}

/// A 1024-token prefill through one of E2B's sliding layers (8 query heads, 1 KV head, head dim
/// 256, window 512): the blocked path, and the per-query path it replaced for more than 8 tokens
/// (the same call 8 tokens at a time).
fn attend_prefill(c: &mut Criterion) {
    use gemma4_optimized::attention::{attend, PER_QUERY_MAX_TOKENS};
    const TOKENS: usize = 1024;
    let (heads, kv_heads, head_dim) = (8, 1, 256);
    let layer = attention_layer(head_dim, heads, kv_heads, Some(512));
    // Staged, not committed: the pass's own keys, as during a prefill.
    let mut cache = one_layer_cache(&layer, TOKENS);
    let queries = random_values(TOKENS * heads * head_dim, 9, 0.05);
    let positions: Vec<usize> = (0..TOKENS).collect();
    let mut output = vec![0.0f32; TOKENS * heads * head_dim];
    let segments = cache.segments(0, 0);
    let none = ImageBlocks::none();
    let mut group = c.benchmark_group("attend_prefill_1024x8x256_window512");
    group.sample_size(10);
    group.bench_function("blocked", |b| {
        b.iter(|| attend(&queries, &positions, &layer, &segments, &none, &mut output))
    });
    let row = heads * head_dim;
    group.bench_function("per_query", |b| {
        b.iter(|| {
            for (chunk, out) in positions
                .chunks(PER_QUERY_MAX_TOKENS)
                .zip(output.chunks_mut(PER_QUERY_MAX_TOKENS * row))
            {
                let first = chunk[0];
                let queries = &queries[first * row..(first + chunk.len()) * row];
                attend(queries, chunk, &layer, &segments, &none, out);
            }
        })
    });
    group.finish();
}

/// Attention over the patches of one image in the on-device vision tower (12 heads × 64) at
/// the default budget of 280 soft tokens: 2520 patches, bidirectional, blocked products.
fn attend_patches(c: &mut Criterion) {
    use gemma4_optimized::vision::encoder_layer::attend_patches;
    const PATCHES: usize = 2520;
    let (heads, head_dim) = (12, 64);
    let n = PATCHES * heads * head_dim;
    let (queries, keys, values) = (
        random_values(n, 11, 0.2),
        random_values(n, 12, 0.2),
        random_values(n, 13, 1.0),
    );
    let mut output = vec![0.0f32; n];
    let mut group = c.benchmark_group("attend_patches_2520x12x64");
    group.sample_size(10);
    group.bench_function("blocked", |b| {
        b.iter(|| {
            attend_patches(
                &queries,
                &keys,
                &values,
                PATCHES,
                [heads, heads, head_dim],
                &mut output,
            )
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    decode_gemv,
    prefill_gemm,
    kv_rebuild,
    attend_decode,
    attend_prefill,
    attend_patches
);
criterion_main!(benches);
