//! The image path around the tower: the merge of soft tokens into the prompt (counts checked,
//! placeholders replaced in order), the bidirectional image blocks of the attention mask (a
//! snapshot for a prompt with two images), and decoding after an image.

mod common;

use gemma4_reference::config::AttentionType;
use gemma4_reference::layer_plan::ModelPlan;
use gemma4_reference::mask::{key_is_visible, ImageBlocks};
use gemma4_reference::merge::Prompt;
use gemma4_reference::{Gemma4TextModel, ModelConfig};

use common::golden_case;

/// The mask of `tokens` on a sliding layer with window `window` and on a full layer of the
/// config, one text row per query: `#` visible, `.` masked; a legend row marks image tokens.
fn mask_picture(config: &ModelConfig, tokens: &[usize], window: usize) -> String {
    let mut config = config.clone();
    config.text.sliding_window = window;
    let plan = ModelPlan::from_config(&config.text);
    let blocks = ImageBlocks::of(&config, tokens, 0);
    let image = config.special_tokens.image_token_id.unwrap();
    let (boi, eoi) = (
        config.special_tokens.boi_token_id.unwrap(),
        config.special_tokens.eoi_token_id.unwrap(),
    );
    let legend: String = tokens
        .iter()
        .map(|&t| match t {
            t if t == image => 'I',
            t if t == boi => '<',
            t if t == eoi => '>',
            _ => 't',
        })
        .collect();
    let mut out = String::new();
    for kind in [AttentionType::Sliding, AttentionType::Full] {
        let layer = plan
            .layers
            .iter()
            .find(|l| l.attention_type == kind)
            .expect("both layer types");
        out.push_str(&format!(
            "{kind:?} layer (window {:?}); keys across, queries down\n   {legend}\n",
            layer.sliding_window
        ));
        for (q, symbol) in legend.chars().enumerate() {
            let row: String = (0..tokens.len())
                .map(|k| {
                    if key_is_visible(layer, q, k, &blocks) {
                        '#'
                    } else {
                        '.'
                    }
                })
                .collect();
            out.push_str(&format!("{q:>2}{symbol}{row}\n"));
        }
    }
    out
}

#[test]
fn vision_mask_snapshot_two_images_31b_vision() {
    // Two images of 3 and 2 soft tokens between text, window 4: on the sliding layer each image
    // block sees itself both ways (its first token sees keys past the window too), BOI/EOI and
    // text stay causal; the full layer is causal everywhere.
    let case = golden_case("31b_vision");
    let config = ModelConfig::from_dir(&case.model_dir()).unwrap();
    let s = &config.special_tokens;
    let (boi, image, eoi) = (
        s.boi_token_id.unwrap(),
        s.image_token_id.unwrap(),
        s.eoi_token_id.unwrap(),
    );
    let tokens = [
        7, 8, boi, image, image, image, eoi, 9, boi, image, image, eoi, 10,
    ];
    insta::assert_snapshot!(
        "mask_two_images_window_4",
        mask_picture(&config, &tokens, 4)
    );
}

#[test]
fn vision_mask_blocks_only_on_vision_models() {
    // The E2B-like model (no "vision" bidirectional attention): the same tokens are causal.
    let case = golden_case("e2b_vision");
    let config = ModelConfig::from_dir(&case.model_dir()).unwrap();
    let image = config.special_tokens.image_token_id.unwrap();
    assert!(ImageBlocks::of(&config, &[1, image, image, 2], 0).is_empty());
}

/// The golden prompt of `name`, with its pixels.
fn prompt_of(name: &str) -> (gemma4::golden::GoldenCase, Prompt) {
    let case = golden_case(name);
    let prompt = case.prompt().unwrap();
    (case, prompt)
}

#[test]
fn vision_merge_counts_are_checked_e2b_vision_two_images() {
    let (case, prompt) = prompt_of("e2b_vision_two_images");
    let model = Gemma4TextModel::load_for(&case.model_dir(), &prompt).unwrap();
    let run = |prompt: &Prompt| {
        model
            .dump_prompt(prompt, 0)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    // One image too many, one too few, and the images in the wrong order (their soft-token
    // counts differ only if the runs differ; here the run lengths are the images' own).
    let mut three = prompt.clone();
    three.images.push(prompt.images[0].clone());
    let message = run(&three);
    assert!(
        message.contains("3 images given") && message.contains("2 runs"),
        "{message}"
    );
    let mut one = prompt.clone();
    one.images.pop();
    let message = run(&one);
    assert!(
        message.contains("1 image given") && message.contains("2 runs"),
        "{message}"
    );
    // A run one placeholder short.
    let mut short = prompt.clone();
    let image = model.config.special_tokens.image_token_id.unwrap();
    let first = short.tokens.iter().position(|&t| t == image).unwrap();
    short.tokens.remove(first);
    let message = run(&short);
    assert!(
        message.contains("image 0 has") && message.contains("soft tokens but its run"),
        "{message}"
    );
}

#[test]
fn vision_text_only_checkpoint_refuses_an_image() {
    let (_, prompt) = prompt_of("e2b_vision");
    let text_only = golden_case("e2b_like");
    let error = Gemma4TextModel::load_for(&text_only.model_dir(), &prompt)
        .err()
        .expect("a text-only checkpoint has no vision tower")
        .to_string();
    assert!(error.contains("vision_config"), "{error}");
}

#[test]
fn vision_soft_tokens_replace_placeholders_in_order_e2b_vision_two_images() {
    // The merged embeddings hold each image's soft tokens over its run, unscaled, and the
    // ordinary scaled embeddings elsewhere.
    let (case, prompt) = prompt_of("e2b_vision_two_images");
    let model = Gemma4TextModel::load_for(&case.model_dir(), &prompt).unwrap();
    let dump = model.dump_prompt(&prompt, 0).unwrap();
    let embeddings = dump.get("embeddings").unwrap().as_f32().unwrap();
    let image = model.config.special_tokens.image_token_id.unwrap();
    let runs = gemma4_reference::merge::placeholder_runs(&prompt.tokens, image);
    for (i, run) in runs.iter().enumerate() {
        let soft = dump
            .get(&format!("vision.{i}.soft_tokens"))
            .unwrap()
            .as_f32()
            .unwrap();
        let rows = embeddings.slice(ndarray::s![run.clone(), ..]).into_dyn();
        assert_eq!(rows, soft.view(), "image {i}'s run holds its soft tokens");
    }
    let text = model.embed(&prompt.tokens).unwrap();
    let first_run = runs[0].start;
    assert_eq!(
        embeddings.slice(ndarray::s![..first_run, ..]),
        text.slice(ndarray::s![..first_run, ..]),
        "text rows are the scaled text embeddings"
    );
}
