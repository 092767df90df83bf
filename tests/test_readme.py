"""The README's runnable example runs as written and does what it says."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def runnable_blocks() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    return [b for b in blocks if b.startswith("import ")]


def test_readme_example_runs_and_learns_scalings(tmp_path, monkeypatch):
    blocks = runnable_blocks()
    assert blocks, "README lost its runnable example"
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    sgs = namespace["sgs"]
    # warm-up epoch 0, then the authors' rule: epoch 1 and every epoch divisible by 2
    assert [epoch for epoch, _ in sgs.history] == [1, 2]
    for g in sgs.scalings.values():
        assert torch.isfinite(g).all() and (g > 0).all()
        assert abs(g.mean().item() - 1) < 1e-5
    saved = torch.load("/tmp/ckpt.pt", weights_only=False)
    assert set(saved["sgs"]["scalings"]) == set(sgs.scalings)
    sgs.remove()
