"""Tests for wandamerge.calibration: sources, token windows, the wiki split.

No network, no model download: a tiny word-level tokenizer maps the word
``w<i>`` to id ``i``, so the text ``"w0 w1 ... w<n-1>"`` tokenizes to
``arange(n)`` and every window shows where it was cut from.
"""

from __future__ import annotations

import json
import logging
import sys

import numpy as np
import pytest
import torch

from wandamerge import calibration as cal
from wandamerge.calibration import CalibrationError

VOCAB = 5000


@pytest.fixture(scope="module")
def tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB)}
    vocab["[UNK]"] = VOCAB
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", model_max_length=16)


def words(start: int, stop: int) -> str:
    return " ".join(f"w{i}" for i in range(start, stop))


def assert_windows_of(windows: torch.Tensor, tokens: torch.Tensor) -> list[int]:
    """Each row is a contiguous slice of ``tokens`` (which must be an arange); return the starts."""
    assert torch.equal(tokens, torch.arange(tokens.numel()))
    starts = windows[:, 0].tolist()
    for row, start in zip(windows, starts):
        assert torch.equal(row, tokens[start : start + row.numel()])
    return starts


# ------------------------------------------------------------------ tokenize_text


def test_tokenize_text_gives_1d_int64_without_special_tokens(tokenizer):
    tokens = cal.tokenize_text(words(0, 50), tokenizer)
    assert tokens.dtype == torch.int64
    assert torch.equal(tokens, torch.arange(50))


def test_tokenize_text_does_not_warn_about_long_sequences(tokenizer):
    tokenizer.deprecation_warnings.clear()
    tokens = cal.tokenize_text(words(0, 100), tokenizer)  # 100 > model_max_length=16
    assert tokens.numel() == 100
    assert "sequence-length-is-longer-than-the-specified-maximum" not in tokenizer.deprecation_warnings


# ----------------------------------------------------------------- random_windows


def test_random_windows_are_slices_at_their_start_positions():
    tokens = torch.arange(1000)
    windows = cal.random_windows(tokens, nsamples=32, seqlen=64, seed=0)
    assert windows.shape == (32, 64)
    assert windows.dtype == torch.int64
    starts = assert_windows_of(windows, tokens)
    assert all(0 <= s < 1000 - 64 for s in starts)
    assert len(set(starts)) > 1


def test_random_windows_draw_starts_with_torch_randint():
    tokens = torch.arange(500)
    windows = cal.random_windows(tokens, nsamples=8, seqlen=20, seed=3)
    expected = torch.randint(0, 500 - 20, (8,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(windows[:, 0], expected)


def test_random_windows_same_seed_same_windows_different_seed_different():
    tokens = torch.arange(10_000)
    a = cal.random_windows(tokens, 16, 32, seed=1)
    b = cal.random_windows(tokens, 16, 32, seed=1)
    c = cal.random_windows(tokens, 16, 32, seed=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_random_windows_shared_generator_continues_the_sequence():
    tokens = torch.arange(10_000)
    gen = torch.Generator().manual_seed(0)
    first = cal.random_windows(tokens, 4, 16, gen)
    second = cal.random_windows(tokens, 4, 16, gen)
    assert torch.equal(first, cal.random_windows(tokens, 4, 16, 0))
    assert not torch.equal(first, second)
    both = cal.random_windows(tokens, 8, 16, torch.Generator().manual_seed(0))
    assert torch.equal(torch.cat([first, second]), both)


def test_random_windows_needs_seqlen_plus_one_tokens():
    cal.random_windows(torch.arange(65), 2, 64, seed=0)  # exactly enough: only start 0
    with pytest.raises(CalibrationError, match=r"has 64 tokens .* at least 65"):
        cal.random_windows(torch.arange(64), 2, 64, seed=0)


@pytest.mark.parametrize(
    ("nsamples", "seqlen", "pattern"),
    [(0, 8, "nsamples"), (-1, 8, "nsamples"), (4, 0, "seqlen"), (4, 2.5, "seqlen")],
)
def test_random_windows_rejects_bad_sizes(nsamples, seqlen, pattern):
    with pytest.raises(CalibrationError, match=pattern):
        cal.random_windows(torch.arange(100), nsamples, seqlen, seed=0)


def test_random_windows_rejects_non_1d_tokens():
    with pytest.raises(CalibrationError, match="1-D"):
        cal.random_windows(torch.zeros(4, 100, dtype=torch.long), 2, 8, seed=0)


# ------------------------------------------------------------ consecutive_windows


def test_consecutive_windows_are_in_order_non_overlapping_and_drop_the_tail():
    tokens = torch.arange(1050)
    windows = cal.consecutive_windows(tokens, 100)
    assert windows.shape == (10, 100)
    assert torch.equal(windows.flatten(), torch.arange(1000))


def test_consecutive_windows_max_windows_keeps_the_first():
    windows = cal.consecutive_windows(torch.arange(1000), 100, max_windows=3)
    assert torch.equal(windows, torch.arange(300).reshape(3, 100))
    assert cal.consecutive_windows(torch.arange(1000), 100, max_windows=50).shape == (10, 100)


def test_consecutive_windows_too_short_text():
    with pytest.raises(CalibrationError, match=r"has 99 tokens .* needs 100"):
        cal.consecutive_windows(torch.arange(99), 100)


# -------------------------------------------------------------------- text sources


def test_load_text_source_txt(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("hello world\nsecond line\n", encoding="utf-8")
    assert cal.load_text_source(str(path)) == "hello world\nsecond line\n"


def test_load_text_source_jsonl_joins_texts_with_blank_lines(tmp_path):
    path = tmp_path / "corpus.jsonl"
    rows = [{"text": "first doc", "id": 1}, {"text": "second doc"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert cal.load_text_source(str(path)) == "first doc\n\nsecond doc"


@pytest.mark.parametrize("bad_line", ['{"content": "no text field"}', "not json", '["a list"]'])
def test_load_text_source_jsonl_bad_line_is_named(tmp_path, bad_line):
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"text": "ok"}) + "\n" + bad_line + "\n")
    with pytest.raises(CalibrationError, match="line 3"):
        cal.load_text_source(str(path))


def test_load_text_source_missing_file_lists_accepted_sources(tmp_path):
    with pytest.raises(CalibrationError, match="does not exist") as info:
        cal.load_text_source(str(tmp_path / "missing.txt"))
    for name in ("wiki", "wikitext2", "c4", ".jsonl", ".pt"):
        assert name in str(info.value)


def test_load_text_source_unknown_name_lists_accepted_sources():
    with pytest.raises(CalibrationError, match="unknown source") as info:
        cal.load_text_source("pile")
    for name in cal.TEXT_SOURCES + cal.TEXT_FILE_SUFFIXES + cal.TOKEN_FILE_SUFFIXES:
        assert name in str(info.value)


def test_load_text_source_refuses_token_files(tmp_path):
    with pytest.raises(CalibrationError, match="token file"):
        cal.load_text_source(str(tmp_path / "windows.pt"))


def test_hub_source_offline_is_a_calibration_error(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    for name in ("wikitext2", "c4"):
        with pytest.raises(CalibrationError, match="hub") as info:
            cal.load_text_source(name)
        assert "'wiki'" in str(info.value)


def test_hub_sources_use_train_for_calibration_and_held_out_for_evaluation(monkeypatch, tokenizer):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(path, name=None, split=None, data_files=None):
        calls.append((path, name, split, data_files))
        text = words(0, 300) if split == "train" else words(1000, 1300)
        return datasets.Dataset.from_dict({"text": [text]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert cal.load_text_source("wikitext2") == words(0, 300)
    evaluation = cal.evaluation_windows("wikitext2", tokenizer, seqlen=100)
    assert torch.equal(evaluation, torch.arange(1000, 1300).reshape(3, 100))
    cal.load_text_source("c4")
    assert calls == [
        ("wikitext", "wikitext-2-raw-v1", "train", None),
        ("wikitext", "wikitext-2-raw-v1", "test", None),
        ("allenai/c4", None, "train", {"train": "en/c4-train.00000-of-01024.json.gz"}),
    ]


# --------------------------------------------------------------------- token files


@pytest.mark.parametrize(
    ("suffix", "dtype"),
    [(".pt", torch.int64), (".pt", torch.int32), (".pt", torch.uint8), (".npy", np.int64), (".npy", np.int32), (".npy", np.uint16)],
)
def test_load_token_file_returns_values_exactly(tmp_path, suffix, dtype):
    values = np.random.default_rng(0).integers(0, 250, size=(6, 32))
    path = tmp_path / f"windows{suffix}"
    if suffix == ".pt":
        torch.save(torch.from_numpy(values).to(dtype), path)
    else:
        np.save(path, values.astype(dtype))
    loaded = cal.load_token_file(path)
    assert loaded.dtype == torch.int64
    assert torch.equal(loaded, torch.from_numpy(values))


@pytest.mark.parametrize(
    ("tensor", "pattern"),
    [
        (torch.arange(10), "2-D"),
        (torch.zeros(2, 3, 4, dtype=torch.long), "2-D"),
        (torch.zeros(2, 8), "dtype"),
        (torch.zeros(2, 8, dtype=torch.bool), "dtype"),
        (torch.tensor([[1, 2], [-3, 4]]), "negative"),
        ({"windows": torch.zeros(2, 8, dtype=torch.long)}, "not a tensor"),
    ],
)
def test_load_token_file_rejects_bad_content(tmp_path, tensor, pattern):
    path = tmp_path / "bad.pt"
    torch.save(tensor, path)
    with pytest.raises(CalibrationError, match=pattern):
        cal.load_token_file(path)


def test_load_token_file_rejects_bad_npy_and_missing_and_unknown_kinds(tmp_path):
    np.save(tmp_path / "floats.npy", np.zeros((2, 8), dtype=np.float32))
    with pytest.raises(CalibrationError, match="dtype"):
        cal.load_token_file(tmp_path / "floats.npy")
    np.save(tmp_path / "huge.npy", np.full((2, 8), 2**63 + 5, dtype=np.uint64))
    with pytest.raises(CalibrationError, match="out-of-range"):
        cal.load_token_file(tmp_path / "huge.npy")
    with pytest.raises(CalibrationError, match="does not exist"):
        cal.load_token_file(tmp_path / "missing.pt")
    with pytest.raises(CalibrationError, match=r"\.pt or \.npy"):
        cal.load_token_file(tmp_path / "windows.csv")


# ------------------------------------------------------------------- main entries


def test_calibration_windows_from_text_file(tmp_path, tokenizer):
    path = tmp_path / "corpus.txt"
    path.write_text(words(0, 2000), encoding="utf-8")
    windows = cal.calibration_windows(str(path), tokenizer, nsamples=12, seqlen=128, seed=5)
    assert windows.shape == (12, 128)
    assert_windows_of(windows, torch.arange(2000))
    assert torch.equal(windows, cal.random_windows(torch.arange(2000), 12, 128, 5))
    again = cal.calibration_windows(path, tokenizer, nsamples=12, seqlen=128, seed=5)
    assert torch.equal(windows, again)


def test_calibration_windows_too_short_text_names_token_counts(tmp_path, tokenizer):
    path = tmp_path / "short.txt"
    path.write_text(words(0, 40), encoding="utf-8")
    with pytest.raises(CalibrationError, match=r"has 40 tokens .* at least 65"):
        cal.calibration_windows(str(path), tokenizer, nsamples=4, seqlen=64)


def test_calibration_windows_checks_vocab_size(tmp_path, tokenizer):
    path = tmp_path / "corpus.txt"
    path.write_text(words(1000, 3000), encoding="utf-8")
    cal.calibration_windows(str(path), tokenizer, 4, 64, vocab_size=VOCAB)
    with pytest.raises(CalibrationError, match="vocabulary has 1000"):
        cal.calibration_windows(str(path), tokenizer, 4, 64, vocab_size=1000, seed=1)


def test_calibration_windows_token_file_used_as_given(tmp_path, tokenizer, caplog):
    given = torch.randint(0, 100, (3, 10), generator=torch.Generator().manual_seed(0))
    path = tmp_path / "windows.pt"
    torch.save(given, path)
    with caplog.at_level(logging.WARNING, logger="wandamerge.calibration"):
        exact = cal.calibration_windows(str(path), tokenizer, nsamples=3, seqlen=10)
    assert torch.equal(exact, given)
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="wandamerge.calibration"):
        other = cal.calibration_windows(str(path), tokenizer, nsamples=128, seqlen=2048)
    assert torch.equal(other, given)
    assert any("(3, 10)" in r.getMessage() for r in caplog.records)
    with pytest.raises(CalibrationError, match="vocabulary has 50"):
        cal.calibration_windows(str(path), tokenizer, 3, 10, vocab_size=50)


def test_evaluation_windows_from_text_and_token_file(tmp_path, tokenizer):
    text = tmp_path / "eval.txt"
    text.write_text(words(0, 1030), encoding="utf-8")
    windows = cal.evaluation_windows(str(text), tokenizer, seqlen=100, max_windows=4)
    assert torch.equal(windows, torch.arange(400).reshape(4, 100))

    given = torch.arange(60).reshape(6, 10)
    np.save(tmp_path / "eval.npy", given.numpy())
    assert torch.equal(cal.evaluation_windows(str(tmp_path / "eval.npy"), tokenizer, seqlen=10), given)
    assert torch.equal(
        cal.evaluation_windows(str(tmp_path / "eval.npy"), tokenizer, seqlen=10, max_windows=2), given[:2]
    )


# ----------------------------------------------------------------------- wiki


@pytest.fixture(scope="module")
def articles():
    pytest.importorskip("gensim")
    return cal.wiki_articles()


def _non_redirect_titles() -> list[str]:
    """Titles of the pages of gensim's sample that are not article redirects.

    Like gensim's WikiCorpus, the extraction reads only namespace 0: pages of
    other namespaces come back with an empty text and are kept as title-only
    entries (one page in the sample), which the reference split counts.
    """
    import bz2
    import xml.etree.ElementTree as ET
    from pathlib import Path

    import gensim

    dump = Path(gensim.__file__).parent / cal._GENSIM_WIKI_SAMPLE
    titles = []
    with bz2.open(dump, "rb") as handle:
        for _, elem in ET.iterparse(handle):
            if not elem.tag.endswith("}page"):
                continue
            ns = "{" + elem.tag[1:].split("}")[0] + "}"
            title = elem.find(f"{ns}title").text
            namespace = elem.find(f"{ns}ns").text
            text = elem.find(f"{ns}revision/{ns}text").text or ""
            if namespace != "0" or not text.lstrip().lower().startswith("#redirect"):
                titles.append(title)
            elem.clear()
    return titles


def _title(article: str) -> str:
    head = article.split(" \n\n", 1)[0]
    assert head.startswith(" = ") and head.endswith(" =")
    return head[3:-2]


def test_wiki_articles_are_all_non_redirect_pages_in_order(articles):
    assert [_title(a) for a in articles] == _non_redirect_titles()
    assert len(articles) == 107
    assert articles[0].startswith(" = Anarchism = \n\n'''Anarchism''' is")
    for article in articles:
        body = article.split(" \n\n", 1)[1] if " \n\n" in article else ""
        assert not body.lower().startswith("#redirect")
        assert body == body.strip()


def test_wiki_articles_is_cached_and_returns_a_copy(articles):
    again = cal.wiki_articles()
    assert again == articles and again is not articles
    again.clear()
    assert cal.wiki_articles() == articles


def test_wiki_split_by_article_parity_is_disjoint_and_complete(articles):
    calibration = cal.wiki_split("calibration")
    evaluation = cal.wiki_split("evaluation")
    assert calibration == "\n\n".join(articles[0::2])
    assert evaluation == "\n\n".join(articles[1::2])
    calib_titles = {_title(a) for a in articles[0::2]}
    eval_titles = {_title(a) for a in articles[1::2]}
    assert not calib_titles & eval_titles
    assert calib_titles | eval_titles == {_title(a) for a in articles}
    for index, article in enumerate(articles):
        if len(article) > 200:  # long enough to be unambiguous
            in_calib, in_eval = article in calibration, article in evaluation
            assert (in_calib, in_eval) == ((True, False) if index % 2 == 0 else (False, True))


def test_wiki_sources(articles):
    assert cal.load_text_source("wiki") == cal.wiki_split("calibration")
    assert cal.load_text_source("wiki-eval") == cal.wiki_split("evaluation")
    with pytest.raises(CalibrationError, match="'calibration' or 'evaluation'"):
        cal.wiki_split("train")


def test_wiki_evaluation_windows_come_from_the_evaluation_split(articles):
    class CharTokenizer:
        """Maps each character to its code point: enough to tell the two splits apart."""

        def __call__(self, text, add_special_tokens=False, verbose=True):
            return {"input_ids": [ord(c) for c in text]}

    evaluation = cal.wiki_split("evaluation")
    windows = cal.evaluation_windows("wiki", CharTokenizer(), seqlen=64, max_windows=3)
    assert "".join(map(chr, windows.flatten().tolist())) == evaluation[: 3 * 64]


def test_wiki_without_gensim_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gensim", None)
    monkeypatch.setitem(sys.modules, "gensim.corpora.wikicorpus", None)
    with pytest.raises(CalibrationError, match=r"pip install 'wandamerge\[wiki\]'"):
        cal._wiki_articles_cached.__wrapped__()
