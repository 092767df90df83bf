"""Spatial dependence against a slow reference written from the formulas (numpy, float64)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradshape import _kernels
from gradshape.dependence import PairGeometry, make_accumulator, nmi_from_counts, spatial_dependence

ENGINES = ["torch"] + (["compiled"] if _kernels.available() else [])


# ---- reference ------------------------------------------------------------------------------
def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def reference_pairs(x: np.ndarray, kernel, dilation, pads, mask=None):
    """Yield (kernel index, P, Q, kept) by explicit shifting of an np.pad-ed copy.

    ``kept`` (N, 1, *window) is False for pairs with a masked end (the padding is unmasked).
    """
    pad_width = [(0, 0), (0, 0), *pads]
    xp = np.pad(x, pad_width)
    real = np.ones(x[:, :1].shape, bool) if mask is None else np.asarray(mask)[:, None]
    real = np.pad(real, pad_width, constant_values=True)
    spatial = xp.shape[2:]
    centre = [k // 2 for k in kernel]
    for idx in itertools.product(*(range(k) for k in kernel)):
        delta = [(i - c) * d for i, c, d in zip(idx, centre, dilation)]
        src, dst = [], []
        for size, dl in zip(spatial, delta):
            lo = max(0, -dl)
            hi = max(lo, min(size, size - dl))  # empty when the offset exceeds the map
            src.append(slice(lo, hi))
            dst.append(slice(lo + dl, hi + dl))
        p = xp[(slice(None), slice(None), *src)]
        q = xp[(slice(None), slice(None), *dst)]
        kept = real[(slice(None), slice(None), *src)] & real[(slice(None), slice(None), *dst)]
        yield idx, p, q, kept


def reference_nmi(x, kernel, dilation=None, pads=None, diag_removal=False, mask=None):
    x = np.asarray(x, dtype=np.float64)
    dims = len(kernel)
    dilation = dilation or [1] * dims
    pads = pads or [(k // 2, k // 2) for k in kernel]
    out = np.ones((x.shape[1], *kernel))
    centre = tuple(k // 2 for k in kernel)
    for idx, p, q, kept in reference_pairs(x, kernel, dilation, pads, mask):
        if idx == centre:
            continue
        for c in range(x.shape[1]):
            pc, qc = p[:, c][kept[:, 0]], q[:, c][kept[:, 0]]
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


def reference_autocorrelation(x, kernel, dilation=None, pads=None, mask=None):
    x = np.asarray(x, dtype=np.float64)
    dims = len(kernel)
    dilation = dilation or [1] * dims
    pads = pads or [(k // 2, k // 2) for k in kernel]
    out = np.ones((x.shape[1], *kernel))
    centre = tuple(k // 2 for k in kernel)
    for idx, p, q, kept in reference_pairs(x, kernel, dilation, pads, mask):
        if idx == centre:
            continue
        for c in range(x.shape[1]):
            pc, qc = p[:, c][kept[:, 0]], q[:, c][kept[:, 0]]
            out[(c, *idx)] = abs(np.corrcoef(pc, qc)[0, 1])
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


# ---- validity masks ---------------------------------------------------------------------------
def prefix_mask(shape, seed):
    """(N, *spatial) masks whose real region is a random leading box per image (a padded tail)."""
    g = torch.Generator().manual_seed(seed)
    n, *spatial = shape
    mask = torch.zeros(shape, dtype=torch.bool)
    for i in range(n):
        ends = [int(torch.randint(max(1, s // 3), s + 1, (1,), generator=g)) for s in spatial]
        mask[(i, *(slice(0, e) for e in ends))] = True
    return mask


def random_mask(shape, seed, p=0.7):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < p


MASK_CASES = [
    # (map shape, kernel, dilation, padding, mask)
    ((5, 3, 12, 12), (3, 3), (1, 1), (1, 1), "prefix"),
    ((5, 3, 12, 12), (3, 3), (2, 2), (1, 1), "random"),
    ((5, 3, 11, 13), (5, 3), (1, 1), (2, 1), "random"),
    ((6, 3, 30), (3,), (1,), (1,), "prefix"),
    ((6, 3, 30), (5,), (3,), (6,), "random"),
    ((2, 3, 5, 6, 7), (3, 3, 3), (1, 1, 1), (1, 1, 1), "prefix"),
]


def make_mask(kind, shape, seed):
    return (prefix_mask if kind == "prefix" else random_mask)((shape[0], *shape[2:]), seed)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("diag_removal", [False, True])
@pytest.mark.parametrize("shape,kernel,dilation,padding,kind", MASK_CASES)
def test_masked_nmi_matches_reference(engine, diag_removal, shape, kernel, dilation, padding, kind):
    x = relu_maps(shape, seed=1)
    mask = make_mask(kind, shape, seed=2)
    got = spatial_dependence(
        x,
        kernel,
        dilation=dilation,
        padding=list(padding),
        engine=engine,
        diag_removal=diag_removal,
        mask=mask,
    )
    want = reference_nmi(
        x.numpy(), kernel, list(dilation), [(p, p) for p in padding], diag_removal, mask.numpy()
    )
    np.testing.assert_array_equal(np.isnan(got.numpy()), np.isnan(want))
    assert np.nanmax(np.abs(got.numpy() - want)) < 1e-6


@pytest.mark.parametrize("shape,kernel,dilation,padding,kind", MASK_CASES[:4])
def test_masked_autocorrelation_matches_reference(shape, kernel, dilation, padding, kind):
    x = relu_maps(shape, seed=3)
    mask = make_mask(kind, shape, seed=4)
    got = spatial_dependence(
        x, kernel, dilation=dilation, padding=list(padding), measure="autocorrelation", mask=mask
    )
    want = reference_autocorrelation(
        x.numpy(), kernel, list(dilation), [(p, p) for p in padding], mask.numpy()
    )
    np.testing.assert_allclose(got.numpy(), want, atol=1e-9)


@pytest.mark.parametrize(
    "measure,engine", [("nmi", e) for e in ENGINES] + [("autocorrelation", "auto")]
)
def test_all_true_mask_is_no_mask_and_masked_values_are_never_read(measure, engine):
    x = relu_maps((5, 3, 10, 10), seed=5)
    kw = dict(padding=1, measure=measure, engine=engine)
    plain = spatial_dependence(x, (3, 3), **kw)
    ones = torch.ones(5, 10, 10, dtype=torch.bool)
    torch.testing.assert_close(
        spatial_dependence(x, (3, 3), mask=ones, **kw), plain, rtol=0, atol=0
    )
    mask = prefix_mask((5, 10, 10), seed=6)
    masked = spatial_dependence(x, (3, 3), mask=mask, **kw)
    # whatever the masked positions hold (NaN, inf, huge values) changes nothing
    junk = torch.where(
        mask.unsqueeze(1),
        x,
        torch.tensor([math.nan, math.inf, 1e300]).repeat(2)[:3].view(1, 3, 1, 1),
    )
    torch.testing.assert_close(
        spatial_dependence(junk, (3, 3), mask=mask, **kw), masked, rtol=0, atol=0
    )


@pytest.mark.parametrize(
    "measure,engine", [("nmi", e) for e in ENGINES] + [("autocorrelation", "auto")]
)
def test_dependence_does_not_depend_on_how_far_clips_are_padded(measure, engine):
    """Variable-length clips zero-padded to 30 or to 60 samples, with their masks: the same S.

    (Both batches pad the longest clip, 24 samples, by more than the largest offset, 4, so no
    real sample pairs with the layer's own padding at the right end in either.)
    """
    g = torch.Generator().manual_seed(7)
    lengths = [9, 24, 17, 13]
    clips = [
        torch.relu(torch.randn(4, n, generator=g, dtype=torch.float64).cumsum(1)) for n in lengths
    ]

    def batch(total):
        x = torch.zeros(len(clips), 4, total, dtype=torch.float64)
        mask = torch.zeros(len(clips), total, dtype=torch.bool)
        for i, clip in enumerate(clips):
            x[i, :, : clip.shape[1]] = clip
            mask[i, : clip.shape[1]] = True
        return x, mask

    kw = dict(padding=2, dilation=2, measure=measure, engine=engine)
    short = spatial_dependence(*batch(30)[:1], (5,), mask=batch(30)[1], **kw)
    long = spatial_dependence(*batch(60)[:1], (5,), mask=batch(60)[1], **kw)
    tol = 0 if measure == "nmi" else 1e-12  # the same pairs; moment sums differ in rounding only
    torch.testing.assert_close(long, short, rtol=0, atol=tol)
    unmasked = spatial_dependence(batch(60)[0], (5,), **kw)
    assert (unmasked - short).abs().max() > 0.01  # the tail does count when it is not masked


def test_mask_list_matches_maps_and_errors_name_the_problem():
    x = relu_maps((4, 3, 8, 8))
    mask = prefix_mask((4, 8, 8), seed=8)
    whole = spatial_dependence(x, (3, 3), padding=1, mask=mask)
    parts = spatial_dependence(list(x.split(2)), (3, 3), padding=1, mask=list(mask.split(2)))
    torch.testing.assert_close(parts, whole, rtol=0, atol=0)
    with pytest.raises(TypeError, match="bool tensor"):
        spatial_dependence(x, (3, 3), mask=mask.long())
    with pytest.raises(ValueError, match=r"expected \(N, \*spatial\)"):
        spatial_dependence(x, (3, 3), mask=mask[:, :4])
    with pytest.raises(TypeError, match="one mask or None per map"):
        spatial_dependence(list(x.split(2)), (3, 3), mask=mask)
    with pytest.raises(TypeError, match="a list of 2"):
        spatial_dependence(list(x.split(2)), (3, 3), mask=[mask])


# ---- live kernel positions --------------------------------------------------------------------
def reference_live(x, kernel, dilation, pads, mask=None, padding_mode="zeros"):
    """Live positions from explicit pairs: inside the unpadded map (zeros) or the padded one."""
    inside = [(0, 0)] * len(kernel) if padding_mode == "zeros" else pads
    live = np.zeros(kernel, bool)
    for idx, _, _, kept in reference_pairs(np.asarray(x), kernel, dilation, inside, mask):
        live[idx] = kept.sum() > 0
    live[tuple(k // 2 for k in kernel)] = True
    return live


LIVE_CASES = [
    # (map shape, kernel, dilation, padding, padding mode, mask kind, expected live count)
    ((4, 3, 8, 8), (3, 3), (12, 12), (12, 12), "zeros", None, 1),  # atrous rate 12 on 8x8
    ((16, 2, 1, 1, 1), (7, 7, 7), (1, 1, 1), (3, 3, 3), "zeros", None, 1),  # 1x1x1 bottleneck
    ((4, 3, 6), (5,), (4,), (8,), "zeros", None, 3),  # ±4 fit in 6 samples, ±8 do not
    ((4, 3, 12, 12), (3, 3), (1, 1), (1, 1), "zeros", None, 9),
    ((3, 2, 5, 6, 7), (3, 3, 3), (1, 1, 1), (1, 1, 1), "zeros", None, 27),
    ((4, 3, 10), (5,), (1,), (2,), "zeros", "first2", 3),  # only ±1 see two real samples
    ((4, 3, 10, 10), (3, 3), (1, 1), (1, 1), "zeros", "none", 1),
    ((4, 3, 3), (3,), (3,), (3,), "zeros", None, 1),
    ((4, 3, 3), (3,), (3,), (3,), "replicate", None, 3),  # the border holds real values
    ((4, 3, 4, 4), (3, 3), (3, 3), (3, 3), "circular", "random", None),
]


def live_mask(kind, shape):
    spatial = (shape[0], *shape[2:])
    if kind is None:
        return None
    if kind == "first2":
        mask = torch.zeros(spatial, dtype=torch.bool)
        mask[:, :2] = True
        return mask
    if kind == "none":
        return torch.zeros(spatial, dtype=torch.bool)
    return random_mask(spatial, seed=9, p=0.3)


@pytest.mark.parametrize(
    "measure,engine", [("nmi", e) for e in ENGINES] + [("autocorrelation", "auto")]
)
@pytest.mark.parametrize("shape,kernel,dilation,padding,mode,kind,count", LIVE_CASES)
def test_live_positions(measure, engine, shape, kernel, dilation, padding, mode, kind, count):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    mask = live_mask(kind, shape)
    geometry = PairGeometry.create(
        kernel, dilation=dilation, padding=list(padding), padding_mode=mode
    )
    acc = make_accumulator(measure, geometry, engine=engine)
    for _ in range(acc.passes):
        for part, m in zip(x.split(2), [None] * 99 if mask is None else mask.split(2)):
            acc.observe(part, m)
        acc.end_pass()
    s = acc.result()
    assert acc.live.dtype == torch.bool and acc.live.shape == kernel
    pads = [(p, p) for p in padding]
    want = reference_live(
        x.numpy(), kernel, list(dilation), pads, None if mask is None else mask.numpy(), mode
    )
    np.testing.assert_array_equal(acc.live.numpy(), want)
    if count is not None:
        assert int(acc.live.sum()) == count
    assert s.shape == (shape[1], *kernel)
