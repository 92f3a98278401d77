"""Merging the testbed's four fine-tunes: every method x score x density, per-task accuracy.

    python benchmarks/testbed.py                 # first: build (or reuse) the fine-tunes
    python benchmarks/merge_testbed.py           # the grid below; --resume keeps rows already measured
    python benchmarks/merge_testbed.py --only ties/wanda/0.2

Methods: task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, della;
scores: magnitude (TIES' trim), random (DARE's drop), wanda (|delta| * ||X||
with X the base model's inputs on wiki calibration windows, per output row);
densities 0.1, 0.2, 0.5; and 2:4 Wanda-scored deltas for every method. Every
fine-tune has weight 1 and the density of its row; each method keeps its own
defaults otherwise (normalize, rescale). Breadcrumbs and DELLA also run with
their own scores (breadcrumbs' gamma = 0.01, DELLA's epsilon = min(0.1,
density / 2)); those parameters belong to the scores, so the other scores run
without them. The merge goes through
`wandamerge.merge`; the evaluation is zero-shot multiple choice by
log-likelihood on the first ``--limit`` examples of each task's test split
(`wandamerge.evaluation.choices`: lm-eval's ``acc``, checked equal by the
tests and on SmolLM2, without the harness's cost on a CPU), with the base and
each fine-tune on every task as reference rows.

The base model's activation norms for the Wanda score are computed once for
the run and reused by every Wanda merge (the same windows, the same base: the
same numbers), which the library would otherwise recompute per merge.

Results: benchmarks/results/merge_testbed.{json,md} and merge_testbed_normalized.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

METHODS = ["task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "della"]
SCORES = ["magnitude", "random", "wanda"]
DENSITIES = [0.2, 0.1, 0.5]
TASKS = ["newsgroups", "tweets", "analogy_semantic", "analogy_syntactic"]  # the testbed's fine-tunes


def grid() -> list[tuple[str, str, str]]:
    """(method, score, density or '2:4'): the issue's grid first, then breadcrumbs' and DELLA's own scores."""
    own = {"breadcrumbs": ["breadcrumbs"], "della": ["della"]}  # their papers' own scores as well
    runs = [(m, s, str(d)) for d in DENSITIES for m in METHODS for s in SCORES]
    runs += [(m, "wanda", "2:4") for m in METHODS]
    return runs + [(m, s, str(d)) for d in DENSITIES for m in METHODS for s in own.get(m, [])]


def recipe_for(method: str, score: str, shape: str, base: str, finetunes: dict[str, str], calib: dict) -> dict:
    params: dict = {"weight": 1.0}
    if shape != "2:4":
        params["density"] = float(shape)
    if score == "breadcrumbs":  # gamma and epsilon belong to those scores, not to the methods
        params["gamma"] = 0.01
    if score == "della":
        params["epsilon"] = min(0.1, float(shape) / 2, (1 - float(shape)) / 2)
    recipe = {"merge_method": method, "base_model": base,
              "models": [{"model": finetunes[t], "parameters": dict(params)} for t in TASKS], "dtype": "float32",
              "sparsify": {"score": score, "group": "row"}}
    if shape == "2:4":
        recipe["sparsify"]["pattern"] = "2:4"
    if score == "wanda":
        recipe["calibration"] = calib
    return recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", help="METHOD/SCORE/DENSITY (repeatable)")
    parser.add_argument("--limit", type=int, default=80, help="test examples per task")
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows of 512 tokens (wanda)")
    parser.add_argument("--resume", action="store_true", help="keep rows of an earlier run")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", min(4, os.cpu_count() or 1))))
    import wandamerge.jobs.merge as merge_module
    from testbed import default_root
    from wandamerge.evaluation.choices import choice_accuracy
    from wandamerge.jobs.evaluate import load_for_eval, normalized_accuracy
    from wandamerge.evaluation.tasks import read_examples
    from wandamerge.jobs.merge import merge
    from wandamerge.models import prepare_smollm2
    from wandamerge.recipe import parse_recipe

    base = str(prepare_smollm2())
    root = default_root()
    finetunes = {t: str(root / t) for t in TASKS}
    missing = [t for t, p in finetunes.items() if not (Path(p) / "testbed.json").is_file()]
    if missing:
        raise SystemExit(f"fine-tunes missing for {missing}: run python benchmarks/testbed.py first")
    work = args.work or root.parent / "merge-testbed"
    work.mkdir(parents=True, exist_ok=True)
    calib = {"data": "wiki", "nsamples": args.nsamples, "seqlen": 512, "seed": 0}

    memo: dict = {}
    original = merge_module.collect_input_norms

    def collect_once(model, windows, **kwargs):  # the same base and windows give the same norms
        key = (getattr(model.config, "_name_or_path", ""), windows.shape, hash(windows.numpy().tobytes()))
        if key not in memo:
            memo[key] = original(model, windows, **kwargs)
        return memo[key]

    merge_module.collect_input_norms = collect_once

    results_path = HERE / "results" / "merge_testbed.json"
    rows: list[dict] = []
    if args.resume and results_path.is_file():
        rows = [r for r in json.loads(results_path.read_text())["rows"] if "error" not in r]  # retry failures
    done = {r["name"] for r in rows}

    def accuracies(spec: str) -> dict[str, dict]:
        model, tokenizer = load_for_eval(spec, base=base)
        return {t: choice_accuracy(model, tokenizer, read_examples(t, "test"), limit=args.limit) for t in TASKS}

    # reference rows: the base and each fine-tune on every task
    for name, spec in [("base", base)] + [(f"fine-tune {t}", p) for t, p in finetunes.items()]:
        if name in done:
            continue
        print(f"== {name}", flush=True)
        result = accuracies(spec)
        rows.append({"name": name, "kind": "reference", "tasks": {t: r["acc"] for t, r in result.items()},
                     "stderr": {t: r["acc_stderr"] for t, r in result.items()}})
        write(rows, args)
    own = {t: {"acc": next(r["tasks"][t] for r in rows if r["name"] == f"fine-tune {t}")} for t in TASKS}

    wanted = [tuple(o.split("/")) for o in args.only] if args.only else grid()
    for method, score, shape in wanted:
        name = f"{method}/{score}/{shape}"
        if name in done:
            continue
        print(f"== {name}", flush=True)
        out = work / name.replace("/", "-").replace(":", "of")
        recipe = parse_recipe(recipe_for(method, score, shape, base, finetunes, calib), name)
        t0 = time.perf_counter()
        try:
            record = merge(recipe, out, overwrite=True, progress=False)
        except Exception as err:  # a method that cannot run at a setting: say so in the table
            rows.append({"name": name, "kind": "merge", "method": method, "score": score, "shape": shape,
                         "error": f"{type(err).__name__}: {err}"})
            write(rows, args)
            print(f"   failed: {err}", flush=True)
            continue
        merge_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = accuracies(str(out))
        normalized = normalized_accuracy(result, own)
        rows.append({"name": name, "kind": "merge", "method": method, "score": score, "shape": shape,
                     "density": None if shape == "2:4" else float(shape),
                     "tasks": {t: r["acc"] for t, r in result.items()},
                     "stderr": {t: r["acc_stderr"] for t, r in result.items()},
                     "normalized": normalized["per_task"], "normalized_mean": normalized["mean"],
                     "merge_s": round(merge_s, 1), "eval_s": round(time.perf_counter() - t0, 1),
                     "fallback_tensors": len(record.get("fallbacks") or {})})
        print(f"   normalized {normalized['mean']:.3f}  "
              + " ".join(f"{t}={a:.3f}" for t, a in rows[-1]["tasks"].items()), flush=True)
        write(rows, args)
        shutil.rmtree(out, ignore_errors=True)
    write(rows, args, final=True)


def write(rows: list[dict], args, final: bool = False) -> None:
    from wandamerge.io.record import portable as shown
    from wandamerge.io.record import provenance

    meta = shown({**provenance([__file__, *sys.argv[1:]]), "limit": args.limit, "nsamples": args.nsamples})
    results = HERE / "results"
    (results / "merge_testbed.json").write_text(json.dumps({"meta": meta, "rows": shown(rows)}, indent=2))
    (results / "merge_testbed.md").write_text(markdown(meta, shown(rows)))
    if final:
        plot(rows, results / "merge_testbed_normalized.png")


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# Merging the testbed's fine-tunes ({meta['date']}, commit {meta['commit']})", "",
             f"- command: `{meta['command']}`", f"- machine: {meta['machine']}",
             f"- accuracy: zero-shot multiple choice by log-likelihood (equal to lm-eval's acc) on the first "
             f"{meta['limit']} test examples of each task; "
             f"normalized = merged / the task's own fine-tune; Wanda norms from {meta['nsamples']} x 512 wiki "
             "tokens through the base", "",
             "| run | " + " | ".join(TASKS) + " | normalized mean | min | merge s |",
             "|---|" + "---|" * (len(TASKS) + 3)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'][:80]} |")
            continue
        accs = " | ".join(f"{r['tasks'].get(t, float('nan')):.3f}" for t in TASKS)
        norm = r.get("normalized_mean")
        lines.append(f"| {r['name']} | {accs} | {'' if norm is None else f'{norm:.3f}'} | "
                     f"{'' if norm is None else format(min(r['normalized'].values()), '.3f')} | "
                     f"{r.get('merge_s', '')} |")
    # the claim: wanda against magnitude and random at the same method and density
    merges = {(r["method"], r["score"], r["shape"]): r for r in rows if r.get("kind") == "merge" and "error" not in r}
    compare = []
    for (method, score, shape), r in sorted(merges.items()):
        if score != "wanda" or shape == "2:4":
            continue
        for other in ("magnitude", "random"):
            o = merges.get((method, other, shape))
            if o:
                compare.append((method, shape, other, r["normalized_mean"] - o["normalized_mean"]))
    if compare:
        wins = sum(d > 1e-9 for *_, d in compare)
        ties = sum(abs(d) <= 1e-9 for *_, d in compare)
        lines += ["", "## Wanda against magnitude and random at the same method and density", "",
                  f"Wanda's normalized mean is higher in {wins} of {len(compare)} pairs, equal in {ties}.", "",
                  "| method | density | against | wanda minus other |", "|---|---|---|---|"]
        lines += [f"| {m} | {s} | {o} | {d:+.3f} |" for m, s, o, d in compare]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    from wandamerge.report import Run, plot_normalized

    runs = [Run(name=r["name"], path="", job="merge", method=r["method"], score=r["score"], density=r["density"],
                normalized=r["normalized_mean"])
            for r in rows if r.get("kind") == "merge" and "error" not in r and r.get("density") is not None]
    plot_normalized(runs, path)


if __name__ == "__main__":
    main()
