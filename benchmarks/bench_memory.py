"""Peak memory of a refresh against the number of refresh batches.

Each setting runs in a fresh interpreter (``python -m benchmarks.bench_memory --child ...``):
it builds a CIFAR VGG-16 and a data set of Fashion-MNIST images (made one at a time, so the
data set's memory is the same at every batch count), runs one untimed warm-up refresh on one
small batch (numba loads its compiled code), then resets the resident set's high-water mark
(``/proc/self/clear_refs``) and measures ``VmHWM − VmRSS before``: the memory the refresh
itself adds at its peak, as the kernel counts resident pages (torch's CPU allocations are
invisible to ``tracemalloc``).

* **gradshape**: ``sgs.maybe_refresh(1, loader)`` with ``RefreshSchedule(batches=B)`` and a
  ``DataLoader``, the library's own path: batches are drawn and collated one at a time.  Three
  settings of ``cache_bytes``: the default (a quarter of the free memory: the layers' inputs of
  the first forward are kept for the second pass when they fit, so the model runs once), a
  budget of :data:`BUDGET` bytes (kept until the budget is exceeded, then dropped, and the model
  runs again), and ``0`` (streaming: two forwards, only O(C·K·B²) numbers per layer are kept
  between batches).
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

MODES = ("cached", "budget", "streaming", "authors")
#: The cache budget of the ``budget`` setting.
BUDGET = 256 * 2**20
_CACHE = {"cached": None, "budget": BUDGET, "streaming": 0}


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
    sgs = gs.SpatialGradientScaling(
        model, schedule=gs.RefreshSchedule(batches=batches), cache_bytes=_CACHE.get(mode)
    )
    sgs.refresh([data[0][0].unsqueeze(0)])  # warm-up
    before = current_rss()
    reset_peak_rss()
    start = time.perf_counter()
    if mode == "authors":
        _authors(model, loader)
    else:
        sgs.maybe_refresh(1, loader)
    seconds = time.perf_counter() - start
    return {"added": peak_rss() - before, "before": before, "seconds": seconds}


def kept_bytes(model: nn.Module, images: int, padded: bool = True) -> int:
    """Bytes of the float32 conv inputs for ``images``: zero-padded as the authors' code keeps
    them, or as they are (what gradshape's cache holds)."""
    maps = conv_inputs(model, torch.zeros(1, 3, 32, 32))
    pad = 2 if padded else 0
    per_image = sum(m.shape[1] * (m.shape[2] + pad) * (m.shape[3] + pad) for m in maps.values())
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
        cells = [f"{result[m]['added'] / 2**20:.1f} | {result[m]['seconds']:.1f}" for m in MODES]
        rows.append(
            f"| {n} | {n * batch:,} | {kept_bytes(model, n * batch, padded=False) / 2**20:.1f} | "
            + " | ".join(cells)
            + f" | {kept_bytes(model, n * batch) / 2**20:.1f} |"
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
            "`maybe_refresh` with a `DataLoader`, with `cache_bytes` at its default (the inputs "
            f"are kept and the model runs once when they fit), at {BUDGET / 2**20:.0f} MiB, and "
            "0 (streaming).  Authors' procedure: keep every conv input of every batch, then "
            "the anchor per layer.  Computed: the layers' inputs as gradshape's cache holds "
            "them, and the padded float32 maps the authors' code keeps.",
            "",
            "| refresh batches | images | inputs (computed) MiB | cached MiB | cached s "
            f"| budget {BUDGET / 2**20:.0f} MiB: MiB | s | streaming MiB | streaming s "
            "| authors' procedure MiB | authors' s | authors' kept maps (computed) MiB |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
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
