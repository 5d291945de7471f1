//! Determinism: the reference engine's activation dump is bit-identical across runs, across
//! separate loads of the same checkpoint, and when two threads run it at the same time. A
//! conformance oracle that drifts from run to run could pass a broken port by accident.

mod common;

use gemma4::golden::GoldenCase;
use gemma4_reference::dump::DumpTensor;
use gemma4_reference::{ActivationDump, Gemma4TextModel};

use common::golden_case;

/// Loads the case's model and computes its dump (prefill and greedy decode).
fn reference_dump(case: &GoldenCase) -> ActivationDump {
    case.prompt()
        .and_then(|prompt| {
            Gemma4TextModel::load_for(&case.model_dir(), &prompt)?
                .with_compute_dtype(case.compute_dtype())
                .dump_prompt(&prompt, case.decode_steps)
        })
        .unwrap_or_else(|e| panic!("{}: {e}", case.name))
}

/// The bits of every value of a tensor (f32 bits, or the i64 itself).
fn bits(tensor: &DumpTensor) -> Vec<u64> {
    match tensor {
        DumpTensor::F32(a) => a.iter().map(|v| u64::from(v.to_bits())).collect(),
        DumpTensor::I64(a) => a.iter().map(|&v| v as u64).collect(),
    }
}

/// Asserts two dumps hold the same tensors with bit-identical values; names the first element
/// that differs.
fn assert_bit_identical(what: &str, first: &ActivationDump, second: &ActivationDump) {
    let names = first.names_in_model_order();
    assert_eq!(
        names,
        second.names_in_model_order(),
        "{what}: tensor lists differ"
    );
    assert!(!names.is_empty(), "{what}: empty dump");
    for name in names {
        let (a, b) = (first.get(name).unwrap(), second.get(name).unwrap());
        assert_eq!(a.shape(), b.shape(), "{what}: {name}: shapes differ");
        let (a_bits, b_bits) = (bits(a), bits(b));
        if let Some(i) = (0..a_bits.len()).find(|&i| a_bits[i] != b_bits[i]) {
            panic!(
                "{what}: {name} differs at flat index {i}: {:?} vs {:?} (bits {:#x} vs {:#x})",
                a.to_f64().iter().nth(i),
                b.to_f64().iter().nth(i),
                a_bits[i],
                b_bits[i]
            );
        }
    }
    // The bytes `gemma4 dump` writes are identical too.
    assert_eq!(
        first.to_bytes(&[]).unwrap(),
        second.to_bytes(&[]).unwrap(),
        "{what}: serialised dumps differ"
    );
}

macro_rules! determinism_across_runs {
    ($($test:ident => $case:literal,)*) => {$(
        #[test]
        fn $test() {
            let case = golden_case($case);
            let first = reference_dump(&case);
            let second = reference_dump(&case);
            assert_bit_identical(concat!($case, ", two runs"), &first, &second);
        }
    )*};
}

determinism_across_runs! {
    determinism_reference_dump_across_runs_e2b_like => "e2b_like",
    determinism_reference_dump_across_runs_e2b_bf16 => "e2b_bf16",
    determinism_reference_dump_across_runs_e4b_like => "e4b_like",
    determinism_reference_dump_across_runs_31b_like => "31b_like",
    determinism_reference_dump_across_runs_26b_a4b_like => "26b_a4b_like",
}

#[test]
fn determinism_reference_dump_across_concurrent_threads() {
    // Two threads run the same cases at the same time (one shared model, one loaded per
    // thread); each result equals a run made alone.
    for name in ["e2b_like", "26b_a4b_like"] {
        let case = golden_case(name);
        let alone = reference_dump(&case);
        let shared = Gemma4TextModel::load(&case.model_dir())
            .unwrap()
            .with_compute_dtype(case.compute_dtype());
        let (from_shared, from_own) = std::thread::scope(|scope| {
            let shared_run = scope.spawn(|| shared.dump(&case.tokens, case.decode_steps).unwrap());
            let own_run = scope.spawn(|| reference_dump(&case));
            (shared_run.join().unwrap(), own_run.join().unwrap())
        });
        assert_bit_identical(
            &format!("{name}, shared model in a thread"),
            &alone,
            &from_shared,
        );
        assert_bit_identical(&format!("{name}, own model in a thread"), &alone, &from_own);
    }
}
