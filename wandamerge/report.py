"""``wandamerge report``: compare runs in Markdown and a self-contained HTML page with PNG plots.

A run is a directory holding ``results.json`` (from ``wandamerge eval`` or
``wandamerge run``) and/or ``wandamerge.json`` (the record a prune or merge
writes next to its model; also looked for in a ``model/`` subdirectory).
Plots (matplotlib, written as PNG and embedded in the HTML as data URIs):

* perplexity against sparsity, one line per method, group and pattern;
* per-task accuracy per run (merges), with the base model and the fine-tunes;
* normalized accuracy against density, one line per merge method and score;
* per-layer sparsity of pruned models;
* wall time and peak memory per run.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ReportError

log = logging.getLogger(__name__)


@dataclass
class Run:
    name: str
    path: str
    job: str  # prune | merge | eval
    method: str | None = None  # prune method or merge method
    score: str | None = None  # merge sparsifier score
    group: str | None = None
    pattern: str | None = None  # "2:4" etc., None for unstructured
    sparsity: float | None = None  # target (prune) or measured overall
    density: float | None = None  # merge density (if one for all models)
    perplexity: float | None = None
    tasks: dict[str, float] = field(default_factory=dict)  # task -> accuracy
    stderr: dict[str, float] = field(default_factory=dict)
    base: dict[str, float] = field(default_factory=dict)  # task -> base accuracy
    finetuned: dict[str, float] = field(default_factory=dict)  # task -> fine-tune accuracy
    normalized: float | None = None
    per_block_sparsity: list[float] = field(default_factory=list)
    seconds: float | None = None
    peak_rss_gb: float | None = None

    @property
    def shape(self) -> str:
        if self.pattern:
            return self.pattern
        if self.sparsity is not None:
            return f"{self.sparsity:.0%}"
        return ""


def _record_of(directory: Path) -> dict | None:
    for candidate in (directory / "wandamerge.json", directory / "model" / "wandamerge.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return None


def load_run(directory: str | os.PathLike) -> Run:
    """Read one run directory into a :class:`Run`."""
    path = Path(directory)
    if not path.is_dir():
        raise ReportError(f"run directory {path} does not exist")
    results_file = path / "results.json"
    try:
        results = json.loads(results_file.read_text()) if results_file.is_file() else None
        record = (results or {}).get("record") or _record_of(path)
    except json.JSONDecodeError as err:
        raise ReportError(f"{path} holds a JSON file that cannot be read ({err}); rerun that job") from err
    if results is None and record is None:
        raise ReportError(f"{path} holds neither results.json nor wandamerge.json; "
                          "give directories written by wandamerge eval, run, prune or merge")
    run = Run(name=(results or {}).get("name") or path.name, path=str(path),
              job=(record or {}).get("job") or "eval")
    if results and results.get("name") in (None, "model", "in-memory model"):
        run.name = path.name
    if record:
        _read_record(run, record)
    if results:
        ppl = results.get("perplexity")
        if ppl:
            run.perplexity = ppl["value"]
        for task, row in (results.get("tasks") or {}).items():
            if row.get("acc") is not None:
                run.tasks[task] = row["acc"]
                if row.get("acc_stderr") is not None:
                    run.stderr[task] = row["acc_stderr"]
        refs = results.get("references") or {}
        run.base = {t: r["acc"] for t, r in (refs.get("base") or {}).items() if r.get("acc") is not None}
        run.finetuned = {t: r["acc"] for t, r in (refs.get("finetuned") or {}).items() if r.get("acc") is not None}
        if results.get("normalized"):
            run.normalized = results["normalized"]["mean"]
        if run.seconds is None and results.get("seconds"):
            run.seconds = sum(results["seconds"].values())
    return run


def _read_record(run: Run, record: dict) -> None:
    if record.get("job") == "prune":
        s = record.get("settings", {})
        run.method, run.group, run.pattern = s.get("method"), s.get("group"), s.get("pattern")
        run.sparsity = s.get("sparsity") if not run.pattern else None
        run.per_block_sparsity = list((record.get("sparsity") or {}).get("per_block") or [])
        if run.perplexity is None and (record.get("perplexity") or {}).get("pruned"):
            run.perplexity = record["perplexity"]["pruned"]
    elif record.get("job") == "merge":
        recipe = record.get("recipe") or {}
        run.method, run.score = recipe.get("merge_method"), record.get("score")
        pattern = record.get("pattern")
        run.pattern = pattern if pattern not in (None, "unstructured") else None
        run.group = record.get("group")
        densities = {(m.get("parameters") or {}).get("density") for m in recipe.get("models", [])}
        densities.add((recipe.get("parameters") or {}).get("density"))
        densities.discard(None)
        if len(densities) == 1 and isinstance(next(iter(densities)), (int, float)):
            run.density = float(next(iter(densities)))
    seconds = record.get("seconds")
    if isinstance(seconds, dict) and seconds:
        run.seconds = float(seconds["total"] if "total" in seconds else
                            sum(v for v in seconds.values() if isinstance(v, (int, float))))
    elif isinstance(seconds, (int, float)):
        run.seconds = float(seconds)
    rss = (record.get("peak_memory") or {}).get("rss_bytes")
    if rss:
        run.peak_rss_gb = rss / 1e9


# ----------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, ax, path: Path, title: str, xlabel: str, ylabel: str, legend: bool = True) -> Path:
    """Label, grid, legend, save as PNG and close a one-axes figure."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    if legend:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    _pyplot().close(fig)
    return path


def plot_perplexity(runs: list[Run], path: Path) -> Path | None:
    """Perplexity (log scale) against sparsity: a line per method and group, a marker per N:M pattern at N/M."""
    points: dict[str, list[tuple[float, float]]] = {}
    dense = [r.perplexity for r in runs if r.job == "eval" and r.perplexity and not r.method]
    for r in runs:
        if r.job != "prune" or r.perplexity is None:
            continue
        if r.pattern:  # one marker per method and pattern (2:4 and 4:8 share x = 0.5)
            n, m = (int(x) for x in r.pattern.split(":"))
            label, x = f"{r.method} {r.pattern}", n / m
        else:
            label, x = f"{r.method} (per {r.group})", r.sparsity or 0.0
        points.setdefault(label, []).append((x, r.perplexity))
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for label, pts in sorted(points.items()):
        pts.sort()
        style = ("s" if label.endswith("2:4") else "D") if ":" in label else "o-"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
    if dense:
        ax.axhline(min(dense), color="grey", lw=1, ls=":", label="dense")
    ax.set_yscale("log")
    return _finish(fig, ax, path, "Perplexity against sparsity", "sparsity (N:M at N/M)", "perplexity (log scale)")


def plot_task_accuracy(runs: list[Run], path: Path) -> Path | None:
    """Grouped bars: accuracy on each task per run, with the base and fine-tune references."""
    with_tasks = [r for r in runs if r.tasks]
    if not with_tasks:
        return None
    tasks = sorted({t for r in with_tasks for t in r.tasks})
    base = {t: next((r.base[t] for r in with_tasks if t in r.base), None) for t in tasks}
    tuned = {t: next((r.finetuned[t] for r in with_tasks if t in r.finetuned), None) for t in tasks}
    plt = _pyplot()
    width = 0.8 / len(with_tasks)
    fig, ax = plt.subplots(figsize=(max(6.4, 1.6 * len(tasks) + 0.25 * len(with_tasks)), 4.4), dpi=110)
    for i, r in enumerate(with_tasks):
        xs = [k - 0.4 + width * (i + 0.5) for k in range(len(tasks))]
        ax.bar(xs, [r.tasks.get(t, 0) for t in tasks], width, label=_short(r))
    for k, t in enumerate(tasks):
        if base[t] is not None:
            ax.hlines(base[t], k - 0.45, k + 0.45, colors="black", linestyles=":", label="base" if k == 0 else None)
        if tuned[t] is not None:
            ax.hlines(tuned[t], k - 0.45, k + 0.45, colors="red", linestyles="--",
                      label="fine-tune" if k == 0 else None)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylim(0, 1)
    return _finish(fig, ax, path, "Per-task accuracy", "task", "accuracy")


def plot_normalized(runs: list[Run], path: Path) -> Path | None:
    """Normalized accuracy (merged / fine-tuned, mean over tasks) against density: a panel per method, a line
    per score (the same colour for a score in every panel), so a grid of methods x scores stays readable."""
    panels: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for r in runs:
        if r.job == "merge" and r.normalized is not None and r.density is not None:
            panels.setdefault(r.method or "merge", {}).setdefault(r.score or "default", []).append(
                (r.density, r.normalized))
    if not panels:
        return None
    plt = _pyplot()
    scores = sorted({score for lines in panels.values() for score in lines})
    colours = {score: f"C{i % 10}" for i, score in enumerate(scores)}
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 2.8 * rows + 0.6), dpi=110, sharey=True,
                             squeeze=False)
    for ax, (method, lines) in zip(axes.flat, sorted(panels.items())):
        for score, pts in sorted(lines.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=colours[score], label=score)
        ax.set_title(method, fontsize=9)
        ax.grid(alpha=0.3)
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("density (fraction kept)")
    for ax in axes[:, 0]:
        ax.set_ylabel("normalized accuracy")
    handles = [plt.Line2D([], [], color=colours[s], marker="o", label=s) for s in scores]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(scores), 6), fontsize=8, frameon=False)
    fig.suptitle("Normalized accuracy (merged / fine-tuned, mean over tasks) against density")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_layer_sparsity(runs: list[Run], path: Path) -> Path | None:
    pruned = [r for r in runs if r.per_block_sparsity]
    if not pruned:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    for r in pruned:
        ax.plot(range(len(r.per_block_sparsity)), r.per_block_sparsity, ".-", label=_short(r))
    ax.set_ylim(0, 1)
    return _finish(fig, ax, path, "Per-layer sparsity", "decoder block", "sparsity of its linear weights")


def plot_cost(runs: list[Run], path: Path) -> Path | None:
    timed = [r for r in runs if r.seconds is not None or r.peak_rss_gb is not None]
    if not timed:
        return None
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 0.45 * len(timed) + 1.6), dpi=110, sharey=True)
    labels = [_short(r) for r in timed]
    left.barh(labels, [r.seconds or 0 for r in timed], color="tab:blue")
    left.set_xlabel("wall time (s)")
    right.barh(labels, [r.peak_rss_gb or 0 for r in timed], color="tab:orange")
    right.set_xlabel("peak RSS (GB)")
    fig.suptitle("Time and memory")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


PLOTS = {"perplexity.png": plot_perplexity, "task_accuracy.png": plot_task_accuracy,
         "normalized_accuracy.png": plot_normalized, "layer_sparsity.png": plot_layer_sparsity,
         "time_memory.png": plot_cost}


def _short(r: Run) -> str:
    return r.name[:40]


# ----------------------------------------------------------------------------- tables and pages


def runs_table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    tasks = sorted({t for r in runs for t in r.tasks})
    header = ["run", "job", "method", "score", "shape", "density", "perplexity", *tasks, "normalized",
              "wall s", "peak RSS GB"]
    rows = []
    for r in runs:
        rows.append([r.name, r.job, r.method or "", r.score or "", r.shape,
                     "" if r.density is None else f"{r.density:g}", _num(r.perplexity, ".2f"),
                     *[_num(r.tasks.get(t), ".3f") for t in tasks], _num(r.normalized, ".3f"),
                     _num(r.seconds, ".1f"), _num(r.peak_rss_gb, ".2f")])
    return header, rows


def reference_table(runs: list[Run]) -> tuple[list[str], list[list[str]]] | None:
    tasks = sorted({t for r in runs for t in (*r.base, *r.finetuned)})
    if not tasks:
        return None
    base = {t: next((r.base[t] for r in runs if t in r.base), None) for t in tasks}
    tuned = {t: next((r.finetuned[t] for r in runs if t in r.finetuned), None) for t in tasks}
    return ["reference", *tasks], [["base model", *[_num(base[t], ".3f") for t in tasks]],
                                   ["fine-tune on its own task", *[_num(tuned[t], ".3f") for t in tasks]]]


def _num(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(row) + " |" for row in rows]]


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def build_report(run_dirs: list[str | os.PathLike] | None = None, out: str | os.PathLike = "report", *,
                 runs: list[Run] | None = None, title: str = "wandamerge report") -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and the PNG plots to ``out``; returns the files written."""
    runs = list(runs or []) + [load_run(d) for d in (run_dirs or [])]
    if not runs:
        raise ReportError("no runs to report; give one or more run directories")
    out_path = Path(out)
    out_path.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for filename, plot in PLOTS.items():
        made = plot(runs, out_path / filename)
        if made is not None:
            written[filename] = made
    header, rows = runs_table(runs)
    refs = reference_table(runs)
    md = [f"# {title}", "", f"{len(runs)} runs.", "", *_markdown_table(header, rows), ""]
    if refs:
        md += ["## References", "", *_markdown_table(*refs), ""]
    for filename in written:
        md += [f"![{filename[:-4].replace('_', ' ')}]({filename})", ""]
    md_path = out_path / "report.md"
    md_path.write_text("\n".join(md))
    written["report.md"] = md_path

    images = "".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,'
        f'{base64.b64encode(path.read_bytes()).decode()}"><figcaption>{html.escape(name[:-4].replace("_", " "))}'
        "</figcaption></figure>" for name, path in written.items() if name.endswith(".png"))
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #222; }}
table {{ border-collapse: collapse; margin: 1rem 0; font-size: 0.9rem; }}
th, td {{ border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
thead {{ background: #f3f3f3; }}
figure {{ display: inline-block; margin: 0.5rem; }}
img {{ max-width: 640px; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{len(runs)} runs.</p>
{_html_table(header, rows)}
{('<h2>References</h2>' + _html_table(*refs)) if refs else ''}
<h2>Plots</h2>
{images}
</body></html>
"""
    html_path = out_path / "report.html"
    html_path.write_text(page)
    written["report.html"] = html_path
    log.info("report with %d runs written to %s", len(runs), out_path)
    return written

