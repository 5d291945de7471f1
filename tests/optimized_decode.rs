//! Incremental decoding in the optimized engine: a prefill followed by one token at a time
//! through its KV cache (ring buffers on sliding layers, one tensor on K=V layers, producers'
//! caches on KV-shared layers) equals its full forward pass at every position, on every golden
//! model (all four variant families; prompts cross the sliding window twice), and so does a
//! prompt fed in two chunks (the second one long enough for the blocked attention path, over
//! a cache whose ring has wrapped). And the generation
//! prefill (`Logits::Last`: KV-shared layers and the LM head on the last position only) gives the
//! same last logits and leaves the same cache as the full prefill.
//!
//! Tolerance 5e-5 of the largest element: the same f32 arithmetic on the same values, except
//! that the matrix kernels' summation order depends on the number of rows (the skinny kernel,
//! four partial sums, up to 8 rows; above, one sequential FMA chain on AVX-512 CPUs, else the
//! `gemm` crate, whose blocking changes with the row count): a few ulps per product, which these random tiny models amplify layer after layer (unscaled attention). The
//! largest measured gap is 1.5e-5 (e2b_like logits, the most chaotic case; 31b/26b ≤ 3e-6); HF's
//! own decode and full forward differ by up to 1.6e-4 on the same models (golden/README.md).
//! A cache bug (a wrong window, a stale or overwritten ring slot, a key rebuilt wrongly on a K=V
//! layer, a producer read at the wrong time) changes outputs by O(1).

mod common;

use gemma4::golden::load_cases;
use gemma4_optimized::{Gemma4Optimized, Logits};
use gemma4_reference::dump::{ActivationDump, Recorder};

const TOLERANCE: f32 = 5e-5;

fn assert_rows_close(what: &str, columns: usize, full: &[f32], incremental: &[f32]) {
    common::assert_rows_close(what, TOLERANCE, columns, full, incremental);
}

fn tensor(dump: &ActivationDump, name: &str) -> Vec<f32> {
    dump.get(name)
        .unwrap_or_else(|| panic!("{name} in the dump"))
        .as_f32()
        .unwrap()
        .iter()
        .copied()
        .collect()
}

#[test]
fn decode_incremental_equals_full_forward_every_golden_model_optimized() {
    for case in load_cases(&common::golden_dir()).unwrap() {
        let model = Gemma4Optimized::load(&case.model_dir()).unwrap();
        let (tokens, d, vocab) = (
            &case.tokens,
            model.config.text.hidden_size,
            model.config.text.vocab_size,
        );
        let layers = model.config.text.num_hidden_layers;
        let mut full_dump = ActivationDump::new();
        let full_logits = model
            .forward(
                tokens,
                &mut model.new_cache(),
                &mut Recorder::new(&mut full_dump),
                Logits::All,
            )
            .unwrap();
        let window = model.config.text.sliding_window;
        // A prefill then one token at a time; and two chunks, the second one long (more than
        // `PER_QUERY_MAX_TOKENS` tokens: the blocked attention path over a cache that already
        // holds positions, a wrapped ring after `window + 1`).
        let mut schedules: Vec<(String, Vec<&[usize]>)> = Vec::new();
        for prefill in [1, window - 1, window, window + 1, tokens.len() - 1] {
            // Never inside an image block of a bidirectional model (it attends forward).
            let unsplit = common::smallest_unsplit_prefill(&model.config, tokens);
            let prefill = prefill.clamp(unsplit, tokens.len());
            let mut chunks = vec![&tokens[..prefill]];
            chunks.extend(tokens[prefill..].chunks(1));
            schedules.push((format!("prefill {prefill}"), chunks));
        }
        for split in [1, window + 1, tokens.len() / 2] {
            // A split inside a bidirectional image block computes something else (see above).
            let split = common::split_outside_image_blocks(&model.config, tokens, split)
                .clamp(1, tokens.len() - 1);
            let chunks = vec![&tokens[..split], &tokens[split..]];
            schedules.push((
                format!("chunks of {split} and {}", tokens.len() - split),
                chunks,
            ));
        }
        for (schedule, chunks) in schedules {
            let mut cache = model.new_cache();
            let mut logits = Vec::new();
            let mut outputs: Vec<Vec<f32>> = vec![Vec::new(); layers];
            for chunk in chunks {
                let mut dump = ActivationDump::new();
                logits.extend(
                    model
                        .forward(
                            chunk,
                            &mut cache,
                            &mut Recorder::new(&mut dump),
                            Logits::All,
                        )
                        .unwrap(),
                );
                for (layer, rows) in outputs.iter_mut().enumerate() {
                    rows.extend(tensor(&dump, &format!("layers.{layer}.output")));
                }
            }
            assert_rows_close(
                &format!("{} logits ({schedule})", case.name),
                vocab,
                &full_logits,
                &logits,
            );
            for (layer, rows) in outputs.iter().enumerate() {
                assert_rows_close(
                    &format!("{} layers.{layer}.output ({schedule})", case.name),
                    d,
                    &tensor(&full_dump, &format!("layers.{layer}.output")),
                    rows,
                );
            }
        }
    }
}

#[test]
fn decode_last_position_prefill_equals_full_prefill_every_golden_model_optimized() {
    for case in load_cases(&common::golden_dir()).unwrap() {
        let model = Gemma4Optimized::load(&case.model_dir()).unwrap();
        let vocab = model.config.text.vocab_size;
        let mut full_cache = model.new_cache();
        let full = model
            .forward(
                &case.tokens,
                &mut full_cache,
                &mut Recorder::checking_only(),
                Logits::All,
            )
            .unwrap();
        let mut last_cache = model.new_cache();
        let last = model
            .forward(
                &case.tokens,
                &mut last_cache,
                &mut Recorder::checking_only(),
                Logits::Last,
            )
            .unwrap();
        assert_rows_close(
            &format!("{} last-position logits", case.name),
            vocab,
            &full[full.len() - vocab..],
            &last,
        );
        // The caches must be the same: decoding from either gives the same steps.
        let (from_full, _) = model
            .greedy_decode(&full[full.len() - vocab..], &mut full_cache, 4)
            .unwrap();
        let (from_last, _) = model.greedy_decode(&last, &mut last_cache, 4).unwrap();
        assert_rows_close(
            &format!("{} decode after a last-position prefill", case.name),
            vocab,
            from_full.as_slice().unwrap(),
            from_last.as_slice().unwrap(),
        );
    }
}
