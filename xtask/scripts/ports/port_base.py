"""The torch-free half of what the port drivers of `cargo xtask ports` share: reading a golden
case and its layer plan, the `UNSUPPORTED:` exit, and the layer plan's KV producers.
`port_common` re-exports all of it for the PyTorch drivers; a driver running in a virtualenv
without torch (the JAX port) imports this module directly.
"""

import argparse
import json
import sys
from pathlib import Path

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


def plan_producers(plan: dict) -> list[int]:
    """The KV producer of every layer in the case's layer plan (a layer computing its own K/V is
    its own producer): what a port's KV-sharing rule must reproduce to run the case."""
    return [
        layer["index"] if "Own" in layer["kv_source"] else layer["kv_source"]["SharedFrom"]["producer"]
        for layer in plan["plan"]["layers"]
    ]
