"""A sparse merge in one command, on the merging testbed: per-task accuracy of the merge dense and at 2:4.

Runs (each skipped when its folder already holds results; one at a time, 2-core budget):

* ``merge_then_prune``: ``wandamerge run recipes/run-merge-then-prune.yaml``: WUDI over the eight testbed
  fine-tunes, then Wanda 2:4 of the merge, both evaluated (the recipe's settings);
* ``merge_then_prune_sparsegpt``: SparseGPT 2:4 of that same dense merge, the same evaluation;
* ``base_wanda_2of4``: Wanda 2:4 of the base itself, the same evaluation (what 2:4 costs without a merge).

Normalized accuracy is each task's accuracy over its own fine-tune's, with the fine-tunes' accuracies taken
from the first run's references for every row (one set of denominators).

    python benchmarks/merge_then_prune.py

Results: benchmarks/results/merge_then_prune.{json,md}; the runs under $WANDAMERGE_CACHE/bench/.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from wandamerge.io.record import provenance  # noqa: E402
from wandamerge.models import default_cache_dir  # noqa: E402

RECIPE = HERE.parent / "recipes" / "run-merge-then-prune.yaml"
BIN = Path(sys.executable).parent
WORK = default_cache_dir() / "bench"
MERGED = "merge_then_prune"


def prune_recipe(model: str, method: str) -> dict:
    """A prune-only run recipe with the merge recipe's prune and evaluate sections, another method or model."""
    source = yaml.safe_load(RECIPE.read_text())
    return {"prune": {**source["prune"], "model": model, "method": method}, "evaluate": source["evaluate"]}


def runs() -> dict[str, tuple[str, dict | None]]:
    """name -> (what it is, its recipe; None: the repository's recipe file)."""
    base = yaml.safe_load(RECIPE.read_text())["base_model"]
    merged = str(WORK / MERGED / "merged" / "model")
    return {MERGED: ("WUDI merge, then Wanda 2:4 (one command)", None),
            "merge_then_prune_sparsegpt": ("the same merge, SparseGPT 2:4", prune_recipe(merged, "sparsegpt")),
            "base_wanda_2of4": ("the base, Wanda 2:4", prune_recipe(base, "wanda"))}


def ensure_run(name: str, recipe: dict | None) -> Path:
    out = WORK / name
    if not (out / "results.json").is_file():
        path = RECIPE
        if recipe is not None:
            path = WORK / f"{name}.yaml"
            path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        subprocess.run([str(BIN / "wandamerge"), "-q", "run", str(path), "-o", str(out), "--overwrite"], check=True)
    return out


def rows() -> list[dict]:
    found = {name: (what, ensure_run(name, recipe)) for name, (what, recipe) in runs().items()}
    first = json.loads((found[MERGED][1] / "merged" / "results.json").read_text())
    finetuned = {t: r["acc"] for t, r in first["references"]["finetuned"].items()}
    table = [_row("base (dense)", {t: r["acc"] for t, r in _base_accuracy(found).items()}, None, finetuned, "")]
    for what, result_file in [("WUDI merge (dense)", found[MERGED][1] / "merged" / "results.json"),
                              *[(w, d / "results.json") for w, d in found.values()]]:
        result = json.loads(result_file.read_text())
        table.append(_row(what, {t: r["acc"] for t, r in result["tasks"].items()},
                          result["perplexity"]["value"] if result.get("perplexity") else None, finetuned,
                          str(result_file.relative_to(WORK))))
    return table


def _base_accuracy(found) -> dict:
    """The dense base's accuracy: the base-pruning run compares against it (its references' base tasks)."""
    result = json.loads((found["base_wanda_2of4"][1] / "results.json").read_text())
    return result["references"]["base"]


def _row(what: str, acc: dict, ppl, finetuned: dict, source: str) -> dict:
    normalized = {t: acc[t] / finetuned[t] for t in finetuned}
    return {"model": what, "perplexity": ppl, "acc": acc, "normalized": normalized,
            "mean_normalized": sum(normalized.values()) / len(normalized), "source": source}


def markdown(meta: dict, table: list[dict]) -> str:
    tasks = list(table[0]["normalized"])
    lines = [f"# Merge, then prune: the testbed's eight fine-tunes ({meta['date']}, commit {meta['commit']})", "",
             f"- command: `{meta['command']}` (it runs what is missing; the runs' own commits and dates are in "
             "their records)", f"- machine: {meta['machine']}",
             "- merge: WUDI, lambda 1 (the testbed's best method on validation); prune: 128 x 512 wiki "
             "calibration windows; perplexity: 32 x 512 held-out wiki windows (the runs' `evaluate:` section)",
             "- cells: accuracy on each task's test items (normalized: over that task's own fine-tune)", "",
             "| model | perplexity | " + " | ".join(tasks) + " | mean normalized |",
             "|---|---|" + "---|" * len(tasks) + "---|"]
    for row in table:
        ppl = "" if row["perplexity"] is None else f"{row['perplexity']:.1f}"
        cells = " | ".join(f"{row['acc'][t]:.3f} ({row['normalized'][t]:.2f})" for t in tasks)
        lines.append(f"| {row['model']} | {ppl} | {cells} | **{row['mean_normalized']:.3f}** |")
    return "\n".join(lines) + "\n"


def main() -> None:
    table = rows()
    meta = provenance([__file__, *sys.argv[1:]])
    (HERE / "results" / "merge_then_prune.json").write_text(json.dumps({**meta, "rows": table}, indent=2))
    (HERE / "results" / "merge_then_prune.md").write_text(markdown(meta, table))
    print((HERE / "results" / "merge_then_prune.md").read_text())


if __name__ == "__main__":
    main()
