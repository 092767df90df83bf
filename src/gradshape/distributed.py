"""Collective helpers: no-ops in a single process, all-reduces under ``torch.distributed``.

Collective contract
-------------------
When a default process group with more than one rank is initialised,
:meth:`gradshape.SpatialGradientScaling.refresh` (and :meth:`~gradshape.SpatialGradientScaling.
maybe_refresh`, which calls it) is a *collective*: every rank must call it together, with the
same attached layers and the same measure.  The batches may differ between ranks, in content and
in number (at least one each); the result on every rank is the G of the union of all ranks'
batches.  The collectives, in order, are:

1. a fingerprint of the layers to refresh (:func:`check_same_on_all_ranks`): ranks that disagree
   (one rank excluded or pinned a layer, another measure) raise ``RuntimeError`` on every rank;
2. after each pass over the local batches, a vote (:func:`fail_together`): an error on one rank
   (an empty batch list, NaN inputs, a layer that saw no input) is raised on that rank and a
   ``RuntimeError`` naming it is raised on all the others;
3. the all-reduces of the accumulated statistics (min/max ranges, summed pair counts,
   histograms or moment sums), never the feature maps themselves.

What cannot be detected is a rank that never calls ``refresh``: the other ranks then wait in the
first collective until the process group's timeout (``init_process_group(timeout=...)``) and
fail there.  Call ``refresh``/``maybe_refresh`` unconditionally on every rank, never under
``if rank == 0``.

Gradient scaling itself needs no communication: G is identical on every rank after a refresh
(or a ``load_state_dict``), and a linear map applied per rank commutes with DDP's averaging.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import torch
import torch.distributed as dist

__all__ = [
    "all_reduce_",
    "check_same_on_all_ranks",
    "fail_together",
    "is_distributed",
    "rank_and_world",
]

_OPS = {"sum": "SUM", "min": "MIN", "max": "MAX"}


def is_distributed() -> bool:
    """True when a default process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` in a single process."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


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


@contextlib.contextmanager
def fail_together(what: str) -> Iterator[None]:
    """Run a block of rank-local work; if it raises on any rank, raise on every rank.

    The block must not itself contain collectives.  On exit every rank votes (one all-reduce of
    a flag per rank).  A rank whose block raised re-raises its own exception; the others raise
    ``RuntimeError`` naming the failed ranks and their messages, instead of entering the next
    collective alone and waiting for the timeout.  In a single process it is a plain block.
    """
    if not is_distributed():
        yield
        return
    rank, world = rank_and_world()
    failure: Exception | None = None
    try:
        yield
    except Exception as exc:
        failure = exc
    flags = torch.zeros(world, dtype=torch.int64)
    flags[rank] = failure is not None
    all_reduce_(flags, "sum")
    failed = flags.nonzero().flatten().tolist()
    if not failed:
        return
    messages: list[str | None] = [None] * world
    local = None if failure is None else f"{type(failure).__name__}: {failure}"
    dist.all_gather_object(messages, local)
    if failure is not None:
        raise failure
    details = "; ".join(f"rank {r}: {messages[r]}" for r in failed)
    raise RuntimeError(f"gradshape: {what} failed on rank(s) {failed} ({details})")
