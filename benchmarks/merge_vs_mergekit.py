"""The data-free merge methods on SmolLM2-135M with three fine-tunes: wandamerge against mergekit 0.1.5, one run.

Every method both tools have (task arithmetic, TIES, DARE-TIES, DARE-linear,
breadcrumbs, breadcrumbs-TIES, DELLA, DELLA-linear) runs from the same
mergekit YAML in both tools, one after the other, in the same run. mergekit
runs from its own virtual environment under the benchmark cache (created from
PyPI if missing). The three "fine-tunes" are the base plus seeded Gaussian
changes (1% of each tensor's standard deviation): fine for measuring speed,
memory and agreement, not a statement about merge quality. Each tool runs as
its own process; wall time and peak RSS are those of that process tree. The
floor is a process that reads every input tensor and writes an output of the
same size.

Deterministic methods should agree to float32 rounding (up to ties at a
density cut-off, counted and explained). DARE and DELLA drop at random, and
the two tools draw from different generators, so their outputs differ by
design; for them the table compares how many entries each keeps and how far
apart the merged deltas are relative to their size.

    python benchmarks/merge_vs_mergekit.py [--repeats 1] [--only ties]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
PROGRAMS = HERE / "programs"
BIN = Path(sys.executable).parent
MERGEKIT_REQUIREMENT = "mergekit==0.1.5"

# method -> extra per-model parameters (besides weight 1 and the density); the same YAML goes to both tools
METHODS: dict[str, dict] = {
    "task_arithmetic": {},
    "ties": {},
    "dare_ties": {},
    "dare_linear": {},
    "breadcrumbs": {"gamma": 0.01},
    "breadcrumbs_ties": {"gamma": 0.01},
    "della": {"epsilon": 0.1},
    "della_linear": {"epsilon": 0.1},
}
STOCHASTIC = {"dare_ties", "dare_linear", "della", "della_linear"}


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
    done = subprocess.run([sys.executable, str(PROGRAMS / "measure.py"), *cmd], capture_output=True, text=True)
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


def tensor_files(path: Path) -> dict[str, Path]:
    """Each tensor's name in a saved model, and the safetensors file that holds it."""
    from safetensors import safe_open

    found = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as h:
            found.update({k: file for k in h.keys()})
    return found


def compare_outputs(ours: Path, theirs: Path, base: Path | None) -> dict:
    """Max |ours - theirs|, differing tensors and entries; with a ``base`` (every output tensor in it), the
    kept entries and the relative distance of the deltas too. Names in one output only are listed."""
    from safetensors import safe_open

    ours_at, theirs_at = tensor_files(ours), tensor_files(theirs)
    base_at = tensor_files(base) if base is not None else None
    worst, tensors, entries, kept_ours, kept_theirs, total, dist2, norm2 = 0.0, 0, 0, 0, 0, 0, 0.0, 0.0
    for name, file in theirs_at.items():
        if name not in ours_at:
            continue
        with safe_open(ours_at[name], "pt") as o, safe_open(file, "pt") as t:
            a, c = o.get_tensor(name).float(), t.get_tensor(name).float()
        if not torch.equal(a, c):
            tensors += 1
            entries += int((a != c).sum()) if a.shape == c.shape else max(a.numel(), c.numel())
            worst = max(worst, (a - c).abs().max().item() if a.shape == c.shape else float("inf"))
        if base_at is None:
            continue
        with safe_open(base_at[name], "pt") as b:
            base_t = b.get_tensor(name).float()
        da, dc = a - base_t, c - base_t
        kept_ours += int((da != 0).sum())
        kept_theirs += int((dc != 0).sum())
        total += da.numel()
        dist2 += float((da - dc).pow(2).sum())
        norm2 += float(dc.pow(2).sum())
    result = {"max_abs_diff": worst, "differing_tensors": tensors, "tensors": len(theirs_at),
              "differing_entries": entries}
    if base_at is not None:
        result.update({"kept_fraction_wandamerge": kept_ours / total, "kept_fraction_mergekit": kept_theirs / total,
                       "relative_delta_distance": (dist2 / norm2) ** 0.5 if norm2 else 0.0})
    if ours_at.keys() != theirs_at.keys():
        result["only_in_wandamerge"] = sorted(ours_at.keys() - theirs_at.keys())
        result["only_in_mergekit"] = sorted(theirs_at.keys() - ours_at.keys())
    return result


def mergekit_executable(work: Path) -> Path:
    """mergekit-yaml from its own virtual environment under the benchmark cache, built from PyPI when missing."""
    venv = work.parent / "mergekit-venv"
    exe = venv / "bin" / "mergekit-yaml"
    if not exe.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)  # the CPU wheel; unpinned pulls a CUDA build
        subprocess.run([*pip, MERGEKIT_REQUIREMENT], check=True)
    return exe


def venv_versions(python: Path, packages: list[str]) -> dict:
    """The versions of ``packages`` in the venv of ``python`` (which need not have wandamerge)."""
    done = subprocess.run([str(python), str(HERE / "peers" / "package_versions.py"), *packages], capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout)


def mergekit_side(mergekit: Path) -> dict:
    """The mergekit executable and the versions of mergekit, torch and transformers beside it."""
    return {"executable": str(mergekit),
            **venv_versions(mergekit.parent / "python", ["mergekit", "torch", "transformers"])}


def run_both(recipe_path: Path, work: Path, mergekit: Path, repeats: int, label: str) -> tuple[dict, dict]:
    """Run one recipe through ``wandamerge merge`` and ``mergekit-yaml``, one after the other, ``repeats``
    times, each its own measured process writing ``work/out-<tool>``: ({tool: [{wall_s, peak_rss_bytes}]},
    {tool: error}); a failure ends that repeat."""
    runs = {"wandamerge": [], "mergekit": []}
    failures = {}
    for _ in range(repeats):
        for tool in runs:
            out = work / f"out-{tool}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = ([str(BIN / "wandamerge"), "-q", "merge", str(recipe_path), "-o", str(out)] if tool == "wandamerge"
                   else [str(mergekit), str(recipe_path), str(out)])
            try:
                wall, rss = measure(cmd)
            except RuntimeError as err:  # a peer failure is recorded exactly as it happened
                failures[tool] = str(err)
                print(f"{label} {tool}: FAILED\n{err}", flush=True)
                break
            runs[tool].append({"wall_s": wall, "peak_rss_bytes": rss})
            print(f"{label} {tool}: {wall:.1f} s, {rss / 1e9:.2f} GB", flush=True)
    return runs, failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=os.path.expanduser("~/.cache/wandamerge/bench/merge"))
    parser.add_argument("--density", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--only", action="append", choices=list(METHODS), help="these methods only (repeatable)")
    parser.add_argument("--mergekit", default=None,
                        help="mergekit-yaml executable [default: its own venv under the benchmark cache]")
    args = parser.parse_args()

    from wandamerge.models import prepare_smollm2

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base = Path(prepare_smollm2())
    finetunes = make_finetunes(base, work)
    mergekit = Path(args.mergekit) if args.mergekit else mergekit_executable(work)
    methods = args.only or list(METHODS)

    floor_runs = []
    for _ in range(args.repeats):
        out = work / "out-floor"
        shutil.rmtree(out, ignore_errors=True)
        wall, rss = measure([sys.executable, str(PROGRAMS / "merge_floor.py"), str(base), *map(str, finetunes),
                             str(out)])
        floor_runs.append({"wall_s": wall, "peak_rss_bytes": rss})
    print(f"floor: {min(r['wall_s'] for r in floor_runs):.1f} s", flush=True)

    rows = {}
    for method in methods:
        recipe = {"merge_method": method, "base_model": str(base), "dtype": "float32",
                  "models": [{"model": str(p), "parameters": {"weight": 1.0, **(
                      {} if method == "task_arithmetic" else {"density": args.density}), **METHODS[method]}}
                             for p in finetunes]}
        if method.startswith("della"):
            recipe["parameters"] = {"lambda": 1.0}
        recipe_path = work / f"{method}.yaml"
        recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        runs, failures = run_both(recipe_path, work, mergekit, args.repeats, method)
        row = {"recipe": recipe, "runs": runs, "failures": failures, "stochastic": method in STOCHASTIC}
        if not failures:
            row["comparison"] = compare_outputs(work / "out-wandamerge", work / "out-mergekit", base)
            if method == "ties":
                row["ties_explained"] = explain_differences(work / "out-wandamerge", work / "out-mergekit", base,
                                                            finetunes, args.density)
        rows[method] = row

    from wandamerge.io.record import portable as shown
    from wandamerge.io.record import provenance, versions

    meta = {**provenance([__file__, *sys.argv[1:]]), "versions": versions(),
            "mergekit": mergekit_side(mergekit),
            "density": args.density, "repeats": args.repeats}
    result = shown({"meta": meta, "floor": floor_runs, "methods": rows})  # the recipes' paths too
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / "merge_vs_mergekit.json").write_text(json.dumps(result, indent=2))
    (results / "merge_vs_mergekit.md").write_text(markdown(result))
    print(markdown(result))


def cost_cells(runs: dict) -> str:
    """Table cells: wandamerge s | mergekit s | wall ratio | wandamerge GB | mergekit GB | memory ratio (the
    best wall of each tool's runs, the largest peak RSS)."""
    ours, theirs = runs["wandamerge"], runs["mergekit"]
    w_o, w_t = min(r["wall_s"] for r in ours), min(r["wall_s"] for r in theirs)
    m_o, m_t = max(r["peak_rss_bytes"] for r in ours), max(r["peak_rss_bytes"] for r in theirs)
    return f"{w_o:.1f} | {w_t:.1f} | {w_o / w_t:.2f} | {m_o / 1e9:.2f} | {m_t / 1e9:.2f} | {m_o / m_t:.2f}"


def failure_note(name: str, failures: dict) -> list[str]:
    """Markdown lines: which tool failed on ``name``, and its error as it came."""
    return [f"- **{name}** failed in {', '.join(failures)}:", "", "```",
            *[f"{tool}: {err.strip()}" for tool, err in failures.items()], "```"]


def markdown(result: dict) -> str:
    meta, floor = result["meta"], result["floor"]
    floor_wall = min(r["wall_s"] for r in floor)
    floor_rss = max(r["peak_rss_bytes"] for r in floor)
    mk = meta["mergekit"]
    lines = [f"# Data-free merges (density {meta['density']}) on SmolLM2-135M + 3 fine-tunes: wandamerge vs mergekit "
             f"({meta['date']}, commit {meta['commit']})", "",
             f"- command: `{meta['command']}`", f"- machine: {meta['machine']}",
             f"- wandamerge side: {meta['versions']}",
             f"- mergekit side (own venv, `{mk['executable']}`): mergekit {mk['mergekit']}, torch {mk['torch']}, "
             f"transformers {mk['transformers']}",
             "- fine-tunes: the base plus seeded Gaussian changes (1% of each tensor's std), fp32 safetensors; "
             "every model has weight 1; breadcrumbs gamma 0.01; DELLA epsilon 0.1, lambda 1",
             f"- runs per tool and method: {meta['repeats']}; wall = best run, peak RSS = largest run, each tool its "
             f"own process, one after the other",
             f"- floor (read every input tensor, write an output of the same size): {floor_wall:.1f} s, "
             f"{floor_rss / 1e9:.2f} GB", "",
             "| method | wandamerge s | mergekit s | wall ratio | wandamerge GB | mergekit GB | memory ratio | "
             "max abs diff | differing tensors | kept (ours / mergekit) | relative delta distance |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for method, row in result["methods"].items():
        if row["failures"]:
            lines.append(f"| {method} | failed in {', '.join(row['failures'])} (see the notes) |" + " — |" * 9)
            notes += failure_note(method, row["failures"])
            continue
        c = row["comparison"]
        lines.append(f"| {method}{' (random)' if row['stochastic'] else ''} | {cost_cells(row['runs'])} | "
                     f"{c['max_abs_diff']:.3g} | "
                     f"{c['differing_tensors']} of {c['tensors']} | {c['kept_fraction_wandamerge']:.4f} / "
                     f"{c['kept_fraction_mergekit']:.4f} | {c['relative_delta_distance']:.3g} |")
        if "ties_explained" in row:
            t = row["ties_explained"]
            notes.append(f"- **ties**: {len(t['differing'])} of {t['tensors']} tensors differ, in "
                         f"{sum(d['entries'] for d in t['differing'])} entries; {t['differing_with_ties_at_cutoff']} of "
                         f"those tensors have equal |delta| values at a fine-tune's density cut-off (float32 rounding "
                         f"of base + noise puts deltas on a grid), where mergekit's argsort keeps an arbitrary one "
                         f"and wandamerge the lowest index.")
    lines += ["", "wall ratio and memory ratio: wandamerge / mergekit (below 1: wandamerge is faster or leaner). "
              "kept: the fraction of entries where the merged model differs from the base. relative delta "
              "distance: ||merged_ours - merged_mergekit|| / ||merged_mergekit - base||. Random methods (DARE, DELLA) "
              "draw different masks in the two tools, so only their kept fraction and scale should agree.", ""]
    if notes:
        lines += ["## Notes", "", *notes, ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
