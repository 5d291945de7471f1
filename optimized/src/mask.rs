//! Attention masks as key ranges (shared spec: text §5.5, §15.5; multimodal §3.3).
//!
//! The reference asks "is key j visible to query i?" for every pair; here a query asks once for
//! its visible range and never touches the keys outside it (no masked-out score is computed,
//! which is what keeps sliding-window attention O(W) per query):
//! - full layers: `0 ..= i`;
//! - sliding layers: `i + 1 − W ..= i` (clamped at 0): exactly `W` keys, the query's own included;
//! - sliding layers of `use_bidirectional_attention = "vision"` models, for a query inside an
//!   image block `[s, e)`: `i + 1 − W ..= e − 1`: the block's later tokens too (the window bounds
//!   keys below only, as in Hugging Face). Full layers stay causal; BOI/EOI are in no block.
//!
//! The visible keys of a query are always one contiguous run: below `i` the window, above `i`
//! (bidirectional only) the rest of the query's own block.

use std::ops::{Range, RangeInclusive};

use gemma4_reference::config::{CheckpointLayout, ModelConfig};
use gemma4_reference::merge::placeholder_runs;

/// The image blocks of one forward pass, as ranges of absolute positions: each maximal run of
/// image or video placeholder ids of a `"vision"` model (the reference's
/// `gemma4_reference::mask::ImageBlocks`, whose block ranges are private; computed here from the
/// token ids with the reference's `placeholder_runs`, by the same rule).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageBlocks {
    /// Sorted, disjoint, non-empty.
    ranges: Vec<Range<usize>>,
}

impl ImageBlocks {
    /// No bidirectional blocks (text-only prompts, models without `"vision"`, decode steps).
    pub fn none() -> Self {
        ImageBlocks::default()
    }

    /// The blocks of `token_ids` (at positions `first_position..`): each maximal run of image or
    /// video placeholder ids, on `Gemma4ForConditionalGeneration` models with
    /// `use_bidirectional_attention = "vision"`; none otherwise (`ImageBlocks::of` of the
    /// reference).
    pub fn of(config: &ModelConfig, token_ids: &[usize], first_position: usize) -> Self {
        let bidirectional = config.layout == CheckpointLayout::ConditionalGeneration
            && config.text.use_bidirectional_attention.as_deref() == Some("vision");
        let tokens = &config.special_tokens;
        let ids = [tokens.image_token_id, tokens.video_token_id];
        if !bidirectional || !ids.iter().flatten().any(|id| token_ids.contains(id)) {
            return ImageBlocks::none();
        }
        // Image and video placeholders form blocks together (HF's token types 1 and 2).
        let marker = usize::MAX;
        let marked: Vec<usize> = token_ids
            .iter()
            .map(|&t| if ids.contains(&Some(t)) { marker } else { 0 })
            .collect();
        let ranges = placeholder_runs(&marked, marker)
            .into_iter()
            .map(|run| first_position + run.start..first_position + run.end)
            .collect();
        ImageBlocks { ranges }
    }

    /// Blocks at the given absolute position ranges (tests, benchmarks). Panics unless they are
    /// sorted, disjoint and non-empty.
    pub fn from_ranges(ranges: Vec<Range<usize>>) -> Self {
        assert!(
            ranges.iter().all(|r| r.start < r.end)
                && ranges.windows(2).all(|w| w[0].end <= w[1].start),
            "image blocks must be sorted, disjoint and non-empty: {ranges:?}"
        );
        ImageBlocks { ranges }
    }

    /// The blocks, in position order.
    pub fn ranges(&self) -> &[Range<usize>] {
        &self.ranges
    }

    /// Is there no block at all?
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The block holding `position`, if any.
    pub fn block_of(&self, position: usize) -> Option<Range<usize>> {
        let at = self.ranges.partition_point(|r| r.end <= position);
        self.ranges
            .get(at)
            .filter(|r| r.contains(&position))
            .cloned()
    }
}

/// The visible key positions of a query at `query_position`: `first..=last` (see the module
/// documentation); `blocks` only matter on sliding layers.
#[inline]
pub fn visible_keys(
    query_position: usize,
    sliding_window: Option<usize>,
    blocks: &ImageBlocks,
) -> RangeInclusive<usize> {
    match sliding_window {
        Some(window) => {
            let first = (query_position + 1).saturating_sub(window);
            let last = match blocks.block_of(query_position) {
                Some(block) => (block.end - 1).max(query_position),
                None => query_position,
            };
            first..=last
        }
        None => 0..=query_position,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{layout_tokens, vision_config};
    use gemma4_reference::mask::{key_is_visible, ImageBlocks as ReferenceBlocks};
    use proptest::prelude::*;

    #[test]
    fn mask_visible_range_equals_reference_mask_sliding_and_full() {
        for window in [None, Some(1), Some(4), Some(6)] {
            let layer = crate::synthetic::attention_layer(8, 2, 1, window);
            for i in 0..20 {
                for j in 0..25 {
                    assert_eq!(
                        visible_keys(i, window, &ImageBlocks::none()).contains(&j),
                        key_is_visible(&layer, i, j, &ReferenceBlocks::none()),
                        "window {window:?}, query {i}, key {j}"
                    );
                }
            }
        }
    }

    /// Every (query, key) pair of a pass against the reference's `key_is_visible` with the
    /// reference's `ImageBlocks::of` of the same tokens.
    fn check_against_reference(
        config: &ModelConfig,
        tokens: &[usize],
        first_position: usize,
        windows: &[Option<usize>],
    ) -> std::result::Result<(), TestCaseError> {
        let ours = ImageBlocks::of(config, tokens, first_position);
        let reference = ReferenceBlocks::of(config, tokens, first_position);
        prop_assert_eq!(ours.is_empty(), reference.is_empty());
        let end = first_position + tokens.len();
        for &window in windows {
            let layer = crate::synthetic::attention_layer(4, 2, 1, window);
            for i in first_position..end {
                let visible = visible_keys(i, window, &ours);
                for j in 0..end {
                    prop_assert_eq!(
                        visible.contains(&j),
                        key_is_visible(&layer, i, j, &reference),
                        "window {:?}, query {}, key {}, tokens {:?} from {}",
                        window,
                        i,
                        j,
                        tokens,
                        first_position
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn mask_image_blocks_equal_reference_two_images_and_one_longer_than_window() {
        let config = vision_config(Some("vision"), true);
        // One image of 6 tokens at positions 4..10 (longer than the window 4), then a video
        // frame of 2 tokens, then text: the spec's toy and two blocks.
        let tokens = layout_tokens(3, &[(6, 2, false), (2, 3, true)]);
        let blocks = ImageBlocks::of(&config, &tokens, 0);
        assert_eq!(blocks.ranges(), &[4..10, 14..16]);
        // The first image token sees its whole image, further than the window.
        assert_eq!(visible_keys(4, Some(4), &blocks), 1..=9);
        assert_eq!(
            visible_keys(4, None, &blocks),
            0..=4,
            "full layers stay causal"
        );
        assert_eq!(
            visible_keys(10, Some(4), &blocks),
            7..=10,
            "EOI stays causal"
        );
        check_against_reference(&config, &tokens, 0, &[Some(4), Some(1), Some(7), None]).unwrap();
    }

    #[test]
    fn mask_no_blocks_without_vision_attention_or_outside_conditional_generation() {
        for (bidirectional, conditional) in [(None, true), (Some("vision"), false)] {
            let config = vision_config(bidirectional, conditional);
            let tokens = layout_tokens(2, &[(5, 1, false)]);
            assert!(ImageBlocks::of(&config, &tokens, 0).is_empty());
            check_against_reference(&config, &tokens, 0, &[Some(3), None]).unwrap();
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Random layouts: up to three images or video frames of 1–12 tokens with 0–4 text
        /// tokens between them, after a cache of 0–5 positions, windows of 1–9 and full.
        #[test]
        fn mask_image_blocks_equal_reference_random_layouts(
            lead in 0usize..4,
            images in proptest::collection::vec((1usize..13, 0usize..5, any::<bool>()), 0..4),
            first_position in 0usize..6,
            window in 1usize..10,
        ) {
            let config = vision_config(Some("vision"), true);
            let tokens = layout_tokens(lead, &images);
            prop_assume!(!tokens.is_empty());
            check_against_reference(&config, &tokens, first_position, &[Some(window), None])?;
        }
    }
}
