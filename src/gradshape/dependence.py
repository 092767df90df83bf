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

Pairs are aggregated over many batches before the statistic is taken.  The accumulators here
stream: :class:`NMIAccumulator` takes two passes over the batches (ranges and pair counts
first, histograms second) and keeps only O(C·K·B²) numbers between batches, so memory does not
grow with the number of batches; :class:`AutocorrelationAccumulator` takes one pass of moment
sums.  Under ``torch.distributed`` each accumulator's :meth:`sync` all-reduces those numbers,
so every rank computes the statistic of the union of all ranks' pairs without exchanging
feature maps.
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


class DependenceAccumulator:
    """Streams a layer's inputs and returns per-channel dependence ``(C, *kernel)``.

    Protocol: for ``p in range(passes)``: call :meth:`observe` on every batch's layer input,
    then :meth:`end_pass`; finally :meth:`result`.  Each pass must see the same inputs.
    """

    passes: int = 1

    def __init__(self, geometry: PairGeometry, *, layer: str = "layer") -> None:
        self.geometry = geometry
        self.layer = layer
        self.channels: int | None = None
        self._pass = 0

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
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
        return self.geometry.pad(x.detach().to(_working_dtype(x)))

    def _check_finite(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            raise ValueError(
                f"the input of {self.layer!r} contains NaN or inf: cannot measure its spatial "
                "dependence (check the model's forward pass or the refresh batches)"
            )

    def observe(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def end_pass(self) -> None:
        self._pass += 1

    def result(self) -> torch.Tensor:
        raise NotImplementedError


class NMIAccumulator(DependenceAccumulator):
    """Normalised mutual information, in two streaming passes (see the module docstring)."""

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

    # ---- pass 0: ranges and counts ------------------------------------------------------
    def _observe_ranges(self, xp: torch.Tensor) -> None:
        c = xp.shape[1]
        dev = xp.device
        if self._count is None:
            inf = torch.full((self._n_off, c), math.inf, dtype=torch.float64, device=dev)
            self._lo_p, self._lo_q = inf.clone(), inf.clone()
            self._hi_p, self._hi_q = -inf, -inf.clone()
            self._count = torch.zeros(self._n_off, c, dtype=torch.float64, device=dev)
            self._lo_g = torch.full((c,), math.inf, dtype=torch.float64, device=dev)
            self._hi_g = torch.full((c,), -math.inf, dtype=torch.float64, device=dev)
        spatial = _spatial_dims(xp)
        self._lo_g = torch.minimum(self._lo_g, xp.amin(dim=(0, *spatial)).double())
        self._hi_g = torch.maximum(self._hi_g, xp.amax(dim=(0, *spatial)).double())
        self._check_finite(self._lo_g, self._hi_g)
        if not self.diag_removal:
            # Reduce over the batch first: each window's extremum is then a cheap reduction.
            lo_map, hi_map = xp.amin(dim=0), xp.amax(dim=0)
        for o, offset in enumerate(self.geometry.offsets):
            p_sl, q_sl, pixels = self.geometry.windows(xp.shape[2:], offset)
            if pixels == 0:
                continue
            if self.diag_removal:
                p, q = xp[(..., *p_sl)], xp[(..., *q_sl)]
                keep = (p != 0) & (q != 0)
                dims = (0, *spatial)
                self._count[o] += keep.sum(dim=dims).double()
                big = torch.tensor(math.inf, dtype=xp.dtype, device=dev)
                self._lo_p[o] = torch.minimum(
                    self._lo_p[o], torch.where(keep, p, big).amin(dims).double()
                )
                self._hi_p[o] = torch.maximum(
                    self._hi_p[o], torch.where(keep, p, -big).amax(dims).double()
                )
                self._lo_q[o] = torch.minimum(
                    self._lo_q[o], torch.where(keep, q, big).amin(dims).double()
                )
                self._hi_q[o] = torch.maximum(
                    self._hi_q[o], torch.where(keep, q, -big).amax(dims).double()
                )
            else:
                sd = tuple(range(1, xp.dim() - 1))
                self._count[o] += float(pixels * xp.shape[0])
                self._lo_p[o] = torch.minimum(
                    self._lo_p[o], lo_map[(slice(None), *p_sl)].amin(sd).double()
                )
                self._hi_p[o] = torch.maximum(
                    self._hi_p[o], hi_map[(slice(None), *p_sl)].amax(sd).double()
                )
                self._lo_q[o] = torch.minimum(
                    self._lo_q[o], lo_map[(slice(None), *q_sl)].amin(sd).double()
                )
                self._hi_q[o] = torch.maximum(
                    self._hi_q[o], hi_map[(slice(None), *q_sl)].amax(sd).double()
                )

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
        # The shared binning of the compiled kernel: the map's own range with the most common B.
        self._nbins_g = (
            self._nbins.mode(dim=0).values
            if self._n_off
            else torch.ones(c, dtype=torch.long, device=n.device)
        )
        self._rescale_overflowing_ranges()

    def _rescale_overflowing_ranges(self) -> None:
        """Scale the channels whose binning would overflow by a power of two (float64 maps).

        The bin ``(v − lo)·B/(hi − lo)`` overflows when a range is wider than the largest
        double (hi − lo = inf) or so narrow that B/(hi − lo) is inf (denormal values), and the
        integer conversion of inf or NaN is undefined.  Multiplying v, lo and hi by one power
        of two is exact and leaves every bin index unchanged, so such a channel is mapped to
        |v| < 1 here (its ranges) and in :meth:`_observe_counts` (its values); other channels
        are left alone.  float32 maps never need it: their ranges are held in float64.
        """
        unsafe = torch.zeros_like(self._lo_g, dtype=torch.bool)
        for lo, hi, nb in (
            (self._lo_p, self._hi_p, self._nbins),
            (self._lo_q, self._hi_q, self._nbins),
            (self._lo_g, self._hi_g, self._nbins_g),
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
    def _use_compiled(self, xp: torch.Tensor) -> bool:
        if self.engine == "torch" or xp.device.type != "cpu" or xp.dim() > 4:
            return False
        return _kernels.available()

    def _observe_counts(self, xp: torch.Tensor) -> None:
        if self._hist is None:
            raise RuntimeError("internal: histogram pass before the range pass")
        if not self._n_off:
            return
        if self._units is not None:
            shape = (1, -1) + (1,) * (xp.dim() - 2)
            xp = xp.double() * self._units[0].view(shape) * self._units[1].view(shape)
        if self._use_compiled(xp):
            self._counts_compiled(xp)
        else:
            self._counts_torch(xp)

    def _counts_compiled(self, xp: torch.Tensor) -> None:
        if xp.dim() == 3:  # 1-D maps as 2-D maps of height 1
            xp = xp.unsqueeze(2)
            offsets = np.array([(0, o[0]) for o in self.geometry.offsets], dtype=np.int64)
        else:
            offsets = np.array(self.geometry.offsets, dtype=np.int64).reshape(-1, 2)
        arr = np.ascontiguousarray(xp.numpy())
        hist = self._hist.numpy()
        threads = torch.get_num_threads()
        _kernels.joint_counts_2d(
            arr,
            offsets,
            self._lo_p.numpy(),
            self._hi_p.numpy(),
            self._lo_q.numpy(),
            self._hi_q.numpy(),
            np.ascontiguousarray(self._nbins.numpy()),
            self._lo_g.numpy(),
            self._hi_g.numpy(),
            np.ascontiguousarray(self._nbins_g.numpy()),
            self.diag_removal,
            hist,
        )
        if torch.get_num_threads() != threads:
            # numba's OpenMP layer resets the process-wide OpenMP thread count when it starts;
            # the user's torch.set_num_threads must survive a refresh.
            torch.set_num_threads(threads)

    def _counts_torch(self, xp: torch.Tensor) -> None:
        c = xp.shape[1]
        bmax = self._hist.shape[-1]
        shape = (1, c) + (1,) * (xp.dim() - 2)
        chan = torch.arange(c, device=xp.device).view(shape)
        for o, offset in enumerate(self.geometry.offsets):
            p_sl, q_sl, pixels = self.geometry.windows(xp.shape[2:], offset)
            if pixels == 0:
                continue
            p, q = xp[(..., *p_sl)], xp[(..., *q_sl)]
            nb = self._nbins[o].view(shape)
            bp = _bin_torch(p, self._lo_p[o].view(shape), self._hi_p[o].view(shape), nb)
            bq = _bin_torch(q, self._lo_q[o].view(shape), self._hi_q[o].view(shape), nb)
            index = (chan * bmax + bp) * bmax + bq
            if self.diag_removal:
                index = index[(p != 0) & (q != 0)]
            counts = torch.bincount(index.reshape(-1), minlength=c * bmax * bmax)
            self._hist[o] += counts.view(c, bmax, bmax)

    # ---- protocol -----------------------------------------------------------------------
    def observe(self, x: torch.Tensor) -> None:
        xp = self._prepare(x)
        if self._pass == 0:
            self._observe_ranges(xp)
        elif self._pass == 1:
            self._observe_counts(xp)
        else:
            raise RuntimeError("NMIAccumulator takes exactly two passes")

    def end_pass(self) -> None:
        if self._pass == 0:
            if self._count is None:
                raise ValueError(f"no input reached {self.layer!r} during the refresh")
            self._sync_ranges()
        elif self._pass == 1:
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


def _pow2_units(top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two powers of two whose product 2^−e brings each ``top ≥ 0`` into [0.5, 1) (1 for 0).

    Multiplying by a power of two is exact (short of underflow), so statistics invariant to a
    common scale of P and Q (bins, Pearson r) keep their values.  2^−e comes in two factors
    because it may lie outside the float64 range (e = −1073 for the smallest denormal).
    """
    exponent = torch.frexp(top.double()).exponent.double()
    first = torch.floor(-exponent / 2)
    return torch.pow(2.0, first), torch.pow(2.0, -exponent - first)


def _bin_torch(
    v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, nbins: torch.Tensor
) -> torch.Tensor:
    """Bin index ``min(floor((v − lo)·B/(hi − lo)), B − 1)``; all in bin 0 when hi == lo."""
    width = hi - lo
    scale = torch.where(width > 0, nbins / torch.where(width > 0, width, 1.0), 0.0)
    b = ((v.double() - lo) * scale).long()
    return torch.minimum(b.clamp(min=0), nbins - 1)


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

    With ``diag_removal`` the same pairs as for NMI are dropped (either value 0).
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

    def observe(self, x: torch.Tensor) -> None:
        if self._pass != 0:
            raise RuntimeError("AutocorrelationAccumulator takes one pass")
        # Contiguous: the sums' rounding must not depend on the input's memory layout.
        xp = self._prepare(x).double().contiguous()
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
            if self.diag_removal:
                keep = ((xp[(..., *p_sl)] != 0) & (xp[(..., *q_sl)] != 0)).double()
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
) -> torch.Tensor:
    """Per-channel dependence ``(C, *kernel)`` of one feature map or a list of them.

    ``inputs`` has shape ``(N, C, *spatial)`` (or is a list of such maps, whose pairs are
    pooled).  See the module docstring for the definition.
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
    geometry = PairGeometry.create(
        kernel_size, dilation=dilation, padding=padding, padding_mode=padding_mode
    )
    acc = make_accumulator(measure, geometry, diag_removal=diag_removal, engine=engine)
    for _ in range(acc.passes):
        for x in maps:
            acc.observe(x)
        acc.end_pass()
    return acc.result()
