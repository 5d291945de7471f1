//! `gemma4 inspect` says how much of a checkpoint the optimized engine keeps resident: every
//! text weight as stored, minus the PLE table (read one row per token), with the MoE experts
//! counted. Checked on every golden model against sizes derived from its config alone.

mod common;

use gemma4::inspect::{format_inspection, inspect};

#[test]
fn inspect_memory_matches_the_config_every_golden_model() {
    for case in [
        "e2b_like",
        "e4b_like",
        "31b_like",
        "26b_a4b_like",
        "e2b_bf16",
    ] {
        let dir = common::golden_model(case);
        let inspection = inspect(&dir).unwrap();
        let memory = inspection.memory.as_ref().expect("weights present");
        let text = &inspection.config.text;
        // The golden checkpoints are f32, except the bf16 cast.
        let element = if case == "e2b_bf16" { 2 } else { 4 };

        let ple_row = (text.num_hidden_layers * text.hidden_size_per_layer_input * element) as u64;
        let ple_table = text.vocab_size_per_layer_input as u64 * ple_row;
        if text.hidden_size_per_layer_input > 0 {
            assert_eq!(memory.ple_row_bytes, ple_row, "{case}: PLE row bytes");
            assert_eq!(memory.ple_table_bytes, ple_table, "{case}: PLE table bytes");
        } else {
            assert_eq!(
                (memory.ple_table_bytes, memory.ple_row_bytes),
                (0, 0),
                "{case}"
            );
        }

        let experts = match &text.moe {
            Some(moe) => {
                let moe_layers = inspection.plan.layers.iter().filter(|l| l.has_moe).count();
                // gate_up [E, 2·inner, D] and down [E, D, inner] per MoE layer.
                (moe_layers
                    * moe.num_experts
                    * 3
                    * moe.moe_intermediate_size
                    * text.hidden_size
                    * element) as u64
            }
            None => 0,
        };
        assert_eq!(memory.expert_bytes, experts, "{case}: expert bytes");
        assert!(
            case != "26b_a4b_like" || experts > 0,
            "the MoE case has experts"
        );

        assert_eq!(
            memory.resident_weight_bytes + memory.ple_table_bytes,
            memory.text_weight_bytes,
            "{case}: resident = mapped − PLE table"
        );
        // The text weights are the checkpoint minus its header(s) and any non-text tensors.
        assert!(
            memory.text_weight_bytes <= memory.checkpoint_file_bytes
                && memory.checkpoint_file_bytes - memory.text_weight_bytes < 1 << 20,
            "{case}: mapped {} vs files {}",
            memory.text_weight_bytes,
            memory.checkpoint_file_bytes
        );

        let report = format_inspection(&inspection);
        assert!(
            report.contains("resident while running:"),
            "{case}: {report}"
        );
        assert_eq!(
            report.contains("stays on disk"),
            ple_table > 0,
            "{case}: PLE line only for PLE models"
        );
    }
}

#[test]
fn inspect_config_only_has_no_memory_section() {
    let inspection =
        inspect(&common::test_data_dir().join("released").join("e2b")).expect("config only");
    assert!(inspection.memory.is_none());
    assert!(!format_inspection(&inspection).contains("resident while running"));
}

/// A machine with less RAM than the resident weights: the report says the engine still runs
/// (weights are mapped, pages come from disk) and how much does not fit.
#[test]
fn inspect_memory_says_when_weights_do_not_fit() {
    let mut inspection = inspect(&common::golden_model("e2b_like")).unwrap();
    let memory = inspection.memory.as_mut().unwrap();
    let resident = memory.resident_weight_bytes;
    memory.machine_memory_bytes = Some(resident / 4);
    let report = format_inspection(&inspection);
    assert!(
        report.contains("does not fit: the engine still runs") && !report.contains("RAM: fits"),
        "{report}"
    );
    inspection.memory.as_mut().unwrap().machine_memory_bytes = Some(resident * 4);
    assert!(format_inspection(&inspection).contains("of RAM: fits"));
}
