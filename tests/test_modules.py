"""SGS on unusual modules: parametrized weights, lazy, shared and transposed convs, moved models.

Expected gradients come from an independent computation: the gradient of the loss with respect
to the effective weight W (a functional conv on a detached copy), multiplied by G, then pulled
back through the parametrization's formula with ``torch.autograd.grad``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import orthogonal, weight_norm

import gradshape as gs
from gradshape.dependence import spatial_dependence

G3 = torch.tensor([[0.5, 1.5, 0.5], [1.5, 3.0, 1.5], [0.5, 1.5, 0.5]], dtype=torch.float64)


def batch(seed=0, n=4, c=3, size=7, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, size, size, generator=g, dtype=dtype)


def loss_of(out: torch.Tensor) -> torch.Tensor:
    return (out.sin() * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()


def effective_weight_grad(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """∂L/∂W at the conv's current effective weight, computed on a detached copy."""
    w = conv.weight.detach().clone().requires_grad_(True)
    loss_of(F.conv2d(x, w, conv.bias, padding=conv.padding)).backward()
    return w.grad


class Double(nn.Module):
    """W = 2·V: the simplest parametrization, with its right inverse."""

    def forward(self, v):
        return 2 * v

    def right_inverse(self, w):
        return w / 2


# ---- parametrized weights --------------------------------------------------------------------
def test_scaled_gradient_flows_through_a_simple_parametrization():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    parametrize.register_parametrization(conv, "weight", Double())
    model = nn.Sequential(conv)
    keys = list(model.state_dict())
    sgs = gs.SpatialGradientScaling(model)
    assert "0" in sgs.scalings and not sgs.skipped
    sgs.set_scaling("0", G3)
    assert list(model.state_dict()) == keys  # the appended parametrization has no state
    x = batch()
    expected = 2 * G3 * effective_weight_grad(conv, x)  # dL/dV = 2 · (G ⊙ dL/dW)
    loss_of(model(x)).backward()
    original = conv.parametrizations.weight.original
    torch.testing.assert_close(original.grad, expected, rtol=1e-12, atol=1e-14)

    gs.compose(sgs)  # detaches and re-attaches: still exactly one appended parametrization
    assert len(conv.parametrizations.weight) == 2
    original.grad = None
    loss_of(model(x)).backward()
    torch.testing.assert_close(original.grad, expected, rtol=1e-12, atol=1e-14)

    sgs.remove()
    sgs.remove()  # idempotent
    assert len(conv.parametrizations.weight) == 1 and list(model.state_dict()) == keys
    original.grad = None
    loss_of(model(x)).backward()
    torch.testing.assert_close(original.grad, 2 * effective_weight_grad(conv, x), rtol=0, atol=0)


def test_weight_norm_parametrization_gets_the_pulled_back_scaled_gradient():
    torch.manual_seed(1)
    conv = weight_norm(nn.Conv2d(3, 5, 3, padding=1).double())
    model = nn.Sequential(conv)
    sgs = gs.SpatialGradientScaling(model)
    sgs.refresh([batch(seed=s) for s in range(2)])  # G from a refresh reaches the parametrization
    g_layer = sgs.scalings["0"].double()
    assert not torch.equal(g_layer, torch.ones(3, 3))
    x = batch(seed=3)
    scaled = g_layer * effective_weight_grad(conv, x)

    chain = conv.parametrizations.weight
    mag = chain.original0.detach().clone().requires_grad_(True)
    direction = chain.original1.detach().clone().requires_grad_(True)
    # weight_norm(dim=0): W = g · v / ||v||, the norm over all dims but the first
    w = mag * direction / direction.pow(2).sum(dim=(1, 2, 3), keepdim=True).sqrt()
    exp_mag, exp_dir = torch.autograd.grad(w, (mag, direction), grad_outputs=scaled)

    loss_of(model(x)).backward()
    torch.testing.assert_close(chain.original0.grad, exp_mag, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(chain.original1.grad, exp_dir, rtol=1e-10, atol=1e-13)
    sgs.remove()


def test_orthogonal_parametrization_and_per_channel_scaling():
    torch.manual_seed(2)
    conv = orthogonal(nn.Conv2d(3, 2, 3, padding=1, bias=False).double())
    model = nn.Sequential(conv)
    sgs = gs.SpatialGradientScaling(model)
    per_channel = torch.rand(2, 3, 3, dtype=torch.float64) + 0.5
    sgs.set_scaling("0", per_channel)
    x = batch(seed=4)
    scaled = per_channel[:, None] * effective_weight_grad(conv, x)
    chain = conv.parametrizations.weight
    original = chain.original.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(chain[0](original), original, grad_outputs=scaled)
    loss_of(model(x)).backward()
    torch.testing.assert_close(chain.original.grad, expected, rtol=1e-10, atol=1e-12)
    sgs.remove()


def test_parametrized_layers_follow_dtype_moves_and_refuse_a_second_transform():
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    parametrize.register_parametrization(conv, "weight", Double())
    model = nn.Sequential(conv)
    sgs = gs.SpatialGradientScaling(model)
    sgs.set_scaling("0", G3)
    with pytest.raises(ValueError, match="already has a SpatialGradientScaling"):
        gs.SpatialGradientScaling(model)
    model.double()
    x = batch(seed=5)
    loss_of(model(x)).backward()
    expected = 2 * G3 * effective_weight_grad(conv, x)
    torch.testing.assert_close(
        conv.parametrizations.weight.original.grad, expected, rtol=1e-12, atol=1e-14
    )
    sgs.remove()


def test_update_mode_skips_parametrized_layers_and_include_raises():
    conv = weight_norm(nn.Conv2d(3, 4, 3))
    model = nn.Sequential(conv, nn.Conv2d(4, 4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sgs = gs.SpatialGradientScaling(model, mode="update", optimizer=opt)
    assert list(sgs.scalings) == ["1"]
    assert "mode='update'" in sgs.skipped["0"] and "parametrized" in sgs.skipped["0"]
    sgs.remove()
    with pytest.raises(ValueError, match="parametrized.*'0', asked for by include"):
        gs.SpatialGradientScaling(model, mode="update", optimizer=opt, include=["0"])


def test_deprecated_weight_norm_is_skipped_with_a_pointer_to_the_replacement():
    with pytest.warns(FutureWarning):
        old = torch.nn.utils.weight_norm(nn.Conv2d(3, 4, 3))
    model = nn.Sequential(old, nn.Conv2d(4, 4, 3))
    sgs = gs.SpatialGradientScaling(model)
    assert list(sgs.scalings) == ["1"]
    assert "parametrizations.weight_norm" in sgs.skipped["0"]
    sgs.remove()
    with pytest.raises(ValueError, match="not a Parameter.*'0', asked for by include"):
        gs.SpatialGradientScaling(model, include=["0"])


# ---- lazy convs --------------------------------------------------------------------------------
def test_lazy_conv_must_be_materialised_before_attaching():
    model = nn.Sequential(nn.LazyConv2d(4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3))
    with pytest.raises(ValueError, match="LazyConv2d '0' is lazy.*run one forward pass"):
        gs.SpatialGradientScaling(model)
    excluded = gs.SpatialGradientScaling(model, exclude=["0"])  # leaving it out is fine
    assert list(excluded.scalings) == ["2"]
    excluded.remove()

    x = batch(dtype=torch.float32)
    model(x)  # materialise: the module becomes a Conv2d with a plain Parameter
    assert type(model[0]) is nn.Conv2d
    plain = torch.autograd.grad(loss_of(model(x)), model[0].weight)[0]
    sgs = gs.SpatialGradientScaling(model)
    sgs.set_scaling("0", G3)
    loss_of(model(x)).backward()
    torch.testing.assert_close(model[0].weight.grad, plain * G3.float(), rtol=1e-6, atol=0)
    sgs.remove()


# ---- shared modules ----------------------------------------------------------------------------
class Twice(nn.Module):
    """One conv applied twice: conv(relu(conv(x)))."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.relu(self.conv(x)))


def test_shared_conv_is_scaled_once_and_its_refresh_pools_both_calls():
    torch.manual_seed(4)
    model = Twice().double()
    x = batch(seed=6)
    plain = torch.autograd.grad(loss_of(model(x)), model.conv.weight)[0]
    sgs = gs.SpatialGradientScaling(model)
    sgs.set_scaling("conv", G3)
    loss_of(model(x)).backward()
    torch.testing.assert_close(model.conv.weight.grad, G3 * plain, rtol=1e-12, atol=0)

    sgs.unpin("conv")
    batches = [batch(seed=s) for s in (7, 8)]
    sgs.refresh(batches)
    with torch.no_grad():  # the inputs of both calls, in call order
        seen = []
        for b in batches:
            seen += [b, torch.relu(model.conv(b))]
    expected = gs.dependence_to_scaling(spatial_dependence(seen, (3, 3), padding=1)).float()
    torch.testing.assert_close(sgs.scalings["conv"], expected, rtol=0, atol=0)
    sgs.remove()


# ---- moving the model after attaching ----------------------------------------------------------
def test_hooks_survive_dtype_and_memory_format_moves():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3))
    sgs = gs.SpatialGradientScaling(model)
    sgs.set_scaling("0", G3.float())
    weight = model[0].weight
    ref = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3))
    ref.load_state_dict(model.state_dict())

    def check(dtype, memory_format=torch.contiguous_format, **tol):
        x = batch(seed=9, dtype=dtype).contiguous(memory_format=memory_format)
        model.zero_grad()
        loss_of(model(x)).backward()
        plain = torch.autograd.grad(loss_of(ref(x)), ref[0].weight)[0]
        assert model[0].weight is weight  # .to() replaced .data, not the Parameter
        assert model[0].weight.grad.dtype == dtype
        torch.testing.assert_close(model[0].weight.grad, plain * G3.to(dtype), **tol)

    check(torch.float32, rtol=0, atol=0)
    model.double()
    ref.double()
    check(torch.float64, rtol=0, atol=0)
    model.to(memory_format=torch.channels_last)
    ref.to(memory_format=torch.channels_last)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    check(torch.float64, torch.channels_last, rtol=0, atol=0)
    model.half()
    ref.half()
    check(torch.float16, rtol=0, atol=0)
    sgs.remove()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_moving_to_cuda_after_attaching_gives_the_cpu_gradients():
    def build():
        torch.manual_seed(6)
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), weight_norm(nn.Conv2d(4, 2, 3)))
        sgs = gs.SpatialGradientScaling(model)
        for name in ("0", "1"):
            sgs.set_scaling(name, G3)
        return model, sgs

    (cpu, cpu_sgs), (gpu, gpu_sgs) = build(), build()
    gpu.cuda()  # after attaching: the tensor hook and the parametrization's G both follow
    x = batch(seed=10, dtype=torch.float32)
    loss_of(cpu(x)).backward()
    loss_of(gpu(x.cuda())).backward()
    for (name, a), (_, b) in zip(cpu.named_parameters(), gpu.named_parameters(), strict=True):
        assert b.grad.is_cuda, name
        torch.testing.assert_close(b.grad.cpu(), a.grad, rtol=1e-4, atol=1e-5)
    gpu_sgs.refresh([x.cuda()])  # a refresh on the GPU matches the CPU one
    cpu_sgs.refresh([x])
    for name in ("0", "1"):
        torch.testing.assert_close(gpu_sgs.scalings[name], cpu_sgs.scalings[name])
    cpu_sgs.remove()
    gpu_sgs.remove()


# ---- transposed convs --------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d])
def test_transposed_convs_are_skipped_or_rejected(cls):
    model = nn.Sequential(cls(2, 2, 3), nn.Conv1d(2, 2, 3))
    sgs = gs.SpatialGradientScaling(model)
    assert list(sgs.scalings) == ["1"]
    assert "transposed" in sgs.skipped["0"]
    sgs.remove()
    with pytest.raises(ValueError, match=f"{cls.__name__} is a transposed.*'0'"):
        gs.SpatialGradientScaling(model, include=["0"])
