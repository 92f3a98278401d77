"""The structure's promises, checked on behaviour: one tie rule for pruning and merging, one error type
for users and tracebacks for bugs, settings declared once, methods added as rows of data."""

from __future__ import annotations

import inspect

import pytest
import torch
from click.testing import CliRunner

import wandamerge.errors as errors
from wandamerge.cli import main, prune_command
from wandamerge.core.selection import keep_after_pruning, keep_n_of_m
from wandamerge.jobs.prune import PruneConfig
from wandamerge.merging import MERGE_METHODS, MergeMethod, magnitude_trim, merge_tensor, register_method
from wandamerge.pruning.methods import PruneTarget, keep_mask

from conftest import save, tiny_model


def tied_scores(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Scores with many ties: a few distinct levels, as a quantised checkpoint or a bf16 delta has."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 3, (rows, cols), generator=g).float()


def brute_keep_nm(score: torch.Tensor, n: int, m: int) -> list[list[bool]]:
    """In each group of m, keep the m - n highest; among equal scores the lower index first."""
    out = []
    for row in score.tolist():
        keep = []
        for g in range(0, len(row), m):
            group = row[g:g + m]
            order = sorted(range(m), key=lambda j: (-group[j], j))
            kept = set(order[:m - n])
            keep += [j in kept for j in range(m)]
        out.append(keep)
    return out


@pytest.mark.parametrize("seed", range(4))
def test_the_same_2_4_scores_give_the_same_mask_when_pruning_and_when_merging(seed):
    score = tied_scores(6, 16, seed)
    pruned = keep_mask(score, PruneTarget(pattern="2:4"))
    trimmed = magnitude_trim(score, 1.0, pattern="2:4") != 0  # a positive "delta" whose |.| is the score
    expected = brute_keep_nm(score, 2, 4)
    assert pruned.tolist() == expected
    assert (trimmed | (score == 0)).tolist() == [[k or s == 0 for k, s in zip(kr, sr)]
                                                  for kr, sr in zip(expected, score.tolist())]
    assert torch.equal(keep_n_of_m(score, 2, 4), pruned)


@pytest.mark.parametrize("seed", range(4))
def test_the_same_row_scores_keep_the_same_entries_when_pruning_and_when_merging(seed):
    score = tied_scores(5, 20, seed) + 1  # no zeros: every kept entry of the trim is visible
    kept_by_pruning = keep_after_pruning(score, 0.5, "row")
    kept_by_merging = magnitude_trim(score, 0.5, group="row") != 0
    assert torch.equal(kept_by_pruning, kept_by_merging)


def test_every_error_a_user_can_fix_is_a_wandamerge_error():
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, Exception)]
    assert len(classes) >= 8
    assert all(issubclass(c, errors.WandamergeError) for c in classes)


def test_a_user_error_is_one_line_and_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    import wandamerge.jobs.prune as prune_job

    src = save(tiny_model("llama"), tmp_path / "src")
    args = ["-q", "prune", str(src), "-o", str(tmp_path / "out"), "--method", "magnitude"]

    def user_error(*a, **k):
        raise errors.ModelError("the checkpoint is damaged; download it again")

    monkeypatch.setattr(prune_job, "run_prune", user_error)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and result.output.strip() == "error: the checkpoint is damaged; download it again"

    def bug(*a, **k):
        return {}["missing key"]

    monkeypatch.setattr(prune_job, "run_prune", bug)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and isinstance(result.exception, KeyError)


def test_prune_options_are_the_config_fields():
    options = {p.name for p in prune_command.params} - {"model", "out", "overwrite"}
    assert options == set(PruneConfig.model_fields) - {"model"}
    defaults = {p.name: p.default for p in prune_command.params if p.name in options}
    assert set(defaults.values()) == {None}  # the config's defaults apply, not a second copy


def test_a_merge_method_is_a_row_of_data():
    row = register_method(MergeMethod("test_magnitude_sum", "sum", "magnitude", normalize=False))
    try:
        base = torch.zeros(2, 3)
        fts = [torch.tensor([[3.0, -1.0, 0.5], [0.2, 2.0, -4.0]]), torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])]
        out = merge_tensor(row.name, base, fts, [1.0, 0.5], [0.5, 0.5])
        # magnitude trim keeps the top 3 of 6 per fine-tune (ties: lower index), then a weighted sum
        first = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, -4.0]])
        second = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
        assert torch.equal(out, first + 0.5 * second)
        with pytest.raises(errors.ConfigError, match="already registered"):
            register_method(row)
    finally:
        MERGE_METHODS.pop(row.name)


def test_importing_the_pure_tensor_functions_loads_no_model_code():
    import subprocess
    import sys

    probe = ("import sys, wandamerge.merging.sparsify, wandamerge.core.selection, wandamerge.core.sparsegpt; "
             "print(sorted(m for m in ('wandamerge.runner', 'wandamerge.models', 'wandamerge.loaders', "
             "'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_one_rule_says_what_a_model_argument_names(tmp_path):
    from wandamerge.io.resolve import classify_model_argument

    (tmp_path / "model").mkdir()
    (tmp_path / "weights.gguf").write_bytes(b"GGUF")
    (tmp_path / "notes.txt").write_text("not a model")
    assert classify_model_argument("smollm2", {"smollm2": None}) == "embedded"
    assert classify_model_argument(str(tmp_path / "model")) == "directory"
    assert classify_model_argument(str(tmp_path / "weights.gguf")) == "gguf"
    assert classify_model_argument("HuggingFaceTB/SmolLM2-135M") == "hub"
    assert classify_model_argument("gpt2") == "hub"  # a hub id without an organisation
    for bad, words in [(str(tmp_path / "missing.gguf"), "does not exist"), (str(tmp_path / "notes.txt"), "neither"),
                       (str(tmp_path / "missing"), "does not exist"), ("./missing", "does not exist"),
                       ("a/b/c", "does not exist"), ("org/", "does not exist")]:
        with pytest.raises(errors.ModelError, match=words):
            classify_model_argument(bad)
