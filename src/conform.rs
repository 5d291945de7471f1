//! `gemma4 conform`: every bundled golden case through every engine, one table, one verdict.

use gemma4_reference::dump::ActivationDump;

use crate::comparison::{
    compare_dumps, compare_dumps_exact_bf16_embeddings, layers_in_dump, tolerance_with_vision,
    vision_layers_in_dump, Bf16Rounding, Precision, Status, TensorReport,
};
use crate::engine::{DumpOptions, Engine};
use crate::golden::GoldenCase;

/// The outcome of one case on one engine.
#[derive(Debug)]
pub struct CaseOutcome {
    pub case: String,
    pub engine: Engine,
    /// Per-tensor reports in model order (empty if the engine failed outright).
    pub reports: Vec<TensorReport>,
    /// Set when the engine could not produce a dump at all.
    pub error: Option<String>,
}

impl CaseOutcome {
    /// True when the engine ran and every tensor of the expected dump passed.
    pub fn passed(&self) -> bool {
        self.error.is_none()
            && !self.reports.is_empty()
            && self.reports.iter().all(|r| r.status == Status::Pass)
    }

    /// The tensor with the largest error relative to its tolerance (the first failure if any).
    pub fn worst(&self) -> Option<&TensorReport> {
        if let Some(failure) = self.reports.iter().find(|r| r.status != Status::Pass) {
            return Some(failure);
        }
        self.reports
            .iter()
            .filter(|r| r.tolerance > 0.0)
            .max_by(|a, b| (a.max_rel / a.tolerance).total_cmp(&(b.max_rel / b.tolerance)))
    }
}

/// The precision of the oracle that made a case.
pub fn case_precision(case: &GoldenCase) -> Precision {
    if case.dtype == "bfloat16" {
        Precision::BFloat16
    } else {
        Precision::Float32
    }
}

/// Compares a candidate dump with a golden case's expected dump, using the case's tolerances.
///
/// For a bf16 oracle, `embeddings` is compared after rounding the candidate to bf16 with
/// tolerance 0 (see [`compare_dumps_exact_bf16_embeddings`]).
pub fn compare_with_case(
    case: &GoldenCase,
    expected: &ActivationDump,
    candidate: &ActivationDump,
) -> Vec<TensorReport> {
    let precision = case_precision(case);
    let num_layers = layers_in_dump(expected).unwrap_or(0);
    let vision_layers = vision_layers_in_dump(expected);
    let tolerance = |name: &str| tolerance_with_vision(name, precision, num_layers, vision_layers);
    if precision == Precision::BFloat16 {
        compare_dumps_exact_bf16_embeddings(expected, candidate, Bf16Rounding::Candidate, tolerance)
    } else {
        compare_dumps(expected, candidate, tolerance)
    }
}

/// Runs one case on each of `engines`, reading its expected dump once; `threads` sizes the
/// optimized engine's pool (`None`: the `RAYON_NUM_THREADS` default). One outcome per engine,
/// in order (each with the error if the expected dump cannot be read).
pub fn run_case_on_engines(
    case: &GoldenCase,
    engines: &[Engine],
    options: &DumpOptions,
) -> Vec<CaseOutcome> {
    let expected = ActivationDump::read(&case.expected_path()).map_err(|e| e.to_string());
    engines
        .iter()
        .map(|&engine| {
            let (reports, error) = match &expected {
                Ok(expected) => match engine.dump_case_with(case, options) {
                    Ok(candidate) => (compare_with_case(case, expected, &candidate), None),
                    Err(e) => (Vec::new(), Some(e.to_string())),
                },
                Err(e) => (Vec::new(), Some(e.clone())),
            };
            CaseOutcome {
                case: case.name.clone(),
                engine,
                reports,
                error,
            }
        })
        .collect()
}

/// Formats the conform table.
pub fn format_table(outcomes: &[CaseOutcome]) -> String {
    let mut out = format!(
        "{:<16} {:<10} {:<34} {:>10} {:>10} {:>9}  {}\n",
        "case", "engine", "worst tensor", "max_rel", "tolerance", "tensors", "verdict"
    );
    for o in outcomes {
        let checked = o
            .reports
            .iter()
            .filter(|r| r.status != Status::Missing)
            .count();
        match (&o.error, o.worst()) {
            (Some(error), _) => out.push_str(&format!(
                "{:<16} {:<10} {:<34} {:>10} {:>10} {:>9}  ERROR: {error}\n",
                o.case,
                o.engine.name(),
                "-",
                "-",
                "-",
                0
            )),
            (None, Some(worst)) => out.push_str(&format!(
                "{:<16} {:<10} {:<34} {:>10.2e} {:>10.1e} {:>9}  {}\n",
                o.case,
                o.engine.name(),
                worst.name,
                worst.max_rel,
                worst.tolerance,
                checked,
                if o.passed() { "pass" } else { "FAIL" }
            )),
            (None, None) => out.push_str(&format!(
                "{:<16} {:<10} (empty expected dump)\n",
                o.case,
                o.engine.name()
            )),
        }
    }
    for o in outcomes.iter().filter(|o| !o.passed() && o.error.is_none()) {
        if let Some(first) = o
            .reports
            .iter()
            .find(|r| r.status != Status::Pass && r.status != Status::Missing)
        {
            out.push_str(&format!(
                "\n{} / {}: first divergence {}\n",
                o.case,
                o.engine.name(),
                first.describe()
            ));
        }
    }
    out
}
