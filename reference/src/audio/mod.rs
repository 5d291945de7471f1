//! The audio tower of E2B/E4B: from a 16 kHz WAV file to soft tokens in the text model's width
//! (shared spec: multimodal §2). The larger models (26B-A4B, 31B) have no audio tower.
//!
//! Reading order, following the data:
//! 1. [`wav`]: the file decoded to a mono 16 kHz waveform in [−1, 1] (as soundfile/librosa);
//! 2. [`features`]: the log-mel front end, Hugging Face's `Gemma4AudioFeatureExtractor`
//!    (semicausal pad, 320-sample Hann frames, |rfft 512|, 128 HTK mel bins, `ln(· + 0.001)`),
//!    and the soft-token count of a clip; [`features_file`] reads precomputed features instead;
//! 3. [`subsampling`]: two stride-2 convolutions (time and mel ÷ 4), projected to the tower width;
//! 4. [`conformer_layer`] (×12): [`feed_forward`] halves around chunked local [`attention`] and a
//!    [`light_conv`];
//! 5. [`tower`]: the whole stack, its output projection and the projector into the text width.
//!
//! [`weights`] is the only module that knows the tower's checkpoint names.

pub mod attention;
pub mod conformer_layer;
pub mod features;
pub mod features_file;
pub mod feed_forward;
pub mod light_conv;
pub mod subsampling;
pub mod tower;
pub mod wav;
pub mod weights;
