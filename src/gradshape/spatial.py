"""Spatial Gradient Scaling (SGS): attach to a model, refresh the scalings, scale gradients.

Reference: A. Detkov, M. Salameh, M. F. Qharabagh, J. Zhang, W. Lui, S. Jui, D. Niu,
"Reparameterization through Spatial Gradient Scaling", ICLR 2023.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import _kernels
from .dependence import MEASURES
from .distributed import check_same_on_all_ranks
from .refresh import Measurement, SampledBatches, make_accumulator_factory, measure_layers
from .scaling import DEFAULT_FLOOR, _check_floor, _check_k, dependence_to_scaling
from .selection import (
    LayerSelector,
    Skip,
    frozen_reason,
    layer_predicate,
    no_layer_message,
    unwrap_model,
)
from .transform import ParameterTransform

_SGS = "SpatialGradientScaling"

__all__ = ["ALIGNMENTS", "RefreshSchedule", "SpatialGradientScaling", "eligible_convs"]


#: How refresh epochs line up with ``every`` (see :class:`RefreshSchedule`).
ALIGNMENTS = ("paper", "warmup")


@dataclass(frozen=True)
class RefreshSchedule:
    """When to recompute the scalings (paper Sec. 4 and Appendix A.5).

    Epochs are counted from 0.  The first ``warmup`` epochs train with G = 1; the scalings are
    then recomputed at the start of epoch ``warmup`` and afterwards every ``every`` epochs,
    each time from ``batches`` random training batches.  ``align`` says where "every" counts
    from:

    * ``"paper"`` (default, the authors' code): at ``warmup`` and at every later epoch
      divisible by ``every``: warm-up 1, every 5 gives 1, 5, 10, 15, …;
    * ``"warmup"``: at ``warmup + j·every``: warm-up 1, every 5 gives 1, 6, 11, 16, ….

    The two agree when ``every`` divides ``warmup`` (and always for ``every = 1``).  An
    ``every`` larger than the run's epochs refreshes once, at ``warmup``: G then stays frozen
    at its first measurement.  Paper defaults: CIFAR ``(1, 30, 20)`` of 600 epochs, ImageNet
    ``(1, 5, 2)`` of 120, the ablation ``(1, 10, 2)`` of 200.
    """

    warmup: int = 1
    every: int = 30
    batches: int = 20
    align: str = "paper"

    def __post_init__(self) -> None:
        for label, v, low in (
            ("warmup", self.warmup, 0),
            ("every", self.every, 1),
            ("batches", self.batches, 1),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"RefreshSchedule.{label} must be an int >= {low}, got {v!r}")
        if self.align not in ALIGNMENTS:
            raise ValueError(
                f"RefreshSchedule.align must be one of {ALIGNMENTS}, got {self.align!r}"
            )

    def due(self, epoch: int) -> bool:
        """Whether a refresh is due at the start of ``epoch``."""
        _check_epoch(epoch, "RefreshSchedule.due")
        if epoch < self.warmup:
            return False
        if self.align == "paper":
            return epoch == self.warmup or epoch % self.every == 0
        return (epoch - self.warmup) % self.every == 0


def _check_epoch(epoch: Any, where: str) -> None:
    if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral):
        raise TypeError(f"{where}: epoch must be an int, got {type(epoch).__name__}")
    if epoch < 0:
        raise ValueError(f"{where}: epoch must be >= 0 (epochs count from 0), got {epoch}")


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd)


def _policy_skip(module: nn.Module, even_kernels: bool, patchify: bool) -> Skip | None:
    """Layers where "the kernel centre" is meaningless, scaled only when asked for."""
    kind, kernel = type(module).__name__, tuple(module.kernel_size)
    if not even_kernels and any(k % 2 == 0 for k in kernel):
        return Skip(
            "with an even kernel",
            f"{kind} has the even kernel {kernel}: SGS is defined for odd kernels (the paper and "
            "the authors' code), an even one has no single centre; pass even_kernels=True to "
            "scale it with the centre at index K//2",
        )
    stride = tuple(module.stride)
    if not patchify and all(s >= k for k, s in zip(kernel, stride, strict=True) if k > 1):
        return Skip(
            "patchify/downsampling",
            f"{kind} has stride {stride} >= kernel {kernel}: its windows do not overlap (a "
            "patchify or downsampling conv), so no pixel has neighbours inside one window to "
            "scale against the centre; pass patchify=True to scale it",
        )
    return None


def _select(
    model: nn.Module,
    include: LayerSelector,
    exclude: LayerSelector,
    *,
    parametrized: bool,
    even_kernels: bool,
    patchify: bool,
) -> tuple[dict[str, nn.Module], dict[str, Skip]]:
    inc, exc = layer_predicate(include, "include"), layer_predicate(exclude, "exclude")
    chosen: dict[str, nn.Module] = {}
    skipped: dict[str, Skip] = {}
    for name, module in model.named_modules():
        if not _is_conv(module):
            continue
        wanted = inc is None or inc(name, module)
        if exc is not None and exc(name, module):
            skipped[name] = Skip("excluded", "excluded")
            continue
        kind = type(module).__name__
        weight = getattr(module, "weight", None)
        skip = None
        if module.transposed:
            skip = Skip(
                "transposed",
                f"{kind} is a transposed convolution: SGS is defined for Conv1d/2d/3d only",
            )
        elif all(k == 1 for k in module.kernel_size):
            skip = Skip(
                "with a 1x1 kernel",
                f"{kind} has kernel {tuple(module.kernel_size)}: nothing to scale",
            )
        elif parametrize.is_parametrized(module, "weight"):
            frozen = frozen_reason(kind, _weight_parameter(module))
            if frozen:
                skip = Skip("frozen", frozen)
            elif not parametrized:
                skip = Skip(
                    "parametrized",
                    f"{kind}'s weight is parametrized: mode='update' rescales optimizer steps of "
                    "plain Parameters only; use mode='gradient'",
                )
        elif not isinstance(weight, nn.Parameter):
            skip = Skip(
                "recomputed weight",
                f"{kind}'s weight is not a Parameter (the deprecated torch.nn.utils.weight_norm "
                "and spectral_norm recompute it each forward): use "
                "torch.nn.utils.parametrizations.weight_norm / spectral_norm instead",
            )
        elif frozen_reason(kind, weight):
            skip = Skip("frozen", frozen_reason(kind, weight))
        if skip is None:
            skip = _policy_skip(module, even_kernels, patchify)
        if skip is not None:
            if inc is not None and wanted and not callable(include):
                raise ValueError(f"{_SGS}: {skip.reason} (module {name!r}, asked for by include)")
            skipped[name] = skip
            continue
        if wanted:
            if isinstance(module.weight, nn.parameter.UninitializedParameter):
                raise ValueError(
                    f"{kind} {name!r} is lazy and its weight is not materialised yet: run one "
                    "forward pass (model(example_batch)) before attaching, or exclude it"
                )
            chosen[name] = module
    return chosen, skipped


def eligible_convs(
    model: nn.Module,
    include: LayerSelector = None,
    exclude: LayerSelector = None,
    *,
    parametrized: bool = True,
    even_kernels: bool = False,
    patchify: bool = False,
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The convolutions SGS acts on, by name, and the skipped ones with the reason.

    Eligible: every Conv1d/Conv2d/Conv3d (or subclass, grouped and depthwise included) whose
    kernel is larger than 1 in some dimension and whose weight is a Parameter that requires a
    gradient or, if ``parametrized``, a ``torch.nn.utils.parametrize`` parametrization of one.
    Where "the kernel centre" means nothing, a conv is skipped unless asked for: an even
    kernel extent (``even_kernels=True`` scales it, centre at index K//2) and windows that do
    not overlap, stride ≥ kernel in every dimension of extent > 1 (ViT/Swin patch embeddings,
    ConvNeXt's 2×2 stride-2 downsampling; ``patchify=True`` scales them).  A subclass that
    overrides ``forward`` is eligible: the refresh measures what its weight is really
    convolved with (:mod:`gradshape.refresh`).  ``include`` keeps only matching modules (a
    module named explicitly that is not eligible raises, saying why); ``exclude`` drops matches.
    A chosen lazy conv whose weight is not materialised yet raises.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    chosen, skipped = _select(
        model,
        include,
        exclude,
        parametrized=parametrized,
        even_kernels=even_kernels,
        patchify=patchify,
    )
    return chosen, {n: s.reason for n, s in skipped.items()}


def _places(model: nn.Module, convs: Mapping[str, nn.Module]) -> dict[str, tuple[Any, str]]:
    """Layer name → (parent module, attribute name), to notice a module replaced later."""
    places: dict[str, tuple[Any, str]] = {}
    for name in convs:
        parent_name, _, child = name.rpartition(".")
        places[name] = (model.get_submodule(parent_name), child) if name else (None, "")
    return places


def _weight_parameter(conv: nn.Module) -> nn.Parameter:
    """The Parameter behind a conv's weight: ``weight`` itself or, for a parametrized weight,
    the (first) tensor it is computed from."""
    if parametrize.is_parametrized(conv, "weight"):
        chain = conv.parametrizations.weight
        return chain.original if hasattr(chain, "original") else chain.original0
    return conv.weight


def _broadcast_scaling(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``g`` on ``like``'s device and dtype, broadcastable against a weight-shaped ``like``.

    ``g`` is kernel-shaped (broadcast over both channel dims), ``(c_out, *kernel)`` (broadcast
    over the input channels) or the weight's own shape.
    """
    g = g.to(like.device, like.dtype)
    missing = like.dim() - g.dim()
    if missing == 2:
        return g.unsqueeze(0).unsqueeze(0)
    return g.unsqueeze(1) if missing == 1 else g


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the backward multiplies the incoming gradient by G (broadcast)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, scaling: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(scaling)
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (scaling,) = ctx.saved_tensors
        return grad * _broadcast_scaling(scaling, grad), None


class _GradientScaling(nn.Module):
    """The parametrization SGS appends to a parametrized conv weight (mode="gradient").

    Forward it is the identity; backward it multiplies ∂L/∂W of the effective weight W by G,
    which then flows through the user's parametrizations to their own tensors.  G is a
    non-persistent buffer: no state_dict keys, and it follows ``model.to(...)``.
    """

    def __init__(self, scaling: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scaling", scaling, persistent=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _ScaleGradient.apply(weight, self.scaling)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return weight


class _ParametrizationHandle:
    """Removes one appended parametrization again (a no-op if it is already gone)."""

    def __init__(self, module: nn.Module, scaler: _GradientScaling) -> None:
        self.module, self.scaler = module, scaler

    def remove(self) -> None:
        if not parametrize.is_parametrized(self.module, "weight"):
            return  # the user removed every parametrization, ours included
        chain = self.module.parametrizations.weight
        for i, p in enumerate(chain):
            if p is self.scaler:
                del chain[i]
                return


class SpatialGradientScaling(ParameterTransform):
    r"""Spatial Gradient Scaling (Detkov et al., "Reparameterization through Spatial Gradient
    Scaling", ICLR 2023).

    For every eligible convolution l with weight ``W`` of shape ``(c_out, c_in/groups, *K)``,
    the update becomes (paper Eq. 5)

    .. math::  W \leftarrow W - \eta\, f(G_l \odot \partial L/\partial W, \dots)

    where ``G_l`` (shape ``K``, broadcast over both channel dims, ``G_l > 0``, mean 1) comes
    from the spatial dependence of the layer's input (paper Eq. 6–8):
    ``G_l ∝ mean_c k·S_c / ((k−1)·S_c + 1)`` with ``S_c`` the normalised mutual information (or
    |autocorrelation|) between each pixel and its kernel-offset neighbour in channel c
    (:mod:`gradshape.dependence`).  Until the first :meth:`refresh` every ``G_l`` is 1, i.e.
    plain training (the paper's warm-up).  Lemma 1: a fixed ``G = Σ_n M_n`` (see
    :func:`gradshape.branch_scaling`) trains exactly like the multi-branch structure with
    masks ``M_n``.

    Args:
        model: the network.  Layers are keyed by their names in ``model.named_modules()``,
            with the wrappers of ``torch.compile`` and (Distributed)DataParallel stripped (no
            ``_orig_mod.``/``module.`` prefix), so states move between wrapped and plain models.
        k: the transform's hyperparameter (paper Eq. 8; ``k = 5`` is the paper's default and
            ``k = 1`` uses the dependence as it is).
        measure: ``"nmi"`` (paper) or ``"autocorrelation"`` (its ablation).
        mode: ``"gradient"`` multiplies each conv weight's gradient by G before the optimizer
            (exact Lemma 1 semantics; right for SGD with momentum/Nesterov/weight decay, and for
            any optimizer, gradient accumulation, AMP and DDP).  ``"update"`` lets the optimizer
            take its step and multiplies the step Δw by G (paper Appendix A.2's Adagrad*):
            prefer it for adaptive optimizers (Adam, AdamW, Adagrad, RMSprop), whose
            per-coordinate normalisation largely cancels a gradient scaling.
        optimizer: the optimizer, required for ``mode="update"``.
        include, exclude: module names, fnmatch patterns or a predicate ``(name, module)``.
        diag_removal: drop pairs with a zero value and the joint histogram's diagonal (the
            paper's ImageNet setting; see :mod:`gradshape.dependence`).
        schedule: the refresh policy used by :meth:`maybe_refresh`.
        floor: smallest relative scaling before normalisation (keeps G > 0).
        seed: seeds the choice of refresh batches in :meth:`maybe_refresh`.
        engine: ``"auto"`` (compiled CPU kernel when numba is installed, torch otherwise and on
            GPUs), ``"compiled"`` or ``"torch"``.
        even_kernels: also scale convs with an even kernel extent (centre at index K//2).
        patchify: also scale convs whose stride is at least the kernel in every dimension
            (non-overlapping windows: patch embeddings, 2×2 stride-2 downsampling).
        cache_bytes: memory a refresh may use to keep the layers' inputs from its first
            forward pass for the second pass of NMI (``None``: a quarter of the memory
            available when it starts; ``0``: always run the model twice).  See
            :mod:`gradshape.refresh`.

    Layers (see :func:`eligible_convs`; :attr:`skipped` gives the reason for each conv left
    out): frozen weights (``requires_grad=False``) are skipped, and so, unless asked for by
    ``even_kernels``/``patchify``, are convs without a meaningful centre.  G is measured on
    what each convolution operation really convolves (:mod:`gradshape.refresh`): padding done
    in a subclass's own ``forward``, a weight passed straight to ``F.conv1d``, a weight
    transformed before the convolution are all seen.  A selected conv that no refresh forward
    reaches keeps its G (a warning names it; :attr:`unmeasured` says why).  Parameters
    replaced after attaching (``load_state_dict(assign=True)``) are followed, with a warning
    (see :meth:`~gradshape.transform.ParameterTransform.sync_parameters`).  A weight under
    ``torch.nn.utils.parametrize`` (e.g.
    ``torch.nn.utils.parametrizations.weight_norm`` or ``orthogonal``) is supported in
    ``mode="gradient"``: a state-free identity parametrization appended last multiplies the
    gradient of the effective weight by G, which then flows back through the user's
    parametrizations; :meth:`remove` takes it off again and ``state_dict`` keys never change.
    In ``mode="update"`` such layers are skipped.  The deprecated
    ``torch.nn.utils.weight_norm``/``spectral_norm`` (weight not a Parameter) and transposed
    convs are skipped, and raise when asked for by ``include``.  A lazy conv must have run one
    forward pass before attaching.  A conv module called several times per forward is scaled
    once (its gradient is the sum over the calls) and its refresh pools all calls' inputs.

    .. warning::
        Deviations from the authors' code, on purpose: values equal to an axis's maximum are
        counted (their float32 ``max + 1e-12`` drops them); the layer's own padding mode is used
        (theirs always zero-pads, identical for ``padding_mode="zeros"``); dilation multiplies
        the offsets; a layer whose channels are all degenerate gets G = 1 with a warning
        instead of being dropped.

    Example::

        sgs = gs.SpatialGradientScaling(model)          # attach: G = 1 until the first refresh
        for epoch in range(epochs):
            sgs.maybe_refresh(epoch, train_loader)      # warm-up 1, then every 30 epochs
            for x, y in train_loader:                   # your loop, unchanged
                ...
    """

    def __init__(
        self,
        model: nn.Module,
        k: float = 5.0,
        measure: str = "nmi",
        *,
        mode: str = "gradient",
        optimizer: torch.optim.Optimizer | None = None,
        include: LayerSelector = None,
        exclude: LayerSelector = None,
        diag_removal: bool = False,
        schedule: RefreshSchedule | None = None,
        floor: float = DEFAULT_FLOOR,
        seed: int = 0,
        engine: str = "auto",
        even_kernels: bool = False,
        patchify: bool = False,
        cache_bytes: int | None = None,
    ) -> None:
        _check_k(k)
        if measure not in MEASURES:
            raise ValueError(
                f"SpatialGradientScaling: unknown measure {measure!r}; expected one of {MEASURES}"
            )
        if engine not in ("auto", "compiled", "torch"):
            raise ValueError(
                f"{_SGS}: engine must be 'auto', 'compiled' or 'torch', got {engine!r}"
            )
        _check_floor(floor, _SGS)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"{_SGS}: seed must be an int, got {type(seed).__name__}")
        if not isinstance(diag_removal, bool):
            raise TypeError(
                f"{_SGS}: diag_removal must be a bool, got {type(diag_removal).__name__}"
            )
        if schedule is not None and not isinstance(schedule, RefreshSchedule):
            raise TypeError("SpatialGradientScaling: schedule must be a RefreshSchedule")
        if not isinstance(model, nn.Module):
            raise TypeError(f"{_SGS}: model must be a torch.nn.Module, got {type(model).__name__}")
        if cache_bytes is not None and (
            isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int) or cache_bytes < 0
        ):
            raise ValueError(
                f"{_SGS}: cache_bytes must be None or an int >= 0, not {cache_bytes!r}"
            )
        for label, flag in (("even_kernels", even_kernels), ("patchify", patchify)):
            if not isinstance(flag, bool):
                raise TypeError(f"{_SGS}: {label} must be a bool, got {type(flag).__name__}")
        self._forward_model = unwrap_model(model)
        convs, skipped = _select(
            self._forward_model,
            include,
            exclude,
            parametrized=mode == "gradient",
            even_kernels=even_kernels,
            patchify=patchify,
        )
        if not convs:
            total = sum(_is_conv(m) for m in self._forward_model.modules())
            raise ValueError(
                no_layer_message(_SGS, model, total, "convolution", skipped, include)
                + ("" if total else " (SGS scales Conv1d/Conv2d/Conv3d weights)")
            )
        self._check_shared_weights(convs)
        self.model = model
        self.modules: dict[str, nn.Module] = convs
        self.skipped: dict[str, str] = {n: s.reason for n, s in skipped.items()}
        self.unmeasured: dict[str, str] = {}
        self.k = float(k)
        self.measure = measure
        self.diag_removal = bool(diag_removal)
        self.schedule = schedule or RefreshSchedule()
        self.floor = float(floor)
        self.seed = int(seed)
        self.engine = engine
        self.cache_bytes = cache_bytes
        self._places = _places(self._forward_model, convs)
        self._scalings: dict[str, torch.Tensor] = {
            n: torch.ones(m.kernel_size, dtype=torch.float32) for n, m in convs.items()
        }
        self._pinned: set[str] = set()
        self._device_cache: dict[str, torch.Tensor] = {}
        self._full_cache: dict[str, torch.Tensor] = {}
        self._scalers: dict[str, _GradientScaling] = {}
        self._gone: set[str] = set()
        self.refresh_count = 0
        self.last_refresh_epoch: int | None = None
        self.history: list[tuple[int | None, dict[str, torch.Tensor]]] = []
        super().__init__(
            {n: _weight_parameter(m) for n, m in convs.items()},
            mode=mode,
            optimizer=optimizer,
            watch=self._forward_model,
        )
        on_cpu = any(_weight_parameter(m).device.type == "cpu" for m in convs.values())
        if engine != "torch" and measure == "nmi" and on_cpu:
            _kernels.warm_up_in_background()  # the kernel loads during the warm-up epoch

    @staticmethod
    def _check_shared_weights(convs: Mapping[str, nn.Module]) -> None:
        seen: dict[int, str] = {}
        for name, m in convs.items():
            other = seen.setdefault(id(_weight_parameter(m)), name)
            if other != name:
                raise ValueError(
                    f"SpatialGradientScaling: modules {other!r} and {name!r} share one weight; "
                    "exclude one of them (its gradient would be scaled twice)"
                )

    # ---- the map ------------------------------------------------------------------------
    def apply(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """``G_name ⊙ tensor``, G broadcast over the channel dims (or per output channel)."""
        g = self._device_cache.get(name)
        if g is None or g.device != tensor.device or g.dtype != tensor.dtype:
            g = _broadcast_scaling(self._scalings[name], tensor)
            self._device_cache[name] = g
        return tensor * g

    def _hook_gradient(self, name: str, param: nn.Parameter):
        module = self.modules[name]
        if not parametrize.is_parametrized(module, "weight"):
            return super()._hook_gradient(name, param)
        scaler = _GradientScaling(self._scalings[name].to(param.device))
        parametrize.register_parametrization(module, "weight", scaler)
        self._scalers[name] = scaler
        return _ParametrizationHandle(module, scaler)

    def _detach(self) -> None:
        super()._detach()
        self._scalers.clear()
        self._full_cache.clear()

    def _current_parameter(self, name: str) -> nn.Parameter:
        return _weight_parameter(self.modules[name])

    def sync_parameters(self) -> list[str]:
        gone = [n for n in self.modules if n not in self._gone and not self._in_model(n)]
        if gone:
            self._gone.update(gone)
            warnings.warn(
                f"{_SGS}: the modules {gone[:5]} were replaced in the model after attaching, so "
                "their new weights are not scaled; remove() this SpatialGradientScaling and "
                "attach a new one to the changed model",
                UserWarning,
                stacklevel=3,
            )
        return super().sync_parameters()

    def _in_model(self, name: str) -> bool:
        parent, child = self._places[name]
        return parent is None or parent._modules.get(child) is self.modules[name]

    @torch.no_grad()
    def _transform_steps(self, names: list[str], old: list[torch.Tensor]) -> None:
        """``w ← w_old + G ⊙ (w − w_old)`` for all layers at once (``foreach`` kernels)."""
        params = [self._params[n] for n in names]
        torch._foreach_sub_(params, old)
        torch._foreach_mul_(params, [self._full_scaling(n, self._params[n]) for n in names])
        torch._foreach_add_(params, old)

    def _full_scaling(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """G expanded to ``like``'s (the weight's) shape, device and dtype; cached."""
        g = self._full_cache.get(name)
        if g is None or g.device != like.device or g.dtype != like.dtype or g.shape != like.shape:
            g = _broadcast_scaling(self._scalings[name], like).expand_as(like).contiguous()
            self._full_cache[name] = g
        return g

    # ---- scalings -----------------------------------------------------------------------
    @property
    def scalings(self) -> dict[str, torch.Tensor]:
        """Module name → current G (a copy): kernel-shaped, or as pinned by :meth:`set_scaling`."""
        return {n: g.clone() for n, g in self._scalings.items()}

    def set_scaling(self, name: str, scaling: torch.Tensor | Sequence) -> None:
        """Pin a fixed scaling for one layer; refreshes leave it alone.

        ``scaling`` has one of three shapes, for a weight of shape ``(c_out, c_in/groups, *K)``:
        the kernel's ``K`` (one G for every channel pair, as SGS learns it), ``(c_out, *K)``
        (one per output channel, e.g. RepOptimizers' ``s² + t²·[centre]``), or the weight's
        own shape (one multiplier per weight entry, e.g. RepOptimizers' identity term on the
        ``o = i`` centre).  It is applied as given, not mean-normalised (Lemma 1 needs absolute
        values; only the *learned* SGS scalings have mean 1).  Entries must be finite and > 0.

        Raises:
            KeyError: ``name`` is not a scaled layer.
            ValueError: a shape other than those three (the message names the layer and the
                expected shapes), or an entry that is not finite and > 0.
        """
        if name not in self._scalings:
            layers = list(self._scalings)[:10]
            raise KeyError(f"{_SGS}: no scaled layer named {name!r}; layers: {layers}")
        self._store(name, self._validated(name, scaling))
        self._pinned.add(name)

    def _validated(self, name: str, scaling: torch.Tensor | Sequence) -> torch.Tensor:
        try:
            g = torch.as_tensor(scaling).detach().to("cpu")
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"scaling for {name!r} must be a real tensor ({err})") from None
        if g.is_complex():
            raise TypeError(f"scaling for {name!r} must be real, got {g.dtype}")
        if not g.is_floating_point():
            g = g.double()
        module = self.modules[name]
        kernel = tuple(module.kernel_size)
        per_output = (module.out_channels, *kernel)
        per_weight = (module.out_channels, module.in_channels // module.groups, *kernel)
        if tuple(g.shape) not in (kernel, per_output, per_weight):
            raise ValueError(
                f"scaling for {name!r} has shape {tuple(g.shape)}; expected the kernel shape "
                f"{kernel}, (out_channels, *kernel) = {per_output} or the weight's shape "
                f"{per_weight}"
            )
        if not bool(torch.isfinite(g).all()) or not bool((g > 0).all()):
            raise ValueError(f"scaling for {name!r} must be finite and strictly positive")
        return g.clone()

    def unpin(self, name: str) -> None:
        """Let refreshes update ``name`` again (its G stays until the next refresh)."""
        if name not in self._scalings:
            raise KeyError(f"{_SGS}.unpin: no scaled layer named {name!r}")
        self._pinned.discard(name)

    def _store(self, name: str, g: torch.Tensor) -> None:
        dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
        self._scalings[name] = g.to(dtype)
        self._device_cache.pop(name, None)
        self._full_cache.pop(name, None)
        scaler = self._scalers.get(name)
        if scaler is not None:
            scaler.scaling = self._scalings[name].to(scaler.scaling.device)

    # ---- refresh ------------------------------------------------------------------------
    def refresh(
        self, batches: Iterable[Any], *, epoch: int | None = None
    ) -> SpatialGradientScaling:
        """Recompute every (non-pinned) layer's G from what it convolves on ``batches``.

        ``batches`` yields input tensors, ``(input, target, ...)`` tuples (the first item is
        fed to the model) or dicts of keyword arguments (an ``attention_mask``/
        ``padding_mask`` entry marks padded steps of sequences: see
        :mod:`gradshape.refresh`).  The model runs in eval mode under ``torch.no_grad()``
        and every module's training flag is restored afterwards; each layer is measured on
        the tensors its weight is convolved with, with the padding actually applied.  NMI
        needs two passes over the same pairs: the first forward's inputs are kept for the
        second up to ``cache_bytes``, otherwise the model runs twice, so a list or tuple is
        iterated twice and any other iterable (a generator, a shuffling DataLoader) is first
        collected into a list.  Only one batch at a time is on the model's device.

        A layer that no convolution reached (a branch run only in training, a kernel that
        bypasses ``F.conv*``) keeps its G; :attr:`unmeasured` says why and a
        ``RuntimeWarning`` names it.  Taps that only ever multiply padding hold G = 1 and take
        no part in the normalisation (see :func:`gradshape.dependence_to_scaling`).  Under
        ``torch.distributed`` all ranks must call this together (see
        :mod:`gradshape.distributed`).  Returns ``self``.

        Raises:
            RuntimeError: a scaled module was replaced in the model after attaching.
            ValueError: the batches are empty, or a layer's input holds NaN or inf.
        """
        if epoch is not None:
            _check_epoch(epoch, f"{_SGS}.refresh")
        if isinstance(batches, torch.Tensor):
            batches = [batches]
        if not isinstance(batches, Iterable) or isinstance(batches, (str, Mapping)):
            raise TypeError(
                f"{_SGS}.refresh: batches must be an iterable of batches (a list, a DataLoader), "
                f"got {type(batches).__name__}"
            )
        gone = [n for n in self.modules if not self._in_model(n)]
        if gone:
            raise RuntimeError(
                f"{_SGS}.refresh: the modules {gone[:5]} were replaced in the model after "
                "attaching; remove() this SpatialGradientScaling and attach a new one"
            )
        self.sync_parameters()
        if self.measure == "nmi" and not isinstance(batches, (Sequence, SampledBatches)):
            batches = list(batches)
        targets = {n: self.modules[n] for n in self._scalings if n not in self._pinned}
        check_same_on_all_ranks(
            repr([(n, tuple(m.kernel_size)) for n, m in targets.items()]) + self.measure,
            "the layers to refresh",
        )
        if not targets:
            return self
        found = measure_layers(
            self._forward_model,
            targets,
            batches,
            make_accumulator_factory(
                self.measure, diag_removal=self.diag_removal, engine=self.engine
            ),
            cache_bytes=self.cache_bytes,
            where=f"{_SGS}.refresh",
        )
        for n, (dependence, live) in found.dependence.items():
            g = dependence_to_scaling(dependence, self.k, floor=self.floor, layer=n, live=live)
            self._store(n, g.float())
        self.unmeasured = found.unmeasured
        self._warn(found)
        self.refresh_count += 1
        self.last_refresh_epoch = epoch
        self.history.append((epoch, self.scalings))
        return self

    def _warn(self, found: Measurement) -> None:
        if found.unmeasured:
            listing = "; ".join(f"{n!r}: {why}" for n, why in list(found.unmeasured.items())[:5])
            warnings.warn(
                f"{_SGS}.refresh measured {len(found.dependence)} of "
                f"{len(found.dependence) + len(found.unmeasured)} layers; these keep their "
                f"current G: {listing}.  If a layer is not meant to be scaled, pass "
                "exclude=[...] (or include=[...]) when attaching",
                RuntimeWarning,
                stacklevel=3,
            )
        if found.unmasked:
            listing = "; ".join(f"{n!r}: {why}" for n, why in list(found.unmasked.items())[:5])
            warnings.warn(
                f"{_SGS}.refresh measured {len(found.unmasked)} layer(s) without the batch's "
                f"padding mask (padded steps count as signal there): {listing}",
                RuntimeWarning,
                stacklevel=3,
            )

    def maybe_refresh(self, epoch: int, loader: Iterable[Any]) -> bool:
        """Refresh at the start of ``epoch`` if :attr:`schedule` says so; returns whether it did.

        With a ``DataLoader`` (that has a ``batch_size``) the refresh batches are
        ``schedule.batches`` batches of randomly drawn samples, seeded by ``seed`` and the
        refresh count (reproducible, resumable, independent of the loader's shuffling); with
        any other iterable, its first ``schedule.batches`` items.  Calling it twice for the
        same epoch refreshes once.
        """
        _check_epoch(epoch, f"{_SGS}.maybe_refresh")
        if not isinstance(loader, Iterable) or isinstance(loader, (str, Mapping)):
            raise TypeError(
                f"{_SGS}.maybe_refresh: loader must be a DataLoader or an iterable of batches, "
                f"got {type(loader).__name__}"
            )
        if not self.schedule.due(epoch) or self.last_refresh_epoch == epoch:
            return False
        if isinstance(loader, torch.utils.data.DataLoader) and loader.batch_size is not None:
            batches = SampledBatches(loader, self.schedule.batches, self.seed + self.refresh_count)
        else:
            batches = []
            for i, b in enumerate(loader):
                if i >= self.schedule.batches:
                    break
                batches.append(b)
        self.refresh(batches, epoch=epoch)
        return True

    # ---- state --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and Python values: settings, scalings, pins, schedule position, history."""
        return {
            "settings": {
                "k": self.k,
                "measure": self.measure,
                "mode": self.mode,
                "diag_removal": self.diag_removal,
                "floor": self.floor,
                "seed": self.seed,
                "schedule": asdict(self.schedule),
            },
            "scalings": self.scalings,
            "pinned": sorted(self._pinned),
            "refresh_count": self.refresh_count,
            "last_refresh_epoch": self.last_refresh_epoch,
            "history": [(e, {n: g.clone() for n, g in s.items()}) for e, s in self.history],
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; layer names and shapes must match this model's."""
        super().load_state_dict(state_dict)
        missing = {"settings", "scalings"} - set(state_dict)
        if missing:
            raise ValueError(
                f"SpatialGradientScaling.load_state_dict: missing keys {sorted(missing)}"
            )
        where = f"{_SGS}.load_state_dict"
        settings, scalings = state_dict["settings"], state_dict["scalings"]
        for label, value in (("settings", settings), ("scalings", scalings)):
            if not isinstance(value, Mapping):
                raise TypeError(
                    f"{where}: state_dict[{label!r}] must be a mapping, got {type(value).__name__}"
                )
        if settings.get("mode", self.mode) != self.mode:
            raise ValueError(
                f"SpatialGradientScaling.load_state_dict: state was saved in mode "
                f"{settings['mode']!r}, this instance is in mode {self.mode!r}"
            )
        if set(scalings) != set(self._scalings):
            extra, lacking = (
                set(scalings) - set(self._scalings),
                set(self._scalings) - set(scalings),
            )
            raise ValueError(
                "SpatialGradientScaling.load_state_dict: layers differ "
                f"(in state only: {sorted(extra)[:5]}, in model only: {sorted(lacking)[:5]})"
            )
        checked = {name: self._validated(name, g) for name, g in scalings.items()}
        k = settings.get("k", self.k)
        _check_k(k)
        measure = settings.get("measure", self.measure)
        if measure not in MEASURES:
            raise ValueError(f"SpatialGradientScaling.load_state_dict: unknown measure {measure!r}")
        diag_removal = settings.get("diag_removal", self.diag_removal)
        if not isinstance(diag_removal, bool):
            raise TypeError(
                f"{where}: settings['diag_removal'] must be a bool, got {diag_removal!r}"
            )
        floor = settings.get("floor", self.floor)
        _check_floor(floor, where)
        seed = settings.get("seed", self.seed)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"{where}: settings['seed'] must be an int, got {seed!r}")
        schedule = self.schedule
        if "schedule" in settings:
            try:
                schedule = RefreshSchedule(**settings["schedule"])
            except TypeError as err:
                raise TypeError(
                    f"{where}: settings['schedule'] is not a schedule ({err})"
                ) from None
        pinned = state_dict.get("pinned", [])
        if not isinstance(pinned, (list, tuple, set)) or not set(pinned) <= set(self._scalings):
            raise ValueError(f"{where}: 'pinned' must list layers of this model, got {pinned!r}")
        refresh_count = state_dict.get("refresh_count", 0)
        if (
            isinstance(refresh_count, bool)
            or not isinstance(refresh_count, numbers.Integral)
            or refresh_count < 0
        ):
            raise ValueError(f"{where}: 'refresh_count' must be an int >= 0, got {refresh_count!r}")
        last_epoch = state_dict.get("last_refresh_epoch")
        if last_epoch is not None:
            _check_epoch(last_epoch, f"{where}: 'last_refresh_epoch'")
        try:
            history = [
                (e, {n: torch.as_tensor(g).clone() for n, g in s.items()})
                for e, s in state_dict.get("history", [])
            ]
        except (TypeError, ValueError, AttributeError, RuntimeError) as err:
            raise ValueError(
                f"{where}: 'history' must be a list of (epoch, {{layer: scaling}}) pairs ({err})"
            ) from None
        self.k, self.measure = float(k), measure
        self.diag_removal, self.floor, self.seed = diag_removal, float(floor), int(seed)
        self.schedule = schedule
        for name, g in checked.items():
            self._store(name, g)
        self._pinned = set(pinned)
        self.refresh_count = int(refresh_count)
        self.last_refresh_epoch = last_epoch
        self.history = history

    def __repr__(self) -> str:
        return (
            f"{_SGS}(layers={len(self._scalings)}, k={self.k}, measure={self.measure!r}, "
            f"mode={self.mode!r}, refreshes={self.refresh_count})"
        )
