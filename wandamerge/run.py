"""``wandamerge run RECIPE.yaml -o DIR``: a prune or a merge, its evaluation and the report, in one command.

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
Everything is validated before any model is loaded.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .recipe import RecipeError, closest, parse_recipe, read_recipe_file
from .recipe import _expand_home as expand_home

log = logging.getLogger(__name__)


class PerplexitySection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: str = "wiki"
    windows: int = Field(64, ge=0)  # 0: all
    seqlen: int | None = Field(None, gt=0)
    stride: int | None = Field(None, gt=0)


class TaskEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: str
    finetuned: str | None = None  # the fine-tune whose task this is (merges: normalized accuracy)
    _home = field_validator("task", "finetuned", mode="before")(expand_home)


class EvaluateSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    perplexity: Union[PerplexitySection, bool] = True
    tasks: list[Union[str, TaskEntry]] = Field(default_factory=list)
    limit: Union[int, float, None] = Field(None, gt=0)
    batch_size: int = Field(16, gt=0)
    compare_base: bool = True
    seed: int = 0


class PruneSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    _home = field_validator("model", mode="before")(expand_home)
    method: str = "wanda"
    sparsity: float = Field(0.5, ge=0, lt=1)
    pattern: str | None = None
    group: Literal["row", "tensor"] = "row"
    variant: bool = False
    update: bool = False
    calib: str = "wiki"
    nsamples: int = Field(128, gt=0)
    seqlen: int | None = Field(None, gt=0)
    seed: int = 0
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    batch_size: int | None = Field(None, gt=0)
    within_block: Literal["sequential", "parallel"] = "sequential"

    @field_validator("pattern")
    @classmethod
    def valid_pattern(cls, value):
        if value is not None:
            from .pruning.masks import parse_pattern

            parse_pattern(value)
        return value

    @model_validator(mode="after")
    def known_method(self):
        from .pruning.methods import PRUNE_METHODS

        if self.method not in PRUNE_METHODS:
            raise ValueError(f"unknown prune method {self.method!r}{closest(self.method, PRUNE_METHODS)}")
        return self


class RunRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    prune: PruneSection | None = None
    merge: Any = None  # a MergeRecipe, validated by recipe.parse_recipe
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)


SECTIONS = {"prune": PruneSection, "evaluate": EvaluateSection, "perplexity": PerplexitySection,
            "tasks": TaskEntry}


def _explain(exc: ValidationError, source: str, section: str) -> str:
    errors = exc.errors()
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = [str(p) for p in err["loc"] if not str(p).startswith(("function-", "union[", "list[", "str", "bool",
                                                                      "PerplexitySection", "TaskEntry"))]
    where = ".".join([section, *loc])
    if err["type"] == "extra_forbidden":
        parents = [p for p in loc[:-1] if not p.isdigit()]
        model = SECTIONS.get(parents[-1] if parents else section, SECTIONS[section])
        return f"{source}: unknown key {where!r}{closest(loc[-1], list(model.model_fields))}"
    if err["type"] == "missing":
        return f"{source}: missing required key {where!r}"
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] not in ("value_error", "assertion_error"):
        message += f", got {str(err.get('input'))[:60]!r}"
    return f"{source}: {where}: {message}"


def parse_run_recipe(data: Any, source: str = "recipe") -> RunRecipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a run recipe is a YAML mapping (a merge recipe or a prune: section, "
                          "plus evaluate:)")
    data = dict(data)
    sections: dict[str, Any] = {}
    for name, model in (("evaluate", EvaluateSection), ("prune", PruneSection)):
        if name in data:
            raw = data.pop(name)
            if raw is None and name == "evaluate":
                continue
            if not isinstance(raw, dict):
                raise RecipeError(f"{source}: {name} must be a mapping (key: value, ...)")
            try:
                sections[name] = model.model_validate(raw)
            except ValidationError as exc:
                raise RecipeError(_explain(exc, source, name)) from None
    if "prune" in sections:
        if data:
            raise RecipeError(f"{source}: a prune run has no merge keys ({', '.join(sorted(map(str, data)))}); "
                              "a recipe either prunes or merges")
        return RunRecipe(prune=sections["prune"], evaluate=sections.get("evaluate", EvaluateSection()))
    if not data:
        raise RecipeError(f"{source}: nothing to run; give a prune: section or a merge recipe")
    return RunRecipe(merge=parse_recipe(data, source), evaluate=sections.get("evaluate", EvaluateSection()))


def load_run_recipe(path: str | Path) -> tuple[RunRecipe, str]:
    """Validate a run recipe file (no model is loaded); returns it and its text."""
    data, text = read_recipe_file(path)
    return parse_run_recipe(data, str(path)), text


def run_recipe(path: str | Path, out: str | Path, *, device: str = "cpu", overwrite: bool = False,
               progress: bool = True) -> dict:
    """Run a recipe's prune or merge, then its evaluation, then the report. Returns the evaluation results."""
    from .evaluation.evaluate import evaluate, write_results
    from .models import check_output_dir, staged_output
    from .pipeline import prune_to_directory, resolve_model
    from .report import build_report

    recipe, text = load_run_recipe(path)
    sources = [recipe.prune.model] if recipe.prune else [m.model for m in recipe.merge.models] + (
        [recipe.merge.base_model] if recipe.merge.base_model else [])
    out_path = check_output_dir(out, [s for s in sources if Path(s).exists()], overwrite)
    t0 = time.perf_counter()
    with staged_output(out_path, overwrite) as tmp:  # a killed run leaves nothing half-written
        (tmp / "recipe.yaml").write_text(text)
        model_dir = tmp / "model"
        if recipe.prune:
            p = recipe.prune
            log.info("[1/3] pruning %s with %s", p.model, p.method)
            prune_to_directory(p.model, model_dir, method=p.method, sparsity=p.sparsity, pattern=p.pattern,
                               group=p.group, variant=p.variant, update=p.update, calib=p.calib,
                               nsamples=p.nsamples, seqlen=p.seqlen, seed=p.seed, device=device, dtype=p.dtype,
                               batch_size=p.batch_size, within_block=p.within_block, progress=progress)
            base = resolve_model(p.model)
        else:
            from .merging.merge import merge

            log.info("[1/3] merging %d models with %s", len(recipe.merge.models), recipe.merge.merge_method)
            merge(recipe.merge, model_dir, recipe_text=text, device=device, progress=progress)
            base = recipe.merge.base_model
        log.info("[1/3] done in %.1f s", time.perf_counter() - t0)

        ev = recipe.evaluate
        ppl = ev.perplexity if isinstance(ev.perplexity, PerplexitySection) else (
            PerplexitySection() if ev.perplexity else None)
        tasks = [t if isinstance(t, str) else t.task for t in ev.tasks]
        finetuned = {t.task: t.finetuned for t in ev.tasks if isinstance(t, TaskEntry) and t.finetuned}
        log.info("[2/3] evaluating: %s", ", ".join((["perplexity"] if ppl else []) + tasks) or "nothing asked")
        results = evaluate(str(model_dir), None, ppl_data=ppl.data if ppl else None,
                           seqlen=ppl.seqlen if ppl else None, windows=ppl.windows if ppl else None,
                           stride=ppl.stride if ppl else None, tasks=tasks, finetuned=finetuned,
                           base=base if (ev.compare_base and tasks) or finetuned else None, limit=ev.limit,
                           batch_size=ev.batch_size, device=device, seed=ev.seed, name=out_path.name,
                           progress=progress)
        results["model"] = str(out_path / "model")
        results["recipe"] = str(Path(path).resolve())
        write_results(results, tmp)
        log.info("[3/3] writing the report")
        build_report([tmp], tmp / "report", title=f"wandamerge run {out_path.name}")
    log.info("run written to %s (%.1f s)", out_path, time.perf_counter() - t0)
    return results
