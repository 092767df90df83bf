"""Exact resume: N steps, checkpoint to a file, M more steps in a fresh process == N + M steps.

The training code is one script, written to a temporary directory: imported here for the
uninterrupted run and the first N steps, and run by a fresh ``python`` for the last M steps
from the checkpoint (model, optimizer, transform state and the RNG state, saved with
``torch.save`` and read back with ``torch.load``'s default ``weights_only=True``).  CPU,
deterministic algorithms, one thread: the two trajectories must be bit-identical.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

TRAINER = textwrap.dedent(
    '''
    """Train a small CNN with one gradshape transform; as a script, resume a checkpoint."""
    import sys

    import torch
    import torch.nn.functional as F
    from torch import nn

    import gradshape as gs

    STEPS_PER_EPOCH = 2


    def deterministic():
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(1)


    def dataset():
        g = torch.Generator().manual_seed(123)
        x = torch.randn(24, 3, 8, 8, generator=g)
        return torch.utils.data.TensorDataset(x, torch.randint(0, 4, (24,), generator=g))


    def train_batch(step):
        g = torch.Generator().manual_seed(1000 + step)
        return torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 4, (6,), generator=g)


    def build(method):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.2),
            nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
        )
        schedule = gs.RefreshSchedule(warmup=1, every=2, batches=2)
        if method.endswith("_update"):
            opt = torch.optim.Adam(model.parameters(), lr=1e-2)
            if method == "sgs_update":
                transform = gs.SpatialGradientScaling(
                    model, mode="update", optimizer=opt, schedule=schedule
                )
            else:
                from gradshape.channel import ChannelDirectedGradients

                transform = ChannelDirectedGradients(model, mode="update", optimizer=opt)
            return model, opt, transform
        opt = torch.optim.SGD(
            model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4
        )
        if method == "sgs_gradient":
            transform = gs.SpatialGradientScaling(model, schedule=schedule)
        elif method == "cdg":
            from gradshape.channel import ChannelDirectedGradients

            transform = ChannelDirectedGradients(model)
        elif method == "pgt":
            from gradshape.powergrad import PowerGrad

            transform = PowerGrad(alpha=0.5)
        else:
            raise ValueError(method)
        return model, opt, transform


    def loss_of(method, transform, logits, y):
        if method == "pgt":
            return transform(logits, y)
        return F.cross_entropy(logits, y)


    def train(method, model, opt, transform, start, stop):
        loader = torch.utils.data.DataLoader(dataset(), batch_size=6, shuffle=True)
        model.train()
        for step in range(start, stop):
            epoch, index = divmod(step, STEPS_PER_EPOCH)
            if index == 0 and isinstance(transform, gs.SpatialGradientScaling):
                transform.maybe_refresh(epoch, loader)
            x, y = train_batch(step)
            opt.zero_grad()
            loss_of(method, transform, model(x), y).backward()
            opt.step()


    def checkpoint(path, model, opt, transform):
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "transform": transform.state_dict(),
                "rng": torch.get_rng_state(),
            },
            path,
        )


    if __name__ == "__main__":
        method, source, start, stop, target = sys.argv[1:]
        deterministic()
        model, opt, transform = build(method)
        state = torch.load(source)  # weights_only=True: plain tensors and Python values only
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        transform.load_state_dict(state["transform"])
        torch.set_rng_state(state["rng"])
        train(method, model, opt, transform, int(start), int(stop))
        checkpoint(target, model, opt, transform)
    '''
)

FIRST, SECOND = 6, 6  # steps before and after the checkpoint; refreshes at epochs 1, 3 and 5


@pytest.fixture
def trainer(tmp_path: Path):
    path = tmp_path / "trainer.py"
    path.write_text(TRAINER)
    spec = importlib.util.spec_from_file_location("resume_trainer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    module.deterministic()
    try:
        yield module, path
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)


def needs(method: str) -> None:
    module = {
        "cdg": "gradshape.channel",
        "cdg_update": "gradshape.channel",
        "pgt": "gradshape.powergrad",
    }.get(method)
    if module is not None:
        pytest.importorskip(module, reason=f"{module} has not landed yet")


@pytest.mark.parametrize("method", ["sgs_gradient", "sgs_update", "cdg", "cdg_update", "pgt"])
def test_resume_in_a_fresh_process_is_bit_identical(trainer, tmp_path: Path, method: str):
    needs(method)
    module, script = trainer

    model, opt, transform = module.build(method)
    torch.manual_seed(7)
    module.train(method, model, opt, transform, 0, FIRST + SECOND)
    uninterrupted = {k: v.clone() for k, v in model.state_dict().items()}
    final_transform = transform.state_dict()
    if hasattr(transform, "remove"):
        transform.remove()

    model, opt, transform = module.build(method)
    torch.manual_seed(7)
    module.train(method, model, opt, transform, 0, FIRST)
    saved, resumed = tmp_path / "first.pt", tmp_path / "resumed.pt"
    module.checkpoint(saved, model, opt, transform)
    if hasattr(transform, "remove"):
        transform.remove()

    done = subprocess.run(
        [sys.executable, script, method, saved, str(FIRST), str(FIRST + SECOND), resumed],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    state = torch.load(resumed)
    assert list(state["model"]) == list(uninterrupted)
    for key, value in uninterrupted.items():
        assert torch.equal(state["model"][key], value), key

    if method.startswith("sgs"):
        # the run is only a test of resuming if scalings were refreshed on both sides of it
        assert final_transform["refresh_count"] == 3
        assert state["transform"]["refresh_count"] == 3
        for name, g in final_transform["scalings"].items():
            assert not torch.equal(g, torch.ones_like(g))
            assert torch.equal(state["transform"]["scalings"][name], g), name


@pytest.mark.parametrize("restore", [True, False])
def test_in_process_resume_needs_the_transform_state(trainer, restore: bool):
    # In one process, resuming with the SGS state restored gives the same weights as not
    # stopping; without it (G = 1, refresh count 0) the trajectory diverges, so the identity
    # above really depends on the transform's state.
    module, _ = trainer
    model, opt, transform = module.build("sgs_gradient")
    torch.manual_seed(7)
    module.train("sgs_gradient", model, opt, transform, 0, FIRST + SECOND)
    full = model.state_dict()
    transform.remove()

    model, opt, transform = module.build("sgs_gradient")
    torch.manual_seed(7)
    module.train("sgs_gradient", model, opt, transform, 0, FIRST)
    states = model.state_dict(), opt.state_dict(), transform.state_dict(), torch.get_rng_state()
    transform.remove()
    model, opt, transform = module.build("sgs_gradient")
    model.load_state_dict(states[0])
    opt.load_state_dict(states[1])
    if restore:
        transform.load_state_dict(states[2])
    torch.set_rng_state(states[3])
    module.train("sgs_gradient", model, opt, transform, FIRST, FIRST + SECOND)
    transform.remove()
    same = all(torch.equal(v, full[k]) for k, v in model.state_dict().items())
    assert same == restore


def test_a_refresh_keeps_the_torch_thread_count():
    # numba's OpenMP layer resets the process-wide OpenMP thread count on its first parallel
    # call; a fresh process is needed to see the first call.
    pytest.importorskip("numba")
    code = textwrap.dedent(
        """
        import torch
        from torch import nn
        import gradshape as gs

        torch.set_num_threads(1)
        model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1))
        gs.SpatialGradientScaling(model, engine="compiled").refresh([torch.rand(2, 2, 6, 6)])
        print(torch.get_num_threads())
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["1"]
