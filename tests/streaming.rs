//! The layer-streamed reference (`reference/src/weight_stream.rs`) and the memory plan
//! (`reference/src/memory_plan.rs`): the same dump, bit for bit, as the in-memory reference; a
//! memory limit that forces streaming is kept (measured); a limit too small for the plan, a
//! damaged late layer and a checkpoint changed on disk mid-run are clear errors with no dump
//! left behind; `--tensors` keeps only what is asked.

mod common;

use std::path::Path;

use gemma4::golden::load_cases;
use gemma4_optimized::synthetic::{write_checkpoint, TinyConfig};
use gemma4_reference::checkpoint::WeightDtype;
use gemma4_reference::dump::TensorFilter;
use gemma4_reference::forced_routing::ForcedRouting;
use gemma4_reference::memory_plan::MemoryPlan;
use gemma4_reference::merge::Prompt;
use gemma4_reference::model::LoadOptions;
use gemma4_reference::weight_stream::Residence;
use gemma4_reference::{ActivationDump, Gemma4TextModel, ModelConfig, ModelPlan};

/// The reference's dump of `prompt` on `dir` with its weights in `residence`.
fn dump_with(
    dir: &Path,
    prompt: &Prompt,
    decode_steps: usize,
    residence: Residence,
) -> ActivationDump {
    let options = LoadOptions {
        residence,
        decode_steps,
        ..LoadOptions::default()
    };
    let model = Gemma4TextModel::load_with(dir, prompt, &options)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    assert_eq!(model.residence(), residence, "{}", dir.display());
    model
        .dump_prompt(prompt, decode_steps)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// Every tensor equal bit for bit (NaN-free dumps: `==` on f32 is bit equality but for ±0,
/// which a different summation order could produce and this would miss; it cannot here, the
/// arithmetic is the same).
fn assert_identical(what: &str, a: &ActivationDump, b: &ActivationDump) {
    assert_eq!(
        a.names_in_model_order(),
        b.names_in_model_order(),
        "{what}: tensor names"
    );
    for name in a.names_in_model_order() {
        let (x, y) = (a.get(name).unwrap(), b.get(name).unwrap());
        if let (Some(x), Some(y)) = (x.as_f32(), y.as_f32()) {
            let differing = x
                .iter()
                .zip(y.iter())
                .position(|(p, q)| p.to_bits() != q.to_bits());
            assert!(
                differing.is_none(),
                "{what}: `{name}` differs at flat index {differing:?}"
            );
        } else {
            assert_eq!(x, y, "{what}: `{name}`");
        }
    }
}

#[test]
fn streamed_dump_equals_in_memory_bit_for_bit_every_golden_case() {
    let cases = load_cases(&common::golden_dir()).expect("golden fixtures intact");
    for case in &cases {
        let prompt = case.prompt().unwrap();
        let dir = case.model_dir();
        let in_memory = dump_with(&dir, &prompt, case.decode_steps, Residence::InMemory);
        let streamed = dump_with(&dir, &prompt, case.decode_steps, Residence::Streamed);
        assert_identical(&case.name, &in_memory, &streamed);
    }
    // A full 262144-token vocabulary: the streamed LM head runs in 32 blocks of rows.
    let chat = common::golden_dir().join("chat/model");
    let prompt = Prompt::text(&[2, 105, 2364, 107, 9259, 106]);
    let in_memory = dump_with(&chat, &prompt, 3, Residence::InMemory);
    let streamed = dump_with(&chat, &prompt, 3, Residence::Streamed);
    assert_identical("chat model", &in_memory, &streamed);
}

/// A synthetic model whose token and PLE tables (262144 rows) dominate its size: 160 MiB of
/// f32 weights in memory, a few MiB per layer streamed.
fn table_heavy_model(dir: &Path) {
    let config = TinyConfig {
        vocab_size: 262_144,
        hidden_size: 128,
        intermediate_size: 256,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        num_global_key_value_heads: 1,
        head_dim: 32,
        global_head_dim: 64,
        full_layers: vec![false, true, false, true],
        sliding_window: 4,
        hidden_size_per_layer_input: 8,
        num_kv_shared_layers: 2,
        use_double_wide_mlp: false,
        attention_k_eq_v: true,
        moe: None,
        tie_word_embeddings: true,
        final_logit_softcapping: Some(30.0),
    };
    write_checkpoint(dir, &config.config_json(), WeightDtype::BF16, 11).unwrap();
}

const TOKENS: &str = "2,17,301,5,9,40000,262143,7";

fn plan_of(dir: &Path, decode_steps: usize) -> MemoryPlan {
    let config = ModelConfig::from_dir(dir).unwrap();
    let plan = ModelPlan::from_config(&config.text);
    let tokens: Vec<usize> = TOKENS.split(',').map(|t| t.parse().unwrap()).collect();
    MemoryPlan::of_dump(
        &config,
        &plan,
        &Prompt::text(&tokens),
        decode_steps,
        &TensorFilter::all(),
    )
}

/// The `peak resident memory X MiB` line of a command's stderr, in MiB.
fn peak_mib(stderr: &str) -> f64 {
    let line = stderr
        .lines()
        .find(|l| l.contains("peak resident memory"))
        .unwrap_or_else(|| panic!("no peak line in {stderr}"));
    let mut words = line.rsplit(' ');
    let unit = words.next().unwrap();
    let value: f64 = words.next().unwrap().parse().unwrap();
    match unit {
        "MiB" => value,
        "GiB" => value * 1024.0,
        "KiB" => value / 1024.0,
        other => panic!("unit {other} in {line}"),
    }
}

#[test]
fn a_memory_limit_below_the_model_streams_it_and_is_kept() {
    let scratch = tempfile::tempdir().unwrap();
    let model = scratch.path().join("model");
    table_heavy_model(&model);
    let plan = plan_of(&model, 3);
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    assert!(
        plan.streamed_peak() + (60 << 20) < plan.in_memory_peak(),
        "the model must need far more memory in memory than streamed: {plan:?}"
    );
    // Between the two plans: only streaming fits.
    let limit = (plan.streamed_peak() + plan.in_memory_peak()) / 2;
    let reference_out = scratch.path().join("in_memory.safetensors");
    let streamed_out = scratch.path().join("streamed.safetensors");
    let model_arg = model.to_str().unwrap();
    let (code, _, stderr) = common::run_gemma4(
        &[
            "dump",
            "--model",
            model_arg,
            "--tokens",
            TOKENS,
            "--decode",
            "3",
            "--weights",
            "in-memory",
            "--out",
            reference_out.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
    let limit_arg = limit.to_string();
    let (code, _, stderr) = common::run_gemma4(
        &[
            "dump",
            "--model",
            model_arg,
            "--tokens",
            TOKENS,
            "--decode",
            "3",
            "--max-memory",
            &limit_arg,
            "--out",
            streamed_out.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("weights streamed"),
        "auto picks streaming under the limit: {stderr}"
    );
    // The whole process (binary, mapped pages, everything) stayed under the limit.
    let peak = peak_mib(&stderr);
    assert!(
        peak < mib(limit),
        "measured peak {peak:.1} MiB over the {:.1} MiB limit\n{stderr}",
        mib(limit)
    );
    assert!(
        peak < mib(plan.streamed_peak()),
        "the plan ({:.1} MiB) must bound the measured peak ({peak:.1} MiB)",
        mib(plan.streamed_peak())
    );
    assert_identical(
        "table-heavy model",
        &ActivationDump::read(&reference_out).unwrap(),
        &ActivationDump::read(&streamed_out).unwrap(),
    );

    // The same limit through the environment variable.
    let env_out = scratch.path().join("env.safetensors");
    let (code, _, stderr) = common::run_gemma4(
        &[
            "dump",
            "--model",
            model_arg,
            "--tokens",
            TOKENS,
            "--out",
            env_out.to_str().unwrap(),
        ],
        &[("GEMMA4_MEMORY_LIMIT", &limit_arg)],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("weights streamed"), "{stderr}");

    // Asking for in-memory weights under that limit is refused before anything is read.
    let refused = scratch.path().join("refused.safetensors");
    let (code, _, stderr) = common::run_gemma4(
        &[
            "dump",
            "--model",
            model_arg,
            "--tokens",
            TOKENS,
            "--weights",
            "in-memory",
            "--max-memory",
            &limit_arg,
            "--out",
            refused.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("--max-memory") && stderr.contains("text weights"),
        "{stderr}"
    );
    assert!(!refused.exists(), "no dump after a refusal");

    // A limit below even the streamed plan: refused, naming the largest layer.
    let tiny_limit = (plan.streamed_peak() / 2).to_string();
    let (code, _, stderr) = common::run_gemma4(
        &[
            "dump",
            "--model",
            model_arg,
            "--tokens",
            TOKENS,
            "--max-memory",
            &tiny_limit,
            "--out",
            refused.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("largest layer (layers."), "{stderr}");
    assert!(!refused.exists(), "no dump after a refusal");
}

#[test]
fn compare_and_conform_take_the_memory_flags() {
    let scratch = tempfile::tempdir().unwrap();
    let model = common::golden_model("e4b_like");
    let model_arg = model.to_str().unwrap();
    let candidate = scratch.path().join("candidate.safetensors");
    let (code, _, stderr) = common::run_gemma4(
        &[
            "dump",
            "--model",
            model_arg,
            "--tokens",
            "2,5,9,11",
            "--decode",
            "2",
            "--engine",
            "optimized",
            "--out",
            candidate.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
    let (code, stdout, stderr) = common::run_gemma4(
        &[
            "compare",
            "--model",
            model_arg,
            "--tokens",
            "2,5,9,11",
            "--weights",
            "streamed",
            "--candidate",
            candidate.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stderr.contains("gemma4 compare: peak resident memory"),
        "{stderr}"
    );
    let (code, stdout, stderr) = common::run_gemma4(
        &[
            "conform",
            "--engine",
            "reference",
            "--case",
            "26b_a4b_like",
            "--weights",
            "streamed",
        ],
        &[],
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stderr.contains("gemma4 conform: peak resident memory"),
        "{stderr}"
    );
    let (code, _, stderr) = common::run_gemma4(
        &["conform", "--case", "e2b_like", "--max-memory", "12x"],
        &[],
    );
    assert_eq!(code, 2, "a malformed limit is a usage error: {stderr}");
    assert!(stderr.contains("12x"), "{stderr}");
}

/// Writes the non-finite bf16 value 0x7fc0 (NaN) over element `element` of `tensor` in `file`.
fn poison(file: &Path, tensor: &str, element: usize) {
    let raw = common::RawSafetensors::read(file);
    let (start, _) = raw.offsets(tensor);
    let bytes = std::fs::read(file).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let at = 8 + header + start + 2 * element;
    let mut bytes = bytes;
    bytes[at..at + 2].copy_from_slice(&0x7fc0u16.to_le_bytes());
    std::fs::write(file, bytes).unwrap();
}

#[test]
fn a_damaged_late_layer_stops_the_stream_with_no_dump_left() {
    let scratch = tempfile::tempdir().unwrap();
    let model = scratch.path().join("model");
    table_heavy_model(&model);
    let tensor = "model.layers.3.mlp.down_proj.weight";
    poison(&model.join("model.safetensors"), tensor, 5);
    let out = scratch.path().join("dump.safetensors");
    let (code, _, stderr) = common::run_gemma4(
        &[
            "dump",
            "--model",
            model.to_str().unwrap(),
            "--tokens",
            TOKENS,
            "--weights",
            "streamed",
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains(tensor) && stderr.contains("non-finite") && stderr.contains("[0, 5]"),
        "the error names the tensor and the element: {stderr}"
    );
    assert!(!out.exists(), "no partial dump");
    let leftovers: Vec<_> = std::fs::read_dir(scratch.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn a_checkpoint_shortened_mid_run_is_a_read_error_naming_it() {
    let scratch = tempfile::tempdir().unwrap();
    let model = scratch.path().join("model");
    table_heavy_model(&model);
    let prompt = Prompt::text(&[2, 17, 301]);
    let options = LoadOptions {
        residence: Residence::Streamed,
        ..LoadOptions::default()
    };
    let loaded = Gemma4TextModel::load_with(&model, &prompt, &options).unwrap();
    // The headers were checked when the model was opened; now the file loses its last bytes
    // (a disk that stops returning data behaves the same for the reader: a failed read).
    let file = model.join("model.safetensors");
    let length = std::fs::metadata(&file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(length - 4096)
        .unwrap();
    let error = loaded.dump_prompt(&prompt, 0).unwrap_err().to_string();
    assert!(
        error.contains("model.safetensors")
            && error.contains("reading")
            && error.contains("failed"),
        "a read error naming the file: {error}"
    );
}

#[test]
fn tensors_keeps_only_what_is_asked_and_compare_accepts_it() {
    let scratch = tempfile::tempdir().unwrap();
    let model = common::golden_model("26b_a4b_like");
    let model_arg = model.to_str().unwrap();
    let partial = scratch.path().join("partial.safetensors");
    for engine in ["reference", "optimized"] {
        let (code, _, stderr) = common::run_gemma4(
            &[
                "dump",
                "--model",
                model_arg,
                "--tokens",
                "2,5,9,11",
                "--decode",
                "2",
                "--engine",
                engine,
                "--tensors",
                "logits,layers.*.output,layers.*.router.top_k_index",
                "--out",
                partial.to_str().unwrap(),
            ],
            &[],
        );
        assert_eq!(code, 0, "{stderr}");
        let dump = ActivationDump::read(&partial).unwrap();
        let layers = gemma4_reference::ModelConfig::from_dir(&model)
            .unwrap()
            .text
            .num_hidden_layers;
        let mut expected = vec!["input_ids".to_string(), "logits".to_string()];
        for i in 0..layers {
            expected.push(format!("layers.{i}.output"));
            expected.push(format!("layers.{i}.router.top_k_index"));
        }
        expected.sort();
        let mut names: Vec<String> = dump
            .names_in_model_order()
            .iter()
            .map(|n| n.to_string())
            .collect();
        names.sort();
        assert_eq!(names, expected, "{engine}: only the asked tensors");
    }
    // A full candidate against the partial expected dump: only those are compared.
    let full = scratch.path().join("full.safetensors");
    let (code, _, stderr) = common::run_gemma4(
        &[
            "dump",
            "--model",
            model_arg,
            "--tokens",
            "2,5,9,11",
            "--decode",
            "2",
            "--engine",
            "optimized",
            "--out",
            full.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
    let (code, stdout, stderr) = common::run_gemma4(
        &[
            "compare",
            "--expected",
            partial.to_str().unwrap(),
            "--candidate",
            full.to_str().unwrap(),
            "--json",
        ],
        &[],
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["conformant"], true);
    assert!(report["tensors"].as_array().unwrap().len() < 20, "{stdout}");

    // A pattern that selects nothing is a typo: refused, no file.
    let typo = scratch.path().join("typo.safetensors");
    let (code, _, stderr) = common::run_gemma4(
        &[
            "dump",
            "--model",
            model_arg,
            "--tokens",
            "2,5",
            "--tensors",
            "logits,layer.*.output",
            "--out",
            typo.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("`layer.*.output` matched no tensor"),
        "{stderr}"
    );
    assert!(!typo.exists());
    let (code, _, stderr) = common::run_gemma4(
        &[
            "dump",
            "--model",
            model_arg,
            "--tokens",
            "2,5",
            "--tensors",
            "logits,,final_norm",
            "--out",
            typo.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("empty pattern"), "{stderr}");
}

#[test]
fn a_streamed_model_gets_a_noise_envelope_like_an_in_memory_one() {
    use gemma4::compare_diagnosis::clean_noise_envelope;
    let dir = common::golden_model("e2b_like");
    let prompt = Prompt::text(&[2, 17, 301, 5, 9, 40]);
    let envelope_of = |residence| {
        let options = LoadOptions {
            residence,
            ..LoadOptions::default()
        };
        let model = Gemma4TextModel::load_with(&dir, &prompt, &options).unwrap();
        let clean = model.dump_prompt(&prompt, 0).unwrap();
        clean_noise_envelope(&model, &dir, &prompt, 0, &clean, &ForcedRouting::default())
    };
    let (in_memory, streamed) = (
        envelope_of(Residence::InMemory),
        envelope_of(Residence::Streamed),
    );
    // The streamed probes perturb each layer as it is read, with their own noise draws: the
    // deviations are not equal but of the same size (two draws differ by up to about 2x on
    // the golden models; a layer left unperturbed shows as a factor of 8 at its output).
    for tensor in [
        "layers.0.attn.q",
        "layers.0.output",
        "layers.3.output",
        "logits",
    ] {
        let (a, b) = (in_memory[tensor], streamed[tensor]);
        assert!(
            (1e-8..1e-4).contains(&a) && (a / 4.0..a * 4.0).contains(&b),
            "`{tensor}`: in memory {a:e}, streamed {b:e}"
        );
    }
}
