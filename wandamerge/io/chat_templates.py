"""Chat templates a recipe names (``chat_template: chatml``): the Jinja texts mergekit 0.1.5 ships under the
same names, and its rule for telling a name from a template."""

from __future__ import annotations

from importlib import resources

AUTO = "auto"  # the template most of the input models have


def _folder():
    return resources.files("wandamerge").joinpath("data", "chat_templates")


def chat_template_names() -> list[str]:
    return sorted(entry.name.removesuffix(".jinja") for entry in _folder().iterdir()
                  if entry.name.endswith(".jinja"))


def _looks_like_a_name(value: str) -> bool:
    return len(value) < 256 and "\n" not in value and "{" not in value


def chat_template_problem(value: str) -> str | None:
    """Why ``value`` is neither ``auto``, a known name nor a Jinja template (mergekit's rule), or None."""
    if value == AUTO or (_looks_like_a_name(value) and value in chat_template_names()):
        return None
    if len(value) < 20 or "{" not in value:
        return (f"chat_template {value!r} is neither a template name ({', '.join(chat_template_names())}, "
                f"{AUTO}) nor a Jinja template")
    return None


def named_chat_template(value: str) -> str:
    """The Jinja text of ``value``: a named template's text, or ``value`` itself (a template)."""
    if _looks_like_a_name(value) and value in chat_template_names():
        return _folder().joinpath(f"{value}.jinja").read_text(encoding="utf-8")
    return value


__all__ = ["AUTO", "chat_template_names", "chat_template_problem", "named_chat_template"]
