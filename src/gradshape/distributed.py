"""Collective helpers: no-ops in a single process, all-reduces under ``torch.distributed``.

Collective contract: when a default process group is initialised, every rank must call
:meth:`gradshape.SpatialGradientScaling.refresh` together, with the same attached layers and the
same number of passes (the number of batches may differ between ranks).  Each refresh first
all-reduces a fingerprint of the layer list, so ranks that disagree on the layers fail with a
clear error on every rank instead of deadlocking in a later collective.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

__all__ = ["all_reduce_", "check_same_on_all_ranks", "is_distributed"]

_OPS = {"sum": "SUM", "min": "MIN", "max": "MAX"}


def is_distributed() -> bool:
    """True when a default process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_(tensor: torch.Tensor, op: str) -> torch.Tensor:
    """All-reduce ``tensor`` in place with ``op`` in {"sum", "min", "max"}; no-op otherwise.

    Tensors on the CPU are reduced on the CPU when the backend supports it (gloo) and are
    moved to the current CUDA device and back for NCCL.
    """
    if op not in _OPS:
        raise ValueError(f"op must be one of {sorted(_OPS)}, got {op!r}")
    if not is_distributed():
        return tensor
    reduce_op = getattr(dist.ReduceOp, _OPS[op])
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        moved = tensor.to(f"cuda:{torch.cuda.current_device()}")
        dist.all_reduce(moved, op=reduce_op)
        tensor.copy_(moved.to(tensor.device))
    else:
        dist.all_reduce(tensor, op=reduce_op)
    return tensor


def check_same_on_all_ranks(description: str, what: str) -> None:
    """Raise on every rank if ``description`` differs between ranks (no-op in one process)."""
    if not is_distributed():
        return
    digest = int.from_bytes(hashlib.sha256(description.encode()).digest()[:7], "big")
    lo = torch.tensor([digest], dtype=torch.int64)
    hi = lo.clone()
    all_reduce_(lo, "min")
    all_reduce_(hi, "max")
    if int(lo) != int(hi):
        raise RuntimeError(
            f"gradshape: ranks disagree on {what}; every rank must attach the same transform to "
            "the same model and call refresh() together"
        )
