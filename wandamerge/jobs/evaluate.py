"""The evaluate job: perplexity and zero-shot tasks of one model, with merge-aware references.

For a merged model, each task can name the fine-tune it belongs to: that task
is also run on the fine-tune and on the base model, and the report gives the
merge's accuracy relative to the fine-tune's (the *normalized accuracy*, per
task and averaged) and the spread across tasks. Reference results are cached
(keyed by the model's files, the task and the settings), so a grid of merges
evaluates its base and fine-tunes once.

:class:`EvalConfig` declares the settings once: it is a run recipe's
``evaluate:`` section, and ``wandamerge eval`` builds one from its options.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any, Literal, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..calibration import evaluation_windows, window_length
from ..errors import ConfigError, ModelError
from ..evaluation.perplexity import perplexity
from ..evaluation.zeroshot import resolve_task, zero_shot
from ..io.record import peak_memory, versions
from ..io.resolve import default_cache_dir
from ..io.dtypes import DTYPE_NAMES
from ..models import load_model, resolve_model
from ..recipe import expand_home

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"


class PerplexitySettings(BaseModel):
    """Perplexity on held-out text: ``data`` (wiki = held-out articles, a text or token file), in
    ``windows`` windows (0: all) of ``seqlen`` tokens (default: the model's context, at most 2048), re-cut
    every ``stride`` tokens when given (each token still scored once)."""

    model_config = ConfigDict(extra="forbid")
    data: str = "wiki"
    windows: int = Field(64, ge=0)
    seqlen: int | None = Field(None, gt=0)
    stride: int | None = Field(None, gt=0)


class TaskEntry(BaseModel):
    """A task (an offline task name, an lm-eval task YAML or registry name) and the fine-tune it belongs to."""

    model_config = ConfigDict(extra="forbid")
    task: str
    finetuned: str | None = None  # the fine-tune whose task this is (merges: normalized accuracy)
    _home = field_validator("task", "finetuned", mode="before")(expand_home)


class EvalConfig(BaseModel):
    """Every setting of an evaluation (a run recipe's ``evaluate:`` section; ``wandamerge eval``'s options)."""

    model_config = ConfigDict(extra="forbid")
    perplexity: Union[PerplexitySettings, bool] = True
    tasks: list[Union[str, TaskEntry]] = Field(default_factory=list)
    limit: Union[int, float, None] = Field(None, gt=0)  # examples per task (a fraction if < 1)
    batch_size: int = Field(16, gt=0)
    compare_base: bool = True  # run every task on the base model too (when one is given)
    seed: int = 0
    dtype: Literal[DTYPE_NAMES] = "float32"

    def perplexity_settings(self) -> PerplexitySettings | None:
        if isinstance(self.perplexity, PerplexitySettings):
            return self.perplexity
        return PerplexitySettings() if self.perplexity else None

    def task_specs(self) -> list[str]:
        return [t if isinstance(t, str) else t.task for t in self.tasks]

    def finetuned_by_name(self) -> dict[str, str]:
        """The fine-tune of each task that names one, keyed by the task's resolved name."""
        return {resolve_task(t.task)[0]: t.finetuned for t in self.tasks
                if isinstance(t, TaskEntry) and t.finetuned}

    def with_finetuned(self, pairs: dict[str, str]) -> "EvalConfig":
        """This config with fine-tunes attached to its tasks: ``pairs`` maps a task (as given, or its
        resolved name) to the fine-tune it belongs to."""
        entries = [TaskEntry(task=t) if isinstance(t, str) else t for t in self.tasks]
        for key, path in pairs.items():
            match = [e for e in entries if e.task == key] or [e for e in entries if resolve_task(e.task)[0] == key]
            if not match:
                names = [resolve_task(e.task)[0] for e in entries]
                raise ConfigError(f"fine-tune given for task {key!r}, which is not among the tasks {names}")
            match[0].finetuned = path
        return self.model_copy(update={"tasks": entries})


def load_for_eval(spec: str, base: str | None = None, dtype: str = "float32"):
    """A model to evaluate: a model directory, ``.gguf``, hub id, embedded name, or a PEFT LoRA adapter
    directory (merged into ``base`` or the base the adapter names)."""
    path = Path(spec)
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        config = json.loads((path / "adapter_config.json").read_text())
        base_spec = base or config.get("base_model_name_or_path")
        if not base_spec:
            raise ModelError(f"{spec} is a LoRA adapter that names no base model; give the base")
        model, tokenizer = load_model(resolve_model(base_spec), dtype=dtype)
        return PeftModel.from_pretrained(model, str(path)).merge_and_unload().eval(), tokenizer
    model, tokenizer = load_model(resolve_model(spec), dtype=dtype)
    return model.eval(), tokenizer


def fine_tune_base(spec: str, base: str | None) -> str | None:
    """What a fine-tune given as a LoRA adapter is merged into for its reference accuracy: the base it names when
    that is a local model (it was trained on it; the evaluated model's ``base`` may be another, e.g. the unpruned
    merge a prune run compares against), else ``base``."""
    config_file = Path(spec) / "adapter_config.json"
    if not config_file.is_file():
        return base
    named = json.loads(config_file.read_text()).get("base_model_name_or_path")
    return named if named and Path(named).expanduser().exists() else base


def model_fingerprint(spec: str) -> str:
    """Names, sizes and modification times of a model's files (cheap; for the reference cache)."""
    path = Path(spec)
    if not path.exists():
        return spec
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    text = "|".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    return hashlib.sha256(f"{path.resolve()}|{text}".encode()).hexdigest()[:24]


def _cached_task(spec: str, task, settings: dict, base: str | None, run) -> dict:
    import lm_eval

    _, what, include = resolve_task(task)  # the task's definition is part of the key, not only its name
    definition = what if isinstance(what, dict) else [what, include]
    if isinstance(task, str) and task.endswith((".yaml", ".yml")):
        definition.append(Path(task).read_text())
    key = hashlib.sha256(json.dumps([model_fingerprint(spec), definition, settings, base, lm_eval.__version__],
                                    sort_keys=True, default=str).encode()).hexdigest()[:32]
    cache = default_cache_dir() / "eval-cache" / f"{key}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    result = run()
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result))
    return result


def evaluate(model: str | None, out: str | Path | None = None, config: EvalConfig | None = None, *,
             base: str | None = None, device: str = "cpu", lm=None, tokenizer=None, overwrite: bool = False,
             name: str | None = None, progress: bool = True) -> dict:
    """Evaluate a model (a path/spec, or ``lm`` + ``tokenizer`` in memory) as ``config`` says; write
    ``results.json`` and ``report.md`` to ``out`` if given. ``base`` bases LoRA adapters and, with
    ``config.compare_base``, every task also runs on it."""
    config = config or EvalConfig()
    if lm is None and model is None:
        raise ConfigError("evaluate needs a model path or an in-memory model")
    finetuned = config.finetuned_by_name()
    out_path = Path(out) if out else None
    if out_path is not None and (out_path / RESULTS_FILE).exists() and not overwrite:
        raise FileExistsError(f"{out_path} already holds results; choose another directory or --overwrite")
    torch.manual_seed(config.seed)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    if lm is None:
        lm, tokenizer = load_for_eval(model, base=base, dtype=config.dtype)
    seconds["load"] = round(time.perf_counter() - t0, 3)
    results = _results_header(model, config, base, device, finetuned, name)
    ppl = config.perplexity_settings()
    if ppl is not None:
        t0 = time.perf_counter()
        results["perplexity"] = _perplexity(lm, tokenizer, ppl, device, progress)
        seconds["perplexity"] = round(time.perf_counter() - t0, 3)
    if config.tasks:
        t0 = time.perf_counter()
        results["tasks"] = zero_shot(lm, tokenizer, config.task_specs(), limit=config.limit,
                                     batch_size=config.batch_size, device=device, seed=config.seed)
        seconds["tasks"] = round(time.perf_counter() - t0, 3)
    del lm
    compare_base = base if config.compare_base and config.tasks else None
    if finetuned or compare_base:
        t0 = time.perf_counter()
        results["references"] = _references(config, finetuned, base, compare_base, device)
        results["normalized"] = normalized_accuracy(results["tasks"], results["references"]["finetuned"])
        seconds["references"] = round(time.perf_counter() - t0, 3)
    results["seconds"] = seconds
    results["peak_memory"] = peak_memory(device)
    if out_path is not None:
        write_results(results, out_path)
    return results


def _results_header(model: str | None, config: EvalConfig, base: str | None, device: str,
                    finetuned: dict[str, str], name: str | None) -> dict[str, Any]:
    ppl = config.perplexity_settings()
    results: dict[str, Any] = {
        "job": "eval", "name": name or (Path(model).name if model else "in-memory model"), "model": model,
        "settings": {"ppl_data": ppl.data if ppl else None, "seqlen": ppl.seqlen if ppl else None,
                     "windows": ppl.windows if ppl else None, "stride": ppl.stride if ppl else None,
                     "tasks": config.task_specs(), "limit": config.limit, "batch_size": config.batch_size,
                     "device": device, "dtype": config.dtype, "base": base, "finetuned": finetuned},
        "seed": config.seed, "versions": versions(), "perplexity": None, "tasks": {}, "references": {},
        "normalized": None,
    }
    record = Path(model) / "wandamerge.json" if model else None
    if record is not None and record.is_file():
        results["record"] = json.loads(record.read_text())
    return results


def _perplexity(lm, tokenizer, ppl: PerplexitySettings, device: str, progress: bool) -> dict:
    length = window_length(lm.config, ppl.seqlen)
    data = evaluation_windows(ppl.data, tokenizer, length, max_windows=ppl.windows or None,
                              vocab_size=lm.config.vocab_size)
    value = perplexity(lm, data, device=device, stride=ppl.stride, progress=progress)
    log.info("perplexity %.3f on %s", value, ppl.data)
    return {"data": ppl.data, "seqlen": int(data.shape[1]), "windows": int(data.shape[0]), "stride": ppl.stride,
            "value": value}


def _references(config: EvalConfig, finetuned: dict[str, str], base: str | None, compare_base: str | None,
                device: str) -> dict[str, Any]:
    """Each task on its fine-tune, and (``compare_base``) every task on the base: cached results."""
    settings = {"limit": config.limit, "seed": config.seed, "dtype": config.dtype}
    by_name = {resolve_task(t)[0]: t for t in config.task_specs()}

    def run_on(spec: str, task: str, adapter_base: str | None):
        def run():
            ref_lm, ref_tok = load_for_eval(spec, base=adapter_base, dtype=config.dtype)
            return zero_shot(ref_lm, ref_tok, [by_name[task]], limit=config.limit, batch_size=config.batch_size,
                             device=device, seed=config.seed)[task]
        return _cached_task(spec, by_name[task], settings, adapter_base, run)

    references: dict[str, Any] = {"finetuned": {}, "base": {}}
    for task, spec in finetuned.items():
        references["finetuned"][task] = {"model": spec, **run_on(spec, task, fine_tune_base(spec, base))}
    if compare_base:
        for task in by_name:
            references["base"][task] = {"model": compare_base, **run_on(compare_base, task, None)}
    return references


def normalized_accuracy(tasks: dict[str, dict], finetuned: dict[str, dict]) -> dict | None:
    """Per task, merged accuracy / the fine-tune's accuracy on its own task; the mean and the spread."""
    per_task = {t: tasks[t]["acc"] / finetuned[t]["acc"] for t in finetuned
                if t in tasks and finetuned[t].get("acc")}
    if not per_task:
        return None
    accs = [tasks[t]["acc"] for t in per_task]
    values = list(per_task.values())
    return {"per_task": per_task, "mean": statistics.fmean(values),
            "spread": {"min": min(values), "max": max(values),
                       "std": statistics.pstdev(values) if len(values) > 1 else 0.0},
            "mean_accuracy": statistics.fmean(accs)}


def write_results(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for filename, text in ((RESULTS_FILE, json.dumps(results, indent=2)), ("report.md", results_markdown(results))):
        tmp = out / f".{filename}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / filename)


def results_markdown(results: dict) -> str:
    """A one-model report: perplexity, task accuracies, references and normalized accuracy."""
    lines = [f"# Evaluation of {results['name']}", ""]
    if results.get("model"):
        lines += [f"- model: `{results['model']}`"]
    record = results.get("record")
    if record:
        lines += [f"- made by: wandamerge {record.get('job')} ({describe_record(record)})"]
    v = results["versions"]
    lines += [f"- versions: wandamerge {v['wandamerge']}, torch {v['torch']}, transformers {v['transformers']}",
              f"- seed: {results['seed']}", ""]
    ppl = results.get("perplexity")
    if ppl:
        lines += ["| perplexity | data | windows x seqlen | stride |", "|---|---|---|---|",
                  f"| {ppl['value']:.3f} | {ppl['data']} | {ppl['windows']} x {ppl['seqlen']} | "
                  f"{ppl['stride'] or 'none'} |", ""]
    if results["tasks"]:
        refs = results.get("references") or {}
        norm = (results.get("normalized") or {}).get("per_task", {})
        lines += ["| task | acc | ± stderr | acc_norm | n | base acc | fine-tune acc | normalized |",
                  "|---|---|---|---|---|---|---|---|"]
        for task, row in results["tasks"].items():
            base_acc = refs.get("base", {}).get(task, {}).get("acc")
            ft_acc = refs.get("finetuned", {}).get(task, {}).get("acc")
            lines.append(f"| {task} | {_f(row.get('acc'))} | {_f(row.get('acc_stderr'))} | "
                         f"{_f(row.get('acc_norm'))} | {row.get('n', '')} | {_f(base_acc)} | {_f(ft_acc)} | "
                         f"{_f(norm.get(task))} |")
        lines.append("")
        if results.get("normalized"):
            n = results["normalized"]
            lines += [f"Normalized accuracy (merged / fine-tuned), mean over {len(n['per_task'])} tasks: "
                      f"**{n['mean']:.3f}** (min {n['spread']['min']:.3f}, max {n['spread']['max']:.3f}, "
                      f"std {n['spread']['std']:.3f}).", ""]
        sources = {t: r["source"] for t, r in results["tasks"].items() if r.get("source")}
        if sources:
            lines += ["Task data:", *[f"- {t}: {s}" for t, s in sources.items()], ""]
    return "\n".join(lines)


def describe_record(record: dict) -> str:
    """A short description of a prune or merge record."""
    if record.get("job") == "prune":
        s = record["settings"]
        shape = s.get("pattern") or f"{s.get('sparsity', 0):.0%}"
        return f"{s['method']} {shape}, per {s.get('group', 'row')}"
    if record.get("job") == "merge":
        recipe = record.get("recipe", {})
        densities = sorted({str((m.get("parameters") or {}).get("density", "")) for m in recipe.get("models", [])}
                           - {""})
        return (f"{recipe.get('merge_method')} with {record.get('score')} scores"
                + (f", density {'/'.join(densities)}" if densities else "")
                + (f", {record.get('pattern')}" if record.get("pattern") not in (None, "unstructured") else ""))
    return str(record.get("job"))


def _f(value) -> str:
    return "" if value is None else f"{value:.3f}"
