"""``wandamerge eval``: perplexity and zero-shot tasks of one model, with merge-aware references.

For a merged model, each task can name the fine-tune it belongs to: that task
is also run on the fine-tune and on the base model, and the report gives the
merge's accuracy relative to the fine-tune's (the *normalized accuracy*, per
task and averaged) and the spread across tasks. Reference results are cached
(keyed by the model's files, the task and the settings), so a grid of merges
evaluates its base and fine-tunes once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"


def load_for_eval(spec: str, base: str | None = None, dtype: str = "float32"):
    """A model to evaluate: a model directory, ``.gguf``, hub id, embedded name, or a PEFT LoRA adapter
    directory (merged into ``base`` or the base the adapter names)."""
    from ..models import ModelError, load_model
    from ..pipeline import resolve_model

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


def model_fingerprint(spec: str) -> str:
    """Names, sizes and modification times of a model's files (cheap; for the reference cache)."""
    path = Path(spec)
    if not path.exists():
        return spec
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    text = "|".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    return hashlib.sha256(f"{path.resolve()}|{text}".encode()).hexdigest()[:24]


def _cached_task(spec: str, task, settings: dict, base: str | None, run) -> dict:
    from ..models import default_cache_dir
    from .zeroshot import resolve_task

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


def evaluate(model: str | None = None, out: str | Path | None = None, *, lm=None, tokenizer=None,
             ppl_data: str | None = "wiki", seqlen: int | None = None, windows: int | None = 64,
             stride: int | None = None, tasks: list | None = None, finetuned: dict[str, str] | None = None,
             base: str | None = None, limit: int | float | None = None, batch_size: int = 16,
             device: str = "cpu", dtype: str = "float32", seed: int = 0, overwrite: bool = False,
             name: str | None = None, progress: bool = True) -> dict:
    """Evaluate a model (a path/spec, or ``lm`` + ``tokenizer`` in memory); write ``results.json`` and
    ``report.md`` to ``out`` if given. ``finetuned`` maps a task to the fine-tune it belongs to."""
    from ..calibration import evaluation_windows
    from ..pipeline import _peak_memory, versions
    from .perplexity import perplexity
    from .zeroshot import resolve_task, zero_shot

    if lm is None and model is None:
        raise ValueError("evaluate needs a model path or an in-memory model")
    tasks = list(tasks or [])
    finetuned = dict(finetuned or {})
    task_names = [resolve_task(t)[0] for t in tasks]
    by_spec = {t: n for t, n in zip(tasks, task_names) if isinstance(t, str)}
    finetuned = {by_spec.get(task, task): path for task, path in finetuned.items()}  # a spec names its task
    for task in finetuned:
        if task not in task_names:
            raise ValueError(f"fine-tune given for task {task!r}, which is not among the tasks {task_names}")
    if windows is not None and windows < 0:
        raise ValueError(f"windows must be >= 0, got {windows}")
    out_path = Path(out) if out else None
    if out_path is not None and out_path.exists() and any(out_path.iterdir()) and not overwrite:
        if (out_path / RESULTS_FILE).exists():
            raise FileExistsError(f"{out_path} already holds results; choose another directory or --overwrite")
    torch.manual_seed(seed)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    if lm is None:
        lm, tokenizer = load_for_eval(model, base=base, dtype=dtype)
    seconds["load"] = round(time.perf_counter() - t0, 3)

    results: dict[str, Any] = {
        "job": "eval", "name": name or (Path(model).name if model else "in-memory model"), "model": model,
        "settings": {"ppl_data": ppl_data, "seqlen": seqlen, "windows": windows, "stride": stride,
                     "tasks": [t if isinstance(t, str) else t.get("task") for t in tasks], "limit": limit,
                     "batch_size": batch_size, "device": device, "dtype": dtype, "base": base,
                     "finetuned": finetuned},
        "seed": seed, "versions": versions(), "perplexity": None, "tasks": {}, "references": {},
        "normalized": None,
    }
    record = Path(model) / "wandamerge.json" if model else None
    if record is not None and record.is_file():
        results["record"] = json.loads(record.read_text())

    if ppl_data:
        t0 = time.perf_counter()
        context = int(getattr(lm.config, "max_position_embeddings", 2048) or 2048)
        length = seqlen or min(context, 2048)
        if length > context:
            raise ValueError(f"seqlen {length} exceeds the model's context of {context} tokens")
        data = evaluation_windows(ppl_data, tokenizer, length, max_windows=windows or None,
                                  vocab_size=lm.config.vocab_size)
        value = perplexity(lm, data, device=device, stride=stride, progress=progress)
        results["perplexity"] = {"data": ppl_data, "seqlen": int(data.shape[1]), "windows": int(data.shape[0]),
                                 "stride": stride, "value": value}
        seconds["perplexity"] = round(time.perf_counter() - t0, 3)
        log.info("perplexity %.3f on %s", value, ppl_data)

    if tasks:
        t0 = time.perf_counter()
        results["tasks"] = zero_shot(lm, tokenizer, tasks, limit=limit, batch_size=batch_size, device=device,
                                     seed=seed)
        seconds["tasks"] = round(time.perf_counter() - t0, 3)
    del lm

    if finetuned or (base and tasks):
        t0 = time.perf_counter()
        settings = {"limit": limit, "seed": seed, "dtype": dtype}
        by_name = dict(zip(task_names, tasks))

        def run_on(spec: str, task: str, adapter_base: str | None):
            def run():
                ref_lm, ref_tok = load_for_eval(spec, base=adapter_base, dtype=dtype)
                return zero_shot(ref_lm, ref_tok, [by_name[task]], limit=limit, batch_size=batch_size,
                                 device=device, seed=seed)[task]
            return _cached_task(spec, by_name[task], settings, adapter_base, run)

        references: dict[str, Any] = {"finetuned": {}, "base": {}}
        for task, spec in finetuned.items():
            references["finetuned"][task] = {"model": spec, **run_on(spec, task, base)}
        if base:
            for task in task_names:
                references["base"][task] = {"model": base, **run_on(base, task, None)}
        results["references"] = references
        results["normalized"] = normalized_accuracy(results["tasks"], references["finetuned"])
        seconds["references"] = round(time.perf_counter() - t0, 3)

    results["seconds"] = seconds
    results["peak_memory"] = _peak_memory(device)
    if out_path is not None:
        write_results(results, out_path)
    return results


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
