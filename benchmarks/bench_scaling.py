"""Refresh time against map size: pixels, channels and batches, one at a time.

The work of an NMI refresh is the number of pixel pairs it histograms,

    pairs = batches · N · C · Σ_δ |window(δ)|

over the offsets δ of a 3×3 kernel (one of each ±δ pair) on the zero-padded map, so its time
should be a + b·pairs.  Maps are smooth post-ReLU noise (``relu(avg_pool5(noise) − 0.1)``,
about half zeros, like the VGG-16 maps of the refresh benchmark), streamed through
``gs.spatial_dependence`` (engine ``auto``) as a list of batches.  Three series vary one
factor with the other two at the base (side 16, 64 channels, 1 batch of 64 images): side
(pixels = side²), channels, streamed batches.  A least-squares line through all points gives
R² and the time per million pairs (the slope b); so does a line through each series.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import gradshape as gs
from gradshape.dependence import PairGeometry

from .common import median, timed

BASE = {"side": 16, "channels": 64, "batches": 1}
IMAGES = 64


def _maps(side: int, channels: int, batches: int, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(side * 1000 + channels)
    out = []
    for _ in range(batches):
        noise = torch.randn(IMAGES, channels, side + 4, side + 4, generator=g)
        out.append(torch.relu(F.avg_pool2d(noise, 5, 1) - 0.1).to(device))
    return out


def pairs(side: int, channels: int, batches: int) -> int:
    """Pixel pairs histogrammed for ``batches`` maps ``(IMAGES, channels, side, side)``."""
    geometry = PairGeometry.create((3, 3), padding=1)
    padded = (side + 2, side + 2)
    per_map = sum(geometry.windows(padded, o)[2] for o in geometry.offsets)
    return batches * IMAGES * channels * per_map


def _fit(x: list[float], y: list[float]) -> tuple[float, float, float]:
    """Least-squares ``y = a + b·x``; returns (a, b, R²)."""
    xt, yt = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    design = torch.stack([torch.ones_like(xt), xt], dim=1)
    a, b = torch.linalg.lstsq(design, yt.unsqueeze(1)).solution.squeeze(1).tolist()
    residual = ((yt - a - b * xt) ** 2).sum()
    total = ((yt - yt.mean()) ** 2).sum()
    return a, b, float(1 - residual / total)


def run(device: torch.device, quick: bool = False) -> str:
    """Time the three series; return a Markdown section."""
    series = {
        "side": (8, 16, 24, 32) if quick else (8, 16, 24, 32, 48, 64),
        "channels": (16, 64, 128) if quick else (16, 32, 64, 128, 256),
        "batches": (1, 2, 4) if quick else (1, 2, 4, 8, 16),
    }
    reps = 2 if quick else 5
    gs.spatial_dependence(_maps(8, 4, 1, device), (3, 3), padding=1)  # warm-up
    rows, xs, ys, fits = [], [], [], []
    for factor, values in series.items():
        first = len(xs)
        for v in values:
            size = {**BASE, factor: v}
            maps = _maps(size["side"], size["channels"], size["batches"], device)
            seconds = median(
                [
                    timed(lambda m=maps: gs.spatial_dependence(m, (3, 3), padding=1), device)
                    for _ in range(reps)
                ]
            )
            n = pairs(**size)
            xs.append(n)
            ys.append(seconds)
            rows.append(
                f"| {factor} | {size['side']}×{size['side']} | {size['channels']} | "
                f"{size['batches']} | {n / 1e6:.2f} | {seconds * 1e3:.1f} | "
                f"{seconds / n * 1e9:.2f} |"
            )
        _, slope, r2_factor = _fit(xs[first:], ys[first:])
        fits.append(f"| {factor} | {slope * 1e9:.2f} | {r2_factor:.4f} |")
    a, b, r2 = _fit(xs, ys)
    return "\n".join(
        [
            "## Scaling of the refresh with map size",
            "",
            f"`gs.spatial_dependence` (engine `auto`, {device.type}) on smooth post-ReLU maps "
            f"of {IMAGES} images per batch, 3×3 kernel, padding 1; one factor varied at a time "
            f"around side {BASE['side']}, {BASE['channels']} channels, {BASE['batches']} "
            f"batch; median of {reps} calls.  Pairs = batches · {IMAGES} · C · Σ_δ |window(δ)| "
            "over the 4 offsets of a 3×3 kernel (one of each ±δ).",
            "",
            "| varied | side | channels | batches | million pairs | ms | ns per pair |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
            *rows,
            "",
            f"Least-squares line through all {len(xs)} points: time = {a * 1e3:.1f} ms + "
            f"{b * 1e9:.2f} ms per million pairs, **R² = {r2:.4f}**.  Per series:",
            "",
            "| varied | ms per million pairs (slope) | R² |",
            "| --- | ---: | ---: |",
            *fits,
            "",
        ]
    )
