"""Atomic checkpoints: round trip, clear errors, and survival of a save killed half-way."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from gradshape.harness import checkpoint as ck


def _state(epoch: int) -> dict:
    g = torch.Generator().manual_seed(epoch)
    return {
        "epoch": epoch,
        "model": {"w": torch.randn(4, 3, 3, 3, generator=g), "n": torch.tensor(epoch)},
        "history": [{"epoch": e, "acc": 0.1 * e, "val": None} for e in range(epoch + 1)],
        "rng": [3, list(range(5)), None],
    }


def _assert_same(a, b) -> None:
    assert a.keys() == b.keys()
    assert torch.equal(a["model"]["w"], b["model"]["w"])
    assert torch.equal(a["model"]["n"], b["model"]["n"])
    assert a["history"] == b["history"] and a["rng"] == b["rng"] and a["epoch"] == b["epoch"]


def test_round_trip_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "sub" / "checkpoint.pt"
    ck.save_checkpoint(path, _state(1))
    ck.save_checkpoint(path, _state(2))  # replaces the first
    _assert_same(ck.load_checkpoint(path), _state(2))
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.pt"]


def test_missing_and_corrupt_files_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        ck.load_checkpoint(tmp_path / "nope.pt")
    path = tmp_path / "checkpoint.pt"
    ck.save_checkpoint(path, _state(3))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"checkpoint\.pt is corrupt or truncated"):
        ck.load_checkpoint(path)


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    ck.save_checkpoint(path, _state(1))

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ck.save_checkpoint(path, _state(2))
    monkeypatch.undo()
    _assert_same(ck.load_checkpoint(path), _state(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


CHILD = textwrap.dedent(
    """
    import io, sys, time
    import torch
    from gradshape.harness import checkpoint as ck

    path = sys.argv[1]
    ck.save_checkpoint(path, {"epoch": 1, "w": torch.arange(10.0)})
    real_save = torch.save

    def slow_save(obj, f):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        data = buffer.getvalue()
        f.write(data[: len(data) // 3])
        f.flush()
        print("mid-write", flush=True)
        time.sleep(120)            # killed here
        f.write(data[len(data) // 3 :])

    torch.save = slow_save
    ck.save_checkpoint(path, {"epoch": 2, "w": torch.zeros(1_000_000)})
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_during_save_leaves_last_good_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    child = subprocess.Popen(
        [sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "mid-write"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    partial = tmp_path / ".checkpoint.pt.partial"
    assert partial.exists() and partial.stat().st_size > 0  # the kill did land mid-write
    state = ck.load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.arange(10.0))
    # the next save reuses the partial file's name and leaves only the checkpoint behind
    ck.save_checkpoint(path, {"epoch": 3})
    assert ck.load_checkpoint(path) == {"epoch": 3}
    assert not partial.exists()
