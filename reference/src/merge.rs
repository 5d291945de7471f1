//! What enters the text model besides token ids: soft tokens of images (and audio) merged into
//! the embedding sequence (shared spec: multimodal §3.1, §3.2).
//!
//! ```text
//! ids:        … <boi> <image> <image> … <image> <eoi> …      one run of n placeholders per image
//! embeddings: … e(boi)  s₀      s₁    …  s_{n−1}  e(eoi) …     soft tokens in order, unscaled
//! ```
//!
//! Placeholder ids come from `config.json` (never hard-coded). Text tokens are embedded as
//! usual (`× √D`); placeholder positions are embedded as the pad token and then replaced by the
//! image's soft tokens, which were already normed and projected (no `√D`). The Per-Layer
//! Embeddings read the pad row at placeholder positions for their token part, while their
//! context part sees the merged embeddings ([`crate::model`]). Each maximal run of image
//! placeholders takes one image, in order; the counts must match exactly.

use std::ops::Range;

use ndarray::Array2;

use crate::audio::AudioInput;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::faults::{fault_active, Fault};
use crate::vision::ImageInput;

/// A prompt: token ids (multimodal placeholders already expanded: BOI, `n` placeholders, EOI
/// per image; BOA, `n` placeholders, EOA per audio clip) and the images and clips whose soft
/// tokens fill the placeholder runs, in order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Prompt {
    pub tokens: Vec<usize>,
    pub images: Vec<ImageInput>,
    /// The audio clips, in placeholder-run order (shared spec: multimodal §2).
    pub audio: Vec<AudioInput>,
}

impl Prompt {
    /// A text-only prompt.
    pub fn text(tokens: &[usize]) -> Self {
        Prompt {
            tokens: tokens.to_vec(),
            ..Prompt::default()
        }
    }
}

/// The maximal runs of `id` in `tokens`, in order.
pub fn placeholder_runs(tokens: &[usize], id: usize) -> Vec<Range<usize>> {
    let mut runs: Vec<Range<usize>> = Vec::new();
    for (position, &token) in tokens.iter().enumerate() {
        if token != id {
            continue;
        }
        match runs.last_mut() {
            Some(run) if run.end == position => run.end += 1,
            _ => runs.push(position..position + 1),
        }
    }
    runs
}

/// The image placeholder runs of `tokens`, checked against `soft_token_counts` (one per image,
/// in order): as many runs as images, each as long as its image's soft tokens. No image at
/// all is fine (the placeholders then stay pad embeddings, as in Hugging Face).
pub fn image_placeholder_runs(
    config: &ModelConfig,
    tokens: &[usize],
    soft_token_counts: &[usize],
) -> Result<Vec<Range<usize>>> {
    media_placeholder_runs(
        config,
        tokens,
        soft_token_counts,
        (config.special_tokens.image_token_id, "image_token_id"),
        ("image", "begin- and end-of-image"),
    )
}

/// [`image_placeholder_runs`] for audio clips (the `audio_token_id` runs, BOA/EOA around).
pub fn audio_placeholder_runs(
    config: &ModelConfig,
    tokens: &[usize],
    soft_token_counts: &[usize],
) -> Result<Vec<Range<usize>>> {
    media_placeholder_runs(
        config,
        tokens,
        soft_token_counts,
        (config.special_tokens.audio_token_id, "audio_token_id"),
        ("audio clip", "begin- and end-of-audio"),
    )
}

/// The runs of one kind of placeholder, checked against the soft-token counts of its media.
fn media_placeholder_runs(
    config: &ModelConfig,
    tokens: &[usize],
    soft_token_counts: &[usize],
    (placeholder, field): (Option<usize>, &str),
    (medium, around): (&str, &str),
) -> Result<Vec<Range<usize>>> {
    if soft_token_counts.is_empty() {
        return Ok(Vec::new());
    }
    let Some(placeholder) = placeholder else {
        return Err(Error::config(
            &config.path,
            field,
            format!("is missing, so no token of the prompt can take an {medium}'s soft tokens"),
        ));
    };
    let runs = placeholder_runs(tokens, placeholder);
    let plural = |n: usize, noun: &str| format!("{n} {noun}{}", if n == 1 { "" } else { "s" });
    if runs.len() != soft_token_counts.len() {
        return Err(Error::input(format!(
            "{} given but the token ids hold {} of the {medium} placeholder id {placeholder} (each {medium} needs one run of as many placeholders as it has soft tokens, between its {around} ids)",
            plural(soft_token_counts.len(), medium),
            plural(runs.len(), "run")
        )));
    }
    for (index, (run, &count)) in runs.iter().zip(soft_token_counts).enumerate() {
        if run.len() != count {
            return Err(Error::input(format!(
                "{medium} {index} has {count} soft tokens but its run of {medium} placeholders (positions {}..{}) holds {}",
                run.start,
                run.end,
                run.len()
            )));
        }
    }
    Ok(runs)
}

/// Writes each image's soft tokens (`[n_i, D]`) into the rows of its placeholder run, as they
/// are: they were normed and projected, and take no `√D` (only text tokens do).
pub fn merge_soft_tokens(
    embeddings: &mut Array2<f32>,
    runs: &[Range<usize>],
    soft_tokens: &[Array2<f32>],
) {
    let scale = if fault_active(Fault::VisionSoftTokensScaled) {
        (embeddings.ncols() as f64).sqrt() as f32
    } else {
        1.0
    };
    for (run, soft) in runs.iter().zip(soft_tokens) {
        embeddings
            .slice_mut(ndarray::s![run.clone(), ..])
            .assign(&(soft * scale));
    }
}

/// The dump-name prefix of clip `index` of `count` of a tower (shared contracts §2):
/// `vision.` / `audio.` for a single one, `vision.{index}.` / `audio.{index}.` for several.
pub fn clip_prefix(tower: &str, index: usize, count: usize) -> String {
    if count == 1 {
        format!("{tower}.")
    } else {
        format!("{tower}.{index}.")
    }
}

#[cfg(test)]
mod tests {
    use super::placeholder_runs;

    #[test]
    fn placeholder_runs_are_maximal_and_ordered() {
        let tokens = [1, 9, 9, 9, 2, 9, 3, 9, 9];
        assert_eq!(placeholder_runs(&tokens, 9), vec![1..4, 5..6, 7..9]);
        assert!(placeholder_runs(&tokens, 7).is_empty());
    }
}
