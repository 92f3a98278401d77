"""End-to-end jobs behind the CLI: load, calibrate, prune, evaluate, save, record."""

from __future__ import annotations

import json
import logging
import platform
import resource
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .calibration import calibration_windows, evaluation_windows
from .evaluation.perplexity import perplexity
from .models import (check_output_dir, load_model, load_tokenizer, prepare_smollm2, save_model, staged_output,
                     write_text_atomic)
from .pruning import PruneTarget, prune
from .streaming import StreamedModel, should_stream

log = logging.getLogger(__name__)

EMBEDDED_MODELS = {"smollm2": prepare_smollm2}


def resolve_model(spec: str) -> str:
    """A model argument: an embedded name (``smollm2``), a directory, a ``.gguf`` file or a hub id."""
    if spec in EMBEDDED_MODELS:
        return str(EMBEDDED_MODELS[spec]())
    return spec


def versions() -> dict[str, str]:
    import transformers

    return {"wandamerge": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@dataclass
class StageClock:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t0, 4)


def prune_to_directory(model: str, out: str | Path | None, *, method: str = "wanda", sparsity: float = 0.5,
                       pattern: str | None = None, group: str = "row", variant: bool = False,
                       update: bool = False, calib: str = "wiki", nsamples: int = 128,
                       seqlen: int | None = None, seed: int = 0, device: str = "cpu",
                       dtype: str = "float32", batch_size: int | None = None,
                       within_block: str = "sequential", eval_ppl: str | None = None,
                       eval_windows: int | None = 64, overwrite: bool = False,
                       max_shard_size: str = "2GB", progress: bool = True, low_memory: bool | None = None,
                       device_map: str | dict | None = None, offload_folder: str | None = None) -> dict:
    """Prune a model and (if ``out``) save it with ``wandamerge.json`` and a model card.

    ``low_memory``: read, prune and write one decoder block at a time (see
    :mod:`wandamerge.streaming`); ``None`` switches it on when the loaded model
    would take more than half the available RAM. ``device_map`` and
    ``offload_folder`` let accelerate place the model (see :mod:`wandamerge.offload`).
    Returns the run record (also written to ``wandamerge.json``).
    """
    clock = StageClock()
    source = resolve_model(model)
    out_path = check_output_dir(out, [source], overwrite) if out else None
    if nsamples <= 0:
        raise ValueError(f"nsamples must be positive, got {nsamples}")
    if seqlen is not None and seqlen <= 0:
        raise ValueError(f"seqlen must be positive, got {seqlen}")
    if batch_size is not None and batch_size <= 0:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    PruneTarget(sparsity=sparsity, pattern=pattern, group=group, variant=variant, update=update)  # before loading

    low_memory = _low_memory(low_memory, source, dtype, out_path, eval_ppl, device_map)
    streamed = None
    with clock.stage("load"):
        if low_memory:
            streamed = StreamedModel(source, dtype=dtype)
            lm, tokenizer = streamed.model, load_tokenizer(source)
        else:
            lm, tokenizer = load_model(source, dtype=dtype, device_map=device_map, offload_folder=offload_folder)
    context = int(getattr(lm.config, "max_position_embeddings", 2048) or 2048)
    seqlen = seqlen or min(context, 2048)
    if seqlen > context:
        raise ValueError(f"seqlen {seqlen} exceeds the model's context of {context} tokens")

    calibration = None
    if method != "magnitude" or update:
        with clock.stage("calibration_data"):
            calibration = calibration_windows(calib, tokenizer, nsamples, seqlen, seed=seed,
                                              vocab_size=lm.config.vocab_size)

    ppl: dict[str, float] = {}
    eval_data = None
    notes = []
    if eval_ppl and calibration is not None and Path(eval_ppl).exists() and Path(eval_ppl).resolve() == Path(calib).resolve():
        notes.append(f"perplexity is measured on the calibration source {calib}: expect an optimistic number")
        log.warning(notes[-1])
    if eval_ppl:
        with clock.stage("evaluation_data"):
            eval_data = evaluation_windows(eval_ppl, tokenizer, seqlen, max_windows=eval_windows,
                                           vocab_size=lm.config.vocab_size)
        with clock.stage("eval_dense"):
            ppl["dense"] = perplexity(lm, eval_data, device=device, progress=progress)
        log.info("dense perplexity %.3f", ppl["dense"])

    with ExitStack() as staging:
        loader = None
        if streamed is not None:  # the output is written block by block while pruning, into a staged directory
            staged = staging.enter_context(staged_output(out_path, overwrite))
            writer = streamed.start_output(staged, max_shard_size)
            loader = streamed.loader(device, writer=writer)
        with clock.stage("prune"):
            report = prune(lm, calibration, method=method, sparsity=sparsity, pattern=pattern, group=group,
                           variant=variant, update=update, device=device, batch_size=batch_size,
                           within_block=within_block, progress=progress, loader=loader)

        if eval_data is not None:
            with clock.stage("eval_pruned"):
                ppl["pruned"] = perplexity(lm, eval_data, device=device, progress=progress)
            log.info("pruned perplexity %.3f", ppl["pruned"])

        record = {
            "job": "prune",
            "model": model,
            "model_source": source,
            "settings": {"method": method, "sparsity": report.target["sparsity"] if not pattern else None,
                         "pattern": pattern, "group": group, "variant": variant, "update": update,
                         "calib": calib, "nsamples": report.nsamples, "seqlen": report.seqlen, "seed": seed,
                         "device": device, "dtype": dtype, "batch_size": batch_size,
                         "within_block": report.within_block, "eval_ppl": eval_ppl,
                         "eval_windows": None if eval_data is None else int(eval_data.shape[0]),
                         "low_memory": low_memory, "device_map": device_map, "offload_folder": offload_folder},
            "versions": versions(),
            "perplexity": ppl,
            "sparsity": {"overall": report.overall_sparsity, "per_block": report.block_sparsity,
                         "per_matrix": report.matrix_sparsity},
            "prune_seconds": report.seconds,
            "notes": notes,
        }
        if out_path is not None:
            with clock.stage("save"):
                record["seconds"] = dict(clock.seconds)
                record["peak_memory"] = _peak_memory(device)
                files = {"wandamerge.json": json.dumps(record, indent=2),
                         "README.md": model_card(record)}
                if streamed is not None:
                    streamed.finish_output(staged, writer, tokenizer, files)
                else:
                    save_model(lm, tokenizer, out_path, extra_files=files, overwrite=overwrite,
                               max_shard_size=max_shard_size)
    record["seconds"] = dict(clock.seconds)
    record["peak_memory"] = _peak_memory(device)
    if out_path is not None:  # final numbers, including the save itself
        write_text_atomic(out_path / "wandamerge.json", json.dumps(record, indent=2))
    return record


def _low_memory(asked: bool | None, source: str, dtype: str, out: Path | None, eval_ppl: str | None,
                device_map) -> bool:
    """Whether to prune block by block from disk: as asked, or (``None``) when the model would not fit well."""
    if asked:
        if out is None:
            raise ValueError("low-memory pruning writes each block as soon as it is pruned: give an output directory")
        if eval_ppl:
            raise ValueError("perplexity needs the whole model in memory, which low-memory mode avoids; "
                             "measure the output with `wandamerge ppl` instead")
        if device_map is not None:
            raise ValueError("choose either low-memory mode or a device map, not both")
        return True
    return asked is None and out is not None and not eval_ppl and device_map is None and should_stream(source, dtype)


def _peak_memory(device: str) -> dict[str, int]:
    peak = {"rss_bytes": peak_rss_bytes()}
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        peak["cuda_bytes"] = int(torch.cuda.max_memory_allocated())
    return peak


def model_card(record: dict) -> str:
    s = record["settings"]
    shape = s["pattern"] or f"{s['sparsity']:.0%} unstructured (per {s['group']})"
    lines = [
        "---", "library_name: transformers", "tags: [wandamerge, pruned, sparse]", "---", "",
        f"# {Path(str(record['model'])).name} pruned with {s['method']}", "",
        f"Pruned by wandamerge {record['versions']['wandamerge']} from `{record['model']}`: "
        f"{shape}, decoder linear maps only (embeddings and LM head kept dense).", "",
        "| setting | value |", "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in s.items()]
    lines += ["", f"Overall sparsity of the decoder linear weights: {record['sparsity']['overall']:.4f}.", ""]
    if record["perplexity"]:
        lines += ["| perplexity | value |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in record["perplexity"].items()]
        lines.append("")
    lines += ["Every setting, version, time and per-matrix sparsity is in `wandamerge.json`.", ""]
    return "\n".join(lines)
