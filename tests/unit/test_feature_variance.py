"""benchmarks/feature_variance.py: the share of variance an attribute explains is what the data was built with."""

from __future__ import annotations

import pytest
import torch
from conftest import load_benchmark

feature_variance = load_benchmark("feature_variance")


def test_a_label_that_moves_the_tokens_explains_its_share_and_an_unrelated_one_nothing():
    g = torch.Generator().manual_seed(0)
    n, t, d = 400, 4, 8
    loud = torch.randint(0, 2, (n,), generator=g)
    quiet = torch.randint(0, 2, (n,), generator=g)
    tokens = torch.randn(n, t, d, generator=g)  # unit variance in each of 8 dims: total 8
    tokens[:, :, 0] += (loud * 2 - 1)[:, None] * 2.0  # +-2 along one dim: between-class variance 4
    labels = {"loud": [str(int(v)) for v in loud], "quiet": [str(int(v)) for v in quiet]}
    assert feature_variance.explained(tokens, labels["loud"]) == pytest.approx(4 / 12, abs=0.03)
    assert feature_variance.explained(tokens, labels["quiet"]) < 0.01
    # pictures without the attribute are left out, not counted as a class
    partial = [label if k % 2 else None for k, label in enumerate(labels["loud"])]
    assert feature_variance.explained(tokens, partial) == pytest.approx(4 / 12, abs=0.04)


def test_a_clip_answer_names_the_row_and_column_of_its_grid_cell():
    from vita.training.curriculum import grid_cell

    rows, columns = ("top", "middle", "bottom"), ("left", "middle", "right")
    for r in range(3):
        for c in range(3):
            answer = grid_cell(c * 30 + 15, r * 30 + 15, 90)  # the centre of cell (r, c)
            assert feature_variance._cell(answer) == (rows[r], columns[c]), answer
