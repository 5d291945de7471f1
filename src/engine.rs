//! The engines `gemma4 dump` and `gemma4 conform` can run.

use std::path::Path;

use gemma4_optimized::Gemma4Optimized;
use gemma4_reference::merge::Prompt;
use gemma4_reference::{ActivationDump, ComputeDtype, Gemma4TextModel, Result};

use crate::golden::GoldenCase;

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
    /// greedy steps through the KV cache, in float32 arithmetic.
    pub fn dump(self, dir: &Path, tokens: &[usize], decode_steps: usize) -> Result<ActivationDump> {
        self.dump_with(dir, tokens, decode_steps, &DumpOptions::default())
    }

    /// The dump of a golden case: its tokens and decode steps, in the arithmetic its oracle ran
    /// in (`threads` sizes the optimized engine's pool).
    pub fn dump_case(self, case: &GoldenCase, threads: Option<usize>) -> Result<ActivationDump> {
        let options = DumpOptions {
            threads,
            compute_dtype: case.compute_dtype(),
        };
        self.dump_prompt(
            &case.model_dir(),
            &case.prompt()?,
            case.decode_steps,
            &options,
        )
    }

    /// [`Engine::dump`] with explicit options.
    pub fn dump_with(
        self,
        dir: &Path,
        tokens: &[usize],
        decode_steps: usize,
        options: &DumpOptions,
    ) -> Result<ActivationDump> {
        self.dump_prompt(dir, &Prompt::text(tokens), decode_steps, options)
    }

    /// [`Engine::dump_with`] for a prompt with images: the vision tensors of each image, then the
    /// text tensors of the merged sequence.
    pub fn dump_prompt(
        self,
        dir: &Path,
        prompt: &Prompt,
        decode_steps: usize,
        options: &DumpOptions,
    ) -> Result<ActivationDump> {
        match self {
            Engine::Reference => Gemma4TextModel::load_for(dir, prompt)?
                .with_compute_dtype(options.compute_dtype)
                .dump_prompt(prompt, decode_steps),
            Engine::Optimized => Gemma4Optimized::load_for(dir, prompt, options.threads)?
                .with_compute_dtype(options.compute_dtype)
                .dump_prompt(prompt, decode_steps),
        }
    }
}

/// How an engine computes a dump.
#[derive(Clone, Copy, Debug, Default)]
pub struct DumpOptions {
    /// Threads of the optimized engine (`None`: the `RAYON_NUM_THREADS` default); the reference
    /// is single-threaded and ignores it.
    pub threads: Option<usize>,
    /// The arithmetic imitated (float32 unless declared: `gemma4_reference::compute_dtype`).
    pub compute_dtype: ComputeDtype,
}
