"""Wanda on the largest mixture-of-experts model this machine holds: time, peak memory, tokens per expert.

The model has OLMoE-1B-7B's architecture (transformers' ``OlmoeConfig``: 16
layers, hidden 2048, 64 experts of intermediate 1024 per layer, top-8 routing,
16 heads) with a 49152-token vocabulary, in bfloat16: 6.9B parameters, 13.9 GB,
the most this 24 GiB machine holds whole in memory with room for the pass.
**Its weights are random** (normal, std 0.02; norms 1), written tensor by tensor
in transformers' own per-expert checkpoint layout (so it is never whole in
memory here); the tokenizer is SmolLM2's, so that calibration is real text
(gensim's Wikipedia articles, ``--calib wiki``). Random weights say nothing
about quality; they route tokens as a random router does, which is what the
tokens-per-expert table shows.

Each run is its own process under ``/usr/bin/time -v`` (peak RSS is its own):

* ``prune-in-memory``: ``wandamerge prune --no-low-memory``: the whole model loaded;
* ``prune-low-memory``: ``wandamerge prune --low-memory``: one block read, pruned and written at a time;

then the two outputs are compared tensor by tensor.

    python benchmarks/moe_prune.py [--layers 16] [--keep] [--only RUN ...]

Big files live in ~/.cache/wandamerge/bench/moe/ (deleted at the end unless ``--keep``); results go to
benchmarks/results/moe_prune.{md,json}, where ``$BENCH`` stands for that folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from streaming_1p5b import same_tensors, size_on_disk, timed  # noqa: E402

from wandamerge.io.record import portable as shown  # noqa: E402
from wandamerge.io.record import provenance, versions  # noqa: E402
from wandamerge.io.resolve import default_cache_dir  # noqa: E402
from wandamerge.io.safetensors import ShardWriter  # noqa: E402
from wandamerge.models import CheckpointNames, block_fused_parameters, prepare_smollm2  # noqa: E402

WORK = default_cache_dir() / "bench" / "moe"
RESULTS = HERE / "results"
NSAMPLES, SEQLEN = 16, 256
WANDAMERGE = str(Path(sys.executable).parent / "wandamerge")


def olmoe_config(layers: int):
    from transformers import OlmoeConfig

    return OlmoeConfig(hidden_size=2048, intermediate_size=1024, num_hidden_layers=layers, num_attention_heads=16,
                       num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, vocab_size=49152,
                       max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                       pad_token_id=0, dtype="bfloat16")


def checkpoint_plan(skeleton) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor the checkpoint holds, in transformers' saved layout."""
    saved = CheckpointNames(skeleton)
    fused = {}
    for index, block in enumerate(skeleton.model.layers):
        fused.update(block_fused_parameters(block, f"model.layers.{index}"))
    plan = []
    for name, tensor in skeleton.state_dict().items():
        source = saved.source(name, fused.get(name))
        if not source.stacked:
            plan.append((source.parts[0][0], tuple(tensor.shape)))
            continue
        rows = tensor.shape[1] // len(source.parts[0])
        plan += [(part, (rows, *tensor.shape[2:])) for parts in source.parts for part in parts]
    return plan


def write_model(out: Path, layers: int, seed: int = 0) -> None:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").is_file():
        return
    config = olmoe_config(layers)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    plan = checkpoint_plan(skeleton)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = ShardWriter(tmp, [(name, shape, torch.bfloat16) for name, shape in plan], "5GB")
    g = torch.Generator().manual_seed(seed)
    for name, shape in plan:
        tensor = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=g) * 0.02
        writer.add(name, tensor.to(torch.bfloat16))
    writer.close()
    config.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(prepare_smollm2()).save_pretrained(tmp)
    tmp.rename(out)


def token_summary(record: dict) -> list[dict]:
    """Per layer: the tokens its experts saw (min, median, max) and how many saw none."""
    layers: dict[int, list[int]] = {}
    for name, entry in record["per_expert"].items():
        layers.setdefault(int(name.split(".")[2]), []).append(entry["tokens"])
    return [{"layer": layer, "experts": len(t), "min": min(t), "median": statistics.median(t), "max": max(t),
             "unrouted": sum(1 for x in t if x == 0)} for layer, t in sorted(layers.items())]


def write_results(result: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "moe_prune.json").write_text(json.dumps(result, indent=2))
    m, disk = result["model"], result["model"]["size_on_disk_bytes"]
    lines = [f"# Wanda on a {m['parameters'] / 1e9:.2f}B-parameter mixture of experts ({result['date']}, "
             f"commit {result['commit']})", "",
             f"- command: `{result['command']}`",
             f"- machine: {result['machine']}; " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()
                                                            if k != "platform"),
             f"- model: OLMoE-1B-7B's architecture ({m['layers']} layers, hidden 2048, 64 experts x intermediate "
             f"1024, top-8, 16 heads), vocab 49152, bfloat16: {m['parameters']:,} parameters, {disk / 1e9:.2f} GB "
             "on disk in transformers' per-expert layout. **Random weights** (normal, std 0.02).",
             f"- calibration: Wikipedia (gensim's articles, `--calib wiki`) through SmolLM2's tokenizer, "
             f"{NSAMPLES} windows x {SEQLEN} tokens; Wanda 50% unstructured, per output row, each expert on the "
             "tokens routed to it",
             "- each run is its own process under `/usr/bin/time -v`; peak RSS is that process's own", "",
             "| run | wall s | prune s (record) | peak RSS GB | peak RSS / size on disk | sparsity | commit, date |",
             "|---|---|---|---|---|---|---|"]
    for name, run in result["runs"].items():
        lines.append(f"| {name} | {run['wall_s']} | {run['record_seconds'].get('prune', float('nan')):.1f} | "
                     f"{run['peak_rss_bytes'] / 1e9:.2f} | {run['peak_rss_bytes'] / disk:.3f} | "
                     f"{run['overall_sparsity']:.4f} | {run['commit']}, {run['date']} |")
    if "comparison" in result:
        c = result["comparison"]
        lines += ["", f"Low-memory vs in-memory output: {c.get('tensors_differing')} of {c.get('tensors')} tensors "
                      "differ (bit for bit, tensor by tensor)."]
    if "tokens_per_expert" in result:
        lines += ["", f"Tokens per expert ({NSAMPLES * SEQLEN} tokens x top-8 = {NSAMPLES * SEQLEN * 8} routed "
                      "per layer, 64 experts):", "", "| layer | min | median | max | experts with no token |",
                  "|---|---|---|---|---|"]
        lines += [f"| {t['layer']} | {t['min']} | {t['median']:g} | {t['max']} | {t['unrouted']} |"
                  for t in result["tokens_per_expert"]]
    if result.get("notes"):
        lines += ["", "## Findings", ""] + [f"- {note}" for note in result["notes"]]
    lines += ["", f"`$BENCH`: `{result['bench']}`.", ""]
    lines += [f"- `{name}`: `{run['command']}`" for name, run in result["runs"].items()]
    lines.append("")
    (RESULTS / "moe_prune.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--keep", action="store_true", help="keep the model and outputs in the cache")
    parser.add_argument("--only", action="append", help="run only this run (repeatable); keep the others' results")
    parser.add_argument("--report", action="store_true", help="rewrite the Markdown from the JSON; run nothing")
    args = parser.parse_args()
    if args.report:
        write_results(json.loads((RESULTS / "moe_prune.json").read_text()))
        return
    base = WORK / f"olmoe-{args.layers}L"
    t0 = time.perf_counter()
    write_model(base, args.layers)
    print(f"model ready in {time.perf_counter() - t0:.0f} s", flush=True)
    from wandamerge.io.safetensors import Checkpoint

    checkpoint = Checkpoint(base)
    result = {**provenance([__file__, *sys.argv[1:]]), "versions": versions(), "bench": shown(str(WORK)),
              "model": {"layers": args.layers, "parameters": sum(torch.Size(checkpoint.shape(n)).numel()
                                                                  for n in checkpoint.names()),
                        "size_on_disk_bytes": size_on_disk(base), "weights": "random (normal, std 0.02)"},
              "runs": {}}
    previous = RESULTS / "moe_prune.json"
    if previous.is_file():
        old = json.loads(previous.read_text())
        result["notes"] = old.get("notes", [])  # findings written after a run, kept across reruns
        if args.only:
            result["runs"] = {k: v for k, v in old["runs"].items() if k not in args.only}
    common = ["prune", str(base), "--method", "wanda", "--sparsity", "0.5", "--calib", "wiki", "--nsamples",
              str(NSAMPLES), "--seqlen", str(SEQLEN), "--dtype", "bfloat16", "--max-shard-size", "1GB", "--overwrite"]
    runs = {"prune-in-memory": [*common, "--no-low-memory", "-o", str(WORK / "pruned-memory")],
            "prune-low-memory": [*common, "--low-memory", "-o", str(WORK / "pruned-low")]}
    for name, cmd in runs.items():
        if args.only and name not in args.only:
            continue
        print(f"running {name} ...", flush=True)
        run = {key: value for key, value in provenance([]).items() if key in ("commit", "date")}
        run.update(timed([WANDAMERGE, "-q", *cmd], WORK / f"{name}.log"))
        record = json.loads((Path(cmd[-1]) / "wandamerge.json").read_text())
        run.update({"command": "wandamerge " + " ".join(cmd).replace(str(WORK), "$BENCH"),
                    "record_seconds": record["seconds"], "overall_sparsity": record["sparsity"]["overall"]})
        result["runs"][name] = run
        result["tokens_per_expert"] = token_summary(record)
        print(f"  {run['wall_s']} s, peak RSS {run['peak_rss_bytes'] / 1e9:.2f} GB", flush=True)
        write_results(result)
    if (WORK / "pruned-memory").is_dir() and (WORK / "pruned-low").is_dir():
        result["comparison"] = same_tensors(WORK / "pruned-low", WORK / "pruned-memory")
        write_results(result)
    if not args.keep:
        for path in (WORK / "pruned-memory", WORK / "pruned-low", base):
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
