"""Hugging Face transformers on the `cargo xtask bench` workload (run by `cargo xtask bench`).

torch CPU, bf16 weights and compute, `--threads` intra-op threads, the same checkpoint directory
(`Gemma4ForCausalLM`, made by `cargo xtask synth`), the same prompt length and decode steps as
the Rust engines: prefill passes with `logits_to_keep=1` (only the last position's logits, so
KV-shared layers also run on that position only; the median of `--prefill-runs` is reported),
then greedy single-token steps through the `DynamicCache`. A warm-up pass (the prompt + one
step) runs first. Prints one JSON line.

Usage: python bench_hf.py --model DIR [--threads 2] [--prompt 128] [--decode 32] [--prefill-runs 3]
"""

import argparse
import json
import resource
import time

import torch
from transformers import AutoModelForCausalLM


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--prefill-runs", type=int, default=3)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
    model.eval()
    load_s = time.perf_counter() - started
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(2026)
    ids = torch.randint(3, vocab, (1, args.prompt), generator=generator)

    with torch.inference_mode():
        # Warm-up: the same prefill and one step.
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)

        prefill_times = []
        for _ in range(max(1, args.prefill_runs)):
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            prefill_times.append(time.perf_counter() - t0)
        prefill_s = sorted(prefill_times)[len(prefill_times) // 2]
        cache = out.past_key_values
        next_token = out.logits[:, -1:].argmax(-1)
        t1 = time.perf_counter()
        for _ in range(args.decode):
            out = model(input_ids=next_token, past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
            next_token = out.logits[:, -1:].argmax(-1)
        decode_s = time.perf_counter() - t1

    print(json.dumps({
        "engine": "hf-transformers",
        "torch": torch.__version__,
        "threads": args.threads,
        "load_s": load_s,
        "prompt": args.prompt,
        "decode": args.decode,
        "prefill_s": prefill_s,
        "prefill_runs_s": prefill_times,
        "decode_s": decode_s,
        "prefill_tok_s": args.prompt / prefill_s,
        "decode_tok_s": args.decode / decode_s,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }))


if __name__ == "__main__":
    main()
