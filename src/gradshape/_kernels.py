"""Compiled CPU kernels for the NMI accumulator (optional: needs numba).

:func:`joint_counts` adds, for every channel c and pixel offset δ, the joint counts of the pairs
(P, Q) = (x̂[n, c, s], x̂[n, c, s + δ]) of the zero-padded map x̂ to a B×B histogram, reading
only the unpadded map x.  The bin of a value v on an axis with range [lo, hi] is
``min(floor((v·u − lo)·B/(hi − lo)), B − 1)`` (u: an optional per-channel power of two; the
maximum lands in the last bin), with the same float64 operations in the same order as the torch
engine (``gradshape.dependence._TorchPlan``), so that the two count identically.

How (channels run in parallel, one channel per task):

* The channel's distinct binnings (lo, B/(hi − lo), B) among its offsets' P and Q axes are
  found first; usually there is one, since an offset's window covers the whole map when the
  padding reaches it.
* Each image of the channel is binned once per distinct binning into a small scratch image of
  16-bit bin numbers laid out like the *padded* image: its border holds the padding value's
  bin, written once per channel, so no padded copy of the map is ever made.  Bin numbers are
  stored plus one; 0 marks a pixel to skip (masked out, or 0 under ``skip_zero``), so a pair
  with a skipped end lands in row or column 0 of the histogram, which is dropped at the end.
  The P-side scratch holds the bin already multiplied by the row length B + 1.
* Every offset then walks the rows of its window: one add and one increment per pair into a
  per-channel histogram of (B + 1)² counts that stays in the core's cache.  Two copies of it,
  alternating between neighbouring pixels, break the store-to-load chains that runs of equal
  values (the zeros of a ReLU map) would otherwise create.  Indices are unsigned, which spares
  numba's negative-index fix-ups: measured, that alone halves the cost of this loop.
"""

from __future__ import annotations

import threading

import numpy as np

try:
    import numba
except ImportError:  # pragma: no cover - exercised when the optional extra is absent
    numba = None

__all__ = [
    "available",
    "joint_counts",
    "set_thread_count",
    "thread_count",
    "warm_up",
    "warm_up_in_background",
]


def available() -> bool:
    """True when numba is importable and the compiled CPU path can be used."""
    return numba is not None


def _require() -> None:
    if numba is None:  # pragma: no cover
        raise RuntimeError(
            "gradshape's compiled CPU path needs numba: pip install 'gradshape[fast]'"
        )


if numba is not None:

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _joint_counts(
        x, mask, use_mask, dims, pads, offsets, lo_p, sc_p, lo_q, sc_q, nbins, unit0, unit1,
        scaled, skip_zero, out,
    ):  # fmt: skip
        n_img, n_ch = x.shape[0], x.shape[1]
        depth, height, width = dims[0], dims[1], dims[2]
        n_off = offsets.shape[0]
        pd, ph, pw = pads[0, 0], pads[1, 0], pads[2, 0]
        sd = depth + pads[0, 0] + pads[0, 1]
        sh = height + pads[1, 0] + pads[1, 1]
        sw = width + pads[2, 0] + pads[2, 1]
        bmax = out.shape[3]
        b1 = bmax + 1
        one = np.uint64(1)
        two = np.uint64(2)
        for c in numba.prange(n_ch):
            # the channel's distinct binnings; key[o] = (P binning, Q binning), -1: no pairs
            k_lo = np.empty(2 * n_off)
            k_sc = np.empty(2 * n_off)
            k_nb = np.empty(2 * n_off, np.int64)
            key = np.full((n_off, 2), -1, np.int64)
            n_keys = 0
            for o in range(n_off):
                if (
                    nbins[o, c] == 0
                    or sd <= abs(offsets[o, 0])
                    or sh <= abs(offsets[o, 1])
                    or sw <= abs(offsets[o, 2])
                ):
                    continue
                for axis in range(2):
                    lo = lo_p[o, c] if axis == 0 else lo_q[o, c]
                    sc = sc_p[o, c] if axis == 0 else sc_q[o, c]
                    nb = nbins[o, c]
                    found = -1
                    for k in range(n_keys):
                        if k_lo[k] == lo and k_sc[k] == sc and k_nb[k] == nb:
                            found = k
                            break
                    if found < 0:
                        found = n_keys
                        k_lo[found] = lo
                        k_sc[found] = sc
                        k_nb[found] = nb
                        n_keys += 1
                    key[o, axis] = found
            # padded scratch images, border = the padding value's bin (plus one; 0 = skip)
            bq_img = np.empty((n_keys, sd * sh * sw), np.int16)
            bp_img = np.empty((n_keys, sd * sh * sw), np.int16)
            for k in range(n_keys):
                pad = 0
                if not skip_zero:
                    top = float(k_nb[k] - 1)
                    t = (0.0 - k_lo[k]) * k_sc[k]
                    t = top if t >= top else (t if t >= 0.0 else 0.0)
                    pad = int(t) + 1
                bq_img[k, :] = pad
                bp_img[k, :] = pad * b1
            hist = np.zeros((n_off, 2, b1 * b1), np.int64)
            u0 = unit0[c]
            u1 = unit1[c]
            for n in range(n_img):
                img = x[n, c]
                real = mask[n] if use_mask else mask[0]
                for k in range(n_keys):
                    lo = k_lo[k]
                    sc = k_sc[k]
                    top = float(k_nb[k] - 1)
                    rq = bq_img[k]
                    rp = bp_img[k]
                    for z in range(depth):
                        for y in range(height):
                            src = np.uint64((z * height + y) * width)
                            dst = np.uint64(((z + pd) * sh + y + ph) * sw + pw)
                            for i in range(np.uint64(width)):
                                v = img[src + i]
                                # the same float64 operations, in the same order, as the
                                # torch engine: bins must agree bit for bit
                                t = ((v * u0 * u1 - lo) if scaled else (v - lo)) * sc
                                # clamping before the conversion is the same as after it
                                # for every finite t, and keeps NaN (masked values) defined
                                t = top if t >= top else (t if t >= 0.0 else 0.0)
                                b = int(t) + 1
                                rq[dst + i] = b
                                rp[dst + i] = b * b1
                            if use_mask or skip_zero:
                                for i in range(np.uint64(width)):
                                    if (use_mask and not real[src + i]) or (
                                        skip_zero and img[src + i] == 0
                                    ):
                                        rq[dst + i] = 0
                                        rp[dst + i] = 0
                for o in range(n_off):
                    kp = key[o, 0]
                    if kp < 0:
                        continue
                    bp = bp_img[kp]
                    bq = bq_img[key[o, 1]]
                    h0 = hist[o, 0]
                    h1 = hist[o, 1]
                    dz, dy, dx = offsets[o, 0], offsets[o, 1], offsets[o, 2]
                    x0 = max(0, -dx)
                    x1 = min(sw, sw - dx)
                    for zs in range(max(0, -dz), min(sd, sd - dz)):
                        for ys in range(max(0, -dy), min(sh, sh - dy)):
                            # Unsigned indices: numba then skips its negative-index fix-ups,
                            # which otherwise double the cost of this loop.  q = p + shift,
                            # with shift < 0 wrapping around modulo 2**64 to the right index.
                            start = (zs * sh + ys) * sw + x0
                            i = np.uint64(start)
                            end = np.uint64(start + x1 - x0)
                            shift = np.uint64(start + (dz * sh + dy) * sw + dx) - i
                            while i + one < end:
                                h0[np.uint64(bp[i]) + np.uint64(bq[i + shift])] += 1
                                h1[np.uint64(bp[i + one]) + np.uint64(bq[i + one + shift])] += 1
                                i += two
                            if i < end:
                                h0[np.uint64(bp[i]) + np.uint64(bq[i + shift])] += 1
            for o in range(n_off):
                for i in range(bmax):
                    for j in range(bmax):
                        at = (i + 1) * b1 + j + 1
                        out[o, c, i, j] += hist[o, 0, at] + hist[o, 1, at]


def thread_count() -> int:
    """numba's current thread count (1 without numba)."""
    return numba.get_num_threads() if numba is not None else 1


def set_thread_count(count: int) -> None:
    """Set numba's thread count, clipped to ``[1, NUMBA_NUM_THREADS]``."""
    if numba is not None:
        numba.set_num_threads(max(1, min(int(count), numba.config.NUMBA_NUM_THREADS)))


def joint_counts(
    x: np.ndarray,
    mask: np.ndarray | None,
    padding: tuple[tuple[int, int], ...],
    offsets: np.ndarray,
    lo_p: np.ndarray,
    hi_p: np.ndarray,
    lo_q: np.ndarray,
    hi_q: np.ndarray,
    nbins: np.ndarray,
    units: tuple[np.ndarray, np.ndarray] | None,
    skip_zero: bool,
    out: np.ndarray,
) -> None:
    """Add the joint counts of the zero-padded map to ``out`` in place.

    Args:
        x: ``(N, C, *spatial)`` float32/float64 *unpadded* map, 1 to 3 spatial dims,
            C-contiguous.
        mask: ``(N, *spatial)`` bool, True where a pixel is real; pairs with a False end are
            not counted.  None: every pixel is real.  Padding positions are never masked.
        padding: ``(before, after)`` zero padding per spatial dim.
        offsets: ``(O, dims)`` int64 displacements in the padded map.
        lo_p, hi_p, lo_q, hi_q: ``(O, C)`` float64 ranges of the P and Q axes (in units of
            ``units``).
        nbins: ``(O, C)`` int64 bin counts B; 0 where an (offset, channel) has no pair to
            count (every pair has a skipped end), which is then not visited.
        units: None, or two ``(C,)`` float64 factors each value is multiplied by before
            binning (powers of two, see :meth:`NMIAccumulator._rescale_overflowing_ranges`).
        skip_zero: drop pairs in which either value is 0 (the padding included).
        out: ``(O, C, Bmax, Bmax)`` int64 histogram, accumulated into.
    """
    _require()
    n_img, channels = x.shape[:2]
    dims = x.ndim - 2
    if not 1 <= dims <= 3:
        raise ValueError(f"joint_counts: 1 to 3 spatial dims, got x of shape {x.shape}")
    spatial = np.array([1] * (3 - dims) + list(x.shape[2:]), dtype=np.int64)
    flat = x.reshape(n_img, channels, -1)
    if mask is None:
        mask_flat, use_mask = np.ones((1, 1), dtype=np.bool_), False
    else:
        mask_flat, use_mask = np.ascontiguousarray(mask.reshape(n_img, -1)), True
    # 1-D and 2-D maps as 3-D maps of depth (and height) 1
    pads = np.zeros((3, 2), dtype=np.int64)
    pads[3 - dims :] = np.asarray(padding, dtype=np.int64).reshape(dims, 2)
    offsets3 = np.zeros((len(offsets), 3), dtype=np.int64)
    offsets3[:, 3 - dims :] = np.asarray(offsets, dtype=np.int64).reshape(-1, dims)
    if units is None:
        ones = np.ones(channels)
        units, scaled = (ones, ones), False
    else:
        scaled = True

    def scale(lo, hi, nb):
        width = hi - lo
        return np.where(width > 0, nb / np.where(width > 0, width, 1.0), 0.0)

    _joint_counts(
        flat,
        mask_flat,
        use_mask,
        spatial,
        pads,
        offsets3,
        lo_p,
        scale(lo_p, hi_p, nbins),
        lo_q,
        scale(lo_q, hi_q, nbins),
        nbins,
        np.ascontiguousarray(units[0], dtype=np.float64),
        np.ascontiguousarray(units[1], dtype=np.float64),
        scaled,
        skip_zero,
        out,
    )


def warm_up() -> None:
    """Load the compiled kernel for float32 and float64 maps, compiling it only if uncached.

    A process's first call otherwise pays for it inside the first refresh: about 1 s here when
    numba's on-disk cache hits (numba's own lazy imports and the cached machine code), tens of
    seconds when it has to compile.  Safe to run in a background thread (numba serialises its
    compilations); a no-op without numba.
    """
    if numba is None:
        return
    offsets = np.ones((1, 1), dtype=np.int64)
    ranges = np.zeros((1, 1))
    nbins = np.ones((1, 1), dtype=np.int64)
    for dtype in (np.float32, np.float64):
        out = np.zeros((1, 1, 1, 1), dtype=np.int64)
        x = np.zeros((1, 1, 2), dtype=dtype)
        joint_counts(
            x, None, ((0, 0),), offsets, ranges, ranges, ranges, ranges, nbins, None, False, out
        )


_warming: threading.Thread | None = None
_warming_lock = threading.Lock()


def warm_up_in_background() -> None:
    """Start :func:`warm_up` in a daemon thread, once per process (a no-op without numba).

    Called when a layer is attached that the compiled engine may measure, so that loading (or
    compiling) the kernel overlaps the warm-up epoch instead of delaying the first refresh.
    """
    global _warming
    if numba is None:
        return
    with _warming_lock:
        if _warming is None:
            _warming = threading.Thread(
                target=warm_up, name="gradshape-kernel-warm-up", daemon=True
            )
            _warming.start()
