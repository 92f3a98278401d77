"""Typed YAML merge recipes, validated before any model is loaded, and mergekit's parameter rules.

A merge recipe is a mergekit recipe (``merge_method``, ``base_model``,
``models: [{model, parameters: {weight, density, gamma, epsilon}}]``,
``parameters: {lambda, normalize, rescale, int8_mask}``, ``dtype``,
``out_dtype``, ``tokenizer_source`` or ``tokenizer: {source, tokens, pad_to_multiple_of}``,
``chat_template``; each method's parameters are those its
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
effect on the result (no int8 mask is ever built here). ``router: method | base | average``
(MoE models only) says how the routers are merged (:mod:`wandamerge.merging.routers`; default
``method``, mergekit's way).

A ``slices:`` recipe (:class:`SlicesRecipe`) stacks layer ranges of models instead: each slice's
``sources: [{model, layer_range: [start, end], parameters}]`` (all of one length) are merged layer by
layer, with the slice's ``base_model`` and ``parameters``; ``modules: {default: {slices | models,
parameters}}`` is mergekit's spelling of the same for the one module of a decoder-only model.

:func:`validated` and :func:`explain` turn any pydantic error of a typed
config (recipes, run recipes, job configs) into one line naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .core.selection import parse_pattern
from .errors import RecipeError, did_you_mean, short_repr
from .io.chat_templates import chat_template_problem
from .io.dtypes import DTYPE_NAMES
from .merging.methods import MERGE_METHODS, MergeMethod, method_inputs, slice_inputs
from .merging.routers import DEFAULT_ROUTER_RULE, ROUTER_RULES
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


class InputModel(_WithParameters):
    _where: ClassVar[str] = "a model's parameters"
    model: str

    _home = field_validator("model", mode="before")(expand_home)


class ModelEntry(InputModel):
    calibration: ModelCalibration | None = None


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


@dataclass(frozen=True)
class MergeGroup:
    """The models one output tensor is merged from, as the method's row takes them (mergekit's
    ``ConfigReader``): the group's ``base`` (its base_model, where the recipe names one) and whether it is
    merged as the base, the method's ``inputs`` in order with each
    one's parameter scopes (its own first), and the scopes of the global parameters, highest precedence
    first. A ``models:`` recipe has one group; a ``slices:`` recipe one per slice."""

    uses_base: bool
    base: str | None
    inputs: tuple[str, ...]
    input_scopes: tuple[tuple[dict | None, ...], ...]
    shared: tuple[dict | None, ...]


def check_required(method: MergeMethod, group: MergeGroup, where: str = "") -> None:
    """A parameter without a default is set at some scope of every input (a per-model one) or globally."""
    for parameter in method.parameters:
        if not parameter.required or any(parameter.name in (scope or {}) for scope in group.shared):
            continue
        if not parameter.per_model:
            raise ValueError(f"{where}merge_method {method.name!r} needs parameter {parameter.name!r}; "
                             f"set parameters.{parameter.name}")
        for model, scopes in zip(group.inputs, group.input_scopes):
            if not any(parameter.name in (scope or {}) for scope in scopes):
                raise ValueError(f"{where}model {model} has no {parameter.name}; set parameters.{parameter.name} "
                                 f"(for each model, or once in the top-level parameters)")


class ModelTokenSource(BaseModel):
    """A token's row from a given token of a model: its ``token_id`` (a row of that model's tensor) or its
    ``token`` (looked up in that model's tokenizer), one of the two."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["model_token"]
    model: str
    token_id: int | None = Field(None, ge=0)
    token: str | None = None

    _home = field_validator("model", mode="before")(expand_home)

    @model_validator(mode="after")
    def one_token(self):
        if (self.token_id is None) == (self.token is None):
            raise ValueError("a model_token source gives one of token_id or token")
        return self


class ZeroSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["zero"]


TOKEN_SOURCE_KINDS = {"model_token": ModelTokenSource, "zero": ZeroSource}


class TokenSetting(BaseModel):
    """mergekit's ``tokens: {TOKEN: {source, force}}``: where the token's row comes from for the models that
    lack it (a model's own row of the token, a token of a model, zeros; none: mergekit's rule), and with
    ``force`` for every model."""

    model_config = ConfigDict(extra="forbid")
    source: Union[ModelTokenSource, ZeroSource, str, None] = None
    force: bool = False

    @field_validator("source", mode="before")
    @classmethod
    def source_kind(cls, value):
        if isinstance(value, dict):
            kind = value.get("kind")
            if kind not in TOKEN_SOURCE_KINDS:
                raise ValueError(f"a token source is a model, or a mapping of kind model_token or zero, got kind "
                                 f"{short_repr(kind)}")
            return TOKEN_SOURCE_KINDS[kind].model_validate(value)
        return expand_home(value)

    @model_validator(mode="after")
    def force_needs_a_source(self):
        if self.force and self.source is None:
            raise ValueError("force: true replaces every model's row of the token by its source's: give a source")
        return self

    def source_model(self) -> str | None:
        return self.source if isinstance(self.source, str) else getattr(self.source, "model", None)


class TokenizerSection(BaseModel):
    """mergekit's ``tokenizer:`` section: the output vocabulary (``union`` of the models', the ``base``'s or a
    model's), tokens to add with where their rows come from, and the rows rounded up to a multiple."""

    model_config = ConfigDict(extra="forbid")
    source: str = "union"
    tokens: dict[str, TokenSetting] | None = None
    pad_to_multiple_of: int | None = Field(None, gt=0)

    _home = field_validator("source", mode="before")(expand_home)


class _Recipe(_WithParameters):
    """What every merge recipe holds besides its inputs."""

    _where: ClassVar[str] = "the global parameters"
    merge_method: str
    base_model: str | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None  # "base", "union" or a model: the output vocabulary
    tokenizer: TokenizerSection | None = None  # the same, with tokens to add and padding
    chat_template: str | None = None  # a template name, "auto" or a Jinja template

    _home = field_validator("base_model", "tokenizer_source", mode="before")(expand_home)

    @field_validator("chat_template")
    @classmethod
    def known_chat_template(cls, value):
        problem = None if value is None else chat_template_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    def tokenizer_settings(self) -> TokenizerSection | None:
        """The output vocabulary asked for (``tokenizer_source`` as a section), or None: the base's as it is."""
        if self.tokenizer is not None:
            return self.tokenizer
        return None if self.tokenizer_source is None else TokenizerSection(source=self.tokenizer_source)

    def _check_tokenizer(self) -> None:
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give tokenizer_source or a tokenizer section, not both (tokenizer.source is the "
                             "section's tokenizer_source)")
        models = self.referenced_models()
        for token, setting in ((self.tokenizer.tokens or {}) if self.tokenizer else {}).items():
            model = setting.source_model()
            if model is not None and model not in models:
                raise ValueError(f"tokenizer.tokens.{token}: its source model {model} is none of the recipe's "
                                 f"models; name one of them")

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
        return any(value in _leaf_values(params[parameter]) for _, params, _ in self.parameter_levels()
                   if params and parameter in params)

    def parameter_levels(self) -> list[tuple[str, dict | None, bool]]:
        """Every place the recipe sets parameters: (where, parameters, whether it is one model's own)."""
        return [("the global parameters", self.parameters, False)]

    def input_models(self) -> list[str]:
        """Every model the recipe lists as an input, each once, in order of appearance."""
        raise NotImplementedError

    def referenced_models(self) -> list[str]:
        """The input models, then the base_model (each once)."""
        return list(dict.fromkeys(self.input_models() + ([self.base_model] if self.base_model else [])))

    def _method(self) -> MergeMethod:
        if self.merge_method not in MERGE_METHODS:
            raise ValueError(f"unknown merge_method {self.merge_method!r}{did_you_mean(self.merge_method, MERGE_METHODS)}")
        self._check_tokenizer()
        return MERGE_METHODS[self.merge_method]


class MergeRecipe(_Recipe):
    models: list[ModelEntry] = Field(min_length=1)
    sparsify: Sparsify | None = None
    calibration: Calibration | None = None
    aim: Aim | None = None
    router: str | None = None  # how an MoE model's routers are merged (:mod:`~.merging.routers`); None: the default

    @field_validator("router")
    @classmethod
    def known_router_rule(cls, value):
        if value is not None and value not in ROUTER_RULES:
            raise ValueError(f"unknown router rule {value!r}{did_you_mean(value, ROUTER_RULES)}")
        return value

    def router_rule(self) -> str:
        """The rule an MoE model's routers are merged by: the recipe's ``router``, else the default."""
        return self.router or DEFAULT_ROUTER_RULE

    def parameter_levels(self) -> list[tuple[str, dict | None, bool]]:
        return super().parameter_levels() + [(f"models[{i}] ({m.model})", m.parameters, True)
                                             for i, m in enumerate(self.models)]

    def input_models(self) -> list[str]:
        return list(dict.fromkeys(m.model for m in self.models))

    def inputs(self) -> tuple[bool, list[ModelEntry]]:
        """(whether the base_model is merged as the base, the method's inputs in order: the entries of
        ``models`` it merges, and a parameterless entry for a base_model merged as one more input), by the
        method's row (:func:`~wandamerge.merging.methods.method_inputs`; ConfigError on a wrong count)."""
        uses_base, indices = method_inputs(MERGE_METHODS[self.merge_method], self.base_model,
                                           [m.model for m in self.models])
        return uses_base, [ModelEntry(model=self.base_model) if i is None else self.models[i] for i in indices]

    def group(self) -> MergeGroup:
        """The one group of a ``models:`` recipe: each input's own parameters, then the global ones."""
        uses_base, inputs = self.inputs()
        return MergeGroup(uses_base, self.base_model, tuple(e.model for e in inputs),
                          tuple((e.parameters, self.parameters) for e in inputs), (self.parameters,))

    @model_validator(mode="after")
    def consistent(self):
        method = self._method()
        self.inputs()  # the base and the number of models the method takes (a ConfigError is a ValueError)
        check_method_parameters(method, self.parameter_levels())
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
        check_required(method, self.group())
        return self


# ----------------------------------------------------------------------------- slices recipes


class SliceSource(InputModel):
    _where: ClassVar[str] = "a source's parameters"
    layer_range: tuple[int, int]

    @field_validator("layer_range", mode="before")
    @classmethod
    def valid_range(cls, value):
        ints = isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value)
        if not ints or not 0 <= value[0] < value[1]:
            raise ValueError(f"layer_range must be [start, end] with 0 <= start < end (the layers start to end - 1), "
                             f"got {short_repr(value)}")
        return tuple(value)

    @property
    def num_layers(self) -> int:
        return self.layer_range[1] - self.layer_range[0]


def check_slice_lengths(sources: list[SliceSource]) -> None:
    """Every source of a slice gives the same number of layers (mergekit's rule)."""
    if len({s.num_layers for s in sources}) > 1:
        ranges = ", ".join(f"{s.model} [{s.layer_range[0]}, {s.layer_range[1]}]" for s in sources)
        raise ValueError(f"sources of unequal length ({ranges}); every source of a slice gives the same number "
                         f"of layers")


class OutputSlice(_WithParameters):
    _where: ClassVar[str] = "a slice's parameters"
    sources: list[SliceSource]
    base_model: str | None = None
    residual_weight: float | None = None  # in mergekit 0.1.5's schema, read nowhere there: accepted, no effect

    _home = field_validator("base_model", mode="before")(expand_home)

    @field_validator("sources")
    @classmethod
    def some_sources(cls, value):
        if not value:
            raise ValueError("a slice with no sources; list at least one {model, layer_range}")
        check_slice_lengths(value)
        return value


class OutputModule(_WithParameters):
    _where: ClassVar[str] = "a module's parameters"
    slices: list[OutputSlice] | None = None
    models: list[InputModel] | None = None

    @model_validator(mode="after")
    def one_kind(self):
        if bool(self.slices) == bool(self.models):
            raise ValueError("a module lists its inputs under one of 'slices' or 'models'")
        return self


# What a slices recipe refuses, and why: wandamerge's own sections and methods that read calibration
# activations keyed by the base's tensor names (a stacked model has no such base), and methods that merge
# linear maps only (found in a model's blocks, not in a slice's).
OWN_SECTIONS = ("sparsify", "calibration", "aim")
SINGLE_MODULE = "default"  # mergekit's name for the one module of a decoder-only architecture


def slices_problem(method: MergeMethod) -> str | None:
    """Why ``method`` cannot merge the layers of a ``slices:`` recipe, or None."""
    score = SPARSIFIERS.get(method.score) if method.score else None
    if method.needs_grams or method.needs_norms or method.propagate or (score and score.needs_input_norms):
        return "it reads calibration activations of the base model, and a slices recipe stacks layers of several"
    if method.linear_maps_only:
        return "it merges the linear maps of a model's blocks only"
    return None


@dataclass(frozen=True)
class SourceGroup:
    """The sources one output tensor of a slices recipe is merged from: ``where`` (for messages), the
    models in source order, and the method's view of them (:class:`MergeGroup`)."""

    where: str
    models: tuple[str, ...]
    merge: MergeGroup


class SlicesRecipe(_Recipe):
    """A mergekit ``slices:`` (or ``modules:``) recipe: the output's decoder blocks are the slices' layers,
    in order. Each slice merges its sources layer by layer (``t`` runs from 0 to 1 over the slice's layers),
    with its ``base_model`` (else the recipe's) and its parameters between its sources' own and the global
    ones (a module's parameters in between). The tensors before the blocks are merged from the first
    slice's sources as that slice says, those after them from the last slice's (mergekit's ``plan.py``)."""

    slices: list[OutputSlice] | None = None
    modules: dict[str, OutputModule] | None = None
    sparsify: ClassVar[None] = None  # wandamerge's own sections, refused here: see OWN_SECTIONS
    calibration: ClassVar[None] = None
    aim: ClassVar[None] = None

    @model_validator(mode="before")
    @classmethod
    def no_own_sections(cls, data):
        given = [key for key in OWN_SECTIONS if isinstance(data, dict) and key in data]
        if given:
            raise ValueError(f"{given[0]!r} is not supported in a slices recipe (a section of wandamerge's own: it "
                             f"reads one base model's activations by tensor name, and a stacked model has no one "
                             f"base); remove it")
        return data

    def module(self) -> OutputModule:
        return self.modules[SINGLE_MODULE] if self.modules else OutputModule(slices=self.slices)

    def parameter_levels(self) -> list[tuple[str, dict | None, bool]]:
        module = self.module()
        levels = super().parameter_levels()
        if self.modules:
            levels.append((f"modules.{SINGLE_MODULE}.parameters", module.parameters, False))
            levels += [(f"modules.{SINGLE_MODULE}.models.{i} ({m.model})", m.parameters, True)
                       for i, m in enumerate(module.models or [])]
        for i, piece in enumerate(module.slices or []):
            levels.append((f"{self._where_slices()}.{i}.parameters", piece.parameters, False))
            levels += [(f"{self._where_slices()}.{i}.sources.{j} ({s.model})", s.parameters, True)
                       for j, s in enumerate(piece.sources)]
        return levels

    def _where_slices(self) -> str:
        return f"modules.{SINGLE_MODULE}.slices" if self.modules else "slices"

    def input_models(self) -> list[str]:
        """The sources' models (a slice's own base_model is one of its sources, or unused)."""
        module = self.module()
        return list(dict.fromkeys([m.model for m in module.models or []]
                                  + [s.model for piece in module.slices or [] for s in piece.sources]))

    def output_slices(self, layers_of: Callable[[str], int] = lambda model: 1) -> list[OutputSlice]:
        """The slices, in order. ``modules: {default: {models}}`` is one slice of every model's whole layer
        range (``layers_of`` gives it), the base_model added as a source when not listed (mergekit's
        ``normalize_config``); the ranges of that slice are checked when the models' configs are read."""
        module = self.module()
        if module.slices:
            return module.slices
        entries = list(module.models) + ([InputModel(model=self.base_model)] if self.base_model and self.base_model
                                         not in [m.model for m in module.models] else [])
        sources = [SliceSource.model_construct(model=e.model, parameters=e.parameters,
                                               layer_range=(0, layers_of(e.model))) for e in entries]
        return [OutputSlice.model_construct(sources=sources, base_model=None, parameters=None, residual_weight=None)]

    def source_groups(self, slices: list[OutputSlice]) -> list[SourceGroup]:
        """One group per slice, then the group of the tensors after the blocks: the last slice's sources, as
        many as the first slice has (mergekit pairs the two lists, so the shorter decides)."""
        method, module = MERGE_METHODS[self.merge_method], self.module()
        last = len(slices) - 1
        spans = [(i, len(piece.sources)) for i, piece in enumerate(slices)] + [(last, len(slices[0].sources))]
        groups = []
        for i, count in spans:
            piece = slices[i]
            name = (f"{self._where_slices()}.{i}" if module.slices else
                    f"modules.{SINGLE_MODULE}.models (a base_model not listed is one more)")
            sources = piece.sources[:count]
            models = [s.model for s in sources]
            try:
                uses_base, indices = slice_inputs(method, piece.base_model or self.base_model, models)
            except ValueError as exc:
                tail = " (its first sources, as many as the first slice's, merge the tensors after the blocks)" \
                    if count < len(piece.sources) else ""
                raise ValueError(f"{name}{tail}: {exc}") from None
            shared = (piece.parameters, module.parameters, self.parameters)
            merge = MergeGroup(uses_base, piece.base_model or self.base_model,
                               tuple(models[j] for j in indices),
                               tuple((sources[j].parameters, *shared) for j in indices), shared)
            groups.append(SourceGroup(name, tuple(models), merge))
        return groups

    @model_validator(mode="after")
    def consistent(self):
        if bool(self.slices) + bool(self.modules) != 1:
            raise ValueError("a recipe lists its inputs under exactly one of 'models', 'slices' or 'modules'")
        if self.modules and set(self.modules) != {SINGLE_MODULE}:
            other = next(name for name in self.modules if name != SINGLE_MODULE)
            raise ValueError(f"modules: the supported architectures have one module, {SINGLE_MODULE!r} (mergekit's "
                             f"name for a decoder-only model), got {other!r}")
        method = self._method()
        problem = slices_problem(method)
        if problem:
            raise ValueError(f"merge_method {self.merge_method!r} cannot merge slices: {problem}; use one of "
                             f"mergekit's methods, or a models: recipe")
        groups = self.source_groups(self.output_slices())  # the base and the sources each slice's method takes
        check_method_parameters(method, self.parameter_levels())
        for parameter, value in (("rescale", "gram"), ("election", "activation")):
            if self._asks(parameter, value):
                raise ValueError(f"{parameter}: {value} reads calibration activations, which a slices recipe "
                                 f"does not collect; remove it")
        for group in groups:
            check_required(method, group.merge, f"{group.where}: ")
        return self


Recipe = Union[MergeRecipe, SlicesRecipe]


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
    key_next = False  # the part after a mapping's field is one of its keys (modules: {default: ...})
    for part in path:
        if isinstance(part, int) or _is_pydantic_tag(part, names) or key_next:
            key_next = False
            continue
        field = model.model_fields.get(str(part)) if hasattr(model, "model_fields") else None
        if field is None:
            return []
        model = _inner_model(field.annotation) or field.annotation
        key_next = _is_mapping(field.annotation)
    return list(getattr(model, "model_fields", {}))


def _is_mapping(annotation) -> bool:
    """Whether an annotation such as ``dict[str, X] | None`` is a mapping."""
    return get_origin(annotation) is dict or any(get_origin(arg) is dict for arg in get_args(annotation))


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


def parse_recipe(data: dict, source: str = "recipe") -> Recipe:
    """A :class:`MergeRecipe` (``models:``) or a :class:`SlicesRecipe` (``slices:`` or ``modules:``)."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping (merge_method, base_model, models, ...)")
    given = [key for key in ("models", "slices", "modules") if key in data]
    if len(given) > 1:
        raise RecipeError(f"{source}: a recipe lists its inputs under one of 'models', 'slices' or 'modules', "
                          f"and this one has {' and '.join(map(repr, given))}")
    return validated(SlicesRecipe if given and given[0] != "models" else MergeRecipe, data, source)


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


def load_recipe(path: str | Path) -> Recipe:
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
    """Every parameter the recipe's method declares, for tensor ``tensor_name`` at layer position ``t``
    (:func:`group_parameters` of the recipe's one group)."""
    return group_parameters(MERGE_METHODS[recipe.merge_method], recipe.group(), tensor_name, t)


def group_parameters(method: MergeMethod, group: MergeGroup, tensor_name: str, t: float,
                     input_names: list[str] | None = None) -> dict:
    """Every parameter ``method`` declares, for tensor ``tensor_name`` at layer position ``t``: a global one
    from the group's shared scopes, a per-model one as a list over the group's inputs (each input's own
    parameters first, then the shared ones, as mergekit), its filters matched against that input's tensor
    name (``input_names``; default ``tensor_name``: mergekit's ``resolve_parameters``); None where no scope
    sets it (the method's default then applies)."""
    names = input_names or [tensor_name] * len(group.inputs)
    return {p.name: [resolve(p.name, scopes, name, t) for scopes, name in zip(group.input_scopes, names)]
            if p.per_model else resolve(p.name, group.shared, tensor_name, t) for p in method.parameters}
