"""Batches that a method runs its model over outside the training step: an SGS refresh, DyRep's
BatchNorm recalibration.

* :func:`batch_input`, :func:`to_device`, :func:`run_model`: what of a batch the model takes,
  on the model's device, and the call (a dict is passed as keyword arguments).
* :class:`SampledBatches`: ``count`` random batches of a DataLoader's dataset under a seed,
  the same on every pass and shared out over the ranks under ``torch.distributed``.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from .distributed import rank_and_world

__all__ = ["SampledBatches", "batch_input", "run_model", "to_device"]


def batch_input(batch: Any, role: str) -> Any:
    """The model input of a batch: a tensor, the first item of an ``(input, target, ...)``
    tuple or list, or a dict of keyword arguments.

    Args:
        batch: one item of the batch iterable.
        role: what the batches are for (``"refresh"``, ``"recalibration"``), for the message.

    Raises:
        TypeError: ``batch`` is none of these (an empty tuple included).
    """
    if isinstance(batch, torch.Tensor | Mapping):
        return batch
    if isinstance(batch, tuple | list) and batch:
        return batch[0]
    raise TypeError(
        f"{role} batches must be tensors, (input, target, ...) tuples, or dicts of model "
        f"keyword arguments; got {type(batch).__name__}"
    )


def to_device(x: Any, device: torch.device) -> Any:
    """``x`` on ``device``: a tensor moved (``non_blocking``), a dict's values moved
    (recursively), anything else as it is."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, Mapping):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


def run_model(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a dict of keyword arguments, else ``model(inputs)``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch, numpy and ``random`` for a block and restore their states after it."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class SampledBatches:
    """``count`` random batches of a DataLoader's dataset, re-iterable and identical each time.

    The indices are a random permutation of the dataset drawn from a generator seeded by
    ``seed``, cut into ``loader.batch_size`` chunks (``count`` of them, fewer when the dataset
    is smaller); each batch is ``loader.collate_fn`` of its samples, so the dataset's random
    augmentation applies and only one batch is held in memory at a time.  Under
    ``torch.distributed`` every rank draws the same chunks and keeps every ``world``-th one
    (rank r: chunks r, r + world, ...).

    The augmentation's random numbers (the global generators' states are restored after each
    batch):

    * ``reseed=True``: chunk j is collated under ``seed · 1_000_003 + j`` (torch, numpy and
      ``random`` seeded), so a batch is the same whichever rank draws it and the ranks together
      see exactly the single-process batches (what an all-reduced measurement needs);
    * ``reseed=False``: this rank's chunks are collated in turn from one torch stream, the
      seeded generator's state after drawing the permutation; numpy and ``random`` are neither
      seeded nor restored (DyRep's recalibration batches, drawn so since it was added).

    Args:
        loader: a DataLoader with a ``batch_size``; its dataset, collate function and batch
            size are used (not its sampler or workers).
        count: batches in all, over every rank.
        seed: seeds the permutation and the augmentation.
        where: the caller, for messages.
        setting: the setting that gives ``count``, for messages.
        reseed: see above.

    Raises:
        ValueError: fewer chunks than ranks.
    """

    def __init__(
        self,
        loader: torch.utils.data.DataLoader,
        count: int,
        seed: int,
        *,
        where: str,
        setting: str,
        reseed: bool = True,
    ) -> None:
        self.dataset = loader.dataset
        self.collate = loader.collate_fn
        size = len(self.dataset)
        batch_size = loader.batch_size
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(size, generator=generator)
        total = min(size, count * batch_size)
        chunks = [order[i : i + batch_size].tolist() for i in range(0, total, batch_size)]
        rank, world = rank_and_world()
        if len(chunks) < world:
            raise ValueError(
                f"{where}: {len(chunks)} batches cannot be shared by {world} ranks; raise "
                f"{setting} (or the dataset size) to at least {world}"
            )
        self.chunks = list(enumerate(chunks))[rank::world]
        self.seed = seed
        self.reseed = reseed
        self._stream = generator.get_state()

    def __iter__(self) -> Iterator[Any]:
        stream = self._stream
        for j, chunk in self.chunks:
            if self.reseed:
                with _seeded(self.seed * 1_000_003 + j):
                    yield self.collate([self.dataset[i] for i in chunk])
                continue
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(stream)
                batch = self.collate([self.dataset[i] for i in chunk])
                stream = torch.get_rng_state()
            yield batch

    def __len__(self) -> int:
        return len(self.chunks)
