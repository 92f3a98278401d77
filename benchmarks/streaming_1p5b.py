"""Memory-bounded streaming on a ~1.5B-parameter Llama: peak RSS against the model's size on disk.

The model is a Llama-architecture checkpoint with RANDOM weights (normal, std
0.02; norms 1), written tensor by tensor with wandamerge's streaming shard
writer, so it is never whole in memory, not even here. Its tokenizer is a
word-level one over the same 32000 ids (the tests' w3..w31999), for a complete model
directory; calibration is a token file of random ids. Random weights and ids
are fine for what is measured here -- memory and time -- and say nothing
about quality. The two "fine-tunes" are the base plus seeded Gaussian noise,
also written tensor by tensor.

Each run is its own process under ``/usr/bin/time -v``: its peak RSS is that
process's own. Runs:

* ``prune-low-memory``: ``wandamerge prune --low-memory --method wanda``;
* ``merge-ties``: data-free TIES (density 0.2) of the two fine-tunes on the base;
* ``wanda-activations-low-memory``: the calibration pass of a Wanda-scored merge
  alone (``collect_input_norms`` over the base, streamed block by block, by
  benchmarks/programs/streamed_activations.py), the
  part of that merge which ``--low-memory`` changes; the rest of the merge is
  the streamed per-tensor merge measured by ``merge-ties``;
* with ``--full-wanda-merge``, ``merge-ties-wanda-low-memory``: the whole
  Wanda-scored TIES merge with ``--low-memory`` (about as long as ``merge-ties``);
* with ``--activation-merges``, ``merge-regmean-low-memory`` and ``merge-obim-low-memory``: RegMean
  (input Grams) and OBIM (density 0.2) with ``--low-memory``, each fine-tune calibrated on its own token
  file (two seeds of random ids) through the base, as the testbed's task activations;
* with ``--reference``, ``prune-in-memory``: the prune without ``--low-memory``,
  and a tensor-by-tensor comparison of the two outputs.

    python benchmarks/streaming_1p5b.py [--layers 26] [--reference] [--full-wanda-merge] [--activation-merges]
                                        [--keep]
                                        [--only RUN ...]

``--only`` reruns the runs named and keeps the others from the results file
(each run records its own commit and date).

Big files live in ~/.cache/wandamerge/bench/streaming/ and are deleted at the
end (``--keep`` keeps them); results go to benchmarks/results/streaming_1p5b.{md,json},
where ``$BENCH`` stands for that folder's ``llama-<layers>L/``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WANDAMERGE = str(Path(sys.executable).parent / "wandamerge")
sys.path.insert(0, str(REPO))

from wandamerge.io.record import portable as shown  # noqa: E402
from wandamerge.io.record import provenance, versions  # noqa: E402
from wandamerge.io.safetensors import Checkpoint, ShardWriter  # noqa: E402
from wandamerge.io.resolve import default_cache_dir  # noqa: E402

WORK = default_cache_dir() / "bench" / "streaming"
RESULTS = HERE / "results"
NSAMPLES, SEQLEN = 8, 256

ACTIVATIONS = HERE / "programs" / "streamed_activations.py"


def llama_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0, dtype="float32")


def word_tokenizer(vocab_size: int):
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import word_tokenizer as words  # the tests' word-level tokenizer: w3 .. w{V-1}

    return words(vocab_size)


def write_model(out: Path, layers: int, seed: int, base: Path | None = None, noise: float = 2e-4) -> None:
    """A checkpoint written one tensor at a time: random init, or (``base``) the base plus seeded noise."""
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM

    if (out / "config.json").is_file():
        return
    config = llama_config(layers)
    with init_empty_weights():
        skeleton = LlamaForCausalLM(config)  # shapes only: parameters on the meta device
    plan = [(name, tuple(t.shape), torch.float32) for name, t in skeleton.state_dict().items()]
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = ShardWriter(tmp, plan, "2GB")
    source = Checkpoint(base) if base else None
    g = torch.Generator().manual_seed(seed)
    for name, shape, _ in plan:
        if source is not None:
            tensor = source.tensor(name)
            tensor += torch.randn(shape, generator=g) * noise
        elif name.endswith("norm.weight"):
            tensor = torch.ones(shape)
        else:
            tensor = torch.randn(shape, generator=g) * 0.02
        writer.add(name, tensor)
        del tensor
    writer.close()
    config.save_pretrained(tmp)
    word_tokenizer(config.vocab_size).save_pretrained(tmp)
    tmp.rename(out)


def activation_recipe(base: Path, finetunes: tuple[Path, ...], method: str, parameters: dict) -> dict:
    """A ``method`` merge of ``finetunes`` with each fine-tune calibrated on its own token file (random ids,
    seeded by its position), through the base."""
    models = []
    for i, finetune in enumerate(finetunes, start=1):
        calib = WORK / f"calib-{i}.pt"
        torch.save(torch.randint(3, 32000, (NSAMPLES, SEQLEN), generator=torch.Generator().manual_seed(i)), calib)
        models.append({"model": str(finetune), "parameters": dict(parameters),
                       "calibration": {"data": str(calib), "nsamples": NSAMPLES, "seqlen": SEQLEN}})
    return {"merge_method": method, "base_model": str(base), "models": models}


def size_on_disk(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def timed(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` under /usr/bin/time -v; its wall time and peak RSS (that process's own)."""
    stats = log.with_suffix(".time")
    t0 = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run(["/usr/bin/time", "-v", "-o", str(stats), *cmd], stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if code.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({code.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    text = stats.read_text()
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    return {"wall_s": round(wall, 1), "peak_rss_bytes": peak_kb * 1024}


def same_tensors(a: Path, b: Path) -> dict:
    """Compare two checkpoints tensor by tensor (never whole in memory)."""
    ca, cb = Checkpoint(a), Checkpoint(b)
    if set(ca.names()) != set(cb.names()):
        return {"same_names": False}
    differ = [n for n in ca.names() if not torch.equal(ca.tensor(n), cb.tensor(n))]
    return {"same_names": True, "tensors": len(ca.names()), "tensors_differing": len(differ),
            "examples": differ[:3]}


def write_results(result: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "streaming_1p5b.json").write_text(json.dumps(result, indent=2))
    disk = result["model"]["size_on_disk_bytes"]
    lines = [
        f"# Memory-bounded streaming on a {result['model']['parameters'] / 1e9:.2f}B-parameter Llama "
        f"({result['date']}, commit {result['commit']})", "",
        f"- command: `{result['command']}`",
        f"- machine: {result['machine']} (shared with other work); "
        + ", ".join(f"{k} {v}" for k, v in result["versions"].items() if k != "platform"),
        f"- model: Llama architecture, {result['model']['layers']} layers, hidden 2048, intermediate 5632, "
        f"32 heads, vocab 32000, untied LM head, float32: {result['model']['parameters']:,} parameters, "
        f"{disk / 1e9:.2f} GB of safetensors in {result['model']['shards']} shards. "
        "**Random weights** (normal, std 0.02), written tensor by tensor; fine-tunes = base + seeded noise "
        "(std 2e-4). A word-level tokenizer over the same ids.",
        f"- calibration: a token file of **random ids**, {NSAMPLES} windows x {SEQLEN} tokens "
        "(random ids are fine for a memory test; they say nothing about quality)",
        "- each run is its own process under `/usr/bin/time -v`; peak RSS is that process's own",
        f"- target: peak RSS under a quarter of the size on disk ({disk / 4e9:.2f} GB)", "",
        "| run | wall s | peak RSS GB | peak RSS / size on disk | commit, date |",
        "|---|---|---|---|---|",
    ]
    for name, run in result["runs"].items():
        lines.append(f"| {name} | {run['wall_s']} | {run['peak_rss_bytes'] / 1e9:.2f} | "
                     f"{run['peak_rss_bytes'] / disk:.3f} | {run.get('commit', result['commit'])}, "
                     f"{run.get('date', result['date'])} |")
    lines.append("")
    for earlier in result.get("history", []):
        lines += [f"Earlier: {earlier['note']}", "", "| run | wall s | peak RSS GB | peak RSS / size on disk |",
                  "|---|---|---|---|"]
        lines += [f"| {name} | {run['wall_s']} | {run['peak_rss_bytes'] / 1e9:.2f} | "
                  f"{run['peak_rss_bytes'] / disk:.3f} |" for name, run in earlier["runs"].items()]
        lines.append("")
    lines.append(f"`$BENCH`: `{result['bench']}`, the folder of the models and outputs.")
    lines.append("")
    for name, run in result["runs"].items():
        lines.append(f"- `{name}`: `{run['command']}`" + (f" — {run['note']}" if run.get("note") else ""))
    if result.get("notes"):
        lines += ["", "## Findings", ""] + [f"- {note}" for note in result["notes"]]
    if "comparison" in result:
        c = result["comparison"]
        lines += ["", f"Low-memory vs in-memory prune output: {c.get('tensors_differing')} of {c.get('tensors')} "
                      f"tensors differ (compared bit for bit, tensor by tensor)."]
    lines.append("")
    (RESULTS / "streaming_1p5b.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=26)
    parser.add_argument("--reference", action="store_true", help="also the in-memory prune, and compare outputs")
    parser.add_argument("--full-wanda-merge", action="store_true", help="also the whole Wanda-scored merge")
    parser.add_argument("--activation-merges", action="store_true",
                        help="also RegMean and OBIM on per-model calibration, --low-memory")
    parser.add_argument("--keep", action="store_true", help="keep the models in the cache")
    parser.add_argument("--only", action="append", help="run only this run (repeatable); keep the others' results")
    args = parser.parse_args()

    global WORK
    WORK = WORK / f"llama-{args.layers}L"
    WORK.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(WORK).free
    print(f"free disk under {WORK}: {free / 1e9:.1f} GB", flush=True)
    base, ft1, ft2 = WORK / "base", WORK / "ft1", WORK / "ft2"
    t0 = time.perf_counter()
    write_model(base, args.layers, seed=0)
    write_model(ft1, args.layers, seed=1, base=base)
    write_model(ft2, args.layers, seed=2, base=base)
    print(f"models written in {time.perf_counter() - t0:.0f} s", flush=True)
    calib = WORK / "calib.pt"
    torch.save(torch.randint(3, 32000, (NSAMPLES, SEQLEN), generator=torch.Generator().manual_seed(0)), calib)

    checkpoint = Checkpoint(base)
    parameters = sum(int(torch.Size(checkpoint.shape(n)).numel()) for n in checkpoint.names())
    result = {
        **provenance([__file__, *sys.argv[1:]]), "versions": versions(), "bench": shown(str(WORK)),
        "model": {"layers": args.layers, "parameters": parameters, "size_on_disk_bytes": size_on_disk(base),
                  "shards": len(list(base.glob("*.safetensors"))), "weights": "random (normal, std 0.02)"},
        "calibration": {"tokens": "random ids", "nsamples": NSAMPLES, "seqlen": SEQLEN},
        "runs": {},
    }
    previous = RESULTS / "streaming_1p5b.json"
    if previous.is_file():
        old = json.loads(previous.read_text())
        result["history"] = old.get("history", [])
        result["notes"] = old.get("notes", [])  # findings written after a run, kept across reruns
        if args.only and old["model"]["layers"] == args.layers:
            result["runs"] = {k: v for k, v in old["runs"].items() if k not in args.only}
    prune_args = ["prune", str(base), "--method", "wanda", "--sparsity", "0.5", "--calib", str(calib),
                  "--nsamples", str(NSAMPLES), "--seqlen", str(SEQLEN), "--overwrite"]
    recipe = {"merge_method": "ties", "base_model": str(base),
              "models": [{"model": str(p), "parameters": {"weight": 0.5, "density": 0.2}} for p in (ft1, ft2)]}
    wanda_recipe = {**recipe, "sparsify": {"score": "wanda"},
                    "calibration": {"data": str(calib), "nsamples": NSAMPLES, "seqlen": SEQLEN}}
    (WORK / "ties.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    for name, method, parameters in (("regmean", "regmean", {"weight": 1.0}),
                                     ("obim", "obim", {"weight": 1.0, "density": 0.2})):
        (WORK / f"{name}.yaml").write_text(yaml.safe_dump(activation_recipe(base, (ft1, ft2), method, parameters),
                                                          sort_keys=False))
    (WORK / "ties-wanda.yaml").write_text(yaml.safe_dump(wanda_recipe, sort_keys=False))

    wandamerge = [WANDAMERGE, "-q"]
    runs = [("prune-low-memory", wandamerge, [*prune_args, "-o", str(WORK / "pruned-low"), "--low-memory"], None)]
    if args.reference:
        runs.append(("prune-in-memory", wandamerge, [*prune_args, "-o", str(WORK / "pruned-plain"),
                                                     "--no-low-memory"], "reference: the whole model loaded"))
    runs += [("merge-ties", wandamerge, ["merge", str(WORK / "ties.yaml"), "-o", str(WORK / "merged"), "--overwrite"],
              "data-free: one tensor per input at a time"),
             ("wanda-activations-low-memory", [sys.executable, str(ACTIVATIONS)], [str(base), str(calib)],
              "the calibration pass of a Wanda-scored merge, streamed: merge.collect_input_norms with a "
              "StreamedModel loader, in a process of its own")]
    if args.full_wanda_merge:
        runs.append(("merge-ties-wanda-low-memory", wandamerge,
                     ["merge", str(WORK / "ties-wanda.yaml"), "-o", str(WORK / "merged-wanda"), "--overwrite",
                      "--low-memory"], "calibration pass over the base one block at a time, then the streamed merge"))
    if args.activation_merges:
        runs += [(f"merge-{name}-low-memory", wandamerge,
                  ["merge", str(WORK / f"{name}.yaml"), "-o", str(WORK / f"merged-{name}"), "--overwrite",
                   "--low-memory"], f"{name}: one calibration pass per fine-tune over the base, a block at a "
                                    "time; its statistics kept on disk beside the output; then the streamed merge")
                 for name in ("regmean", "obim")]
    if args.only:
        runs = [r for r in runs if r[0] in args.only]
    for name, program, cmd_args, note in runs:
        print(f"running {name} ...", flush=True)
        run = {key: value for key, value in provenance([]).items() if key in ("commit", "date")}
        run.update(timed([*program, *cmd_args], WORK / f"{name}.log"))
        shown_program = "wandamerge" if program is wandamerge else shown(f"python {ACTIVATIONS}")
        run.update({"command": f"{shown_program} " + " ".join(cmd_args).replace(str(WORK), "$BENCH"), "note": note})
        if "-o" in cmd_args:
            out = Path(cmd_args[cmd_args.index("-o") + 1])
            record = json.loads((out / "wandamerge.json").read_text())
            run.update({"output_size_on_disk_bytes": size_on_disk(out), "record_seconds": record.get("seconds"),
                        "record_peak_memory": record.get("peak_memory")})
            if name.startswith("prune"):
                run["overall_sparsity"] = record["sparsity"]["overall"]
            if name.startswith("merge"):
                shutil.rmtree(out)
        else:
            run["output"] = json.loads((WORK / f"{name}.log").read_text().strip().splitlines()[-1])
        print(f"  {run['wall_s']} s, peak RSS {run['peak_rss_bytes'] / 1e9:.2f} GB", flush=True)
        result["runs"][name] = run
        write_results(result)
    if "prune-in-memory" in result["runs"] and (WORK / "pruned-plain").is_dir():
        print("comparing the two prune outputs ...", flush=True)
        result["comparison"] = same_tensors(WORK / "pruned-low", WORK / "pruned-plain")
        write_results(result)
    for out in ("pruned-low", "pruned-plain"):
        shutil.rmtree(WORK / out, ignore_errors=True)
    if not args.keep:
        for path in (base, ft1, ft2):
            shutil.rmtree(path, ignore_errors=True)
    print(json.dumps({k: (v["wall_s"], v["peak_rss_bytes"]) for k, v in result["runs"].items()}, indent=2))


if __name__ == "__main__":
    main()
