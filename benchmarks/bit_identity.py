"""Hash the tensors of every prune and merge output, to show that a refactor changed no result.

Runs the ``wandamerge`` command line in-process (its interface is the stable
part across refactors) on:

* tiny random Llama and GPT-2 models built here (2 blocks; GPT-2 for its
  transposed Conv1D weights), with three perturbed copies as fine-tunes and one
  PEFT LoRA adapter;
* SmolLM2-135M-Instruct (``wandamerge model smollm2``), with two perturbed
  copies as fine-tunes (``--no-smollm2`` skips it).

The fine-tunes are the base plus seeded Gaussian noise: synthetic, for a
bit-identity check only, not task models. Every prune method (unstructured,
2:4, low-memory, the update, per-tensor groups, the alpha variant, the parallel
order) and every merge method (default scores, Wanda scores, gradients) writes
a directory; each output's sha256 is taken over its tensors in name order
(name, dtype, shape and bytes), so file layout does not matter.

    python benchmarks/bit_identity.py --out benchmarks/results/bit_identity_<commit>.json
    python benchmarks/bit_identity.py --compare A.json B.json

``--old-prune-ties`` is a diagnostic: pruning then breaks ties at a cut-off
as it did before the selection was made one (among equal scores the LOWER
index pruned first, where now the lower index is kept first), so a run shows
whether that rule is the only thing that changed a pruned model.
``--only PREFIX`` runs the cases whose name starts with PREFIX.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

SCALE = 0.02  # noise of the synthetic fine-tunes, relative to the weights' spread

PRUNE_CASES = {
    "wanda-50": ["--method", "wanda", "--sparsity", "0.5"],
    "wanda-2of4": ["--method", "wanda", "--pattern", "2:4"],
    "wanda-50-lowmem": ["--method", "wanda", "--sparsity", "0.5", "--low-memory"],
    "wanda-2of4-lowmem": ["--method", "wanda", "--pattern", "2:4", "--low-memory"],
    "wanda-50-update": ["--method", "wanda", "--sparsity", "0.5", "--update"],
    "wanda-50-variant": ["--method", "wanda", "--sparsity", "0.5", "--variant"],
    "wanda-50-tensor": ["--method", "wanda", "--sparsity", "0.5", "--group", "tensor"],
    "wanda-50-parallel": ["--method", "wanda", "--sparsity", "0.5", "--within-block", "parallel"],
    "magnitude-50": ["--method", "magnitude", "--sparsity", "0.5"],
    "magnitude-2of4": ["--method", "magnitude", "--pattern", "2:4"],
    "magnitude-50-tensor-lowmem": ["--method", "magnitude", "--sparsity", "0.5", "--group", "tensor",
                                   "--low-memory"],
    "sparsegpt-50": ["--method", "sparsegpt", "--sparsity", "0.5"],
    "sparsegpt-2of4": ["--method", "sparsegpt", "--pattern", "2:4"],
    "sparsegpt-2of4-lowmem": ["--method", "sparsegpt", "--pattern", "2:4", "--low-memory"],
}
SMOLLM2_PRUNE = ("wanda-50", "wanda-2of4", "wanda-50-lowmem", "magnitude-50", "sparsegpt-50", "sparsegpt-2of4")

MERGE_METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
                 "breadcrumbs_ties", "della", "della_linear")


def merge_cases(models: list[str]) -> dict[str, dict]:
    """Recipes (as dicts, ``base_model`` and ``calibration`` filled in later) by case name."""
    def entries(**params):
        return [{"model": m, "parameters": {"weight": 1.0 / len(models), **params}} for m in models]

    cases = {}
    for method in MERGE_METHODS:
        params = {} if method == "linear" else {"density": 0.3}
        cases[method] = {"merge_method": method, "models": entries(**params)}
    cases["ties-wanda"] = {"merge_method": "ties", "models": entries(density=0.3),
                           "sparsify": {"score": "wanda"}}
    cases["task_arithmetic-wanda-2of4"] = {"merge_method": "task_arithmetic", "models": entries(density=1.0),
                                           "sparsify": {"score": "wanda", "pattern": "2:4"}}
    cases["ties-wanda-finetuned"] = {"merge_method": "ties", "models": entries(density=0.3),
                                     "sparsify": {"score": "wanda", "activations": "finetuned"}}
    cases["ties-gradient-weight-density"] = {
        "merge_method": "ties", "models": [{"model": m, "parameters": {"weight": [0.2, 0.8], "density": [0.2, 0.6]}}
                                           for m in models]}
    cases["ties-gradient-lambda"] = {"merge_method": "ties", "models": entries(density=0.3),
                                     "parameters": {"lambda": [0.5, 1.5]}}
    cases["ties-bf16"] = {"merge_method": "ties", "models": entries(density=0.3), "dtype": "bfloat16"}
    return cases


def use_old_pruning_tie_rule() -> None:
    """Pruning selects on the scores reversed in flat order, then reverses the mask back: among equal
    scores the higher index is kept (the lower pruned), the rule of pruning before 2273701."""
    import wandamerge.core.sparsegpt as sparsegpt
    import wandamerge.pruning.methods as methods
    from wandamerge.core import selection

    def reversed_ties(select):
        def select_reversed(score, *args, **kwargs):
            dims = tuple(range(score.ndim))
            out = select(score.flip(dims), *args, **kwargs)
            return (out[0].flip(dims), *out[1:]) if isinstance(out, tuple) else out.flip(dims)
        return select_reversed

    for module, names in ((methods, ("keep_after_pruning", "keep_n_of_m", "cumulative_alpha_keep")),
                          (sparsegpt, ("keep_per_tensor", "keep_n_of_m"))):
        for name in names:
            setattr(module, name, reversed_ties(getattr(selection, name)))


def tensor_digest(directory: Path) -> str:
    """sha256 over every tensor of a saved model: name, dtype, shape and bytes, in name order."""
    from safetensors import safe_open

    tensors = {}
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def cli(*args: str) -> None:
    from wandamerge.cli import main

    try:
        main.main(args=["-q", *args], standalone_mode=False)
    except SystemExit as exc:  # pragma: no cover - click exits only on errors here
        if exc.code:
            raise


def perturbed_copies(base: Path, work: Path, count: int, tag: str) -> list[str]:
    """``count`` synthetic fine-tunes: every floating tensor plus seeded Gaussian noise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    paths = []
    for i in range(count):
        path = work / f"{tag}-ft{i}"
        if not (path / "config.json").is_file():
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
            g = torch.Generator().manual_seed(100 + i)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * (SCALE * float(p.std()) if p.numel() > 1 else SCALE))
            model.save_pretrained(path)
            AutoTokenizer.from_pretrained(base).save_pretrained(path)
        paths.append(str(path))
    return paths


def lora_adapter(base: Path, work: Path) -> str:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = work / "llama-lora"
    if not (path / "adapter_config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        torch.manual_seed(7)
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                       init_lora_weights=False))
        peft_model.save_pretrained(path)
    return str(path)


def tiny_models(work: Path) -> dict[str, Path]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import random_text, tiny_model, word_tokenizer  # the suite's tiny model factory

    made = {}
    for arch in ("llama", "gpt2"):
        path = work / f"tiny-{arch}"
        if not (path / "config.json").is_file():
            tiny_model(arch, seed=0).save_pretrained(path)
            word_tokenizer().save_pretrained(path)
        made[arch] = path
    text = work / "calib.txt"
    text.write_text(random_text(4000, seed=1))
    made["text"] = text
    return made


ONLY: tuple[str, ...] = ()  # --only: case-name prefixes to run (all when empty)


def wanted(name: str) -> bool:
    return not ONLY or name.startswith(ONLY)


def run_prunes(model: Path, cases, calib: list[str], out_root: Path, tag: str, results: dict) -> None:
    for case in cases:
        if not wanted(f"{tag}/prune/{case}"):
            continue
        out = out_root / f"{tag}-prune-{case}"
        t0 = time.perf_counter()
        cli("prune", str(model), "-o", str(out), "--overwrite", *PRUNE_CASES[case], *calib)
        results[f"{tag}/prune/{case}"] = tensor_digest(out)
        print(f"{tag}/prune/{case}: {results[f'{tag}/prune/{case}'][:16]} ({time.perf_counter() - t0:.1f} s)",
              flush=True)


def run_merges(base: Path, models: list[str], calibration: dict, out_root: Path, tag: str, results: dict,
               only=None) -> None:
    import yaml

    for case, recipe in merge_cases(models).items():
        if only is not None and case not in only or not wanted(f"{tag}/merge/{case}"):
            continue
        recipe = {"base_model": str(base), **recipe}
        if "sparsify" in recipe:
            recipe["calibration"] = calibration
        path = out_root / f"{tag}-{case}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        out = out_root / f"{tag}-merge-{case}"
        t0 = time.perf_counter()
        cli("merge", str(path), "-o", str(out), "--overwrite")
        results[f"{tag}/merge/{case}"] = tensor_digest(out)
        print(f"{tag}/merge/{case}: {results[f'{tag}/merge/{case}'][:16]} ({time.perf_counter() - t0:.1f} s)",
              flush=True)


def measure(work: Path, smollm2: bool) -> dict:
    results: dict[str, str] = {}
    outputs = work / "out"
    outputs.mkdir(parents=True, exist_ok=True)
    tiny = tiny_models(work)
    text = str(tiny["text"])
    tiny_calib = ["--calib", text, "--nsamples", "8", "--seqlen", "32"]
    for arch in ("llama", "gpt2"):
        run_prunes(tiny[arch], PRUNE_CASES, tiny_calib, outputs, f"tiny-{arch}", results)
        fts = perturbed_copies(tiny[arch], work, 3, f"tiny-{arch}")
        run_merges(tiny[arch], fts, {"data": text, "nsamples": 8, "seqlen": 32}, outputs, f"tiny-{arch}", results)
    lora = lora_adapter(tiny["llama"], work)
    ft0 = perturbed_copies(tiny["llama"], work, 1, "tiny-llama")[0]
    run_merges(tiny["llama"], [lora, ft0], {"data": text, "nsamples": 8, "seqlen": 32}, outputs, "tiny-llama-lora",
               results, only=("ties", "dare_ties", "ties-wanda", "task_arithmetic"))
    if smollm2:
        from wandamerge.cli import main  # noqa: F401  (import check before the long part)

        smol = work / "smollm2"
        if not (smol / "config.json").is_file():
            cli("model", "smollm2", "--out", str(smol), "--overwrite")
        calib = ["--calib", "wiki", "--nsamples", "16", "--seqlen", "256"]
        run_prunes(smol, SMOLLM2_PRUNE, calib, outputs, "smollm2", results)
        fts = perturbed_copies(smol, work, 2, "smollm2")
        run_merges(smol, fts, {"data": "wiki", "nsamples": 16, "seqlen": 256}, outputs, "smollm2", results,
                   only=("linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs", "della", "ties-wanda",
                         "ties-gradient-lambda"))
    return results


def compare(a_path: str, b_path: str) -> int:
    a, b = json.loads(Path(a_path).read_text()), json.loads(Path(b_path).read_text())
    rows = []
    for case in sorted(set(a["sha256"]) | set(b["sha256"])):
        x, y = a["sha256"].get(case), b["sha256"].get(case)
        rows.append((case, x, y, "same" if x == y else "DIFFERENT"))
    print(f"| case | {a['commit']} | {b['commit']} | |\n|---|---|---|---|")
    for case, x, y, verdict in rows:
        print(f"| {case} | {(x or '-')[:16]} | {(y or '-')[:16]} | {verdict} |")
    return sum(r[3] != "same" for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="results JSON")
    parser.add_argument("--work", help="where models and outputs go (kept between runs: models are reused)")
    parser.add_argument("--no-smollm2", action="store_true")
    parser.add_argument("--compare", nargs=2, metavar="JSON")
    parser.add_argument("--only", action="append", default=[], metavar="PREFIX")
    parser.add_argument("--old-prune-ties", action="store_true")
    args = parser.parse_args()
    if args.compare:
        sys.exit(1 if compare(*args.compare) else 0)
    global ONLY
    ONLY = tuple(args.only)
    if args.old_prune_ties:
        use_old_pruning_tie_rule()
    from wandamerge.io.record import provenance

    work = Path(args.work or tempfile.mkdtemp(prefix="bit-identity-"))
    started = provenance(sys.argv)  # the commit as the run starts
    t0 = time.perf_counter()
    results = measure(work, smollm2=not args.no_smollm2)
    record = {**started, "old_prune_ties": args.old_prune_ties, "seconds": round(time.perf_counter() - t0, 1),
              "sha256": results}
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
