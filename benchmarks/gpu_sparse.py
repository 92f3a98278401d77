"""2:4 sparsity on the GPU: semi-structured sparse kernels against dense, and Wanda against SparseGPT.

Three parts (``--parts``, comma-separated; default all):

* ``matmul`` (a): ``F.linear(x, W)`` with W dense against W as a PyTorch
  semi-structured sparse tensor (cuSPARSELt and CUTLASS backends), at the
  linear shapes of 7B-class models — (out, in) = 4096x4096 (q/k/v/o),
  11008x4096 (gate/up), 4096x11008 (down) — for 1 to 8192 tokens, float16
  and bfloat16. CUDA events, warm-up, median of repeats; each call reads a
  different copy of the weight (at least 256 MiB of copies) so weights come
  from HBM as in a model, not from L2. Token counts that are not a multiple
  of 8 are padded to one by PyTorch inside the sparse matmul (part of the
  measured time). The sparse result is compared with the dense one.
* ``model`` (b): a randomly initialised LlamaForCausalLM with 7B widths
  (hidden 4096, intermediate 11008, 32 heads, vocab 32000) and few layers,
  float16, pruned 2:4 by magnitude with ``wandamerge.prune``: prefill (batch
  1, 2048 tokens, logits of the last token only) and greedy decode with a KV
  cache (128 new tokens after a 128-token prompt, manual loop), with the
  pruned weights in dense kernels against ``wandamerge.export.to_semi_structured``.
* ``prune`` (c): wall and decision time of Wanda and SparseGPT (2:4 and 50%)
  through ``wandamerge.prune(..., device="cuda")`` on a random model with 7B
  layer shapes, float16, kept on the CPU between blocks as the CLI does.

``--quick`` shrinks every part (fewer token counts, float16 only, 2 layers,
16 calibration windows, 2:4 only). ``--dry-run`` runs the same code on the CPU
with tiny shapes (float32; the semi-structured path is skipped with the
reason, since it is CUDA-only), timed with ``time.perf_counter``, and writes
to ``--out`` or a fresh temporary directory, never to ``benchmarks/results``.

    python benchmarks/gpu_sparse.py                    # everything, ~2-3 min on an H100
    python benchmarks/gpu_sparse.py --quick --parts matmul,model
    python benchmarks/gpu_sparse.py --dry-run          # CPU smoke test, tiny shapes

Writes ``gpu_sparse.json`` and ``gpu_sparse.md`` (device, torch/CUDA versions,
date, command) into ``benchmarks/results/`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PARTS = {"matmul": "matmul", "a": "matmul", "model": "model", "b": "model", "prune": "prune", "c": "prune"}
L2_FLUSH_BYTES = 256 * 2**20  # weight copies cycled per timed call on a GPU (H100/H200 L2: 50 MiB)


@dataclass
class Settings:
    mode: str  # "full", "quick" or "dry-run"
    device: str
    # (a) matmul
    shapes: list[tuple[int, int, str]]
    tokens: list[int]
    dtypes: list[str]
    warmup: int = 10
    repeats: int = 15
    # (b) model and (c) prune: Llama widths
    hidden: int = 4096
    intermediate: int = 11008
    heads: int = 32
    kv_heads: int = 32
    vocab: int = 32000
    model_layers: int = 4
    model_dtype: str = "float16"
    prefill_tokens: int = 2048
    decode_prompt: int = 128
    decode_tokens: int = 128
    model_repeats: int = 5
    prune_layers: int = 3
    nsamples: int = 64
    seqlen: int = 2048
    prune_targets: list[dict] = field(default_factory=lambda: [
        {"pattern": "2:4"}, {"sparsity": 0.5}])
    prune_methods: list[str] = field(default_factory=lambda: ["wanda", "sparsegpt"])


def make_settings(args) -> Settings:
    shapes_7b = [(4096, 4096, "q/k/v/o proj"), (11008, 4096, "gate/up proj"), (4096, 11008, "down proj")]
    if args.dry_run:
        return Settings(mode="dry-run", device="cpu",
                        shapes=[(128, 128, "q/k/v/o proj (tiny)"), (256, 128, "gate/up proj (tiny)"),
                                (128, 256, "down proj (tiny)")],
                        tokens=[1, 16], dtypes=["float32"], warmup=1, repeats=3,
                        hidden=64, intermediate=128, heads=4, kv_heads=4, vocab=256, model_layers=2,
                        model_dtype="float32", prefill_tokens=32, decode_prompt=8, decode_tokens=8,
                        model_repeats=2, prune_layers=2, nsamples=4, seqlen=32, prune_targets=[{"pattern": "2:4"}])
    if args.quick:
        return Settings(mode="quick", device="cuda", shapes=shapes_7b, tokens=[1, 128, 2048],
                        dtypes=["float16"], warmup=5, repeats=10, model_layers=2, model_repeats=3,
                        prune_layers=2, nsamples=16, seqlen=2048, prune_targets=[{"pattern": "2:4"}])
    return Settings(mode="full", device="cuda", shapes=shapes_7b, tokens=[1, 16, 128, 512, 2048, 8192],
                    dtypes=["float16", "bfloat16"])


DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# ----------------------------------------------------------------------------- timing


class Timer:
    """Median milliseconds per call: CUDA events on a GPU, ``time.perf_counter`` on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.clock = "CUDA events" if self.cuda else "time.perf_counter"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def __call__(self, fn, *, warmup: int, repeats: int, inner: int = 1) -> dict:
        for _ in range(warmup):
            fn()
        self.sync()
        samples = []
        for _ in range(repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(inner):
                    fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) / inner)
            else:
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                samples.append((time.perf_counter() - t0) * 1e3 / inner)
        return {"median_ms": statistics.median(samples), "min_ms": min(samples), "repeats": repeats,
                "inner": inner}


def _group(statuses: dict[str, str]) -> dict[str, list[str]]:
    """status -> the backends that have it."""
    grouped: dict[str, list[str]] = {}
    for backend, status in statuses.items():
        grouped.setdefault(status, []).append(backend)
    return grouped


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _nbytes(t: torch.Tensor) -> int:
    if isinstance(t, torch.sparse.SparseSemiStructuredTensor):
        return sum(getattr(t, a).numel() * getattr(t, a).element_size()
                   for a in ("packed", "meta", "packed_t", "meta_t", "compressed_swizzled_bitmask")
                   if getattr(t, a) is not None)
    return t.numel() * t.element_size()


def available_backends(device: torch.device) -> list[str]:
    from wandamerge.export import _has_cusparselt

    if device.type != "cuda":
        return ["cusparselt", "cutlass"]  # both are tried, and both report why they are skipped
    return (["cusparselt"] if _has_cusparselt() else []) + ["cutlass"]


# ----------------------------------------------------------------------------- (a) matmul


def prune_2of4(w: torch.Tensor) -> torch.Tensor:
    from wandamerge.core.scores import magnitude_score
    from wandamerge.core.selection import keep_n_of_m

    return w.masked_fill(~keep_n_of_m(magnitude_score(w), 2, 4), 0)


def bench_matmul(s: Settings, timer: Timer, log) -> list[dict]:
    from wandamerge.export import conversion_problem, semi_structured_weight

    device = timer.device
    torch.manual_seed(0)
    rows = []
    backends = available_backends(device)
    for dtype_name in s.dtypes:
        dtype = DTYPES[dtype_name]
        for out_f, in_f, label in s.shapes:
            w = prune_2of4(torch.randn(out_f, in_f, device=device) / math.sqrt(in_f)).to(dtype)
            copies = max(1, math.ceil(L2_FLUSH_BYTES / _nbytes(w))) if timer.cuda else 1
            dense_ws = [w] + [w.clone() for _ in range(copies - 1)]
            sparse: dict[str, list | str] = {}
            for backend in backends:
                problem = conversion_problem(w, backend=backend)
                if problem:
                    sparse[backend] = f"skipped: {problem}"
                    continue
                try:
                    first = semi_structured_weight(w, backend=backend)
                    n = max(1, math.ceil(L2_FLUSH_BYTES / _nbytes(first))) if timer.cuda else 1
                    sparse[backend] = [first] + [first.clone() for _ in range(n - 1)]
                except Exception as exc:  # a backend the GPU or build lacks: recorded, not fatal
                    sparse[backend] = f"failed: {_first_line(exc)}"
            for status, names in _group({b: v for b, v in sparse.items() if isinstance(v, str)}).items():
                log(f"  {dtype_name} {out_f}x{in_f}: {', '.join(names)} {status}")
            for tokens in s.tokens:
                x = torch.randn(tokens, in_f, device=device).to(dtype)
                inner = 20 if tokens <= 128 else 5
                if not timer.cuda:
                    inner = 2
                row = {"dtype": dtype_name, "out": out_f, "in": in_f, "label": label, "tokens": tokens,
                       "dense_weight_bytes": _nbytes(w), "dense_copies": len(dense_ws)}
                cycle = itertools.cycle(dense_ws)
                with torch.inference_mode():
                    row["dense"] = timer(lambda: F.linear(x, next(cycle)), warmup=s.warmup, repeats=s.repeats,
                                         inner=inner)
                    y_dense = F.linear(x, w).float()
                    for backend, ws in sparse.items():
                        if isinstance(ws, str):
                            row[backend] = {"status": ws}
                            continue
                        try:
                            y = F.linear(x, ws[0]).float()
                            cyc = itertools.cycle(ws)
                            t = timer(lambda: F.linear(x, next(cyc)), warmup=s.warmup, repeats=s.repeats,
                                      inner=inner)
                            diff = (y - y_dense).abs().max().item()
                            scale = y_dense.abs().max().item() or 1.0
                            t.update(status="ok", speedup=row["dense"]["median_ms"] / t["median_ms"],
                                     max_abs_diff=diff, rel_diff=diff / scale, weight_bytes=_nbytes(ws[0]),
                                     copies=len(ws), agrees=diff / scale < (2e-2 if dtype == torch.bfloat16 else 5e-3))
                            row[backend] = t
                        except Exception as exc:
                            row[backend] = {"status": f"failed: {_first_line(exc)}"}
                rows.append(row)
                parts = [f"dense {row['dense']['median_ms']:.4f} ms"]
                for backend in sparse:
                    r = row[backend]
                    if r.get("status") == "ok":
                        parts.append(f"{backend} {r['median_ms']:.4f} ms (x{r['speedup']:.2f}, "
                                     f"rel diff {r['rel_diff']:.1e})")
                    elif not isinstance(sparse[backend], str):  # failed at this token count
                        parts.append(f"{backend} {r['status']}")
                log(f"  {dtype_name} {out_f}x{in_f} tokens={tokens}: " + "; ".join(parts))
            del dense_ws, sparse
            if timer.cuda:
                torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- (b) model prefill / decode


def build_llama(s: Settings, layers: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=s.hidden, intermediate_size=s.intermediate, num_attention_heads=s.heads,
                         num_key_value_heads=s.kv_heads, num_hidden_layers=layers, vocab_size=s.vocab,
                         max_position_embeddings=max(4096, s.seqlen, s.prefill_tokens + 1),
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.to(device).eval()


def _decode(model, prompt: torch.Tensor, new_tokens: int, timer: Timer) -> tuple[float, list[int]]:
    """Greedy decoding with a KV cache; milliseconds for the ``new_tokens`` steps (prefill excluded)."""
    # transformers >= 5.x names the KV cache `cache`; earlier versions `past_key_values`
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def cache_of(out):
        cache = getattr(out, "cache", None)
        return cache if cache is not None else out.past_key_values

    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    past = cache_of(out)
    token = out.logits[:, -1:].argmax(-1)
    produced = []
    timer.sync()
    if timer.cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, use_cache=True, **{cache_kw: past})
        past = cache_of(out)
        token = out.logits[:, -1:].argmax(-1)
        produced.append(token)
    if timer.cuda:
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end)
    else:
        ms = (time.perf_counter() - t0) * 1e3
    return ms, torch.cat(produced, dim=1)[0].tolist()


def time_model(model, s: Settings, timer: Timer, prompt_long, prompt_short, check_ids) -> dict:
    with torch.inference_mode():
        prefill = timer(lambda: model(input_ids=prompt_long, use_cache=False, logits_to_keep=1),
                        warmup=2 if timer.cuda else 1, repeats=s.model_repeats)
        _decode(model, prompt_short, min(8, s.decode_tokens), timer)  # warm-up
        runs = [_decode(model, prompt_short, s.decode_tokens, timer) for _ in range(max(1, s.model_repeats - 2))]
        decode_ms = statistics.median(ms for ms, _ in runs)
        logits = model(input_ids=check_ids, use_cache=False).logits.float()
    weights = sum(_nbytes(lin.module.weight) for block in _blocks(model) for lin in _linears(block))
    return {"prefill_ms": prefill["median_ms"], "prefill_tokens_per_s": s.prefill_tokens / prefill["median_ms"] * 1e3,
            "decode_ms_per_token": decode_ms / s.decode_tokens,
            "decode_tokens_per_s": s.decode_tokens / decode_ms * 1e3,
            "decoder_linear_weight_bytes": weights, "_logits": logits, "_tokens": runs[0][1]}


def _blocks(model):
    from wandamerge.models import decoder_blocks
    return decoder_blocks(model)


def _linears(block):
    from wandamerge.models import block_linears
    return block_linears(block)


def bench_model(s: Settings, timer: Timer, log) -> dict:
    import wandamerge
    from wandamerge.export import to_semi_structured

    device, dtype = timer.device, DTYPES[s.model_dtype]
    model = build_llama(s, s.model_layers, device, dtype)
    report = wandamerge.prune(model, None, method="magnitude", pattern="2:4", device=device, progress=False)
    gen = torch.Generator().manual_seed(1)
    prompt_long = torch.randint(3, s.vocab, (1, s.prefill_tokens), generator=gen).to(device)
    prompt_short = torch.randint(3, s.vocab, (1, s.decode_prompt), generator=gen).to(device)
    check_ids = torch.randint(3, s.vocab, (1, min(128, s.prefill_tokens)), generator=gen).to(device)
    result = {"config": {"hidden": s.hidden, "intermediate": s.intermediate, "heads": s.heads,
                         "kv_heads": s.kv_heads, "layers": s.model_layers, "vocab": s.vocab,
                         "dtype": s.model_dtype, "init": "random (transformers default, std 0.02)",
                         "pruning": "magnitude 2:4 (wandamerge.prune)", "sparsity": report.overall_sparsity,
                         "prefill_tokens": s.prefill_tokens, "decode_prompt": s.decode_prompt,
                         "decode_tokens": s.decode_tokens, "repeats": s.model_repeats}}
    dense = time_model(model, s, timer, prompt_long, prompt_short, check_ids)
    ref_logits, ref_tokens = dense.pop("_logits"), dense.pop("_tokens")
    result["dense"] = dense
    log(f"  dense kernels (2:4 weights): prefill {dense['prefill_ms']:.2f} ms, "
        f"decode {dense['decode_ms_per_token']:.3f} ms/token")

    originals = {id(lin.module): (lin.module, lin.module.weight) for b in _blocks(model) for lin in _linears(b)}
    for backend in available_backends(device):
        try:
            converted = to_semi_structured(model, strict=True, backend=backend)
        except ValueError as exc:
            result[backend] = {"status": f"skipped: {exc}"}
            same = [b for b in available_backends(device) if b != backend and b in result
                    and result[b].get("status") == result[backend]["status"]]
            log(f"  {backend}: skipped ({'same reason as ' + same[0] if same else exc})")
            continue
        try:
            sparse = time_model(model, s, timer, prompt_long, prompt_short, check_ids)
            logits, tokens = sparse.pop("_logits"), sparse.pop("_tokens")
            diff = (logits - ref_logits).abs().max().item()
            sparse.update(status="ok", converted=len(converted), logits_max_abs_diff=diff,
                          logits_rel_diff=diff / (ref_logits.abs().max().item() or 1.0),
                          greedy_tokens_agree=sum(a == b for a, b in zip(tokens, ref_tokens)) / len(ref_tokens),
                          prefill_speedup=dense["prefill_ms"] / sparse["prefill_ms"],
                          decode_speedup=dense["decode_ms_per_token"] / sparse["decode_ms_per_token"])
            result[backend] = sparse
            log(f"  {backend}: prefill {sparse['prefill_ms']:.2f} ms (x{sparse['prefill_speedup']:.2f}), "
                f"decode {sparse['decode_ms_per_token']:.3f} ms/token (x{sparse['decode_speedup']:.2f}), "
                f"logits diff {diff:.3g}")
        except Exception as exc:
            result[backend] = {"status": f"failed: {_first_line(exc)}"}
            log(f"  {backend}: failed: {_first_line(exc)}")
        finally:
            for module, weight in originals.values():  # back to the dense 2:4 weights for the next backend
                module.weight = weight
    del model, originals
    if timer.cuda:
        torch.cuda.empty_cache()
    return result


# ----------------------------------------------------------------------------- (c) prune time


def bench_prune(s: Settings, timer: Timer, log) -> list[dict]:
    import wandamerge

    device = timer.device
    dtype = torch.float16 if timer.cuda else torch.float32
    model = build_llama(s, s.prune_layers, device, dtype).to("cpu")  # CPU-resident, one block at a time on device
    base = {k: v.clone() for k, v in model.state_dict().items()}
    windows = torch.randint(3, s.vocab, (s.nsamples, s.seqlen), generator=torch.Generator().manual_seed(2))
    rows = []
    for target in s.prune_targets:
        for method in s.prune_methods:
            model.load_state_dict(base)
            if timer.cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            timer.sync()
            t0 = time.perf_counter()
            report = wandamerge.prune(model, windows, method=method, device=device, progress=False, **target)
            timer.sync()
            wall = time.perf_counter() - t0
            row = {"method": method, "target": target.get("pattern") or f"{target['sparsity']:.0%}",
                   "wall_s": wall, "decision_s": report.seconds["decision"], "forward_s": report.seconds["forward"],
                   "catch_s": report.seconds["catch"], "within_block": report.within_block,
                   "sparsity": report.overall_sparsity,
                   "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if timer.cuda else None}
            rows.append(row)
            log(f"  {method} {row['target']}: wall {wall:.2f} s, decision {row['decision_s']:.2f} s")
    del model, base
    return rows


# ----------------------------------------------------------------------------- output


def metadata(s: Settings, timer: Timer, argv: list[str]) -> dict:
    from wandamerge.io.record import portable as shown
    from wandamerge.io.record import provenance, versions

    if timer.cuda:
        props = torch.cuda.get_device_properties(timer.device)
        device = f"{props.name} (sm{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
    else:
        device = "CPU"  # its processor, cores and memory: the machine
    try:
        cusparselt = torch.backends.cusparselt.version()
    except Exception:
        cusparselt = None
    return {**shown(provenance([__file__, *argv])), "mode": s.mode, "device": device, "versions": versions(),
            "cuda": torch.version.cuda, "cusparselt": cusparselt, "clock": timer.clock, "settings": asdict(s)}


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f}" if n >= 10 * 2**20 else f"{n / 2**20:.3f}"


def _ms(r: dict | None, key: str = "median_ms") -> str:
    if not r:
        return "-"
    if r.get("status", "ok") != "ok":
        return "skipped" if r["status"].startswith("skipped") else "failed"
    return f"{r[key]:.4f}" if r[key] < 1 else f"{r[key]:.3f}"


def markdown(meta: dict, results: dict) -> str:
    lines = [f"# 2:4 semi-structured sparsity on the GPU ({meta['date']})", "",
             f"Device: {meta['device']}; torch {meta['versions']['torch']}, CUDA {meta['cuda']}, cuSPARSELt "
             f"{meta['cusparselt']}, transformers {meta['versions']['transformers']}; commit {meta['commit']}; "
             f"mode {meta['mode']}; timed with {meta['clock']}. Machine: {meta['machine']}.", "",
             f"`{meta['command']}`", ""]
    notes = []
    if "matmul" in results:
        rows = results["matmul"]
        backends = [b for b in ("cusparselt", "cutlass") if any(b in r for r in rows)]
        lines += ["## (a) `F.linear(x, W)`: dense against semi-structured W", "",
                  "Median ms per call; W pruned 2:4 by magnitude; each call reads another copy of W "
                  "(>= 256 MiB of copies on a GPU) so W comes from HBM, not L2. Token counts are padded to a "
                  "multiple of 8 by PyTorch inside the sparse matmul (included in the time). diff: max |y_sparse - "
                  "y_dense| / max |y_dense|.", ""]
        head = "| dtype | W (out x in) | tokens | dense ms |"
        sep = "|---|---|---:|---:|"
        for b in backends:
            head += f" {b} ms | {b} speed-up | {b} diff |"
            sep += "---:|---:|---:|"
        lines += [head, sep]
        for r in rows:
            line = f"| {r['dtype']} | {r['out']}x{r['in']} ({r['label']}) | {r['tokens']} | {_ms(r['dense'])} |"
            for b in backends:
                x = r.get(b)
                if x and x.get("status") == "ok":
                    line += f" {_ms(x)} | {x['speedup']:.2f}x | {x['rel_diff']:.1e} |"
                else:
                    line += f" {_ms(x)} | - | - |"
                    if x:
                        notes.append((b, x["status"]))
            lines.append(line)
        lines.append("")
    if "model" in results:
        m = results["model"]
        c = m["config"]
        lines += ["## (b) Prefill and decode of a 2:4-pruned random Llama", "",
                  f"{c['layers']} layers, hidden {c['hidden']}, intermediate {c['intermediate']}, {c['heads']} heads, "
                  f"vocab {c['vocab']}, {c['dtype']}, {c['pruning']} (sparsity {c['sparsity']:.3f}). Prefill: batch 1, "
                  f"{c['prefill_tokens']} tokens, logits of the last token, median of {c['repeats']}. Decode: greedy, "
                  f"KV cache, {c['decode_tokens']} new tokens after a {c['decode_prompt']}-token prompt (eager, no "
                  "CUDA graphs). Dense = the same 2:4 weights in dense kernels; embeddings and the LM head stay "
                  "dense in both.", "",
                  "| kernels | prefill ms | prefill tok/s | decode ms/token | decode tok/s | decoder linear weights MiB | "
                  "speed-up prefill / decode | logits max abs diff | greedy tokens agree |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name in ("dense", "cusparselt", "cutlass"):
            r = m.get(name)
            if r is None:
                continue
            if r.get("status", "ok") != "ok":
                lines.append(f"| {name} | {_ms(r)} | | | | | | | |")
                notes.append((name, r["status"]))
                continue
            extra = (f"{r['prefill_speedup']:.2f}x / {r['decode_speedup']:.2f}x | {r['logits_max_abs_diff']:.3g} | "
                     f"{r['greedy_tokens_agree']:.0%}") if name != "dense" else "- | - | -"
            lines.append(f"| {name} | {r['prefill_ms']:.2f} | {r['prefill_tokens_per_s']:.0f} | "
                         f"{r['decode_ms_per_token']:.3f} | {r['decode_tokens_per_s']:.1f} | "
                         f"{_mib(r['decoder_linear_weight_bytes'])} | {extra} |")
        lines.append("")
    if "prune" in results:
        rows = results["prune"]
        s = meta["settings"]
        lines += ["## (c) Pruning time: Wanda against SparseGPT", "",
                  f"Random Llama ({s['prune_layers']} blocks, hidden {s['hidden']}, intermediate "
                  f"{s['intermediate']}), {s['nsamples']} random windows of {s['seqlen']} tokens, "
                  f"`wandamerge.prune(..., device={meta['settings']['device']!r})`, model on the CPU between blocks.",
                  "", "| method | target | wall s | decision s | forward s | catch s | order | peak GPU GiB | sparsity |",
                  "|---|---|---:|---:|---:|---:|---|---:|---:|"]
        for r in rows:
            peak = f"{r['peak_gpu_bytes'] / 2**30:.1f}" if r["peak_gpu_bytes"] else "-"
            lines.append(f"| {r['method']} | {r['target']} | {r['wall_s']:.2f} | {r['decision_s']:.2f} | "
                         f"{r['forward_s']:.2f} | {r['catch_s']:.2f} | {r['within_block']} | {peak} | "
                         f"{r['sparsity']:.3f} |")
        lines.append("")
    if notes:
        lines += ["Skipped or failed:", ""]
        for status, keys in _group({f"{b}@{st}": st for b, st in dict.fromkeys(notes)}).items():
            lines.append(f"* {', '.join(dict.fromkeys(k.split('@')[0] for k in keys))}: {status}")
        lines.append("")
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="matmul,model,prune",
                        help="comma-separated: matmul (a), model (b), prune (c) [default: all]")
    parser.add_argument("--quick", action="store_true", help="smaller sweep (under a minute on an H100)")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes on the CPU; the semi-structured path is skipped with its reason")
    parser.add_argument("--out", default=None,
                        help="output directory [default: benchmarks/results; a temp dir for --dry-run]")
    args = parser.parse_args(argv)
    try:
        args.parts = list(dict.fromkeys(PARTS[p.strip()] for p in args.parts.split(",") if p.strip()))
    except KeyError as exc:
        parser.error(f"unknown part {exc.args[0]!r}; choose from matmul, model, prune (or a, b, c)")
    if args.dry_run:
        if args.out is None:
            args.out = tempfile.mkdtemp(prefix="gpu_sparse_dry_")
        elif Path(args.out).resolve() == RESULTS.resolve():
            parser.error("--dry-run never writes to benchmarks/results; pass another --out")
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device; this benchmark needs a GPU (use --dry-run for a CPU smoke test)")
        args.out = args.out or str(RESULTS)
    return args


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    s = make_settings(args)
    timer = Timer(torch.device(s.device))

    def log(msg: str) -> None:
        print(msg, flush=True)

    t_start = time.perf_counter()
    results: dict = {}
    benches = {"matmul": bench_matmul, "model": bench_model, "prune": bench_prune}
    threads = torch.get_num_threads()
    if args.dry_run:
        torch.set_num_threads(1)  # a smoke test: light on a shared CPU, and no thread contention stalls
    try:
        for part in args.parts:
            log(f"== {part} ({s.mode}, {s.device})")
            t0 = time.perf_counter()
            results[part] = benches[part](s, timer, log)
            log(f"   {part}: {time.perf_counter() - t0:.1f} s")
    finally:
        torch.set_num_threads(threads)
    meta = metadata(s, timer, argv)
    meta["total_s"] = time.perf_counter() - t_start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"meta": meta, "results": results}
    (out / "gpu_sparse.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "gpu_sparse.md").write_text(markdown(meta, results))
    log(f"wrote {out / 'gpu_sparse.json'} and {out / 'gpu_sparse.md'} ({meta['total_s']:.1f} s)")
    return record


if __name__ == "__main__":
    main()
