//! Precision choices: the shortcuts real runtimes take on purpose, which the reference can
//! imitate so that `gemma4 compare` can tell "right at its precision" from "wrong".
//!
//! A [`PrecisionChoice`] is not a bug (that is [`crate::faults`]): the formula is right, only
//! some intermediate is held in fewer bits than float32. llama.cpp's CPU defaults, for example,
//! store keys and values as float16, run attention through ggml's flash-attention kernel with a
//! float16 accumulator, and compute GELU through a 65 536-entry float16 table; each moves the
//! logits of a random model by 1e-4 to 1e-3 relative, far beyond the float32 tolerances, while
//! the port is correct. Switching a choice on makes the reference round at the same points as
//! the runtime (each choice cites the runtime code it imitates); `compare --precision PROFILE`
//! judges a dump against that run, and the diagnosis of a diverging dump names the choice that
//! reproduces it as "a precision choice, not a bug".
//!
//! Like the faults, the switch is per thread ([`with_precision`]); a caller that fans work out
//! to other threads passes [`active_precision`] along. Inside the model each choice is a single
//! `if precision_active(PrecisionChoice::...)` next to the float32 code.

use std::cell::RefCell;
use std::collections::BTreeSet;

use half::{bf16, f16};

macro_rules! precision_catalogue {
    ($( $variant:ident => ($id:literal, $description:literal), )*) => {
        /// A precision shortcut that the reference can imitate (not a bug).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum PrecisionChoice {
            $( #[doc = $description] $variant, )*
        }

        impl PrecisionChoice {
            /// Every choice, in catalogue order (stable; new choices are appended).
            pub const ALL: &'static [PrecisionChoice] = &[ $( PrecisionChoice::$variant, )* ];

            /// The stable identifier, e.g. `kv_cache_f16`.
            pub fn id(self) -> &'static str {
                match self { $( PrecisionChoice::$variant => $id, )* }
            }

            /// What the runtime holds in fewer bits, and where (the code it imitates).
            pub fn description(self) -> &'static str {
                match self { $( PrecisionChoice::$variant => $description, )* }
            }
        }
    };
}

precision_catalogue! {
    KvCacheF16 => ("kv_cache_f16", "keys and values stored as float16 in the KV cache, after RoPE and the norms (llama.cpp's default `type_k`/`type_v` F16, src/llama-context.cpp `llama_context_default_params`); the prompt's own attention reads them back from the cache too"),
    KvCacheQ8_0 => ("kv_cache_q8_0", "keys and values stored as Q8_0 in the KV cache: blocks of 32 values of a token's row share one float16 scale max|x|/127 and hold round(x/scale) as int8 (llama.cpp `--cache-type-k q8_0 --cache-type-v q8_0`, ggml `quantize_row_q8_0_ref`)"),
    AttentionF16Operands => ("attention_f16_operands", "attention as matrix products over a float16 cache: the query is rounded to float16 for q·k and the softmax probabilities are rounded to float16 for p·v, with float32 sums (ggml `mul_mat` converts its float32 operand to the cache's float16; llama.cpp without flash attention)"),
    FlashAttentionF16 => ("flash_attention_f16", "ggml's CPU flash attention, vector path (passes of fewer than 64 query rows: every decode step and short prompts): the query converted to the cache's type for q·k (float16, or Q8_0 over a Q8_0 cache), an online softmax whose value accumulator is float16 over a float16 cache, rounded after every key (ggml-cpu/ops.cpp `ggml_compute_forward_flash_attn_ext_f16_one_chunk`); longer passes take its float32 tiled path"),
    GeluF16Table => ("gelu_f16_table", "GELU (tanh) through a float16 table: y = f16(gelu(f16(x))) for -10 < x < 10, 0 below, x above (ggml-cpu/vec.h `ggml_vec_gelu_f32` and `ggml_vec_geglu_f32` under `GGML_GELU_FP16`, defined by default)"),
    Bf16Activations => ("bf16_activations", "the text decoder's matrix products take their activations rounded to bfloat16 (float32 sums): bf16 autocast, or bf16 GEMM kernels fed float32 activations"),
}

impl PrecisionChoice {
    /// Looks a choice up by its identifier.
    pub fn from_id(id: &str) -> Option<PrecisionChoice> {
        PrecisionChoice::ALL.iter().copied().find(|c| c.id() == id)
    }
}

/// A runtime's set of precision choices under one name (`compare --precision NAME`).
#[derive(Clone, Copy, Debug)]
pub struct PrecisionProfile {
    pub name: &'static str,
    pub choices: &'static [PrecisionChoice],
    /// Which runtime, configured how.
    pub about: &'static str,
}

/// The named profiles of real runtimes.
pub const PROFILES: &[PrecisionProfile] = &[
    PrecisionProfile {
        name: "llama-cpp-cpu",
        choices: &[
            PrecisionChoice::KvCacheF16,
            PrecisionChoice::FlashAttentionF16,
            PrecisionChoice::GeluF16Table,
        ],
        about: "llama.cpp on the CPU with its defaults (F16 KV cache, flash attention `auto`, which the CPU backend enables, GELU through the float16 table)",
    },
    PrecisionProfile {
        name: "llama-cpp-cpu-no-flash-attention",
        choices: &[
            PrecisionChoice::KvCacheF16,
            PrecisionChoice::AttentionF16Operands,
            PrecisionChoice::GeluF16Table,
        ],
        about: "llama.cpp on the CPU with flash attention off (`-fa off`): F16 KV cache, attention as float16 matrix products, GELU table",
    },
    PrecisionProfile {
        name: "llama-cpp-cpu-q8-cache",
        choices: &[
            PrecisionChoice::KvCacheQ8_0,
            PrecisionChoice::FlashAttentionF16,
            PrecisionChoice::GeluF16Table,
        ],
        about: "llama.cpp on the CPU with a Q8_0 KV cache (`-ctk q8_0 -ctv q8_0`, which needs flash attention) and the GELU table",
    },
    PrecisionProfile {
        name: "llama-cpp-cpu-f32-cache-no-flash-attention",
        choices: &[PrecisionChoice::GeluF16Table],
        about: "llama.cpp on the CPU with an F32 KV cache and flash attention off (`-ctk f32 -ctv f32 -fa off`): float32 attention, the GELU table only (with flash attention on, `build_attn_mha` casts an F32 cache to F16 for the kernel: that is `llama-cpp-cpu`)",
    },
];

/// The choices a `--precision` argument names: a profile of [`PROFILES`], or choice ids
/// separated by commas (`float32` or an empty string: none).
pub fn parse_precision(text: &str) -> Result<(String, Vec<PrecisionChoice>), String> {
    let text = text.trim();
    if text.is_empty() || text == "float32" {
        return Ok(("float32".to_string(), Vec::new()));
    }
    if let Some(profile) = PROFILES.iter().find(|p| p.name == text) {
        return Ok((profile.name.to_string(), profile.choices.to_vec()));
    }
    let choices = text
        .split(',')
        .map(|id| {
            PrecisionChoice::from_id(id.trim()).ok_or_else(|| {
                format!(
                    "unknown precision `{}` (profiles: {}; choices: {})",
                    id.trim(),
                    PROFILES
                        .iter()
                        .map(|p| p.name)
                        .collect::<Vec<_>>()
                        .join(", "),
                    PrecisionChoice::ALL
                        .iter()
                        .map(|c| c.id())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
        })
        .collect::<Result<BTreeSet<_>, _>>()?;
    let choices: Vec<PrecisionChoice> = choices.into_iter().collect();
    Ok((precision_name(&choices), choices))
}

/// The name of a set of choices: its profile's, else its ids joined by `+`.
pub fn precision_name(choices: &[PrecisionChoice]) -> String {
    PrecisionSet::of(choices).name()
}

/// A set of precision choices, small and `Copy` (for options structs): empty is float32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PrecisionSet(u32);

impl PrecisionSet {
    /// float32 throughout.
    pub const FLOAT32: PrecisionSet = PrecisionSet(0);

    pub fn of(choices: &[PrecisionChoice]) -> Self {
        PrecisionSet(choices.iter().fold(0, |bits, &c| bits | Self::bit(c)))
    }

    fn bit(choice: PrecisionChoice) -> u32 {
        let index = PrecisionChoice::ALL
            .iter()
            .position(|&c| c == choice)
            .expect("every choice is in ALL");
        1 << index
    }

    pub fn choices(self) -> Vec<PrecisionChoice> {
        PrecisionChoice::ALL
            .iter()
            .copied()
            .filter(|&c| self.0 & Self::bit(c) != 0)
            .collect()
    }

    pub fn is_float32(self) -> bool {
        self.0 == 0
    }

    /// The profile of exactly these choices, if there is one.
    pub fn profile(self) -> Option<&'static PrecisionProfile> {
        PROFILES
            .iter()
            .find(|p| PrecisionSet::of(p.choices) == self)
    }

    /// Its profile's name, else its ids joined by `+` (`float32` when empty).
    pub fn name(self) -> String {
        if self.is_float32() {
            return "float32".to_string();
        }
        self.profile().map_or_else(
            || {
                self.choices()
                    .iter()
                    .map(|c| c.id())
                    .collect::<Vec<_>>()
                    .join("+")
            },
            |p| p.name.to_string(),
        )
    }

    /// What it imitates, in one sentence: its profile's `about`, else the choices'
    /// descriptions.
    pub fn about(self) -> String {
        self.profile().map_or_else(
            || {
                self.choices()
                    .iter()
                    .map(|c| format!("{}: {}", c.id(), c.description()))
                    .collect::<Vec<_>>()
                    .join("; ")
            },
            |p| p.about.to_string(),
        )
    }

    /// The hypotheses a diagnosis tries: every profile, then every single choice not already a
    /// profile (in catalogue order).
    pub fn hypotheses() -> Vec<PrecisionSet> {
        let mut sets: Vec<PrecisionSet> = PROFILES.iter().map(|p| Self::of(p.choices)).collect();
        for &choice in PrecisionChoice::ALL {
            let single = Self::of(&[choice]);
            if !sets.contains(&single) {
                sets.push(single);
            }
        }
        sets
    }
}

impl std::str::FromStr for PrecisionSet {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        parse_precision(text).map(|(_, choices)| PrecisionSet::of(&choices))
    }
}

impl std::fmt::Display for PrecisionSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

thread_local! {
    static ACTIVE: RefCell<BTreeSet<PrecisionChoice>> = const { RefCell::new(BTreeSet::new()) };
}

/// Is this choice switched on for the current thread?
pub fn precision_active(choice: PrecisionChoice) -> bool {
    ACTIVE.with(|active| active.borrow().contains(&choice))
}

/// The choices switched on in this thread.
pub fn active_precision() -> Vec<PrecisionChoice> {
    ACTIVE.with(|active| active.borrow().iter().copied().collect())
}

/// [`active_precision`] as a [`PrecisionSet`].
pub fn active_precision_set() -> PrecisionSet {
    PrecisionSet::of(&active_precision())
}

/// Runs `body` with exactly `choices` switched on in this thread, then restores the previous set.
pub fn with_precision<R>(choices: &[PrecisionChoice], body: impl FnOnce() -> R) -> R {
    let _scope = PrecisionScope::enter(choices);
    body()
}

/// Exactly these choices switched on in this thread until the scope is dropped (then the
/// previous set is restored): [`with_precision`] for code that returns early with `?`.
pub struct PrecisionScope(Option<BTreeSet<PrecisionChoice>>);

impl PrecisionScope {
    pub fn enter(choices: &[PrecisionChoice]) -> Self {
        PrecisionScope(Some(
            ACTIVE.with(|active| active.replace(choices.iter().copied().collect())),
        ))
    }
}

impl Drop for PrecisionScope {
    fn drop(&mut self) {
        if let Some(previous) = self.0.take() {
            ACTIVE.with(|active| *active.borrow_mut() = previous);
        }
    }
}

/// `x` rounded to float16 and back (round to nearest even; overflow to ±∞, as ggml's
/// conversion), after the rounding dither of a noise probe ([`with_rounding_dither`]).
pub fn round_f16(x: f32) -> f32 {
    f16::from_f32(dithered(x)).to_f32()
}

/// `x` rounded to bfloat16 and back (round to nearest even), after the rounding dither of a
/// noise probe.
pub fn round_bf16(x: f32) -> f32 {
    bf16::from_f32(dithered(x)).to_f32()
}

/// Relative size (unit variance) of the rounding dither of a noise probe: 1e-6, a few times the
/// float32 noise a value carries into a rounding point in an independent port (a sum of K
/// products, each off by up to 2^-24 relative, then normed: 1e-7 to 5e-7 on the golden
/// models). A probe's weight noise alone moves those values by about as much as a port's
/// rounding does, so it tips about as many roundings to the neighbouring value as the port
/// does, and in a small model that is a handful: one draw can miss the one flip that, in the
/// port, lands where it moves a tensor most (measured: a port imitated with 1e-7 weight noise
/// at llama.cpp's precision left the weight-only envelope at `31b_like`'s first attention
/// output). Dithering the value just before each rounding tips several times more of them
/// (rounding absorbs the dither wherever it tips nothing), so the envelope bounds the port's
/// flips with margin, while staying far below the precision's own effect.
pub const ROUNDING_DITHER: f32 = 1e-6;

/// The dither state of this thread's noise probe (`None`: no dither).
struct Dither(u64);

thread_local! {
    static DITHER: RefCell<Option<Dither>> = const { RefCell::new(None) };
}

/// `x · (1 + ROUNDING_DITHER · u)` inside a noise probe (u uniform with unit variance from the
/// probe's seed), `x` otherwise.
fn dithered(x: f32) -> f32 {
    DITHER.with(|dither| match dither.borrow_mut().as_mut() {
        None => x,
        Some(Dither(state)) => {
            // SplitMix64, as the probes' weight noise.
            *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = *state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let unit = (z >> 40) as f32 / (1u64 << 24) as f32;
            x * (1.0 + ROUNDING_DITHER * (2.0 * unit - 1.0) * 3f32.sqrt())
        }
    })
}

/// Runs a noise probe's `body` with every rounding of the active precision choices dithered
/// (see [`ROUNDING_DITHER`]), from `seed`; without precision choices nothing is rounded and
/// this changes nothing.
pub fn with_rounding_dither<R>(seed: u64, body: impl FnOnce() -> R) -> R {
    let previous = DITHER.with(|dither| dither.replace(Some(Dither(seed))));
    struct Restore(Option<Option<Dither>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            if let Some(previous) = self.0.take() {
                DITHER.with(|dither| *dither.borrow_mut() = previous);
            }
        }
    }
    let _restore = Restore(Some(previous));
    body()
}

/// Values per Q8_0 block (ggml `QK8_0`).
pub const Q8_0_BLOCK: usize = 32;

/// A row quantised to Q8_0 and dequantised (ggml `quantize_row_q8_0_ref`, then
/// `dequantize_row_q8_0`): per block of [`Q8_0_BLOCK`] values, `d = max|x| / 127`,
/// `q = round(x / d)` (half away from zero), stored `f16(d)`; the value read back is `q · f16(d)`.
/// A last block shorter than 32 (ggml refuses such rows) is quantised on its own.
pub fn q8_0_round_trip(row: &mut [f32]) {
    for block in row.chunks_mut(Q8_0_BLOCK) {
        let amax = block.iter().fold(0.0f32, |m, &v| m.max(v.abs()));
        let d = amax / 127.0;
        let inverse = if d != 0.0 { 1.0 / d } else { 0.0 };
        let stored = f16::from_f32(d).to_f32();
        for v in block.iter_mut() {
            *v = (dithered(*v) * inverse).round() * stored;
        }
    }
}

/// The cache's storage of one token's keys or values `[K·d]` (a row of the cache), as the active
/// choices hold it: float16 ([`PrecisionChoice::KvCacheF16`]), Q8_0
/// ([`PrecisionChoice::KvCacheQ8_0`]) or float32 (unchanged).
pub fn store_cache_row(row: &mut [f32]) {
    if precision_active(PrecisionChoice::KvCacheQ8_0) {
        q8_0_round_trip(row);
    } else if precision_active(PrecisionChoice::KvCacheF16) {
        row.iter_mut().for_each(|v| *v = round_f16(*v));
    }
}

/// ggml's flash attention takes its float16 (or Q8_0) vector path for passes of fewer query
/// rows than its tile (`GGML_FA_TILE_Q`, ggml-cpu/common.h), and its float32 tiled path above.
pub const FLASH_ATTENTION_TILE_ROWS: usize = 64;

/// One query row of attention as ggml's flash-attention vector path computes it
/// (ggml-cpu/ops.cpp `ggml_compute_forward_flash_attn_ext_f16_one_chunk`), over the visible keys
/// in order: `query` `[d]`, `keys`/`values` the visible rows `[d]` as the cache holds them,
/// `scale` the score scale. Returns the output row `[d]`.
///
/// - The query is converted to the cache's dot-product type: float16 over a float16 cache,
///   Q8_0 over a Q8_0 cache (float32 over a float32 cache).
/// - Online softmax: a new maximum `M` rescales the accumulator by `exp(M_old − M)`; each key
///   adds `exp(s − M) · v`. Over a float16 cache the accumulator is float16, rounded after every
///   scaling and every addition; otherwise float32.
/// - The output is the accumulator divided by the running sum `S` (float32).
pub fn flash_attention_row(
    query: &[f32],
    keys: &[&[f32]],
    values: &[&[f32]],
    scale: f32,
) -> Vec<f32> {
    let q8 = precision_active(PrecisionChoice::KvCacheQ8_0);
    let f16_cache = !q8 && precision_active(PrecisionChoice::KvCacheF16);
    let mut q = query.to_vec();
    if q8 {
        q8_0_round_trip(&mut q);
    } else if f16_cache {
        q.iter_mut().for_each(|v| *v = round_f16(*v));
    }
    let width = values.first().map_or(query.len(), |v| v.len());
    let mut accumulator = vec![0.0f32; width];
    let (mut maximum, mut sum) = (f32::NEG_INFINITY, 0.0f32);
    let round = |v: f32| if f16_cache { round_f16(v) } else { v };
    for (key, value) in keys.iter().zip(values) {
        let s = q.iter().zip(key.iter()).map(|(a, b)| a * b).sum::<f32>() * scale;
        let (mut rescale, mut weight) = (1.0f32, 1.0f32);
        if s > maximum {
            rescale = (maximum - s).exp();
            maximum = s;
            accumulator
                .iter_mut()
                .for_each(|a| *a = round(*a * rescale));
        } else {
            weight = (s - maximum).exp();
        }
        for (a, &v) in accumulator.iter_mut().zip(value.iter()) {
            *a = round(*a + v * weight);
        }
        sum = sum * rescale + weight;
    }
    accumulator.iter().map(|a| a / sum).collect()
}

/// GELU's input and output as ggml's float16 table gives them
/// ([`PrecisionChoice::GeluF16Table`]): `None` when the table is not in use, else the value of
/// `gelu(x)` read from the table (0 for x ≤ −10, x for x ≥ 10, `f16(gelu(f16(x)))` between).
pub fn gelu_from_f16_table(x: f32, gelu: impl Fn(f32) -> f32) -> Option<f32> {
    if !precision_active(PrecisionChoice::GeluF16Table) {
        return None;
    }
    Some(if x <= -10.0 {
        0.0
    } else if x >= 10.0 {
        x
    } else {
        round_f16(gelu(round_f16(x)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_and_ids_parse_and_name_round_trip() {
        for choice in PrecisionChoice::ALL {
            assert_eq!(PrecisionChoice::from_id(choice.id()), Some(*choice));
        }
        for profile in PROFILES {
            let (name, choices) = parse_precision(profile.name).unwrap();
            assert_eq!(name, profile.name);
            assert_eq!(precision_name(&choices), profile.name);
        }
        // A list of ids equal to a profile is named after it.
        let (name, _) = parse_precision("gelu_f16_table,kv_cache_f16,flash_attention_f16").unwrap();
        assert_eq!(name, "llama-cpp-cpu");
        assert_eq!(parse_precision("float32").unwrap().1, vec![]);
        assert_eq!(
            parse_precision("kv_cache_f16").unwrap().0,
            "kv_cache_f16".to_string()
        );
        let error = parse_precision("kv_cache_f8").unwrap_err();
        assert!(
            error.contains("kv_cache_f8") && error.contains("llama-cpp-cpu"),
            "{error}"
        );
    }

    #[test]
    fn q8_0_matches_ggml_arithmetic() {
        // One block: amax 2.54 → d = 0.02, stored f16(0.02); q = round(x / d).
        let mut row: Vec<f32> = (0..32).map(|i| (i as f32 - 16.0) * 0.1 + 0.04).collect();
        let original = row.clone();
        q8_0_round_trip(&mut row);
        let amax = original.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        for (o, r) in original.iter().zip(&row) {
            let q = (o / d).round();
            assert!(q.abs() <= 127.0);
            assert_eq!(*r, q * round_f16(d));
            // Half a step of the scale at most (plus the scale's own float16 rounding).
            assert!((o - r).abs() <= 0.5 * d + 127.0 * (d - round_f16(d)).abs() + 1e-7);
        }
        let mut zeros = vec![0.0f32; 40];
        q8_0_round_trip(&mut zeros);
        assert!(zeros.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn gelu_table_rounds_input_and_output_to_f16() {
        let gelu = |x: f32| x * 0.5; // any function: the table's rounding is what is tested
        assert_eq!(gelu_from_f16_table(1.0, gelu), None);
        with_precision(&[PrecisionChoice::GeluF16Table], || {
            assert_eq!(gelu_from_f16_table(-10.0, gelu), Some(0.0));
            assert_eq!(gelu_from_f16_table(12.5, gelu), Some(12.5));
            let x = 1.000_123_f32; // between two float16 values (spacing 2^-10 at 1)
            assert_eq!(
                gelu_from_f16_table(x, gelu),
                Some(round_f16(round_f16(x) * 0.5))
            );
            assert_ne!(round_f16(x), x);
        });
    }

    #[test]
    fn flash_attention_row_is_softmax_attention_up_to_its_rounding() {
        let query = [0.3f32, -1.2, 0.7, 2.0];
        let keys: Vec<Vec<f32>> = (0..20)
            .map(|j| {
                (0..4)
                    .map(|c| ((j * 7 + c * 3) % 11) as f32 * 0.1 - 0.5)
                    .collect()
            })
            .collect();
        let values: Vec<Vec<f32>> = (0..20)
            .map(|j| {
                (0..4)
                    .map(|c| ((j * 5 + c) % 13) as f32 * 0.2 - 1.0)
                    .collect()
            })
            .collect();
        let key_rows: Vec<&[f32]> = keys.iter().map(Vec::as_slice).collect();
        let value_rows: Vec<&[f32]> = values.iter().map(Vec::as_slice).collect();
        // Exact softmax attention.
        let scores: Vec<f32> = keys
            .iter()
            .map(|k| k.iter().zip(&query).map(|(a, b)| a * b).sum())
            .collect();
        let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        let weights: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f32 = weights.iter().sum();
        let exact: Vec<f32> = (0..4)
            .map(|c| {
                weights
                    .iter()
                    .zip(&values)
                    .map(|(w, v)| w * v[c])
                    .sum::<f32>()
                    / total
            })
            .collect();
        // Float32 cache: the online softmax equals the two-pass one to float32 rounding.
        let online = flash_attention_row(&query, &key_rows, &value_rows, 1.0);
        for (a, b) in online.iter().zip(&exact) {
            assert!((a - b).abs() < 1e-6, "{online:?} vs {exact:?}");
        }
        // Float16 cache: within float16 rounding of the exact result, and not equal to it.
        let rounded = with_precision(&[PrecisionChoice::KvCacheF16], || {
            flash_attention_row(&query, &key_rows, &value_rows, 1.0)
        });
        let mut differs = false;
        for (a, b) in rounded.iter().zip(&exact) {
            assert!(
                (a - b).abs() < 20.0 * 2f32.powi(-11),
                "{rounded:?} vs {exact:?}"
            );
            differs |= a != b;
        }
        assert!(differs, "the float16 accumulator must round");
    }
}
