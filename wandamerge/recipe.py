"""Typed YAML merge recipes, validated before any model is loaded, and mergekit's parameter rules.

A merge recipe is a mergekit recipe (``merge_method``, ``base_model``,
``models: [{model, parameters: {weight, density, gamma, epsilon}}]``,
``parameters: {lambda, normalize, rescale, int8_mask}``, ``dtype``,
``out_dtype``, ``tokenizer_source``; each method's parameters are those its
registry row declares, per model or global, as mergekit declares them: e.g.
``slerp``'s global ``t``, ``nuslerp``'s per-model ``weight``) plus two optional sections of ours:
``sparsify: {score, group, pattern, activations}`` and ``calibration: {data,
nsamples, seqlen, seed, batch_size}``, also per model (``models: [{model,
calibration: {data: task.jsonl}}]``: that model's activations come from its own
data, its other keys from the top-level calibration). Parameter values follow mergekit's
forms: a scalar, a gradient (a list of numbers interpolated over the layers
at each tensor's layer position ``t``), or a list of ``{filter, value}``
conditions matched against the tensor name. ``int8_mask`` is mergekit's
memory option for its masks: accepted so its recipes run unchanged, with no
effect on the result (no int8 mask is ever built here).

:func:`validated` and :func:`explain` turn any pydantic error of a typed
config (recipes, run recipes, job configs) into one line naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .core.selection import parse_pattern
from .errors import RecipeError, did_you_mean, short_repr
from .io.dtypes import DTYPE_NAMES
from .merging.methods import MERGE_METHODS, MergeMethod, method_inputs
from .merging.sparsify import SPARSIFIERS

Scalar = Union[bool, int, float, str]


class Condition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: Union[Scalar, list[Scalar]]
    filter: str | None = None


ParameterSetting = Union[Scalar, list[Scalar], Condition, list[Condition]]

def parameter_names() -> list[str]:
    """Every parameter some registered merge method takes (what a recipe may name at all)."""
    return sorted({p.name for row in MERGE_METHODS.values() for p in row.parameters})


def _numeric(name: str) -> bool:
    """Whether every method that takes ``name`` takes a number for it."""
    return all(p.kind != "choice" for row in MERGE_METHODS.values() for p in row.parameters if p.name == name)


def _is_setting(value) -> bool:
    """A scalar, a list of scalars, a ``{filter, value}`` condition or a list of conditions (as mergekit)."""
    def scalar(v):
        return isinstance(v, (bool, int, float, str))

    def condition(v):
        return (isinstance(v, dict) and "value" in v and set(v) <= {"filter", "value"}
                and (scalar(v["value"]) or isinstance(v["value"], list) and all(map(scalar, v["value"])))
                and (v.get("filter") is None or isinstance(v["filter"], str)))

    if scalar(value) or condition(value):
        return True
    return isinstance(value, list) and (all(map(scalar, value)) or all(map(condition, value)))


def _check_raw_parameters(params, where: str):
    """Names and shapes of parameter settings, before pydantic tries each form of the union."""
    if params is None:
        return params
    if not isinstance(params, dict):
        raise ValueError(f"{where} must be a mapping of parameter names to values, got {short_repr(params)}")
    known = parameter_names()
    for key, setting in params.items():
        if key not in known:
            raise ValueError(f"unknown parameter {key!r} in {where}{did_you_mean(key, known)}")
        if not _is_setting(setting):
            kind = "a number" if _numeric(key) else "a value"
            raise ValueError(f"parameter {key!r} in {where} must be {kind}, a list of them (a gradient) or a list "
                             f"of {{filter, value}} conditions, got {short_repr(setting)}")
    return params


def check_method_parameters(row: MergeMethod, levels) -> None:
    """Every parameter set in ``levels`` (``(where, parameters, per model?)``) is one ``row`` takes at that
    level, with values it takes (as the row declares them); a per-model parameter may also be set globally,
    as everyone's default (mergekit's rule), a global one only globally."""
    takes = {p.name: p for p in row.parameters}
    for where, params, per_model in levels:
        for key, setting in (params or {}).items():
            parameter = takes.get(key)
            if parameter is None:
                hint = did_you_mean(key, takes) if takes else "; it takes no parameters"
                raise ValueError(f"merge_method {row.name!r} takes no parameter {key!r} (set in {where}){hint}")
            if per_model and not parameter.per_model:
                raise ValueError(f"{key!r} is a global parameter of {row.name} (one value for the whole merge): "
                                 f"set it under the top-level parameters, not in {where}")
            for value in _leaf_values(setting):
                problem = parameter.problem(value)
                if problem:
                    raise ValueError(f"parameter {key!r} in {where} {problem}")


def _leaf_values(setting) -> list:
    if isinstance(setting, Condition):
        return _leaf_values(setting.value)
    if isinstance(setting, list):
        return [v for item in setting for v in _leaf_values(item)]
    return [setting]


def expand_home(value):
    """``~/...`` model paths mean the user's home, as in a shell (``~user/...`` that user's)."""
    if not (isinstance(value, str) and value.startswith("~")):
        return value
    try:
        return str(Path(value).expanduser())
    except RuntimeError:  # ~name of no user on this machine
        raise ValueError(f"{value!r}: no home directory to expand {value.split('/')[0]!r} to; "
                         "give the path without ~") from None


class _WithParameters(BaseModel):
    """A level of a recipe that holds mergekit parameters, checked by name and by value."""

    model_config = ConfigDict(extra="forbid")
    parameters: dict[str, ParameterSetting] | None = None
    _where: ClassVar[str] = "the parameters"

    @field_validator("parameters", mode="before")
    @classmethod
    def parameter_shapes(cls, value):
        return _check_raw_parameters(value, cls._where)


class ModelCalibration(BaseModel):
    """A model's own calibration (its task's prompts, for task activations): the keys it leaves out
    come from the top-level ``calibration`` (or its defaults)."""

    model_config = ConfigDict(extra="forbid")
    data: str
    nsamples: int | None = Field(None, gt=0)
    seqlen: int | None = Field(None, gt=0)
    seed: int | None = None
    batch_size: int | None = Field(None, gt=0)


class ModelEntry(_WithParameters):
    _where: ClassVar[str] = "a model's parameters"
    model: str
    calibration: ModelCalibration | None = None

    _home = field_validator("model", mode="before")(expand_home)


class Sparsify(BaseModel):
    model_config = ConfigDict(extra="forbid")
    score: str | None = None  # default: the one the merge method's paper uses
    group: Literal["row", "tensor"] | None = None
    pattern: str = "unstructured"  # or "N:M"
    activations: Literal["base", "finetuned"] = "base"

    @field_validator("pattern")
    @classmethod
    def valid_pattern(cls, value):
        if value != "unstructured":
            parse_pattern(value)
        return value


class Calibration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: str = "wiki"
    nsamples: int = Field(128, gt=0)
    seqlen: int = Field(512, gt=0)
    seed: int = 0
    batch_size: int | None = Field(None, gt=0)


class Aim(BaseModel):
    """AIM's post-pass (``wandamerge.merging.aim``): the merged update of every decoder linear map shrunk on
    the input channels the base uses most, from the base's activations on the top-level calibration."""

    model_config = ConfigDict(extra="forbid")
    omega: float = Field(0.4, ge=0.0, le=1.0)


def model_calibration(recipe: "MergeRecipe", index: int) -> Calibration:
    """The calibration of ``recipe.models[index]``: its own keys over the top-level ones."""
    shared = (recipe.calibration or Calibration()).model_dump()
    own = recipe.models[index].calibration
    return Calibration(**{**shared, **(own.model_dump(exclude_none=True) if own else {})})


class MergeRecipe(_WithParameters):
    _where: ClassVar[str] = "the global parameters"
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] = Field(min_length=1)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None  # "base", "union" (not supported: refused) or a model
    sparsify: Sparsify | None = None
    calibration: Calibration | None = None
    aim: Aim | None = None

    _home = field_validator("base_model", "tokenizer_source", mode="before")(expand_home)

    @field_validator("dtype", "out_dtype")
    @classmethod
    def known_dtype(cls, value):
        if value is not None and value not in DTYPE_NAMES:
            raise ValueError(f"dtype {value!r} is not supported{did_you_mean(value, DTYPE_NAMES)}")
        return value

    def asks_gram_rescale(self) -> bool:
        """Whether any tensor's ``rescale`` is ``"gram"`` (the calibration pass then collects input Grams)."""
        return self._asks("rescale", "gram")

    def asks_activation_election(self) -> bool:
        """Whether any tensor's sign ``election`` is ``"activation"`` (the pass then collects input norms)."""
        return self._asks("election", "activation")

    def _asks(self, parameter: str, value) -> bool:
        setting = (self.parameters or {}).get(parameter)
        return setting is not None and value in _leaf_values(setting)

    def inputs(self) -> tuple[bool, list[ModelEntry]]:
        """(whether the base_model is merged as the base, the method's inputs in order: the entries of
        ``models`` it merges, and a parameterless entry for a base_model merged as one more input), by the
        method's row (:func:`~wandamerge.merging.methods.method_inputs`; ConfigError on a wrong count)."""
        uses_base, indices = method_inputs(MERGE_METHODS[self.merge_method], self.base_model,
                                           [m.model for m in self.models])
        return uses_base, [ModelEntry(model=self.base_model) if i is None else self.models[i] for i in indices]

    def _check_required(self, method: MergeMethod) -> None:
        """A parameter without a default is set for every input (a per-model one) or globally."""
        inputs = self.inputs()[1]
        for parameter in method.parameters:
            if not parameter.required or parameter.name in (self.parameters or {}):
                continue
            if not parameter.per_model:
                raise ValueError(f"merge_method {self.merge_method!r} needs parameter {parameter.name!r}; "
                                 f"set parameters.{parameter.name}")
            for entry in inputs:
                if parameter.name not in (entry.parameters or {}):
                    raise ValueError(f"model {entry.model} has no {parameter.name}; set parameters.{parameter.name} "
                                     f"(for each model, or once in the top-level parameters)")

    @model_validator(mode="after")
    def consistent(self):
        if self.merge_method not in MERGE_METHODS:
            raise ValueError(f"unknown merge_method {self.merge_method!r}{did_you_mean(self.merge_method, MERGE_METHODS)}")
        method = MERGE_METHODS[self.merge_method]
        self.inputs()  # the base and the number of models the method takes (a ConfigError is a ValueError)
        check_method_parameters(method, [("the global parameters", self.parameters, False)]
                                + [(f"models[{i}] ({m.model})", m.parameters, True) for i, m in enumerate(self.models)])
        if self.sparsify is not None and method.unsparsified:
            raise ValueError(f"merge_method {self.merge_method!r} takes no sparsify section: {method.unsparsified} "
                             f"(mergekit sparsifies nothing in it); remove the section")
        if self.sparsify and self.sparsify.score and self.sparsify.score not in SPARSIFIERS:
            raise ValueError(f"unknown sparsify score {self.sparsify.score!r}{did_you_mean(self.sparsify.score, SPARSIFIERS)}")
        own = [m.model for m in self.models if m.calibration is not None]
        score = (self.sparsify.score if self.sparsify else None) or method.score
        reads = ((score and (SPARSIFIERS[score].needs_input_norms or SPARSIFIERS[score].needs_grams))
                 or method.needs_grams or method.needs_norms
                 or self.asks_gram_rescale() or self.asks_activation_election())
        if own and not reads:
            raise ValueError(f"models {', '.join(own)} have their own calibration, which only activation scores "
                             f"and data-aware methods use, and merge_method {self.merge_method!r} with score "
                             f"{score!r} reads none; set sparsify.score: wanda, use regmean, or remove it")
        if self.asks_activation_election() and method.consensus != "ties":
            raise ValueError(f"election: activation weighs the votes of a sign election, and merge_method "
                             f"{self.merge_method!r} elects no sign; use ties, dare_ties, della or breadcrumbs_ties")
        if self.aim is not None and not self.base_model:
            raise ValueError("aim relaxes the merged update against the base: set base_model")
        if self.tokenizer_source not in (None, "base") and self.tokenizer_source == "union":
            raise ValueError("tokenizer_source 'union' is not supported; use 'base' or a model path")
        self._check_required(method)
        return self


def explain(exc: ValidationError, source: str, root: type[BaseModel], section: str | None = None) -> str:
    """One line for a pydantic error of ``root`` (a section of a file, when ``section`` names it): the
    unknown key with the closest valid one, a missing key, or the value's problem."""
    errors = exc.errors()
    # An unknown key (a misspelt one) explains the "missing" error that comes with it: name it first.
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    tags = _model_names(root)
    parts = [str(p) for p in err["loc"] if not _is_pydantic_tag(p, tags)]
    if err["type"] == "extra_forbidden":  # the unknown key itself, even one spelt like a tag ("none", "list")
        parts = [str(p) for p in err["loc"][:-1] if not _is_pydantic_tag(p, tags)] + [str(err["loc"][-1])]
    loc = ".".join([section, *parts] if section else parts)
    if err["type"] == "extra_forbidden":
        return f"{source}: unknown key {loc!r}{did_you_mean(parts[-1], _fields_at(root, err['loc'][:-1]))}"
    if err["type"] == "missing":
        return f"{source}: missing required key {loc!r}"
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] in ("model_type", "model_attributes_type", "dict_type"):
        message = "expected a mapping (key: value, ...)"
    if err["type"] not in ("value_error", "assertion_error"):  # pydantic's own words: show what was given
        message += f", got {short_repr(err.get('input'))}"
    return " ".join(f"{source}: {loc + ': ' if loc else ''}{message}".split())


_TAG_PREFIXES = ("function-", "union[", "list[", "dict[", "tagged-union[", "constrained-", "literal[")
_TYPE_TAGS = {"str", "bool", "int", "float", "none", "dict", "list"}


def _is_pydantic_tag(part, model_names: set[str]) -> bool:
    """Whether a part of an error's location names a branch of a union or a validator, not a key."""
    if isinstance(part, int):
        return False
    return part.startswith(_TAG_PREFIXES) or part in _TYPE_TAGS or part in model_names


def _model_names(root, seen: set | None = None) -> set[str]:
    """Names of the pydantic models reachable from ``root`` (pydantic names union branches after them)."""
    seen = set() if seen is None else seen
    if hasattr(root, "model_fields"):
        if root.__name__ in seen:
            return seen
        seen.add(root.__name__)
        for field in root.model_fields.values():
            _model_names(field.annotation, seen)
    for arg in getattr(root, "__args__", ()):
        _model_names(arg, seen)
    return seen


def _fields_at(root: type[BaseModel], path) -> list[str]:
    """The keys of the model found by walking ``path`` (field names and list indices) from ``root``."""
    model: Any = root
    names = _model_names(root)
    for part in path:
        if isinstance(part, int) or _is_pydantic_tag(part, names):
            continue
        field = model.model_fields.get(str(part)) if hasattr(model, "model_fields") else None
        if field is None:
            return []
        model = _inner_model(field.annotation) or field.annotation
    return list(getattr(model, "model_fields", {}))


def _inner_model(annotation):
    """The pydantic model inside an annotation such as ``X | None`` or ``list[Union[str, X]]``."""
    if hasattr(annotation, "model_fields"):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def validated(model: type[BaseModel], data: Any, source: str, section: str | None = None,
              error: type[Exception] = RecipeError):
    """``model.model_validate(data)``, a pydantic error turned into one line (see :func:`explain`)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise error(explain(exc, source, model, section)) from None


def parse_recipe(data: dict, source: str = "recipe") -> MergeRecipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping (merge_method, base_model, models, ...)")
    if "slices" in data or "modules" in data:
        raise RecipeError(f"{source}: 'slices' and 'modules' recipes are not supported; list whole models under 'models'")
    return validated(MergeRecipe, data, source)


def read_recipe_file(path: str | Path) -> tuple[Any, str]:
    """The parsed YAML and the text of a recipe file; anything unreadable is a one-line :class:`RecipeError`."""
    path = Path(path)
    if path.is_dir():
        raise RecipeError(f"recipe {path} is a directory, not a file; give the recipe's .yaml file")
    if not path.is_file():
        raise RecipeError(f"recipe {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
        return yaml.safe_load(text), text
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path} is not UTF-8 text (byte {exc.start}); save the recipe as UTF-8 YAML") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{path} is not valid YAML{where}: {' '.join(str(problem).split())}") from None


def load_recipe(path: str | Path) -> MergeRecipe:
    return parse_recipe(read_recipe_file(path)[0], str(path))


# ----------------------------------------------------------------------------- parameter resolution


def evaluate_setting(setting, tensor_name: str, t: float):
    """mergekit's rules: scalars as is, numeric lists interpolated at ``t``, conditions by name filter."""
    if isinstance(setting, Condition):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(v, (bool, int, float, str)) for v in setting):
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting)
            if not numeric:
                return setting[int(t * (len(setting) - 1))]
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        for cond in setting:
            if cond.filter in (None, "*") or (tensor_name and cond.filter in tensor_name):
                return evaluate_setting(cond.value, tensor_name, t)
    return None


def resolve(name: str, scopes, tensor_name: str, t: float, default=None):
    """The first scope (per-model parameters, then global) that sets ``name`` wins."""
    for scope in scopes:
        if scope and name in scope:
            value = evaluate_setting(scope[name], tensor_name, t)
            if value is not None:
                return value
    return default


def method_parameters(recipe: MergeRecipe, tensor_name: str, t: float) -> dict:
    """Every parameter the recipe's method declares, for tensor ``tensor_name`` at layer position ``t``: a
    global one from the top-level parameters, a per-model one as a list over the method's inputs (each
    input's own parameters first, then the top-level ones, as mergekit); None where no level sets it
    (the method's default then applies)."""
    method, inputs = MERGE_METHODS[recipe.merge_method], recipe.inputs()[1]
    return {p.name: [resolve(p.name, (entry.parameters, recipe.parameters), tensor_name, t) for entry in inputs]
            if p.per_model else resolve(p.name, (recipe.parameters,), tensor_name, t) for p in method.parameters}
