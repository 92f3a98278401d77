"""Depth pruning's block score for SmolLM2-135M, chosen on validation windows; test perplexity reported beside it.

For each ratio R (0.2, 0.3) and each score, ``wandamerge prune smollm2 --structure depth --sparsity R
--depth-score S`` on calibration windows: ``bi`` on the shared 128 x 512 and on their first 16; ``ppl`` (one
whole-model forward per block) on the first 16 only. Each pruned model is measured on the validation windows
(32 x 512 held-out Wikipedia tokens after the shared evaluation windows, as ``owl_validation.py`` makes them)
and on the shared 64 x 512 evaluation (test) windows. The score with the lowest validation perplexity at a ratio
is the one the README recommends; the test column is never used to choose.

    python benchmarks/depth_validation.py

Results: benchmarks/results/depth_validation.{json,md} (resumable: measured rows are kept).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from owl_validation import WINDOWS, WORK, validation_windows  # noqa: E402
from prune_smollm2 import BIN, run  # noqa: E402

from wandamerge.io.record import provenance  # noqa: E402

RATIOS = (0.2, 0.3)
CONFIGS = {"bi-128": ("bi", 128), "bi-16": ("bi", 16), "ppl-16": ("ppl", 16)}  # name -> (score, windows)
RESULTS = HERE / "results"


def calibration(count: int) -> Path:
    """The first ``count`` of the shared calibration windows, as a token file."""
    shared = HERE.parent / WINDOWS / "calib_128x512.pt"
    if count == 128:
        return shared
    out = WORK / f"calib_first{count}x512.pt"
    if not out.is_file():
        WORK.mkdir(parents=True, exist_ok=True)
        torch.save(torch.load(shared)[:count].clone(), out)
    return out


def perplexity(model_dir: Path, windows: Path, count: int, log) -> float:
    _, out = run([str(BIN / "wandamerge"), "-q", "ppl", str(model_dir), "--data", str(windows), "--seqlen", "512",
                  "--windows", str(count)], log)
    return json.loads(out.strip().splitlines()[-1])["perplexity"]


def measure(score: str, count: int, ratio: float, validation: Path, log) -> dict:
    out = WORK / "depth-validation-model"
    wall, stdout = run([str(BIN / "wandamerge"), "-q", "prune", "smollm2", "-o", str(out), "--overwrite",
                        "--structure", "depth", "--sparsity", str(ratio), "--depth-score", score,
                        "--calib", str(calibration(count)), "--nsamples", str(count), "--seqlen", "512"], log)
    record = json.loads((out / "wandamerge.json").read_text())
    row = {"score": score, "calibration_windows": count, "sparsity": ratio, "removed": record["depth"]["removed"],
           "prune_s": record["seconds"]["prune"], "wall_s": wall,
           "validation_ppl": perplexity(out, validation, 32, log),
           "test_ppl": perplexity(out, HERE.parent / WINDOWS / "eval_64x512.pt", 64, log)}
    shutil.rmtree(out, ignore_errors=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    validation = validation_windows()
    path = RESULTS / "depth_validation.json"
    rows = json.loads(path.read_text())["rows"] if path.is_file() else {}
    log = open(WORK / "depth_validation.log", "a")
    for ratio in RATIOS:
        for name, (score, count) in CONFIGS.items():
            key = f"{name}-{ratio}"
            if key in rows:
                continue
            rows[key] = {**measure(score, count, ratio, validation, log), **provenance([__file__])}
            print(key, rows[key]["validation_ppl"], rows[key]["test_ppl"], flush=True)
            path.write_text(json.dumps({**provenance([__file__, *sys.argv[1:]]), "rows": rows}, indent=2))
    write(rows)


def write(rows: dict) -> None:
    header = provenance([__file__, *sys.argv[1:]])
    lines = [f"# Depth pruning's block score on validation ({header['date']}, commit {header['commit']})", "",
             f"- command: `{header['command']}`", f"- machine: {header['machine']}",
             "- validation: 32 x 512 held-out Wikipedia tokens after the shared evaluation windows (disjoint from "
             "them); test: the shared 64 x 512 evaluation windows; calibration: the first N of the shared 128 x 512",
             "", "| ratio | score | calibration windows | blocks removed | validation ppl | test ppl | prune s | "
             "commit, date |", "|---|---|---|---|---|---|---|---|"]
    for row in rows.values():
        lines.append(f"| {row['sparsity']} | {row['score']} | {row['calibration_windows']} | {row['removed']} | "
                     f"{row['validation_ppl']:.2f} | {row['test_ppl']:.2f} | {row['prune_s']:.0f} | "
                     f"{row['commit']}, {row['date']} |")
    lines.append("")
    for ratio in RATIOS:
        found = [r for r in rows.values() if r["sparsity"] == ratio]
        if found:
            best = min(found, key=lambda r: r["validation_ppl"])
            lines.append(f"Chosen at {ratio} (lowest validation perplexity): {best['score']} on "
                         f"{best['calibration_windows']} windows.")
    (RESULTS / "depth_validation.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
