"""Shared pieces of the benchmarks: the machine, timing, memory, images and CPU-sized models.

* :func:`machine` describes where the numbers come from (CPU model, cores, versions, date).
* :func:`interleaved` times several callables in rotating order, round after round, so that
  noise from other processes on a shared machine hits every variant alike; report medians.
* :func:`run_child` runs ``python -m <module> <args>`` in a fresh interpreter and returns the
  JSON object on its last output line; :func:`current_rss`, :func:`reset_peak_rss` and
  :func:`peak_rss` read the resident set and its high-water mark from ``/proc/self`` (torch's
  CPU allocations are invisible to ``tracemalloc``).
* :class:`Images` yields CIFAR-shaped ``(3, 32, 32)`` float images: Fashion-MNIST (zero-padded
  28→32, replicated to 3 channels, standardised) when Debian's ``dataset-fashion-mnist`` is
  installed, otherwise smooth random images (bilinearly upsampled 8×8 Gaussian noise).
* :func:`vgg` and :func:`resnet18` build CIFAR-style networks (3×3 conv → BN → ReLU) with a
  width multiplier; :func:`conv_inputs` captures the input each 3×3 conv sees.
"""

from __future__ import annotations

import contextlib
import datetime
import gzip
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")

VGG_PLANS: dict[str, tuple[int | str, ...]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"),
}  # fmt: skip


# ---- the machine ------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "absent"


def load_average() -> str:
    """The 1, 5 and 15-minute load averages."""
    return " / ".join(f"{v:.2f}" for v in os.getloadavg())


def machine(device: torch.device) -> list[str]:
    """Markdown bullet lines describing this machine and the software versions."""
    lines = [
        f"- CPU: {_cpu_model()}, {os.cpu_count()} cores visible, torch uses "
        f"{torch.get_num_threads()} threads",
        f"- Python {platform.python_version()}, torch {torch.__version__}, numpy "
        f"{np.__version__}, numba {_version('numba')}, fast_histogram "
        f"{_version('fast_histogram')}",
        f"- Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
    ]
    if device.type == "cuda":
        lines.append(f"- Device: {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})")
    else:
        lines.append("- Device: CPU only (no CUDA device present)")
    return lines


# ---- timing -----------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes (device work included)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


@contextlib.contextmanager
def threads(count: int | None) -> Iterator[None]:
    """Run torch and numba with ``count`` threads inside the block (None: leave them)."""
    if count is None:
        yield
        return
    try:
        import numba
    except ImportError:
        numba = None
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    if numba is not None:
        numba.set_num_threads(min(count, numba.config.NUMBA_NUM_THREADS))
    try:
        yield
    finally:
        torch.set_num_threads(before)
        if numba is not None:
            numba.set_num_threads(min(before, numba.config.NUMBA_NUM_THREADS))


def interleaved(
    fns: Mapping[str, Callable[[], object]], rounds: int, device: torch.device
) -> dict[str, list[float]]:
    """Time every callable once per round, the order rotating each round."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timed(fns[name], device))
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def ratio(slow: float, fast: float) -> str:
    return f"{slow / fast:.2f}×" if fast > 0 else "n/a"


# ---- memory (reported by child processes) -----------------------------------------------
def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")


def current_rss() -> int:
    """Bytes resident now (``VmRSS``)."""
    return _status_bytes("VmRSS")


def reset_peak_rss() -> None:
    """Reset the resident set's high-water mark (``VmHWM``) to the current resident set."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss() -> int:
    """Bytes of the resident set's high-water mark since the last :func:`reset_peak_rss`."""
    return _status_bytes("VmHWM")


def run_child(module: str, args: list[str], timeout: float = 600) -> dict:
    """Run ``python -m module *args`` from the repository root; its last stdout line is JSON."""
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- images -----------------------------------------------------------------------------
def _fashion_mnist() -> torch.Tensor | None:
    """The 60,000 training images as uint8 ``(60000, 28, 28)``, or None when absent."""
    if not FASHION_MNIST.exists():
        return None
    with gzip.open(FASHION_MNIST, "rb") as f:
        raw = f.read()
    count, rows, cols = (int.from_bytes(raw[i : i + 4], "big") for i in (4, 8, 12))
    pixels = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(count, rows, cols)
    return torch.from_numpy(pixels.copy())


class Images(torch.utils.data.Dataset):
    """``length`` CIFAR-shaped images ``(3, 32, 32)`` with label 0, made one at a time.

    Image i is Fashion-MNIST training image ``i mod 60000`` (zero-padded to 32×32, replicated to
    3 channels, standardised with the data set's mean 0.286 and std 0.353) when present, else
    smooth noise seeded by i.  Items are built on demand, so the data set's memory does not
    depend on ``length``.
    """

    def __init__(self, length: int) -> None:
        self.length = length
        self.pixels = _fashion_mnist()

    @property
    def source(self) -> str:
        if self.pixels is None:
            return "smooth random images (8×8 Gaussian noise upsampled to 32×32)"
        return "Fashion-MNIST training images padded to 32×32, replicated to 3 channels"

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.pixels is not None:
            img = self.pixels[i % len(self.pixels)].float().div(255).sub(0.286).div(0.353)
            return F.pad(img, (2, 2, 2, 2)).expand(3, 32, 32).clone(), 0
        g = torch.Generator().manual_seed(i)
        coarse = torch.randn(1, 3, 8, 8, generator=g)
        return F.interpolate(coarse, size=32, mode="bilinear", align_corners=False)[0], 0


def image_batch(n: int, start: int = 0) -> torch.Tensor:
    """Images ``start .. start + n − 1`` of :class:`Images` as one ``(n, 3, 32, 32)`` tensor."""
    data = Images(start + n)
    return torch.stack([data[i][0] for i in range(start, start + n)])


# ---- models -----------------------------------------------------------------------------
def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


def vgg(name: str, width: float = 1.0, classes: int = 10) -> nn.Module:
    """CIFAR VGG (``"vgg11"`` or ``"vgg16"``): conv-BN-ReLU stacks, 2×2 max-pools, one linear."""
    layers: list[nn.Module] = []
    c = 3
    for item in VGG_PLANS[name]:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            out = max(1, round(int(item) * width))
            layers += _conv_bn_relu(c, out)
            c = out
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c, classes))


class _Block(nn.Module):
    """ResNet basic block: ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn_relu(c_in, c_out, stride),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


def resnet18(width: float = 1.0, classes: int = 10) -> nn.Module:
    """ResNet-18 with the CIFAR stem (3×3 conv, no max-pool): 2 blocks per stage, 4 stages."""
    widths = [max(1, round(c * width)) for c in (64, 128, 256, 512)]
    layers: list[nn.Module] = _conv_bn_relu(3, widths[0])
    c = widths[0]
    for i, out in enumerate(widths):
        layers += [_Block(c, out, 1 if i == 0 else 2), _Block(out, out, 1)]
        c = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes))


def conv_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input of every 3×3 conv of ``model`` on ``x`` (eval mode, no autograd), by name."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_pre_hook(lambda _m, args, name=name: seen.setdefault(name, args[0]))
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return seen
