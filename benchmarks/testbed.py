"""The merging testbed: SmolLM2-135M fine-tuned on eight real labelled tasks (built once, cached by content).

    python benchmarks/testbed.py            # build what is missing, evaluate, write the tasks table
    python benchmarks/testbed.py --only pos # one fine-tune

Tasks come from ``wandamerge.evaluation.tasks`` (real data that installs from PyPI,
each with a fixed, seeded train / validation / test split; see that module for
sources). Each fine-tune learns to put its answer after the prompt: the loss is
the cross-entropy of the right choice's tokens only. Six are full fine-tunes of
every decoder linear map, norm and bias (embeddings and the tied head frozen),
two are PEFT LoRA adapters on the attention and MLP maps, and one more full
fine-tune learns all eight tasks at once (one example of each task per batch):
the usual upper bound of a merge. Learning rates are high on purpose (1e-4 for
full fine-tunes): the deltas must be large enough to interfere when they are
added up, or no merge method has anything to fix. Settings were fixed before
any result was seen and are not searched.

Everything is cached by content under ``<cache>/bench/testbed8/``: a fine-tune's
key is a digest of its settings, seed, training data, the base model's weights
and ``RECIPE_VERSION``; an evaluation's key adds the split's examples. An item's
correctness (0/1, per example) is what is stored, so intervals can be
bootstrapped later without running anything again.

Output: the tasks table (source, split sizes, base and fine-tune accuracy on
validation and test with 95% bootstrap intervals, gain) in
``benchmarks/results/testbed.{json,md}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

RECIPE_VERSION = 2  # bump when the training code changes what a fine-tune is
FULL = {"kind": "full", "batch": 8, "lr": 1e-4}
LORA = {"kind": "lora", "batch": 8, "lr": 1e-3, "r": 16, "alpha": 32}
# task -> how it is fine-tuned (steps at batch 8); budgets sized for 2 CPU cores. Every task first ran 80 steps
# (newsgroups 30: 40 posts); one whose validation gain was under VALIDATION_TARGET ran again with twice the steps.
FINETUNES = {
    "newsgroups": {**FULL, "steps": 30},  # 40 training posts of ~90 tokens: six epochs
    "tweets": {**FULL, "steps": 80},
    "analogy_semantic": {**FULL, "steps": 160},  # 80 steps: validation gain 0.130 (0.860 -> 0.990)
    "analogy_syntactic": {**LORA, "steps": 80},
    # judged on validation only: 80 steps gained 0.098 (0.520 -> 0.618), 160 steps 0.118 (-> 0.637), under
    # VALIDATION_TARGET (MIN_GAIN plus about a test interval's half-width, so that the test gain clears MIN_GAIN)
    "cities": {**FULL, "steps": 320},
    "syllables": {**FULL, "steps": 80},
    "pos": {**FULL, "steps": 80},
    "word_sentiment": {**LORA, "steps": 160},  # 80 steps: validation gain 0.090 (0.880 -> 0.970)
}
TASKS = list(FINETUNES)
# one example of each task per batch of 8, run as micro-batches of similar lengths (the same gradient as one
# padded batch, without padding seven short prompts to a newsgroup post's length)
MULTITASK = {**FULL, "steps": 160, "tasks": TASKS, "micro_batches": True}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MIN_GAIN = 0.10  # a fine-tune must beat the base on its own task's test split by this much accuracy
VALIDATION_TARGET = 0.15  # a fine-tune under this validation gain trains twice as long (decided on validation)
SEED = 0


def default_root() -> Path:
    from wandamerge.io.resolve import default_cache_dir

    return default_cache_dir() / "bench" / "testbed8"


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def base_digest(base: Path) -> str:
    from wandamerge.io.record import input_digests

    return digest(input_digests(base))


def finetune_key(name: str, settings: dict, base_key: str) -> str:
    from wandamerge.evaluation.tasks import read_examples

    tasks = settings.get("tasks", [name])
    data = {t: digest(read_examples(t, "train")) for t in tasks}
    return f"{name}-{digest({'settings': settings, 'seed': SEED, 'data': data, 'base': base_key, 'v': RECIPE_VERSION})}"


def task_calibration(root: Path, task: str) -> Path:
    """The task's training prompts with their right answers, one ``{"text": ...}`` per line: the data of
    task activations (what the fine-tune saw). Named by content, written once."""
    from wandamerge.evaluation.tasks import read_examples

    texts = [ex["prompt"] + ex["choices"][ex["label"]] for ex in read_examples(task, "train")]
    path = root / "calibration" / f"{task}-{digest(texts)}.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
        tmp.replace(path)
    return path


# ----------------------------------------------------------------------------- training


def encode(tokenizer, example: dict) -> tuple[list[int], list[int]]:
    prompt = tokenizer(example["prompt"], add_special_tokens=False)["input_ids"]
    answer = tokenizer(example["choices"][example["label"]], add_special_tokens=False)["input_ids"]
    return prompt[-128:], answer


def collate(rows: list[tuple[list[int], list[int]]], pad: int):
    """(input_ids, attention_mask, labels), right padded, the answer tokens only in labels."""
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for r, (p, a) in enumerate(rows):
        seq = p + a
        ids[r, :len(seq)] = torch.tensor(seq)
        mask[r, :len(seq)] = 1
        labels[r, len(p):len(seq)] = torch.tensor(a)
    return ids, mask, labels


def by_length(rows: list[tuple[list[int], list[int]]]) -> list[list[tuple[list[int], list[int]]]]:
    """Rows sorted by length, cut where a row is over twice as long as the first of its micro-batch."""
    groups: list[list] = []
    for row in sorted(rows, key=lambda r: len(r[0]) + len(r[1])):
        if not groups or len(row[0]) + len(row[1]) > 2 * (len(groups[-1][0][0]) + len(groups[-1][0][1])):
            groups.append([])
        groups[-1].append(row)
    return groups


def batch_loss_backward(model, rows: list[tuple[list[int], list[int]]], pad: int, micro: bool) -> float:
    """Backpropagate the mean cross-entropy over all answer tokens of ``rows`` (as one padded batch, or
    summed over micro-batches and divided by the total count, which gives the same gradient)."""
    if not micro:
        ids, mask, labels = collate(rows, pad)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        return loss.item()
    total = sum(len(a) for _, a in rows)
    value = 0.0
    for group in by_length(rows):
        ids, mask, labels = collate(group, pad)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                                 ignore_index=-100, reduction="sum") / total
        loss.backward()
        value += loss.item()
    return value


def example_stream(pools: list[list[dict]], seed: int):
    """Endless examples: each pool in a seeded shuffled order, epoch after epoch; pools taken in turn."""
    rng = random.Random(seed)
    orders = [[] for _ in pools]
    while True:
        for k, pool in enumerate(pools):
            if not orders[k]:
                orders[k] = list(range(len(pool)))
                rng.shuffle(orders[k])
            yield pool[orders[k].pop()]


def prepare_model(base: Path, settings: dict):
    from wandamerge.models import load_model

    model, tokenizer = load_model(str(base))
    model.train()
    if settings["kind"] == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=settings["r"], lora_alpha=settings["alpha"], lora_dropout=0.0,
                                                 target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    else:
        for name, param in model.named_parameters():
            param.requires_grad = "embed_tokens" not in name and "lm_head" not in name
    return model, tokenizer


def finetune(name: str, base: Path, out: Path, settings: dict) -> dict:
    """Train, then save atomically (a model directory, or an adapter) with ``testbed.json`` beside it."""
    from wandamerge.evaluation.tasks import read_examples

    torch.manual_seed(SEED)
    model, tokenizer = prepare_model(base, settings)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings["lr"], weight_decay=0.0)
    steps = settings["steps"]
    schedule = torch.optim.lr_scheduler.LambdaLR(  # 10 warm-up steps, then cosine to zero
        optimizer, lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    pools = [read_examples(t, "train") for t in settings.get("tasks", [name])]
    stream = example_stream(pools, SEED)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        rows = [encode(tokenizer, next(stream)) for _ in range(settings["batch"])]
        loss = batch_loss_backward(model, rows, pad, settings.get("micro_batches", False))
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(loss, 4))
        if step % 10 == 0 or step == steps - 1:
            print(f"   {name} step {step + 1}/{steps} loss {loss:.4f}", flush=True)
    seconds = time.perf_counter() - t0
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.eval().save_pretrained(tmp)
    if settings["kind"] != "lora":
        tokenizer.save_pretrained(tmp)
    record = {"task": name, "settings": settings, "seed": SEED, "train_examples": sum(map(len, pools)),
              "train_seconds": round(seconds, 1), "threads": torch.get_num_threads(), "loss": losses}
    (tmp / "testbed.json").write_text(json.dumps(record, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return record


def build_finetunes(base: Path, root: Path, names: list[str]) -> dict[str, Path]:
    """Every fine-tune's directory, trained when its content key is not in the cache."""
    base_key = base_digest(base)
    paths = {}
    for name in names:
        settings = MULTITASK if name == "multitask" else FINETUNES[name]
        out = root / "finetunes" / finetune_key(name, settings, base_key)
        if not (out / "testbed.json").is_file():
            print(f"== fine-tune {name} ({settings['kind']}, {settings['steps']} steps at lr {settings['lr']:g})",
                  flush=True)
            finetune(name, base, out, settings)
        paths[name] = out
        link = root / name  # a stable name for recipes (recipes/run-merge-testbed.yaml): the current build
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(out.relative_to(root))
    return paths


# ----------------------------------------------------------------------------- per-item records


REFERENCE_RECORDS = HERE / "results" / "testbed_records.json"  # the reference models' records, kept in git


class Records:
    """Per-example correctness of a model on a task's split, cached by (model key, split content).

    With ``kept`` (a JSON file), every record is also written there and read from there when the
    cache has lost it: the reference models' records travel with the repository, so a new machine
    re-measures none of them (the fine-tunes themselves are rebuilt, by content key)."""

    def __init__(self, root: Path, kept: Path | None = None):
        self.root = root / "records"
        self.root.mkdir(parents=True, exist_ok=True)
        self.kept = kept
        self.kept_records = json.loads(kept.read_text()) if kept is not None and kept.is_file() else {}

    def path(self, model_key: str, task: str, split: str) -> Path:
        from wandamerge.evaluation.tasks import read_examples

        return self.root / model_key / f"{task}-{split}-{digest(read_examples(task, split))}.json"

    def kept_key(self, model_key: str, task: str, split: str) -> str:
        return str(self.path(model_key, task, split).relative_to(self.root))

    def get(self, model_key: str, task: str, split: str) -> list[int] | None:
        path = self.path(model_key, task, split)
        if path.is_file():
            return json.loads(path.read_text())
        return self.kept_records.get(self.kept_key(model_key, task, split))

    def keep(self, model_key: str, task: str, split: str, correct: list[int]) -> None:
        if self.kept is None:
            return
        self.kept_records[self.kept_key(model_key, task, split)] = correct
        tmp = self.kept.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.kept_records, sort_keys=True))
        tmp.replace(self.kept)

    def measure(self, model_key: str, task: str, split: str, load) -> list[int]:
        """Cached correctness; ``load()`` gives (model, tokenizer) only when something must be run."""
        from wandamerge.evaluation.choices import choice_correct
        from wandamerge.evaluation.tasks import read_examples

        cached = self.get(model_key, task, split)
        if cached is not None:
            if self.kept is not None and self.kept_key(model_key, task, split) not in self.kept_records:
                self.keep(model_key, task, split, cached)  # measured before this file kept records
            return cached
        model, tokenizer = load()
        correct = [int(c) for c in choice_correct(model, tokenizer, read_examples(task, split), batch_size=32)]
        path = self.path(model_key, task, split)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(correct))
        self.keep(model_key, task, split, correct)
        return correct


class Loaded:
    """Load a model once, on first use."""

    def __init__(self, spec: Path, base: Path):
        self.spec, self.base, self.value = spec, base, None

    def __call__(self):
        if self.value is None:
            from wandamerge.jobs.evaluate import load_for_eval

            self.value = load_for_eval(str(self.spec), base=str(self.base))
        return self.value


def reference_records(base: Path, paths: dict[str, Path], records: Records) -> dict:
    """{model: {task: {split: [0/1, ...]}}} for the base and multitask (every task), each fine-tune (its own)."""
    out: dict = {}
    wanted = [("base", base, TASKS)] + [(t, paths[t], [t]) for t in TASKS if t in paths]
    if "multitask" in paths:
        wanted.append(("multitask", paths["multitask"], TASKS))
    for name, spec, tasks in wanted:
        load = Loaded(spec, base)
        key = "base-" + base_digest(base) if name == "base" else spec.name
        for task in tasks:
            for split in ("validation", "test"):
                out.setdefault(name, {}).setdefault(task, {})[split] = records.measure(key, task, split, load)
        print(f"   {name}: " + " ".join(f"{t}={sum(v['test']) / len(v['test']):.3f}"
                                        for t, v in out[name].items()), flush=True)
    return out


# ----------------------------------------------------------------------------- the tasks table


def task_rows(refs: dict, finetunes: dict[str, dict]) -> dict:
    from testbed_stats import accuracy, task_interval
    from wandamerge.evaluation.tasks import OFFLINE_TASKS, read_examples

    rows = {}
    for task in TASKS:
        base, tuned = refs["base"][task], refs[task][task]
        rows[task] = {
            "source": OFFLINE_TASKS[task].source, "kind": FINETUNES[task]["kind"], "settings": FINETUNES[task],
            "sizes": {s: len(read_examples(task, s)) for s in ("train", "validation", "test")},
            "train_seconds": finetunes[task]["train_seconds"],
            "final_loss": round(float(sum(finetunes[task]["loss"][-10:]) / 10), 4),
            **{f"{who}_{split}": accuracy(v[split]) for who, v in (("base", base), ("finetune", tuned))
               for split in ("validation", "test")},
            "base_test_ci": task_interval(base["test"]), "finetune_test_ci": task_interval(tuned["test"]),
        }
        rows[task]["gain"] = rows[task]["finetune_test"] - rows[task]["base_test"]
        rows[task]["gain_ok"] = rows[task]["gain"] >= MIN_GAIN
        if "multitask" in refs:
            rows[task]["multitask_test"] = accuracy(refs["multitask"][task]["test"])
    return rows


def markdown(summary: dict) -> str:
    meta = summary["meta"]
    lines = [f"# Merging testbed: SmolLM2-135M and eight fine-tunes ({meta['date']}, commit {meta['commit']})", "",
             f"- command: `{meta['command']}`", f"- machine: {meta['machine']}",
             "- accuracy: zero-shot multiple choice by log-likelihood (`wandamerge.evaluation.choices`, equal to "
             "lm-eval's acc); [low, high] = 95% bootstrap interval over the test items",
             f"- every fine-tune: seed {SEED}, batch 8, 10 warm-up steps then cosine; full fine-tunes train every "
             "decoder map, norm and bias (embeddings and tied head frozen); LoRA r=16, alpha 32 on q/k/v/o/gate/up/down",
             f"- multi-task fine-tune: {MULTITASK['steps']} steps x 8 (one example of each task per batch), lr "
             f"{MULTITASK['lr']:g}, {summary.get('multitask_seconds', '?')} s. It saw "
             f"{MULTITASK['steps'] * MULTITASK['batch'] // len(TASKS)} examples of each task, where each single-task "
             "fine-tune saw 240-2560 (steps x 8): a budget-matched multi-task model, not yet the usual upper bound", "",
             "| task | source | train / val / test | kind | steps | lr | train s | base val | base test | "
             "fine-tune val | fine-tune test | gain (test) | multi-task test |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for task, r in summary["tasks"].items():
        s, z = r["settings"], r["sizes"]
        source = r["source"].replace("|", "\\|")  # a table cell
        lines.append(
            f"| {task} | {source} | {z['train']} / {z['validation']} / {z['test']} | {r['kind']} | {s['steps']} | "
            f"{s['lr']:g} | {r['train_seconds']:.0f} | {r['base_validation']:.3f} | {r['base_test']:.3f} "
            f"[{r['base_test_ci'][0]:.3f}, {r['base_test_ci'][1]:.3f}] | {r['finetune_validation']:.3f} | "
            f"{r['finetune_test']:.3f} [{r['finetune_test_ci'][0]:.3f}, {r['finetune_test_ci'][1]:.3f}] | "
            f"{r['gain']:+.3f}{'' if r['gain_ok'] else ' (under 0.10)'} | {r.get('multitask_test', float('nan')):.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=None, help="cache of fine-tunes and records")
    parser.add_argument("--only", action="append", help="these fine-tunes only (a task, or multitask)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", min(4, os.cpu_count() or 1))))
    from wandamerge.models import prepare_smollm2

    base = prepare_smollm2()
    root = args.root or default_root()
    names = args.only or [*TASKS, "multitask"]
    paths = build_finetunes(base, root, names)
    if args.only:
        return
    refs = reference_records(base, paths, Records(root, REFERENCE_RECORDS))
    print(write_tasks_table(base, paths, refs, [__file__, *sys.argv[1:]]))


def write_tasks_table(base: Path, paths: dict[str, Path], refs: dict, argv: list[str]) -> str:
    """``benchmarks/results/testbed.{json,md}``; returns the Markdown."""
    from wandamerge.io.record import portable, provenance

    finetunes = {n: json.loads((p / "testbed.json").read_text()) for n, p in paths.items()}
    summary = {"meta": {**provenance(argv), "base": str(base)},
               "tasks": task_rows(refs, finetunes), "multitask_seconds": finetunes["multitask"]["train_seconds"],
               "finetunes": {n: str(p) for n, p in paths.items()}}
    summary = portable(summary)
    (HERE / "results" / "testbed.json").write_text(json.dumps(summary, indent=2))
    (HERE / "results" / "testbed.md").write_text(markdown(summary))
    return markdown(summary)


if __name__ == "__main__":
    main()
