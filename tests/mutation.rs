//! The mutation score of the golden comparisons, in process: for every fault of the catalogue
//! (`reference/src/faults.rs`), the reference with that fault on must diverge from the Hugging
//! Face oracle beyond tolerance on at least one golden case, or fail outright. A fault no case
//! catches is a porting bug our suite would let through.
//!
//! This is the fast, CI-run counterpart of `cargo xtask mutants`, which runs the whole test
//! suite once per fault (`GEMMA4_FAULTS=<id>`) and writes `docs/mutation-score.md`.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};

use gemma4::comparison::Status;
use gemma4::conform::compare_with_case;
use gemma4::golden::{load_cases, GoldenCase};
use gemma4_reference::faults::{with_faults, Fault};
use gemma4_reference::{ActivationDump, Gemma4TextModel};

/// How a golden case fares with some faults on: the tensors beyond tolerance (first one
/// first), or why the engine could not produce a dump.
enum Outcome {
    Conforms,
    Diverges(Vec<String>),
    EngineFailed(String),
}

fn run_case(case: &GoldenCase, expected: &ActivationDump, faults: &[Fault]) -> Outcome {
    let dump = catch_unwind(AssertUnwindSafe(|| {
        with_faults(faults, || {
            let prompt = case.prompt()?;
            Gemma4TextModel::load_for(&case.model_dir(), &prompt).and_then(|model| {
                model
                    .with_compute_dtype(case.compute_dtype())
                    .dump_prompt(&prompt, case.decode_steps)
            })
        })
    }));
    match dump {
        Err(panic) => Outcome::EngineFailed(
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".to_string()),
        ),
        Ok(Err(error)) => Outcome::EngineFailed(error.to_string()),
        Ok(Ok(candidate)) => {
            let failing: Vec<String> = compare_with_case(case, expected, &candidate)
                .into_iter()
                .filter(|r| r.status != Status::Pass)
                .map(|r| r.describe())
                .collect();
            if failing.is_empty() {
                Outcome::Conforms
            } else {
                Outcome::Diverges(failing)
            }
        }
    }
}

#[test]
fn mutation_every_fault_caught_by_golden_cases() {
    let cases: Vec<(GoldenCase, ActivationDump)> = load_cases(&common::golden_dir())
        .expect("golden fixtures intact")
        .into_iter()
        .map(|case| {
            let expected = ActivationDump::read(&case.expected_path()).expect("golden dump");
            (case, expected)
        })
        .collect();

    // Without faults every case conforms, so a divergence below is the fault's doing.
    for (case, expected) in &cases {
        match run_case(case, expected, &[]) {
            Outcome::Conforms => {}
            Outcome::Diverges(failing) => panic!(
                "{}: the clean reference does not conform:\n    {}",
                case.name,
                failing.join("\n    ")
            ),
            Outcome::EngineFailed(error) => {
                panic!("{}: the clean reference fails: {error}", case.name)
            }
        }
    }

    let mut survivors = Vec::new();
    let mut caught = Vec::new();
    for &fault in Fault::ALL {
        let mut where_caught = Vec::new();
        for (case, expected) in &cases {
            match run_case(case, expected, &[fault]) {
                Outcome::Conforms => {}
                Outcome::Diverges(failing) => {
                    where_caught.push(format!("{} at {}", case.name, failing[0]))
                }
                Outcome::EngineFailed(error) => {
                    where_caught.push(format!("{}: engine failed: {error}", case.name))
                }
            }
        }
        if where_caught.is_empty() {
            survivors.push(format!("  {} ({})", fault.id(), fault.description()));
        } else {
            caught.push(format!("  {}: {}", fault.id(), where_caught[0]));
        }
    }
    assert!(
        survivors.is_empty(),
        "{} of {} faults survive every golden case (no tensor beyond tolerance):\n{}\ncaught:\n{}",
        survivors.len(),
        Fault::ALL.len(),
        survivors.join("\n"),
        caught.join("\n")
    );
}
