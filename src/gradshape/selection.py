"""Which modules a transform acts on, and the model behind training wrappers.

Shared by every transform and by :mod:`gradshape.reparam`: layers are chosen by name
(``fnmatch`` patterns matched against ``model.named_modules()`` names) or by a predicate, and
always named as in the unwrapped model, so states move between a plain model and the same
model under ``torch.compile`` or (Distributed)DataParallel.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence

from torch import nn

__all__ = ["LayerSelector", "layer_predicate", "unwrap_model"]

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
