"""Calibration and evaluation text, and the token windows cut from it.

Pruning with Wanda or SparseGPT needs a few calibration sequences whose
activations are recorded; perplexity needs held-out evaluation sequences.
This module turns a *source* into ``(n, seqlen)`` int64 token windows:

* ``"wiki"`` -- the Wikipedia articles bundled in gensim's wheel (no download
  needed). ``"wiki-eval"`` names its evaluation half explicitly.
* ``"wikitext2"`` and ``"c4"`` -- the corpora of the Wanda paper, via
  ``datasets`` (needs a connection to the Hugging Face hub).
* a ``.txt`` file (plain text) or a ``.jsonl`` file (one JSON object with a
  ``"text"`` field per line);
* a ``.pt`` or ``.npy`` file holding ready-made token windows, which are used
  exactly as given.

Keeping calibration and evaluation apart
-----------------------------------------
The gensim sample is split *by article*: the articles at even positions
(0, 2, 4, ...) form the calibration text and those at odd positions the
evaluation text. No article contributes to both, so ``calibration_windows("wiki",
...)`` never sees the text that ``evaluation_windows("wiki", ...)`` scores.
For ``wikitext2`` and ``c4`` the hub's own train and test/validation splits
keep the two apart. Local files are the user's responsibility.

Reproducing the reference windows
---------------------------------
The split, rendering and sampling below reproduce, token for token, the
reference windows made with the SmolLM2-135M tokenizer (``calib_128x512.pt``
and ``eval_64x512.pt``). Details that matter for that:

* pages are read with ``extract_pages(..., filter_namespaces=("0",))`` as
  gensim's ``WikiCorpus`` does; the one non-article page in the sample
  ("Wikipedia:Adding Wikipedia articles to Nupedia") then comes back with an
  empty text and is kept as a title-only entry, so it occupies a slot in the
  even/odd split (107 entries in all);
* redirects are pages whose text starts with ``#redirect`` in any case;
* each entry is `` = Title = \\n\\n`` followed by the stripped
  ``filter_wiki`` text; entries are joined with ``"\\n\\n"``;
* random windows start at ``torch.randint(0, ntokens - seqlen, (nsamples,),
  generator=g)``; the reference drew 16x256, then 64x256, then 128x512 windows
  from one ``torch.Generator().manual_seed(0)``, which three calls of
  :func:`random_windows` sharing one generator repeat exactly.
"""

from __future__ import annotations

import functools
import json
import logging
import numbers
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CalibrationError

logger = logging.getLogger(__name__)

__all__ = [
    "CalibrationError",
    "window_length",
    "TEXT_SOURCES",
    "TEXT_FILE_SUFFIXES",
    "TOKEN_FILE_SUFFIXES",
    "wiki_articles",
    "wiki_split",
    "tokenize_text",
    "random_windows",
    "consecutive_windows",
    "load_text_source",
    "load_token_file",
    "calibration_windows",
    "evaluation_windows",
]

TEXT_SOURCES = ("wiki", "wiki-eval", "wikitext2", "c4")
TEXT_FILE_SUFFIXES = (".txt", ".jsonl")
TOKEN_FILE_SUFFIXES = (".pt", ".npy")
WIKI_SPLITS = ("calibration", "evaluation")

_GENSIM_WIKI_SAMPLE = (
    "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
)
_C4_TRAIN_SHARD = "en/c4-train.00000-of-01024.json.gz"
_C4_VALIDATION_SHARD = "en/c4-validation.00000-of-00008.json.gz"


MAX_DEFAULT_SEQLEN = 2048  # the default window: the model's context, at most this (as the Wanda paper)


def window_length(config: Any, seqlen: int | None = None) -> int:
    """Tokens per window for a model config: ``seqlen``, or the model's context capped at
    :data:`MAX_DEFAULT_SEQLEN`; a window longer than the context is refused."""
    context = int(getattr(config, "max_position_embeddings", MAX_DEFAULT_SEQLEN) or MAX_DEFAULT_SEQLEN)
    length = seqlen or min(context, MAX_DEFAULT_SEQLEN)
    if length > context:
        raise CalibrationError(f"seqlen {length} exceeds the model's context of {context} tokens")
    return length


def _accepted_sources() -> str:
    return (
        f"one of {', '.join(TEXT_SOURCES)}, a text file ({', '.join(TEXT_FILE_SUFFIXES)}) "
        f"or a token file ({', '.join(TOKEN_FILE_SUFFIXES)})"
    )


# --------------------------------------------------------------------------- wiki


@functools.lru_cache(maxsize=1)
def _wiki_articles_cached() -> tuple[str, ...]:
    try:
        import gensim
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    except ImportError as exc:
        raise CalibrationError(
            "the 'wiki' source needs gensim, which is not installed; "
            "run pip install 'wandamerge[wiki]'"
        ) from exc
    import bz2

    dump = Path(gensim.__file__).parent / _GENSIM_WIKI_SAMPLE
    if not dump.is_file():
        raise CalibrationError(
            f"gensim's bundled Wikipedia sample is missing ({dump}); "
            "reinstall gensim with pip install --force-reinstall 'gensim>=4.3'"
        )
    articles = []
    redirects = 0
    with bz2.open(dump, "rb") as handle:
        for title, text, _pageid in extract_pages(handle, filter_namespaces=("0",)):
            if text.lstrip().lower().startswith("#redirect"):
                redirects += 1
                continue
            articles.append(f" = {title} = \n\n{filter_wiki(text).strip()}")
    logger.info(
        "extracted %d articles from gensim's Wikipedia sample (%d redirects skipped)",
        len(articles),
        redirects,
    )
    return tuple(articles)


def wiki_articles() -> list[str]:
    """The articles of gensim's bundled Wikipedia sample, each `` = Title = \\n\\n<text>``.

    Redirects are skipped. Extraction takes a few seconds and is done once per
    process.
    """
    return list(_wiki_articles_cached())


def wiki_split(split: str) -> str:
    """Calibration (even-indexed articles) or evaluation (odd-indexed) text, joined with blank lines."""
    if split not in WIKI_SPLITS:
        raise CalibrationError(
            f"unknown wiki split {split!r}; use 'calibration' or 'evaluation'"
        )
    articles = _wiki_articles_cached()
    chosen = articles[0::2] if split == "calibration" else articles[1::2]
    return "\n\n".join(chosen)


# ------------------------------------------------------------------ tokens/windows


def tokenize_text(text: str, tokenizer: Any) -> torch.Tensor:
    """Token ids of ``text`` as a 1-D int64 tensor, without special tokens.

    The whole text is tokenized in one call; the tokenizer's warning about
    sequences longer than the model's maximum length is silenced, since the
    ids are cut into windows afterwards.
    """
    encoded = tokenizer(text, add_special_tokens=False, verbose=False)
    ids = encoded["input_ids"]
    tokens = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    logger.debug("tokenized %d characters into %d tokens", len(text), tokens.numel())
    return tokens


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise CalibrationError(f"{name} must be a positive integer, got {value!r}")


def _check_token_stream(tokens: Any) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise CalibrationError(f"tokens must be a 1-D tensor of token ids, got {shape}")


def _as_generator(seed: int | torch.Generator) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise CalibrationError(f"seed must be an int or a torch.Generator, got {seed!r}")
    return torch.Generator().manual_seed(int(seed))


def random_windows(
    tokens: torch.Tensor,
    nsamples: int,
    seqlen: int,
    seed: int | torch.Generator,
) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens at uniformly random start positions.

    Starts are drawn as in the Wanda paper, from ``[0, ntokens - seqlen)``,
    so the text needs at least ``seqlen + 1`` tokens. ``seed`` is an int (a
    fresh generator) or a ``torch.Generator``, which is advanced, so several
    calls sharing one generator draw one reproducible sequence.

    Returns an int64 tensor of shape ``(nsamples, seqlen)``.
    """
    _check_token_stream(tokens)
    _check_positive("nsamples", nsamples)
    _check_positive("seqlen", seqlen)
    ntokens = tokens.numel()
    if ntokens < seqlen + 1:
        raise CalibrationError(
            f"the text has {ntokens} tokens but windows of {seqlen} need at least "
            f"{seqlen + 1}; use a longer text or a smaller seqlen"
        )
    generator = _as_generator(seed)
    starts = torch.randint(0, ntokens - seqlen, (nsamples,), generator=generator)
    positions = starts.unsqueeze(1) + torch.arange(seqlen)
    windows = tokens.long()[positions]
    logger.info("drew %d random windows of %d tokens from %d tokens", nsamples, seqlen, ntokens)
    return windows


def consecutive_windows(
    tokens: torch.Tensor, seqlen: int, max_windows: int | None = None
) -> torch.Tensor:
    """Non-overlapping windows of ``seqlen`` tokens from the start, in order.

    The tail shorter than ``seqlen`` is dropped; ``max_windows`` keeps only
    the first windows. Returns an int64 tensor of shape ``(n, seqlen)``.
    """
    _check_token_stream(tokens)
    _check_positive("seqlen", seqlen)
    if max_windows is not None:
        _check_positive("max_windows", max_windows)
    count = tokens.numel() // seqlen
    if count == 0:
        raise CalibrationError(
            f"the text has {tokens.numel()} tokens but one window needs {seqlen}; "
            "use a longer text or a smaller seqlen"
        )
    if max_windows is not None:
        count = min(count, max_windows)
    windows = tokens[: count * seqlen].long().reshape(count, seqlen).clone()
    logger.info("cut %d consecutive windows of %d tokens", count, seqlen)
    return windows


# -------------------------------------------------------------------- text sources


def _read_jsonl(path: Path) -> str:
    texts = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CalibrationError(
                    f"{path}: line {lineno} is not valid JSON ({exc.msg}); "
                    'write one object like {"text": "..."} per line'
                ) from exc
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise CalibrationError(
                    f"{path}: line {lineno} has no string \"text\" field; "
                    'write one object like {"text": "..."} per line'
                )
            texts.append(record["text"])
    return "\n\n".join(texts)


def _load_hub_text(name: str, held_out: bool) -> str:
    """wikitext2 or c4 from the Hugging Face hub (train split, or the held-out one)."""
    try:
        from datasets import load_dataset
    except ImportError as exc:
        raise CalibrationError(
            f"the {name!r} source needs the 'datasets' package; run pip install datasets, "
            "or use 'wiki' or a local file"
        ) from exc
    try:
        if name == "wikitext2":
            split = "test" if held_out else "train"
            data = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
        else:
            shard = _C4_VALIDATION_SHARD if held_out else _C4_TRAIN_SHARD
            split = "validation" if held_out else "train"
            data = load_dataset("allenai/c4", data_files={split: shard}, split=split)
    except Exception as exc:  # network and hub errors come in many types
        raise CalibrationError(
            f"could not load {name!r} ({type(exc).__name__}: {exc}); this source needs a "
            "connection to the Hugging Face hub, use 'wiki' or a local .txt/.jsonl file instead"
        ) from exc
    logger.info("loaded %d %s records of %r", len(data), split, name)
    return "\n\n".join(data["text"])


def _load_text(source: str, held_out: bool) -> str:
    if source == "wiki":
        return wiki_split("evaluation" if held_out else "calibration")
    if source == "wiki-eval":
        return wiki_split("evaluation")
    if source in ("wikitext2", "c4"):
        return _load_hub_text(source, held_out)
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix in TEXT_FILE_SUFFIXES:
        if not path.is_file():
            raise CalibrationError(f"text file {source} does not exist; give an existing file or {_accepted_sources()}")
        if suffix == ".txt":
            return path.read_text(encoding="utf-8")
        return _read_jsonl(path)
    if suffix in TOKEN_FILE_SUFFIXES:
        raise CalibrationError(
            f"{source} is a token file, not text; pass it to calibration_windows, "
            "evaluation_windows or load_token_file"
        )
    raise CalibrationError(f"unknown source {source!r}; use {_accepted_sources()}")


def load_text_source(source: str) -> str:
    """The text of a source name or a ``.txt``/``.jsonl`` file.

    ``"wiki"`` is the calibration half of the gensim Wikipedia sample,
    ``"wiki-eval"`` its evaluation half; ``"wikitext2"`` and ``"c4"`` are the
    train splits used by the Wanda paper (they need the Hugging Face hub).
    A ``.jsonl`` file holds one ``{"text": ...}`` object per line; the texts
    are joined with blank lines.
    """
    return _load_text(os.fspath(source), held_out=False)


def load_token_file(path: str | os.PathLike) -> torch.Tensor:
    """Ready-made windows from a ``.pt`` or ``.npy`` file, as an int64 ``(nsamples, seqlen)`` tensor.

    The values are returned unchanged; the file must hold a 2-D tensor of
    non-negative integers.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TOKEN_FILE_SUFFIXES:
        raise CalibrationError(
            f"{path} is not a token file; use a .pt or .npy file of shape (nsamples, seqlen)"
        )
    if not path.is_file():
        raise CalibrationError(f"token file {path} does not exist; check the path")
    if suffix == ".pt":
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CalibrationError(
                f"could not read {path} as a tensor ({exc}); save it with torch.save(tensor, path)"
            ) from exc
        if not isinstance(data, torch.Tensor):
            raise CalibrationError(
                f"{path} holds a {type(data).__name__}, not a tensor; save a (nsamples, seqlen) tensor"
            )
    else:
        try:
            data = torch.from_numpy(np.load(path, allow_pickle=False))
        except Exception as exc:
            raise CalibrationError(
                f"could not read {path} as a numpy array ({exc}); save it with numpy.save(path, array)"
            ) from exc
    if data.dim() != 2:
        raise CalibrationError(
            f"{path} has shape {tuple(data.shape)}; token windows must be 2-D (nsamples, seqlen)"
        )
    if data.dtype == torch.bool or data.is_floating_point() or data.is_complex():
        raise CalibrationError(
            f"{path} has dtype {data.dtype}; token ids must be integers (e.g. int64)"
        )
    ids = data.to(torch.int64)  # unsigned types have no min(); uint64 beyond 2**63 wraps negative
    if ids.numel() and int(ids.min()) < 0:
        raise CalibrationError(
            f"{path} contains negative (or out-of-range) token ids; ids must be >= 0"
        )
    return ids


def _is_token_file(source: str) -> bool:
    return Path(source).suffix.lower() in TOKEN_FILE_SUFFIXES


def _check_vocab(windows: torch.Tensor, vocab_size: int | None, source: str) -> None:
    if vocab_size is None or windows.numel() == 0:
        return
    largest = int(windows.max())
    if largest >= vocab_size:
        raise CalibrationError(
            f"{source} contains token id {largest} but the model's vocabulary has {vocab_size} "
            "entries; the tokens were made with a different tokenizer"
        )


# ---------------------------------------------------------------------- main entry


def calibration_windows(
    source: str,
    tokenizer: Any,
    nsamples: int,
    seqlen: int,
    seed: int | torch.Generator = 0,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Calibration windows ``(nsamples, seqlen)`` from a source.

    A token file (``.pt``/``.npy``) is used exactly as given (a warning is
    logged if its shape differs from the one asked); any other source is
    tokenized whole and cut into random windows (see :func:`random_windows`;
    ``seed`` may also be a shared ``torch.Generator``).
    If ``vocab_size`` is given, every id must be below it.
    """
    source = os.fspath(source)
    if _is_token_file(source):
        windows = load_token_file(source)
        if tuple(windows.shape) != (nsamples, seqlen):
            logger.warning(
                "using %s as given with shape %s, not the (%d, %d) asked for",
                source,
                tuple(windows.shape),
                nsamples,
                seqlen,
            )
    else:
        tokens = tokenize_text(load_text_source(source), tokenizer)
        windows = random_windows(tokens, nsamples, seqlen, seed)
    _check_vocab(windows, vocab_size, source)
    return windows


def evaluation_windows(
    source: str,
    tokenizer: Any,
    seqlen: int,
    max_windows: int | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Consecutive non-overlapping evaluation windows ``(n, seqlen)`` from a source.

    ``"wiki"`` means the held-out (odd-indexed) articles of the gensim sample;
    ``"wikitext2"`` and ``"c4"`` their test and validation data. A token file
    is used as given, except that ``max_windows`` keeps its first rows.
    """
    source = os.fspath(source)
    if max_windows is not None:
        _check_positive("max_windows", max_windows)
    if _is_token_file(source):
        windows = load_token_file(source)
        if windows.shape[1] != seqlen:
            logger.warning(
                "using %s as given with windows of %d tokens, not the %d asked for",
                source,
                windows.shape[1],
                seqlen,
            )
        if max_windows is not None:
            windows = windows[:max_windows]
    else:
        tokens = tokenize_text(_load_text(source, held_out=True), tokenizer)
        windows = consecutive_windows(tokens, seqlen, max_windows)
    _check_vocab(windows, vocab_size, source)
    return windows
