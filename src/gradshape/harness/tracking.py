"""Live tracking of a run while it trains: per-epoch scalars and G heatmaps for TensorBoard.

``train_run(..., logger="tensorboard")`` (``gradshape train|compare --logger tensorboard``)
writes event files into ``<run folder>/tensorboard/``; ``tensorboard --logdir runs/cmp`` then
shows every run of a comparison side by side while they train.  Per epoch, at step
``epoch + 1`` (the epochs trained so far):

* ``loss/train``, ``accuracy/train`` (running, augmented batches), ``accuracy/val`` and
  ``accuracy/test`` (on the epochs that evaluate), ``lr`` (at the epoch's first step),
  ``time/epoch_seconds`` (training pass and refresh), ``time/refresh_seconds``,
  ``throughput/images_per_second``;
* after a refresh of G (methods that measure it), one greyscale image per scaled layer,
  ``G/<layer>``: the kernel-shaped G (averaged over channels when it has them), each cell
  scaled by the layer's largest entry (white) and drawn 16 pixels wide.

Needs the ``tensorboard`` package (``pip install 'gradshape[tensorboard]'``); the writer is
torch's ``torch.utils.tensorboard.SummaryWriter``.  Tracking reads the run's state and draws no
random numbers, so a tracked run trains exactly as an untracked one.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .report import kernel_picture

__all__ = ["LOGGERS", "TensorBoardTracker", "check_logger", "heatmap_image", "open_tracker"]

#: Values of ``logger`` that :func:`open_tracker` accepts (besides ``None``: no tracking).
LOGGERS = ("tensorboard",)
#: Folder of the event files inside a run folder.
TENSORBOARD_DIR = "tensorboard"
_CELL = 16


def check_logger(logger: str | None) -> None:
    """Raise before any training if ``logger`` is unknown (``ValueError``) or its package is
    missing (``ImportError`` saying what to install)."""
    if logger is None:
        return
    if logger not in LOGGERS:
        raise ValueError(f"logger must be one of {LOGGERS} or None, got {logger!r}")
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ImportError(
            "logger 'tensorboard' needs the tensorboard package: "
            "pip install 'gradshape[tensorboard]'"
        ) from None


def heatmap_image(g: Any) -> np.ndarray | None:
    """A greyscale ``(H, W)`` float32 image in [0, 1] of a scaling ``g``, or ``None``.

    ``P = kernel_picture(g)`` (the kernel-shaped mean over channels, ``(kh, kw)`` or ``(1, k)``
    for a 1-D kernel); the image is ``P / max(P)`` (all zeros when ``max(P) <= 0``) with each
    cell repeated into a 16×16 block.  ``None`` for what :func:`~.report.kernel_picture` does
    not picture (3-D kernels).
    """
    picture = kernel_picture(np.asarray(g, dtype=np.float64))
    if picture is None:
        return None
    top = float(picture.max())
    scaled = picture / top if top > 0 else np.zeros_like(picture)
    block = np.ones((_CELL, _CELL))
    return np.kron(np.clip(scaled, 0.0, 1.0), block).astype(np.float32)


class TensorBoardTracker:
    """Writes one run's epochs to ``folder`` (see the module docstring).

    Args:
        folder: the event files' folder (created).
        first_step: the step of the first epoch this process will log; events of a crashed
            earlier process at this step or later are purged, so a resumed run shows each
            epoch once.
    """

    def __init__(self, folder: Path, first_step: int = 1) -> None:
        from torch.utils.tensorboard import SummaryWriter

        folder.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=first_step)

    def log_epoch(
        self,
        entry: Mapping[str, Any],
        refresh_seconds: float,
        scalings: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Log one history entry (see :func:`~.train.train_run`), the epoch's refresh time and,
        when the epoch refreshed G, the heatmaps of ``scalings`` (layer name → G)."""
        step = int(entry["epoch"]) + 1
        scalars = {
            "loss/train": entry["train_loss"],
            "accuracy/train": entry["train_acc"],
            "accuracy/val": entry.get("val_acc"),
            "accuracy/test": entry.get("test_acc"),
            "lr": entry["lr"],
            "time/epoch_seconds": entry["seconds"],
            "time/refresh_seconds": refresh_seconds,
            "throughput/images_per_second": entry["images_per_second"],
        }
        for tag, value in scalars.items():
            if value is not None:
                self.writer.add_scalar(tag, float(value), step)
        if entry.get("refreshed") and scalings:
            for layer, g in scalings.items():
                image = heatmap_image(g.detach().cpu().double().numpy())
                if image is not None:
                    self.writer.add_image(f"G/{layer}", image, step, dataformats="HW")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_tracker(logger: str | None, run_dir: Path, first_step: int) -> TensorBoardTracker | None:
    """The tracker ``logger`` names for the run in ``run_dir`` (``None``: no tracking)."""
    check_logger(logger)
    if logger is None:
        return None
    return TensorBoardTracker(run_dir / TENSORBOARD_DIR, first_step)
