"""What every run and benchmark records about itself: versions, peak memory, stage timings, provenance."""

from __future__ import annotations

import hashlib
import platform
import re
import resource
import shlex
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def package_version() -> str:
    """wandamerge's version, as installed (pyproject.toml declares it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("wandamerge")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


def versions() -> dict[str, str]:
    """Versions of wandamerge, torch, transformers and Python, and the platform."""
    import transformers

    return {"wandamerge": package_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def peak_memory(device: str) -> dict[str, int]:
    """Peak resident memory of this process, and of the CUDA device when one was used."""
    peaks = {"rss_bytes": peak_rss_bytes()}
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        peaks["cuda_bytes"] = int(torch.cuda.max_memory_allocated())
    return peaks


@dataclass
class StageClock:
    """Seconds per named stage, summed when a stage runs more than once."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t0, 4)


def git_commit(repo: Path = REPO) -> str:
    """The short commit of ``repo``, marked when tracked files have uncommitted changes ("unknown"
    without git or outside a checkout)."""
    def git(*args):
        try:
            return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    sha = git("rev-parse", "--short", "HEAD") or "unknown"
    return sha + (" (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else "")


def machine() -> str:
    """Processor, cores, memory and platform, in one line."""
    import os

    import psutil

    return (f"{platform.machine()}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
            f"{platform.platform()}")


def portable(value):
    """``value`` (a string, or a dict or list of them) with no absolute path of this machine: a path inside
    the repository or beside it is written relative to its root (``benchmarks/results/...``,
    ``../shared/...``), one in the cache as ``$WANDAMERGE_CACHE/...``."""
    if isinstance(value, dict):
        return {key: portable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(item) for item in value]
    if not isinstance(value, str):
        return value
    for prefix, by in _path_prefixes():
        def replace(match, by=by):
            slash = match.group(1)  # "/" before more of the path, "" for the directory itself
            return by + slash if by else ("" if slash else ".")

        value = re.sub(rf"(?<![\w./~-]){re.escape(prefix)}(/|(?![\w.-]))", replace, value)
    return value


def _path_prefixes() -> list[tuple[str, str]]:
    """(absolute directory, what it is written as), the longest directory first."""
    from .resolve import default_cache_dir

    pairs = {}
    for path, by in ((REPO.parent, ".."), (Path(default_cache_dir()), "$WANDAMERGE_CACHE"), (REPO, "")):
        for form in (str(path), str(path.resolve())):
            if form != "/":
                pairs[form.rstrip("/")] = by
    return sorted(pairs.items(), key=lambda pair: -len(pair[0]))


def relative_command(argv: list[str]) -> str:
    """The command line as results files write it: ``python`` and its arguments, paths made :func:`portable`."""
    return "python " + shlex.join(portable(str(a)) for a in argv)


def provenance(argv: list[str]) -> dict[str, str]:
    """Command, commit, machine and date: the header of every results file."""
    return {"command": relative_command(argv), "commit": git_commit(), "machine": machine(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file (for the run record)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def input_digests(path: Path) -> dict[str, str]:
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".json") and p.is_file())
    return {p.name: file_digest(p) for p in files}
