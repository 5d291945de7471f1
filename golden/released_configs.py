#!/usr/bin/env python3
"""The four released Gemma 4 configurations and their exact parameter counts.

Builds the released `Gemma4Config` of E2B, E4B, 31B and 26B-A4B (the values of `_VARIANTS` in
transformers' `convert_gemma4_weights.py`, which the PyPI wheel does not ship), instantiates
`Gemma4ForConditionalGeneration` on the meta device (no memory, no weights) and writes

    <out>/<variant>/config.json    the config in the released spelling (global_head_dim,
                                   num_global_key_value_heads; no per_layer_config)
    <out>/<variant>/tensors.json   the meta model's state_dict: name -> shape
    <out>/param_counts.json        parameter and persistent-buffer counts per part

with <out> = tests/data/released by default. Run it with the oracle virtualenv
(`cargo xtask golden` does). Output is deterministic and written atomically.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

sys.dont_write_bytecode = True  # importing generate.py must not leave golden/__pycache__
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from generate import FULL, SLIDING, atomic_write, json_text, set_determinism, to_released_spelling  # noqa: E402
from transformers import (  # noqa: E402
    Gemma4AudioConfig,
    Gemma4Config,
    Gemma4ForConditionalGeneration,
    Gemma4TextConfig,
    Gemma4VisionConfig,
)

REPO = Path(__file__).resolve().parent.parent
ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}

# Published totals (model cards) to check the meta counts against.
PUBLISHED = {
    "e2b": {"total": 5_104_297_504, "text": 4_628_569_344, "text_ple_table": 2_348_810_240},
}


def on_device_vision() -> Gemma4VisionConfig:
    return Gemma4VisionConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=16,
        num_attention_heads=12,
        num_key_value_heads=12,
        head_dim=64,
        pooling_kernel_size=3,
        use_clipped_linears=True,
    )


def large_vision() -> Gemma4VisionConfig:
    return Gemma4VisionConfig(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=27,
        num_attention_heads=16,
        num_key_value_heads=16,
        head_dim=72,
        pooling_kernel_size=3,
        use_clipped_linears=False,
        standardize=True,
    )


def variants() -> dict[str, Gemma4Config]:
    common = {"final_logit_softcapping": 30.0, "rope_parameters": ROPE}
    e2b = Gemma4TextConfig(
        hidden_size=1536,
        hidden_size_per_layer_input=256,
        intermediate_size=6144,
        num_hidden_layers=35,
        layer_types=([SLIDING] * 4 + [FULL]) * 7,
        num_attention_heads=8,
        num_key_value_heads=1,
        num_global_key_value_heads=None,
        attention_k_eq_v=False,
        use_bidirectional_attention=None,
        num_kv_shared_layers=20,
        use_double_wide_mlp=True,
        **common,
    )
    e4b = Gemma4TextConfig(
        hidden_size=2560,
        hidden_size_per_layer_input=256,
        intermediate_size=10240,
        num_hidden_layers=42,
        layer_types=([SLIDING] * 5 + [FULL]) * 7,
        num_attention_heads=8,
        num_key_value_heads=2,
        global_head_dim=512,
        attention_k_eq_v=False,
        num_kv_shared_layers=18,
        **common,
    )
    b31 = Gemma4TextConfig(
        hidden_size=5376,
        hidden_size_per_layer_input=0,
        intermediate_size=21504,
        num_hidden_layers=60,
        layer_types=([SLIDING] * 5 + [FULL]) * 10,
        num_attention_heads=32,
        num_key_value_heads=16,
        num_global_key_value_heads=4,
        attention_k_eq_v=True,
        use_bidirectional_attention="vision",
        sliding_window=1024,
        max_position_embeddings=262_144,
        **common,
    )
    b26 = Gemma4TextConfig(
        hidden_size=2816,
        hidden_size_per_layer_input=0,
        intermediate_size=2112,
        num_hidden_layers=30,
        layer_types=([SLIDING] * 5 + [FULL]) * 5,
        num_attention_heads=16,
        num_key_value_heads=8,
        num_global_key_value_heads=2,
        attention_k_eq_v=True,
        use_bidirectional_attention="vision",
        enable_moe_block=True,
        num_experts=128,
        moe_intermediate_size=704,
        top_k_experts=8,
        sliding_window=1024,
        max_position_embeddings=262_144,
        **common,
    )
    extra = {"vision_soft_tokens_per_image": 280}
    return {
        "e2b": Gemma4Config(text_config=e2b, vision_config=on_device_vision(), audio_config=Gemma4AudioConfig(), **extra),
        "e4b": Gemma4Config(text_config=e4b, vision_config=on_device_vision(), audio_config=Gemma4AudioConfig(), **extra),
        "31b": Gemma4Config(text_config=b31, vision_config=large_vision(), audio_config=None, **extra),
        "26b-a4b": Gemma4Config(text_config=b26, vision_config=large_vision(), audio_config=None, **extra),
    }


def released_json(config: Gemma4Config) -> str:
    d = json.loads(config.to_json_string())  # the form save_pretrained writes
    d["architectures"] = ["Gemma4ForConditionalGeneration"]
    d["dtype"] = "bfloat16"  # the released checkpoints are bfloat16
    d["text_config"] = to_released_spelling(d["text_config"])
    return json_text(d)


def meta_model(config: Gemma4Config) -> Gemma4ForConditionalGeneration:
    with torch.device("meta"):
        return Gemma4ForConditionalGeneration(config)


def numel(tensors) -> int:
    return sum(t.numel() for t in tensors)


def counts(model: Gemma4ForConditionalGeneration) -> dict[str, Any]:
    """Parameter counts (tied lm_head counted once) and persistent-buffer element counts."""
    inner = model.model
    lm = inner.language_model
    parts = {
        "text": lm,
        "vision_tower": inner.vision_tower,
        "embed_vision": inner.embed_vision,
        "audio_tower": inner.audio_tower,
        "embed_audio": inner.embed_audio,
    }
    params = {name: (numel(m.parameters()) if m is not None else 0) for name, m in parts.items()}
    params["total"] = model.num_parameters()
    params["text_embed_tokens"] = lm.embed_tokens.weight.numel()
    ple = getattr(lm, "embed_tokens_per_layer", None)
    params["text_ple_table"] = ple.weight.numel() if ple is not None else 0
    params["text_experts"] = numel(p for n, p in lm.named_parameters() if ".experts." in n)
    params["text_router"] = numel(p for n, p in lm.named_parameters() if ".router." in n)
    params["lm_head_untied"] = 0 if model.lm_head.weight is lm.embed_tokens.weight else model.lm_head.weight.numel()
    assert params["lm_head_untied"] == 0, "lm_head is not tied"
    assert params["total"] == sum(params[k] for k in parts), params

    persistent = set(model.state_dict().keys())
    buffers: dict[str, dict[str, int]] = {name: {} for name in parts}
    for part, module in parts.items():
        if module is None:
            continue
        prefix = {
            "text": "model.language_model.",
            "vision_tower": "model.vision_tower.",
            "embed_vision": "model.embed_vision.",
            "audio_tower": "model.audio_tower.",
            "embed_audio": "model.embed_audio.",
        }[part]
        for name, b in module.named_buffers():
            if prefix + name not in persistent:
                continue
            kind = name.rsplit(".", 1)[-1]
            kind = "clip_bounds" if kind in ("input_min", "input_max", "output_min", "output_max") else kind
            buffers[part][kind] = buffers[part].get(kind, 0) + b.numel()
    total_buffers = sum(sum(v.values()) for v in buffers.values())
    return {
        "parameters": params,
        "persistent_buffers": {k: v for k, v in buffers.items() if v},
        "persistent_buffer_total": total_buffers,
        "parameters_plus_buffers_total": params["total"] + total_buffers,
    }


def with_buffers(measured: dict[str, Any], key: str) -> int:
    """A parameter count of `measured` plus the persistent buffers of the same part."""
    buffers = measured["persistent_buffers"]
    if key == "total":
        return measured["parameters_plus_buffers_total"]
    if key == "text":
        return measured["parameters"]["text"] + sum(buffers.get("text", {}).values())
    return measured["parameters"][key]  # the PLE table and embeddings hold no buffers


def tensors_json(model: Gemma4ForConditionalGeneration) -> str:
    state = model.state_dict()
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    doc = {
        "architecture": "Gemma4ForConditionalGeneration",
        "note": "state_dict of the meta-device model: lm_head.weight is tied to "
        "model.language_model.embed_tokens.weight and not stored by save_pretrained; "
        "persistent_buffers are state_dict entries that are buffers, not parameters",
        "tied": {"lm_head.weight": "model.language_model.embed_tokens.weight"},
        "persistent_buffers": sorted(n for n in state if n not in params),
        "tensors": {n: list(t.shape) for n, t in state.items()},
    }
    # json_text, with each shape on one line ("name": [a, b]) to keep the file short
    return re.sub(r"\[\n\s*(\d+(?:,\n\s*\d+)*)\n\s*\]", lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", json_text(doc))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "data" / "released")
    out: Path = parser.parse_args().out.resolve()
    set_determinism()

    report: dict[str, Any] = {}
    for name, config in variants().items():
        print(f"variant {name}", file=sys.stderr)
        config_text = released_json(config)
        model = meta_model(config)
        measured = counts(model)
        tensors = tensors_json(model)

        # The written config must load back to the same model.
        reloaded_config = Gemma4Config.from_dict(json.loads(config_text))
        reloaded = meta_model(reloaded_config)
        assert {n: t.shape for n, t in reloaded.state_dict().items()} == {
            n: t.shape for n, t in model.state_dict().items()
        }, f"{name}: released config.json does not rebuild the model"
        assert counts(reloaded) == measured

        measured["published"] = PUBLISHED.get(name, {})
        measured["published_matches"] = {
            key: {
                "parameters": measured["parameters"][key] == value,
                "parameters_plus_buffers": with_buffers(measured, key) == value,
            }
            for key, value in measured["published"].items()
        }
        report[name] = measured
        atomic_write(out / name / "config.json", config_text.encode())
        atomic_write(out / name / "tensors.json", tensors.encode())

    atomic_write(out / "param_counts.json", json_text(report).encode())
    for name, measured in report.items():
        p = measured["parameters"]
        print(f"  {name:8s} total {p['total']:>14,} text {p['text']:>14,} (+{measured['persistent_buffer_total']} buffer elements)", file=sys.stderr)


if __name__ == "__main__":
    main()
