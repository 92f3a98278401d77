"""Pruning benchmark on SmolLM2-135M: perplexity, wall time, decision time, peak memory.

Every configuration runs as its own `wandamerge prune` process (so peak memory
is that run's alone), then `wandamerge ppl` measures the saved model on the
held-out windows. The floor is measured the same way: a process that loads the
model, runs one plain forward pass of its decoder over the same calibration
windows, and saves it. Results go to benchmarks/results/ as JSON and Markdown.

    python benchmarks/prune_smollm2.py                 # everything below
    python benchmarks/prune_smollm2.py --only wanda-50 --only dense

Calibration and evaluation windows: ``--windows-dir`` (default
``../shared/data/smollm2-wiki``, relative to the repository root), with
``calib_128x512.pt`` and ``eval_64x512.pt``; without it, ``wiki`` windows. The
reference implementations' perplexities on those windows are read from
benchmarks/reference/smollm2_wiki_perplexity.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WINDOWS_DIR = "../shared/data/smollm2-wiki"  # relative to the repository root
REFERENCE_FILE = HERE / "reference" / "smollm2_wiki_perplexity.json"
BIN = Path(sys.executable).parent

# name -> extra `wandamerge prune` arguments (None = the dense model)
CONFIGS: dict[str, list[str] | None] = {
    "dense": None,
    "magnitude-tensor-50": ["--method", "magnitude", "--group", "tensor", "--sparsity", "0.5"],
    "magnitude-tensor-4:8": ["--method", "magnitude", "--pattern", "4:8"],
    "magnitude-tensor-2:4": ["--method", "magnitude", "--pattern", "2:4"],
    "sparsegpt-50": ["--method", "sparsegpt", "--sparsity", "0.5"],
    "sparsegpt-4:8": ["--method", "sparsegpt", "--pattern", "4:8"],
    "sparsegpt-2:4": ["--method", "sparsegpt", "--pattern", "2:4"],
    "wanda-50": ["--method", "wanda", "--sparsity", "0.5"],
    "wanda-4:8": ["--method", "wanda", "--pattern", "4:8"],
    "wanda-2:4": ["--method", "wanda", "--pattern", "2:4"],
    "wanda-50-parallel": ["--method", "wanda", "--sparsity", "0.5", "--within-block", "parallel", "--batch-size", "8"],
    "wanda-2:4-parallel": ["--method", "wanda", "--pattern", "2:4", "--within-block", "parallel", "--batch-size", "8"],
    # the orders by name (the default, auto, chooses between them from the activation memory: prune_smollm2_order)
    "wanda-50-sequential": ["--method", "wanda", "--sparsity", "0.5", "--within-block", "sequential"],
    "sparsegpt-50-sequential": ["--method", "sparsegpt", "--sparsity", "0.5", "--within-block", "sequential"],
    # the paper's analyses: higher sparsity, comparison groups, weight update
    "magnitude-tensor-60": ["--method", "magnitude", "--group", "tensor", "--sparsity", "0.6"],
    "magnitude-tensor-70": ["--method", "magnitude", "--group", "tensor", "--sparsity", "0.7"],
    "sparsegpt-60": ["--method", "sparsegpt", "--sparsity", "0.6"],
    "sparsegpt-70": ["--method", "sparsegpt", "--sparsity", "0.7"],
    "wanda-60": ["--method", "wanda", "--sparsity", "0.6"],
    "wanda-70": ["--method", "wanda", "--sparsity", "0.7"],
    "wanda-tensor-50": ["--method", "wanda", "--group", "tensor", "--sparsity", "0.5"],
    "magnitude-row-50": ["--method", "magnitude", "--group", "row", "--sparsity", "0.5"],
    "magnitude-tensor-50-update": ["--method", "magnitude", "--group", "tensor", "--sparsity", "0.5", "--update"],
    "wanda-50-update": ["--method", "wanda", "--sparsity", "0.5", "--update"],
    "magnitude-tensor-2:4-update": ["--method", "magnitude", "--pattern", "2:4", "--update"],
    "wanda-2:4-update": ["--method", "wanda", "--pattern", "2:4", "--update"],
    # past the paper: OWL's layer-wise allocation (its defaults, M 5 and lambda 0.08, untuned)
    "wanda-60-owl": ["--method", "wanda", "--sparsity", "0.6", "--sparsity-profile", "owl"],
    "wanda-70-owl": ["--method", "wanda", "--sparsity", "0.7", "--sparsity-profile", "owl"],
    "sparsegpt-70-owl": ["--method", "sparsegpt", "--sparsity", "0.7", "--sparsity-profile", "owl"],
    # OWL's lambda as benchmarks/owl_validation.py chose it on validation windows (0.04 at M 5)
    "wanda-70-owl-validated": ["--method", "wanda", "--sparsity", "0.7", "--sparsity-profile", "owl",
                               "--owl-lambda", "0.04"],
    # the choice once the M grid was run (lambda 0.08, M 10; M 3, 5, 7, 10 at lambda 0.08)
    "wanda-70-owl-validated-m10": ["--method", "wanda", "--sparsity", "0.7", "--sparsity-profile", "owl",
                                   "--owl-lambda", "0.08", "--owl-m", "10"],
    # and once M 15 was added (820.9 against M 10's 823.8 on validation)
    "wanda-70-owl-validated-m15": ["--method", "wanda", "--sparsity", "0.7", "--sparsity-profile", "owl",
                                   "--owl-lambda", "0.08", "--owl-m", "15"],
    # 2:4 at SparseGPT's quality for Wanda's cost: RIA, its channel permutation, and the least-squares refit
    "ria-2:4": ["--method", "ria", "--pattern", "2:4"],
    "ria-2:4-permute": ["--method", "ria", "--pattern", "2:4", "--permute"],
    "ria-2:4-permute-update": ["--method", "ria", "--pattern", "2:4", "--permute", "--update"],
    "wanda-2:4-permute-update": ["--method", "wanda", "--pattern", "2:4", "--permute", "--update"],
    "ria-50": ["--method", "ria", "--sparsity", "0.5"],
    # DSnoT's mask refinement from Wanda's mask: the paper's rules, and guarded by the squared-error estimate
    "dsnot-2:4": ["--method", "dsnot", "--pattern", "2:4"],
    "dsnot-guarded-2:4": ["--method", "dsnot-guarded", "--pattern", "2:4"],
    "dsnot-2:4-permute-update": ["--method", "dsnot", "--pattern", "2:4", "--permute", "--update"],
    "dsnot-70": ["--method", "dsnot", "--sparsity", "0.7"],
    "dsnot-guarded-70": ["--method", "dsnot-guarded", "--sparsity", "0.7"],
    "dsnot-guarded-70-owl": ["--method", "dsnot-guarded", "--sparsity", "0.7", "--sparsity-profile", "owl"],
}
# robustness to calibration size: the first K of the 128 calibration windows
for _k in (1, 4, 16, 64):
    CONFIGS[f"wanda-50-calib{_k}"] = ["--method", "wanda", "--sparsity", "0.5", "@calib-first", str(_k)]
    CONFIGS[f"sparsegpt-50-calib{_k}"] = ["--method", "sparsegpt", "--sparsity", "0.5", "@calib-first", str(_k)]

# Peers: name -> (method, mask structure) for benchmarks/peers/llmcompressor_prune.py (needs --llmcompressor-python)
PEER_CONFIGS = {
    "llmcompressor-wanda-50": ("wanda", "0:0"),
    "llmcompressor-wanda-2:4": ("wanda", "2:4"),
    "llmcompressor-sparsegpt-50": ("sparsegpt", "0:0"),
    "llmcompressor-sparsegpt-2:4": ("sparsegpt", "2:4"),
}



def reference_ppl() -> dict[str, float]:
    """config -> perplexity measured on the same windows with the reference implementations (see the file)."""
    return {name: entry["ppl"] for name, entry in json.loads(REFERENCE_FILE.read_text())["perplexity"].items()}


def run(cmd: list[str], log) -> tuple[float, str]:
    t0 = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log.write(f"$ {' '.join(cmd)}\n{result.stderr[-3000:]}\n{result.stdout[-3000:]}\n")
    log.flush()
    if result.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed: {result.stderr.strip().splitlines()[-1:]}")
    return wall, result.stdout


def ppl(model_dir: str, eval_data: str, log) -> float:
    _, out = run([str(BIN / "wandamerge"), "-q", "ppl", model_dir, "--data", eval_data, "--seqlen", "512",
                  "--windows", "64"], log)
    return json.loads(out.strip().splitlines()[-1])["perplexity"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model dir [default: the embedded SmolLM2 in the cache]")
    parser.add_argument("--windows-dir", default=WINDOWS_DIR,
                        help="folder with calib_128x512.pt and eval_64x512.pt, relative to the repository root "
                             f"(or absolute) [default: {WINDOWS_DIR}]")
    parser.add_argument("--calib", default=None, help="calibration [default: --windows-dir's 128x512, else wiki]")
    parser.add_argument("--eval", dest="eval_data", default=None,
                        help="evaluation [default: --windows-dir's 64x512, else wiki]")
    parser.add_argument("--only", action="append", help="run only these configurations (repeatable)")
    parser.add_argument("--work", default=os.path.expanduser("~/.cache/wandamerge/bench/prune"))
    parser.add_argument("--tag", default="prune_smollm2")
    parser.add_argument("--resume", action="store_true", help="keep the rows of an earlier run of this tag")
    parser.add_argument("--llmcompressor-python", help="python of a venv with llmcompressor (for llmcompressor-* configs)")
    args = parser.parse_args()

    from wandamerge.models import prepare_smollm2

    model = args.model or str(prepare_smollm2())
    windows = (REPO / args.windows_dir).resolve()  # an absolute --windows-dir stays as it is
    calib = args.calib or (str(windows / "calib_128x512.pt") if windows.exists() else "wiki")
    eval_data = args.eval_data or (str(windows / "eval_64x512.pt") if windows.exists() else "wiki")
    reference = reference_ppl()
    calib_args = ["--calib", calib, "--nsamples", "128", "--seqlen", "512"]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results_dir = HERE / "results"
    results_dir.mkdir(exist_ok=True)
    log = open(work / f"{args.tag}.log", "a")
    names = args.only or list(CONFIGS) + ["floor"]
    rows = []
    previous = HERE / "results" / f"{args.tag}.json"
    if args.resume and previous.is_file():  # keep every row already measured (named or not), run the rest
        rows = json.loads(previous.read_text())["rows"]
        names = [n for n in names if n not in {r["name"] for r in rows}]

    for name in names:
        if rows:
            write_results(args, model, calib, eval_data, rows)
        print(f"== {name}", flush=True)
        if name == "floor":
            if not calib.endswith(".pt"):
                print("   floor needs a .pt calibration file; skipped")
                continue
            wall, out = run([str(BIN / "python"), str(HERE / "programs" / "prune_floor.py"), model, calib,
                             str(work / "floor-out")], log)
            rows.append({"name": "floor: load + plain forward + save", "wall_s": wall,
                         "stages": json.loads(out.strip().splitlines()[-1])})
            continue
        if name in PEER_CONFIGS:
            if not args.llmcompressor_python:
                raise SystemExit(f"{name} needs --llmcompressor-python")
            out_dir = work / name.replace(":", "-")
            shutil.rmtree(out_dir, ignore_errors=True)
            method, structure = PEER_CONFIGS[name]
            wall, out = run([args.llmcompressor_python, str(HERE / "peers" / "llmcompressor_prune.py"), model, calib,
                             str(out_dir), method, structure], log)
            peer = json.loads(out.strip().splitlines()[-1])
            rows.append({"name": name, "ppl": ppl(str(out_dir), eval_data, log), "reference_ppl": reference.get(name),
                         "wall_s": wall, "prune_s": peer["oneshot_s"], "stages": peer,
                         "peak_rss_gb": peer["peak_rss_bytes"] / 1e9, "within_block": "llm-compressor"})
            print(f"   {rows[-1]['ppl']:.2f} ppl, {wall:.1f} s", flush=True)
            shutil.rmtree(out_dir, ignore_errors=True)
            continue
        extra = CONFIGS[name]
        if extra is None:
            rows.append({"name": name, "ppl": ppl(model, eval_data, log), "reference_ppl": reference.get(name)})
            continue
        out_dir = work / name.replace(":", "-")
        run_calib_args = calib_args
        if "@calib-first" in extra:  # the first K calibration windows, written once to the work directory
            at = extra.index("@calib-first")
            first = int(extra[at + 1])
            extra = extra[:at] + extra[at + 2:]
            import torch

            subset = work / f"calib-first{first}.pt"
            torch.save(torch.load(calib)[:first].clone(), subset)
            run_calib_args = ["--calib", str(subset), "--nsamples", str(first), "--seqlen", "512"]
        wall, _ = run([str(BIN / "wandamerge"), "-q", "prune", model, "-o", str(out_dir), "--overwrite",
                       *run_calib_args, *extra], log)
        record = json.loads((out_dir / "wandamerge.json").read_text())
        rows.append({
            "name": name, "ppl": ppl(str(out_dir), eval_data, log), "reference_ppl": reference.get(name),
            "wall_s": wall, "prune_s": record["seconds"]["prune"], "decision_s": record["prune_seconds"]["decision"],
            "forward_s": record["prune_seconds"]["forward"], "stages": record["seconds"],
            "peak_rss_gb": record["peak_memory"]["rss_bytes"] / 1e9, "sparsity": record["sparsity"]["overall"],
            "within_block": record["settings"]["within_block"],
        })
        print(f"   {rows[-1]['ppl']:.2f} ppl, {wall:.1f} s", flush=True)
        shutil.rmtree(out_dir, ignore_errors=True)

    print(markdown(write_results(args, model, calib, eval_data, rows), rows))


def write_results(args, model: str, calib: str, eval_data: str, rows: list[dict]) -> dict:
    """Write the JSON and Markdown results (called after every row, so a crash loses nothing)."""
    from wandamerge.io.record import portable as shown
    from wandamerge.io.record import provenance

    meta = shown({**provenance([__file__, *sys.argv[1:]]), "model": model, "calib": calib, "eval": eval_data})
    results_dir = HERE / "results"
    (results_dir / f"{args.tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (results_dir / f"{args.tag}.md").write_text(markdown(meta, rows))
    return meta


def markdown(meta: dict, rows: list[dict]) -> str:
    fmt = lambda v, spec: "" if v is None else format(v, spec)  # noqa: E731
    lines = [f"# Pruning SmolLM2-135M ({meta['date']}, commit {meta['commit']})", "",
             f"- command: `{meta['command']}`", f"- machine: {meta['machine']}",
             f"- model: `{meta['model']}`", f"- calibration: `{meta['calib']}` (128 x 512 tokens)",
             f"- evaluation: `{meta['eval']}` (64 x 512 held-out tokens)", "",
             "| config | order | perplexity | reference impl. | wall s (end to end) | prune s | decision s | peak RSS GB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "ppl" not in r:
            continue
        lines.append(f"| {r['name']} | {r.get('within_block', '')} | {fmt(r['ppl'], '.2f')} | "
                     f"{fmt(r.get('reference_ppl'), '.2f')} | {fmt(r.get('wall_s'), '.1f')} | "
                     f"{fmt(r.get('prune_s'), '.1f')} | {fmt(r.get('decision_s'), '.2f')} | "
                     f"{fmt(r.get('peak_rss_gb'), '.2f')} |")
    floor = [r for r in rows if r["name"].startswith("floor")]
    if floor:
        f = floor[0]
        lines += ["", f"Floor (one process: load + plain decoder forward over the 128 windows + save): "
                      f"{f['wall_s']:.1f} s wall ({', '.join(f'{k} {v:.1f} s' for k, v in f['stages'].items())})."]
        for r in rows:
            if r["name"].startswith("wanda") and "wall_s" in r:
                lines.append(f"- {r['name']}: {r['wall_s'] / f['wall_s']:.2f}x the floor")
    lines += side_by_side(rows)
    lines.append("")
    return "\n".join(lines)


def side_by_side(rows: list[dict]) -> list[str]:
    """Each llm-compressor row against wandamerge's row of the same method and pattern from the same run."""
    by_name = {r["name"]: r for r in rows}
    pairs = [(r, by_name.get(r["name"].removeprefix("llmcompressor-"))) for r in rows
             if r["name"].startswith("llmcompressor-") and "ppl" in r]
    pairs = [(peer, ours) for peer, ours in pairs if ours and "wall_s" in ours]
    if not pairs:
        return []
    versions = pairs[0][0].get("stages", {}).get("versions", {})
    lines = ["", "## Side by side with llm-compressor (this run, same windows, perplexity by the same `wandamerge ppl`)",
             ""]
    if versions:
        lines += [f"llm-compressor side (its own venv): {', '.join(f'{k} {v}' for k, v in versions.items())}", ""]
    lines += ["| config | perplexity (ours / llm-compressor) | wall s (ours / llm-compressor) | wall ratio | "
              "peak RSS GB (ours / llm-compressor) | memory ratio |", "|---|---|---|---|---|---|"]
    for peer, ours in pairs:
        lines.append(f"| {ours['name']} | {ours['ppl']:.2f} / {peer['ppl']:.2f} | {ours['wall_s']:.1f} / "
                     f"{peer['wall_s']:.1f} | {ours['wall_s'] / peer['wall_s']:.2f} | {ours['peak_rss_gb']:.2f} / "
                     f"{peer['peak_rss_gb']:.2f} | {ours['peak_rss_gb'] / peer['peak_rss_gb']:.2f} |")
    lines += ["", "Ratios are wandamerge / llm-compressor: below 1, wandamerge is faster or leaner. Wall time is "
              "end to end (process start to saved model) for both."]
    return lines


if __name__ == "__main__":
    main()
