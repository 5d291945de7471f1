//! The engines `gemma4 dump` and `gemma4 conform` can run.

use std::path::Path;

use gemma4_optimized::Gemma4Optimized;
use gemma4_reference::{ActivationDump, Gemma4TextModel, Result};

/// Which implementation computes a dump.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Engine {
    /// The readable float32 reference (`reference/`).
    Reference,
    /// The fast engine (`optimized/`): weights as stored, SIMD/GEMM kernels, threads.
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
        self.dump_with_threads(dir, tokens, decode_steps, None)
    }

    /// [`Engine::dump`] with an explicit thread count for the optimized engine (`None`: the
    /// `RAYON_NUM_THREADS` default). The reference is single-threaded and ignores it.
    pub fn dump_with_threads(
        self,
        dir: &Path,
        tokens: &[usize],
        decode_steps: usize,
        threads: Option<usize>,
    ) -> Result<ActivationDump> {
        match self {
            Engine::Reference => Gemma4TextModel::load(dir)?.dump(tokens, decode_steps),
            Engine::Optimized => {
                Gemma4Optimized::load_with_threads(dir, threads)?.dump(tokens, decode_steps)
            }
        }
    }
}
