"""SGS under torch.distributed: two gloo ranks on the CPU, spawned once for the whole module.

Every scenario runs inside the same two-process group (:func:`_worker`); each rank saves what
it computed and the tests compare it with a single-process computation on the union of the
ranks' data.  A deadlock fails the module fixture at its deadline instead of hanging.
"""

from __future__ import annotations

import datetime
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset

import gradshape as gs
from gradshape.distributed import all_reduce_, check_same_on_all_ranks, fail_together

WORLD = 2
DEADLINE_S = 120.0
MEASURES = ("nmi", "autocorrelation")
SCHEDULE = gs.RefreshSchedule(warmup=1, every=1, batches=3)


def _net(batchnorm: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Conv2d(2, 4, 3, padding=1)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(4))
    layers += [
        nn.ReLU(),
        nn.Conv2d(4, 3, 3, padding=1, padding_mode="reflect"),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(3, 2),
    ]
    return nn.Sequential(*layers).double()


def _data() -> dict[str, object]:
    g = torch.Generator().manual_seed(7)
    images = torch.randn(24, 2, 6, 6, generator=g, dtype=torch.float64)
    return {
        # rank 0 refreshes on two batches, rank 1 on one: the counts may differ between ranks
        "refresh": [[images[0:4], images[4:8]], [images[8:13]]],
        "train_x": torch.randn(3, 8, 2, 6, 6, generator=g, dtype=torch.float64),
        "train_y": torch.randint(0, 2, (3, 8), generator=g),
        "dataset": images,
    }


def _train(model: nn.Module, xs: torch.Tensor, ys: torch.Tensor) -> None:
    """SGD with momentum and weight decay, one step per (x, y) in the leading dim."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for x, y in zip(xs, ys):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _loader(images: torch.Tensor) -> DataLoader:
    return DataLoader(TensorDataset(images), batch_size=5, shuffle=True)


def _attempt(fn) -> tuple[str, str]:
    try:
        fn()
    except Exception as exc:
        return type(exc).__name__, str(exc)
    return "ok", ""


def _worker(rank: int, port: int, data: dict, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    res: dict[str, object] = {}
    for measure in MEASURES:  # DDP-wrapped model with BatchNorm, different batch counts
        sgs = gs.SpatialGradientScaling(DDP(_net(batchnorm=True)), measure=measure)
        res[f"union/{measure}"] = sgs.refresh(data["refresh"][rank]).scalings
        sgs.remove()
    sgs = gs.SpatialGradientScaling(_net(batchnorm=True), schedule=SCHEDULE, seed=3)
    sgs.maybe_refresh(1, _loader(data["dataset"]))
    res["loader"] = sgs.scalings
    sgs.remove()

    model = _net(batchnorm=False)
    sgs = gs.SpatialGradientScaling(DDP(model))
    sgs.refresh(data["refresh"][rank])
    half = slice(4 * rank, 4 * rank + 4)
    _train(DDP(model), data["train_x"][:, half], data["train_y"][:, half])
    res["train"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    sgs.remove()

    excluded = ["2"] if rank == 1 else None  # rank 1 leaves out the second conv
    res["mismatch"] = _attempt(
        lambda: gs.SpatialGradientScaling(_net(False), exclude=excluded).refresh(
            data["refresh"][rank]
        )
    )
    bad = [torch.full((2, 2, 6, 6), float("nan"), dtype=torch.float64)]
    res["nan_on_rank_1"] = _attempt(
        lambda: gs.SpatialGradientScaling(_net(False)).refresh(
            bad if rank == 1 else data["refresh"][rank]
        )
    )
    res["empty_on_rank_0"] = _attempt(
        lambda: gs.SpatialGradientScaling(_net(False), measure="autocorrelation").refresh(
            [] if rank == 0 else data["refresh"][rank]
        )
    )
    # the group is still in step after the failures: a final collective agrees
    token = torch.tensor([rank + 1.0])
    res["after_failures"] = float(all_reduce_(token, "sum"))
    check_same_on_all_ranks("same", "a final check")
    with fail_together("a final block"):
        pass
    torch.save(res, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[dict, dict]:
    out = tmp_path_factory.mktemp("ddp")
    data = _data()
    ctx = mp.start_processes(
        _worker,
        args=(_free_port(), data, str(out)),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + DEADLINE_S
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the two DDP ranks did not finish within {DEADLINE_S} s (deadlock?)")
    results = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return data, results


def _assert_same(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=atol, msg=n)


@pytest.mark.parametrize("measure", MEASURES)
def test_refresh_is_identical_on_both_ranks_and_equals_the_union(ranks, measure):
    data, (r0, r1) = ranks
    _assert_same(r0[f"union/{measure}"], r1[f"union/{measure}"])
    union = [b for per_rank in data["refresh"] for b in per_rank]
    single = gs.SpatialGradientScaling(_net(batchnorm=True), measure=measure).refresh(union)
    # layer names carry no DDP "module." prefix, so they match the plain model's
    _assert_same(r0[f"union/{measure}"], single.scalings, atol=1e-6)
    assert any(not torch.allclose(g, torch.ones_like(g)) for g in single.scalings.values())


def test_maybe_refresh_shares_the_drawn_batches_between_ranks(ranks):
    data, (r0, r1) = ranks
    _assert_same(r0["loader"], r1["loader"])
    single = gs.SpatialGradientScaling(_net(batchnorm=True), schedule=SCHEDULE, seed=3)
    assert single.maybe_refresh(1, _loader(data["dataset"]))
    _assert_same(r0["loader"], single.scalings, atol=1e-6)


def test_ddp_training_with_sgs_equals_single_process_full_batch(ranks):
    data, (r0, r1) = ranks
    _assert_same(r0["train"], r1["train"])
    union = [b for per_rank in data["refresh"] for b in per_rank]
    model = _net(batchnorm=False)
    with gs.SpatialGradientScaling(model).refresh(union):
        _train(model, data["train_x"], data["train_y"])
    expected = {n: p.detach() for n, p in model.named_parameters()}
    _assert_same(r0["train"], expected, atol=1e-10)
    plain = _net(batchnorm=False)
    _train(plain, data["train_x"], data["train_y"])
    assert not torch.allclose(plain[0].weight, expected["0.weight"], atol=1e-6)


def test_mismatched_layer_lists_raise_on_every_rank(ranks):
    _, results = ranks
    for r in results:
        kind, message = r["mismatch"]
        assert kind == "RuntimeError"
        assert "disagree on the layers to refresh" in message


def test_a_local_refresh_error_is_raised_on_every_rank(ranks):
    _, (r0, r1) = ranks
    assert r1["nan_on_rank_1"][0] == "ValueError" and "NaN" in r1["nan_on_rank_1"][1]
    kind, message = r0["nan_on_rank_1"]
    assert kind == "RuntimeError" and "rank(s) [1]" in message and "NaN" in message
    assert r0["empty_on_rank_0"][0] == "ValueError" and "empty" in r0["empty_on_rank_0"][1]
    kind, message = r1["empty_on_rank_0"]
    assert kind == "RuntimeError" and "rank(s) [0]" in message
    for r in (r0, r1):
        assert r["after_failures"] == 3.0


def test_helpers_are_plain_in_one_process():
    t = torch.tensor([2.0])
    assert all_reduce_(t, "max") is t and float(t) == 2.0
    check_same_on_all_ranks("anything", "nothing")
    with pytest.raises(ValueError, match="op must be one of"):
        all_reduce_(t, "mean")
    with pytest.raises(KeyError), fail_together("a block"):
        raise KeyError("local")
