"""Structured pruning on SmolLM2-135M: a smaller, faster model, against unstructured Wanda.

For R in (0.2, 0.3) and each structure asked (default: width): ``wandamerge
prune --structure width --sparsity R`` (FLAP's score, bias compensation where
the config carries it) or ``--structure depth --sparsity R`` (whole blocks by
ShortGPT's Block Influence) and, at the same number of parameters removed from
the decoder blocks, unstructured Wanda at sparsity R' (R' = the structured
model's removed block parameters / the dense linear maps' entries). Each output
is measured here:

* parameters (all, and of the decoder blocks) and bytes of safetensors on disk;
* CPU speed with stock transformers, 2 threads: prefill tokens/s at batch 1
  (one 512-token forward) and decode tokens/s (greedy ``generate`` of 64 new
  tokens after a 32-token prompt, KV cache on) at batch 1 and at batch 8; the
  median of 5 runs after 1 warm-up, every model measured in the same process,
  interleaved;
* perplexity on the shared evaluation windows (64 x 512), through ``wandamerge ppl``.

Calibration: the shared 128 x 512 windows. Results: benchmarks/results/TAG.{md,json} (TAG: width_smollm2).

    python benchmarks/width_smollm2.py [--windows-dir ../shared/data/smollm2-wiki] [--structures width depth]
                                       [--tag structured_smollm2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from prune_smollm2 import BIN, WINDOWS_DIR, ppl, run  # noqa: E402

from wandamerge.io.record import provenance, versions  # noqa: E402
from wandamerge.models import prepare_smollm2  # noqa: E402

RATIOS = (0.2, 0.3)
STRUCTURES = ("width", "depth")
SAME_COUNT = 0.001  # unstructured sparsities this close count as the same parameter count (one row for both)
REPEATS = 5
BATCH = 8  # the batched decode: BATCH prompts at once, tokens/s over all of them
NEW_TOKENS = 64


def parameters(model) -> tuple[int, int]:
    """(all parameters, those of the decoder blocks) of a loaded model; a tied LM head counted once."""
    total = sum(p.numel() for p in model.parameters())
    blocks = sum(p.numel() for p in model.model.layers.parameters())
    return total, blocks


def linear_entries(model) -> int:
    return sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))


def speed(model, prompts: torch.Tensor) -> dict:
    """Prefill tokens/s at batch 1, decode tokens/s at batch 1 and at BATCH (medians of REPEATS after a
    warm-up); ``prompts``: (BATCH, >= 512) token windows."""
    prefill, decode, batched = [], [], []
    with torch.inference_mode():
        for attempt in range(REPEATS + 1):
            t0 = time.perf_counter()
            model(input_ids=prompts[:1, :512], use_cache=False)
            t1 = time.perf_counter()
            generate(model, prompts[:1, :32])
            t2 = time.perf_counter()
            generate(model, prompts[:BATCH, :32])
            t3 = time.perf_counter()
            if attempt:
                prefill.append(512 / (t1 - t0))
                decode.append(NEW_TOKENS / (t2 - t1))
                batched.append(BATCH * NEW_TOKENS / (t3 - t2))
    return {"prefill_tokens_per_s": statistics.median(prefill), "decode_tokens_per_s": statistics.median(decode),
            f"decode_batch{BATCH}_tokens_per_s": statistics.median(batched)}


def generate(model, prompt: torch.Tensor) -> None:
    """Greedy decoding of NEW_TOKENS tokens after ``prompt`` (KV cache on)."""
    model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                   min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)


def size_on_disk(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def prune(model: str, out: Path, calib: str, extra: list[str], log) -> dict:
    wall, _ = run([str(BIN / "wandamerge"), "-q", "prune", model, "-o", str(out), "--overwrite", "--calib", calib,
                   "--nsamples", "128", "--seqlen", "512", *extra], log)
    return {"wall_s": wall, "command": "wandamerge prune SMOLLM2 " + " ".join(extra)}


def main() -> None:
    from transformers import AutoModelForCausalLM

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows-dir", default=WINDOWS_DIR)
    parser.add_argument("--work", default=os.path.expanduser("~/.cache/wandamerge/bench/width"))
    parser.add_argument("--structures", nargs="+", choices=STRUCTURES, default=["width"])
    parser.add_argument("--tag", default="width_smollm2", help="results file name")
    args = parser.parse_args()
    torch.set_num_threads(2)
    windows = (HERE.parent / args.windows_dir).resolve()
    calib, eval_data = str(windows / "calib_128x512.pt"), str(windows / "eval_64x512.pt")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = open(work / "width.log", "a")
    dense = str(prepare_smollm2())
    dense_model = AutoModelForCausalLM.from_pretrained(dense).eval()
    dense_total, dense_blocks = parameters(dense_model)
    dense_linear = linear_entries(dense_model)
    rows = {"dense": {"dir": dense, "command": "(the dense model)"}}
    for structure in args.structures:
        for ratio in RATIOS:
            cut_dir = work / f"{structure}-{ratio}"
            rows[f"{structure}-{ratio}"] = {"dir": str(cut_dir), **prune(dense, cut_dir, calib, [
                "--structure", structure, "--sparsity", str(ratio)], log)}
            cut = AutoModelForCausalLM.from_pretrained(cut_dir)
            matched = round((dense_blocks - parameters(cut)[1]) / dense_linear, 4)
            wanda_dir = work / f"wanda-{matched}"
            name = f"wanda-unstructured-{matched}"
            same = [row for row in rows.values() if abs(row.get("sparsity", -1) - matched) <= SAME_COUNT]
            if same:  # an unstructured row within SAME_COUNT of this count is measured already
                same[0]["same_parameters_as"].append(f"{structure}-{ratio}")
                continue
            rows[name] = {"dir": str(wanda_dir), "same_parameters_as": [f"{structure}-{ratio}"], "sparsity": matched,
                          **prune(dense, wanda_dir, calib, ["--method", "wanda", "--sparsity", str(matched)], log)}
    prompts = torch.load(eval_data)[:BATCH]
    models = {name: AutoModelForCausalLM.from_pretrained(row["dir"]).eval() for name, row in rows.items()}
    for name, row in rows.items():
        total, blocks = parameters(models[name])
        zeros = sum(int((m.weight == 0).sum()) for m in models[name].model.layers.modules()
                    if isinstance(m, torch.nn.Linear))
        row.update({"parameters": total, "block_parameters": blocks, "nonzero_block_parameters": blocks - zeros,
                    "bytes_on_disk": size_on_disk(Path(row["dir"])), "ppl": ppl(row["dir"], eval_data, log)})
        print(f"{name}: ppl {row['ppl']:.2f}", flush=True)
    timings = {name: [] for name in rows}
    for _ in range(2):  # interleaved rounds, so drifts in the machine's speed hit every model alike
        for name, model in models.items():
            timings[name].append(speed(model, prompts))
    for name, row in rows.items():
        row.update({key: max(t[key] for t in timings[name]) for key in timings[name][0]})
        for key in ("decode", f"decode_batch{BATCH}", "prefill"):
            row[f"{key}_vs_dense"] = row[f"{key}_tokens_per_s"] / (rows["dense"].get(f"{key}_tokens_per_s") or 1)
    write(rows, {**provenance([__file__, *sys.argv[1:]]), "versions": versions(), "threads": 2}, args.tag)
    for name in rows:
        if name != "dense":
            shutil.rmtree(rows[name]["dir"], ignore_errors=True)


def write(rows: dict, header: dict, tag: str) -> None:
    results = HERE / "results"
    for row in rows.values():
        row["dir"] = row["dir"].replace(str(Path.home()), "~")
    (results / f"{tag}.json").write_text(json.dumps({**header, "rows": rows}, indent=2))
    lines = [f"# Structured pruning on SmolLM2-135M ({header['date']}, commit {header['commit']})", "",
             f"- command: `{header['command']}`",
             f"- machine: {header['machine']}; " + ", ".join(f"{k} {v}" for k, v in header["versions"].items()
                                                            if k != "platform"),
             "- calibration: the shared 128 x 512 windows; perplexity: the shared 64 x 512 evaluation windows",
             f"- speed: stock transformers, CPU, 2 threads; prefill = one 512-token forward at batch 1; decode = greedy "
             f"generate of {NEW_TOKENS} tokens after 32 (KV cache), at batch 1 and at batch {BATCH} (tokens/s "
             f"over the {BATCH} sequences); median of {REPEATS} after a warm-up, the better of 2 interleaved rounds",
             "", "| model | parameters | block parameters (nonzero) | MB on disk | perplexity | prefill tok/s | "
             f"decode tok/s (vs dense) | decode tok/s at batch {BATCH} (vs dense) |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['parameters']:,} | {r['block_parameters']:,} ({r['nonzero_block_parameters']:,}) "
                     f"| {r['bytes_on_disk'] / 1e6:.0f} | {r['ppl']:.2f} | {r['prefill_tokens_per_s']:.0f} | "
                     f"{r['decode_tokens_per_s']:.1f} ({r['decode_vs_dense']:.2f}x) | "
                     f"{r[f'decode_batch{BATCH}_tokens_per_s']:.1f} ({r[f'decode_batch{BATCH}_vs_dense']:.2f}x) |")
    lines += ["", "Commands:", ""] + [f"- `{name}`: `{r['command']}`" for name, r in rows.items()] + [""]
    (results / f"{tag}.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
