"""How far apart two saved models are: entries that differ, tensors that differ, and each one's perplexity.

    python benchmarks/compare_outputs.py --pair NAME DIR_A DIR_B [--pair ...] [--ppl-windows 32] --out FILE.json

Used to size a change that is not bit-identical on purpose (the tie rule made one):
for each pair, the count of entries whose bits differ, over how many tensors,
and the perplexity of both on the held-out Wikipedia windows (``wiki``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from wandamerge.io.record import portable, provenance


def load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for shard in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


def differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    """Entries whose bits differ (and zeros moved), per tensor and in all."""
    per_tensor, total, entries = {}, 0, 0
    for name in sorted(a):
        x, y = a[name].contiguous(), b[name].contiguous()
        entries += x.numel()
        changed = int((x.view(torch.uint8).reshape(x.numel(), -1) != y.view(torch.uint8).reshape(y.numel(), -1))
                      .any(dim=1).sum()) if x.is_floating_point() else int((x != y).sum())
        if changed:
            per_tensor[name] = {"entries": changed, "zeros_a": int((x == 0).sum()), "zeros_b": int((y == 0).sum())}
            total += changed
    return {"entries": total, "of": entries, "tensors": len(per_tensor), "per_tensor": per_tensor}


def perplexity_of(directory: Path, windows: int) -> float:
    from wandamerge.jobs.evaluate import EvalConfig, PerplexitySettings, evaluate

    config = EvalConfig(perplexity=PerplexitySettings(data="wiki", windows=windows, seqlen=512))
    return evaluate(str(directory), None, config, progress=False)["perplexity"]["value"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", nargs=3, action="append", required=True, metavar=("NAME", "DIR_A", "DIR_B"))
    parser.add_argument("--ppl-windows", type=int, default=32, help="held-out windows of 512 tokens (0: none)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    started = provenance(sys.argv)
    rows = {}
    for name, dir_a, dir_b in args.pair:
        row = differing(load_tensors(Path(dir_a)), load_tensors(Path(dir_b)))
        if args.ppl_windows:
            row["perplexity"] = [perplexity_of(Path(d), args.ppl_windows) for d in (dir_a, dir_b)]
        rows[name] = row
        print(name, {k: v for k, v in row.items() if k != "per_tensor"}, flush=True)
    Path(args.out).write_text(json.dumps(portable({**started, "pairs": rows}), indent=2) + "\n")


if __name__ == "__main__":
    main()
