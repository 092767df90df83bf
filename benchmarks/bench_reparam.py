"""Training cost of structural reparameterization (ACB, RepVGG, DBB) against SGS and plain.

For a small VGG-style and a small ResNet-style network (defined here, CIFAR-sized input) it
measures, in one run and interleaved so that machine noise hits every variant alike:

* parameters during training (after :func:`gradshape.reparam.fuse` the structures are back to
  the plain network's convs, with the BatchNorms folded in);
* the median time of one training step (forward, backward, SGD step) after warm-up;
* the peak memory one training step adds on top of what was allocated before it.
  CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.  CPU: the
  resident set's high-water mark (``VmHWM`` in ``/proc/self/status``, reset through
  ``/proc/self/clear_refs``) minus the resident set before the step, with glibc's mmap
  threshold pinned to 64 KiB (``mallopt``) for that phase and the heap trimmed
  (``malloc_trim``) before each step, so that freed tensors go back to the OS and the resident
  set follows live tensors; timings are taken before that, with the allocator as it was.

Variants: ``plain``; ``sgs`` (``gs.SpatialGradientScaling`` in gradient mode with fixed
scalings, i.e. the per-step cost without refreshes); ``acb``, ``repvgg``, ``dbb`` (per-branch
BatchNorm, as the papers train); ``dyrep`` (the plain net with :class:`~gradshape.reparam.DyRep`
recording saliency every step, as at the start of a run) and ``dyrep grown`` (after one
adjustment per conv, each from one step's scores: its most grown state, as late in a long run);
``repopt search`` (the CSLA hyper-search structure) and ``repopt`` (the target run: the plain
net with the per-weight multipliers derived from it).  Run
``python -m benchmarks.bench_reparam [--quick]``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import statistics
import warnings
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

import gradshape as gs
from gradshape import reparam

from .common import current_rss, peak_rss, reset_peak_rss, synchronize, timed

VARIANTS = (
    "plain", "sgs", "acb", "repvgg", "dbb", "dyrep", "dyrep grown", "repopt search", "repopt",
)  # fmt: skip


def conv_bn(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


def small_vgg(width: int, classes: int = 10) -> nn.Module:
    """VGG-style: 3×3 conv-BN-ReLU stacks with max pooling, widths w, 2w, 4w, 4w, 8w, 8w."""
    plan = [width, "M", 2 * width, "M", 4 * width, 4 * width, "M", 8 * width, 8 * width]
    layers: list[nn.Module] = []
    cin = 3
    for item in plan:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += conv_bn(cin, item)
            cin = item
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


def small_resnet(width: int, classes: int = 10) -> nn.Module:
    """ResNet-style (CIFAR stem): 3×3 stem, then two basic blocks per stage at w, 2w, 4w."""
    layers: list[nn.Module] = conv_bn(3, width)
    cin = width
    for i, cout in enumerate((width, 2 * width, 4 * width)):
        layers += [BasicBlock(cin, cout, 1 if i == 0 else 2), BasicBlock(cout, cout, 1)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))


class Variant:
    """One variant's model, optimizer and training step (and what must stay alive with it)."""

    def __init__(self, variant: str, factory: Callable[[], nn.Module], x, y, device) -> None:
        torch.manual_seed(0)
        model = factory()
        self.transform = None
        self.dyrep: reparam.DyRep | None = None
        if variant in ("acb", "repvgg", "dbb"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the 1×1 shortcuts are skipped, on purpose
                model = reparam.convert(model, variant).model
        elif variant == "repopt search":
            model = reparam.convert_csla(model).model
        self.model = model.to(device)
        self.x, self.y = x, y
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4
        )
        if variant == "sgs":
            self.transform = gs.SpatialGradientScaling(self.model)
            for name in self.transform.scalings:
                self.transform.set_scaling(name, gs.branch_scaling("acb", 3))
        elif variant == "repopt":
            search = reparam.convert_csla(factory()).model
            self.transform = reparam.attach_repopt(
                self.model, reparam.repopt_scalings(search, "sgd"), self.optimizer
            )
        elif variant.startswith("dyrep"):
            self.dyrep = reparam.DyRep(self.model, self.optimizer)
            if variant == "dyrep grown":
                for _ in range(len(self.dyrep.candidates)):
                    self.step()
                    self.dyrep.adjust()
        self.model.train()

    def step(self) -> None:
        loss = F.cross_entropy(self.model(self.x), self.y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.dyrep is not None:
            self.dyrep.record()
        self.optimizer.step()

    def remove(self) -> None:
        if self.transform is not None:
            self.transform.remove()


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def time_steps(step: Callable[[], None], n: int, device: torch.device) -> list[float]:
    return [timed(step, device) for _ in range(n)]


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


@contextlib.contextmanager
def _rss_follows_live_tensors() -> Iterator[None]:
    """Pin glibc's mmap threshold (M_MMAP_THRESHOLD = -3) to 64 KiB, then back to its
    default 128 KiB; without glibc, do nothing."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(-3, 64 * 1024)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(-3, 128 * 1024)


def peak_step_memory(step: Callable[[], None], device: torch.device) -> float | None:
    """Bytes one training step adds at its peak (None where it cannot be measured)."""
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - before)
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)  # hand freed heap pages (earlier steps' tensors) back to the OS
    try:
        before = current_rss()
        reset_peak_rss()
        step()
        return float(peak_rss() - before)
    except OSError:
        return None


def _median_or_none(values: Iterable[float | None]) -> float | None:
    values = list(values)
    return None if None in values else statistics.median(values)


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f}"


def _ratio(value: float | None, base: float | None) -> str:
    return "n/a" if value is None or not base else f"{value / base:.2f}×"


def run(device: torch.device, quick: bool = False) -> str:
    """Measure every variant on both networks; return a Markdown section."""
    width, batch, rounds, per_round = (8, 16, 5, 3) if quick else (16, 64, 10, 5)
    nets = {"VGG-style": lambda: small_vgg(width), "ResNet-style": lambda: small_resnet(width)}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    lines = [
        "## Structural reparameterization vs SGS: training cost",
        "",
        f"Device: {device.type}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + f", {torch.get_num_threads()} threads; batch {batch}×3×32×32, width {width}; "
        f"median of {rounds * per_round} steps (interleaved rounds) after 2 warm-up steps; "
        "memory: median over 3 steps of the peak one training step adds "
        + (
            "(torch.cuda.max_memory_allocated)."
            if device.type == "cuda"
            else "(resident-set high-water mark, /proc/self/status)."
        ),
        "",
        "| network | variant | params (train) | step ms | × plain | peak step MiB | × plain |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    grown: list[str] = []
    for net_name, factory in nets.items():
        built = {v: Variant(v, factory, x, y, device) for v in VARIANTS}
        structure = built["dyrep grown"].dyrep.structure()
        blocks = [branches for _, kind, branches in structure if kind == "block"]
        grown.append(
            f"{net_name}: {len(blocks)} blocks after {len(built['dyrep'].dyrep.candidates)} "
            f"adjustments, {sum(map(len, blocks))} branches in all"
        )
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for v in VARIANTS:
            time_steps(built[v].step, 2, device)
        for _ in range(rounds):
            for v in VARIANTS:
                times[v] += time_steps(built[v].step, per_round, device)
        with _rss_follows_live_tensors():
            memory = {
                v: _median_or_none(peak_step_memory(built[v].step, device) for _ in range(3))
                for v in VARIANTS
            }
        median = {v: statistics.median(times[v]) for v in VARIANTS}
        for v in VARIANTS:
            lines.append(
                f"| {net_name} | {v} | {params(built[v].model):,} | {median[v] * 1e3:.1f} | "
                f"{median[v] / median['plain']:.2f}× | {_mib(memory[v])} | "
                f"{_ratio(memory[v], memory['plain'])} |"
            )
            built[v].remove()
    lines += ["", "`dyrep grown`: " + "; ".join(grown) + "."]
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="smaller nets, fewer steps")
    args = parser.parse_args()
    print(run(torch.device(args.device), quick=args.quick))


if __name__ == "__main__":
    main()
