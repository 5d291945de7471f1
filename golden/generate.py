#!/usr/bin/env python3
"""Golden fixture generator: the oracle of the gemma4 conformance suite.

Builds tiny random Gemma 4 models with Hugging Face transformers (pinned in
golden/requirements.txt), runs them on CPU and records what they compute. For
every case it writes

    <out>/<case>/model/               save_pretrained output (config.json, safetensors)
    <out>/<case>/expected.safetensors the activation dump (shared/contracts.md §2)
    <out>/<case>/case.json            token ids and what the case exercises

and then <out>/manifest.json. The output is deterministic: running the script
twice produces byte-identical files. Every file is written to a temporary file
in its final directory and renamed into place.

This script only calls the public API of transformers (model classes, configs,
save_pretrained / from_pretrained, forward hooks); it never re-implements the
model. Run it with `cargo xtask golden`, which provides the pinned virtualenv.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import io
import json
import os
import platform
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The oracle never touches the network: every model is built from a config.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import safetensors.torch  # noqa: E402
import skimage.data  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    DynamicCache,
    Gemma4AudioConfig,
    Gemma4Config,
    Gemma4ForCausalLM,
    Gemma4ForConditionalGeneration,
    Gemma4TextConfig,
    Gemma4VisionConfig,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402
from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor  # noqa: E402
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil  # noqa: E402
from transformers.models.gemma4 import modeling_gemma4 as hf  # noqa: E402

GOLDEN_DIR = Path(__file__).resolve().parent
DECODE_STEPS = 8
VOCAB = 512
SOFTCAP = 30.0

# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One golden case: a tiny model, a prompt, and how its checkpoint is laid out."""

    name: str
    family: str  # e2b | e4b | 31b | 26b-a4b
    layout: str  # causal_lm | conditional_generation
    config_spelling: str  # released | per_layer_config
    dtype: str  # float32 | bfloat16: the dtype the oracle computes in (from_pretrained(dtype=...))
    seed: int
    prompt_len: int
    text: dict[str, Any]
    vision: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    max_shard_size: str | None = None  # set: save sharded with this shard size
    min_shards: int = 1
    layer_types_null: bool = False  # released config writes `layer_types: null`
    # Top-level multimodal token ids (conditional generation only), and prompt positions
    # overwritten with those ids: placeholders without soft tokens, which HF embeds as the pad
    # token and gives the pad row of the PLE table (multimodal spec §3.2).
    special_tokens: dict[str, int] | None = None
    placeholders: dict[int, str] | None = None
    exercises: list[str] = field(default_factory=list)
    # The dtype the checkpoint is stored in, when it differs from the compute dtype (a bf16
    # checkpoint loaded with dtype=float32, the usual way to check a port).
    checkpoint_dtype: str | None = None
    # Vision cases: the images of the prompt (file name in IMAGES, budget), the text tokens
    # around them, the case whose model this one reuses, and the clip-bound range.
    images: list[tuple[str, int]] = field(default_factory=list)
    # Audio cases: the clips of the prompt (names in CLIPS), after the images.
    clips: list[str] = field(default_factory=list)
    text_between: list[int] = field(default_factory=list)
    model_of: str | None = None
    clip_bounds: tuple[float, float] = (2.0, 4.0)

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[self.dtype]

    @property
    def storage_dtype(self) -> str:
        return self.checkpoint_dtype or self.dtype

    @property
    def torch_storage_dtype(self) -> torch.dtype:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[self.storage_dtype]

    @property
    def sharded(self) -> bool:
        return self.max_shard_size is not None


def text_config(**overrides: Any) -> dict[str, Any]:
    """Text config values shared by every case, plus the case's own."""
    base = {
        "vocab_size": VOCAB,
        "final_logit_softcapping": SOFTCAP,
        "tie_word_embeddings": True,
        "pad_token_id": 0,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "head_dim": 16,
        "global_head_dim": 32,
    }
    base.update(overrides)
    if base.get("hidden_size_per_layer_input"):
        base["vocab_size_per_layer_input"] = VOCAB
    return base


def tiny_clipped_vision(positions: int = 64) -> dict[str, Any]:
    """The tiny on-device vision tower (clipped linears) of the E2B/E4B-like multimodal models:
    `positions` per axis of the position tables (64 where no image is larger, 1024 for the
    vision cases' images)."""
    return {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "intermediate_size": 64,
        "use_clipped_linears": True,
        "position_embedding_size": positions,
    }


SLIDING, FULL = "sliding_attention", "full_attention"

# Multimodal token ids inside the tiny vocabulary (the released ids are 255999..258884), so that
# the placeholders' own PLE rows exist and a port reading them instead of the pad row is caught.
MULTIMODAL_TOKENS = {
    "boa_token_id": 504,
    "boi_token_id": 505,
    "eoi_token_id": 506,
    "eoa_token_index": 507,
    "image_token_id": 509,
    "audio_token_id": 510,
    "video_token_id": 511,
}

CASES: list[Case] = [
    Case(
        name="e2b_like",
        family="e2b",
        layout="causal_lm",
        config_spelling="released",
        dtype="float32",
        seed=1001,
        prompt_len=17,
        text=text_config(
            num_key_value_heads=1,
            num_hidden_layers=10,
            layer_types=([SLIDING] * 4 + [FULL]) * 2,
            hidden_size_per_layer_input=16,
            num_kv_shared_layers=4,
            use_double_wide_mlp=True,
            intermediate_size=96,
            sliding_window=6,
        ),
        exercises=[
            "ple",
            "kv_sharing",
            "double_wide_mlp",
            "pattern_4_1",
            "kv_heads_1",
            "sliding_window_6",
            "released_spelling",
            "causal_lm_prefix",
        ],
    ),
    Case(
        name="e4b_like",
        family="e4b",
        layout="conditional_generation",
        config_spelling="per_layer_config",
        dtype="float32",
        seed=1002,
        prompt_len=14,
        text=text_config(
            num_key_value_heads=2,
            num_hidden_layers=12,
            layer_types=None,
            hidden_size_per_layer_input=8,
            num_kv_shared_layers=4,
            intermediate_size=128,
            sliding_window=5,
        ),
        vision=tiny_clipped_vision(),
        # The subsampling projection's input width is (channels[0] // 4) * channels[1], which
        # equals the real flattened width (128 mel bins / 4) * channels[1] only when
        # channels[0] == 128: the first channel count must stay 128 for 128-bin features.
        audio={
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "subsampling_conv_channels": [128, 4],
            "output_proj_dims": 24,
        },
        exercises=[
            "ple",
            "kv_sharing",
            "gqa_kv_heads_2",
            "default_pattern_5_1",
            "sliding_window_5",
            "per_layer_config_spelling",
            "per_layer_config_zero_padded_keys",
            "conditional_generation_prefix",
            "vision_tower_clipped_linears",
            "audio_tower",
            "multimodal_placeholders_without_soft_tokens",
        ],
        # Inside the tiny vocabulary, so that the placeholders' own PLE rows exist and a port
        # that reads them instead of the pad row is caught.
        special_tokens={
            "boa_token_id": 504,
            "boi_token_id": 505,
            "eoi_token_id": 506,
            "eoa_token_index": 507,
            "image_token_id": 509,
            "audio_token_id": 510,
            "video_token_id": 511,
        },
        placeholders={3: "boi_token_id", 4: "image_token_id", 5: "image_token_id", 6: "eoi_token_id", 10: "audio_token_id"},
    ),
    Case(
        name="31b_like",
        family="31b",
        layout="conditional_generation",
        config_spelling="released",
        dtype="float32",
        seed=1003,
        prompt_len=20,
        text=text_config(
            num_key_value_heads=2,
            num_global_key_value_heads=1,
            attention_k_eq_v=True,
            hidden_size_per_layer_input=0,
            use_bidirectional_attention="vision",
            num_hidden_layers=7,
            layer_types=None,
            intermediate_size=128,
            sliding_window=8,
        ),
        vision={
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "intermediate_size": 64,
            "use_clipped_linears": False,
            "standardize": True,
            "position_embedding_size": 64,
        },
        layer_types_null=True,
        exercises=[
            "k_eq_v",
            "global_kv_heads_1",
            "no_ple",
            "last_layer_forced_full",
            "layer_types_null",
            "bidirectional_vision_config",
            "sliding_window_8",
            "released_spelling",
            "conditional_generation_prefix",
            "vision_tower_standardize",
        ],
    ),
    Case(
        name="26b_a4b_like",
        family="26b-a4b",
        layout="causal_lm",
        config_spelling="per_layer_config",
        dtype="float32",
        seed=1004,
        prompt_len=12,
        text=text_config(
            num_key_value_heads=2,
            num_global_key_value_heads=1,
            attention_k_eq_v=True,
            hidden_size_per_layer_input=0,
            num_hidden_layers=6,
            enable_moe_block=True,
            num_experts=128,
            top_k_experts=8,
            moe_intermediate_size=8,
            intermediate_size=24,
            sliding_window=4,
        ),
        max_shard_size="2MB",
        min_shards=3,
        exercises=[
            "moe_128_top8",
            "shared_mlp",
            "k_eq_v",
            "global_kv_heads_1",
            "no_ple",
            "sliding_window_4",
            "per_layer_config_spelling",
            "sharded_checkpoint",
            "causal_lm_prefix",
        ],
    ),
    Case(
        name="e2b_bf16",
        family="e2b",
        layout="causal_lm",
        config_spelling="released",
        dtype="bfloat16",
        seed=1013,  # 1005..1012 give greedy margins below 8 bf16 ulps
        prompt_len=11,
        text=text_config(
            hidden_size=96,
            num_key_value_heads=1,
            # SSSSF cannot share KV: its full consumer (layer 4) would have no full producer
            # before it (HF raises). SSFSF keeps L=5 and 2 shared layers: consumers 3
            # (sliding, reads layer 1) and 4 (full, reads layer 2), both double-wide.
            num_hidden_layers=5,
            layer_types=[SLIDING, SLIDING, FULL, SLIDING, FULL],
            hidden_size_per_layer_input=16,
            num_kv_shared_layers=2,
            use_double_wide_mlp=True,
            intermediate_size=96,
            sliding_window=4,
        ),
        exercises=[
            "bfloat16",
            "embed_scale_rounded_to_bf16",
            "ple",
            "kv_sharing",
            "double_wide_mlp",
            "sliding_window_4",
            "released_spelling",
            "causal_lm_prefix",
        ],
    ),
    Case(
        name="e4b_bf16_as_f32",
        family="e4b",
        layout="causal_lm",
        config_spelling="per_layer_config",
        dtype="float32",
        checkpoint_dtype="bfloat16",
        seed=1006,
        prompt_len=13,
        text=text_config(
            # sqrt(80) = 8.944 (8.9375 in bf16) and sqrt(24) = 4.899 (4.90625 in bf16): loaded in
            # float32, Hugging Face uses the unrounded scales, whatever the storage dtype.
            hidden_size=80,
            num_key_value_heads=2,
            # The default 5:1 pattern over 8 layers is SSSSSFSF (the last forced full): the two
            # KV-shared layers (6 sliding, 7 full) both have a producer of their type.
            num_hidden_layers=8,
            layer_types=None,
            hidden_size_per_layer_input=24,
            num_kv_shared_layers=2,
            intermediate_size=112,
            sliding_window=4,
        ),
        exercises=[
            "bfloat16_checkpoint_computed_in_float32",
            "embed_scale_unrounded_in_float32",
            "ple_scale_unrounded_in_float32",
            "ple",
            "kv_sharing",
            "default_pattern_5_1",
            "sliding_window_4",
            "per_layer_config_spelling",
            "causal_lm_prefix",
        ],
    ),
    # Vision: an E2B-like model with the on-device tower (clipped linears whose bounds clip) and
    # a 31B-like one with the large tower (standardize) and bidirectional image blocks; each
    # with one image, then two images on the same checkpoint. Budget 70 (up to 630 patches, 70
    # soft tokens): more image tokens than either sliding window.
    Case(
        name="e2b_vision",
        family="e2b",
        layout="conditional_generation",
        config_spelling="released",
        dtype="float32",
        seed=1020,
        prompt_len=0,
        text=text_config(
            num_key_value_heads=1,
            num_hidden_layers=6,
            layer_types=[SLIDING, SLIDING, SLIDING, FULL, SLIDING, FULL],
            hidden_size_per_layer_input=16,
            num_kv_shared_layers=2,
            use_double_wide_mlp=True,
            intermediate_size=96,
            sliding_window=6,
        ),
        vision=tiny_clipped_vision(positions=1024),
        special_tokens=MULTIMODAL_TOKENS,
        images=[("astronaut", 70)],
        text_between=[5, 9],
        clip_bounds=(0.8, 2.0),
        exercises=[
            "vision_on_device_tower",
            "clipped_linears_that_clip",
            "photograph_png",
            "budget_70",
            "image_longer_than_sliding_window",
            "soft_tokens_merged",
            "ple_pad_row_at_placeholders",
            "kv_sharing",
            "decode_after_image",
            "released_spelling",
            "conditional_generation_prefix",
        ],
    ),
    Case(
        name="e2b_vision_two_images",
        family="e2b",
        layout="conditional_generation",
        config_spelling="released",
        dtype="float32",
        seed=1021,
        prompt_len=0,
        text={},  # the model is e2b_vision's
        model_of="e2b_vision",
        special_tokens=MULTIMODAL_TOKENS,
        images=[("coffee", 70), ("gradient_rgba", 70)],
        text_between=[3, 4, 6],
        exercises=["two_images", "rgba_over_white", "image_runs_in_order", "decode_after_image"],
    ),
    Case(
        name="31b_vision",
        family="31b",
        layout="conditional_generation",
        config_spelling="released",
        dtype="float32",
        seed=1030,
        prompt_len=0,
        text=text_config(
            num_key_value_heads=2,
            num_global_key_value_heads=1,
            attention_k_eq_v=True,
            hidden_size_per_layer_input=0,
            use_bidirectional_attention="vision",
            num_hidden_layers=7,
            layer_types=None,
            intermediate_size=128,
            sliding_window=8,
        ),
        vision={
            "hidden_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 3,
            "num_key_value_heads": 3,
            "head_dim": 16,
            "intermediate_size": 96,
            "use_clipped_linears": False,
            "standardize": True,
            "position_embedding_size": 1024,
        },
        special_tokens=MULTIMODAL_TOKENS,
        images=[("chelsea", 70)],
        text_between=[4, 7],
        exercises=[
            "vision_large_tower",
            "standardize",
            "bidirectional_image_block_on_sliding_layers",
            "image_longer_than_sliding_window",
            "k_eq_v",
            "decode_after_image",
            "released_spelling",
        ],
    ),
    Case(
        name="31b_vision_two_images",
        family="31b",
        layout="conditional_generation",
        config_spelling="released",
        dtype="float32",
        seed=1031,
        prompt_len=0,
        text={},  # the model is 31b_vision's
        model_of="31b_vision",
        special_tokens=MULTIMODAL_TOKENS,
        images=[("camera", 70), ("astronaut", 70)],
        text_between=[2, 3, 5],
        exercises=["two_images", "two_bidirectional_blocks", "grey_image", "decode_after_image"],
    ),
    # Audio: an E2B-like model with both towers (the audio tower's clipped linears clip too);
    # one clip, two clips of other lengths, and an image followed by a clip.
    Case(
        name="e2b_audio",
        family="e2b",
        layout="conditional_generation",
        config_spelling="released",
        dtype="float32",
        seed=1040,
        prompt_len=0,
        text=text_config(
            num_key_value_heads=1,
            num_hidden_layers=6,
            layer_types=[SLIDING, SLIDING, SLIDING, FULL, SLIDING, FULL],
            hidden_size_per_layer_input=16,
            num_kv_shared_layers=2,
            use_double_wide_mlp=True,
            intermediate_size=96,
            sliding_window=6,
        ),
        vision=tiny_clipped_vision(positions=1024),
        # subsampling_conv_channels[0] stays 128: HF sizes the projection (channels[0] / 4) ·
        # channels[1], right only when channels[0] equals the 128 mel bins.
        audio={
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "subsampling_conv_channels": [128, 4],
            "output_proj_dims": 24,
        },
        special_tokens=MULTIMODAL_TOKENS,
        clips=["voice_1s"],
        text_between=[5, 9],
        clip_bounds=(0.8, 2.0),
        exercises=[
            "audio_tower",
            "clipped_linears_that_clip",
            "log_mel_front_end",
            "chunked_local_attention_longer_than_a_chunk",
            "soft_tokens_merged",
            "ple_pad_row_at_placeholders",
            "decode_after_audio",
            "released_spelling",
        ],
    ),
    Case(
        name="e2b_audio_two_clips",
        family="e2b",
        layout="conditional_generation",
        config_spelling="released",
        dtype="float32",
        seed=1041,
        prompt_len=0,
        text={},  # the model is e2b_audio's
        model_of="e2b_audio",
        special_tokens=MULTIMODAL_TOKENS,
        clips=["voice_073s", "chirp_05s"],
        text_between=[3, 4, 6],
        exercises=["two_clips", "clips_of_other_lengths_padded_in_a_batch", "decode_after_audio"],
    ),
    # An E4B-like model hearing: the 5:1 pattern whose last unshared layer is full (the released
    # E4B layout), two KV heads, PLE, KV sharing across both layer types; a 2.6 s clip (65 soft
    # tokens: more than five 12-frame attention chunks after subsampling) whose valid-frame count
    # leaves a residue of 3 mod 4.
    Case(
        name="e4b_audio",
        family="e4b",
        layout="conditional_generation",
        config_spelling="released",
        dtype="float32",
        seed=1043,
        prompt_len=0,
        text=text_config(
            num_key_value_heads=2,
            num_hidden_layers=8,
            layer_types=[SLIDING, SLIDING, SLIDING, SLIDING, SLIDING, FULL, SLIDING, FULL],
            hidden_size_per_layer_input=8,
            num_kv_shared_layers=2,
            intermediate_size=112,
            sliding_window=7,
        ),
        vision=tiny_clipped_vision(),
        audio={
            "hidden_size": 48,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "subsampling_conv_channels": [128, 8],
            "output_proj_dims": 40,
        },
        special_tokens=MULTIMODAL_TOKENS,
        clips=["voice_26s"],
        text_between=[4, 7],
        clip_bounds=(0.8, 2.0),
        exercises=[
            "audio_tower",
            "e4b_family_audio",
            "clipped_linears_that_clip",
            "chunked_local_attention_longer_than_a_chunk",
            "soft_tokens_merged",
            "ple_pad_row_at_placeholders",
            "decode_after_audio",
        ],
    ),
    Case(
        name="e2b_image_and_audio",
        family="e2b",
        layout="conditional_generation",
        config_spelling="released",
        dtype="float32",
        seed=1042,
        prompt_len=0,
        text={},  # the model is e2b_audio's
        model_of="e2b_audio",
        special_tokens=MULTIMODAL_TOKENS,
        images=[("chelsea", 70)],
        clips=["voice_1s"],
        text_between=[2, 3, 4],
        exercises=["image_then_audio", "both_towers_in_one_prompt"],
    ),
]

# ----------------------------------------------------------------------------------------------
# Images of the vision cases (scikit-image's bundled sample photographs, and synthetic ones)
# ----------------------------------------------------------------------------------------------

# scikit-image's `skimage.data` ships these photographs; its documentation gives their terms:
# astronaut (NASA, public domain), coffee and chelsea (CC0), camera (CC0). They are downscaled
# so the committed files stay small; the resize to the budget then up-scales them.
PHOTOS = {"astronaut": 160, "coffee": 120, "chelsea": 96, "camera": 112}


def image_of(name: str) -> Image.Image:
    """The source image `name`: a downscaled photograph, or a synthetic image (seeded)."""
    if name in PHOTOS:
        array = getattr(skimage.data, name)()
        photo = Image.fromarray(array)
        side = PHOTOS[name]
        size = (side, round(side * photo.height / photo.width))
        return photo.resize(size, Image.Resampling.LANCZOS)
    if name == "gradient_rgba":
        # An RGBA image with varied alpha: HF composites it over white (convert_to_rgb).
        y, x = np.mgrid[0:90, 0:140]
        rgba = np.stack([x * 255 // 139, y * 255 // 89, (x + y) % 256, (x * 7 + y * 3) % 256], -1)
        return Image.fromarray(rgba.astype(np.uint8), "RGBA")
    raise AssertionError(f"unknown image {name}")


def preprocess(images: list[Image.Image], budget: int) -> dict[str, Any]:
    """Hugging Face's PIL image processor at `budget` soft tokens per image."""
    processor = Gemma4ImageProcessorPil(max_soft_tokens=budget)
    out = processor(images=images, return_tensors="pt")
    return {
        "pixel_values": out["pixel_values"],  # [N, 9B, 768]
        "image_position_ids": out["image_position_ids"],  # [N, 9B, 2], -1 = padding
        "soft_tokens": [int(n) for n in out["num_soft_tokens_per_image"]],
    }


# ----------------------------------------------------------------------------------------------
# Audio clips of the audio cases (synthesized, seeded: 16 kHz mono, 16-bit PCM WAV files)
# ----------------------------------------------------------------------------------------------

SAMPLE_RATE = 16_000


def clip_of(name: str) -> np.ndarray:
    """The int16 samples of clip `name`: a voiced, speech-like signal (harmonics of a gliding
    pitch under a syllabic envelope, plus a little noise) or a chirp."""
    rng = np.random.default_rng(sum(map(ord, name)))
    if name.startswith("voice"):
        seconds = {"voice_1s": 1.0, "voice_073s": 0.73, "voice_26s": 2.6}[name]
        t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
        pitch = 140 + 40 * np.sin(2 * np.pi * 1.7 * t)
        phase = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE
        voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
        envelope = 0.5 * (1 - np.cos(2 * np.pi * 4 * t)) * np.minimum(1, 10 * t)
        signal = 0.3 * envelope * voiced + 0.01 * rng.standard_normal(t.size)
    elif name == "chirp_05s":
        t = np.arange(int(0.5 * SAMPLE_RATE)) / SAMPLE_RATE
        signal = 0.4 * np.sin(2 * np.pi * (200 * t + 3000 * t * t))
    else:
        raise AssertionError(f"unknown clip {name}")
    return np.clip(np.round(signal * 32767), -32768, 32767).astype(np.int16)


def wav_bytes(samples: np.ndarray) -> bytes:
    """A 16 kHz mono 16-bit PCM WAV file of `samples` (written by hand: no timestamps)."""
    data = samples.astype("<i2").tobytes()
    header = b"RIFF" + (36 + len(data)).to_bytes(4, "little") + b"WAVE"
    header += b"fmt " + (16).to_bytes(4, "little") + (1).to_bytes(2, "little") + (1).to_bytes(2, "little")
    header += SAMPLE_RATE.to_bytes(4, "little") + (2 * SAMPLE_RATE).to_bytes(4, "little")
    header += (2).to_bytes(2, "little") + (16).to_bytes(2, "little")
    return header + b"data" + len(data).to_bytes(4, "little") + data


def extract_audio(names: list[str]) -> dict[str, Any]:
    """Hugging Face's feature extractor on the clips (as floats in [-1, 1): int16 / 32768)."""
    waves = [clip_of(n).astype(np.float32) / 32768.0 for n in names]
    out = Gemma4AudioFeatureExtractor()(waves, sampling_rate=SAMPLE_RATE, return_tensors="pt")
    mask = out["input_features_mask"].bool()
    # Soft tokens per clip: the frame mask halved twice ([::2] twice), as the tower does.
    tokens = [int(m[::2][::2].sum()) for m in mask]
    return {"input_features": out["input_features"], "input_features_mask": mask, "soft_tokens": tokens}


# ----------------------------------------------------------------------------------------------
# Small utilities: determinism, hashing, atomic writes, JSON
# ----------------------------------------------------------------------------------------------


def set_determinism() -> None:
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass
    torch.use_deterministic_algorithms(True)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    return sha256_bytes(path.read_bytes())


def json_text(obj: Any) -> str:
    """The one JSON format of every file this script writes: sorted keys, 2-space indent."""
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file in `path`'s directory, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------------------------
# Building and randomising a model
# ----------------------------------------------------------------------------------------------


def build_config(case: Case) -> Gemma4TextConfig | Gemma4Config:
    text = Gemma4TextConfig(**case.text)
    if case.layout == "causal_lm":
        return text
    vision = Gemma4VisionConfig(**case.vision) if case.vision is not None else None
    audio = Gemma4AudioConfig(**case.audio) if case.audio is not None else None
    return Gemma4Config(
        text_config=text, vision_config=vision, audio_config=audio, **(case.special_tokens or {})
    )


def model_class(case: Case) -> type[nn.Module]:
    return Gemma4ForCausalLM if case.layout == "causal_lm" else Gemma4ForConditionalGeneration


def text_model_of(model: nn.Module) -> hf.Gemma4TextModel:
    if isinstance(model, Gemma4ForCausalLM):
        return model.model
    return model.model.language_model


def _normal(shape: torch.Size, std: float, g: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=g, dtype=torch.float32) * std


def _uniform(shape: torch.Size, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=g, dtype=torch.float32)


def _fan_in_std(t: torch.Tensor) -> float:
    # weights are [out, in, ...]: fan_in is everything but the first axis
    return 1.0 / float(t[0].numel()) ** 0.5


def random_value(
    module: nn.Module,
    local: str,
    t: torch.Tensor,
    g: torch.Generator,
    embed_tokens: nn.Embedding,
    clip_bounds: tuple[float, float],
) -> torch.Tensor:
    """A random, non-neutral value for tensor `local` of `module` (contracts §3).

    `embed_tokens` is the text model's main (tied) embedding.
    """
    shape = t.shape
    if module is embed_tokens and local == "weight":
        # N(0, 1/D), so that the sqrt(D)-scaled embeddings are N(0, 1) like every other
        # activation. With N(0, 1) the token's own embedding dominates the residual stream,
        # the logits saturate the softcap (|z| ~ 29 of 30, where tanh compresses errors ~10x)
        # and greedy decoding repeats one token forever.
        return _normal(shape, 1.0 / module.embedding_dim**0.5, g)
    if isinstance(module, nn.Embedding) and local == "weight":
        return _normal(shape, 1.0, g)  # the PLE table (embed_tokens_per_layer)
    if isinstance(module, nn.Linear):
        if local == "weight":
            return _normal(shape, 1.0 / module.in_features**0.5, g)
        if local == "bias":
            return _normal(shape, 0.1, g)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and local == "weight":
        return _normal(shape, _fan_in_std(t), g)
    if isinstance(module, (hf.Gemma4RMSNorm, nn.LayerNorm)) and local == "weight":
        return 1.0 + 0.3 * _normal(shape, 1.0, g)
    if isinstance(module, hf.Gemma4TextDecoderLayer) and local == "layer_scalar":
        return _uniform(shape, 0.5, 1.5, g)
    if isinstance(module, hf.Gemma4TextRouter):
        if local == "scale":
            return 1.0 + 0.3 * _normal(shape, 1.0, g)
        if local == "per_expert_scale":
            return _uniform(shape, 0.5, 1.5, g)
    if isinstance(module, hf.Gemma4TextExperts) and local in ("gate_up_proj", "down_proj"):
        return _normal(shape, 1.0 / shape[-1] ** 0.5, g)  # [E, out, in]: fan_in = last axis
    if isinstance(module, hf.Gemma4ClippableLinear):
        lo, hi = clip_bounds
        if local in ("input_min", "output_min"):
            return -_uniform(shape, lo, hi, g)
        if local in ("input_max", "output_max"):
            return _uniform(shape, lo, hi, g)
    if isinstance(module, hf.Gemma4VisionModel):
        if local == "std_bias":
            return _normal(shape, 0.1, g)
        if local == "std_scale":
            return _uniform(shape, 0.5, 1.5, g)
    if isinstance(module, hf.Gemma4VisionPatchEmbedder) and local == "position_embedding_table":
        return _normal(shape, 1.0, g)
    if isinstance(module, hf.Gemma4AudioAttention) and local == "per_dim_scale":
        return _normal(shape, 0.3, g)
    raise AssertionError(f"no randomisation rule for {type(module).__name__}.{local} {tuple(shape)}")


@torch.no_grad()
def randomise(model: nn.Module, g: torch.Generator, clip_bounds: tuple[float, float] = (2.0, 4.0)) -> None:
    """Overwrite every parameter and persistent buffer with a random, non-neutral value."""
    modules = dict(model.named_modules())
    embed_tokens = text_model_of(model).embed_tokens
    persistent = set(model.state_dict().keys())
    tensors: list[tuple[str, torch.Tensor]] = list(model.named_parameters())
    tensors += [(n, b) for n, b in model.named_buffers() if n in persistent]
    done: set[int] = set()
    for name, t in tensors:
        if id(t) in done:
            continue
        owner, _, local = name.rpartition(".")
        t.copy_(random_value(modules[owner], local, t, g, embed_tokens, clip_bounds).to(t.dtype))
        done.add(id(t))
    # Every state_dict entry (parameters, persistent buffers, the tied lm_head) was visited.
    visited = {t.data_ptr() for _, t in tensors}
    for name, t in model.state_dict().items():
        assert t.data_ptr() in visited, f"state_dict entry {name} was not randomised"


def assert_not_neutral(model: nn.Module, where: str) -> None:
    for name, t in model.state_dict().items():
        f = t.detach().float()
        assert torch.isfinite(f).all(), f"{where}: {name} is not finite"
        assert not bool((f == 1).all()), f"{where}: {name} is all ones"
        assert not bool((f == 0).all()), f"{where}: {name} is all zeros"


# ----------------------------------------------------------------------------------------------
# Config spelling
# ----------------------------------------------------------------------------------------------


def to_released_spelling(text: dict[str, Any], layer_types_null: bool = False) -> dict[str, Any]:
    """Rewrite a serialised text config from the `per_layer_config` map to the released keys.

    transformers 5.23 serialises the full-layer overrides as `per_layer_config`
    ({"<zero-padded layer index>": {"head_dim": .., "num_key_value_heads": ..}}); the released
    Gemma 4 checkpoints carry `global_head_dim` and `num_global_key_value_heads` instead.
    """
    text = dict(text)
    overrides = text.pop("per_layer_config")
    full = [i for i, t in enumerate(text["layer_types"]) if t == FULL]
    assert overrides, "per_layer_config is empty (global_head_dim == head_dim?)"
    assert sorted(int(k) for k in overrides) == full, (overrides, full)
    head_dims = {v["head_dim"] for v in overrides.values()}
    kv_heads = {v.get("num_key_value_heads") for v in overrides.values()}
    assert len(head_dims) == 1 and len(kv_heads) == 1, overrides
    text["global_head_dim"] = head_dims.pop()
    text["num_global_key_value_heads"] = kv_heads.pop()
    if text.get("attention_k_eq_v"):
        assert text["num_global_key_value_heads"] is not None, "k_eq_v without a kv-head override"
    if layer_types_null:
        text["layer_types"] = None
    return text


def rewrite_config_json(case: Case, model_dir: Path) -> None:
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    if case.layout == "causal_lm":
        cfg = to_released_spelling(cfg, case.layer_types_null)
    else:
        cfg["text_config"] = to_released_spelling(cfg["text_config"], case.layer_types_null)
    path.write_text(json_text(cfg))


# ----------------------------------------------------------------------------------------------
# The activation recorder
# ----------------------------------------------------------------------------------------------


class Recorder:
    """Captures the dump tensors of one forward pass through hooks on the HF modules.

    Attention q/k/v come from a wrapper around `modeling_gemma4.eager_attention_forward`,
    which is what the eager attention interface resolves to; PLE comes from wrapping
    `Gemma4TextModel.project_per_layer_inputs` on the instance; everything else from
    forward hooks.
    """

    def __init__(self, model: nn.Module, images: dict[str, Any] | None = None, audio: dict[str, Any] | None = None):
        self.model = model
        self.images = images  # preprocess() output: the vision tensors are recorded per image
        self.audio = audio  # extract_audio() output: the audio tensors are recorded per clip
        self.text_model = text_model_of(model)
        self.tensors: dict[str, torch.Tensor] = {}
        self.active = False
        self.text_attention_calls = 0
        self.raw_logits: torch.Tensor | None = None
        self._handles: list[Any] = []
        self._original_attention = hf.eager_attention_forward

    # -- recording ---------------------------------------------------------------------------

    def put(self, name: str, t: torch.Tensor) -> None:
        assert name not in self.tensors, f"{name} recorded twice in one forward"
        t = t.detach()
        t = t.to(torch.int64) if not t.is_floating_point() else t.to(torch.float32)
        self.tensors[name] = t.contiguous().clone()

    def _attention(self, module, query, key, value, attention_mask, **kwargs):
        if self.active and isinstance(module, hf.Gemma4TextAttention):
            i = module.layer_idx
            self.text_attention_calls += 1
            # query [B, H, T, d]; key / value [B, K, S, d] (before repeat_kv)
            self.put(f"layers.{i}.attn.q", query[0].transpose(0, 1))
            if not module.is_kv_shared_layer:
                self.put(f"layers.{i}.attn.k", key[0].transpose(0, 1))
                self.put(f"layers.{i}.attn.v", value[0].transpose(0, 1))
        return self._original_attention(module, query, key, value, attention_mask, **kwargs)

    def _hook(self, name: str, pick):
        def hook(_module, _inputs, output):
            if self.active:
                self.put(name, pick(output))

        return hook

    # -- installation ------------------------------------------------------------------------

    def __enter__(self) -> "Recorder":
        tm = self.text_model
        hf.eager_attention_forward = self._attention
        # The attention modules look the interface up at call time; with "eager" (not a
        # registered key) the lookup falls back to the module global we just replaced.
        assert tm.config._attn_implementation == "eager"
        resolved = ALL_ATTENTION_FUNCTIONS.get_interface("eager", hf.eager_attention_forward)
        assert resolved == self._attention, "attention interface does not resolve to the recorder"

        original_project = tm.project_per_layer_inputs

        def project(*args, **kwargs):
            out = original_project(*args, **kwargs)
            if self.active:
                self.put("per_layer_inputs", out[0])
            return out

        if tm.hidden_size_per_layer_input:
            tm.project_per_layer_inputs = project

        first = lambda out: out[0]  # noqa: E731
        whole = lambda out: out  # noqa: E731
        hooks = [(tm.norm, "final_norm", first)]
        if self.images is None and self.audio is None:
            hooks.append((tm.embed_tokens, "embeddings", first))
        else:
            # The merged embeddings (soft tokens in place of the placeholders) are what the
            # language model receives as inputs_embeds.
            def merged(_module, _args, kwargs):
                if self.active:
                    self.put("embeddings", kwargs["inputs_embeds"][0])

            self._handles.append(tm.register_forward_pre_hook(merged, with_kwargs=True))
            if self.images is not None:
                self._install_vision_hooks()
            if self.audio is not None:
                self._install_audio_hooks()
        for i, layer in enumerate(tm.layers):
            hooks.append((layer, f"layers.{i}.output", first))
            hooks.append((layer.self_attn, f"layers.{i}.attn.output", lambda out: out[0][0]))
            hooks.append((layer.mlp, f"layers.{i}.mlp.output", first))
            if layer.enable_moe_block:
                hooks.append((layer.router, f"layers.{i}.router.top_k_index", lambda out: out[2]))
                hooks.append((layer.router, f"layers.{i}.router.top_k_weights", lambda out: out[1]))
                hooks.append((layer.experts, f"layers.{i}.moe.output", whole))
        for module, name, pick in hooks:
            self._handles.append(module.register_forward_hook(self._hook(name, pick)))

        def lm_head_hook(_module, _inputs, output):
            if self.active:
                self.raw_logits = output.detach().clone()

        self._handles.append(self.model.lm_head.register_forward_hook(lm_head_hook))
        return self

    def _install_vision_hooks(self) -> None:
        """Per image: the patch embeddings and every encoder layer's output (valid patches only,
        in the processor's row-major order) and the soft tokens after the projector."""
        inner = self.model.model
        positions = self.images["image_position_ids"]
        valid = (positions != -1).all(dim=-1)  # [N, 9B]
        count = valid.shape[0]
        prefix = lambda i: "vision." if count == 1 else f"vision.{i}."  # noqa: E731

        def per_image(name):
            def hook(_module, _inputs, output):
                if self.active:
                    for i in range(count):
                        self.put(prefix(i) + name, output[i][valid[i]])

            return hook

        tower = inner.vision_tower
        self._handles.append(tower.patch_embedder.register_forward_hook(per_image("patch_embeddings")))
        for i, layer in enumerate(tower.encoder.layers):
            self._handles.append(layer.register_forward_hook(per_image(f"layers.{i}.output")))

        def soft_tokens(_module, _inputs, output):
            if self.active:
                start = 0
                for i, n in enumerate(self.images["soft_tokens"]):
                    self.put(prefix(i) + "soft_tokens", output[start : start + n])
                    start += n
                assert start == output.shape[0], (start, output.shape)

        self._handles.append(inner.embed_vision.register_forward_hook(soft_tokens))

    def _install_audio_hooks(self) -> None:
        """Per clip: the valid log-mel frames, the subsampled frames, every conformer layer's
        output and the soft tokens after the projector (valid tokens only)."""
        inner = self.model.model
        frame_mask = self.audio["input_features_mask"]  # [N, T]
        count = frame_mask.shape[0]
        prefix = lambda i: "audio." if count == 1 else f"audio.{i}."  # noqa: E731
        token_mask = frame_mask[:, ::2][:, ::2]

        def features(_module, args, _output):
            if self.active:
                for i in range(count):
                    self.put(prefix(i) + "features", args[0][i][frame_mask[i]])

        def per_clip(name):
            def hook(_module, _inputs, output):
                if self.active:
                    hidden = output[0] if isinstance(output, tuple) else output
                    for i in range(count):
                        self.put(prefix(i) + name, hidden[i][token_mask[i]])

            return hook

        tower = inner.audio_tower
        self._handles.append(tower.subsample_conv_projection.register_forward_hook(features))
        self._handles.append(tower.subsample_conv_projection.register_forward_hook(per_clip("subsample")))
        for i, layer in enumerate(tower.layers):
            self._handles.append(layer.register_forward_hook(per_clip(f"layers.{i}.output")))
        self._handles.append(inner.embed_audio.register_forward_hook(per_clip("soft_tokens")))

    def __exit__(self, *exc) -> None:
        hf.eager_attention_forward = self._original_attention
        for h in self._handles:
            h.remove()
        self.text_model.__dict__.pop("project_per_layer_inputs", None)


# ----------------------------------------------------------------------------------------------
# Running a case
# ----------------------------------------------------------------------------------------------


def expected_names(text_cfg: Gemma4TextConfig) -> set[str]:
    names = {"input_ids", "embeddings", "final_norm", "logits", "decode_logits", "greedy_continuation"}
    if text_cfg.hidden_size_per_layer_input:
        names.add("per_layer_inputs")
    for i, mode in enumerate(text_cfg.kv_sharing_modes):
        names |= {f"layers.{i}.attn.q", f"layers.{i}.attn.output", f"layers.{i}.mlp.output", f"layers.{i}.output"}
        if mode != "reuse":
            names |= {f"layers.{i}.attn.k", f"layers.{i}.attn.v"}
        if text_cfg.enable_moe_block:
            names |= {f"layers.{i}.router.top_k_index", f"layers.{i}.router.top_k_weights", f"layers.{i}.moe.output"}
    return names


def expected_shape(name: str, text_cfg: Gemma4TextConfig, T: int) -> tuple[int, ...]:
    c = text_cfg
    D, L, P, V, H = c.hidden_size, c.num_hidden_layers, c.hidden_size_per_layer_input, c.vocab_size, c.num_attention_heads
    fixed = {
        "input_ids": (T,),
        "embeddings": (T, D),
        "per_layer_inputs": (T, L, P),
        "final_norm": (T, D),
        "logits": (T, V),
        "decode_logits": (DECODE_STEPS, V),
        "greedy_continuation": (DECODE_STEPS,),
    }
    if name in fixed:
        return fixed[name]
    _, i, *rest = name.split(".")
    layer = c.per_layer_config[int(i)]
    what = ".".join(rest)
    if what == "attn.q":
        return (T, H, layer.head_dim)
    if what in ("attn.k", "attn.v"):
        return (T, layer.num_key_value_heads, layer.head_dim)
    if what.startswith("router."):
        return (T, c.top_k_experts)
    return (T, D)


def media_inputs(
    case: Case, tokens: list[int], images: dict[str, Any] | None, audio: dict[str, Any] | None
) -> dict[str, torch.Tensor]:
    """The model inputs of a prompt's images and clips, as Hugging Face's processor gives them:
    the padded pixel values and positions, the padded log-mel features and their mask, and the
    token types (1 at image placeholders, 3 at audio ones), which switch on the bidirectional
    image blocks of "vision" models."""
    if images is None and audio is None:
        return {}
    st = case.special_tokens
    types = {st["image_token_id"]: 1, st["audio_token_id"]: 3}
    inputs = {"mm_token_type_ids": torch.tensor([[types.get(t, 0) for t in tokens]])}
    if images is not None:
        inputs["pixel_values"] = images["pixel_values"]
        inputs["image_position_ids"] = images["image_position_ids"]
    if audio is not None:
        inputs["input_features"] = audio["input_features"]
        inputs["input_features_mask"] = audio["input_features_mask"]
    return inputs


@torch.no_grad()
def assert_clip_bounds_clip(model: nn.Module, inputs: dict[str, Any], which: str) -> None:
    """Every kind of clamp of the tower's clipped linears changes some value: a port that
    ignores the bounds (or clamps one side only) cannot match the dump."""
    tower = model.model.vision_tower if which == "vision" else model.model.audio_tower
    if not tower.config.use_clipped_linears:
        return
    counts = {"input": 0, "output": 0}
    handles = []
    for module in tower.modules():
        if isinstance(module, hf.Gemma4ClippableLinear):
            def before(m, args):
                x = args[0]
                counts["input"] += int(((x < m.input_min) | (x > m.input_max)).sum())

            def after(inner, _args, y, m=module):
                counts["output"] += int(((y < m.output_min) | (y > m.output_max)).sum())

            handles.append(module.register_forward_pre_hook(before))
            handles.append(module.linear.register_forward_hook(after))
    try:
        model(**inputs, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    assert counts["input"] > 0 and counts["output"] > 0, f"clip bounds never clip: {counts}"


@torch.no_grad()
def run_case(
    case: Case,
    model: nn.Module,
    tokens: list[int],
    images: dict[str, Any] | None = None,
    audio: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """The dump of contracts.md §2 for `tokens` (and the prompt's images and clips), plus N
    greedy decode steps."""
    text_cfg = text_model_of(model).config
    ids = torch.tensor([tokens], dtype=torch.long)
    T = len(tokens)
    extra = media_inputs(case, tokens, images, audio)
    if images is not None or audio is not None:
        assert_clip_bounds_clip(model, {"input_ids": ids, **extra}, "vision" if images else "audio")

    # Prefill dump: one full forward, no cache.
    plain = model(input_ids=ids, use_cache=False, **extra).logits[0]
    with Recorder(model, images, audio) as rec:
        rec.active = True
        out = model(input_ids=ids, use_cache=False, **extra)
        rec.active = False
    assert rec.text_attention_calls == text_cfg.num_hidden_layers, rec.text_attention_calls
    dump = dict(rec.tensors)
    dump["input_ids"] = ids[0].clone()
    dump["logits"] = out.logits[0].detach().float().clone()

    # The hooked run computes exactly what the plain run computes, and the logits are the
    # soft-capped lm_head output.
    assert torch.equal(out.logits[0], plain), "hooks changed the logits"
    capped = torch.tanh(rec.raw_logits / SOFTCAP) * SOFTCAP
    assert torch.equal(capped[0], out.logits[0]), "logits are not the soft-capped lm_head output"

    # Greedy decoding as Hugging Face generate(output_logits=True) records it (the decode
    # convention, README.md): one logits row per generated token, row 0 = the prefill's last.
    res = model.generate(
        ids,
        **extra,
        max_new_tokens=DECODE_STEPS,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        eos_token_id=None,
        pad_token_id=0,
    )
    rows = [row[0].float() for row in res.logits]
    generated = res.sequences[0, T:].tolist()
    assert len(rows) == DECODE_STEPS and len(generated) == DECODE_STEPS, (len(rows), generated)
    assert generated == [int(torch.argmax(row)) for row in rows], "generate's tokens are not the argmax of its rows"
    dump["decode_logits"] = torch.stack(rows).contiguous()
    dump["greedy_continuation"] = torch.tensor(generated, dtype=torch.int64)

    # Cross-check with an explicit loop through the KV cache: prefill with a fresh cache (it must
    # match the uncached forward), then feed each chosen token; its rows must be generate's.
    cache = DynamicCache(config=text_cfg)
    prefill = model(input_ids=ids, past_key_values=cache, use_cache=True, **extra).logits[0]
    tol = 1e-5 if case.dtype == "float32" else 5e-2
    assert torch.allclose(prefill.float(), out.logits[0].float(), atol=tol, rtol=0), "cached prefill differs"
    loop_rows = [prefill[-1].float()]
    for s in range(1, DECODE_STEPS):
        step = model(input_ids=torch.tensor([[generated[s - 1]]]), past_key_values=cache, use_cache=True)
        loop_rows.append(step.logits[0, -1].float())
    assert cache.get_seq_length() == T + DECODE_STEPS - 1
    loop = torch.stack(loop_rows)
    gap = float((loop - dump["decode_logits"]).abs().max())
    msg = f"{case.name}: the cache loop's rows differ from generate's by {gap}"
    if case.dtype == "float32":
        assert gap <= tol, msg
    elif gap > tol:
        print(f"  note: {msg}", file=sys.stderr)
    loop_tokens = [int(torch.argmax(row)) for row in loop_rows]
    assert loop_tokens == generated or case.dtype != "float32", (loop_tokens, generated)
    # Every greedy choice must be clear, or an engine within tolerance could pick another token.
    top2 = dump["decode_logits"].topk(2, dim=-1).values
    margin = float((top2[:, 0] - top2[:, 1]).min())
    # float32: 10x the conformance tolerance on logits; bfloat16: 8 ulps at |z| in [2, 4).
    required = 1e-3 if case.dtype == "float32" else 0.125
    assert margin >= required, f"{case.name}: greedy margin {margin} < {required}; pick another seed"

    check_dump(case, model, dump, T, images, audio)
    return dump


def vision_shapes(model: nn.Module, images: dict[str, Any] | None) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the vision tensors of a dump (contracts §2), valid patches only."""
    if images is None:
        return {}
    vision = model.config.vision_config
    valid = (images["image_position_ids"] != -1).all(dim=-1)
    count = valid.shape[0]
    shapes = {}
    for i in range(count):
        prefix = "vision." if count == 1 else f"vision.{i}."
        n = int(valid[i].sum())
        shapes[prefix + "patch_embeddings"] = (n, vision.hidden_size)
        for layer in range(vision.num_hidden_layers):
            shapes[prefix + f"layers.{layer}.output"] = (n, vision.hidden_size)
        shapes[prefix + "soft_tokens"] = (images["soft_tokens"][i], model.config.text_config.hidden_size)
    return shapes


def audio_shapes(model: nn.Module, audio: dict[str, Any] | None) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the audio tensors of a dump (contracts §2), valid frames only."""
    if audio is None:
        return {}
    config = model.config.audio_config
    mask = audio["input_features_mask"]
    count = mask.shape[0]
    shapes = {}
    for i in range(count):
        prefix = "audio." if count == 1 else f"audio.{i}."
        n = audio["soft_tokens"][i]
        shapes[prefix + "features"] = (int(mask[i].sum()), 128)
        shapes[prefix + "subsample"] = (n, config.hidden_size)
        for layer in range(config.num_hidden_layers):
            shapes[prefix + f"layers.{layer}.output"] = (n, config.hidden_size)
        shapes[prefix + "soft_tokens"] = (n, model.config.text_config.hidden_size)
    return shapes


def check_dump(
    case: Case,
    model: nn.Module,
    dump: dict[str, torch.Tensor],
    T: int,
    images: dict[str, Any] | None,
    audio: dict[str, Any] | None,
) -> None:
    tm = text_model_of(model)
    cfg = tm.config
    vision = vision_shapes(model, images) | audio_shapes(model, audio)
    names = expected_names(cfg) | set(vision)
    assert set(dump) == names, f"missing {sorted(names - set(dump))}, extra {sorted(set(dump) - names)}"
    for name, t in dump.items():
        want = vision.get(name) or expected_shape(name, cfg, T)
        assert tuple(t.shape) == want, (name, tuple(t.shape), want)
        if t.is_floating_point():
            assert t.dtype == torch.float32 and torch.isfinite(t).all(), f"{name} is not finite F32"
        else:
            assert t.dtype == torch.int64, name
    # K = V layers: keys are RoPE(values ⊙ k_norm.weight) (loosely: HF computes them separately).
    positions = torch.arange(T)[None]
    for i, layer in enumerate(tm.layers):
        attn = layer.self_attn
        if not attn.use_alternative_attention or attn.is_kv_shared_layer:
            continue
        v = dump[f"layers.{i}.attn.v"][None]  # [1, T, K, d]
        cos, sin = tm.rotary_emb(v, positions, cfg.layer_types[i])
        k = hf.apply_rotary_pos_emb(v * attn.k_norm.weight.float(), cos, sin, unsqueeze_dim=2)[0]
        err = (k - dump[f"layers.{i}.attn.k"]).abs().max().item()
        assert err < 1e-4, f"layer {i}: attn.k != RoPE(attn.v * k_norm) (max err {err})"
    # Router weights and indices: k distinct experts per token.
    for i in range(cfg.num_hidden_layers):
        idx = dump.get(f"layers.{i}.router.top_k_index")
        if idx is not None:
            assert all(len(set(row.tolist())) == cfg.top_k_experts for row in idx), i


@torch.no_grad()
def smoke_test_towers(model: nn.Module, g: torch.Generator) -> None:
    """Run the vision and audio towers once, so their configs are proven consistent."""
    if not isinstance(model, Gemma4ForConditionalGeneration):
        return
    inner = model.model
    if inner.vision_tower is not None:
        side = 6  # a 6x6 patch grid pools (3x3) to 4 soft tokens
        xy = torch.tensor([[x, y] for y in range(side) for x in range(side)], dtype=torch.long)[None]
        pixels = torch.rand((1, side * side, 3 * 16 * 16), generator=g).to(model.dtype)
        out = inner.get_image_features(pixels, xy, return_dict=True).pooler_output
        soft = torch.cat(out)
        assert soft.shape == (4, model.config.text_config.hidden_size), soft.shape
        assert torch.isfinite(soft.float()).all()
    if inner.audio_tower is not None:
        frames = 40
        features = torch.randn((1, frames, 128), generator=g).to(model.dtype)
        mask = torch.ones((1, frames), dtype=torch.bool)
        out = inner.get_audio_features(features, mask, return_dict=True)
        assert out.pooler_output.shape[-1] == model.config.text_config.hidden_size
        assert torch.isfinite(out.pooler_output.float()).all()


def load_model(case: Case, model_dir: Path) -> nn.Module:
    model = model_class(case).from_pretrained(
        model_dir,
        dtype=case.torch_dtype,
        attn_implementation="eager",
        experts_implementation="eager",
    )
    # Tensors loaded from safetensors sit at whatever alignment the file layout gives them,
    # and CPU matmul kernels round differently for differently aligned operands (measured:
    # up to 9e-6 on the MoE case's logits). Copy every tensor into fresh (aligned) memory so
    # the dump does not depend on the file's header length.
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
        for module in model.modules():
            for name, b in list(module._buffers.items()):
                if b is not None:
                    module._buffers[name] = b.clone()
    return model.eval()


def generate_case(case: Case, out_dir: Path) -> dict[str, str]:
    """Build, save, reload and run one case; returns {path relative to out_dir: sha256}."""
    print(f"case {case.name}", file=sys.stderr)
    torch.manual_seed(case.seed)
    g = torch.Generator().manual_seed(case.seed)
    images = audio = None
    if case.images:
        sources = [image_of(name) for name, _ in case.images]
        budgets = {budget for _, budget in case.images}
        assert len(budgets) == 1, "one budget per prompt (the processor pads every image alike)"
        images = preprocess(sources, budgets.pop())
    if case.clips:
        audio = extract_audio(case.clips)
    if images is not None or audio is not None:
        tokens = media_prompt(
            case, g, images["soft_tokens"] if images else [], audio["soft_tokens"] if audio else []
        )
    else:
        tokens = torch.randint(1, VOCAB, (case.prompt_len,), generator=g).tolist()
    for position, token_name in (case.placeholders or {}).items():
        tokens[position] = case.special_tokens[token_name]
    owner = next(c for c in CASES if c.name == case.model_of) if case.model_of else case
    window = owner.text["sliding_window"]
    assert len(tokens) > 2 * window, "the prompt must cross the sliding window twice"
    case_dir = out_dir / case.name
    case_dir.mkdir(parents=True, exist_ok=True)
    kept = {
        "model",
        "expected.safetensors",
        "case.json",
        "images",
        "pixel_values.safetensors",
        "audio",
        "audio_features.safetensors",
    }
    for stale in sorted(set(os.listdir(case_dir)) - kept):
        path = case_dir / stale
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if case.model_of is not None:
        # This prompt runs on another case's checkpoint (written before it).
        if (case_dir / "model").exists():
            shutil.rmtree(case_dir / "model")
        reloaded = load_model(case, out_dir / case.model_of / "model")
        dump = run_case(case, reloaded, tokens, images, audio)
        return write_case(case, case_dir, out_dir, tokens, dump, images, audio, f"../{case.model_of}/model")

    config = build_config(case)
    auto = AutoModelForCausalLM if case.layout == "causal_lm" else AutoModelForImageTextToText
    model = auto.from_config(config, attn_implementation="eager", experts_implementation="eager")
    assert isinstance(model, model_class(case)), type(model)
    randomise(model, g, case.clip_bounds)
    model = model.to(case.torch_storage_dtype).eval()
    assert_not_neutral(model, case.name)

    staging = Path(tempfile.mkdtemp(dir=case_dir, prefix=".staging-"))
    try:
        as_saved = staging / "hf"  # exactly what save_pretrained writes
        kwargs = {"max_shard_size": case.max_shard_size} if case.sharded else {}
        model.save_pretrained(as_saved, **kwargs)
        shards = sorted(p.name for p in as_saved.glob("*.safetensors"))
        if case.sharded:
            assert (as_saved / "model.safetensors.index.json").exists()
            assert len(shards) >= case.min_shards, shards
        else:
            assert shards == ["model.safetensors"], shards

        # The checkpoint on disk is the fixture: reload it and prove it holds the model.
        reloaded = load_model(case, as_saved)
        ours, theirs = model.state_dict(), reloaded.state_dict()
        assert ours.keys() == theirs.keys()
        for name in ours:
            # A bf16 checkpoint loaded in float32 holds the same values, widened.
            assert torch.equal(ours[name].to(theirs[name].dtype), theirs[name]), f"{name} changed through save/load"
        assert_not_neutral(reloaded, f"{case.name} (reloaded)")
        probe = torch.tensor([tokens])
        with torch.no_grad():
            reference_logits = reloaded(input_ids=probe, use_cache=False).logits
            if case.storage_dtype == case.dtype == "float32":
                # (In bfloat16 the in-memory model differs: `.to(bfloat16)` also cast the
                # RoPE inv_freq buffers, which from_pretrained keeps in float32. A bf16
                # checkpoint loaded in float32 computes in another dtype than it was built in.)
                built = model(input_ids=probe, use_cache=False).logits
                assert torch.equal(built, reference_logits), "save/load changed the logits"

        saved = as_saved
        if case.config_spelling == "released":
            # Rewrite config.json to the released spelling; the rewritten checkpoint must
            # load to the same weights and give bit-identical logits.
            saved = staging / "released"
            shutil.copytree(as_saved, saved)
            rewrite_config_json(case, saved)
            rewritten = load_model(case, saved)
            for name, t in rewritten.state_dict().items():
                assert torch.equal(t, theirs[name]), f"{name} differs after the config rewrite"
            with torch.no_grad():
                logits = rewritten(input_ids=probe, use_cache=False).logits
            assert torch.equal(logits, reference_logits), "the released spelling changed the logits"
            rewritten_cfg, reference_cfg = text_model_of(rewritten).config, text_model_of(reloaded).config
            assert rewritten_cfg.layer_types == reference_cfg.layer_types
            assert rewritten_cfg.kv_sharing_modes == reference_cfg.kv_sharing_modes
            for i in range(reference_cfg.num_hidden_layers):
                a, b = rewritten_cfg.per_layer_config[i], reference_cfg.per_layer_config[i]
                assert (a.head_dim, a.num_key_value_heads) == (b.head_dim, b.num_key_value_heads), i
            reloaded = rewritten
        if case.layer_types_null:
            layer_types = text_model_of(reloaded).config.layer_types
            assert layer_types[-1] == FULL and layer_types[-2] == FULL, layer_types

        dump = run_case(case, reloaded, tokens, images, audio)
        smoke_test_towers(reloaded, g)

        # Write the case: model files, the dump, the case description.
        model_out = case_dir / "model"
        model_out.mkdir(exist_ok=True)
        new_files = sorted(p.name for p in saved.iterdir())
        for stale in sorted(set(os.listdir(model_out)) - set(new_files)):
            os.unlink(model_out / stale)
        for name in new_files:
            atomic_write(model_out / name, (saved / name).read_bytes())
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    return write_case(case, case_dir, out_dir, tokens, dump, images, audio, None)


def media_prompt(
    case: Case, g: torch.Generator, image_tokens: list[int], audio_tokens: list[int]
) -> list[int]:
    """Text tokens around the media: `text_between[i]` random ids before medium i (and after the
    last); each image as BOI, its soft-token placeholders, EOI, then each clip as BOA, its
    placeholders, EOA (the processor's expansion)."""
    st = case.special_tokens
    runs = [(st["boi_token_id"], st["image_token_id"], st["eoi_token_id"], n) for n in image_tokens]
    runs += [(st["boa_token_id"], st["audio_token_id"], st["eoa_token_index"], n) for n in audio_tokens]
    assert len(case.text_between) == len(runs) + 1
    lowest_special = min(st.values())
    text = lambda n: torch.randint(1, lowest_special, (n,), generator=g).tolist()  # noqa: E731
    tokens: list[int] = []
    for between, (begin, placeholder, end, n) in zip(case.text_between, runs):
        tokens += text(between)
        tokens += [begin] + [placeholder] * n + [end]
    return tokens + text(case.text_between[-1])


def write_case(
    case: Case,
    case_dir: Path,
    out_dir: Path,
    tokens: list[int],
    dump: dict[str, torch.Tensor],
    images: dict[str, Any] | None,
    audio: dict[str, Any] | None,
    model_dir: str | None,
) -> dict[str, str]:
    """Writes the dump, the images and their pixel values, and case.json; returns
    {path relative to out_dir: sha256} of every file of the case."""
    # One metadata key only: safetensors serialises the metadata map in hash order.
    metadata = {"format": "pt"}
    atomic_write(case_dir / "expected.safetensors", safetensors.torch.save(dump, metadata=metadata))
    image_entries = []
    if images is not None:
        (case_dir / "images").mkdir(exist_ok=True)
        positions = images["image_position_ids"]
        count = positions.shape[0]
        pixel_values = {}
        for i, (name, budget) in enumerate(case.images):
            # PNG keeps the pixels exact; no optimisation and no metadata keep it deterministic.
            buffer = io.BytesIO()
            image_of(name).save(buffer, format="PNG", optimize=False)
            atomic_write(case_dir / "images" / f"{name}.png", buffer.getvalue())
            valid = (positions[i] != -1).all(dim=-1)
            suffix = "" if count == 1 else f".{i}"
            pixel_values["pixel_values" + suffix] = images["pixel_values"][i][valid].float().contiguous()
            pixel_values["image_position_ids" + suffix] = positions[i][valid].to(torch.int64).contiguous()
            grid = positions[i][valid].max(dim=0).values + 1  # (x, y) extents of the patch grid
            image_entries.append(
                {
                    "file": f"images/{name}.png",
                    "budget": budget,
                    "soft_tokens": images["soft_tokens"][i],
                    "resized": [int(grid[1]) * 16, int(grid[0]) * 16],
                }
            )
        atomic_write(
            case_dir / "pixel_values.safetensors",
            safetensors.torch.save(pixel_values, metadata=metadata),
        )
    description = {
        "name": case.name,
        "family": case.family,
        "layout": case.layout,
        "config_spelling": case.config_spelling,
        "dtype": case.dtype,
        "checkpoint_dtype": case.storage_dtype,
        "sharded": case.sharded,
        "tokens": tokens,
        "decode_steps": DECODE_STEPS,
        "seed": case.seed,
        "exercises": case.exercises,
    }
    if images is not None:
        description["images"] = image_entries
        description["pixel_values"] = "pixel_values.safetensors"
    if audio is not None:
        (case_dir / "audio").mkdir(exist_ok=True)
        description["audio"] = []
        count = len(case.clips)
        features = {}
        for i, (name, n) in enumerate(zip(case.clips, audio["soft_tokens"])):
            atomic_write(case_dir / "audio" / f"{name}.wav", wav_bytes(clip_of(name)))
            description["audio"].append({"file": f"audio/{name}.wav", "soft_tokens": n})
            valid = audio["input_features_mask"][i]
            suffix = "" if count == 1 else f".{i}"
            features["input_features" + suffix] = audio["input_features"][i][valid].float().contiguous()
        atomic_write(
            case_dir / "audio_features.safetensors",
            safetensors.torch.save(features, metadata=metadata),
        )
        description["audio_features"] = "audio_features.safetensors"
    if model_dir is not None:
        description["model_dir"] = model_dir
    atomic_write(case_dir / "case.json", json_text(description).encode())

    files = {}
    for path in sorted(case_dir.rglob("*")):
        if path.is_file():
            rel = path.relative_to(out_dir).as_posix()
            files[rel] = sha256_file(path)
    return files


def oracle_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "safetensors", "numpy"):
        versions[dist] = importlib.metadata.version(dist)
    return versions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=GOLDEN_DIR, help="output directory (default: golden/)")
    args = parser.parse_args()
    out_dir: Path = args.out.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    set_determinism()

    cases = []
    for case in CASES:
        files = generate_case(case, out_dir)
        cases.append({"name": case.name, "seed": case.seed, "files": files})

    manifest = {
        "generator": "golden/generate.py",
        "generator_sha256": sha256_file(Path(__file__).resolve()),
        "requirements_sha256": sha256_file(GOLDEN_DIR / "requirements.txt"),
        "oracle": oracle_versions(),
        "cases": cases,
    }
    atomic_write(out_dir / "manifest.json", json_text(manifest).encode())
    print(f"wrote {len(cases)} cases and manifest.json to {out_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
