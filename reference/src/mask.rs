//! Attention masks of the text decoder (shared spec: text §5.5, §15.5; multimodal §3.3).
//!
//! Keys and queries are identified by absolute positions `j` and `i`.
//! - Full layers: key `j` is visible to query `i` iff `j ≤ i` (causal).
//! - Sliding layers: iff `j ≤ i` **and** `i − j < W`: the window holds exactly `W` keys, the
//!   query itself included; `i − j = W` is masked.
//! - Models with `use_bidirectional_attention = "vision"` (31B, 26B-A4B): on **sliding** layers,
//!   tokens of the same image block (a maximal run of image or video placeholders) also see each
//!   other's *later* tokens: `(j ≤ i or same block) and i − j < W` (Hugging Face bounds the
//!   window below only; JAX uses `|i − j| < W`, which differs only for an image of more than `W`
//!   soft tokens). Full layers stay causal, and so do BOI/EOI (in no block).

use crate::config::{CheckpointLayout, ModelConfig};
use crate::faults::{fault_active, Fault};
use crate::layer_plan::LayerPlan;
use crate::merge::placeholder_runs;

/// The image blocks of one forward pass: for each of its tokens (at absolute positions
/// `first_position..`), the block it belongs to, if any.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageBlocks {
    first_position: usize,
    blocks: Vec<Option<usize>>,
}

impl ImageBlocks {
    /// No bidirectional blocks (text-only prompts, models without `"vision"`, decode steps).
    pub fn none() -> Self {
        ImageBlocks::default()
    }

    /// The blocks of `token_ids` (at positions `first_position..`): each maximal run of image or
    /// video placeholder ids, numbered in order, on `"vision"` models; none otherwise.
    pub fn of(config: &ModelConfig, token_ids: &[usize], first_position: usize) -> Self {
        let bidirectional = config.layout == CheckpointLayout::ConditionalGeneration
            && config.text.use_bidirectional_attention.as_deref() == Some("vision");
        let tokens = &config.special_tokens;
        let ids = [tokens.image_token_id, tokens.video_token_id];
        if !bidirectional || !ids.iter().flatten().any(|id| token_ids.contains(id)) {
            return ImageBlocks::none();
        }
        // Image and video placeholders form blocks together (HF's token types 1 and 2).
        let is_visual = |t: usize| ids.contains(&Some(t));
        let marker = usize::MAX;
        let marked: Vec<usize> = token_ids
            .iter()
            .map(|&t| if is_visual(t) { marker } else { 0 })
            .collect();
        let mut blocks = vec![None; token_ids.len()];
        for (block, run) in placeholder_runs(&marked, marker).into_iter().enumerate() {
            let run = if fault_active(Fault::VisionBlockIncludesBoiEoi) {
                // Bug: the BOI before and the EOI after the run join the block.
                run.start.saturating_sub(1)..(run.end + 1).min(token_ids.len())
            } else {
                run
            };
            for slot in &mut blocks[run] {
                *slot = Some(block);
            }
        }
        ImageBlocks {
            first_position,
            blocks,
        }
    }

    /// The block of the token at `position`, if it is in one.
    fn block(&self, position: usize) -> Option<usize> {
        let index = position.checked_sub(self.first_position)?;
        self.blocks.get(index).copied().flatten()
    }

    /// Are both positions in the same image block?
    fn same_block(&self, a: usize, b: usize) -> bool {
        self.block(a).is_some() && self.block(a) == self.block(b)
    }

    /// Is any token of this pass in a block?
    pub fn is_empty(&self) -> bool {
        self.blocks.iter().all(Option::is_none)
    }
}

/// May the query at `query_position` attend to the key at `key_position` in this layer?
pub fn key_is_visible(
    layer: &LayerPlan,
    query_position: usize,
    key_position: usize,
    blocks: &ImageBlocks,
) -> bool {
    let causal = key_position <= query_position;
    let same_block = blocks.same_block(query_position, key_position);
    match layer.sliding_window {
        None => causal || (fault_active(Fault::VisionBidirectionalOnGlobal) && same_block),
        Some(window) => {
            let window = if fault_active(Fault::SlidingWindowPlusOne) {
                window + 1
            } else if fault_active(Fault::SlidingWindowMinusOne) {
                window.saturating_sub(1).max(1)
            } else {
                window
            };
            let bidirectional = same_block && !fault_active(Fault::VisionBidirectionalMissing);
            // The window bounds keys below only: i − j < W (j > i is fine inside a block).
            let ahead_cut = fault_active(Fault::SlidingWindowTwoSided)
                // Bug: keys ahead bounded too, j − i < W.
                && (key_position as i64 - query_position as i64) >= window as i64;
            (causal || bidirectional)
                && (query_position as i64 - key_position as i64) < window as i64
                && !ahead_cut
        }
    }
}
