//! The `fault-signatures` table: what `gemma4 compare` prints for each fault of the catalogue.
//! For every fault, the reference runs a golden case with the fault switched on (the first case
//! of [`CASES`] where it changes the dump), and the faulted dump is compared with the clean one
//! exactly as `gemma4 compare` would compare a port's dump (`compare::compare`, without the
//! diagnosis, which would only name the fault back).

use std::path::Path;

use gemma4::compare::{compare, format_report, ModelFacts};
use gemma4::golden::{load_cases, GoldenCase};
use gemma4_reference::faults::{with_faults, Fault};
use gemma4_reference::{ActivationDump, Gemma4TextModel};

use super::Result;

/// The golden cases tried, in order: the four text families, then images, then audio.
const CASES: [&str; 8] = [
    "e2b_like",
    "e4b_like",
    "31b_like",
    "26b_a4b_like",
    "31b_vision",
    "e2b_vision",
    "e2b_audio",
    "e2b_bf16",
];

struct Case {
    case: GoldenCase,
    clean: ActivationDump,
    facts: ModelFacts,
}

fn reference_dump(
    case: &GoldenCase,
    faults: &[Fault],
) -> Result<(Gemma4TextModel, ActivationDump)> {
    let prompt = case.prompt()?;
    with_faults(faults, || {
        let model = Gemma4TextModel::load_for(&case.model_dir(), &prompt)?
            .with_compute_dtype(case.compute_dtype());
        let dump = model.dump_prompt(&prompt, case.decode_steps)?;
        Ok((model, dump))
    })
}

pub fn table(root: &Path) -> Result<String> {
    let all = load_cases(&root.join("golden"))?;
    let mut cases = Vec::new();
    for name in CASES {
        let case = all
            .iter()
            .find(|c| c.name == name)
            .cloned()
            .ok_or_else(|| format!("no golden case {name}"))?;
        let (model, clean) = reference_dump(&case, &[])?;
        cases.push(Case {
            facts: ModelFacts::of_model(&model),
            case,
            clean,
        });
    }
    let mut out = String::new();
    for &fault in Fault::ALL {
        out.push_str(&format!(
            "### `{}`\n\n{}\n\n",
            fault.id(),
            fault.description()
        ));
        let mut shown = false;
        let mut refused = None;
        for case in &cases {
            let faulted = match reference_dump(&case.case, &[fault]) {
                Ok((_, faulted)) => faulted,
                Err(error) => {
                    refused.get_or_insert((case.case.name.clone(), error.to_string()));
                    continue;
                }
            };
            let report = compare(&case.clean, &faulted, &case.facts);
            if report.conformant {
                continue;
            }
            let text = format_report(&report);
            let verdict: Vec<&str> = text
                .lines()
                .skip_while(|line| !line.starts_with("NOT CONFORMANT"))
                .take_while(|line| !line.is_empty())
                .collect();
            out.push_str(&format!(
                "On the golden `{}` model:\n\n```text\n{}\n```\n\n",
                case.case.name,
                verdict.join("\n")
            ));
            shown = true;
            break;
        }
        match (shown, refused) {
            (true, _) => {}
            (false, Some((case, error))) => out.push_str(&format!(
                "A port with this bug does not get as far as a dump: on the golden `{case}` model the faulted reference stops with\n\n```text\n{error}\n```\n\n"
            )),
            (false, None) => out.push_str("No bundled golden case shows this fault (the dumps stay within tolerance).\n\n"),
        }
    }
    Ok(out)
}
