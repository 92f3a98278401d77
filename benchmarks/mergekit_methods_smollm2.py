"""slerp, model_stock and a slices frankenmerge on SmolLM2-135M and the testbed's full fine-tunes: wandamerge
against mergekit 0.1.5, one run (issue 17).

Three of mergekit's best-known recipes run through ``wandamerge merge`` and through mergekit 0.1.5's
``mergekit-yaml`` from the same YAML, one after the other in the same run, each tool its own process: wall
time and peak RSS of that process tree, and how far the outputs agree (the measurement, the tensor
comparison and the mergekit environment are ``merge_vs_mergekit.py``'s):

1. ``slerp`` of two full fine-tunes, with the model-card gradient: ``t`` [0, 0.5, 0.3, 0.7, 1] on
   ``self_attn``, [1, 0.5, 0.7, 0.3, 0] on ``mlp``, 0.5 elsewhere. slerp interpolates between its
   ``base_model`` (t = 0) and exactly one other model, so the first fine-tune is the slerp's base_model;
   the testbed's base is no input of this one.
2. ``model_stock`` of the testbed's base and every full fine-tune (six of its eight tasks: the two LoRA
   adapters, marked ``kind: lora`` in ``testbed.FINETUNES``, and the multi-task model are left out).
3. a ``slices:`` frankenmerge (``passthrough``): layers [0, 2n/3) of the first fine-tune, then [n/3, n)
   of the second; [0, 20) and [10, 30) of SmolLM2-135M's 30 layers, a 40-layer model.

The models: SmolLM2-135M (``wandamerge.models.prepare_smollm2``) and the merging testbed's full fine-tunes
(``testbed.py``, reused from its cache, trained when missing). ``--base DIR --finetunes DIR DIR ...`` runs
the same three recipes on other models (the slices' ranges scale to their layer count). Every recipe is
``dtype: float32``: wandamerge computes these methods as mergekit does, so the outputs should agree to the bit.

    python benchmarks/mergekit_methods_smollm2.py [--repeats 1] [--mergekit-bin PATH]
    python benchmarks/mergekit_methods_smollm2.py --base DIR --finetunes DIR DIR [...] --out DIR --work DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from merge_vs_mergekit import (compare_outputs, cost_cells, failure_note, mergekit_executable,  # noqa: E402
                               mergekit_side, run_both)

NAME = "mergekit_methods_smollm2"
SLERP_T = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
           {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
           {"value": 0.5}]


def layer_count(model: Path) -> int:
    config = json.loads((model / "config.json").read_text())
    return config.get("num_hidden_layers", config.get("n_layer"))


def slice_ranges(layers: int) -> tuple[list[int], list[int]]:
    """[0, 2n/3) and [n/3, n) (rounded): [0, 20) and [10, 30) of 30 layers."""
    cut = round(2 * layers / 3)
    return [0, cut], [layers - cut, layers]


def recipes(base: Path, finetunes: dict[str, Path]) -> dict[str, tuple[str, dict]]:
    """name -> (what it is, in one line; the mergekit recipe)."""
    (first, a), (second, b) = list(finetunes.items())[:2]
    head, tail = slice_ranges(layer_count(a))
    stock = ", ".join(finetunes)
    return {
        "slerp": (f"slerp from {first} (t = 0) to {second}; t gradient [0, 0.5, 0.3, 0.7, 1] on self_attn, "
                  f"[1, 0.5, 0.7, 0.3, 0] on mlp, 0.5 elsewhere",
                  {"merge_method": "slerp", "base_model": str(a), "dtype": "float32",
                   "models": [{"model": str(a)}, {"model": str(b)}], "parameters": {"t": SLERP_T}}),
        "model_stock": (f"model_stock of the base and {len(finetunes)} fine-tunes ({stock})",
                        {"merge_method": "model_stock", "base_model": str(base), "dtype": "float32",
                         "models": [{"model": str(base)}, *({"model": str(p)} for p in finetunes.values())]}),
        "slices": (f"passthrough frankenmerge: layers [{head[0]}, {head[1]}) of {first}, then [{tail[0]}, {tail[1]}) "
                   f"of {second} ({head[1] - head[0] + tail[1] - tail[0]} layers)",
                   {"merge_method": "passthrough", "dtype": "float32",
                    "slices": [{"sources": [{"model": str(a), "layer_range": head}]},
                               {"sources": [{"model": str(b), "layer_range": tail}]}]}),
    }


def testbed_models() -> tuple[Path, dict[str, Path], dict]:
    """SmolLM2-135M, the testbed's full fine-tunes by task, and which fine-tunes are left out and why."""
    from testbed import FINETUNES, TASKS, build_finetunes, default_root

    from wandamerge.models import prepare_smollm2

    base = Path(prepare_smollm2())
    full = [task for task in TASKS if FINETUNES[task]["kind"] == "full"]
    left_out = {task: f"{FINETUNES[task]['kind']} adapter" for task in TASKS if task not in full}
    left_out["multitask"] = "the multi-task model (all eight tasks), not one task's fine-tune"
    return base, build_finetunes(base, default_root(), full), left_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, help="base model directory [default: SmolLM2-135M]")
    parser.add_argument("--finetunes", type=Path, nargs="+",
                        help="two or more fine-tunes of --base [default: the testbed's full fine-tunes]")
    parser.add_argument("--work", type=Path, default=None,
                        help="recipes and outputs [default: <cache>/bench/mergekit_methods]")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="where the results go")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--only", action="append", choices=["slerp", "model_stock", "slices"],
                        help="these recipes only (repeatable)")
    parser.add_argument("--mergekit-bin", type=Path, default=None,
                        help="mergekit-yaml executable [default: its own venv under the benchmark cache]")
    args = parser.parse_args()
    if (args.base is None) != (args.finetunes is None):
        parser.error("--base and --finetunes go together")
    if args.finetunes is not None and len(args.finetunes) < 2:
        parser.error("--finetunes needs two or more models (model_stock takes the base and at least two)")

    if args.base is None:
        base, finetunes, left_out = testbed_models()
    else:
        base, finetunes, left_out = args.base.resolve(), {p.name: p.resolve() for p in args.finetunes}, {}
    from wandamerge.io.resolve import default_cache_dir

    work = args.work or default_cache_dir() / "bench" / "mergekit_methods"
    work.mkdir(parents=True, exist_ok=True)
    mergekit = args.mergekit_bin.absolute() if args.mergekit_bin else mergekit_executable(work)

    rows = {}
    for name, (what, recipe) in recipes(base, finetunes).items():
        if args.only and name not in args.only:
            continue
        recipe_path = work / f"{name}.yaml"
        recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        runs, failures = run_both(recipe_path, work, mergekit, args.repeats, name)
        row = {"what": what, "recipe": recipe, "runs": runs, "failures": failures}
        if not failures:
            outputs = {tool: work / f"out-{tool}" for tool in runs}
            row["comparison"] = compare_outputs(outputs["wandamerge"], outputs["mergekit"],
                                                base if "models" in recipe else None)
            row["layers"] = {tool: layer_count(path) for tool, path in outputs.items()}
        rows[name] = row

    from wandamerge.io.record import portable, provenance, versions

    meta = {**provenance([__file__, *sys.argv[1:]]), "versions": versions(), "mergekit": mergekit_side(mergekit),
            "threads": os.environ.get("OMP_NUM_THREADS", "unset"), "repeats": args.repeats,
            "models": {"source": "given" if args.base else "testbed", "base": str(base),
                       "layers": layer_count(base), "finetunes": {n: str(p) for n, p in finetunes.items()},
                       "left_out": left_out}}
    result = portable({"meta": meta, "recipes": rows})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{NAME}.json").write_text(json.dumps(result, indent=2))
    (args.out / f"{NAME}.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    meta, models = result["meta"], result["meta"]["models"]
    mk = meta["mergekit"]
    on = ("SmolLM2-135M + the testbed's full fine-tunes" if models["source"] == "testbed"
          else f"`{models['base']}` + {len(models['finetunes'])} given fine-tunes")
    finetunes = ", ".join(f"{n} (`{p}`)" for n, p in models["finetunes"].items())
    lines = [f"# slerp, model_stock and a slices frankenmerge on {on}: wandamerge vs mergekit "
             f"({meta['date']}, commit {meta['commit']})", "",
             f"- command: `{meta['command']}`", f"- machine: {meta['machine']}, OMP_NUM_THREADS={meta['threads']}",
             f"- wandamerge side: {meta['versions']}",
             f"- mergekit side (`{mk['executable']}`): mergekit {mk['mergekit']}, torch {mk['torch']}, "
             f"transformers {mk['transformers']}",
             f"- base: `{models['base']}` ({models['layers']} layers); fine-tunes: {finetunes}"]
    if models["left_out"]:
        lines.append("- left out: " + "; ".join(f"{n} ({why})" for n, why in models["left_out"].items()))
    lines += [f"- every recipe `dtype: float32`, the same YAML to both tools; runs per tool and recipe: "
              f"{meta['repeats']}; wall = best run, peak RSS = largest run, each tool its own process, one after "
              f"the other", "",
              "| recipe | what it is | wandamerge s | mergekit s | wall ratio | wandamerge GB | mergekit GB | "
              "memory ratio | max abs diff | differing tensors | layers (ours / mergekit) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for name, row in result["recipes"].items():
        if row["failures"]:
            lines.append(f"| {name} | {row['what']} | failed in {', '.join(row['failures'])} (see the notes) |"
                         + " — |" * 8)
            notes += failure_note(name, row["failures"])
            continue
        c = row["comparison"]
        lines.append(f"| {name} | {row['what']} | {cost_cells(row['runs'])} | {c['max_abs_diff']:.3g} | "
                     f"{c['differing_tensors']} of {c['tensors']} | {row['layers']['wandamerge']} / "
                     f"{row['layers']['mergekit']} |")
        if c.get("only_in_wandamerge") or c.get("only_in_mergekit"):
            notes.append(f"- **{name}**: tensors in wandamerge's output only: {c['only_in_wandamerge']}; in "
                         f"mergekit's only: {c['only_in_mergekit']}")
    lines += ["", "wall ratio and memory ratio: wandamerge / mergekit (below 1: wandamerge is faster or leaner). "
              "max abs diff and differing tensors: over the tensors of mergekit's output, float32.", ""]
    if notes:
        lines += ["## Notes", "", *notes, ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
