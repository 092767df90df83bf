"""Process groups for the harness: ``torchrun --nproc_per_node N -m gradshape train ...``.

``torchrun`` starts N copies of the command with ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``
in their environment.  :func:`process_group` turns that into an initialised default process
group (NCCL when the run uses CUDA, gloo on the CPU) for the duration of the command and tears
it down afterwards; outside ``torchrun`` (or with ``WORLD_SIZE=1``) it does nothing.

What the harness does under a process group (see :func:`gradshape.harness.train.train_run`):

* ``optim.batch_size`` stays the *global* batch: each of the N ranks trains on
  ``batch_size / N`` images per step (so it must divide), drawn by a ``DistributedSampler``
  seeded with the run's seed; gradients are averaged by ``DistributedDataParallel``.
* SGS refreshes all-reduce their histograms (:mod:`gradshape.distributed`), so every rank
  holds the same G.
* Every rank evaluates the whole test set (identical results); rank 0 alone prints progress,
  writes checkpoints, ``run.json`` and the comparison's results and report.
* After every epoch the ranks compare a checksum of their weights and stop with an error if
  they have drifted apart.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

from ..distributed import all_reduce_, is_distributed, rank_and_world

__all__ = ["check_in_sync", "device_for_rank", "is_main_process", "process_group"]


def _launched_world() -> int:
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer, got {raw!r}") from None


@contextlib.contextmanager
def process_group(device: str = "auto") -> Iterator[None]:
    """Initialise the default process group when launched by ``torchrun`` with N > 1 ranks.

    ``device`` is the run's device setting: ``"cpu"`` selects gloo, anything that resolves to
    CUDA selects NCCL.  A group that is already initialised (by the caller) is used as it is
    and left alone.
    """
    if _launched_world() <= 1 or (dist.is_available() and dist.is_initialized()):
        yield
        return
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    cuda = not device.startswith("cpu") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def device_for_rank(device: torch.device) -> torch.device:
    """Under a process group a CUDA run uses the GPU ``LOCAL_RANK``; other devices unchanged."""
    if device.type == "cuda" and is_distributed():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the rank that writes files and logs."""
    return rank_and_world()[0] == 0


def check_in_sync(model: torch.nn.Module, what: str) -> None:
    """Raise on every rank if the ranks' parameters differ (one all-reduce of two numbers).

    The checksum is ``Σ_p Σ_i p_i·w_i`` in float64 with fixed pseudo-random weights ``w``, so
    permuted or offset parameters do not cancel.
    """
    if not is_distributed():
        return
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    for i, p in enumerate(model.parameters()):
        flat = p.detach().reshape(-1).double()
        weights = torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64, device=device)
        total += (flat * weights).sum() * (1.0 + 0.01 * i)
    pair = torch.stack([total, -total])
    all_reduce_(pair, "max")
    if not torch.isclose(pair[0], -pair[1], rtol=1e-12, atol=0.0):
        raise RuntimeError(
            f"{what}: the ranks' weights differ (checksums in [{float(-pair[1])!r}, "
            f"{float(pair[0])!r}]); a transform or the model acts differently per rank"
        )
