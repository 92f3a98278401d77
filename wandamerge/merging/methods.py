"""Merge methods: combine the (sparsified) task vectors of several fine-tunes of one tensor.

Pure tensor functions, semantics of mergekit 0.1.5
(``merge_methods/generalized_task_arithmetic.py``, ``linear.py``, ``registry.py``):

1. ``delta_i = finetuned_i - base``, sparsified one by one (:mod:`.sparsify`),
   with the method's default sparsifier unless ``score=`` names another;
2. each sparsified delta is multiplied by its weight (after sparsification);
3. combined:
   * linear-style (``task_arithmetic``, ``dare_linear``, ``breadcrumbs``,
     ``della_linear``): ``sum_i w_i delta_i``, divided by ``sum_i w_i`` when
     ``normalize`` (a sum with ``|.| < 1e-8`` divides by 1);
   * TIES-style (``ties``, ``dare_ties``, ``breadcrumbs_ties``, ``della``): elect
     the sign of ``sum_i w_i delta_i`` per entry (``>= 0`` elects +), keep the
     weighted deltas of that sign (zeros never agree), sum them, and when
     ``normalize`` divide by the sum of the weights of the kept entries (0 -> 1);
4. times ``lambda_`` and added to the base.

``linear`` is the weighted average of the full fine-tuned weights (the base is
not one of its inputs): ``sum_i w_i W_i`` (``/ sum_i w_i`` when ``normalize``),
in float32 (float64 for float64 inputs).

Arithmetic runs in float32 (float64 when any input is float64); the result has
the base's dtype. mergekit computes in the inputs' promoted dtype, so for
float32 inputs the two agree to the bit.

mergekit 0.1.5's other methods (``slerp``, ``nuslerp``, ``multislerp``,
``karcher``, ``nearswap``, ``model_stock``, ``sce``, ``arcee_fusion``, ``ram``,
``ramplus_tl``, ``passthrough``) are rows ``on="tensors"``: a ``kernel`` of
:mod:`.interpolation` or :mod:`.selection_merges` merges the whole tensors, and
the row says what mergekit's declaration says: whether it takes a base
(``base``), how many other models (``models``), and its parameters, per model
or global, with their defaults (``parameters``). See :data:`MERGE_METHODS`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch

from ..core.selection import check_density
from ..errors import ConfigError, did_you_mean, lookup, short_repr
from .interpolation import karcher_mean, multislerp, nearswap, nuslerp, slerp
from .regmean import DEFAULT_ALPHA, DEFAULT_RIDGE, regmean_combine
from .wudi import DEFAULT_GRAM_SHARE, wudi_activation_combine, wudi_combine
from .selection_merges import arcee_fusion, model_stock, passthrough, ram, ramplus_tl, sce
from .sparsify import RESCALE_MODES, Rescale, SparsifyPlan, get_sparsifier, plan_sparsify

# ----------------------------------------------------------------------------
# small pure steps (as PEFT's merge_utils)
# ----------------------------------------------------------------------------


def _per_model(weights: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Weights ``(n,)`` shaped to broadcast over a stack ``(n, *shape)``."""
    return weights.reshape((-1,) + (1,) * (like.ndim - 1)).to(like.dtype)


def weight_deltas(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``w_i * delta_i`` for a stack ``(n, *shape)`` and weights ``(n,)``."""
    return deltas * _per_model(weights, deltas)


def elect_sign(weighted: torch.Tensor) -> torch.Tensor:
    """TIES' sign election, mergekit's "sum" consensus: +1 where the summed
    weighted mass ``sum_i w_i delta_i`` is ``>= 0``, else -1 (dtype of the input)."""
    return torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(weighted.dtype)


def agreement_mask(weighted: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """True where a weighted delta has the elected sign (a zero never agrees)."""
    return weighted.sign() == sign


def disjoint_merge(weighted: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor, normalize: bool
                   ) -> torch.Tensor:
    """Sum of the agreeing weighted deltas; with ``normalize``, divided entry by
    entry by the summed weights of the agreeing models (a zero sum divides by 1),
    TIES' disjoint mean."""
    keep = mask.to(weighted.dtype)
    mixed = (weighted * keep).sum(dim=0)
    if normalize:
        divisor = (_per_model(weights, weighted) * keep).sum(dim=0)
        divisor[divisor == 0] = 1
        mixed = mixed / divisor
    return mixed


def weighted_sum(weighted: torch.Tensor, weights: torch.Tensor, normalize: bool) -> torch.Tensor:
    """``sum_i w_i delta_i``; with ``normalize`` divided by ``sum_i w_i`` (by 1
    when that sum is below 1e-8 in magnitude, as mergekit)."""
    mixed = weighted.sum(dim=0)
    if normalize:
        divisor = weights.to(weighted.dtype).sum()
        if divisor.abs() < 1e-8:
            divisor = torch.ones_like(divisor)
        mixed = mixed / divisor
    return mixed


def ties_combine(weighted: torch.Tensor, weights: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Elect sign, keep the agreeing entries, disjoint (weighted) mean."""
    return disjoint_merge(weighted, weights, agreement_mask(weighted, elect_sign(weighted)), normalize)


def activation_votes(weighted: torch.Tensor, input_sq_norms: Sequence[torch.Tensor]) -> torch.Tensor:
    """Each fine-tune's vote in the sign election weighted by its own input activity: ``w_i delta_i,j *
    ||X_i,j||`` for a stack ``(n, out, in)`` and one ``(in,)`` vector of ``sum x_j^2`` per fine-tune."""
    scale = torch.stack([n.to(weighted) for n in input_sq_norms]).clamp_min(0).sqrt()
    return weighted * scale[:, None, :]


def activation_ties_combine(weighted: torch.Tensor, weights: torch.Tensor, normalize: bool,
                            input_sq_norms: Sequence[torch.Tensor]) -> torch.Tensor:
    """TIES with the sign elected by :func:`activation_votes`: a task whose inputs use channel j more
    weighs more in the sign of column j; the kept entries and the disjoint mean are TIES' own."""
    sign = elect_sign(activation_votes(weighted, input_sq_norms))
    return disjoint_merge(weighted, weights, agreement_mask(weighted, sign), normalize)


EXCLUSIVE_CHUNK = 1 << 22  # entries of one fine-tune's delta assigned at a time (the saliencies' memory)


def exclusive_combine(weighted: torch.Tensor, weights: torch.Tensor, input_sq_norms: Sequence | None = None
                      ) -> torch.Tensor:
    """OBIM's exclusive assignment: each entry takes the weighted delta of the one fine-tune with the
    highest saliency there, ``(w_i delta_i)^2 * ||X_i,j||^2`` (the OBS saliency under a diagonal
    Hessian, from each fine-tune's own input norms; ``|delta|`` alone where there are none). Entries a
    fine-tune dropped (zeros) are not its to claim; equal saliencies go to the first fine-tune. Rows are
    assigned a block at a time, so the saliencies of the whole stack are never held at once."""
    norms = list(input_sq_norms) if input_sq_norms is not None else []
    scale = None
    if weighted.ndim == 3 and norms and all(n is not None and n.shape == weighted.shape[2:] for n in norms):
        scale = torch.stack([n.to(weighted) for n in norms])[:, None, :]
    if weighted.ndim < 2:
        return _exclusive_rows(weighted, scale)
    rows = max(1, EXCLUSIVE_CHUNK // max(1, weighted[0, 0].numel()))
    return torch.cat([_exclusive_rows(weighted[:, start:start + rows], scale)
                      for start in range(0, weighted.shape[1], rows)])


def _exclusive_rows(weighted: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    saliency = weighted.pow(2)
    if scale is not None:
        saliency.mul_(scale)
    saliency.masked_fill_(weighted == 0, -1.0)
    return weighted.gather(0, saliency.argmax(0, keepdim=True))[0]


def weighted_average(tensors: Sequence[torch.Tensor], weights: torch.Tensor, normalize: bool) -> torch.Tensor:
    """mergekit's ``linear``: ``sum_i w_i W_i`` (``/ sum_i w_i`` when normalizing)."""
    first = tensors[0]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    weights = weights.to(dtype)
    if normalize:
        total = weights.sum()
        if total.abs() < 1e-8:
            raise ConfigError(f"linear with normalize needs weights that do not sum to zero, got {weights.tolist()}")
    result = torch.zeros_like(first, dtype=dtype)
    for tensor, coefficient in zip(tensors, weights.unbind(0)):
        result.addcmul_(tensor.to(dtype), coefficient.reshape((1,) * first.ndim))
    if normalize:
        result.div_(total)
    return result


# ----------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------

COMBINERS: dict[str, Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]] = {
    "sum": weighted_sum,    # sum_i w_i delta_i (task arithmetic)
    "ties": ties_combine,   # sign election and disjoint mean (TIES)
    "wudi": wudi_combine,   # interference of each task vector's row space minimised (WUDI; linear maps only)
}
# combiners that also take each fine-tune's input Gram of the tensor's linear map, and their options
GRAM_COMBINERS: dict[str, Callable[..., torch.Tensor]] = {
    "regmean": regmean_combine,  # closed-form least squares of the tasks' outputs (RegMean)
    "wudi_activation": wudi_activation_combine,  # WUDI's loss weighted by each task's own input Gram
}
GRAM_OPTIONS = {"regmean": {"alpha": DEFAULT_ALPHA, "ridge": DEFAULT_RIDGE},
                "wudi_activation": {"gram_share": DEFAULT_GRAM_SHARE}}
# combiners that also take each fine-tune's input norms (sum of x_j^2) of the tensor's linear map
NORM_COMBINERS: dict[str, Callable[..., torch.Tensor]] = {
    "exclusive": exclusive_combine,  # each entry to the fine-tune with the highest saliency (OBIM)
}


ELECTIONS = ("sum", "activation")  # TIES' sign election: mergekit's summed mass, or activation-weighted votes


@dataclass(frozen=True)
class Parameter:
    """A parameter a merge method takes, as mergekit declares it (``ParameterSpec``): per model (one value
    for each model it merges, settable in the global parameters as everyone's default) or global; a
    ``number``, ``integer`` or one of ``choices``; ``default`` when no recipe level sets it (``required``:
    there is none). ``check``/``expect``: a range, e.g. density's ``in (0, 1]``."""

    name: str
    per_model: bool = False
    kind: Literal["number", "integer", "choice"] = "number"
    default: Any = None
    required: bool = False
    choices: tuple = ()
    check: Callable[[float], bool] | None = None
    expect: str = ""

    def problem(self, value) -> str | None:
        """Why ``value`` is no value of this parameter (``must be ..., got ...``), or None."""
        if self.kind == "choice":
            if value in self.choices:
                return None
            shown = ", ".join(repr(c) for c in self.choices)
            return (f"must be one of {shown}, got {short_repr(value)}"
                    f"{did_you_mean(str(value), [str(c) for c in self.choices])}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be {'an integer' if self.kind == 'integer' else 'a number'}, got {short_repr(value)}"
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an int beyond float's range
            finite = False
        if not finite:
            return f"must be a finite number, got {short_repr(value)}"
        if self.kind == "integer" and value != int(value):
            return f"must be an integer, got {value}"
        if self.check is not None and not self.check(value):
            return f"must be {self.expect}, got {value}"
        return None

    def value(self, value, method: str):
        """``value`` checked (ConfigError naming the method) and as the kernel takes it; None: the default."""
        if value is None:
            if self.required:
                raise ConfigError(f"{method} needs {self.name}")
            return self.default
        problem = self.problem(value)
        if problem:
            raise ConfigError(f"{method}'s {self.name} {problem}")
        return int(value) if self.kind == "integer" else value


def _unit(value: float) -> bool:
    return 0 <= value <= 1


def _flag(name: str, default: bool | None = None) -> Parameter:
    return Parameter(name, kind="choice", choices=(True, False), default=default)


# the parameters of the methods on deltas and weights (mergekit's generalized task arithmetic and linear, and
# ours); each method refuses, when planned, the ones it does not use (e.g. alpha outside RegMean)
TASK_ARITHMETIC_PARAMETERS = (
    Parameter("weight", per_model=True, required=True),
    Parameter("density", per_model=True, check=lambda v: 0 < v <= 1, expect="in (0, 1]"),
    Parameter("gamma", per_model=True), Parameter("epsilon", per_model=True),
    Parameter("lambda"), _flag("normalize"),
    Parameter("rescale", kind="choice", choices=(True, False, *RESCALE_MODES)),
    _flag("int8_mask"),  # mergekit's storage of its masks: no effect on any value
    Parameter("alpha", check=_unit, expect="in [0, 1]"),
    Parameter("ridge", check=lambda v: v >= 0, expect=">= 0"),
    Parameter("election", kind="choice", choices=ELECTIONS),
    Parameter("gram_share", check=_unit, expect="in [0, 1]"),
)
BasePolicy = Literal["required", "optional", "none"]
Kernel = Callable[[torch.Tensor | None, list, dict, torch.Generator | None], torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    """A merge method as a row of data (mergekit's generalized task arithmetic, spelled out).

    ``on="deltas"``: the sparsified, weighted deltas are combined by
    ``COMBINERS[consensus]``, or by ``GRAM_COMBINERS[consensus]`` with each
    fine-tune's input Gram of the tensor's linear map (``needs_grams``; a tensor
    that is no linear map's weight, or has no Gram, is merged by the ``fallback``
    method instead, and the record says so). ``linear_maps_only``: the same
    fallback for every tensor that is not a linear map's weight, Gram or not. ``on="weights"``: the full
    fine-tuned tensors are averaged (:func:`weighted_average`). ``score`` is the
    default sparsifier (``None``: none), ``normalize`` and ``rescale`` the
    defaults, all as in mergekit 0.1.5 for its methods.

    ``on="tensors"``: ``kernel(base, tensors, parameters, generator)`` merges the whole tensors of its
    inputs (``base`` None when the method merges none); ``parameters`` holds every declared parameter, a
    per-model one as a list. What the job asks of any row: ``base`` (``required``; ``optional``: merged
    as the base when the recipe names one; ``none``: the method takes no base, and a ``base_model`` is
    merged as one more input, mergekit's IGNORED), ``models`` (how many models it merges besides the
    base, the base counted when ``base="none"``; ``None``: no limit), ``parameters`` (what a recipe may
    set, see :class:`Parameter`) and ``unsparsified`` (why a ``sparsify:`` section does not apply; None:
    it does). On tensors, a model listed under ``models`` that is the base_model is the base, not one
    more input (mergekit's rule); on deltas and weights every listed model is an input.
    """

    name: str
    consensus: str | None = None
    score: str | None = None
    normalize: bool = False
    rescale: bool = False
    on: Literal["deltas", "weights", "tensors"] = "deltas"
    reference: str = ""
    fallback: str | None = None
    linear_maps_only: bool = False
    propagate: bool = False  # Grams from each task's inputs through the merged earlier blocks (RegMean++)
    base: BasePolicy = "required"
    models: tuple[int, int | None] = (1, None)
    parameters: tuple[Parameter, ...] = TASK_ARITHMETIC_PARAMETERS
    kernel: Kernel | None = None
    unsparsified: str | None = None

    @property
    def needs_grams(self) -> bool:
        return self.consensus in GRAM_COMBINERS

    @property
    def needs_norms(self) -> bool:
        return self.consensus in NORM_COMBINERS

    def parameter(self, name: str) -> Parameter | None:
        return next((p for p in self.parameters if p.name == name), None)

    def combine(self, weighted: torch.Tensor, weights: torch.Tensor, normalize: bool, grams=None,
                options: dict | None = None, input_sq_norms=None) -> torch.Tensor:
        """The merged delta of a stack of weighted deltas ``(n, *shape)`` (``grams``, ``options``,
        ``input_sq_norms``: see ``GRAM_COMBINERS`` and ``NORM_COMBINERS``)."""
        if self.needs_grams:
            return GRAM_COMBINERS[self.consensus](weighted, weights, grams, **(options or {}))
        if self.needs_norms:
            return NORM_COMBINERS[self.consensus](weighted, weights, input_sq_norms)
        if (options or {}).get("election") == "activation":  # planned for TIES-style methods only
            return activation_ties_combine(weighted, weights, normalize, input_sq_norms)
        return COMBINERS[self.consensus](weighted, weights, normalize)


MERGE_METHODS: dict[str, MergeMethod] = {}


def register_method(row: MergeMethod) -> MergeMethod:
    """Add a merge method (checked: a known consensus and default sparsifier, a kernel for a method on
    tensors, a base policy, a count of models, distinct parameters, a new name)."""
    if row.on not in ("deltas", "weights", "tensors"):
        raise ConfigError(f"on={row.on!r}: expected 'deltas', 'weights' or 'tensors'")
    known = sorted([*COMBINERS, *GRAM_COMBINERS, *NORM_COMBINERS])
    if (row.on == "deltas") != (row.consensus in known):
        raise ConfigError(f"merge method {row.name!r}: a method on deltas needs a consensus in {known}")
    if (row.on == "tensors") != callable(row.kernel) or (row.on == "tensors" and (row.score or not row.unsparsified)):
        raise ConfigError(f"merge method {row.name!r}: a method on tensors (and only one) needs a kernel, "
                          "no default score, and the reason a sparsify section does not apply to it")
    low, high = row.models
    if row.base not in ("required", "optional", "none") or low < 0 or (high is not None and high < low):
        raise ConfigError(f"merge method {row.name!r}: base {row.base!r} and models {row.models} are no contract")
    names = [p.name for p in row.parameters]
    if len(set(names)) != len(names):
        raise ConfigError(f"merge method {row.name!r} declares a parameter twice: {names}")
    partial = row.needs_grams or row.linear_maps_only
    if partial and (row.fallback not in MERGE_METHODS or MERGE_METHODS[row.fallback].needs_grams
                    or MERGE_METHODS[row.fallback].linear_maps_only):
        raise ConfigError(f"merge method {row.name!r} needs a registered fallback that takes no Gram, "
                          f"got {row.fallback!r}")
    if row.name in MERGE_METHODS:
        raise ConfigError(f"merge method {row.name!r} is already registered")
    if row.score is not None:
        get_sparsifier(row.score)
    MERGE_METHODS[row.name] = row
    return row


def get_method(name: str) -> MergeMethod:
    return lookup(MERGE_METHODS, "merge method", name)


_TA, _TIES, _DARE, _BREADCRUMBS, _DELLA = ("https://arxiv.org/abs/2212.04089", "https://arxiv.org/abs/2306.01708",
                                          "https://arxiv.org/abs/2311.03099", "https://arxiv.org/abs/2312.06795",
                                          "https://arxiv.org/abs/2406.11617")
for _row in (
    # the base_model, when given, is only the reference for tensor names and config: linear averages the models
    MergeMethod("linear", None, None, normalize=True, on="weights", base="optional",
                reference="https://arxiv.org/abs/2203.05482"),
    MergeMethod("task_arithmetic", "sum", None, normalize=False, reference=_TA),
    MergeMethod("ties", "ties", "magnitude", normalize=True, reference=_TIES),
    MergeMethod("dare_linear", "sum", "random", normalize=False, rescale=True, reference=_DARE),
    MergeMethod("dare_ties", "ties", "random", normalize=False, rescale=True, reference=_DARE),
    MergeMethod("breadcrumbs", "sum", "breadcrumbs", normalize=False, reference=_BREADCRUMBS),
    MergeMethod("breadcrumbs_ties", "ties", "breadcrumbs", normalize=False, reference=_BREADCRUMBS),
    MergeMethod("della", "ties", "della", normalize=True, rescale=True, reference=_DELLA),
    MergeMethod("della_linear", "sum", "della", normalize=False, rescale=True, reference=_DELLA),
    # normalize: the fallback (task arithmetic) gives the weighted mean, what RegMean gives for equal Grams
    MergeMethod("regmean", "regmean", None, normalize=True, fallback="task_arithmetic", linear_maps_only=True,
                reference="https://arxiv.org/abs/2212.09849"),
    MergeMethod("regmean_plus", "regmean", None, normalize=True, fallback="task_arithmetic", linear_maps_only=True,
                propagate=True, reference="https://arxiv.org/abs/2508.03121"),
    # the official code leaves other tensors at the base; the sum (task arithmetic) is WUDI's own start
    # Wanda's score is the square root of OBS's diagonal saliency, so it ranks entries the same
    MergeMethod("obim", "exclusive", "wanda", normalize=False, reference="https://arxiv.org/abs/2502.12217"),
    MergeMethod("wudi", "wudi", None, normalize=False, fallback="task_arithmetic", linear_maps_only=True,
                reference="https://arxiv.org/abs/2503.08099"),
    MergeMethod("wudi_activation", "wudi_activation", None, normalize=False, fallback="task_arithmetic",
                linear_maps_only=True, reference="https://arxiv.org/abs/2503.08099 (with task Grams: ours)"),
):
    register_method(_row)


# mergekit 0.1.5's methods on whole tensors, each as its merge_methods/*.py declares it: its InputContract
# (base, models) and its parameters (PerNonBase/PerInput: per model; the others global), defaults included.
# A sparsify: section applies to none of them, as in mergekit, which sparsifies task vectors only inside
# generalized task arithmetic: the interpolations and passthrough take no task vectors, and the methods on
# task vectors (sce, ram, ramplus_tl, model_stock) each decide by their own rule which parts of a task
# vector count, a rule a trim before it would change; unsparsified says which, in the refusal.
_WHOLE = "it merges whole tensors (or their offsets from the base) with no task vector to sparsify"
for _row in (
    MergeMethod("slerp", on="tensors", base="required", models=(1, 1), parameters=(Parameter("t", required=True),),
                kernel=lambda base, ws, p, g: slerp(base, ws[0], p["t"]), unsparsified=_WHOLE,
                reference="https://en.wikipedia.org/wiki/Slerp"),
    MergeMethod("nuslerp", on="tensors", base="optional", models=(2, 2),
                parameters=(Parameter("weight", per_model=True, required=True),
                            _flag("nuslerp_row_wise", False), _flag("nuslerp_flatten", True)),
                kernel=lambda base, ws, p, g: nuslerp(ws, p["weight"], base, row_wise=p["nuslerp_row_wise"],
                                                      flatten=p["nuslerp_flatten"]), unsparsified=_WHOLE),
    MergeMethod("multislerp", on="tensors", base="optional", models=(1, None),
                parameters=(Parameter("weight", per_model=True, required=True), _flag("normalize_weights", True),
                            Parameter("eps", default=1e-8)),
                kernel=lambda base, ws, p, g: multislerp(ws, p["weight"], base, eps=p["eps"],
                                                         normalize_weights=p["normalize_weights"]),
                unsparsified=_WHOLE, reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"),
    MergeMethod("karcher", on="tensors", base="none", models=(1, None),
                parameters=(Parameter("max_iter", kind="integer", default=10), Parameter("tol", default=1e-5)),
                kernel=lambda base, ws, p, g: karcher_mean(ws, max_iter=p["max_iter"], tol=p["tol"]),
                unsparsified=_WHOLE, reference="https://arxiv.org/abs/2603.04972"),
    MergeMethod("nearswap", on="tensors", base="required", models=(1, 1), parameters=(Parameter("t", required=True),),
                kernel=lambda base, ws, p, g: nearswap(base, ws[0], p["t"]), unsparsified=_WHOLE,
                reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"),
    MergeMethod("passthrough", on="tensors", base="none", models=(1, 1),
                parameters=(Parameter("scale", per_model=True),),
                kernel=lambda base, ws, p, g: passthrough(ws[0], p["scale"][0]),
                unsparsified="it copies one model's tensors, with no task vector to sparsify"),
    MergeMethod("arcee_fusion", on="tensors", base="required", models=(1, 1), parameters=(),
                kernel=lambda base, ws, p, g: arcee_fusion(base, ws[0], generator=g),
                unsparsified="it keeps or drops each change of the other model by its own importance fence",
                reference="https://arcee.ai"),
    MergeMethod("model_stock", on="tensors", base="required", models=(2, None),
                parameters=(_flag("filter_wise", False),),
                kernel=lambda base, ws, p, g: model_stock(base, ws, filter_wise=p["filter_wise"]),
                unsparsified="its ratio is measured on the angles between the whole task vectors, which a trim "
                             "would change", reference="https://arxiv.org/abs/2403.19522"),
    MergeMethod("sce", on="tensors", base="required", models=(0, None),
                parameters=(_flag("int8_mask", False), Parameter("select_topk", default=1.0)),
                kernel=lambda base, ws, p, g: sce(base, ws, select_topk=p["select_topk"]),
                unsparsified="it selects the entries of its task vectors by their variance across the models "
                             "(select_topk)", reference="https://arxiv.org/abs/2408.07990"),
    MergeMethod("ram", on="tensors", base="required", models=(0, None),
                parameters=(Parameter("epsilon", default=1e-5),),
                kernel=lambda base, ws, p, g: ram(base, ws, epsilon=p["epsilon"]),
                unsparsified="an entry of a task vector counts by its own threshold (epsilon)",
                reference="https://arxiv.org/abs/2601.13572"),
    MergeMethod("ramplus_tl", on="tensors", base="required", models=(0, None),
                parameters=(Parameter("r", default=0.1), Parameter("alpha", default=0.2),
                            Parameter("epsilon", default=1e-5)),
                kernel=lambda base, ws, p, g: ramplus_tl(base, ws, r=p["r"], alpha=p["alpha"], epsilon=p["epsilon"]),
                unsparsified="an entry of a task vector counts by its own threshold (epsilon)",
                reference="https://arxiv.org/abs/2601.13572"),
):
    register_method(_row)


def method_inputs(spec: MergeMethod, base: str | None, models: Sequence[str]) -> tuple[bool, list[int | None]]:
    """How a recipe's models feed ``spec``: (whether ``base`` is merged as the base, the inputs in order as
    indices into ``models``, None for the base_model added as one more input). On tensors, mergekit's
    rule: a listed base_model is the base, not an input, and a method that takes no base merges the
    base_model as an input (added after the listed ones unless listed); the inputs are distinct models.
    On deltas or weights every listed model is an input. The count is checked (ConfigError, one line)."""
    if spec.base == "required" and base is None:
        raise ConfigError(f"merge_method {spec.name!r} needs a base_model")
    if spec.on != "tensors":
        inputs: list[int | None] = list(range(len(models)))
        uses_base = spec.on == "deltas"
    elif spec.base == "none":
        inputs = list(range(len(models))) + ([None] if base is not None and base not in models else [])
        uses_base = False
    else:
        inputs = [i for i, model in enumerate(models) if model != base]
        uses_base = base is not None
    if spec.on == "tensors":
        _check_distinct(spec, [base if i is None else models[i] for i in inputs])
    check_model_count(spec, len(inputs), uses_base)
    return uses_base, inputs


def slice_inputs(spec: MergeMethod, base: str | None, sources: Sequence[str]) -> tuple[bool, list[int]]:
    """How the sources of one slice of a ``slices:`` recipe feed ``spec`` (mergekit's rule for a group of
    inputs, ``InputContract.validate_ids``): a method that takes a base (not ``base="none"``, and not a
    method on weights, as mergekit's linear takes none) merges ``base`` as the base, and it must be one of
    the sources (then it is no input); every other source is an input. The sources are distinct models,
    counted as the row says (ConfigError, one line)."""
    takes_base = spec.base != "none" and spec.on != "weights"
    base = base if takes_base else None
    if spec.base == "required" and base is None:
        raise ConfigError(f"merge_method {spec.name!r} needs a base_model")
    if base is not None and base not in sources:
        raise ConfigError(f"the base_model {base} is none of the sources ({', '.join(sources)}); merge_method "
                          f"{spec.name!r} reads the base's layers from a source: list it, with a layer_range as "
                          f"long as the others'")
    _check_distinct(spec, list(sources))
    inputs = [i for i, model in enumerate(sources) if model != base]
    check_model_count(spec, len(inputs), base is not None, noun="source")
    return base is not None, inputs


def _check_distinct(spec: MergeMethod, models: list[str]) -> None:
    twice = sorted({m for m in models if models.count(m) > 1})
    if twice:
        raise ConfigError(f"merge_method {spec.name!r} merges distinct models, and {', '.join(twice)} is listed twice")


def check_model_count(spec: MergeMethod, n: int, uses_base: bool, noun: str = "model") -> None:
    """ConfigError unless ``spec`` merges ``n`` models (besides the base when ``uses_base``); ``noun``: what
    the recipe lists them as (``models``, or a slice's ``source``s)."""
    low, high = spec.models
    if low <= n and (high is None or n <= high):
        return
    wanted = f"exactly {low}" if low == high else f"at least {low}" if high is None else f"{low} to {high}"
    plural = "s" if (high or low) != 1 else ""
    if spec.base == "none" or (noun != "model" and not uses_base):
        what = f"{wanted} {noun}{plural}" + (" (a base_model not listed under models is one more)"
                                             if noun == "model" else "")
    else:
        listed = " (a listed base_model is the base)" if noun == "model" else ""
        what = f"{wanted} {noun}{plural} besides the base_model" + (listed if uses_base else "")
    raise ConfigError(f"merge_method {spec.name!r} merges {what}, got {n}")


# ----------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------

@dataclass(frozen=True)
class MergeResult:
    tensor: torch.Tensor
    method: str
    sparsifier: str | None            # the sparsifier actually applied (None: none)
    requested_sparsifier: str | None  # the one asked for (or the method's default)
    fallback_reason: str | None       # why the trim differs from the one asked for (None: it does not)
    normalize: bool
    rescale: Rescale
    lambda_: float


def _per_model_values(name: str, value, n: int, default=None) -> list:
    if value is None:
        return [default] * n
    if isinstance(value, (int, float)):
        return [float(value)] * n
    if isinstance(value, torch.Tensor) and value.ndim == 0:
        return [float(value)] * n
    values = list(value)
    if len(values) != n:
        raise ConfigError(f"{len(values)} {name} for {n} fine-tuned tensors")
    return [None if v is None else float(v) for v in values]


def _norms_per_model(input_sq_norms, n: int) -> list:
    if input_sq_norms is None or isinstance(input_sq_norms, torch.Tensor):
        return [input_sq_norms] * n
    norms = list(input_sq_norms)
    if len(norms) != n:
        raise ConfigError(f"{len(norms)} input norm vectors for {n} fine-tuned tensors")
    if any(v is None for v in norms) and not all(v is None for v in norms):
        raise ConfigError("input norms are given for some fine-tuned tensors but not for all")
    return norms


def _grams_per_model(input_grams, n: int) -> Sequence:
    """One Gram per fine-tune; a sequence stays as given (one that loads each Gram when indexed is not read
    whole here)."""
    grams = input_grams if isinstance(input_grams, Sequence) else list(input_grams)
    if len(grams) != n:
        raise ConfigError(f"{len(grams)} input Grams for {n} fine-tuned tensors")
    return grams


@dataclass(frozen=True)
class MergePlan:
    """Everything a merge of one tensor needs besides the tensors, checked before any is read.

    One plan serves the whole-tensor merge (:func:`merge_tensor_detailed`) and
    the block-by-block one (:mod:`.chunked`): weights, densities and sparsifier
    options per fine-tune, and the sparsifier plan of each (``trims[i]``, None
    when the method sparsifies nothing).
    """

    method: MergeMethod
    shape: tuple[int, ...]
    weights: list[float]
    densities: list[float]
    input_norms: list
    normalize: bool
    lambda_: float
    rescale: Rescale
    requested: str | None
    trims: list[SparsifyPlan | None]
    grams: list | None = None  # each fine-tune's input Gram, for a method that needs them
    method_options: dict = field(default_factory=dict)  # e.g. RegMean's alpha and ridge
    method_fallback: str | None = None  # why the method applied is not the one asked for
    uses_base: bool = True  # whether the base is merged as the base (not: only the reference for shape and dtype)

    @property
    def sparsifier(self) -> str | None:
        """The sparsifier actually applied (None: none)."""
        return None if not self.trims or self.trims[0] is None else self.trims[0].sparsifier.name

    @property
    def fallback_reason(self) -> str | None:
        trim = None if not self.trims or self.trims[-1] is None else self.trims[-1].fallback_reason
        return "; ".join(r for r in (self.method_fallback, trim) if r) or None

    def result(self, tensor: torch.Tensor | None) -> "MergeResult":
        return MergeResult(tensor, self.method.name, self.sparsifier, self.requested, self.fallback_reason,
                           self.normalize, self.rescale, self.lambda_)


def _gram_plan(spec: MergeMethod, shape: tuple[int, ...], n: int, input_grams, options: dict,
               linear_map: bool | None) -> tuple[MergeMethod, list | None, dict, str | None]:
    """(the method that applies, the Grams, its options, why it fell back) for a method that merges linear
    maps only or needs Grams; ``linear_map`` None: any matrix is one."""
    given = [k for k, v in options.items() if v is not None]
    if not spec.needs_grams and given:
        raise ConfigError(f"{spec.name} takes no {', '.join(given)} (a Gram-based method such as "
                          f"{', '.join(sorted(m for m, r in MERGE_METHODS.items() if r.needs_grams))} does)")
    is_linear = len(shape) == 2 and linear_map is not False
    if spec.linear_maps_only and not is_linear:
        why = (f"{spec.name} merges the weights of linear maps, and this tensor (shape {tuple(shape)}) is not one"
               f": merged by {spec.fallback}")
        return get_method(spec.fallback), None, {}, why
    if not spec.needs_grams:
        return spec, None, {}, None
    foreign = [k for k in given if k not in GRAM_OPTIONS[spec.consensus]]
    if foreign:
        raise ConfigError(f"{spec.name} takes no {', '.join(foreign)} (its options: "
                          f"{', '.join(GRAM_OPTIONS[spec.consensus])})")
    chosen = {k: float(GRAM_OPTIONS[spec.consensus][k] if options.get(k) is None else options[k])
              for k in GRAM_OPTIONS[spec.consensus]}
    for key in ("alpha", "gram_share"):
        if not 0.0 <= chosen.get(key, 0.0) <= 1.0:
            raise ConfigError(f"{spec.name} needs {key} in [0, 1], got {chosen[key]}")
    if chosen.get("ridge", 0.0) < 0:
        raise ConfigError(f"{spec.name} needs ridge >= 0, got {chosen['ridge']}")
    if input_grams is not None and not isinstance(input_grams, torch.Tensor):
        grams = _grams_per_model(input_grams, n)
        if all(g is not None for g in grams):
            return spec, grams, chosen, None
    why = f"{spec.name} needs each fine-tune's input Gram of a linear map, and none was given: merged by {spec.fallback}"
    return get_method(spec.fallback), None, {}, why


def _election_plan(spec: MergeMethod, shape: tuple[int, ...], election: str | None, norms: list
                   ) -> tuple[dict, str | None]:
    """TIES' sign election: ``sum`` (mergekit's) or ``activation`` (:func:`activation_votes`), which needs
    every fine-tune's input norms of a matrix; without them the summed mass elects and the reason says so."""
    if election is None or election == "sum":
        return {}, None
    if election not in ELECTIONS:
        raise ConfigError(f"election {election!r} is not one of {', '.join(ELECTIONS)}")
    if spec.consensus != "ties":
        raise ConfigError(f"election applies to TIES-style methods (a sign election), not {spec.name}")
    if len(shape) == 2 and norms and all(v is not None and tuple(v.shape) == (shape[1],) for v in norms):
        return {"election": "activation"}, None
    return {}, "the activation election needs every fine-tune's input norms of a matrix: elected by the summed mass"


def _refuse_delta_options(spec: MergeMethod, **options) -> None:
    """A method on whole tensors takes none of the task-vector options; each one given is named."""
    given = [k for k, v in options.items() if v is not None]
    if given:
        raise ConfigError(f"{spec.name} merges whole tensors and takes no {', '.join(given)}; "
                          f"give its own parameters as parameters={{...}}")


def plan_merge(method: str, shape: tuple[int, ...], n: int, weights: Sequence[float] | float,
               densities: Sequence[float] | float | None = None, *, score: str | None = None,
               lambda_: float | None = None, normalize: bool | None = None, rescale: Rescale | None = None,
               gamma=None, epsilon=None, input_sq_norms=None, group: str | None = None,
               pattern: str | None = None, input_grams=None, alpha: float | None = None,
               ridge: float | None = None, linear_map: bool | None = None,
               election: str | None = None, gram_share: float | None = None, parameters: dict | None = None,
               with_base: bool | None = None) -> MergePlan:
    """The :class:`MergePlan` of merging ``n`` fine-tunes of a tensor of ``shape`` (arguments as
    :func:`merge_tensor`); an option the method or its sparsifier does not use is refused here."""
    spec = get_method(method)
    if spec.on == "tensors":
        _refuse_delta_options(spec, densities=densities, score=score, lambda_=lambda_, normalize=normalize,
                              rescale=rescale, gamma=gamma, epsilon=epsilon, input_sq_norms=input_sq_norms,
                              group=group, pattern=pattern, input_grams=input_grams, alpha=alpha, ridge=ridge,
                              election=election, gram_share=gram_share)
        return _plan_on_tensors(spec, tuple(shape), n, weights, parameters or {}, with_base)
    if parameters:
        raise ConfigError(f"{spec.name} takes its options as keywords (weights, densities, score, lambda_, ...), "
                          f"not parameters=")
    weights = _weights_per_model(weights, n)
    densities = [check_density(d) for d in _per_model_values("densities", densities, n, default=1.0)]
    gammas = _per_model_values("gamma values", gamma, n)
    epsilons = _per_model_values("epsilon values", epsilon, n)
    norms = _norms_per_model(input_sq_norms, n)
    normalize = spec.normalize if normalize is None else bool(normalize)
    extras = {"group": group, "pattern": pattern, "gamma": gamma, "epsilon": epsilon}
    if spec.on == "weights":
        given = [k for k, v in {"score": score, "lambda_": lambda_, "rescale": rescale, "alpha": alpha,
                                "ridge": ridge, **extras}.items()
                 if v is not None] + (["densities"] if min(densities) < 1 else [])
        if given:
            raise ConfigError(f"{spec.name} averages full weights and takes no {', '.join(given)}")
        return MergePlan(spec, tuple(shape), weights, densities, norms, normalize, 1.0, False, None, [None] * n,
                         uses_base=False)
    applied, grams, options, why = _gram_plan(spec, tuple(shape), n, input_grams,
                                              {"alpha": alpha, "ridge": ridge, "gram_share": gram_share}, linear_map)
    election_options, election_why = _election_plan(applied, tuple(shape), election, norms)
    options, why = {**options, **election_options}, "; ".join(r for r in (why, election_why) if r) or None
    lambda_ = 1.0 if lambda_ is None else float(lambda_)
    rescale = spec.rescale if rescale is None else rescale
    requested = spec.score if score is None else score
    sparsifier_grams = requested is not None and get_sparsifier(requested).needs_grams
    if grams is None and (rescale == "gram" or sparsifier_grams) and input_grams is not None and len(shape) == 2:
        grams = _grams_per_model(input_grams, n)  # the kept entries' least-squares scale, or the OBS sweep
    if requested is None:
        unused = [k for k, v in extras.items() if v is not None] + (["densities < 1"] if min(densities) < 1 else [])
        if unused:
            raise ConfigError(f"{spec.name} sparsifies nothing unless score= names a sparsifier; "
                              f"got {', '.join(unused)}")
        trims = [None] * n
    else:
        trims = [plan_sparsify(requested, tuple(shape), density=densities[i], rescale=rescale,
                               input_sq_norms=norms[i], group=group, pattern=pattern, gamma=gammas[i],
                               epsilon=epsilons[i], has_gram=grams is not None and grams[i] is not None)
                 for i in range(n)]
    return MergePlan(applied, tuple(shape), weights, densities, norms, normalize, lambda_, rescale, requested, trims,
                     grams, options, why)


def _weights_per_model(weights: Sequence[float] | float, n: int) -> list[float]:
    """One weight per fine-tuned tensor (a single number for all of them)."""
    if n == 0:
        raise ConfigError("merging needs at least one fine-tuned tensor")
    if isinstance(weights, (int, float)):
        weights = [weights] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ConfigError(f"{len(weights)} weights for {n} fine-tuned tensors")
    return weights


def _plan_on_tensors(spec: MergeMethod, shape: tuple[int, ...], n: int, weights, given: dict,
                     with_base: bool | None) -> MergePlan:
    """The plan of a method on whole tensors: its parameters checked and completed with their defaults (a
    per-model one as a list of ``n``), ``weights`` as its ``weight``; ``with_base`` (default: unless the
    method takes no base) whether the base tensor is merged as the base or only gives shape and dtype."""
    if weights is not None:
        if spec.parameter("weight") is None:
            raise ConfigError(f"{spec.name} takes no weights")
        given = {**given, "weight": weights}
    unknown = [name for name in given if spec.parameter(name) is None]
    if unknown:
        takes = ", ".join(p.name for p in spec.parameters)
        raise ConfigError(f"{spec.name} takes no {', '.join(map(str, unknown))}"
                          + (f" (its parameters: {takes})" if takes else " (it takes no parameters)"))
    uses_base = spec.base != "none" if with_base is None else bool(with_base)
    if uses_base != (spec.base == "required") and spec.base != "optional":
        raise ConfigError(f"{spec.name} {'takes no' if uses_base else 'needs a'} base")
    check_model_count(spec, n, uses_base)
    values = {}
    for parameter in spec.parameters:
        value = given.get(parameter.name)
        if not parameter.per_model:
            values[parameter.name] = parameter.value(value, spec.name)
            continue
        per_model = list(value) if isinstance(value, (list, tuple)) else [value] * n
        if len(per_model) != n:
            raise ConfigError(f"{len(per_model)} values of {parameter.name} for {n} models")
        values[parameter.name] = [parameter.value(v, spec.name) for v in per_model]
    return MergePlan(spec, shape, values.get("weight", [1.0] * n), [1.0] * n, [None] * n, False, 1.0, False, None,
                     [None] * n, method_options=values, uses_base=uses_base)


def merge_tensor_detailed(method: str, base: torch.Tensor, finetuned: Sequence[torch.Tensor],
                          weights: Sequence[float] | float, densities: Sequence[float] | float | None = None, *,
                          generator: torch.Generator | None = None, **options) -> MergeResult:
    """:func:`merge_tensor`, returning the tensor with what was applied."""
    finetuned = list(finetuned)
    _check_tensors(base, finetuned)
    plan = plan_merge(method, tuple(base.shape), len(finetuned), weights, densities, **options)
    return merge_with_plan(plan, base, finetuned, generator)


def _check_tensors(base: torch.Tensor, finetuned: list) -> None:
    if not isinstance(base, torch.Tensor):
        raise TypeError("base must be a tensor")
    for i, t in enumerate(finetuned):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"finetuned[{i}] is not a tensor")
        if t.shape != base.shape:
            raise ConfigError(f"shape mismatch: base {tuple(base.shape)}, finetuned[{i}] {tuple(t.shape)}")
    if not all(t.is_floating_point() for t in [base, *finetuned]):
        raise TypeError("merging needs floating-point tensors")


def merge_with_plan(plan: MergePlan, base: torch.Tensor, finetuned: Sequence[torch.Tensor],
                    generator: torch.Generator | None = None) -> MergeResult:
    """Merge whole tensors as ``plan`` says (see :func:`plan_merge`)."""
    finetuned = list(finetuned)
    _check_tensors(base, finetuned)
    if tuple(base.shape) != plan.shape or len(finetuned) != len(plan.weights):
        raise ConfigError(f"a plan for {len(plan.weights)} tensors of shape {plan.shape} got {len(finetuned)} of "
                          f"shape {tuple(base.shape)}")
    if plan.method.on == "tensors":
        tensors = [t.to(device=base.device) for t in finetuned]
        merged = plan.method.kernel(base if plan.uses_base else None, tensors, plan.method_options, generator)
        return plan.result(merged.to(base.dtype))
    work = torch.float64 if any(t.dtype == torch.float64 for t in [base, *finetuned]) else torch.float32
    if plan.method.on == "weights":
        tensors = [t.to(device=base.device, dtype=work) for t in finetuned]
        return plan.result(weighted_average(tensors, torch.tensor(plan.weights, dtype=work), plan.normalize)
                           .to(base.dtype))
    base_w = base.to(work)

    def sparsified(i: int) -> torch.Tensor:
        delta = finetuned[i].to(device=base.device, dtype=work) - base_w
        trim = plan.trims[i]
        if trim is None:
            return delta
        return trim.apply(delta, plan.densities[i], plan.rescale, generator, plan.input_norms[i],
                          plan.grams[i] if plan.grams else None)

    weight_t = torch.tensor(plan.weights, dtype=work, device=base.device)
    merged = combine_deltas(plan.method, base_w, (sparsified(i) for i in range(len(finetuned))), weight_t,
                            plan.normalize, plan.lambda_, plan.grams, plan.method_options, plan.input_norms)
    return plan.result(merged.to(base.dtype))


def combine_deltas(spec: MergeMethod, base_w: torch.Tensor, deltas, weights: torch.Tensor, normalize: bool,
                   lambda_: float, grams: list | None = None, options: dict | None = None,
                   input_sq_norms: list | None = None) -> torch.Tensor:
    """``base_w + lambda_ * combine(w_i * delta_i)`` for the sparsified ``deltas`` (an iterable, one
    per weight, consumed in order) in ``base_w``'s dtype. One ``(n, *shape)`` stack is filled in place:
    each delta is written, weighted, and dropped."""
    weighted = torch.empty((len(weights), *base_w.shape), dtype=base_w.dtype, device=base_w.device)
    for i, delta in enumerate(deltas):
        torch.mul(delta, weights[i], out=weighted[i])
        del delta
    if spec.needs_grams or spec.needs_norms or options:  # whole: one solve, or the norms of its columns
        mixed = spec.combine(weighted, weights, normalize, grams, options, input_sq_norms)
    else:
        mixed = _combine_in_chunks(spec, weighted, weights, normalize)
    del weighted
    if lambda_ != 1:
        mixed.mul_(lambda_)
    return mixed.add_(base_w)


COMBINE_CHUNK = 1 << 20  # entries per model combined at a time


def _combine_in_chunks(spec: "MergeMethod", weighted: torch.Tensor, weights: torch.Tensor,
                       normalize: bool) -> torch.Tensor:
    """The combine step is entry-wise across models, so large tensors are combined in row chunks
    to keep its temporaries small; the result is the same as one call on the whole stack."""
    if weighted.ndim < 3 or weighted[0].numel() <= COMBINE_CHUNK:
        return spec.combine(weighted, weights, normalize)
    rows = weighted.shape[1]
    step = max(1, COMBINE_CHUNK // max(1, weighted[0, 0].numel()))
    out = torch.empty(weighted.shape[1:], dtype=weighted.dtype, device=weighted.device)
    for start in range(0, rows, step):
        out[start:start + step] = spec.combine(weighted[:, start:start + step], weights, normalize)
    return out


def merge_tensor(method: str, base: torch.Tensor, finetuned: Sequence[torch.Tensor],
                 weights: Sequence[float] | float, densities: Sequence[float] | float | None = None, *,
                 score: str | None = None, lambda_: float | None = None, normalize: bool | None = None,
                 rescale: Rescale | None = None, gamma: Sequence[float] | float | None = None,
                 epsilon: Sequence[float] | float | None = None,
                 input_sq_norms: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
                 group: str | None = None, pattern: str | None = None, input_grams=None,
                 alpha: float | None = None, ridge: float | None = None, election: str | None = None,
                 gram_share: float | None = None, parameters: dict | None = None, with_base: bool | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Merge the fine-tuned versions of one tensor into ``base``; returns a
    tensor of ``base``'s shape and dtype. Inputs are not modified.

    ``method``: a name in :data:`MERGE_METHODS`. ``weights``: one per
    fine-tune (or one number for all). ``densities``: kept fraction per
    fine-tune in ``(0, 1]`` (default 1: nothing dropped, as mergekit).
    ``score``: the sparsifier (a name in ``SPARSIFIERS``), default the method's;
    ``"wanda"`` needs ``input_sq_norms`` (one vector ``(in,)`` for all fine-tunes,
    or one per fine-tune) and falls back to ``"magnitude"`` for a vector or
    without norms -- :func:`merge_tensor_detailed` says which one applied.
    ``lambda_`` (default 1) scales the merged delta; ``normalize``/``rescale``
    default to the method's (mergekit's) defaults; ``gamma`` (breadcrumbs,
    default 0.01) and ``epsilon`` (della, default 0.15) are per fine-tune or one
    number; ``group``/``pattern`` go to magnitude/wanda. ``generator`` drives the
    random sparsifiers (the global RNG when ``None``), used by the fine-tunes in
    order. ``input_grams`` (one ``(in, in)`` input Gram per fine-tune, the mean
    of ``x x^T`` over its calibration tokens), ``alpha`` and ``ridge`` are
    RegMean's (:mod:`.regmean`); without Grams it merges by its fallback and
    :func:`merge_tensor_detailed` says so; ``gram_share`` is ``wudi_activation``'s share of each
    Gram in its loss (:mod:`.wudi`). ``election="activation"`` (TIES-style
    methods) weighs each fine-tune's sign vote by its own input activity
    (:func:`activation_votes`, needs per-fine-tune ``input_sq_norms``). Options
    that the chosen method or sparsifier does not use raise ``ValueError``
    rather than being ignored.

    A method on whole tensors (``slerp``, ``karcher``, ...: ``MergeMethod.on == "tensors"``) takes its
    parameters by their recipe names, ``parameters={"t": 0.3}`` (a per-model one as one value or a list),
    ``weights`` only when it has a ``weight`` parameter (else None), and none of the options above.
    ``with_base=False`` merges only ``finetuned`` for a method whose base is optional (``nuslerp``,
    ``multislerp``); ``base`` then gives the shape and dtype. E.g.
    ``merge_tensor("slerp", base, [other], None, parameters={"t": 0.3})``.
    """
    return merge_tensor_detailed(method, base, finetuned, weights, densities, score=score, lambda_=lambda_,
                                 normalize=normalize, rescale=rescale, gamma=gamma, epsilon=epsilon,
                                 input_sq_norms=input_sq_norms, group=group, pattern=pattern,
                                 input_grams=input_grams, alpha=alpha, ridge=ridge, election=election,
                                 gram_share=gram_share, parameters=parameters, with_base=with_base,
                                 generator=generator).tensor


__all__ = [
    "COMBINERS", "ELECTIONS", "GRAM_COMBINERS", "MERGE_METHODS", "NORM_COMBINERS", "MergeMethod", "MergeResult",
    "Parameter", "TASK_ARITHMETIC_PARAMETERS", "activation_ties_combine", "activation_votes", "agreement_mask",
    "check_model_count", "disjoint_merge", "elect_sign", "exclusive_combine", "get_method", "merge_tensor",
    "merge_tensor_detailed", "merge_with_plan", "method_inputs", "plan_merge", "register_method", "slice_inputs",
    "ties_combine", "weight_deltas", "weighted_average", "weighted_sum",
]
