"""The project's one error hierarchy: every problem a user can fix is a :class:`WandamergeError`.

The command line prints a ``WandamergeError`` (and an ``OSError``, such as a
full disk) as one line with exit status 2; any other exception is a bug and
keeps its traceback. Each class also derives from ``ValueError`` so callers of
the Python API that catch ``ValueError`` keep working. This module imports
nothing, so every layer, the pure core included, may raise these.
"""


class WandamergeError(Exception):
    """A problem with the user's input, settings or environment, with a message saying what to do."""


class ConfigError(WandamergeError, ValueError):
    """A setting or argument that cannot be used (a density outside (0, 1], an unknown method, ...)."""


class ModelError(WandamergeError, ValueError):
    """A model argument that cannot be used: missing, damaged, unsupported."""


class InputError(ModelError):
    """A merge input that cannot be used, or that does not fit the base model."""


class RecipeError(ConfigError):
    """A recipe (YAML) that does not validate."""


class CalibrationError(ConfigError):
    """Calibration or evaluation text that cannot be turned into token windows."""


class TaskDataError(WandamergeError, ValueError):
    """A task's data that cannot be read or prepared."""


class ZeroShotError(ConfigError):
    """A zero-shot task that cannot be run."""


class ReportError(ConfigError):
    """Run directories that cannot be reported on."""


def short_repr(value, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters for a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def did_you_mean(name, options) -> str:
    """The tail of an "unknown name" message: the closest option, else the list of options."""
    import difflib

    options = sorted(str(o) for o in options)
    match = difflib.get_close_matches(str(name), options, n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else f"; expected one of: {', '.join(options)}"


def unknown_name(kind: str, name, known) -> ConfigError:
    """The error for a name no registry holds, e.g. ``unknown merge method 'tie'; did you mean 'ties'?``."""
    return ConfigError(f"unknown {kind} {name!r}{did_you_mean(name, known)}")


def lookup(registry: dict, kind: str, name):
    """``registry[name]``, or the :func:`unknown_name` error for a ``kind`` of thing."""
    try:
        return registry[name]
    except (KeyError, TypeError):
        raise unknown_name(kind, name, registry) from None
