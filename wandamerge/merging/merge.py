"""Run a merge recipe: inputs checked first, activations of the base once, then tensor by tensor.

The order of work:

1. validate the recipe (already typed) and open every input lazily;
2. check that every fine-tune fits the base (architecture, names, shapes, vocabulary);
3. for ``score: wanda``, run the calibration windows once through the base model
   with the shared layer-by-layer runner and keep ``sum x_j^2`` per linear map
   (or through each fine-tune, with ``activations: finetuned``);
4. stream the base's tensors one at a time: read the same tensor from every
   input, sparsify each delta, combine, write to the output shard. A tensor of
   ``sparsify.LEAN_MIN_NUMEL`` entries or more (an embedding, an LM head) is
   merged block of rows by block of rows where :mod:`.chunked` covers the
   method, with the same result, so memory holds blocks, not tensors.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from ..calibration import calibration_windows
from ..models import BLOCK_PATHS, block_prefix, check_output_dir, load_model, load_tokenizer, staged_output
from ..recipe import Calibration, MergeRecipe, resolve
from ..runner import NORMS, blockwise_pass
from ..streaming import StreamedModel, should_stream
from .inputs import check_compatible, input_digests, local_model_dir, open_inputs
from .chunked import chunked_merge_applies, merge_rows
from .methods import get_method, merge_tensor_detailed
from .sparsify import selects_lean
from .sources import TORCH_DTYPES, Checkpoint, InputError, LoraAdapter, ShardWriter, TensorRows, open_input

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "added_tokens.json")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class InputNorms:
    sq_norms: torch.Tensor  # (in_features,)
    transposed: bool  # the stored tensor is (in, out), as GPT-2's Conv1D


def collect_input_norms(model, windows: torch.Tensor, *, device: str = "cpu", batch_size: int | None = None,
                        progress: bool = True, loader=None) -> dict[str, InputNorms]:
    """``sum x_j^2`` of the inputs of every decoder linear map, keyed by its weight's tensor name.

    The visitor changes nothing, so every map sees the unmodified model's activations.
    ``loader``: where the blocks come from (a :class:`~wandamerge.streaming.StreamedModel`'s
    reads them from disk one at a time).
    """
    prefix = block_prefix(model)
    norms: dict[str, InputNorms] = {}

    def visit(index, linear, stats):
        norms[f"{prefix}.{index}.{linear.name}.weight"] = InputNorms(stats.sq_norms.cpu(), linear.transposed)

    blockwise_pass(model, windows, visit, needs={NORMS}, device=device, batch_size=batch_size,
                   within_block="sequential" if batch_size is None else "parallel", progress=progress,
                   desc="activations", loader=loader)
    return norms


def _apply_deltas(model, source: Checkpoint | LoraAdapter) -> None:
    """Turn an in-memory base model into a fine-tune (for activations: finetuned)."""
    state = model.state_dict()
    with torch.no_grad():
        for name, tensor in state.items():
            if isinstance(source, LoraAdapter):
                delta = source.delta(name, tensor)
                if delta is not None:
                    tensor.add_(delta.to(tensor.dtype))
            elif source.has(name):
                tensor.copy_(source.tensor(name).to(tensor.dtype))


def layer_position(name: str, prefix: str, num_layers: int) -> float:
    """mergekit's ``t`` for gradients: layer index / (layers - 1); 0 outside the blocks."""
    match = re.match(rf"^{re.escape(prefix)}\.(\d+)\.", name)
    if not match:
        return 0.0
    return int(match.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0


def merge(recipe: MergeRecipe, out: str | Path, *, recipe_text: str | None = None, device: str = "cpu",
          overwrite: bool = False, progress: bool = True, max_shard_size: str = "2GB",
          low_memory: bool | None = None) -> dict:
    """Merge as the recipe says and write a transformers directory to ``out``. Returns the run record.

    The merge itself streams one tensor per input. ``low_memory`` concerns the
    calibration pass of Wanda scores: read the base one block at a time from its
    shards (``None``: when the base would take more than half the available RAM).
    """
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    method = get_method(recipe.merge_method)

    t0 = time.perf_counter()
    base_spec = recipe.base_model or recipe.models[0].model
    base_dir = local_model_dir(base_spec)
    base = open_input(base_dir)
    if not isinstance(base, Checkpoint):
        raise InputError(f"base model {base_spec} must be a full checkpoint, not an adapter")
    model_specs = [m.model for m in recipe.models]
    out = check_output_dir(out, [str(base_dir)] + model_specs, overwrite)
    inputs = open_inputs(model_specs)
    notes = check_compatible(base, inputs)
    prefix, num_layers = prefix_of(base), num_layers_of(base)
    _check_weights(recipe, base.names(), prefix, num_layers)
    seconds["open_and_check"] = time.perf_counter() - t0

    sparsify_cfg = recipe.sparsify
    score = (sparsify_cfg.score if sparsify_cfg and sparsify_cfg.score else None) or method.score
    group = sparsify_cfg.group if sparsify_cfg else None
    pattern = sparsify_cfg.pattern if sparsify_cfg and sparsify_cfg.pattern != "unstructured" else None

    norms_per_input: list[dict[str, InputNorms] | None] = [None] * len(model_specs)
    calib_record = None
    if score == "wanda":
        t0 = time.perf_counter()
        calib = recipe.calibration or Calibration()
        streamed = None
        if low_memory or (low_memory is None and should_stream(base_dir, "float32")):
            streamed = StreamedModel(base_dir, dtype="float32")
            model, tokenizer = streamed.model, load_tokenizer(base_dir)
        else:
            model, tokenizer = load_model(str(base_dir), dtype="float32")
        windows = calibration_windows(calib.data, tokenizer, calib.nsamples, calib.seqlen, seed=calib.seed,
                                      vocab_size=model.config.vocab_size)
        calib_record = {**calib.model_dump(), "windows": list(windows.shape), "low_memory": streamed is not None}
        if sparsify_cfg is None or sparsify_cfg.activations == "base":
            base_norms = collect_input_norms(model, windows, device=device, batch_size=calib.batch_size,
                                             progress=progress, loader=streamed.loader(device) if streamed else None)
            norms_per_input = [base_norms] * len(model_specs)
        else:
            pristine = None if streamed else {k: v.clone() for k, v in model.state_dict().items()}
            for i, spec in enumerate(model_specs):
                loader = None
                if streamed is not None:  # the fine-tune's tensors are read in place of the base's, block by block
                    finetune = inputs[spec]
                    loader = streamed.loader(device, tensor_fn=lambda name, t: _finetuned_tensor(finetune, name, t))
                else:
                    _apply_deltas(model, inputs[spec])
                norms_per_input[i] = collect_input_norms(model, windows, device=device, batch_size=calib.batch_size,
                                                         progress=progress, loader=loader)
                if pristine is not None:
                    model.load_state_dict(pristine)
        del model
        seconds["activations"] = time.perf_counter() - t0

    compute_dtype = DTYPES.get(recipe.dtype) if recipe.dtype else None
    out_dtype = DTYPES.get(recipe.out_dtype or recipe.dtype or "") or None
    generator = torch.Generator().manual_seed(_seed(recipe))

    # Content hashes for the run record, computed beside the merge (hashlib releases the GIL).
    hashing = ThreadPoolExecutor(max_workers=1)
    digests = {spec: hashing.submit(input_digests, inputs[spec].path) for spec in model_specs}
    digests[None] = hashing.submit(input_digests, base_dir)
    per_tensor: dict[str, dict] = {}
    fallbacks: dict[str, str] = {}
    try:
        with staged_output(out, overwrite) as tmp:
            t0 = time.perf_counter()
            plan = [(name, base.shape(name), out_dtype or compute_dtype or TORCH_DTYPES[base.dtype(name)])
                    for name in base.names()]
            writer = ShardWriter(tmp, plan, max_shard_size)
            for name in tqdm(base.names(), desc=f"{recipe.merge_method} merge", disable=not progress):
                t = layer_position(name, prefix, num_layers)
                weights, densities, gammas, epsilons, norms = [], [], [], [], []
                for i, entry in enumerate(recipe.models):
                    scopes = (entry.parameters, recipe.parameters)
                    weights.append(resolve("weight", scopes, name, t, default=None))
                    densities.append(resolve("density", scopes, name, t, default=1.0))
                    gammas.append(resolve("gamma", scopes, name, t))
                    epsilons.append(resolve("epsilon", scopes, name, t))
                    entry_norms = (norms_per_input[i] or {}).get(name)
                    norms.append(entry_norms)
                options = _delta_kwargs(recipe, name, base.shape(name), densities, gammas, epsilons, norms, score,
                                        group, pattern)
                tensor_dtype = compute_dtype or TORCH_DTYPES[base.dtype(name)]
                if _merges_in_blocks(recipe, method, base, inputs, name, tensor_dtype, norms, options):
                    result, changed = _merge_blocks(recipe, base, inputs, name, tensor_dtype, weights, options,
                                                    writer, out_dtype)
                else:
                    base_tensor = base.tensor(name)
                    if compute_dtype is not None:
                        base_tensor = base_tensor.to(compute_dtype)
                    finetuned = [_finetuned_tensor(inputs[entry.model], name, base_tensor) for entry in recipe.models]
                    result = _merge_one(recipe, method, name, base_tensor, finetuned, weights, norms, options,
                                        generator)
                    merged = result.tensor
                    changed = (merged != base_tensor).float().mean().item() if recipe.merge_method != "linear" else None
                    writer.add(name, merged.to(out_dtype) if out_dtype else merged)
                    del merged, base_tensor, finetuned
                if result.fallback_reason:
                    fallbacks[name] = result.fallback_reason
                per_tensor[name] = {"sparsifier": result.sparsifier, "changed_fraction": changed}
            writer.close()
            seconds["merge_and_write"] = time.perf_counter() - t0
            _write_config_and_tokenizer(recipe, base_dir, tmp, out_dtype or _dtype_of(base))
            record = {
                "job": "merge", "recipe": recipe.model_dump(mode="json", exclude_none=True),
                "score": score, "group": group, "pattern": pattern or "unstructured",
                "calibration": calib_record,
                "inputs": {spec: {"kind": inputs[spec].kind, "sha256": digests[spec].result()} for spec in model_specs},
                "base": {"path": str(base_dir), "sha256": digests[None].result()},
                "notes": notes, "fallbacks": fallbacks, "per_tensor": per_tensor,
            }
            from ..pipeline import _peak_memory, versions

            record["versions"] = versions()
            record["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
            record["seconds"]["total"] = round(time.perf_counter() - t_start, 3)
            record["peak_memory"] = _peak_memory(device)
            (tmp / "wandamerge.json").write_text(json.dumps(record, indent=2))
            (tmp / "README.md").write_text(merge_card(recipe, recipe_text, record))
    finally:
        hashing.shutdown(wait=True, cancel_futures=True)
    return record


def prefix_of(base: Checkpoint) -> str:
    model_type = base.config.get("model_type")
    if model_type not in BLOCK_PATHS:
        raise InputError(f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(BLOCK_PATHS))}")
    return BLOCK_PATHS[model_type]


def num_layers_of(base: Checkpoint) -> int:
    return int(base.config.get("num_hidden_layers") or base.config.get("n_layer"))


def _check_weights(recipe: MergeRecipe, names: list[str], prefix: str, num_layers: int) -> None:
    """Every model needs a weight for every tensor (as in mergekit), checked before any heavy work."""
    for entry in recipe.models:
        for name in names:
            t = layer_position(name, prefix, num_layers)
            if resolve("weight", (entry.parameters, recipe.parameters), name, t) is None:
                raise InputError(f"model {entry.model} has no weight for {name}; set parameters.weight")


def _seed(recipe: MergeRecipe) -> int:
    return recipe.calibration.seed if recipe.calibration else 0


def _dtype_of(base: Checkpoint):
    name = base.config.get("dtype") or base.config.get("torch_dtype")
    return DTYPES.get(name)


def _finetuned_tensor(source, name: str, base_tensor: torch.Tensor) -> torch.Tensor:
    if isinstance(source, LoraAdapter):
        delta = source.delta(name, base_tensor)
        return base_tensor if delta is None else (base_tensor.float() + delta).to(base_tensor.dtype)
    if not source.has(name):  # a tied LM head absent from the fine-tune's files
        return base_tensor
    return source.tensor(name).to(base_tensor.dtype)


def _delta_kwargs(recipe, name, shape, densities, gammas, epsilons, norms, score, group, pattern) -> dict:
    """The options of a method on deltas for tensor ``name``, as merge_tensor_detailed takes them."""
    params = recipe.parameters or {}
    sq_norms = None if any(n is None for n in norms) else [n.sq_norms for n in norms]
    is_matrix = len(shape) == 2
    return dict(
        densities=None if score is None else densities,  # as mergekit: a density without a sparsifier does nothing
        score=score, lambda_=resolve("lambda", (params,), name, 0.0),
        normalize=resolve("normalize", (params,), name, 0.0), rescale=resolve("rescale", (params,), name, 0.0),
        gamma=None if all(g is None for g in gammas) else gammas,
        epsilon=None if all(e is None for e in epsilons) else epsilons,
        input_sq_norms=sq_norms if score == "wanda" else None,
        group=group if is_matrix and _takes(score, "group") else None,
        pattern=pattern if is_matrix and _takes(score, "pattern") else None)


def _merge_one(recipe, method, name, base_tensor, finetuned, weights, norms, options, generator):
    params = recipe.parameters or {}
    if method.on == "weights":
        return merge_tensor_detailed(recipe.merge_method, base_tensor, finetuned, weights,
                                     normalize=resolve("normalize", (params,), name, 0.0))
    transposed = any(n is not None and n.transposed for n in norms)
    if transposed:  # score Conv1D weights in (out, in) orientation
        base_tensor = base_tensor.T
        finetuned = [f.T for f in finetuned]
    result = merge_tensor_detailed(recipe.merge_method, base_tensor, finetuned, weights, **options,
                                   generator=generator)
    if transposed:
        from dataclasses import replace

        result = replace(result, tensor=result.tensor.T.contiguous())
    return result


def _merges_in_blocks(recipe, method, base, inputs, name, tensor_dtype, norms, options) -> bool:
    """Whether tensor ``name`` is merged block by block (:mod:`.chunked`): a large one, on deltas,
    of a sparsifier and dtypes it covers, not transposed for its scores."""
    shape = base.shape(name)
    if not selects_lean(math.prod(shape)) or method.on != "deltas" or len(shape) == 0:
        return False
    if any(n is not None and n.transposed for n in norms):
        return False
    dtypes = [tensor_dtype, TORCH_DTYPES.get(base.dtype(name), torch.int64)]
    for entry in recipe.models:
        source = inputs[entry.model]
        if isinstance(source, Checkpoint) and source.has(name):
            dtypes.append(TORCH_DTYPES.get(source.dtype(name), torch.int64))
    return chunked_merge_applies(recipe.merge_method, dtypes, options["score"], options["rescale"],
                                 options["input_sq_norms"], tuple(shape))


def _merge_blocks(recipe, base, inputs, name, tensor_dtype, weights, options, writer, out_dtype):
    """Merge tensor ``name`` block by block, straight into ``writer``; the result record and the
    fraction of entries changed."""
    base_rows = base.rows(name)
    readers, base_tensor = [], None
    for entry in recipe.models:
        source = inputs[entry.model]
        if isinstance(source, LoraAdapter) and source.adapts(name):  # the LoRA product is made whole
            if base_tensor is None:
                base_tensor = base.tensor(name).to(tensor_dtype)
            readers.append(TensorRows(_finetuned_tensor(source, name, base_tensor)))
        elif isinstance(source, Checkpoint) and source.has(name):
            readers.append(source.rows(name))
        else:
            readers.append(base_rows)
    del base_tensor
    result, blocks = merge_rows(recipe.merge_method, base_rows, readers, weights, dtype=tensor_dtype, **options)
    changed = 0

    def pieces():
        nonlocal changed
        for merged, base_block in blocks:
            changed += int((merged != base_block).sum())
            yield merged.to(out_dtype) if out_dtype else merged

    writer.add_chunks(name, pieces())
    numel = math.prod(base.shape(name))
    return result, (torch.tensor(changed, dtype=torch.float32) / numel).item()


def _takes(score: str | None, option: str) -> bool:
    from .sparsify import SPARSIFIERS

    return score is not None and option in SPARSIFIERS[score].options


def _write_config_and_tokenizer(recipe: MergeRecipe, base_dir: Path, out: Path, dtype) -> None:
    config = json.loads((base_dir / "config.json").read_text())
    if dtype is not None:
        name = {v: k for k, v in DTYPES.items()}[dtype]
        config["dtype"] = name
        config.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if (base_dir / "generation_config.json").is_file():
        shutil.copy2(base_dir / "generation_config.json", out / "generation_config.json")
    source = recipe.tokenizer_source
    tok_dir = base_dir if source in (None, "base") else local_model_dir(source)
    copied = 0
    for file in TOKENIZER_FILES:
        if (tok_dir / file).is_file():
            shutil.copy2(tok_dir / file, out / file)
            copied += 1
    if source not in (None, "base") and not copied:
        raise InputError(f"tokenizer_source {source} holds no tokenizer files")


def merge_card(recipe: MergeRecipe, recipe_text: str | None, record: dict) -> str:
    text = recipe_text or yaml.safe_dump(recipe.model_dump(mode="json", exclude_none=True), sort_keys=False)
    models = "\n".join(f"- `{m.model}`" for m in recipe.models)
    return "\n".join([
        "---", "library_name: transformers", "tags: [wandamerge, merge]", "---", "",
        f"# Merge: {recipe.merge_method} (score: {record['score'] or 'none'})", "",
        f"Base model: `{recipe.base_model or recipe.models[0].model}`", "", "Merged models:", models, "",
        "## Recipe", "", "```yaml", text.strip(), "```", "",
        "Input hashes, per-tensor details, timings and peak memory are in `wandamerge.json`.", "",
    ])
