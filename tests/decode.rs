//! Incremental decoding through the KV cache equals the full forward pass at every position,
//! on every golden model (all variant families, sliding windows crossed, KV sharing on).
//!
//! Tolerance 1e-5 of the largest element: both paths do the same float32 arithmetic on the same
//! values; only the matrix-product blocking differs between a 1-row and a T-row input (a few
//! ulps, measured ≤ 1e-6), whereas a cache bug (a wrong window, a stale or missing entry, a
//! producer read at the wrong time) changes outputs by O(1).

mod common;

use gemma4::golden::load_cases;
use gemma4_reference::dump::{ActivationDump, Recorder};
use gemma4_reference::Gemma4TextModel;
use ndarray::{s, Array2, ArrayView2};

const TOLERANCE: f32 = 1e-5;

fn assert_rows_close(what: &str, full: ArrayView2<f32>, incremental: ArrayView2<f32>) {
    let (full, incremental) = (full.as_standard_layout(), incremental.as_standard_layout());
    common::assert_rows_close(
        what,
        TOLERANCE,
        full.ncols(),
        full.as_slice().expect("standard layout"),
        incremental.as_slice().expect("standard layout"),
    );
}

/// Runs `tokens` through `model` as a prefill of `prefill` tokens, then one token at a time,
/// returning every position's logits and every layer's output, stacked.
fn incremental(
    model: &Gemma4TextModel,
    tokens: &[usize],
    prefill: usize,
) -> (Array2<f32>, Vec<Array2<f32>>) {
    let mut cache = model.new_cache();
    let mut logits_rows = Vec::new();
    let layers = model.config.text.num_hidden_layers;
    let mut layer_rows: Vec<Vec<Array2<f32>>> = vec![Vec::new(); layers];
    let mut chunks = vec![&tokens[..prefill]];
    chunks.extend(tokens[prefill..].chunks(1));
    for chunk in chunks {
        let mut dump = ActivationDump::new();
        let logits = model
            .forward(chunk, &mut cache, &mut Recorder::new(&mut dump))
            .unwrap();
        logits_rows.push(logits);
        for (layer, rows) in layer_rows.iter_mut().enumerate() {
            let output = dump
                .get(&format!("layers.{layer}.output"))
                .unwrap()
                .as_f32()
                .unwrap();
            rows.push(output.clone().into_dimensionality().unwrap());
        }
    }
    let stack = |rows: &[Array2<f32>]| {
        ndarray::concatenate(
            ndarray::Axis(0),
            &rows.iter().map(|r| r.view()).collect::<Vec<_>>(),
        )
        .unwrap()
    };
    (
        stack(&logits_rows),
        layer_rows.iter().map(|rows| stack(rows)).collect(),
    )
}

#[test]
fn decode_incremental_equals_full_forward_every_golden_model() {
    for case in load_cases(&common::golden_dir()).unwrap() {
        let model = Gemma4TextModel::load(&case.model_dir()).unwrap();
        let tokens = &case.tokens;
        let mut full_dump = ActivationDump::new();
        let full_logits = model
            .forward(
                tokens,
                &mut model.new_cache(),
                &mut Recorder::new(&mut full_dump),
            )
            .unwrap();
        let window = model.config.text.sliding_window;
        // Prefill sizes: one token, just inside / at / past the window, and all but one.
        for prefill in [1, window - 1, window, window + 1, tokens.len() - 1] {
            // Never inside an image block of a bidirectional model (it attends forward).
            let unsplit = common::smallest_unsplit_prefill(&model.config, tokens);
            let prefill = prefill.clamp(unsplit, tokens.len());
            let (logits, layer_outputs) = incremental(&model, tokens, prefill);
            assert_rows_close(
                &format!("{} logits (prefill {prefill})", case.name),
                full_logits.view(),
                logits.view(),
            );
            for (layer, output) in layer_outputs.iter().enumerate() {
                let full = full_dump
                    .get(&format!("layers.{layer}.output"))
                    .unwrap()
                    .as_f32()
                    .unwrap();
                let full = full.view().into_dimensionality().unwrap();
                assert_rows_close(
                    &format!("{} layers.{layer}.output (prefill {prefill})", case.name),
                    full,
                    output.view(),
                );
            }
        }
    }
}

#[test]
fn decode_greedy_steps_equal_full_forward_on_the_extended_sequence() {
    // Hugging Face generate's convention: decode_logits[s] chose f_s, and is the full forward's
    // logits at position T + s − 1 of the sequence prompt ++ [f_0 ... f_{s−1}] (row 0 is the
    // prompt's last row); greedy_continuation[s] = f_s = argmax(decode_logits[s]).
    for case in load_cases(&common::golden_dir()).unwrap() {
        let model = Gemma4TextModel::load(&case.model_dir()).unwrap();
        let steps = 5;
        let dump = model.dump(&case.tokens, steps).unwrap();
        let decode = dump.get("decode_logits").unwrap().as_f32().unwrap();
        let continuation = dump.get("greedy_continuation").unwrap().as_i64().unwrap();
        let mut sequence = case.tokens.clone();
        sequence.extend(continuation.iter().take(steps - 1).map(|&t| t as usize));
        let full = model
            .forward(
                &sequence,
                &mut model.new_cache(),
                &mut Recorder::checking_only(),
            )
            .unwrap();
        let t = case.tokens.len();
        let decode = decode.view().into_dimensionality().unwrap();
        assert_rows_close(
            &format!("{} decode_logits", case.name),
            full.slice(s![t - 1..t - 1 + steps, ..]),
            decode,
        );
        for (s, &token) in continuation.iter().enumerate() {
            assert_eq!(
                token as usize,
                gemma4_reference::model::argmax(decode.row(s)),
                "{}: greedy_continuation[{s}] is not the argmax of decode_logits[{s}]",
                case.name
            );
        }
        // Row 0 is the prompt's last row itself, bit for bit.
        let prompt_logits = dump.get("logits").unwrap().as_f32().unwrap();
        let last = prompt_logits.slice(s![prompt_logits.shape()[0] - 1, ..]);
        assert_eq!(decode.row(0), last, "{}: decode_logits[0]", case.name);
    }
}
