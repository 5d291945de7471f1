//! One conformer layer of the audio tower (shared spec: multimodal §2.3, §5 item 10).
//!
//! ```text
//! x = feed_forward1(x)                                          macaron half, weight 0.5   [T, Da]
//! x = x + RMSNorm_{norm_post_attn}( clip( Attention( RMSNorm_{norm_pre_attn}( clip(x) ) ) ) )
//! x = light_conv(x)                                             its own residual
//! x = feed_forward2(x)                                          macaron half, weight 0.5
//! y = RMSNorm_{norm_out}( clip(x) )
//! ```
//!
//! The residual stream is updated in place; the attention's post-norm is fused with its
//! residual add ([`add_normed`]).

use gemma4_reference::config::AudioConfig;

use crate::audio::attention::audio_attention;
use crate::audio::feed_forward::{clip_in_place, clipped_rms_norm, feed_forward};
use crate::audio::weights::ConformerLayerWeights;
use crate::rms_norm::{add_normed, rms_norm_in_place};

/// `min(gradient_clipping, f32::MAX)`: torch clamps to the dtype's range (1e10 in float32).
pub fn clip_value(config: &AudioConfig) -> f32 {
    config.gradient_clipping.min(f32::MAX as f64) as f32
}

/// Runs one conformer layer on `hidden` (`[T, Da]`, valid frames only, updated in place).
pub fn conformer_layer(
    hidden: &mut [f32],
    steps: usize,
    weights: &ConformerLayerWeights,
    config: &AudioConfig,
) {
    let eps = config.rms_norm_eps;
    let width = config.hidden_size;
    let clip = clip_value(config);
    let half = config.residual_weight as f32;
    feed_forward(hidden, steps, &weights.feed_forward1, half, clip, eps);
    let normed = clipped_rms_norm(hidden, width, &weights.norm_pre_attn, clip, eps);
    let mut attended = audio_attention(&normed, steps, &weights.attention, config);
    clip_in_place(&mut attended, clip);
    add_normed(hidden, &attended, width, &weights.norm_post_attn, eps);
    crate::audio::light_conv::light_conv(hidden, steps, &weights.light_conv, clip, eps);
    feed_forward(hidden, steps, &weights.feed_forward2, half, clip, eps);
    clip_in_place(hidden, clip);
    rms_norm_in_place(hidden, width, Some(&weights.norm_out), eps);
}
