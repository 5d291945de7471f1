//! The fault catalogue: known Gemma 4 porting bugs, compiled into the reference and off by default.
//!
//! Each [`Fault`] is a deliberate, plausible mistake (shared contracts §4). Switching one on makes
//! the reference behave like a port with that bug. Two things use this:
//! - `gemma4 compare` re-runs the reference with each fault to name the most likely bug in a
//!   diverging port (the "diagnosis");
//! - `cargo xtask mutants` runs the test suite once per fault and demands that some test fails,
//!   which measures the suite's power to catch each bug.
//!
//! The switch is per thread ([`with_faults`]), so tests running in parallel do not see each
//! other's faults. The environment variable `GEMMA4_FAULTS` (comma-separated ids) sets the
//! initial set of every thread; it exists for `cargo xtask mutants` only. Inside the model each
//! fault is a single `if fault_active(Fault::...)` next to the correct code, so reading the
//! reference shows exactly what the bug changes.

use std::cell::RefCell;
use std::collections::BTreeSet;

macro_rules! fault_catalogue {
    ($( $variant:ident => ($id:literal, $section:literal, $description:literal), )*) => {
        /// A known porting bug that the reference can imitate.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum Fault {
            $( #[doc = $description] $variant, )*
        }

        impl Fault {
            /// Every fault, in catalogue order (stable; new faults are appended).
            pub const ALL: &'static [Fault] = &[ $( Fault::$variant, )* ];

            /// The stable identifier (shared contracts §4), e.g. `rmsnorm_one_plus_weight`.
            pub fn id(self) -> &'static str {
                match self { $( Fault::$variant => $id, )* }
            }

            /// One line saying what the bug does.
            pub fn description(self) -> &'static str {
                match self { $( Fault::$variant => $description, )* }
            }

            /// The section of the shared spec that states the correct behaviour.
            pub fn spec_section(self) -> &'static str {
                match self { $( Fault::$variant => $section, )* }
            }
        }
    };
}

fault_catalogue! {
    RmsnormOnePlusWeight => ("rmsnorm_one_plus_weight", "text §0 (notation), §15.1", "RMSNorm multiplies by 1 + w (the Gemma 1-3 habit) instead of w"),
    AttentionScaleInvSqrtD => ("attention_scale_inv_sqrt_d", "text §5.4, §15.2", "text attention scores scaled by 1/sqrt(head_dim) instead of 1.0"),
    RopeFullOnGlobal => ("rope_full_on_global", "text §6, §15.4", "global layers rotate every frequency pair (no p-RoPE)"),
    RopeExponentOverRotatedWidth => ("rope_exponent_over_rotated_width", "text §6, §15.4", "p-RoPE frequencies computed over the rotated width instead of the head dim"),
    RopeInterleavedPairs => ("rope_interleaved_pairs", "text §6, §15.4", "RoPE pairs (2i, 2i+1) instead of rotate-half (i, i + d/2)"),
    SlidingWindowPlusOne => ("sliding_window_plus_one", "text §5.5, §15.5", "the sliding window admits W+1 keys"),
    SlidingWindowMinusOne => ("sliding_window_minus_one", "text §5.5, §15.5", "the sliding window admits W-1 keys"),
    VNormMissing => ("v_norm_missing", "text §5.2, §15.3", "values not passed through the weight-free RMSNorm"),
    ValueRotated => ("value_rotated", "text §5.2, §15.3", "RoPE applied to values"),
    KvSharedWrongSource => ("kv_shared_wrong_source", "text §7, §15.7", "a KV-shared layer reads the last non-shared layer regardless of its attention type"),
    PleMissing => ("ple_missing", "text §4, §10 step 6", "no Per-Layer Embeddings at all"),
    PleNoInputScale => ("ple_no_input_scale", "text §4 step 4, §15.9", "the 2^-1/2 on (context + token) missing"),
    PleNoTokenScale => ("ple_no_token_scale", "text §4 step 1, §15.9", "the sqrt(P) on the PLE table rows missing"),
    PlePlaceholderNotPad => ("ple_placeholder_not_pad", "text §4, multimodal §3.2", "multimodal placeholder positions use their own PLE row instead of the pad row"),
    LayerScalarIgnored => ("layer_scalar_ignored", "text §10 step 7, §15.11", "layer_scalar not applied"),
    EmbedScaleNotRounded => ("embed_scale_not_rounded", "text §4, §15.14", "sqrt(D) not rounded to the weight dtype (bf16 checkpoints)"),
    RouterOnNormedInput => ("router_on_normed_input", "text §9 step 2, §15.13", "the MoE router reads the pre-feed-forward-normed input instead of the residual"),
    RouterNoRenormalize => ("router_no_renormalize", "text §9 step 2, §15.13", "top-k weights not renormalised to sum to 1"),
    RouterPerExpertScaleIgnored => ("router_per_expert_scale_ignored", "text §9 step 2, §15.13", "per_expert_scale not applied"),
    SharedMlpMissing => ("shared_mlp_missing", "text §9 step 1", "MoE layers without the dense (shared) MLP"),
    SoftcapMissing => ("softcap_missing", "text §11, §15.15", "final_logit_softcapping not applied"),
    GeluExact => ("gelu_exact", "text §0 (notation), §8", "erf GELU instead of the tanh approximation"),
    // Faults found while building the reference (not in the original contract list).
    KeyEqualsValueFromFinalKey => ("k_eq_v_value_from_final_key", "text §5.3, §15.3", "on K=V layers, V is taken from the normed and rotated K instead of the raw projection"),
    PostNormAfterResidual => ("post_norm_after_residual", "text §10 steps 3 and 5, §15.12", "sandwich post-norms applied after the residual add instead of on the branch"),
    GqaHeadModulo => ("gqa_head_modulo", "text §5.4", "query head n reads KV head n mod K instead of floor(n / (H/K))"),
    RopeThetaSwapped => ("rope_theta_swapped", "text §6", "sliding and full layers use each other's RoPE theta"),
    PleNoProjectionScale => ("ple_no_projection_scale", "text §4 step 2, §15.9", "the D^-1/2 on the PLE context projection missing"),
    MlpGateUpSwapped => ("mlp_gate_up_swapped", "text §8", "GeGLU computes gelu(up) * gate instead of gelu(gate) * up"),
    KvSharedFirstProducer => ("kv_shared_first_producer", "text §7, §15.7", "a KV-shared layer reads the first layer of its type instead of the last non-shared one"),
    // The vision and merge faults of shared contracts §4.
    VisionAttentionScaleInvSqrtD => ("vision_attention_scale_inv_sqrt_d", "multimodal §1.3, §5 item 1", "vision attention scaled by 1/sqrt(head_dim) instead of 1.0"),
    VisionRopeAxesSwapped => ("vision_rope_axes_swapped", "multimodal §1.4, §5 item 2", "2D RoPE with the x and y halves swapped (the first half rotated by the row)"),
    VisionPixelsNotRescaled => ("vision_pixels_not_rescaled", "multimodal §1.2, §5 item 3", "the 2p - 1 on the patch pixels missing"),
    VisionPoolScaleMissing => ("vision_pool_scale_missing", "multimodal §1.6, §5 item 5", "the sqrt(Dv) after pooling missing"),
    VisionStandardizeMissing => ("vision_standardize_missing", "multimodal §1.6 step 8, §5 item 5", "large-tower standardize (bias, scale) not applied"),
    VisionClipIgnored => ("vision_clip_ignored", "multimodal §1.5, §5 item 7", "clipped linears not clipped (both towers: a port that skips the bounds skips them everywhere)"),
    VisionBidirectionalOnGlobal => ("vision_bidirectional_on_global", "multimodal §3.3, §5 item 10", "image blocks bidirectional on global (full) layers too"),
    VisionBidirectionalMissing => ("vision_bidirectional_missing", "multimodal §3.3, §5 item 10", "image blocks causal on sliding layers"),
    // Vision faults found while building the tower (not in the original contract list).
    VisionPositionTablesSwapped => ("vision_position_tables_swapped", "multimodal §1.2, §5 item 4", "the x position table read with y and the y table with x"),
    VisionSoftTokensScaled => ("vision_soft_tokens_scaled", "multimodal §1.7, §3.2, §5 item 6", "soft tokens multiplied by sqrt(D) like text embeddings"),
    VisionBlockIncludesBoiEoi => ("vision_block_includes_boi_eoi", "multimodal §3.3, §5 item 10", "the begin/end-of-image tokens joined to their image's bidirectional block"),
    // The audio faults of shared contracts §4.
    AudioWindow13 => ("audio_window_13", "multimodal §2.4, §5 item 8", "13 keys per audio query instead of 12"),
    AudioSoftcapMissing => ("audio_softcap_missing", "multimodal §2.4, §5 item 8", "audio attention logits not soft-capped"),
    AudioPowerSpectrum => ("audio_power_spectrum", "multimodal §2.1 step 4, §5 item 9", "power instead of magnitude spectrum"),
    AudioNoLeftPad => ("audio_no_left_pad", "multimodal §2.1 step 1, §5 item 9", "the 160-sample left pad of the front end missing"),
    AudioProjectThenNorm => ("audio_project_then_norm", "multimodal §2.5, §5 item 6", "audio projector in the other order (project, then norm)"),
    // Faults found in real ports (docs/ports.md).
    PleProjectionScaleFoldedBf16 => ("ple_projection_scale_folded_bf16", "text §4 step 2", "the D^-1/2 of the PLE context projection folded into its bfloat16 weights (each weight times bf16(D^-1/2), rounded to bf16 again) instead of scaling the product"),
    SlidingWindowTwoSided => ("sliding_window_two_sided", "text §5.5, multimodal §3.3", "the sliding window also bounds keys ahead (|i - j| < W): inside a bidirectional image block a token does not see its block's tokens W or more positions ahead"),
}

impl Fault {
    /// Looks a fault up by its identifier.
    pub fn from_id(id: &str) -> Option<Fault> {
        Fault::ALL.iter().copied().find(|f| f.id() == id)
    }
}

thread_local! {
    static ACTIVE: RefCell<BTreeSet<Fault>> = RefCell::new(faults_from_environment());
}

fn faults_from_environment() -> BTreeSet<Fault> {
    std::env::var("GEMMA4_FAULTS")
        .map(|ids| {
            ids.split(',')
                .map(str::trim)
                .filter(|id| !id.is_empty())
                .filter_map(|id| {
                    let fault = Fault::from_id(id);
                    if fault.is_none() {
                        eprintln!("GEMMA4_FAULTS: unknown fault id `{id}` ignored");
                    }
                    fault
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Is this fault switched on for the current thread? (Always false unless a caller asked for it.)
pub fn fault_active(fault: Fault) -> bool {
    ACTIVE.with(|active| active.borrow().contains(&fault))
}

/// Runs `body` with exactly `faults` switched on in this thread, then restores the previous set.
pub fn with_faults<R>(faults: &[Fault], body: impl FnOnce() -> R) -> R {
    let previous = ACTIVE.with(|active| active.replace(faults.iter().copied().collect()));
    struct Restore(Option<BTreeSet<Fault>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            if let Some(previous) = self.0.take() {
                ACTIVE.with(|active| *active.borrow_mut() = previous);
            }
        }
    }
    let _restore = Restore(Some(previous));
    body()
}

/// The faults currently switched on in this thread.
pub fn active_faults() -> Vec<Fault> {
    ACTIVE.with(|active| active.borrow().iter().copied().collect())
}
