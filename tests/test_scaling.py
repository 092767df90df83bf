"""S → G, Lemma 1 masks and the parametric grid, on hand-checkable inputs."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import gradshape as gs


def test_k_transform_values_and_identity():
    s = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    # k = 5: 5s / (4s + 1) -> 0, 1.25/2, 2.5/3, 1
    torch.testing.assert_close(
        gs.k_transform(s, 5.0), torch.tensor([0.0, 0.625, 2.5 / 3, 1.0], dtype=torch.float64)
    )
    torch.testing.assert_close(gs.k_transform(s, 1.0), s, rtol=0, atol=0)
    assert torch.isnan(gs.k_transform(torch.tensor([math.nan]), 3.0)).all()


@pytest.mark.parametrize("k", [0, -1.0, math.inf, math.nan])
def test_k_must_be_positive_and_finite(k):
    with pytest.raises(ValueError, match="k must be"):
        gs.k_transform(torch.zeros(1), k)


def test_dependence_to_scaling_skips_nan_channels():
    s = torch.tensor(
        [
            [[0.2, 0.4, 0.2], [0.4, 1.0, 0.4], [0.2, 0.4, 0.2]],
            [[math.nan] * 3, [math.nan, 1.0, math.nan], [math.nan] * 3],  # constant channel
            [[0.0, 0.6, 0.0], [0.6, 1.0, 0.6], [0.0, 0.6, 0.0]],
        ],
        dtype=torch.float64,
    )
    g = gs.dependence_to_scaling(s, k=1.0)
    expected = torch.tensor(
        [[0.1, 0.5, 0.1], [0.5, 1.0, 0.5], [0.1, 0.5, 0.1]], dtype=torch.float64
    )
    expected = expected / expected.mean()
    torch.testing.assert_close(g, expected)
    assert g.mean().item() == pytest.approx(1.0, abs=1e-15)


def test_zero_dependence_gets_the_floor_and_stays_positive():
    s = torch.zeros(2, 3, 3, dtype=torch.float64)
    s[:, 1, 1] = 1.0
    g = gs.dependence_to_scaling(s, k=5.0, floor=1e-3)
    raw = torch.full((3, 3), 1e-3, dtype=torch.float64)
    raw[1, 1] = 1.0
    torch.testing.assert_close(g, raw / raw.mean())
    assert (g > 0).all()


def test_all_degenerate_gives_ones_and_warns():
    s = torch.full((4, 3, 3), math.nan, dtype=torch.float64)
    s[:, 1, 1] = 1.0
    with pytest.warns(RuntimeWarning, match="'conv9'.*all ones"):
        g = gs.dependence_to_scaling(s, layer="conv9")
    torch.testing.assert_close(g, torch.ones(3, 3, dtype=torch.float64))


def test_partly_degenerate_does_not_warn():
    s = torch.full((2, 3, 3), math.nan, dtype=torch.float64)
    s[:, 1, 1] = 1.0
    s[0, 0, 1] = 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = gs.dependence_to_scaling(s, k=1.0, floor=0.01)
    assert torch.isfinite(g).all() and (g > 0).all()


def test_branch_scaling_acb_repvgg_dbb():
    torch.testing.assert_close(
        gs.branch_scaling("acb", 3),
        torch.tensor([[1, 2, 1], [2, 3, 2], [1, 2, 1]], dtype=torch.float64),
    )
    rep = gs.branch_scaling("repvgg", 5)
    assert rep[2, 2] == 2 and rep.sum() == 26
    acb5 = gs.branch_scaling("acb", (3, 5))
    assert acb5.shape == (3, 5) and acb5[1, 2] == 3 and acb5[1, 0] == 2 and acb5[0, 2] == 2
    dbb = gs.branch_scaling("dbb", 3)
    assert dbb[1, 1] == 3 and dbb[0, 0] == 2


def test_branch_scaling_errors():
    with pytest.raises(ValueError, match="unknown branch structure 'ac'.*acb"):
        gs.branch_scaling("ac", 3)
    with pytest.raises(ValueError, match="odd"):
        gs.branch_scaling("acb", 4)


def test_masks_to_scaling_sums_and_validates():
    full = torch.ones(3, 3)
    centre = torch.zeros(3, 3)
    centre[1, 1] = 1
    torch.testing.assert_close(
        gs.masks_to_scaling([full, centre, centre]), full.double() + 2 * centre.double()
    )
    with pytest.raises(ValueError, match="covered by no branch"):
        gs.masks_to_scaling([centre])
    with pytest.raises(ValueError, match="not binary"):
        gs.masks_to_scaling([full * 0.5])
    with pytest.raises(ValueError, match="shape"):
        gs.masks_to_scaling([full, torch.ones(2, 2)])
    with pytest.raises(TypeError):
        gs.masks_to_scaling(full)


def test_grid_scaling_ratios():
    g = gs.grid_scaling(alpha=2.0, beta=4.0)
    assert g.mean().item() == pytest.approx(1.0)
    assert (g[1, 1] / g[0, 1]).item() == pytest.approx(2.0)
    assert (g[1, 1] / g[0, 0]).item() == pytest.approx(4.0)
    torch.testing.assert_close(gs.grid_scaling(1.0, 1.0), torch.ones(3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="beta"):
        gs.grid_scaling(1.0, 0.0)
