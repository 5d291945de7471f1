//! `gemma4 compare --model` on a mixture-of-experts port that tips a near tie of the router
//! (`gemma4::compare_routing`): a correct port choosing the other of two equally likely
//! experts conforms (the reference is re-run with its choice), a port choosing an expert far
//! below the k-th does not.

mod common;

use gemma4::compare::{run_compare, CompareOptions, ExpectedSource};
use gemma4_reference::faults::with_faults;
use std::cell::RefCell;
use std::rc::Rc;

use gemma4::compare_routing::candidate_referee;
use gemma4_reference::forced_routing::{
    with_forced_routing, with_refereed_routing, ForcedRouting, RouterLog,
};
use gemma4_reference::merge::Prompt;
use gemma4_reference::{ActivationDump, Gemma4TextModel};

const CASE: &str = "26b_a4b_like";
/// The layer and token whose boundary experts are made exactly equal.
const LAYER: usize = 2;
const TOKEN: usize = 3;

/// The reference's dump of `model_dir` with `forced` imposed, and its router log.
fn reference(
    model_dir: &std::path::Path,
    prompt: &Prompt,
    forced: ForcedRouting,
) -> (ActivationDump, RouterLog) {
    let case = common::golden_case(CASE);
    let model = Gemma4TextModel::load_for(model_dir, prompt).expect("model loads");
    let (dump, log) = with_forced_routing(forced, || {
        with_faults(&[], || model.dump_prompt(prompt, case.decode_steps))
    });
    (dump.expect("reference runs"), log)
}

/// `gemma4 compare --model dir` on `candidate` (no diagnosis).
fn compare_with_reference(
    dir: &std::path::Path,
    prompt: &Prompt,
    candidate: &ActivationDump,
) -> gemma4::compare::CompareReport {
    let file = tempfile::NamedTempFile::new().expect("temporary file");
    candidate.write(file.path(), &[]).expect("dump written");
    run_compare(
        ExpectedSource::Reference { model: dir, prompt },
        file.path(),
        CompareOptions {
            diagnose: false,
            ..CompareOptions::default()
        },
    )
    .expect("compare runs")
}

/// Experts of `layer`, `token` by descending router probability (ties: lower index first).
fn ranking(log: &RouterLog, layer: usize, token: usize) -> Vec<usize> {
    let p = log.probabilities(layer, token).expect("logged");
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
    order
}

/// The golden 26B-A4B-like model with expert `b`'s router row in layer [`LAYER`] overwritten
/// by expert `a`'s: the two get bit-identical probabilities for every token, a tie that float
/// rounding may break either way in a correct port.
fn with_tied_router_rows(a: usize, b: usize) -> tempfile::TempDir {
    let dir = common::copy_golden_model(CASE);
    tie_router_rows(dir.path(), LAYER, a, b);
    dir
}

/// Overwrites expert `b`'s router row in `layer` of the checkpoint in `dir` with expert `a`'s.
fn tie_router_rows(dir: &std::path::Path, layer: usize, a: usize, b: usize) {
    let name = format!("model.layers.{layer}.router.proj.weight");
    let index = common::read_json(&dir.join("model.safetensors.index.json"));
    let shard = dir.join(
        index["weight_map"][&name]
            .as_str()
            .expect("router in the index"),
    );
    let mut file = common::RawSafetensors::read(&shard);
    let shape = file.shape(&name);
    assert_eq!(file.header[&name]["dtype"], "F32");
    let (start, end) = file.offsets(&name);
    let mut bytes = file.data[start..end].to_vec();
    let row = shape[1] * 4;
    let source = bytes[a * row..(a + 1) * row].to_vec();
    bytes[b * row..(b + 1) * row].copy_from_slice(&source);
    file.replace(&name, "F32", &shape, bytes);
    file.write(&shard);
}

/// The sets of `layer` with every straddling tie of `a` and `b` broken the other way (the
/// reference keeps the lower index), from the router log of a run.
fn break_ties_other_way(
    log: &RouterLog,
    layer: usize,
    (a, b): (usize, usize),
    tokens: usize,
    k: usize,
    into: &mut ForcedRouting,
) {
    for t in 0..tokens {
        let order = ranking(log, layer, t);
        let chosen = &order[..k];
        if chosen.contains(&a) != chosen.contains(&b) {
            let swapped = chosen
                .iter()
                .map(|&e| match e {
                    e if e == a => b,
                    e if e == b => a,
                    e => e,
                })
                .collect();
            into.force(layer, t, swapped);
        }
    }
}

#[test]
fn compare_a_tipped_router_tie_conforms_a_wide_swap_does_not_26b_a4b_like() {
    let case = common::golden_case(CASE);
    let prompt = case.prompt().expect("golden prompt");
    let k = 8;
    // The experts at ranks k and k + 1 of the chosen token, tied exactly.
    let (_, log) = reference(&case.model_dir(), &prompt, ForcedRouting::default());
    let order = ranking(&log, LAYER, TOKEN);
    let (a, b) = (order[k - 1], order[k]);
    let dir = with_tied_router_rows(a, b);
    let (expected, log) = reference(dir.path(), &prompt, ForcedRouting::default());

    // The candidate breaks every straddling tie the other way (the reference keeps the lower
    // index): at each token where one of a, b is chosen and the other is not, it swaps them.
    let tokens = prompt.tokens.len();
    let mut other_way = ForcedRouting::default();
    break_ties_other_way(&log, LAYER, (a, b), tokens, k, &mut other_way);
    assert!(
        other_way.get(LAYER, TOKEN).is_some(),
        "the chosen token straddles"
    );
    let (candidate, _) = reference(dir.path(), &prompt, other_way.clone());
    assert_ne!(
        candidate.get(&format!("layers.{LAYER}.router.top_k_index")),
        expected.get(&format!("layers.{LAYER}.router.top_k_index")),
        "the candidate chose other experts"
    );
    let judge = |candidate: &ActivationDump| compare_with_reference(dir.path(), &prompt, candidate);
    let report = judge(&candidate);
    assert!(
        report.conformant,
        "a tipped tie is a correct port: {:?} {:?}",
        report.first_divergence, report.notes
    );
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.contains(&format!("layers.{LAYER}.router")) && n.contains("near tie")),
        "{:?}",
        report.notes
    );

    // The same token choosing the least likely expert instead of the k-th: a divergence, named
    // at the router, with the reason.
    let least = *ranking(&log, LAYER, TOKEN).last().expect("experts");
    let mut wide = ForcedRouting::default();
    let mut set = ranking(&log, LAYER, TOKEN)[..k].to_vec();
    set[k - 1] = least;
    wide.force(LAYER, TOKEN, set);
    let (candidate, _) = reference(dir.path(), &prompt, wide);
    let report = judge(&candidate);
    assert!(!report.conformant);
    assert_eq!(
        report.first_divergence.as_deref(),
        Some(format!("layers.{LAYER}.router.top_k_index").as_str())
    );
    assert!(
        report.notes.iter().any(|n| n.contains("beyond a near tie")),
        "{:?}",
        report.notes
    );
}

/// Ties tipped in two layers (the second one only reachable once the first is followed) are
/// all followed in a single reference run by the candidate's referee, and `compare` finds the
/// port conformant with a note for each layer.
#[test]
fn compare_follows_ties_tipped_in_two_layers_in_one_run_26b_a4b_like() {
    const SECOND: usize = 4;
    let case = common::golden_case(CASE);
    let prompt = case.prompt().expect("golden prompt");
    let (k, tokens) = (8, prompt.tokens.len());
    let dir = common::copy_golden_model(CASE);

    // Layer LAYER: tie the boundary experts of TOKEN; the candidate breaks them the other way.
    let (_, log) = reference(dir.path(), &prompt, ForcedRouting::default());
    let order = ranking(&log, LAYER, TOKEN);
    let first_pair = (order[k - 1], order[k]);
    tie_router_rows(dir.path(), LAYER, first_pair.0, first_pair.1);
    let (_, log) = reference(dir.path(), &prompt, ForcedRouting::default());
    let mut candidate_sets = ForcedRouting::default();
    break_ties_other_way(&log, LAYER, first_pair, tokens, k, &mut candidate_sets);
    // Layer SECOND, as routed after the candidate's choice at LAYER: the same again.
    let (_, log) = reference(dir.path(), &prompt, candidate_sets.clone());
    let order = ranking(&log, SECOND, TOKEN);
    let second_pair = (order[k - 1], order[k]);
    tie_router_rows(dir.path(), SECOND, second_pair.0, second_pair.1);
    let (_, log) = reference(dir.path(), &prompt, candidate_sets.clone());
    break_ties_other_way(&log, SECOND, second_pair, tokens, k, &mut candidate_sets);
    let (candidate, _) = reference(dir.path(), &prompt, candidate_sets);
    let (clean, _) = reference(dir.path(), &prompt, ForcedRouting::default());
    for layer in [LAYER, SECOND] {
        let name = format!("layers.{layer}.router.top_k_index");
        assert_ne!(
            candidate.get(&name),
            clean.get(&name),
            "{name}: the candidate tipped a tie"
        );
    }

    // One run with the referee follows both layers.
    let notes = Rc::new(RefCell::new(Vec::new()));
    let referee = candidate_referee(&candidate, |_| 3e-5, Rc::clone(&notes));
    let model = Gemma4TextModel::load_for(dir.path(), &prompt).expect("model loads");
    let (followed, log) = with_refereed_routing(ForcedRouting::default(), Some(referee), || {
        with_faults(&[], || model.dump_prompt(&prompt, case.decode_steps))
    });
    let followed = followed.expect("reference runs");
    for layer in [LAYER, SECOND] {
        let name = format!("layers.{layer}.router.top_k_index");
        assert_eq!(
            followed.get(&name),
            candidate.get(&name),
            "{name} followed in one run"
        );
    }
    assert_eq!(notes.borrow().len(), 2, "{:?}", notes.borrow());
    assert!(!log.imposed().is_empty());

    let report = compare_with_reference(dir.path(), &prompt, &candidate);
    assert!(
        report.conformant,
        "ties tipped in two layers are a correct port: {:?} {:?}",
        report.first_divergence, report.notes
    );
    for layer in [LAYER, SECOND] {
        assert!(
            report
                .notes
                .iter()
                .any(|n| n.contains(&format!("layers.{layer}.router")) && n.contains("near tie")),
            "layer {layer}: {:?}",
            report.notes
        );
    }
}
