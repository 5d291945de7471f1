//! The engines `gemma4 dump` and `gemma4 conform` can run.

use std::path::Path;

use gemma4_reference::{ActivationDump, Gemma4TextModel, Result};

/// Which implementation computes a dump.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Engine {
    /// The readable float32 reference (`reference/`).
    Reference,
    /// The fast engine (`optimized/`). Until it lands it runs the reference.
    Optimized,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Reference => "reference",
            Engine::Optimized => "optimized",
        }
    }

    /// Loads the model in `dir` and produces the activation dump of `tokens`, with `decode_steps`
    /// greedy steps through the KV cache.
    pub fn dump(self, dir: &Path, tokens: &[usize], decode_steps: usize) -> Result<ActivationDump> {
        match self {
            Engine::Reference | Engine::Optimized => {
                Gemma4TextModel::load(dir)?.dump(tokens, decode_steps)
            }
        }
    }
}
