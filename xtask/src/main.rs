//! Developer tasks for the gemma4 workspace, run as `cargo xtask <task>`
//! (the alias lives in `.cargo/config.toml`).
//!
//! Each task lives in its own module with its own argument struct; add a variant to
//! [`Task`] and a module file to add a task.

mod bench;
mod bench_towers;
mod book;
mod figures;
mod fuzz;
mod golden;
mod memory;
mod mutants;
mod ports;
mod process;
mod synth;

use std::error::Error;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Developer tasks for the gemma4 workspace.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Regenerate the golden fixtures (golden/) and the released-config facts
    /// (tests/data/released/) with the pinned Hugging Face oracle, or verify them with --check.
    Golden(golden::GoldenArgs),
    /// Run the test suite once per fault of the reference's catalogue and report which tests
    /// catch each (docs/mutation-score.md); fail if a fault survives.
    Mutants(mutants::MutantsArgs),
    /// Fuzz every parser of user files with cargo fuzz for --seconds each, or regenerate the
    /// seed corpus (fuzz/seeds/) from golden/ with --seeds.
    Fuzz(fuzz::FuzzArgs),
    /// Write a random-weight checkpoint with the real dimensions of a released model.
    Synth(synth::SynthArgs),
    /// Verify a real-dimension checkpoint with the layer-streamed reference (and the optimized
    /// engine), recording peak memory and time in docs/performance.md.
    Memory(memory::MemoryArgs),
    /// Measure prefill/decode speed and peak memory of the engines, and the vision and audio
    /// towers' speed; write docs/performance.md.
    Bench(bench::BenchArgs),
    /// Draw the book's figures (docs/figures/*.svg) and its generated tables from the reference
    /// code, or verify them with --check.
    Figures(figures::FiguresArgs),
    /// Build the book (docs/, mdBook) with the API pages it links, and check it in headless
    /// Chromium: every page loads without console errors, every image has a size, no broken link.
    Book(book::BookArgs),
    /// Run real Gemma 4 ports (pinned PyPI releases) on the golden models and judge each with
    /// `gemma4 compare`; write the table docs/ports.md.
    Ports(ports::PortsArgs),
    /// (internal) One engine, one workload, one JSON line: the child process of `bench`.
    #[command(hide = true)]
    BenchEngine(bench::BenchEngineArgs),
}

fn main() -> ExitCode {
    gemma4_optimized::allocator::reuse_freed_buffers();
    let cli = Cli::parse();
    let result: Result<(), Box<dyn Error>> = match cli.task {
        Task::Golden(args) => golden::run(&args).map_err(Into::into),
        Task::Mutants(args) => mutants::run(&args).map_err(Into::into),
        Task::Fuzz(args) => fuzz::run(&args).map_err(Into::into),
        Task::Synth(args) => synth::run(&args).map_err(Into::into),
        Task::Memory(args) => memory::run(&args).map_err(Into::into),
        Task::Bench(args) => bench::run(&args).map_err(Into::into),
        Task::Figures(args) => figures::run(&args),
        Task::Ports(args) => ports::run(&args).map_err(Into::into),
        Task::Book(args) => book::run(&args),
        Task::BenchEngine(args) => bench::run_engine(&args).map_err(Into::into),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err}");
            ExitCode::FAILURE
        }
    }
}
