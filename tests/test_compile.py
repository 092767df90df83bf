"""SGS on torch.compile'd models: gradients still scaled, refresh measures the current weights.

The inductor backend needs a C++ toolchain and tens of seconds per compile, so the tests use
``eager`` (dynamo only) and ``aot_eager`` (dynamo + AOTAutograd, which builds the compiled
backward that produces the parameter gradients).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradshape as gs

BACKENDS = ("eager", "aot_eager")


def net(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


def batch(seed=1, n=8):
    g = torch.Generator().manual_seed(seed)
    x = F.avg_pool2d(torch.randn(n, 2, 8, 8, generator=g), 3, 1, 1)
    return x, torch.randint(0, 3, (n,), generator=g)


def loss_of(model, x, y):
    return F.cross_entropy(model(x), y)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("attach_to", ["compiled", "original"])
def test_compiled_model_gets_scaled_gradients(backend, attach_to):
    model = net()
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend=backend)
    x, y = batch()
    loss_of(compiled, x, y).backward()  # compile first: hooks attached afterwards must still act
    model.zero_grad()
    sgs = gs.SpatialGradientScaling(compiled if attach_to == "compiled" else model)
    assert list(sgs.scalings) == ["0", "3"]  # no "_orig_mod." prefix
    G = {"0": gs.branch_scaling("acb"), "3": gs.grid_scaling(0.5, 0.2)}
    for name, g in G.items():
        sgs.set_scaling(name, g)
    loss_of(compiled, x, y).backward()
    loss_of(reference, x, y).backward()
    for name, p in model.named_parameters():
        expected = reference.get_parameter(name).grad
        module = name.rsplit(".", 1)[0]
        if name.endswith("weight") and module in G:
            expected = expected * G[module].float()
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_refresh_on_a_compiled_model_is_not_stale(backend):
    model = net()
    compiled = torch.compile(model, backend=backend)
    x, y = batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss_of(compiled, x, y).backward()
    sgs = gs.SpatialGradientScaling(compiled)
    first = sgs.refresh([x]).scalings
    eager = gs.SpatialGradientScaling(copy.deepcopy(model)).refresh([x]).scalings
    for name in eager:
        torch.testing.assert_close(first[name], eager[name], rtol=0, atol=1e-6)
    for i in range(3):  # change the weights through the compiled model
        opt.zero_grad()
        loss_of(compiled, *batch(seed=10 + i)).backward()
        opt.step()
    second = sgs.refresh([x]).scalings
    eager = gs.SpatialGradientScaling(copy.deepcopy(model)).refresh([x]).scalings
    for name in eager:
        torch.testing.assert_close(second[name], eager[name], rtol=0, atol=1e-6)
    assert not torch.allclose(second["3"], first["3"], atol=1e-3)
    # the refresh left the compiled model's training mode and outputs alone
    assert compiled.training
    torch.testing.assert_close(compiled(x), model(x))


def test_state_moves_between_compiled_and_plain_models():
    compiled = torch.compile(net(), backend="eager")
    x, _ = batch()
    state = gs.SpatialGradientScaling(compiled).refresh([x]).state_dict()
    plain = gs.SpatialGradientScaling(net())
    plain.load_state_dict(state)
    for name, g in state["scalings"].items():
        assert torch.equal(plain.scalings[name], g)
