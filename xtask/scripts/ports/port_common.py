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

The torch-free part (the case, the arguments, the `UNSUPPORTED:` exit, the plan's KV producers)
lives in `port_base` and is re-exported here; a driver whose port runs without torch (the JAX
port, in its own virtualenv) imports `port_base` and writes its dump with `safetensors.numpy`.
"""

import os
from contextlib import contextmanager

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

# The torch-free part (re-exported: the PyTorch drivers import everything from here).
from port_base import (  # noqa: E402,F401
    UNSUPPORTED,
    Case,
    arguments,
    plan_producers,
    unsupported,
)


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
