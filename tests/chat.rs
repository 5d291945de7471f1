//! The prompt side of `gemma4 generate` against Hugging Face (fixtures `golden/chat/`, made by
//! `golden/chat.py`): tokenization of hard strings, chat-template rendering and its token ids,
//! the expansion of image and audio placeholders as `Gemma4Processor` does it, and greedy
//! generation on a tiny HF-made model with the full vocabulary. `GEMMA4_CHAT_FIXTURES=DIR` runs
//! the same tests on other fixtures made by the same script.

mod common;

use std::path::{Path, PathBuf};

use gemma4::chat_template::{ChatTemplate, RenderOptions};
use gemma4::generate::{prepare_prompt, GenerateRequest, PromptText, TextSide};
use gemma4::prompt::MediaOptions;
use gemma4::tokenizer::CheckpointTokenizer;
use gemma4_reference::ModelConfig;
use serde_json::Value;

/// `golden/chat/`, or the directory in `GEMMA4_CHAT_FIXTURES` (fixtures made by
/// `golden/chat.py DIR` with other strings, conversations or model: a held-out check).
fn chat_dir() -> PathBuf {
    std::env::var_os("GEMMA4_CHAT_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| common::golden_dir().join("chat"))
}

fn cases() -> Value {
    common::read_json(&chat_dir().join("cases.json"))
}

fn ids(value: &Value) -> Vec<usize> {
    value
        .as_array()
        .expect("an id list")
        .iter()
        .map(|v| v.as_u64().expect("an id") as usize)
        .collect()
}

fn tokenizer() -> CheckpointTokenizer {
    CheckpointTokenizer::load(&chat_dir(), None).expect("the fixture tokenizer loads")
}

fn render_options(tokenizer: &CheckpointTokenizer, thinking: bool) -> RenderOptions {
    RenderOptions {
        add_generation_prompt: true,
        enable_thinking: thinking,
        bos_token: tokenizer.bos.clone().unwrap().0,
        eos_token: tokenizer.eos.clone().unwrap().0,
    }
}

/// Every hard string (unicode, combining characters, whitespace runs, special tokens inside text,
/// the empty string, control bytes) tokenizes to HF's ids, with and without special tokens, and
/// decodes back to HF's text. One deliberate difference: a text that already starts with `<bos>`
/// gets no second BOS (HF's `tokenizer(text)` doubles it).
#[test]
fn chat_tokenization_equals_hf_on_hard_strings() {
    let tokenizer = tokenizer();
    let bos = tokenizer.bos.clone().unwrap().1;
    let strings = cases()["strings"].as_array().unwrap().clone();
    assert!(strings.len() >= 10);
    for case in &strings {
        let text = case["text"].as_str().unwrap();
        let mut expected = ids(&case["ids"]);
        if expected.len() >= 2 && expected[0] == bos && expected[1] == bos {
            expected.remove(0);
        }
        assert_eq!(
            tokenizer.encode(text, true).unwrap(),
            expected,
            "{text:?} with BOS"
        );
        let without = ids(&case["ids_without_special"]);
        assert_eq!(
            tokenizer.encode(text, false).unwrap(),
            without,
            "{text:?} without BOS"
        );
        assert_eq!(
            tokenizer.decode(&without, false).unwrap(),
            case["decoded"].as_str().unwrap(),
            "{text:?} decoded"
        );
    }
}

/// Each conversation (system turn, multi-turn, image and audio parts, thinking on and off)
/// renders to HF's `apply_chat_template(..., add_generation_prompt=True)` text and ids,
/// including the closed empty thought channel when thinking is off.
#[test]
fn chat_template_renders_hf_text_and_ids() {
    let tokenizer = tokenizer();
    let template = ChatTemplate::load(&chat_dir()).unwrap();
    let conversations = cases()["conversations"].as_array().unwrap().clone();
    assert!(conversations.len() >= 4);
    let mut closed_channel = 0;
    for case in &conversations {
        let name = case["name"].as_str().unwrap();
        let thinking = case["enable_thinking"].as_bool().unwrap_or(false);
        let rendered = template
            .render(&case["messages"], &render_options(&tokenizer, thinking))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            rendered,
            case["rendered"].as_str().unwrap(),
            "{name}: rendered text"
        );
        assert_eq!(
            tokenizer.encode(&rendered, false).unwrap(),
            ids(&case["ids"]),
            "{name}: token ids"
        );
        if !thinking {
            assert!(
                rendered.ends_with("<|channel>thought\n<channel|>"),
                "{name}"
            );
            closed_channel += 1;
        }
    }
    assert!(closed_channel >= 3);
}

/// A model config whose multimodal ids are the tokenizer's (the released ids of spec §3.1),
/// around the tiny towers of the golden E2B-like audio case, in a temporary directory with the
/// fixture's tokenizer files.
fn multimodal_checkpoint() -> (tempfile::TempDir, ModelConfig) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::read_json(&common::golden_model("e2b_audio").join("config.json"));
    for (key, id) in [
        ("image_token_id", 258880),
        ("audio_token_id", 258881),
        ("boi_token_id", 255999),
        ("eoi_token_id", 258882),
        ("boa_token_id", 256000),
        ("eoa_token_index", 258883),
        ("video_token_id", 258884),
    ] {
        config[key] = Value::from(id);
    }
    common::write_json(&dir.path().join("config.json"), &config);
    for file in [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
    ] {
        std::fs::copy(chat_dir().join(file), dir.path().join(file)).unwrap();
    }
    let parsed = ModelConfig::from_dir(dir.path()).unwrap();
    (dir, parsed)
}

/// The rendered conversations with an image (budget 70) and/or a clip expand to the ids of
/// HF's `Gemma4Processor`: BOI + one placeholder per soft token + EOI, in order.
#[test]
fn chat_placeholders_expand_as_hf_processor() {
    let (dir, config) = multimodal_checkpoint();
    let text_side = TextSide::load(dir.path(), &config).unwrap();
    let all = cases();
    let conversations = all["conversations"].as_array().unwrap();
    for case in all["expansions"].as_array().unwrap() {
        let name = case["conversation"].as_str().unwrap();
        let conversation = conversations.iter().find(|c| c["name"] == name).unwrap();
        let files = |key: &str, folder: &str, extension: &str| -> Vec<PathBuf> {
            case[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| {
                    chat_dir()
                        .join(folder)
                        .join(format!("{}.{extension}", n.as_str().unwrap()))
                })
                .collect()
        };
        let request = GenerateRequest {
            prompt: PromptText::Chat(conversation["messages"].clone()),
            media: MediaOptions {
                images: files("images", "images", "png"),
                image_budget: case["image_budget"].as_u64().unwrap() as usize,
                audio: files("audio", "audio", "wav"),
                ..MediaOptions::default()
            },
            thinking: false,
            no_bos: false,
        };
        let prepared = prepare_prompt(dir.path(), &config, &text_side, &request)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            prepared.prompt.tokens,
            ids(&case["ids"]),
            "{name}: expanded ids"
        );
        assert!(
            prepared.prompt.tokens.len() > prepared.unexpanded.len() + 10,
            "{name}"
        );
    }
}

/// Bad prompt-side input: a missing or broken tokenizer, a missing template, a template that
/// raises, a placeholder count that does not match the media, media for a model without the
/// tower, a prompt over the context: clear messages naming the file or the counts.
#[test]
fn chat_bad_input_is_named() {
    let (dir, config) = multimodal_checkpoint();
    let text_side = TextSide::load(dir.path(), &config).unwrap();
    let chat = |messages: &str| GenerateRequest {
        prompt: PromptText::Chat(serde_json::from_str(messages).unwrap()),
        media: MediaOptions {
            image_budget: 70,
            ..MediaOptions::default()
        },
        thinking: false,
        no_bos: false,
    };
    let err = prepare_prompt(
        dir.path(),
        &config,
        &text_side,
        &chat(r#"[{"role": "tool", "content": "x"}]"#),
    )
    .unwrap_err();
    assert!(
        err.contains("chat_template.jinja") && err.contains("Unknown role"),
        "{err}"
    );

    let mut image_without_file = chat(
        r#"[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]"#,
    );
    let err = prepare_prompt(dir.path(), &config, &text_side, &image_without_file).unwrap_err();
    assert!(
        err.contains("1 image placeholder") && err.contains("0 image input"),
        "{err}"
    );
    image_without_file.prompt = PromptText::Raw("no placeholder here".into());
    image_without_file.media.images = vec![common::golden_dir().join("chat/images/chelsea.png")];
    let err = prepare_prompt(dir.path(), &config, &text_side, &image_without_file).unwrap_err();
    assert!(
        err.contains("0 image placeholder") && err.contains("1 image input"),
        "{err}"
    );

    // Over the context.
    let mut small = common::read_json(&dir.path().join("config.json"));
    small["text_config"]["max_position_embeddings"] = Value::from(8);
    common::write_json(&dir.path().join("config.json"), &small);
    let small_config = ModelConfig::from_dir(dir.path()).unwrap();
    let err = prepare_prompt(
        dir.path(),
        &small_config,
        &text_side,
        &chat(r#"[{"role": "user", "content": "a long enough question for eight positions"}]"#),
    )
    .unwrap_err();
    assert!(
        err.contains("max_position_embeddings") && err.contains("is 8"),
        "{err}"
    );

    // Template and tokenizer files.
    std::fs::remove_file(dir.path().join("chat_template.jinja")).unwrap();
    let err = prepare_prompt(
        dir.path(),
        &config,
        &text_side,
        &chat(r#"[{"role": "user", "content": "hi"}]"#),
    )
    .unwrap_err();
    assert!(err.contains("no chat template"), "{err}");
    std::fs::write(dir.path().join("tokenizer.json"), "{\"truncated\": ").unwrap();
    let err = CheckpointTokenizer::load(dir.path(), None).err().unwrap();
    assert!(
        err.contains("tokenizer.json") && err.contains("not a usable tokenizer"),
        "{err}"
    );
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let err = CheckpointTokenizer::load(dir.path(), None).err().unwrap();
    assert!(
        err.contains("tokenizer.json") && err.contains("missing"),
        "{err}"
    );
}

/// The fixture's tokenizer.json is small enough for golden/ and carries the ids the code reads.
#[test]
fn chat_fixture_is_small_and_has_gemma4_special_tokens() {
    let size = std::fs::metadata(chat_dir().join("tokenizer.json"))
        .unwrap()
        .len();
    assert!(size < 3_000_000, "tokenizer.json is {size} bytes");
    let tokenizer = tokenizer();
    for (token, id) in [
        ("<|image|>", 258880),
        ("<|audio|>", 258881),
        ("<|image>", 255999),
        ("<image|>", 258882),
        ("<turn|>", 106),
    ] {
        assert_eq!(tokenizer.token_id(token), Some(id), "{token}");
    }
    let _ = Path::new("");
}

/// Greedy generation on the fixture's tiny HF-made model (the tokenizer's full vocabulary)
/// equals Hugging Face's greedy `generate`, token for token, for 32 new tokens after the
/// rendered conversations (up to a stop id, where ours ends), on both engines.
#[test]
fn chat_greedy_generation_equals_hf_generate_both_engines() {
    use gemma4::engine::Engine;
    use gemma4::generate::{generate, GenerateOptions, PreparedPrompt, SamplingOverrides};
    use gemma4_reference::merge::Prompt;
    use std::sync::atomic::AtomicBool;

    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(chat_dir().join("model")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    for file in [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
    ] {
        std::fs::copy(chat_dir().join(file), dir.path().join(file)).unwrap();
    }
    let config = ModelConfig::from_dir(dir.path()).unwrap();
    let text_side = TextSide::load(dir.path(), &config).unwrap();
    let all = cases();
    let conversations = all["conversations"].as_array().unwrap();
    let generations = all["generations"].as_array().unwrap();
    assert!(generations.len() >= 3);
    for case in generations {
        let name = case["conversation"].as_str().unwrap();
        let conversation = conversations.iter().find(|c| c["name"] == name).unwrap();
        let prompt_ids = ids(&conversation["ids"]);
        let expected = ids(&case["ids"]);
        assert_eq!(expected.len(), 32);
        let prepared = PreparedPrompt {
            text: conversation["rendered"].as_str().unwrap().to_string(),
            unexpanded: prompt_ids.clone(),
            prompt: Prompt::text(&prompt_ids),
        };
        for engine in [Engine::Reference, Engine::Optimized] {
            let options = GenerateOptions {
                engine,
                threads: Some(2),
                max_new_tokens: 32,
                sampling: SamplingOverrides {
                    greedy: true,
                    ..SamplingOverrides::default()
                },
                ..GenerateOptions::default()
            };
            let generation = generate(
                dir.path(),
                &config,
                &text_side,
                &prepared,
                &options,
                &AtomicBool::new(false),
                |_| {},
                |_| {},
            )
            .unwrap_or_else(|e| panic!("{name} {engine:?}: {e}"));
            let got = &generation.generated_ids;
            assert_eq!(
                got[..],
                expected[..got.len()],
                "{name} {engine:?}: greedy ids"
            );
            assert!(
                got.len() == 32 || [1, 106].contains(got.last().unwrap()),
                "{name} {engine:?}: stopped early without a stop id"
            );
        }
    }
}

/// Streaming is UTF-8 safe across token boundaries: characters outside the vocabulary (runes,
/// hieroglyphs, fraktur letters), which the tokenizer spells as byte-fallback pieces, come out
/// token by token as whole characters only, and the pieces add up to the decoded text.
#[test]
fn chat_text_stream_releases_whole_characters_only() {
    use gemma4::generate::TextStream;
    let tokenizer = tokenizer();
    for text in [
        "runes ᚠᛇᚻ and 𓀀𓀁 glyphs",
        "emoji 👩\u{200d}👩\u{200d}👧\u{200d}👦 and 🇫🇷",
        "cafe\u{301} 𝔘𝔫𝔦",
    ] {
        let ids = tokenizer.encode(text, false).unwrap();
        let byte_pieces = ids
            .iter()
            .filter(|&&id| tokenizer.token(id).is_some_and(|t| t.starts_with("<0x")))
            .count();
        let mut stream = TextStream::new(&tokenizer);
        let mut pieces = Vec::new();
        for &id in &ids {
            pieces.extend(stream.push(id).unwrap());
        }
        pieces.extend(stream.finish().unwrap());
        for piece in &pieces {
            assert!(
                !piece.contains('\u{FFFD}'),
                "{text:?}: piece {piece:?} holds a broken character"
            );
        }
        assert_eq!(
            pieces.concat(),
            tokenizer.decode(&ids, true).unwrap(),
            "{text:?}"
        );
        if text.starts_with("runes") {
            // Characters outside the vocabulary: 3 and 4 byte-fallback pieces each.
            assert!(
                byte_pieces >= 17,
                "the runes and glyphs should need byte-fallback pieces ({byte_pieces})"
            );
        }
    }
}
