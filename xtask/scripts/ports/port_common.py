"""What every port driver of `cargo xtask ports` shares: reading a golden case, the greedy
decode rows in the contract's convention, and writing the activation dump (shared contracts §2).

A driver is run by `cargo xtask ports` as

    python DRIVER.py --case golden/<case> --plan PLAN.json --out DUMP.safetensors

with the port's pinned package on PYTHONPATH (installed outside the repository) and the oracle
virtualenv's torch. PLAN.json is `gemma4 inspect --model <the case's model> --json`: the
normalised config and the derived layer plan, which a driver may use to translate the
checkpoint's config.json into the port's own configuration (never to compute anything the port
computes). A driver that cannot run the port on a case exits with status 3 and a line
`UNSUPPORTED: <why>` on stderr (an unsupported layout, a load error): the table reports it as
such.
"""

import argparse
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

UNSUPPORTED = 3


class Case:
    """A golden case: its token ids, decode steps and checkpoint directory."""

    def __init__(self, case_dir: str):
        self.dir = Path(case_dir)
        meta = json.loads((self.dir / "case.json").read_text())
        self.name = meta["name"]
        self.tokens = [int(t) for t in meta["tokens"]]
        self.decode_steps = int(meta.get("decode_steps", 0))
        self.model_dir = (self.dir / meta.get("model_dir", "model")).resolve()
        self.meta = meta


def arguments():
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", required=True)
    parser.add_argument("--plan", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    plan = json.loads(Path(args.plan).read_text())
    return Case(args.case), plan, args.out


def unsupported(reason: str):
    """Ends the driver: the port cannot run this case (reported, not judged). The reason is one
    line on stderr after `UNSUPPORTED: ` (the port's own multi-line errors joined)."""
    print("UNSUPPORTED: " + " ".join(reason.split()), file=sys.stderr)
    sys.exit(UNSUPPORTED)


class Recorder:
    """Tensors by contract name, float ones as float32, without a batch axis."""

    def __init__(self):
        self.tensors = {}

    def put(self, name: str, tensor: torch.Tensor):
        if name in self.tensors:
            raise AssertionError(f"{name} recorded twice in one forward")
        t = tensor.detach()
        t = t.float() if t.is_floating_point() else t.long()
        self.tensors[name] = t.contiguous().clone()


def plan_producers(plan: dict) -> list[int]:
    """The KV producer of every layer in the case's layer plan (a layer computing its own K/V is
    its own producer): what a port's KV-sharing rule must reproduce to run the case."""
    return [
        layer["index"] if "Own" in layer["kv_source"] else layer["kv_source"]["SharedFrom"]["producer"]
        for layer in plan["plan"]["layers"]
    ]


@contextmanager
def recording(recorder: Recorder, methods, final_norm, layers, layer_output):
    """Records one forward of a port without changing its code: each `(object, attribute,
    name)` of `methods` is wrapped so that its result's first batch row is recorded as `name`
    (a `None` result is not), and forward hooks record `final_norm` and `layers.{i}.output`
    (`layer_output` picks the hidden states `[B, T, D]` out of a layer's output). Everything is
    put back on leaving the block."""
    originals = [(owner, attribute, getattr(owner, attribute)) for owner, attribute, _ in methods]
    for (owner, attribute, original), (_, _, name) in zip(originals, methods):
        def recorded(*args, original=original, name=name, **kwargs):
            result = original(*args, **kwargs)
            if result is not None:
                recorder.put(name, result[0])
            return result

        setattr(owner, attribute, recorded)
    handles = [final_norm.register_forward_hook(lambda m, a, o: recorder.put("final_norm", o[0]))]
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(
            lambda m, a, o, i=i: recorder.put(f"layers.{i}.output", layer_output(o)[0])))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for owner, attribute, original in originals:
            setattr(owner, attribute, original)


def greedy_decode_rows(prefill_last_row: torch.Tensor, steps: int, step):
    """The decode rows in the `generate` convention (contracts §2): row 0 is the prefill's last
    logits row; row s is the logits of the single-token step that fed token s − 1 through the
    port's cache. `step(token) -> logits row [V]` advances the port's cache by one token."""
    rows, tokens = [], []
    row = prefill_last_row
    for s in range(steps):
        rows.append(row.detach().float().clone())
        token = int(torch.argmax(row))
        tokens.append(token)
        if s + 1 < steps:
            row = step(token)
    return rows, tokens


def save_dump(recorder: Recorder, case: Case, decode_rows, decode_tokens, out: str):
    tensors = dict(recorder.tensors)
    tensors["input_ids"] = torch.tensor(case.tokens, dtype=torch.int64)
    if decode_rows:
        tensors["decode_logits"] = torch.stack(decode_rows).contiguous()
        tensors["greedy_continuation"] = torch.tensor(decode_tokens, dtype=torch.int64)
    save_file(tensors, out)
