"""Refresh time: gradshape's NMI engines against the authors' algorithm (:mod:`.anchor`).

Maps: the input of every 3×3 conv of a randomly initialised CIFAR VGG-16 (eval mode, so the
BatchNorms are identities and the inputs of layers 2–13 are post-ReLU, about half zeros) on
:class:`.common.Images` (Fashion-MNIST when present).  What is timed for the authors is their
histogram stage only, :func:`.anchor.anchor_loop`, on the map their forward hook produces
(:func:`.anchor.authors_input`: the batches concatenated and zero-padded, prepared untimed, as
their forward pass does it); gradshape's time is ``gs.spatial_dependence`` on the unpadded
maps (both of its passes).  Measurements, each timed in interleaved rounds (median) after one
untimed warm-up call of each engine:

1. **The histogram stage on one map**, the (256, 64, 32, 32) post-ReLU input of VGG-16's second
   conv: every engine variant, and the time per pixel pair.
2. **Cost against the kernel size** (3, 5, 7, padding k // 2) on that map.
3. **A depthwise 7×7 layer** (ConvNeXt-style: 96 channels of smooth, signed activations).
4. **Per layer, one batch of N images** (N = 256), all 13 layers.
5. **Per layer, 10 streamed batches** (2,560 images): the library streams the 10 batches
   through its two-pass accumulator; the authors' loop sees them concatenated.
6. **End to end on one layer**: ``SpatialGradientScaling(conv).refresh([x])`` for a 64→8 3×3
   conv fed the map of 1., against the authors' procedure on the same conv: one forward with
   their hook (padding the input, numpy view), their loop, the same S → G.
7. **End to end**: ``SpatialGradientScaling(vgg16).refresh(batches)`` on the 10 batches (all
   13 layers, S → G), against the authors' procedure: one forward pass keeping every conv's
   padded input for every batch, then their loop per layer and the same S → G.

max |ΔS| is over the entries where both are defined (a constant channel gives NaN in both; the
NaN patterns are checked to match).  On CUDA the library runs on the device (maps moved there
untimed), the anchor on the host, and the accumulator's state is checked to live on the device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

import gradshape as gs
from gradshape.dependence import PairGeometry, make_accumulator

from .anchor import anchor_dependence, anchor_loop, authors_input
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
    state = [v for k, v in vars(acc).items() if k.startswith("_") and isinstance(v, torch.Tensor)]
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

        padded = authors_input(batches)  # the authors' forward hook, untimed

        def anchor(padded=padded, out=out):
            out["anchor"] = anchor_loop(padded)

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


def _pairs(shape: tuple[int, ...], kernel: int) -> int:
    """Pixel pairs the histograms count: one of each ±δ, padding k // 2 (zero-padded map)."""
    n, c, h, w = shape
    pad, half = kernel // 2, kernel // 2
    offsets = [(dy, dx) for dy in range(-half, half + 1) for dx in range(-half, half + 1)]
    offsets = offsets[len(offsets) // 2 + 1 :]
    return sum(n * c * (h + 2 * pad - abs(dy)) * (w + 2 * pad - abs(dx)) for dy, dx in offsets)


def _stage(
    x: torch.Tensor, kernel: int, device: torch.device, rounds: int, variants: dict
) -> tuple[dict[str, float], float]:
    """Median seconds of the anchor's loop and of each library variant on ``x``; max |ΔS|."""
    padded = authors_input(x, (kernel // 2, kernel // 2))  # the authors' hook, untimed
    on_device = x.to(device)
    out: dict[str, torch.Tensor] = {}
    fns = {"anchor": lambda: out.__setitem__("anchor", anchor_loop(padded, (kernel, kernel)))}
    for label, (engine, count) in variants.items():

        def library(label=label, engine=engine, count=count):
            with threads(count):
                out[label] = gs.spatial_dependence(
                    on_device, (kernel, kernel), padding=kernel // 2, engine=engine
                )

        library()  # warm-up (loads the compiled kernel for this dtype)
        fns[label] = library
    times = {k: median(v) for k, v in interleaved(fns, rounds, device).items()}
    return times, max(_max_diff(out[v], out["anchor"]) for v in variants)


def _stage_variants(device: torch.device) -> dict[str, tuple[str, int | None]]:
    if device.type != "cpu":
        return {"auto": ("auto", None)}
    return {"auto": ("auto", None), "auto, 1 thread": ("auto", 1), "torch": ("torch", None)}


def _histogram_stage(x: torch.Tensor, device: torch.device, rounds: int) -> list[str]:
    """The histogram stage on one map: every variant, the time per pair, the ratio."""
    variants = _stage_variants(device)
    times, diff = _stage(x, 3, device, rounds, variants)
    pairs = _pairs(tuple(x.shape), 3)
    rows = _against_anchor(times, variants, "ns per pixel pair", lambda t: f"{t / pairs * 1e9:.2f}")
    rows += ["", f"{pairs:,} pixel pairs (3×3, padding 1); max |ΔS| against the anchor {diff:.1e}."]
    return rows


def _against_anchor(
    times: dict[str, float], variants: Iterable[str], column: str, cell: Callable[[float], str]
) -> list[str]:
    """A table of the anchor and each variant: seconds, ``cell(seconds)`` under ``column``, and
    the anchor's time over the variant's."""
    rows = [
        f"| implementation | s | {column} | anchor / this |",
        "| --- | ---: | ---: | ---: |",
        f"| anchor (authors' loop, 1 thread) | {times['anchor']:.3f} | {cell(times['anchor'])} | "
        "1.00× |",
    ]
    for v in variants:
        rows.append(
            f"| gradshape {v} | {times[v]:.3f} | {cell(times[v])} | "
            f"{ratio(times['anchor'], times[v])} |"
        )
    return rows


def _kernel_sizes(x: torch.Tensor, device: torch.device, rounds: int) -> list[str]:
    """Cost against the kernel size (3, 5, 7), padding k // 2."""
    variants = {"auto": ("auto", None)}
    rows = [
        "| kernel | pixel pairs | anchor s | gradshape s | gradshape ns per pair "
        "| anchor / gradshape | max abs ΔS |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for k in (3, 5, 7):
        times, diff = _stage(x, k, device, rounds, variants)
        pairs = _pairs(tuple(x.shape), k)
        rows.append(
            f"| {k}×{k} | {pairs:,} | {times['anchor']:.3f} | {times['auto']:.3f} | "
            f"{times['auto'] / pairs * 1e9:.2f} | {ratio(times['anchor'], times['auto'])} | "
            f"{diff:.1e} |"
        )
    return rows


def _depthwise_map(n: int, channels: int, size: int) -> torch.Tensor:
    """ConvNeXt-like activations: smooth signed fields (bilinear 4× upsampling) plus noise."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.randn(n, channels, size // 4, size // 4, generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")
    return smooth + 0.3 * torch.randn(n, channels, size, size, generator=g)


def _depthwise(x: torch.Tensor, device: torch.device, rounds: int) -> list[str]:
    """A depthwise 7×7 layer's input: the stage on it, and against a forward of the layer."""
    variants = _stage_variants(device)
    times, diff = _stage(x, 7, device, rounds, variants)
    conv = torch.nn.Conv2d(x.shape[1], x.shape[1], 7, padding=3, groups=x.shape[1]).to(device)
    on_device = x.to(device)

    def forward():
        with torch.no_grad():
            conv(on_device)

    forward()
    t_forward = median(interleaved({"forward": forward}, rounds, device)["forward"])
    n, c, h, w = x.shape
    rows = [
        f"Map ({n}, {c}, {h}, {w}), depthwise 7×7, padding 3; a forward of that layer takes "
        f"{t_forward * 1e3:.1f} ms here.",
        "",
        *_against_anchor(
            times, variants, "× the layer's forward", lambda t: f"{t / t_forward:.0f}"
        ),
    ]
    rows += ["", f"max |ΔS| against the anchor {diff:.1e}."]
    return rows


def _one_layer(x: torch.Tensor, device: torch.device, rounds: int) -> list[str]:
    """A 64→8 3×3 conv on ``x``: ``refresh`` against the authors' forward, hook and loop."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(x.shape[1], 8, 3, padding=1).to(device).eval()
    sgs = gs.SpatialGradientScaling(torch.nn.Sequential(conv))
    x = x.to(device)
    sgs.refresh([x[:8]])  # warm-up
    out: dict[str, torch.Tensor] = {}

    def authors():
        kept = []
        hook = conv.register_forward_hook(lambda _m, args, _y: kept.append(args[0].cpu()))
        with torch.no_grad():
            conv(x)
        hook.remove()
        s = anchor_loop(authors_input(kept))
        out["anchor"] = gs.dependence_to_scaling(s, 5.0)

    def library():
        out["library"] = sgs.refresh([x]).scalings["0"]

    times = {k: median(v) for k, v in interleaved({"anchor": authors, "library": library},
                                                   rounds, device).items()}  # fmt: skip
    diff = float((out["library"].double() - out["anchor"].double()).abs().max())
    sgs.remove()
    return [
        "| layer input | authors' procedure s | SpatialGradientScaling.refresh s "
        "| authors / gradshape | max abs ΔG |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| {tuple(x.shape)} → 64→8 3×3 conv | {times['anchor']:.3f} | {times['library']:.3f} | "
        f"{ratio(times['anchor'], times['library'])} | {diff:.1e} |",
    ]


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
    """Time the measurements listed in the module docstring; return a Markdown section."""
    batch, streamed, width, rounds = (64, 2, 0.25, 2) if quick else (256, 10, 1.0, 3)
    torch.manual_seed(0)
    model = vgg("vgg16", width)
    batches = [image_batch(batch, start=i * batch) for i in range(streamed)]
    per_batch = [conv_inputs(model, x) for x in batches]
    maps = {name: [m[name] for m in per_batch] for name in per_batch[0]}
    first = next(iter(maps.values()))[0][:8].to(device)
    for engine in ("auto", "torch"):  # warm-up: numba's first call loads its compiled code
        gs.spatial_dependence(first, (3, 3), padding=1, engine=engine)
    stage_map = maps[list(maps)[1]][0]  # VGG-16's second conv input: (N, 64·width, 32, 32)
    stage = _histogram_stage(stage_map, device, rounds)
    one_layer = _one_layer(stage_map, device, rounds)
    sizes = _kernel_sizes(stage_map, device, rounds)
    depthwise = _depthwise(
        _depthwise_map(*((8, 24, 28) if quick else (32, 96, 56))), device, rounds
    )
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
        "### The histogram stage on one map",
        "",
        f"The input of VGG-16's second conv, {tuple(stage_map.shape)}, post-ReLU.  The anchor "
        "is timed on the padded map its forward hook produced; gradshape on the unpadded map, "
        "both passes (ranges, then counts).",
        "",
        *stage,
        "",
        "### End to end on one layer",
        "",
        "What a user waits for: `refresh` on a conv fed that map (one forward, the histograms, "
        "S → G), against the authors' procedure (one forward with their hook, which pads the "
        "input and hands it to numpy, their loop, the same S → G).",
        "",
        *one_layer,
        "",
        "### Cost against the kernel size",
        "",
        "The same map, kernels 3×3, 5×5 and 7×7 with padding k // 2 (gradshape `auto`).",
        "",
        *sizes,
        "",
        "### A depthwise 7×7 layer (ConvNeXt-style)",
        "",
        *depthwise,
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
        "The end-to-end times include the network's forward passes: the authors' procedure "
        "runs one and keeps every conv's padded input; the library runs one too when the "
        "layers' inputs fit in `cache_bytes` (the default, a quarter of the free memory, "
        "holds them here), otherwise two, streaming.  ΔG is at float32 round-off: the "
        "library stores G in float32.",
        "",
        f"Largest |ΔS| against the anchor: {max(worst_one, worst_many):.1e}.",
        "",
    ]
    return "\n".join(lines)
