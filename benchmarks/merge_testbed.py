"""Merging the testbed's eight fine-tunes: every method tuned on validation, reported on test with intervals.

    python benchmarks/merge_testbed.py            # everything: fine-tunes, tasks table, the whole protocol;
                                                  # it resumes from its caches by itself (--resume is implied)
    python benchmarks/merge_testbed.py --only ties --only ties/wanda
    python benchmarks/merge_testbed.py --report   # tables and plot from what is measured, running nothing

Protocol (one grid for every method, written below as LAMBDAS x DENSITIES):
1. Each method is merged through ``wandamerge.merge`` at lambda = 1, once per
   density (and per seed for random methods). Lambda scales the combined task
   vector after every other step (``wandamerge.merging.methods``), so the model
   at lambda is ``base + lambda * (merged - base)``; each lambda of the grid is
   evaluated from that one merge (the library's own lambda gives the same
   tensors for every method here: ``tests/test_testbed_stats.py``).
2. Validation: every (density, lambda) of the grid on each task's validation
   split (seed 0 for random methods). ``choose_setting`` picks the setting with
   the best mean normalized validation accuracy; it takes ``ValidationResult``
   records, which carry no test number (see ``tests/test_testbed_stats.py``).
3. Test: the chosen setting on each task's test split, with seeds 0, 1 and 2 for
   random methods; per-task accuracy, mean absolute and mean normalized accuracy
   (merged / the task's own fine-tune) with 95% bootstrap intervals over test
   items and seeds; a paired bootstrap against the best data-free method (best
   on validation); the merged model's perplexity on held-out Wikipedia windows.
4. Untuned rows: each method at mergekit's lambda = 1 with its chosen density
   (for task arithmetic: the interference figure of all eight at lambda = 1).
Methods run one after the other, each through all four steps, so a stopped run
leaves whole rows.

Every measurement is cached by content (records of 0/1 per example, in the
testbed's cache), and the measured numbers are also written to
``benchmarks/results/merge_testbed_records.json`` as they come, so a run that is
stopped resumes where it was. Results: ``benchmarks/results/merge_testbed.{md,json}``
and ``merge_testbed.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from testbed import REFERENCE_RECORDS, TASKS, Records, build_finetunes, default_root, digest  # noqa: E402
from testbed_stats import ValidationResult, choose_setting, interval, paired, summary  # noqa: E402

# 0.1 and 0.2: task arithmetic of eight was best at the old lower edge, 0.3; 2.0 and 3.0: Wanda-TIES at density
# 0.1 was still rising at 1.5, and the mean-like methods (TIES' disjoint mean, DELLA, RegMean) of eight
# fine-tunes may want lambda near the number of tasks times task arithmetic's
LAMBDAS = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0)
DENSITIES = (0.1, 0.2, 0.5)
SEEDS = (0, 1, 2)  # random methods, on test; validation uses the first
CALIBRATION = {"data": "wiki", "nsamples": 32, "seqlen": 512}  # Wanda norms: the base on wiki windows
# task activations: each fine-tune's own training prompts (with their answers), through the base
TASK_CALIBRATION = {"nsamples": 64, "seqlen": 128}
PPL_WINDOWS = 16  # of ../shared/data/smollm2-wiki/eval_64x512.pt (held-out Wikipedia)
KEPT_MERGES = 3  # deltas kept in memory (0.5 GB each for SmolLM2-135M): one per seed of a random method
RECORDS_FILE = HERE / "results" / "merge_testbed_records.json"


class NotMeasured(LookupError):
    """``--report``: a number that no run has measured yet."""


@dataclass(frozen=True)
class Method:
    """A row of the table: a merge method, the score that trims its task vectors, its own parameters."""
    name: str
    merge_method: str
    score: str | None = None  # None: no trim (task arithmetic)
    random: bool = False
    data_free: bool = True
    params: dict = field(default_factory=dict)  # per model
    merge_params: dict = field(default_factory=dict)  # global (e.g. RegMean's alpha)
    calibration: str = "wiki"  # or "task": each model's own training prompts (task activations)
    aim: float | None = None  # AIM's omega: the post-pass on the base's wiki activations
    per_density: bool = False  # also on test at each density of PER_DENSITY with its own best lambda
    grid_densities: tuple | None = None  # a part of DENSITIES (an option measured where it is compared)

    @property
    def densities(self) -> tuple:
        return (self.grid_densities or DENSITIES) if self.score else (None,)

    def seeds(self, split: str) -> tuple:
        return (SEEDS if split == "test" else SEEDS[:1]) if self.random else (0,)


METHODS = [  # in the order they are run: the central comparison first
    Method("task_arithmetic", "task_arithmetic"),
    Method("ties", "ties", "magnitude", per_density=True),
    Method("ties/wanda", "ties", "wanda", data_free=False),
    Method("task_arithmetic/wanda", "task_arithmetic", "wanda", data_free=False),
    Method("dare_ties", "dare_ties", "random", random=True),
    Method("dare_linear", "dare_linear", "random", random=True),
    Method("breadcrumbs", "breadcrumbs", "breadcrumbs", params={"gamma": 0.01}),
    Method("della", "della", "della", random=True),
    # activation-aware (issue 14): RegMean on each task's input Grams, task activations; and WUDI, the
    # strongest published data-free merge, to compare them with (its merge takes minutes: run after)
    Method("regmean", "regmean", data_free=False, calibration="task", merge_params={"alpha": 0.9}),
    Method("regmean_plus", "regmean_plus", data_free=False, calibration="task", merge_params={"alpha": 0.9}),
    Method("wudi", "wudi"),
    Method("ties/wanda-task", "ties", "wanda", data_free=False, calibration="task", per_density=True),
    # WUDI's loss with each task's own input Gram in place of (share 1) or beside (share 0.5) its task
    # vector's row space; the share is chosen between the two rows on validation
    Method("wudi_activation", "wudi_activation", data_free=False, calibration="task",
           merge_params={"gram_share": 1.0}),
    Method("wudi_activation/0.5", "wudi_activation", data_free=False, calibration="task",
           merge_params={"gram_share": 0.5}),
    # Wanda on task activations against magnitude, each density on its own (the second claim)
    # (only at the two densities compared: the 2-core CPU's budget; their "tuned" rows choose between these two)
    Method("task_arithmetic/magnitude", "task_arithmetic", "magnitude", per_density=True, grid_densities=(0.1, 0.2)),
    Method("task_arithmetic/wanda-task", "task_arithmetic", "wanda", data_free=False, calibration="task",
           per_density=True, grid_densities=(0.1, 0.2)),
    # the rescale that fits a Wanda selection (the least-squares scale for each task's Gram) against none,
    # TIES' default, at the two densities of the comparison: the choice between them is made on validation
    Method("ties/wanda-task+gram", "ties", "wanda", data_free=False, calibration="task", per_density=True,
           merge_params={"rescale": "gram"}, grid_densities=(0.1, 0.2)),
    Method("task_arithmetic/wanda-task+gram", "task_arithmetic", "wanda", data_free=False, calibration="task",
           per_density=True, merge_params={"rescale": "gram"}, grid_densities=(0.1, 0.2)),
    Method("wudi/aim", "wudi", data_free=False, aim=0.4),
    Method("obim", "obim", "wanda", data_free=False, calibration="task"),
    # the best trimmed merge above with each task's vote weighted by its own activations (election), and
    # SparseGPT's OBS sweep on each delta against its task's Gram in place of the Wanda trim (at the density
    # the trimmed row chose: the 2-core budget)
    Method("ties/wanda-task+gram+election", "ties", "wanda", data_free=False, calibration="task",
           merge_params={"rescale": "gram", "election": "activation"}, grid_densities=(0.1,)),
    Method("ties/sparsegpt-task", "ties", "sparsegpt", data_free=False, calibration="task",
           merge_params={"rescale": "none"}, grid_densities=(0.1,)),
]
PER_DENSITY = (0.1, 0.2)
# the per-density comparisons: (Wanda on task activations, magnitude) under the same method
DENSITY_PAIRS = [("task_arithmetic/wanda-task", "task_arithmetic/magnitude"), ("ties/wanda-task", "ties"),
                 ("ties/wanda-task+gram", "ties"), ("task_arithmetic/wanda-task+gram", "task_arithmetic/magnitude")]


def recipe_for(method: Method, density: float | None, seed: int, base: str, finetunes: dict[str, str],
               task_data: dict[str, str] | None = None) -> dict:
    params: dict = {"weight": 1.0, **method.params}
    if density is not None:
        params["density"] = density
    if method.score == "della":
        params["epsilon"] = min(0.1, density / 2, (1 - density) / 2)
    own = (lambda t: {"calibration": {"data": task_data[t], **TASK_CALIBRATION}}) if method.calibration == "task" \
        else (lambda t: {})
    recipe = {"merge_method": method.merge_method, "base_model": base, "dtype": "float32",
              "models": [{"model": finetunes[t], "parameters": dict(params), **own(t)} for t in TASKS],
              "calibration": {**CALIBRATION, "seed": seed}}  # the seed also drives random drops
    if method.merge_params:
        recipe["parameters"] = dict(method.merge_params)
    if method.score:
        recipe["sparsify"] = {"score": method.score, "group": "row"}
    if method.aim is not None:
        recipe["aim"] = {"omega": method.aim}
    return recipe


# ----------------------------------------------------------------------------- measuring


class Bench:
    """The base in memory, merges on demand, every evaluation through the records cache."""

    def __init__(self, base: Path, finetunes: dict[str, Path], root: Path, work: Path,
                 task_data: dict[str, Path] | None = None):
        import torch

        from wandamerge.models import load_model

        self.base, self.finetunes, self.work = base, {t: str(p) for t, p in finetunes.items()}, work
        self.task_data = {t: str(p) for t, p in (task_data or {}).items()}
        self.records = Records(root)
        self.model, self.tokenizer = load_model(str(base))
        self.model.eval()
        self.base_state = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.delta: dict | None = None
        self.kept: dict[str, dict] = {}  # the last KEPT_MERGES deltas, oldest first
        self.loaded_key = None
        self.saved = json.loads(RECORDS_FILE.read_text()) if RECORDS_FILE.is_file() else {}
        self.report_only = False  # --report: use what is measured, measure nothing
        self.fingerprint = digest({"base": base.name, "finetunes": {t: Path(p).name for t, p in finetunes.items()},
                                   "calibration": CALIBRATION})
        torch.set_grad_enabled(False)

    def merge_key(self, method: Method, density, seed) -> str:
        task = "" if method.calibration != "task" else "-t" + digest(
            {"data": {t: Path(p).name for t, p in self.task_data.items()}, **TASK_CALIBRATION, **method.merge_params})[:8]
        return f"{method.name.replace('/', '-')}-d{density}-s{seed}{task}-{self.fingerprint}"

    def load_merge(self, method: Method, density, seed) -> None:
        """Merge at lambda 1 through the library and keep ``merged - base`` in memory."""
        from safetensors.torch import load_file

        from wandamerge.jobs.merge import merge
        from wandamerge.recipe import parse_recipe

        key = self.merge_key(method, density, seed)
        if self.loaded_key == key:
            return
        if key in self.kept:  # the seeds of a random method come back for the untuned row and perplexity
            self.delta = self.kept[key]
            self.loaded_key = key
            return
        out = self.work / key
        t0 = time.perf_counter()
        recipe = parse_recipe(recipe_for(method, density, seed, str(self.base), self.finetunes, self.task_data), key)
        merge(recipe, out, overwrite=True, progress=False)
        merged = {}
        for shard in sorted(out.glob("*.safetensors")):
            merged.update(load_file(shard))
        self.delta = {k: merged[k] - v if k in merged else None for k, v in self.base_state.items()}
        shutil.rmtree(out, ignore_errors=True)
        self.loaded_key = key
        self.kept[key] = self.delta
        while len(self.kept) > KEPT_MERGES:
            self.kept.pop(next(iter(self.kept)))
        print(f"   merged {key} in {time.perf_counter() - t0:.0f} s", flush=True)

    def set_lambda(self, lam: float) -> None:
        for name, param in self.model.state_dict().items():
            delta = self.delta.get(name)
            param.copy_(self.base_state[name] if delta is None else self.base_state[name] + lam * delta)

    def measure(self, method: Method, density, seed, lam, split: str) -> dict[str, list[int]]:
        """Per-task 0/1 records of the merged model at lambda on a split (cached by content)."""
        name = f"{self.merge_key(method, density, seed)}-l{lam}"
        saved = self.saved.get(name, {})
        if all(f"{t}/{split}" in saved for t in TASKS):
            return {t: saved[f"{t}/{split}"] for t in TASKS}
        if self.report_only:
            raise NotMeasured(name)

        def load():
            self.load_merge(method, density, seed)
            self.set_lambda(lam)
            return self.model, self.tokenizer

        t0 = time.perf_counter()
        out = {t: self.records.measure(name, t, split, load) for t in TASKS}
        self.saved.setdefault(name, {}).update({f"{t}/{split}": v for t, v in out.items()})
        self.saved[name][f"seconds/{split}"] = round(time.perf_counter() - t0, 1)  # with its merge, if it ran one
        self.flush()
        print(f"   {method.name} d={density} s={seed} lambda={lam} {split}: "
              + " ".join(f"{t}={sum(v) / len(v):.2f}" for t, v in out.items())
              + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
        return out

    def perplexity(self, method: Method, density, seed, lam) -> float:
        import torch

        from wandamerge.evaluation.perplexity import perplexity

        name = f"{self.merge_key(method, density, seed)}-l{lam}"
        if "ppl" not in self.saved.get(name, {}):
            if self.report_only:
                raise NotMeasured(name)
            self.load_merge(method, density, seed)
            self.set_lambda(lam)
            windows = torch.load(REPO.parent / "shared/data/smollm2-wiki/eval_64x512.pt")[:PPL_WINDOWS]
            self.saved.setdefault(name, {})["ppl"] = perplexity(self.model, windows, progress=False)
            self.flush()
        return self.saved[name]["ppl"]

    def reference_perplexity(self, name: str, spec: Path | None) -> float:
        """Perplexity of the base (``spec`` None) or of a reference model, on the same windows."""
        import torch

        from wandamerge.evaluation.perplexity import perplexity
        from wandamerge.jobs.evaluate import load_for_eval

        key = f"reference-{name}-{self.fingerprint if spec is None else Path(spec).name}"
        if "ppl" not in self.saved.get(key, {}):
            windows = torch.load(REPO.parent / "shared/data/smollm2-wiki/eval_64x512.pt")[:PPL_WINDOWS]
            if spec is None:
                self.model.load_state_dict(self.base_state)  # set_lambda rewrites every weight before a merge is used
                model = self.model
            else:
                model = load_for_eval(str(spec), base=str(self.base))[0]
            self.saved.setdefault(key, {})["ppl"] = perplexity(model, windows, progress=False)
            self.flush()
        return self.saved[key]["ppl"]

    def flush(self) -> None:
        tmp = RECORDS_FILE.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.saved))
        tmp.replace(RECORDS_FILE)


def validation_grid(bench: Bench, method: Method, own_val: dict) -> list[ValidationResult]:
    """Every setting of the grid on validation: the only numbers a choice may see."""
    results = []
    for density in method.densities:
        for lam in LAMBDAS:
            per_seed = [bench.measure(method, density, s, lam, "validation") for s in method.seeds("validation")]
            setting = (("density", density), ("lambda", lam))
            results.append(ValidationResult(setting, summary(per_seed, own_val)["normalized"]))
    return results


def test_row(bench: Bench, method: Method, density, lam, own_test: dict, label: str) -> dict:
    per_seed = [bench.measure(method, density, s, lam, "test") for s in method.seeds("test")]
    stats = summary(per_seed, own_test)
    return {"name": label, "method": method.name, "data_free": method.data_free, "density": density,
            "lambda": lam, "seeds": len(per_seed), **stats,
            "absolute_ci": interval(per_seed), "normalized_ci": interval(per_seed, own_test),
            "ppl": bench.perplexity(method, density, 0, lam), "items": per_seed}


def reference_rows(bench: Bench, refs: dict, own_test: dict, multitask: Path | None) -> list[dict]:
    rows = []
    for name, spec in [("base", None), ("multitask", multitask)]:
        if name in refs:
            per_seed = [{t: refs[name][t]["test"] for t in TASKS}]
            rows.append({"name": name, "method": name, **summary(per_seed, own_test),
                         "absolute_ci": interval(per_seed), "normalized_ci": interval(per_seed, own_test),
                         "ppl": bench.reference_perplexity(name, spec)})
    rows.append({"name": "each task's own fine-tune", "method": "finetunes",
                 "per_task": dict(own_test), "absolute": sum(own_test.values()) / len(own_test), "normalized": 1.0})
    return rows


def run(bench: Bench, methods: list[Method], refs: dict, multitask: Path | None = None) -> dict:
    """Method by method (so a stopped run leaves whole rows): its validation grid, the choice from those
    numbers alone, then the chosen setting and mergekit's lambda = 1 on test."""
    from testbed_stats import accuracy

    own_val = {t: accuracy(refs[t][t]["validation"]) for t in TASKS}
    own_test = {t: accuracy(refs[t][t]["test"]) for t in TASKS}
    grids, chosen = {}, {}
    rows = reference_rows(bench, refs, own_test, multitask)
    missing = []
    for method in methods:
        try:
            method_rows(bench, method, own_val, own_test, grids, chosen, rows)
        except NotMeasured as gap:  # --report: the method's grid or test rows are not all measured yet
            missing.append(method.name)
            grids.pop(method.name, None)
            chosen.pop(method.name, None)
            print(f"   {method.name}: not all measured yet ({gap})", flush=True)
    compare_to_best_data_free(rows, grids, chosen, own_test)
    return {"grids": {m: [{"setting": dict(r.setting), "normalized": r.normalized} for r in g]
                      for m, g in grids.items()}, "chosen": chosen, "rows": rows, "missing": missing,
            "per_density": density_comparisons(rows, own_test)}


def method_rows(bench: Bench, method: Method, own_val: dict, own_test: dict, grids: dict, chosen: dict,
                rows: list) -> None:
    print(f"== {method.name}: validation grid", flush=True)
    grids[method.name] = validation_grid(bench, method, own_val)
    setting = chosen[method.name] = dict(choose_setting(grids[method.name]))  # validation results only
    print(f"== {method.name}: test at {setting}", flush=True)
    new = [test_row(bench, method, setting["density"], setting["lambda"], own_test, f"{method.name} (tuned)")]
    if setting["lambda"] != 1.0:
        new.append(test_row(bench, method, setting["density"], 1.0, own_test, f"{method.name}, lambda 1 (untuned)"))
    for density in PER_DENSITY if method.per_density else ():  # each density with its own best lambda
        best = choose_setting([r for r in grids[method.name] if dict(r.setting)["density"] == density])
        new.append({**test_row(bench, method, density, dict(best)["lambda"], own_test,
                               f"{method.name} at density {density}"), "per_density": True})
    rows += new  # only whole: a method is in the table with all its rows or not at all


def density_comparisons(rows: list[dict], own_test: dict) -> list[dict]:
    """Wanda on task activations against magnitude under the same method at each density of PER_DENSITY
    (lambda chosen on validation for each row at that density): a paired bootstrap per pair."""
    found = {(r["method"], r["density"]): r for r in rows if r.get("per_density")}
    out = []
    for wanda, magnitude in DENSITY_PAIRS:
        for density in PER_DENSITY:
            a, b = found.get((wanda, density)), found.get((magnitude, density))
            if a and b:
                result = paired(a["items"], b["items"], own_test)
                out.append({"wanda": wanda, "magnitude": magnitude, "density": density, "wanda_lambda": a["lambda"],
                            "magnitude_lambda": b["lambda"], "wanda_normalized": a["normalized"],
                            "magnitude_normalized": b["normalized"], "difference": result.difference,
                            "low": result.low, "high": result.high, "verdict": result.verdict})
    return out


def compare_to_best_data_free(rows: list[dict], grids: dict, chosen: dict, own_test: dict) -> None:
    """Paired bootstrap of every tuned row against the data-free method that is best ON VALIDATION."""
    data_free = [m.name for m in METHODS if m.data_free and m.name in grids]
    if not data_free:
        return
    best = max(data_free, key=lambda m: max(r.normalized for r in grids[m]))
    reference = next(r for r in rows if r["name"] == f"{best} (tuned)")
    for row in rows:
        if "items" in row and row is not reference:
            result = paired(row["items"], reference["items"], own_test)
            row["vs_best_data_free"] = {"reference": best, "difference": result.difference, "low": result.low,
                                        "high": result.high, "verdict": result.verdict}


# ----------------------------------------------------------------------------- output


def fmt_ci(value: float, ci) -> str:
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{value:.3f}"


def markdown(meta: dict, result: dict) -> str:
    lines = [f"# Merging eight fine-tunes of SmolLM2-135M, tuned on validation ({meta['date']}, commit "
             f"{meta['commit']})", "", f"- command: `{meta['command']}`", f"- machine: {meta['machine']}",
             f"- grid for every method: lambda in {list(LAMBDAS)} x density in {list(DENSITIES)} (density only where "
             "the method trims); chosen on mean normalized validation accuracy; random methods: seed 0 on "
             f"validation, seeds {list(SEEDS)} on test",
             "- test: per-task accuracy; mean absolute and mean normalized (merged / own fine-tune) accuracy with "
             "95% bootstrap intervals over test items (and seeds); paired bootstrap against the best data-free "
             "method on validation; perplexity on the first "
             f"{PPL_WINDOWS} x 512 held-out Wikipedia windows of `../shared/data/smollm2-wiki/eval_64x512.pt`",
             f"- Wanda norms: the base on {CALIBRATION['nsamples']} x {CALIBRATION['seqlen']} wiki tokens",
             *([f"- **not yet measured** (the run was stopped before their rows were whole; rerun the command to "
                f"resume): {', '.join(result['missing'])}"] if result.get("missing") else []),
             f"- cost on this 2-core CPU: {result.get('compute_seconds', 0) / 3600:.1f} h of merging and evaluation "
             "in all (summed over resumed runs; the fine-tunes' own times are in `testbed.md`)", "",
             "| row | density | lambda | " + " | ".join(TASKS) + " | mean abs [95%] | mean normalized [95%] | "
             "vs best data-free [95%] | ppl |", "|---|---|---|" + "---|" * len(TASKS) + "---|---|---|---|"]
    for r in (r for r in result["rows"] if not r.get("per_density")):
        versus = r.get("vs_best_data_free")
        versus_text = (f"{versus['difference']:+.3f} [{versus['low']:+.3f}, {versus['high']:+.3f}] {versus['verdict']}"
                       if versus else "")
        ppl_text = f"{r['ppl']:.1f}" if r.get("ppl") else ""
        lines.append(
            f"| {r['name']} | {r.get('density') or ''} | {r.get('lambda') or ''} | "
            + " | ".join(f"{r['per_task'][t]:.3f}" for t in TASKS)
            + f" | {fmt_ci(r['absolute'], r.get('absolute_ci'))} | {fmt_ci(r['normalized'], r.get('normalized_ci'))} | "
            + f"{versus_text} | {ppl_text} |")
    lines += plain_words(result)
    lines += density_words(result)
    lines += ["", "## Validation grid: mean normalized validation accuracy (the chosen setting in bold)", "",
              "| method | density | " + " | ".join(f"lambda {lam}" for lam in LAMBDAS) + " |",
              "|---|---|" + "---|" * len(LAMBDAS)]
    for name, grid in result["grids"].items():
        cells = {(g["setting"]["density"], g["setting"]["lambda"]): g["normalized"] for g in grid}
        chosen = (result["chosen"][name]["density"], result["chosen"][name]["lambda"])
        for density in sorted({d for d, _ in cells}, key=lambda d: -1 if d is None else d):
            text = [f"**{cells[(density, lam)]:.3f}**" if (density, lam) == chosen else f"{cells[(density, lam)]:.3f}"
                    for lam in LAMBDAS]
            lines.append(f"| {name} | {'' if density is None else density} | " + " | ".join(text) + " |")
    return "\n".join(lines) + "\n"


def plain_words(result: dict) -> list[str]:
    """Each paired comparison as a sentence: real (the 95% interval excludes 0) or within noise."""
    compared = [r for r in result["rows"] if r.get("vs_best_data_free")]
    if not compared:
        return []
    reference = compared[0]["vs_best_data_free"]["reference"]
    lines = ["", f"## In plain words (paired bootstrap against {reference}, tuned: the best data-free method on "
             "validation)", ""]
    for r in compared:
        v = r["vs_best_data_free"]
        if v["verdict"] == "within noise":
            text = (f"within noise: {v['difference']:+.3f} normalized, and the 95% interval "
                    f"[{v['low']:+.3f}, {v['high']:+.3f}] contains 0")
        else:
            text = (f"really {v['verdict']}: {v['difference']:+.3f} normalized, 95% interval "
                    f"[{v['low']:+.3f}, {v['high']:+.3f}]")
        lines.append(f"- {r['name']}: {text}.")
    return lines


def density_words(result: dict) -> list[str]:
    """The per-density table: Wanda on task activations against magnitude under the same method."""
    pairs = result.get("per_density") or []
    if not pairs:
        return []
    lines = ["", "## Wanda on task activations against magnitude, density by density (test; lambda chosen on "
             "validation at that density; paired bootstrap)", "",
             "| method pair | density | Wanda-task (lambda) | magnitude (lambda) | difference [95%] | verdict |",
             "|---|---|---|---|---|---|"]
    for p in pairs:
        lines.append(f"| {p['wanda']} vs {p['magnitude']} | {p['density']} | {p['wanda_normalized']:.3f} "
                     f"({p['wanda_lambda']}) | {p['magnitude_normalized']:.3f} ({p['magnitude_lambda']}) | "
                     f"{p['difference']:+.3f} [{p['low']:+.3f}, {p['high']:+.3f}] | {p['verdict']} |")
    return lines


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "normalized_ci" in r and not r.get("per_density")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 0.45 * len(rows) + 2.5))
    y = range(len(rows))
    means = [r["normalized"] for r in rows]
    errors = [[m - r["normalized_ci"][0] for m, r in zip(means, rows)],
              [r["normalized_ci"][1] - m for m, r in zip(means, rows)]]
    colors = ["tab:gray" if "items" not in r else "tab:blue" if r.get("data_free") else "tab:orange" for r in rows]
    left.barh(list(y), means, xerr=errors, color=colors, capsize=3)
    left.set_yticks(list(y), [r["name"] for r in rows], fontsize=8)
    left.axvline(1.0, color="black", lw=0.8, ls="--")
    left.set_xlabel("mean normalized test accuracy (merged / own fine-tune), 95% bootstrap interval")
    left.invert_yaxis()
    bars = [r for r in result["rows"]  # with each own fine-tune
            if "per_task" in r and "untuned" not in r["name"] and not r.get("per_density")]
    width = 0.8 / len(bars)
    for k, r in enumerate(bars):
        right.bar([i + k * width for i in range(len(TASKS))], [r["per_task"][t] for t in TASKS], width,
                  label=r["name"], color=plt.cm.tab20(k % 20))
    right.set_xticks([i + 0.4 for i in range(len(TASKS))], TASKS, rotation=30, fontsize=8)
    right.set_ylabel("test accuracy (tuned rows)")
    right.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, argv: list[str]) -> None:
    from wandamerge.io.record import portable, provenance

    meta = portable(provenance([__file__, *argv]))
    public = {"meta": meta, **result,
              "rows": [{k: v for k, v in r.items() if k != "items"} for r in result["rows"]]}
    (HERE / "results" / "merge_testbed.json").write_text(json.dumps(public, indent=2))
    (HERE / "results" / "merge_testbed.md").write_text(markdown(meta, result))
    plot(result, HERE / "results" / "merge_testbed.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", help="these methods only (names as in METHODS)")
    parser.add_argument("--resume", action="store_true", help="accepted for habit: every run resumes from its cache")
    parser.add_argument("--work", type=Path, default=None, help="where merges are written, then deleted")
    parser.add_argument("--report", action="store_true", help="write the tables from what is measured; run nothing")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", min(4, os.cpu_count() or 1))))
    from testbed import reference_records, task_calibration, write_tasks_table
    from wandamerge.models import prepare_smollm2

    base = prepare_smollm2()
    root = default_root()
    paths = build_finetunes(base, root, [*TASKS, "multitask"])
    refs = reference_records(base, paths, Records(root, REFERENCE_RECORDS))
    write_tasks_table(base, paths, refs, [str(HERE / "testbed.py")])  # the same table testbed.py writes
    work = args.work or root / "merges"
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(base, {t: paths[t] for t in TASKS}, root, work, {t: task_calibration(root, t) for t in TASKS})
    bench.report_only = args.report
    methods = [m for m in METHODS if not args.only or m.name in args.only]
    started = time.perf_counter()
    result = run(bench, methods, refs, paths["multitask"])
    result["seconds"] = round(time.perf_counter() - started)
    result["compute_seconds"] = round(sum(v for entry in bench.saved.values() for k, v in entry.items()
                                          if k.startswith("seconds/")))
    write(result, sys.argv[1:])
    print((HERE / "results" / "merge_testbed.md").read_text())


if __name__ == "__main__":
    main()
