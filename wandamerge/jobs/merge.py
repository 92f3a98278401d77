"""The merge job: inputs checked first, activations collected once, then the model merged tensor by tensor.

The order of work:

1. validate the recipe (already typed) and open every input lazily;
2. check that every fine-tune fits the base (architecture, names, shapes, vocabulary); with
   ``tokenizer_source`` or a ``tokenizer:`` section, build the output vocabulary
   (:mod:`.vocabulary`): each input's embeddings and LM head are then read in it;
3. when the sparsifier needs input norms (``score: wanda``), run the calibration
   windows once through the base model with the shared layer-by-layer runner and
   keep ``sum x_j^2`` per linear map (or through each fine-tune, with
   ``activations: finetuned``);
4. stream the base's tensors one at a time: plan the tensor's merge
   (:func:`~wandamerge.merging.methods.plan_merge`, every parameter resolved at
   the tensor's layer position ``t`` as mergekit does), read the same tensor from
   every input, sparsify each delta, combine, write to the output shard. A tensor
   of ``LEAN_MIN_NUMEL`` entries or more (an embedding, an LM head) is merged
   block of rows by block of rows where :mod:`~wandamerge.merging.chunked` covers
   the plan, with the same result, so memory holds blocks, not tensors.

MoE models (transformers 5's fused experts): the pass visits each expert's maps with the tokens
routed to it, and keys their statistics by the checkpoint tensors that store them (Mixtral's per-expert
``w1``/``w3`` share the up map's, ``w2`` has the down map's; a tensor stored fused, gpt-oss's, one per
expert slice, ``name[e]``). A tensor stacking the experts' matrices is merged expert by expert, each slice
as its own linear map (:class:`_ExpertSlicesJob`); routers are merged by the recipe's ``router`` rule
(:mod:`~wandamerge.merging.routers`) and never scored by activations.
"""

from __future__ import annotations

import json
import itertools
import logging
import math
import shutil
import time
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from ..calibration import calibration_windows
from ..core.selection import selects_lean
from ..errors import InputError
from ..io.adapters import LoraAdapter, open_input
from ..io.chat_templates import chat_template_text
from ..io.dtypes import DTYPE_NAMES, TORCH_DTYPES, dtype_name, torch_dtype
from ..io.record import StageClock, input_digests, peak_memory, versions
from ..io.safetensors import DEFAULT_SHARD_SIZE, Checkpoint, ShardWriter, TensorRows
from ..io.staging import check_output_dir, scratch_dir, staged_output
from ..loaders import StreamedModel, should_stream
from ..merging.aim import aim_relax
from ..merging.chunked import chunked_merge_applies, merge_rows
from ..merging.methods import MergeMethod, MergePlan, MergeResult, get_method, merge_with_plan, plan_merge
from ..merging.routers import RouterRule, get_router_rule
from ..merging.sparsify import get_sparsifier
from ..models import (BLOCK_PATHS, MOE_BLOCK_PATHS, TRANSPOSED_LINEAR_TYPES, CheckpointNames, ExpertMapTensors,
                      StackedExperts, block_linears, block_of, block_prefix, decoder_blocks, expert_map_tensors, expert_slice_name,
                      indexes_tokens, is_router_tensor, load_model, load_tokenizer, local_model_dir, skeleton_model,
                      stacked_expert_tensors)
from ..recipe import (Calibration, MergeGroup, MergeRecipe, Recipe, SlicesRecipe, group_parameters,
                      method_parameters, model_calibration, resolve)
from ..runner import ABS, GRAM, NORMS, block_input_stats, blockwise_pass, multistream_pass
from .merge_inputs import check_compatible, open_inputs
from .slices import StackedLayout, StackedTensor, stacked_layout
from .vocabulary import OutputVocabulary, build_vocabulary, save_tokenizer

log = logging.getLogger(__name__)


@dataclass
class InputNorms:
    """What the calibration pass saw at the input of one linear map."""

    sq_norms: torch.Tensor  # (in_features,) sum over tokens of x_j ** 2
    transposed: bool  # the stored tensor is (in, out), as GPT-2's Conv1D
    gram_file: Path | None = None  # (in, in) mean over tokens of x x^T, when asked for: kept on disk
    abs_sums: torch.Tensor | None = None  # (in_features,) sum over tokens of |x_j|, for AIM
    gram: torch.Tensor | None = None  # the same Gram in memory (one block's, in a propagated pass)

    def load_gram(self) -> torch.Tensor | None:
        """The Gram, memory-mapped from its file: its pages are read as a merge reads them, and leave memory
        with the tensor."""
        if self.gram is not None:
            return self.gram
        return None if self.gram_file is None else torch.load(self.gram_file, weights_only=True, mmap=True)


class GramsOnDemand(Sequence):
    """The fine-tunes' input Grams of one map, each loaded when indexed and not kept: a merge that takes them
    one at a time (RegMean's sums, WUDI's, a trim's) holds one in memory, not one per fine-tune (a 5632-wide
    Gram is 127 MB in float32), and a check of their shapes reads none of their values."""

    def __init__(self, norms: Sequence[InputNorms]):
        self._norms = list(norms)

    def __len__(self) -> int:
        return len(self._norms)

    def __getitem__(self, index: int) -> torch.Tensor | None:
        if isinstance(index, slice):
            raise TypeError("GramsOnDemand is indexed one fine-tune at a time")
        return self._norms[index].load_gram()


@dataclass
class MergeInputs:
    """The opened, checked inputs of a recipe."""

    base_dir: Path
    base: Checkpoint
    inputs: dict  # model spec -> Checkpoint | LoraAdapter
    notes: list[str]
    prefix: str
    num_layers: int
    base_spec: str = ""  # the base_model, else the first model
    vocabulary: OutputVocabulary | None = None  # the output vocabulary, when the recipe asks for one
    token_models: tuple[str, ...] = ()  # the models of a token-indexed tensor, in mergekit's order
    base_model: str | None = None  # the recipe's base_model
    # tensors stacking one matrix per expert (an MoE family that stores its experts fused: gpt-oss)
    stacked_experts: dict[str, StackedExperts] = field(default_factory=dict)

    @property
    def model_type(self) -> str | None:
        return self.base.config.get("model_type")

    def out_shape(self, name: str) -> tuple[int, ...]:
        """The output's shape of tensor ``name``: the base's, with the output vocabulary's rows for a
        token-indexed tensor."""
        shape = tuple(self.base.shape(name))
        return (self.vocabulary.size, *shape[1:]) if self.vocabulary and indexes_tokens(name) else shape

    def token_views(self, name: str, dtype: torch.dtype) -> dict | None:
        """Model argument -> its rows of tensor ``name`` in the output vocabulary (a row reader), or None
        when no vocabulary is built or the tensor is not token-indexed. A model without the tensor (a tied LM
        head) has the base's; a LoRA adapter's is its base's plus its delta."""
        if self.vocabulary is None or not indexes_tokens(name):
            return None
        base, readers, base_whole = self.base, [], None
        for spec in self.token_models:
            source = self.inputs.get(spec, base)
            if isinstance(source, LoraAdapter) and source.adapts(name):
                if base_whole is None:
                    base_whole = base.tensor(name).to(dtype)
                readers.append((spec, TensorRows(finetuned_tensor(source, name, base_whole))))
            elif isinstance(source, Checkpoint) and source.has(name):
                readers.append((spec, source.rows(name)))
            else:
                readers.append((self.base_spec, base.rows(name)))
        views = self.vocabulary.views(name, readers, self.base_model, dtype)
        return dict(zip(self.token_models, views))


def collect_input_norms(model, windows: torch.Tensor, *, device: str = "cpu", batch_size: int | None = None,
                        progress: bool = True, loader=None, grams: Path | None = None,
                        abs_sums: bool = False, checkpoint_names: Collection[str] | None = None
                        ) -> dict[str, InputNorms]:
    """``sum x_j^2`` of the inputs of every decoder linear map, keyed by its weight's tensor name; with
    ``grams`` (a folder) also the mean of ``x x^T``, written there one file per map so that memory holds
    one map's Gram at a time (a model's Grams can be several times its size), and with ``abs_sums``
    the sum of ``|x_j|``.

    An expert's map of an MoE block (the tokens routed to it) is keyed by the tensors of a checkpoint
    holding ``checkpoint_names`` (default: the model's own names) that store it
    (:func:`~wandamerge.models.expert_map_tensors`): each of its per-expert tensors (gate and up alike), or
    its slice of a fused tensor (``...experts.gate_up_proj[3]``).
    The visitor changes nothing, so every map sees the unmodified model's activations.
    ``loader``: where the blocks come from (a :class:`~wandamerge.loaders.StreamedModel`'s
    reads them from disk one at a time).
    """
    prefix = block_prefix(model)
    names = set(model.state_dict() if checkpoint_names is None else checkpoint_names)
    experts, saved = {}, CheckpointNames(model)
    for index, block in enumerate(decoder_blocks(model)):
        experts.update(expert_map_tensors(block, f"{prefix}.{index}", names, saved))
    norms: dict[str, InputNorms] = {}

    def visit(index, linear, stats):
        full = f"{prefix}.{index}.{linear.name}"
        stored = experts.get(full) or ExpertMapTensors((f"{full}.weight",), linear.transposed)
        gram_file = None
        if grams is not None:
            gram_file = grams / f"{stored.names[0]}.pt"
            torch.save((stats.gram / max(stats.tokens, 1)).cpu(), gram_file)
        for name in stored.names:
            norms[name] = InputNorms(stats.sq_norms.cpu(), stored.transposed, gram_file,
                                     stats.abs_sums.cpu() if abs_sums else None)

    needs = {NORMS} | ({GRAM} if grams is not None else set()) | ({ABS} if abs_sums else set())
    # auto: one forward per block over every window when its activations fit beside the block's inputs, else
    # batches that fit (the visitor changes nothing, so both orders see the same activations)
    blockwise_pass(model, windows, visit, needs=needs, device=device, batch_size=batch_size, within_block="auto",
                   progress=progress, desc="activations", loader=loader)
    return norms


def layer_position(name: str, prefix: str, num_layers: int) -> float:
    """mergekit's ``t`` for gradients: layer index / (layers - 1); 0 outside the blocks."""
    found = block_of(name, prefix)
    if found is None:
        return 0.0
    return found[0] / (num_layers - 1) if num_layers > 1 else 1.0


def merge(recipe: Recipe, out: str | Path, *, recipe_text: str | None = None, device: str = "cpu",
          overwrite: bool = False, progress: bool = True, max_shard_size: str | int = DEFAULT_SHARD_SIZE,
          low_memory: bool | None = None, copy_tokenizer: bool = True) -> dict:
    """Merge as the recipe says and write a transformers directory to ``out``. Returns the run record.

    The merge itself streams one tensor per input; a slices recipe goes to :func:`merge_slices`.
    ``low_memory`` concerns the calibration pass of activation scores: read the base one block at
    a time from its shards (``None``: when the base would take more than half the available RAM).
    ``copy_tokenizer`` off: no tokenizer is written, unless the recipe builds an output vocabulary
    (mergekit's ``--no-copy-tokenizer``).
    """
    if isinstance(recipe, SlicesRecipe):
        return merge_slices(recipe, out, recipe_text=recipe_text, overwrite=overwrite, progress=progress,
                            max_shard_size=max_shard_size, copy_tokenizer=copy_tokenizer)
    t_start = time.perf_counter()
    clock = StageClock()
    with clock.stage("open_and_check"):
        chat_template = _chat_template(recipe)
        opened, out = open_merge_inputs(recipe, out, overwrite)
    score = _score(recipe)
    norms_per_input, aim_stats, calib_record = [None] * len(recipe.models), None, None
    cleanup = ExitStack()  # the folder of input Grams, beside the output, removed at the end
    spill = Path(cleanup.enter_context(scratch_dir(out, "grams"))) if _needs_grams(recipe) else None
    propagate, precomputed = get_method(recipe.merge_method).propagate, {}
    if _reads_activations(recipe) or recipe.aim is not None:
        with clock.stage("activations"), cleanup.pop_all() as on_error:  # the folder goes if the pass fails
            if propagate:  # RegMean++ merges the blocks in its own pass; a regular pass only for AIM's statistics
                precomputed, calib_record = _propagated_merge(recipe, opened, device, progress, spill, low_memory)
            if not propagate or recipe.aim is not None:
                norms_per_input, aim_stats, record = _activations(recipe, opened, device, progress, low_memory,
                                                                  None if propagate else spill, aim_only=propagate)
                calib_record = calib_record or record
            cleanup = on_error.pop_all()
    try:
        return _write_merge(
            recipe, out, overwrite, recipe_text, clock, t_start, device,
            {spec: opened.inputs[spec] for spec in _specs(recipe)}, opened.base_dir,
            _out_dtype(recipe) or _dtype_of(opened.base),
            lambda tmp: _merge_tensors(recipe, opened, norms_per_input, aim_stats, tmp, max_shard_size, progress,
                                       precomputed),
            {"calibration": calib_record, "notes": opened.notes},
            _tokenizer_writer(chat_template, opened.base_dir, opened.vocabulary,
                              [_model_dir(opened, spec) for spec in opened.token_models], copy_tokenizer),
            vocabulary=opened.vocabulary)
    finally:
        cleanup.close()


def _write_merge(recipe: Recipe, out: Path, overwrite: bool, recipe_text: str | None, clock: StageClock,
                 t_start: float, device: str, inputs: dict, base_dir: Path, dtype, write_tensors, extra: dict,
                 write_tokenizer, config: dict | None = None, vocabulary: OutputVocabulary | None = None) -> dict:
    """The staged output of a merge: ``write_tensors(tmp)`` (the per-tensor record and the fallbacks), the
    config (``config``, default the base's; the output vocabulary's size), ``write_tokenizer(tmp)``, the run
    record and the model card. ``inputs``: model argument -> the opened input, hashed beside the merge with
    the base."""
    hashing = ThreadPoolExecutor(max_workers=1)  # content hashes beside the merge (hashlib releases the GIL)
    digests = {spec: hashing.submit(input_digests, source.path) for spec, source in inputs.items()}
    listed = next((spec for spec, source in inputs.items() if Path(source.path) == Path(base_dir)), None)
    digests[None] = digests[listed] if listed is not None else hashing.submit(input_digests, base_dir)
    try:
        with staged_output(out, overwrite) as tmp:
            with clock.stage("merge_and_write"):
                per_tensor, fallbacks = write_tensors(tmp)
            _write_config(base_dir, tmp, dtype, config, vocabulary)
            write_tokenizer(tmp)
            record = {
                "job": "merge", "recipe": recipe.model_dump(mode="json", exclude_none=True),
                "score": _score(recipe), "group": _group(recipe), "pattern": _pattern(recipe) or "unstructured",
                **extra,
                "inputs": {spec: {"kind": source.kind, "sha256": digests[spec].result()}
                           for spec, source in inputs.items()},
                "base": {"path": str(base_dir), "sha256": digests[None].result()},
                "fallbacks": fallbacks, "per_tensor": per_tensor, "versions": versions(),
                "seconds": {**clock.seconds, "total": round(time.perf_counter() - t_start, 4)},
                "peak_memory": peak_memory(device),
            }
            (tmp / "wandamerge.json").write_text(json.dumps(record, indent=2))
            (tmp / "README.md").write_text(merge_card(recipe, recipe_text, record))
    finally:
        hashing.shutdown(wait=True, cancel_futures=True)
    return record


# ----------------------------------------------------------------------------- slices recipes


def merge_slices(recipe: SlicesRecipe, out: str | Path, *, recipe_text: str | None = None, overwrite: bool = False,
                 progress: bool = True, max_shard_size: str | int = DEFAULT_SHARD_SIZE,
                 copy_tokenizer: bool = True) -> dict:
    """A slices recipe: the output's blocks stacked from the slices' layers as :mod:`.slices` lays them out.
    Every tensor is planned (parameters resolved, required ones checked) before any is read; then each is
    merged in turn, each source's tensor read once and dropped. Returns the run record, whose ``layers``
    says where each output block comes from."""
    t_start, clock = time.perf_counter(), StageClock()
    with clock.stage("open_and_check"):
        chat_template = _chat_template(recipe)
        settings = recipe.tokenizer_settings()
        layout = stacked_layout(recipe, own_vocabularies=settings is not None)
        out = check_output_dir(out, [str(c.path) for c in layout.checkpoints.values()], overwrite)
        model_dirs = {spec: checkpoint.path for spec, checkpoint in layout.checkpoints.items()}
        vocabulary = None if settings is None else build_vocabulary(
            settings, recipe.base_model or layout.tensors[0].group.models[0], model_dirs)
        method, compute_dtype = get_method(recipe.merge_method), torch_dtype(recipe.dtype)
        jobs = [_StackedJob(recipe, method, tensor, layout, compute_dtype, vocabulary) for tensor in layout.tensors]
    out_dtype = _out_dtype(recipe)

    def write_tensors(tmp: Path) -> tuple[dict, dict]:
        generator = torch.Generator().manual_seed(0)
        writer = ShardWriter(tmp, [(job.tensor.name, job.shape, out_dtype or job.dtype) for job in jobs],
                             max_shard_size)
        per_tensor = {}
        for job in tqdm(jobs, desc=f"{recipe.merge_method} slices", disable=not progress):
            result = job.merged(generator)
            writer.add(job.tensor.name, result.tensor.to(out_dtype) if out_dtype else result.tensor)
            per_tensor[job.tensor.name] = {"sparsifier": result.sparsifier, "from": job.origin()}
        writer.close()
        return per_tensor, {}

    return _write_merge(recipe, out, overwrite, recipe_text, clock, t_start, "cpu", layout.checkpoints,
                        layout.donor.path, out_dtype or _dtype_of(layout.donor), write_tensors,
                        {"calibration": None, "notes": [], "layers": layout.layers},
                        _tokenizer_writer(chat_template, layout.donor.path, vocabulary, list(model_dirs.values()),
                                          copy_tokenizer), layout.config, vocabulary)


class _StackedJob:
    """One output tensor of a slices recipe: its plan, and its merge from the group's sources."""

    def __init__(self, recipe: SlicesRecipe, method: MergeMethod, tensor: StackedTensor, layout: StackedLayout,
                 compute_dtype, vocabulary: OutputVocabulary | None = None):
        self.tensor, group = tensor, tensor.group.merge
        checkpoints = layout.checkpoints
        # the models read: the base when the method merges one, then each input
        self.models = ([group.base] if group.uses_base else []) + list(group.inputs)
        self.reads = [(checkpoints[m], tensor.input_name(m)) for m in self.models]
        reference, name = self.reads[0]  # the base, or the first input: shape and dtype
        self.dtype = compute_dtype or TORCH_DTYPES[reference.dtype(name)]
        self.views = None  # model -> its rows in the output vocabulary, for a token-indexed tensor
        if vocabulary is not None and indexes_tokens(tensor.name):
            sources = tensor.group.models  # all the group's sources, as mergekit gathers them
            views = vocabulary.views(tensor.name, [(m, checkpoints[m].rows(tensor.input_name(m))) for m in sources],
                                     group.base, self.dtype)
            self.views = dict(zip(sources, views))
        self.shape = self.views[self.models[0]].shape if self.views else tuple(reference.shape(name))
        input_names = [tensor.input_name(m) for m in group.inputs]
        _check_values(method, group, tensor.name, group_parameters(method, group, tensor.name, tensor.t, input_names))
        self.plan = plan_tensor(recipe, method, tensor.name, tensor.t, self.shape, [None] * len(group.inputs),
                                group=group, input_names=input_names)

    def origin(self) -> dict[str, str]:
        return dict(zip(self.tensor.group.models, self.tensor.sources))

    def merged(self, generator) -> MergeResult:
        if self.views:
            tensors = [self.views[model].whole() for model in self.models]
        else:
            tensors = [checkpoint.tensor(name).to(self.dtype) for checkpoint, name in self.reads]
        if self.plan.uses_base:
            return merge_with_plan(self.plan, tensors[0], tensors[1:], generator)
        return merge_with_plan(self.plan, tensors[0], tensors, generator)


def open_merge_inputs(recipe: MergeRecipe, out: str | Path, overwrite: bool) -> tuple[MergeInputs, Path]:
    """Open every input lazily and check it fits the base, before any heavy work; the checked output path."""
    base_spec = recipe.base_model or recipe.models[0].model
    base_dir = local_model_dir(base_spec)
    base = open_input(base_dir)
    if not isinstance(base, Checkpoint):
        raise InputError(f"base model {base_spec} must be a full checkpoint, not an adapter")
    out = check_output_dir(out, [str(base_dir)] + _specs(recipe), overwrite)
    inputs = open_inputs(_specs(recipe))
    settings = recipe.tokenizer_settings()
    notes = check_compatible(base, inputs, own_vocabularies=settings is not None)
    model_type = base.config.get("model_type")
    if model_type not in BLOCK_PATHS:
        raise InputError(f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(BLOCK_PATHS))}")
    num_layers = int(base.config.get("num_hidden_layers") or base.config.get("n_layer"))
    # a token-indexed tensor is gathered from every model, the base_model last when not listed (mergekit)
    listed = list(dict.fromkeys(_specs(recipe)))
    token_models = tuple(listed + ([recipe.base_model] if recipe.base_model and recipe.base_model not in listed
                                   else []))
    opened = MergeInputs(base_dir, base, inputs, notes, BLOCK_PATHS[model_type], num_layers, base_spec,
                         token_models=token_models, base_model=recipe.base_model)
    _check_moe(recipe, opened)
    if model_type in MOE_BLOCK_PATHS:
        opened.stacked_experts = stacked_expert_tensors(skeleton_model(base_dir), set(base.names()))
    if settings is not None:
        _check_own_activations(recipe, opened)
        opened.vocabulary = build_vocabulary(settings, base_spec, {
            spec: _model_dir(opened, spec) for spec in (base_spec, *token_models)})
    _check_required(recipe, opened)
    return opened, out


def _check_moe(recipe: MergeRecipe, opened: MergeInputs) -> None:
    """What an MoE base refuses (a method whose pass does not route tokens to experts), and what a dense
    base refuses (a router rule: it has no routers)."""
    model_type = opened.model_type
    if model_type not in MOE_BLOCK_PATHS:
        if recipe.router is not None:
            raise InputError(f"router: {recipe.router} says how an MoE model's routers are merged, and {model_type} "
                             f"models have none; remove it")
        return
    if get_method(recipe.merge_method).propagate:
        raise InputError(f"merge_method {recipe.merge_method!r} does not merge MoE models ({model_type}): its pass "
                         f"through the merged blocks does not route tokens to experts; use regmean")


def _model_dir(opened: MergeInputs, spec: str) -> Path:
    """The directory of a model's config and tokenizer: a LoRA adapter's are its base's."""
    source = opened.inputs.get(spec, opened.base)
    return opened.base_dir if isinstance(source, LoraAdapter) else Path(source.path)


def _check_own_activations(recipe: MergeRecipe, opened: MergeInputs) -> None:
    """activations: finetuned runs each fine-tune on the base's token windows, so in the base's vocabulary."""
    if not (recipe.sparsify and recipe.sparsify.activations == "finetuned"):
        return
    for spec, source in opened.inputs.items():
        if not isinstance(source, Checkpoint):
            continue
        for name in opened.base.names():
            if indexes_tokens(name) and source.has(name) and source.shape(name) != opened.base.shape(name):
                raise InputError(f"{spec} has a vocabulary of its own ({source.shape(name)[0]} rows in {name}), and "
                                 f"activations: finetuned runs each fine-tune on the base's tokens; use "
                                 f"activations: base")


def _specs(recipe: MergeRecipe) -> list[str]:
    return [m.model for m in recipe.models]


def _reads_activations(recipe: MergeRecipe) -> bool:
    """Whether the sparsifier needs input norms, or the method or the rescale input Grams (a calibration pass)."""
    score = _score(recipe)
    return ((score is not None and get_sparsifier(score).needs_input_norms) or _needs_grams(recipe)
            or _needs_norms(recipe))


def _needs_norms(recipe: MergeRecipe) -> bool:
    """Whether the method or the sign election reads each model's input norms (beyond the sparsifier)."""
    return get_method(recipe.merge_method).needs_norms or recipe.asks_activation_election()


def _needs_grams(recipe: MergeRecipe) -> bool:
    """Whether the method, the sparsifier or the rescale reads each model's input Grams."""
    score = _score(recipe)
    return (get_method(recipe.merge_method).needs_grams or recipe.asks_gram_rescale()
            or (score is not None and get_sparsifier(score).needs_grams))


def _score(recipe: MergeRecipe) -> str | None:
    """The sparsifier asked for: the recipe's ``sparsify.score``, else the method's own (None: none)."""
    asked = recipe.sparsify.score if recipe.sparsify else None
    return asked or get_method(recipe.merge_method).score


def _group(recipe: MergeRecipe) -> str | None:
    return recipe.sparsify.group if recipe.sparsify else None


def _pattern(recipe: MergeRecipe) -> str | None:
    pattern = recipe.sparsify.pattern if recipe.sparsify else None
    return None if pattern == "unstructured" else pattern


def _check_required(recipe: MergeRecipe, opened: MergeInputs) -> None:
    """Every parameter without a default has a value for every tensor (as in mergekit: a weight for every
    model, slerp's t), filters and gradients resolved, checked before any heavy work."""
    method = get_method(recipe.merge_method)
    group = recipe.group()
    for name in opened.base.names() if any(p.required for p in method.parameters) else []:
        _check_values(method, group, name,
                      method_parameters(recipe, name, layer_position(name, opened.prefix, opened.num_layers)))


def _check_values(method: MergeMethod, group: MergeGroup, name: str, values: dict) -> None:
    """Every required parameter of ``method`` has a value for tensor ``name`` (InputError naming it)."""
    for parameter in (p for p in method.parameters if p.required):
        value = values[parameter.name]
        if not parameter.per_model and value is None:
            raise InputError(f"{method.name} has no {parameter.name} for {name}; set parameters.{parameter.name}")
        for model, own in zip(group.inputs, value if parameter.per_model else []):
            if own is None:
                raise InputError(f"model {model} has no {parameter.name} for {name}; set parameters.{parameter.name}")


# ----------------------------------------------------------------------------- activations


def _calibration_model(opened: MergeInputs, low_memory: bool | None):
    """(the streamed base or None, the base model in float32, its tokenizer): streamed block by block from its
    shards with ``low_memory``, or when ``None`` and the base would take more than half the available RAM."""
    if low_memory or (low_memory is None and should_stream(opened.base_dir, "float32")):
        streamed = StreamedModel(opened.base_dir, dtype="float32")
        return streamed, streamed.model, load_tokenizer(opened.base_dir)
    return None, *load_model(str(opened.base_dir), dtype="float32")


def _activations(recipe: MergeRecipe, opened: MergeInputs, device: str, progress: bool,
                 low_memory: bool | None, spill: Path | None = None, aim_only: bool = False
                 ) -> tuple[list, dict[str, InputNorms] | None, dict]:
    """Input norms of every linear map, per input model: through the base (default) or each fine-tune,
    on the top-level calibration or the model's own (one pass per distinct model and data); and for AIM
    the base's statistics on the top-level calibration. ``spill``: the folder input Grams are kept in;
    ``aim_only``: AIM's statistics alone (the merge reads its own elsewhere)."""
    streamed, model, tokenizer = _calibration_model(opened, low_memory)
    calibs = [model_calibration(recipe, i) for i in range(len(recipe.models))]
    drawn: dict[str, torch.Tensor] = {}

    def windows_of(calib: Calibration) -> torch.Tensor:
        key = calib.model_dump_json()
        if key not in drawn:
            drawn[key] = calibration_windows(calib.data, tokenizer, calib.nsamples, calib.seqlen, seed=calib.seed,
                                             vocab_size=model.config.vocab_size)
        return drawn[key]

    aim, passes = recipe.aim is not None, itertools.count()

    def collect(calib: Calibration, loader=None):
        folder = None
        if spill is not None:  # one folder of Grams per calibration pass
            folder = spill / f"pass-{next(passes)}"
            folder.mkdir()
        return collect_input_norms(model, windows_of(calib), device=device, batch_size=calib.batch_size,
                                   progress=progress, loader=loader, grams=folder, abs_sums=aim,
                                   checkpoint_names=opened.base.names())

    through_base: dict[str, dict[str, InputNorms]] = {}

    def base_stats(calib: Calibration) -> dict[str, InputNorms]:
        if calib.model_dump_json() not in through_base:
            through_base[calib.model_dump_json()] = collect(calib, streamed.loader(device) if streamed else None)
        return through_base[calib.model_dump_json()]

    if aim_only or not _reads_activations(recipe):  # only AIM reads them
        norms = [None] * len(calibs)
    elif recipe.sparsify is None or recipe.sparsify.activations == "base":
        norms = [base_stats(calib) for calib in calibs]
    else:
        norms = _finetuned_activations(recipe, opened, model, streamed, device, calibs, collect)
    aim_stats = base_stats(recipe.calibration or Calibration()) if aim else None
    return norms, aim_stats, _calibration_record(recipe, calibs, windows_of, streamed is not None)


def _propagated_merge(recipe: MergeRecipe, opened: MergeInputs, device: str, progress: bool, spill: Path,
                      low_memory: bool | None = None) -> tuple[dict[str, tuple[Path, MergeResult]], dict]:
    """RegMean++: block by block, each fine-tune's own block runs on its task's inputs as they come out of the
    MERGED earlier blocks, giving that task's Grams; the block is merged (every tensor by its plan, at lambda 1)
    and every task's inputs go on through the merged block. The first block's inputs come from the base's
    embeddings (as MergeBench). Each merged task vector is written to ``spill``: name -> (file, record)."""
    streamed, model, tokenizer = _calibration_model(opened, low_memory)
    calibs = [model_calibration(recipe, i) for i in range(len(recipe.models))]
    streams = [calibration_windows(c.data, tokenizer, c.nsamples, c.seqlen, seed=c.seed,
                                   vocab_size=model.config.vocab_size) for c in calibs]
    prefix, compute_dtype = block_prefix(model), torch_dtype(recipe.dtype)
    generator = torch.Generator().manual_seed(recipe.calibration.seed if recipe.calibration else 0)
    merged: dict[str, tuple[Path, MergeResult]] = {}

    def step(index: int, block, inputs: list) -> None:
        params = dict(block.named_parameters())
        pristine = {key: value.detach().clone() for key, value in params.items()}
        linears = block_linears(block)
        stats = []
        for entry, stream in zip(recipe.models, inputs):  # each task through its own fine-tune's block
            source = opened.inputs[entry.model]
            for key, value in params.items():
                value.data.copy_(finetuned_tensor(source, f"{prefix}.{index}.{key}", pristine[key]))
            stats.append(block_input_stats(block, linears, stream, {NORMS, GRAM}))
        for key, value in params.items():
            name = f"{prefix}.{index}.{key}"
            linear = next((lin for lin in linears if f"{lin.name}.weight" == key), None)
            norms = [None] * len(stats) if linear is None else [
                InputNorms(s[linear.name].sq_norms.cpu(), linear.transposed,
                           gram=(s[linear.name].gram / max(s[linear.name].tokens, 1)).cpu()) for s in stats]
            job = _TensorJob(recipe, opened, name, norms, compute_dtype)
            result = job.merged(pristine[key].to(job.dtype), generator, replace(job.plan, lambda_=1.0))
            path = spill / f"{name}.pt"
            torch.save((result.tensor - pristine[key].to(job.dtype)).cpu(), path)
            merged[name] = (path, replace(result, tensor=None, lambda_=job.plan.lambda_))
            value.data.copy_(result.tensor.to(value.dtype))  # the merged block, for the next block's inputs

    multistream_pass(model, streams, step, device=device, progress=progress, desc="regmean++ blocks",
                     loader=streamed.loader(device) if streamed else None)
    record = {**(recipe.calibration or Calibration()).model_dump(), "propagated": True,
              "low_memory": streamed is not None,
              "per_model": {m.model: {**c.model_dump(), "windows": list(w.shape)}
                            for m, c, w in zip(recipe.models, calibs, streams)}}
    return merged, record


def _finetuned_activations(recipe, opened, model, streamed, device, calibs, collect) -> list:
    """Each fine-tune's own activations: its tensors in place of the base's (block by block when streamed)."""
    pristine = None if streamed else {k: v.clone() for k, v in model.state_dict().items()}
    layout = None if streamed else StreamedModel(opened.base_dir, dtype="float32")  # the checkpoint's names
    norms = []
    for spec, calib in zip(_specs(recipe), calibs):
        finetune = opened.inputs[spec]
        if streamed is not None:
            norms.append(collect(calib, streamed.loader(
                device, tensor_fn=lambda name, t, source=finetune: finetuned_tensor(source, name, t))))
        else:
            _apply_finetune(model, finetune, layout)
            norms.append(collect(calib))
            model.load_state_dict(pristine)
    return norms


def _calibration_record(recipe: MergeRecipe, calibs: list[Calibration], windows_of, low_memory: bool) -> dict:
    """The top-level calibration as used, and each model's own where it has one."""
    def described(calib: Calibration) -> dict:
        return {**calib.model_dump(), "windows": list(windows_of(calib).shape)}

    shared = recipe.calibration or Calibration()
    uses_shared = any(m.calibration is None for m in recipe.models)
    record = {**(described(shared) if uses_shared else shared.model_dump()), "low_memory": low_memory}
    own = {m.model: described(c) for m, c in zip(recipe.models, calibs) if m.calibration is not None}
    if own:
        record["per_model"] = own
    return record


def _apply_finetune(model, source: Checkpoint | LoraAdapter, layout: StreamedModel) -> None:
    """Turn an in-memory base model into a fine-tune (for activations: finetuned): each block tensor read
    under the checkpoint's names, as the streamed pass reads it (``layout``, the base's: a fused expert
    parameter assembled from its per-expert tensors, Mixtral's ``block_sparse_moe`` for ``mlp``)."""
    def tuned(name: str, base_tensor: torch.Tensor) -> torch.Tensor:
        return finetuned_tensor(source, name, base_tensor)

    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            found = block_of(name, layout.prefix)
            tensor.copy_(tuned(name, tensor) if found is None else layout.read_block_tensor(found[0], name, tuned))


def finetuned_tensor(source, name: str, base_tensor: torch.Tensor) -> torch.Tensor:
    """Tensor ``name`` of a fine-tune in ``base_tensor``'s dtype: a LoRA adapter's base plus its delta, a
    checkpoint's own tensor, or the base's where the fine-tune lacks it (a tied LM head)."""
    if isinstance(source, LoraAdapter):
        delta = source.delta(name, base_tensor)
        return base_tensor if delta is None else (base_tensor.float() + delta).to(base_tensor.dtype)
    if not source.has(name):
        return base_tensor
    return source.tensor(name).to(base_tensor.dtype)


# ----------------------------------------------------------------------------- tensor by tensor


def _merge_tensors(recipe: MergeRecipe, opened: MergeInputs, norms_per_input: list, aim_stats: dict | None,
                   tmp: Path, max_shard_size: str, progress: bool, precomputed: dict | None = None
                   ) -> tuple[dict, dict]:
    """Merge every tensor of the base into the output shards; the per-tensor record and the fallbacks."""
    compute_dtype, out_dtype = torch_dtype(recipe.dtype), _out_dtype(recipe)
    generator = torch.Generator().manual_seed(recipe.calibration.seed if recipe.calibration else 0)
    base = opened.base
    writer = ShardWriter(tmp, [(name, opened.out_shape(name),
                                out_dtype or compute_dtype or TORCH_DTYPES[base.dtype(name)]) for name in base.names()],
                         max_shard_size)
    per_tensor: dict[str, dict] = {}
    fallbacks: dict[str, str] = {}
    for name in tqdm(base.names(), desc=f"{recipe.merge_method} merge", disable=not progress):
        stacked = opened.stacked_experts.get(name)
        if stacked is not None:
            tensor = _ExpertSlicesJob(recipe, opened, name, stacked, norms_per_input, compute_dtype, aim_stats)
        else:
            tensor = _TensorJob(recipe, opened, name, [(n or {}).get(name) for n in norms_per_input], compute_dtype,
                                (aim_stats or {}).get(name), (precomputed or {}).get(name))
        result, changed = tensor.merge_into(writer, out_dtype, generator)
        if result.fallback_reason:
            fallbacks[name] = result.fallback_reason
        per_tensor[name] = {"sparsifier": result.sparsifier, "changed_fraction": changed, **tensor.notes()}
    writer.close()
    return per_tensor, fallbacks


class _TensorJob:
    """One tensor's merge: its plan (every parameter at the tensor's layer position), and the two ways to
    carry it out, whole or block of rows by block of rows. A router of an MoE model is planned by the
    recipe's router rule (:mod:`~wandamerge.merging.routers`); with ``stacked``, the job plans one expert's
    slice of a tensor stacking the experts' matrices (:class:`_ExpertSlicesJob` carries it out)."""

    def __init__(self, recipe: MergeRecipe, opened: MergeInputs, name: str, norms: list, compute_dtype,
                 aim: InputNorms | None = None, precomputed: tuple[Path, MergeResult] | None = None,
                 stacked: StackedExperts | None = None):
        self.recipe, self.opened, self.name = recipe, opened, name
        self.aim = aim  # the base's input statistics of this linear map, when AIM relaxes it
        self.precomputed = precomputed  # (merged task vector at lambda 1 on disk, its record): RegMean++
        self.method: MergeMethod = get_method(recipe.merge_method)
        self.router: RouterRule | None = (get_router_rule(recipe.router_rule())
                                          if is_router_tensor(name, opened.model_type) else None)
        # the method's inputs (a base_model merged as one more input is read from the base)
        self.specs = [entry.model for entry in recipe.inputs()[1]]
        self.sources = [opened.inputs.get(spec, opened.base) for spec in self.specs]
        self.dtype = compute_dtype or TORCH_DTYPES[opened.base.dtype(name)]
        # model -> its rows in the output vocabulary, for a token-indexed tensor when the recipe builds one
        self.views = opened.token_views(name, self.dtype) if precomputed is None else None
        self.shape = shape = opened.out_shape(name)[1:] if stacked else opened.out_shape(name)
        linear_map = stacked is not None or (len(shape) == 2 and name.startswith(f"{opened.prefix}.")
                                             and name.endswith(".weight"))
        conv1d = opened.model_type in TRANSPOSED_LINEAR_TYPES
        # Conv1D, and an expert's matrix stored (in, out) (gpt-oss): scored and merged as (out, in)
        self.transposed = (stacked.transposed if stacked else any(n is not None and n.transposed for n in norms)
                           or (self.method.linear_maps_only and linear_map and conv1d))
        t = layer_position(name, opened.prefix, opened.num_layers)
        scored = shape[::-1] if self.transposed else shape
        # None: the base's tensor is kept (a router rule may say so)
        self.plan: MergePlan | None = (plan_router(recipe, self.router, name, t, scored, norms, linear_map)
                                       if self.router else
                                       plan_tensor(recipe, self.method, name, t, scored, norms, linear_map))

    def notes(self) -> dict:
        """What the record says of this tensor besides its sparsifier: AIM relaxed it, the router rule."""
        return {**({"aim": True} if self.aim is not None else {}),
                **({"router": self.router.name} if self.router else {})}

    def merge_into(self, writer: ShardWriter, out_dtype, generator) -> tuple[MergeResult, float | None]:
        """Merge block by block where :meth:`in_blocks` says so, else whole; the result and the fraction changed."""
        if self.in_blocks():
            return self.merge_in_blocks(writer, out_dtype)
        return self.merge_whole(writer, out_dtype, generator)

    def in_blocks(self) -> bool:
        """A large tensor, not transposed for its scores, of a plan and dtypes :mod:`.chunked` covers."""
        shape = self.shape
        if (not selects_lean(math.prod(shape)) or len(shape) == 0 or self.transposed or self.precomputed
                or self.plan is None):
            return False
        if self.aim is not None and self.aim.transposed:
            return False
        dtypes = [self.dtype, TORCH_DTYPES.get(self.opened.base.dtype(self.name), torch.int64)]
        for source in self.sources:
            if isinstance(source, Checkpoint) and source.has(self.name):
                dtypes.append(TORCH_DTYPES.get(source.dtype(self.name), torch.int64))
        return chunked_merge_applies(self.plan, dtypes)

    def merged(self, base_tensor: torch.Tensor, generator, plan: MergePlan | None = None) -> MergeResult:
        """The merge of this tensor as ``plan`` (default: its own) says, in the stored layout; each input's
        tensor read once (the base's is ``base_tensor``, also where the base is one of the inputs)."""
        plan = plan or self.plan
        base = self.opened.base
        if self.views:
            finetuned = [base_tensor if spec == self.opened.base_spec else self.views[spec].whole()
                         for spec in self.specs]
        else:
            finetuned = [base_tensor if source is base or (isinstance(source, Checkpoint) and source.path == base.path)
                         else finetuned_tensor(source, self.name, base_tensor) for source in self.sources]
        return self.combine(base_tensor, finetuned, generator, plan)

    def combine(self, base_tensor: torch.Tensor, finetuned: list, generator, plan: MergePlan | None = None
                ) -> MergeResult:
        """The merge of the base's and the inputs' tensors (in the stored layout) as ``plan`` (default: its
        own) says; None keeps the base's."""
        plan = plan or self.plan
        if plan is None:
            return MergeResult(base_tensor, method="base", sparsifier=None, requested_sparsifier=None,
                               fallback_reason=None, normalize=False, rescale=False, lambda_=1.0)
        if self.transposed:
            result = merge_with_plan(plan, base_tensor.T, [f.T for f in finetuned], generator)
            return replace(result, tensor=result.tensor.T.contiguous())
        return merge_with_plan(plan, base_tensor, finetuned, generator)

    def merge_whole(self, writer: ShardWriter, out_dtype, generator) -> tuple[MergeResult, float | None]:
        base_tensor = (self.views[self.opened.base_spec].whole() if self.views
                       else self.opened.base.tensor(self.name)).to(self.dtype)
        if self.precomputed is not None:  # a propagated pass merged it at lambda 1: scale its task vector
            path, done = self.precomputed
            result = replace(done, tensor=base_tensor + done.lambda_ * torch.load(path, weights_only=True).to(self.dtype))
        elif self.plan is None:  # the base's tensor kept: no input read
            result = self.combine(base_tensor, [], generator)
        else:
            result = self.merged(base_tensor, generator)
        merged = self.relaxed(base_tensor, result.tensor)
        changed = (merged != base_tensor).float().mean().item() if self.plan is None or self.plan.uses_base else None
        writer.add(self.name, merged.to(out_dtype) if out_dtype else merged)
        return result, changed

    def merge_in_blocks(self, writer: ShardWriter, out_dtype) -> tuple[MergeResult, float]:
        """Merge block by block, straight into ``writer``; the result record and the fraction changed."""
        base_rows, readers = self.row_readers()
        result, blocks = merge_rows(self.plan, base_rows, readers, dtype=self.dtype)
        changed = 0

        def pieces():
            nonlocal changed
            for merged, base_block in blocks:
                merged = self.relaxed(base_block, merged)
                changed += int((merged != base_block).sum())
                yield merged.to(out_dtype) if out_dtype else merged

        writer.add_chunks(self.name, pieces())
        return result, (torch.tensor(changed, dtype=torch.float32) / math.prod(self.shape)).item()

    def row_readers(self) -> tuple[object, list]:
        """The row readers of the base and of each input: their rows in the output vocabulary (a token-indexed
        tensor, when the recipe builds one), a LoRA adapter's tensor made whole, the base's where an input
        lacks the tensor."""
        if self.views:
            return self.views[self.opened.base_spec], [self.views[spec] for spec in self.specs]
        base, name = self.opened.base, self.name
        base_rows, readers, base_tensor = base.rows(name), [], None
        for source in self.sources:
            if isinstance(source, LoraAdapter) and source.adapts(name):  # the LoRA product is made whole
                if base_tensor is None:
                    base_tensor = base.tensor(name).to(self.dtype)
                readers.append(TensorRows(finetuned_tensor(source, name, base_tensor)))
            elif isinstance(source, Checkpoint) and source.has(name):
                readers.append(source.rows(name))
            else:
                readers.append(base_rows)
        return base_rows, readers

    def relaxed(self, base: torch.Tensor, merged: torch.Tensor) -> torch.Tensor:
        """AIM's post-pass on this tensor (or a block of its rows), where it applies; else ``merged``."""
        if self.aim is None:
            return merged
        omega = self.recipe.aim.omega
        if self.aim.transposed:  # Conv1D, stored (in, out)
            return aim_relax(base.T, merged.T, self.aim.abs_sums, omega).T.contiguous()
        return aim_relax(base, merged, self.aim.abs_sums, omega)


class _ExpertSlicesJob:
    """A tensor stacking one matrix per expert along dim 0 (gpt-oss's fused experts): each expert's matrix is
    a linear map of its own, merged alone, as a 2-D tensor with its own plan, input statistics (keyed
    ``name[expert]``) and AIM statistics, in its stored layout (a :class:`_TensorJob` of the slice); the result
    is the stack. So every method, sparsifier and score treats an expert as it treats a dense linear map,
    and a fused tensor merges as its slices would alone. Each input is read one expert at a time."""

    def __init__(self, recipe: MergeRecipe, opened: MergeInputs, name: str, stacked: StackedExperts,
                 norms_per_input: list, compute_dtype, aim_stats: dict | None):
        self.name, self.stacked = name, stacked

        def planned(expert: int) -> _TensorJob:
            key = expert_slice_name(name, expert)
            return _TensorJob(recipe, opened, name, [(n or {}).get(key) for n in norms_per_input], compute_dtype,
                              (aim_stats or {}).get(key), stacked=stacked)

        self.planned = planned
        self.first = planned(0)  # planned before any tensor is read, so a refusal comes first

    def notes(self) -> dict:
        return {**self.first.notes(), "experts": self.stacked.experts}

    def merge_into(self, writer: ShardWriter, out_dtype, generator) -> tuple[MergeResult, float]:
        """Merge expert by expert, straight into ``writer``; the first expert's result (with every expert's
        fallback reasons) and the fraction changed."""
        base_rows, readers = self.first.row_readers()
        results, changed = [], 0

        def pieces():
            nonlocal changed
            for expert in range(self.stacked.experts):
                job = self.first if expert == 0 else self.planned(expert)
                base = base_rows.rows(expert, expert + 1)[0].to(job.dtype)
                result = job.combine(base, [r.rows(expert, expert + 1)[0].to(job.dtype) for r in readers], generator)
                merged = job.relaxed(base, result.tensor)
                changed += int((merged != base).sum())
                results.append(replace(result, tensor=None))
                yield (merged.to(out_dtype) if out_dtype else merged)[None]

        writer.add_chunks(self.name, pieces())
        reasons = list(dict.fromkeys(r.fallback_reason for r in results if r.fallback_reason))
        return (replace(results[0], fallback_reason="; ".join(reasons) or None),
                changed / math.prod(self.first.opened.out_shape(self.name)))


def plan_router(recipe: MergeRecipe, rule: RouterRule, name: str, t: float, shape: tuple[int, ...], norms: list,
                linear_map: bool) -> MergePlan | None:
    """The plan of a router tensor by ``rule``: None keeps the base's; by the recipe's method as any tensor
    (its norms are None: no statistics are collected for a router); or by the rule's method with each input's
    ``weight`` (1 where none is set)."""
    if rule.keeps_base:
        return None
    if rule.merge_method is None:
        return plan_tensor(recipe, get_method(recipe.merge_method), name, t, shape, norms, linear_map)
    weights = [resolve("weight", scopes, name, t, default=1.0) for scopes in recipe.group().input_scopes]
    return plan_merge(rule.merge_method, shape, len(weights), weights, normalize=rule.normalize)


def plan_tensor(recipe: MergeRecipe, method: MergeMethod, name: str, t: float, shape: tuple[int, ...],
                norms: list, linear_map: bool | None = None, group: MergeGroup | None = None,
                input_names: list[str] | None = None) -> MergePlan:
    """The merge plan of tensor ``name`` (``shape`` as it is scored): per-model and global parameters
    resolved at its layer position ``t`` over ``group``'s scopes (default: the recipe's one group; a
    per-model one against each input's tensor name, ``input_names``), the recipe's sparsifier options where
    the sparsifier takes them."""
    group = group or recipe.group()
    if method.on == "tensors":  # mergekit's methods on whole tensors: the parameters their rows declare
        return plan_merge(method.name, shape, len(group.inputs), None,
                          parameters=group_parameters(method, group, name, t, input_names), with_base=group.uses_base)
    names = input_names or [name] * len(group.inputs)

    def per_model(key: str, default=None) -> list:
        return [resolve(key, scopes, own, t, default) for scopes, own in zip(group.input_scopes, names)]

    def shared(key: str):
        return resolve(key, group.shared, name, t)

    weights, normalize = per_model("weight"), shared("normalize")
    if method.on == "weights":
        return plan_merge(method.name, shape, len(weights), weights, normalize=normalize)
    score = _score(recipe)
    row = get_sparsifier(score) if score else None
    gammas, epsilons = per_model("gamma"), per_model("epsilon")
    takes = (lambda option: len(shape) == 2 and option in row.options) if row else (lambda option: False)
    return plan_merge(
        method.name, shape, len(weights), weights,
        None if row is None else per_model("density", default=1.0),  # as mergekit
        score=score, lambda_=shared("lambda"), normalize=normalize, rescale=shared("rescale"),
        gamma=None if all(g is None for g in gammas) else gammas,
        epsilon=None if all(e is None for e in epsilons) else epsilons,
        input_sq_norms=[n.sq_norms for n in norms] if (row and row.needs_input_norms or _needs_norms(recipe))
        and None not in norms else None,
        election=shared("election"),
        input_grams=GramsOnDemand(norms) if _needs_grams(recipe) and None not in norms else None,
        alpha=shared("alpha"), ridge=shared("ridge"), linear_map=linear_map, gram_share=shared("gram_share"),
        group=_group(recipe) if takes("group") else None, pattern=_pattern(recipe) if takes("pattern") else None)


# ----------------------------------------------------------------------------- output files


def _out_dtype(recipe: MergeRecipe) -> torch.dtype | None:
    return torch_dtype(recipe.out_dtype or recipe.dtype)


def _dtype_of(base: Checkpoint) -> torch.dtype | None:
    name = base.config.get("dtype") or base.config.get("torch_dtype")
    return torch_dtype(name) if name in DTYPE_NAMES else None


def _write_config(base_dir: Path, out: Path, dtype, config: dict | None = None,
                  vocabulary: OutputVocabulary | None = None) -> None:
    """``config`` (default: the base's config.json) with the output dtype and the output vocabulary's size,
    and the generation config."""
    config = dict(config or json.loads((base_dir / "config.json").read_text()))
    if dtype is not None:
        config["dtype"] = dtype_name(dtype)
        config.pop("torch_dtype", None)
    if vocabulary is not None:
        config["vocab_size"] = vocabulary.size
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if (base_dir / "generation_config.json").is_file():
        shutil.copy2(base_dir / "generation_config.json", out / "generation_config.json")


def _chat_template(recipe: Recipe) -> str | None:
    """The recipe's chat template, a name read from mergekit's package now: a name that cannot be read is
    refused before the merge, not after it."""
    return None if not recipe.chat_template else chat_template_text(recipe.chat_template)


def _tokenizer_writer(chat_template: str | None, donor: Path, vocabulary: OutputVocabulary | None,
                      model_dirs: list[Path], copy: bool):
    """What writes the output's tokenizer into a folder: the output vocabulary's, else the donor's;
    ``chat_template`` as :func:`_chat_template` gives it."""
    if vocabulary is not None:
        return lambda out: vocabulary.save(out, chat_template, model_dirs)
    return lambda out: save_tokenizer(donor, out, chat_template, model_dirs, copy)


def merge_card(recipe: Recipe, recipe_text: str | None, record: dict) -> str:
    text = recipe_text or yaml.safe_dump(recipe.model_dump(mode="json", exclude_none=True), sort_keys=False)
    models = "\n".join(f"- `{model}`" for model in recipe.input_models())
    return "\n".join([
        "---", "library_name: transformers", "tags: [wandamerge, merge]", "---", "",
        f"# Merge: {recipe.merge_method} (score: {record['score'] or 'none'})", "",
        f"Base model: `{recipe.base_model or recipe.input_models()[0]}`", "", "Merged models:", models, "",
        "## Recipe", "", "```yaml", text.strip(), "```", "",
        "Input hashes, per-tensor details, timings and peak memory are in `wandamerge.json`.", "",
    ])
