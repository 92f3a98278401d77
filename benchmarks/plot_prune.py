"""Plots and the analysis tables from the pruning benchmark's results (no model is run).

    python benchmarks/plot_prune.py

Reads results/prune_smollm2.json (50%, 4:8, 2:4) and results/prune_smollm2_analyses.json (60%, 70%,
groups, calibration size, update) and writes results/prune_smollm2_sparsity.png,
results/prune_smollm2_calibration.png and results/prune_smollm2_analyses_tables.md.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
RESULTS = HERE / "results"


def load_rows() -> dict[str, dict]:
    rows = {}
    for name in ("prune_smollm2.json", "prune_smollm2_analyses.json"):
        path = RESULTS / name
        if path.is_file():
            rows.update({r["name"]: r for r in json.loads(path.read_text())["rows"] if "ppl" in r})
    return rows


def parse(name: str) -> dict | None:
    m = re.fullmatch(r"(wanda|sparsegpt|magnitude)(?:-(row|tensor))?-(\d+|\d:\d)(-update)?(?:-calib(\d+))?", name)
    if not m:
        return None
    method, group, shape, update, calib = m.groups()
    group = group or ("tensor" if method == "magnitude" else "row")
    return {"method": method, "group": group, "pattern": shape if ":" in shape else None,
            "sparsity": None if ":" in shape else int(shape) / 100, "update": bool(update),
            "calib": int(calib) if calib else 128}


def time_table() -> list[str]:
    """End-to-end and decision-only time per method, and Wanda against the floor, from the main run alone
    (the analysis runs shared the machine with other jobs, so their times are not comparable)."""
    path = RESULTS / "prune_smollm2.json"
    if not path.is_file():
        return []
    main_rows = {r["name"]: r for r in json.loads(path.read_text())["rows"]}
    floor = next((r for r in main_rows.values() if r["name"].startswith("floor")), None)
    lines = ["## Time (from `prune_smollm2.md`, the run with the machine to itself)", "",
             "| config | end to end s | pruning decision alone s | end to end / floor |", "|---|---|---|---|"]
    for name, r in main_rows.items():
        if "wall_s" not in r or name.startswith("floor"):
            continue
        ratio = f"{r['wall_s'] / floor['wall_s']:.2f}" if floor else ""
        lines.append(f"| {name} | {r['wall_s']:.1f} | {r.get('decision_s', 0):.2f} | {ratio} |")
    if floor:
        lines += ["", f"Floor: one process that loads the model, runs one plain decoder forward over the same 128 "
                      f"calibration windows and saves it: {floor['wall_s']:.1f} s."]
    return lines + [""]


def main() -> None:
    from wandamerge.report import Run, _finish, _pyplot, plot_perplexity

    rows = load_rows()
    parsed = {n: (parse(n), r) for n, r in rows.items() if parse(n)}
    # perplexity against sparsity: default settings (128 windows, no update), sequential order
    runs = [Run(name=n, path="", job="prune", method=p["method"], group=p["group"], pattern=p["pattern"],
                sparsity=p["sparsity"], perplexity=r["ppl"])
            for n, (p, r) in parsed.items() if p["calib"] == 128 and not p["update"]]
    if "dense" in rows:
        runs.append(Run(name="dense", path="", job="eval", perplexity=rows["dense"]["ppl"]))
    plot_perplexity(runs, RESULTS / "prune_smollm2_sparsity.png")

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for method in ("wanda", "sparsegpt"):
        pts = sorted((p["calib"], r["ppl"]) for n, (p, r) in parsed.items()
                     if p["method"] == method and p["sparsity"] == 0.5 and p["group"] == "row" and not p["update"])
        if pts:
            ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", label=f"{method} 50%")
    ax.set_xscale("log", base=2)
    _finish(fig, ax, RESULTS / "prune_smollm2_calibration.png", "Robustness to calibration size",
            "calibration windows of 512 tokens (log scale)", "perplexity")

    def ppl(name):
        return f"{rows[name]['ppl']:.2f}" if name in rows else "not run"

    lines = ["# Pruning SmolLM2-135M: the paper's analyses (tables from the JSON results)", "",
             "Same windows as `prune_smollm2.md`: 128 x 512 calibration tokens, 64 x 512 held-out evaluation "
             f"tokens. Dense: {ppl('dense')}.", "", "## Sparsity", "",
             "| method | 50% | 60% | 70% | 4:8 | 2:4 |", "|---|---|---|---|---|---|"]
    for method, prefix in (("magnitude (per tensor)", "magnitude-tensor"), ("SparseGPT", "sparsegpt"),
                           ("Wanda", "wanda")):
        lines.append(f"| {method} | " + " | ".join(ppl(f"{prefix}-{s}") for s in ("50", "60", "70", "4:8", "2:4"))
                     + " |")
    lines += ["", "## Comparison group (50% unstructured)", "", "| method | per output row | per tensor |",
              "|---|---|---|", f"| Wanda | {ppl('wanda-50')} | {ppl('wanda-tensor-50')} |",
              f"| magnitude | {ppl('magnitude-row-50')} | {ppl('magnitude-tensor-50')} |", "",
              "## Calibration windows (50% unstructured)", "", "| windows | 1 | 4 | 16 | 64 | 128 |",
              "|---|---|---|---|---|---|"]
    for method in ("wanda", "sparsegpt"):
        lines.append(f"| {method} | " + " | ".join(ppl(f"{method}-50-calib{k}") for k in (1, 4, 16, 64))
                     + f" | {ppl(f'{method}-50')} |")
    lines += ["", "## Least-squares weight update (50% unstructured)", "", "| method | without | with update |",
              "|---|---|---|", f"| magnitude (per tensor) | {ppl('magnitude-tensor-50')} | "
              f"{ppl('magnitude-tensor-50-update')} |", f"| Wanda | {ppl('wanda-50')} | {ppl('wanda-50-update')} |",
              f"| SparseGPT (its own update) | {ppl('sparsegpt-50')} | |", ""]
    lines += time_table()
    (RESULTS / "prune_smollm2_analyses_tables.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
