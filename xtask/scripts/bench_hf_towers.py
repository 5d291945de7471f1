"""Hugging Face transformers on the tower workloads of `cargo xtask bench` (run by it).

One image through the vision tower and its projector (`get_image_features`), or one WAV clip
through the feature extractor, the audio tower and its projector (`get_audio_features`), on a
`Gemma4ForConditionalGeneration` checkpoint made by `cargo xtask synth --towers`: the same work
the Rust engines time (an image's pixels to soft tokens in the text width; a clip's waveform to
soft tokens, the log-mel front end included). Image preprocessing (decode, resize, patches) is
not timed, as it is not for the Rust engines. torch CPU, `--threads` intra-op threads, weights
and compute in `--dtype` (float32 or bfloat16). A warm-up pass runs first; the median of
`--runs` passes is reported. Prints one JSON line.

Usage: python bench_hf_towers.py --model DIR (--image FILE --budget B | --audio FILE.wav)
       [--threads 2] [--runs 3] [--dtype float32]
"""

import argparse
import json
import os
import resource
import time
import wave

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import Gemma4ForConditionalGeneration  # noqa: E402
from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor  # noqa: E402
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil  # noqa: E402


def read_wav(path):
    """A 16 kHz mono 16-bit PCM WAV file as floats in [-1, 1) (int16 / 32768), as our reader."""
    with wave.open(path, "rb") as f:
        if f.getframerate() != 16_000 or f.getnchannels() != 1 or f.getsampwidth() != 2:
            raise SystemExit(f"{path}: expected 16 kHz mono 16-bit PCM")
        samples = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2")
    return samples.astype(np.float32) / 32768.0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--image")
    parser.add_argument("--budget", type=int, default=280)
    parser.add_argument("--audio")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    if (args.image is None) == (args.audio is None):
        raise SystemExit("give exactly one of --image and --audio")

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    dtype = getattr(torch, args.dtype)
    started = time.perf_counter()
    model = Gemma4ForConditionalGeneration.from_pretrained(args.model, dtype=dtype)
    model.eval()
    load_s = time.perf_counter() - started

    if args.image is not None:
        processor = Gemma4ImageProcessorPil(max_soft_tokens=args.budget)
        inputs = processor(images=[Image.open(args.image)], return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(dtype)
        positions = inputs["image_position_ids"]
        soft_tokens = int(inputs["num_soft_tokens_per_image"][0])

        def work():
            out = model.model.get_image_features(pixel_values, positions)
            return out.pooler_output[0].shape[0]
    else:
        waveform = read_wav(args.audio)
        extractor = Gemma4AudioFeatureExtractor()
        soft_tokens = None

        def work():
            features = extractor([waveform], sampling_rate=16_000, return_tensors="pt")
            out = model.model.get_audio_features(
                features["input_features"].to(dtype), features["input_features_mask"].bool()
            )
            # Soft tokens of the clip: the valid rows of the tower's output mask.
            return int(out.attention_mask.sum())

    with torch.inference_mode():
        produced = work()  # warm-up
        times = []
        for _ in range(max(1, args.runs)):
            t0 = time.perf_counter()
            work()
            times.append(time.perf_counter() - t0)
    seconds = sorted(times)[len(times) // 2]
    print(json.dumps({
        "engine": "hf-transformers",
        "torch": torch.__version__,
        "dtype": args.dtype,
        "threads": args.threads,
        "load_s": load_s,
        "seconds": seconds,
        "runs_s": times,
        "soft_tokens": soft_tokens if soft_tokens is not None else produced,
        "soft_tokens_produced": produced,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }))


if __name__ == "__main__":
    main()
