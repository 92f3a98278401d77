"""Staged (atomic) output: a run writes into a temporary sibling renamed into place only when complete."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import ModelError

log = logging.getLogger(__name__)


def check_output_dir(out: str | Path, inputs: list[str], overwrite: bool) -> Path:
    """Refuse an existing output (unless overwrite) or one inside an input model."""
    out_path = Path(out).resolve()
    for spec in inputs:
        src = Path(spec)
        if src.exists():
            src_dir = (src.parent if src.is_file() else src).resolve()
            if out_path == src_dir or src_dir in out_path.parents:
                raise ModelError(f"output {out_path} lies inside the input model {src_dir}; choose another directory")
    if out_path.exists() and not overwrite:
        raise ModelError(f"output {out_path} already exists; pass --overwrite to replace it")
    if out_path.exists():
        check_replaceable(out_path)
    return out_path


# what a directory we may replace holds: a model, an adapter, or a wandamerge run/eval/report
OUTPUT_MARKERS = ("config.json", "wandamerge.json", "results.json", "adapter_config.json", "report.html")


def check_replaceable(out: Path) -> None:
    """``--overwrite`` replaces an empty directory or an earlier output, never anything else."""
    if not out.is_dir():
        raise ModelError(f"output {out} exists and is not a directory; remove it or choose another path")
    entries = sorted(p.name for p in out.iterdir())
    if entries and not any(marker in entries for marker in OUTPUT_MARKERS):
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise ModelError(f"output {out} holds other files ({shown}), not a model or a wandamerge run; "
                         "--overwrite only replaces earlier outputs: remove it yourself or choose another directory")


DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def _partial_name(out: Path) -> str:
    """Name stem of the temporary siblings of ``out``: whose they are, so a later run can tell them stale."""
    return f".{out.name}.partial-{os.getpid()}@{socket.gethostname()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clear_stale_partials(out: Path) -> None:
    """Remove the temporary siblings of ``out`` that runs killed on this machine left behind."""
    prefix, host = f".{out.name}.partial-", socket.gethostname()
    if not out.parent.is_dir():
        return
    for sibling in out.parent.iterdir():
        if not sibling.name.startswith(prefix):
            continue
        pid, _, owner_host = sibling.name[len(prefix):].rsplit(".", 1)[0].partition("@")
        if owner_host != host or not pid.isdigit() or _alive(int(pid)):
            continue
        log.info("removing %s, left by an interrupted run", sibling)
        if sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            sibling.unlink(missing_ok=True)


def scratch_dir(out: Path, label: str) -> tempfile.TemporaryDirectory:
    """A temporary folder beside ``out`` for a run's scratch files (a merge's spilled Grams), removed when the
    context ends; named as the run's staging sibling (``.OUT.partial-PID@HOST.LABEL-*``), so that if the run is
    killed outright the next run into the same place removes it with the rest."""
    out = Path(out)
    return tempfile.TemporaryDirectory(prefix=f"{_partial_name(out)}.{label}-", dir=out.parent)


def disk_full(out: Path) -> ModelError:
    """The error for a disk that fills up while ``out`` is written (what was written is already gone)."""
    place = next((p for p in (out.parent, *out.parent.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(place).free / 1e6
    return ModelError(f"the disk is full: no space left to write {out} ({free:.0f} MB free in {place}); "
                      f"free some space or choose another output directory, then run again")


@contextmanager
def staged_output(out_dir: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary sibling of ``out_dir`` to write into; rename it into place only on success.

    An interrupted run leaves either nothing or the previous output, never half a model. A run
    killed outright leaves its temporary sibling, named ``.OUT.partial-PID@HOST.*``; the next run
    into the same place removes it once that process is gone. Parent directories made for the
    output are removed again when the run fails, and a full disk is said in one line.
    """
    out = Path(out_dir).resolve()
    if out.exists() and not overwrite:
        raise ModelError(f"output {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise ModelError(f"output {out} is a file, not a directory; choose another path")
    if out.exists():
        check_replaceable(out)
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        clear_stale_partials(out)
        tmp = Path(tempfile.mkdtemp(prefix=_partial_name(out) + ".", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        yield tmp
        if out.exists():
            old = out.with_name(_partial_name(out) + ".old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for parent in made:  # deepest first; stops at the first that holds something else
            try:
                parent.rmdir()
            except OSError:
                break
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            raise disk_full(out) from exc
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace a file's text in one step: a killed run leaves the old file or the new, never half of one."""
    path = Path(path)
    tmp = path.with_name(_partial_name(path))
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            raise disk_full(path) from exc
        raise
