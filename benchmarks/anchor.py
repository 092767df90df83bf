"""The SGS authors' dependence algorithm, written from the paper, as the benchmarks' anchor.

Detkov et al. (ICLR 2023, Sec. 3.3 and Appendix A.5) compute the spatial dependence of a layer
input x of shape ``(N, C, H, W)`` in two steps, which this module keeps apart so that the
benchmarks time each one as the authors' code runs it:

1. :func:`authors_input`, inside their forward pass: the refresh batches are concatenated
   before one forward, and a forward hook zero-pads each conv's input as the layer pads it
   (``F.pad`` on the torch tensor) and keeps it on the host; the loop then sees it as a numpy
   view, without a copy.
2. :func:`anchor_loop`, their histogram stage: for every channel c and every kernel offset
   δ = (dy, dx) (one of each ±δ pair, since S(δ) = S(−δ)), flatten the pixel values
   P = x̂[:, c, y, x] and their neighbours Q = x̂[:, c, y + dy, x + dx] (every location where
   both lie inside the padded map; flattening a strided window copies it), histogram (P, Q)
   with ``fast_histogram.histogram2d`` using Sturges' B = 1 + ⌈log₂ n⌉ bins per axis (n pairs)
   over each axis's own [min, max], and take

       S[c, δ] = (H(P) + H(Q) − H(P, Q)) / H(P, Q)

   from the Shannon entropies (bits) of the counts; the centre is 1.

Nothing else is done around the loop: no copy of the map, no change of dtype (their maps are
float32), no padding inside it.  :func:`anchor_dependence` runs both steps.

One deliberate difference from the authors' code, the same one the library makes: the maximum
is counted.  ``fast_histogram`` bins ``lo ≤ v < hi`` with ``floor((v − lo)·B/(hi − lo))`` in
float64 (the library's formula) and drops values equal to the upper edge, so the upper edge used
here is the maximum raised by a relative :data:`RANGE_EPSILON` of the axis width (at least one
float64 ulp).  Every bin is then wider by that factor, so a value lying exactly on an interior
bin edge (or within about 1e-9 of the width above it) lands one bin lower than in the library.
Real-valued activations essentially never do; integer-valued maps can, and then S may differ
(``tests/test_anchor.py`` shows the case).  A constant axis gets the range [v, v + 1] (one
occupied bin), and a channel with H(P, Q) = 0 gets NaN, as in the library.  The time this
costs is that of one more comparison per histogram call.

Only what the benchmarks need is covered: 2-D maps, odd kernels, dilation 1, zero padding, the
NMI measure without diagonal removal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from fast_histogram import histogram2d

__all__ = [
    "RANGE_EPSILON",
    "anchor_dependence",
    "anchor_loop",
    "authors_input",
    "counting_range",
    "nmi_from_pairs",
]

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


def authors_input(
    maps: torch.Tensor | Sequence[torch.Tensor], padding: tuple[int, int] = (1, 1)
) -> np.ndarray:
    """What the authors' forward hook hands their loop: the padded map, as a numpy array.

    Args:
        maps: one ``(N, C, H, W)`` map or a sequence of them (the authors concatenate the
            refresh batches before their single forward, so the hook sees one map).
        padding: zero padding of the layer, per side, for height and width.

    Returns:
        ``(N, C, H + 2·ph, W + 2·pw)`` array in the maps' dtype, sharing memory with the padded
        tensor.
    """
    x = maps if isinstance(maps, torch.Tensor) else torch.cat(list(maps))
    if x.dim() != 4:
        raise ValueError(f"authors_input: maps must be (N, C, H, W), got shape {tuple(x.shape)}")
    ph, pw = padding
    return F.pad(x.detach(), (pw, pw, ph, ph)).cpu().numpy()


def anchor_loop(padded: np.ndarray, kernel_size: tuple[int, int] = (3, 3)) -> torch.Tensor:
    """The authors' per-channel, per-offset histogram loop on a padded map (see the module).

    Args:
        padded: ``(N, C, H, W)`` map, already padded as the layer pads (:func:`authors_input`).
        kernel_size: odd kernel height and width.

    Returns:
        Per-channel NMI ``(C, kh, kw)`` (float64), the layout of ``gradshape.spatial_dependence``.
    """
    if padded.ndim != 4:
        raise ValueError(f"anchor_loop: the map must be (N, C, H, W), got shape {padded.shape}")
    kh, kw = kernel_size
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"anchor_loop: kernel_size must be odd, got {kernel_size}")
    _, channels, height, width = padded.shape
    cy, cx = kh // 2, kw // 2
    offsets = [(dy, dx) for dy in range(-cy, cy + 1) for dx in range(-cx, cx + 1)]
    half = offsets[len(offsets) // 2 + 1 :]  # after the centre: one of each ±δ pair
    s = np.ones((channels, kh, kw))
    for c in range(channels):
        xc = padded[:, c]
        for dy, dx in half:
            y0, y1 = max(0, -dy), min(height, height - dy)
            x0, x1 = max(0, -dx), min(width, width - dx)
            if y1 <= y0 or x1 <= x0:
                value = math.nan
            else:
                p = xc[:, y0:y1, x0:x1].flatten()
                q = xc[:, y0 + dy : y1 + dy, x0 + dx : x1 + dx].flatten()
                value = nmi_from_pairs(p, q)
            s[c, cy + dy, cx + dx] = s[c, cy - dy, cx - dx] = value
    return torch.from_numpy(s)


def anchor_dependence(
    maps: torch.Tensor | Sequence[torch.Tensor],
    kernel_size: tuple[int, int] = (3, 3),
    padding: tuple[int, int] = (1, 1),
) -> torch.Tensor:
    """Both steps: :func:`anchor_loop` of :func:`authors_input` (``(C, kh, kw)``, float64)."""
    return anchor_loop(authors_input(maps, padding), kernel_size)
