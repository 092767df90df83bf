"""Compiled joint-histogram counting for the CPU (optional: needs numba).

:func:`joint_counts_2d` counts, for every channel c and pixel offset δ = (dy, dx), the pairs
(P, Q) = (x[n, c, y, x], x[n, c, y + dy, x + dx]) of a padded feature map into a B×B histogram.
The bin of a value v on an axis with range [lo, hi] is ``min(floor((v − lo)·B/(hi − lo)), B − 1)``
(the maximum lands in the last bin).  Channels run in parallel; each channel's map is binned
once into small integers and reused by every offset whose ranges and bin count match that
binning, so the inner loop is two loads and one increment into a cache-resident histogram.
Offsets whose ranges differ (padding narrower than the offset) bin on the fly, exactly.
"""

from __future__ import annotations

import numpy as np

try:
    import numba
except ImportError:  # pragma: no cover - exercised when the optional extra is absent
    numba = None

__all__ = ["available", "joint_counts_2d"]


def available() -> bool:
    """True when numba is importable and the compiled CPU path can be used."""
    return numba is not None


if numba is not None:

    @numba.njit(cache=True, nogil=True)
    def _bin(v, lo, scale, nbins):
        b = int((v - lo) * scale)
        if b >= nbins:
            b = nbins - 1
        elif b < 0:
            b = 0
        return b

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _counts(xp, dys, dxs, lo_p, sc_p, lo_q, sc_q, nbins, lo_g, sc_g, nb_g, skip_zero, out):
        n_img, n_ch, height, width = xp.shape
        n_off = dys.shape[0]
        for c in numba.prange(n_ch):
            binned = np.empty((n_img, height, width), dtype=np.int16)
            for n in range(n_img):
                for y in range(height):
                    for x in range(width):
                        binned[n, y, x] = _bin(xp[n, c, y, x], lo_g[c], sc_g[c], nb_g[c])
            for o in range(n_off):
                dy = dys[o]
                dx = dxs[o]
                nb = nbins[o, c]
                y0 = max(0, -dy)
                y1 = min(height, height - dy)
                x0 = max(0, -dx)
                x1 = min(width, width - dx)
                hist = out[o, c]
                fast = (
                    nb == nb_g[c]
                    and lo_p[o, c] == lo_g[c]
                    and lo_q[o, c] == lo_g[c]
                    and sc_p[o, c] == sc_g[c]
                    and sc_q[o, c] == sc_g[c]
                    and not skip_zero
                )
                for n in range(n_img):
                    for y in range(y0, y1):
                        if fast:
                            for x in range(x0, x1):
                                hist[binned[n, y, x], binned[n, y + dy, x + dx]] += 1
                        else:
                            for x in range(x0, x1):
                                p = xp[n, c, y, x]
                                q = xp[n, c, y + dy, x + dx]
                                if skip_zero and (p == 0 or q == 0):
                                    continue
                                bp = _bin(p, lo_p[o, c], sc_p[o, c], nb)
                                bq = _bin(q, lo_q[o, c], sc_q[o, c], nb)
                                hist[bp, bq] += 1


def joint_counts_2d(
    xp: np.ndarray,
    offsets: np.ndarray,
    lo_p: np.ndarray,
    hi_p: np.ndarray,
    lo_q: np.ndarray,
    hi_q: np.ndarray,
    nbins: np.ndarray,
    lo_g: np.ndarray,
    hi_g: np.ndarray,
    nbins_g: np.ndarray,
    skip_zero: bool,
    out: np.ndarray,
) -> None:
    """Add the joint counts of a padded map to ``out`` in place.

    Args:
        xp: ``(N, C, H, W)`` float32/float64 padded map, C-contiguous.
        offsets: ``(O, 2)`` int64 offsets (dy, dx).
        lo_p, hi_p, lo_q, hi_q: ``(O, C)`` float64 ranges of the P and Q axes.
        nbins: ``(O, C)`` int64 bin counts B.
        lo_g, hi_g, nbins_g: ``(C,)`` the binning reused where an offset's ranges match it.
        skip_zero: drop pairs in which either value is 0.
        out: ``(O, C, Bmax, Bmax)`` int64 histogram, accumulated into.
    """
    if numba is None:  # pragma: no cover
        raise RuntimeError(
            "gradshape's compiled CPU path needs numba: pip install 'gradshape[fast]'"
        )

    def scale(lo, hi, nb):
        width = hi - lo
        return np.where(width > 0, nb / np.where(width > 0, width, 1.0), 0.0)

    _counts(
        xp,
        np.ascontiguousarray(offsets[:, 0]),
        np.ascontiguousarray(offsets[:, 1]),
        lo_p,
        scale(lo_p, hi_p, nbins),
        lo_q,
        scale(lo_q, hi_q, nbins),
        nbins,
        lo_g,
        scale(lo_g, hi_g, nbins_g),
        nbins_g,
        skip_zero,
        out,
    )
