"""OWL's lambda for SmolLM2-135M, chosen on validation windows, never on the test windows.

Validation: the held-out (odd-indexed) Wikipedia articles' tokens AFTER the 64 x 512 that the shared
evaluation windows hold (tokenized as ../shared/data/smollm2-wiki/README.md says; the first 64 x 512 tokens
are checked equal to eval_64x512.pt, so the two never overlap): 32 windows of 512. Calibration: the shared
128 x 512 windows. For each method and sparsity, every (lambda, M) of the grid (default: the lambdas below at
M = 5, the paper's) is pruned and measured on validation; the best is then the one benchmarks/prune_smollm2.py
measures on test.

    python benchmarks/owl_validation.py [--methods wanda sparsegpt] [--sparsity 0.7] [--lambdas 0.04 0.06]
                                        [--owl-m 3 7]

Results: benchmarks/results/owl_validation.{json,md} (resumable: measured rows are kept).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from wandamerge.core.allocation import OWL_M  # noqa: E402
from wandamerge.io.record import provenance  # noqa: E402

LAMBDAS = (0.0, 0.08, 0.15, 0.25)  # 0 = uniform; 0.08 = the paper's default
FIRST_RUN, FIRST_DATE = "3be3643", "2026-12-02 19:19 UTC"  # the rows measured before rows carried their own stamp
FIRST_MACHINE = "x86_64, 2 cores, 24 GiB, Linux-6.18.44-fc-v1045-x86_64-with-glibc2.36"
WINDOWS = Path("../shared/data/smollm2-wiki")
RESULTS = HERE / "results"
WORK = Path.home() / ".cache" / "wandamerge" / "bench" / "prune"
BIN = Path(sys.executable).parent


def validation_windows() -> Path:
    from transformers import AutoTokenizer

    from wandamerge.calibration import tokenize_text, wiki_split
    from wandamerge.models import prepare_smollm2

    out = WORK / "owl_validation_32x512.pt"
    if out.is_file():
        return out
    ids = tokenize_text(wiki_split("evaluation"), AutoTokenizer.from_pretrained(prepare_smollm2()))
    test = torch.load(HERE.parent / WINDOWS / "eval_64x512.pt")
    if not torch.equal(ids[:test.numel()].reshape(test.shape), test):
        raise SystemExit("the held-out tokens do not start with the shared evaluation windows; not validating")
    WORK.mkdir(parents=True, exist_ok=True)
    torch.save(ids[test.numel():test.numel() + 32 * 512].reshape(32, 512).clone(), out)
    return out


def measure(method: str, sparsity: float, lam: float, m: float, validation: Path) -> float:
    profile = ["--sparsity-profile", "owl", "--owl-lambda", str(lam), "--owl-m", str(m)] if lam else []
    cmd = [str(BIN / "wandamerge"), "-q", "prune", "smollm2", "--method", method, "--sparsity", str(sparsity),
           "--calib", str(HERE.parent / WINDOWS / "calib_128x512.pt"), "--nsamples", "128", "--seqlen", "512",
           "--eval-ppl", str(validation), "--eval-windows", "32", *profile]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)["perplexity"]["pruned"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["wanda"])
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--lambdas", type=float, nargs="+", default=list(LAMBDAS))
    parser.add_argument("--owl-m", type=float, nargs="+", default=[OWL_M], help="outlier thresholds M")
    args = parser.parse_args()
    validation = validation_windows()
    path = RESULTS / "owl_validation.json"
    result = json.loads(path.read_text()) if path.is_file() else {"rows": {}}
    result.update(provenance([__file__, *sys.argv[1:]]))
    for method in args.methods:
        for lam, m in [(lam, m) for m in args.owl_m for lam in args.lambdas]:
            key = f"{method}-{args.sparsity}-lambda{lam}" + (f"-m{m:g}" if m != OWL_M and lam else "")
            if key not in result["rows"]:
                stamp = {k: v for k, v in provenance([]).items() if k in ("commit", "date", "machine")}
                result["rows"][key] = {"method": method, "sparsity": args.sparsity, "lambda": lam, "m": m, **stamp,
                                       "validation_ppl": measure(method, args.sparsity, lam, m, validation)}
                print(key, result["rows"][key]["validation_ppl"], flush=True)
                path.write_text(json.dumps(result, indent=2))
    lines = [f"# OWL's lambda on validation windows ({result['date']}, commit {result['commit']})", "",
             f"- command: `{result['command']}`", f"- machine: {result['machine']}",
             "- validation: 32 x 512 held-out Wikipedia tokens after the shared evaluation windows (disjoint from "
             "them); calibration: the shared 128 x 512 windows; M = the outlier threshold (5, the paper's, where not "
             "said); lambda 0 = uniform sparsity; each row with the commit and date it was measured at", "",
             "| method | sparsity | lambda | M | validation perplexity | commit, date |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['sparsity']} | {r['lambda']} | {r.get('m', OWL_M):g} | "
              f"{r['validation_ppl']:.2f} | {r.get('commit', FIRST_RUN)}, {r.get('date', FIRST_DATE)} |"
              for r in result["rows"].values()]
    machines = {}
    for r in result["rows"].values():
        machines.setdefault(r.get("machine", FIRST_MACHINE), []).append(r.get("date", FIRST_DATE)[:10])
    lines += ["", "Machines: " + "; ".join(f"{m} ({', '.join(sorted(set(days)))})" for m, days in machines.items())
              + ". Perplexity does not depend on a machine's speed, but float sums may differ slightly between CPUs."]
    best = {}
    for r in result["rows"].values():
        key = (r["method"], r["sparsity"])
        if key not in best or r["validation_ppl"] < best[key]["validation_ppl"]:
            best[key] = r
    lines += ["", "Chosen (lowest validation perplexity): " + "; ".join(
        f"{m} {s}: lambda {r['lambda']}, M {r.get('m', OWL_M):g}" for (m, s), r in best.items()), ""]
    (RESULTS / "owl_validation.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
