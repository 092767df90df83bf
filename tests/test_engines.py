"""The NMI engines agree exactly: the compiled CPU kernel and the torch engine (any device).

Both compute integer joint histograms from the same float64 bin formula, so their histograms,
hence S, must be identical, with masks, diagonal removal, dead taps, other padding modes and
power-of-two rescaled channels included.  The torch engine is the GPU path; on the CPU it is
checked against the compiled kernel, on CUDA (when present) against the CPU.
"""

from __future__ import annotations

import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from gradshape import _kernels, dependence
from gradshape.dependence import NMIAccumulator, PairGeometry, spatial_dependence

needs_numba = pytest.mark.skipif(not _kernels.available(), reason="numba is not installed")


def _maps(kind: str, shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    spatial = shape[2:]
    smooth = torch.randn(shape, generator=g, dtype=torch.float64)
    if min(spatial) >= 3:
        pool = [F.avg_pool1d, F.avg_pool2d, F.avg_pool3d][len(spatial) - 1]
        smooth = pool(smooth, 3, 1, 1)
    if kind == "relu32":
        return torch.relu(smooth).float()
    if kind == "scaled64":  # channels needing the power-of-two rescaling, and a constant one
        out = smooth.clone()
        out[:, 0] *= 1e-310
        out[:, 1] *= 1e300
        out[:, -1] = 2.5
        return out
    if kind == "ints":  # many values exactly on bin edges
        return torch.randint(0, 5, shape, generator=g).float()
    raise ValueError(kind)


def _mask(kind: str | None, shape, seed: int) -> torch.Tensor | None:
    if kind is None:
        return None
    g = torch.Generator().manual_seed(seed)
    n, _, *spatial = shape
    if kind == "random":
        return torch.rand((n, *spatial), generator=g) < 0.7
    mask = torch.zeros((n, *spatial), dtype=torch.bool)  # a real leading box per image
    for i in range(n):
        ends = [int(torch.randint(1, s + 1, (1,), generator=g)) for s in spatial]
        mask[(i, *(slice(0, e) for e in ends))] = True
    return mask


def _accumulate(x, mask, geometry, engine, diag_removal=False, batches=2):
    acc = NMIAccumulator(geometry, diag_removal=diag_removal, engine=engine)
    xs = x.tensor_split(batches)
    ms = [None] * batches if mask is None else mask.tensor_split(batches)
    for _ in range(acc.passes):
        for part, m in zip(xs, ms, strict=True):
            acc.observe(part, m)
        acc.end_pass()
    return acc, acc.result()


def _assert_same(a, sa, b, sb):
    assert torch.equal(a.histograms.cpu(), b.histograms.cpu())
    assert torch.equal(sa.isnan(), sb.isnan())
    assert torch.equal(sa.nan_to_num(), sb.nan_to_num())
    assert torch.equal(a.live, b.live)


GEOMETRIES = {
    "3x3": ((5, 3, 9, 11), dict(kernel_size=(3, 3), padding=1)),
    "5x5-dil2-narrow-pad": ((4, 3, 12, 12), dict(kernel_size=(5, 5), padding=2, dilation=2)),
    "3x5-uneven": ((4, 3, 10, 9), dict(kernel_size=(3, 5), padding=((0, 2), (1, 3)))),
    "atrous-dead": ((4, 3, 8, 8), dict(kernel_size=(3, 3), padding=12, dilation=12)),
    "reflect": ((4, 3, 9, 9), dict(kernel_size=(3, 3), padding=1, padding_mode="reflect")),
    "circular": ((4, 3, 7, 8), dict(kernel_size=(3, 3), padding=2, padding_mode="circular")),
    "1d": ((6, 3, 40), dict(kernel_size=(5,), padding=4, dilation=2)),
    "3d": ((2, 3, 5, 6, 7), dict(kernel_size=(3, 3, 3), padding=1)),
    "3d-dead": ((8, 3, 1, 2, 2), dict(kernel_size=(3, 5, 5), padding=(1, 2, 2))),
}


@needs_numba
@pytest.mark.parametrize("mask_kind", [None, "prefix", "random"])
@pytest.mark.parametrize("kind", ["relu32", "scaled64", "ints"])
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_compiled_and_torch_engines_count_identically(name, kind, mask_kind):
    shape, kw = GEOMETRIES[name]
    geometry = PairGeometry.create(**kw)
    x, mask = _maps(kind, shape, seed=1), _mask(mask_kind, shape, seed=2)
    compiled = _accumulate(x, mask, geometry, "compiled")
    torch_engine = _accumulate(x, mask, geometry, "torch")
    _assert_same(*compiled, *torch_engine)


@needs_numba
@pytest.mark.parametrize("mask_kind", [None, "prefix"])
@pytest.mark.parametrize("name", ["3x3", "1d", "3d", "atrous-dead"])
def test_engines_agree_with_diagonal_removal(name, mask_kind):
    shape, kw = GEOMETRIES[name]
    geometry = PairGeometry.create(**kw)
    x = torch.relu(_maps("scaled64", shape, seed=3))  # zeros to drop, rescaled channels
    mask = _mask(mask_kind, shape, seed=4)
    compiled = _accumulate(x, mask, geometry, "compiled", diag_removal=True)
    torch_engine = _accumulate(x, mask, geometry, "torch", diag_removal=True)
    _assert_same(*compiled, *torch_engine)


def test_torch_engine_chunks_change_nothing(monkeypatch):
    shape, kw = GEOMETRIES["3x3"]
    geometry = PairGeometry.create(**kw)
    x, mask = _maps("relu32", shape, seed=5), _mask("random", shape, seed=6)
    whole = _accumulate(x, mask, geometry, "torch", batches=1)
    monkeypatch.setattr(dependence, "_TORCH_CHUNK_ELEMENTS", 1)  # one image per chunk
    _assert_same(*whole, *_accumulate(x, mask, geometry, "torch", batches=1))


def test_histograms_count_exactly_the_kept_pairs():
    """Each offset's counts add up to its pairs with no masked end (an independent count)."""
    shape, kw = GEOMETRIES["3x3"]
    geometry = PairGeometry.create(**kw)
    x, mask = _maps("relu32", shape, seed=7), _mask("random", shape, seed=8)
    acc, _ = _accumulate(x, mask, geometry, "torch")
    real = F.pad(mask, (1, 1, 1, 1), value=True)
    for o, offset in enumerate(geometry.offsets):
        p_sl, q_sl, _ = geometry.windows(real.shape[1:], offset)
        kept = (real[(slice(None), *p_sl)] & real[(slice(None), *q_sl)]).sum()
        assert torch.equal(acc.histograms[o].sum(dim=(1, 2)), kept.repeat(shape[1]))


def test_auto_falls_back_to_the_torch_engine_without_numba(monkeypatch):
    x = _maps("relu32", (4, 3, 8, 8), seed=9)
    reference = spatial_dependence(x, (3, 3), padding=1, engine="torch")
    monkeypatch.setattr(_kernels, "available", lambda: False)
    with pytest.raises(RuntimeError, match="needs numba"):
        spatial_dependence(x, (3, 3), padding=1, engine="compiled")
    got = spatial_dependence(x, (3, 3), padding=1, engine="auto")
    torch.testing.assert_close(got, reference, rtol=0, atol=0, equal_nan=True)


@needs_numba
def test_compiled_engine_leaves_the_thread_settings_as_they_were():
    torch_before, numba_before = torch.get_num_threads(), _kernels.thread_count()
    try:
        torch.set_num_threads(1)
        spatial_dependence(_maps("relu32", (4, 3, 8, 8), seed=10), (3, 3), padding=1)
        assert torch.get_num_threads() == 1
        assert _kernels.thread_count() == numba_before
    finally:
        torch.set_num_threads(torch_before)


@needs_numba
def test_attaching_sgs_loads_the_kernel_once_in_the_background(monkeypatch):
    monkeypatch.setattr(_kernels, "_warming", None)
    started = []
    monkeypatch.setattr(_kernels, "warm_up", lambda: started.append(True))
    import gradshape as gs

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 3))
    first = gs.SpatialGradientScaling(model)
    thread = _kernels._warming
    thread.join(timeout=60)
    first.remove()
    gs.SpatialGradientScaling(model).remove()  # a second attach starts nothing new
    gs.SpatialGradientScaling(model, engine="torch").remove()
    assert _kernels._warming is thread and started == [True]
    monkeypatch.undo()
    _kernels.warm_up()  # float32 and float64 maps
    assert len(_kernels._joint_counts.signatures) >= 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("mask_kind", [None, "random"])
@pytest.mark.parametrize("name", ["3x3", "1d", "3d", "atrous-dead"])
def test_torch_engine_on_cuda_equals_the_cpu(name, mask_kind):
    shape, kw = GEOMETRIES[name]
    geometry = PairGeometry.create(**kw)
    x, mask = _maps("scaled64", shape, seed=11), _mask(mask_kind, shape, seed=12)
    cpu = _accumulate(x, mask, geometry, "auto")
    on_device = _accumulate(x.cuda(), None if mask is None else mask.cuda(), geometry, "auto")
    assert on_device[0].histograms.device.type == "cuda"
    _assert_same(*cpu, *on_device)


# ---- torch.distributed: the live-pair counts are all-reduced ---------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _live_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    try:
        x = _maps("relu32", (4, 2, 12), seed=13)
        mask = torch.zeros(4, 12, dtype=torch.bool)
        # rank 0 sees two real samples per clip (offsets ±2 are dead there), rank 1 three
        mask[:, : 2 + rank] = True
        geometry = PairGeometry.create((5,), padding=2)
        acc = NMIAccumulator(geometry, engine="torch")
        for _ in range(acc.passes):
            acc.observe(x, mask)
            acc.end_pass()
        torch.save({"live": acc.live, "hist": acc.histograms}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_live_positions_and_masked_counts_are_all_reduced(tmp_path):
    world = 2
    mp.spawn(_live_worker, args=(world, _free_port(), str(tmp_path / "r")), nprocs=world)
    results = [torch.load(tmp_path / f"r.{rank}") for rank in range(world)]
    x = _maps("relu32", (4, 2, 12), seed=13)
    masks = []
    for rank in range(world):
        mask = torch.zeros(4, 12, dtype=torch.bool)
        mask[:, : 2 + rank] = True
        masks.append(mask)
    union = _accumulate(
        torch.cat([x, x]), torch.cat(masks), PairGeometry.create((5,), padding=2), "torch"
    )[0]
    for r in results:
        assert r["live"].tolist() == [True] * 5  # ±2 live through rank 1 only
        assert torch.equal(r["hist"], union.histograms)
