"""The protocol every gradshape transform follows, and their composition.

A *parameter transform* owns a set of named parameters and a linear map ``apply(name, t)``
that it applies to a gradient-shaped tensor ``t`` of the parameter called ``name``.  Where the
map acts depends on ``mode``:

``mode="gradient"``
    A tensor hook on each parameter replaces the incoming gradient ``g`` by ``apply(name, g)``
    before it is accumulated into ``.grad``.  The optimizer then sees the transformed gradient in
    all its arithmetic (momentum, weight decay, Adam moments).  Because ``apply`` is linear and
    identical on every rank, it commutes with gradient accumulation, DDP averaging and AMP's loss
    scale.

``mode="update"``
    The optimizer runs on the raw gradient; a step pre-hook snapshots the parameters and a step
    post-hook replaces the step ``Δw = w_new - w_old`` by ``apply(name, Δw)``.  This is what the
    SGS paper's Appendix A.2 does for adaptive optimizers (Adagrad*), whose per-coordinate
    normalisation would otherwise cancel a gradient scaling.

Transforms attached to the same parameters act in the order they were attached (PyTorch runs
tensor hooks and optimizer step hooks in registration order).  :func:`compose` makes that order
explicit and re-attaches the transforms in the order written.

Attaching never changes a module's class, its ``state_dict`` keys or its Parameter objects;
:meth:`ParameterTransform.remove` detaches every hook and is safe to call twice.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["MODES", "Composed", "GradientTransform", "ParameterTransform", "compose"]

MODES = ("gradient", "update")


class GradientTransform:
    """Minimal protocol: state in and out, and a way to detach.

    Subclasses override :meth:`state_dict`, :meth:`load_state_dict` and :meth:`remove`.  An
    instance is a context manager whose exit calls :meth:`remove`.
    """

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                f"{type(self).__name__}.load_state_dict expects a mapping, "
                f"got {type(state_dict).__name__}"
            )

    def remove(self) -> None:
        """Detach from the model; a no-op when already removed."""

    def __enter__(self) -> GradientTransform:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class ParameterTransform(GradientTransform):
    """A linear map applied per parameter, to its gradient or to its optimizer step.

    Subclasses pass the parameters they act on (keyed by a stable name, normally the owning
    module's name in ``model.named_modules()``) and implement :meth:`apply`.

    Args:
        params: name -> Parameter.  Must be non-empty.
        mode: ``"gradient"`` or ``"update"`` (see the module docstring).
        optimizer: required for ``mode="update"``; the optimizer whose steps are transformed.
    """

    def __init__(
        self,
        params: Mapping[str, nn.Parameter],
        *,
        mode: str = "gradient",
        optimizer: torch.optim.Optimizer | None = None,
        watch: nn.Module | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(
                f"{type(self).__name__}: unknown mode {mode!r}; expected one of {MODES}"
            )
        if mode == "update" and optimizer is None:
            raise ValueError(
                f"{type(self).__name__}: mode='update' transforms the optimizer's step and needs "
                "the optimizer: pass optimizer=..."
            )
        if mode == "gradient" and optimizer is not None:
            raise ValueError(
                f"{type(self).__name__}: optimizer= is only used with mode='update'; "
                "in mode='gradient' the transform acts on gradients for any optimizer"
            )
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"{type(self).__name__}: optimizer must be a torch.optim.Optimizer, "
                f"got {type(optimizer).__name__}"
            )
        if not params:
            raise ValueError(f"{type(self).__name__}: no parameters to transform")
        if mode == "update":
            missing = [n for n, p in params.items() if not _holds(optimizer, p)]
            if missing:
                raise ValueError(
                    f"{type(self).__name__}: the optimizer does not hold the weights of "
                    f"{missing[:5]}; mode='update' can only transform steps it takes"
                )
        self.mode = mode
        self.optimizer = optimizer
        self._params: dict[str, nn.Parameter] = dict(params)
        self._watch = watch
        self._handles: list[RemovableHandle] = []
        self._param_handles: dict[str, RemovableHandle] = {}
        self._snapshot: dict[str, torch.Tensor] = {}
        self._attached = False
        self._attach()

    # -- the map --------------------------------------------------------------------------
    def apply(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Return the transformed copy of a gradient-shaped ``tensor`` of parameter ``name``."""
        raise NotImplementedError

    # -- wiring ---------------------------------------------------------------------------
    @property
    def parameters(self) -> dict[str, nn.Parameter]:
        """The parameters this transform acts on, by name (a copy)."""
        return dict(self._params)

    @property
    def attached(self) -> bool:
        return self._attached

    def _attach(self) -> None:
        """Register every hook, or none: on any error the model is left as it was."""
        for name, p in self._params.items():
            clash = [t for t in _LIVE.get(id(p), []) if type(t) is type(self) and t is not self]
            if clash:
                raise ValueError(
                    f"{type(self).__name__}: the weight of {name!r} already has a "
                    f"{type(self).__name__} attached; call remove() on that one first"
                )
        try:
            for p in self._params.values():
                _LIVE.setdefault(id(p), []).append(self)
            if self.mode == "gradient":
                for name, p in self._params.items():
                    self._param_handles[name] = self._hook_gradient(name, p)
                if self._watch is not None:
                    self._handles.append(self._watch.register_forward_pre_hook(_ForwardWatch(self)))
            else:
                self._handles.append(self.optimizer.register_step_pre_hook(self._before_step))
                self._handles.append(self.optimizer.register_step_post_hook(self._after_step))
        except BaseException:
            self._detach()
            raise
        self._attached = True

    def _detach(self) -> None:
        for h in [*self._handles, *self._param_handles.values()]:
            h.remove()
        self._handles.clear()
        self._param_handles.clear()
        self._snapshot.clear()
        for p in self._params.values():
            live = _LIVE.get(id(p), [])
            if self in live:
                live.remove(self)
            if not live:
                _LIVE.pop(id(p), None)
        self._attached = False

    def remove(self) -> None:
        """Detach every hook; the model and optimizer are left exactly as before attaching."""
        self._detach()

    def _hook_gradient(self, name: str, param: nn.Parameter) -> RemovableHandle:
        """Route ``param``'s gradient through :meth:`apply`; returns a handle to undo it.

        Subclasses override this for parameters a tensor hook cannot reach (the handle only
        needs a ``remove()`` method).
        """
        return param.register_hook(self._gradient_hook(name))

    def _gradient_hook(self, name: str):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            return self.apply(name, grad)

        return hook

    # -- replaced parameters --------------------------------------------------------------
    def _current_parameter(self, name: str) -> nn.Parameter:
        """The Parameter ``name`` refers to now (subclasses look it up on the module)."""
        return self._params[name]

    def sync_parameters(self) -> list[str]:
        """Follow parameters that were replaced since attaching; returns their names.

        ``model.load_state_dict(sd, assign=True)``, ``module.weight = nn.Parameter(...)`` or a
        framework swapping tensors leaves the hooks on Parameters the model no longer uses.
        This moves each hook to the module's current weight and warns once, naming the layer.
        It runs by itself before every forward of the watched model (mode ``"gradient"``) and
        before every optimizer step (mode ``"update"``, where the optimizer must hold the new
        Parameter, else ``RuntimeError``).
        """
        replaced = []
        for name, old in list(self._params.items()):
            new = self._current_parameter(name)
            if new is old:
                continue
            if self.mode == "update" and not _holds(self.optimizer, new):
                raise RuntimeError(
                    f"{type(self).__name__}: the weight of {name!r} was replaced and the "
                    "optimizer does not hold the new Parameter, so neither the optimizer nor "
                    "this transform would act on it: build the optimizer (and the transform) "
                    "again after replacing parameters"
                )
            self._rebind(name, old, new)
            replaced.append(name)
        if replaced:
            warnings.warn(
                f"{type(self).__name__}: the weights of {replaced[:5]} were replaced after "
                "attaching (e.g. load_state_dict(assign=True)); the transform now acts on the "
                "new Parameters",
                UserWarning,
                stacklevel=3,
            )
        return replaced

    def _rebind(self, name: str, old: nn.Parameter, new: nn.Parameter) -> None:
        live = _LIVE.get(id(old), [])
        if self in live:
            live.remove(self)
        if not live:
            _LIVE.pop(id(old), None)
        _LIVE.setdefault(id(new), []).append(self)
        self._params[name] = new
        self._snapshot.pop(name, None)
        if self.mode == "gradient":
            self._param_handles.pop(name).remove()
            self._param_handles[name] = self._hook_gradient(name, new)

    # -- update mode ----------------------------------------------------------------------
    @torch.no_grad()
    def _before_step(self, optimizer, args, kwargs) -> None:
        self.sync_parameters()
        names = list(self._params)
        for n in names:
            buffer = self._snapshot.get(n)
            p = self._params[n]
            if buffer is None or buffer.shape != p.shape or buffer.device != p.device:
                self._snapshot[n] = torch.empty_like(p, memory_format=torch.preserve_format)
            elif buffer.dtype != p.dtype:
                self._snapshot[n] = buffer.to(p.dtype)
        torch._foreach_copy_([self._snapshot[n] for n in names], list(self._params.values()))

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        """``w ← w_old + apply(w − w_old)`` for every parameter the step changed."""
        self._transform_steps(list(self._params), [self._snapshot[n] for n in self._params])

    def _transform_steps(self, names: list[str], old: list[torch.Tensor]) -> None:
        """Replace each parameter's step by :meth:`apply` of it (subclasses may batch this)."""
        for name, before in zip(names, old, strict=True):
            p = self._params[name]
            p.copy_(before + self.apply(name, p - before))


class _ForwardWatch:
    """The forward pre-hook that follows replaced parameters (see ``sync_parameters``).

    It holds the transform weakly, and a copy of the model (``copy.deepcopy``, e.g. for an EMA,
    or pickling) gets a no-op hook in its place: the copy's parameters are not the transform's.
    """

    def __init__(self, transform: ParameterTransform) -> None:
        self._transform = weakref.ref(transform)

    def __call__(self, _module: nn.Module, _args: Any) -> None:
        transform = self._transform()
        if transform is not None:
            transform.sync_parameters()

    def __deepcopy__(self, memo: dict) -> Any:
        return _unwatched

    def __reduce__(self) -> tuple:
        return (_no_watch, ())


def _unwatched(_module: nn.Module, _args: Any) -> None:
    """What a copied model holds in place of a :class:`_ForwardWatch`."""


def _no_watch() -> Any:
    return _unwatched


def _holds(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> bool:
    return any(q is param for group in optimizer.param_groups for q in group["params"])


# id(param) -> transforms attached to it, in attachment order.  An entry holds the transform,
# which holds the parameter, so an id cannot be reused while it is listed here.
_LIVE: dict[int, list[ParameterTransform]] = {}


class Composed(GradientTransform):
    """Several transforms applied in the order given (see :func:`compose`)."""

    def __init__(self, transforms: list[GradientTransform]) -> None:
        self.transforms = list(transforms)

    def __iter__(self) -> Iterator[GradientTransform]:
        return iter(self.transforms)

    def state_dict(self) -> dict[str, Any]:
        return {str(i): t.state_dict() for i, t in enumerate(self.transforms)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        super().load_state_dict(state_dict)
        expected = {str(i) for i in range(len(self.transforms))}
        if set(state_dict) != expected:
            raise ValueError(
                f"Composed.load_state_dict: expected keys {sorted(expected)}, "
                f"got {sorted(state_dict)}"
            )
        for i, t in enumerate(self.transforms):
            t.load_state_dict(state_dict[str(i)])

    def remove(self) -> None:
        for t in self.transforms:
            t.remove()


def compose(*transforms: GradientTransform) -> Composed:
    """Apply ``transforms`` in the order written: ``compose(a, b)`` computes ``b(a(g))``.

    Parameter transforms are re-attached in this order, so the result does not depend on the
    order in which they were constructed.  Transforms that are not parameter transforms (for
    instance :class:`~gradshape.PowerGrad`, which lives in the loss) are carried along for their
    state.

    Example::

        sgs = gs.SpatialGradientScaling(model)
        cdg = gs.ChannelDirectedGradients(model)
        both = gs.compose(sgs, cdg)      # gradient -> G ⊙ g -> CDG smoothing -> optimizer
    """
    if not transforms:
        raise ValueError("compose: give at least one transform")
    for t in transforms:
        if not isinstance(t, GradientTransform):
            raise TypeError(f"compose: {type(t).__name__} is not a gradshape transform")
    if len({id(t) for t in transforms}) != len(transforms):
        raise ValueError("compose: the same transform is listed twice")
    params = [t for t in transforms if isinstance(t, ParameterTransform)]
    for t in params:
        if t.attached:
            t._detach()
    for t in params:
        t._attach()
    return Composed(list(transforms))
