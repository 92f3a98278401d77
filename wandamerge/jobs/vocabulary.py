"""The output vocabulary of a merge, as mergekit 0.1.5 builds it (``mergekit/tokenizer/build.py``):
``tokenizer_source`` or the ``tokenizer:`` section, the output tokenizer, and where each input's rows of
every token sit.

* the base's tokenizer (``base_model``, else the first model), without tokens at or past its config's
  ``vocab_size`` (a BPE tokenizer only, as mergekit);
* the output tokenizer: ``base``: the base's; a model: that model's; ``union``: the base's with every
  token of the other models' vocabularies it lacks added (plain tokens first, then the models' added
  tokens with their settings), models in recipe order, each one's tokens by id; then the section's
  ``tokens`` it lacks are added;
* each input's permutation: output token id -> the row of its tensor holding that token (a token past
  its ``vocab_size`` counts as missing), from its own tokenizer (a LoRA adapter has its base's).

:meth:`OutputVocabulary.views` gives the inputs' rows of a token-indexed tensor in the output vocabulary
(:mod:`wandamerge.core.vocabulary`); :meth:`OutputVocabulary.save` writes the tokenizer with the chat
template; :func:`save_tokenizer` writes the base's tokenizer where no vocabulary is built.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.vocabulary import MISSING, PermutedRows, TokenRule, default_embeddings, default_rows, padded_size
from ..errors import InputError
from ..io.chat_templates import AUTO
from ..io.safetensors import read_json
from ..models import local_model_dir
from ..recipe import TokenizerSection, TokenSetting, ZeroSource

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "added_tokens.json")


@dataclass
class OutputVocabulary:
    tokenizer: object  # a transformers tokenizer
    tokens: list[str]  # the output's tokens, by id
    size: int  # rows of the output's token-indexed tensors (padded)
    permutations: dict[str, list[int]]  # model argument -> output id -> its row, or MISSING
    own_vocabs: dict[str, dict[str, int]]  # model argument -> its tokenizer's vocabulary
    settings: dict[str, TokenSetting]  # the recipe's tokens

    def views(self, name: str, readers: list[tuple[str, object]], base: str | None, dtype: torch.dtype
              ) -> list[PermutedRows]:
        """The rows of tensor ``name`` of each of ``readers`` ((model argument, its row reader), in the order
        mergekit lists the tensor's models) in the output vocabulary; ``base``: the recipe's base_model."""
        models = [model for model, _ in readers]
        permutations = [self.permutations[model] for model in models]
        rules = {self.tokens.index(token): self._rule(token, setting, models, name)
                 for token, setting in self.settings.items()}
        defaults, forced = default_rows(permutations, rules, models.index(base) if base in models else None,
                                        self.tokens, [reader.shape[0] for _, reader in readers])
        token_shape = tuple(readers[0][1].shape[1:])
        embeddings = default_embeddings(defaults, lambda i, row: readers[i][1].rows(row, row + 1)[0],
                                        token_shape, dtype)
        return [PermutedRows(reader, permutation, self.size, embeddings, forced, dtype)
                for (_, reader), permutation in zip(readers, permutations)]

    def _rule(self, token: str, setting: TokenSetting, models: list[str], name: str) -> TokenRule:
        model = setting.source_model()
        if isinstance(setting.source, ZeroSource) or model is None:
            return TokenRule(zero=isinstance(setting.source, ZeroSource), force=setting.force)
        if model not in models:
            raise InputError(f"tokenizer.tokens.{token} takes its row from {model}, which is not one of the models "
                             f"{name} is merged from")
        row = getattr(setting.source, "token_id", None)
        own_token = getattr(setting.source, "token", None)
        if own_token is not None:
            if own_token not in self.own_vocabs[model]:
                raise InputError(f"tokenizer.tokens.{token}: token {own_token!r} is not in {model}'s tokenizer")
            row = self.own_vocabs[model][own_token]
        return TokenRule(input=models.index(model), row=row, force=setting.force)

    def save(self, out: Path, chat_template: str | None, model_dirs: list[Path]) -> None:
        _set_chat_template(self.tokenizer, chat_template, model_dirs)
        self.tokenizer.save_pretrained(str(out))


def build_vocabulary(settings: TokenizerSection, base: str, model_dirs: dict[str, Path]) -> OutputVocabulary:
    """The output vocabulary of ``settings`` over the models (model argument -> the directory of its config
    and tokenizer; ``base`` among them)."""
    base_tokenizer = _stripped(model_dirs[base])
    tokenizers = {base: base_tokenizer}
    for model, path in model_dirs.items():
        if model not in tokenizers and path != model_dirs[base]:
            loaded = _load(path)
            if loaded is None:
                log.warning("no tokenizer loads from %s: taking %s's vocabulary for it", model, base)
            else:
                tokenizers[model] = loaded
    # each model's own vocabulary, before the section's tokens are added to the output (the base's may be it)
    own = {model: tokenizers.get(model, base_tokenizer).get_vocab() for model in model_dirs}
    if settings.source == "base":
        out = base_tokenizer
    elif settings.source == "union":
        out = _union(base_tokenizer, {model: (tokenizer, model_dirs[model]) for model, tokenizer in tokenizers.items()})
    else:
        out = _load(local_model_dir(settings.source), strict=True)
    present = set(out.get_vocab())
    for token in settings.tokens or {}:
        if token not in present:
            out.add_tokens(token)
            present.add(token)
    vocab = out.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise InputError("the output tokenizer's token ids have gaps; its vocabulary cannot index embedding rows")
    permutations = {model: _permutation(tokens, own[model], _vocab_size(path) or len(own[model]), model)
                    for model, path in model_dirs.items()}
    return OutputVocabulary(out, tokens, padded_size(len(tokens), settings.pad_to_multiple_of), permutations,
                            {model: own[model] for model in tokenizers}, dict(settings.tokens or {}))


def _permutation(tokens: list[str], own: dict[str, int], rows: int, model: str) -> list[int]:
    permutation = []
    for token in tokens:
        row = own.get(token, MISSING)
        if row >= rows:  # mergekit warns, then fails on it; here the token is missing from that model
            log.warning("%s: token %r has id %d, past its %d rows: taken as missing", model, token, row, rows)
            row = MISSING
        permutation.append(row)
    return permutation


def _vocab_size(path: Path) -> int | None:
    config = read_json(path / "config.json") if (path / "config.json").is_file() else {}
    size = config.get("vocab_size")
    return size if isinstance(size, int) else None


def _load(path: Path, strict: bool = False, **kwargs):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, TypeError) as exc:
        if strict:
            raise InputError(f"no tokenizer loads from {path}: {str(exc).splitlines()[0]}") from None
        return None


def _stripped(path: Path):
    """The base's fast tokenizer without the tokens at or past its config's vocab_size (mergekit strips them
    from a BPE tokenizer and refuses any other)."""
    from tokenizers import Tokenizer

    tokenizer = _load(path, strict=True, use_fast=True)
    rows = _vocab_size(path) or len(tokenizer.get_vocab())
    unused = {token for token, i in tokenizer.get_vocab().items() if i >= rows}
    if not unused:
        return tokenizer
    if not tokenizer.is_fast:
        raise InputError(f"{path}'s tokenizer has tokens past its vocab_size ({rows}) and no fast version to "
                         f"strip them from")
    data = json.loads(tokenizer._tokenizer.to_str())
    kind = data["model"]["type"]
    if kind != "BPE":
        raise InputError(f"{path}'s tokenizer ({kind}) has tokens past its vocab_size ({rows}); only a BPE "
                         f"tokenizer can be stripped of them (as mergekit)")
    data["added_tokens"] = [entry for entry in data["added_tokens"] if entry["id"] < rows]
    for token in unused:
        data["model"]["vocab"].pop(token, None)
    data["model"]["merges"] = [m for m in data["model"]["merges"]
                               if not unused.intersection(m.split(" ") if isinstance(m, str) else m)]
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(data))
    return tokenizer


def _union(base_tokenizer, tokenizers: dict[str, tuple[object, Path]]):
    """The base's tokenizer with the other tokens of every model's vocabulary (below its vocab_size)."""
    plain: dict[str, None] = {}
    added: dict[str, object] = {}
    for model, (tokenizer, path) in tokenizers.items():
        rows = _vocab_size(path) or tokenizer.vocab_size
        vocab = tokenizer.get_vocab()
        for token in sorted(vocab, key=vocab.get):
            if vocab[token] < rows:
                plain.setdefault(token)
        for i, info in sorted(tokenizer.added_tokens_decoder.items()):
            if i >= rows:
                continue
            if info.content in added and added[info.content] != info:
                log.warning("token %r is added with different settings by %s; the first settings are kept",
                            info.content, model)
            added.setdefault(info.content, info)
    with tempfile.TemporaryDirectory() as folder:  # a copy of the base's, which stays as it is
        base_tokenizer.save_pretrained(folder)
        out = _load(Path(folder), strict=True, use_fast=True)
    base_vocab = base_tokenizer.get_vocab()
    for token in plain:
        if token not in added and token not in base_vocab:
            out.add_tokens(token)
    for info in added.values():
        out.add_tokens(info)
    return out


def _set_chat_template(tokenizer, chat_template: str | None, model_dirs: list[Path]) -> None:
    """mergekit's ``chat_template``: a Jinja template (a name's text, read by
    :func:`~wandamerge.io.chat_templates.chat_template_text`), or ``auto`` (the template most inputs have)."""
    if not chat_template:
        return
    if chat_template == AUTO:
        found = []
        for path in model_dirs:
            loaded = _load(path)
            template = getattr(loaded, "chat_template", None)
            if isinstance(template, dict):
                template = template.get("default")
            if template:
                found.append(template.strip())
        if not found:
            log.warning("chat_template: auto, and no input model has a chat template: none is written")
            return
        chat_template = Counter(found).most_common(1)[0][0]
    tokenizer.chat_template = chat_template


def save_tokenizer(donor: Path, out: Path, chat_template: str | None, model_dirs: list[Path],
                   copy: bool = True) -> None:
    """The donor's tokenizer where no output vocabulary is built: its files copied, or with a chat template
    loaded, given the template and saved (mergekit's ``_copy_tokenizer``); nothing with ``copy`` off."""
    if not copy:
        if chat_template:
            log.warning("chat_template is set, and with the tokenizer not copied there is none to write it into")
        return
    if chat_template:
        tokenizer = _load(donor, strict=True)
        _set_chat_template(tokenizer, chat_template, model_dirs)
        tokenizer.save_pretrained(str(out))
        return
    for file in TOKENIZER_FILES:
        if (donor / file).is_file():
            shutil.copy2(donor / file, out / file)


__all__ = ["OutputVocabulary", "TOKENIZER_FILES", "build_vocabulary", "save_tokenizer"]
