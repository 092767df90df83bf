"""Spatial dependence of feature maps: normalised mutual information and autocorrelation.

For a convolution with kernel K (any number of spatial dims), dilation d and padding p, and its
input x of shape ``(N, C, *spatial)``, the dependence of kernel position i in channel c is

    S[c, i] = dep(P, Q),   P = x̂[n, c, s],  Q = x̂[n, c, s + δ_i]

over every image n and every location s where both lie inside x̂, the input padded exactly as
the layer pads it.  δ_i = (i − K//2)·d is the position's displacement from the kernel centre
(for an even K the centre is index K//2, PyTorch's alignment for symmetric padding); the
centre itself has S = 1.  ``dep`` is one of (paper Sec. 3.3 and its autocorrelation ablation):

* ``"nmi"``: Ĩ(P; Q) = (H(P) + H(Q) − H(P, Q)) / H(P, Q) (paper Eq. 7), Shannon entropies of a
  joint histogram with B = 1 + ⌈log₂ n⌉ bins per axis (n pairs), each axis spanning the
  [min, max] of its own values, the maximum included in the last bin.  With
  ``diag_removal=True`` (the paper's ImageNet setting, as the authors' code does it) pairs in
  which either value is 0 are dropped, and so are the counts on the histogram's diagonal
  (pairs of near-equal values); ranges and B are then taken over the kept pairs.
* ``"autocorrelation"``: |r|, the absolute Pearson correlation of P and Q.

A channel for which ``dep`` is undefined (constant values: H(P, Q) = 0 or zero variance; no
pairs at all) gets NaN, which :func:`gradshape.scaling.dependence_to_scaling` skips.

Since P and Q for −δ are Q and P for δ, S(δ) = S(−δ): each ± pair of offsets is computed once.

**Masks.**  :meth:`DependenceAccumulator.observe` (and :func:`spatial_dependence`) take an
optional bool mask ``(N, *spatial)`` of the unpadded map, True where x is real signal (False:
for example the zero-padded tail of a variable-length clip).  Pairs with either end at a
masked position are left out of everything: ranges, pair counts, histograms, moments.
Positions in the layer's own padding are never masked, so pairs with them keep the paper's
semantics.  Values at masked positions are never used (they may be NaN).

**Live positions.**  After the first pass, :attr:`DependenceAccumulator.live` tells which kernel
positions had at least one pair with both ends inside the unpadded map and unmasked.  A
position without one (an offset, times the dilation, beyond every map it saw) multiplies only
padding: its weight's gradient is exactly 0, and its S, computed from padding pairs, is not a
measure of the map; what to do with such taps is the caller's decision.  With a padding mode
other than ``"zeros"``
the border holds copies of map values, and a position is live when it had any pair.

Pairs are aggregated over many batches before the statistic is taken.  The accumulators here
stream: :class:`NMIAccumulator` takes two passes over the batches (ranges and pair counts
first, histograms second) and keeps only O(C·K·B²) numbers between batches, so memory does not
grow with the number of batches; :class:`AutocorrelationAccumulator` takes one pass of moment
sums.  Under ``torch.distributed`` the accumulators all-reduce those numbers (and the live-pair
counts) at the end of each pass, so every rank computes the statistic of the union of all
ranks' pairs without exchanging feature maps.

**Engines** (NMI's second pass): ``"compiled"``, a numba kernel for CPU tensors
(:mod:`gradshape._kernels`), and ``"torch"``, which keeps everything on the tensors' device
(the GPU path).  Both bin with the same float64 operations and count integers, so their
histograms, hence S, are identical.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import _kernels
from .distributed import all_reduce_, is_distributed

__all__ = [
    "MEASURES",
    "AutocorrelationAccumulator",
    "DependenceAccumulator",
    "NMIAccumulator",
    "PairGeometry",
    "make_accumulator",
    "nmi_from_counts",
    "spatial_dependence",
]

MEASURES = ("nmi", "autocorrelation")


@dataclass(frozen=True)
class PairGeometry:
    """Where the pixel pairs of each kernel position lie in a padded map.

    Attributes:
        kernel_size: kernel extent per spatial dim.
        dilation: dilation per spatial dim.
        padding: ``(before, after)`` padding per spatial dim.
        padding_mode: ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``.
        offsets: the distinct displacements up to sign (one of each ±δ pair), excluding 0.
        position_offset: for each kernel position (row-major), the index into ``offsets``, or
            -1 for the centre.
    """

    kernel_size: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    padding_mode: str
    offsets: tuple[tuple[int, ...], ...]
    position_offset: tuple[int, ...]

    @classmethod
    def create(
        cls,
        kernel_size: Sequence[int],
        *,
        dilation: Sequence[int] | int = 1,
        padding: Sequence[int] | Sequence[tuple[int, int]] | int | str = 0,
        padding_mode: str = "zeros",
    ) -> PairGeometry:
        """Geometry from conv-style arguments (``padding`` may be ``"same"`` or ``"valid"``)."""
        if not isinstance(kernel_size, Sequence) or isinstance(kernel_size, str):
            raise TypeError(
                f"kernel_size must be a sequence of ints, one per spatial dim, got {kernel_size!r}"
            )
        kernel_size = _ints(kernel_size, "kernel_size")
        dims = len(kernel_size)
        if dims < 1 or any(k < 1 for k in kernel_size):
            raise ValueError(f"kernel_size must be positive ints, got {kernel_size}")
        dilation = _per_dim(dilation, dims, "dilation")
        if any(d < 1 for d in dilation):
            raise ValueError(f"dilation must be >= 1, got {dilation}")
        if isinstance(padding, str):
            if padding == "valid":
                pads = tuple((0, 0) for _ in range(dims))
            elif padding == "same":
                totals = [d * (k - 1) for d, k in zip(dilation, kernel_size, strict=True)]
                pads = tuple((t // 2, t - t // 2) for t in totals)
            else:
                raise ValueError(
                    f"padding must be an int, a tuple, 'same' or 'valid', got {padding!r}"
                )
        else:
            if _is_int(padding):
                items = [padding] * dims
            elif isinstance(padding, Sequence):
                items = list(padding)
            else:
                raise TypeError(
                    f"padding must be an int, a tuple, 'same' or 'valid', got {padding!r}"
                )
            if len(items) != dims:
                raise ValueError(f"padding {padding} does not match {dims} spatial dims")
            pads = tuple(
                (p, p) if _is_int(p) else _ints(p, "padding (before, after)") for p in items
            )
            if any(len(pair) != 2 for pair in pads):
                raise ValueError(f"padding per dim must be an int or a pair, got {pads}")
        if any(p < 0 for pair in pads for p in pair):
            raise ValueError(f"padding must be >= 0, got {pads}")
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"unknown padding_mode {padding_mode!r}")
        centre = tuple(k // 2 for k in kernel_size)
        displacement = {
            idx: tuple((i - c) * d for i, c, d in zip(idx, centre, dilation, strict=True))
            for idx in itertools.product(*(range(k) for k in kernel_size))
        }
        present = set(displacement.values())
        offsets: list[tuple[int, ...]] = []
        index: dict[tuple[int, ...], int] = {}
        for idx, delta in displacement.items():
            if idx == centre:
                continue
            negative = tuple(-v for v in delta)
            canonical = max(delta, negative) if negative in present else delta
            if canonical not in index:
                index[canonical] = len(offsets)
                offsets.append(canonical)
        position_offset = tuple(
            -1 if idx == centre else index[_canonical(delta, present)]
            for idx, delta in displacement.items()
        )
        return cls(kernel_size, dilation, pads, padding_mode, tuple(offsets), position_offset)

    @classmethod
    def from_conv(cls, conv: nn.Module) -> PairGeometry:
        """Geometry of a ``Conv1d``/``Conv2d``/``Conv3d`` (or subclass)."""
        if not isinstance(conv, nn.modules.conv._ConvNd) or conv.transposed:
            raise TypeError(
                f"{type(conv).__name__} is not a Conv1d/Conv2d/Conv3d: transposed convolutions "
                "scatter rather than gather and have no pixel-neighbour geometry here"
            )
        return cls.create(
            conv.kernel_size,
            dilation=conv.dilation,
            padding=conv.padding,
            padding_mode=conv.padding_mode,
        )

    @property
    def dims(self) -> int:
        return len(self.kernel_size)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Pad ``x`` of shape ``(N, C, *spatial)`` the way the convolution does."""
        if not any(p for pair in self.padding for p in pair):
            return x
        flat = [p for pair in reversed(self.padding) for p in pair]
        if self.padding_mode in ("reflect", "circular"):
            # reflect pads at most size - 1, circular at most size (as the conv requires)
            slack = 1 if self.padding_mode == "reflect" else 0
            sizes = x.shape[2:]
            if any(max(p) > n - slack for p, n in zip(self.padding, sizes, strict=True)):
                raise ValueError(
                    f"{self.padding_mode} padding {self.padding} needs a larger map than "
                    f"{tuple(x.shape[2:])}"
                )
        if self.padding_mode == "zeros":
            return F.pad(x, flat)
        return F.pad(x, flat, mode=self.padding_mode)

    def windows(self, padded_shape: Sequence[int], offset: Sequence[int]):
        """Slices of the P and Q windows of ``offset`` in a padded map of spatial shape given.

        Returns ``(p_slices, q_slices, count)`` with ``count`` pixels per image and channel
        (0 when the offset does not fit inside the map).
        """
        p_sl, q_sl, count = [], [], 1
        for size, delta in zip(padded_shape, offset, strict=True):
            start, stop = max(0, -delta), min(size, size - delta)
            if stop <= start:
                return None, None, 0
            p_sl.append(slice(start, stop))
            q_sl.append(slice(start + delta, stop + delta))
            count *= stop - start
        return tuple(p_sl), tuple(q_sl), count

    def expand(self, per_offset: torch.Tensor) -> torch.Tensor:
        """``(O, C)`` values per offset → ``(C, *kernel)`` with 1 at the centre."""
        channels = per_offset.shape[1]
        out = torch.ones(channels, len(self.position_offset), dtype=per_offset.dtype)
        for pos, o in enumerate(self.position_offset):
            if o >= 0:
                out[:, pos] = per_offset[o]
        return out.reshape(channels, *self.kernel_size)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _ints(values, label: str) -> tuple[int, ...]:
    if not isinstance(values, Sequence) or not all(_is_int(v) for v in values):
        raise TypeError(f"{label} must be ints, got {values!r}")
    return tuple(int(v) for v in values)


def _per_dim(value, dims: int, label: str) -> tuple[int, ...]:
    if _is_int(value):
        return (int(value),) * dims
    value = _ints(value, label)
    if len(value) != dims:
        raise ValueError(f"{label} {value} does not match {dims} spatial dims")
    return value


def _canonical(delta: tuple[int, ...], present: set[tuple[int, ...]]) -> tuple[int, ...]:
    negative = tuple(-v for v in delta)
    return max(delta, negative) if negative in present else delta


def _working_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _spatial_dims(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(2, x.dim()))


def _flat_padding(padding: tuple[tuple[int, int], ...]) -> list[int]:
    """``F.pad``'s argument order: last dim first, ``before, after`` each."""
    return [p for pair in reversed(padding) for p in pair]


def _has_padding(padding: tuple[tuple[int, int], ...]) -> bool:
    return any(p for pair in padding for p in pair)


def _map_part(
    window: tuple[slice, ...], padding: tuple[tuple[int, int], ...], size: Sequence[int]
) -> tuple[tuple[slice, ...] | None, bool]:
    """Where a window of the padded map lies in the unpadded one.

    Returns the window's slices in unpadded coordinates (None if it holds no map pixel) and
    whether it holds any padding position.
    """
    inner, outside, empty = [], False, False
    for sl, (before, _), n in zip(window, padding, size, strict=True):
        start, stop = max(sl.start - before, 0), min(sl.stop - before, n)
        outside |= sl.start < before or sl.stop > before + n
        empty |= stop <= start
        inner.append(slice(start, stop))
    return (None if empty else tuple(inner)), outside


def _extremes_over_images(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel and position, the minimum and maximum over the images (NaN propagates).

    On the CPU one vectorised ``minimum``/``maximum`` per image beats torch's reduction over
    the leading dim several times over (measured about 3× on a (256, 64, 32, 32) map).
    """
    if x.device.type != "cpu":
        return x.amin(dim=0), x.amax(dim=0)
    flat = x.reshape(x.shape[0], -1).numpy()
    lo, hi = flat[0].copy(), flat[0].copy()
    for image in flat[1:]:
        np.minimum(lo, image, out=lo)
        np.maximum(hi, image, out=hi)
    return torch.from_numpy(lo).view(x.shape[1:]), torch.from_numpy(hi).view(x.shape[1:])


class DependenceAccumulator:
    """Streams a layer's inputs and returns per-channel dependence ``(C, *kernel)``.

    Protocol: for ``p in range(passes)``: call :meth:`observe` on every batch's layer input
    (with the same masks), then :meth:`end_pass`; finally :meth:`result`.  Each pass must see
    the same inputs.

    Attributes:
        live: after the first pass has ended, a bool tensor of kernel shape: True where the
            kernel position's offset had at least one pixel pair with both ends inside the
            unpadded map and unmasked, over everything observed (on all ranks); the centre is
            always live.  A dead position only ever multiplies padding, so its weight's
            gradient is exactly zero.  With a padding mode other than ``"zeros"`` the border
            holds real values, and a position is live when it had any unmasked pair at all.
    """

    passes: int = 1

    def __init__(self, geometry: PairGeometry, *, layer: str = "layer") -> None:
        self.geometry = geometry
        self.layer = layer
        self.channels: int | None = None
        self.live: torch.Tensor | None = None
        self._live_pairs: torch.Tensor | None = None
        self._pass = 0

    def _prepare(
        self, x: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Check ``x`` and ``mask``; ``x`` detached in its working dtype, ``mask`` on its device."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(
                f"input of {self.layer!r} must be a floating tensor, got {type(x).__name__}"
            )
        if x.dim() != self.geometry.dims + 2:
            raise ValueError(
                f"input of {self.layer!r} has shape {tuple(x.shape)}; expected (N, C) followed by "
                f"{self.geometry.dims} spatial dims"
            )
        if self.channels is None:
            self.channels = x.shape[1]
        elif x.shape[1] != self.channels:
            raise ValueError(
                f"input of {self.layer!r} changed from {self.channels} to {x.shape[1]} channels"
            )
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise TypeError(
                    f"mask for the input of {self.layer!r} must be a bool tensor (True = real "
                    f"signal), got {getattr(mask, 'dtype', type(mask).__name__)}; pass "
                    "mask.bool() or mask != 0"
                )
            expected = (x.shape[0], *x.shape[2:])
            if tuple(mask.shape) != expected:
                raise ValueError(
                    f"mask for the input of {self.layer!r} has shape {tuple(mask.shape)}; "
                    f"expected (N, *spatial) = {expected} to match the input {tuple(x.shape)}"
                )
            mask = mask.detach().to(x.device)
        return x.detach().to(_working_dtype(x)), mask

    def _nonfinite(self) -> ValueError:
        return ValueError(
            f"the input of {self.layer!r} contains NaN or inf: cannot measure its spatial "
            "dependence (check the model's forward pass or the refresh batches)"
        )

    def _check_finite(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        # lo > hi: no unmasked value yet in that channel (lo = inf, hi = -inf)
        if not bool(((torch.isfinite(lo) & torch.isfinite(hi)) | (lo > hi)).all()):
            raise self._nonfinite()

    def _observe_live(self, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Count, per offset, the pairs that make its kernel positions live (see :attr:`live`)."""
        geo = self.geometry
        shape = tuple(x.shape[2:])
        if geo.padding_mode != "zeros" and _has_padding(geo.padding):
            shape = tuple(n + a + b for n, (a, b) in zip(shape, geo.padding, strict=True))
            if mask is not None:
                mask = F.pad(mask, _flat_padding(geo.padding), value=True)
        if self._live_pairs is None:
            self._live_pairs = torch.zeros(len(geo.offsets), dtype=torch.float64, device=x.device)
        for o, offset in enumerate(geo.offsets):
            p_sl, q_sl, pixels = geo.windows(shape, offset)
            if pixels == 0:
                continue
            if mask is None:
                self._live_pairs[o] += float(pixels * x.shape[0])
            else:
                pairs = mask[(slice(None), *p_sl)] & mask[(slice(None), *q_sl)]
                self._live_pairs[o] += pairs.sum().double()

    def _finish_live(self) -> None:
        """All-reduce the live-pair counts and set :attr:`live`."""
        if self._live_pairs is None:
            return
        counts = all_reduce_(self._live_pairs, "sum").tolist()
        live = [o < 0 or counts[o] > 0 for o in self.geometry.position_offset]
        self.live = torch.tensor(live, dtype=torch.bool).reshape(self.geometry.kernel_size)

    def observe(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add one batch's layer input ``x`` ``(N, C, *spatial)``, unpadded.

        ``mask`` (optional, bool, ``(N, *spatial)``): True where ``x`` is real signal; pairs
        with either end at a False position are left out of everything.  The layer's own
        padding is never masked.
        """
        raise NotImplementedError

    def end_pass(self) -> None:
        self._pass += 1

    def result(self) -> torch.Tensor:
        raise NotImplementedError


class NMIAccumulator(DependenceAccumulator):
    """Normalised mutual information, in two streaming passes (see the module docstring).

    ``engine``: ``"compiled"`` (numba, CPU tensors), ``"torch"`` (any device: everything stays
    on the tensors' device) or ``"auto"`` (compiled for CPU tensors when numba is installed).
    Both give identical integer histograms, hence identical S.
    """

    passes = 2

    def __init__(
        self,
        geometry: PairGeometry,
        *,
        diag_removal: bool = False,
        layer: str = "layer",
        engine: str = "auto",
    ) -> None:
        super().__init__(geometry, layer=layer)
        if engine not in ("auto", "compiled", "torch"):
            raise ValueError(f"engine must be 'auto', 'compiled' or 'torch', got {engine!r}")
        if engine == "compiled" and not _kernels.available():
            raise RuntimeError("engine='compiled' needs numba: pip install 'gradshape[fast]'")
        self.diag_removal = diag_removal
        self.engine = engine
        n_off = len(geometry.offsets)
        self._n_off = n_off
        # pass 0: per (offset, channel) ranges of P and Q and pair counts; per channel map range
        self._lo_p = self._hi_p = self._lo_q = self._hi_q = None
        self._count: torch.Tensor | None = None
        self._lo_g = self._hi_g = None
        self._nbins: torch.Tensor | None = None
        self._hist: torch.Tensor | None = None
        self._units: tuple[torch.Tensor, torch.Tensor] | None = None
        self._plan: _TorchPlan | None = None

    @property
    def histograms(self) -> torch.Tensor:
        """Joint counts ``(O, C, Bmax, Bmax)`` int64 (P on rows) per offset of
        ``geometry.offsets`` and channel, once the second pass has ended (summed over ranks).

        Only the leading ``B × B`` block of each (offset, channel) is used, B = its bin count.
        """
        if self._pass < 2:
            raise RuntimeError("NMIAccumulator.histograms before both passes ended")
        return self._hist

    def _effective(
        self, x: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[tuple[int, int], ...]]:
        """The map whose zero-padded pairs are counted, its mask, and its zero padding.

        Zero padding stays implicit.  Other padding modes copy map values into the border, so
        the map is padded here and counted without further padding; the border is unmasked.
        """
        geo = self.geometry
        if geo.padding_mode == "zeros" or not _has_padding(geo.padding):
            return x, mask, geo.padding
        if mask is not None:
            mask = F.pad(mask, _flat_padding(geo.padding), value=True)
        return geo.pad(x), mask, tuple((0, 0) for _ in geo.padding)

    def _use_compiled(self, x: torch.Tensor) -> bool:
        if self.engine == "torch" or x.device.type != "cpu":
            return False
        return _kernels.available()

    # ---- pass 0: ranges and counts ------------------------------------------------------
    def _observe_ranges(
        self, x: torch.Tensor, mask: torch.Tensor | None, pads: tuple[tuple[int, int], ...]
    ) -> None:
        c = x.shape[1]
        dev = x.device
        if self._count is None:
            inf = torch.full((self._n_off, c), math.inf, dtype=torch.float64, device=dev)
            self._lo_p, self._lo_q = inf.clone(), inf.clone()
            self._hi_p, self._hi_q = -inf, -inf.clone()
            self._count = torch.zeros(self._n_off, c, dtype=torch.float64, device=dev)
            self._lo_g = torch.full((c,), math.inf, dtype=torch.float64, device=dev)
            self._hi_g = torch.full((c,), -math.inf, dtype=torch.float64, device=dev)
        if self.diag_removal:
            self._ranges_from_pairs(x, mask, pads)
        elif mask is None:
            self._ranges_from_maps(x, pads)
        else:
            self._ranges_from_masked_pairs(x, mask, pads)

    def _ranges_from_maps(self, x: torch.Tensor, pads: tuple[tuple[int, int], ...]) -> None:
        """Every pair counts: each window's extremes from the per-position extremes over N."""
        size = tuple(x.shape[2:])
        lo_map, hi_map = _extremes_over_images(x)
        sd = tuple(range(1, x.dim() - 1))
        lo, hi = lo_map.amin(dim=sd).double(), hi_map.amax(dim=sd).double()
        if _has_padding(pads):
            lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
        self._lo_g = torch.minimum(self._lo_g, lo)
        self._hi_g = torch.maximum(self._hi_g, hi)
        self._check_finite(self._lo_g, self._hi_g)
        padded = tuple(n + a + b for n, (a, b) in zip(size, pads, strict=True))
        for o, offset in enumerate(self.geometry.offsets):
            p_sl, q_sl, pixels = self.geometry.windows(padded, offset)
            if pixels == 0:
                continue
            self._count[o] += float(pixels * x.shape[0])
            sides = ((p_sl, self._lo_p, self._hi_p), (q_sl, self._lo_q, self._hi_q))
            for window, lo_t, hi_t in sides:
                inner, outside = _map_part(window, pads, size)
                if inner is not None:
                    lo_w = lo_map[(slice(None), *inner)].amin(dim=sd).double()
                    hi_w = hi_map[(slice(None), *inner)].amax(dim=sd).double()
                    if outside:  # the padding's zeros are values of this window too
                        lo_w, hi_w = lo_w.clamp(max=0.0), hi_w.clamp(min=0.0)
                else:
                    lo_w = hi_w = torch.zeros_like(lo_t[o])
                lo_t[o] = torch.minimum(lo_t[o], lo_w)
                hi_t[o] = torch.maximum(hi_t[o], hi_w)

    def _observe_map_range(
        self, x: torch.Tensor, mask: torch.Tensor | None, pads: tuple[tuple[int, int], ...]
    ) -> None:
        """The range of the map's real values (and the padding's zeros), checked for NaN/inf."""
        dims = (0, *_spatial_dims(x))
        if mask is None:
            lo, hi = x.amin(dim=dims).double(), x.amax(dim=dims).double()
        else:
            real = mask.unsqueeze(1)
            lo = torch.where(real, x, math.inf).amin(dim=dims).double()
            hi = torch.where(real, x, -math.inf).amax(dim=dims).double()
        if _has_padding(pads):
            lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
        self._lo_g = torch.minimum(self._lo_g, lo)
        self._hi_g = torch.maximum(self._hi_g, hi)
        self._check_finite(self._lo_g, self._hi_g)

    def _ranges_from_masked_pairs(
        self, x: torch.Tensor, mask: torch.Tensor, pads: tuple[tuple[int, int], ...]
    ) -> None:
        """Pairs with a masked end are dropped: each offset's ranges over its kept pairs.

        Which pairs are kept does not depend on the channel, so the positions kept by every
        offset on both sides (the core: all but a thin border of the real region for the usual
        masks of padded sequences) are reduced once, and each offset and side adds only its
        other kept positions.  Exact: a minimum over a union is the minimum of the minima.
        """
        self._observe_map_range(x, mask, pads)
        if _has_padding(pads):
            x = F.pad(x, _flat_padding(pads))
            mask = F.pad(mask, _flat_padding(pads), value=True)
        dims = (0, *_spatial_dims(x))
        sides, core = [], None
        for o, offset in enumerate(self.geometry.offsets):
            p_sl, q_sl, pixels = self.geometry.windows(x.shape[2:], offset)
            if pixels == 0:
                continue
            kept = mask[(slice(None), *p_sl)] & mask[(slice(None), *q_sl)]
            self._count[o] += kept.sum().double()
            for window, lo_t, hi_t in (
                (p_sl, self._lo_p, self._hi_p),
                (q_sl, self._lo_q, self._hi_q),
            ):
                where = torch.zeros_like(mask)
                where[(slice(None), *window)] = kept
                sides.append((o, lo_t, hi_t, where))
                core = where if core is None else core & where
        if core is None:
            return
        real = core.unsqueeze(1)
        core_lo = torch.where(real, x, math.inf).amin(dim=dims).double()
        core_hi = torch.where(real, x, -math.inf).amax(dim=dims).double()
        by_channel = x.transpose(0, 1)
        for o, lo_t, hi_t, where in sides:
            extra = where & ~core
            lo_o, hi_o = core_lo, core_hi
            if bool(extra.any()):
                values = by_channel[:, extra]
                lo_o = torch.minimum(lo_o, values.amin(dim=1).double())
                hi_o = torch.maximum(hi_o, values.amax(dim=1).double())
            lo_t[o] = torch.minimum(lo_t[o], lo_o)
            hi_t[o] = torch.maximum(hi_t[o], hi_o)

    def _ranges_from_pairs(
        self, x: torch.Tensor, mask: torch.Tensor | None, pads: tuple[tuple[int, int], ...]
    ) -> None:
        """Pairs with a zero (or masked) end are dropped: each offset's ranges over its kept
        pairs, which depend on the channel."""
        spatial = _spatial_dims(x)
        dims = (0, *spatial)
        self._observe_map_range(x, mask, pads)
        if _has_padding(pads):
            x = F.pad(x, _flat_padding(pads))
            if mask is not None:
                mask = F.pad(mask, _flat_padding(pads), value=True)
        big = torch.tensor(math.inf, dtype=x.dtype, device=x.device)
        for o, offset in enumerate(self.geometry.offsets):
            p_sl, q_sl, pixels = self.geometry.windows(x.shape[2:], offset)
            if pixels == 0:
                continue
            p, q = x[(..., *p_sl)], x[(..., *q_sl)]
            keep = None
            if mask is not None:
                keep = (mask[(slice(None), *p_sl)] & mask[(slice(None), *q_sl)]).unsqueeze(1)
            if self.diag_removal:
                nonzero = (p != 0) & (q != 0)
                keep = nonzero if keep is None else keep & nonzero
            self._count[o] += keep.expand_as(p).sum(dim=dims).double()
            for v, lo_t, hi_t in ((p, self._lo_p, self._hi_p), (q, self._lo_q, self._hi_q)):
                lo_t[o] = torch.minimum(lo_t[o], torch.where(keep, v, big).amin(dims).double())
                hi_t[o] = torch.maximum(hi_t[o], torch.where(keep, v, -big).amax(dims).double())

    def _sync_ranges(self) -> None:
        for t in (self._lo_p, self._lo_q, self._lo_g):
            all_reduce_(t, "min")
        for t in (self._hi_p, self._hi_q, self._hi_g):
            all_reduce_(t, "max")
        all_reduce_(self._count, "sum")
        n = self._count
        # Sturges: B = 1 + ceil(log2 n), in integer arithmetic (1 + bit_length(n - 1)); offsets
        # with no pairs keep one bin and give NaN.
        self._nbins = torch.tensor(
            [[1 + (int(v) - 1).bit_length() if v > 0 else 1 for v in row] for row in n.tolist()],
            dtype=torch.long,
            device=n.device,
        ).reshape(n.shape)
        bmax = int(self._nbins.max()) if self._n_off else 1  # no offsets: a 1×…×1 kernel
        c = n.shape[1]
        self._hist = torch.zeros(self._n_off, c, bmax, bmax, dtype=torch.int64, device=n.device)
        self._rescale_overflowing_ranges()

    def _rescale_overflowing_ranges(self) -> None:
        """Scale the channels whose binning would overflow by a power of two (float64 maps).

        The bin ``(v − lo)·B/(hi − lo)`` overflows when a range is wider than the largest
        double (hi − lo = inf) or so narrow that B/(hi − lo) is inf (denormal values), and the
        integer conversion of inf or NaN is undefined.  Multiplying v, lo and hi by one power
        of two is exact and leaves every bin index unchanged, so such a channel is mapped to
        |v| < 1 here (its ranges) and in the second pass (its values); other channels are
        left alone.  float32 maps never need it: their ranges are held in float64.  The map's
        own range is checked with the most common bin count, as well as every offset's.
        """
        nbins_g = (
            self._nbins.mode(dim=0).values
            if self._n_off
            else torch.ones_like(self._lo_g, dtype=torch.long)
        )
        unsafe = torch.zeros_like(self._lo_g, dtype=torch.bool)
        for lo, hi, nb in (
            (self._lo_p, self._hi_p, self._nbins),
            (self._lo_q, self._hi_q, self._nbins),
            (self._lo_g, self._hi_g, nbins_g),
        ):
            width = hi - lo
            fine = torch.isfinite(width) & ((width == 0) | torch.isfinite(nb / width))
            bad = (lo <= hi) & ~fine  # lo > hi: an offset without pairs, never binned
            unsafe |= bad if bad.dim() == 1 else bad.any(dim=0)
        if not bool(unsafe.any()):
            self._units = None
            return
        top = torch.maximum(self._lo_g.abs(), self._hi_g.abs())
        first, second = _pow2_units(torch.where(unsafe, top, torch.zeros_like(top)))
        for t in (self._lo_p, self._hi_p, self._lo_q, self._hi_q, self._lo_g, self._hi_g):
            t.mul_(first).mul_(second)
        self._units = (first, second)

    # ---- pass 1: histograms -------------------------------------------------------------
    def _observe_counts(
        self, x: torch.Tensor, mask: torch.Tensor | None, pads: tuple[tuple[int, int], ...]
    ) -> None:
        if self._hist is None:
            raise RuntimeError("internal: histogram pass before the range pass")
        if not self._n_off:
            return
        if self._use_compiled(x):
            self._counts_compiled(x, mask, pads)
        else:
            self._counts_torch(x, mask, pads)

    def _counts_compiled(
        self, x: torch.Tensor, mask: torch.Tensor | None, pads: tuple[tuple[int, int], ...]
    ) -> None:
        torch_threads, numba_threads = torch.get_num_threads(), _kernels.thread_count()
        _kernels.set_thread_count(torch_threads)  # torch.set_num_threads governs both
        try:
            _kernels.joint_counts(
                np.ascontiguousarray(x.numpy()),
                None if mask is None else np.ascontiguousarray(mask.numpy()),
                pads,
                np.array(self.geometry.offsets, dtype=np.int64),
                self._lo_p.numpy(),
                self._hi_p.numpy(),
                self._lo_q.numpy(),
                self._hi_q.numpy(),
                # 0 bins: an (offset, channel) whose pairs all have a skipped end, not visited
                torch.where(self._count > 0, self._nbins, 0).numpy(),
                None if self._units is None else (self._units[0].numpy(), self._units[1].numpy()),
                self.diag_removal,
                self._hist.numpy(),
            )
        finally:
            _kernels.set_thread_count(numba_threads)
            if torch.get_num_threads() != torch_threads:
                # numba's OpenMP layer resets the process-wide OpenMP thread count when it
                # starts; the user's torch.set_num_threads must survive a refresh.
                torch.set_num_threads(torch_threads)

    def _counts_torch(
        self, x: torch.Tensor, mask: torch.Tensor | None, pads: tuple[tuple[int, int], ...]
    ) -> None:
        if self._plan is None:
            self._plan = _TorchPlan.create(self)
        self._plan.count(x, mask, pads, self.geometry, self._units, self.diag_removal)

    # ---- protocol -----------------------------------------------------------------------
    def observe(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add one batch (see :meth:`DependenceAccumulator.observe`)."""
        x, mask = self._prepare(x, mask)
        x_eff, mask_eff, pads = self._effective(x, mask)
        if self._pass == 0:
            self._observe_live(x, mask)
            self._observe_ranges(x_eff, mask_eff, pads)
        elif self._pass == 1:
            self._observe_counts(x_eff, mask_eff, pads)
        else:
            raise RuntimeError("NMIAccumulator takes exactly two passes")

    def end_pass(self) -> None:
        if self._pass == 0:
            if self._count is None:
                raise ValueError(f"no input reached {self.layer!r} during the refresh")
            self._sync_ranges()
            self._finish_live()
        elif self._pass == 1:
            if self._plan is not None:
                self._plan.flush(self._hist)
                self._plan = None
            all_reduce_(self._hist, "sum")
        super().end_pass()

    def result(self) -> torch.Tensor:
        if self._pass < 2:
            raise RuntimeError("NMIAccumulator.result() before both passes ended")
        hist = self._hist.double().cpu()
        if self.diag_removal:
            diag = torch.arange(hist.shape[-1])
            hist[..., diag, diag] = 0
        nmi = nmi_from_counts(hist)
        return self.geometry.expand(nmi)


# Elements (of one binned, padded chunk of the map) the torch engine handles at once: its
# temporaries are a few times this many 4- and 8-byte numbers.
_TORCH_CHUNK_ELEMENTS = 1 << 22


@dataclass
class _TorchPlan:
    """The torch engine's second pass: every tensor on the map's device, no per-channel loops.

    Each distinct binning (a column of ranges over the channels, shared by most offsets) bins a
    chunk of images once into small integers, stored plus one (0: a pixel to skip) in a padded
    layout whose border holds the padding value's bin; ``p_role`` also carries the channel and
    the row: ``(c·(B + 1) + bin)·(B + 1)``.  An offset's joint index is then one addition of
    two shifted views, counted with ``bincount`` into ``(B + 1)²`` bins per channel; row and
    column 0 (pairs with a skipped end) are dropped in :meth:`flush`.
    """

    lo: torch.Tensor  # (K, C) float64
    scale: torch.Tensor  # (K, C) float64
    top: torch.Tensor  # (K, C) float64: B − 1
    key_p: list[int]  # per offset: binning of its P axis (-1: no pairs in its window)
    key_q: list[int]
    b1: int  # B + 1 of the largest B
    counts: torch.Tensor  # (O, C·(B + 1)²) int64

    @classmethod
    def create(cls, acc: NMIAccumulator) -> _TorchPlan:
        nb = acc._nbins.double()
        rows, key_p, key_q, seen = [], [], [], {}
        has_pairs = (acc._count > 0).any(dim=1).tolist()
        lo_all = (acc._lo_p, acc._lo_q)
        hi_all = (acc._hi_p, acc._hi_q)
        # one host copy of the (offset, channel) ranges, to find the distinct binnings
        host = torch.stack([acc._lo_p, acc._hi_p, acc._lo_q, acc._hi_q, nb]).cpu().numpy()
        for o in range(acc._n_off):
            for axis, keys in ((0, key_p), (1, key_q)):
                if not has_pairs[o]:  # every pair of this offset is skipped
                    keys.append(-1)
                    continue
                column = np.stack([host[2 * axis, o], host[2 * axis + 1, o], host[4, o]])
                token = column.tobytes()
                if token not in seen:
                    seen[token] = len(rows)
                    rows.append((lo_all[axis][o], hi_all[axis][o], nb[o]))
                keys.append(seen[token])
        if not rows:
            rows.append((acc._lo_g, acc._hi_g, torch.ones_like(acc._lo_g)))  # never used
        lo = torch.stack([r[0] for r in rows])
        hi = torch.stack([r[1] for r in rows])
        nbins = torch.stack([r[2] for r in rows])
        empty = lo > hi  # no pairs: any finite binning will do, its pairs are all skipped
        lo = torch.where(empty, 0.0, lo)
        hi = torch.where(empty, 0.0, hi)
        width = hi - lo
        scale = torch.where(width > 0, nbins / torch.where(width > 0, width, 1.0), 0.0)
        b1 = acc._hist.shape[-1] + 1
        counts = torch.zeros(
            acc._n_off, acc._hist.shape[1] * b1 * b1, dtype=torch.int64, device=lo.device
        )
        return cls(lo, scale, nbins - 1, key_p, key_q, b1, counts)

    def count(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        pads: tuple[tuple[int, int], ...],
        geometry: PairGeometry,
        units: tuple[torch.Tensor, torch.Tensor] | None,
        skip_zero: bool,
    ) -> None:
        n_img, c = x.shape[:2]
        size = tuple(x.shape[2:])
        padded = tuple(n + a + b for n, (a, b) in zip(size, pads, strict=True))
        interior = tuple(slice(a, a + n) for n, (a, _) in zip(size, pads, strict=True))
        b1 = self.b1
        view = (1, c) + (1,) * len(size)
        chan = (torch.arange(c, device=x.device, dtype=torch.int32) * b1 * b1).view(view)
        used = sorted({k for k in self.key_p + self.key_q if k >= 0})
        windows = [geometry.windows(padded, offset) for offset in geometry.offsets]
        step = max(1, _TORCH_CHUNK_ELEMENTS // max(1, c * math.prod(padded)))
        one = torch.ones((), dtype=torch.int64, device=x.device)
        for start in range(0, n_img, step):
            xc = x[start : start + step]
            n = len(xc)
            values = xc.to(torch.float64, copy=True)
            if units is not None:
                values.mul_(units[0].view(view)).mul_(units[1].view(view))
            skip = None
            if mask is not None:
                skip = ~mask[start : start + step].unsqueeze(1)
            if skip_zero:
                skip = (xc == 0) if skip is None else skip | (xc == 0)
            q_role, p_role = {}, {}
            for i, k in enumerate(used):
                lo, scale, top = (t[k].view(view) for t in (self.lo, self.scale, self.top))
                # (v − lo)·scale clamped to [0, B − 1], then truncated: the compiled engine's
                # float64 operations in the same order (in place on the last binning's copy)
                t = values if i == len(used) - 1 else values.clone()
                t.sub_(lo).mul_(scale).clamp_(min=0.0)
                torch.minimum(t, top, out=t)
                # bins + 1 (0 marks a pixel to skip), padded with the padding value's bin
                bins = torch.empty((n, c, *padded), dtype=torch.int32, device=x.device)
                if padded != size:
                    if skip_zero:  # the padding's zeros are dropped
                        bins.fill_(-1)
                    else:
                        pad_bin = torch.minimum(((0.0 - lo) * scale).clamp(min=0.0), top)
                        bins.copy_(pad_bin.expand_as(bins))
                inner = bins[(..., *interior)]
                inner.copy_(t)  # float64 → int32 truncates, as .to() does
                if skip is not None:
                    inner.masked_fill_(skip, -1)
                bins.add_(1)
                q_role[k] = bins
                p_role[k] = torch.add(chan, bins, alpha=b1)  # (c·(B + 1) + bin)·(B + 1)
            for o, (p_sl, q_sl, pixels) in enumerate(windows):
                if pixels == 0 or self.key_p[o] < 0:
                    continue
                joint = p_role[self.key_p[o]][(..., *p_sl)] + q_role[self.key_q[o]][(..., *q_sl)]
                joint = joint.reshape(-1)
                # index_add_ counts without bincount's extra min/max sweeps; integer sums are
                # exact in any order, so the result is deterministic on every device
                self.counts[o].index_add_(0, joint, one.expand(joint.numel()))

    def flush(self, hist: torch.Tensor) -> None:
        """Add the counts without skipped ends to ``hist`` ``(O, C, B, B)``."""
        o, c, bmax, _ = hist.shape
        hist += self.counts.view(o, c, bmax + 1, bmax + 1)[..., 1:, 1:]


def _pow2_units(top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two powers of two whose product 2^−e brings each ``top ≥ 0`` into [0.5, 1) (1 for 0).

    Multiplying by a power of two is exact (short of underflow), so statistics invariant to a
    common scale of P and Q (bins, Pearson r) keep their values.  2^−e comes in two factors
    because it may lie outside the float64 range (e = −1073 for the smallest denormal).
    """
    exponent = torch.frexp(top.double()).exponent.double()
    first = torch.floor(-exponent / 2)
    return torch.pow(2.0, first), torch.pow(2.0, -exponent - first)


def nmi_from_counts(hist: torch.Tensor) -> torch.Tensor:
    """Ĩ = (H(P) + H(Q) − H(P, Q)) / H(P, Q) from joint counts ``(..., B, B)`` (P on rows).

    Returns NaN where H(P, Q) = 0 (no pairs, or all pairs in one bin).
    """
    hist = hist.double()
    n = hist.sum(dim=(-2, -1))

    def entropy(counts: torch.Tensor, dims) -> torch.Tensor:
        p = counts / n.view(*n.shape, *([1] * (counts.dim() - n.dim()))).clamp(min=1)
        terms = torch.where(p > 0, -p * torch.log2(torch.where(p > 0, p, 1.0)), 0.0)
        return terms.sum(dim=dims)

    h_joint = entropy(hist, (-2, -1))
    h_p = entropy(hist.sum(-1), (-1,))
    h_q = entropy(hist.sum(-2), (-1,))
    # 0 ≤ I(P; Q) ≤ H(P, Q) holds exactly; clamping removes round-off just outside it.
    nmi = ((h_p + h_q - h_joint) / h_joint).clamp(0.0, 1.0)
    return torch.where(h_joint > 0, nmi, torch.nan)


class AutocorrelationAccumulator(DependenceAccumulator):
    """|Pearson r| of P and Q from streamed moment sums (one pass, float64).

    With ``diag_removal`` the same pairs as for NMI are dropped (either value 0); with a mask,
    the pairs with a masked end.
    """

    passes = 1

    def __init__(
        self, geometry: PairGeometry, *, diag_removal: bool = False, layer: str = "layer"
    ) -> None:
        super().__init__(geometry, layer=layer)
        self.diag_removal = diag_removal
        self._sums: torch.Tensor | None = None  # (6, O, C): n, Σp, Σq, Σp², Σq², Σpq
        self._shift: torch.Tensor | None = None
        self._units: tuple[torch.Tensor, torch.Tensor] | None = None

    def observe(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add one batch (see :meth:`DependenceAccumulator.observe`)."""
        if self._pass != 0:
            raise RuntimeError("AutocorrelationAccumulator takes one pass")
        x, mask = self._prepare(x, mask)
        self._observe_live(x, mask)
        if mask is not None:
            # masked values take no part; zeros keep them out of the units and the sums
            x = torch.where(mask.unsqueeze(1), x, 0.0)
            if _has_padding(self.geometry.padding):
                mask = F.pad(mask, _flat_padding(self.geometry.padding), value=True)
        # Contiguous: the sums' rounding must not depend on the input's memory layout.
        xp = self.geometry.pad(x).double().contiguous()
        c = xp.shape[1]
        spatial = _spatial_dims(xp)
        lo, hi = xp.amin(dim=(0, *spatial)), xp.amax(dim=(0, *spatial))
        self._check_finite(lo, hi)
        view = (1, c) + (1,) * len(spatial)
        if self._sums is None:
            self._sums = torch.zeros(
                6, len(self.geometry.offsets), c, dtype=torch.float64, device=xp.device
            )
            # Values in units of a per-channel power of two (exact, |r| does not depend on it)
            # keep the squares from overflowing or underflowing; moments about a per-channel
            # shift avoid cancellation when |mean| >> std.
            self._units = _pow2_units(torch.maximum(lo.abs(), hi.abs()))
            self._shift = (xp * self._units[0].view(view) * self._units[1].view(view)).mean(
                dim=(0, *spatial)
            )
        xs = xp * self._units[0].view(view) * self._units[1].view(view) - self._shift.view(view)
        dims = (0, *spatial)
        for o, offset in enumerate(self.geometry.offsets):
            p_sl, q_sl, pixels = self.geometry.windows(xp.shape[2:], offset)
            if pixels == 0:
                continue
            p, q = xs[(..., *p_sl)], xs[(..., *q_sl)]
            keep = None
            if mask is not None:
                keep = (mask[(slice(None), *p_sl)] & mask[(slice(None), *q_sl)]).unsqueeze(1)
            if self.diag_removal:
                nonzero = (xp[(..., *p_sl)] != 0) & (xp[(..., *q_sl)] != 0)
                keep = nonzero if keep is None else keep & nonzero
            if keep is not None:
                keep = keep.expand_as(p).double()
                p, q = p * keep, q * keep
                n = keep.sum(dims)
            else:
                n = torch.full(
                    (c,), float(pixels * xp.shape[0]), dtype=torch.float64, device=xp.device
                )
            s = self._sums[:, o]
            s[0] += n
            s[1] += p.sum(dims)
            s[2] += q.sum(dims)
            s[3] += (p * p).sum(dims)
            s[4] += (q * q).sum(dims)
            s[5] += (p * q).sum(dims)

    def end_pass(self) -> None:
        if self._sums is None:
            raise ValueError(f"no input reached {self.layer!r} during the refresh")
        if is_distributed():
            # Ranks used different units and shifts: move every rank's sums to a common unit
            # and to shift 0 before adding.
            self._to_common_unit()
            self._unshift()
            all_reduce_(self._sums, "sum")
        self._finish_live()
        super().end_pass()

    def _to_common_unit(self) -> None:
        """Rescale the sums to the smallest unit over the ranks (factors r ≤ 1, no overflow)."""
        log_unit = torch.log2(self._units[0]) + torch.log2(self._units[1])
        common = all_reduce_(log_unit.clone(), "min")
        r = torch.pow(2.0, common - log_unit)
        n, sp, sq, spp, sqq, spq = self._sums
        self._sums = torch.stack([n, sp * r, sq * r, spp * r * r, sqq * r * r, spq * r * r])
        self._shift = self._shift * r

    def _unshift(self) -> None:
        n, sp, sq, spp, sqq, spq = self._sums
        m = self._shift.view(1, -1)
        self._sums = torch.stack(
            [
                n,
                sp + n * m,
                sq + n * m,
                spp + 2 * m * sp + n * m * m,
                sqq + 2 * m * sq + n * m * m,
                spq + m * (sp + sq) + n * m * m,
            ]
        )

    def result(self) -> torch.Tensor:
        if self._pass < 1:
            raise RuntimeError("AutocorrelationAccumulator.result() before its pass ended")
        n, sp, sq, spp, sqq, spq = self._sums.cpu()
        safe_n = n.clamp(min=1)
        cov = spq / safe_n - (sp / safe_n) * (sq / safe_n)
        var_p = spp / safe_n - (sp / safe_n) ** 2
        var_q = sqq / safe_n - (sq / safe_n) ** 2
        denom = torch.sqrt(var_p.clamp(min=0) * var_q.clamp(min=0))
        # Relative threshold: a variance at round-off level of the mean square is a constant.
        tiny_p = var_p <= 1e-12 * (spp / safe_n).abs()
        tiny_q = var_q <= 1e-12 * (sqq / safe_n).abs()
        r = torch.where(
            (n > 1) & ~tiny_p & ~tiny_q & (denom > 0), (cov / denom).abs().clamp(max=1), torch.nan
        )
        return self.geometry.expand(r)


def make_accumulator(
    measure: str,
    geometry: PairGeometry,
    *,
    diag_removal: bool = False,
    layer: str = "layer",
    engine: str = "auto",
) -> DependenceAccumulator:
    """An accumulator for ``measure`` (one of :data:`MEASURES`)."""
    if measure == "nmi":
        return NMIAccumulator(geometry, diag_removal=diag_removal, layer=layer, engine=engine)
    if measure == "autocorrelation":
        return AutocorrelationAccumulator(geometry, diag_removal=diag_removal, layer=layer)
    raise ValueError(f"unknown measure {measure!r}; expected one of {MEASURES}")


def spatial_dependence(
    inputs: torch.Tensor | Sequence[torch.Tensor],
    kernel_size: Sequence[int],
    *,
    measure: str = "nmi",
    dilation: Sequence[int] | int = 1,
    padding: Sequence[int] | int | str = 0,
    padding_mode: str = "zeros",
    diag_removal: bool = False,
    engine: str = "auto",
    mask: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Per-channel dependence ``(C, *kernel)`` (float64, on the CPU) of one map or a list.

    Args:
        inputs: ``(N, C, *spatial)`` map, unpadded, or a list of such maps (their pairs are
            pooled).
        kernel_size, dilation, padding, padding_mode: the convolution's (``padding`` may be
            ``"same"`` or ``"valid"``).
        measure: ``"nmi"`` or ``"autocorrelation"``.
        diag_removal: drop pairs with a zero end (and, for NMI, the histogram's diagonal).
        engine: NMI's engine, ``"auto"``, ``"compiled"`` or ``"torch"`` (identical results).
        mask: None, a bool ``(N, *spatial)`` tensor for one map, or a list with one mask (or
            None) per map; True marks real signal, and pairs with a masked end are left out.

    See the module docstring for the definition (paper Sec. 3.3, Eq. 7).  Raises TypeError or
    ValueError naming the argument at fault, and ValueError for NaN or inf in real positions.
    """
    if not isinstance(inputs, (torch.Tensor, Sequence)) or isinstance(inputs, str):
        raise TypeError(
            "spatial_dependence: inputs must be a tensor (N, C, *spatial) or a sequence of them, "
            f"got {type(inputs).__name__}"
        )
    if not isinstance(diag_removal, bool):
        raise TypeError(
            f"spatial_dependence: diag_removal must be a bool, got {type(diag_removal).__name__}"
        )
    maps = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    if not maps:
        raise ValueError("spatial_dependence: no feature maps given")
    if mask is None or isinstance(mask, torch.Tensor):
        if mask is not None and not isinstance(inputs, torch.Tensor):
            raise TypeError(
                "spatial_dependence: with a list of maps, mask must be a list of the same length "
                "(one mask or None per map)"
            )
        masks = [mask] * len(maps)
    elif isinstance(mask, Sequence) and not isinstance(mask, str) and len(mask) == len(maps):
        masks = list(mask)
    else:
        raise TypeError(
            f"spatial_dependence: mask must be None, a bool tensor or a list of {len(maps)} "
            f"(one per map), got {type(mask).__name__}"
        )
    geometry = PairGeometry.create(
        kernel_size, dilation=dilation, padding=padding, padding_mode=padding_mode
    )
    acc = make_accumulator(measure, geometry, diag_removal=diag_removal, engine=engine)
    for _ in range(acc.passes):
        for x, m in zip(maps, masks, strict=True):
            acc.observe(x, m)
        acc.end_pass()
    return acc.result()
