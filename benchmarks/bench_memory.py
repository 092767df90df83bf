"""Peak memory of a refresh against the number of refresh batches.

Each setting runs in a fresh interpreter (``python -m benchmarks.bench_memory --child ...``):
it builds a CIFAR VGG-16 and a data set of Fashion-MNIST images (made one at a time, so the
data set's memory is the same at every batch count), runs one untimed warm-up refresh on one
small batch (numba loads its compiled code), then resets the resident set's high-water mark
(``/proc/self/clear_refs``) and measures ``VmHWM − VmRSS before``: the memory the refresh
itself adds at its peak, as the kernel counts resident pages (torch's CPU allocations are
invisible to ``tracemalloc``).

* **gradshape**: ``sgs.maybe_refresh(1, loader)`` with ``RefreshSchedule(batches=B)`` and a
  ``DataLoader``, the library's own path: batches are drawn and collated one at a time, the
  two passes stream them, and only O(C·K·B²) numbers per layer are kept between batches.
* **authors' procedure** (measured): every batch's input to every conv is kept, then the anchor
  (:mod:`.anchor`) runs per layer on the concatenated maps.
* **authors' kept maps** (computed): B · N · Σ_layers C·(H+2)·(W+2) · 4 bytes, the zero-padded
  float32 maps their code keeps (it pads each input before storing it).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

import gradshape as gs

from .anchor import anchor_dependence
from .common import Images, conv_inputs, current_rss, peak_rss, reset_peak_rss, run_child, vgg

MODES = ("gradshape", "authors")


def _authors(model: nn.Module, loader: torch.utils.data.DataLoader) -> None:
    kept: dict[str, list[torch.Tensor]] = {}
    for x, _ in loader:
        for name, m in conv_inputs(model, x).items():
            kept.setdefault(name, []).append(m)
    for name, maps in kept.items():
        gs.dependence_to_scaling(anchor_dependence(maps), 5.0, layer=name)


def child(mode: str, batches: int, batch: int, width: float) -> dict:
    """One measurement in this (fresh) process; returns bytes and seconds."""
    torch.manual_seed(0)
    model = vgg("vgg16", width)
    data = Images(batches * batch)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=False)
    sgs = gs.SpatialGradientScaling(model, schedule=gs.RefreshSchedule(batches=batches))
    sgs.refresh([data[0][0].unsqueeze(0)])  # warm-up
    before = current_rss()
    reset_peak_rss()
    start = time.perf_counter()
    if mode == "gradshape":
        sgs.maybe_refresh(1, loader)
    else:
        _authors(model, loader)
    seconds = time.perf_counter() - start
    return {"added": peak_rss() - before, "before": before, "seconds": seconds}


def kept_bytes(model: nn.Module, images: int) -> int:
    """Bytes of the zero-padded float32 conv inputs the authors' code keeps for ``images``."""
    maps = conv_inputs(model, torch.zeros(1, 3, 32, 32))
    per_image = sum(m.shape[1] * (m.shape[2] + 2) * (m.shape[3] + 2) for m in maps.values())
    return per_image * 4 * images


def run(device: torch.device, quick: bool = False) -> str:
    """Measure every setting in its own process; return a Markdown section."""
    counts, batch, width = ((2, 5, 20), 32, 0.25) if quick else ((2, 20, 200), 64, 0.25)
    model = vgg("vgg16", width)
    rows = []
    for n in counts:
        result = {
            mode: run_child(
                "benchmarks.bench_memory", ["--child", mode, str(n), str(batch), str(width)]
            )
            for mode in MODES
        }
        g, a = result["gradshape"], result["authors"]
        rows.append(
            f"| {n} | {n * batch:,} | {g['added'] / 2**20:.1f} | {g['seconds']:.1f} | "
            f"{a['added'] / 2**20:.1f} | {a['seconds']:.1f} | "
            f"{kept_bytes(model, n * batch) / 2**20:.1f} |"
        )
    return "\n".join(
        [
            "## Peak memory of a refresh",
            "",
            f"CIFAR VGG-16 at width {width:g} (its 13 3×3 convs), batches of {batch} "
            f"{Images(1).source}, run on the CPU whatever the device (the resident set is host "
            "memory).  Each cell is a fresh process: memory the refresh "
            "adds at its peak over the resident set before it (`VmHWM` after resetting it via "
            "`/proc/self/clear_refs`, minus `VmRSS`), after a warm-up refresh.  gradshape: "
            "`maybe_refresh` with a `DataLoader`, streaming.  Authors' procedure: keep every "
            "conv input of every batch, then the anchor per layer; computed: the padded "
            "float32 maps their code keeps.",
            "",
            "| refresh batches | images | gradshape MiB | gradshape s | authors' procedure "
            "(measured) MiB | authors' s | authors' kept maps (computed) MiB |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            *rows,
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="one memory measurement (internal)")
    parser.add_argument("--child", nargs=4, metavar=("MODE", "BATCHES", "BATCH", "WIDTH"))
    args = parser.parse_args()
    if args.child is None:
        parser.error("run `python -m benchmarks --only memory` for the benchmark")
    mode, batches, batch, width = args.child
    if mode not in MODES:
        parser.error(f"MODE must be one of {MODES}, got {mode!r}")
    print(json.dumps(child(mode, int(batches), int(batch), float(width))))


if __name__ == "__main__":
    main()
