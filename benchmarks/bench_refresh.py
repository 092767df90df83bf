"""Refresh time: gradshape's NMI engines against the authors' algorithm (:mod:`.anchor`).

Maps: the input of every 3×3 conv of a randomly initialised CIFAR VGG-16 (eval mode, so the
BatchNorms are identities and the inputs of layers 2–13 are post-ReLU, about half zeros) on
:class:`.common.Images` (Fashion-MNIST when present).  Three measurements, each timed in
interleaved rounds (median), after one untimed warm-up call of each engine:

1. **Per layer, one batch of N images** (N = 256): ``gs.spatial_dependence(x, (3, 3),
   padding=1, engine=...)`` against :func:`.anchor.anchor_dependence` on the same map.
2. **Per layer, 10 streamed batches** (2,560 images): the library streams the 10 batches
   through its two-pass accumulator (``spatial_dependence`` of the list of maps); the anchor
   concatenates them, as the authors' code keeps every batch.
3. **End to end**: ``SpatialGradientScaling(vgg16).refresh(batches)`` on the 10 batches (two
   forward passes, all 13 layers, S → G), against the authors' procedure: one forward pass
   keeping every conv's input for every batch, then the anchor per layer and the same S → G.
   This includes the network's forward passes, which the library runs twice.

max |ΔS| is over the entries where both are defined (a constant channel gives NaN in both; the
NaN patterns are checked to match).  On CUDA the library runs on the device (maps moved there
untimed), the anchor on the host, and the accumulator's state is checked to live on the device.
"""

from __future__ import annotations

import torch

import gradshape as gs
from gradshape.dependence import PairGeometry, make_accumulator

from .anchor import anchor_dependence
from .common import (
    Images,
    conv_inputs,
    image_batch,
    interleaved,
    median,
    ratio,
    threads,
    vgg,
)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    if not torch.equal(a.isnan(), b.isnan()):
        return float("inf")
    both = ~a.isnan()
    return float((a[both] - b[both]).abs().max()) if both.any() else 0.0


def _variants(device: torch.device, batches: int) -> dict[str, tuple[str, int | None]]:
    """Library variants to time, as label → (engine, threads; None = as configured).

    On the CPU, single batches also time ``auto`` on one thread (an algorithmic comparison
    with the single-threaded anchor) and the pure-torch engine (slow: not for the streamed
    batches).
    """
    if device.type != "cpu" or batches > 1:
        return {"auto": ("auto", None)}
    return {"auto": ("auto", None), "auto, 1 thread": ("auto", 1), "torch": ("torch", None)}


def _stays_on_device(x: torch.Tensor) -> bool:
    """Whether the NMI accumulator keeps every state tensor on ``x``'s device (CUDA check)."""
    acc = make_accumulator("nmi", PairGeometry.create((3, 3), padding=1))
    for _ in range(acc.passes):
        acc.observe(x)
        acc.end_pass()
    state = [v for v in vars(acc).values() if isinstance(v, torch.Tensor)]
    return bool(state) and all(t.device == x.device for t in state)


def _per_layer(
    maps: dict[str, list[torch.Tensor]], device: torch.device, rounds: int
) -> tuple[list[str], float]:
    """Table rows timing every layer, and the largest |ΔS| seen."""
    variants = _variants(device, len(next(iter(maps.values()))))
    cells = " | ".join(f"gradshape {v} s | anchor / ({v})" for v in variants)
    rows = [
        f"| conv | input C×H×W | anchor s | {cells} | max abs ΔS |",
        "| --- | --- " + "| ---: " * (2 + 2 * len(variants)) + "|",
    ]
    totals = dict.fromkeys(["anchor", *variants], 0.0)
    worst = 0.0
    for name, batches in maps.items():
        on_device = [b.to(device) for b in batches]
        out: dict[str, torch.Tensor] = {}

        def anchor(batches=batches, out=out):
            out["anchor"] = anchor_dependence(batches)

        fns = {"anchor": anchor}
        for label, (engine, count) in variants.items():

            def library(label=label, engine=engine, count=count, xs=on_device, out=out):
                with threads(count):
                    out[label] = gs.spatial_dependence(xs, (3, 3), padding=1, engine=engine)

            fns[label] = library
        times = {k: median(v) for k, v in interleaved(fns, rounds, device).items()}
        diff = max(_max_diff(out[v], out["anchor"]) for v in variants)
        worst = max(worst, diff)
        for k in totals:
            totals[k] += times[k]
        c, h, w = batches[0].shape[1:]
        cells = " | ".join(f"{times[v]:.3f} | {ratio(times['anchor'], times[v])}" for v in variants)
        rows.append(f"| {name} | {c}×{h}×{w} | {times['anchor']:.3f} | {cells} | {diff:.1e} |")
    cells = " | ".join(
        f"**{totals[v]:.3f}** | **{ratio(totals['anchor'], totals[v])}**" for v in variants
    )
    rows.append(
        f"| **all {len(maps)}** | | **{totals['anchor']:.3f}** | {cells} | **{worst:.1e}** |"
    )
    return rows, worst


def _anchor_refresh(model: torch.nn.Module, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The authors' procedure: keep every conv input of every batch, then S and G per layer."""
    device = next(model.parameters()).device
    kept: dict[str, list[torch.Tensor]] = {}
    for x in batches:
        for name, m in conv_inputs(model, x.to(device)).items():
            kept.setdefault(name, []).append(m.cpu())
    return {
        name: gs.dependence_to_scaling(anchor_dependence(maps), 5.0, layer=name)
        for name, maps in kept.items()
    }


def _end_to_end(
    batches: list[torch.Tensor], width: float, device: torch.device, rounds: int
) -> list[str]:
    torch.manual_seed(0)
    model = vgg("vgg16", width).to(device)
    sgs = gs.SpatialGradientScaling(model)
    sgs.refresh([batches[0][:8]])  # warm-up
    out: dict[str, dict[str, torch.Tensor]] = {}

    def library():
        out["library"] = sgs.refresh(batches).scalings

    def anchor():
        out["anchor"] = _anchor_refresh(model, batches)

    times = {k: median(v) for k, v in interleaved({"anchor": anchor, "library": library},
                                                   rounds, device).items()}  # fmt: skip
    diff = max(
        float((out["library"][n].double() - out["anchor"][n].double()).abs().max())
        for n in out["library"]
    )
    sgs.remove()
    images = sum(len(b) for b in batches)
    return [
        "| model | images | anchor (authors' procedure) s | SpatialGradientScaling.refresh s "
        "| anchor / gradshape | max abs ΔG |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        f"| VGG-16 width {width:g} | {images:,} ({len(batches)}×{len(batches[0])}) | "
        f"{times['anchor']:.2f} | {times['library']:.2f} | "
        f"{ratio(times['anchor'], times['library'])} | {diff:.1e} |",
    ]


def run(device: torch.device, quick: bool = False) -> str:
    """Time the three measurements; return a Markdown section."""
    batch, streamed, width, rounds = (64, 2, 0.25, 2) if quick else (256, 10, 1.0, 3)
    torch.manual_seed(0)
    model = vgg("vgg16", width)
    batches = [image_batch(batch, start=i * batch) for i in range(streamed)]
    per_batch = [conv_inputs(model, x) for x in batches]
    maps = {name: [m[name] for m in per_batch] for name in per_batch[0]}
    first = next(iter(maps.values()))[0][:8].to(device)
    for engine in ("auto", "torch"):  # warm-up: numba's first call loads its compiled code
        gs.spatial_dependence(first, (3, 3), padding=1, engine=engine)
    single, worst_one = _per_layer({n: v[:1] for n, v in maps.items()}, device, rounds)
    multi, worst_many = _per_layer(maps, device, max(1, rounds - 1))
    del maps, per_batch
    lines = [
        "## Refresh time: gradshape vs the authors' algorithm",
        "",
        f"Maps: inputs of the 13 3×3 convs of a randomly initialised CIFAR VGG-16 (width "
        f"{width:g}, eval mode) on {Images(1).source}.  Anchor: `benchmarks/anchor.py` (the "
        "authors' per-channel, per-offset `fast_histogram` loop in float32 numpy, one thread, "
        "on the host).  gradshape `auto` is the "
        f"{'numba kernel' if device.type == 'cpu' else f'torch engine on {device}'} here (all "
        "threads unless marked 1 thread); `torch` is the pure-torch fallback.  Medians of "
        f"{rounds} interleaved rounds (one batch) and of {max(1, rounds - 1)} (streamed, end to "
        "end), after one warm-up call of each engine.  Targets: anchor / gradshape ≥ 3 on the "
        "CPU, ≥ 100 on a GPU; |ΔS| ≤ 0.01.",
        "",
        f"### One batch of {batch} images",
        "",
        *single,
        "",
        f"### {streamed} streamed batches of {batch} ({streamed * batch:,} images)",
        "",
        *multi,
        "",
    ]
    if device.type == "cuda":
        kept = _stays_on_device(batches[0].to(device))
        lines += [
            f"On {device}: the accumulator's state tensors all stay on the device: "
            f"{'yes' if kept else 'NO'} (only per-layer summaries are read back: the pair "
            "counts after the first pass and the O×C×B×B histogram at the end).",
            "",
        ]
    lines += [
        "### End to end: `SpatialGradientScaling.refresh` on VGG-16",
        "",
        *_end_to_end(batches, width, device, max(1, rounds - 1)),
        "",
        "The end-to-end time includes the network's forward passes: the library runs two "
        "(ranges, then histograms) so that its memory does not grow with the number of "
        "batches; the authors' procedure runs one and keeps every map.  ΔG is at float32 "
        "round-off: the library stores G in float32.",
        "",
        f"Largest |ΔS| against the anchor: {max(worst_one, worst_many):.1e}.",
        "",
    ]
    return "\n".join(lines)
