"""The run job (``wandamerge run RECIPE.yaml -o DIR``): a prune or a merge, its evaluation and the report.

A run recipe is a merge recipe (mergekit's keys plus ours) or a ``prune:``
section, plus an optional ``evaluate:`` section::

    prune:                       # or: merge_method / base_model / models ... as in `wandamerge merge`
      model: smollm2
      method: wanda
      sparsity: 0.5              # or pattern: "2:4"
      calib: wiki
      nsamples: 32
      seqlen: 512
    evaluate:
      perplexity: {data: wiki, windows: 32, seqlen: 512}   # or false
      tasks:                     # offline task names, lm-eval YAML paths or lm-eval registry names
        - polarity
        - {task: tweets, finetuned: /path/to/tweets-lora}   # the fine-tune this task belongs to
      limit: 100                 # examples per task (all if absent)
      compare_base: true         # also run the tasks on the base (merge) or unpruned (prune) model

``DIR`` receives ``model/`` (the pruned or merged model), ``results.json`` and
``report.md`` (the evaluation), and ``report/`` (Markdown, HTML and plots).
Everything is validated before any model is loaded. The ``prune:`` section is
a :class:`~.prune.PruneConfig` and ``evaluate:`` an :class:`~.evaluate.EvalConfig`:
the same configs as ``wandamerge prune`` and ``wandamerge eval``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..errors import RecipeError
from ..io.staging import check_output_dir, staged_output
from ..models import resolve_model
from ..recipe import Recipe, parse_recipe, read_recipe_file, validated
from ..report import build_report
from .evaluate import EvalConfig, evaluate, write_results
from .merge import merge
from .prune import PruneConfig, run_prune

log = logging.getLogger(__name__)


class RunRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    prune: PruneConfig | None = None
    merge: Any = None  # a MergeRecipe or SlicesRecipe, validated by recipe.parse_recipe
    evaluate: EvalConfig = Field(default_factory=EvalConfig)


def parse_run_recipe(data: Any, source: str = "recipe") -> RunRecipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a run recipe is a YAML mapping (a merge recipe or a prune: section, "
                          "plus evaluate:)")
    data = dict(data)
    sections: dict[str, Any] = {}
    for name, model in (("evaluate", EvalConfig), ("prune", PruneConfig)):
        if name in data:
            raw = data.pop(name)
            if raw is None and name == "evaluate":
                continue
            if not isinstance(raw, dict):
                raise RecipeError(f"{source}: {name} must be a mapping (key: value, ...)")
            sections[name] = validated(model, raw, source, section=name)
    evaluation = sections.get("evaluate", EvalConfig())
    if "prune" in sections:
        if data:
            raise RecipeError(f"{source}: a prune run has no merge keys ({', '.join(sorted(map(str, data)))}); "
                              "a recipe either prunes or merges")
        return RunRecipe(prune=sections["prune"], evaluate=evaluation)
    if not data:
        raise RecipeError(f"{source}: nothing to run; give a prune: section or a merge recipe")
    return RunRecipe(merge=parse_recipe(data, source), evaluate=evaluation)


def load_run_recipe(path: str | Path) -> tuple[RunRecipe, str]:
    """Validate a run recipe file (no model is loaded); returns it and its text."""
    data, text = read_recipe_file(path)
    return parse_run_recipe(data, str(path)), text


def run_recipe(path: str | Path, out: str | Path, *, device: str = "cpu", overwrite: bool = False,
               progress: bool = True) -> dict:
    """Run a recipe's prune or merge, then its evaluation, then the report. Returns the evaluation results."""
    recipe, text = load_run_recipe(path)
    sources = [recipe.prune.model] if recipe.prune else recipe.merge.referenced_models()
    out_path = check_output_dir(out, [s for s in sources if Path(s).exists()], overwrite)
    t0 = time.perf_counter()
    with staged_output(out_path, overwrite) as tmp:  # a killed run leaves nothing half-written
        (tmp / "recipe.yaml").write_text(text)
        base = _make_model(recipe, text, tmp / "model", device, progress)
        log.info("[1/3] done in %.1f s", time.perf_counter() - t0)
        log.info("[2/3] evaluating: %s", ", ".join((["perplexity"] if recipe.evaluate.perplexity_settings() else [])
                                                    + recipe.evaluate.task_specs()) or "nothing asked")
        results = evaluate(str(tmp / "model"), None, recipe.evaluate, base=base, device=device, name=out_path.name,
                           progress=progress)
        results["model"] = str(out_path / "model")
        results["recipe"] = str(Path(path).resolve())
        write_results(results, tmp)
        log.info("[3/3] writing the report")
        build_report([tmp], tmp / "report", title=f"wandamerge run {out_path.name}")
    log.info("run written to %s (%.1f s)", out_path, time.perf_counter() - t0)
    return results


def _make_model(recipe: RunRecipe, text: str, model_dir: Path, device: str, progress: bool) -> str | None:
    """Prune or merge into ``model_dir``; the model to compare against (the unpruned one, or the merge's base)."""
    if recipe.prune:
        config = recipe.prune.model_copy(update={"device": device})
        log.info("[1/3] pruning %s with %s", config.model, config.method)
        run_prune(config, model_dir, progress=progress)
        return resolve_model(config.model)
    merge_recipe: Recipe = recipe.merge
    log.info("[1/3] merging %d models with %s", len(merge_recipe.input_models()), merge_recipe.merge_method)
    merge(merge_recipe, model_dir, recipe_text=text, device=device, progress=progress)
    return merge_recipe.base_model
