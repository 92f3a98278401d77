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

A merge recipe with a ``prune:`` section (no ``model:`` in it) merges, then
prunes the merged model (for example Wanda 2:4, calibrated on the tasks' own
data or on text), then evaluates both: a merged model that is also sparse, in
one command and one report.

``DIR`` receives ``model/`` (the pruned or merged model), ``results.json`` and
``report.md`` (the evaluation), and ``report/`` (Markdown, HTML and plots); a
merge-then-prune run also ``merged/`` (the dense merge, with its own
``model/`` and ``results.json``), and its report shows the two side by side.
Everything is validated before any model is loaded. The ``prune:`` section is
a :class:`~.prune.PruneConfig` and ``evaluate:`` an :class:`~.evaluate.EvalConfig`:
the same configs as ``wandamerge prune`` and ``wandamerge eval``.
"""

from __future__ import annotations

import json
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


MERGED = "(the merged model)"  # a merge-then-prune recipe's prune.model until the merge is written


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
    merges = any(key in data for key in ("merge_method", "slices", "modules"))
    for name, model in (("evaluate", EvalConfig), ("prune", PruneConfig)):
        if name in data:
            raw = data.pop(name)
            if raw is None and name == "evaluate":
                continue
            if not isinstance(raw, dict):
                raise RecipeError(f"{source}: {name} must be a mapping (key: value, ...)")
            if name == "prune" and merges:  # the merged model, known once the merge is done
                raw = {"model": MERGED, **raw}
            sections[name] = validated(model, raw, source, section=name)
    evaluation = sections.get("evaluate", EvalConfig())
    if "prune" in sections and not data:
        return RunRecipe(prune=sections["prune"], evaluate=evaluation)
    if not data:
        raise RecipeError(f"{source}: nothing to run; give a prune: section or a merge recipe")
    merge_recipe = parse_recipe(data, source)
    if "prune" in sections and sections["prune"].model != MERGED:
        raise RecipeError(f"{source}: a merge recipe's prune: section prunes the merged model; remove its "
                          f"model: ({sections['prune'].model})")
    return RunRecipe(merge=merge_recipe, prune=sections.get("prune"), evaluate=evaluation)


def load_run_recipe(path: str | Path) -> tuple[RunRecipe, str]:
    """Validate a run recipe file (no model is loaded); returns it and its text."""
    data, text = read_recipe_file(path)
    return parse_run_recipe(data, str(path)), text


def run_recipe(path: str | Path, out: str | Path, *, device: str = "cpu", overwrite: bool = False,
               progress: bool = True) -> dict:
    """Run a recipe's prune or merge, then its evaluation, then the report. Returns the evaluation results."""
    recipe, text = load_run_recipe(path)
    sources = recipe.merge.referenced_models() if recipe.merge else [recipe.prune.model]
    out_path = check_output_dir(out, [s for s in sources if Path(s).exists()], overwrite)
    t0 = time.perf_counter()
    with staged_output(out_path, overwrite) as tmp:  # a killed run leaves nothing half-written
        (tmp / "recipe.yaml").write_text(text)
        runs = _make_models(recipe, text, tmp, device, progress)
        if recipe.merge is not None and recipe.prune is not None:
            _name_merged_source(tmp / "model", tmp / "merged" / "model", out_path / "merged" / "model")
        log.info("[1/3] done in %.1f s", time.perf_counter() - t0)
        log.info("[2/3] evaluating: %s", ", ".join((["perplexity"] if recipe.evaluate.perplexity_settings() else [])
                                                    + recipe.evaluate.task_specs()) or "nothing asked")
        for run_dir, base in runs:
            results = evaluate(str(run_dir / "model"), None, recipe.evaluate, base=base, device=device,
                               name=out_path.name if run_dir == tmp else f"{out_path.name} ({run_dir.name})",
                               progress=progress)
            results["model"] = str(out_path / run_dir.relative_to(tmp) / "model")
            results["recipe"] = str(Path(path).resolve())
            write_results(results, run_dir)
        log.info("[3/3] writing the report")
        build_report([run_dir for run_dir, _ in runs], tmp / "report", title=f"wandamerge run {out_path.name}")
    log.info("run written to %s (%.1f s)", out_path, time.perf_counter() - t0)
    return results


def _name_merged_source(pruned: Path, staged: Path, final: Path) -> None:
    """The pruned model's record and card name the merge it came from where the run leaves it, not where it
    was staged."""
    record_file, card = pruned / "wandamerge.json", pruned / "README.md"
    record = json.loads(record_file.read_text())
    record["model"] = record["model_source"] = str(final)
    record_file.write_text(json.dumps(record, indent=2))
    if card.is_file():
        card.write_text(card.read_text().replace(str(staged), str(final)))


def _make_models(recipe: RunRecipe, text: str, tmp: Path, device: str, progress: bool) -> list[tuple[Path, str | None]]:
    """Prune or merge (or merge, then prune the merge) under ``tmp``: each run folder holding a ``model/``, with
    the model its evaluation compares against (the unpruned one, or the merge's base), the final one last."""
    if recipe.merge is None:
        config = recipe.prune.model_copy(update={"device": device})
        log.info("[1/3] pruning %s with %s", config.model, config.method)
        run_prune(config, tmp / "model", progress=progress)
        return [(tmp, resolve_model(config.model))]
    merge_recipe: Recipe = recipe.merge
    merged = tmp / "merged" if recipe.prune else tmp
    log.info("[1/3] merging %d models with %s", len(merge_recipe.input_models()), merge_recipe.merge_method)
    merge(merge_recipe, merged / "model", recipe_text=text, device=device, progress=progress)
    if recipe.prune is None:
        return [(tmp, merge_recipe.base_model)]
    config = recipe.prune.model_copy(update={"device": device, "model": str(merged / "model")})
    log.info("[1/3] pruning the merged model with %s", config.method)
    run_prune(config, tmp / "model", progress=progress)
    return [(merged, merge_recipe.base_model), (tmp, merge_recipe.base_model)]
