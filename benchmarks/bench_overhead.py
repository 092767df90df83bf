"""Training overhead of SGS: per step, and over a whole run at the paper's refresh schedule.

Per step: the median time of one training step (forward, backward, optimizer step) on a fixed
batch, for a CIFAR VGG-11 and a CIFAR ResNet-18 (CPU-sized by a width multiplier), in these
variants, each its own copy of the same initial model:

* SGD with momentum 0.9 and weight decay: ``plain``, ``plain (copy)`` (a second identical
  plain model: the noise floor of the comparison), ``SGS gradient`` (G multiplies ∂L/∂W
  before the step), ``SGS update`` (G multiplies the step), and the structural baselines
  ``ACB``, ``RepVGG``, ``DBB`` (``gs.reparam.convert``, per-branch BatchNorm, as trained);
* Adam: ``plain``, ``SGS gradient``, ``SGS update``.

SGS's G comes from one refresh on two batches before timing (so G ≠ 1).  All variants are
timed one step each per round, the order rotating, after three warm-up steps each.

Whole run at the paper's CIFAR schedule (600 epochs, warm-up 1, a refresh every 30 epochs from
20 batches: 20 refreshes; CIFAR's 50,000 training images at this batch size), from the measured
times (medians; per-step overhead as the paired median below)::

    amortised refresh = t_refresh · refreshes / (epochs · steps_per_epoch · t_plain_step)
    whole-run overhead = (t_sgs_step − t_plain_step) / t_plain_step + amortised refresh
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import gradshape as gs

from .common import image_batch, interleaved, median, resnet18, timed, vgg

EPOCHS, CIFAR_IMAGES = 600, 50_000
SCHEDULE = gs.RefreshSchedule(warmup=1, every=30, batches=20)
OPTIMIZERS: dict[str, Callable] = {
    "SGD momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4),
    "Adam": lambda p: torch.optim.Adam(p, lr=1e-3),
}
STRUCTURES = {"ACB": "acb", "RepVGG": "repvgg", "DBB": "dbb"}


class _Trainer:
    """One variant: a model copy, its optimizer and (for SGS) the attached transform."""

    def __init__(self, factory, optimizer: str, variant: str, x, y, refresh_batches) -> None:
        torch.manual_seed(0)
        model = factory()
        if variant in STRUCTURES:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # 1×1 shortcuts are skipped, on purpose
                model = gs.reparam.convert(model, STRUCTURES[variant]).model
        self.model = model.to(x.device).train()
        self.opt = OPTIMIZERS[optimizer](self.model.parameters())
        self.sgs = None
        if variant.startswith("SGS"):
            mode = variant.split()[1]
            self.sgs = gs.SpatialGradientScaling(
                self.model, mode=mode, optimizer=self.opt if mode == "update" else None
            )
            self.sgs.refresh(refresh_batches)
        self.x, self.y = x, y

    def step(self) -> None:
        loss = F.cross_entropy(self.model(self.x), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def _step_times(
    factory, x, y, refresh_batches, rounds: int, device: torch.device
) -> dict[tuple[str, str], tuple[float, float]]:
    """(optimizer, variant) → (median step seconds, median over rounds of step / plain step)."""
    sgd = ("plain", "plain (copy)", "SGS gradient", "SGS update", *STRUCTURES)
    variants = [("SGD momentum", v) for v in sgd]
    variants += [("Adam", v) for v in ("plain", "SGS gradient", "SGS update")]
    trainers = {key: _Trainer(factory, *key, x, y, refresh_batches) for key in variants}
    for t in trainers.values():
        for _ in range(3):
            t.step()
    times = interleaved({key: t.step for key, t in trainers.items()}, rounds, device)
    for t in trainers.values():
        if t.sgs is not None:
            t.sgs.remove()
    return {
        (opt, v): (
            median(times[(opt, v)]),
            median([a / b for a, b in zip(times[(opt, v)], times[(opt, "plain")])]),
        )
        for opt, v in variants
    }


def _refresh_time(factory, batches: list[torch.Tensor], device: torch.device) -> float:
    torch.manual_seed(0)
    sgs = gs.SpatialGradientScaling(factory().to(device))
    times = [timed(lambda: sgs.refresh(batches), device) for _ in range(2)]
    sgs.remove()
    return median(times)


def run(device: torch.device, quick: bool = False) -> str:
    """Measure both networks; return a Markdown section."""
    width, batch, rounds = (0.125, 32, 8) if quick else (0.25, 64, 25)
    nets: dict[str, Callable[[], nn.Module]] = {
        "VGG-11": lambda: vgg("vgg11", width),
        "ResNet-18": lambda: resnet18(width),
    }
    x = image_batch(batch).to(device)
    y = torch.arange(batch, device=device) % 10
    refresh_batches = [image_batch(batch, start=(i + 1) * batch) for i in range(SCHEDULE.batches)]
    refreshes = sum(SCHEDULE.due(e) for e in range(EPOCHS))
    steps_per_epoch = math.ceil(CIFAR_IMAGES / batch)
    step_rows, run_rows = [], []
    for net, factory in nets.items():
        t = _step_times(factory, x, y, refresh_batches[:2], rounds, device)
        t_refresh = _refresh_time(factory, refresh_batches, device)
        for (opt, variant), (seconds, rel) in t.items():
            step_rows.append(
                f"| {net} | {opt} | {variant} | {seconds * 1e3:.1f} | {(rel - 1) * 100:+.1f} % |"
            )
        plain_step = t[("SGD momentum", "plain")][0]
        amortised = t_refresh * refreshes / (EPOCHS * steps_per_epoch * plain_step)
        for opt, mode in (("SGD momentum", "SGS gradient"), ("Adam", "SGS update")):
            per_step = t[(opt, mode)][1] - 1
            run_rows.append(
                f"| {net} | {opt}, {mode} | {per_step * 100:+.2f} % | {t_refresh:.2f} | "
                f"{amortised * 100:.3f} % | **{(per_step + amortised) * 100:+.2f} %** |"
            )
    return "\n".join(
        [
            "## Training overhead of SGS",
            "",
            f"CIFAR VGG-11 and ResNet-18 (3×3 conv-BN-ReLU, width {width:g}) on {device.type}, "
            f"batch {batch}×3×32×32; {rounds} interleaved rounds (one step per variant per "
            "round, order rotating) after 3 warm-up steps.  Step ms: median; overhead: median "
            "over rounds of (step / the same optimizer's plain step in that round) − 1, which "
            "cancels slow drifts in machine load; `plain (copy)`, a second identical plain "
            "model, shows the noise floor.  Target: whole-run overhead ≤ 2 %; the "
            "authors report 5–13 % more GPU-hours, and the structural baselines cost far more.",
            "",
            "| network | optimizer | variant | step ms | overhead |",
            "| --- | --- | --- | ---: | ---: |",
            *step_rows,
            "",
            f"Whole run at the paper's CIFAR schedule: {EPOCHS} epochs of {steps_per_epoch} "
            f"steps ({CIFAR_IMAGES:,} images / {batch}), {refreshes} refreshes (warm-up "
            f"{SCHEDULE.warmup}, every {SCHEDULE.every}) of {SCHEDULE.batches} batches of "
            f"{batch}.  amortised refresh = t_refresh × {refreshes} / ({EPOCHS} × "
            f"{steps_per_epoch} × t_plain_step); whole-run overhead = per-step overhead + "
            "amortised refresh.",
            "",
            "| network | optimizer, mode | per-step overhead | refresh s | amortised refresh | "
            "whole-run overhead |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
            *run_rows,
            "",
        ]
    )
