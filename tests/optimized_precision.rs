//! The optimized engine's opt-in fast prefill (`Precision::Bf16Activations`: the prompt's matrix
//! products on bf16-rounded activations, AMX or AVX-512 BF16, bf16 weights only) — what it may and may
//! not change.
//!
//! Its arithmetic is checked where a bound can be proved, in the kernel tests of
//! `optimized/src/linear.rs`: every product within the bf16 rounding of its inputs (2^-8 relative
//! per activation) of the f32 product. Whole models only amplify that (these random tiny models
//! by up to 0.4 of the largest logit, and a near-tied argmax may flip), so here the model-level
//! facts are structural: the mode never touches f32/f16 weights, decode steps or dumps; it is
//! deterministic across thread counts, MoE experts included (they run on the pool's threads);
//! and on a CPU that has AVX-512 BF16 it really runs (its logits differ from the f32 mode's; on
//! AMX CPUs that run is the AMX kernel's).

mod common;

use gemma4::golden::load_cases;
use gemma4_optimized::linear::Precision;
use gemma4_optimized::synthetic::{write_checkpoint, TinyConfig};
use gemma4_optimized::{Gemma4Optimized, Logits};
use gemma4_reference::checkpoint::WeightDtype;
use gemma4_reference::dump::Recorder;

fn prefill(model: &Gemma4Optimized, tokens: &[usize]) -> (Vec<f32>, Vec<f32>) {
    let mut cache = model.new_cache();
    let logits = model
        .forward(
            tokens,
            &mut cache,
            &mut Recorder::checking_only(),
            Logits::Last,
        )
        .unwrap();
    // One decode step after it: the cache the prefill left.
    let next = gemma4_optimized::model::argmax(&logits);
    let step = model
        .forward(
            &[next],
            &mut cache,
            &mut Recorder::checking_only(),
            Logits::Last,
        )
        .unwrap();
    (logits, step)
}

fn first_difference(a: &[f32], b: &[f32]) -> Option<(usize, f32, f32)> {
    a.iter()
        .zip(b)
        .enumerate()
        .find(|(_, (p, q))| p.to_bits() != q.to_bits())
        .map(|(i, (&p, &q))| (i, p, q))
}

#[test]
fn fast_prefill_leaves_f32_weights_and_dumps_bit_identical() {
    for case in load_cases(&common::golden_dir()).unwrap() {
        let f32_model = Gemma4Optimized::load(&case.model_dir()).unwrap();
        let fast = Gemma4Optimized::load(&case.model_dir())
            .unwrap()
            .with_precision(Precision::Bf16Activations);
        assert_eq!(fast.precision(), Precision::Bf16Activations);
        // A dump is always the reference arithmetic, whatever the model's precision.
        let expected = f32_model.dump(&case.tokens, 2).unwrap();
        let got = fast.dump(&case.tokens, 2).unwrap();
        for name in expected.names_in_model_order() {
            let (e, g) = (expected.get(name).unwrap(), got.get(name).unwrap());
            assert!(
                e == g,
                "{}: {name} differs in a fast-prefill model's dump",
                case.name
            );
        }
        if case.checkpoint_dtype == "float32" {
            // f32 weights: the mode does not apply; prefill and decode bit for bit.
            let (a, b) = (
                prefill(&f32_model, &case.tokens),
                prefill(&fast, &case.tokens),
            );
            for (what, x, y) in [("prefill", &a.0, &b.0), ("decode step", &a.1, &b.1)] {
                if let Some((i, p, q)) = first_difference(x, y) {
                    panic!(
                        "{}: {what} logits differ at {i}: f32 mode {p:e}, fast {q:e}",
                        case.name
                    );
                }
            }
        }
    }
}

/// A bf16 MoE model whose experts each get more tokens than the single-row kernel takes, so the
/// experts' products run through the prefill kernels on the pool's threads.
fn moe_model() -> (tempfile::TempDir, Vec<usize>) {
    let config = TinyConfig {
        vocab_size: 300,
        hidden_size: 64,
        intermediate_size: 96,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        num_global_key_value_heads: 1,
        head_dim: 32,
        global_head_dim: 32,
        full_layers: vec![false, true, false, true],
        sliding_window: 11,
        hidden_size_per_layer_input: 16,
        num_kv_shared_layers: 1,
        use_double_wide_mlp: false,
        attention_k_eq_v: true,
        moe: Some((4, 2, 80)),
        tie_word_embeddings: true,
        final_logit_softcapping: Some(30.0),
    };
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &config.config_json(), WeightDtype::BF16, 9).unwrap();
    let tokens = (0..48).map(|i| (i * 53 + 7) % 300).collect();
    (dir, tokens)
}

#[test]
fn fast_prefill_is_deterministic_across_thread_counts_moe_included() {
    let (dir, tokens) = moe_model();
    let run = |threads: usize| {
        let model = Gemma4Optimized::load_with_threads(dir.path(), Some(threads))
            .unwrap()
            .with_precision(Precision::Bf16Activations);
        prefill(&model, &tokens)
    };
    let two = run(2);
    // Repeated runs: a kernel choice that depended on which thread picks up a task would differ
    // only sometimes.
    for threads in [2, 1, 3, 4, 2, 3, 4, 2, 3, 4] {
        let other = run(threads);
        for (what, x, y) in [("prefill", &two.0, &other.0), ("decode", &two.1, &other.1)] {
            if let Some((i, p, q)) = first_difference(x, y) {
                panic!("{what} logits on {threads} vs 2 threads differ at {i}: {q:e} vs {p:e}");
            }
        }
    }
}

#[test]
fn fast_prefill_runs_where_the_cpu_has_avx512_bf16() {
    let (dir, tokens) = moe_model();
    let f32_mode = prefill(&Gemma4Optimized::load(dir.path()).unwrap(), &tokens);
    let fast = prefill(
        &Gemma4Optimized::load(dir.path())
            .unwrap()
            .with_precision(Precision::Bf16Activations),
        &tokens,
    );
    let differs = first_difference(&f32_mode.0, &fast.0).is_some();
    assert_eq!(
        differs,
        gemma4_optimized::gemm512::has_avx512_bf16(),
        "bf16-activation prefill should differ from the f32 one exactly when it can run here"
    );
}
