"""Lightning callbacks: a real ``lightning.Trainer`` fit equals the hand-written loop."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradshape as gs

L = pytest.importorskip("lightning")
from gradshape.integrations.lightning import SGSCallback, TransformCallback  # noqa: E402

# Lightning's advice on DataLoader workers, and a torch deprecation inside Lightning's pytree
pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
]

SCHEDULE = gs.RefreshSchedule(warmup=1, every=1, batches=2)


def net(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).double()


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = F.avg_pool2d(torch.randn(24, 2, 8, 8, generator=g, dtype=torch.float64), 3, 1, 1)
    return DataLoader(TensorDataset(x, torch.randint(0, 3, (24,), generator=g)), batch_size=6)


def make_optimizer(kind, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3)
    return torch.optim.Adam(params, lr=1e-2)


class Module(L.LightningModule):
    def __init__(self, optimizer="sgd"):
        super().__init__()
        self.net = net()
        self.optimizer = optimizer

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _index):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return make_optimizer(self.optimizer, self.parameters())


def fit(callbacks, epochs=3, optimizer="sgd", module=None, ckpt_path=None, data=None):
    module = module or Module(optimizer)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        precision="64-true",
        callbacks=callbacks,
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, data or loader(), ckpt_path=ckpt_path)
    return trainer, module


def hand_loop(epochs=3, optimizer="sgd", mode="gradient", attach=None):
    """The plain-loop API on the same data order; ``attach(model, opt)`` builds the transform."""
    model = net()
    opt = make_optimizer(optimizer, model.parameters())
    transform = attach(model, opt) if attach else None
    data = loader()
    for epoch in range(epochs):
        if isinstance(transform, gs.SpatialGradientScaling):
            transform.maybe_refresh(epoch, data)
        for x, y in data:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model, transform


def assert_same_weights(module, model, atol=1e-12):
    for (name, a), b in zip(module.net.named_parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize(("mode", "optimizer"), [("gradient", "sgd"), ("update", "adam")])
def test_fit_with_sgs_callback_equals_the_hand_written_loop(mode, optimizer):
    callback = SGSCallback(k=5.0, mode=mode, schedule=SCHEDULE, submodule="net", seed=4)
    _, module = fit([callback], optimizer=optimizer)

    def attach(model, opt):
        return gs.SpatialGradientScaling(
            model, mode=mode, optimizer=opt if mode == "update" else None, schedule=SCHEDULE, seed=4
        )

    model, sgs = hand_loop(optimizer=optimizer, attach=attach)
    assert callback.transform.refresh_count == sgs.refresh_count == 2
    for name, g in sgs.scalings.items():
        assert torch.equal(callback.transform.scalings[name], g)
    assert_same_weights(module, model)
    plain, _ = hand_loop(optimizer=optimizer)
    assert not torch.allclose(plain[0].weight, model[0].weight, atol=1e-6)
    assert not callback.transform.attached  # removed when the fit ended


def test_transform_callback_attaches_any_transform():
    G = {"net.0": gs.branch_scaling("acb"), "net.2": gs.grid_scaling(0.3, 0.1)}

    def pinned(module):
        sgs = gs.SpatialGradientScaling(module)
        for name, g in G.items():
            sgs.set_scaling(name, g)
        return sgs

    callback = TransformCallback(pinned, name="pinned")
    _, module = fit([callback], epochs=2)

    def attach(model, _opt):
        sgs = gs.SpatialGradientScaling(model)
        for name, g in G.items():
            sgs.set_scaling(name.removeprefix("net."), g)
        return sgs

    model, _ = hand_loop(epochs=2, attach=attach)
    assert_same_weights(module, model)
    assert callback.state_key != SGSCallback().state_key


def test_callback_state_is_checkpointed_and_resumes_exactly(tmp_path):
    once = gs.RefreshSchedule(warmup=1, every=100, batches=2)  # refresh at epoch 1 only
    _, straight = fit([SGSCallback(schedule=once, submodule="net")], epochs=3)
    first = SGSCallback(schedule=once, submodule="net")
    trainer, _ = fit([first], epochs=2)
    path = tmp_path / "two_epochs.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["callbacks"][first.state_key]
    for name, g in first.transform.scalings.items():
        assert torch.equal(saved["scalings"][name], g)
        assert not torch.allclose(g, torch.ones_like(g))
    resumed = SGSCallback(schedule=once, submodule="net")
    _, module = fit([resumed], epochs=3, ckpt_path=path)
    assert resumed.transform.refresh_count == 1  # G came from the checkpoint, no new refresh
    assert_same_weights(module, straight.net, atol=1e-12)


def test_a_failed_fit_leaves_no_hooks_behind():
    class Failing(Module):
        def training_step(self, batch, index):
            if self.current_epoch == 1:
                raise RuntimeError("boom")
            return super().training_step(batch, index)

    callback = SGSCallback(schedule=SCHEDULE, submodule="net")
    with pytest.raises(RuntimeError, match="boom"):
        fit([callback], module=Failing())
    assert callback.transform.refresh_count == 1 and not callback.transform.attached


def test_several_training_loaders_are_refused():
    class Two(Module):
        def training_step(self, batch, index):
            return sum(super(Two, self).training_step(b, index) for b in batch)

    callback = SGSCallback(submodule="net")
    with pytest.raises(TypeError, match="refreshes from one training DataLoader"):
        fit([callback], epochs=1, module=Two(), data=[loader(), loader()])
    assert not callback.transform.attached


def test_logged_scalings_match_the_transform():
    callback = SGSCallback(schedule=SCHEDULE, submodule="net", log_scalings=True)
    trainer, _ = fit([callback], epochs=2)
    metrics = trainer.callback_metrics
    for layer, g in callback.transform.scalings.items():
        assert float(metrics[f"sgs/{layer}/max"]) == pytest.approx(float(g.max()), abs=1e-6)
        assert float(metrics[f"sgs/{layer}/min"]) == pytest.approx(float(g.min()), abs=1e-6)


def test_bad_arguments_name_the_culprit():
    with pytest.raises(ValueError, match="unknown mode"):
        SGSCallback(mode="step")
    with pytest.raises(ValueError, match="unknown measure"):
        SGSCallback(measure="mi")
    with pytest.raises(TypeError, match="optimizer= is taken from the trainer"):
        SGSCallback(optimizer=None)
    with pytest.raises(TypeError, match="factory must be callable"):
        TransformCallback(gs.SpatialGradientScaling(net()))
    with pytest.raises(TypeError, match="not a gradshape transform"):
        fit([TransformCallback(lambda m: m, name="identity")], epochs=1)


def test_missing_lightning_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.delitem(sys.modules, "gradshape.integrations.lightning")
    with pytest.raises(ImportError, match=r"gradshape\[lightning\]"):
        importlib.import_module("gradshape.integrations.lightning")
