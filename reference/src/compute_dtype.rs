//! The compute dtype: which arithmetic a run imitates, and so which constants get rounded.
//!
//! The engines always compute in float32. What differs between a float32 and a bfloat16 run of
//! Hugging Face is not only the rounding after every operation (which a float32 engine cannot
//! and need not imitate: compare's bfloat16 tolerances absorb it) but also a few *constants*
//! that are cast to the model's dtype before use: the embedding scales `√D` and `√P`
//! (shared spec: text §4, §15.14). Those casts follow the dtype the model **runs in**, not the
//! dtype the checkpoint is **stored in**: loading a bf16 checkpoint with
//! `torch_dtype=torch.float32` (the usual way to check a port) gives an unrounded `√D`.
//!
//! So the default is [`ComputeDtype::Float32`], float32 arithmetic throughout, whatever the
//! checkpoint's storage dtype; [`ComputeDtype::BFloat16`] and [`ComputeDtype::Float16`] are
//! declared modes (`--compute-dtype bf16`) for comparing with a run that computed in that dtype.

/// The dtype a run's constants are rounded to (see the module documentation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ComputeDtype {
    /// float32 arithmetic throughout (Hugging Face with `torch_dtype=torch.float32`).
    #[default]
    Float32,
    /// A bfloat16 computation (Hugging Face with `torch_dtype=torch.bfloat16`).
    BFloat16,
    /// A float16 computation.
    Float16,
}

impl ComputeDtype {
    /// Every mode, the default first.
    pub const ALL: [ComputeDtype; 3] = [
        ComputeDtype::Float32,
        ComputeDtype::BFloat16,
        ComputeDtype::Float16,
    ];

    /// Rounds a constant to this dtype and back (torch's `tensor.to(dtype)`).
    pub fn round(self, value: f32) -> f32 {
        match self {
            ComputeDtype::Float32 => value,
            ComputeDtype::BFloat16 => half::bf16::from_f32(value).to_f32(),
            ComputeDtype::Float16 => half::f16::from_f32(value).to_f32(),
        }
    }

    /// The name used on the command line and in reports: `float32`, `bf16`, `f16`.
    pub fn name(self) -> &'static str {
        match self {
            ComputeDtype::Float32 => "float32",
            ComputeDtype::BFloat16 => "bf16",
            ComputeDtype::Float16 => "f16",
        }
    }

    /// Parses a name: `float32`/`f32`, `bf16`/`bfloat16`, `f16`/`float16`.
    pub fn from_name(name: &str) -> Option<ComputeDtype> {
        match name.to_ascii_lowercase().as_str() {
            "float32" | "f32" | "fp32" => Some(ComputeDtype::Float32),
            "bf16" | "bfloat16" => Some(ComputeDtype::BFloat16),
            "f16" | "fp16" | "float16" => Some(ComputeDtype::Float16),
            _ => None,
        }
    }
}

impl std::fmt::Display for ComputeDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ComputeDtype {
    type Err = String;
    fn from_str(name: &str) -> Result<Self, String> {
        ComputeDtype::from_name(name).ok_or_else(|| {
            format!("unknown compute dtype `{name}` (expected float32, bf16 or f16)")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::ComputeDtype;

    #[test]
    fn compute_dtype_names_round_trip_and_rounding() {
        for dtype in ComputeDtype::ALL {
            assert_eq!(ComputeDtype::from_name(dtype.name()), Some(dtype));
        }
        assert_eq!(
            "bfloat16".parse::<ComputeDtype>(),
            Ok(ComputeDtype::BFloat16)
        );
        assert!("int8".parse::<ComputeDtype>().is_err());
        let root = 96f32.sqrt(); // 9.7980
        assert_eq!(ComputeDtype::Float32.round(root), root);
        assert_eq!(ComputeDtype::BFloat16.round(root), 9.8125);
        assert_eq!(ComputeDtype::Float16.round(root), 9.796875);
    }
}
