r"""Channel-Directed Gradients (CDG): the gradient under a metric along output channels.

Reference: Dong Lao, Peihao Zhu, Peter Wonka, Ganesh Sundaramoorthi, "Channel-Directed
Gradients for Optimization of Convolutional Neural Networks", arXiv 2008.10766.

:func:`channel_directed` is the map (pure, on any tensor); :class:`ChannelDirectedGradients`
attaches it to a model's conv (and optionally linear) weights.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .selection import LayerSelector, frozen_reason, layer_predicate, unwrap_model
from .transform import ParameterTransform

__all__ = [
    "AXES",
    "LAYER_KINDS",
    "ChannelDirectedGradients",
    "channel_directed",
    "eligible_layers",
]

_CDG = "ChannelDirectedGradients"

#: The directions the metric can couple: a weight's output channels (the paper's choice), its
#: input channels, or its spatial kernel positions (the paper's ablation).
AXES = ("output", "input", "spatial")

#: Layer kinds CDG can act on.
LAYER_KINDS = ("conv", "linear")


def _check_metric(a: float, smoothing: float, owner: str) -> tuple[float, float]:
    for label, v in (("a", a), ("smoothing", smoothing)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"{owner}: {label} must be a real number, got {type(v).__name__}")
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{owner}: {label} must be finite and >= 0, got {v}")
    if a + smoothing <= 0:
        raise ValueError(
            f"{owner}: a + smoothing must be > 0 (with a = smoothing = 0 the metric is "
            f"singular on zero-mean gradients), got a={a}, smoothing={smoothing}"
        )
    return float(a), float(smoothing)


def _solve_along(x: torch.Tensor, dim: int, a: float, smoothing: float) -> torch.Tensor:
    """``M⁻¹`` applied to every fibre of ``x`` along ``dim`` (``x`` already in compute dtype)."""
    n = x.shape[dim]
    if n == 1:
        return x
    if smoothing == 0:
        mean = x.mean(dim, keepdim=True)
        return mean + (x - mean) / a
    spectrum = torch.fft.rfft(x, dim=dim)
    f = torch.arange(spectrum.shape[dim], device=x.device, dtype=x.dtype)
    # Eigenvalues of M on frequency f: 1 at f = 0 (P keeps the mean), else a + λ·(2 − 2cos(2πf/n))
    # = a + 4λ·sin²(πf/n), the sine form being free of cancellation near f = 0.
    eig = a + 4 * smoothing * torch.sin(math.pi * f / n) ** 2
    eig[0] = 1
    shape = [1] * x.dim()
    shape[dim] = -1
    return torch.fft.irfft(spectrum / eig.view(shape), n=n, dim=dim)


def channel_directed(
    tensor: torch.Tensor,
    *,
    a: float = 1.0,
    smoothing: float = 1.0,
    dim: int | Sequence[int] = 0,
) -> torch.Tensor:
    r"""The gradient ``tensor`` re-expressed under the metric ``M`` along ``dim``: ``M⁻¹ g``.

    For every fibre ``g`` of ``tensor`` along ``dim`` (length n, all other indices fixed),

    .. math::  M = P + a\,(I - P) + \lambda\,(-\Delta), \qquad
               \tilde g = M^{-1} g = \bar g + \bigl[a I + \lambda(-\Delta)\bigr]^{-1}(g - \bar g)

    with ``P = 11ᵀ/n`` the projection onto constants, ``ḡ`` the fibre's mean, ``−Δ`` the periodic
    second difference (``(−Δg)_o = 2g_o − g_{o−1} − g_{o+1}``, indices mod n), ``a`` = ``a`` and
    ``λ`` = ``smoothing``.  ``M`` is circulant: the solve divides the fibre's non-zero FFT
    frequencies f by ``a + λ(2 − 2cos(2πf/n))``, O(n log n) per fibre, all fibres at once.
    With ``λ = 0`` it is ``ḡ + (g − ḡ)/a`` directly.

    ``dim`` may list several dims: the map is then applied along each in turn, i.e. the metric
    is the Kronecker product of the one-dimensional ones.  Half and bfloat16 tensors are
    computed in float32 and cast back.  Returns a new tensor of ``tensor``'s shape and dtype,
    or ``tensor`` itself where the map is the identity (``a = 1, λ = 0``, or every listed dim
    of length 1).
    """
    a, smoothing = _check_metric(a, smoothing, "channel_directed")
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    for d in dims:
        if not -tensor.dim() <= d < tensor.dim():
            raise ValueError(
                f"channel_directed: dim {d} is out of range for a tensor of shape "
                f"{tuple(tensor.shape)}"
            )
    dims = tuple(sorted({d % tensor.dim() for d in dims}))  # each dim once
    if (a == 1 and smoothing == 0) or all(tensor.shape[d] == 1 for d in dims):
        return tensor
    if not tensor.is_floating_point():
        raise TypeError(f"channel_directed: expected a floating tensor, got {tensor.dtype}")
    work = tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor
    for d in dims:
        work = _solve_along(work, d, a, smoothing)
    return work.to(tensor.dtype)


def _layer_dims(module: nn.Module, axis: str) -> tuple[int, ...]:
    """The weight dims ``axis`` names for ``module`` (transposed convs store (in, out, ...))."""
    if isinstance(module, nn.Linear):
        return (0,) if axis == "output" else (1,)
    out_dim, in_dim = (1, 0) if module.transposed else (0, 1)
    if axis == "output":
        return (out_dim,)
    if axis == "input":
        return (in_dim,)
    return tuple(range(2, 2 + len(module.kernel_size)))


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    return None


def eligible_layers(
    model: nn.Module,
    layers: Sequence[str] = ("conv",),
    include: LayerSelector = None,
    exclude: LayerSelector = None,
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The layers CDG acts on, by name, and the skipped ones of the requested kinds with why.

    Eligible: every module of a kind in ``layers`` (``"conv"``: Conv1d/2d/3d and their
    transposed forms, any kernel size, grouped included; ``"linear"``: nn.Linear) whose weight
    is a plain Parameter that requires a gradient (frozen weights are skipped).  ``include``
    keeps only matching modules (one named explicitly that is not eligible raises);
    ``exclude`` drops matches.
    """
    inc, exc = layer_predicate(include, "include"), layer_predicate(exclude, "exclude")
    chosen: dict[str, nn.Module] = {}
    skipped: dict[str, str] = {}
    for name, module in model.named_modules():
        if _kind(module) not in layers:
            continue
        if exc is not None and exc(name, module):
            skipped[name] = "excluded"
            continue
        wanted = inc is None or inc(name, module)
        kind = type(module).__name__
        weight = getattr(module, "weight", None)
        if parametrize.is_parametrized(module, "weight"):
            reason = (
                f"{kind}'s weight is parametrized: CDG acts on plain Parameters only (the "
                "gradient of the parametrization's own tensor is not the weight's gradient)"
            )
        elif not isinstance(weight, nn.Parameter):
            reason = f"{kind}'s weight is not a Parameter"
        else:
            reason = frozen_reason(kind, weight)
        if reason:
            if inc is not None and wanted and not callable(include):
                raise ValueError(f"{_CDG}: {reason} (module {name!r}, asked for by include)")
            skipped[name] = reason
            continue
        if wanted:
            if isinstance(weight, nn.parameter.UninitializedParameter):
                raise ValueError(
                    f"{_CDG}: {kind} {name!r} is lazy and its weight is not materialised yet: "
                    "run one forward pass before attaching, or exclude it"
                )
            chosen[name] = module
    return chosen, skipped


class ChannelDirectedGradients(ParameterTransform):
    r"""Channel-Directed Gradients (Lao, Zhu, Wonka, Sundaramoorthi, "Channel-Directed Gradients
    for Optimization of Convolutional Neural Networks", arXiv 2008.10766).

    A conv weight ``W[o, i, *k]`` is read as a closed curve ``o ↦ W[o]`` of filters, and its
    gradient is taken under a metric that couples neighbouring output channels instead of the
    flat L2 metric.  For each fibre ``g = (∂L/∂W)[:, i, *k]`` (length n = out_channels):

    .. math::  \langle h, k \rangle_M = h^\top M k, \qquad
               M = P + a\,(I - P) + \lambda\,(-\Delta), \qquad
               \tilde g = M^{-1} g = \bar g + [a I + \lambda(-\Delta)]^{-1}(g - \bar g)

    ``P = 11ᵀ/n`` projects onto constants (the mean ``ḡ`` over output channels is always
    kept), ``a`` = ``a`` re-weights the fluctuation, ``λ`` = ``smoothing`` smooths it with the
    periodic second difference ``−Δ``.  The optimizer then sees ``g̃`` (``mode="gradient"``) or
    its step is mapped the same way (``mode="update"``).  Points of the family:
    ``a = 1, λ = 0`` is plain training (returned unchanged, bit for bit); ``a = 1, λ > 0`` the
    Sobolev gradient ``(I − λΔ) g̃ = g`` (a low-pass along o); ``λ = 0, a ≠ 1`` the re-weighted
    L2 metric H̃0, ``g̃ = ḡ + (g − ḡ)/a``; ``a = 0, λ > 0`` the pure Sobolev metric H̃1 of Sobolev
    active contours.  The map is linear and the same on every rank, so it commutes with
    gradient accumulation, DDP averaging and AMP loss scaling.  Cost: one batched FFT along
    the axis, O(numel · log n).

    Args:
        model: the network.  Layers are keyed by their names in ``model.named_modules()``
            (wrappers of ``torch.compile`` and (Distributed)DataParallel stripped).
        a: weight of the zero-mean part, ``a ≥ 0``.
        smoothing: λ ≥ 0, weight of the Sobolev term; ``a + λ > 0``.
        axis: the weight direction the metric couples.  ``"output"`` (the paper's): dim 0 of a
            conv/linear weight (dim 1 of a transposed conv's).  ``"input"``: the input-channel
            dim (within a group, for grouped convs).  ``"spatial"``: each kernel dim in turn,
            each periodic, i.e. ``M`` is the Kronecker product of one metric per kernel dim
            (not the flattened kernel, whose row ends would wrap onto the next row).
        mode: ``"gradient"`` or ``"update"`` (see :mod:`gradshape.transform`).
        optimizer: required for ``mode="update"``.
        include, exclude: module names, fnmatch patterns or a predicate ``(name, module)``.
        layers: kinds acted on, from :data:`LAYER_KINDS`: conv weights by default (any kernel
            size, 1×1 included); add ``"linear"`` to opt Linear weights in.  Biases and
            normalisation layers are never touched.  Parametrized weights are skipped.

    .. warning::
        The metric above is this project's reading of the paper's abstract ("output-channel
        directed re-weighted L2 or Sobolev metrics") and of the Sobolev-active-contour metrics
        it builds on; the paper's full text was not at hand, so its exact weighting,
        boundary condition (periodic here) and constants may differ.

    Example:

        >>> import torch
        >>> from torch import nn
        >>> from gradshape.channel import ChannelDirectedGradients
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
        >>> cdg = ChannelDirectedGradients(model, smoothing=1.0)
        >>> model(torch.randn(2, 3, 6, 6)).square().mean().backward()  # grads are now smoothed
        >>> sorted(cdg.parameters)
        ['0', '2']
        >>> cdg.remove()
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        a: float = 1.0,
        smoothing: float = 1.0,
        axis: str = "output",
        mode: str = "gradient",
        optimizer: torch.optim.Optimizer | None = None,
        include: LayerSelector = None,
        exclude: LayerSelector = None,
        layers: Sequence[str] = ("conv",),
    ) -> None:
        self._a, self._smoothing = _check_metric(a, smoothing, _CDG)
        if axis not in AXES:
            raise ValueError(f"{_CDG}: unknown axis {axis!r}; expected one of {AXES}")
        kinds = (layers,) if isinstance(layers, str) else tuple(layers)
        if not kinds or any(k not in LAYER_KINDS for k in kinds):
            raise ValueError(
                f"{_CDG}: layers must be a non-empty selection of {LAYER_KINDS}, got {layers!r}"
            )
        if axis == "spatial" and "linear" in kinds:
            raise ValueError(
                f"{_CDG}: axis='spatial' has no meaning for Linear weights; use layers=('conv',)"
            )
        if not isinstance(model, nn.Module):
            raise TypeError(f"{_CDG}: model must be a torch.nn.Module, got {type(model).__name__}")
        chosen, skipped = eligible_layers(unwrap_model(model), kinds, include, exclude)
        if not chosen:
            raise ValueError(
                f"{_CDG}: {type(model).__name__} has no eligible layer of kind {kinds}"
                + (f" (skipped: {dict(list(skipped.items())[:5])})" if skipped else "")
            )
        seen: dict[int, str] = {}
        for name, m in chosen.items():
            other = seen.setdefault(id(m.weight), name)
            if other != name:
                raise ValueError(
                    f"{_CDG}: modules {other!r} and {name!r} share one weight; exclude one of "
                    "them (its gradient would be transformed twice)"
                )
        self._axis = axis
        self._kinds = kinds
        self.model = model
        self.modules: dict[str, nn.Module] = chosen
        self.skipped: dict[str, str] = skipped
        self._dims = {n: _layer_dims(m, axis) for n, m in chosen.items()}
        super().__init__(
            {n: m.weight for n, m in chosen.items()},
            mode=mode,
            optimizer=optimizer,
            watch=unwrap_model(model),
        )

    def _current_parameter(self, name: str) -> nn.Parameter:
        return self.modules[name].weight

    @property
    def a(self) -> float:
        return self._a

    @property
    def smoothing(self) -> float:
        return self._smoothing

    @property
    def axis(self) -> str:
        return self._axis

    def apply(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """``M⁻¹ tensor`` along the layer's chosen axis (see :func:`channel_directed`)."""
        return channel_directed(tensor, a=self._a, smoothing=self._smoothing, dim=self._dims[name])

    # ---- state --------------------------------------------------------------------------
    def _settings(self) -> dict[str, Any]:
        return {
            "a": self._a,
            "smoothing": self._smoothing,
            "axis": self._axis,
            "mode": self.mode,
            "layers": list(self._kinds),
        }

    def state_dict(self) -> dict[str, Any]:
        """The settings and the names of the layers acted on (CDG has no other state)."""
        return {"settings": self._settings(), "modules": sorted(self.modules)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Check that ``state_dict`` describes this transform: same settings, same layers."""
        super().load_state_dict(state_dict)
        missing = {"settings", "modules"} - set(state_dict)
        if missing:
            raise ValueError(f"{_CDG}.load_state_dict: missing keys {sorted(missing)}")
        saved, ours = dict(state_dict["settings"]), self._settings()
        differ = {k: (saved.get(k), v) for k, v in ours.items() if saved.get(k) != v}
        if differ:
            raise ValueError(
                f"{_CDG}.load_state_dict: settings differ (saved, this instance): {differ}; "
                "build the transform with the saved settings"
            )
        if sorted(state_dict["modules"]) != sorted(self.modules):
            extra = set(state_dict["modules"]) - set(self.modules)
            lacking = set(self.modules) - set(state_dict["modules"])
            raise ValueError(
                f"{_CDG}.load_state_dict: layers differ (in state only: {sorted(extra)[:5]}, "
                f"in model only: {sorted(lacking)[:5]})"
            )

    def __repr__(self) -> str:
        return (
            f"{_CDG}(layers={len(self.modules)}, a={self._a}, smoothing={self._smoothing}, "
            f"axis={self._axis!r}, mode={self.mode!r})"
        )
