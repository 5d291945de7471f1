//! The prompt of `gemma4 dump` and `gemma4 compare --model`: token ids and the images and audio
//! clips whose soft tokens fill their placeholder runs (shared contracts §1).

use std::path::PathBuf;

use gemma4_reference::audio::features_file::read_audio_features;
use gemma4_reference::audio::{load_clip, AudioInput};
use gemma4_reference::merge::Prompt;
use gemma4_reference::vision::pixel_values::read_pixel_values;
use gemma4_reference::vision::preprocessing::{load_image, preprocess, SUPPORTED_BUDGETS};
use gemma4_reference::vision::ImageInput;
use gemma4_reference::{Error, Result};

/// The images and audio clips of a prompt, as the command line gives them.
#[derive(Clone, Debug, Default)]
pub struct MediaOptions {
    /// Image files, in the order of the placeholder runs (`--image`, repeatable).
    pub images: Vec<PathBuf>,
    /// Soft-token budget of every image (`--image-budget`).
    pub image_budget: usize,
    /// Preprocessed images instead of files (`--pixel-values`).
    pub pixel_values: Option<PathBuf>,
    /// WAV files, in the order of the audio placeholder runs (`--audio`, repeatable).
    pub audio: Vec<PathBuf>,
    /// Log-mel features of audio clips instead of WAV files (`--audio-features`).
    pub audio_features: Option<PathBuf>,
}

/// The prompt of `tokens` and `media`: each image file decoded and preprocessed for the budget
/// (multimodal spec §1.1), or the preprocessed pixels of a `--pixel-values` file; each WAV file
/// read and turned into log-mel features (§2.1), or the features of an `--audio-features` file.
pub fn build_prompt(tokens: Vec<usize>, media: &MediaOptions) -> Result<Prompt> {
    if !SUPPORTED_BUDGETS.contains(&media.image_budget) {
        return Err(Error::Input {
            message: format!(
                "--image-budget {} is not supported; Gemma 4 takes {} soft tokens per image",
                media.image_budget,
                SUPPORTED_BUDGETS.map(|b| b.to_string()).join(", ")
            ),
        });
    }
    let images: Vec<ImageInput> = match &media.pixel_values {
        Some(path) => read_pixel_values(path)?,
        None => media
            .images
            .iter()
            .map(|path| Ok(preprocess(&load_image(path)?, media.image_budget)?.into()))
            .collect::<Result<_>>()?,
    };
    let audio = match &media.audio_features {
        Some(path) => read_audio_features(path)?
            .into_iter()
            .map(AudioInput::Features)
            .collect(),
        None => media
            .audio
            .iter()
            .map(|path| load_clip(path))
            .collect::<Result<_>>()?,
    };
    Ok(Prompt {
        tokens,
        images,
        audio,
    })
}
