"""The benchmarks' anchor (the authors' algorithm, ``benchmarks/anchor.py``) against the library.

This is the correctness link between BENCHMARKS.md and gradshape: the timed anchor computes the
same S as ``gs.spatial_dependence(..., measure="nmi")`` to within 0.01 (in practice to
round-off, since both bin the same float32 values over the same ranges).
"""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gradshape as gs

pytest.importorskip("fast_histogram")
from fast_histogram import histogram2d

# benchmarks/ is not an installed package: load the anchor from its file.
_spec = importlib.util.spec_from_file_location(
    "benchmarks_anchor", Path(__file__).resolve().parents[1] / "benchmarks" / "anchor.py"
)
anchor = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(anchor)

TOLERANCE = 0.01


def _smooth_relu(n, c, size, seed):
    g = torch.Generator().manual_seed(seed)
    x = F.avg_pool2d(torch.randn(n, c, size + 4, size + 4, generator=g), 5, 1)
    return torch.relu(x - 0.1)


def _structured():
    """Real-valued ramps, waves, a checkerboard and a constant channel (NaN when unpadded).

    Integer-valued maps are avoided on purpose: see test_exact_bin_edges_differ_by_design.
    """
    y, x = torch.meshgrid(torch.arange(12.0), torch.arange(12.0), indexing="ij")
    channels = [
        torch.sin(0.37 * x + 0.61 * y),
        torch.cos(0.9 * x) * torch.sin(0.23 * y),
        ((x + y) % 2) * 2.5 + 0.013 * x,
        torch.full_like(x, 0.5),
    ]
    base = torch.stack(channels).unsqueeze(0)
    return torch.cat([base, base.flip(-1), base * 3 - 1])  # 0.5 is a fixed point of 3v − 1


def _assert_agree(s_anchor, s_lib):
    assert s_anchor.shape == s_lib.shape
    assert torch.equal(s_anchor.isnan(), s_lib.isnan())
    defined = ~s_lib.isnan()
    assert (s_anchor[defined] - s_lib[defined]).abs().max() <= TOLERANCE


@pytest.mark.parametrize(
    "maps",
    [
        torch.randn(4, 3, 9, 9, generator=torch.Generator().manual_seed(1)),
        _smooth_relu(6, 4, 16, seed=2),
        _structured(),
    ],
    ids=["iid-normal", "smooth-post-relu", "structured"],
)
def test_anchor_matches_library_3x3(maps):
    s_lib = gs.spatial_dependence(maps, (3, 3), padding=1, measure="nmi")
    _assert_agree(anchor.anchor_dependence(maps), s_lib)


def test_constant_channel_is_undefined_in_both_without_padding():
    s_anchor = anchor.anchor_dependence(_structured(), (3, 3), (0, 0))
    assert s_anchor[3].isnan().sum() == 8 and s_anchor[3, 1, 1] == 1  # centre stays 1
    _assert_agree(s_anchor, gs.spatial_dependence(_structured(), (3, 3), measure="nmi"))


def test_anchor_matches_library_5x5_without_padding():
    maps = _smooth_relu(3, 2, 14, seed=3)
    s_lib = gs.spatial_dependence(maps, (5, 5), padding=0, measure="nmi")
    _assert_agree(anchor.anchor_dependence(maps, (5, 5), (0, 0)), s_lib)


def test_concatenated_batches_match_the_streamed_library():
    batches = [_smooth_relu(4, 3, 10, seed=s) * (1 + s) for s in range(3)]
    s_lib = gs.spatial_dependence(batches, (3, 3), padding=1, measure="nmi")
    _assert_agree(anchor.anchor_dependence(batches), s_lib)


def test_counting_range_counts_the_maximum():
    v = np.array([0.0, 0.25, 0.5, 1.0, 1.0], dtype=np.float32)
    counts = histogram2d(v, v, bins=4, range=[anchor.counting_range(v)] * 2)
    assert counts.sum() == v.size
    assert counts[3, 3] == 2  # both maxima in the last bin


def test_exact_bin_edges_differ_by_design():
    """The one documented difference: a value exactly on an interior edge lands one bin lower.

    v = 0, 1, 2, 3 with B = 3 has edges at 1 and 2; the library bins floor(v·B/3) capped at
    B − 1, i.e. 0, 1, 2, 2; the anchor's range widened by RANGE_EPSILON gives 0, 0, 1, 2.
    """
    v = np.array([0.0, 1.0, 2.0, 3.0])
    counts = histogram2d(v, v, bins=3, range=[anchor.counting_range(v)] * 2)
    np.testing.assert_array_equal(np.diag(counts), [2, 1, 1])
    library_bins = np.minimum(np.floor(v * 3 / 3), 2)
    np.testing.assert_array_equal(np.bincount(library_bins.astype(int)), [1, 1, 2])


def test_nmi_of_a_sample_with_itself_is_one_and_of_a_constant_is_nan():
    p = np.random.default_rng(0).normal(size=200).astype(np.float32)
    assert anchor.nmi_from_pairs(p, p) == pytest.approx(1.0, abs=1e-12)
    assert math.isnan(anchor.nmi_from_pairs(np.ones(50), np.ones(50)))


def test_authors_input_is_the_hooks_padded_map_and_the_loop_reads_it_as_is():
    maps = [_smooth_relu(3, 2, 9, seed=s) for s in range(2)]
    padded = anchor.authors_input(maps, (1, 2))
    want = np.pad(torch.cat(maps).numpy(), ((0, 0), (0, 0), (1, 1), (2, 2)))
    np.testing.assert_array_equal(padded, want)
    assert padded.dtype == np.float32  # the maps' dtype: no conversion around the loop
    s = anchor.anchor_loop(padded, (3, 5))
    torch.testing.assert_close(s, anchor.anchor_dependence(maps, (3, 5), (1, 2)), rtol=0, atol=0)
    _assert_agree(s, gs.spatial_dependence(maps, (3, 5), padding=(1, 2), measure="nmi"))
