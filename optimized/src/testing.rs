//! Helpers for the unit tests that compare each optimized function with its reference twin.

use gemma4_reference::ModelConfig;
use ndarray::Array2;

/// `n` values uniform in `[-amplitude, amplitude)`, reproducible from `seed`.
pub fn random_values(n: usize, seed: u64, amplitude: f32) -> Vec<f32> {
    crate::synthetic::random_values(n, seed, amplitude)
}

/// A row-major buffer as an `[rows, cols]` array.
pub fn to_array2(rows: usize, cols: usize, values: &[f32]) -> Array2<f32> {
    Array2::from_shape_vec((rows, cols), values.to_vec()).expect("rows·cols values")
}

/// The elements of an array in logical (row-major) order, whatever its memory layout (a
/// reference product may come out column-major).
pub fn row_major<'a>(array: impl IntoIterator<Item = &'a f32>) -> Vec<f32> {
    array.into_iter().copied().collect()
}

/// Asserts `max|got − expected| ≤ tolerance · max|expected|` (0 demands bit equality of values),
/// naming the worst element and both values.
pub fn assert_close(what: &str, got: &[f32], expected: &[f32], tolerance: f32) {
    assert_eq!(got.len(), expected.len(), "{what}: lengths differ");
    let scale = expected.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let (mut worst, mut at) = (0.0f32, 0);
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        let error = (g - e).abs();
        if error > worst || error.is_nan() {
            worst = error;
            at = i;
        }
    }
    assert!(
        worst <= tolerance * scale && !worst.is_nan(),
        "{what}: element {at} differs by {worst:.3e} (relative to max|expected| = {scale:.3e}: {:.3e} > tolerance {tolerance:.1e}): got {}, expected {}",
        worst / scale,
        got[at],
        expected[at]
    );
}

/// A tiny `"vision"` (or not) config, conditional-generation (or causal-LM) layout: image id
/// 9, video id 8, BOI 10, EOI 11.
pub fn vision_config(bidirectional: Option<&str>, conditional: bool) -> ModelConfig {
    let text = crate::synthetic::TinyConfig {
        vocab_size: 16,
        hidden_size: 8,
        intermediate_size: 8,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        num_global_key_value_heads: 1,
        head_dim: 4,
        global_head_dim: 8,
        full_layers: vec![false, true],
        sliding_window: 4,
        hidden_size_per_layer_input: 0,
        num_kv_shared_layers: 0,
        use_double_wide_mlp: false,
        attention_k_eq_v: false,
        moe: None,
        tie_word_embeddings: true,
        final_logit_softcapping: None,
    };
    let mut text_json = text.config_json();
    text_json["use_bidirectional_attention"] = serde_json::json!(bidirectional);
    let ids = serde_json::json!({
        "image_token_id": 9,
        "video_token_id": 8,
        "boi_token_id": 10,
        "eoi_token_id": 11,
    });
    let mut config = if conditional {
        serde_json::json!({
            "architectures": ["Gemma4ForConditionalGeneration"],
            "model_type": "gemma4",
            "text_config": text_json,
        })
    } else {
        text_json
    };
    for (key, value) in ids.as_object().unwrap() {
        config[key] = value.clone();
    }
    ModelConfig::from_json(&config, std::path::Path::new("mask-test")).unwrap()
}

/// Tokens from a layout: text (1), then for each `(image length, text gap)` BOI, the
/// placeholders (image 9, or video 8 when `video`), EOI and the gap of text.
pub fn layout_tokens(lead: usize, images: &[(usize, usize, bool)]) -> Vec<usize> {
    let mut tokens = vec![1; lead];
    for &(length, gap, video) in images {
        tokens.push(10);
        tokens.extend(std::iter::repeat_n(if video { 8 } else { 9 }, length));
        tokens.push(11);
        tokens.extend(std::iter::repeat_n(1, gap));
    }
    tokens
}
