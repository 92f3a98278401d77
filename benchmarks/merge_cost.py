"""What the activation-aware merges cost: time and peak memory on SmolLM2-135M with the testbed's eight fine-tunes.

    python benchmarks/merge_cost.py [--only regmean] [--repeats 1]

Every recipe merges the eight fine-tunes of the merging testbed (``testbed.py``, built or reused from its
cache) into the base, through ``wandamerge merge`` as its own process (wall time and peak RSS of that
process tree, ``programs/measure.py``). The activation-aware ones calibrate each model on its own task's
training prompts (task activations: 64 x 128 tokens per model, as ``merge_testbed.py``); Wanda-TIES on
the same calibration is the reference the issue compares against (RegMean and OBIM within 2x its time
and 1.5x its memory). Task arithmetic (no calibration) is the I/O floor of an eight-model merge.
Results: ``benchmarks/results/merge_cost.{md,json}``; with ``--only``, the rows not rerun are kept with their
own commit and date (ratios against the reference are only meaningful between rows of one run).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from merge_testbed import TASK_CALIBRATION  # noqa: E402
from merge_vs_mergekit import BIN, measure  # noqa: E402
from testbed import TASKS, build_finetunes, default_root, task_calibration  # noqa: E402

REFERENCE = "ties/wanda (task activations)"
RECIPES = {  # name: (merge_method, sparsify, global parameters, per-model density, task calibration)
    "task_arithmetic (no calibration)": ("task_arithmetic", None, {"lambda": 0.3}, None, False),
    REFERENCE: ("ties", {"score": "wanda"}, {}, 0.2, True),
    "obim (task activations)": ("obim", None, {}, 0.2, True),
    "regmean (task Grams)": ("regmean", None, {"alpha": 0.9}, None, True),
    "ties/sparsegpt (task Grams)": ("ties", {"score": "sparsegpt"}, {}, 0.2, True),
    "ties/wanda + rescale gram": ("ties", {"score": "wanda"}, {"rescale": "gram"}, 0.2, True),
    "ties/wanda + election activation": ("ties", {"score": "wanda"}, {"election": "activation"}, 0.2, True),
    "ties + aim": ("ties", None, {}, 0.2, False),
    "wudi (data-free)": ("wudi", None, {}, None, False),
    "wudi_activation (task Grams)": ("wudi_activation", None, {}, None, True),
    "regmean_plus (task Grams, propagated)": ("regmean_plus", None, {"alpha": 0.9}, None, True),
}


def recipe(name: str, base: Path, finetunes: dict[str, Path], calibration: dict[str, Path]) -> dict:
    method, sparsify, params, density, task = RECIPES[name]
    models = []
    for t in TASKS:
        entry = {"model": str(finetunes[t]), "parameters": {"weight": 1.0, **({"density": density} if density else {})}}
        if task:
            entry["calibration"] = {"data": str(calibration[t]), **TASK_CALIBRATION}
        models.append(entry)
    out = {"merge_method": method, "base_model": str(base), "dtype": "float32", "models": models}
    if params:
        out["parameters"] = dict(params)
    if sparsify:
        out["sparsify"] = dict(sparsify)
    if name == "ties + aim":
        out["aim"] = {"omega": 0.4}
        out["calibration"] = {"data": "wiki", "nsamples": 32, "seqlen": 512}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", help="these recipes only (names as in RECIPES)")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    from wandamerge.io.record import portable, provenance
    from wandamerge.models import prepare_smollm2

    base = prepare_smollm2()
    root = default_root()
    finetunes = build_finetunes(base, root, TASKS)
    calibration = {t: task_calibration(root, t) for t in TASKS}
    previous = HERE / "results" / "merge_cost.json"
    rows = {}
    if args.only and previous.is_file():  # the rows not rerun stay, each with its own commit and date
        old = json.loads(previous.read_text())
        rows = {name: {"commit": old["meta"]["commit"], "date": old["meta"]["date"], **row}
                for name, row in old["rows"].items() if name not in args.only}
    stamp = {key: portable(provenance([]))[key] for key in ("commit", "date")}
    with tempfile.TemporaryDirectory(dir=root) as work:
        for name in RECIPES:
            if args.only and name not in args.only:
                continue
            path = Path(work) / "recipe.yaml"
            path.write_text(yaml.safe_dump(recipe(name, base, finetunes, calibration)))
            runs = [measure([str(BIN / "wandamerge"), "merge", str(path), "-o", str(Path(work) / "out"),
                             "--overwrite"]) for _ in range(args.repeats)]
            wall, rss = min(r[0] for r in runs), max(r[1] for r in runs)
            rows[name] = {"seconds": round(wall, 1), "peak_rss_gb": round(rss / 2 ** 30, 2), **stamp}
            print(f"{name}: {wall:.1f} s, {rss / 2 ** 30:.2f} GB", flush=True)
    reference = rows.get(REFERENCE)
    for row in rows.values():
        if reference:
            row["time_vs_reference"] = round(row["seconds"] / reference["seconds"], 2)
            row["memory_vs_reference"] = round(row["peak_rss_gb"] / reference["peak_rss_gb"], 2)
    result = {"meta": portable(provenance([__file__, *sys.argv[1:]])), "reference": REFERENCE, "rows": rows,
              "task_calibration": TASK_CALIBRATION, "repeats": args.repeats}
    (HERE / "results" / "merge_cost.json").write_text(json.dumps(result, indent=2))
    (HERE / "results" / "merge_cost.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [f"# Cost of the activation-aware merges: SmolLM2-135M, eight fine-tunes ({meta['date']}, commit "
             f"{meta['commit']})", "", f"- command: `{meta['command']}`", f"- machine: {meta['machine']}",
             f"- task calibration: {result['task_calibration']['nsamples']} x {result['task_calibration']['seqlen']}"
             " tokens of each task's training prompts, per model; wall time the fastest of "
             f"{result['repeats']} run(s), peak RSS of the merge process tree", "",
             f"| recipe | seconds | peak RSS (GB) | time / {result['reference']} | memory / it | measured at |",
             "|---|---|---|---|---|---|"]
    for name, row in result["rows"].items():
        lines.append(f"| {name} | {row['seconds']} | {row['peak_rss_gb']} | {row.get('time_vs_reference', '')} | "
                     f"{row.get('memory_vs_reference', '')} | {row.get('commit', meta['commit'])}, "
                     f"{row.get('date', meta['date'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
