"""DSnoT's two rule sets on SmolLM2-135M, chosen between on validation windows, never on the test windows.

``dsnot`` follows the paper's rules (a row's swaps stop at a sign flip of its mean output error, which must
shrink); ``dsnot-guarded`` also refuses a swap that raises the row's squared output error estimated with
uncorrelated channels. Both are pruned at 2:4 and at 70% and measured on the validation windows of
``owl_validation.py`` (32 x 512 held-out Wikipedia tokens after the shared evaluation windows, disjoint from
them); calibration: the shared 128 x 512 windows. The one with the lower validation perplexity, over both
shapes, is the one the README recommends; benchmarks/prune_smollm2.py measures both on test.

    python benchmarks/dsnot_validation.py [--methods dsnot dsnot-guarded wanda] [--shapes 2:4 0.7]

Results: benchmarks/results/dsnot_validation.{json,md} (resumable: measured rows are kept).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from owl_validation import BIN, WINDOWS, validation_windows  # noqa: E402
from wandamerge.io.record import provenance  # noqa: E402

RESULTS = HERE / "results"


def measure(method: str, shape: str, validation: Path) -> float:
    target = ["--pattern", shape] if ":" in shape else ["--sparsity", shape]
    cmd = [str(BIN / "wandamerge"), "-q", "prune", "smollm2", "--method", method, *target,
           "--calib", str(HERE.parent / WINDOWS / "calib_128x512.pt"), "--nsamples", "128", "--seqlen", "512",
           "--eval-ppl", str(validation), "--eval-windows", "32"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)["perplexity"]["pruned"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["dsnot", "dsnot-guarded"])
    parser.add_argument("--shapes", nargs="+", default=["2:4", "0.7"])
    args = parser.parse_args()
    validation = validation_windows()
    path = RESULTS / "dsnot_validation.json"
    result = json.loads(path.read_text()) if path.is_file() else {"rows": {}}
    result.update(provenance([__file__, *sys.argv[1:]]))
    for shape in args.shapes:
        for method in args.methods:
            key = f"{method}-{shape}"
            if key not in result["rows"]:
                result["rows"][key] = {"method": method, "shape": shape,
                                       "validation_ppl": measure(method, shape, validation)}
                print(key, result["rows"][key]["validation_ppl"], flush=True)
                path.write_text(json.dumps(result, indent=2))
    lines = [f"# DSnoT's rules on validation windows ({result['date']}, commit {result['commit']})", "",
             f"- command: `{result['command']}`", f"- machine: {result['machine']}",
             "- validation: 32 x 512 held-out Wikipedia tokens after the shared evaluation windows (disjoint from "
             "them); calibration: the shared 128 x 512 windows", "",
             "| method | shape | validation perplexity |", "|---|---|---|"]
    lines += [f"| {r['method']} | {r['shape']} | {r['validation_ppl']:.2f} |" for r in result["rows"].values()]
    lines.append("")
    (RESULTS / "dsnot_validation.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
