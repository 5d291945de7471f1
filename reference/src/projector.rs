//! The projector of soft tokens into the text model, shared by the vision and the audio tower
//! (Hugging Face `Gemma4MultimodalEmbedder`; shared spec: multimodal §1.7, §2.5, §5 item 6).
//!
//! ```text
//! soft_text = RMSNorm_∅(soft) · embedding_projectionᵀ        [S, Dt]
//! ```
//!
//! A weight-free RMSNorm over the tower's width, then a bias-free linear into the text width.
//! Soft tokens are **not** multiplied by `√Dt` (only text-token embeddings are).

use ndarray::Array2;

use crate::linear::linear;
use crate::rms_norm::rms_norm_rows;

/// Projects soft tokens `[S, Dv]` into the text model: returns `[S, Dt]`.
/// `projection`: `embedding_projection.weight` `[Dt, Dv]`; `eps`: the tower's RMSNorm ε.
pub fn project_soft_tokens(soft: &Array2<f32>, projection: &Array2<f32>, eps: f64) -> Array2<f32> {
    let normed = rms_norm_rows(soft.view(), None, eps);
    linear(normed.view(), projection)
}
