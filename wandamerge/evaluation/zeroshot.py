"""Zero-shot tasks through lm-eval on an in-memory model (``HFLM`` takes the model object).

A task is named in one of four ways:

* an offline task of :mod:`wandamerge.evaluation.tasks` (``polarity``, ``newsgroups``, ...),
* a path to an lm-eval task YAML (its ``task:`` name is used; its directory is searched for includes),
* an lm-eval task config as a dict,
* any other string: a task of lm-eval's own registry (those download their data: online only).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import yaml

from ..errors import ZeroShotError
from .tasks import OFFLINE_TASKS, write_task

log = logging.getLogger(__name__)


_MANAGERS: dict[tuple, object] = {}


def resolve_task(spec: str | dict | os.PathLike, task_dir: str | Path | None = None) -> tuple[str, Any, str | None]:
    """``(name, what lm-eval gets, include path or None)`` for a task spec."""
    if isinstance(spec, dict):
        if "task" not in spec:
            raise ZeroShotError("a task config needs a 'task' name")
        return str(spec["task"]), dict(spec), None
    text = os.fspath(spec)
    if text in OFFLINE_TASKS:
        config = yaml.safe_load(write_task(text, task_dir).read_text())
        return text, config, None
    if text.endswith((".yaml", ".yml")):
        path = Path(text)
        if not path.is_file():
            raise ZeroShotError(f"task file {text} does not exist")
        try:
            config = yaml.load(path.read_text(), Loader=_LenientLoader)
        except yaml.YAMLError as err:
            raise ZeroShotError(f"task file {text} is not valid YAML: {err}".splitlines()[0]) from err
        if not isinstance(config, dict) or "task" not in config:
            raise ZeroShotError(f"task file {text} has no 'task:' name")
        return str(config["task"]), str(config["task"]), str(path.resolve().parent)
    return text, text, None


class _LenientLoader(yaml.SafeLoader):
    """Reads lm-eval YAMLs that use ``!function`` tags, only to learn the task name."""


_LenientLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def zero_shot(model, tokenizer, tasks: list, *, limit: int | float | None = None, batch_size: int = 16,
              device: str = "cpu", num_fewshot: int = 0, seed: int = 0,
              task_dir: str | Path | None = None) -> dict[str, dict]:
    """Run ``tasks`` through lm-eval on ``model``; ``{task: {acc, acc_stderr, acc_norm, ..., n}}``."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ZeroShotError("zero-shot tasks need lm-eval: pip install 'lm-eval>=0.4.8'") from err

    resolved = [resolve_task(spec, task_dir) for spec in tasks]
    names = [name for name, _, _ in resolved]
    if len(set(names)) != len(names):
        raise ZeroShotError(f"a task is named twice in {names}")
    includes = tuple(sorted({inc for _, _, inc in resolved if inc}))
    # lm-eval's own registry is indexed only when a task is named from it (indexing takes a minute on a
    # small CPU), and once per process
    registry = any(isinstance(what, str) and inc is None for _, what, inc in resolved)
    key = (includes, registry)
    if key not in _MANAGERS:
        _MANAGERS[key] = TaskManager(include_path=list(includes) or None, include_defaults=registry)
    manager = _MANAGERS[key]
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=[what for _, what, _ in resolved], num_fewshot=num_fewshot, limit=limit,
        task_manager=manager, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed, log_samples=False, bootstrap_iters=1000)
    if results is None:
        raise ZeroShotError("lm-eval returned no results")
    table: dict[str, dict] = {}
    for name, what, _ in resolved:
        key = what["task"] if isinstance(what, dict) else what
        metrics = results["results"].get(key)
        if metrics is None:
            raise ZeroShotError(f"lm-eval gave no result for task {key}")
        row: dict[str, Any] = {}
        for metric, value in metrics.items():
            if "," not in metric or not isinstance(value, (int, float)):
                continue
            base, _filter = metric.split(",", 1)
            row[base] = None if isinstance(value, float) and math.isnan(value) else float(value)
        samples = results.get("n-samples", {}).get(key, {})
        row["n"] = int(samples.get("effective", samples.get("original", 0)) or 0)
        row["lm_eval_task"] = key
        if name in OFFLINE_TASKS:
            row["source"] = OFFLINE_TASKS[name].source
        table[name] = row
        log.info("%s: %s", name, ", ".join(f"{k}={v:.4f}" for k, v in row.items() if isinstance(v, float)))
    return table
