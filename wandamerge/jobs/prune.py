"""The prune job: load, calibrate, prune, evaluate and save a model, with its run record.

:class:`PruneConfig` declares every setting once: the command line builds its
options from it, a run recipe's ``prune:`` section is one, and the Python API
(:func:`prune_to_directory`) fills one from its keyword arguments.

What goes is the config's ``structure``: ``none`` zeroes weights inside the
linear maps (``method``, ``sparsity`` or ``pattern``), ``experts`` drops whole
experts of a mixture-of-experts model (``experts_kept`` in every layer, chosen
by ``expert_score``), ``width`` removes whole attention heads and MLP channels
(``sparsity`` of the decoder blocks' parameters, chosen by ``width_score``),
``depth`` whole decoder blocks (``sparsity`` of the blocks' parameters, chosen
by ``depth_score``); the last three make the saved model smaller.
"""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Union

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..calibration import calibration_windows, evaluation_windows, window_length
from ..core.allocation import OWL_LAMBDA, OWL_M
from ..core.selection import GROUPS, check_sparsity, parse_pattern
from ..errors import ConfigError, did_you_mean
from ..evaluation.perplexity import perplexity
from ..io.dtypes import DTYPE_NAMES
from ..io.record import StageClock, peak_memory, versions
from ..io.safetensors import DEFAULT_SHARD_SIZE, ShardWriter
from ..io.staging import check_output_dir, staged_output
from ..loaders import StreamedModel, is_dispatched, should_stream
from ..models import (decoder_blocks, has_fused_experts, load_model, load_tokenizer, parse_device_map, resolve_model,
                      saved_tensors)
from ..pruning import (DEPTH_SCORES, EXPERT_SCORES, PRUNE_METHODS, SPARSITY_PROFILES, WIDTH_SCORES, DepthPruneReport,
                       ExpertPruneReport, PruneReport, PruneTarget, SparsityMap, WidthPruneReport, check_permutable,
                       depth_setup, get_prune_method, get_sparsity_profile, prunable_moe_layers, prune, prune_depth,
                       prune_experts, prune_width, width_setup)
from ..pruning.allocation import Allocation, profile_options
from ..recipe import expand_home, validated
from ..runner import WITHIN_BLOCK_ORDERS

log = logging.getLogger(__name__)

# what a prune removes: weights inside the linear maps, whole experts, or whole heads and MLP channels
STRUCTURES = ("none", "experts", "width", "depth")
WEIGHT_SETTINGS = ("method", "sparsity", "pattern", "group", "variant", "update", "permute", "within_block",
                   "calibrate_all_experts", "sparsity_profile", "sparsity_map", *profile_options())
EXPERT_SETTINGS = ("experts_kept", "expert_score")
WIDTH_SETTINGS = ("width_score", "bias_compensation")  # and sparsity, shared with structure none
DEPTH_SETTINGS = ("depth_score",)  # and sparsity
OWN_SETTINGS = {"experts": EXPERT_SETTINGS, "width": WIDTH_SETTINGS, "depth": DEPTH_SETTINGS}
SIZED_BY_SPARSITY = ("width", "depth")  # structures whose sparsity is the share of block parameters removed


class PruneConfig(BaseModel):
    """Every setting of a prune (the command line's options, a run recipe's ``prune:`` section)."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="A model directory, a .gguf file, a hub id, or 'smollm2'.")
    method: str = Field("wanda", description=f"The importance score / solver: {', '.join(sorted(PRUNE_METHODS))}.")
    sparsity: float = Field(PruneTarget.sparsity, description="Unstructured ratio in [0, 1); --structure width "
                                                              "or depth: the share of the decoder blocks' "
                                                              "parameters removed.")
    pattern: Union[str, None] = Field(PruneTarget.pattern, description="N:M semi-structured pattern, e.g. 2:4 (overrides "
                                                        "--sparsity).")
    group: Union[Literal[GROUPS], None] = Field(None, description="Comparison group for unstructured masks "
                                                                  "[default: the method's: tensor for ria, as "
                                                                  "its official code; row for the others].")
    variant: bool = Field(PruneTarget.variant, description="Wanda's cumulative-score alpha search (per-row, unstructured).")
    update: bool = Field(PruneTarget.update, description="Least-squares update of the kept weights "
                                                         "(ria/wanda/magnitude/dsnot).")
    permute: bool = Field(PruneTarget.permute, description="With --pattern N:M: reorder the input channels of "
                                                           "the MLP's down map and the attention's output map "
                                                           "(and the rows making them) so that the mask keeps "
                                                           "more score (RIA's channel permutation; any scored "
                                                           "method). The saved model computes the same.")
    sparsity_profile: str = Field("uniform", description=f"How the unstructured sparsity is shared among the "
                                                         f"decoder blocks: {', '.join(sorted(SPARSITY_PROFILES))} "
                                                         f"(owl: blocks with more Wanda-score outliers pruned "
                                                         f"less, the mean over the blocks at --sparsity).")
    owl_m: float = Field(OWL_M, description="--sparsity-profile owl: a block's outliers are its Wanda scores above "
                                            "M times their mean (the OWL paper's M).")
    owl_lambda: float = Field(OWL_LAMBDA, description="--sparsity-profile owl: block sparsities lie within "
                                                      "2 x lambda of each other (the OWL paper's lambda).")
    sparsity_map: Union[str, dict, None] = Field(None, description="A YAML or JSON file of module-name pattern "
                                                                   "(glob, or re:REGEX) -> sparsity; the first "
                                                                   "pattern that matches a linear map wins, "
                                                                   "unmatched maps get --sparsity.")
    calibrate_all_experts: bool = Field(False, description="MoE models: every expert's statistics from every "
                                                           "calibration token, not only the tokens routed to it "
                                                           "(the block's outputs still follow the router).")
    structure: Literal[STRUCTURES] = Field("none", description="What goes: none (weights inside the linear maps, "
                                                               "by --method), experts (whole experts of a "
                                                               "mixture-of-experts model: --experts-kept) or "
                                                               "width (whole attention heads and MLP channels: "
                                                               "--sparsity of the decoder blocks' parameters) "
                                                               "or depth (whole decoder blocks: --sparsity of "
                                                               "their parameters).")
    experts_kept: Union[int, None] = Field(None, description="--structure experts: experts kept in every MoE "
                                                             "layer (at least the experts per token).")
    expert_score: str = Field("reap", description=f"--structure experts: what experts are kept by: "
                                                  f"{', '.join(sorted(EXPERT_SCORES))}.")
    width_score: str = Field("flap", description=f"--structure width: what heads and channels are kept by: "
                                                 f"{', '.join(sorted(WIDTH_SCORES))}.")
    bias_compensation: Union[bool, None] = Field(None, description="--structure width: FLAP's baseline bias on "
                                                                   "o_proj and down_proj (the removed channels' "
                                                                   "mean contribution) [default: on where the "
                                                                   "model's config can carry the bias].")
    depth_score: str = Field("bi", description=f"--structure depth: what blocks are removed by: "
                                               f"{', '.join(sorted(DEPTH_SCORES))} (bi: ShortGPT's Block "
                                               f"Influence, the blocks that change their input least go; "
                                               f"ppl: the blocks whose skipping raises the calibration "
                                               f"perplexity least go, one forward per block).")
    calib: str = Field("wiki", description="wiki | wikitext2 | c4 | FILE.txt | FILE.jsonl | TOKENS.pt | "
                                           "TOKENS.npy")
    nsamples: int = Field(128, description="Calibration windows.")
    seqlen: Union[int, None] = Field(None, description="Tokens per window [default: model context, at most "
                                                       "2048].")
    seed: int = Field(0, description="Seed of the calibration windows.")
    device: str = Field("cpu", description="cpu, cuda or cuda:N (one block at a time sits on it).")
    dtype: Literal[DTYPE_NAMES] = Field("float32", description="Weight dtype.")
    batch_size: Union[int, None] = Field(None, description="Calibration windows per forward [default: chosen "
                                                           "with the order].")
    within_block: Literal[WITHIN_BLOCK_ORDERS] = Field(
        "auto", description="sequential: one forward per block over all windows, later maps see pruned earlier "
                            "ones (fastest); parallel: the official two-pass order, in batches; auto: sequential "
                            "when its activations fit in what the block's inputs hold, else parallel in the "
                            "largest batch that fits.")
    eval_ppl: Union[str, None] = Field(None, description="Measure dense and pruned perplexity on this text "
                                                         "(e.g. wiki: held-out articles).")
    eval_windows: Union[int, None] = Field(64, description="Evaluation windows (0 = all).")
    max_shard_size: str = Field(DEFAULT_SHARD_SIZE, description="Largest safetensors shard written.")
    low_memory: Union[bool, None] = Field(None, description="Read, prune and write one decoder block at a time "
                                                            "from the safetensors shards [default: on when the "
                                                            "model would take more than half the available RAM].")
    device_map: Union[str, dict, None] = Field(None, description="Let accelerate place the model: auto, balanced, "
                                                                 "sequential, a device, or a JSON object / .json "
                                                                 "file of module -> device (cpu, disk, N).")
    offload_folder: Union[str, None] = Field(None, description="Where accelerate keeps weights a device map puts "
                                                               "on disk.")

    _home = field_validator("model", "calib", "eval_ppl", "offload_folder", "sparsity_map", mode="before")(expand_home)

    @field_validator("sparsity_map")
    @classmethod
    def checked_sparsity_map(cls, value):
        """A file is read now (before any model loads); the mapping keeps its order (the first match wins)."""
        if value is None:
            return None
        return SparsityMap.of(read_sparsity_map(value) if isinstance(value, str) else value).as_dict()

    @field_validator("sparsity")
    @classmethod
    def valid_sparsity(cls, value):
        return check_sparsity(value)

    @field_validator("nsamples", "seqlen", "batch_size", "experts_kept")
    @classmethod
    def positive(cls, value, info):
        if value is not None and value <= 0:
            raise ValueError(f"{info.field_name.replace('_', ' ')} must be positive, got {value}")
        return value

    @field_validator("eval_windows")
    @classmethod
    def not_negative(cls, value):
        if value is not None and value < 0:
            raise ValueError(f"eval windows must be >= 0 (0 = all), got {value}")
        return value

    @field_validator("device_map", mode="before")
    @classmethod
    def device_map_text(cls, value):
        return parse_device_map(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def consistent(self):
        if self.method not in PRUNE_METHODS:
            raise ValueError(f"unknown prune method {self.method!r}{did_you_mean(self.method, PRUNE_METHODS)}")
        if self.expert_score not in EXPERT_SCORES:
            raise ValueError(f"unknown expert score {self.expert_score!r}"
                             f"{did_you_mean(self.expert_score, EXPERT_SCORES)}")
        if self.width_score not in WIDTH_SCORES:
            raise ValueError(f"unknown width score {self.width_score!r}{did_you_mean(self.width_score, WIDTH_SCORES)}")
        if self.depth_score not in DEPTH_SCORES:
            raise ValueError(f"unknown depth score {self.depth_score!r}{did_you_mean(self.depth_score, DEPTH_SCORES)}")
        if self.pattern is not None:
            parse_pattern(self.pattern)
        self.target()
        self._check_structure()
        self.allocation()
        return self

    def _check_structure(self) -> None:
        """Settings given for another structure are refused, not silently ignored."""
        given = self.model_fields_set
        for structure, settings in OWN_SETTINGS.items():
            if self.structure != structure and (extra := [name for name in settings if name in given]):
                raise ValueError(f"only structure '{structure}' uses {' and '.join(extra)}")
        if self.structure == "none":
            return
        if self.structure == "experts" and self.experts_kept is None:
            raise ValueError("structure 'experts' needs experts_kept: the experts kept in every MoE layer")
        if self.structure in SIZED_BY_SPARSITY and "sparsity" not in given:
            raise ValueError(f"structure '{self.structure}' needs sparsity: the share of the decoder blocks' "
                             f"parameters removed")
        what = {"experts": "drops whole experts", "width": "removes whole heads and channels",
                "depth": "removes whole decoder blocks"}[self.structure]
        own = ("sparsity",) if self.structure in SIZED_BY_SPARSITY else ()
        if clash := [name for name in WEIGHT_SETTINGS if name in given and name not in own]:
            raise ValueError(f"structure '{self.structure}' {what} and prunes no weights; leave out "
                             f"{', '.join(clash)}")
        if self.low_memory or self.device_map is not None:
            raise ValueError(f"structure '{self.structure}' rebuilds the model's modules in memory; leave out "
                             "low_memory and device_map")

    def target(self) -> PruneTarget:
        """What to prune and in what shape (checked)."""
        method = get_prune_method(self.method)
        target = PruneTarget(sparsity=self.sparsity, pattern=self.pattern, group=self.group or method.group,
                             variant=self.variant, update=self.update, permute=self.permute)
        method.check(target)
        return target

    def allocation(self) -> Allocation:
        """How the sparsity is shared among blocks and maps (checked; a profile's option given for another
        profile is refused)."""
        given = {name: getattr(self, name) for name in profile_options() if name in self.model_fields_set}
        return Allocation.of(self.target(), self.sparsity_profile, given, self.sparsity_map)

    def profile_values(self) -> dict[str, float]:
        """The options of the chosen profile, as this config sets them."""
        return {name: getattr(self, name) for name in get_sparsity_profile(self.sparsity_profile).options}

    @classmethod
    def of(cls, source: str = "prune", **settings) -> "PruneConfig":
        """A config from keyword settings; a bad one is a one-line :class:`~wandamerge.errors.ConfigError`."""
        return validated(cls, settings, source, error=ConfigError)


def prune_to_directory(model: str, out: str | Path | None, *, overwrite: bool = False, progress: bool = True,
                       **settings) -> dict:
    """Prune a model and (if ``out``) save it with ``wandamerge.json`` and a model card.

    ``settings`` are :class:`PruneConfig`'s fields (``method``, ``sparsity``,
    ``pattern``, ``calib``, ``low_memory``, ``device_map``, ...). Returns the
    run record (also written to ``wandamerge.json``).
    """
    return run_prune(PruneConfig.of(model=model, **settings), out, overwrite=overwrite, progress=progress)


def run_prune(config: PruneConfig, out: str | Path | None, *, overwrite: bool = False,
              progress: bool = True) -> dict:
    """Run a checked :class:`PruneConfig`: see :func:`prune_to_directory`."""
    clock = StageClock()
    source = resolve_model(config.model)
    out_path = check_output_dir(out, [source], overwrite) if out else None
    low_memory = _low_memory(config, source, out_path)
    streamed = None
    with clock.stage("load"):
        if low_memory:
            streamed = StreamedModel(source, dtype=config.dtype)
            lm, tokenizer = streamed.model, load_tokenizer(source)
        else:
            lm, tokenizer = load_model(source, dtype=config.dtype, device_map=config.device_map,
                                       offload_folder=config.offload_folder)
    seqlen = window_length(lm.config, config.seqlen)
    step = STEPS[config.structure]
    step.check(config, lm)
    calibration = None
    if step.calibrates(config):
        with clock.stage("calibration_data"):
            calibration = calibration_windows(config.calib, tokenizer, config.nsamples, seqlen, seed=config.seed,
                                              vocab_size=lm.config.vocab_size)
    evaluation = _Evaluation(config, lm, tokenizer, seqlen, clock, progress, calibrated=calibration is not None)
    evaluation.measure("dense")
    with staged_output(out_path, overwrite) if out_path else nullcontext() as staged:
        writer = _start_streamed_output(streamed, staged, config) if streamed else None
        with clock.stage("prune"):
            report = step.run(config, lm, calibration, progress,
                              streamed.loader(config.device, after_block=writer.add_block) if streamed else None)
        evaluation.measure("pruned")
        record = _record(config, source, report, evaluation, low_memory)
        if staged is None:
            return _finish(record, clock, config.device)
        with clock.stage("save"):
            _save(lm, tokenizer, staged, config, streamed, writer)
        _write_record(staged, _finish(record, clock, config.device))  # once, with the save's time
    return record


def read_sparsity_map(path: str) -> dict:
    """The mapping in a YAML or JSON file (JSON is read as YAML), keys in the file's order."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"sparsity map {path} is not a file")
    try:
        mapping = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"sparsity map {path} is not valid YAML or JSON: {' '.join(str(exc).split())}") from None
    if not isinstance(mapping, dict):
        raise ConfigError(f"sparsity map {path} must hold a mapping of module-name pattern -> sparsity")
    return mapping


def _method_calibrates(config: PruneConfig) -> bool:
    return bool(get_prune_method(config.method).needs_for(config.target()) | config.allocation().needs)


def _check_weights(config: PruneConfig, lm) -> None:
    if config.permute:
        check_permutable(decoder_blocks(lm)[0], lm.config, config.target().nm[1])


def _prune_weights(config: PruneConfig, lm, calibration, progress: bool, loader) -> PruneReport:
    return prune(lm, calibration, method=config.method, sparsity=config.sparsity, pattern=config.pattern,
                 group=config.group, variant=config.variant, update=config.update, permute=config.permute,
                 device=config.device,
                 batch_size=config.batch_size, within_block=config.within_block, progress=progress, loader=loader,
                 all_experts=config.calibrate_all_experts, sparsity_profile=config.sparsity_profile,
                 sparsity_map=config.sparsity_map, **config.profile_values())


def _weights_record(config: PruneConfig, report: PruneReport) -> tuple[dict, dict]:
    settings = {"sparsity": report.target["sparsity"] if not config.pattern else None,
                "group": report.target["group"],
                "within_block": report.within_block, "batch_size": report.batch_size,
                **{name: None for name in profile_options() if name not in config.profile_values()}}
    results = {"sparsity": {"overall": report.overall_sparsity, "per_block": report.block_sparsity,
                            "per_block_target": report.block_targets, "allocation": report.allocation,
                            "per_matrix": report.matrix_sparsity}}
    if config.sparsity_map is not None:
        results["sparsity"]["per_matrix_target"] = report.matrix_targets
    if report.expert_sparsity:  # MoE: each expert's calibration tokens and sparsity
        results["per_expert"] = {name: {"tokens": report.expert_tokens.get(name), "sparsity": sparsity}
                                 for name, sparsity in report.expert_sparsity.items()}
    return settings, results


def _check_experts(config: PruneConfig, lm) -> None:
    prunable_moe_layers(lm, config.experts_kept)


def _drop_experts(config: PruneConfig, lm, calibration, progress: bool, loader) -> ExpertPruneReport:
    """Experts are dropped from the model in memory (``loader`` is None: this structure does not stream)."""
    return prune_experts(lm, calibration, keep=config.experts_kept, score=config.expert_score, device=config.device,
                         batch_size=config.batch_size, progress=progress)


def _experts_record(config: PruneConfig, report: ExpertPruneReport) -> tuple[dict, dict]:
    experts = {"score": report.score, "kept": report.keep, "of": report.num_experts, "per_layer": report.layers}
    return {}, {"experts": experts, "parameters": report.parameters}


def _check_width(config: PruneConfig, lm) -> None:
    width_setup(lm, config.sparsity, config.bias_compensation)


def _cut_width(config: PruneConfig, lm, calibration, progress: bool, loader) -> WidthPruneReport:
    """Heads and channels are cut from the model in memory (``loader`` is None: this structure does not stream)."""
    return prune_width(lm, calibration, sparsity=config.sparsity, score=config.width_score,
                       bias_compensation=config.bias_compensation, device=config.device,
                       batch_size=config.batch_size, progress=progress)


def _width_record(config: PruneConfig, report: WidthPruneReport) -> tuple[dict, dict]:
    width = {"score": report.score, "sparsity": report.sparsity, "achieved": report.achieved,
             "fraction": report.fraction, "heads": report.heads, "channels": report.channels,
             "bias_compensation": report.bias_compensation, "notes": report.notes, "per_layer": report.layers}
    return {}, {"width": width, "parameters": report.parameters, "bytes": report.bytes}


def _check_depth(config: PruneConfig, lm) -> None:
    depth_setup(lm, config.sparsity)


def _cut_depth(config: PruneConfig, lm, calibration, progress: bool, loader) -> DepthPruneReport:
    """Blocks are removed from the model in memory (``loader`` is None: this structure does not stream)."""
    return prune_depth(lm, calibration, sparsity=config.sparsity, score=config.depth_score, device=config.device,
                       batch_size=config.batch_size, progress=progress)


def _depth_record(config: PruneConfig, report: DepthPruneReport) -> tuple[dict, dict]:
    depth = {"score": report.score, "sparsity": report.sparsity, "achieved": report.achieved,
             "blocks": report.blocks, "removed": report.removed, "scores": report.scores, "notes": report.notes}
    return {}, {"depth": depth, "parameters": report.parameters, "bytes": report.bytes}


def _weights_card(record: dict) -> dict[str, str]:
    s = record["settings"]
    shape = s["pattern"] or f"{s['sparsity']:.0%} unstructured (per {s['group']})"
    if s.get("permute"):
        shape += " with input channels reordered first (RIA's channel permutation, folded into the weights)"
    if s.get("sparsity_map") is not None:
        shape += ", per-module sparsities from a sparsity map"
    elif get_sparsity_profile(s.get("sparsity_profile", "uniform")).uneven:
        shape += f", shared among the blocks by the {s['sparsity_profile']} profile"
    return {"tag": "sparse", "title": f"pruned with {s['method']}",
            "what": f"{shape}, decoder linear maps only (embeddings and LM head kept dense)",
            "result": f"Overall sparsity of the decoder linear weights: {record['sparsity']['overall']:.4f}.",
            "details": "per-matrix sparsity"}


def _experts_card(record: dict) -> dict[str, str]:
    experts, parameters = record["experts"], record["parameters"]
    return {"tag": "moe", "title": f"with {experts['kept']} of {experts['of']} experts",
            "what": f"the {experts['kept']} experts of every mixture-of-experts layer with the highest "
                    f"{experts['score']} score kept, the others dropped",
            "result": f"Parameters: {parameters['before']:,} before, {parameters['after']:,} after.",
            "details": "per-layer list of kept experts, with every expert's score and calibration tokens,"}


def _width_card(record: dict) -> dict[str, str]:
    width, parameters = record["width"], record["parameters"]
    heads, channels = width["heads"], width["channels"]
    return {"tag": "structured", "title": f"width-pruned to {heads['after']} heads and {channels['after']} channels",
            "what": f"{width['achieved']:.1%} of the decoder blocks' parameters removed as whole attention heads "
                    f"({heads['before']} -> {heads['after']}, key/value heads {heads['key_value_before']} -> "
                    f"{heads['key_value_after']}) and MLP channels ({channels['before']} -> {channels['after']}), "
                    f"the same in every layer, chosen by the {width['score']} score",
            "result": f"Parameters: {parameters['before']:,} before, {parameters['after']:,} after.",
            "details": "per-layer list of kept heads and channels, with group scores and sizes,"}


def _depth_card(record: dict) -> dict[str, str]:
    depth, parameters = record["depth"], record["parameters"]
    blocks = depth["blocks"]
    return {"tag": "structured", "title": f"depth-pruned to {blocks['after']} decoder blocks",
            "what": f"{depth['achieved']:.1%} of the decoder blocks' parameters removed as whole blocks "
                    f"({blocks['before']} -> {blocks['after']}; removed: {depth['removed']}), chosen by the "
                    f"{depth['score']} score",
            "result": f"Parameters: {parameters['before']:,} before, {parameters['after']:,} after.",
            "details": "every block's score,"}


@dataclass(frozen=True)
class Step:
    """What the job does for one ``structure``: whether it needs calibration windows, whether it may prune
    block by block from the shards (low-memory mode), its checks of the loaded model (before any calibration
    data or evaluation), the pruning itself (config, model, windows, progress, block loader -> report), and
    its settings and results in the run record."""

    calibrates: Callable[[PruneConfig], bool]
    streams: bool
    check: Callable[[PruneConfig, object], None]
    run: Callable
    record: Callable[[PruneConfig, object], "tuple[dict, dict]"]
    unused: tuple[str, ...]  # settings of the other structures, left out of the record
    card: Callable[[dict], "dict[str, str]"]  # the model card's words for a run record (:func:`model_card`)


STEPS: dict[str, Step] = {  # one per structure (:data:`STRUCTURES`)
    "none": Step(_method_calibrates, True, _check_weights, _prune_weights, _weights_record,
                 (*EXPERT_SETTINGS, *WIDTH_SETTINGS, *DEPTH_SETTINGS), _weights_card),
    "experts": Step(lambda config: True, False, _check_experts, _drop_experts, _experts_record,
                    (*WEIGHT_SETTINGS, *WIDTH_SETTINGS, *DEPTH_SETTINGS), _experts_card),
    "width": Step(lambda config: True, False, _check_width, _cut_width, _width_record,
                  (*[name for name in WEIGHT_SETTINGS if name != "sparsity"], *EXPERT_SETTINGS, *DEPTH_SETTINGS),
                  _width_card),
    "depth": Step(lambda config: True, False, _check_depth, _cut_depth, _depth_record,
                  (*[name for name in WEIGHT_SETTINGS if name != "sparsity"], *EXPERT_SETTINGS, *WIDTH_SETTINGS),
                  _depth_card),
}


def _finish(record: dict, clock: StageClock, device: str) -> dict:
    record["seconds"] = dict(clock.seconds)
    record["peak_memory"] = peak_memory(device)
    return record


class _Evaluation:
    """Dense and pruned perplexity on held-out windows, when the config asks for it."""

    def __init__(self, config: PruneConfig, lm, tokenizer, seqlen: int, clock: StageClock, progress: bool,
                 calibrated: bool):
        self.lm, self.device, self.clock, self.progress = lm, config.device, clock, progress
        self.ppl: dict[str, float] = {}
        self.notes: list[str] = []
        self.windows = None
        if not config.eval_ppl:
            return
        if calibrated and Path(config.eval_ppl).exists() and Path(config.eval_ppl).resolve() == \
                Path(config.calib).resolve():
            self.notes.append(f"perplexity is measured on the calibration source {config.calib}: "
                              "expect an optimistic number")
            log.warning(self.notes[-1])
        with clock.stage("evaluation_data"):
            self.windows = evaluation_windows(config.eval_ppl, tokenizer, seqlen,
                                              max_windows=config.eval_windows or None,
                                              vocab_size=lm.config.vocab_size)

    def measure(self, which: str) -> None:
        if self.windows is None:
            return
        with self.clock.stage(f"eval_{which}"):
            self.ppl[which] = perplexity(self.lm, self.windows, device=self.device, progress=self.progress)
        log.info("%s perplexity %.3f", which, self.ppl[which])


def _low_memory(config: PruneConfig, source: str, out: Path | None) -> bool:
    """Whether to prune block by block from disk: as asked, or (``None``) when the model would not fit well."""
    if config.low_memory:
        if out is None:
            raise ConfigError("low-memory pruning writes each block as soon as it is pruned: give an output "
                              "directory")
        if config.eval_ppl:
            raise ConfigError("perplexity needs the whole model in memory, which low-memory mode avoids; "
                              "measure the output with `wandamerge ppl` instead")
        if config.device_map is not None:
            raise ConfigError("choose either low-memory mode or a device map, not both")
        return True
    return (config.low_memory is None and STEPS[config.structure].streams and out is not None and not config.eval_ppl
            and config.device_map is None and should_stream(source, config.dtype))


class _StreamedOutput(ShardWriter):
    """The shards of a model pruned block by block: the tensors outside the blocks first, then each block
    as the pass hands it over (:meth:`add_block` is the loader's ``after_block``)."""

    def add_block(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            self.add(name, tensor)


def _start_streamed_output(streamed: StreamedModel, staged: Path, config: PruneConfig) -> _StreamedOutput:
    copied, plan = streamed.output_plan()
    writer = _StreamedOutput(staged, plan, config.max_shard_size)
    for name in copied:
        writer.add(name, streamed.read(name))
    return writer


def _save(lm, tokenizer, staged: Path, config: PruneConfig, streamed: StreamedModel | None,
          writer: ShardWriter | None) -> None:
    """The model's files: the streamed shards closed and the config written beside them, or
    ``save_pretrained`` of the model in memory (a mixture of experts: its tensors written one at a time in
    the same layout, :func:`~wandamerge.models.saved_tensors`)."""
    if streamed is None and has_fused_experts(lm) and not is_dispatched(lm):
        tensors = saved_tensors(lm)
        writer = ShardWriter(staged, [(n, tuple(t.shape), t.dtype) for n, t in tensors], config.max_shard_size)
        for name, tensor in tensors:
            writer.add(name, tensor)
    if writer is not None:
        writer.close()
        lm.config.dtype = config.dtype
        lm.config.architectures = [type(lm).__name__]
        lm.config.save_pretrained(staged)
        if lm.can_generate():
            lm.generation_config.save_pretrained(staged)
    else:
        lm.save_pretrained(staged, max_shard_size=config.max_shard_size, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(staged)


def _write_record(out: Path, record: dict) -> None:
    (out / "wandamerge.json").write_text(json.dumps(record, indent=2))
    (out / "README.md").write_text(model_card(record))


def _record(config: PruneConfig, source: str, report: PruneReport | ExpertPruneReport | WidthPruneReport,
            evaluation: _Evaluation, low_memory: bool) -> dict:
    step = STEPS[config.structure]
    settings = config.model_dump(exclude={"model", "max_shard_size", *step.unused})
    own_settings, results = step.record(config, report)
    settings.update({**own_settings, "nsamples": report.nsamples, "seqlen": report.seqlen,
                     "eval_windows": None if evaluation.windows is None else int(evaluation.windows.shape[0]),
                     "low_memory": low_memory})
    return {
        "job": "prune", "model": config.model, "model_source": source, "settings": settings,
        "versions": versions(), "perplexity": evaluation.ppl, **results,
        "prune_seconds": report.seconds, "notes": evaluation.notes,
    }


def model_card(record: dict) -> str:
    s = record["settings"]
    card = STEPS[s.get("structure", "none")].card(record)
    lines = [
        "---", "library_name: transformers", f"tags: [wandamerge, pruned, {card['tag']}]", "---", "",
        f"# {Path(str(record['model'])).name} {card['title']}", "",
        f"Pruned by wandamerge {record['versions']['wandamerge']} from `{record['model']}`: {card['what']}.", "",
        "| setting | value |", "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in s.items()]
    lines += ["", card["result"], ""]
    if record["perplexity"]:
        lines += ["| perplexity | value |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in record["perplexity"].items()]
        lines.append("")
    lines += [f"Every setting, version, time and {card['details']} is in `wandamerge.json`.", ""]
    return "\n".join(lines)


def summary(record: dict) -> dict:
    """The few numbers the command line prints of a prune's run record."""
    if "experts" in record:
        head = {"experts_kept": record["experts"]["kept"], "experts_of": record["experts"]["of"],
                "parameters": record["parameters"]}
    elif "width" in record:
        width = record["width"]
        head = {"heads": [width["heads"]["before"], width["heads"]["after"]],
                "channels": [width["channels"]["before"], width["channels"]["after"]],
                "removed": round(width["achieved"], 4), "parameters": record["parameters"]}
    elif "depth" in record:
        depth = record["depth"]
        head = {"blocks": [depth["blocks"]["before"], depth["blocks"]["after"]], "removed_blocks": depth["removed"],
                "removed": round(depth["achieved"], 4), "parameters": record["parameters"]}
    else:
        head = {"overall_sparsity": round(record["sparsity"]["overall"], 4)}
    return {**head, "perplexity": {k: round(v, 3) for k, v in record["perplexity"].items()},
            "seconds": record["seconds"]}
