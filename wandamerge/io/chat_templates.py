"""Chat templates a recipe names (``chat_template: chatml``), and mergekit 0.1.5's rule for telling a name
from a Jinja template.

wandamerge ships no template texts: a name is read at run time from an installed mergekit's own package data
(``mergekit._data.chat_templates``, where ``mergekit.merge`` reads them with ``importlib.resources``), so the
output's template is mergekit's to the byte. Without mergekit a name is refused when the merge starts; a
Jinja template and ``auto`` need no mergekit.
"""

from __future__ import annotations

import re
from importlib import resources

from ..errors import ConfigError, did_you_mean, short_repr

AUTO = "auto"  # the template most of the input models have
TEMPLATES_PACKAGE = "mergekit._data.chat_templates"
_IDENTIFIER = re.compile(r"\w[\w.-]*", re.ASCII)  # what a name can be when mergekit is not there to list them


def _folder():
    """mergekit's folder of named templates, or None where mergekit cannot be imported."""
    try:
        return resources.files(TEMPLATES_PACKAGE)
    except ImportError:  # not installed (or made unimportable)
        return None


def chat_template_names() -> list[str] | None:
    """The names mergekit's templates go by, or None where mergekit is not installed."""
    folder = _folder()
    if folder is None:
        return None
    return sorted(entry.name.removesuffix(".jinja") for entry in folder.iterdir() if entry.name.endswith(".jinja"))


def _looks_like_a_name(value: str) -> bool:
    return len(value) < 256 and "\n" not in value and "{" not in value


def _not_a_template(value: str) -> str:
    return f"chat_template {short_repr(value)} is neither a template name, {AUTO!r} nor a Jinja template"


def _unknown(value: str, names: list[str]) -> str:
    return f"unknown chat_template {short_repr(value)}{did_you_mean(value, [*names, AUTO])} (or give a Jinja template)"


def chat_template_problem(value: str) -> str | None:
    """Why ``value`` is neither ``auto``, a template name nor a Jinja template (mergekit's rule), or None.
    Without mergekit to list the names, any identifier-like name passes here (:func:`chat_template_text`
    refuses it)."""
    if value == AUTO:
        return None
    if _looks_like_a_name(value):
        names = chat_template_names()
        if names is None:
            return None if _IDENTIFIER.fullmatch(value) else _not_a_template(value)
        return None if value in names else _unknown(value, names)
    if len(value) < 20 or "{" not in value:
        return _not_a_template(value)
    return None


def chat_template_text(value: str) -> str:
    """The template ``value`` stands for: a name's text as mergekit's package holds it, else ``value`` itself
    (a Jinja template, or ``auto``). A name without mergekit installed, or one it lacks, is a ConfigError."""
    if value == AUTO or not _looks_like_a_name(value):
        return value
    names = chat_template_names()
    if names is None:
        raise ConfigError(f"chat_template {short_repr(value)} is one of mergekit's named templates; install "
                          f"mergekit to use it, or give the template itself (a Jinja string) or {AUTO!r}")
    if value not in names:
        raise ConfigError(_unknown(value, names))
    return _folder().joinpath(f"{value}.jinja").read_text(encoding="utf-8")


__all__ = ["AUTO", "TEMPLATES_PACKAGE", "chat_template_names", "chat_template_problem", "chat_template_text"]
