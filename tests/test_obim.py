"""OBIM's exclusive assignment by hand and against a per-entry brute force."""

from __future__ import annotations

import pytest
import torch

from wandamerge.merging import methods
from wandamerge.merging.methods import exclusive_combine, merge_tensor


def test_exclusive_assignment_by_hand():
    # two fine-tunes, a 2 x 2 map; input norms favour column 0 for the first, column 1 for the second
    weighted = torch.tensor([[[1.0, 2.0], [0.0, -3.0]],
                             [[-1.5, 1.0], [0.5, 0.0]]])
    norms = [torch.tensor([4.0, 1.0]), torch.tensor([1.0, 9.0])]
    # saliencies: first [[4, 4], [-, 9]], second [[2.25, 9], [0.25, -]]
    assert exclusive_combine(weighted, torch.ones(2), norms).tolist() == [[1.0, 1.0], [0.5, -3.0]]
    # without norms: |delta| decides; an equal saliency goes to the first fine-tune
    assert exclusive_combine(weighted, torch.ones(2)).tolist() == [[-1.5, 2.0], [0.5, -3.0]]
    tie = torch.tensor([[2.0], [-2.0]])
    assert exclusive_combine(tie, torch.ones(2)).tolist() == [2.0]


@pytest.mark.parametrize("chunk", [methods.EXCLUSIVE_CHUNK, 8, 40])  # whole; one row; 5 rows, then 1
def test_obim_keeps_each_entry_of_exactly_one_task_the_most_salient(monkeypatch, chunk):
    monkeypatch.setattr(methods, "EXCLUSIVE_CHUNK", chunk)
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=gen)
    taus = [torch.randn(6, 8, generator=gen) * 0.1 for _ in range(3)]
    norms = [torch.rand(8, generator=gen) + 0.1 for _ in range(3)]
    got = merge_tensor("obim", base, [base + t for t in taus], [1.0, 1.0, 1.0], 0.5, input_sq_norms=norms) - base
    kept = [merge_tensor("ties", base, [base + t], [1.0], 0.5, score="wanda", input_sq_norms=[n], rescale=False)
            - base for t, n in zip(taus, norms)]  # each task's own Wanda trim at density 0.5, per row
    for i in range(6):
        for j in range(8):
            candidates = [(float(k[i, j]) ** 2 * float(n[j]), -m, float(k[i, j]))
                          for m, (k, n) in enumerate(zip(kept, norms)) if k[i, j] != 0]
            want = max(candidates)[2] if candidates else 0.0
            assert abs(float(got[i, j]) - want) < 1e-6, (i, j)
