//! One conformer layer of the audio tower (shared spec: multimodal §2.3, §5 item 10).
//!
//! ```text
//! x = feed_forward1(x)                                          macaron half, weight 0.5
//! x = x + RMSNorm_{norm_post_attn}( clip( Attention( RMSNorm_{norm_pre_attn}( clip(x) ) ) ) )
//! x = light_conv(x)                                             its own residual
//! x = feed_forward2(x)                                          macaron half, weight 0.5
//! y = RMSNorm_{norm_out}( clip(x) )
//! ```

use ndarray::{Array1, Array2};

use crate::audio::attention::{audio_attention, AudioAttentionWeights};
use crate::audio::feed_forward::{clip, feed_forward, FeedForwardWeights};
use crate::audio::light_conv::{light_conv, LightConvWeights};
use crate::config::AudioConfig;
use crate::rms_norm::rms_norm;

/// One layer's weights.
pub struct ConformerLayerWeights {
    pub feed_forward1: FeedForwardWeights,
    pub norm_pre_attn: Array1<f32>,
    pub attention: AudioAttentionWeights,
    pub norm_post_attn: Array1<f32>,
    pub light_conv: LightConvWeights,
    pub feed_forward2: FeedForwardWeights,
    pub norm_out: Array1<f32>,
}

/// Runs one conformer layer on `x` (`[T, Da]`, valid frames only).
pub fn conformer_layer(
    x: &Array2<f32>,
    weights: &ConformerLayerWeights,
    config: &AudioConfig,
) -> Array2<f32> {
    let eps = config.rms_norm_eps;
    // torch clamps to min(gradient_clipping, dtype max): 1e10 in float32.
    let clip_value = config.gradient_clipping.min(f32::MAX as f64) as f32;
    let half = config.residual_weight as f32;
    let x = feed_forward(x, &weights.feed_forward1, half, clip_value, eps);
    let normed = rms_norm(&clip(&x, clip_value), &weights.norm_pre_attn, eps);
    let attended = audio_attention(&normed, &weights.attention, config);
    let x = &x + &rms_norm(&clip(&attended, clip_value), &weights.norm_post_attn, eps);
    let x = light_conv(&x, &weights.light_conv, clip_value, eps);
    let x = feed_forward(&x, &weights.feed_forward2, half, clip_value, eps);
    rms_norm(&clip(&x, clip_value), &weights.norm_out, eps)
}
