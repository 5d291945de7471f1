//! The engines `gemma4 dump` and `gemma4 conform` can run.

use std::path::Path;

use gemma4_optimized::Gemma4Optimized;
use gemma4_reference::dump::TensorFilter;
use gemma4_reference::memory_plan::{format_bytes, memory_limit};
use gemma4_reference::merge::Prompt;
use gemma4_reference::model::LoadOptions;
use gemma4_reference::weight_stream::Residence;
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
            ..DumpOptions::default()
        };
        self.dump_case_with(case, &options)
    }

    /// [`Engine::dump_case`] with explicit options (their `compute_dtype` is the case's).
    pub fn dump_case_with(
        self,
        case: &GoldenCase,
        options: &DumpOptions,
    ) -> Result<ActivationDump> {
        let options = DumpOptions {
            compute_dtype: case.compute_dtype(),
            ..options.clone()
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
            Engine::Reference => {
                let load = LoadOptions {
                    residence: options.residence,
                    decode_steps,
                    tensors: options.tensors.clone(),
                };
                let model = Gemma4TextModel::load_with(dir, prompt, &load)?
                    .with_compute_dtype(options.compute_dtype);
                let dump = model.dump_prompt_keeping(prompt, decode_steps, &options.tensors)?;
                if let (true, Some(plan)) = (options.report_memory, &model.memory_plan) {
                    let residence = model.residence();
                    eprintln!(
                        "reference: weights {}; planned peak {} ({})",
                        residence.name(),
                        format_bytes(plan.peak(residence)),
                        plan.describe(residence)
                    );
                }
                Ok(dump)
            }
            Engine::Optimized => {
                if options.report_memory {
                    warn_if_mapped_weights_exceed_memory(dir);
                }
                Gemma4Optimized::load_for(dir, prompt, options.threads)?
                    .with_compute_dtype(options.compute_dtype)
                    .dump_prompt_keeping(prompt, decode_steps, &options.tensors)
            }
        }
    }
}

/// Warns (stderr) when the optimized engine's mapped weights exceed the memory limit: it still
/// runs, the kernel re-reading from disk the pages it had to evict, so every pass (every decode
/// step) then goes at the disk's read rate. `gemma4 inspect` prints the same comparison.
fn warn_if_mapped_weights_exceed_memory(dir: &Path) {
    let (Ok(inspection), Some(limit)) = (crate::inspect::inspect(dir), memory_limit()) else {
        return;
    };
    if let Some(memory) = inspection.memory {
        if memory.resident_weight_bytes > limit.bytes {
            eprintln!(
                "optimized: warning: its weights ({}, mapped as stored) exceed {} ({}); it runs, \
                 but pages evicted for lack of memory are read from disk again on every pass, so \
                 each decode step goes at the disk's read rate (the reference with --weights \
                 streamed keeps only one layer in memory)",
                format_bytes(memory.resident_weight_bytes),
                format_bytes(limit.bytes),
                limit.source
            );
        }
    }
}

/// How an engine computes a dump.
#[derive(Clone, Debug, Default)]
pub struct DumpOptions {
    /// Where the reference keeps its weights (in memory, streamed, or whichever fits); the
    /// optimized engine maps them whatever this says.
    pub residence: Residence,
    /// The dump tensors to keep (`--tensors`).
    pub tensors: TensorFilter,
    /// Print the reference's memory plan on stderr when it loads.
    pub report_memory: bool,
    /// Threads of the optimized engine (`None`: the `RAYON_NUM_THREADS` default); the reference
    /// is single-threaded and ignores it.
    pub threads: Option<usize>,
    /// The arithmetic imitated (float32 unless declared: `gemma4_reference::compute_dtype`).
    pub compute_dtype: ComputeDtype,
}
