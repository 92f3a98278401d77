"""Data-free TIES on SmolLM2-135M with three fine-tunes: wandamerge against mergekit 0.1.5, one run.

The three "fine-tunes" here are the base plus seeded Gaussian changes (1% of each
tensor's standard deviation): fine for measuring speed, memory and agreement
(the deltas have no ties at the density cut-off), not a statement about
merge quality. Each tool runs as its own process; wall time and peak RSS are
those of that process tree. The floor is a process that reads every input
tensor and writes an output of the same size.

    python benchmarks/merge_vs_mergekit.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BIN = Path(sys.executable).parent

MEASURE = """
import resource, subprocess, sys, time
t = time.perf_counter()
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
wall = time.perf_counter() - t
if code.returncode:
    sys.stderr.write(code.stderr[-3000:])
    sys.exit(code.returncode)
print(wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""

FLOOR = """
import sys
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import save_file
inputs, out = [Path(p) for p in sys.argv[1:-1]], Path(sys.argv[-1])
out.mkdir(parents=True, exist_ok=True)
handles = [safe_open(p / "model.safetensors", "pt") for p in inputs]
result = {}
for name in handles[0].keys():
    tensors = [h.get_tensor(name) for h in handles]
    result[name] = tensors[0].clone()
save_file(result, str(out / "model.safetensors"))
"""


def make_finetunes(base: Path, work: Path, count: int = 3) -> list[Path]:
    import torch
    from safetensors.torch import load_file, save_file

    paths = []
    state = None
    for i in range(1, count + 1):
        path = work / f"finetune-{i}"
        paths.append(path)
        if (path / "model.safetensors").is_file():
            continue
        state = state or load_file(base / "model.safetensors")
        g = torch.Generator().manual_seed(1000 + i)
        changed = {name: t + torch.randn(t.shape, generator=g) * (0.01 * t.float().std().item() + 1e-8)
                   for name, t in state.items()}
        path.mkdir(parents=True, exist_ok=True)
        save_file(changed, str(path / "model.safetensors"), metadata={"format": "pt"})
        for file in base.iterdir():
            if file.suffix == ".json" or file.name.startswith("tokenizer"):
                shutil.copy2(file, path / file.name)
    return paths


def measure(cmd: list[str]) -> tuple[float, int]:
    done = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{cmd[0]} failed:\n{done.stderr[-3000:]}")
    wall, rss = done.stdout.split()
    return float(wall), int(rss)


def explain_differences(ours: Path, theirs: Path, base: Path, finetunes: list[Path], density: float) -> dict:
    """Which output tensors differ, and whether every one has tied |delta| at a fine-tune's density cut-off."""
    from safetensors import safe_open

    def read(path, name):
        for file in sorted(path.glob("*.safetensors")):
            with safe_open(file, "pt") as h:
                if name in h.keys():
                    return h.get_tensor(name)
        raise KeyError(name)

    with safe_open(base / "model.safetensors", "pt") as h:
        names = list(h.keys())
    differing, explained = [], 0
    for name in names:
        a, b = read(ours, name), read(theirs, name)
        if torch.equal(a, b):
            continue
        differing.append({"tensor": name, "entries": int((a != b).sum()), "max_abs": float((a - b).abs().max())})
        base_t = read(base, name)
        tied = False
        for ft in finetunes:
            d = (read(ft, name) - base_t).abs().flatten()
            k = max(1, int(density * d.numel()))
            cut = d.topk(k).values[-1]
            tied |= int((d == cut).sum()) > 1
        explained += tied
    return {"tensors": len(names), "differing": differing, "differing_with_ties_at_cutoff": explained}


def max_abs_diff(a: Path, b: Path) -> float:
    from safetensors import safe_open

    def files(p):
        return sorted(p.glob("*.safetensors"))

    ours = {}
    for f in files(a):
        with safe_open(f, "pt") as h:
            ours.update({k: f for k in h.keys()})
    worst = 0.0
    for f in files(b):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                with safe_open(ours[k], "pt") as o:
                    worst = max(worst, (o.get_tensor(k).float() - h.get_tensor(k).float()).abs().max().item())
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=os.path.expanduser("~/.cache/wandamerge/bench/merge"))
    parser.add_argument("--density", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--mergekit", default=str(BIN / "mergekit-yaml"), help="mergekit-yaml executable")
    args = parser.parse_args()

    from wandamerge.models import prepare_smollm2

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base = Path(prepare_smollm2())
    finetunes = make_finetunes(base, work)
    recipe = {"merge_method": "ties", "base_model": str(base), "dtype": "float32",
              "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": args.density}} for p in finetunes]}
    recipe_path = work / "ties.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))

    runs = {"wandamerge": [], "mergekit": [], "floor": []}
    for _ in range(args.repeats):
        for tool in runs:
            out = work / f"out-{tool}"
            shutil.rmtree(out, ignore_errors=True)
            if tool == "wandamerge":
                cmd = [str(BIN / "wandamerge"), "-q", "merge", str(recipe_path), "-o", str(out)]
            elif tool == "mergekit":
                cmd = [args.mergekit, str(recipe_path), str(out)]
            else:
                cmd = [sys.executable, "-c", FLOOR, str(base), *map(str, finetunes), str(out)]
            wall, rss = measure(cmd)
            runs[tool].append({"wall_s": wall, "peak_rss_bytes": rss})
            print(f"{tool}: {wall:.1f} s, {rss / 1e9:.2f} GB", flush=True)

    diff = max_abs_diff(work / "out-wandamerge", work / "out-mergekit")
    ties = explain_differences(work / "out-wandamerge", work / "out-mergekit", base, finetunes, args.density)
    import mergekit  # noqa: F401  (version record)
    from importlib.metadata import version

    best = {tool: min(r["wall_s"] for r in rs) for tool, rs in runs.items()}
    peak = {tool: max(r["peak_rss_bytes"] for r in rs) for tool, rs in runs.items()}
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
            "commit": subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True).stdout.strip(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "versions": {"mergekit": version("mergekit"), "wandamerge": version("wandamerge"),
                         "torch": version("torch"), "transformers": version("transformers")},
            "command": "python benchmarks/merge_vs_mergekit.py " + " ".join(sys.argv[1:]), "recipe": recipe}
    result = {"meta": meta, "runs": runs, "max_abs_diff": diff, "best_wall_s": best, "peak_rss_bytes": peak,
              "differences": ties}
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / "merge_vs_mergekit.json").write_text(json.dumps(result, indent=2))
    lines = [f"# TIES (density {args.density}) on SmolLM2-135M + 3 fine-tunes: wandamerge vs mergekit "
             f"({meta['date']}, commit {meta['commit']})", "",
             f"- command: `{meta['command']}`", f"- machine: {meta['machine']}",
             f"- versions: {meta['versions']}",
             "- fine-tunes: the base plus seeded Gaussian changes (1% of each tensor's std), fp32 safetensors",
             f"- runs per tool: {args.repeats}; wall = best run, peak RSS = largest run, each tool its own process",
             "", "| tool | wall s | peak RSS GB | wall vs mergekit | memory vs mergekit |", "|---|---|---|---|---|"]
    for tool in runs:
        lines.append(f"| {tool} | {best[tool]:.1f} | {peak[tool] / 1e9:.2f} | {best[tool] / best['mergekit']:.2f} | "
                     f"{peak[tool] / peak['mergekit']:.2f} |")
    entries = sum(d["entries"] for d in ties["differing"])
    lines += ["", f"Largest absolute difference between wandamerge's and mergekit's output tensors: {diff:.3g}. "
              f"{len(ties['differing'])} of {ties['tensors']} tensors differ, in {entries} entries in all; "
              f"{ties['differing_with_ties_at_cutoff']} of those tensors have equal |delta| values at a fine-tune's "
              f"density cut-off (float32 rounding of base + noise puts deltas on a grid), where mergekit's argsort "
              f"keeps an arbitrary one and wandamerge the lowest index. Every other tensor is bit-identical.",
              "", "floor = one process that reads every input tensor and writes an output of the same size.", ""]
    (results / "merge_vs_mergekit.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
