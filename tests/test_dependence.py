"""Spatial dependence against a slow reference written from the formulas (numpy, float64)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradshape import _kernels
from gradshape.dependence import PairGeometry, nmi_from_counts, spatial_dependence

ENGINES = ["torch"] + (["compiled"] if _kernels.available() else [])


# ---- reference ------------------------------------------------------------------------------
def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def reference_pairs(x: np.ndarray, kernel, dilation, pads):
    """Yield (kernel index, P, Q) by explicit shifting of an np.pad-ed copy."""
    pad_width = [(0, 0), (0, 0), *pads]
    xp = np.pad(x, pad_width)
    spatial = xp.shape[2:]
    centre = [k // 2 for k in kernel]
    for idx in itertools.product(*(range(k) for k in kernel)):
        delta = [(i - c) * d for i, c, d in zip(idx, centre, dilation)]
        src, dst = [], []
        for size, dl in zip(spatial, delta):
            lo, hi = max(0, -dl), min(size, size - dl)
            src.append(slice(lo, hi))
            dst.append(slice(lo + dl, hi + dl))
        p = xp[(slice(None), slice(None), *src)]
        q = xp[(slice(None), slice(None), *dst)]
        yield idx, p, q


def reference_nmi(x, kernel, dilation=None, pads=None, diag_removal=False):
    x = np.asarray(x, dtype=np.float64)
    dims = len(kernel)
    dilation = dilation or [1] * dims
    pads = pads or [(k // 2, k // 2) for k in kernel]
    out = np.ones((x.shape[1], *kernel))
    centre = tuple(k // 2 for k in kernel)
    for idx, p, q in reference_pairs(x, kernel, dilation, pads):
        if idx == centre:
            continue
        for c in range(x.shape[1]):
            pc, qc = p[:, c].ravel(), q[:, c].ravel()
            if diag_removal:
                keep = (pc != 0) & (qc != 0)
                pc, qc = pc[keep], qc[keep]
            if pc.size == 0:
                out[(c, *idx)] = np.nan
                continue
            bins = 1 + math.ceil(math.log2(pc.size))
            rng = [[pc.min(), pc.max()], [qc.min(), qc.max()]]
            rng = [[lo, hi] if hi > lo else [lo - 0.5, lo + 0.5] for lo, hi in rng]
            h, _, _ = np.histogram2d(pc, qc, bins=bins, range=rng)
            if diag_removal:
                np.fill_diagonal(h, 0)
            hj = _entropy(h.ravel())
            mi = _entropy(h.sum(1)) + _entropy(h.sum(0)) - hj
            out[(c, *idx)] = mi / hj if hj > 0 else np.nan
    return out


def reference_autocorrelation(x, kernel, dilation=None, pads=None):
    x = np.asarray(x, dtype=np.float64)
    dims = len(kernel)
    dilation = dilation or [1] * dims
    pads = pads or [(k // 2, k // 2) for k in kernel]
    out = np.ones((x.shape[1], *kernel))
    centre = tuple(k // 2 for k in kernel)
    for idx, p, q in reference_pairs(x, kernel, dilation, pads):
        if idx == centre:
            continue
        for c in range(x.shape[1]):
            out[(c, *idx)] = abs(np.corrcoef(p[:, c].ravel(), q[:, c].ravel())[0, 1])
    return out


def relu_maps(shape, channels_in=3, kernel=3, seed=0):
    """Realistic feature maps: ReLU of a random conv of smooth random images."""
    g = torch.Generator().manual_seed(seed)
    n, c, *spatial = shape
    dims = len(spatial)
    img = torch.randn(n, channels_in, *spatial, generator=g, dtype=torch.float64)
    pool = [F.avg_pool1d, F.avg_pool2d, F.avg_pool3d][dims - 1]
    img = pool(img, 3, stride=1, padding=1)
    conv = [F.conv1d, F.conv2d, F.conv3d][dims - 1]
    w = torch.randn(c, channels_in, *([kernel] * dims), generator=g, dtype=torch.float64)
    return torch.relu(conv(img, w, padding=kernel // 2))


# ---- tests --------------------------------------------------------------------------------
CASES = [
    # (map shape, kernel, dilation, padding (per dim, symmetric))
    ((6, 4, 12, 12), (3, 3), (1, 1), (1, 1)),
    ((4, 3, 14, 14), (5, 5), (1, 1), (2, 2)),
    ((4, 3, 12, 12), (3, 3), (2, 2), (2, 2)),
    ((4, 3, 12, 12), (3, 3), (2, 2), (1, 1)),  # padding narrower than the offset
    ((4, 3, 12, 12), (3, 3), (1, 1), (0, 0)),  # no padding
    ((4, 3, 12, 12), (1, 3), (1, 1), (0, 1)),
    ((8, 4, 40), (3,), (1,), (1,)),
    ((8, 4, 40), (5,), (3,), (2,)),
    ((2, 3, 6, 7, 8), (3, 3, 3), (1, 1, 1), (1, 1, 1)),
]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("shape,kernel,dilation,padding", CASES)
def test_nmi_matches_histogram2d_reference(engine, shape, kernel, dilation, padding):
    x = relu_maps(shape)
    got = spatial_dependence(x, kernel, dilation=dilation, padding=list(padding), engine=engine)
    want = reference_nmi(x.numpy(), kernel, list(dilation), [(p, p) for p in padding])
    assert got.shape == (shape[1], *kernel)
    np.testing.assert_allclose(got.numpy(), want, atol=0.01, equal_nan=True)
    # Same formula, same arithmetic: in practice the agreement is far tighter than 0.01.
    assert np.nanmax(np.abs(got.numpy() - want)) < 1e-6


@pytest.mark.parametrize("engine", ENGINES)
def test_nmi_even_kernel_same_padding(engine):
    x = relu_maps((4, 3, 11, 11))
    kernel = (4, 2)
    # PyTorch's "same" for even kernels pads total k-1: (k-1)//2 before, the rest after.
    pads = [((k - 1) // 2, (k - 1) - (k - 1) // 2) for k in kernel]
    got = spatial_dependence(x, kernel, padding="same", engine=engine)
    want = reference_nmi(x.numpy(), kernel, [1, 1], pads)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6)
    assert np.all(got.numpy()[:, 2, 1] == 1.0)  # centre at index k//2


@pytest.mark.parametrize("engine", ENGINES)
def test_nmi_float32_close_to_float64(engine):
    x = relu_maps((6, 4, 12, 12))
    got = spatial_dependence(x.float(), (3, 3), padding=1, engine=engine)
    want = reference_nmi(x.numpy(), (3, 3))
    np.testing.assert_allclose(got.numpy(), want, atol=0.01)


@pytest.mark.parametrize("engine", ENGINES)
def test_streaming_equals_one_concatenated_map(engine):
    x = relu_maps((9, 3, 10, 10))
    whole = spatial_dependence(x, (3, 3), padding=1, engine=engine)
    parts = spatial_dependence(list(x.split([2, 3, 4])), (3, 3), padding=1, engine=engine)
    torch.testing.assert_close(parts, whole, rtol=0, atol=0)


@pytest.mark.parametrize("engine", ENGINES)
def test_diag_removal_matches_reference(engine):
    x = relu_maps((6, 3, 12, 12))
    got = spatial_dependence(x, (3, 3), padding=1, diag_removal=True, engine=engine)
    want = reference_nmi(x.numpy(), (3, 3), diag_removal=True)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("shape,kernel,dilation,padding", [CASES[0], CASES[3], CASES[6], CASES[8]])
def test_autocorrelation_matches_corrcoef(shape, kernel, dilation, padding):
    x = relu_maps(shape)
    got = spatial_dependence(
        x, kernel, dilation=dilation, padding=list(padding), measure="autocorrelation"
    )
    want = reference_autocorrelation(x.numpy(), kernel, list(dilation), [(p, p) for p in padding])
    np.testing.assert_allclose(got.numpy(), want, atol=1e-9)


def test_autocorrelation_is_shift_invariant_for_large_offsets():
    x = relu_maps((4, 2, 10, 10))
    base = spatial_dependence(x, (3, 3), padding=0, measure="autocorrelation")
    shifted = spatial_dependence(x + 1e6, (3, 3), padding=0, measure="autocorrelation")
    np.testing.assert_allclose(shifted.numpy(), base.numpy(), atol=1e-6)


@pytest.mark.parametrize("engine", ENGINES)
def test_perfect_dependence_and_constant_channels(engine):
    # Channel 0: a horizontal ramp, so every pair at a horizontal offset is a bijection of P
    # restricted to the overlap: NMI = 1 without padding.  Channel 1: constant -> NaN.
    ramp = torch.arange(16, dtype=torch.float64).repeat(3, 16, 1)  # (3, 16, 16), varies along x
    x = torch.stack([ramp, torch.full_like(ramp, 2.5)], dim=1)
    s = spatial_dependence(x, (1, 3), padding=0, engine=engine)
    assert s[0, 0, 0].item() == pytest.approx(1.0, abs=1e-12)
    assert torch.isnan(s[1, 0, 0]) and torch.isnan(s[1, 0, 2])
    assert s[1, 0, 1] == 1.0


@pytest.mark.parametrize("engine", ENGINES)
def test_independent_pixels_have_low_nmi(engine):
    x = torch.rand(64, 2, 16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    s = spatial_dependence(x, (3, 3), padding=0, engine=engine)
    off_centre = s.reshape(2, 9)[:, [0, 1, 2, 3, 5, 6, 7, 8]]
    assert float(off_centre.max()) < 0.02


def test_nmi_from_counts_known_values():
    # Perfectly dependent 2x2 table: H(P)=H(Q)=H(P,Q)=1 bit -> NMI 1; independent -> 0.
    dep = torch.tensor([[5.0, 0.0], [0.0, 5.0]])
    ind = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    assert nmi_from_counts(dep).item() == pytest.approx(1.0)
    assert nmi_from_counts(ind).item() == pytest.approx(0.0, abs=1e-15)
    assert torch.isnan(nmi_from_counts(torch.tensor([[4.0, 0.0], [0.0, 0.0]])))


def test_offsets_fold_sign_pairs_and_scale_with_dilation():
    geo = PairGeometry.create((3, 3), dilation=(2, 1), padding=1)
    assert len(geo.offsets) == 4  # 8 off-centre positions, 4 ± pairs
    assert set(map(tuple, geo.offsets)) == {(2, 1), (2, 0), (2, -1), (0, 1)}
    even = PairGeometry.create((2,), padding=0)
    assert even.offsets == ((-1,),)  # +1 is not in an even kernel: no folding


def test_spatial_smaller_than_kernel_gives_nan():
    x = torch.rand(2, 3, 2, 2, dtype=torch.float64)
    s = spatial_dependence(x, (5, 5), padding=0)
    assert torch.isnan(s[:, 0, 0]).all()  # offset (-2,-2) has no pair inside a 2x2 map
    assert not torch.isnan(s[:, 2, 3]).any()


def test_nan_input_raises_naming_layer():
    x = torch.rand(2, 3, 5, 5)
    x[0, 1, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        spatial_dependence(x, (3, 3), padding=1)


def test_bad_arguments():
    x = torch.rand(2, 3, 5, 5)
    with pytest.raises(ValueError, match="unknown measure"):
        spatial_dependence(x, (3, 3), measure="entropy")
    with pytest.raises(ValueError, match="spatial dims"):
        spatial_dependence(x, (3,))
    with pytest.raises(TypeError, match="floating"):
        spatial_dependence(x.long(), (3, 3))
    with pytest.raises(ValueError, match="no feature maps"):
        spatial_dependence([], (3, 3))
