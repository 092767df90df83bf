"""Which modules a transform acts on, and the model behind training wrappers.

Shared by every transform and by :mod:`gradshape.reparam`: layers are chosen by name
(``fnmatch`` patterns matched against ``model.named_modules()`` names) or by a predicate, and
always named as in the unwrapped model, so states move between a plain model and the same
model under ``torch.compile`` or (Distributed)DataParallel.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

from torch import nn

__all__ = [
    "LayerSelector",
    "Skip",
    "forward_override",
    "frozen_reason",
    "layer_predicate",
    "no_layer_message",
    "unwrap_model",
]

#: Module names or ``fnmatch`` patterns (one or several), or ``(name, module) -> bool``.
LayerSelector = str | Sequence[str] | Callable[[str, nn.Module], bool] | None


def layer_predicate(select: LayerSelector, label: str) -> Callable[[str, nn.Module], bool] | None:
    """``select`` as a predicate ``(name, module) -> bool`` (``None`` stays ``None``).

    ``label`` names the argument in the error raised for anything that is neither patterns nor
    a callable (``"include"``, ``"exclude"``).
    """
    if select is None:
        return None
    if callable(select):
        return select
    if not isinstance(select, (str, Sequence)):
        raise TypeError(
            f"{label} must be module names/patterns or a predicate (name, module) -> bool, "
            f"got {type(select).__name__}"
        )
    patterns = [select] if isinstance(select, str) else list(select)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(
            f"{label} must be module names/patterns or a predicate (name, module) -> bool"
        )
    return lambda name, _m: any(fnmatch.fnmatchcase(name, p) for p in patterns)


class Skip(NamedTuple):
    """A layer left out: a short ``kind`` (for the counts of an error's headline) and the
    ``reason`` given to the user (name the module's class, say what to do)."""

    kind: str
    reason: str


def frozen_reason(kind: str, weight: object) -> str:
    """The reason a layer with a frozen weight is skipped (``""`` if it trains)."""
    if getattr(weight, "requires_grad", True):
        return ""
    return (
        f"{kind}'s weight is frozen (requires_grad=False): it gets no gradient to transform; "
        "unfreeze it before attaching to have it transformed"
    )


def no_layer_message(
    owner: str,
    model: nn.Module,
    total: int,
    layer_kind: str,
    skipped: Mapping[str, Skip],
    include: object,
) -> str:
    """Headline of the error raised when a transform finds no layer to act on.

    Counts the ``total`` layers of ``layer_kind`` the model has and, per kind of skip, how many
    were left out and why (the first reason of each kind stands for the rest).
    """
    counts = Counter(s.kind for s in skipped.values())
    first = {}
    for name, s in skipped.items():
        first.setdefault(s.kind, (name, s.reason))
    parts = [
        f"{n} {kind} (e.g. {first[kind][0]!r}: {first[kind][1]})" for kind, n in counts.items()
    ]
    head = (
        f"{owner}: {type(model).__name__} has {total} {layer_kind}"
        + ("" if total == 1 else "s")
        + " and none to act on"
    )
    if include is not None:
        head += f" (include={include!r} selects no eligible one)"
    return head + (": " + "; ".join(parts) if parts else "")


_TORCH_CONVS = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


def forward_override(module: nn.Module) -> str:
    """Whether a conv module computes PyTorch's own convolution of its weight.

    Returns ``""`` when the module's class uses the ``forward`` and ``_conv_forward`` of the
    torch conv class it derives from (a subclass that only adds a constructor, attributes or
    methods computes exactly ``F.conv*(input, weight, bias, stride, padding, dilation,
    groups)``), and otherwise a reason naming the class and the method it overrides.

    One rule for both halves of gradshape: :mod:`gradshape.reparam` converts only modules that
    compute the standard convolution (its branches reproduce exactly that), while
    :class:`gradshape.SpatialGradientScaling` measures any module on the tensor its weight is
    really convolved with, so an override changes how a layer is measured, never whether.
    """
    base = next((c for c in type(module).__mro__ if c in _TORCH_CONVS), None)
    if base is None:
        return f"{type(module).__name__} is not a torch convolution"
    for method in ("forward", "_conv_forward"):
        if getattr(type(module), method) is not getattr(base, method):
            owner = next(c for c in type(module).__mro__ if method in vars(c))
            return (
                f"{type(module).__name__} overrides {method} ({owner.__module__}."
                f"{owner.__qualname__}), so it may compute something else than "
                f"{base.__name__}'s convolution of its weight"
            )
    return ""


def unwrap_model(model: nn.Module) -> nn.Module:
    """``model`` without the wrappers of torch.compile and (Distributed)DataParallel.

    Hooks and refresh forwards go to the unwrapped model: forward hooks added after
    ``torch.compile`` are ignored by the compiled module (pytorch issue 117758), and DDP's
    forward may broadcast buffers, a collective that would tie a refresh to each rank's number
    of batches.
    """
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model
