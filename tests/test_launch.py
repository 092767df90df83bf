"""The harness under torchrun: two gloo ranks on the CPU, each a real ``gradshape`` process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from gradshape.harness.launch import check_in_sync


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], cwd) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "gradshape", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_torchrun_train_with_sgs_covers_the_data_once_per_epoch(tmp_path):
    subset, epochs = 192, 2
    out = tmp_path / "run"
    done = _torchrun(
        ["train", "--method", "sgs", "--data.dataset", "digits", "--data.subset", str(subset),
         "--model.name", "tiny", "--optim.epochs", str(epochs), "--optim.batch_size", "32",
         "--optim.lr", "0.05", "--sgs.refresh_every", "1", "--sgs.refresh_batches", "2",
         "--device", "cpu", "--progress", "false", "--out", str(out)],
        tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "run.json").read_text())
    assert record["world_size"] == 2
    # the DistributedSampler splits every epoch's images between the ranks, none twice
    assert [h["images"] for h in record["history"]] == [subset] * epochs
    assert record["history"][-1]["refreshed"] and record["scalings"]["history"]
    # rank 0 alone reported: one summary line, not two
    assert done.stdout.count("test accuracy") == 1
    # the ranks' weights were compared after every epoch (check_in_sync) and agreed
    assert (out / "checkpoint.pt").exists()


def _drift_worker(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = nn.Linear(3, 2)
        check_in_sync(model, "same")  # identical weights pass
        with torch.no_grad():
            model.weight[0, 0] += 1e-6 * rank  # one rank drifts by one ulp-scale step
        try:
            check_in_sync(model, "drifted")
            results[rank] = "passed"
        except RuntimeError as err:
            results[rank] = str(err)
    finally:
        dist.destroy_process_group()


def test_check_in_sync_raises_on_every_rank_when_weights_differ():
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        mp.start_processes(
            _drift_worker, args=(_free_port(), results), nprocs=2, start_method="spawn"
        )
        messages = dict(results)
    assert set(messages) == {0, 1}
    assert all("drifted" in m and "differ" in m for m in messages.values())
