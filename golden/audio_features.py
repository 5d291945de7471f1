#!/usr/bin/env python3
"""Oracle for Gemma 4's audio front end (shared spec: multimodal §2.1, §2.6).

Synthesizes a few short WAV files, decodes them as soundfile/librosa would (integers divided
by 2^(bits-1): int16 / 32768; 8-bit unsigned minus 128, over 128; float32 as stored), runs
Hugging Face's `Gemma4AudioFeatureExtractor` (transformers 5.23.0, numpy 2.4.6) on each valid
one, one clip per call, and writes what the Rust reference
(`gemma4_reference::audio::{wav, features}`) is compared with:

    <out>/wav/<name>.wav              the clips, written by hand (no timestamps, no metadata)
    <out>/wav/bad_<what>.wav          files the reader must refuse: stereo, 44.1 kHz, truncated
                                      data chunk, no samples
    <out>/features.safetensors        per valid clip `<name>.input_features` (float32 [F, 128],
                                      the valid frames only) and `<name>.input_features_mask`
                                      (bool [T], every frame of the padded clip); for clips in
                                      HEAD_TAIL_ONLY instead `<name>.input_features_head` and
                                      `<name>.input_features_tail` (the first and last 4 valid
                                      rows) and `<name>.input_features_strided` (every
                                      STRIDE-th valid row, from row 0); `hf.mel_filters`
                                      (float64 [257, 128]) and
                                      `hf.window` (float32 [320]) as the extractor holds them
    <out>/manifest.json               per clip: encoding, samples, the sha256 of the decoded
                                      float32 waveform (little-endian) and of the valid features
                                      (float32 little-endian), valid and total frames, soft
                                      tokens; per bad file what is wrong with it; versions

Soft tokens are counted twice with HF's own code, and the script asserts they agree:
`Gemma4Processor.replace_audio_token` (the frame mask halved twice with `[::2]`) and
`Gemma4Processor._compute_audio_num_tokens` (the closed formula, capped at 750).

The script also asserts what the Rust side relies on: every invalid frame is zero, valid frames
form a prefix, and a clip's valid frames are identical whether it is extracted alone or padded
in a batch with longer clips.

The output is deterministic: running the script twice gives byte-identical files. Run it with
the oracle virtualenv (golden/requirements.txt):

    python golden/audio_features.py golden/audio_front_end

(`cargo xtask golden` runs it so, with the environment of golden/generate.py.) `wav/` is
emptied first: it holds this script's output only.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import safetensors.numpy  # noqa: E402
from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor  # noqa: E402
from transformers.models.gemma4.processing_gemma4 import Gemma4Processor  # noqa: E402

SAMPLE_RATE = 16_000
# Clips whose features are too large to store whole (2999 x 128 float32 is 1.5 MB): only the
# first and last HEAD_TAIL_ROWS valid rows are kept, the rest is pinned by a sha256.
HEAD_TAIL_ONLY = ("voice_31s",)
HEAD_TAIL_ROWS = 4
# ... and every STRIDE-th row (0, 50, 100, ...): the middle of the clip, at 2% of the size.
STRIDE = 50

# name: (kind, seconds, encoding). Encodings: pcm8 (unsigned), pcm16, pcm24, pcm32 (signed
# integers; pcm32 is written as WAVE_FORMAT_EXTENSIBLE), float32 (IEEE float).
CLIPS = {
    "voice_1s": ("voice", 1.0, "pcm16"),
    "voice_05s": ("voice", 0.5, "float32"),
    "voice_073s": ("voice", 0.73, "pcm24"),
    "chirp_1s": ("chirp", 1.0, "pcm16"),
    "chirp_02s": ("chirp", 0.2, "pcm32"),
    "voice_025s": ("voice", 0.25, "pcm8"),
    "silence_05s": ("silence", 0.5, "pcm16"),
    "voice_31s": ("voice", 31.0, "pcm16"),
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------------
# Signals and their encodings
# ----------------------------------------------------------------------------------------------


def signal_of(name: str, kind: str, seconds: float) -> np.ndarray:
    """The float64 signal of a clip, in [-1, 1), seeded by its name."""
    rng = np.random.default_rng(sum(map(ord, name)) * 7919)
    t = np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    if kind == "voice":
        # A voiced, speech-like signal: harmonics of a gliding pitch under a syllabic envelope,
        # plus a little noise.
        pitch = 140 + 40 * np.sin(2 * np.pi * 1.7 * t)
        phase = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE
        voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
        envelope = 0.5 * (1 - np.cos(2 * np.pi * 4 * t)) * np.minimum(1, 10 * t)
        signal = 0.3 * envelope * voiced + 0.01 * rng.standard_normal(t.size)
    elif kind == "chirp":
        # A linear sweep from 200 Hz upwards (to 6.2 kHz after 1 s).
        signal = 0.4 * np.sin(2 * np.pi * (200 * t + 3000 * t * t))
    elif kind == "silence":
        signal = np.zeros(t.size)
    else:
        raise AssertionError(f"unknown kind {kind}")
    return np.clip(signal, -1.0, 1.0 - 2.0**-23)


def encode(signal: np.ndarray, encoding: str) -> tuple[bytes, np.ndarray]:
    """The data chunk bytes of `signal` in `encoding`, and the float32 waveform they decode to
    (as soundfile/librosa decode them)."""
    if encoding == "float32":
        samples = signal.astype("<f4")
        return samples.tobytes(), samples.astype(np.float32)
    bits = {"pcm8": 8, "pcm16": 16, "pcm24": 24, "pcm32": 32}[encoding]
    full = 2.0 ** (bits - 1)
    ints = np.clip(np.round(signal * full), -full, full - 1).astype(np.int64)
    decoded = (ints.astype(np.float64) / full).astype(np.float32)
    if bits == 8:
        data = (ints + 128).astype(np.uint8).tobytes()
    elif bits == 24:
        le = ints.astype("<i4").view(np.uint8).reshape(-1, 4)
        data = le[:, :3].tobytes()
    else:
        data = ints.astype(f"<i{bits // 8}").tobytes()
    return data, decoded


def wav_file(data: bytes, encoding: str, channels: int = 1, rate: int = SAMPLE_RATE, data_len: int | None = None) -> bytes:
    """A WAV file around a data chunk. `data_len` overrides the declared data length (to make a
    truncated file)."""
    bits = 32 if encoding == "float32" else {"pcm8": 8, "pcm16": 16, "pcm24": 24, "pcm32": 32}[encoding]
    block = channels * bits // 8
    fmt_common = (
        channels.to_bytes(2, "little")
        + rate.to_bytes(4, "little")
        + (rate * block).to_bytes(4, "little")
        + block.to_bytes(2, "little")
        + bits.to_bytes(2, "little")
    )
    chunks = b""
    if encoding == "pcm32":
        # WAVE_FORMAT_EXTENSIBLE with the PCM sub-format GUID.
        guid = bytes.fromhex("0100000000001000800000aa00389b71")
        ext = (22).to_bytes(2, "little") + bits.to_bytes(2, "little") + (4).to_bytes(4, "little") + guid
        fmt = (0xFFFE).to_bytes(2, "little") + fmt_common + ext
    elif encoding == "float32":
        fmt = (3).to_bytes(2, "little") + fmt_common + (0).to_bytes(2, "little")
        frames = len(data) // block
        chunks += b"fact" + (4).to_bytes(4, "little") + frames.to_bytes(4, "little")
    else:
        fmt = (1).to_bytes(2, "little") + fmt_common
    chunks = b"fmt " + len(fmt).to_bytes(4, "little") + fmt + chunks
    declared = len(data) if data_len is None else data_len
    chunks += b"data" + declared.to_bytes(4, "little") + data
    if len(data) % 2:
        chunks += b"\x00"  # RIFF chunks are word-aligned
    return b"RIFF" + (4 + len(chunks)).to_bytes(4, "little") + b"WAVE" + chunks


def bad_files() -> dict[str, tuple[bytes, str]]:
    """Files the reader must refuse, with what is wrong with each."""
    voice = signal_of("bad", "voice", 0.1)
    mono16, _ = encode(voice, "pcm16")
    stereo = np.stack([voice, -voice], axis=1).reshape(-1)
    stereo16, _ = encode(stereo, "pcm16")
    return {
        "bad_stereo": (wav_file(stereo16, "pcm16", channels=2), "2 channels"),
        "bad_44k": (wav_file(mono16, "pcm16", rate=44_100), "44100 Hz"),
        "bad_truncated": (wav_file(mono16, "pcm16", data_len=len(mono16) + 1000), "data chunk shorter than declared"),
        "bad_empty": (wav_file(b"", "pcm16"), "no samples"),
    }


# ----------------------------------------------------------------------------------------------
# Hugging Face
# ----------------------------------------------------------------------------------------------


def soft_tokens(extractor: Gemma4AudioFeatureExtractor, mask: np.ndarray, num_samples: int) -> int:
    """Soft tokens by HF's two routes (asserted equal)."""
    processor = SimpleNamespace(
        feature_extractor=extractor, audio_seq_length=750, boa_token="<boa>", eoa_token="<eoa>", audio_token="A"
    )
    text = Gemma4Processor.replace_audio_token(processor, {"input_features_mask": [mask]}, 0)
    from_mask = text.count("A")
    from_formula = Gemma4Processor._compute_audio_num_tokens(processor, np.zeros(num_samples), SAMPLE_RATE)
    assert from_mask == from_formula, (from_mask, from_formula)
    return from_formula


def write_fixtures(out_dir: Path) -> dict:
    out_dir = Path(out_dir)
    (out_dir / "wav").mkdir(parents=True, exist_ok=True)
    for stale in sorted((out_dir / "wav").iterdir()):  # everything in it is rewritten below
        stale.unlink()
    extractor = Gemma4AudioFeatureExtractor()
    tensors: dict[str, np.ndarray] = {
        "hf.mel_filters": np.ascontiguousarray(extractor.mel_filters),
        "hf.window": np.ascontiguousarray(extractor.window),
    }
    assert extractor.mel_filters.dtype == np.float64 and extractor.window.dtype == np.float32
    clips = {}
    waves = {}
    for name, (kind, seconds, encoding) in CLIPS.items():
        data, wave = encode(signal_of(name, kind, seconds), encoding)
        (out_dir / "wav" / f"{name}.wav").write_bytes(wav_file(data, encoding))
        waves[name] = wave
        # A list (a batch of one), as the processor passes it: HF 5.23 mis-shapes a bare 1-D array.
        out = extractor([wave], sampling_rate=SAMPLE_RATE, return_tensors="np")
        features = out["input_features"][0]  # [T, 128] float32
        mask = out["input_features_mask"][0]  # [T] bool
        assert features.dtype == np.float32 and mask.dtype == np.bool_
        valid = int(mask.sum())
        assert mask[:valid].all() and not mask[valid:].any(), "valid frames are a prefix"
        assert not features[valid:].any(), "invalid frames are zeroed"
        valid_features = np.ascontiguousarray(features[:valid])
        if name in HEAD_TAIL_ONLY:
            tensors[f"{name}.input_features_head"] = np.ascontiguousarray(valid_features[:HEAD_TAIL_ROWS])
            tensors[f"{name}.input_features_tail"] = np.ascontiguousarray(valid_features[-HEAD_TAIL_ROWS:])
            tensors[f"{name}.input_features_strided"] = np.ascontiguousarray(valid_features[::STRIDE])
        else:
            tensors[f"{name}.input_features"] = valid_features
        tensors[f"{name}.input_features_mask"] = np.ascontiguousarray(mask)
        clips[name] = {
            "kind": kind,
            "encoding": encoding,
            "samples": int(wave.size),
            "samples_after_truncation": min(int(wave.size), 480_000),
            "waveform_sha256": sha256(wave.astype("<f4").tobytes()),
            "valid_frames": valid,
            "total_frames": int(mask.size),
            "features_sha256": sha256(valid_features.astype("<f4").tobytes()),
            "soft_tokens": soft_tokens(extractor, mask, int(wave.size)),
            "stored": "head_tail" if name in HEAD_TAIL_ONLY else "full",
        }

    # A clip's valid frames do not depend on the batch it is padded in.
    short = [n for n in CLIPS if n not in HEAD_TAIL_ONLY]
    batch = extractor([waves[n] for n in short], sampling_rate=SAMPLE_RATE, return_tensors="np")
    for i, name in enumerate(short):
        valid = clips[name]["valid_frames"]
        alone = tensors[f"{name}.input_features"]
        assert np.array_equal(batch["input_features"][i][:valid], alone), f"{name}: batched differs"
        assert int(batch["input_features_mask"][i].sum()) == valid

    bad = {}
    for name, (data, what) in bad_files().items():
        (out_dir / "wav" / f"{name}.wav").write_bytes(data)
        bad[name] = what

    safetensors.numpy.save_file(tensors, str(out_dir / "features.safetensors"))
    manifest = {
        "clips": clips,
        "bad_files": bad,
        "head_tail_rows": HEAD_TAIL_ROWS,
        "stride": STRIDE,
        "sample_rate": SAMPLE_RATE,
        "versions": {p: importlib.metadata.version(p) for p in ("transformers", "numpy", "safetensors")},
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="directory to write the fixtures into")
    args = parser.parse_args()
    manifest = write_fixtures(args.out_dir)
    for name, clip in manifest["clips"].items():
        print(
            f"{name:12} {clip['encoding']:8} {clip['samples']:7} samples  "
            f"{clip['valid_frames']:5}/{clip['total_frames']:5} frames  {clip['soft_tokens']:4} soft tokens",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
