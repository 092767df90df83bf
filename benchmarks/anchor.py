"""The SGS authors' dependence algorithm, written from the paper, as the benchmarks' anchor.

Detkov et al. (ICLR 2023, Sec. 3.3 and Appendix A.5) compute the spatial dependence of a layer
input x of shape ``(N, C, H, W)`` with a plain loop: zero-pad x as the layer pads it, then for
every channel c and every kernel offset δ = (dy, dx) (one of each ±δ pair, since
S(δ) = S(−δ)), flatten the pixel values P = x̂[:, c, y, x] and their neighbours
Q = x̂[:, c, y + dy, x + dx] (every location where both lie inside the padded map) in float32
numpy, histogram (P, Q) with ``fast_histogram.histogram2d`` using Sturges' B = 1 + ⌈log₂ n⌉ bins
per axis (n pairs) over each axis's own [min, max], and take

    S[c, δ] = (H(P) + H(Q) − H(P, Q)) / H(P, Q)

from the Shannon entropies (bits) of the counts; the centre is 1.  Maps of several batches are
concatenated along N first, as the authors' code keeps every batch's maps.

One deliberate difference from the authors' code, the same one the library makes: the maximum
is counted.  ``fast_histogram`` bins ``lo ≤ v < hi`` with ``floor((v − lo)·B/(hi − lo))`` in
float64 (the library's formula) and drops values equal to the upper edge, so the upper edge used
here is the maximum raised by a relative :data:`RANGE_EPSILON` of the axis width (at least one
float64 ulp).  Every bin is then wider by that factor, so a value lying exactly on an interior
bin edge (or within about 1e-9 of the width above it) lands one bin lower than in the library.
Real-valued activations essentially never do; integer-valued maps can, and then S may differ
(``tests/test_anchor.py`` shows the case).  A constant axis gets the range [v, v + 1] (one
occupied bin), and a channel with H(P, Q) = 0 gets NaN, as in the library.

Only what the benchmarks need is covered: 2-D maps, odd kernels, dilation 1, zero padding, the
NMI measure without diagonal removal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from fast_histogram import histogram2d

__all__ = ["RANGE_EPSILON", "anchor_dependence", "counting_range", "nmi_from_pairs"]

RANGE_EPSILON = 1e-9


def _entropy(counts: np.ndarray) -> float:
    """Shannon entropy in bits of a count array (zero counts skipped)."""
    p = counts[counts > 0]
    p = p / p.sum()
    return float(-(p * np.log2(p)).sum())


def counting_range(v: np.ndarray) -> tuple[float, float]:
    """``[min, max]`` of ``v`` with the upper edge raised so ``fast_histogram`` counts the max."""
    lo, hi = float(v.min()), float(v.max())
    if hi == lo:
        return lo, lo + 1.0
    return lo, max(hi + (hi - lo) * RANGE_EPSILON, float(np.nextafter(hi, math.inf)))


def nmi_from_pairs(p: np.ndarray, q: np.ndarray) -> float:
    """Normalised mutual information of two equal-length 1-D samples (NaN if H(P, Q) = 0)."""
    bins = 1 + math.ceil(math.log2(p.size))
    joint = histogram2d(p, q, bins=bins, range=[counting_range(p), counting_range(q)])
    h_joint = _entropy(joint)
    if h_joint == 0:
        return math.nan
    return (_entropy(joint.sum(axis=1)) + _entropy(joint.sum(axis=0)) - h_joint) / h_joint


def anchor_dependence(
    maps: torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray],
    kernel_size: tuple[int, int] = (3, 3),
    padding: tuple[int, int] = (1, 1),
) -> torch.Tensor:
    """Per-channel NMI ``(C, kh, kw)`` (float64), the layout of ``gradshape.spatial_dependence``.

    Args:
        maps: one ``(N, C, H, W)`` map or a sequence of them (concatenated along N).
        kernel_size: odd kernel height and width.
        padding: zero padding of the layer, per side, for height and width.
    """
    if isinstance(maps, (torch.Tensor, np.ndarray)):
        maps = [maps]
    arrays = [m.detach().cpu().numpy() if isinstance(m, torch.Tensor) else m for m in maps]
    x = np.concatenate([np.asarray(a, dtype=np.float32) for a in arrays])
    if x.ndim != 4:
        raise ValueError(f"anchor_dependence: maps must be (N, C, H, W), got shape {x.shape}")
    kh, kw = kernel_size
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"anchor_dependence: kernel_size must be odd, got {kernel_size}")
    ph, pw = padding
    x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    _, channels, height, width = x.shape
    cy, cx = kh // 2, kw // 2
    offsets = [(dy, dx) for dy in range(-cy, cy + 1) for dx in range(-cx, cx + 1)]
    half = offsets[len(offsets) // 2 + 1 :]  # after the centre: one of each ±δ pair
    s = np.ones((channels, kh, kw))
    for c in range(channels):
        xc = x[:, c]
        for dy, dx in half:
            y0, y1 = max(0, -dy), min(height, height - dy)
            x0, x1 = max(0, -dx), min(width, width - dx)
            if y1 <= y0 or x1 <= x0:
                value = math.nan
            else:
                p = xc[:, y0:y1, x0:x1].ravel()
                q = xc[:, y0 + dy : y1 + dy, x0 + dx : x1 + dx].ravel()
                value = nmi_from_pairs(p, q)
            s[c, cy + dy, cx + dx] = s[c, cy - dy, cx - dx] = value
    return torch.from_numpy(s)
